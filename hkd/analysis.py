"""Spectral analysis of a trained HKD model (`hkd analyze`).

The Koopman latents z^(l) evolve linearly, z_t = exp((t - T) A^(l)) z_T, and every eigen-component of A^(l) (a
channel pair at a position, for spectral generators) spans a subspace that the evolution leaves invariant. Sorting
the components of each level by a reading of their eigenvalue alpha + i beta (the real part alpha, or the rotation
rate |beta|: the model's band_reading) and cutting at the 1/3 and 2/3 quantiles gives three bands, "low", "middle"
and "high" (HKDPropagator.band_mask). This module measures what each band does:

* eigenvalues: per level, alpha + i beta of every component (scatter, histograms, spatial maps).
* band decodes: D(z) with one band kept. Per level l: level l reduced to the band, the other levels untouched
  (what the band of that level carries in context); "all levels": the band kept at every level.
* band contributions: D(z) - D(z without the band), the part of the final image that the band is responsible for.
* cumulative effect: the band rewound to time t, everything else at eps: x_b(t) = D(z_eps + P_b (z_t - z_eps)).
  progress_b(t) = 1 - ||x_b(t) - x_eps|| / ||x_b(T) - x_eps|| goes from 0 at t = T to 1 at eps and shows
  when along the trajectory the band's evolution shapes the image.
* radially averaged power spectra of the band decodes and contributions: which image frequencies each band carries.
* band-to-frequency correspondence: the centroid and power shares of the band decodes under each reading, to see
  which reading (if any) separates image content.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from hkd import figures

BANDS = ("low", "middle", "high")


# ---------------------------------------------------------------------------------------------------------------
# Power spectra


def radial_power_spectrum(images: Tensor) -> Tensor:
    """Radially averaged power spectrum of images (N, C, H, W), averaged over N and C.

    Entry k is the mean of |FFT|^2 / (H W) over the frequencies (fy, fx) (in cycles per image) with
    round(sqrt(fy^2 + fx^2)) = k, for k = 0 .. min(H, W) // 2 (k = 0 is the mean, the DC term).
    """
    if images.dim() != 4:
        raise ValueError(f"radial_power_spectrum expects images (N, C, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    power = torch.fft.fft2(images.double()).abs().square().mean((0, 1)) / (h * w)
    fy, fx = torch.fft.fftfreq(h, 1 / h, dtype=torch.float64), torch.fft.fftfreq(w, 1 / w, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()
    size = min(h, w) // 2 + 1
    keep = radius < size
    total = torch.zeros(size, dtype=torch.float64).index_add_(0, radius[keep], power[keep])
    count = torch.zeros(size, dtype=torch.float64).index_add_(0, radius[keep], torch.ones_like(power[keep]))
    return total / count


def spectrum_summary(spectrum: Tensor) -> dict[str, float]:
    """Centroid frequency (cycles per image, DC excluded) and the fraction of the non-DC power in the low, middle
    and high thirds of the frequency range 1 .. kmax."""
    k = torch.arange(len(spectrum), dtype=torch.float64)
    ac, kac = spectrum[1:], k[1:]
    total = ac.sum().clamp(min=1e-300)
    thirds = torch.tensor_split(ac, 3)
    return {
        "centroid": float((ac * kac).sum() / total),
        **{f"power_{name}": float(part.sum() / total) for name, part in zip(BANDS, thirds, strict=True)},
    }


# ---------------------------------------------------------------------------------------------------------------
# The model's trajectory (HKDModel: encode(x_t, t), propagate(latents, t_from, t_to), decode(latents), T, eps)


def initial_latents(model, noise: Tensor) -> list[Tensor]:
    """E(x_T) for x_T = T noise, noise standard normal."""
    return model.encode(noise * model.T, model.T)


# ---------------------------------------------------------------------------------------------------------------
# Bands on latents


def project(propagator, latents: list[Tensor], band: str, level: int | None = None, reading=None) -> list[Tensor]:
    """The latents with `band` kept (the other components zeroed) at `level`, or at every level when None; bands by
    `reading` (alpha or rate; default the propagator's band_reading)."""
    out = list(latents)
    for l in range(len(latents)) if level is None else [level]:
        out[l] = propagator.band_project(l, latents[l], propagator.band_mask(l, band, reading=reading))
    return out


def without(propagator, latents: list[Tensor], band: str) -> list[Tensor]:
    """The latents with `band` removed at every level."""
    kept = project(propagator, latents, band)
    return [z - k for z, k in zip(latents, kept, strict=True)]


def rewind(propagator, latents_eps: list[Tensor], latents_t: list[Tensor], band: str) -> list[Tensor]:
    """z_eps + P_band (z_t - z_eps): the band at time t, every other component at eps."""
    delta = project(propagator, [a - b for a, b in zip(latents_t, latents_eps, strict=True)], band)
    return [z + d for z, d in zip(latents_eps, delta, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# The analysis of a model


@torch.no_grad()
def band_images(model, noise: Tensor) -> dict[str, dict[str, Tensor]]:
    """{"decode"|"contribution": {f"{band}/{level or 'all'}": images}} plus {"full": {"": x_eps}}."""
    z, x_T = model.propagate(initial_latents(model, noise), model.T, model.eps), noise * model.T
    full = model.decode(z, x_T)
    out = {"full": {"": full}, "decode": {}, "contribution": {}}
    for band in BANDS:
        for level in [None, *range(len(z))]:
            key = f"{band}/{'all' if level is None else level}"
            out["decode"][key] = model.decode(project(model.propagator, z, band, level), x_T)
        out["contribution"][f"{band}/all"] = full - model.decode(without(model.propagator, z, band), x_T)
    return out


@torch.no_grad()
def cumulative_effect(model, noise: Tensor, times: Tensor) -> dict[str, Tensor]:
    """Per band, progress_b(t) over `times` (descending, T .. eps), and the rewound decodes x_b(t) (time-major)."""
    z_T, x_T = initial_latents(model, noise), noise * model.T
    z_eps = model.propagate(z_T, model.T, model.eps)
    x_eps = model.decode(z_eps, x_T)
    out = {}
    for band in BANDS:
        decodes = torch.stack(
            [
                model.decode(rewind(model.propagator, z_eps, model.propagate(z_T, model.T, float(t)), band), x_T)
                for t in times
            ]
        )
        distance = (decodes - x_eps).flatten(2).norm(dim=2).mean(1)  # (times,)
        # NaN for a band whose rewinding changes nothing (an empty band, e.g. while A = 0)
        out[band] = 1 - distance / distance[0] if distance[0] > 0 else torch.full_like(distance, float("nan"))
        out[f"{band}/decodes"] = decodes
    return out


@torch.no_grad()
def band_correspondence(model, noise: Tensor) -> dict[str, dict]:
    """For each reading of the eigenvalues (alpha, rate = |beta|) and each band: the power-spectrum summary
    (centroid, power shares) of the band's all-level decode, and the centroid of its contribution D(z) - D(z - band)
    ("contribution_centroid"); spread = centroid(high) - centroid(low) of each. A reading separates image content
    when the centroids differ clearly and grow from low to high."""
    from hkd.propagator import READINGS

    z, x_T = model.propagate(initial_latents(model, noise), model.T, model.eps), noise * model.T
    full = model.decode(z, x_T)
    out = {}
    for reading in READINGS:
        bands = {}
        for b in BANDS:
            kept = project(model.propagator, z, b, reading=reading)
            contribution = full - model.decode([a - k for a, k in zip(z, kept, strict=True)], x_T)
            spectrum, contribution_spectrum = (
                radial_power_spectrum(model.decode(kept, x_T)),
                radial_power_spectrum(contribution),
            )
            bands[b] = spectrum_summary(spectrum)
            bands[b]["contribution_centroid"] = spectrum_summary(contribution_spectrum)["centroid"]
            bands[b]["spectrum"] = figures.to_list(spectrum)
            bands[b]["contribution_spectrum"] = figures.to_list(contribution_spectrum)
        out[reading] = {
            **bands,
            "spread": bands["high"]["centroid"] - bands["low"]["centroid"],
            "contribution_spread": bands["high"]["contribution_centroid"] - bands["low"]["contribution_centroid"],
        }
    return out


def default_times(T: float, eps: float, num: int = 12) -> Tensor:
    """`num` times from T down to eps, evenly spaced in log t (EDM's time spans four and a half decades)."""
    return torch.logspace(math.log10(T), math.log10(eps), num, dtype=torch.float64)


@torch.no_grad()
def analyze(model, noise: Tensor, out_dir: str | Path, *, num_times: int = 12) -> dict:
    """Every figure and table of the spectral analysis into out_dir; returns the summary (also analysis.json)."""
    out_dir = Path(out_dir)
    propagator = model.propagator
    written = [plot_eigenvalues(propagator.eigenvalues(), out_dir / "eigenvalues.png")]
    written.append(plot_eigenvalue_maps(propagator.eigenvalues(), out_dir / "eigenvalue_maps.png"))

    images = band_images(model, noise)
    levels = len(propagator.level_shapes)
    rows = ["all levels", *[f"level {l} ({'x'.join(map(str, propagator.level_shapes[l][1:]))})" for l in range(levels)]]
    cells = [[images["full"][""]] + [images["decode"][f"{b}/{r}"] for b in BANDS] for r in ["all", *range(levels)]]
    fig = figures.image_table(cells, rows, ["full", *[f"{b} band only" for b in BANDS]], "Band-masked decodes")
    written.append(figures.save_figure(fig, out_dir / "bands.png"))
    contributions = [images["contribution"][f"{b}/all"] for b in BANDS]
    scale = max(float(c.abs().max()) for c in contributions) or 1.0  # one scale for all bands: sizes compare
    cells = [[images["full"][""]] + [c / scale for c in contributions]]
    fig = figures.image_table(
        cells,
        ["all levels"],
        ["full", *[f"{b}: D(z) - D(z - band)" for b in BANDS]],
        f"Band contributions (gray = 0, white / black = +-{scale:.2g})",
    )
    written.append(figures.save_figure(fig, out_dir / "band_contributions.png"))

    times = default_times(model.T, model.eps, num_times)
    effect = cumulative_effect(model, noise, times)
    written.append(plot_cumulative(times, effect, out_dir / "cumulative.png"))
    strips = [[effect[f"{b}/decodes"][i, :4] for i in range(0, num_times, max(1, num_times // 6))] for b in BANDS]
    labels = [f"t={times[i]:.3g}" for i in range(0, num_times, max(1, num_times // 6))]
    fig = figures.image_table(strips, list(BANDS), labels, "Each band rewound to time t (the rest at eps)", nrow=2)
    written.append(figures.save_figure(fig, out_dir / "cumulative_decodes.png"))

    spectra = {"full": radial_power_spectrum(images["full"][""])}
    for b in BANDS:
        spectra[f"{b} decode"] = radial_power_spectrum(images["decode"][f"{b}/all"])
        spectra[f"{b} contribution"] = radial_power_spectrum(images["contribution"][f"{b}/all"])
    written.append(plot_spectra(spectra, out_dir / "power_spectrum.png"))
    summary = {
        "bands": {name: {**spectrum_summary(s), "spectrum": figures.to_list(s)} for name, s in spectra.items()},
        "cumulative": {"times": figures.to_list(times), **{b: figures.to_list(effect[b]) for b in BANDS}},
        "eigenvalues": eigenvalue_summary(propagator.eigenvalues()),
    }
    thirds = [
        f"{int(part[0])}-{int(part[-1])}" for part in torch.tensor_split(torch.arange(1, len(spectra["full"])), 3)
    ]
    table = figures.markdown_table(
        ["image", "centroid (cycles/image)", *[f"power share, {f} cycles/image" for f in thirds]],
        [
            [name, s["centroid"], s["power_low"], s["power_middle"], s["power_high"]]
            for name, s in summary["bands"].items()
        ],
    )
    report = (
        "# Spectral analysis\n\nWhich image frequencies each Koopman band carries: radially averaged power spectra "
        "of the decodes with one band kept (all levels) and of each band's contribution D(z) - D(z - band); "
        "centroid and power fractions exclude the DC term. Bands: the eigenvalues, cut at the 1/3 "
        f"and 2/3 quantiles per level, read as {propagator.band_reading} (alpha: the real part; rate: |beta|).\n\n"
        + table
    )
    summary["readings"] = band_correspondence(model, noise)
    report += "\n" + correspondence_table(summary["readings"], propagator.band_reading)
    for reading, bands in summary["readings"].items():  # the spectra of the bands under each reading
        spectra = {"full": spectra["full"]}
        for b in BANDS:
            spectra[f"{b} decode"] = torch.tensor(bands[b]["spectrum"], dtype=torch.float64)
            spectra[f"{b} contribution"] = torch.tensor(bands[b]["contribution_spectrum"], dtype=torch.float64)
        title = f"Bands by {'alpha' if reading == 'alpha' else '|beta|'}: decodes (solid), contributions (dashed)"
        written.append(plot_spectra(spectra, out_dir / f"power_spectrum_{reading}.png", title))
    written.append(figures.atomic_write(out_dir / "analysis.md", report))
    written.append(figures.write_json(out_dir / "analysis.json", summary))
    summary["written"] = [str(p) for p in written]
    return summary


def correspondence_table(readings: dict[str, dict], used: str) -> str:
    columns = ("centroid", "power_low", "power_middle", "power_high", "contribution_centroid")
    rows = [
        [f"{reading} ({band})", *[r[band][c] for c in columns]] for reading, r in readings.items() for band in BANDS
    ]
    spreads = ", ".join(
        f"{reading} {r['spread']:.3g} (contributions {r['contribution_spread']:.3g})" for reading, r in readings.items()
    )
    return (
        "Band-to-frequency correspondence for each reading of the eigenvalues (bands cut on alpha, or on the rotation "
        f"rate |beta|; all-level band decodes and contributions). Centroid spread high - low: {spreads}. This model's "
        f"figures use `{used}`.\n\n"
        + figures.markdown_table(
            ["reading (band)", "centroid", "power low", "power middle", "power high", "contribution centroid"], rows
        )  # fmt: skip
    )


def eigenvalue_summary(eigenvalues: list[Tensor]) -> list[dict]:
    return [
        {
            "level": l,
            "count": e.numel(),
            "alpha_quantiles": figures.to_list(
                torch.quantile(e.real.flatten().double(), torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
            ),
            "abs_beta_mean": float(e.imag.abs().mean()),
        }
        for l, e in enumerate(eigenvalues)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Plots


def plot_eigenvalues(eigenvalues: list[Tensor], path: Path) -> Path:
    plt = figures.plt
    levels = len(eigenvalues)
    fig, axes = plt.subplots(3, levels, figsize=(3.6 * levels, 9), squeeze=False)
    for l, e in enumerate(eigenvalues):
        a, b = e.real.flatten().cpu().numpy(), e.imag.flatten().cpu().numpy()
        ax = axes[0][l]
        ax.scatter(a, b, s=3, alpha=0.4)
        ax.scatter(a, -b, s=3, alpha=0.15, color="tab:orange", label="conjugates" if l == 0 else None)
        ax.axvline(0, color="gray", lw=0.5)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set(title=f"level {l}: eigenvalues ({len(a)})", xlabel="real part alpha", ylabel="imaginary part beta")
        axes[1][l].hist(a, bins=50, color="tab:blue")
        axes[1][l].set(title=f"level {l}: real parts", xlabel="alpha", ylabel="count")
        axes[2][l].hist(b, bins=50, color="tab:green")
        axes[2][l].set(title=f"level {l}: imaginary parts", xlabel="beta", ylabel="count")
    if levels:
        axes[0][0].legend(fontsize=8)
    fig.suptitle("Koopman generator eigenvalues alpha + i beta per level (all positions)")
    fig.tight_layout()
    return figures.save_figure(fig, path)


def plot_eigenvalue_maps(eigenvalues: list[Tensor], path: Path) -> Path:
    """Per level, the mean real part and mean |imaginary part| over components at each spatial position."""
    plt = figures.plt
    levels = len(eigenvalues)
    fig, axes = plt.subplots(2, levels, figsize=(3.4 * levels, 6), squeeze=False)
    for l, e in enumerate(eigenvalues):
        if e.dim() < 3:
            e = e.reshape(-1, 1, 1)  # shared over positions: one value
        for row, (values, name) in enumerate(((e.real, "mean alpha"), (e.imag.abs(), "mean |beta|"))):
            ax = axes[row][l]
            values = values.mean(0).cpu().numpy()
            if row:
                im = ax.imshow(values, cmap="viridis")
            else:  # diverging, centred on alpha = 0 (neither growth nor decay)
                limit = float(abs(values).max()) or 1.0
                im = ax.imshow(values, cmap="coolwarm", vmin=-limit, vmax=limit)
            fig.colorbar(im, ax=ax, fraction=0.046, format="%.2g")
            ax.set(title=f"level {l}: {name}", xlabel="x (position)", ylabel="y (position)")
    fig.suptitle("Spatial maps of the eigenvalues (mean over the components at each position)")
    fig.tight_layout()
    return figures.save_figure(fig, path)


def plot_cumulative(times: Tensor, effect: dict[str, Tensor], path: Path) -> Path:
    plt = figures.plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for band in BANDS:
        ax.plot(times.numpy(), effect[band].cpu().numpy(), marker="o", ms=3, label=f"{band} band")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set(
        xlabel="time t (from T to eps, log scale)",
        ylabel="progress: 1 - |x_b(t) - x_eps| / |x_b(T) - x_eps|",
        title="Cumulative effect of each band along the trajectory",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    return figures.save_figure(fig, path)


def plot_spectra(spectra: dict[str, Tensor], path: Path, title: str | None = None) -> Path:
    plt = figures.plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = {"low": "tab:blue", "middle": "tab:orange", "high": "tab:green"}
    for name, s in spectra.items():
        band = name.split()[0]
        style = dict(color="black", lw=2) if name == "full" else dict(color=colours[band])
        ax.plot(range(1, len(s)), s[1:].clamp(min=1e-12).numpy(), ls="--" if "contribution" in name else "-",
                label=name, **style)  # fmt: skip
    ax.set_yscale("log")
    ax.set(xlabel="spatial frequency (cycles per image)", ylabel="radially averaged power",
           title=title or "Power spectra of band decodes (solid) and band contributions (dashed)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figures.save_figure(fig, path)
