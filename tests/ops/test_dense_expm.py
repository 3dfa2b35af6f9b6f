"""hkd.ops.expm: every backend against scipy.linalg.expm, hard cases, gradients, custom-op integration."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers.backends import CPU, CUDA_OK, HOST_BACKENDS

from hkd.ops import _backend, dense, expm


def scipy_expm(A: torch.Tensor) -> torch.Tensor:
    flat = A.detach().cpu().double().reshape(-1, *A.shape[-2:]).numpy()
    return torch.from_numpy(np.stack([scipy.linalg.expm(a) for a in flat])).reshape(A.shape)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().cpu().double(), expected.double()
    return float(((a - e).flatten(-2).norm(dim=-1) / e.flatten(-2).norm(dim=-1).clamp_min(1e-300)).max())


def with_norm(A: torch.Tensor, norm: float) -> torch.Tensor:
    return A * (norm / torch.linalg.matrix_norm(A, ord=1)[..., None, None])


def hard_cases(n: int) -> dict[str, torch.Tensor]:
    """Named (n x n) float64 matrices that break naive expm implementations."""
    g = torch.randn(n, n, dtype=torch.float64)
    jordan = torch.diag(torch.full((n,), -0.7, dtype=torch.float64)) + torch.diag(torch.ones(n - 1), 1).double()
    u, _, vh = torch.linalg.svd(g)
    sing = torch.logspace(0, -14, n, dtype=torch.float64)
    return {
        "random": g / math.sqrt(n),
        "nilpotent": torch.triu(g, 1) * 3,
        "jordan": jordan,
        "large_norm": with_norm(g - g.T, 60.0) - 5 * torch.eye(n, dtype=torch.float64),  # skew-ish, ||A||_1 ~ 65
        "negative_large": -with_norm(g @ g.T, 40.0),  # symmetric, eigenvalues down to -40
        "nearly_singular": u @ torch.diag(sing) @ vh,
        "non_normal": torch.triu(torch.randn(n, n, dtype=torch.float64), 1) * 10 + torch.diag(torch.linspace(-1, 1, n)),
        "zero": torch.zeros(n, n, dtype=torch.float64),
    }


def host_backends() -> list[str]:
    return [b for b in ("reference", "cpu", "triton") if _backend.usable(b, CPU)]


@pytest.mark.parametrize("n", [1, 2, 6])
def test_float64_hard_cases_match_scipy(n):
    """Every host backend (one condition estimate per case)."""
    cases = hard_cases(n) if n > 1 else {"1x1": torch.randn(1, 1, dtype=torch.float64) * 3}
    for name, A in cases.items():
        expected = scipy_expm(A)
        # relative Frobenius error within 1e-12, looser only in proportion to the condition of exp at A
        cond = scipy.linalg.expm_cond(A.numpy()) if name in ("large_norm", "non_normal", "jordan", "nilpotent") else 1
        for backend in host_backends():
            err = rel_err(expm(A, backend=backend), expected)
            assert err <= 1e-12 * max(1.0, cond), f"{backend}, {name}: {err:.2e} (cond {cond:.1e})"


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_float64_batched_random_match_scipy(backend):
    n = 16 if backend != "triton" else 8
    A = (
        torch.randn(6, n, n, dtype=torch.float64)
        / math.sqrt(n)
        * torch.logspace(-3, 1, 6, dtype=torch.float64)[:, None, None]
    )
    assert rel_err(expm(A, backend=backend), scipy_expm(A)) <= 1e-12


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("norm", [0.012, 0.02, 0.03, 0.045])
def test_float64_small_norms_match_scipy(backend, norm):
    """||A||_1 in (0.01, 0.05): torch.linalg.matrix_exp alone misses scipy by up to ~1e-11 there (its lowest-degree
    branch); every backend, the reference included, must not."""
    A = torch.randn(32, 5, 5, dtype=torch.float64)
    A = A * (norm / torch.linalg.matrix_norm(A, ord=1))[:, None, None]
    assert max(rel_err(expm(a, backend=backend), scipy_expm(a)) for a in A) <= 1e-12


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("norm, tol", [(0.01, 1e-5), (1.0, 1e-5), (10.0, 1e-4), (100.0, 1e-4)])
def test_float32_accuracy_by_norm(backend, norm, tol):
    n = 12
    # normal-ish generators (random symmetric plus skew parts): condition ~ ||A||, as the tolerance assumes
    g = torch.randn(4, n, n, dtype=torch.float64)
    A = with_norm(0.5 * (g + g.mT) - 0.1 * norm * torch.eye(n, dtype=torch.float64) + (g - g.mT), norm)
    A = with_norm(A - A.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None] * torch.eye(n, dtype=torch.float64), norm)
    out = expm(A.float(), backend=backend)
    assert out.dtype == torch.float32
    assert rel_err(out, scipy_expm(A.float())) <= tol


@pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")
def test_flush_to_zero_keeps_float32_accurate_and_is_restored():
    """Powers of a tiny A (entries 1e-20: A^2 is subnormal in float32) and decays to e^-80 (the squarings pass through
    subnormals): the CPU kernels flush subnormals to zero on their threads, without losing accuracy, forward and
    gradient, and restore the caller's floating-point mode."""
    n = 8
    g = torch.randn(4, n, n, dtype=torch.float64)
    cases = {"tiny": g * 1e-20, "decay": -with_norm(g @ g.mT, 80.0) - 1e-3 * torch.eye(n, dtype=torch.float64)}
    for name, A in cases.items():
        assert rel_err(expm(A.float(), backend="cpu"), scipy_expm(A.float())) <= 1e-5, name
        G = torch.randn_like(A)
        A_ = A.clone().requires_grad_()
        (expected,) = torch.autograd.grad(torch.linalg.matrix_exp(A_), A_, G)
        assert rel_err(torch.ops.hkd.expm_backward(A.float(), G.float()), expected) <= 1e-4, name
    assert float(torch.tensor([1e-37], dtype=torch.float32) / 100) > 0  # this thread still computes subnormals


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_batch_shapes_and_empty(backend):
    A = torch.randn(2, 3, 5, 5, dtype=torch.float64) / 3
    out = expm(A, backend=backend)
    assert out.shape == A.shape
    assert rel_err(out, scipy_expm(A)) <= 1e-12
    assert expm(torch.zeros(0, 4, 4), backend=backend).shape == (0, 4, 4)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_non_finite_gives_nan(backend):
    A = torch.randn(3, 4, 4)
    A[0, 1, 2] = math.inf
    A[1, 0, 0] = math.nan
    out = expm(A, backend=backend)
    assert out[:2].isnan().all() and out[2].isfinite().all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_gradcheck(backend):
    A = (torch.randn(1, 4, 4, dtype=torch.float64) * 1.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda A: expm(A, backend=backend), (A,))


@pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")
def test_backward_matches_autograd_of_matrix_exp_larger_norms():
    A = (
        torch.randn(5, 20, 20, dtype=torch.float64)
        / math.sqrt(20)
        * torch.tensor([0.01, 0.5, 2, 8, 30.0])[:, None, None]
    )
    G = torch.randn_like(A)
    A_ = A.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.linalg.matrix_exp(A_), A_, G)
    actual = torch.ops.hkd.expm_backward(A, G)
    assert rel_err(actual, expected) <= 1e-11


@pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    A = torch.randn(3, 5, 5, dtype=torch.float64).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.hkd.expm.default, (A,))
    torch.library.opcheck(torch.ops.hkd.expm_backward.default, (A.detach(), torch.randn_like(A.detach())))


@pytest.mark.triton
@pytest.mark.skipif(not _backend.usable("triton", CPU), reason="triton not installed or not interpreted")
def test_opcheck_triton():
    A = torch.randn(2, 3, 3, dtype=torch.float64).requires_grad_()
    torch.library.opcheck(dense._triton_ops()[0], (A,), test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize(
    "bad, error",
    [(torch.randn(3, 4), ValueError), (torch.randn(4), ValueError), (torch.ones(2, 2, dtype=torch.int64), TypeError)],
)
def test_clear_errors(bad, error):
    with pytest.raises(error, match="expm"):
        expm(bad)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        expm(torch.randn(2, 2), backend="fast")


# ---- GPU ----------------------------------------------------------------------------------------------------
GPU_BACKENDS = ["cuda", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 32, 48])  # 48: the batched-GEMM path of the CUDA backend
def test_gpu_matches_scipy(backend, n):
    if backend == "cuda" and not CUDA_OK:
        pytest.skip("hkd._C built without CUDA")
    A = (
        torch.randn(5, n, n, dtype=torch.float64)
        / math.sqrt(n)
        * torch.logspace(-2, 1.5, 5, dtype=torch.float64)[:, None, None]
    )
    assert rel_err(expm(A.cuda(), backend=backend), scipy_expm(A)) <= 1e-12
    for norm, tol in [(1.0, 1e-5), (100.0, 1e-4)]:
        g = torch.randn(4, n, n, dtype=torch.float64)
        S = with_norm(0.5 * (g + g.mT) - norm * torch.eye(n, dtype=torch.float64), norm)
        assert rel_err(expm(S.float().cuda(), backend=backend), scipy_expm(S.float())) <= tol


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_gradcheck_and_nan(backend):
    if backend == "cuda" and not CUDA_OK:
        pytest.skip("hkd._C built without CUDA")
    A = torch.randn(2, 5, 5, dtype=torch.float64, device="cuda").requires_grad_()
    assert torch.autograd.gradcheck(lambda A: expm(A, backend=backend), (A,))
    bad = torch.randn(2, 5, 5, device="cuda")
    bad[0, 0, 0] = math.inf
    out = expm(bad, backend=backend)
    assert out[0].isnan().all() and out[1].isfinite().all()


@pytest.mark.cuda
@pytest.mark.parametrize("n", [7, 32, 48])  # on chip (n <= 32, when it fits) and batched GEMMs
def test_gpu_backward_matches_autograd_of_matrix_exp(n):
    if not CUDA_OK:
        pytest.skip("hkd._C built without CUDA")
    A = torch.randn(4, n, n, dtype=torch.float64) / math.sqrt(n) * torch.tensor([0.01, 0.5, 3, 20.0])[:, None, None]
    G = torch.randn_like(A)
    A_ = A.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.linalg.matrix_exp(A_), A_, G)
    assert rel_err(torch.ops.hkd.expm_backward(A.cuda(), G.cuda()), expected) <= 1e-11
