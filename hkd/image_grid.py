"""Image grids as PNG (Pillow), for looking at samples: `save_grid(images, path, nrow)` (training, generation,
the demo and the figures all write their image grids here)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from hkd.files import atomic_write


def tile_array(x: np.ndarray, nrow: int, padding: int, fill) -> np.ndarray:
    """Images (N, C, H, W) as one (C, H', W') grid of `nrow` columns, `padding` pixels of `fill` around each."""
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = np.full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), fill, x.dtype)
    for i in range(n):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8, *, scale: int = 1, padding: int = 1) -> None:
    """Save images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG grid of `nrow` columns, each pixel repeated
    `scale` times (small images are easier to look at enlarged). Written atomically (temp file + os.replace)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid expects images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = tile_array(x.numpy(), nrow, padding, fill=0).repeat(scale, axis=1).repeat(scale, axis=2)
    image = Image.fromarray(grid[0] if len(grid) == 1 else grid.transpose(1, 2, 0))
    atomic_write(path, lambda file: image.save(file, format="PNG"))
