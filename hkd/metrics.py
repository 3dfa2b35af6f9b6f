"""Evaluation metrics: FID (Inception, through torch-fidelity), the offline digits metrics, teacher fidelity.

Images everywhere are float tensors (N, C, H, W) in the model's pixel range [-1, 1].

* FID: torch-fidelity's Inception-v3 (the TF-FID port). Nothing downloads at run time: its weights come from
  `weights=`, the environment variable HKD_INCEPTION_WEIGHTS, or torch's hub cache; otherwise a clear error
  says where to get the file and where to put it.
* Digits metrics (offline, for the embedded 16x16 digits): a small CNN classifier trained deterministically on
  scikit-learn's bundled digits on first use (about two seconds on a CPU) and cached. "FD-digits" is the
  Frechet distance between the classifier's penultimate features of two image sets; the recognisable rate is
  the fraction of samples the classifier assigns to one class with confidence >= 0.9.
* Teacher fidelity: MSE, pseudo-Huber and classifier-feature distance between HKD's one-step image and the
  teacher's ODE endpoint for the same noise.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from hkd import checkpoint, feature_space
from hkd.edm import euler_sampler, heun_sampler
from hkd.errors import CorruptFileError
from hkd.losses import pseudo_huber

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
CONFIDENT = 0.9  # a sample is "recognisable" when the classifier's top probability reaches this


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) covariance of features (N, D), in float64."""
    features = features.double().flatten(1)
    if features.shape[0] < 2:
        raise ValueError(f"Frechet statistics need at least 2 samples, got {features.shape[0]}")
    return features.mean(0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), through symmetric eigendecompositions (float64)."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma1)
    sqrt1 = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    cross = torch.linalg.eigvalsh(sqrt1 @ sigma2 @ sqrt1).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return float(value.clamp(min=0))


def frechet_distance_features(features1: Tensor, features2: Tensor) -> float:
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


# ---------------------------------------------------------------------------------------------------------------
# FID through torch-fidelity


def inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception-v3 weight file: `path`, else $HKD_INCEPTION_WEIGHTS, else torch's hub cache; never downloads."""
    candidates = [Path(p) for p in (path, os.environ.get("HKD_INCEPTION_WEIGHTS")) if p]
    if path is None:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"FID needs torch-fidelity's Inception-v3 weights ({INCEPTION_FILE}); looked in "
        f"{', '.join(map(str, candidates))}. Download {INCEPTION_URL} on a machine with network access and pass "
        "its path (--inception-weights PATH or HKD_INCEPTION_WEIGHTS=PATH), or put it in that hub folder. "
        "For the embedded digits use the offline metric instead (fd_digits)."
    )


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images as uint8, quantised as EDM does: floor(127.5 x + 128) clipped to [0, 255] (an image
    read from uint8 pixels comes back exactly)."""
    return (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class Inception(nn.Module):
    """torch-fidelity's FID Inception-v3 (the TF-FID port; pool3, 2048 features) with weights from a local file.

    The file is first read with torch.load(weights_only=True), so only a plain tensor file gets to torch-fidelity
    (whose own loader unpickles without that restriction)."""

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise ImportError(
                "FID needs torch-fidelity: pip install 'hkd[fid]' (or pip install torch-fidelity)"
            ) from error
        self.path = inception_weights(weights)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
                raise ValueError("not a state dict of tensors")
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(self.path)).eval()
        except Exception as error:
            message = f"{self.path} is not torch-fidelity's Inception-v3 weights file: {error}"
            raise CorruptFileError(message) from None

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (N, 2048) float64 of uint8 images (N, 1 or 3, H, W) (grey is repeated to RGB)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Inception takes uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        device = next(self.net.parameters()).device
        return self.net(images.expand(-1, 3, -1, -1).to(device))[0].double().cpu()


class FeatureStats:
    """Running mean and covariance of features, float64 (the sums EDM's fid.py keeps): add batches, then stats()."""

    def __init__(self):
        self.n, self.total, self.outer = 0, None, None

    def add(self, features: Tensor) -> None:
        features = features.double()
        if self.total is None:
            self.total, self.outer = features.new_zeros(features.shape[1]), features.new_zeros((features.shape[1],) * 2)
        self.n += features.shape[0]
        self.total += features.sum(0)
        self.outer += features.T @ features

    def stats(self) -> tuple[Tensor, Tensor]:
        """(mu, sigma), sigma the unbiased covariance (as np.cov)."""
        if self.n < 2:
            raise ValueError(f"Frechet statistics need at least 2 samples, got {self.n}")
        mu = self.total / self.n
        return mu, (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=total <= 1, leave=False)


def inception_stats(images, inception: Inception, *, batch_size: int = 250, desc: str = "Inception") -> tuple:
    """(mu, sigma) of the Inception features of `images`: a tensor (N, C, H, W) in [-1, 1], a Dataset of such
    images, or an iterable of batches; quantised to uint8 as EDM does, fed in batches with a progress bar."""
    if isinstance(images, Tensor):
        batches, total = images.split(batch_size), math.ceil(len(images) / batch_size)
    elif isinstance(images, torch.utils.data.Dataset):
        batches = torch.utils.data.DataLoader(images, batch_size=batch_size)
        total = len(batches)
    else:
        batches, total = images, 0
    stats = FeatureStats()
    for batch in _progress(batches, total, desc):
        stats.add(inception(to_uint8(batch)))
    return stats.stats()


def save_stats(path: str | os.PathLike, mu: Tensor, sigma: Tensor) -> Path:
    """Reference statistics as EDM's `fid.py ref` writes them: an .npz with mu (D,) and sigma (D, D)."""
    import numpy as np

    return checkpoint.atomic_write(
        path, lambda file: np.savez(file, mu=mu.double().numpy(), sigma=sigma.double().numpy())
    )


def load_stats(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """(mu, sigma) from an .npz with mu (D,) and sigma (D, D) (EDM's fid.py ref, or save_stats); never unpickles."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {str(path)!r} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["sigma"]).double()
    except (KeyError, ValueError, OSError) as error:
        raise ValueError(f"{path} is not FID reference statistics (an .npz with mu and sigma): {error}") from None
    if mu.dim() != 1 or tuple(sigma.shape) != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not fit (D,) and (D, D)")
    return mu, sigma


def fid(images: Tensor, reference, *, weights: str | os.PathLike | None = None, batch_size: int = 250) -> float:
    """FID of images (N, 1 or 3, H, W) in [-1, 1] against `reference`: images like them, or (mu, sigma) reference
    statistics (load_stats). torch-fidelity's Inception-v3 pool3 features, EDM's uint8 quantisation."""
    for name, value in (("images", images), ("reference", reference)):
        if isinstance(value, Tensor) and (value.dim() != 4 or value.shape[1] not in (1, 3)):
            raise ValueError(f"fid: {name} must be (N, 1 or 3, H, W), got {tuple(value.shape)}")
    network = inception(weights)
    if isinstance(reference, Tensor):
        reference = inception_stats(reference, network, batch_size=batch_size, desc="FID reference")
    mu, sigma = inception_stats(images, network, batch_size=batch_size, desc="FID samples")
    if mu.shape != reference[0].shape:
        raise ValueError(f"fid: reference statistics of {len(reference[0])} features, Inception gives {len(mu)}")
    return frechet_distance(mu, sigma, *reference)


def inception(weights: str | os.PathLike | None = None) -> Inception:
    """The FID Inception network of `weights` (see inception_weights), loaded once per file and process."""
    return _inception(str(inception_weights(weights)))


@functools.lru_cache(maxsize=1)
def _inception(path: str) -> Inception:
    inception = Inception(path)
    return inception.to("cuda") if torch.cuda.is_available() else inception


def reference_for(source: str, resolution: int, channels: int, weights=None) -> tuple[Tensor, Tensor]:
    """FID reference statistics from `source`: an .npz (mu, sigma), an image folder, or a config (name or YAML
    path) whose data section names the dataset; images are brought to the model's resolution and channels."""
    if str(source).endswith(".npz"):
        return load_stats(source)
    from hkd.data import images_from

    return inception_stats(images_from(source, resolution, channels), inception(weights), desc="FID reference")


# ---------------------------------------------------------------------------------------------------------------
# The offline digits classifier


def digits_dataset(size: int = 16) -> tuple[Tensor, Tensor]:
    """The embedded digits (hkd.data.digits): images (1797, 1, size, size) in [-1, 1] and labels."""
    from hkd.data import digits

    return digits.load(size=size)


class DigitsClassifier(nn.Module):
    """A small CNN for 1x16x16 digits; `features` is its 64-d penultimate layer (the Frechet feature space)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)

    def features(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 16, 16):
            raise ValueError(f"the digits classifier takes (N, 1, 16, 16) images in [-1, 1], got {tuple(images.shape)}")
        return self.body(images.float())

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def train_digits_classifier(epochs: int = 20, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Deterministic (fixed seed, one thread, holdout = every 5th image; hkd.feature_space.train_classifier); about
    2 s on a CPU. Returns the model and its holdout accuracy."""
    from hkd.feature_space import train_classifier

    images, labels = digits_dataset()
    holdout = torch.arange(len(images)) % 5 == 0
    model = train_classifier(DigitsClassifier, images[~holdout], labels[~holdout], epochs=epochs, seed=seed)
    with torch.no_grad():
        accuracy = (model(images[holdout]).argmax(1) == labels[holdout]).float().mean().item()
    return model, accuracy


_CLASSIFIER: DigitsClassifier | None = None


def classifier_cache() -> Path:
    """The classifier's cache file: its name covers the recipe and the exact pixels it was trained on."""
    from hkd.feature_space import TRAINER_SOURCE, cache_dir, recipe

    images, _ = digits_dataset()
    key = recipe(images.numpy().tobytes(), Path(__file__).read_bytes(), TRAINER_SOURCE.encode())
    return cache_dir() / f"digits_classifier_{key}.pt"


def digits_classifier() -> DigitsClassifier:
    """The cached classifier (memory, then $HKD_CACHE_DIR or ~/.cache/hkd, then trained and written atomically;
    hkd.feature_space.cached: a corrupt or foreign cache file is replaced, never executed)."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from hkd.feature_space import cached

        _CLASSIFIER = cached(classifier_cache(), DigitsClassifier, lambda: train_digits_classifier()[0])
    return _CLASSIFIER


@torch.no_grad()
def digits_features(images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Penultimate features (N, 64) and class probabilities (N, 10) of images (N, 1, 16, 16) in [-1, 1]."""
    model = digits_classifier()
    features = torch.cat([model.features(b.cpu()) for b in images.split(batch_size)])
    return features, model.head(features).softmax(1)


def digits_metrics(samples: Tensor, reference: Tensor | None = None) -> dict[str, float]:
    """FD-digits of samples against `reference` (default: the whole embedded dataset) and the recognisable rate."""
    features, probabilities = digits_features(samples)
    reference_features, _ = digits_features(digits_dataset()[0] if reference is None else reference)
    confidence = probabilities.max(1).values
    return {
        "fd_digits": frechet_distance_features(features, reference_features),
        "recognisable": float((confidence >= CONFIDENT).float().mean()),
        "class_entropy": float(_entropy(probabilities.argmax(1).bincount(minlength=10).float())),
    }


def _entropy(counts: Tensor) -> Tensor:
    """Entropy (nats) of the predicted-class histogram: log(10) = 2.30 when all classes are equally present."""
    p = counts / counts.sum()
    return -(p[p > 0] * p[p > 0].log()).sum()


# ---------------------------------------------------------------------------------------------------------------
# Teacher fidelity


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
