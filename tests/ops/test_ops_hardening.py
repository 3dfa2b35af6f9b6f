"""The ops under hostile inputs: every argument strided, expanded, sliced or channels_last on every backend (forward
and backward against the float64 reference), huge float32 angles, double backward, and bad dtypes and values."""

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hkd.ops import _backend, dense_propagate, expm, reference, spectral_propagate

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]


def backends(device):
    """Every backend usable for `device` here (the Triton interpreter on the CPU)."""
    names = ("reference", "cpu", "triton") if device.type == "cpu" else ("cuda", "triton")
    marks = {"triton": [pytest.mark.triton]}
    return [
        pytest.param(b, device, marks=[*marks.get(b, []), *([pytest.mark.cuda] if device.type == "cuda" else [])])
        for b in names
        if _backend.usable(b, device) or device.type == "cuda"
    ]


BACKENDS = backends(CPU) + backends(torch.device("cuda"))


def skip_unusable(backend, device):
    if not _backend.usable(backend, device):
        pytest.skip(f"backend {backend} not usable for {device.type} here")


# --- strides: every tensor argument in every layout ---------------------------------------------------------------
B, D, H, W = 3, 4, 3, 5


def layouts(make):
    """Views with the values of make(shape) in non-contiguous layouts: name -> function(shape) -> (leaf, view)."""

    def sliced(shape):  # every other element of the last axis, with a storage offset
        leaf = make((*shape[:-1], 2 * shape[-1] + 1)).requires_grad_()
        return leaf, leaf[..., 1::2]

    def expanded(shape):  # stride 0 along the first axis
        leaf = make((1, *shape[1:])).requires_grad_()
        return leaf, leaf.expand(shape)

    def transposed(shape):  # (a 1-d tensor: a column of a row-major matrix)
        if len(shape) == 1:
            leaf = make((*shape, 3)).requires_grad_()
            return leaf, leaf[:, 1]
        leaf = make(shape[::-1]).requires_grad_()
        return leaf, leaf.permute(*reversed(range(len(shape))))

    def channels_last(shape):  # (3-d: the last two axes swapped in memory)
        if len(shape) == 1:
            pytest.skip("no channels_last layout for a 1-d tensor")
        leaf = make(shape).requires_grad_()
        return leaf, (leaf.to(memory_format=torch.channels_last) if len(shape) == 4 else leaf.mT.contiguous().mT)

    return {"sliced": sliced, "expanded": expanded, "transposed": transposed, "channels_last": channels_last}


def spectral_problem(device):
    f64 = dict(dtype=torch.float64, device=device)
    return {
        "latent": lambda s: torch.randn(s, **f64),
        "alpha": lambda s: torch.randn(s, **f64) * 0.05,
        "beta": lambda s: torch.randn(s, **f64),
        "tau": lambda s: torch.rand(s, **f64) * 20 - 10,
    }


SHAPES = {"latent": (B, D, H, W), "alpha": (D // 2, H, W), "beta": (D // 2, H, W), "tau": (B,)}


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("argument", ["latent", "alpha", "beta", "tau"])
@pytest.mark.parametrize("layout", ["sliced", "expanded", "transposed", "channels_last"])
def test_spectral_honours_strides(backend, device, argument, layout):
    skip_unusable(backend, device)
    make = spectral_problem(device)
    leaves, args = {}, {}
    for name, shape in SHAPES.items():
        if name == argument:
            leaves[name], args[name] = layouts(make[name])[layout](shape)
            assert args[name].shape == shape and not args[name].is_contiguous()
        else:
            leaves[name] = args[name] = make[name](shape).requires_grad_()
    second = [make["latent"]((B, 2, 7)).requires_grad_()]  # a second level with shared parameters
    params = [make["alpha"]((1,)), make["beta"]((1,))]

    def run(b, contiguous):
        c = (lambda t: t.contiguous()) if contiguous else (lambda t: t)
        return spectral_propagate(
            [c(args["latent"]), *second], [c(args["alpha"]), params[0]], [c(args["beta"]), params[1]],
            c(args["tau"]), backend=b,
        )  # fmt: skip

    out, expected = run(backend, False), run("reference", True)
    weights = [torch.randn_like(e) for e in expected]
    inputs = [*leaves.values(), *second]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights, strict=True)), inputs)
    ref = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights, strict=True)), inputs)
    for o, e in zip(out, expected, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_spectral_shared_tau_and_parameters_as_views(backend, device):
    """A 0-d tau taken from a larger tensor, and shared parameters sliced with an offset."""
    skip_unusable(backend, device)
    f64 = dict(dtype=torch.float64, device=device)
    z = torch.randn(2, 6, 4, **f64)
    taus, alpha, beta = torch.rand(5, **f64), torch.randn(7, **f64) * 0.1, torch.randn(7, **f64)
    args = ([z], [alpha[1::2]], [beta[4:7]], taus[3])
    out = spectral_propagate(*args, backend=backend)
    expected = reference.spectral_propagate([z], [alpha[1::2].contiguous()], [beta[4:7].contiguous()], taus[3])
    torch.testing.assert_close(out[0], expected[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_spectral_tau_of_the_wrong_length_is_an_error(backend, device):
    skip_unusable(backend, device)
    z, a, b = [torch.randn(3, 4, 2, device=device)], [torch.zeros(2, device=device)], [torch.ones(2, device=device)]
    for tau in (torch.rand(2, device=device), torch.rand(4, device=device), torch.rand(1, device=device)):
        with pytest.raises(ValueError, match="tau"):
            spectral_propagate(z, a, b, tau, backend=backend)


def direct_ops(device):
    """The custom ops themselves, (forward, backward), as a caller might use them without the front."""
    from hkd.ops.spectral import _triton_ops

    ops = []
    if _backend.usable("cpu", device) or _backend.usable("cuda", device):
        ops.append((torch.ops.hkd.spectral_propagate, torch.ops.hkd.spectral_propagate_backward))
    if _backend.usable("triton", device):
        ops.append(_triton_ops())
    return ops


@pytest.mark.parametrize("device", [CPU, pytest.param(torch.device("cuda"), marks=pytest.mark.cuda)])
def test_direct_op_calls_check_tau_and_honour_strides(device):
    """Called without the front, the ops still reject a tau of the wrong length and read strided tensors right."""
    ops = direct_ops(device)
    if not ops:
        pytest.skip("no compiled or Triton op here")
    f64 = dict(dtype=torch.float64, device=device)
    z = torch.randn(2, 8, 4, **f64)[:, ::2]  # (2, 4, 4), strided
    alpha, beta = torch.randn(4, 2, **f64).mT * 0.1, torch.randn(2, 4, **f64)  # transposed and contiguous
    tau = torch.rand(1, **f64).expand(2)  # stride 0
    grads = [torch.randn(2, 4, 4, **f64).mT.contiguous().mT]  # (2, 4, 4), transposed
    expected = reference.spectral_propagate([z], [alpha], [beta], tau.contiguous())
    zr, ar, br, tr = (t.detach().clone().requires_grad_() for t in (z, alpha, beta, tau.contiguous()))
    ref = torch.autograd.grad(reference.spectral_propagate([zr], [ar], [br], tr)[0], (zr, ar, br, tr), grads[0])
    for forward, backward in ops:
        torch.testing.assert_close(forward([z], [alpha], [beta], tau)[0], expected[0], rtol=1e-12, atol=1e-12)
        gz, ga, gb, gt = backward(grads, [z], [alpha], [beta], tau, True, True, True)
        for g, r in zip((gz[0], ga[0], gb[0], gt), ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11)
        for bad in (torch.rand(3, **f64), torch.rand(1, **f64), torch.rand(2, 1, **f64)):
            with pytest.raises((RuntimeError, ValueError), match="tau"):
                forward([z], [alpha], [beta], bad)
            with pytest.raises((RuntimeError, ValueError), match="tau"):
                backward(grads, [z], [alpha], [beta], bad, True, True, True)


# --- float32 angles -----------------------------------------------------------------------------------------------
def float32_angles(magnitude, n=16, device=CPU):
    """n samples of n pairs on the unit circle, tau (n,) in (-1, 1) and beta (1, n) of about `magnitude`."""
    z = torch.nn.functional.normalize(torch.randn(n, 2, n, device=device), dim=1)
    return z, (torch.rand(1, n, device=device) + 0.5) * magnitude, torch.rand(n, device=device) * 2 - 1


def rotate(backend, z, beta, tau):
    """The float32 rotations, and their max error against the float64 rotation by the same float32 angles."""
    out = spectral_propagate([z], [torch.zeros_like(beta)], [beta], tau, backend=backend)[0]
    angle = tau.double()[:, None, None] * beta.double()  # exact: a product of two float32 values
    x, y = z[:, :1].double(), z[:, 1:].double()
    exact = torch.cat((torch.cos(angle) * x - torch.sin(angle) * y, torch.sin(angle) * x + torch.cos(angle) * y), 1)
    return out, (out.double() - exact).abs().max().item()


FAST = [p for p in BACKENDS if p.values[0] != "reference"]


@pytest.mark.parametrize("backend, device", FAST)
@pytest.mark.parametrize("magnitude", [1.0, 1e2, 1e3, 1e4])
def test_float32_angles_stay_accurate_to_1e4(backend, device, magnitude):
    skip_unusable(backend, device)
    _, error = rotate(backend, *float32_angles(magnitude, device=device))
    assert error <= 2e-6


@pytest.mark.parametrize("backend, device", FAST)
def test_float32_angles_degrade_gracefully(backend, device):
    """Up to 1e10 the error stays small; beyond, the rotation still never scales the modulus; NaN stays NaN."""
    skip_unusable(backend, device)
    for magnitude in (1e6, 1e8, 1e10):
        _, error = rotate(backend, *float32_angles(magnitude, device=device))
        assert error <= 1e-4, magnitude
    for magnitude in (1e12, 1e15, 1e20, 1e30, 1e38):
        out, _ = rotate(backend, *float32_angles(magnitude, device=device))
        norms = out.double().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    z = torch.ones(1, 2, 2, device=device)
    out, _ = rotate(backend, z, torch.tensor([[math.inf, math.nan]], device=device), torch.ones(1, device=device))
    assert out.isnan().all()


# --- double backward ----------------------------------------------------------------------------------------------
def spectral_inputs(device, per_position, per_sample_tau):
    """Small (the Triton interpreter runs gradgradcheck's hundreds of calls): B = 2, one pair, 3 positions."""
    f64 = dict(dtype=torch.float64, device=device)
    z = torch.randn(2, 2, 3, **f64)
    shape = (1, 3) if per_position else (1,)
    alpha, beta = torch.randn(shape, **f64) * 0.3, torch.randn(shape, **f64)
    tau = torch.rand((2,) if per_sample_tau else (), **f64) + 0.5
    return [t.requires_grad_() for t in (z, alpha, beta, tau)]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("per_position, per_sample_tau", [(True, True), (False, False), (False, True)])
def test_spectral_double_backward(backend, device, per_position, per_sample_tau):
    """gradgradcheck (fast mode, random projections, for the slow Triton interpreter)."""
    skip_unusable(backend, device)
    inputs = spectral_inputs(device, per_position, per_sample_tau)
    fn = lambda z, a, b, t: spectral_propagate([z], [a], [b], t, backend=backend)[0]
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_spectral_double_backward_is_not_zero(backend, device):
    """The Hessian-vector product of a loss through the op matches the reference's (no silent zeros)."""
    skip_unusable(backend, device)
    results = []
    for b in (backend, "reference"):
        torch.manual_seed(0)
        z, a, w, t = spectral_inputs(device, True, True)
        out = spectral_propagate([z], [a], [w], t, backend=b)[0]
        (gz, ga) = torch.autograd.grad(out.square().sum(), (z, a), create_graph=True)
        results.append(torch.autograd.grad((gz.square().sum() + ga.square().sum()), (z, a, w, t)))
    for g, r in zip(*results, strict=True):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_expm_double_backward(backend, device):
    skip_unusable(backend, device)
    A = (torch.randn(2, 3, 3, dtype=torch.float64, device=device) * 0.7).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda A: expm(A, backend=backend), (A,), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("per_position, per_sample_tau", [(False, False), (True, True), (False, True)])
def test_dense_double_backward(backend, device, per_position, per_sample_tau):
    skip_unusable(backend, device)
    f64 = dict(dtype=torch.float64, device=device)
    z = torch.randn(2, 3, 2, **f64)
    A = torch.randn(*((2,) if per_position else ()), 3, 3, **f64) * 0.5
    tau = torch.rand((2,) if per_sample_tau else (), **f64) + 0.5
    fn = lambda z, A, t: dense_propagate([z], [A], t, backend=backend)[0]
    inputs = [t.requires_grad_() for t in (z, A, tau)]
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=backend == "triton")


# --- bad dtypes and values: one-line errors; empty shapes: correct results ----------------------------------------
def one_line_error(error, fn):
    with pytest.raises(error) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("per_sample_tau", [False, True])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_dense_non_finite_generator_is_an_error(backend, device, per_sample_tau, value):
    skip_unusable(backend, device)
    A = [torch.randn(4, 4, device=device), torch.randn(2, 2, device=device)]
    A[1][0, 1] = value
    z = [torch.randn(3, 4, 2, device=device), torch.randn(3, 2, device=device)]
    tau = torch.rand(3, device=device) if per_sample_tau else 0.5
    message = one_line_error(ValueError, lambda: dense_propagate(z, A, tau, backend=backend))
    assert "generators[1]" in message and "NaN or infinite" in message


BAD_DENSE = {
    "int64 latents": (lambda: ([torch.ones(2, 3, 4, dtype=torch.int64)], [torch.randn(3, 3)], 0.5), "latents\\[0\\]"),
    "bool latents": (lambda: ([torch.ones(2, 3, dtype=torch.bool)], [torch.randn(3, 3)], 0.5), "latents\\[0\\]"),
    "complex latents": (lambda: ([torch.randn(2, 3, dtype=torch.complex64)], [torch.randn(3, 3)], 0.5), "latents"),
    "int generator": (lambda: ([torch.randn(2, 3)], [torch.ones(3, 3, dtype=torch.int32)], 0.5), "generators\\[0\\]"),
    "complex generator": (lambda: ([torch.randn(2, 3)], [torch.randn(3, 3, dtype=torch.cfloat)], 0.5), "generators"),
    "complex tau": (lambda: ([torch.randn(2, 3)], [torch.randn(3, 3)], torch.rand(2) + 1j), "tau dtype"),
    "python complex tau": (lambda: ([torch.randn(2, 3)], [torch.randn(3, 3)], 0.5 + 0.1j), "tau dtype"),
}


@pytest.mark.parametrize("case", BAD_DENSE)
def test_dense_bad_dtypes_are_one_line_errors(case):
    make, match = BAD_DENSE[case]
    message = one_line_error(ValueError, lambda: dense_propagate(*make()))
    assert __import__("re").search(match, message), message


BAD_SPECTRAL = {
    "int64 latents": lambda z, a, b, t: ([z.long()], [a], [b], t),
    "complex latents": lambda z, a, b, t: ([z.to(torch.cfloat)], [a], [b], t),
    "int alpha": lambda z, a, b, t: ([z], [a.long()], [b], t),
    "complex alpha": lambda z, a, b, t: ([z], [a.to(torch.cfloat)], [b], t),
    "complex beta": lambda z, a, b, t: ([z], [a], [b.to(torch.cdouble)], t),
    "complex tau": lambda z, a, b, t: ([z], [a], [b], t + 1j),
    "python complex tau": lambda z, a, b, t: ([z], [a], [b], 1 + 2j),
    "bool tau": lambda z, a, b, t: ([z], [a], [b], t > 0.5),
}


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case", BAD_SPECTRAL)
def test_spectral_bad_dtypes_are_one_line_errors(case, backend):
    args = BAD_SPECTRAL[case](torch.randn(2, 4, 3), torch.zeros(2), torch.ones(2), torch.rand(2))
    message = one_line_error(ValueError, lambda: spectral_propagate(*args, backend=backend))
    assert "dtype" in message


def test_integer_tau_is_a_number():
    z, a, b = [torch.randn(2, 4, 3)], [torch.zeros(2)], [torch.ones(2)]
    for tau in (1, torch.tensor(1), torch.tensor([1, 2])):
        out = spectral_propagate(z, a, b, tau)[0]
        torch.testing.assert_close(out, reference.spectral_propagate(z, a, b, torch.as_tensor(tau).float())[0])


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_empty_matrices(backend, device):
    """exp of 0 x 0 matrices, and levels with no channels, come back empty (with gradients), on every backend."""
    skip_unusable(backend, device)
    for shape in ((3, 0, 0), (0, 0), (0, 2, 2)):
        A = torch.zeros(shape, device=device, requires_grad=True)
        E = expm(A, backend=backend)
        assert E.shape == shape
        E.sum().backward()
        assert A.grad.shape == shape
    for tau in (0.5, torch.rand(2, device=device)):
        z = torch.zeros(2, 0, 3, device=device)
        assert dense_propagate([z], [torch.zeros(0, 0, device=device)], tau, backend=backend)[0].shape == z.shape
        no_pairs = torch.zeros(0, device=device)
        out = spectral_propagate([z], [no_pairs], [no_pairs], tau, backend=backend)
        assert out[0].shape == z.shape


# --- the build: a CPU-only extension whatever torch is installed --------------------------------------------------
def cmake_command():
    """The CMake that pip's build uses (the cmake package) if installed, else the system's."""
    if importlib.util.find_spec("cmake") is not None:
        return [sys.executable, "-m", "cmake"]
    return [shutil.which("cmake")] if shutil.which("cmake") else None


@pytest.mark.slow
@pytest.mark.skipif(cmake_command() is None, reason="cmake not installed")
def test_cpu_only_build_configures_with_any_torch(tmp_path):
    """HKD_CUDA=off configures without looking for CUDA, even with a CUDA build of torch installed."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    configure = [*cmake_command(), "-S", str(ROOT), "-B", str(tmp_path), "-DHKD_CUDA=off"]
    python = f"-DPython_EXECUTABLE={sys.executable}"
    result = subprocess.run([*configure, python], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "CUDA kernels OFF" in result.stdout
    assert "CMAKE_CUDA_COMPILER:FILEPATH" not in (tmp_path / "CMakeCache.txt").read_text()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("per_position, per_sample_tau", [(False, False), (True, True), (False, True)])
def test_dense_honours_strides(backend, device, per_position, per_sample_tau):
    """Sliced latents, transposed generators, an expanded tau: forward and backward against the reference."""
    skip_unusable(backend, device)
    f64 = dict(dtype=torch.float64, device=device)
    z = torch.randn(2, 6, 2, 3, **f64).requires_grad_()
    A = (torch.randn(*((6,) if per_position else ()), 3, 3, **f64) * 0.5).requires_grad_()
    tau = (torch.rand((1,) if per_sample_tau else (3,), **f64) + 0.5).requires_grad_()
    views = (z[:, ::2], A.mT, tau.expand(2) if per_sample_tau else tau[1])
    out = dense_propagate([views[0]], [views[1]], views[2], backend=backend)[0]
    expected = reference.dense_propagate([views[0].contiguous()], [views[1].contiguous()], views[2].contiguous())[0]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    weight = torch.randn_like(expected)
    grads = torch.autograd.grad((out * weight).sum(), (z, A, tau))
    for g, r in zip(grads, torch.autograd.grad((expected * weight).sum(), (z, A, tau)), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    E = expm(A.mT[..., 1:, 1:], backend=backend)  # a transposed, offset block
    torch.testing.assert_close(E, torch.linalg.matrix_exp(A.mT[..., 1:, 1:].contiguous()), rtol=1e-10, atol=1e-10)
