"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (1797 images, inside the wheel, no
download), upscaled to 16x16 by bilinear interpolation, 1 channel, pixels in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def load(size: int = 16) -> tuple[Tensor, Tensor]:
    """(images (1797, 1, size, size) float32 in [-1, 1], labels (1797,) int64)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).float().div(16).mul(2).sub(1)[:, None]  # 0..16 -> [-1, 1]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1), torch.from_numpy(data.target).long()
