"""Editing along the Koopman trajectory (`hkd edit`): frequency-targeted component swaps, inpainting, colourisation.

Frequency-targeted editing (the paper's experiment). Generate x from noise n and a reference from noise n_ref; at
time t_edit (default the trajectory midpoint: half-way in the model's Koopman clock) take their latents
z = exp((t_edit - T) A) E(x_T) and z_ref likewise, and replace a fraction r of the chosen band's components of z,
inside a spatial region (default the lower half of every level), by z_ref's:

    z' = z + P_S (z_ref - z),   S = the chosen components, P_S the projection onto them,

then continue to eps and decode: x' = D(exp((eps - t_edit) A) z'). The components of S are drawn from the band and
region by one fixed random ranking (seeded), so the sets are nested as r grows; r = 0 changes nothing (x' is
bit-for-bit the unedited image), r = 1 swaps every component of the band in the region. band="all" is the
all-band mixing baseline.

Inpainting and colourisation blend along the trajectory: at each time t_i of a short schedule (T first), predict
the endpoint x_0 = D(exp((eps - t_i) A) E(x_t_i)), force the known part of it to the known image (pixels under the
mask; or the luminance, for colourisation), and re-noise to the next time, x_t_{i+1} = x_0 + t_{i+1} n_i.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hkd.analysis import initial_latents

BAND_ALL = "all"
REGIONS = ("lower", "upper", "left", "right", "all")


def region_mask(height: int, width: int, region: str = "lower") -> Tensor:
    """A boolean (height, width) mask: "lower" / "upper" half of the rows, "left" / "right" half of the columns."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    mask = {
        "lower": rows >= height // 2,
        "upper": rows < height - height // 2,
        "left": cols < width - width // 2,
        "right": cols >= width // 2,
        "all": torch.ones(1, 1, dtype=torch.bool),
    }[region]
    return mask.expand(height, width)


def component_masks(
    propagator, band: str, region: str, r: float, *, levels: list[int] | None = None, seed: int = 0
) -> tuple[list[Tensor], list[Tensor]]:
    """Per level, (the components to swap, in the layout of propagator.eigenvalues(); the spatial region (h, w)).

    The components eligible are the band's (all of them for band="all") and, with per-position generators, those
    at positions inside the region; round(r * count) of them are chosen by a seeded random ranking. With generators
    shared over positions a component spans every position: the region then restricts where its swap is applied.
    """
    if not 0 <= r <= 1:
        raise ValueError(f"the fraction r must be in [0, 1], got {r}")
    chosen, regions = [], []
    generator = torch.Generator().manual_seed(seed)
    for level, ((_, *spatial), eigen) in enumerate(zip(propagator.level_shapes, propagator.eigenvalues(), strict=True)):
        if band == BAND_ALL:
            eligible = torch.ones(eigen.shape, dtype=torch.bool)
        else:
            eligible = propagator.band_mask(level, band).cpu()
        where = region_mask(*spatial, region)
        if propagator.per_position:
            eligible = eligible & where
        if levels is not None and level not in levels:
            eligible = torch.zeros_like(eligible)
        rank = torch.empty(eligible.numel(), dtype=torch.long)
        rank[torch.randperm(eligible.numel(), generator=generator)] = torch.arange(eligible.numel())
        count = int(eligible.sum())
        # the k eligible components of lowest rank, k = round(r * count): nested in r
        order = torch.where(eligible.flatten(), rank, eligible.numel())
        selected = torch.zeros(eligible.numel(), dtype=torch.bool)
        selected[order.argsort()[: round(r * count)]] = True
        chosen.append(selected.reshape(eligible.shape).to(eigen.device))
        regions.append(where.to(eigen.device))
    return chosen, regions


def swap(propagator, latents: list[Tensor], reference: list[Tensor], chosen: list[Tensor], regions: list[Tensor]):
    """z + P_S (z_ref - z) per level, restricted to the region (the components in `chosen` taken from reference)."""
    out = []
    for level, (z, z_ref, mask, where) in enumerate(zip(latents, reference, chosen, regions, strict=True)):
        delta = propagator.band_project(level, z_ref - z, mask)
        if not propagator.per_position:  # a shared component spans every position: restrict it to the region
            delta = delta * where.to(delta.dtype)
        out.append(z + delta)
    return out


def midpoint(model) -> float:
    """The time half-way along the trajectory in the model's Koopman clock: tau(T, t) = tau(T, eps) / 2."""
    half = float(model.tau(model.T, model.eps)) / 2
    low, high = model.eps, model.T  # tau(T, t) is monotone in t: bisection works for any clock
    for _ in range(100):
        mid = 0.5 * (low + high)
        if (float(model.tau(model.T, mid)) - half) * (float(model.tau(model.T, low)) - half) <= 0:
            high = mid
        else:
            low = mid
    return 0.5 * (low + high)


@torch.no_grad()
def frequency_edit(
    model,
    noise: Tensor,
    reference_noise: Tensor,
    ratios: list[float],
    *,
    band: str = "high",
    region: str = "lower",
    t_edit: float | None = None,
    levels: list[int] | None = None,
    seed: int = 0,
) -> dict:
    """Edited images for each r in `ratios`: {"unedited", "reference", "edited" (len(ratios), N, C, H, W), "t_edit"}."""
    t_edit = midpoint(model) if t_edit is None else float(t_edit)
    if not model.eps <= t_edit <= model.T:
        raise ValueError(f"t_edit must lie in [eps, T] = [{model.eps}, {model.T}], got {t_edit}")
    z = model.propagate(initial_latents(model, noise), model.T, t_edit)
    z_ref = model.propagate(initial_latents(model, reference_noise), model.T, t_edit)
    # x: the initial state, the teacher's skip term where the model keeps it (an edit keeps the edited sample's)
    finish = lambda latents, x: model.decode(model.propagate(latents, t_edit, model.eps), x * model.T)
    edited = []
    for r in ratios:
        chosen, regions = component_masks(model.propagator, band, region, r, levels=levels, seed=seed)
        edited.append(finish(swap(model.propagator, z, z_ref, chosen, regions), noise))
    return {
        "unedited": finish(z, noise), "reference": finish(z_ref, reference_noise), "edited": torch.stack(edited),
        "t_edit": t_edit,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Inpainting and colourisation


def inpaint_constraint(known: Tensor, mask: Tensor):
    """x -> mask * known + (1 - mask) * x: the pixels under mask (1 = known) come from the known image."""
    mask = mask.to(known.dtype)
    return lambda x: mask * known + (1 - mask) * x


def colourise_constraint(gray: Tensor):
    """x -> x with its luminance (the channel mean) replaced by the gray image's: the orthogonal projection onto
    the images whose channel mean is `gray` (N, 1, H, W)."""
    return lambda x: x - x.mean(1, keepdim=True) + gray


def blend_times(T: float, eps: float, steps: int) -> list[float]:
    """T, then steps - 1 times spaced evenly in log t down to (but above) eps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [T] if steps == 1 else [float(t) for t in torch.logspace(math.log10(T), math.log10(max(eps, 0.05)), steps)]


@torch.no_grad()
def blend_along_trajectory(model, noise: Tensor, constraint, *, steps: int = 4, seed: int = 0) -> Tensor:
    """Predict the endpoint at each time, impose the constraint, re-noise to the next time; returns the last x_0."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    times = blend_times(model.T, model.eps, steps)
    x0 = constraint(model.decode(model.propagate(initial_latents(model, noise), model.T, model.eps), noise * model.T))
    for t in times[1:]:
        x_t = x0 + t * torch.randn(x0.shape, generator=generator).to(x0)
        x0 = constraint(model.decode(model.propagate(model.encode(x_t, t), t, model.eps), x_t))
    return x0


# ---------------------------------------------------------------------------------------------------------------
# `hkd edit`: the figures


def _rms(difference: Tensor, where: Tensor | None = None) -> float:
    """RMS of difference (N, C, H, W) over the pixels where `where` (H, W) is 1 (default: all)."""
    weight = torch.ones_like(difference[:1, :1]) if where is None else where.expand_as(difference[:1, :1])
    weight = weight.expand_as(difference)
    return float((difference.square() * weight).sum().div(weight.sum()).sqrt())


def run(
    model,
    out_dir,
    *,
    num: int = 4,
    ratios: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9),
    band: str = "high",
    region: str = "lower",
    t_edit: float | None = None,
    known: Tensor | None = None,
    steps: int = 4,
    seed: int = 0,
) -> list:
    """Frequency edits (the chosen band and the all-band baseline, a grid over r), inpainting of the region of
    `known` images (default: none) and, for 3-channel models, colourisation of their luminance. The first num known
    images are shown; edit.json has the RMS error over all of them against the known image (inpainting: over the
    unknown region), beside a baseline (the given part's mean colour; the gray image). Returns the files."""
    from pathlib import Path

    from hkd import figures

    out_dir = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    shape = (num, model.img_channels, model.img_resolution, model.img_resolution)
    noise, reference_noise = (torch.randn(shape, generator=generator).to(device) for _ in range(2))
    written, summary = [], {"band": band, "region": region, "ratios": list(ratios)}
    for name in (band, BAND_ALL):
        result = frequency_edit(model, noise, reference_noise, list(ratios), band=name, region=region, t_edit=t_edit)
        cells = [
            [result["unedited"][i : i + 1], *[e[i : i + 1] for e in result["edited"]], result["reference"][i : i + 1]]
            for i in range(num)
        ]
        labels = ["unedited", *[f"r = {r:g}" for r in ratios], "reference"]
        title = (
            f"{'All-band mixing (baseline)' if name == BAND_ALL else f'{band} band'}: {region} region swapped "
            f"at t = {result['t_edit']:.3g}"
        )
        fig = figures.image_table(cells, [f"sample {i}" for i in range(num)], labels, title, nrow=1)
        written.append(figures.save_figure(fig, out_dir / f"edit_{name}.png"))
        change = [(e - result["unedited"]).square().mean().sqrt().item() for e in result["edited"]]
        summary[f"rms_change_{name}"] = change
        summary["t_edit"] = result["t_edit"]
    if known is not None:  # every known image is measured; the first num are shown
        known = known.to(device)
        extra = torch.randn((max(0, len(known) - num), *shape[1:]), generator=generator).to(device)
        start = torch.cat([noise, extra])[: len(known)]
        where = region_mask(*known.shape[-2:], region).to(known)
        mask = 1 - where  # the region is unknown, the rest is given
        inpainted = blend_along_trajectory(model, start, inpaint_constraint(known, mask), steps=steps)
        given_mean = (known * mask).sum((2, 3), keepdim=True) / mask.sum()
        summary["inpaint_rmse"] = _rms(inpainted - known, where)
        summary["inpaint_rmse_mean_fill"] = _rms(given_mean - known, where)  # baseline: the given part's mean colour
        rows = [known[:num], (known * mask + (1 - mask) * -1)[:num], inpainted[:num]]
        fig = figures.image_table(
            [[r] for r in rows],
            ["known", "given", "inpainted"],
            [f"{region} half unknown; {steps} blending steps"],
            "Inpainting along the trajectory",
            nrow=num,
        )
        written.append(figures.save_figure(fig, out_dir / "inpaint.png"))
        if known.shape[1] == 3:
            gray = known.mean(1, keepdim=True)
            coloured = blend_along_trajectory(model, start, colourise_constraint(gray), steps=steps)
            summary["colourise_rmse"] = _rms(coloured - known)
            summary["colourise_rmse_gray"] = _rms(gray - known)  # baseline: no colour at all
            fig = figures.image_table(
                [[known[:num]], [gray.expand_as(known)[:num]], [coloured[:num]]],
                ["original", "gray", "colourised"],
                [f"{steps} steps"],
                "Colourisation",
                nrow=num,
            )
            written.append(figures.save_figure(fig, out_dir / "colourise.png"))
        summary["known"] = len(known)
    written.append(figures.write_json(out_dir / "edit.json", summary))
    return written
