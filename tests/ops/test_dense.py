"""hkd.ops.dense_propagate: the action and per-sample-expm algorithms on every backend against expm(tau A) z in
float64, gradients (latents, generators, tau), custom-op integration, clear errors."""

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers.backends import CPU, CUDA_OK, HOST_BACKENDS

from hkd.ops import _backend, dense, dense_plan, dense_propagate, reference


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
    tau = (torch.tensor([0.0, 0.3, -2.0, 9.0], dtype=torch.float64) * 3).requires_grad_()
    plan = dense_plan.dense_action_plan(A.detach(), tau.detach(), P)
    steps = dense_plan.action_substeps(tau.detach(), int(plan[0]), float(plan[1]))
    assert len(set(steps.tolist())) >= 3 and steps.max() > 2  # samples take different numbers of substeps
    g = torch.randn(B, d, P, dtype=torch.float64)
    expected = torch.autograd.grad(dense.taylor_action(z, A, tau, plan), (z, A, tau), g)
    actual = dense.taylor_action_backward(g, z.detach(), A.detach(), tau.detach(), plan)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


CPU_ONLY = pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")


def layout(t, kind):
    """t as it is, with the same values in a non-contiguous layout, or its first sample expanded over the batch."""
    if kind == "non-contiguous":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "expanded":
        return t[:1].expand(t.shape)
    return t


def fused_backward(backend):
    """The fused reverse of the action on `backend` (the C++ op, or the Triton kernels under the interpreter)."""
    if not _backend.usable(backend, CPU):
        pytest.skip(f"backend {backend} not usable here")
    if backend == "cpu":
        return torch.ops.hkd.dense_action_backward
    from hkd.kernels import dense as kernels

    return kernels.action_backward


FUSED = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


def recurrence_inputs(per_position: bool, P: int, kind: str):
    """Fresh float64 (z, A, tau, upstream gradient, plan) for the action's backward tests, in layout `kind`: five
    samples whose taus take different numbers of substeps (one shared tau when expanded)."""
    B, d = 5, 6
    z = layout(torch.randn(B, d, P, dtype=torch.float64), kind)
    A = torch.randn((P, d, d) if per_position else (d, d), dtype=torch.float64)
    A = A.mT if kind == "non-contiguous" else A
    tau = torch.tensor([0.0, 0.4, -2.5, 9.0, 27.0], dtype=torch.float64)
    tau = tau[:1].expand(B) if kind == "expanded" else tau
    g = layout(torch.randn(B, d, P, dtype=torch.float64), kind)
    plan = dense_plan.dense_action_plan(A, tau, P)
    return z, A, tau, g, plan


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("per_position, P", [(False, 1), (False, 4), (True, 3), (True, 1)])
@pytest.mark.parametrize("kind", ["contiguous", "non-contiguous", "expanded"])
def test_fused_backward_is_the_reverse_of_the_recurrence(backend, per_position, P, kind):
    """The fused dense action backward against float64 autograd through the plain-PyTorch recurrence (taylor_action),
    on fresh inputs in several layouts, with samples taking different numbers of substeps (row and column mode)."""
    backward = fused_backward(backend)
    z, A, tau, g, plan = recurrence_inputs(per_position, P, kind)
    if kind != "expanded":
        assert len(set(dense_plan.action_substeps(tau, int(plan[0]), float(plan[1])).tolist())) >= 3
    leaves = [t.detach().clone().requires_grad_() for t in (z, A, tau)]
    expected = torch.autograd.grad(dense.taylor_action(*leaves, plan), leaves, g)
    actual = backward(g, z, A, tau, plan)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(0, 4, 3), (3, 4, 0), (2, 0, 3)])
def test_fused_backward_of_empty_inputs(backend, shape):
    backward = fused_backward(backend)
    B, d, P = shape
    z, A, tau = torch.randn(shape), torch.randn(d, d), torch.rand(B)
    plan = dense_plan.dense_action_plan(A, tau, P)
    grad_z, grad_A, grad_tau = backward(torch.randn(shape), z, A, tau, plan)
    assert grad_z.shape == shape and grad_A.shape == (d, d) and grad_tau.shape == (B,)
    assert not grad_A.any() and not grad_tau.any()


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backward_float32_matches_float64(backend):
    backward = fused_backward(backend)
    B, d, P = 64, 16, 1
    A = torch.randn(d, d, dtype=torch.float64) / math.sqrt(d) * 3
    z, tau, g = torch.randn(B, d, P, dtype=torch.float64), torch.rand(B, dtype=torch.float64) * 4, torch.randn(B, d, P)
    plan = dense_plan.dense_action_plan(A.float(), tau.float(), P)
    leaves = [t.clone().requires_grad_() for t in (z, A, tau)]
    reference_action = dense.taylor_action(*leaves, dense_plan.dense_action_plan(A, tau, P))
    expected = torch.autograd.grad(reference_action, leaves, g.double())
    actual = backward(g, z.float(), A.float(), tau.float(), plan)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == torch.float32
        assert float((a.double() - e).norm() / e.norm()) <= 1e-5


@CPU_ONLY
@pytest.mark.parametrize("per_position, P", [(False, 1), (False, 4), (True, 3), (True, 1)])
@pytest.mark.parametrize("kind", ["contiguous", "non-contiguous", "expanded"])
def test_recorded_forward_and_backward(per_position, P, kind):
    """dense_action_record gives dense_action's result and a record of its Taylor terms; the backward that reads it
    gives the gradients of the one that runs the recurrence again, and both those of float64 autograd through the
    plain-PyTorch recurrence, on fresh inputs in several layouts, samples taking different numbers of substeps."""
    z, A, tau, g, plan = recurrence_inputs(per_position, P, kind)
    out, record, terms = torch.ops.hkd.dense_action_record(z, A, tau, plan)
    assert torch.equal(out, torch.ops.hkd.dense_action(z, A, tau, plan))
    steps = dense_plan.action_substeps(tau, int(plan[0]), float(plan[1]))
    assert terms.dtype == torch.int32 and terms.numel() == int(steps.sum()) * P  # a count per vector and substep
    assert record.numel() == terms.numel() * (int(plan[0]) + 1) * z.shape[1]
    assert 1 <= int(terms.min()) and int(terms.max()) <= int(plan[0])
    recorded = torch.ops.hkd.dense_action_backward(g, z, A, tau, plan, record, terms)
    again = torch.ops.hkd.dense_action_backward(g, z, A, tau, plan)
    leaves = [t.detach().clone().requires_grad_() for t in (z, A, tau)]
    expected = torch.autograd.grad(dense.taylor_action(*leaves, plan), leaves, g)
    for r, a, e in zip(recorded, again, expected, strict=True):
        assert r.shape == e.shape
        torch.testing.assert_close(r, a, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(r, e, rtol=1e-11, atol=1e-11)


@CPU_ONLY
def test_recorded_backward_float32_and_what_it_refuses():
    B, d, P = 64, 16, 1
    A = torch.randn(d, d, dtype=torch.float64) / math.sqrt(d) * 3
    z, tau, g = torch.randn(B, d, P, dtype=torch.float64), torch.rand(B, dtype=torch.float64) * 4, torch.randn(B, d, P)
    plan = dense_plan.dense_action_plan(A.float(), tau.float(), P)
    _, record, terms = torch.ops.hkd.dense_action_record(z.float(), A.float(), tau.float(), plan)
    actual = torch.ops.hkd.dense_action_backward(g, z.float(), A.float(), tau.float(), plan, record, terms)
    leaves = [t.clone().requires_grad_() for t in (z, A, tau)]
    reference_action = dense.taylor_action(*leaves, dense_plan.dense_action_plan(A, tau, P))
    expected = torch.autograd.grad(reference_action, leaves, g.double())
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == torch.float32
        assert float((a.double() - e).norm() / e.norm()) <= 1e-5
    args = (g, z.float(), A.float(), tau.float(), plan)
    with pytest.raises(RuntimeError, match="both or neither"):
        torch.ops.hkd.dense_action_backward(*args, record, None)
    with pytest.raises(RuntimeError, match="not dense_action_record's"):
        torch.ops.hkd.dense_action_backward(*args, record[1:], terms)
    with pytest.raises(RuntimeError, match="not dense_action_record's"):
        torch.ops.hkd.dense_action_backward(*args, record.double(), terms)


@CPU_ONLY
@pytest.mark.parametrize("shape", [(0, 4, 3), (3, 4, 0), (2, 0, 3)])
def test_recorded_forward_of_empty_and_non_finite_inputs(shape):
    B, d, P = shape
    z, A, tau = torch.randn(shape), torch.randn(d, d), torch.rand(B)
    plan = dense_plan.dense_action_plan(A, tau, P)
    out, record, terms = torch.ops.hkd.dense_action_record(z, A, tau, plan)
    assert out.shape == shape and record.numel() == 0 and terms.numel() == 0
    grads = torch.ops.hkd.dense_action_backward(torch.randn(shape), z, A, tau, plan, record, terms)
    assert [t.shape for t in grads] == [shape, (d, d), (B,)]
    A = torch.full((4, 4), math.nan)
    out, record, terms = torch.ops.hkd.dense_action_record(torch.randn(2, 4, 1), A, torch.rand(2), plan)
    assert out.isnan().all() and record.numel() == 0 and terms.numel() == 0


@CPU_ONLY
def test_dense_propagate_records_only_for_autograd():
    """With gradients to compute, the CPU action runs its recording twin (the backward then reads the terms); without
    them, the plain op (no record kept). One position per sample: the planner then prefers the action to one expm per
    sample for any draw of A and tau, which this test needs."""
    z, A, tau = torch.randn(4, 5, 1), torch.randn(5, 5) / 3, torch.rand(4)
    assert dense_plan.dense_action_plan(A, tau, 1)[2] == 1
    with torch.profiler.profile() as prof:
        dense_propagate([z], [A], tau, backend="cpu")
        dense_propagate([z.requires_grad_()], [A], tau, backend="cpu")[0].sum().backward()
    calls = [e.name for e in prof.events() if e.name.startswith("hkd::dense_action")]
    assert calls.count("hkd::dense_action") == 1 and calls.count("hkd::dense_action_record") == 1
    assert calls.count("hkd::dense_action_backward") == 1


@CPU_ONLY
@pytest.mark.parametrize("per_position", [False, True])
def test_gradgradcheck(per_position):
    """Double backward (the differentiable plain-PyTorch reverse under create_graph), both algorithms."""
    latents, generators, tau = random_problem(3, per_position=per_position, per_sample_tau=True, levels=1, d_max=3)
    inputs = (latents[0].requires_grad_(), generators[0].requires_grad_(), tau.requires_grad_())
    assert torch.autograd.gradgradcheck(lambda z, A, t: dense_propagate([z], [A], t, backend="cpu")[0], inputs)
    M = lambda z, A, t: torch.bmm(dense.expm(t[:, None, None] * A, backend="cpu"), z)  # noqa: E731
    if not per_position:
        assert torch.autograd.gradgradcheck(M, (inputs[0].flatten(2), inputs[1], inputs[2]))


@CPU_ONLY
@pytest.mark.parametrize("kind", ["gaussian 60", "non-normal"])
def test_per_sample_expm_goes_to_float64_at_large_norms(kind):
    """At ||tau_b A||_1 beyond 16 theta_30 (more than 4 squarings) the per-sample expm of float32 matrices runs in
    float64: its error is then that of the float32 rounding of the inputs and the result, not of the squarings. It
    stays within a small factor of the float64 reference's own sensitivity, and below the float32 expm's."""
    from hkd import bench

    B, d, P = 16, 16, 32
    A64 = bench.dense_generator(kind, d)
    A, z, tau = A64.float(), torch.randn(B, d, P), torch.rand(B) * 80
    plan = dense_plan.dense_action_plan(A, tau, P)
    assert plan[2] == -1 and dense_plan.reference_plan(A, tau, P)[2] == -1
    assert dense_plan.dense_action_plan(A, tau / 1000, P)[2] >= 0  # small norms stay in float32
    expected = exact([z], [A.double()], tau.double())[0]  # from the float32 inputs, exactly
    out = dense_propagate([z], [A], tau, backend="cpu")[0]
    narrow = torch.bmm(dense.expm(tau[:, None, None] * A, backend="cpu"), z)
    err = [float((y.double() - expected).norm() / expected.norm()) for y in (out, narrow)]
    assert err[0] <= 1e-6 and err[0] < err[1] / 3, err


@CPU_ONLY
def test_plan_in_cpp_matches_python():
    """dense_action_plan (C++) and reference_plan (Python) give the same degree and choice of algorithm and the same
    alpha (to rounding: the norms are summed in another order), and the Taylor tables of csrc/dense.h and
    hkd/ops/dense.py are the same numbers."""
    for dtype in (torch.float32, torch.float64):
        assert torch.ops.hkd.dense_theta(dtype).tolist() == list(dense_plan.THETA[dtype])
    d = 24
    cases = {
        "gaussian": torch.randn(d, d) / 5,
        "large": torch.randn(d, d) * 3,
        "nilpotent": torch.triu(torch.randn(d, d), 1) * 3,
        "per-position": torch.randn(3, d, d) / 4,
        "zero": torch.zeros(d, d),
        "empty": torch.zeros(0, 0),
        "nan": torch.full((d, d), math.nan),
    }
    taus = {"small": torch.rand(16) * 0.1, "wide": torch.rand(256) * 80 - 40, "zero": torch.zeros(4)}
    taus["none"] = torch.zeros(0)
    for name, A in cases.items():
        for tau_name, tau in taus.items():
            for dtype in (torch.float32, torch.float64):
                for positions in (3,) if A.dim() == 3 else (1, 64):
                    a, t = A.to(dtype), tau.to(dtype)
                    cpp = dense_plan.dense_action_plan(a, t, positions)
                    python = dense_plan.reference_plan(a, t, positions)
                    assert cpp[0] == python[0] and cpp[2] == python[2], (name, tau_name, cpp, python)
                    torch.testing.assert_close(cpp[1], python[1], rtol=1e-12, atol=0, equal_nan=True)


def test_cost_model_picks_the_cheaper_algorithm():
    # per-sample expm costs ~B (cost(m) + s) 2 d^3, the action m s 2 d^2 B P: d large with P = 1 favours the action,
    # many positions per sample favour one expm per sample
    for (B, d, P), choice in {(256, 256, 1): "action", (256, 64, 64): "expm", (64, 32, 1024): "expm"}.items():
        A = torch.randn(d, d)
        A *= 3 / torch.linalg.matrix_norm(A, ord=1)
        tau = torch.rand(B)
        m, alpha, action = dense_plan.dense_action_plan(A, tau, P).tolist()
        assert dense_plan.choose_algorithm(A, tau, P, int(m), alpha) == choice
        assert action == (choice == "action")


def plain_plan(A, tau_max, dtype):
    """The plan from ||tau A||_1 alone: (m, s) minimising m s with ||tau A||_1 / s <= theta_m."""
    norm = tau_max * float(torch.linalg.matrix_norm(A.double(), ord=1).max())
    theta = dense_plan._theta(dtype)[: dense_plan.ACTION_MAX_DEGREE[dtype]]
    return min((m * max(1, math.ceil(norm / t)), m) for m, t in enumerate(theta, start=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plan_from_the_powers_of_A(dtype):
    """alpha_p = max(d_p, d_{p+1}) <= ||A||_1: never more terms than the plan from the norm, far fewer when A's powers
    shrink faster than its norm (a strictly triangular A is nilpotent; randn / 16 has spectral radius ~1, norm ~15)."""
    d = 64
    cases = {
        "gaussian": torch.randn(d, d) / 16,
        "nilpotent": torch.triu(torch.randn(d, d), 1) * 3,
        "normal": torch.linalg.qr(torch.randn(d, d))[0] * 3,
        "zero": torch.zeros(d, d),
    }
    for name, A in cases.items():
        A = A.to(dtype)
        m, alpha = dense_plan.action_plan(A, 2.0, 256, dtype)
        cost = m * int(dense_plan.action_substeps(torch.tensor([2.0], dtype=dtype), m, alpha))
        plain, _ = plain_plan(A, 2.0, dtype)
        assert cost <= plain, name
        assert alpha <= float(torch.linalg.matrix_norm(A.double(), ord=1)) * (1 + 1e-12), name
        if name in ("gaussian", "nilpotent"):
            assert cost <= plain / 2, (name, cost, plain)
    # a power costs d^3, d / columns Taylor terms: with few columns the plan keeps to ||A||_1
    A = torch.randn(d, d) / 16
    norm = float(torch.linalg.matrix_norm(A.double(), ord=1))
    assert dense_plan.action_plan(A, 2.0, 4, torch.float32)[1] == pytest.approx(norm)
    assert dense_plan.action_plan(A, 2.0, 4096, torch.float32)[1] < norm / 2


def test_substeps_per_sample_and_non_finite():
    tau = torch.tensor([0.0, -1.0, 2.5, math.nan, math.inf])
    m, alpha = 10, 3.0
    s = dense_plan.action_substeps(tau, m, alpha)
    theta = dense_plan._theta(torch.float32)[m - 1]
    assert s.tolist() == [1, math.ceil(3 / theta), math.ceil(7.5 / theta), 1, dense_plan.MAX_SUBSTEPS]


def test_squarings_are_ceil_log2():
    x = [0.0, 0.3, 0.5, 1.0, 1.0 + 2**-52, 2.0, 3.0, 4.5, 2.0**63 + 2**11, 2.0**70, math.inf, math.nan]
    expected = [0, 0, 0, 0, 1, 1, 2, 3, 64, 64, 64, math.nan]
    actual = dense_plan.squarings(torch.tensor(x, dtype=torch.float64))
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), equal_nan=True)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("per_position, P", [(False, 1), (False, 7), (True, 3)])
def test_each_vector_stops_on_its_own(backend, per_position, P):
    """The convergence test is per vector z[b, :, p]: a vector 1e-30 times smaller than the others is as accurate as
    they are (a test on the whole batch would stop its series 30 orders of magnitude too early), a batch gives each
    vector what it gets alone, and zero vectors and tau = 0 come back unchanged."""
    B, d = 6, 5
    z = torch.randn(B, d, P, dtype=torch.float64)
    z[1] = 0
    z[3] *= 1e-30
    A = torch.randn((P, d, d) if per_position else (d, d), dtype=torch.float64)
    tau = torch.tensor([0.0, 1.0, -3.0, 0.5, 6.0, 1e-9], dtype=torch.float64)
    plan = dense_plan.dense_action_plan(A, tau, P)
    out = dense._action(z, A, tau, backend, plan)
    assert torch.equal(out[0], z[0]) and torch.equal(out[1], z[1])
    expected = exact([z], [A], tau)[0]
    bound = 1e-13 * 6 * float(torch.linalg.matrix_norm(A, ord=1).max())
    for b in (2, 3, 4, 5):
        assert float((out[b] - expected[b]).norm() / expected[b].norm()) <= bound, b
        alone = dense._action(z[b : b + 1], A, tau[b : b + 1], backend, plan)
        assert float((out[b] - alone[0]).norm() / alone.norm()) <= 1e-14, b


def test_the_series_stops_early_when_converged():
    """A substep stops once its terms are negligible: a tiny step needs few of the plan's terms."""
    A = torch.randn(8, 8, dtype=torch.float64)
    x = torch.randn(3, 8, 1, dtype=torch.float64)
    for h, most in ((1e-12, 3), (1e-4, 6)):
        record: list = []
        dense._substep(A, x, torch.full((3, 1, 1), h, dtype=torch.float64), 55, record)
        assert len(record) <= most
    record = []
    dense._substep(A, x, torch.full((3, 1, 1), 2.0, dtype=torch.float64), 55, record)
    assert 10 < len(record) < 55


@pytest.mark.skipif(not _backend.usable("cpu", CPU), reason="hkd._C not built")
@pytest.mark.parametrize("per_position", [False, True])
def test_flush_to_zero_keeps_float32_accurate_and_is_restored(per_position):
    """Long series in float32 push late terms below 1e-38 (subnormal): the CPU kernels flush them to zero on their
    threads, which must not cost accuracy, and must leave the caller's floating-point mode as it was."""
    d, B, P = 32, 64, 2
    A = torch.randn((P, d, d) if per_position else (d, d), dtype=torch.float64) / math.sqrt(d) * 4
    z = torch.randn(B, d, P, dtype=torch.float64) * 1e-30  # tiny states: the terms underflow early
    tau = torch.rand(B, dtype=torch.float64) * 10
    expected = exact([z], [A], tau)[0]
    out = dense._action(z.float(), A.float(), tau.float(), "cpu")
    assert float((out.double() - expected).norm() / expected.norm()) <= 1e-5
    assert float(torch.tensor([1e-37], dtype=torch.float32) / 100) > 0  # this thread still computes subnormals


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
    plan = dense_plan.dense_action_plan(A.detach(), tau.detach(), P)
    torch.library.opcheck(torch.ops.hkd.dense_action.default, (z, A, tau, plan))
    g = torch.randn(B, d, P, dtype=torch.float64)
    args = (g, z.detach(), A.detach(), tau.detach(), plan)
    torch.library.opcheck(torch.ops.hkd.dense_action_backward.default, args)
    torch.library.opcheck(torch.ops.hkd.dense_action_plan.default, (A.detach(), tau.detach(), P))
    torch.library.opcheck(torch.ops.hkd.dense_action_record.default, (z, A, tau, plan))
    _, record, terms = torch.ops.hkd.dense_action_record(z.detach(), A.detach(), tau.detach(), plan)
    torch.library.opcheck(torch.ops.hkd.dense_action_backward.default, (*args, record, terms))


@pytest.mark.triton
@pytest.mark.skipif(not _backend.usable("triton", CPU), reason="triton not installed or not interpreted")
def test_opcheck_triton():
    z = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    tau = torch.rand(2, dtype=torch.float64, requires_grad=True)
    plan = dense_plan.dense_action_plan(A.detach(), tau.detach(), 2)
    utils = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(dense._triton_ops()[1], (z, A, tau, plan), test_utils=utils)


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
import hkd.kernels.dense as k
target = GPUTarget("cuda", 90, 32)
for dt in ("fp32", "fp64"):
    ptr = "*" + dt
    sig = {"a_ptr": ptr, "out_ptr": ptr, "s_ptr": "*i32", "n": "i32", "BLOCK": "constexpr"}
    triton.compile(ASTSource(fn=k._expm16_kernel, signature=sig, constexprs={"BLOCK": 64}), target=target)
    for row_mode in (True, False):
        sig = {"z_ptr": ptr, "a_ptr": ptr, "tau_ptr": ptr, "steps_ptr": "*i32", "plan_ptr": "*fp64", "out_ptr": ptr,
               "B": "i32", "d": "i32", "P": "i32", "unit_roundoff": "fp64", "ROW_MODE": "constexpr",
               "SHARED": "constexpr", "AXIS": "constexpr", "BLOCK_D": "constexpr", "BLOCK": "constexpr"}
        constexprs = {"ROW_MODE": row_mode, "SHARED": not row_mode, "AXIS": int(row_mode), "BLOCK_D": 64, "BLOCK": 32}
        triton.compile(ASTSource(fn=k._action_kernel, signature=sig, constexprs=constexprs), target=target)
        sig = {"z_ptr": ptr, "a_ptr": ptr, "tau_ptr": ptr, "steps_ptr": "*i32", "plan_ptr": "*fp64", "g_ptr": ptr,
               "grad_z_ptr": ptr, "grad_a_ptr": ptr, "grad_h_ptr": ptr, "work_ptr": ptr, "B": "i32", "d": "i32",
               "P": "i32", "slots": "i32", "unit_roundoff": "fp64", "ROW_MODE": "constexpr", "SHARED": "constexpr",
               "AXIS": "constexpr", "BLOCK_D": "constexpr", "BLOCK": "constexpr"}
        triton.compile(ASTSource(fn=k._action_backward_kernel, signature=sig, constexprs=constexprs), target=target)
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
