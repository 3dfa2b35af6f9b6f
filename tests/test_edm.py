"""hkd.edm: EDM's maths against plain float64 formulas, and the layout around it (no hkd imports, no cycles)."""

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hkd import edm


def test_preconditioning_matches_the_formulas_for_numbers_and_tensors():
    sd = 0.5
    for sigma in (0.002, 0.3, 80.0):
        expected = (
            sd**2 / (sigma**2 + sd**2),
            sigma * sd / math.sqrt(sigma**2 + sd**2),
            1 / math.sqrt(sigma**2 + sd**2),
            math.log(sigma) / 4,
        )
        assert edm.preconditioning(sigma, sd) == pytest.approx(expected, rel=1e-15)
        tensor = edm.preconditioning(torch.tensor([sigma, sigma], dtype=torch.float64), sd)
        for got, want in zip(tensor, expected, strict=True):
            torch.testing.assert_close(got, torch.full((2,), want, dtype=torch.float64), rtol=1e-15, atol=0)


def test_edm_precond_is_c_skip_x_plus_c_out_f():
    net = torch.nn.Conv2d(2, 2, 3, padding=1)

    def f(x, c_noise):
        return net(x) * c_noise.reshape(-1, 1, 1, 1)

    denoiser = edm.EDMPrecond(f, sigma_data=0.5)
    x, sigma = torch.randn(3, 2, 5, 5), torch.tensor([0.01, 1.0, 80.0])
    s = sigma.double().reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    with torch.no_grad():
        expected = (
            c_skip * x.double() + c_out * f((c_in * x.double()).float(), (s.log() / 4).flatten().float()).double()
        )
        torch.testing.assert_close(denoiser(x, sigma).double(), expected, rtol=1e-5, atol=1e-6)


def point_mass(x0: torch.Tensor):
    """The exact denoiser of data that is the single image x0: D(x; t) = x0. Its PF-ODE is linear: from x_T = T n,
    x_t = x0 + t (n - x0 / T), which Euler and Heun steps follow exactly."""
    return lambda x, t: x0.to(x.dtype).expand_as(x)


@pytest.mark.parametrize("num_steps", [1, 3, 18])
def test_samplers_solve_the_point_mass_ode_exactly(num_steps):
    x0, noise = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4)
    times, states = edm.heun_sampler(point_mass(x0), noise, num_steps)
    assert times.dtype == states.dtype == torch.float64 and states.shape == (num_steps + 1, 3, 1, 4, 4)
    exact = x0 + times.reshape(-1, 1, 1, 1, 1) * (noise.double() - x0 / times[0])
    torch.testing.assert_close(states, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(edm.euler_sampler(point_mass(x0), noise, num_steps), exact[-1], rtol=1e-12, atol=1e-12)


def test_euler_sampler_is_the_euler_loop_on_the_time_grid():
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()

    def denoiser(x, t):
        return net(x) / (1 + t)

    noise = torch.randn(2, 1, 6, 6)
    t = edm.time_steps(4).tolist()
    x = noise.double() * t[0]
    with torch.no_grad():
        for t_cur, t_next in zip(t[:-1], t[1:], strict=True):
            x = x + (t_next - t_cur) * (x - denoiser(x, t_cur)) / t_cur
    torch.testing.assert_close(edm.euler_sampler(denoiser, noise, 4), x, rtol=1e-12, atol=1e-12)


def test_time_steps_and_their_errors():
    t = edm.time_steps(18)
    assert t.shape == (19,) and t[0] == pytest.approx(80) and t[-2] == pytest.approx(0.002) and t[-1] == 0
    assert (t[:-1] > t[1:]).all()
    with pytest.raises(ValueError, match="num_steps >= 1"):
        edm.time_steps(0)


def test_ema_update_and_the_halflife_decay():
    net, ema = torch.nn.BatchNorm1d(3).double(), torch.nn.BatchNorm1d(3).double()
    with torch.no_grad():
        for p in [*net.parameters(), *ema.parameters()]:
            p.normal_()
    net.running_mean.normal_()
    before = [p.detach().clone() for p in ema.parameters()]
    edm.ema_update(ema, net, 0.9)
    for old, new, p in zip(before, ema.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * p, rtol=1e-14, atol=1e-14)
    assert torch.equal(ema.running_mean, net.running_mean)
    assert edm.ema_halflife_decay(500, 0.1, 100 * 10, 10) == pytest.approx(0.5 ** (10 / 100))  # ramped up
    assert edm.ema_halflife_decay(50, 0.1, 100 * 10, 10) == pytest.approx(0.5 ** (10 / 50))
    assert edm.ema_halflife_decay(50, 0.1, 0, 10) == pytest.approx(0.0)  # the first step copies the network


def test_edm_imports_no_hkd_module_and_the_store_does_not_import_the_teacher():
    tree = ast.parse(Path(edm.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m and m.split(".")[0] == "hkd"]
    code = "import sys, hkd.trajectories; print(sorted(m for m in sys.modules if m in ('hkd.teacher', 'hkd.data')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
