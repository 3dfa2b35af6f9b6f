"""EDM's maths (Karras et al. 2022), with sigma(t) = t: preconditioning, the loss, the time grid, the samplers, EMA.

x_t = x_0 + t n; the denoiser D(x; sigma) predicts x_0, and the probability-flow ODE is dx/dt = (x - D(x; t)) / t.
A denoiser is any callable `denoiser(x, sigma)`. Noise is standard normal everywhere: a sampler starts from
x_T = t_0 noise. Only torch here, no hkd imports: everything else in hkd builds on this file.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------------
# Preconditioning


def sigma_column(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma (a number, () or (B,)) as a float32 (B, 1, 1, 1) column."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)


def preconditioning(sigma, sigma_data: float = 0.5) -> tuple:
    """(c_skip, c_out, c_in, c_noise) at sigma (a number or a tensor): D(x; sigma) = c_skip x + c_out F(c_in x,
    c_noise) with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4."""
    sd = sigma_data
    if isinstance(sigma, Tensor):
        root, log = (sigma**2 + sd**2).sqrt(), sigma.log()
    else:
        root, log = math.sqrt(sigma**2 + sd**2), math.log(sigma)
    return sd**2 / (sigma**2 + sd**2), sigma * sd / root, 1 / root, log / 4


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), F a network `net(x, c_noise[, class_labels])`."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        x = x.to(torch.float32)
        c_skip, c_out, c_in, c_noise = preconditioning(sigma_column(sigma, x), self.sigma_data)
        labels = () if class_labels is None else (class_labels,)  # a conditional network (label_dim > 0) takes them
        return c_skip * x + c_out * self.net(c_in * x, c_noise.flatten(), *labels).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Loss


def edm_noise(
    images: Tensor, P_mean: float = -1.2, P_std: float = 1.2, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """EDM's draws for a batch: sigma (B, 1, 1, 1) with ln(sigma) ~ N(P_mean, P_std^2), and noise n ~ N(0, sigma^2)."""
    rnd_normal = torch.randn((images.shape[0], 1, 1, 1), generator=generator, device=images.device)
    sigma = (rnd_normal * P_std + P_mean).exp()
    return sigma, torch.randn(images.shape, generator=generator, device=images.device) * sigma


def edm_loss(
    denoiser: nn.Module,
    images: Tensor,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
    noise: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """EDM's loss, averaged: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2 on ||D - y||^2.
    noise: (sigma, n) of edm_noise, drawn here unless given (a micro-batch's rows of its batch's draws)."""
    sigma, n = edm_noise(images, P_mean, P_std, generator) if noise is None else noise
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight * (denoiser(images + n, sigma) - images) ** 2).mean()


# ---------------------------------------------------------------------------------------------------------------
# Samplers


def time_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's time grid t_0 = sigma_max > ... > t_{N-1} = sigma_min, plus t_N = 0: (num_steps + 1,) float64."""
    if num_steps < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need num_steps >= 1 and 0 < sigma_min < sigma_max, got {num_steps}, {sigma_min}, {sigma_max}"
        )
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sampler(
    denoiser: nn.Module,
    noise: Tensor,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> tuple[Tensor, Tensor]:
    """EDM Algorithm 1, deterministic (S_churn = 0): 2 num_steps - 1 evaluations of the denoiser.

    noise: (B, C, H, W) standard normal; x_0 = t_0 noise. Returns (times (N + 1,), states (N + 1, B, C, H, W)),
    both float64, states[i] = x at times[i]; states[0] = x_T and states[-1] (times[-1] = 0) is the generated image.
    """
    t = time_steps(num_steps, sigma_min, sigma_max, rho).to(noise.device)
    x = noise.to(torch.float64) * t[0]
    states = [x]
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:], strict=True)):
        d = (x - denoiser(x, t_cur).to(torch.float64)) / t_cur  # Euler step
        x_next = x + (t_next - t_cur) * d
        if i < num_steps - 1:  # second-order correction, except for the last step (to t = 0)
            d_prime = (x_next - denoiser(x_next, t_next).to(torch.float64)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
        x = x_next
        states.append(x)
    return t, torch.stack(states)


@torch.no_grad()
def euler_sampler(denoiser: nn.Module, noise: Tensor, num_steps: int = 18) -> Tensor:
    """Euler (DDIM) on EDM's time grid, num_steps evaluations: the generated image (B, C, H, W) float64 from
    standard-normal noise. (Heun with 2 steps is no few-step baseline: its correction evaluates the ODE slope at
    sigma_min and multiplies it by the whole step.)"""
    t = time_steps(num_steps).to(noise.device)
    x = noise.to(torch.float64) * t[0]
    for t_cur, t_next in zip(t[:-1], t[1:], strict=True):
        x = x + (t_next - t_cur) * (x - denoiser(x, t_cur).to(torch.float64)) / t_cur
    return x


# ---------------------------------------------------------------------------------------------------------------
# EMA


def ema_halflife_decay(halflife: float, rampup: float, images_seen: int, batch_size: int) -> float:
    """EDM's EMA decay per step: a half-life in images, ramped up to `rampup` times the images seen so far."""
    halflife = min(halflife, images_seen * rampup)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay ema + (1 - decay) net for the parameters; the buffers are copied."""
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
        b_ema.copy_(b)
