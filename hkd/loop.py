"""The training loop of the teacher (hkd.teacher) and of HKD (hkd.train): one optimiser step over micro-batches,
the EMA, the running loss, checkpoints, and stopping on SIGTERM/SIGINT. Each trainer brings its data and its loss."""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hkd import files
from hkd.edm import ema_update
from hkd.errors import RunStopped
from hkd.runstate import NonFiniteLoss, RunState

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


def stop_requested(stop: files.StopSignal, world: int, device: torch.device) -> bool:
    """Whether a SIGTERM/SIGINT reached any rank (all ranks then stop at the same step)."""
    flag = torch.tensor(float(stop.requested is not None), device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def log_mean(run: RunState, world: int = 1, device: torch.device | None = None) -> float:
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


# ---------------------------------------------------------------------------------------------------------------
# The loop


def advance(
    run: RunState, value: float, finite: bool, ema_decay: float, on_nonfinite: str, stop_message: Callable[[], str]
) -> None:
    """After train_step: a non-finite loss raises NonFiniteLoss(stop_message()) (on_nonfinite = "stop") or skips
    the step's update; otherwise the EMA follows the model with this step's decay and the loss joins the running
    sum. The step is counted either way."""
    if not finite and on_nonfinite == "stop":
        raise NonFiniteLoss(stop_message())
    if finite:
        ema_update(run.ema, run.model, ema_decay)
        run.running, run.count = run.running + value, run.count + 1
    run.skipped += not finite
    run.step += 1


def steps(run: RunState, total: int, stop: files.StopSignal, save, every: int, world: int = 1, device=None):
    """The steps run.step .. total - 1 of a run. The caller's loop body takes one optimiser step (and `advance`s);
    after it, save() (None: not this rank) writes the checkpoint every `every` steps, at the end, and when a
    SIGTERM/SIGINT reached any rank, which ends the steps (every rank at the same step; raise_if_stopped then says
    so). A signal during the last step ends nothing: the run is complete."""
    while run.step < total:
        yield run.step
        stopped = stop_requested(stop, world, device or torch.device("cpu"))
        if save is not None and (run.step % every == 0 or run.step == total or stopped):
            save()
        if stopped:
            return


def raise_if_stopped(stop: files.StopSignal, run: RunState, total: int, path) -> None:
    """RunStopped naming the signal and the checkpoint written, when a signal ended the steps before `total`."""
    if run.step < total:
        signum = stop.requested or signal.SIGTERM  # another rank's signal
        name = signal.Signals(signum).name
        raise RunStopped(f"stopped by {name} at step {run.step}: {path} written; {files.RESUME_HINT}", signum)
