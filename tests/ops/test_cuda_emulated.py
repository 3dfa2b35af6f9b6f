"""Every __global__ kernel of csrc/cuda/*.cu, run on the CPU by the host emulation (csrc/cuda/emulate), against the
float64 reference, each under several schedules (the order in which a block's threads run between barriers).

The module is built from the source tree on first use (tests/helpers/cuda_emulator.py): editing a .cu file and
re-running these tests tests the edit. benchmarks/planted_faults.py plants faults one at a time and runs this file.
Outputs start as NaN (unwritten device memory), dynamic shared memory as NaN/-1 at each block's start."""

import math

import pytest
import torch
from helpers import cuda_emulator

from hkd.ops import dense, dense_plan, reference

pytestmark = pytest.mark.skipif(cuda_emulator.unavailable() is not None, reason=str(cuda_emulator.unavailable()))
SCHEDULES = list(cuda_emulator.SCHEDULES)


@pytest.fixture(scope="module")
def emu():
    return cuda_emulator.ops()


@pytest.fixture(params=SCHEDULES)
def schedule(request, emu):
    cuda_emulator.configure(request.param)
    yield request.param
    cuda_emulator.configure()


# --- spectral: forward and backward ---------------------------------------------------------------------------------
# (d, spatial, per-position generators) per level. Forward blocks cover 1024 (b, k, p) elements, backward blocks 256
# (k, p) entries: the cases put level boundaries inside the grid, sizes that are not multiples of 32, 256 or 1024
# and sizes that are, B = 1, and batches that split into uneven gridDim.y slices (B // 4 slices at most).
CASES = {
    "levels_B9": (9, [(6, (5, 7), True), (4, (37,), False), (2, (300,), True), (8, (), False)]),
    "exact_blocks_B8": (8, [(2, (16, 16), True), (2, (128,), False), (2, (32,), True)]),
    "B1": (1, [(6, (5, 7), True), (2, (33,), False)]),
    "slices_B13": (13, [(4, (3, 11), True), (2, (40,), False)]),
}
SLICES = {"levels_B9": 2, "exact_blocks_B8": 2, "B1": 1, "slices_B13": 3}
COMPUTE = {torch.float64: torch.float64}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def spectral_problem(batch, levels, dtype, per_sample_tau):
    compute = COMPUTE.get(dtype, torch.float32)
    latents = [torch.randn(batch, d, *spatial).to(dtype) for d, spatial, _ in levels]
    shapes = [(d // 2, *spatial) if per_position else (d // 2,) for d, spatial, per_position in levels]
    alphas = [(0.3 * torch.randn(s)).to(compute) for s in shapes]
    betas = [(2.0 * torch.randn(s)).to(compute) for s in shapes]
    tau = (torch.rand(batch) * 3 - 1).to(compute) if per_sample_tau else torch.tensor(0.7, dtype=compute)
    return latents, alphas, betas, tau


def reference_grads(latents, alphas, betas, tau, grads):
    """The float64 reference's outputs and gradients (of sum(grads * outputs)) at the given (rounded) inputs."""
    inputs = [[t.double().requires_grad_() for t in ts] for ts in (latents, alphas, betas)]
    t64 = tau.double().requires_grad_()
    out = reference.spectral_propagate(*inputs, t64)
    torch.autograd.backward(out, [g.double() for g in grads])
    return [o.detach() for o in out], [[t.grad for t in ts] for ts in inputs], t64.grad


def assert_close(actual, expected, tol, what):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    atol = tol * max(scale, 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def sum_tol(dtype):
    """Gradients of parameters and tau: float32 (or float64) sums over the batch and positions."""
    return 1e-10 if dtype == torch.float64 else 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_sample_tau", [True, False], ids=["tau_per_sample", "tau_shared"])
@pytest.mark.parametrize("case", list(CASES))
def test_spectral_forward_backward(emu, schedule, case, per_sample_tau, dtype):
    batch, levels = CASES[case]
    latents, alphas, betas, tau = spectral_problem(batch, levels, dtype, per_sample_tau)
    grads = [torch.randn_like(z, dtype=torch.float32).to(dtype) for z in latents]
    out = emu.spectral_propagate(latents, alphas, betas, tau)
    expected, (g_z, g_alpha, g_beta), g_tau = reference_grads(latents, alphas, betas, tau, grads)
    for level, (o, e) in enumerate(zip(out, expected, strict=True)):
        assert o.dtype == dtype
        assert_close(o, e, TOL[dtype], f"forward level {level}")
    grad_z, grad_alpha, grad_beta, grad_tau = emu.spectral_propagate_backward(
        grads, latents, alphas, betas, tau, True, True, True
    )
    assert emu.last_launch()[1] == SLICES[case], "the batch slices (gridDim.y) this case is meant to cover"
    for level in range(len(levels)):
        assert_close(grad_z[level], g_z[level], TOL[dtype], f"grad z level {level}")
        assert_close(grad_alpha[level], g_alpha[level], sum_tol(dtype), f"grad alpha level {level}")
        assert_close(grad_beta[level], g_beta[level], sum_tol(dtype), f"grad beta level {level}")
    assert_close(grad_tau, g_tau, sum_tol(dtype), "grad tau")


@pytest.mark.parametrize(
    "need", [(True, False, False), (False, True, False), (False, False, True)], ids=["latents", "params", "tau"]
)
def test_spectral_backward_subsets(emu, schedule, need):
    """The kernel's <Latents, Terms> variants, and the parameter gradients without the tau partials (and back)."""
    latents, alphas, betas, tau = spectral_problem(*CASES["levels_B9"], torch.float32, True)
    grads = [torch.randn_like(z) for z in latents]
    _, (g_z, g_alpha, g_beta), g_tau = reference_grads(latents, alphas, betas, tau, grads)
    grad_z, grad_alpha, grad_beta, grad_tau = emu.spectral_propagate_backward(grads, latents, alphas, betas, tau, *need)
    need_latents, need_params, need_tau = need
    assert len(grad_z) == (len(latents) if need_latents else 0)
    assert len(grad_alpha) == (len(latents) if need_params else 0)
    for level in range(len(latents)):
        if need_latents:
            assert_close(grad_z[level], g_z[level], 1e-5, f"grad z level {level}")
        if need_params:
            assert_close(grad_alpha[level], g_alpha[level], 1e-4, f"grad alpha level {level}")
            assert_close(grad_beta[level], g_beta[level], 1e-4, f"grad beta level {level}")
    if need_tau:
        assert_close(grad_tau, g_tau, 1e-4, "grad tau")


def test_spectral_more_levels_than_one_launch(emu, schedule):
    """17 levels: the glue launches them in groups of kMaxLevels (16), each with its own level table."""
    levels = [(2 * (1 + i % 3), (3 + 7 * i,), i % 2 == 0) for i in range(17)]
    latents, alphas, betas, tau = spectral_problem(5, levels, torch.float32, True)
    grads = [torch.randn_like(z) for z in latents]
    out = emu.spectral_propagate(latents, alphas, betas, tau)
    expected, (g_z, g_alpha, _), g_tau = reference_grads(latents, alphas, betas, tau, grads)
    grad_z, grad_alpha, _, grad_tau = emu.spectral_propagate_backward(grads, latents, alphas, betas, tau, *[True] * 3)
    for level in range(17):
        assert_close(out[level], expected[level], 1e-5, f"forward level {level}")
        assert_close(grad_z[level], g_z[level], 1e-5, f"grad z level {level}")
        assert_close(grad_alpha[level], g_alpha[level], 1e-4, f"grad alpha level {level}")
    assert_close(grad_tau, g_tau, 1e-4, "grad tau")


# --- the 16-bit conversions, bit for bit --------------------------------------------------------------------------
def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def _is_nan16(bits: torch.Tensor, bfloat16: bool) -> torch.Tensor:
    return (bits.view(torch.bfloat16 if bfloat16 else torch.float16)).float().isnan()


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_to_float_matches_torch_on_every_pattern(emu, storage):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    expected = bits.view(storage).float()
    actual = emu.to_compute(bits, storage == torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(_bits(actual[~nan]), _bits(expected[~nan])), "widening is exact (infinities, subnormals, -0)"


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16], ids=str)
def test_float_to_16bit_matches_torch_rounding(emu, storage):
    """Every 16-bit value, the midpoint to its neighbour (ties go to even) and the floats either side of it,
    overflow to infinity, underflow through the subnormals, NaN."""
    patterns = torch.arange(0, 32768, dtype=torch.int32).to(torch.int16)
    values = patterns.view(storage).float()
    finite = values.isfinite()
    below, above = values[finite][:-1].double(), values[finite][1:].double()
    middle = ((below + above) / 2).float()  # exact: one bit more than the 16-bit format has
    special = torch.tensor([math.inf, math.nan, 65504.0, 65519.99, 65520.0, 65536.0, 3.4e38, 2**-25, 2**-26, 1e-40])
    payloads = torch.tensor([0x7F800001, 0x7F80FFFF, 0x7FBF0000, 0x7F810000], dtype=torch.int32).view(torch.float32)
    special = torch.cat([special, payloads])  # NaNs whose payload is only in the low bits (or only in the high)
    inputs = torch.cat([values, middle, middle.nextafter(torch.tensor(0.0)), middle.nextafter(torch.tensor(math.inf)),
                        special, torch.randn(4096) * 1000])  # fmt: skip
    inputs = torch.cat([inputs, -inputs])
    expected = inputs.to(storage).view(torch.int16)
    actual = emu.to_storage(inputs, storage == torch.bfloat16)
    bfloat16 = storage == torch.bfloat16
    nan = _is_nan16(expected, bfloat16)
    assert torch.equal(_is_nan16(actual, bfloat16), nan), "NaN stays NaN, and nothing else becomes NaN"
    wrong = (actual != expected) & ~nan
    assert not wrong.any(), f"{int(wrong.sum())} values round differently, e.g. {inputs[wrong][:4].tolist()}"


# --- dense: expm and its Frechet derivative on chip ---------------------------------------------------------------
def expm_plan(norm: float, dtype) -> tuple[int, int]:
    """(degree, squarings) as csrc/dense.h expm_plan chooses them."""
    theta, best, best_cost = dense_plan._theta(dtype), (30, 64), 1 << 30
    for m in dense_plan.EXPM_DEGREES:
        s, x = 0, norm
        while x > theta[m - 1] and s < 64:
            x, s = x * 0.5, s + 1
        if dense_plan.ps_cost(m) + s <= best_cost:
            best, best_cost = (m, s), dense_plan.ps_cost(m) + s
    return best


def branch_norms(dtype) -> list[float]:
    """One 1-norm inside each degree's range of the plan (away from its ends), and two that need squarings."""
    ranges: dict[int, list[float]] = {}
    for norm in torch.logspace(-17, 1, 500, dtype=torch.float64).tolist():
        m, s = expm_plan(norm, dtype)
        if s == 0:
            ranges.setdefault(m, []).append(norm)
    return [math.sqrt(r[0] * r[-1]) for r in ranges.values()] + [12.0, 40.0]


def matrices(n: int, norms: list[float], dtype) -> torch.Tensor:
    A = torch.randn(len(norms), n, n, dtype=torch.float64)
    A = A * (torch.tensor(norms, dtype=torch.float64) / torch.linalg.matrix_norm(A, ord=1))[:, None, None]
    return A.to(dtype)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return (actual.double() - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1)


EXPM_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def frechet_reference(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    n, At = A.shape[-1], A.double().transpose(-1, -2)
    block = torch.cat((torch.cat((At, G.double()), -1), torch.cat((torch.zeros_like(At), At), -1)), -2)
    return torch.linalg.matrix_exp(block)[..., :n, n:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [1, 3, 17, 32])
def test_expm_and_frechet_across_the_plans_branches(emu, schedule, n, dtype):
    """One block per matrix: every degree the plan picks for this dtype (the largest uses all of the shared memory
    the launcher reserves), squarings, a NaN matrix; n from one element to 32 x 32 (more elements than threads).
    (Every degree of the table is a multiple of its Paterson-Stockmeyer block: the unfolded Horner start is never
    taken.)"""
    norms = branch_norms(dtype)
    plans = {expm_plan(x, dtype) for x in norms}
    assert {m for m, _ in plans} >= ({1, 2, 4, 6, 9, 12, 16, 20} | ({25, 30} if dtype == torch.float64 else set()))
    assert any(s > 0 for _, s in plans)
    A = torch.cat((matrices(n, norms, dtype), torch.full((1, n, n), math.nan, dtype=dtype)))
    out = emu.expm(A)
    ref = torch.linalg.matrix_exp(A[:-1].double())
    scale = torch.tensor([1.0] * (len(norms) - 2) + [10.0, 40.0])  # squarings: rounding grows with the norm
    err = rel_err(out[:-1], ref)
    assert (err <= EXPM_TOL[dtype] * scale).all(), f"expm relative errors {err.tolist()} (norms {norms})"
    assert out[-1].isnan().all()
    G = torch.randn(A.shape, dtype=torch.float64).to(dtype)
    frechet, fits = emu.expm_frechet(A, G)
    assert fits
    err = rel_err(frechet[:-1], frechet_reference(A[:-1], G[:-1]))
    assert (err <= EXPM_TOL[dtype] * scale * 5).all(), f"Frechet relative errors {err.tolist()} (norms {norms})"
    assert frechet[-1].isnan().all()


def test_frechet_that_does_not_fit_says_so(emu):
    """float64 32 x 32 needs 128 KiB of shared memory: more than a V100 (96 KiB) gives, and the launcher says so."""
    cuda_emulator.configure(shared=cuda_emulator.V100_SHARED)
    try:
        A = torch.randn(2, 32, 32, dtype=torch.float64)
        assert not emu.expm_frechet(A, A)[1]
        assert emu.expm_frechet(A.float(), A.float())[1]  # float32: 64 KiB fits
    finally:
        cuda_emulator.configure()


# --- dense: the action ---------------------------------------------------------------------------------------------
def action_reference(z, A, tau):
    M = torch.linalg.matrix_exp(tau.double().reshape(-1, *([1] * A.dim())) * A.double())
    return torch.einsum("bij,bjp->bip", M, z.double()) if A.dim() == 2 else torch.einsum("bpij,bjp->bip", M, z.double())


ACTION_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def action_taus(batch: int, dtype) -> torch.Tensor:
    """Per sample: zero (converges at once), tiny, negative, and large (several substeps) values."""
    base = torch.tensor([0.0, 1e-6, -0.4, 2.5, 6.0, 0.05, -3.0, 1.0])
    return base.repeat(batch // len(base) + 1)[:batch].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "mode", ["row_per_position", "row_shared_P1", "column_shared", "column_shared_tau"], ids=lambda m: m
)
def test_action_modes(emu, schedule, mode, dtype):
    """Row mode (a block per position and tile of samples, per-row substeps) and column mode (a block per sample and
    tile of positions); tiles of 32 (float32) or 8 (float64) with a partial last tile; vectors that converge at the
    first term (zero vectors, tau = 0) next to vectors that take many terms and substeps."""
    tile = 32 if dtype == torch.float32 else 8
    d = 5
    if mode.startswith("row"):
        batch, positions = tile + 5, (3 if mode == "row_per_position" else 1)
    else:
        batch, positions = 3, tile + 5
    z = torch.randn(batch, d, positions, dtype=dtype)
    z[1] = 0  # a sample: in row mode a whole row
    z[:, :, positions // 2] = 0  # a position: in column mode a whole column
    A = torch.randn(positions, d, d, dtype=dtype) if mode == "row_per_position" else torch.randn(d, d, dtype=dtype)
    tau = torch.full((batch,), 0.7, dtype=dtype) if mode == "column_shared_tau" else action_taus(batch, dtype)
    plan = dense_plan.reference_plan(A, tau, positions)
    out = emu.dense_action(z, A, tau, int(plan[0]), float(plan[1]))
    grid = emu.last_launch()
    assert grid[:2] == ([2, positions] if mode.startswith("row") else [2, batch]), "the tiles and the fixed index"
    expected = action_reference(z, A, tau)
    scale = expected.abs().amax(1, keepdim=True).clamp_min(1e-30)  # per vector
    err = ((out.double() - expected).abs() / scale).amax()
    assert err <= ACTION_TOL[dtype] * 10, f"action relative error {err:.2e} (plan {plan.tolist()})"
    assert (out[1] == 0).all() and (out[:, :, positions // 2] == 0).all()


@pytest.mark.parametrize("d", [1, 64])
def test_action_extreme_widths(emu, schedule, d):
    """d = 1 and d = 64 (the largest on chip: the generator and three state tiles fill its shared memory)."""
    z = torch.randn(9, d, 2)
    A = torch.randn(2, d, d) / math.sqrt(d)
    tau = torch.linspace(-1.5, 2.0, 9)
    plan = dense_plan.reference_plan(A, tau, 2)
    out = emu.dense_action(z, A, tau, int(plan[0]), float(plan[1]))
    expected = action_reference(z, A, tau)
    err = ((out.double() - expected).abs() / expected.abs().amax(1, keepdim=True)).amax()
    assert err <= 1e-4, f"action relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["row", "column"])
def test_action_bits_do_not_depend_on_the_schedule(emu, mode, dtype):
    """The kernel has no atomics: without a race, every order of its threads gives the same bits and the same number
    of barriers. The plan is deliberately short (half its alpha: few substeps that use all their terms), so that
    vectors converge at the last term of a substep, where the next substep's loads follow the convergence test, next
    to vectors that stop early. Checked against the plain-PyTorch recurrence with the same plan (taylor_action)."""
    tile = 32 if dtype == torch.float32 else 8
    batch, d, positions = (tile + 5, 4, 3) if mode == "row" else (3, 4, tile + 5)
    z = torch.randn(batch, d, positions, dtype=dtype)
    z[:, :, positions // 3] *= 1e-6  # vectors that converge sooner
    A = torch.randn(positions, d, d, dtype=dtype) / 2 if mode == "row" else torch.randn(d, d, dtype=dtype) / 2
    signs = torch.tensor([1.0, -1.0]).repeat(batch)[:batch].to(dtype)
    tau = torch.logspace(-4, 1, batch, dtype=dtype) * signs
    plan = dense_plan.reference_plan(A, tau, positions)
    plan = torch.tensor([plan[0].item(), plan[1].item() / 2, 1.0], dtype=torch.float64)
    outputs, barriers = [], []
    try:
        for name in SCHEDULES:
            cuda_emulator.configure(name)
            outputs.append(emu.dense_action(z, A, tau, int(plan[0]), float(plan[1])))
            barriers.append(emu.last_launch()[5])
    finally:
        cuda_emulator.configure()
    for name, out in zip(SCHEDULES[1:], outputs[1:], strict=True):
        differ = out != outputs[0]
        assert not differ.any(), f"{name}: {int(differ.sum())} values differ from the in-order schedule's (a race)"
    assert len(set(barriers)) == 1, f"barriers per schedule {barriers}: control flow depends on the order"
    expected = dense.taylor_action(z, A, tau, plan).double()
    err = ((outputs[0].double() - expected).abs() / expected.abs().amax(1, keepdim=True).clamp_min(1e-300)).amax()
    assert err <= (1e-4 if dtype == torch.float32 else 1e-11), f"against taylor_action: {err:.2e}"
