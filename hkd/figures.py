"""Plotting helpers shared by the analysis, editing and evaluation commands (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from hkd.files import atomic_write  # noqa: E402 (also hkd.figures.atomic_write, as before)
from hkd.image_grid import tile_array  # noqa: E402


def write_json(path: str | os.PathLike, obj) -> Path:
    """obj as strict JSON (a NaN or an infinity, e.g. a ratio undefined at t = T, is written as null)."""
    return atomic_write(path, json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n")


def _strict(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _strict(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(value) for value in obj]
    return obj


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a figure as PNG atomically and close it."""
    try:
        return atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)


def tile(images: Tensor, nrow: int = 8, padding: int = 1) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] as one (H', W') or (H', W', 3) array in [0, 1] for imshow (white padding)."""
    grid = tile_array(((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy(), nrow, padding, fill=1.0)
    return grid[0] if len(grid) == 1 else grid.transpose(1, 2, 0)


def show_images(ax: plt.Axes, images: Tensor, title: str = "", nrow: int = 8) -> None:
    ax.imshow(tile(images, nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def image_table(
    cells: list[list[Tensor]], row_labels: list[str], col_labels: list[str], title: str, nrow: int = 4
) -> plt.Figure:
    """A figure with one image grid per (row, column), rows and columns labelled."""
    rows, cols = len(cells), len(cells[0])
    h, w = tile(cells[0][0], nrow).shape[:2]
    width = (2.4 if w >= 40 else 1.5) * min(1.0, w / h)  # inches per cell, keeping the grids' aspect
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols + 0.8, width * h / w * rows + 0.35 * rows + 0.6), squeeze=False
    )
    for i in range(rows):
        for j in range(cols):
            show_images(axes[i][j], cells[i][j], col_labels[j] if i == 0 else "", nrow)
        axes[i][0].set_ylabel(row_labels[i], fontsize=9)
    fig.suptitle(title)
    return fig


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_list(x: Tensor) -> list:
    return torch.as_tensor(x).detach().cpu().tolist()
