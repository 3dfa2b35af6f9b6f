"""The distance of Algorithm 1 (lambda1 * MSE + lambda2 * perceptual, per sample), and its loss over trajectories.

    d(x_hat, x_eps) = lambda1 * mean((x_hat - x_eps)^2) + lambda2 * P(x_hat, x_eps),
    lambda1 = lambda1_start * (lambda1_end / lambda1_start) ** (epoch / epochs)   (paper: 10^(-3 epoch / epochs))

P is one of
* "lpips":        LPIPS (the `lpips` package) with an AlexNet or VGG backbone. The backbone's ImageNet weights are
                  read from the torch hub cache ($TORCH_HOME/hub/checkpoints, the file torchvision would download)
                  or from a path the user gives; never fetched. Images are in [-1, 1]; grey images are repeated to
                  3 channels and images smaller than `lpips_resize` are upsampled bilinearly (AlexNet needs >= ~32 px).
* "pseudo_huber": sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(C H W) (improved consistency training), weight-free.
* "none":         no perceptual term.

latent_consistency (lambda3; the project's addition, not in the paper): between pairs of sampled times s > t of one
trajectory, the relative error of the Koopman evolution against the encoder's own latent at t,
    sum_l ||exp(tau(s, t) A^(l)) E^(l)(x_s) - sg(E^(l)(x_t))||^2 / ||sg(E^(l)(x_t))||^2 / L,
relative so that shrinking the latents cannot lower it.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hkd.errors import CorruptFileError

PERCEPTUAL = ("lpips", "pseudo_huber", "none")


def lambda1_schedule(epoch: float, epochs: int, start: float = 1.0, end: float = 1e-3) -> float:
    """Weight of the MSE term: decays geometrically from `start` (epoch 0) towards `end` (epoch = epochs)."""
    return start * (end / start) ** (epoch / max(epochs, 1))


def pseudo_huber(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(C H W); shape (B,)."""
    c = 0.00054 * x[0].numel() ** 0.5
    squared = (x.float() - y.float()).square().flatten(1).sum(1)
    return torch.sqrt(squared + c * c) - c


def _backbone_weights_file(net: str, weights: str | os.PathLike | None) -> Path:
    """The ImageNet backbone weights: the user's path, else torchvision's file in the local torch hub cache."""
    import torchvision

    enum = {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}[net]
    url = enum.IMAGENET1K_V1.url
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS backbone weights {str(path)!r} not found (expected torchvision's {url})")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the {net} ImageNet backbone weights, and nothing is downloaded at run time: put {url} "
            f"at {path} (the torch hub cache, set by $TORCH_HOME), or pass train.lpips_weights=PATH; "
            "or use train.perceptual=pseudo_huber (weight-free)"
        )
    return path


class LPIPS(nn.Module):
    """LPIPS of the `lpips` package with its backbone loaded from a local file; frozen, per-sample output (B,)."""

    def __init__(self, net: str = "alex", weights: str | os.PathLike | None = None, resize: int = 224):
        super().__init__()
        if net not in ("alex", "vgg"):
            raise ValueError(f"lpips_net must be 'alex' or 'vgg', not {net!r}")
        try:
            import lpips
        except ImportError as error:
            raise ImportError("perceptual=lpips needs the lpips package: pip install 'hkd[lpips]'") from error
        path = _backbone_weights_file(net, weights)
        try:
            backbone = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CorruptFileError(f"LPIPS backbone weights {str(path)!r} could not be read: {error}") from error
        # pnet_rand=True only skips torchvision's download: the backbone is overwritten from `path` just below.
        with warnings.catch_warnings():  # torchvision's deprecation note on lpips' `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            self.lpips = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        # lpips splits torchvision's `features` Sequential into slices that keep the layer indices as names
        sliced = self.lpips.net.state_dict()
        try:
            state = {key: backbone["features." + key.split(".", 1)[1]] for key in sliced}
            self.lpips.net.load_state_dict(state)
        except (KeyError, RuntimeError) as error:
            raise CorruptFileError(f"{str(path)!r} is not a torchvision {net} ImageNet state dict: {error}") from error
        self.resize = resize
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always in eval mode (no dropout in the metric)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if self.resize and min(x.shape[-2:]) < self.resize:
            x, y = (F.interpolate(v.float(), size=(self.resize, self.resize), mode="bilinear") for v in (x, y))
        return self.lpips(x.float(), y.float()).flatten()


def latent_consistency(model: nn.Module, latents: list[Tensor], t: Tensor, per_trajectory: int) -> Tensor:
    """Per-trajectory latent consistency (B,): latents (B * s, d, h, w) per level and times t (B * s,) of s sampled
    times per trajectory (trajectory-major); every ordered pair of distinct times s > t, one propagation call."""
    s = per_trajectory
    t = t.reshape(-1, s).double()
    i, j = (index.flatten() for index in torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij"))
    keep = (t[:, i] > t[:, j]).to(latents[0].dtype)  # (B, s * s): evolve from the earlier (noisier) time only
    t_from, t_to = t[:, i].flatten(), t[:, j].flatten()
    grouped = [z.reshape(-1, s, *z.shape[1:]) for z in latents]
    sources = [z[:, i].flatten(0, 1) for z in grouped]
    targets = [z[:, j].flatten(0, 1).detach() for z in grouped]
    evolved = model.propagate(sources, t_from, t_to)
    errors = [
        (a.float() - b.float()).square().flatten(1).sum(1) / b.float().square().flatten(1).sum(1).clamp_min(1e-12)
        for a, b in zip(evolved, targets, strict=True)
    ]
    per_pair = torch.stack(errors).mean(0).reshape(-1, s * s) * keep
    return per_pair.sum(1) / keep.sum(1).clamp_min(1)


def decoded_trajectory(
    model: nn.Module,
    teacher: nn.Module,
    latents: list[Tensor],
    x_t: Tensor,
    t: Tensor,
    per_trajectory: int,
    distance: Distance,
    lambda1: float,
) -> Tensor:
    """Per-trajectory decoded-trajectory error (B,): the Koopman state evolved from T to the trajectory's first
    sampled time t < T, decoded, against the teacher's denoised estimate there,
    distance(D(exp((t - T) A) E(x_T)), D_teacher(x_t; t)). latents, x_t and t hold s = per_trajectory sampled times
    per trajectory (trajectory-major), T last. One time per trajectory keeps the cost at one extra decode."""
    B, s = t.shape[0] // per_trajectory, per_trajectory
    times = t.reshape(B, s)
    z_T = [z.reshape(B, s, *z.shape[1:])[:, -1] for z in latents]
    x_T = x_t.reshape(B, s, *x_t.shape[1:])[:, -1]  # the teacher's skip term, where the model keeps it
    decoded = model.decode(model.propagate(z_T, times[:, -1], times[:, 0]), x_T)
    with torch.no_grad():
        target = teacher(x_t.reshape(B, s, *x_t.shape[1:])[:, 0], times[:, 0])
    return distance(decoded, target, lambda1)


class Distance(nn.Module):
    """Per-sample lambda1 * MSE + lambda2 * perceptual; `forward(x_hat, x_eps, lambda1) -> (B,)`."""

    def __init__(
        self,
        perceptual: str = "pseudo_huber",
        lambda2: float = 1.0,
        lpips_net: str = "alex",
        lpips_weights: str | None = None,
        lpips_resize: int = 224,
    ):
        super().__init__()
        if perceptual not in PERCEPTUAL:
            raise ValueError(f"perceptual must be one of {', '.join(PERCEPTUAL)}, not {perceptual!r}")
        self.perceptual, self.lambda2 = perceptual, lambda2
        self.lpips = LPIPS(lpips_net, lpips_weights, lpips_resize) if perceptual == "lpips" else None

    def forward(self, x_hat: Tensor, x_eps: Tensor, lambda1: float) -> Tensor:
        loss = lambda1 * (x_hat.float() - x_eps.float()).square().flatten(1).mean(1)
        if self.perceptual == "pseudo_huber":
            loss = loss + self.lambda2 * pseudo_huber(x_hat, x_eps)
        elif self.perceptual == "lpips":
            loss = loss + self.lambda2 * self.lpips(x_hat, x_eps)
        return loss


# ---------------------------------------------------------------------------------------------------------------
# Algorithm 1's loss. For every trajectory {x_t} of the batch (states stored on the teacher's time grid):
#
#     S = {t_1, ..., t_(s-1)} (sampled from the stored grid) + {T}
#     x_hat(t) = model(x_t, t) = D({exp((eps - t) A^(l)) E^(l)(x_t)}_l)          for t in S
#     loss     = mean over the batch and S of  lambda1 * MSE(x_hat, x_eps) + lambda2 * P(x_hat, x_eps)
#
# Times. The states exist only at the grid points the teacher's solver visited, so the times are grid points, never
# interpolated (interpolating between Heun states would feed the model states no PF-ODE trajectory passes through).
# `time_sampling: uniform` draws t ~ U[eps, T] as in the paper and takes the nearest grid point (the probability of a
# grid point is the length of its cell); `grid` draws grid indices uniformly (denser near eps on the EDM grid).
# `consistency: false` (the ablation without the trajectory-consistency loss) uses t = T only.


def loss_time_indices(times: Tensor, u: Tensor, mode: str) -> Tensor:
    """Grid indices (B, n) of the input times, from uniform draws u (B, n) in [0, 1); times (B, K) is each
    trajectory's stored grid. Candidates: every stored state but x_eps (the one at the smallest time, t = 0 in a
    store: EDM's last step goes to sigma = 0). uniform: the candidate nearest to t = eps + u (T - eps), eps the
    smallest candidate time (so t ~ U[eps, T] as in the paper, on the grid); grid: a uniformly chosen candidate."""
    last = times.argmin(1, keepdim=True)  # x_eps
    if mode == "grid":
        index = (u * (times.shape[1] - 1)).long().clamp_(max=times.shape[1] - 2)
        return index + (index >= last).long()
    candidates = times.scatter(1, last, math.inf)
    lo, hi = candidates.min(1, keepdim=True).values, times.max(1, keepdim=True).values
    t = lo + u.to(times.dtype) * (hi - lo)
    return (candidates[:, None, :] - t[:, :, None]).abs().argmin(-1)


def trajectory_loss(
    model: nn.Module,
    states: Tensor,
    times: Tensor,
    u: Tensor,
    distance: Distance,
    lambda1: float,
    mode: str,
    lambda3: float = 0.0,
    lambda4: float = 0.0,
    teacher: nn.Module | None = None,
) -> Tensor:
    """Algorithm 1's loss for a batch of trajectories: states (B, K, C, H, W) at times (B, K); u (B, s-1) uniform
    draws choosing the intermediate times (s-1 may be 0). One forward pass over all B * s (x_t, t) pairs. The
    project's additions: lambda3 > 0 adds hkd.losses.latent_consistency between the sampled times of each
    trajectory, lambda4 > 0 hkd.losses.decoded_trajectory against the teacher's denoised estimate."""
    rows = torch.arange(states.shape[0], device=states.device)[:, None]
    index = torch.cat([loss_time_indices(times, u, mode), times.argmax(1, keepdim=True)], dim=1)  # + T
    x_t, t = states[rows, index].flatten(0, 1), times[rows, index].flatten()
    x_eps = states[rows[:, 0], times.argmin(1)]
    if lambda3 == 0 and lambda4 == 0:
        x_hat = model(x_t, t)
        return distance(x_hat, x_eps.repeat_interleave(index.shape[1], dim=0), lambda1).mean()
    x_hat, latents = model(x_t, t, return_latents=True)
    loss = distance(x_hat, x_eps.repeat_interleave(index.shape[1], dim=0), lambda1).reshape(-1, index.shape[1])
    loss, raw = loss.mean(1), getattr(model, "module", model)  # raw: the model without its DDP wrapper
    if lambda3 > 0:
        loss = loss + lambda3 * latent_consistency(raw, latents, t, index.shape[1])
    if lambda4 > 0 and index.shape[1] > 1:
        loss = loss + lambda4 * decoded_trajectory(raw, teacher, latents, x_t, t, index.shape[1], distance, lambda1)
    return loss.mean()
