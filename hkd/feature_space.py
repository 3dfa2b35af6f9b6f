"""Feature spaces for Frechet distances with no downloaded weights: a small classifier, trained deterministically on
an embedded dataset's own labels on first use and cached; its penultimate layer is the feature space.

* digits, 1x16x16: hkd.metrics' digit classifier (which digit), "fd_digits".
* photos, 3x16x16: PatchClassifier (which photo and which third of its rows a patch comes from: the 27 labels of
  hkd.data.photos), "fd_photos". 3x32x32 is CIFAR-10's shape, measured by FID: the photos' space is registered
  there only on request (use_photos(32), as `hkd demo --config photos data.resolution=32` does).

A Frechet distance needs features that respond to what makes images alike. Natural patches have no class, but they
have a source: telling 9 photos and their regions apart takes colour, texture, edges and scale, the things a
generator gets wrong, and the labels come free with every patch. Inception is the usual space, but it needs a
download and sees a 16x16 patch upscaled 19 times.

`space_for(shape)` gives the FeatureSpace of an image shape (C, H, W), or None (then FID applies).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hkd.metrics import TRAINER_SOURCE, cache_dir, cached, frechet_distance_features, recipe, train_classifier


@dataclass(frozen=True)
class FeatureSpace:
    metric: str  # the Frechet distance's column, e.g. "fd_photos"
    features: Callable[[Tensor], Tensor]  # images (N, C, H, W) in [-1, 1] -> (N, D)
    reference: Callable[[], Tensor]  # the real images the distance compares with by default

    def distance(self, images: Tensor, reference: Tensor | None = None) -> float:
        """The Frechet distance between the features of `images` and of `reference` (default: self.reference())."""
        real = self.reference() if reference is None else reference
        return frechet_distance_features(self.features(images), self.features(real))


SPACES: dict[tuple[int, ...], Callable[[], FeatureSpace]] = {}


def register(shape: tuple[int, ...], factory: Callable[[], FeatureSpace]) -> None:
    SPACES[tuple(shape)] = factory


def space_for(shape) -> FeatureSpace | None:
    """The feature space for images of `shape` (C, H, W), or None when there is none (FID then applies)."""
    factory = SPACES.get(tuple(int(s) for s in shape))
    return factory() if factory is not None else None


# ---------------------------------------------------------------------------------------------------------------
# The photos' feature space


class PatchClassifier(nn.Module):
    """A small CNN for 3xRxR patches (R = 16 or 32): stride-2 convolutions down to 4x4, then a 128-d layer (the
    feature space) and the class logits."""

    def __init__(self, resolution: int = 16, classes: int = 27, width: int = 32):
        super().__init__()
        layers, channels, size = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()], width, resolution
        while size > 4:
            layers += [nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU()]
            channels, size = 2 * channels, size // 2
        self.resolution = resolution
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)

    def features(self, images: Tensor) -> Tensor:
        shape = (3, self.resolution, self.resolution)
        if images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"the photos classifier takes (N, {', '.join(map(str, shape))}) images, got "
                             f"{tuple(images.shape)}")  # fmt: skip
        return self.body(images.float())

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


PHOTO_PATCHES, PHOTO_EPOCHS, PHOTO_SEED = 10000, 8, 12345  # the classifier's training draw (train split)
PHOTO_REFERENCE = 5000  # the reference draw of training patches (seed 2)
_PHOTOS: dict[int, PatchClassifier] = {}


def photos_classifier(resolution: int = 16) -> PatchClassifier:
    """The cached photos classifier at `resolution` (memory, then the cache folder, then trained: about a minute
    on one CPU thread)."""
    if resolution not in _PHOTOS:
        from hkd.data import photos

        images, labels = photos.load(resolution, PHOTO_PATCHES, seed=PHOTO_SEED)
        source = inspect.getsource(PatchClassifier) + TRAINER_SOURCE  # what fixes the weights
        key = recipe(images.numpy().tobytes(), f"{source}{PHOTO_EPOCHS}".encode())
        path = cache_dir() / f"photos_classifier_{resolution}_{key}.pt"
        classes = len(photos.SOURCES) * photos.ROW_BANDS
        build = lambda: PatchClassifier(resolution, classes)  # noqa: E731
        _PHOTOS[resolution] = cached(path, build, lambda: train_classifier(build, images, labels, epochs=PHOTO_EPOCHS))
    return _PHOTOS[resolution]


@functools.lru_cache(maxsize=2)
def photos_reference(resolution: int = 16) -> Tensor:
    """The real images fd_photos compares with: PHOTO_REFERENCE training-column patches (seed 2)."""
    from hkd.data import photos

    return photos.load(resolution, PHOTO_REFERENCE, seed=2)[0]


@torch.no_grad()
def photos_features(images: Tensor, batch_size: int = 512) -> Tensor:
    model = photos_classifier(images.shape[-1])
    return torch.cat([model.features(b.float().cpu()) for b in images.split(batch_size)])


@torch.no_grad()
def photos_accuracy(resolution: int = 16, num: int = 2000) -> dict[str, float]:
    """The classifier's accuracy (27 classes, chance 1/27) on fresh training-column patches and on held-out ones."""
    from hkd.data import photos

    model = photos_classifier(resolution)
    out = {}
    for split in photos.SPLITS:
        images, labels = photos.load(resolution, num, split=split, seed=3)
        out[split] = float((model(images).argmax(1) == labels).float().mean())
    return out


def photos_scale(resolution: int = 16, num: int = 500) -> str:
    """What fd_photos numbers mean, in Markdown: the classifier's accuracy, and the distance of `num` real patches
    (fresh training-column ones, held-out ones) and of simple corruptions of them to the reference."""
    from hkd.data import photos
    from hkd.figures import markdown_table

    space, accuracy = photos_space(resolution), photos_accuracy(resolution)
    train, test = (photos.load(resolution, num, split=split, seed=7)[0] for split in photos.SPLITS)
    rows = [
        ["real training-column patches (fresh crops)", space.distance(train)],
        ["real held-out patches (columns never trained on)", space.distance(test)],
        ["training patches blurred (3x3 box)", space.distance(F.avg_pool2d(train, 3, 1, 1, count_include_pad=False))],
        ["training patches in gray", space.distance(train.mean(1, keepdim=True).expand_as(train))],
        ["Gaussian noise", space.distance(torch.randn(train.shape, generator=torch.Generator().manual_seed(7)))],
    ]
    return (
        f"fd_photos: the Frechet distance in the {resolution}x{resolution} photos classifier's 128-d feature space "
        f"(hkd.feature_space) to {PHOTO_REFERENCE} training patches. The classifier tells the photo and the third "
        f"of its rows (27 classes, chance 3.7%): {accuracy['train']:.1%} right on fresh training-column patches, "
        f"{accuracy['test']:.1%} on held-out ones. The scale, from {num} images each:\n\n"
        + markdown_table(["images", "fd_photos"], rows)
    )


def photos_space(resolution: int = 16) -> FeatureSpace:
    return FeatureSpace("fd_photos", photos_features, lambda: photos_reference(resolution))


def use_photos(resolution: int) -> None:
    """Make the photos' space the one for 3 x resolution x resolution images (at 32, CIFAR-10's shape, on request)."""
    register((3, resolution, resolution), lambda: photos_space(resolution))


def _digits_space() -> FeatureSpace:
    from hkd import metrics

    return FeatureSpace("fd_digits", lambda x: metrics.digits_features(x)[0], lambda: metrics.digits_dataset()[0])


register((1, 16, 16), _digits_space)
use_photos(16)
