"""`hkd eval`: the comparison table of HKD against its teacher and the one-step baseline, and its report (tables as
Markdown and JSON, the trajectory on held-out teacher trajectories from hkd.faithfulness). The metrics themselves are
in hkd.metrics.

Images are float tensors (N, C, H, W) in the model's pixel range [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from hkd import feature_space
from hkd.edm import euler_sampler, heun_sampler
from hkd.losses import pseudo_huber
from hkd.metrics import digits_metrics, fid

# ---------------------------------------------------------------------------------------------------------------
# `hkd eval`: the comparison table


def _batched(fn, noise: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(chunk).float().cpu() for chunk in noise.split(batch_size)])


@torch.no_grad()
def one_step(model, noise: Tensor, batch_size: int = 256) -> Tensor:
    """HKD's one-step images from standard-normal noise."""
    device = next(model.parameters()).device
    return _batched(lambda n: model.generate(n.to(device)), noise, batch_size)


@torch.no_grad()
def teacher_samples(teacher, noise: Tensor, num_steps: int, batch_size: int = 256) -> Tensor:
    """The teacher's Heun endpoint (2 num_steps - 1 evaluations) from standard-normal noise."""
    device = next(teacher.parameters()).device
    return _batched(lambda n: heun_sampler(teacher, n.to(device), num_steps)[1][-1], noise, batch_size)


@torch.no_grad()
def teacher_euler(teacher, noise: Tensor, num_steps: int, batch_size: int = 256) -> Tensor:
    """The teacher's few-step baseline: hkd.edm.euler_sampler, num_steps evaluations, from standard-normal noise."""
    device = next(teacher.parameters()).device
    return _batched(lambda n: euler_sampler(teacher, n.to(device), num_steps), noise, batch_size)


def sample_metrics(
    images: Tensor, teacher_endpoint: Tensor, *, inception_weights=None, reference=None, lpips=None
) -> dict:
    """Every metric that applies: the Frechet distance in the feature space of the images' shape (hkd.feature_space:
    the digits metrics for 1x16x16, fd_photos for 3x16x16), else FID; FID too when Inception weights are given;
    teacher fidelity. `reference`: the real images for FD / FID (default: the feature space's), or FID reference
    statistics (mu, sigma)."""
    out = {}
    space = feature_space.space_for(images.shape[1:])
    real = reference if isinstance(reference, Tensor) else None
    if tuple(images.shape[1:]) == (1, 16, 16):
        out.update(digits_metrics(images, real))
    elif space is not None:
        out[space.metric] = space.distance(images, real)
    if inception_weights is not None or space is None:
        if reference is None:
            raise ValueError("FID needs reference images (the dataset) for images other than the embedded digits")
        out["fid"] = fid(images, reference, weights=inception_weights)
    out.update(teacher_fidelity(images, teacher_endpoint, lpips))
    return out


METRICS = {  # column: what it measures; a table's notes define the columns it has, and say which quality metric
    "fd_digits": "Frechet distance in the digits classifier's 64-d feature space to the embedded digits (lower is "
    "better)",
    "fd_photos": "Frechet distance in the photos classifier's 128-d feature space (which photo and which third of its "
    "rows a patch comes from, hkd.feature_space) to 5000 training patches (lower is better)",
    "recognisable": "fraction of samples classified with confidence >= 0.9",
    "class_entropy": "entropy of the predicted classes (log 10 = 2.30 for all ten digits equally often)",
    "fid": "Frechet Inception distance to the FID reference (--reference): torch-fidelity's Inception-v3 pool3 "
    "features of the images quantised to uint8 as EDM does (lower is better; FID-50k needs 50,000 samples)",
    "mse": "mean squared distance to the teacher's 35-evaluation endpoint for the same noise (lower is closer)",
    "pseudo_huber": "pseudo-Huber distance to that endpoint",
    "feature_distance": "distance to that endpoint in the classifier's feature space (digits or photos, "
    "hkd.feature_space)",
    "lpips": "LPIPS (AlexNet) distance to that endpoint",
}
COLUMNS = tuple(METRICS)


def metric_notes(columns) -> str:
    """The sentence that names a table's sample-quality metric, then the definition of each metric column it has."""
    quality = [name for name in ("FID", "fd_digits", "fd_photos") if name.lower() in columns]
    head = f"Sample quality: {' and '.join(quality)}. " if quality else ""
    return head + "; ".join(f"{c}: {METRICS[c]}" for c in COLUMNS if c in columns) + "."


def write_table(rows: list[dict], out_dir: str | Path, name: str, title: str, notes: str = "") -> list[Path]:
    """rows: dicts with "name", "evaluations" and metric keys; written as NAME.md (the notes, then what each metric
    column measures, then the table) and NAME.json (atomically)."""
    from hkd import figures

    extra = [k for k in rows[0] if k not in ("name", "evaluations", *COLUMNS)] if rows else []
    columns = [c for c in COLUMNS if any(c in row for row in rows)] + extra
    header = ["model", "evaluations", *columns]
    table = figures.markdown_table(
        header, [[r["name"], r.get("evaluations"), *[r.get(c) for c in columns]] for r in rows]
    )
    out_dir = Path(out_dir)
    notes = f"{notes} {metric_notes(columns)}".strip()
    return [
        figures.atomic_write(out_dir / f"{name}.md", f"# {title}\n\n{notes}\n\n{table}"),
        figures.write_json(out_dir / f"{name}.json", rows),
    ]


def evaluate(
    model,
    teacher,
    *,
    baseline=None,
    num: int = 500,
    seed: int = 0,
    few_steps: int = 3,
    inception_weights=None,
    lpips_weights=None,
    reference: Tensor | None = None,
    out_dir: str | Path = "runs/eval",
) -> tuple[list[dict], list[Path]]:
    """The `hkd eval` table: teacher at 35 (Heun) and at few_steps (Euler) evaluations, HKD one step, the direct
    regression baseline (a model trained with model.koopman=false and train.consistency=false), same noise.
    lpips_weights: torchvision's AlexNet ImageNet file, to add LPIPS to the teacher-fidelity columns."""
    from hkd.losses import LPIPS

    lpips = LPIPS("alex", lpips_weights) if lpips_weights is not None else None
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    noise = torch.randn(num, *shape, generator=torch.Generator().manual_seed(seed))
    endpoint = teacher_samples(teacher, noise, 18)
    candidates = [("teacher (Heun, 18 steps)", 35, endpoint)]
    candidates.append((f"teacher (Euler, {few_steps} steps)", few_steps, teacher_euler(teacher, noise, few_steps)))
    candidates.append(("HKD (one step)", 1, one_step(model, noise)))
    if baseline is not None:
        candidates.append(("direct regression baseline (one step)", 1, one_step(baseline, noise)))
    rows = [
        {
            "name": name,
            "evaluations": evaluations,
            **sample_metrics(images, endpoint, inception_weights=inception_weights, reference=reference, lpips=lpips),
        }
        for name, evaluations, images in candidates
    ]
    notes = f"{num} samples, noise seed {seed}."
    written = write_table(rows, out_dir, "eval", "HKD against its teacher and the one-step baseline", notes)
    from hkd import faithfulness  # the trajectory on held-out teacher trajectories (noise seed + 1)

    models = {"HKD": model} | ({"direct regression baseline": baseline} if baseline is not None else {})
    return rows, written + faithfulness.run(models, teacher, num=min(num, 64), seed=seed + 1, out_dir=out_dir)


def teacher_fidelity(images: Tensor, teacher_images: Tensor, lpips=None) -> dict[str, float]:
    """Distances between a model's images and the teacher's endpoints for the same noise (lower is closer).
    `lpips`: an hkd.losses.LPIPS (its backbone from a local file) to add LPIPS, per-sample distances (B,)."""
    if images.shape != teacher_images.shape:
        raise ValueError(f"teacher fidelity: shapes differ, {tuple(images.shape)} vs {tuple(teacher_images.shape)}")
    images, teacher_images = images.detach().float().cpu(), teacher_images.detach().float().cpu()
    out = {
        "mse": float((images - teacher_images).square().mean()),
        "pseudo_huber": float(pseudo_huber(images, teacher_images).mean()),
    }
    space = feature_space.space_for(images.shape[1:])
    if space is not None:  # perceptual distance in the classifier's feature space (hkd.feature_space)
        a, b = space.features(images), space.features(teacher_images)
        out["feature_distance"] = float((a - b).square().sum(1).sqrt().mean())
    if lpips is not None:
        with torch.no_grad():
            pairs = zip(images.split(64), teacher_images.split(64), strict=True)
            out["lpips"] = float(torch.cat([lpips(x, y).float().cpu() for x, y in pairs]).mean())
    return out
