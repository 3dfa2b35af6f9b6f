"""Gradient accumulation (train.micro_batch, teacher.micro_batch) and the compiled step (train.compile).

A step over micro-batches must be the step over the whole batch: the same gradients and weights, with the times each
trajectory drew travelling with it; under DDP one all-reduce per step; resuming mid-epoch stays exact."""

import copy
import functools
import os
import signal
import socket

import pytest
import torch
from test_train import MODEL, assert_same, parameters
from torch import nn

from hkd import cli, config, files, loop, losses, train
from hkd.edm import time_steps
from hkd.errors import RunStopped
from hkd.propagator import HKDPropagator
from hkd.teacher import TeacherConfig, train_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def trajectories(count: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (B, K, 1, 8, 8), times (B, K)): x_t = x_0 + t n, the PF-ODE of a point mass at x_0."""
    times = time_steps(6).to(dtype)  # a store's grid: EDM's from T = 80 to eps = 0.002, then t = 0 (x_eps)
    x0, noise = torch.rand(count, 1, 1, 8, 8, dtype=dtype) * 2 - 1, torch.randn(count, 1, 1, 8, 8, dtype=dtype)
    return x0 + times[None, :, None, None, None] * noise, times.expand(count, -1)


class Trajectories(torch.utils.data.Dataset):
    """Store-like items {"states", "times"} (float32); sends SIGTERM to this process when item `kill_at` loads."""

    def __init__(self, count: int = 32):
        self.states, times = trajectories(count, torch.float32)
        self.times, self.kill_at, self.calls = times[0], None, 0

    def __len__(self):
        return len(self.states)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"states": self.states[i], "times": self.times}


class KoopmanNet(nn.Module):
    """A small HKD, in float64 by default (HKDModel computes in float32): a convolutional encoder to two levels, the
    Koopman layer (fused op) evolving each level from t to eps, a convolutional decoder. Generators non-zero."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.level1, self.level2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.propagator = HKDPropagator([(4, 8, 8), (6, 4, 4)], "spectral", per_position=True)
        self.up, self.out = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1), nn.Conv2d(4, 1, 3, padding=1)
        with torch.no_grad():
            for p in self.propagator.parameters():
                p.normal_(0, 0.02)
        self.to(dtype)

    def forward(self, x_t, t):
        t = torch.as_tensor(t, dtype=x_t.dtype).expand(len(x_t))
        z1 = torch.tanh(self.level1(x_t / (1 + t[:, None, None, None] ** 2).sqrt()))
        z1, z2 = self.propagator([z1, torch.tanh(self.level2(z1))], 0.002 - t)
        return self.out(z1 + self.up(z2))


class Distance64(nn.Module):
    """hkd.losses.Distance (MSE + pseudo-Huber per sample) without its cast to float32."""

    def forward(self, x_hat, x_eps, lambda1):
        d = (x_hat - x_eps).flatten(1)
        c = 0.00054 * d.shape[1] ** 0.5
        return lambda1 * d.square().mean(1) + (d.square().sum(1) + c * c).sqrt() - c


LOSS64 = functools.partial(losses.trajectory_loss, distance=Distance64(), lambda1=0.3, mode="uniform")


def one_step(model, micro_batches, loss_fn=LOSS64):
    """train_step with Adam; returns (loss, gradient norm, gradients, weights after the step)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    value, finite, norm = loop.train_step(model, optimizer, micro_batches, loss_fn, grad_clip=1.0)
    assert finite
    unwrapped = getattr(model, "module", model)
    grads = {name: p.grad.clone() for name, p in unwrapped.named_parameters()}
    return value, norm, grads, {name: p.detach().clone() for name, p in unwrapped.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------
# The split


@pytest.mark.parametrize("rounds", [2, 4])
def test_micro_batches_make_the_step_of_the_whole_batch_in_float64(rounds):
    states, times = trajectories(8)
    u = torch.rand(8, 4, dtype=torch.float64)  # the step's time draws, one row per trajectory
    base = KoopmanNet()
    whole = one_step(copy.deepcopy(base), loop.split_batch((states, times, u), 1))
    split = one_step(copy.deepcopy(base), loop.split_batch((states, times, u), rounds))
    assert whole[0] == pytest.approx(split[0], rel=1e-12, abs=0) and whole[1] == pytest.approx(split[1], rel=1e-12)
    assert_same(whole[2], split[2], rtol=0, atol=1e-10)
    assert_same(whole[3], split[3], rtol=0, atol=1e-10)
    assert all(g.abs().max() > 1e-6 for g in whole[2].values())  # every parameter (generators too) has a gradient
    # the times matter at this tolerance: micro-batches that reuse the first rows' draws give another step
    reused = [(s, t, u[: len(s)]) for s, t, _ in loop.split_batch((states, times, u), rounds)]
    other = one_step(copy.deepcopy(base), reused)
    assert max((other[2][k] - whole[2][k]).abs().max() for k in whole[2]) > 1e-6


def test_a_bad_split_is_one_line_naming_both_numbers(tmp_path, capsys):
    for micro in (48, 128, 0):
        with pytest.raises(ValueError, match=rf"^train.micro_batch = {micro} must divide train.batch = 64$"):
            train.TrainConfig(batch=64, micro_batch=micro)
    assert train.accumulation_rounds(256, 32, 8) == 1 and train.accumulation_rounds(256, 16, 2) == 8
    message = "train.micro_batch = 48 must divide the 128 trajectories per process of train.batch = 256 on 2 processes"
    with pytest.raises(ValueError, match=f"^{message}$"):
        train.accumulation_rounds(256, 48, 2)
    with pytest.raises(ValueError, match="train.micro_batch = 64 must divide the 32 trajectories"):
        train.accumulation_rounds(256, 64, 8)
    with pytest.raises(ValueError, match=r"^teacher.micro_batch = 24 must divide teacher.batch_size = 64$"):
        TeacherConfig(batch_size=64, micro_batch=24)
    # from the command line: exit 2 and one line, before any work (no run folder)
    out = tmp_path / "run"
    assert cli.main(["train", f"train.out={out}", "train.batch=64", "train.micro_batch=48"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "48" in err and "64" in err and not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# DDP: one all-reduce per step


def _ddp_worker(rank, world, port, state, batch, out):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        for rounds in (1, 2):
            model = KoopmanNet()
            model.load_state_dict(state)
            ddp = nn.parallel.DistributedDataParallel(model)
            calls = []

            def count(group, bucket, calls=calls):
                calls.append(bucket.index())
                return default_hooks.allreduce_hook(group, bucket)

            ddp.register_comm_hook(None, count)
            mine = [x[rank::world] for x in batch]  # as train(): the sampler's and the time draws' rows of this rank
            results[rounds] = (*one_step(ddp, loop.split_batch(mine, rounds)), len(calls))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_accumulates_with_one_all_reduce_and_equals_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    states, times = trajectories(8)
    batch = (states, times, torch.rand(8, 4, dtype=torch.float64))
    base = KoopmanNet()
    mp.spawn(_ddp_worker, args=(2, port, base.state_dict(), batch, str(tmp_path / "ddp.pt")), nprocs=2)
    results = torch.load(tmp_path / "ddp.pt")
    whole = one_step(copy.deepcopy(base), loop.split_batch(batch, 1))
    for rounds in (1, 2):
        *step, all_reduces = results[rounds]
        assert_same(whole[2], step[2], rtol=0, atol=1e-10)
        assert_same(whole[3], step[3], rtol=0, atol=1e-10)
        assert all_reduces == results[1][-1] > 0  # no_sync: the first micro-batch's backward communicates nothing


# ---------------------------------------------------------------------------------------------------------------
# train() and train_teacher()


def run_config(tmp_path, name, **train_overrides):
    settings = dict(
        out=str(tmp_path / name), batch=8, epochs=4, log_every=1, checkpoint_every=1000, sample_every=0,
        sample_count=4, progress=False, seed=7, max_steps=6,
    )  # fmt: skip
    return {"model": dict(MODEL), "train": settings | train_overrides}


def test_train_with_micro_batches_matches_and_resumes_mid_epoch_exactly(tmp_path):
    data = Trajectories(count=32)  # 4 steps of 8 per epoch; 6 steps
    whole = train.train(run_config(tmp_path, "whole"), dataset=data)
    straight = train.train(run_config(tmp_path, "straight", micro_batch=2), dataset=data)
    runs = (straight, whole)
    # float32 sums in another order, so equal to rounding: the losses, and the last step's gradients (its weights
    # less so: Adam turns rounding in a near-zero gradient into a difference of up to lr in that element)
    for (step_a, loss_a), (step_b, loss_b) in zip(straight["losses"], whole["losses"], strict=True):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-5)
    grads = [torch.cat([p.grad.flatten() for p in run["model"].parameters() if p.grad is not None]) for run in runs]
    assert (grads[0] - grads[1]).norm() < 1e-5 * grads[1].norm()
    assert_same(parameters(straight["model"]), parameters(whole["model"]), rtol=0, atol=1e-4)

    # killed while loading step 3's batch (mid-epoch): it finishes that step, checkpoints, and resumes exactly
    cfg = run_config(tmp_path, "resumed", micro_batch=2)
    stopping = copy.copy(data)
    stopping.kill_at, stopping.calls = 2 * 8 + 3, 0
    with pytest.raises(RunStopped, match="stopped by SIGTERM at step 3"):
        train.train(cfg, dataset=stopping)
    assert files.load(tmp_path / "resumed" / "checkpoint.pt")["step"] == 3
    torch.manual_seed(12345)  # another global RNG state: it must not matter
    resumed = train.train(cfg, dataset=data, resume=True)
    assert resumed["step"] == 6 and resumed["losses"] == straight["losses"]
    assert_same(parameters(resumed["model"]), parameters(straight["model"]))
    assert_same(parameters(resumed["ema"]), parameters(straight["ema"]))


TEACHER = ["teacher.model_channels=8", "teacher.channel_mult=[1, 2]", "teacher.batch_size=16", "teacher.log_every=1"]
TEACHER += ["teacher.sample_grid=0", "teacher.checkpoint_every=2", "teacher.lr_warmup=1"]


def test_teacher_micro_batches_draw_the_batch_noise_once_and_resume_exactly(tmp_path):
    quiet = lambda line: None
    cfg = config.load("digits", [*TEACHER, "teacher.steps=3"])
    whole = train_teacher(cfg.data, cfg.teacher, tmp_path / "whole", log=quiet)
    micro = config.load("digits", [*TEACHER, "teacher.steps=3", "teacher.micro_batch=4"])
    split = train_teacher(micro.data, micro.teacher, tmp_path / "split", log=quiet)
    for (step_a, loss_a), (step_b, loss_b) in zip(split["losses"], whole["losses"], strict=True):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-5)  # the same sigma and noise per image
    a, b = (torch.load(tmp_path / run / "teacher.pt", weights_only=True) for run in ("whole", "split"))
    assert_same(a["net"], b["net"], rtol=1e-4, atol=1e-5)

    # stopped after step 2 (a checkpoint), then resumed: the same as the uninterrupted split run
    stopped = config.load("digits", [*TEACHER, "teacher.steps=2", "teacher.micro_batch=4"])
    train_teacher(stopped.data, stopped.teacher, tmp_path / "resumed")
    assert train_teacher(micro.data, micro.teacher, tmp_path / "resumed", resume=True, log=quiet)["step"] == 3
    c = torch.load(tmp_path / "resumed" / "teacher.pt", weights_only=True)
    assert_same(c["net"], b["net"])
    assert_same(c["ema"], b["ema"])


# ---------------------------------------------------------------------------------------------------------------
# train.compile


@pytest.mark.slow
def test_compiled_step_matches_eager_without_graph_breaks_in_the_koopman_layer(tmp_path):
    data = Trajectories(count=16)
    start = KoopmanNet(torch.float32)
    runs = {}
    for name in ("eager", "compiled"):
        cfg = run_config(tmp_path, name, max_steps=2, compile=name == "compiled")
        runs[name] = train.train(cfg, dataset=data, model=copy.deepcopy(start))
    eager, compiled = runs["eager"]["model"], runs["compiled"]["model"]
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None
    for (step_a, loss_a), (step_b, loss_b) in zip(runs["compiled"]["losses"], runs["eager"]["losses"], strict=True):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-5)
    grads = [{k: p.grad for k, p in m.named_parameters()} for m in (compiled, eager)]  # the last step's
    assert_same(*grads, rtol=1e-4, atol=1e-6)
    assert_same(parameters(compiled), parameters(eager), rtol=1e-4, atol=1e-6)
    states, times = trajectories(4, torch.float32)
    assert torch._dynamo.explain(eager)(states[:, 2], times[:, 2]).graph_break_count == 0  # one graph


def test_hkd_model_breaks_no_graph_inside_the_koopman_layer():
    from hkd.model import HKDModel, ModelConfig

    states, times = trajectories(4, torch.float32)
    explanation = torch._dynamo.explain(HKDModel(ModelConfig(**MODEL)))(states[:, 2], times[:, 2])
    frames = [frame.filename for reason in explanation.break_reasons for frame in reason.user_stack]
    inside = [f for f in frames if f.endswith("propagator.py") or f"{os.sep}hkd{os.sep}ops{os.sep}" in f]
    assert not inside, [reason.reason for reason in explanation.break_reasons]
