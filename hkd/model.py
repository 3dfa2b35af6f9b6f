"""HKDModel: encoder E -> per-level Koopman evolution exp(tau A^(l)) -> decoder D, on the teacher's U-Net.

    x_hat(x_t, t) = D({ exp(tau(t, eps) A^(l)) E^(l)(x_t, t) }_l),   tau(t_from, t_to) = c(t_to) - c(t_from)

E and D are the down and up paths of one hkd.unet.UNet (the latents are its skips, one tensor per resolution; see
hkd.unet), A^(l) live in an hkd.propagator.HKDPropagator. Time is EDM's: sigma(t) = t, x_t = x_0 + t n,
T = sigma_max, eps = sigma_min; the clock c is t itself ("identity", the paper) or ln t ("log").

Choices (where the paper is silent):
* The encoder, with encoder_sees_noise=True, sees the input as the teacher's network does: c_in(t) x_t and the
  noise label c_noise(t) = ln(t) / 4. With False it is an autonomous observable g(x_t), told nothing about t:
  encoder_scale=fixed gives it the scale c_in(T) and label c_noise(T) at every t; encoder_scale=estimated reads the
  noise level off the state, sigma_hat(x_t)^2 = max(mean(x_t^2) - sigma_data^2, sigma_min^2) (x_t = x_0 + t n has
  mean square ~ sigma_data^2 + t^2), and uses c_in(sigma_hat), c_noise(sigma_hat): c_in x_t then has unit mean
  square at every t, as the teacher's input has.
* The decoder runs as the teacher's network does at sigma = T, where its output is a prediction of the image:
  D(z) = c_out(T) F_up(z, c_noise(T)), in the teacher's denoised-image space. From the teacher's weights and A = 0,
  the one-step output is then the teacher's denoiser D(x_T; T) (minus c_skip(T) x_T, 4e-5 x_T at T = 80).
* A diffusers UNet2DModel teacher (model.diffusers; hkd.diffusers_unet) is split the same way, in its VP
  parametrisation (c_in, and the VP timestep as the label). Its skip term is no rounding error (an epsilon network's
  c_skip is 1: D(x; sigma) = x - sigma eps_hat), so the decoder keeps it, D(z; x) = c_skip(T) x + c_out(T) F_up(z),
  x the state the latents were encoded from: with A = 0 the one step from x_T is D_teacher(x_T; T).
* koopman=False (ablation): the evolution is the identity (the generators stay zero and frozen).
  hierarchy=False (ablation): one Koopman latent, at the deepest level (the bottleneck's resolution). The other
  levels' skips are removed (E returns zeros there, so nothing reaches the decoder without the evolution) and their
  generators stay zero and frozen.
  Frozen means requires_grad=False, which DDP and the optimiser then skip.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hkd import files
from hkd.edm import EDMPrecond, preconditioning
from hkd.errors import ConfigError, TeacherSplitError
from hkd.propagator import HKDPropagator
from hkd.sections import Section, section, to_dict
from hkd.unet import ARCHITECTURE, UNet, architecture, check_size

FORMAT = "hkd-model"
CLOCKS = ("identity", "log")
GENERATOR_INITS = ("zero", "spread")
ENCODER_SCALES = ("fixed", "estimated")


@dataclass(frozen=True)
class ModelConfig(Section, name="model"):
    """The `model:` section of a run config."""

    img_resolution: int = 32
    img_channels: int = 3
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    generator: str = "spectral"  # "spectral" (2x2 rotation-scaling blocks) or "dense"
    per_position: bool = True  # one generator per spatial position, or one per level
    backend: str = "auto"  # of the propagation ops
    clock: str = "identity"  # c(t) = t ("identity", the paper) or ln t ("log")
    encoder_sees_noise: bool = True
    encoder_scale: str = "fixed"  # the autonomous encoder's (encoder_sees_noise=false) input scale: fixed or estimated
    band_reading: str = "alpha"  # what orders the spectral bands of the analysis and editing: alpha or rate (|beta|)
    generator_init: str = "zero"  # "zero" (the paper: A = 0) or "spread" (spectral: rotation rates spread, see below)
    koopman: bool = True
    hierarchy: bool = True
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    stem_channels: int | None = None  # the input convolution's width (None: channel_mult[0] * model_channels)
    # A diffusers UNet2DModel as the network instead of hkd's U-Net (from_teacher sets it; the U-Net fields above are
    # then unused): {"unet": its config, "scheduler": the VP schedule's keys, "prediction_type": ...}, see
    # hkd.diffusers_unet.
    diffusers: dict[str, Any] | None = None

    def check(self) -> None:
        for key in ("img_resolution", "img_channels", "model_channels", "num_blocks"):
            self.require(getattr(self, key) >= 1, key, ">= 1")
        self.require(len(self.channel_mult) >= 1 and min(self.channel_mult) >= 1, "channel_mult", "positive integers")
        check_size(
            {"img_resolution": self.img_resolution, "in_channels": self.img_channels, **architecture(self)}, "model"
        )
        levels = 2 ** (len(self.channel_mult) - 1)
        if self.diffusers is None:
            self.require(self.img_resolution % levels == 0, "img_resolution", f"a multiple of {levels} (channel_mult)")
        else:
            keys = {"unet", "scheduler", "prediction_type"}
            self.require(set(self.diffusers) == keys, "diffusers", f"null or a mapping with keys {sorted(keys)}")
        self.require(0 <= self.dropout < 1, "dropout", "in [0, 1)")
        self.require(self.generator in ("spectral", "dense"), "generator", "spectral or dense")
        if self.generator == "spectral" and self.diffusers is None:  # 2x2 blocks pair the channels of every level
            even = all(self.model_channels * m % 2 == 0 for m in self.channel_mult)
            self.require(even, "model_channels", "even with spectral generators (times every channel_mult)")
        self.require(self.clock in CLOCKS, "clock", f"one of {', '.join(CLOCKS)}")
        self.require(0 < self.sigma_min < self.sigma_max, "sigma_min", f"in (0, sigma_max = {self.sigma_max})")
        self.require(self.sigma_data > 0, "sigma_data", "> 0")
        self.require(self.band_reading in ("alpha", "rate"), "band_reading", "alpha or rate")
        self.require(self.encoder_scale in ENCODER_SCALES, "encoder_scale", f"one of {', '.join(ENCODER_SCALES)}")
        if self.encoder_sees_noise:
            self.require(
                self.encoder_scale == "fixed", "encoder_scale", "fixed with encoder_sees_noise=true (it is told t)"
            )
        self.require(self.generator_init in GENERATOR_INITS, "generator_init", f"one of {', '.join(GENERATOR_INITS)}")
        if self.generator_init == "spread":
            self.require(
                self.generator == "spectral", "generator_init", "zero with dense generators (spread: spectral)"
            )
        from hkd.ops._backend import BACKENDS

        self.require(self.backend in ("auto", *BACKENDS), "backend", f"one of auto, {', '.join(BACKENDS)}")


class HKDModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.img_resolution, self.img_channels = config.img_resolution, config.img_channels
        self.T, self.eps, self.sigma_data = config.sigma_max, config.sigma_min, config.sigma_data
        if config.diffusers is None:
            self.net = UNet(config.img_resolution, config.img_channels, config.img_channels, **architecture(config))
        else:
            from hkd.diffusers_unet import DiffusersUNet

            self.net = DiffusersUNet(config.diffusers)
            if config.generator == "spectral" and any(d % 2 for d, _, _ in self.net.latent_shapes):
                raise ConfigError(
                    f"model.generator=spectral pairs the channels of every level, and this UNet2DModel's latent widths "
                    f"{[d for d, _, _ in self.net.latent_shapes]} are not all even: use model.generator=dense"
                )
        self.propagator = HKDPropagator(
            self.net.latent_shapes, config.generator, config.per_position, config.backend, config.band_reading
        )
        for level, parameters in enumerate(self._generators_per_level()):
            learnable = config.koopman and (config.hierarchy or level == len(self.net.latent_shapes) - 1)
            for p in parameters:
                p.requires_grad_(learnable)
        if config.generator_init == "spread" and config.koopman:
            self._spread_rotations()
        self._fixed = None  # (generators, FixedStepPropagator) for generate(), see _one_step_propagator

    @torch.no_grad()
    def _spread_rotations(self) -> None:
        """generator_init=spread: alpha = 0 and, per level, the rotation rates of the pairs k = 0 .. n-1 spread
        evenly, beta_k = pi k / (n |tau(T, eps)|), so that from T to eps pair k turns by pi k / n (the same at every
        position): a range of frequencies from the first step, instead of A = 0 where every mode starts equal."""
        span = float(self.tau(self.T, self.eps).abs())
        for beta in self.propagator.betas:
            if not beta.requires_grad:  # a frozen level (hierarchy=false) stays the identity
                continue
            n = beta.shape[0]
            rates = torch.arange(n, dtype=torch.float64) * math.pi / (n * span)
            beta.copy_(rates.reshape(n, *([1] * (beta.dim() - 1))).expand_as(beta))

    def _generators_per_level(self) -> list[list[nn.Parameter]]:
        if self.propagator.generator == "spectral":
            return [[a, b] for a, b in zip(self.propagator.alphas, self.propagator.betas, strict=True)]
        return [[A] for A in self.propagator.generators]

    # Time ----------------------------------------------------------------------------------------------------------

    def clock(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if not torch.compiler.is_compiling() and (t <= 0).any():  # eager only: a data-dependent branch breaks graphs
            raise ValueError(f"times must be positive (EDM sigma), got {t}")
        return t if self.config.clock == "identity" else t.log()

    def tau(self, t_from: Tensor | float, t_to: Tensor | float) -> Tensor:
        """The Koopman time step from t_from to t_to: c(t_to) - c(t_from) (float64; scalar or per sample)."""
        return self.clock(t_to) - self.clock(t_from)

    def estimate_sigma(self, x_t: Tensor) -> Tensor:
        """sigma_hat(x_t) = sqrt(max(mean(x_t^2) - sigma_data^2, eps^2)) per sample: the noise level read off the
        state (encoder_scale=estimated)."""
        mean_square = x_t.float().square().mean(dim=(1, 2, 3))
        return (mean_square - self.sigma_data**2).clamp_min(self.eps**2).sqrt()

    def _encoder_sigma(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """The noise level the encoder's input scale and label are computed at: t, T or sigma_hat(x_t)."""
        if self.config.encoder_sees_noise:
            return self._sigma(t, x_t.shape[0], x_t.device)
        if self.config.encoder_scale == "estimated":
            return self.estimate_sigma(x_t)
        return self._sigma(self.T, x_t.shape[0], x_t.device)

    def coefficients(self, sigma: Tensor | float) -> tuple:
        """(c_skip, c_out, c_in, noise label) of the teacher's parametrisation at sigma: EDM's (hkd's U-Net) or the VP
        schedule's, the label a timestep (a diffusers UNet2DModel, hkd.diffusers_unet)."""
        if self.config.diffusers is None:
            return preconditioning(sigma, self.sigma_data)
        return self.net.preconditioning(sigma)

    @property
    def keeps_skip(self) -> bool:
        """Whether the output keeps the teacher's skip term c_skip(T) x (a diffusers epsilon or v-prediction network;
        decode then needs x)."""
        return self.config.diffusers is not None and self.config.diffusers["prediction_type"] != "sample"

    def _sigma(self, t: Tensor | float, batch: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
        if t.numel() not in (1, batch):
            raise ValueError(f"t must be a scalar or have one entry per sample ({batch}), got {t.numel()} entries")
        return t.expand(batch)

    # The three stages ----------------------------------------------------------------------------------------------

    def check_images(self, x: Tensor, what: str = "x_t") -> None:
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{what} must have shape (B, {', '.join(map(str, expected))}) for this model, got {tuple(x.shape)}"
            )

    def encode(self, x_t: Tensor, t: Tensor | float) -> list[Tensor]:
        """E(x_t): the latents at time t (t a scalar or one per sample)."""
        self.check_images(x_t)
        _, _, c_in, c_noise = self.coefficients(self._encoder_sigma(x_t, t))
        latents = self.net.encode(c_in.reshape(-1, 1, 1, 1) * x_t.float(), c_noise)
        if not self.config.hierarchy:  # one Koopman latent: the bottleneck's; the other skips are removed
            latents = [*(torch.zeros_like(z) for z in latents[:-1]), latents[-1]]
        return latents

    def propagate(self, latents: list[Tensor], t_from: Tensor | float, t_to: Tensor | float) -> list[Tensor]:
        """exp(tau(t_from, t_to) A^(l)) z^(l) for every level, in one op call (the identity when koopman=False)."""
        if not self.config.koopman:
            return list(latents)
        return self.propagator(latents, self.tau(t_from, t_to).to(latents[0].device))

    def decode(self, latents: list[Tensor], x: Tensor | None = None) -> Tensor:
        """D(z): an image in the teacher's denoised-image space (float32). When the model keeps the teacher's skip
        term (keeps_skip), x is the state the latents were encoded from and D(z; x) = c_skip(T) x + c_out(T) F(z)."""
        c_skip, c_out, _, c_noise = self.coefficients(self.T)
        labels = torch.as_tensor(c_noise, dtype=torch.float32, device=latents[0].device).expand(latents[0].shape[0])
        out = c_out * self.net.decode(latents, labels).float()
        if self.keeps_skip:
            if x is None:
                raise ValueError(
                    "this model keeps its teacher's skip term: decode(latents, x) needs x, the encoded state"
                )
            out = out + c_skip * x.float()
        return out

    def forward(self, x_t: Tensor, t: Tensor | float, return_latents: bool = False) -> Tensor | tuple:
        """x_hat at eps from x_t: D(exp(tau(t, eps) A) E(x_t, t)); with return_latents, (x_hat, E(x_t, t))."""
        latents = self.encode(x_t, t)
        x_hat = self.decode(self.propagate(latents, t, self.eps), x_t)
        return (x_hat, latents) if return_latents else x_hat

    # Generation ----------------------------------------------------------------------------------------------------

    def _one_step_propagator(self):
        """propagator.at(tau(T, eps)), cached with a copy of the generators it was made from and rebuilt when they
        differ (an optimiser step, load_state_dict, .to(), an edit through .data: a comparison, cheap next to the
        U-Net)."""
        current = list(self.propagator.parameters())
        cached = self._fixed
        if cached is None or not all(
            a.device == b.device and a.dtype == b.dtype and torch.equal(a, b)
            for a, b in zip(cached[0], current, strict=True)
        ):
            snapshot = [p.detach().clone() for p in current]
            cached = self._fixed = (snapshot, self.propagator.at(self.tau(self.T, self.eps).float()))
        return cached[1]

    def generate(self, noise: Tensor) -> Tensor:
        """One step: x_eps from standard-normal noise (x_T = T noise, as EDM's sampler starts). Without autograd and
        with koopman=True the evolution is the cached fixed step propagator.at(tau(T, eps))."""
        self.check_images(noise, "noise")
        x_T = noise * self.T
        if torch.is_grad_enabled() or not self.config.koopman:
            return self(x_T, self.T)
        return self.decode(self._one_step_propagator()(self.encode(x_T, self.T)), x_T)

    def trajectory(self, noise: Tensor, times: Tensor | list[float]) -> Tensor:
        """Decoded states at each of `times` (in (0, T]) from standard-normal noise (x_T = T noise), closed form after
        one encoder pass: D(exp(tau(T, s) A) E(x_T)) for s in times. Returns (len(times), B, C, H, W)."""
        self.check_images(noise, "noise")
        times = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
        x_T = noise * self.T
        z_T = self.encode(x_T, self.T)
        return torch.stack([self.decode(self.propagate(z_T, self.T, s), x_T) for s in times])

    # Weights -------------------------------------------------------------------------------------------------------

    @classmethod
    def from_teacher(cls, teacher: nn.Module, config: ModelConfig | None = None) -> HKDModel:
        """An HKDModel whose encoder and decoder are the teacher's U-Net, generators zero: an hkd teacher or an EDM
        one (hkd.edm.EDMPrecond around an hkd.unet.UNet, as load_teacher returns both), a bare UNet, or a diffusers
        UNet2DModel (hkd.teacher.VPPrecond, see hkd.diffusers_unet). Without `config`, the U-Net sizes, image size
        and sigma_data come from the teacher; with it, they must match. A teacher whose network cannot be split this
        way (unsupported diffusers blocks, EDM's VP/VE preconditioning, class labels) raises TeacherSplitError, one
        line, before any work."""
        from hkd.teacher import VPPrecond

        if isinstance(teacher, VPPrecond):
            return cls._from_diffusers(teacher, config)
        source = getattr(teacher, "identity", {}).get("source", "")
        net = teacher.net if isinstance(teacher, EDMPrecond) else teacher
        if not isinstance(net, UNet):
            kind = "a diffusers UNet2DModel" if source == "diffusers" else type(teacher).__name__
            if source.startswith("edm"):
                kind = f"EDM with {getattr(teacher, 'kind', '?').upper()} preconditioning (HKD's clock is EDM's)"
            raise TeacherSplitError(
                f"from_teacher cannot split {kind} into HKD's encoder and decoder: it needs an hkd.unet.UNet, bare or "
                "in EDM preconditioning (an hkd teacher, or an EDM DDPM++ .pkl with EDMPrecond)"
            )
        if not net.architecture["embed_noise"] or net.in_channels != net.out_channels or net.label_dim:
            raise TeacherSplitError(
                "from_teacher needs an unconditional teacher UNet with embed_noise=True and in_channels == out_channels"
            )
        found = {name: net.architecture[name] for name in ARCHITECTURE}
        found |= dict(img_resolution=net.img_resolution, img_channels=net.in_channels)
        if hasattr(teacher, "sigma_data"):
            found["sigma_data"] = teacher.sigma_data
        if config is None:
            config = ModelConfig(**found)
        differ = {k: (getattr(config, k), v) for k, v in found.items() if _plain(getattr(config, k)) != _plain(v)}
        if differ:
            raise ConfigError(
                "model config does not match the teacher: "
                + ", ".join(f"{k}={ours!r} (teacher {theirs!r})" for k, (ours, theirs) in differ.items())
            )
        model = cls(config)
        model.net.load_state_dict(net.state_dict())
        return model.to(next(net.parameters()).device)

    @classmethod
    def _from_diffusers(cls, teacher: nn.Module, config: ModelConfig | None) -> HKDModel:
        """from_teacher for a diffusers UNet2DModel in VPPrecond: the model's `diffusers` field describes the network
        (its config, the schedule's keys, the prediction type), so from_pretrained rebuilds it without the teacher."""
        from hkd.diffusers_unet import check_splittable

        unet = teacher.unet
        unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        check_splittable(unet_config)
        scheduler = getattr(teacher, "identity", {}).get("config", {}).get("scheduler")
        if scheduler is None:  # a bare VPPrecond: the schedule's length (its values are copied with the weights)
            scheduler = {"num_train_timesteps": len(teacher.log_sigmas)}
        described = {"unet": unet_config, "scheduler": dict(scheduler), "prediction_type": teacher.prediction_type}
        described = json.loads(json.dumps(described, default=list))  # plain JSON values, as config.json holds them
        size = unet.config.sample_size
        found = dict(
            img_resolution=size if isinstance(size, int) else size[0], img_channels=unet.config.in_channels,
            diffusers=described,
        )  # fmt: skip
        largest = float(teacher.log_sigmas[-1].exp())  # sigma of the schedule's last timestep
        if config is None:  # T: EDM's 80, or the schedule's largest sigma when that is smaller
            config = ModelConfig(**found, sigma_max=min(ModelConfig.sigma_max, round(largest, 4)))
        differ = [k for k, v in found.items() if _plain(getattr(config, k)) != _plain(v)]
        if differ:
            raise ConfigError(f"model config does not match the diffusers teacher: {', '.join(differ)} differ")
        if config.sigma_max > largest * (1 + 1e-4):
            raise ConfigError(
                f"model.sigma_max = {config.sigma_max} is above the largest sigma of the teacher's VP schedule "
                f"({largest:.4g}, its last timestep), where it was never trained: set model.sigma_max and "
                f"trajectories.sigma_max to at most {largest:.4g}"
            )
        model = cls(config)
        model.net.vp.load_state_dict(teacher.state_dict())
        return model.to(teacher.log_sigmas.device)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """directory/model.safetensors and directory/config.json (format and model config), as
        hkd.files.save_pretrained writes them."""
        config = {"format": FORMAT, "version": 1, "model": to_dict(self.config)}
        files.save_pretrained(directory, self.state_dict(), config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> HKDModel:
        """The model written by save_pretrained, checked and loaded by hkd.files.load_pretrained."""
        model = files.load_pretrained(directory, FORMAT, lambda saved: cls(section(saved, "model", ModelConfig)))
        return model.to(device)


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


# `hkd generate` ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_to(
    model: HKDModel,
    out: str | os.PathLike,
    num: int,
    *,
    seed: int = 0,
    trajectory: int = 0,
    npz: bool = False,
    batch_size: int = 256,
) -> list[Path]:
    """One-step samples from noise of `seed` (drawn on the CPU: the same images on any device), written to `out`:
    grid.png, samples/NNNNNN.png; with trajectory=K, K states from T to eps (log-spaced times, closed form) per
    sample as trajectories/NNNNNN.png strips and trajectory_grid.png (one row per sample); with npz, samples.npz
    (images (N, C, H, W) float32; arr_0 (N, H, W, C) uint8, EDM's quantisation, the layout FID tools read; and
    trajectory (N, K, C, H, W) with times (K,)). Sample PNGs are at native resolution. Returns the paths written."""
    from hkd.image_grid import save_grid

    if num < 1 or trajectory < 0 or trajectory == 1 or batch_size < 1:
        raise ValueError(
            f"need num >= 1, batch_size >= 1 and trajectory 0 or >= 2, got {num}, {batch_size}, {trajectory}"
        )
    out, device = files.output_folder(out), next(model.parameters()).device
    shape = (num, model.img_channels, model.img_resolution, model.img_resolution)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    times = torch.logspace(math.log10(model.T), math.log10(model.eps), trajectory, dtype=torch.float64)
    if trajectory:
        times[0], times[-1] = model.T, model.eps  # exact ends
    images, states = [], []
    for batch in noise.split(batch_size):
        images.append(model.generate(batch.to(device)).cpu())
        if trajectory:
            states.append(model.trajectory(batch.to(device), times).transpose(0, 1).cpu())  # (b, K, C, H, W)
    images = torch.cat(images)
    scale = max(1, 64 // model.img_resolution)
    written = [out / "grid.png"]
    save_grid(images, written[0], nrow=math.ceil(math.sqrt(num)), scale=scale)
    for i, image in enumerate(images):  # native resolution (only the grids are upscaled)
        save_grid(image[None], out / "samples" / f"{i:06d}.png", padding=0)
    written.append(out / "samples")
    from hkd.metrics import to_uint8

    arrays = {"images": images.numpy(), "arr_0": to_uint8(images).permute(0, 2, 3, 1).numpy()}
    if trajectory:
        states = torch.cat(states)
        for i, strip in enumerate(states):
            save_grid(strip, out / "trajectories" / f"{i:06d}.png", nrow=trajectory, scale=scale)
        save_grid(states.flatten(0, 1), out / "trajectory_grid.png", nrow=trajectory, scale=scale)
        written += [out / "trajectories", out / "trajectory_grid.png"]
        arrays |= {"trajectory": states.numpy(), "times": times.numpy()}
    if npz:
        import numpy as np

        files.atomic_write(out / "samples.npz", lambda file: np.savez(file, seed=seed, **arrays))
        written.append(out / "samples.npz")
    return written
