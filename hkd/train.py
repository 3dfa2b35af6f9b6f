"""Training HKD (Algorithm 1 of the paper): one CPU to many GPUs.

Each iteration, for every trajectory {x_t} of the batch (states stored on the teacher's time grid):

    S = {t_1, ..., t_(s-1)} (sampled from the stored grid) + {T}
    x_hat(t) = model(x_t, t) = D({exp((eps - t) A^(l)) E^(l)(x_t)}_l)          for t in S
    loss     = mean over the batch and S of  lambda1 * MSE(x_hat, x_eps) + lambda2 * P(x_hat, x_eps)

Times. The states exist only at the grid points the teacher's solver visited, so the times are grid points, never
interpolated (interpolating between Heun states would feed the model states no PF-ODE trajectory passes through).
`time_sampling: uniform` draws t ~ U[eps, T] as in the paper and takes the nearest grid point (the probability of a
grid point is the length of its cell); `grid` draws grid indices uniformly (denser near eps on the EDM grid).
`consistency: false` (the ablation without the trajectory-consistency loss) uses t = T only.

Everything random in a step is a function of (seed, step) or (seed, epoch): the shuffle (DistributedSampler, reseeded
each epoch) and the times (a generator seeded by the step, drawn for the whole global batch and split like the data).
So resuming is exact, and N ranks see the same samples and times as one process with the same global batch.

Batch. `train.batch` is the global batch. Each process's share is split into micro-batches of `train.micro_batch`
trajectories (batch / (micro_batch * world) per step), whose gradients accumulate before one optimiser step; DDP
all-reduces once, in the last backward pass. The times are drawn for the whole batch and split with their
trajectories, so the split changes memory and speed, not the step (dropout's masks aside: they are drawn per
forward). `train.compile: true` runs the model under torch.compile (the fused Koopman ops compile into its graph).

Data: a trajectory store (train.store, checked against the `trajectories:` settings and the teacher), or with
train.online=true fresh trajectories solved by the teacher each step (no store; an epoch is
trajectories.num_trajectories trajectories). Both are deterministic in the step, so both resume exactly.

Runs: `hkd train --config NAME [a.b=value ...] [--resume]`, or `torchrun --nproc_per_node=8 -m hkd.cli train ...`
(DDP: NCCL on GPU, gloo on CPU; the global batch `train.batch` is split across ranks; rank 0 writes everything).
Run folder (`train.out`): checkpoint.pt (atomic, every `checkpoint_every` steps, at the end and on SIGTERM/SIGINT),
log.csv, samples/step_XXXXXXXX.png (one-step samples of the EMA model from fixed noise), tensorboard/ (when the
tensorboard package is installed), model/ (the final EMA model, save_pretrained).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import io
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hkd import checkpoint
from hkd import config as configs
from hkd.config import Section, section, to_dict
from hkd.edm import ema_update
from hkd.errors import ConfigError, NonFiniteError, RunStopped, UserError
from hkd.losses import PERCEPTUAL, Distance, decoded_trajectory, lambda1_schedule, latent_consistency

CHECKPOINT_NAME = "checkpoint.pt"
LOG_FIELDS = ("step", "epoch", "loss", "lambda1", "lr", "grad_norm", "skipped", "seconds")
# What `--resume` lets change: the step budget, and settings that change no number of the run
RESUME_MAY_CHANGE = ("train.max_steps", "train.out", "train.progress", "train.workers")


@dataclasses.dataclass
class TrainConfig(Section, name="train"):
    """The `train:` section."""

    out: str = "runs/hkd"  # run folder
    store: str | None = None  # trajectory store folder (hkd trajectories --out)
    teacher: str | None = None  # teacher checkpoint: E and D start as its U-Net (Algorithm 1, step 1); None: random
    online: bool = False  # draw fresh trajectories from the teacher each step instead of reading train.store
    batch: int = 64  # global batch (trajectories per step, all ranks together)
    micro_batch: int | None = None  # trajectories per forward per process; None: batch / world (no accumulation)
    epochs: int = 100
    max_steps: int | None = None  # stop earlier (the schedules still run over `epochs`)
    lr: float = 1e-3
    lr_decay: float = 0.95  # exponential learning-rate decay per epoch
    adam_betas: tuple[float, float] = (0.9, 0.999)
    ema: float = 0.999  # EMA decay per step (0: the EMA is the model)
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with a GradScaler; bf16/fp16 need a GPU)
    compile: bool = False  # run the model (fused propagation included) under torch.compile
    time_samples: int = 4  # s - 1 intermediate times per trajectory (plus T)
    time_sampling: str = "uniform"  # uniform (t ~ U[eps, T], nearest grid point) | grid (uniform grid index)
    consistency: bool = True  # trajectory-consistency loss; false: only t = T
    perceptual: str = "pseudo_huber"  # lpips | pseudo_huber | none
    lambda1_start: float = 1.0  # MSE weight decays geometrically from start to end over the epochs
    lambda1_end: float = 1e-3
    lambda2: float = 1.0  # weight of the perceptual term
    lambda3: float = 0.0  # latent consistency between sampled times (hkd.losses): the project's addition
    lambda4: float = 0.0  # decoded trajectory: D(exp((t - T) A) E(x_T)) against the teacher's D(x_t; t) (addition)
    lpips_net: str = "alex"
    lpips_weights: str | None = None  # backbone weights file (default: the torch hub cache)
    lpips_resize: int = 224
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss does
    checkpoint_every: int = 1000
    log_every: int = 10
    sample_every: int = 1000  # 0: only at the end
    sample_count: int = 64
    seed: int = 0
    workers: int = 0  # DataLoader worker processes per rank
    threads: int = 0  # torch CPU threads per process (0: torch's default); 1 is faster on a busy or shared CPU
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True

    def check(self) -> None:
        choices = {
            "precision": ("fp32", "bf16", "fp16"),
            "time_sampling": ("uniform", "grid"),
            "perceptual": PERCEPTUAL,
            "on_nonfinite": ("stop", "skip"),
            "device": ("auto", "cpu", "cuda"),
        }
        for key, valid in choices.items():
            self.require(getattr(self, key) in valid, key, f"one of {', '.join(valid)}")
        for key in ("batch", "epochs", "checkpoint_every", "log_every", "sample_count", "lpips_resize"):
            self.require(getattr(self, key) >= 1, key, ">= 1")
        self.require(self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1 (or null: all epochs)")
        nonnegative = ("time_samples", "sample_every", "workers", "threads", "grad_clip", "lambda2", "lambda3")
        for key in (*nonnegative, "lambda4", "seed"):
            self.require(getattr(self, key) >= 0, key, ">= 0")
        for key, limit in (("workers", 256), ("threads", 1024), ("seed", 2**63 - 1), ("time_samples", 1000)):
            self.require(getattr(self, key) <= limit, key, f"<= {limit} (hkd's limit)")
        self.require(self.out.strip() != "", "out", "a folder name (empty would write the run into the current folder)")
        intermediate = self.consistency and self.time_samples >= 1
        self.require(self.lambda4 == 0 or intermediate, "lambda4", "0 unless consistency=true and time_samples >= 1")
        self.require(self.lr > 0, "lr", "> 0")
        self.require(0 < self.lr_decay <= 1, "lr_decay", "in (0, 1]")
        self.require(all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "two numbers in [0, 1)")
        self.require(0 <= self.ema < 1, "ema", "in [0, 1)")
        self.require(self.lambda1_start > 0, "lambda1_start", "> 0 (the MSE weight decays geometrically)")
        self.require(self.lambda1_end > 0, "lambda1_end", "> 0 (the MSE weight decays geometrically)")
        accumulation_rounds(self.batch, self.micro_batch, 1)


def accumulation_rounds(batch: int, micro_batch: int | None, world: int) -> int:
    """Micro-batches per step and process: batch / (micro_batch * world) (1 without a micro_batch). A split that
    does not come out even is an error naming the numbers; batch % world is checked where the processes start."""
    if micro_batch is None:
        return 1
    local = batch // world
    if not (1 <= micro_batch <= local and local % micro_batch == 0):
        share = f"the {local} trajectories per process of " if world > 1 else ""
        processes = f" on {world} processes" if world > 1 else ""
        raise ConfigError(f"train.micro_batch = {micro_batch} must divide {share}train.batch = {batch}{processes}")
    return local // micro_batch


class NonFiniteLoss(NonFiniteError):
    """The loss or the weights became NaN or inf (train.on_nonfinite = stop); the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1


def sample_time_indices(times: Tensor, u: Tensor, mode: str) -> Tensor:
    """Grid indices (B, n) of the input times, from uniform draws u (B, n) in [0, 1); times (B, K) is each
    trajectory's stored grid. Candidates: every stored state but x_eps (the one at the smallest time, t = 0 in a
    store: EDM's last step goes to sigma = 0). uniform: the candidate nearest to t = eps + u (T - eps), eps the
    smallest candidate time (so t ~ U[eps, T] as in the paper, on the grid); grid: a uniformly chosen candidate."""
    last = times.argmin(1, keepdim=True)  # x_eps
    if mode == "grid":
        index = (u * (times.shape[1] - 1)).long().clamp_(max=times.shape[1] - 2)
        return index + (index >= last).long()
    candidates = times.scatter(1, last, math.inf)
    lo, hi = candidates.min(1, keepdim=True).values, times.max(1, keepdim=True).values
    t = lo + u.to(times.dtype) * (hi - lo)
    return (candidates[:, None, :] - t[:, :, None]).abs().argmin(-1)


def trajectory_loss(
    model: nn.Module,
    states: Tensor,
    times: Tensor,
    u: Tensor,
    distance: Distance,
    lambda1: float,
    mode: str,
    lambda3: float = 0.0,
    lambda4: float = 0.0,
    teacher: nn.Module | None = None,
) -> Tensor:
    """Algorithm 1's loss for a batch of trajectories: states (B, K, C, H, W) at times (B, K); u (B, s-1) uniform
    draws choosing the intermediate times (s-1 may be 0). One forward pass over all B * s (x_t, t) pairs. The
    project's additions: lambda3 > 0 adds hkd.losses.latent_consistency between the sampled times of each
    trajectory, lambda4 > 0 hkd.losses.decoded_trajectory against the teacher's denoised estimate."""
    rows = torch.arange(states.shape[0], device=states.device)[:, None]
    index = torch.cat([sample_time_indices(times, u, mode), times.argmax(1, keepdim=True)], dim=1)  # + T
    x_t, t = states[rows, index].flatten(0, 1), times[rows, index].flatten()
    x_eps = states[rows[:, 0], times.argmin(1)]
    if lambda3 == 0 and lambda4 == 0:
        x_hat = model(x_t, t)
        return distance(x_hat, x_eps.repeat_interleave(index.shape[1], dim=0), lambda1).mean()
    x_hat, latents = model(x_t, t, return_latents=True)
    loss = distance(x_hat, x_eps.repeat_interleave(index.shape[1], dim=0), lambda1).reshape(-1, index.shape[1])
    loss, hkd = loss.mean(1), getattr(model, "module", model)
    if lambda3 > 0:
        loss = loss + lambda3 * latent_consistency(hkd, latents, t, index.shape[1])
    if lambda4 > 0 and index.shape[1] > 1:
        loss = loss + lambda4 * decoded_trajectory(hkd, teacher, latents, x_t, t, index.shape[1], distance, lambda1)
    return loss.mean()


# ---------------------------------------------------------------------------------------------------------------
# One optimiser step


def split_batch(tensors: tuple[Tensor, ...], rounds: int) -> list[tuple[Tensor, ...]]:
    """A batch (tensors with the batch dimension first) as `rounds` equal micro-batches, in order."""
    return list(zip(*(x.chunk(rounds) for x in tensors), strict=True))


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[Tensor, ...]],
    loss_fn: Callable[..., Tensor],
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
    autocast: torch.dtype | None = None,
) -> tuple[float, bool, float]:
    """One optimiser step on this process's batch, given as micro-batches; loss_fn(net, *micro_batch) is the mean
    loss of a micro-batch. Each micro-batch's loss is weighted by its share of the batch, so the gradients add up
    to those of the batch's mean loss. Under DDP the gradients are all-reduced once, in the last backward pass
    (no_sync on the others), which averages the ranks' batches into the global one. No update when the loss is
    not finite on some rank. Returns (this rank's batch loss, finite on every rank, gradient norm before clipping)."""
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    scaler = scaler if scaler is not None else torch.amp.GradScaler(enabled=False)
    device = micro_batches[0][0].device
    total = sum(len(micro[0]) for micro in micro_batches)

    # Accumulate gradients.
    optimizer.zero_grad(set_to_none=True)
    batch_loss = torch.zeros((), dtype=torch.float64, device=device)
    for i, micro in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1 or not ddp
        with contextlib.nullcontext() if sync else net.no_sync():
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = loss_fn(net, *micro) * (len(micro[0]) / total)
            scaler.scale(loss).backward()
        batch_loss += loss.detach()
    value = batch_loss.item()

    # Skip the update when the loss is not finite on some rank.
    finite = torch.tensor(float(math.isfinite(value)), device=device)
    if ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return value, False, math.nan

    # Update weights.
    scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = float(nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else math.inf))
    scaler.step(optimizer)
    scaler.update()
    return value, True, grad_norm


# ---------------------------------------------------------------------------------------------------------------
# Setup


def _distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = configs.choose_device(device, "train.device").type == "cuda"
    if world > 1 and not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except dist.DistNetworkError as error:  # e.g. MASTER_PORT in use
            raise UserError(f"cannot start the process group: {str(error).splitlines()[0]}") from error
    rank = dist.get_rank() if world > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def build_model(config: dict[str, Any], teacher: nn.Module | None = None) -> nn.Module:
    """HKDModel of the `model:` section. With a teacher (Algorithm 1, step 1), encoder and decoder start as its
    U-Net, and the sizes the section leaves out are the teacher's."""
    from hkd.model import HKDModel, ModelConfig

    if teacher is None:
        return HKDModel(section(config, "model", ModelConfig))
    model = HKDModel.from_teacher(teacher)
    if not config.get("model"):
        return model
    settings = {"model": {**to_dict(model.config), **config["model"]}}
    return HKDModel.from_teacher(teacher, section(settings, "model", ModelConfig))


def build_dataset(config: dict[str, Any], cfg: TrainConfig, teacher: nn.Module | None, model: nn.Module):
    """The store at train.store; refused (naming the differences) unless it was made with the `trajectories:`
    settings of this config, by this teacher (when given), with images of the model's shape."""
    from hkd.trajectories import TrajectoryConfig, TrajectoryDataset, expectation

    if cfg.store is None:
        raise ConfigError("train.store is not set: make a store with `hkd trajectories` and pass train.store=DIR")
    teacher_hash = getattr(teacher, "identity", {}).get("hash") if teacher is not None else None
    shape = (model.img_channels, model.img_resolution, model.img_resolution) if hasattr(model, "img_channels") else None
    expect = expectation(section(config, "trajectories", TrajectoryConfig), teacher_hash, shape)
    return TrajectoryDataset(cfg.store, expect=expect)


def _trajectories(item: Any) -> tuple[Tensor, Tensor]:
    """(states (B, K, C, H, W), times (B, K)) of a collated batch: a dict with "states" and "times"."""
    if not isinstance(item, dict) or "states" not in item or "times" not in item:
        raise TypeError("a trajectory dataset item is a dict with 'states' (K, C, H, W) and 'times' (K,)")
    return item["states"], item["times"]


class _Batches:
    """This rank's batches of a trajectory dataset, from (epoch, position in the epoch) on; disjoint across ranks."""

    def __init__(self, dataset, local_batch: int, rank: int, world: int, seed: int, workers: int, pin: bool):
        self.dataset, self.workers, self.pin = dataset, workers, pin
        self.first = _trajectories(torch.utils.data.default_collate([dataset[0]]))
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.local_batch = local_batch
        self.steps_per_epoch = len(self.sampler) // local_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {len(dataset)} trajectories, fewer than one global batch "
                f"({local_batch * world}); lower train.batch"
            )

    def epoch(self, epoch: int, start: int):
        self.sampler.set_epoch(epoch)
        indices, b = list(self.sampler), self.local_batch
        chunks = [indices[i * b : (i + 1) * b] for i in range(start, self.steps_per_epoch)]
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=chunks, num_workers=self.workers, pin_memory=self.pin
        )


class _Online:
    """Fresh trajectories from the teacher (hkd.trajectories.OnlineTrajectories) instead of a store. Global step k
    draws trajectories k B .. (k + 1) B - 1 (noise from (trajectories.seed, index)), rank r the ones = r mod world,
    so the position is the step itself; an epoch is trajectories.num_trajectories trajectories."""

    def __init__(self, teacher, config: dict[str, Any], local_batch: int, rank: int, world: int, device):
        from hkd.trajectories import OnlineTrajectories, TrajectoryConfig

        trajectories = section(config, "trajectories", TrajectoryConfig)
        self.online = OnlineTrajectories(teacher, trajectories, device=device, rank=rank, world_size=world)
        self.local_batch = local_batch
        self.steps_per_epoch = trajectories.num_trajectories // (local_batch * world)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"trajectories.num_trajectories is smaller than one global batch ({local_batch * world})")
        shape = (1, len(self.online.times), *self.online.shape)
        self.first = torch.zeros(shape), self.online.times[None]

    def epoch(self, epoch: int, start: int):
        self.online.next_index = (epoch * self.steps_per_epoch + start) * self.local_batch
        for _ in range(start, self.steps_per_epoch):
            yield self.online.draw(self.local_batch)


class _Log:
    """CSV (and TensorBoard when installed) on rank 0. On resume, rows after the checkpoint's step are dropped."""

    def __init__(self, out: Path, step: int):
        self.path = out / "log.csv"
        rows = []
        if step and self.path.exists():
            with open(self.path, newline="") as file:
                rows = [r for r in csv.DictReader(file) if int(r["step"]) <= step]
        text = io.StringIO(newline="")  # rewritten atomically: a crash here keeps the old log
        writer = csv.DictWriter(text, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        checkpoint.atomic_write(self.path, text.getvalue())
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 (closed in close())
        self.csv = csv.DictWriter(self.file, LOG_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(out / "tensorboard", purge_step=step or None)
        except ImportError:
            self.tensorboard = None

    def write(self, row: dict[str, float]) -> None:
        self.csv.writerow(row)
        self.file.flush()
        if self.tensorboard is not None:
            for key in ("loss", "lambda1", "lr", "grad_norm"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint state


@dataclasses.dataclass
class RunState:
    """What a checkpoint holds besides the config: weights, optimiser, schedules and counters (`running`, `count`:
    the loss sum and number of steps since the last log row)."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: int = 0
    skipped: int = 0
    losses: list = dataclasses.field(default_factory=list)
    running: float = 0.0
    count: int = 0


def checkpoint_state(config: dict[str, Any], run: RunState, steps_per_epoch: int) -> dict[str, Any]:
    """The checkpoint of `run`: everything an exact resume needs, the RNG states included."""
    return {
        "format": "hkd-train",
        "config": config,
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": checkpoint.rng_state(),
        "step": run.step,
        "epoch": run.step // steps_per_epoch,
        "skipped": run.skipped,
        "losses": run.losses,
        "running": (run.running, run.count),
    }


def restore(run: RunState, state: dict[str, Any]) -> None:
    """Load a checkpoint_state into `run` (and the RNG states)."""
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    run.step, run.skipped, run.losses = state["step"], state["skipped"], [tuple(x) for x in state["losses"]]
    run.running, run.count = state["running"]


def _last_good(path: Path) -> str:
    return f"{path} (step {checkpoint.load(path)['step']})" if path.exists() else "none yet"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """checkpoint.save; non-finite weights are a NonFiniteLoss naming the last good checkpoint, which is kept."""
    try:
        checkpoint.save(path, state)
    except NonFiniteError as error:
        raise NonFiniteLoss(
            f"the weights are not finite at step {state['step']} ({error}); the last good checkpoint is "
            f"{_last_good(path)}. Lower train.lr, set train.grad_clip or use train.precision=fp32"
        ) from None


def _resume_changes(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """ConfigError listing what `config` changes from the checkpoint's, beyond RESUME_MAY_CHANGE."""
    try:
        changed = [c for c in configs.changes(saved, config) if c.split(":")[0] not in RESUME_MAY_CHANGE]
    except ConfigError as error:
        raise ConfigError(f"--resume: the config saved in {path} is not readable here ({error})") from error
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the one {path} was trained with: {'; '.join(changed)}. "
            f"Only {', '.join(RESUME_MAY_CHANGE)} may change; start a new run (another train.out) to change more"
        )


# ---------------------------------------------------------------------------------------------------------------
# The loop


def total_steps(epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    """The optimiser steps of a run: every epoch's, or max_steps when that comes first."""
    return epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)


def _stream(batches, step: int, steps_per_epoch: int):
    """The batches of steps step, step + 1, ...: epoch after epoch, from the position of `step` in its epoch."""
    epoch, position = divmod(step, steps_per_epoch)
    while True:
        yield from batches.epoch(epoch, position)
        epoch, position = epoch + 1, 0


def _stop_requested(stop: checkpoint.StopSignal, world: int, device: torch.device) -> bool:
    """Whether a SIGTERM/SIGINT reached any rank (all ranks then stop at the same step)."""
    flag = torch.tensor(float(stop.requested is not None), device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def _log_mean(run: RunState, world: int, device: torch.device) -> float:
    """The mean loss since the last log row over every rank (each rank's local mean: their average is the global
    batch's mean); appended to run.losses, and the running sums restart."""
    if world > 1:
        totals = torch.tensor([run.running, run.count], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        run.running, run.count = float(totals[0]), int(totals[1])
    mean = run.running / max(run.count, 1)
    run.losses.append((run.step, mean))
    run.running, run.count = 0.0, 0
    return mean


def _save_samples(ema: nn.Module, first: tuple[Tensor, Tensor], cfg: TrainConfig, path: Path, device) -> None:
    """One-step samples of the EMA model from fixed noise (train.seed), as a PNG grid."""
    from hkd.data.images import save_grid

    states, times = first
    noise = torch.randn(cfg.sample_count, *states.shape[2:], generator=torch.Generator().manual_seed(cfg.seed))
    noise = noise.to(device)
    with torch.no_grad():
        images = ema.generate(noise) if hasattr(ema, "generate") else ema(noise * times.max(), times.max())
    save_grid(images, path, nrow=int(math.sqrt(cfg.sample_count)), scale=2)


def _prepare(config, cfg: TrainConfig, model, dataset, rank: int, world: int, device: torch.device):
    """(this rank's batches, the RunState at step 0, the network to train: the model, or its DDP wrapper, and the
    teacher: loaded when the model starts from it, the data come from it, or lambda4 compares with it)."""
    teacher = None
    if cfg.teacher is not None and (model is None or dataset is None or cfg.lambda4 > 0):
        from hkd.teacher import load_teacher

        teacher = load_teacher(cfg.teacher, device if cfg.online else "cpu")
    raw = build_model(config, teacher) if model is None else model
    if teacher is not None:  # after build_model: the model's U-Net starts as a copy of the teacher's, trainable
        teacher.requires_grad_(False).eval()
    local_batch = cfg.batch // world
    if cfg.online and dataset is None:
        batches = _Online(teacher, config, local_batch, rank, world, device)
    else:
        dataset = build_dataset(config, cfg, teacher, raw) if dataset is None else dataset
        batches = _Batches(dataset, local_batch, rank, world, cfg.seed, cfg.workers, device.type == "cuda")
    raw = raw.to(device)
    T = float(batches.first[1].max())
    if hasattr(raw, "T") and not math.isclose(T, raw.T, rel_tol=1e-6):
        raise ConfigError(f"the trajectories start at T = {T}, the model at model.sigma_max = {raw.T}")
    ema = copy.deepcopy(raw).requires_grad_(False).eval()
    if cfg.compile:
        raw.compile()  # in place: the state dict keeps its names, and the EMA (samples) stays eager
    net = raw
    if world > 1:
        net = nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(raw.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return batches, RunState(raw, ema, optimizer, scheduler, scaler), net, teacher


def train(
    config: dict[str, Any],
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    dataset=None,
    log=print,
) -> dict[str, Any]:
    """Train HKD as configured (`train:` section, plus `model:` when `model` is not given). `dataset` items are dicts
    with "states" (K, C, H, W) and "times" (K,) (default: the store at train.store). Returns {"step", "checkpoint",
    "losses": [(step, mean loss since the previous log row)], "skipped", "model", "ema", "rank"}; rank 0's run folder
    holds the rest. Rank 0 locks train.out for the run. resume=True continues the run in train.out from its
    checkpoint (which must exist; without resume it must not). A SIGTERM/SIGINT stop writes the checkpoint, then
    raises RunStopped (continue with resume=True)."""
    cfg = section(config, "train", TrainConfig)
    first = int(os.environ.get("RANK", "0")) == 0
    with checkpoint.run_lock(checkpoint.output_folder(cfg.out, "train.out")) if first else contextlib.nullcontext():
        return _train(config, cfg, resume, model, dataset, log)


def _train(config, cfg: TrainConfig, resume: bool, model, dataset, log) -> dict[str, Any]:
    # Setup: processes, the checks that need no work, then data, model, optimiser.
    rank, world, device = _distributed(cfg.device)
    log = log if rank == 0 else (lambda line: None)
    if cfg.batch % world:
        raise ConfigError(f"train.batch = {cfg.batch} must be divisible by the number of processes ({world})")
    rounds = accumulation_rounds(cfg.batch, cfg.micro_batch, world)
    if cfg.precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"train.precision={cfg.precision} needs a GPU; use fp32 on the CPU")
    if cfg.online and cfg.teacher is None:
        raise ConfigError("train.online=true draws trajectories from the teacher: set train.teacher")
    if cfg.lambda4 > 0 and cfg.teacher is None:
        raise ConfigError("train.lambda4 > 0 compares with the teacher's denoised estimates: set train.teacher")
    out = Path(cfg.out)
    path = out / CHECKPOINT_NAME
    saved = checkpoint.resume_from(path, resume, "train.out", map_location=device)
    if saved is not None:
        _resume_changes(saved["config"], config, path)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    distance = Distance(cfg.perceptual, cfg.lambda2, cfg.lpips_net, cfg.lpips_weights, cfg.lpips_resize).to(device)
    batches, run, net, teacher = _prepare(config, cfg, model, dataset, rank, world, device)
    raw, ema, optimizer = run.model, run.ema, run.optimizer
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    steps_per_epoch = batches.steps_per_epoch
    total = total_steps(cfg.epochs, steps_per_epoch, cfg.max_steps)
    intermediate = cfg.time_samples if cfg.consistency else 0

    # Resume: weights, optimiser, schedules, counters and RNG states from the checkpoint.
    if saved is not None:
        restore(run, saved)
        log(f"resumed from {path} at step {run.step} (epoch {run.step // steps_per_epoch})")
    logger = _Log(out, run.step) if rank == 0 else None
    progress = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(
            total=total, initial=run.step, desc="hkd train", unit="step", file=sys.stderr, dynamic_ncols=True
        )

    # The loop: one optimiser step per batch, until the step budget is spent or a signal stops every rank.
    last_log, stopped = time.perf_counter(), False
    net.train()
    stream = _stream(batches, run.step, steps_per_epoch)
    with checkpoint.StopSignal() as stop:
        while run.step < total and not stopped:
            states, times = (x.to(device, torch.float32, non_blocking=True) for x in _trajectories(next(stream)))
            # the times of the whole global batch from (seed, step); this rank's rows, as the sampler splits data
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.step)
            u = torch.rand(cfg.batch, intermediate, generator=generator, dtype=torch.float64)[rank::world]
            lambda1 = lambda1_schedule(run.step / steps_per_epoch, cfg.epochs, cfg.lambda1_start, cfg.lambda1_end)

            # Optimiser step: gradients accumulated over the micro-batches (times split with their trajectories).
            loss_fn = functools.partial(
                trajectory_loss, distance=distance, lambda1=lambda1, mode=cfg.time_sampling, lambda3=cfg.lambda3,
                lambda4=cfg.lambda4, teacher=teacher,
            )  # fmt: skip
            value, finite, grad_norm = train_step(
                net, optimizer, split_batch((states, times, u.to(device)), rounds), loss_fn,
                scaler=run.scaler, grad_clip=cfg.grad_clip, autocast=autocast,
            )  # fmt: skip
            if not finite and cfg.on_nonfinite == "stop":
                raise NonFiniteLoss(
                    f"the loss is {value} at step {run.step} (epoch {run.step // steps_per_epoch}); the last good "
                    f"checkpoint is {_last_good(path)}. Lower train.lr, set train.grad_clip, use train.precision=fp32, "
                    "or set train.on_nonfinite=skip"
                )
            if finite:
                ema_update(ema, raw, cfg.ema)
                run.running, run.count = run.running + value, run.count + 1
            run.skipped += not finite

            # Bookkeeping: schedule, progress, log, samples.
            run.step += 1
            if run.step % steps_per_epoch == 0:
                run.scheduler.step()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{value:.4f}", epoch=run.step // steps_per_epoch, refresh=False)
            if run.step % cfg.log_every == 0 or run.step == total:
                mean, now = _log_mean(run, world, device), time.perf_counter()
                if logger is not None:
                    row = dict(step=run.step, epoch=run.step / steps_per_epoch, loss=mean, lambda1=lambda1)
                    row.update(lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, skipped=run.skipped)
                    logger.write({**row, "seconds": now - last_log})
                last_log = now
            if cfg.sample_every and run.step % cfg.sample_every == 0 and rank == 0:
                _save_samples(ema, batches.first, cfg, out / "samples" / f"step_{run.step:08d}.png", device)

            # Checkpoint: every checkpoint_every steps, at the end, and when a signal stops the run.
            stopped = _stop_requested(stop, world, device)
            if (run.step % cfg.checkpoint_every == 0 or run.step == total or stopped) and rank == 0:
                save_checkpoint(path, checkpoint_state(config, run, steps_per_epoch))
    stream.close()
    if progress is not None:
        progress.close()
    if not stopped and rank == 0:
        _save_samples(ema, batches.first, cfg, out / "samples" / f"step_{run.step:08d}.png", device)
        if hasattr(ema, "save_pretrained"):
            ema.save_pretrained(out / "model")
    if logger is not None:
        logger.close()
    if world > 1:
        dist.barrier()
    if stopped:
        signum = stop.requested or signal.SIGTERM
        name = signal.Signals(signum).name
        raise RunStopped(f"stopped by {name} at step {run.step}: {path} written; {checkpoint.RESUME_HINT}", signum)
    return dict(step=run.step, checkpoint=path, losses=run.losses, skipped=run.skipped, model=raw, ema=ema, rank=rank)
