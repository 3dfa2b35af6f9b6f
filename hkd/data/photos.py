"""The embedded natural-image dataset: RGB patches of the colour photographs that scikit-image ships inside its wheel
(nothing is downloaded; `pip install 'hkd[photos]'`).

Each photo is split once by its columns: the left three quarters are the training region, the right quarter the
held-out region, so a training patch and a held-out patch never share a pixel. A patch is a square crop of side
resolution * s, s drawn from SCALES, at a uniform position inside its region, resized to resolution x resolution
(bilinear with antialiasing), flipped left-right with probability 1/2. The photo is drawn uniformly, so every
photo gives as many patches whatever its size. Everything is a function of the seed.

A patch's label is (photo, row band): which photo and which third of its rows (top, middle, bottom) the crop's centre
lies in. Held-out patches have the same labels, from the same rows of the held-out columns.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hkd.errors import MissingExtraError

# name -> file in skimage.data's folder (skimage.data.<name>() reads the same file)
SOURCES = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
}
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)  # crop side / resolution
HELD_OUT = 0.25  # the right-most quarter of each photo's columns
ROW_BANDS = 3
SPLITS = ("train", "test")


def data_dir() -> Path:
    """scikit-image's bundled data folder; a one-line error (with the install command) when it is not installed."""
    try:
        import skimage.data
    except ImportError:
        raise MissingExtraError(
            "the photos dataset needs scikit-image (its bundled photographs): pip install 'hkd[photos]'"
        ) from None
    return Path(skimage.data.__file__).parent


@functools.lru_cache(maxsize=1)
def photos() -> tuple[Tensor, ...]:
    """Every photo of SOURCES as a float32 tensor (3, H, W) in [-1, 1], in SOURCES' order (read once per process)."""
    import numpy as np
    from PIL import Image

    folder, out = data_dir(), []
    for name, file in SOURCES.items():
        if not (folder / file).is_file():
            raise FileNotFoundError(f"scikit-image's {name} photo is missing: {folder / file}")
        with Image.open(folder / file) as image:
            pixels = np.asarray(image.convert("RGB"))
        out.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return tuple(out)


def region(photo: Tensor, split: str) -> Tensor:
    """The columns of `photo` (3, H, W) in `split`: train the left 1 - HELD_OUT, test the rest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cut = round(photo.shape[-1] * (1 - HELD_OUT))
    return photo[..., :cut] if split == "train" else photo[..., cut:]


def load(resolution: int = 16, num: int = 20000, *, split: str = "train", seed: int = 0) -> tuple[Tensor, Tensor]:
    """(patches (num, 3, resolution, resolution) float32 in [-1, 1], labels (num,) int64 = photo * ROW_BANDS + row
    band). The same arguments give the same patches; the test split draws from the held-out columns only."""
    if resolution < 1 or num < 0:
        raise ValueError(f"photos: resolution must be >= 1 and num >= 0, got {resolution}, {num}")
    sources = [region(p, split) for p in photos()]
    generator = torch.Generator().manual_seed(seed + (0 if split == "train" else 1_000_003))
    which = torch.randint(len(sources), (num,), generator=generator)
    scale = torch.randint(len(SCALES), (num,), generator=generator)
    u = torch.rand(num, 2, generator=generator)
    flip = torch.rand(num, generator=generator) < 0.5
    images = torch.empty(num, 3, resolution, resolution)
    labels = torch.empty(num, dtype=torch.long)
    for p, source in enumerate(sources):
        _, h, w = source.shape
        for s, factor in enumerate(SCALES):
            index = ((which == p) & (scale == s)).nonzero().flatten()
            size = min(round(resolution * factor), h, w)
            if not len(index):
                continue
            top = (u[index, 0] * (h - size + 1)).long()
            left = (u[index, 1] * (w - size + 1)).long()
            corners = zip(top.tolist(), left.tolist(), strict=True)
            crops = torch.stack([source[:, y : y + size, x : x + size] for y, x in corners])
            if size != resolution:
                crops = F.interpolate(crops, size=(resolution, resolution), mode="bilinear", antialias=True,
                                      align_corners=False)  # fmt: skip
            crops = torch.where(flip[index, None, None, None], crops.flip(-1), crops)
            images[index] = crops.clamp(-1, 1)
            band = ((top + size // 2) * ROW_BANDS // h).clamp(max=ROW_BANDS - 1)
            labels[index] = p * ROW_BANDS + band
    return images, labels
