"""The teacher: EDM preconditioning, the EDM loss, the deterministic Heun sampler (every state), training, loading.

Notation follows Karras et al. 2022 (EDM), with sigma(t) = t: x_t = x_0 + t n, the denoiser D(x; sigma) predicts
x_0, and the probability-flow ODE is dx/dt = (x - D(x; t)) / t. A teacher is any nn.Module `denoiser(x, sigma)`:

- `EDMPrecond(net, sigma_data)`: D = c_skip x + c_out F(c_in x, c_noise), F an `hkd.unet.UNet` (ours);
- `VPPrecond(unet, alphas_cumprod, prediction_type)`: a discrete-time variance-preserving (DDPM) diffusers
  `UNet2DModel`, rewritten in the EDM parametrisation (x_edm = x_vp / sqrt(abar), sigma = sqrt((1 - abar) / abar)),
  so the same sampler and trajectory store work with it.

`load_teacher(path)` returns either, frozen, with `.identity` = {source, path, hash, config}: the hash covers the
weights and the config (not the path), and is what a trajectory store records and checks.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hkd import checkpoint
from hkd.config import Section, section, to_dict
from hkd.data import DataConfig, load_dataset
from hkd.errors import ConfigError, CorruptFileError, MissingFileError, RunStopped, UserError

CHECKPOINT_NAME = "teacher.pt"


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning and loss


def _sigma_column(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma (a number, () or (B,)) as a float32 (B, 1, 1, 1) column."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's c_skip, c_out, c_in and c_noise = ln(sigma) / 4."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        x = x.to(torch.float32)
        sigma = _sigma_column(sigma, x)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        labels = () if class_labels is None else (class_labels,)  # a conditional UNet (label_dim > 0) takes them
        return c_skip * x + c_out * self.net(c_in * x, c_noise, *labels).to(torch.float32)


def edm_noise(
    images: Tensor, P_mean: float = -1.2, P_std: float = 1.2, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """EDM's draws for a batch: sigma (B, 1, 1, 1) with ln(sigma) ~ N(P_mean, P_std^2), and noise n ~ N(0, sigma^2)."""
    rnd_normal = torch.randn((images.shape[0], 1, 1, 1), generator=generator, device=images.device)
    sigma = (rnd_normal * P_std + P_mean).exp()
    return sigma, torch.randn(images.shape, generator=generator, device=images.device) * sigma


def edm_loss(
    denoiser: nn.Module,
    images: Tensor,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
    noise: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """EDM's loss, averaged: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2 on ||D - y||^2.
    noise: (sigma, n) of edm_noise, drawn here unless given (a micro-batch's rows of its batch's draws)."""
    sigma, n = edm_noise(images, P_mean, P_std, generator) if noise is None else noise
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight * (denoiser(images + n, sigma) - images) ** 2).mean()


# ---------------------------------------------------------------------------------------------------------------
# Sampler


def time_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's time grid t_0 = sigma_max > ... > t_{N-1} = sigma_min, plus t_N = 0: (num_steps + 1,) float64."""
    if num_steps < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need num_steps >= 1 and 0 < sigma_min < sigma_max, got {num_steps}, {sigma_min}, {sigma_max}"
        )
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sampler(
    denoiser: nn.Module,
    noise: Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> tuple[Tensor, Tensor]:
    """EDM Algorithm 1, deterministic (S_churn = 0): 2 num_steps - 1 evaluations of the denoiser.

    noise: (B, C, H, W) standard normal; x_0 = t_0 noise. Returns (times (N + 1,), states (N + 1, B, C, H, W)),
    both float64, states[i] = x at times[i]; states[0] = x_T and states[-1] (times[-1] = 0) is the generated image.
    """
    t = time_steps(num_steps, sigma_min, sigma_max, rho).to(noise.device)
    x = noise.to(torch.float64) * t[0]
    states = [x]
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:], strict=True)):
        d = (x - denoiser(x, t_cur).to(torch.float64)) / t_cur  # Euler step
        x_next = x + (t_next - t_cur) * d
        if i < num_steps - 1:  # second-order correction, except for the last step (to t = 0)
            d_prime = (x_next - denoiser(x_next, t_next).to(torch.float64)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
        x = x_next
        states.append(x)
    return t, torch.stack(states)


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TeacherConfig(Section, name="teacher"):
    """The `teacher` section: the U-Net (hkd.unet.UNet), EDM's loss, Adam with a linear warm-up, and EMA with
    EDM's half-life (in images) ramped up to `ema_rampup` of the images seen so far."""

    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    batch_size: int = 128
    micro_batch: int | None = None  # images per forward; batch_size / micro_batch accumulated per step (None: all)
    lr: float = 2e-3
    lr_warmup: int = 100  # steps
    steps: int = 2000
    ema_halflife: float = 50_000  # images
    ema_rampup: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500  # steps
    log_every: int = 100  # steps
    sample_grid: int = 64  # samples saved as samples.png after training (0: none)

    def check(self) -> None:
        for key in ("model_channels", "num_blocks", "batch_size", "steps", "checkpoint_every", "log_every"):
            self.require(getattr(self, key) >= 1, key, ">= 1")
        self.require(len(self.channel_mult) >= 1 and min(self.channel_mult) >= 1, "channel_mult", "positive integers")
        for key in ("sigma_data", "lr", "P_std", "ema_halflife"):
            self.require(getattr(self, key) > 0, key, "> 0")
        self.require(0 <= self.dropout < 1, "dropout", "in [0, 1)")
        self.require(0 <= self.ema_rampup <= 1, "ema_rampup", "in [0, 1]")
        self.require(self.lr_warmup >= 0, "lr_warmup", ">= 0")
        self.require(self.sample_grid >= 0, "sample_grid", ">= 0")
        micro = self.micro_batch
        if micro is not None and not (1 <= micro <= self.batch_size and self.batch_size % micro == 0):
            raise ConfigError(f"teacher.micro_batch = {micro} must divide teacher.batch_size = {self.batch_size}")


ARCHITECTURE = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout", "sigma_data")


def build_net(data: DataConfig, cfg: TeacherConfig) -> EDMPrecond:
    from hkd.unet import UNet

    net = UNet(
        data.resolution,
        data.channels,
        data.channels,
        model_channels=cfg.model_channels,
        channel_mult=tuple(cfg.channel_mult),
        num_blocks=cfg.num_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions),
        dropout=cfg.dropout,
    )
    return EDMPrecond(net, cfg.sigma_data)


def _batches(dataset, batch_size: int, seed: int, step: int):
    """The batches of steps step, step + 1, ...: epoch e visits the images in the order randperm(seed + e), so the
    data order is a function of the step alone and a resumed run sees the same batches as an uninterrupted one."""
    per_epoch = len(dataset) // batch_size
    if per_epoch == 0:
        raise ConfigError(f"the dataset has {len(dataset)} images, fewer than teacher.batch_size = {batch_size}")

    def batch_indices():
        for s in itertools.count(step):
            epoch, b = divmod(s, per_epoch)
            if s == step or b == 0:
                order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
            yield order[b * batch_size : (b + 1) * batch_size].tolist()

    generator = torch.Generator().manual_seed(seed)  # not the global RNG, which the loss draws from
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batch_indices(), generator=generator))


def train_teacher(
    config: dict[str, Any], out_dir: str | Path, *, device: str | torch.device = "cpu", log=print
) -> dict[str, Any]:
    """Train an EDM teacher on the `data` section's images; resume from out_dir/teacher.pt when it exists.

    The checkpoint (written atomically every `checkpoint_every` steps, at the end, and on SIGTERM/SIGINT) holds the
    network, its EMA, the optimizer, the step, the RNG states and the config. Returns {"checkpoint": path,
    "losses": [(step, mean loss over the last log_every steps)], "step": last step}.
    """
    data, cfg = section(config, "data", DataConfig), section(config, "teacher", TeacherConfig)
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_NAME
    saved_config = {"data": to_dict(data), "teacher": to_dict(cfg)}
    torch.manual_seed(cfg.seed)
    dataset = load_dataset(data)
    denoiser = build_net(data, cfg).to(device).train()
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    step, losses = 0, []
    if path.exists():
        state = checkpoint.load(path)
        old = state["config"]
        changed = [k for k in ARCHITECTURE if old["teacher"][k] != saved_config["teacher"][k]]
        changed += [f"data.{k}" for k in old["data"] if old["data"][k] != saved_config["data"][k]]
        if changed:
            raise ConfigError(f"{path} was trained with other settings ({', '.join(changed)}); use another out dir")
        denoiser.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], [tuple(x) for x in state["losses"]]
        checkpoint.set_rng_state(state["rng"])
        log(f"resumed from {path} at step {step}")

    def save():
        checkpoint.save(
            path,
            {
                "format": "hkd-teacher",
                "config": saved_config,
                "net": denoiser.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "losses": losses,
                "rng": checkpoint.rng_state(),
            },
        )

    batches = _batches(dataset, cfg.batch_size, cfg.seed, step)
    running, start, start_step = 0.0, time.perf_counter(), step
    with checkpoint.StopSignal() as stop:
        while step < cfg.steps and stop.requested is None:
            images = next(batches).to(device)

            # Accumulate gradients: the batch's noise is drawn at once, so the micro-batches change nothing.
            optimizer.zero_grad(set_to_none=True)
            noise = edm_noise(images, cfg.P_mean, cfg.P_std)
            loss = torch.zeros((), device=device)
            for micro in zip(*(x.split(cfg.micro_batch or cfg.batch_size) for x in (images, *noise)), strict=True):
                micro_loss = edm_loss(denoiser, micro[0], sigma_data=cfg.sigma_data, noise=micro[1:])
                micro_loss = micro_loss * (len(micro[0]) / len(images))
                micro_loss.backward()
                loss += micro_loss.detach()

            # Update weights.
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.lr_warmup, 1))
            optimizer.step()
            step += 1

            # Update EMA.
            halflife = min(cfg.ema_halflife, step * cfg.batch_size * cfg.ema_rampup)
            beta = 0.5 ** (cfg.batch_size / max(halflife, 1e-8))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), denoiser.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - beta)
            running += loss.item()
            if step % cfg.log_every == 0 or step == cfg.steps:
                n = step % cfg.log_every or cfg.log_every
                losses.append((step, running / n))
                rate = (step - start_step) * cfg.batch_size / (time.perf_counter() - start)
                log(f"step {step}/{cfg.steps}  loss {running / n:.4f}  {rate:.0f} images/s")
                running = 0.0
            if step % cfg.checkpoint_every == 0:
                save()
        save()
    if stop.requested is not None:
        name = signal.Signals(stop.requested).name
        raise RunStopped(f"stopped by {name} at step {step}: {path} written; run again to resume", stop.requested)
    if cfg.sample_grid:
        from hkd.data.images import save_grid

        generator = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn(cfg.sample_grid, data.channels, data.resolution, data.resolution, generator=generator)
        save_grid(heun_sampler(ema, noise.to(device))[1][-1], out_dir / "samples.png", nrow=8, scale=4)
    return {"checkpoint": path, "losses": losses, "step": step}


# ---------------------------------------------------------------------------------------------------------------
# Loading a teacher


def weights_hash(module: nn.Module, config: dict[str, Any]) -> str:
    """sha256 of the config (as sorted JSON) and every tensor of the state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A frozen denoiser D(x, sigma) from our checkpoint (teacher.pt or its folder; the EMA weights), an EDM snapshot
    pickle (`*.pkl`, see hkd.edm_pickle; nothing in it is executed) or its `hkd import-teacher` folder, or a
    diffusers UNet2DModel saved in a local folder (with `config.json`, or a pipeline folder with `unet/` and
    `scheduler/`; needs `pip install hkd[diffusers]`). Attributes: identity, img_resolution, img_channels."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_NAME).is_file():
        path = path / CHECKPOINT_NAME
    if path.is_dir() and _json(path / "config.json").get("format") == "hkd-model":
        raise UserError(f"{path} is an HKD model (hkd train's output), not a teacher: pass the teacher's teacher.pt")
    edm = _edm_teacher(path)
    if edm is not None:
        denoiser = edm
    elif path.is_file():
        state = checkpoint.load(path)
        if state.get("format") != "hkd-teacher":
            raise CorruptFileError(f"{path} is not an hkd teacher checkpoint (written by `hkd train-teacher`)")
        data = section(state["config"], "data", DataConfig)
        cfg = section(state["config"], "teacher", TeacherConfig)
        denoiser = build_net(data, cfg)
        try:
            denoiser.load_state_dict(state["ema"])
        except (KeyError, RuntimeError) as error:
            raise CorruptFileError(f"{path}: the weights do not match the saved config ({error})") from error
        config = {"data": to_dict(data), "teacher": {k: state["config"]["teacher"][k] for k in ARCHITECTURE}}
        denoiser.img_resolution, denoiser.img_channels = data.resolution, data.channels
        denoiser.identity = {"source": "hkd", "path": str(path.resolve()), "step": state["step"], "config": config}
    elif path.is_dir() and ((path / "config.json").is_file() or (path / "unet").is_dir()):
        denoiser = load_diffusers(path)
    else:
        raise MissingFileError(
            f"teacher {str(path)!r} not found: expected an hkd teacher.pt (or its folder), an EDM snapshot .pkl, a "
            "folder written by `hkd import-teacher`, or a diffusers UNet2DModel folder"
        )
    denoiser.identity["hash"] = weights_hash(denoiser, denoiser.identity["config"])
    return denoiser.eval().requires_grad_(False).to(device)


def _edm_teacher(path: Path) -> nn.Module | None:
    """An EDM snapshot pickle (read without executing it) or its `hkd import-teacher` folder; None for other paths."""
    from hkd import edm_pickle

    if path.is_file() and path.suffix == ".pkl":
        return edm_pickle.load_edm_pickle(path)
    if path.is_dir() and _json(path / "config.json").get("format") == edm_pickle.FORMAT:
        return edm_pickle.load_imported(path)
    return None


def _json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when it is missing or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def vp_alphas_cumprod(scheduler: dict[str, Any]) -> Tensor:
    """abar_t, t = 0..T-1, of a diffusers DDPM/DDIM scheduler config (linear, scaled_linear, squaredcos_cap_v2)."""
    steps = scheduler.get("num_train_timesteps", 1000)
    start, end = scheduler.get("beta_start", 1e-4), scheduler.get("beta_end", 0.02)
    schedule = scheduler.get("beta_schedule", "linear")
    if scheduler.get("trained_betas") is not None:
        betas = torch.tensor(scheduler["trained_betas"], dtype=torch.float64)
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)])
    else:
        raise ValueError(f"unsupported beta_schedule {schedule!r} (linear, scaled_linear, squaredcos_cap_v2)")
    return torch.cumprod(1 - betas, dim=0)


class VPPrecond(nn.Module):
    """A discrete-time VP network eps/v/x0(x_vp, t) as an EDM denoiser: x_vp = x / sqrt(1 + sigma^2), and the
    fractional timestep t(sigma) interpolates ln sigma_t = ln sqrt((1 - abar_t) / abar_t) linearly between integer
    t (sigma outside the trained range is clamped to its ends for the network's input only)."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon, v_prediction, sample)")
        self.unet, self.prediction_type = unet, prediction_type
        self.register_buffer("log_sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log().float())

    def timestep(self, sigma: Tensor) -> Tensor:
        log_sigma = sigma.log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo_value, hi_value = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        return hi - 1 + (log_sigma - lo_value) / (hi_value - lo_value)

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        x = x.to(torch.float32)
        sigma = _sigma_column(sigma, x)
        c_in = 1 / (1 + sigma**2).sqrt()
        out = self.unet(c_in * x, self.timestep(sigma.flatten())).sample[:, : x.shape[1]].to(torch.float32)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return x / (1 + sigma**2) - sigma * c_in * out
        return out


def load_diffusers(path: Path) -> VPPrecond:
    """A diffusers UNet2DModel from a local folder (never a hub), wrapped by VPPrecond."""
    try:
        from diffusers import UNet2DModel
    except ImportError as error:
        raise ImportError("loading a diffusers teacher needs `pip install hkd[diffusers]`") from error
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"{unet_dir} is not a loadable diffusers UNet2DModel folder ({reason})") from error
    scheduler = {}
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.is_file():
            scheduler = _json(candidate)
            break
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    scheduler = {k: scheduler[k] for k in keys if k in scheduler}  # absent: DDPM's defaults
    denoiser = VPPrecond(unet, vp_alphas_cumprod(scheduler), scheduler.get("prediction_type", "epsilon"))
    size = unet.config.sample_size
    denoiser.img_resolution = size if isinstance(size, int) else size[0]
    denoiser.img_channels = unet.config.in_channels
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}  # no paths or versions
    config = {"unet": json.loads(json.dumps(unet_config, default=str)), "scheduler": scheduler}
    denoiser.identity = {"source": "diffusers", "path": str(path.resolve()), "config": config}
    return denoiser


__all__ = [
    "EDMPrecond",
    "TeacherConfig",
    "VPPrecond",
    "edm_loss",
    "edm_noise",
    "heun_sampler",
    "load_teacher",
    "time_steps",
    "train_teacher",
]
