"""A diffusers UNet2DModel split into HKD's encoder and decoder (Algorithm 1, step 3), in its VP parametrisation.

The network stays the teacher's (`self.vp`, an hkd.teacher.VPPrecond around the UNet2DModel); only its forward is
cut in two:

    encode(x, label):   conv_in, the time embedding, the down blocks and the mid block. The latents are every output
                        the up path takes, grouped by resolution: level l is the channel-concatenation of
                        [conv_in or the previous block's downsampler, the resnets of down block l] (the skips), and
                        the deepest level ends with the mid block's output (the up path's input).
    decode(z, label):   the up blocks, which take the latents' chunks in place of the skips (the last chunk first),
                        then conv_norm_out, the activation and conv_out: the network's output F (its first C channels,
                        as VPPrecond reads it).

So decode(encode(x, t), t) is the UNet2DModel's forward at timestep t. The parametrisation is VPPrecond's, in EDM's
form: D(x; sigma) = c_skip x + c_out F(c_in x, t(sigma)) with c_in = 1 / sqrt(1 + sigma^2) and, per prediction type,
epsilon: c_skip = 1, c_out = -sigma; v_prediction: c_skip = c_in^2, c_out = -sigma c_in; sample: c_skip = 0, c_out = 1.
t(sigma) is the fractional VP timestep whose sigma_t = sqrt((1 - abar_t) / abar_t) is sigma (log-linear between steps).

Supported blocks: DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D (and AttnDownBlock2D with
downsample_type=resnet) on the way down, UpBlock2D, AttnUpBlock2D, ResnetUpsampleBlock2D on the way up,
UNetMidBlock2D or none in the middle; positional time embedding, unconditional, square images. Anything else is a
TeacherSplitError naming it, before any weights are built.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
MID_BLOCKS = ("UNetMidBlock2D", None)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _unet_class():
    try:
        from diffusers import UNet2DModel
    except ImportError as error:
        raise ImportError("a diffusers-backed HKD model needs `pip install hkd[diffusers]`") from error
    return UNet2DModel


def unet_settings(unet_config: dict[str, Any]) -> dict[str, Any]:
    """A UNet2DModel config with the constructor's defaults filled in (config.json may leave keys out)."""
    parameters = inspect.signature(_unet_class().__init__).parameters
    defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return defaults | {k: v for k, v in unet_config.items() if not k.startswith("_")}


def check_splittable(unet_config: dict[str, Any]) -> None:
    """hkd.model.TeacherSplitError, one line naming it, for a UNet2DModel config the split does not support."""
    from hkd.errors import TeacherSplitError

    c = unet_settings(unet_config)

    def refuse(what: str) -> None:
        raise TeacherSplitError(
            f"from_teacher cannot split this diffusers UNet2DModel into HKD's encoder and decoder: {what}"
        )

    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for name in c[key]:
            if name not in allowed:
                refuse(f"unsupported block {name} in {key} (supported: {', '.join(allowed)})")
    if c["mid_block_type"] not in MID_BLOCKS:
        refuse(f"unsupported block {c['mid_block_type']} as mid_block_type (supported: UNetMidBlock2D or null)")
    if c["time_embedding_type"] != "positional":
        refuse(f"time_embedding_type {c['time_embedding_type']!r} (supported: positional, the VP timestep)")
    if c["class_embed_type"] is not None or c["num_class_embeds"] is not None:
        refuse("it is class-conditional (class_embed_type / num_class_embeds set)")
    size = c["sample_size"]
    if not isinstance(size, int) and (size is None or len(size) != 2 or size[0] != size[1]):
        refuse(f"sample_size {size!r} (HKD needs square images of a known size)")
    if c["out_channels"] not in (c["in_channels"], 2 * c["in_channels"]):
        channels = f"out_channels {c['out_channels']} for in_channels {c['in_channels']}"
        refuse(f"{channels} (the same, or twice: a learned variance)")


class DiffusersUNet(nn.Module):
    """A UNet2DModel with encode/decode and latent_chunks/latent_shapes as hkd.unet.UNet has them, and the VP
    parametrisation's coefficients. `config`: {"unet": UNet2DModel config, "scheduler": the schedule's keys
    (hkd.teacher.vp_alphas_cumprod), "prediction_type": epsilon, v_prediction or sample}."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        from hkd.teacher import VPPrecond, vp_alphas_cumprod

        check_splittable(config["unet"])
        unet = _unet_class().from_config(unet_settings(config["unet"]))
        self.vp = VPPrecond(unet, vp_alphas_cumprod(config["scheduler"]), config["prediction_type"])
        c = unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        self.img_resolution, self.in_channels = size, c.in_channels
        widths = c.block_out_channels

        # The outputs the up path takes, grouped by resolution (a downsampler's output opens the next level).
        self.latent_chunks: list[list[int]] = [[widths[0]]]  # conv_in
        for i, block in enumerate(unet.down_blocks):
            self.latent_chunks[-1] += [widths[i]] * len(block.resnets)
            if block.downsamplers is not None:
                self.latent_chunks.append([widths[i]])
        if unet.mid_block is not None:
            self.latent_chunks[-1].append(widths[-1])  # the mid block's output
        self.latent_shapes = [
            (sum(chunks), size >> level, size >> level) for level, chunks in enumerate(self.latent_chunks)
        ]

    @property
    def unet(self) -> nn.Module:
        return self.vp.unet

    def preconditioning(self, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, timestep) at sigma (a number or a tensor), float32, as VPPrecond computes them."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.vp.log_sigmas.device)
        return (*self.vp.coefficients(sigma), self.vp.timestep(sigma.reshape(-1)).reshape(sigma.shape))

    def _embed(self, timesteps: Tensor, batch: int) -> Tensor:
        timesteps = torch.as_tensor(timesteps, device=self.vp.log_sigmas.device).reshape(-1)
        timesteps = timesteps.expand(batch) if timesteps.numel() == 1 else timesteps
        return self.unet.time_embedding(self.unet.time_proj(timesteps).to(self.unet.dtype))

    def encode(self, x: Tensor, timesteps: Tensor) -> list[Tensor]:
        """The latents of x (the network's input, c_in x_t) at the VP timesteps (B,) or (1,)."""
        unet = self.unet
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"the UNet2DModel expects images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        if unet.config.center_input_sample:
            x = 2 * x - 1.0
        emb = self._embed(timesteps, x.shape[0])
        h = unet.conv_in(x)
        outputs = [h]
        for block in unet.down_blocks:
            h, skips = block(hidden_states=h, temb=emb)
            outputs += skips
        if unet.mid_block is not None:
            outputs.append(unet.mid_block(h, emb))
        latents, start = [], 0
        for chunks in self.latent_chunks:
            latents.append(torch.cat(outputs[start : start + len(chunks)], dim=1))
            start += len(chunks)
        return latents

    def decode(self, latents: list[Tensor], timesteps: Tensor) -> Tensor:
        """F: the network's output (B, C, R, R) from the latents, at the VP timesteps (B,) or (1,)."""
        if len(latents) != len(self.latent_shapes) or any(
            tuple(z.shape[1:]) != shape for z, shape in zip(latents, self.latent_shapes, strict=False)
        ):
            got = [tuple(z.shape[1:]) for z in latents]
            raise ValueError(f"decode expects latents of shapes {self.latent_shapes} (after the batch), got {got}")
        unet = self.unet
        emb = self._embed(timesteps, latents[0].shape[0])
        skips = [
            s for z, chunks in zip(latents, self.latent_chunks, strict=True) for s in torch.split(z, chunks, dim=1)
        ]
        h = skips.pop() if unet.mid_block is not None else skips[-1]
        for block in unet.up_blocks:
            n = len(block.resnets)
            h, skips = block(h, tuple(skips[-n:]), emb), skips[:-n]
        h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        return h[:, : self.in_channels]


__all__ = ["DOWN_BLOCKS", "UP_BLOCKS", "DiffusersUNet", "check_splittable"]
