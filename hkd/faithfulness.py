"""Trajectory faithfulness: does the Koopman evolution follow the teacher's PF-ODE trajectory?

On held-out teacher trajectories {x_t} (Heun, from noise of a torch generator seed: never a store's numpy noise), at
every stored time t in (0, T], per level l:

    latent consistency    r_A(t) = ||exp((t - T) A) E(x_T) - E(x_t, t)|| / ||E(x_t, t)||
    no evolution (A = 0)  r_0(t) = ||E(x_T) - E(x_t, t)|| / ||E(x_t, t)||
    relative              r_A(t) / r_0(t)   (< 1: the evolution moves the latent towards the teacher's; undefined at T)
    endpoint consistency  d(D(exp((eps - t) A) E(x_t, t)), x_0), and d(D(E(x_t, t)), x_0) without the evolution
    decoded trajectory    MSE(D(exp((t - T) A) E(x_T)), D_teacher(x_t; t)), and MSE(D(E(x_T)), D_teacher(x_t; t))
                          without the evolution: does the decoded Koopman state follow the teacher's denoised estimate

with norms per sample over the level's (d, h, w) and ratios averaged over samples; "all" is the norm over every
level together. d is the mean squared error and the classifier's feature distance (hkd.feature_space: the digits'
or the photos' classifier, by the image shape).
For a model with koopman=false the evolution is the identity, so r_A = r_0.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from hkd.edm import heun_sampler


@torch.no_grad()
def teacher_trajectories(teacher, num: int = 64, seed: int = 1, num_steps: int = 18) -> tuple[Tensor, Tensor]:
    """Held-out trajectories: (times (K,) from T down to 0, states (K, num, C, H, W)), both float64 on the CPU."""
    shape = (num, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    device = next(teacher.parameters()).device
    times, states = heun_sampler(teacher, noise.to(device), num_steps)
    return times.cpu(), states.cpu()


def _norms(latents: list[Tensor]) -> Tensor:
    """Per-sample norms (levels + 1, B): each level's, then all levels together."""
    squares = torch.stack([z.double().flatten(1).square().sum(1) for z in latents])
    return torch.cat([squares, squares.sum(0, keepdim=True)]).sqrt()


def _endpoint_distances(images: Tensor, endpoint: Tensor) -> dict[str, float]:
    out = {"mse": float((images.double() - endpoint.double()).square().mean())}
    from hkd.feature_space import space_for

    space = space_for(images.shape[1:])
    if space is not None:
        a, b = space.features(images.float()), space.features(endpoint.float())
        out["feature_distance"] = float((a - b).square().sum(1).sqrt().mean())
    return out


@torch.no_grad()
def measure(model, times: Tensor, states: Tensor, teacher=None, batch_size: int = 256) -> list[dict]:
    """One row per stored time t > 0 (from T down): t, the ratios per level and for all levels, the relative ratio,
    and the endpoint distances with and without the evolution; with the teacher, also the decoded-trajectory MSE
    with and without the evolution. times (K,), states (K, B, C, H, W) as returned by teacher_trajectories
    (times[0] = T; the state at the smallest time is the endpoint x_0)."""
    device = next(model.parameters()).device
    last = int(times.argmin())
    endpoint = states[last].float()
    T = float(times[0])
    starts = [x_T.to(device, torch.float32) for x_T in states[0].split(batch_size)]
    initial = [model.encode(x_T, T) for x_T in starts]  # E(x_T)
    initial_decoded = [  # D(E(x_T))
        model.decode(z_T, x_T).float() if teacher is not None else None
        for z_T, x_T in zip(initial, starts, strict=True)
    ]
    rows = []
    for k in range(len(times)):
        t = float(times[k])
        if t <= 0:
            continue
        koopman, still, scale = [], [], []
        with_evolution, without, decoded, decoded_still = [], [], [], []
        for z_T, x_T, still_image, x_t in zip(
            initial, starts, initial_decoded, states[k].split(batch_size), strict=True
        ):
            x_t = x_t.to(device, torch.float32)
            z_t = model.encode(x_t, t)
            evolved = model.propagate(z_T, T, t)
            scale.append(_norms(z_t))
            koopman.append(_norms([a - b for a, b in zip(evolved, z_t, strict=True)]))
            still.append(_norms([a - b for a, b in zip(z_T, z_t, strict=True)]))
            with_evolution.append(model.decode(model.propagate(z_t, t, model.eps), x_t).float().cpu())
            without.append(model.decode(z_t, x_t).float().cpu())
            if teacher is not None:
                target = teacher(x_t, t).float()
                error = model.decode(evolved, x_T).float() - target
                decoded.append(error.double().square().flatten(1).mean(1).cpu())
                decoded_still.append((still_image - target).double().square().flatten(1).mean(1).cpu())
        scale, koopman, still = (torch.cat(v, 1) for v in (scale, koopman, still))
        scale = scale.clamp_min(1e-30)
        r_A, r_0 = (koopman / scale).mean(1), (still / scale).mean(1)
        row = {"t": t}
        for level in range(len(r_A)):
            name = "all" if level == len(r_A) - 1 else f"level{level}"
            row[f"ratio_{name}"], row[f"ratio_still_{name}"] = float(r_A[level]), float(r_0[level])
            row[f"relative_{name}"] = float(r_A[level] / r_0[level]) if k > 0 else math.nan
        for prefix, images in (("endpoint", with_evolution), ("endpoint_still", without)):
            for key, value in _endpoint_distances(torch.cat(images), endpoint).items():
                row[f"{prefix}_{key}"] = value
        if teacher is not None:
            row["decoded_mse"] = float(torch.cat(decoded).mean())
            row["decoded_still_mse"] = float(torch.cat(decoded_still).mean())
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict[str, float]:
    """Over the times below T: the mean and the largest relative ratio (all levels together), the fraction of times
    where the evolution beats no evolution, and the mean endpoint MSE with and without the evolution."""
    below = [r for r in rows if not math.isnan(r["relative_all"])]
    relative = torch.tensor([r["relative_all"] for r in below], dtype=torch.float64)
    return {
        "relative_mean": float(relative.mean()) if len(below) else math.nan,
        "relative_max": float(relative.max()) if len(below) else math.nan,
        "below_still": float((relative < 1).double().mean()) if len(below) else math.nan,
        "endpoint_mse_mean": float(torch.tensor([r["endpoint_mse"] for r in rows]).mean()),
        "endpoint_still_mse_mean": float(torch.tensor([r["endpoint_still_mse"] for r in rows]).mean()),
        **{
            f"{key}_mean": float(torch.tensor([r[key] for r in rows]).mean())
            for key in ("decoded_mse", "decoded_still_mse")
            if key in rows[0]
        },
    }


def figure(results: dict[str, list[dict]], path: str | Path) -> Path:
    """Curves over t (log axis): the relative latent ratio per level (first model) and for all levels (every
    model), and the endpoint MSE with and without the evolution."""
    from hkd import figures

    fig, axes = figures.plt.subplots(1, 4, figsize=(18, 3.8))
    first, first_rows = next(iter(results.items()))
    levels = sorted(k[len("relative_") :] for k in first_rows[0] if k.startswith("relative_level"))
    t = [r["t"] for r in first_rows]
    for level in levels:
        axes[0].plot(t, [r[f"relative_{level}"] for r in first_rows], marker=".", label=level)
    axes[0].set_title(f"{first}: r_A / r_0 per level", fontsize=9)
    for name, rows in results.items():
        t = [r["t"] for r in rows]
        axes[1].plot(t, [r["relative_all"] for r in rows], marker=".", label=name)
        axes[2].plot(t, [r["endpoint_mse"] for r in rows], marker=".", label=f"{name}: D(exp((eps - t) A) E(x_t))")
        axes[2].plot(t, [r["endpoint_still_mse"] for r in rows], ls="--", label=f"{name}: D(E(x_t))")
        if "decoded_mse" in rows[0]:
            axes[3].plot(t, [r["decoded_mse"] for r in rows], marker=".", label=f"{name}: D(exp((t - T) A) E(x_T))")
            axes[3].plot(t, [r["decoded_still_mse"] for r in rows], ls="--", label=f"{name}: D(E(x_T))")
    axes[1].set_title("latent consistency r_A / r_0, all levels (< 1: better than A = 0)", fontsize=9)
    axes[2].set_title("endpoint MSE to the teacher's x_0", fontsize=9)
    axes[3].set_title("decoded state MSE to the teacher's D(x_t; t)", fontsize=9)
    for ax in axes[:2]:
        ax.axhline(1.0, color="grey", lw=0.8)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("t (sigma)")
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    for ax in axes[1:]:
        ax.set_yscale("log")
    return figures.save_figure(fig, path)


@torch.no_grad()
def trajectory_figure(model, teacher, times: Tensor, states: Tensor, path: str | Path, num: int = 4, columns: int = 6):
    """For `num` held-out trajectories at `columns` stored times from T down: the teacher's state x_t, its denoised
    estimate D_teacher(x_t; t), and HKD's decoded Koopman state D(exp((t - T) A) E(x_T)), side by side."""
    from hkd import figures

    device, num = next(model.parameters()).device, min(num, states.shape[1])
    positive = [k for k in range(len(times)) if times[k] > 0]
    picked = [positive[round(i * (len(positive) - 1) / max(columns - 1, 1))] for i in range(columns)]
    x_T = states[0, :num].to(device, torch.float32)
    z_T = model.encode(x_T, float(times[0]))
    cells = [[], [], []]
    for k in picked:
        t, x_t = float(times[k]), states[k, :num].to(device, torch.float32)
        cells[0].append((x_t / (1 + t)).cpu())  # scaled into view: x_t = x_0 + t n
        cells[1].append(teacher(x_t, t).float().cpu())
        cells[2].append(model.decode(model.propagate(z_T, float(times[0]), t), x_T).float().cpu())
    rows = ["teacher x_t/(1+t)", "teacher D(x_t; t)", "HKD D(e^((t-T)A) E(x_T))"]
    fig = figures.image_table(cells, rows, [f"t = {float(times[k]):.3g}" for k in picked], "Trajectories", nrow=2)
    return figures.save_figure(fig, path)


def run(models: dict, teacher, *, num: int = 64, seed: int = 1, out_dir: str | Path = "runs/eval") -> list[Path]:
    """faithfulness.md, faithfulness.json and faithfulness.png in out_dir for each named model, on `num` held-out
    trajectories of `teacher` from noise seed `seed`."""
    from hkd import figures

    times, states = teacher_trajectories(teacher, num, seed)
    results = {name: measure(model, times, states, teacher) for name, model in models.items()}
    out_dir = Path(out_dir)
    parts = [
        "# Trajectory faithfulness",
        f"{num} held-out teacher trajectories (Heun, 18 steps, torch noise seed {seed}). r_A = ||exp((t - T) A) "
        "E(x_T) - E(x_t, t)|| / ||E(x_t, t)||, r_0 the same with A = 0 (no evolution); relative = r_A / r_0 (below 1: "
        "the evolution moves the latents towards the encoding of the teacher's state). endpoint: MSE from "
        "D(exp((eps - t) A) E(x_t, t)) to the teacher's endpoint; endpoint_still: from D(E(x_t, t)). decoded: MSE from "
        "the decoded Koopman state D(exp((t - T) A) E(x_T)) to the teacher's denoised estimate D(x_t; t); "
        "decoded_still: from D(E(x_T)) (no evolution).",
    ]
    for name, rows in results.items():
        s = summary(rows)
        parts.append(f"### {name}\n\n" + ", ".join(f"{k} {v:.4g}" for k, v in s.items()))
        columns = ["t", "ratio_all", "ratio_still_all", "relative_all"]
        columns += [k for k in rows[0] if k.startswith("relative_level")]
        columns += [k for k in rows[0] if k.startswith(("endpoint", "decoded"))]
        parts.append(figures.markdown_table(columns, [[r[c] for c in columns] for r in rows]))
    summaries = {name: summary(rows) for name, rows in results.items()}
    return [
        figures.atomic_write(out_dir / "faithfulness.md", "\n\n".join(parts) + "\n"),
        figures.write_json(out_dir / "faithfulness.json", {"summary": summaries, "rows": results}),
        figure(results, out_dir / "faithfulness.png"),
        trajectory_figure(next(iter(models.values())), teacher, times, states, out_dir / "trajectories.png"),
    ]
