"""Run state and resume: what a training checkpoint holds, how it is restored, and what a resumed run may change.

A run continues exactly from its checkpoint: weights, EMA, optimiser, schedules, counters and RNG states."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hkd import files, sections
from hkd.errors import ConfigError, NonFiniteError

# What `--resume` lets change: the step budget, and settings that change no number of the run
RESUME_MAY_CHANGE = ("train.max_steps", "train.out", "train.progress", "train.workers")


class NonFiniteLoss(NonFiniteError):
    """The loss or the weights became NaN or inf (train.on_nonfinite = stop; always for the teacher); the last good
    checkpoint is kept."""


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint state


@dataclasses.dataclass
class RunState:
    """What a checkpoint holds besides the config: weights, optimiser, schedules and counters (`running`, `count`:
    the loss sum and number of steps since the last log row)."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
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
        "rng": files.rng_state(),
        "step": run.step,
        "epoch": run.step // steps_per_epoch,
        "skipped": run.skipped,
        "losses": run.losses,
        "running": (run.running, run.count),
    }


def restore(run: RunState, state: dict[str, Any]) -> None:
    """Load a checkpoint_state into `run` (and the RNG states). A run without a scheduler (the teacher's) skips it;
    a checkpoint without a scaler, skipped count or running loss (the teacher's) leaves them at their start."""
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    files.set_rng_state(state["rng"])
    run.step, run.skipped, run.losses = state["step"], state.get("skipped", 0), [tuple(x) for x in state["losses"]]
    run.running, run.count = state.get("running", (0.0, 0))


def last_good(path: Path) -> str:
    """The checkpoint at `path` and its step, for messages ("none yet" before the first)."""
    return f"{path} (step {files.load(path)['step']})" if path.exists() else "none yet"


def save_checkpoint(
    path: Path, state: dict[str, Any], hint: str = "Lower train.lr, set train.grad_clip or use train.precision=fp32"
) -> None:
    """files.save; non-finite weights are a NonFiniteLoss naming the last good checkpoint, which is kept."""
    try:
        files.save(path, state)
    except NonFiniteError as error:
        raise NonFiniteLoss(
            f"the weights are not finite at step {state['step']} ({error}); the last good checkpoint is "
            f"{last_good(path)}. {hint}"
        ) from None


def resume_changes(saved: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """ConfigError listing what `config` changes from the checkpoint's, beyond RESUME_MAY_CHANGE."""
    try:
        changed = [c for c in sections.changes(saved, config) if c.split(":")[0] not in RESUME_MAY_CHANGE]
    except ConfigError as error:
        raise ConfigError(f"--resume: the config saved in {path} is not readable here ({error})") from error
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the one {path} was trained with: {'; '.join(changed)}. "
            f"Only {', '.join(RESUME_MAY_CHANGE)} may change; start a new run (another train.out) to change more"
        )
