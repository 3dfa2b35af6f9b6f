"""HKDPipeline: a trained HKD model as a diffusers DiffusionPipeline (one network evaluation per image).

    pipe = HKDPipeline.from_pretrained(PIPE_DIR)          # or DiffusionPipeline.from_pretrained, once this is imported
    images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0)).images            # PIL images
    states = pipe.trajectory([80.0, 10.0, 1.0, 0.002], batch_size=4, output_type="pt")        # decoded Koopman states

The folder is diffusers' layout: model_index.json and one subfolder per component. The one component, `network`,
is an HKDNetwork (a diffusers ModelMixin holding the HKDModel; its config.json is the model config, its weights
diffusion_pytorch_model.safetensors). Importing this module registers HKDPipeline with diffusers, so that
DiffusionPipeline.from_pretrained finds the class that model_index.json names; diffusers imports no code from the
folder (it resolves the component's module, hkd.pipeline, among the modules already imported).
`hkd export --format diffusers --model DIR --out PIPE_DIR` writes one from an hkd model folder.

Images: the model's output x_eps (the teacher's data space, about [-1, 1]) mapped to [0, 1] and clamped, as
diffusers' image pipelines return them: output_type "pt" (B, C, H, W) tensors, "np" (B, H, W, C) float arrays,
"pil" a list of PIL images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:
    import diffusers
    from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin  # ModelMixin: how diffusers loads the component
    from diffusers.configuration_utils import register_to_config
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as error:
    raise ImportError("HKDPipeline needs `pip install hkd[diffusers]`") from error

from hkd.errors import UserError
from hkd.model import HKDModel, ModelConfig
from hkd.sections import section, to_dict

OUTPUT_TYPES = ("pil", "np", "pt")


class HKDNetwork(ModelMixin, ConfigMixin):
    """The pipeline's component: an HKDModel (`.hkd`) whose config is the `model` mapping (hkd's model section)."""

    @register_to_config
    def __init__(self, model: dict[str, Any] | None = None):
        super().__init__()
        self.hkd = HKDModel(section({"model": model or {}}, "model", ModelConfig))

    @classmethod
    def from_model(cls, model: HKDModel) -> HKDNetwork:
        """The component holding a copy of `model`'s weights."""
        network = cls(model=to_dict(model.config))
        network.hkd.load_state_dict(model.state_dict())
        return network.to(next(model.parameters()).device)


class HKDPipeline(DiffusionPipeline):
    """One-step generation with a trained HKD model: x_eps = D(exp((eps - T) A) E(T n)), n standard normal."""

    def __init__(self, network: HKDNetwork):
        super().__init__()
        self.register_modules(network=network)

    @classmethod
    def from_model(cls, model: HKDModel) -> HKDPipeline:
        return cls(HKDNetwork.from_model(model))

    @property
    def model(self) -> HKDModel:
        return self.network.hkd

    def noise(self, batch_size: int, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Standard-normal noise (B, C, R, R) drawn as diffusers' pipelines draw it (randn_tensor)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        m = self.model
        shape = (batch_size, m.img_channels, m.img_resolution, m.img_resolution)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def postprocess(self, images: Tensor, output_type: str):
        """x_eps (B, C, H, W) about [-1, 1] -> [0, 1] as output_type: pt, np or pil."""
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.cpu().permute(0, 2, 3, 1).numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """batch_size images from one network evaluation (HKDModel.generate on noise drawn with `generator`)."""
        _check_output_type(output_type)
        images = self.postprocess(self.model.generate(self.noise(batch_size, generator)), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @torch.no_grad()
    def trajectory(
        self,
        times,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
    ) -> list:
        """The decoded Koopman states D(exp(tau(T, s) A) E(x_T)) at each time s in `times` (in (0, T], EDM sigma),
        from one encoder pass (HKDModel.trajectory): a list with one entry per time, each as output_type."""
        _check_output_type(output_type)
        times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
        m = self.model
        if len(times) == 0 or not ((times > 0) & (times <= m.T * (1 + 1e-6))).all():
            raise ValueError(f"times must be a non-empty list in (0, T = {m.T}], got {times.tolist()}")
        states = m.trajectory(self.noise(batch_size, generator), times)
        return [self.postprocess(state, output_type) for state in states]


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")


def export_pipeline(model: HKDModel, out: str | os.PathLike) -> Path:
    """`hkd export --format diffusers`: write HKDPipeline's folder at `out` (which must not exist, or be an empty
    folder), through a temporary sibling renamed into place."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: the pipeline is written to a new folder")
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        raise UserError(f"{tmp} exists (left by an interrupted export?): remove it and run again")
    try:
        HKDPipeline.from_model(model).save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)  # ours: written just above
    return out


# DiffusionPipeline.from_pretrained looks the class named in model_index.json up on the diffusers module
if getattr(diffusers, "HKDPipeline", None) is None:
    diffusers.HKDPipeline = HKDPipeline

__all__ = ["HKDNetwork", "HKDPipeline", "export_pipeline"]
