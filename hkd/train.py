"""Training HKD (Algorithm 1 of the paper): one CPU to many GPUs.

Each step takes a batch of the teacher's trajectories, draws the intermediate times, and takes one optimiser step on
Algorithm 1's loss (hkd.losses.trajectory_loss: the model's one-step images from x_t at the sampled times and at T,
against x_eps) in the training loop that the teacher shares (hkd.loop: micro-batches, EMA, checkpoints, signals).
Run state and resume are hkd.runstate; the batches over a store or fresh trajectories are hkd.trajectories'.

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
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hkd import files, loop
from hkd.config import RunConfig
from hkd.errors import ConfigError, UserError
from hkd.losses import Distance, lambda1_schedule, trajectory_loss
from hkd.model import HKDModel, ModelConfig
from hkd.runstate import RunState, checkpoint_state, last_good, restore, resume_changes, save_checkpoint
from hkd.sections import choose_device
from hkd.train_config import TrainConfig, accumulation_rounds
from hkd.trajectories import (
    OnlineBatches,
    StoreBatches,
    TrajectoryConfig,
    TrajectoryDataset,
    expectation,
    trajectory_batch,
)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_FIELDS = ("step", "epoch", "loss", "lambda1", "lr", "grad_norm", "skipped", "seconds")


# ---------------------------------------------------------------------------------------------------------------
# Setup


def _distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = choose_device(device, "train.device").type == "cuda"
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


def build_model(model: ModelConfig, teacher: nn.Module | None = None, given: dict[str, Any] | None = None) -> nn.Module:
    """HKDModel of the `model:` section. With a teacher (Algorithm 1, step 1), encoder and decoder start as its
    U-Net, and the sizes that the section does not set (the keys outside `given`) are the teacher's."""
    if teacher is None:
        return HKDModel(model)
    derived = HKDModel.from_teacher(teacher)
    if not given:
        return derived
    return HKDModel.from_teacher(teacher, dataclasses.replace(derived.config, **{k: getattr(model, k) for k in given}))


def build_dataset(cfg: TrainConfig, trajectories: TrajectoryConfig, teacher: nn.Module | None, model: nn.Module):
    """The store at train.store; refused (naming the differences) unless it was made with the `trajectories:`
    settings, by this teacher (when given), with images of the model's shape."""
    if cfg.store is None:
        raise ConfigError("train.store is not set: make a store with `hkd trajectories` and pass train.store=DIR")
    teacher_hash = getattr(teacher, "identity", {}).get("hash") if teacher is not None else None
    shape = (model.img_channels, model.img_resolution, model.img_resolution) if hasattr(model, "img_channels") else None
    return TrajectoryDataset(cfg.store, expect=expectation(trajectories, teacher_hash, shape))


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
        files.atomic_write(self.path, text.getvalue())
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


def _save_samples(ema: nn.Module, first: tuple[Tensor, Tensor], cfg: TrainConfig, path: Path, device) -> None:
    """One-step samples of the EMA model from fixed noise (train.seed), as a PNG grid."""
    from hkd.image_grid import save_grid

    states, times = first
    noise = torch.randn(cfg.sample_count, *states.shape[2:], generator=torch.Generator().manual_seed(cfg.seed))
    noise = noise.to(device)
    with torch.no_grad():
        images = ema.generate(noise) if hasattr(ema, "generate") else ema(noise * times.max(), times.max())
    save_grid(images, path, nrow=int(math.sqrt(cfg.sample_count)), scale=2)


def _prepare(config: RunConfig, model, dataset, rank: int, world: int, device: torch.device):
    """(this rank's batches, the RunState at step 0, the network to train: the model, or its DDP wrapper, and the
    teacher: loaded when the model starts from it, the data come from it, or lambda4 compares with it)."""
    cfg, teacher = config.train, None
    if cfg.teacher is not None and (model is None or dataset is None or cfg.lambda4 > 0):
        from hkd.teacher import load_teacher

        teacher = load_teacher(cfg.teacher, device if cfg.online else "cpu")
    raw = build_model(config.model, teacher, config.given("model")) if model is None else model
    if teacher is not None:  # after build_model: the model's U-Net starts as a copy of the teacher's, trainable
        teacher.requires_grad_(False).eval()
    local_batch = cfg.batch // world
    if cfg.online and dataset is None:
        batches = OnlineBatches(teacher, config.trajectories, local_batch, rank, world, device)
    else:
        dataset = build_dataset(cfg, config.trajectories, teacher, raw) if dataset is None else dataset
        batches = StoreBatches(dataset, local_batch, rank, world, cfg.seed, cfg.workers, device.type == "cuda")
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
    config: RunConfig | dict[str, Any],
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    dataset=None,
    log=print,
) -> dict[str, Any]:
    """Train HKD as configured: `config` (a RunConfig, or a dict of sections, parsed here) gives the `train:` section,
    `model:` when `model` is not given, and `trajectories:` for the store or online data. `dataset` items are dicts
    with "states" (K, C, H, W) and "times" (K,) (default: the store at train.store). Returns {"step", "checkpoint",
    "losses": [(step, mean loss since the previous log row)], "skipped", "model", "ema", "rank"}; rank 0's run folder
    holds the rest. Rank 0 locks train.out for the run. resume=True continues the run in train.out from its
    checkpoint (which must exist; without resume it must not). A SIGTERM/SIGINT stop writes the checkpoint, then
    raises RunStopped (continue with resume=True)."""
    config = RunConfig.parse(config)
    first = int(os.environ.get("RANK", "0")) == 0
    lock = files.run_lock(files.output_folder(config.train.out, "train.out"))
    with lock if first else contextlib.nullcontext():
        return _train(config, resume, model, dataset, log)


def _train(config: RunConfig, resume: bool, model, dataset, log) -> dict[str, Any]:
    cfg = config.train
    # Setup: processes, the checks that need no work, then data, model, optimiser.
    rank, world, device = _distributed(cfg.device)
    log = log if rank == 0 else (lambda line: None)
    _check_run(cfg, world, device)
    rounds = accumulation_rounds(cfg.batch, cfg.micro_batch, world)
    out = Path(cfg.out)
    path = out / CHECKPOINT_NAME
    saved = files.resume_from(path, resume, "train.out", map_location=device)
    if saved is not None:
        resume_changes(saved["config"], config.raw, path)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    distance = Distance(cfg.perceptual, cfg.lambda2, cfg.lpips_net, cfg.lpips_weights, cfg.lpips_resize).to(device)
    batches, run, net, teacher = _prepare(config, model, dataset, rank, world, device)
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
    progress = _progress(total, run.step) if rank == 0 and cfg.progress else None

    def nonfinite() -> str:
        return (
            f"the loss is {value} at step {run.step} (epoch {run.step // steps_per_epoch}); the last good "
            f"checkpoint is {last_good(path)}. Lower train.lr, set train.grad_clip, use train.precision=fp32, "
            "or set train.on_nonfinite=skip"
        )

    # The loop: one optimiser step per batch, until the step budget is spent or a signal stops every rank, which
    # writes the checkpoint (rank 0, also every checkpoint_every steps and at the end).
    save = (lambda: save_checkpoint(path, checkpoint_state(config.raw, run, steps_per_epoch))) if rank == 0 else None
    last_log = time.perf_counter()
    net.train()
    stream = _stream(batches, run.step, steps_per_epoch)
    with files.StopSignal() as stop:
        for _ in loop.steps(run, total, stop, save, cfg.checkpoint_every, world, device):
            # Data: this rank's trajectories, and the times of the whole global batch from (seed, step) (this
            # rank's rows, as the sampler splits data).
            states, times = (x.to(device, torch.float32, non_blocking=True) for x in trajectory_batch(next(stream)))
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.step)
            u = torch.rand(cfg.batch, intermediate, generator=generator, dtype=torch.float64)[rank::world]
            lambda1 = lambda1_schedule(run.step / steps_per_epoch, cfg.epochs, cfg.lambda1_start, cfg.lambda1_end)

            # Optimiser step on Algorithm 1's loss: gradients accumulated over the micro-batches (times split with
            # their trajectories); then the EMA.
            loss_fn = functools.partial(
                trajectory_loss, distance=distance, lambda1=lambda1, mode=cfg.time_sampling, lambda3=cfg.lambda3,
                lambda4=cfg.lambda4, teacher=teacher,
            )  # fmt: skip
            value, finite, grad_norm = loop.train_step(
                net, optimizer, loop.split_batch((states, times, u.to(device)), rounds), loss_fn,
                scaler=run.scaler, grad_clip=cfg.grad_clip, autocast=autocast,
            )  # fmt: skip
            loop.advance(run, value, finite, cfg.ema, cfg.on_nonfinite, nonfinite)

            # Bookkeeping: schedule, progress, log, samples.
            if run.step % steps_per_epoch == 0:
                run.scheduler.step()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{value:.4f}", epoch=run.step // steps_per_epoch, refresh=False)
            if run.step % cfg.log_every == 0 or run.step == total:
                mean, now = loop.log_mean(run, world, device), time.perf_counter()
                if logger is not None:
                    row = dict(step=run.step, epoch=run.step / steps_per_epoch, loss=mean, lambda1=lambda1)
                    row.update(lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, skipped=run.skipped)
                    logger.write({**row, "seconds": now - last_log})
                last_log = now
            if cfg.sample_every and run.step % cfg.sample_every == 0 and rank == 0:
                _save_samples(ema, batches.first, cfg, out / "samples" / f"step_{run.step:08d}.png", device)
    stream.close()
    if progress is not None:
        progress.close()
    if run.step == total and rank == 0:
        _save_samples(ema, batches.first, cfg, out / "samples" / f"step_{run.step:08d}.png", device)
        if hasattr(ema, "save_pretrained"):
            ema.save_pretrained(out / "model")
    if logger is not None:
        logger.close()
    if world > 1:
        dist.barrier()
    loop.raise_if_stopped(stop, run, total, path)
    return dict(step=run.step, checkpoint=path, losses=run.losses, skipped=run.skipped, model=raw, ema=ema, rank=rank)


def _check_run(cfg: TrainConfig, world: int, device: torch.device) -> None:
    """The checks of a run's settings that need no work: the batch's split, the precision, the teacher's uses."""
    if cfg.batch % world:
        raise ConfigError(f"train.batch = {cfg.batch} must be divisible by the number of processes ({world})")
    if cfg.precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"train.precision={cfg.precision} needs a GPU; use fp32 on the CPU")
    if cfg.online and cfg.teacher is None:
        raise ConfigError("train.online=true draws trajectories from the teacher: set train.teacher")
    if cfg.lambda4 > 0 and cfg.teacher is None:
        raise ConfigError("train.lambda4 > 0 compares with the teacher's denoised estimates: set train.teacher")


def _progress(total: int, step: int):
    """A tqdm progress bar on stderr from `step` of `total`."""
    from tqdm import tqdm

    return tqdm(total=total, initial=step, desc="hkd train", unit="step", file=sys.stderr, dynamic_ncols=True)
