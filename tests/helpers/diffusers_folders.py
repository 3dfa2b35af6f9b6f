"""Random-weight diffusers UNet2DModel folders, written by diffusers' own save_pretrained (unet/ and scheduler/, as
a DDPMPipeline lays them out), in the block layouts HKD's split supports; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

LAYOUTS = {
    # DDPM's CIFAR-10 layout: plain down/up blocks with self-attention at the lower resolution
    "ddpm": dict(
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
    ),
    # ResNet resampling (BigGAN-style): ResnetDownsampleBlock2D / AttnDownBlock2D(downsample_type=resnet), 3 levels
    "resnet": dict(
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        block_out_channels=(8, 16, 16),
        downsample_type="resnet",
        upsample_type="resnet",
    ),
}


def unet(layout: str = "ddpm", *, channels: int = 1, size: int = 16, seed: int = 0, **changes):
    """A UNet2DModel of `layout` with random weights (std 0.1 everywhere: diffusers zero-initialises some layers,
    and a zero layer would hide a wrong split)."""
    import diffusers

    torch.manual_seed(seed)
    settings = dict(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                    norm_num_groups=4, attention_head_dim=4) | LAYOUTS[layout] | changes  # fmt: skip
    net = diffusers.UNet2DModel(**settings)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + p.numel()))
    return net


def write_folder(path: str | Path, layout: str = "ddpm", prediction_type: str = "epsilon", **unet_changes) -> Path:
    """path/unet (UNet2DModel.save_pretrained) and path/scheduler (DDPMScheduler.save_pretrained); returns path."""
    import diffusers

    path = Path(path)
    unet(layout, **unet_changes).save_pretrained(path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type).save_pretrained(
        path / "scheduler"
    )
    return path
