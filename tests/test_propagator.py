import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hkd.propagator import HKDPropagator

SHAPES = [(6, 4, 4), (4, 2, 2)]
KINDS = [("spectral", True), ("spectral", False), ("dense", True), ("dense", False)]


def random_propagator(generator, per_position, dtype=torch.float64, scale=0.5, shapes=SHAPES):
    prop = HKDPropagator(shapes, generator, per_position).to(dtype)
    with torch.no_grad():
        for p in prop.parameters():
            p.normal_(0, scale)
    return prop


def latents(batch=3, dtype=torch.float64, requires_grad=False, shapes=SHAPES):
    return [torch.randn(batch, *s, dtype=dtype, requires_grad=requires_grad) for s in shapes]


def expected(prop, zs, tau):
    """exp(tau A) z from first principles: complex multiplication (spectral), matrix_exp per position (dense)."""
    tau = torch.as_tensor(tau, dtype=torch.float64).reshape(-1)
    out = []
    for level, z in enumerate(zs):
        B, d, h, w = z.shape
        taus = tau.expand(B).reshape(B, 1, 1, 1)
        if prop.generator == "spectral":
            lam = torch.complex(prop.alphas[level], prop.betas[level])
            lam = lam if prop.per_position else lam.reshape(-1, 1, 1)
            c = torch.exp(taus * lam) * torch.complex(z[:, 0::2], z[:, 1::2])
            out.append(torch.stack([c.real, c.imag], dim=2).reshape(B, d, h, w))
        else:
            A = prop.generators[level].double()
            A = A if prop.per_position else A.expand(h * w, d, d)
            M = torch.linalg.matrix_exp(taus * A)  # (B, P, d, d)
            out.append(torch.einsum("bpij,bjp->bip", M, z.double().reshape(B, d, h * w)).reshape(z.shape))
    return out


@pytest.mark.parametrize("generator,per_position", KINDS)
def test_zero_generators_are_the_identity(generator, per_position):
    prop = HKDPropagator(SHAPES, generator, per_position)
    zs = latents(dtype=torch.float32)
    for tau in [3.7, torch.randn(3) * 10]:
        for z, out in zip(zs, prop(zs, tau), strict=True):
            torch.testing.assert_close(out, z)


@pytest.mark.parametrize("generator,per_position", KINDS)
def test_matches_the_definition_and_semigroup(generator, per_position):
    prop = random_propagator(generator, per_position)
    zs = latents()
    # taus exact in float32 (the op fronts take tau as float32)
    for tau in [torch.tensor(-0.8).double(), torch.randn(3).double()]:
        for out, ref in zip(prop(zs, tau), expected(prop, zs, tau), strict=True):
            torch.testing.assert_close(out, ref)
    s, t = -0.375, -0.875
    for two, one in zip(prop(prop(zs, s), t), prop(zs, s + t), strict=True):
        torch.testing.assert_close(two, one)


@pytest.mark.parametrize("generator,per_position", KINDS)
def test_gradcheck(generator, per_position):
    shapes = [(4, 2, 2), (2, 1, 1)]
    prop = random_propagator(generator, per_position, shapes=shapes)
    zs = latents(batch=2, requires_grad=True, shapes=shapes)
    params = list(prop.parameters())
    tau = torch.tensor([0.7, -0.4], dtype=torch.float64)

    def f(*inputs):
        zs_, ps = inputs[: len(zs)], inputs[len(zs) :]
        with torch.nn.utils.stateless._reparametrize_module(prop, dict(zip(names, ps, strict=True))):
            return tuple(prop(list(zs_), tau))

    names = [n for n, _ in prop.named_parameters()]
    assert torch.autograd.gradcheck(f, (*zs, *params), fast_mode=generator == "dense")


@pytest.mark.parametrize("generator,per_position", KINDS)
def test_at_is_forward_at_a_fixed_tau_and_frozen(generator, per_position):
    prop = random_propagator(generator, per_position, dtype=torch.float32)
    zs, tau = latents(dtype=torch.float32), -1.3
    fixed = prop.at(tau)
    want = prop(zs, tau)
    with torch.no_grad():
        for p in prop.parameters():
            p.add_(1.0)  # later training does not change the frozen step
    for out, ref in zip(fixed(zs), want, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one time step"):
        prop.at(torch.ones(2))


def test_eigenvalues_and_bands_agree_between_spectral_and_dense():
    spectral = random_propagator("spectral", True)
    dense = HKDPropagator(SHAPES, "dense", True).double()
    with torch.no_grad():  # the dense matrices of the spectral generators, with the pairs permuted by Q
        for level, (d, h, w) in enumerate(SHAPES):
            a, b = spectral.alphas[level].reshape(d // 2, h * w).T, spectral.betas[level].reshape(d // 2, h * w).T
            A = torch.zeros(h * w, d, d, dtype=torch.float64)
            A[:, 0::2, 0::2] = torch.diag_embed(a)
            A[:, 1::2, 1::2] = torch.diag_embed(a)
            A[:, 0::2, 1::2] = -torch.diag_embed(b)
            A[:, 1::2, 0::2] = torch.diag_embed(b)
            Q = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
            dense.generators[level].copy_(Q @ A @ Q.T)
    zs = latents()
    for level in range(len(SHAPES)):
        lam, mu = spectral.eigenvalues()[level], dense.eigenvalues()[level]
        assert lam.shape == (SHAPES[level][0] // 2, *SHAPES[level][1:]) and mu.shape == SHAPES[level]
        both = torch.cat([lam, lam.conj()]).abs().sort(dim=0).values
        torch.testing.assert_close(both, mu.abs().sort(dim=0).values)
        z = zs[level]
        total_s, total_d = torch.zeros_like(z), torch.zeros_like(z)
        previous_max = -float("inf")
        masks = [spectral.band_mask(level, band) for band in ("low", "middle", "high")]
        for band, mask in enumerate(masks):
            assert mask.any()
            assert spectral.eigenvalues()[level].real[mask].min() >= previous_max
            previous_max = spectral.eigenvalues()[level].real[mask].max()
            total_s += spectral.band_project(level, z, mask)
            dense_mask = dense.band_mask(level, band)
            assert dense_mask.sum() == 2 * mask.sum()
            part = dense.band_project(level, z, dense_mask)
            total_d += part
            # the same subspace projection, seen through Q: evolution commutes with it
            evolved = dense([zs[0], zs[1]], -0.6)[level]
            projected = dense([part if i == level else zz for i, zz in enumerate(zs)], -0.6)[level]
            torch.testing.assert_close(dense.band_project(level, evolved, dense_mask), projected)
        assert torch.stack(masks).sum(0).eq(1).all()  # a partition
        torch.testing.assert_close(total_s, z)
        torch.testing.assert_close(total_d, z)


def test_clear_errors():
    with pytest.raises(ValueError, match="even"):
        HKDPropagator([(3, 2, 2)], "spectral")
    with pytest.raises(ValueError, match="generator"):
        HKDPropagator(SHAPES, "diagonal")
    prop = HKDPropagator(SHAPES)
    with pytest.raises(ValueError, match="latents of shapes"):
        prop([torch.randn(2, 6, 4, 4)], 1.0)
    with pytest.raises(ValueError, match="band"):
        prop.band_mask(0, "top")


def test_autocast():
    prop = random_propagator("spectral", True, dtype=torch.float32)
    zs = latents(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prop([z.bfloat16() for z in zs], -0.5)
    for o, ref in zip(out, prop(zs, -0.5), strict=True):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    prop = random_propagator("spectral", True, dtype=torch.float32)
    compiled = torch.compile(prop, fullgraph=True)
    tau = torch.rand(3) - 1
    zs = latents(dtype=torch.float32, requires_grad=True)
    eager = prop(zs, tau)
    grads = torch.autograd.grad(sum((o * o).sum() for o in eager), [*zs, *prop.parameters()])
    out = compiled(zs, tau)
    grads_c = torch.autograd.grad(sum((o * o).sum() for o in out), [*zs, *prop.parameters()])
    for a, b in zip([*out, *grads_c], [*eager, *grads], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _ddp_worker(rank, world, port, state, zs, tau, result):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    prop = HKDPropagator(SHAPES, "spectral", True)
    prop.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(prop)
    part = [z.chunk(world)[rank] for z in zs]
    out = ddp(part, tau.chunk(world)[rank])
    sum((o * o).mean() for o in out).backward()
    result[rank] = ([o.detach() for o in out], [p.grad for p in prop.parameters()])
    dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_two_gloo_processes_match_eager():
    prop = random_propagator("spectral", True, dtype=torch.float32)
    zs, tau = latents(batch=4, dtype=torch.float32), torch.rand(4) - 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, prop.state_dict(), zs, tau, result), nprocs=2)
    eager = prop(zs, tau)
    sum((o * o).mean() for o in eager).backward()  # DDP averages the two halves' gradients: the same
    for level, o in enumerate(eager):
        torch.testing.assert_close(torch.cat([result[0][0][level], result[1][0][level]]), o)
    for rank in range(2):
        for g, p in zip(result[rank][1], prop.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad)
