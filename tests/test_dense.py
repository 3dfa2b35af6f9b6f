"""hkd.ops.dense_propagate: the action and per-sample-expm algorithms on every backend against expm(tau A) z in
float64, gradients (latents, generators, tau), custom-op integration, clear errors."""

import math
import os
import subprocess
import sys

import pytest
import torch

from hkd.ops import _backend, dense, dense_propagate, reference

CPU = torch.device("cpu")
CUDA_OK = torch.cuda.is_available() and _backend.cuda_compiled()
HOST_BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")),
    pytest.param(
        "triton",
        marks=[
            pytest.mark.triton,
            pytest.mark.skipif(not _backend.usable("triton", CPU), reason="triton not installed or not interpreted"),
        ],
    ),
]


def exact(latents, generators, tau):
    """exp(tau_b A(p)) z[b, :, p] with scipy-accurate float64 matrix exponentials (torch.linalg.matrix_exp)."""
    return reference.dense_propagate(
        [z.double() for z in latents], [A.double() for A in generators], torch.as_tensor(tau).double()
    )


def random_problem(batch, *, per_position, per_sample_tau, levels=2, d_max=9, dtype=torch.float64, device=CPU):
    latents, generators = [], []
    for _ in range(levels):
        d = int(torch.randint(1, d_max + 1, ()))
        spatial = [int(s) for s in torch.randint(1, 4, (int(torch.randint(0, 3, ())),))]
        latents.append(torch.randn(batch, d, *spatial, dtype=dtype, device=device))
        shape = (math.prod(spatial), d, d) if per_position else (d, d)
        generators.append(torch.randn(shape, dtype=dtype, device=device) / math.sqrt(d))
    tau = torch.rand((batch,) if per_sample_tau else (), dtype=dtype, device=device) * 6 - 3
    return latents, generators, tau


def rel_err(actual, expected):
    return max(
        float((a.double() - e).norm() / e.norm().clamp_min(1e-300)) for a, e in zip(actual, expected, strict=True)
    )


CASES = [(1, False, False), (5, False, True), (4, True, True), (3, True, False), (6, False, True)]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("batch, per_position, per_sample_tau", CASES)
def test_matches_expm_times_z_float64(backend, batch, per_position, per_sample_tau):
    latents, generators, tau = random_problem(batch, per_position=per_position, per_sample_tau=per_sample_tau)
    out = dense_propagate(latents, generators, tau, backend=backend)
    assert [o.shape for o in out] == [z.shape for z in latents]
    assert rel_err(out, exact(latents, generators, tau)) <= 1e-12


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("P", [1, 6])
def test_both_algorithms_agree_with_the_exact_result(backend, per_position, P):
    """The action (Taylor substeps) and the per-sample expm, each forced, at a norm that needs several substeps."""
    B, d = 5, 6
    z = torch.randn(B, d, P, dtype=torch.float64)
    A = torch.randn((P, d, d) if per_position else (d, d), dtype=torch.float64)
    tau = torch.rand(B, dtype=torch.float64) * 8 - 4  # ||tau A||_1 up to ~40
    expected = exact([z], [A], tau)[0]
    action = dense._action(z, A, tau, backend)
    M = dense._expm(tau.reshape(-1, *([1] * A.dim())) * A, backend)
    per_sample = torch.bmm(M, z) if A.dim() == 2 else torch.einsum("bpij,bjp->bip", M, z)
    scale = float(torch.linalg.matrix_norm(tau.abs().max() * A, ord=1).max())  # condition grows with ||tau A||
    for y in (action, per_sample):
        assert float((y - expected).norm() / expected.norm()) <= 1e-13 * max(1.0, scale)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_float32_and_half_latents(backend):
    latents, generators, tau = random_problem(4, per_position=False, per_sample_tau=True, dtype=torch.float32)
    assert rel_err(dense_propagate(latents, generators, tau, backend=backend), exact(latents, generators, tau)) <= 1e-5
    half = [z.half() for z in latents]
    out = dense_propagate(half, generators, tau, backend=backend)
    assert all(o.dtype == torch.float16 for o in out)
    assert rel_err(out, exact(half, generators, tau)) <= 2e-3


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("per_position", [False, True])
def test_gradcheck(backend, per_position):
    latents, generators, tau = random_problem(3, per_position=per_position, per_sample_tau=True, levels=1, d_max=4)
    inputs = (latents[0].requires_grad_(), generators[0].requires_grad_(), tau.requires_grad_())
    assert torch.autograd.gradcheck(lambda z, A, t: dense_propagate([z], [A], t, backend=backend)[0], inputs)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_gradcheck_shared_tau(backend):
    latents, generators, tau = random_problem(2, per_position=False, per_sample_tau=False, levels=1, d_max=4)
    inputs = (latents[0].requires_grad_(), generators[0].requires_grad_(), tau.requires_grad_())
    assert torch.autograd.gradcheck(lambda z, A, t: dense_propagate([z], [A], t, backend=backend)[0], inputs)


@pytest.mark.parametrize("per_position", [False, True])
def test_action_backward_is_the_reverse_of_the_recurrence(per_position):
    """dense_action_backward against autograd through the plain-PyTorch recurrence, several substeps."""
    B, d, P = 4, 5, 3
    z = torch.randn(B, d, P, dtype=torch.float64, requires_grad=True)
    A = torch.randn((P, d, d) if per_position else (d, d), dtype=torch.float64, requires_grad=True)
    tau = (torch.rand(B, dtype=torch.float64) * 10 - 5).requires_grad_()
    assert dense.action_plan(dense._action_norm(A.detach(), tau.detach()), torch.float64)[1] > 1
    g = torch.randn(B, d, P, dtype=torch.float64)
    expected = torch.autograd.grad(dense.taylor_action(z, A, tau), (z, A, tau), g)
    actual = dense.taylor_action_backward(g, z.detach(), A.detach(), tau.detach())
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


def test_cost_model_picks_the_cheaper_algorithm():
    # per-sample expm costs ~B (cost(m) + s) 2 d^3, the action m s 2 d^2 B P: d large with P = 1 favours the action,
    # many positions per sample favour one expm per sample
    assert dense.choose_algorithm(256, 256, 1, False, 3.0, torch.float32) == "action"
    assert dense.choose_algorithm(256, 64, 64, False, 3.0, torch.float32) == "expm"
    assert dense.choose_algorithm(64, 32, 1024, False, 3.0, torch.float32) == "expm"


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_non_finite_generator_gives_nan(backend):
    z = torch.randn(3, 4, 2)
    A = torch.randn(4, 4)
    A[1, 2] = math.inf
    tau = torch.tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN or infinite"):  # the front refuses it; the kernels give NaN
        dense_propagate([z], [A], torch.tensor(0.5), backend=backend)
    assert dense._action(z, A, tau, backend).isnan().all()
    assert dense._expm(tau[:, None, None] * A, backend).isnan().all()


@pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")
@pytest.mark.parametrize("per_position", [False, True])
def test_opcheck(per_position):
    B, d, P = 3, 4, 2
    z = torch.randn(B, d, P, dtype=torch.float64, requires_grad=True)
    A = torch.randn((P, d, d) if per_position else (d, d), dtype=torch.float64, requires_grad=True)
    tau = torch.rand(B, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.hkd.dense_action.default, (z, A, tau))
    g = torch.randn(B, d, P, dtype=torch.float64)
    torch.library.opcheck(torch.ops.hkd.dense_action_backward.default, (g, z.detach(), A.detach(), tau.detach()))


@pytest.mark.triton
@pytest.mark.skipif(not _backend.usable("triton", CPU), reason="triton not installed or not interpreted")
def test_opcheck_triton():
    z = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    tau = torch.rand(2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(dense._action_triton, (z, A, tau), test_utils=("test_schema", "test_autograd_registration"))


class DenseKoopman(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(d, d) / d)

    def forward(self, z, tau):
        return dense_propagate([z], [self.A], tau, backend="cpu")[0]


@pytest.mark.slow
@pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")
def test_module_compiles_fullgraph():
    model = DenseKoopman(4)
    z, tau = torch.randn(3, 4, 2, 2), torch.rand(3)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(z, tau)
    torch.testing.assert_close(out, model(z, tau), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert model.A.grad is not None and model.A.grad.isfinite().all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ([torch.randn(2, 4)], [torch.randn(4, 3)], 0.1), "square"),
        (lambda: ([torch.randn(2, 4, 3)], [torch.randn(5, 5)], 0.1), "4 channels"),
        (lambda: ([torch.randn(2, 4, 3)], [torch.randn(2, 4, 4)], 0.1), "positions"),
        (lambda: ([torch.randn(2, 4)], [torch.randn(4, 4)], torch.rand(3)), "tau must be"),
        (lambda: ([torch.randn(2, 4)], [torch.randn(4, 4)], torch.rand(2, 1)), "tau must be"),
        (lambda: ([torch.randn(2, 4)], [torch.randn(4, 4, device="meta")], 0.1), "mixes devices"),
        (lambda: ([torch.randn(2, 4)], [torch.randn(4, 4)], torch.rand(2, device="meta")), "mixes devices"),
        (lambda: ([torch.randn(2, 4)], [], 0.1), "generators"),
    ],
)
def test_clear_errors(make, match):
    latents, generators, tau = make()
    with pytest.raises(ValueError, match=match):
        dense_propagate(latents, generators, tau)


AOT_TRITON = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import hkd.kernels.expm as k
target = GPUTarget("cuda", 90, 32)
for dt in ("fp32", "fp64"):
    ptr = "*" + dt
    sig = {"a_ptr": ptr, "out_ptr": ptr, "s_ptr": "*i32", "n": "i32", "BLOCK": "constexpr"}
    triton.compile(ASTSource(fn=k._expm16_kernel, signature=sig, constexprs={"BLOCK": 64}), target=target)
    for row_mode in (True, False):
        sig = {"z_ptr": ptr, "a_ptr": ptr, "tau_ptr": ptr, "out_ptr": ptr, "B": "i32", "d": "i32", "P": "i32",
               "degree": "i32", "substeps": "i32", "ROW_MODE": "constexpr", "SHARED": "constexpr",
               "BLOCK_D": "constexpr", "BLOCK": "constexpr"}
        constexprs = {"ROW_MODE": row_mode, "SHARED": not row_mode, "BLOCK_D": 64, "BLOCK": 32}
        triton.compile(ASTSource(fn=k._action_kernel, signature=sig, constexprs=constexprs), target=target)
"""


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.skipif(not _backend.triton_installed(), reason="triton not installed")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs the kernels' logic; this lowers them to real GPU code (sm_90, both dtypes, both modes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", AOT_TRITON], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


# ---- GPU ----------------------------------------------------------------------------------------------------
GPU_BACKENDS = ["cuda", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("d, P, per_position", [(8, 1, False), (32, 20, False), (16, 5, True), (80, 3, False)])
def test_gpu_action_matches(backend, d, P, per_position):
    if backend == "cuda" and not CUDA_OK:
        pytest.skip("hkd._C built without CUDA")
    B = 37
    z = torch.randn(B, d, P, dtype=torch.float64)
    A = torch.randn((P, d, d) if per_position else (d, d), dtype=torch.float64) / math.sqrt(d)
    tau = torch.rand(B, dtype=torch.float64) * 6 - 3
    expected = exact([z], [A], tau)[0]
    y = dense._action(z.cuda(), A.cuda(), tau.cuda(), backend).cpu()
    assert float((y - expected).norm() / expected.norm()) <= 1e-12
    y32 = dense._action(z.float().cuda(), A.float().cuda(), tau.float().cuda(), backend).cpu()
    assert float((y32 - expected).norm() / expected.norm()) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_gradcheck(backend):
    if backend == "cuda" and not CUDA_OK:
        pytest.skip("hkd._C built without CUDA")
    for per_position in (False, True):
        latents, generators, tau = random_problem(
            3, per_position=per_position, per_sample_tau=True, levels=1, d_max=4, device=torch.device("cuda")
        )
        inputs = (latents[0].requires_grad_(), generators[0].requires_grad_(), tau.requires_grad_())
        assert torch.autograd.gradcheck(lambda z, A, t: dense_propagate([z], [A], t, backend=backend)[0], inputs)
