"""The teacher: training and loading. EDM's maths (preconditioning, loss, samplers, EMA) is in hkd.edm.

A teacher is any nn.Module `denoiser(x, sigma)` in EDM's form (hkd.edm), with sigma(t) = t:

- `hkd.edm.EDMPrecond(net, sigma_data)`: D = c_skip x + c_out F(c_in x, c_noise), F an `hkd.unet.UNet` (ours);
- `VPPrecond(unet, alphas_cumprod, prediction_type)`: a discrete-time variance-preserving (DDPM) diffusers
  `UNet2DModel`, rewritten in the EDM parametrisation (x_edm = x_vp / sqrt(abar), sigma = sqrt((1 - abar) / abar)),
  so the same sampler and trajectory store work with it.

`load_teacher(path)` returns either, frozen, with `.identity` = {source, path, hash, config}: the hash covers the
weights and the config (not the path), and is what a trajectory store records and checks.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hkd import files, loop
from hkd.data import DataConfig, load_dataset
from hkd.edm import EDMPrecond, edm_loss, edm_noise, ema_halflife_decay, heun_sampler, sigma_column
from hkd.errors import ConfigError, CorruptFileError, MissingFileError, UserError
from hkd.runstate import RunState, last_good, restore, save_checkpoint
from hkd.sections import Section, section, to_dict
from hkd.unet import UNet, architecture, check_size

CHECKPOINT_NAME = "teacher.pt"


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
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
    threads: int = 0  # torch CPU threads (0: torch's default, one per core), as train.threads

    def check(self) -> None:
        for key in ("model_channels", "num_blocks", "batch_size", "steps", "checkpoint_every", "log_every"):
            self.require(getattr(self, key) >= 1, key, ">= 1")
        self.require(len(self.channel_mult) >= 1 and min(self.channel_mult) >= 1, "channel_mult", "positive integers")
        for key in ("sigma_data", "lr", "P_std", "ema_halflife"):
            self.require(getattr(self, key) > 0, key, "> 0")
        self.require(0 <= self.dropout < 1, "dropout", "in [0, 1)")
        check_size(architecture(self), "teacher")
        self.require(0 <= self.ema_rampup <= 1, "ema_rampup", "in [0, 1]")
        self.require(self.lr_warmup >= 0, "lr_warmup", ">= 0")
        self.require(self.sample_grid >= 0, "sample_grid", ">= 0")
        self.require(0 <= self.threads <= 1024, "threads", "in [0, 1024]")
        micro = self.micro_batch
        if micro is not None and not (1 <= micro <= self.batch_size and self.batch_size % micro == 0):
            raise ConfigError(f"teacher.micro_batch = {micro} must divide teacher.batch_size = {self.batch_size}")


# What fixes a teacher's network: the U-Net fields of the section, and sigma_data (resume checks it, the hash covers it)
ARCHITECTURE = (*architecture(TeacherConfig()), "sigma_data")


def build_net(data: DataConfig, cfg: TeacherConfig) -> EDMPrecond:
    """The teacher's denoiser: EDM preconditioning around the U-Net of the section's architecture."""
    return EDMPrecond(UNet(data.resolution, data.channels, data.channels, **architecture(cfg)), cfg.sigma_data)


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
    data: DataConfig,
    cfg: TeacherConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    log=print,
) -> dict[str, Any]:
    """Train an EDM teacher (the `teacher` section `cfg`) on the images of the `data` section, in the training loop
    of hkd.loop: `train_teacher(config.data, config.teacher, out)` for a RunConfig `config`. resume=True continues
    from out_dir/teacher.pt (which must exist; without resume it must not), as hkd.train.train does.

    The checkpoint (written atomically every `checkpoint_every` steps, at the end, and on SIGTERM/SIGINT) holds the
    network, its EMA, the optimizer, the step, the RNG states and the config. Returns {"checkpoint": path,
    "losses": [(step, mean loss over the last log_every steps)], "step": last step}.
    """
    if not (isinstance(data, DataConfig) and isinstance(cfg, TeacherConfig)):
        raise TypeError("train_teacher(data, cfg, out_dir) takes the sections config.data and config.teacher")
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_NAME
    saved_config = {"data": to_dict(data), "teacher": to_dict(cfg)}
    if cfg.threads > (os.cpu_count() or 1):
        raise ConfigError(f"teacher.threads = {cfg.threads} is more than this machine's {os.cpu_count()} CPUs")
    state = files.resume_from(path, resume, "--out")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dataset = load_dataset(data)
    denoiser = build_net(data, cfg).to(device).train()
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    run = RunState(denoiser, ema, optimizer, None, torch.amp.GradScaler(enabled=False))
    if state is not None:
        old = state["config"]
        changed = [k for k in ARCHITECTURE if old["teacher"][k] != saved_config["teacher"][k]]
        changed += [f"data.{k}" for k in old["data"] if old["data"][k] != saved_config["data"][k]]
        if changed:
            raise ConfigError(f"{path} was trained with other settings ({', '.join(changed)}); use another out dir")
        restore(run, {**state, "model": state["net"]})
        log(f"resumed from {path} at step {run.step}")

    def save():
        # the teacher's own checkpoint format ("net" for the network; no scheduler, scaler or running loss)
        teacher_state = {
            "format": "hkd-teacher",
            "config": saved_config,
            "net": denoiser.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": run.step,
            "losses": run.losses,
            "rng": files.rng_state(),
        }
        save_checkpoint(path, teacher_state, hint="Lower teacher.lr")

    def nonfinite() -> str:
        return f"the loss is not finite at step {run.step}; the last good checkpoint is {last_good(path)}"

    batches = _batches(dataset, cfg.batch_size, cfg.seed, run.step)
    rounds = cfg.batch_size // (cfg.micro_batch or cfg.batch_size)
    start, start_step = time.perf_counter(), run.step
    with files.StopSignal() as stop:
        for step in loop.steps(run, cfg.steps, stop, save, cfg.checkpoint_every):
            # Data: a batch, and EDM's noise for all of it at once (so the micro-batches change nothing).
            images = next(batches).to(device)
            sigma, noise = edm_noise(images, cfg.P_mean, cfg.P_std)

            # Optimiser step on EDM's loss, at the warm-up's learning rate; then the EMA (EDM's half-life).
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.lr_warmup, 1))
            loss_fn = functools.partial(_edm_loss, sigma_data=cfg.sigma_data)
            value, finite, _ = loop.train_step(
                denoiser, optimizer, loop.split_batch((images, sigma, noise), rounds), loss_fn
            )
            decay = ema_halflife_decay(cfg.ema_halflife, cfg.ema_rampup, (step + 1) * cfg.batch_size, cfg.batch_size)
            loop.advance(run, value, finite, decay, "stop", nonfinite)

            # Log.
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                mean = loop.log_mean(run)
                rate = (run.step - start_step) * cfg.batch_size / (time.perf_counter() - start)
                log(f"step {run.step}/{cfg.steps}  loss {mean:.4f}  {rate:.0f} images/s")
    loop.raise_if_stopped(stop, run, cfg.steps, path)
    if cfg.sample_grid:
        from hkd.image_grid import save_grid

        generator = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn(cfg.sample_grid, data.channels, data.resolution, data.resolution, generator=generator)
        save_grid(heun_sampler(ema, noise.to(device))[1][-1], out_dir / "samples.png", nrow=8, scale=4)
    return {"checkpoint": path, "losses": run.losses, "step": run.step}


def _edm_loss(denoiser: nn.Module, images: Tensor, sigma: Tensor, noise: Tensor, sigma_data: float) -> Tensor:
    """EDM's loss of a micro-batch, with its rows of the batch's noise."""
    return edm_loss(denoiser, images, sigma_data=sigma_data, noise=(sigma, noise))


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
        state = files.load(path)
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
    """A JSON file's object, or {} when it is missing or not a JSON object; a corrupt one (not JSON, NaN or infinite
    numbers, too large) is a CorruptFileError naming it."""
    if not path.is_file():
        return {}
    value = files.read_json(path)
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

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) at sigma: D(x; sigma) = c_skip x + c_out F(c_in x, timestep(sigma)), F the network's
        eps (c_skip 1, c_out -sigma), v (c_skip c_in^2, c_out -sigma c_in) or x0 (c_skip 0, c_out 1) prediction."""
        c_in = 1 / (1 + sigma**2).sqrt()
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction_type == "v_prediction":
            return c_in**2, -sigma * c_in, c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        x = x.to(torch.float32)
        sigma = sigma_column(sigma, x)
        c_skip, c_out, c_in = self.coefficients(sigma)
        out = self.unet(c_in * x, self.timestep(sigma.flatten())).sample[:, : x.shape[1]].to(torch.float32)
        return c_skip * x + c_out * out


def load_diffusers(path: Path) -> VPPrecond:
    """A diffusers UNet2DModel from a local folder (never a hub), wrapped by VPPrecond."""
    try:
        from diffusers import UNet2DModel
    except ImportError as error:
        raise ImportError("loading a diffusers teacher needs `pip install hkd[diffusers]`") from error
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    kind = _json(unet_dir / "config.json").get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise UserError(f"{unet_dir} holds a diffusers {kind}, not a UNet2DModel (an unconditional pixel-space U-Net)")
    scheduler = None
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.is_file():
            scheduler = _json(candidate)
            break
    if scheduler is None:
        raise MissingFileError(
            f"{path} has no scheduler config (scheduler/scheduler_config.json or scheduler_config.json): the VP "
            "schedule and prediction type of the UNet2DModel are read from it, never guessed"
        )
    if scheduler.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
        raise UserError(
            f"{path}: unsupported prediction_type {scheduler['prediction_type']!r} (epsilon, v_prediction, sample)"
        )
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise UserError(f"{unet_dir} is not a loadable diffusers UNet2DModel folder ({reason})") from error
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    scheduler = {k: scheduler[k] for k in keys if k in scheduler}  # a key left out: DDPM's default
    denoiser = VPPrecond(unet, vp_alphas_cumprod(scheduler), scheduler.get("prediction_type", "epsilon"))
    size = unet.config.sample_size
    denoiser.img_resolution = size if isinstance(size, int) else size[0]
    denoiser.img_channels = unet.config.in_channels
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}  # no paths or versions
    config = {"unet": json.loads(json.dumps(unet_config, default=str)), "scheduler": scheduler}
    denoiser.identity = {"source": "diffusers", "path": str(path.resolve()), "config": config}
    return denoiser


__all__ = ["TeacherConfig", "VPPrecond", "load_teacher", "train_teacher"]
