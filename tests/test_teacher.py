"""EDM preconditioning, loss, Heun sampler (against the exact PF-ODE of Gaussian data), training, loading."""

import json
import math

import pytest
import torch
from torch import nn

from hkd import config, teacher
from hkd.edm import EDMPrecond, edm_loss, heun_sampler, time_steps
from hkd.teacher import load_teacher, train_teacher

# a U-Net small enough to train for a few dozen steps in seconds on the CPU
TINY = [
    "teacher.model_channels=8",
    "teacher.channel_mult=[1, 2]",
    "teacher.batch_size=32",
    "teacher.lr_warmup=5",
    "teacher.log_every=10",
    "teacher.checkpoint_every=10",
    "teacher.sample_grid=0",
]


class GaussianDenoiser(nn.Module):
    """The exact denoiser of data N(mu, std^2 I): D(x; sigma) = mu + std^2 / (std^2 + sigma^2) (x - mu)."""

    def __init__(self, mu, std):
        super().__init__()
        self.mu, self.std, self.calls = mu, std, 0

    def forward(self, x, sigma):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        return self.mu + self.std**2 / (self.std**2 + sigma**2) * (x - self.mu)


def exact_trajectory(noise, times, mu, std, sigma_max=80.0):
    """The PF-ODE solution for Gaussian data: x(t) = mu + (x_T - mu) sqrt(std^2 + t^2) / sqrt(std^2 + T^2)."""
    scale = (std**2 + times**2).sqrt() / math.sqrt(std**2 + sigma_max**2)
    return mu + (sigma_max * noise - mu)[None] * scale[:, None, None, None, None]


def test_time_steps_follow_edm_formula():
    N, lo, hi, rho = 18, 0.002, 80.0, 7.0
    t = time_steps(N, lo, hi, rho)
    assert t.shape == (N + 1,) and t.dtype == torch.float64
    assert t[0].item() == pytest.approx(hi) and t[N - 1].item() == pytest.approx(lo) and t[N].item() == 0
    assert (t[1:] < t[:-1]).all()
    i = 7
    assert t[i].item() == pytest.approx((hi ** (1 / rho) + i / (N - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)
    with pytest.raises(ValueError, match="sigma_min"):
        time_steps(18, 1.0, 0.5)


def test_heun_matches_exact_pf_ode_of_gaussian_data():
    mu, std = torch.randn(()).item() * 0.3, 0.5
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    errors = {}
    for n in (2, 18, 36):
        denoiser = GaussianDenoiser(mu, std)
        times, states = heun_sampler(denoiser, noise, num_steps=n)
        assert denoiser.calls == 2 * n - 1  # EDM: 35 evaluations at 18 steps
        assert states.shape == (n + 1, *noise.shape)
        torch.testing.assert_close(states[0], 80 * noise)
        errors[n] = (states - exact_trajectory(noise, times, mu, std)).abs().max().item()
    assert errors[18] < 0.05 * errors[2]
    assert errors[18] / errors[36] > 3  # second order: halving the step divides the error by about 4


def test_edm_precond_coefficients():
    seen = {}

    class Probe(nn.Module):
        def forward(self, x, noise_labels):
            seen["input"], seen["labels"] = x, noise_labels
            return torch.full_like(x, 2.0)

    sd = 0.5
    denoiser = EDMPrecond(Probe(), sigma_data=sd)
    x = torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.01, 1.0, 80.0])
    out = denoiser(x, sigma)
    s = sigma.double()[:, None, None, None]
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(out.double(), c_skip * x.double() + c_out * 2.0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["input"].double(), c_in * x.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["labels"], sigma.log() / 4)
    denoiser(x, 1.5)  # a number for the whole batch
    torch.testing.assert_close(seen["labels"], torch.full((3,), math.log(1.5) / 4))


def test_edm_loss_is_zero_for_the_exact_denoiser_of_a_point_mass():
    images = torch.full((4, 1, 4, 4), 0.25)
    exact = GaussianDenoiser(0.25, 0.0)  # all data at 0.25: D = 0.25
    assert edm_loss(exact, images).item() == pytest.approx(0.0, abs=1e-10)
    assert edm_loss(GaussianDenoiser(0.0, 0.0), images).item() > 0


def tiny_config(steps):
    return config.load("digits", [*TINY, f"teacher.steps={steps}"])


def fixed_loss(denoiser, images):
    """The EDM loss with fixed noise levels and noise: comparable before and after training."""
    with torch.no_grad():
        return edm_loss(denoiser, images, generator=torch.Generator().manual_seed(0)).item()


def test_training_reduces_loss_and_resumes_exactly(tmp_path):
    from hkd.data import digits

    images = digits.load()[0][:256]
    cfg = tiny_config(30)
    data, cfg_t = cfg.data, cfg.teacher
    torch.manual_seed(cfg_t.seed)
    initial = fixed_loss(teacher.build_net(data, cfg_t).eval(), images)

    logs = []
    full = train_teacher(data, cfg_t, tmp_path / "full", log=logs.append)
    assert full["step"] == 30 and len(full["losses"]) == 3
    trained = load_teacher(tmp_path / "full")
    state = torch.load(tmp_path / "full" / "teacher.pt", weights_only=True)
    net = teacher.build_net(data, cfg_t)
    net.load_state_dict(state["net"])
    assert fixed_loss(net.eval(), images) < 0.7 * initial

    # interrupted after 10 steps (a checkpoint every 10), then resumed: the same weights as the uninterrupted run
    train_teacher(data, tiny_config(10).teacher, tmp_path / "resumed", log=logs.append)
    with pytest.raises(ValueError, match="exists: pass --resume"):
        train_teacher(data, cfg_t, tmp_path / "resumed", log=logs.append)
    resumed = train_teacher(data, cfg_t, tmp_path / "resumed", resume=True, log=logs.append)
    assert resumed["step"] == 30 and any("resumed" in line for line in logs)
    again = torch.load(tmp_path / "resumed" / "teacher.pt", weights_only=True)
    for key in ("net", "ema"):
        for name, value in state[key].items():
            torch.testing.assert_close(again[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    assert load_teacher(tmp_path / "resumed").identity["hash"] == trained.identity["hash"]

    # 18 Heun steps are closer to the converged ODE solution than 2 (reference: 60 steps)
    noise = torch.randn(8, 1, 16, 16)
    reference = heun_sampler(trained, noise, 60)[1][-1]
    error = {n: (heun_sampler(trained, noise, n)[1][-1] - reference).pow(2).mean().item() for n in (2, 18)}
    assert error[18] < 0.1 * error[2]
    # and better by the evaluation metric (Frechet distance in the digits classifier's features)
    from hkd.metrics import digits_metrics

    noise = torch.randn(64, 1, 16, 16)
    fd = {n: digits_metrics(heun_sampler(trained, noise, n)[1][-1].float())["fd_digits"] for n in (2, 18)}
    assert fd[18] < 0.5 * fd[2]

    with pytest.raises(ValueError, match="model_channels"):  # resuming with another network is refused
        train_teacher(data, config.load("digits", [*TINY, "teacher.model_channels=4"]).teacher, tmp_path / "full",
                      resume=True)  # fmt: skip


def test_teacher_identity_hash_tracks_weights_and_config(tmp_path):
    cfg = tiny_config(1)
    train_teacher(cfg.data, cfg.teacher, tmp_path / "a", log=lambda line: None)
    a = load_teacher(tmp_path / "a")
    assert a.identity["source"] == "hkd" and len(a.identity["hash"]) == 64
    assert (a.img_channels, a.img_resolution) == (1, 16)
    moved = tmp_path / "b"
    moved.mkdir()
    (tmp_path / "a" / "teacher.pt").rename(moved / "teacher.pt")
    assert load_teacher(moved / "teacher.pt").identity["hash"] == a.identity["hash"]  # the path is not identity
    b = load_teacher(moved)
    b.net.out_conv.bias.data += 1e-3
    assert teacher.weights_hash(b, b.identity["config"]) != a.identity["hash"]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_teacher(tmp_path / "nowhere")


# --- diffusers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_schedule_matches_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=2e-4, beta_end=0.03)
    ours = teacher.vp_alphas_cumprod(dict(scheduler.config))
    torch.testing.assert_close(ours.float(), scheduler.alphas_cumprod.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_unet_loads_as_edm_denoiser(tmp_path, prediction_type, tiny_diffusers_unet):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_diffusers_unet()
    for p in unet.parameters():  # a random network whose output depends on its inputs (diffusers zero-inits some)
        p.data.normal_(0, 0.1)
    unet.save_pretrained(tmp_path / "ddpm" / "unet")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    scheduler.save_pretrained(tmp_path / "ddpm" / "scheduler")

    denoiser = load_teacher(tmp_path / "ddpm")  # the user's code path: a local pipeline-style folder
    assert denoiser.identity["source"] == "diffusers" and (denoiser.img_channels, denoiser.img_resolution) == (1, 8)
    assert json.dumps(denoiser.identity)  # goes into a manifest

    # at the trained noise level of timestep t, D is the x0 estimate of the VP parametrisation
    abar = scheduler.alphas_cumprod.double()
    t = torch.tensor([0, 250, 999])
    sigma = ((1 - abar[t]) / abar[t]).sqrt().float()
    x = torch.randn(3, 1, 8, 8) * (1 + sigma[:, None, None, None])
    x_vp = x / (1 + sigma[:, None, None, None] ** 2).sqrt()
    with torch.no_grad():
        out = unet(x_vp, t).sample
    s, a = sigma[:, None, None, None].double(), abar[t][:, None, None, None]
    if prediction_type == "epsilon":
        expected = x.double() - s * out.double()
    else:  # x0 = sqrt(abar) x_vp - sqrt(1 - abar) v
        expected = a.sqrt() * x_vp.double() - (1 - a).sqrt() * out.double()
    torch.testing.assert_close(denoiser(x, sigma).double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(denoiser.timestep(sigma), t.float(), rtol=0, atol=1e-3)

    times, states = heun_sampler(denoiser, torch.randn(2, 1, 8, 8), num_steps=4)
    assert states.shape == (5, 2, 1, 8, 8) and torch.isfinite(states).all()
