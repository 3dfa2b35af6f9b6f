"""Evaluation metrics: FID (Inception, through torch-fidelity), the offline digits metrics, teacher fidelity
(the `hkd eval` table that reports them is hkd.evaluation).

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

import contextlib
import functools
import hashlib
import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hkd import files
from hkd.errors import CorruptFileError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_FEATURES = 2048  # pool3: the dimension of FID reference statistics
STATS_FORMAT = "hkd-fid-ref"  # the marker save_stats adds to its .npz (EDM's readers look at mu and sigma only)
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
    The file's zip records may declare no more bytes than the file holds (hkd.files.torch_load).

    The file is first read with torch.load(weights_only=True), so only a plain tensor file gets to torch-fidelity
    (whose own loader unpickles without that restriction)."""

    features = INCEPTION_FEATURES

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
            state = files.torch_load(self.path)
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
    """Reference statistics as EDM's `fid.py ref` writes them: an .npz with mu (D,) and sigma (D, D), plus the
    marker `format` = "hkd-fid-ref" (how `--overwrite` knows the file is hkd's)."""
    import numpy as np

    mu, sigma = mu.double().numpy(), sigma.double().numpy()
    return files.atomic_write(path, lambda file: np.savez(file, mu=mu, sigma=sigma, format=np.str_(STATS_FORMAT)))


def is_stats_file(path: str | os.PathLike) -> bool:
    """Whether `path` is reference statistics save_stats wrote (its marker), read without inflating anything."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("format.npy")
            if info.file_size > 4096:
                return False
            with archive.open(info) as file:
                return str(np.lib.format.read_array(file, allow_pickle=False)) == STATS_FORMAT
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return False


def load_stats(path: str | os.PathLike, features: int | None = None) -> tuple[Tensor, Tensor]:
    """(mu, sigma) from an .npz with mu (D,) and sigma (D, D) (EDM's fid.py ref, or save_stats); never unpickles.
    Checked before any sampling: D = `features` (None: any D up to Inception's), real floating-point arrays, finite
    values, sigma symmetric and positive semi-definite (a covariance). Each is a ValueError naming the file."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {str(path)!r} not found")
    d = features or INCEPTION_FEATURES
    files.check_archive(path, str(path), 8 * (d * d + d) + (1 << 16))  # a deflate bomb is refused unread
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"], data["sigma"]
    except (KeyError, ValueError, OSError, EOFError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"{path} is not FID reference statistics (an .npz with mu and sigma): {reason}") from None
    for name, array in (("mu", mu), ("sigma", sigma)):
        if array.dtype.kind != "f":
            raise ValueError(f"{path}: {name} is a {array.dtype} array, not floating-point numbers")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit (D,) and (D, D)")
    if features is not None and len(mu) != features:
        raise ValueError(f"{path}: statistics of {len(mu)} features; Inception's pool3 gives {features}")
    mu, sigma = torch.from_numpy(mu.astype(np.float64)), torch.from_numpy(sigma.astype(np.float64))
    if not (mu.isfinite().all() and sigma.isfinite().all()):
        raise ValueError(f"{path}: mu or sigma holds NaN or infinite values")
    scale = sigma.abs().max().clamp(min=1e-300)
    if (sigma - sigma.T).abs().max() > 1e-6 * scale:
        raise ValueError(f"{path}: sigma is not symmetric (not a covariance)")
    if torch.linalg.eigvalsh(sigma).min() < -1e-6 * scale:
        raise ValueError(f"{path}: sigma is not positive semi-definite (not a covariance)")
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


def reference_for(source: str, resolution: int, channels: int, weights=None, features=None) -> tuple[Tensor, Tensor]:
    """FID reference statistics from `source`: an .npz (mu, sigma; of `features` features when given), an image
    folder, or a config (name or YAML path) whose data section names the dataset; images are brought to the model's
    resolution and channels."""
    if str(source).endswith(".npz"):
        return load_stats(source, features)
    from hkd.data import images_from

    return inception_stats(images_from(source, resolution, channels), inception(weights), desc="FID reference")


# ---------------------------------------------------------------------------------------------------------------
# Training and caching a classifier


def train_classifier(build: Callable[[], nn.Module], images: Tensor, labels: Tensor, *, epochs: int, seed: int = 0,
                     lr: float = 3e-3, batch: int = 128) -> nn.Module:  # fmt: skip
    """build() (under the seed) trained by Adam on cross-entropy, batches of a fixed-seed permutation, each batch
    shifted by -1..1 pixels (robust to generated samples), on one thread: the same weights whatever the machine.
    Returns the model, frozen, in eval mode."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            model = build()
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            for _ in range(epochs):
                for index in torch.randperm(len(images)).split(batch):
                    shift = torch.randint(-1, 2, (2,)).tolist()
                    loss = F.cross_entropy(model(torch.roll(images[index], shift, dims=(2, 3))), labels[index])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        finally:
            torch.set_num_threads(threads)
    return model.eval().requires_grad_(False)


TRAINER_SOURCE = inspect.getsource(train_classifier)  # part of every cached classifier's recipe


def cache_dir() -> Path:
    return Path(os.environ.get("HKD_CACHE_DIR") or Path.home() / ".cache" / "hkd")


def recipe(*parts: bytes) -> str:
    """A cache file's key: a hash of what fixes the weights (the training pixels, the recipe's source)."""
    return hashlib.sha256(b"".join(parts)).hexdigest()[:16]


def cached(path: Path, build: Callable[[], nn.Module], train: Callable[[], nn.Module]) -> nn.Module:
    """build() with the weights in `path` (hkd.files: checksummed, weights only), else train() written there
    atomically. A corrupt or foreign cache file is replaced, never executed; a read-only place keeps it in memory."""
    from hkd import files
    from hkd.errors import UserError

    model = build()
    try:
        model.load_state_dict(files.load(path)["model"])
        return model.eval().requires_grad_(False)
    except (UserError, KeyError, RuntimeError, OSError):
        model = train()
        with contextlib.suppress(OSError, UserError):
            files.save(path, {"model": model.state_dict()})
        return model


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
    """Deterministic (fixed seed, one thread, holdout = every 5th image; train_classifier); about
    2 s on a CPU. Returns the model and its holdout accuracy."""
    images, labels = digits_dataset()
    holdout = torch.arange(len(images)) % 5 == 0
    model = train_classifier(DigitsClassifier, images[~holdout], labels[~holdout], epochs=epochs, seed=seed)
    with torch.no_grad():
        accuracy = (model(images[holdout]).argmax(1) == labels[holdout]).float().mean().item()
    return model, accuracy


_CLASSIFIER: DigitsClassifier | None = None


def classifier_cache() -> Path:
    """The classifier's cache file: its name covers the recipe and the exact pixels it was trained on."""
    images, _ = digits_dataset()
    key = recipe(images.numpy().tobytes(), Path(__file__).read_bytes(), TRAINER_SOURCE.encode())
    return cache_dir() / f"digits_classifier_{key}.pt"


def digits_classifier() -> DigitsClassifier:
    """The cached classifier (memory, then $HKD_CACHE_DIR or ~/.cache/hkd, then trained and written atomically;
    cached: a corrupt or foreign cache file is replaced, never executed)."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
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
