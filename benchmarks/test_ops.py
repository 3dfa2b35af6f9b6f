"""pytest-benchmark suite of the fused ops: each group holds the baseline and every usable backend on one workload.

    python -m pytest benchmarks/test_ops.py --benchmark-only                   # this machine's device
    python -m pytest benchmarks/test_ops.py --benchmark-only --benchmark-compare  # against a saved run

Not part of the test run (pytest's testpaths is tests/). Workloads come from hkd.bench (`hkd bench` prints the same
comparisons as ratios in one table); the group names say which row is the baseline.
"""

from __future__ import annotations

import pytest
import torch

from hkd import bench
from hkd.ops import dense_propagate, expm, reference, spectral_propagate

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = bench.fast_backends(DEVICE)
sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)


def timed(benchmark, fn, rounds: int = 10) -> None:
    def call():
        fn()
        sync()

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)


def spectral_op(name: str):
    if name == "eager composite":
        return reference.spectral_propagate
    if name == "torch.compile (baseline)":
        return torch.compile(reference.spectral_propagate)
    return lambda z, a, b, t: spectral_propagate(z, a, b, t, backend=name)


SPECTRAL_ROWS = ["eager composite", "torch.compile (baseline)", *BACKENDS]


@pytest.fixture(scope="module")
def workload_w():
    return bench.spectral_workload(64, DEVICE)


@pytest.mark.benchmark(group="spectral W forward (floor: clone)")
def test_spectral_floor(benchmark, workload_w):
    timed(benchmark, lambda: [z.clone() for z in workload_w[0]])


@pytest.mark.benchmark(group="spectral W forward (floor: clone)")
@pytest.mark.parametrize("row", SPECTRAL_ROWS)
def test_spectral_forward(benchmark, workload_w, row):
    op = spectral_op(row)

    def forward():
        with torch.no_grad():
            op(*workload_w)

    timed(benchmark, forward)


@pytest.mark.benchmark(group="spectral W forward+backward (baseline: torch.compile)")
@pytest.mark.parametrize("row", SPECTRAL_ROWS)
def test_spectral_forward_backward(benchmark, workload_w, row):
    op = spectral_op(row)
    latents, alphas, betas, tau = (
        [t.detach().clone().requires_grad_() for t in group] if isinstance(group, list) else group
        for group in workload_w
    )
    grads = [torch.randn_like(z) for z in latents]
    leaves = [*latents, *alphas, *betas]
    timed(benchmark, lambda: torch.autograd.backward(op(latents, alphas, betas, tau), grads, inputs=leaves))


@pytest.mark.benchmark(group="dense action B=256 d=64 P=1 gaussian 15, tau ~ U(0, 1) (baseline: composites)")
@pytest.mark.parametrize("row", ["composite Taylor", "composite per-sample expm", *BACKENDS])
def test_dense_action(benchmark, row):
    A = bench.dense_generator("gaussian 15", 64, DEVICE).float()
    z, tau = torch.randn(256, 64, 1, device=DEVICE), torch.rand(256, device=DEVICE)
    fns = {
        "composite Taylor": lambda: bench.taylor_composite(z, A, tau),
        "composite per-sample expm": lambda: bench.per_sample_expm(z, A, tau),
    }
    timed(benchmark, fns.get(row, lambda: dense_propagate([z], [A], tau, backend=row)))


@pytest.mark.benchmark(group="expm 1024 x 32x32 (baseline: torch.linalg.matrix_exp)")
@pytest.mark.parametrize("row", ["torch.linalg.matrix_exp", *BACKENDS])
def test_expm(benchmark, row):
    A = torch.randn(1024, 32, 32, device=DEVICE) / 32**0.5
    fn = torch.linalg.matrix_exp if row == "torch.linalg.matrix_exp" else lambda X: expm(X, backend=row)
    timed(benchmark, lambda: fn(A))
