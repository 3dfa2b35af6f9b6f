"""hkd.ops.spectral_propagate: every backend against the float64 reference, gradients, custom-op integration."""

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers.backends import CPU, HOST_BACKENDS

from hkd.ops import _backend, reference, spectral_propagate


def random_problem(
    levels, batch, *, per_position, per_sample_tau, dtype=torch.float64, device=CPU, max_tau=80.0, small=False
):
    """Random latents of `levels` levels with random even d and random (often odd) spatial shapes."""
    latents, alphas, betas = [], [], []
    for _ in range(levels):
        d = 2 * int(torch.randint(1, 4 if small else 9, ()))
        spatial = [int(s) for s in torch.randint(1, 4 if small else 12, (int(torch.randint(0, 3, ())),))]
        latents.append(torch.randn(batch, d, *spatial, dtype=dtype, device=device))
        shape = (d // 2, *spatial) if per_position else (d // 2,)
        pdtype = reference._compute_dtype(dtype)
        # |alpha tau| stays moderate at any tau (EDM time reaches 80); beta tau spans many turns
        alphas.append(torch.randn(shape, dtype=pdtype, device=device) * (1.0 / max_tau))
        betas.append(torch.randn(shape, dtype=pdtype, device=device))
    tau_shape = (batch,) if per_sample_tau else ()
    tau = (torch.rand(tau_shape, dtype=reference._compute_dtype(dtype), device=device) * 2 - 1) * max_tau
    return latents, alphas, betas, tau


def assert_close_levels(actual, expected, **tolerances):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, **tolerances)


CASES = [  # (levels, batch, per_position, per_sample_tau)
    (1, 1, True, False),
    (2, 7, False, True),
    (3, 5, True, True),
    (4, 3, True, False),
    (3, 1, False, False),
    (2, 9, True, True),
    (5, 2, True, True),  # more levels than one Triton launch takes (MAX_LEVELS = 4)
    (2, 6, False, False),
]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_float64(backend, case):
    levels, batch, per_position, per_sample_tau = case
    small = backend == "triton"
    latents, alphas, betas, tau = random_problem(
        levels, batch, per_position=per_position, per_sample_tau=per_sample_tau, small=small
    )
    out = spectral_propagate(latents, alphas, betas, tau, backend=backend)
    assert_close_levels(out, reference.spectral_propagate(latents, alphas, betas, tau), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", HOST_BACKENDS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_matches_float64_reference(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for per_position in (True, False):
        for per_sample_tau in (True, False):
            latents, alphas, betas, tau = random_problem(
                3, 4, per_position=per_position, per_sample_tau=per_sample_tau, dtype=dtype
            )
            out = spectral_propagate(latents, alphas, betas, tau, backend=backend)
            # the float64 evaluation of the same (rounded) inputs; the result may differ by the output's rounding
            expected = reference.spectral_propagate([z.double() for z in latents], alphas, betas, tau.double())
            for a, e in zip(out, expected, strict=True):
                assert a.dtype == dtype
                torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * e.abs().max().item())


@pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="extension not built")
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_threads_split_rows_and_levels(threads, dtype):
    """Large enough that the forward's per-thread stretches start mid-row and mid-level (odd P, several levels),
    and the backward's units cut pair planes: every split must still equal the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shapes = [(6, 9, 13), (10, 7, 5), (4, 31, 1)]
        for per_position, per_sample_tau in [(True, True), (True, False), (False, True)]:
            latents = [torch.randn(97, *s, dtype=dtype, requires_grad=True) for s in shapes]
            pshape = [(d // 2, h, w) if per_position else (d // 2,) for d, h, w in shapes]
            pdtype = reference._compute_dtype(dtype)
            alphas = [(torch.randn(s, dtype=pdtype) * 0.02).requires_grad_() for s in pshape]
            betas = [torch.randn(s, dtype=pdtype, requires_grad=True) for s in pshape]
            tau = torch.rand(97 if per_sample_tau else (), dtype=pdtype) * 80
            out = spectral_propagate(latents, alphas, betas, tau, backend="cpu")
            # the float64 evaluation of the same inputs (float32 products of beta and tau lose more than the op)
            up = lambda ts: [t.double() for t in ts]
            ref = reference.spectral_propagate(up(latents), up(alphas), up(betas), tau.double())
            tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
            assert_close_levels(up(out), ref, **tol)
            grads = [torch.randn_like(z) for z in out]
            got = torch.autograd.grad(out, [*latents, *alphas, *betas], grads)
            want = torch.autograd.grad(ref, [*latents, *alphas, *betas], up(grads))
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * w.abs().max().item() * 10)
    finally:
        torch.set_num_threads(before)


def gradcheck_inputs(levels, batch, per_position, per_sample_tau, small=True):
    latents, alphas, betas, tau = random_problem(
        levels, batch, per_position=per_position, per_sample_tau=per_sample_tau, max_tau=3.0, small=small
    )
    return [t.requires_grad_() for t in (*latents, *alphas, *betas, tau)], levels


def as_op(backend, levels):
    def f(*args):
        L = levels
        return tuple(spectral_propagate(args[:L], args[L : 2 * L], args[2 * L : 3 * L], args[-1], backend=backend))

    return f


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("per_position, per_sample_tau", [(True, True), (False, False)])
def test_gradcheck(backend, per_position, per_sample_tau):
    inputs, levels = gradcheck_inputs(2, 3, per_position, per_sample_tau)
    assert torch.autograd.gradcheck(as_op(backend, levels), inputs)


@pytest.mark.parametrize("backend", HOST_BACKENDS[1:])
@pytest.mark.parametrize("wanted", ["latents", "params", "tau"])
def test_gradients_of_a_subset_of_inputs(backend, wanted):
    """Only the gradients asked for are computed (need_* flags), and they are still right."""
    inputs, L = gradcheck_inputs(2, 3, True, True)
    groups = {"latents": inputs[:L], "params": inputs[L : 3 * L], "tau": inputs[-1:]}
    for t in inputs:
        t.requires_grad_(any(t is w for w in groups[wanted]))
    out = as_op(backend, L)(*inputs)
    expected = as_op("reference", L)(*inputs)
    weights = [torch.randn_like(o) for o in out]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights, strict=True)), groups[wanted])
    ref = torch.autograd.grad(sum((o * w).sum() for o, w in zip(expected, weights, strict=True)), groups[wanted])
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_semigroup_and_identity(backend):
    latents, alphas, betas, tau1 = random_problem(3, 4, per_position=True, per_sample_tau=True, small=True)
    tau2 = torch.rand_like(tau1) * 40
    once = spectral_propagate(latents, alphas, betas, tau1 + tau2, backend=backend)
    twice = spectral_propagate(
        spectral_propagate(latents, alphas, betas, tau1, backend=backend), alphas, betas, tau2, backend=backend
    )
    assert_close_levels(twice, once, rtol=1e-10, atol=1e-10)
    for z, same in zip(latents, spectral_propagate(latents, alphas, betas, 0.0, backend=backend), strict=True):
        assert torch.equal(z, same)


@pytest.mark.parametrize("backend", HOST_BACKENDS[1:])
def test_float32_identity_is_exact(backend):
    latents, alphas, betas, _ = random_problem(2, 3, per_position=True, per_sample_tau=False, dtype=torch.float32)
    for z, same in zip(
        latents, spectral_propagate(latents, alphas, betas, torch.zeros(3), backend=backend), strict=True
    ):
        assert torch.equal(z, same)


@pytest.mark.parametrize("backend", HOST_BACKENDS[1:])
def test_empty_batch(backend):
    latents, alphas, betas, tau = random_problem(2, 0, per_position=True, per_sample_tau=True)
    latents = [z.requires_grad_() for z in latents]
    out = spectral_propagate(latents, alphas, betas, tau, backend=backend)
    assert [o.shape for o in out] == [z.shape for z in latents]
    sum(o.sum() for o in out).backward()
    assert all(z.grad.shape == z.shape for z in latents)


@pytest.mark.parametrize("backend", HOST_BACKENDS[1:])
def test_non_contiguous_and_channels_last(backend):
    latents, alphas, betas, tau = random_problem(1, 3, per_position=True, per_sample_tau=True)
    z = torch.randn(3, 6, 5, 7, dtype=torch.float64)
    a, b = torch.randn(3, 5, 7, dtype=torch.float64) * 0.01, torch.randn(3, 5, 7, dtype=torch.float64)
    strided = torch.randn(3, 12, 5, 7, dtype=torch.float64)[:, ::2]  # every other channel
    transposed = torch.randn(3, 6, 7, 5, dtype=torch.float64).transpose(2, 3)
    for layout in (z.to(memory_format=torch.channels_last), strided, transposed):
        assert not layout.is_contiguous()
        levels = [layout, *latents]
        out = spectral_propagate(levels, [a.mT.contiguous().mT, *alphas], [b, *betas], tau, backend=backend)
        assert_close_levels(out, reference.spectral_propagate(levels, [a, *alphas], [b, *betas], tau))


def test_auto_uses_the_compiled_cpu_kernel():
    expected = "cpu" if _backend.usable("cpu", CPU) else "reference"
    assert _backend.resolve("auto", CPU) == expected


@pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    latents, alphas, betas, tau = random_problem(2, 3, per_position=True, per_sample_tau=True, max_tau=3.0)
    args = [[t.requires_grad_(requires_grad) for t in group] for group in (latents, alphas, betas)]
    torch.library.opcheck(torch.ops.hkd.spectral_propagate.default, (*args, tau.requires_grad_(requires_grad)))


@pytest.mark.triton
@pytest.mark.skipif(not _backend.usable("triton", CPU), reason="triton not installed or not interpreted")
def test_opcheck_triton():
    from hkd.ops.spectral import _triton_ops

    latents, alphas, betas, tau = random_problem(2, 3, per_position=True, per_sample_tau=True, max_tau=3.0, small=True)
    # AOT dispatch traces into a triton_op, which the interpreter cannot run on traced tensors (GPU: see below)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        _triton_ops()[0], ([z.requires_grad_() for z in latents], alphas, betas, tau), test_utils=tests
    )


class Propagator(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.alphas = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(d // 2, *s)) for d, s in shapes)
        self.betas = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(d // 2, *s)) for d, s in shapes)

    def forward(self, latents, tau):
        return [2 * z for z in spectral_propagate(latents, list(self.alphas), list(self.betas), tau)]


@pytest.mark.slow
@pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")
def test_module_compiles_fullgraph():
    shapes = [(4, (3, 3)), (6, (2, 2))]
    model = Propagator(shapes)
    compiled = torch.compile(model, fullgraph=True)
    latents = [torch.randn(2, d, *s) for d, s in shapes]
    tau = torch.rand(2)
    out = compiled(latents, tau)
    assert_close_levels(out, model(latents, tau))
    sum(o.square().sum() for o in out).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(o.square().sum() for o in model(latents, tau)).backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def _valid():
    latents = [torch.randn(3, 4, 5, 5), torch.randn(3, 6, 2)]
    alphas, betas = [torch.zeros(2, 5, 5), torch.zeros(3)], [torch.ones(2, 5, 5), torch.ones(3)]
    return latents, alphas, betas, torch.rand(3)


ERRORS = {
    "empty": (lambda z, a, b, t: ([], [], [], t), "empty list of levels"),
    "odd d": (lambda z, a, b, t: ([torch.randn(3, 5, 2), *z[1:]], a, b, t), r"level 0 latent \(3, 5, 2\).*d even"),
    "batch": (lambda z, a, b, t: ([z[0], z[1][:2]], a, b, t), "level 1 batch 2 differs from level 0's 3"),
    "tau shape": (lambda z, a, b, t: (z, a, b, torch.rand(2)), r"tau \(2,\) must be \(\) or \(B,\) = \(3,\)"),
    "param shape": (lambda z, a, b, t: (z, [a[0], a[1][:2]], b, t), r"level 1 alpha \(2,\) and beta \(3,\)"),
    "beta shape": (lambda z, a, b, t: (z, a, [b[0][:1], b[1]], t), "level 0 alpha .* and beta"),
    "list lengths": (lambda z, a, b, t: (z, a[:1], b, t), "2 latents but 1 alphas and 2 betas"),
    "mixed devices": (lambda z, a, b, t: (z, [a[0].to("meta"), a[1]], b, t), "level 0 alpha is on meta"),
    "tau device": (lambda z, a, b, t: (z, a, b, t.to("meta")), "tau is on meta"),
    "dtype": (lambda z, a, b, t: ([z[0], z[1].double()], a, b, t), "level 1 latent dtype torch.float64"),
}


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("error", ERRORS)
def test_clear_errors(error, backend):
    make, message = ERRORS[error]
    with pytest.raises(ValueError, match=message):
        spectral_propagate(*make(*_valid()), backend=backend)


def test_reference_convention_is_counter_clockwise_rotation_and_scaling():
    """Pair (2k, 2k+1) = complex number x + i y, multiplied by exp((alpha + i beta) tau)."""
    z = torch.tensor([[1.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    alpha, beta = (
        torch.tensor([math.log(2), 0.0], dtype=torch.float64),
        torch.tensor([math.pi / 2, math.pi], dtype=torch.float64),
    )
    (out,) = spectral_propagate([z], [alpha], [beta], 1.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 0.0, -2.0]], dtype=torch.float64))


AOT_TRITON = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import hkd.kernels.spectral as k
target = GPUTarget("cuda", 90, 32)
for store, compute in (("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
    z, c = "*" + store, "*" + compute
    sig = {"tau": c, "tau_stride": "i32", "B": "i32"}
    for l in range(4):
        sig.update({f"z{l}": z, f"out{l}": z, f"alpha{l}": c, f"beta{l}": c, f"pairs{l}": "i32", f"P{l}": "i32",
                    f"pk{l}": "i32", f"pp{l}": "i32"})
        if l:
            sig[f"first{l}"] = "i32"
    sig["BLOCK"] = "constexpr"
    triton.compile(ASTSource(fn=k._forward_kernel, signature=sig, constexprs={"BLOCK": k.FORWARD_BLOCK}), target=target)
    for need_latents, need_terms in ((True, True), (True, False), (False, True)):
        sig = {"tau": c, "tau_stride": "i32", "B": "i32", "tau_partial": c}
        for l in range(4):
            sig.update({f"z{l}": z, f"g{l}": z, f"gz{l}": z, f"alpha{l}": c, f"beta{l}": c, f"ga{l}": c, f"gb{l}": c,
                        f"pairs{l}": "i32", f"P{l}": "i32", f"pk{l}": "i32", f"pp{l}": "i32"})
            if l:
                sig[f"first{l}"] = "i32"
        sig.update(NEED_LATENTS="constexpr", NEED_TERMS="constexpr", BLOCK="constexpr")
        constexprs = {"NEED_LATENTS": need_latents, "NEED_TERMS": need_terms, "BLOCK": k.BACKWARD_BLOCK}
        triton.compile(ASTSource(fn=k._backward_kernel, signature=sig, constexprs=constexprs), target=target)
    print("ok", store)
"""


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.skipif(not _backend.triton_installed(), reason="triton not installed")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs the kernels' logic; this lowers them to GPU code (sm_90, every dtype and backward mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", AOT_TRITON], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


# --- CUDA (run when a GPU machine is lent) ---------------------------------------------------------------------

GPU_BACKENDS = ["cuda", pytest.param("triton", marks=pytest.mark.triton)]


def _gpu_usable(backend):
    return torch.cuda.is_available() and _backend.usable(backend, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_gpu_matches_reference_float64(backend, case):
    if not _gpu_usable(backend):
        pytest.skip(f"{backend} not usable on this GPU machine")
    levels, batch, per_position, per_sample_tau = case
    problem = random_problem(levels, batch, per_position=per_position, per_sample_tau=per_sample_tau, device="cuda")
    out = spectral_propagate(*problem, backend=backend)
    assert_close_levels(out, reference.spectral_propagate(*problem), rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_reduced_precision(backend, dtype):
    if not _gpu_usable(backend):
        pytest.skip(f"{backend} not usable on this GPU machine")
    latents, alphas, betas, tau = random_problem(
        3, 33, per_position=True, per_sample_tau=True, dtype=dtype, device="cuda"
    )
    out = spectral_propagate(latents, alphas, betas, tau, backend=backend)
    expected = reference.spectral_propagate([z.double() for z in latents], alphas, betas, tau.double())
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for a, e in zip(out, expected, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * e.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("per_position, per_sample_tau", [(True, True), (False, False)])
def test_gpu_gradcheck(backend, per_position, per_sample_tau):
    if not _gpu_usable(backend):
        pytest.skip(f"{backend} not usable on this GPU machine")
    inputs, levels = gradcheck_inputs(3, 5, per_position, per_sample_tau, small=False)
    inputs = [t.detach().cuda().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(as_op(backend, levels), inputs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_opcheck(backend):
    if not _gpu_usable(backend):
        pytest.skip(f"{backend} not usable on this GPU machine")
    from hkd.ops.spectral import _triton_ops

    op = torch.ops.hkd.spectral_propagate.default if backend == "cuda" else _triton_ops()[0]
    latents, alphas, betas, tau = random_problem(2, 3, per_position=True, per_sample_tau=True, device="cuda")
    torch.library.opcheck(op, ([z.requires_grad_() for z in latents], alphas, betas, tau))
