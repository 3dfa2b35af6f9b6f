"""Image datasets: the embedded digits, the embedded photo patches, an image folder, CIFAR-10 from disk.

`load_dataset(DataConfig)` returns a map-style Dataset of images (C, H, W) float32 in [-1, 1]. Nothing is ever
downloaded: a dataset that is not on disk is a FileNotFoundError that says where it was looked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from hkd.errors import MissingFileError
from hkd.sections import ConfigError, Section, available, read, section

NAMES = ("digits", "photos", "folder", "cifar10")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class DataConfig(Section, name="data"):
    """The `data` section. name: digits (embedded, default), photos (patches of scikit-image's bundled colour
    photographs, hkd.data.photos; `patches` of them), folder (images under `root`), cifar10 (torchvision's python
    version under `root`, never downloaded)."""

    name: str = "digits"
    resolution: int = 16
    channels: int = 1
    root: str | None = None
    patches: int = 20000

    def check(self) -> None:
        if self.name not in NAMES:
            raise ConfigError(f"unknown data.name {self.name!r} ({', '.join(NAMES)})")
        if self.name in ("folder", "cifar10") and not self.root:
            raise ConfigError(f"data.name={self.name} needs data.root (a folder on disk)")
        from hkd.unet import LIMITS

        limit = LIMITS["img_resolution"]
        self.require(1 <= self.resolution <= limit, "resolution", f"in [1, {limit}] (hkd's limit)")
        self.require(self.channels in (1, 3), "channels", "1 or 3")
        self.require(self.name != "digits" or self.channels == 1, "channels", "1 for the (grey) digits")
        self.require(self.name != "photos" or self.channels == 3, "channels", "3 for the (colour) photos")
        self.require(self.name != "photos" or self.resolution in (16, 32), "resolution", "16 or 32 for the photos")
        self.require(self.patches >= 1, "patches", ">= 1")
        if self.name == "cifar10":
            self.require(self.resolution == 32, "resolution", "32 for CIFAR-10")
            self.require(self.channels == 3, "channels", "3 for CIFAR-10")


class TensorImages(Dataset):
    """Images held in memory as one tensor (N, C, H, W)."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


class ImageFolder(Dataset):
    """Every image file under `root` (recursively, sorted), center-cropped to a square and resized to
    `resolution`, as `channels` = 1 (grey) or 3 (RGB) channels in [-1, 1]. Files are read lazily."""

    def __init__(self, root: str | Path, resolution: int, channels: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} not found")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(self.root)!r}")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3 for an image folder, got {channels}")
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as image:
            image = image.convert("L" if self.channels == 1 else "RGB")
            w, h = image.size
            s = min(w, h)
            image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
            x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = x.reshape(self.resolution, self.resolution, self.channels).permute(2, 0, 1)
        return x.float() / 127.5 - 1


def cifar10(root: str | Path) -> TensorImages:
    """CIFAR-10's 50000 training images (3, 32, 32) from torchvision's python version on disk."""
    import torchvision

    try:
        data = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"CIFAR-10 not found under {str(root)!r} (expected {str(Path(root) / 'cifar-10-batches-py')!r}, "
            "torchvision's python version; hkd never downloads it)"
        ) from error
    return TensorImages(torch.from_numpy(data.data).permute(0, 3, 1, 2).float() / 127.5 - 1)


def load_dataset(cfg: DataConfig) -> Dataset:
    """The images named by the `data` section, checked against its resolution and channels."""
    if cfg.name == "digits":
        from hkd.data import digits

        if cfg.channels != 1:
            raise ValueError(f"the digits are grey: data.channels must be 1, got {cfg.channels}")
        return TensorImages(digits.load(size=cfg.resolution)[0])
    if cfg.name == "photos":
        from hkd.data import photos

        return TensorImages(photos.load(cfg.resolution, cfg.patches)[0])
    if cfg.name in ("folder", "cifar10") and not cfg.root:
        raise ValueError(f"data.name={cfg.name} needs data.root (a folder on disk)")
    if cfg.name == "folder":
        return ImageFolder(cfg.root, cfg.resolution, cfg.channels)
    if cfg.name == "cifar10":
        if (cfg.resolution, cfg.channels) != (32, 3):
            raise ValueError(
                f"CIFAR-10 is 32x32 RGB: set data.resolution=32 data.channels=3 (got {cfg.resolution}, {cfg.channels})"
            )
        return cifar10(cfg.root)
    raise ValueError(f"unknown data.name {cfg.name!r} ({', '.join(NAMES)})")


def images_from(source: str | Path, resolution: int, channels: int) -> Dataset:
    """The images a command names by one word: an image folder (brought to resolution and channels), or a config
    (name or YAML path) whose data section names a dataset of exactly that resolution and channels."""
    if Path(source).is_dir():
        return ImageFolder(source, resolution, channels)
    named = available()
    if str(source) not in named and not Path(source).is_file():
        raise MissingFileError(
            f"{str(source)!r} is neither an image folder nor a config ({', '.join(named)} or a YAML path)"
        )
    data = section(read(source), "data", DataConfig)
    if (data.channels, data.resolution) != (channels, resolution):
        raise ValueError(
            f"{str(source)!r} has {data.channels}x{data.resolution}x{data.resolution} images, "
            f"the model makes {channels}x{resolution}x{resolution}"
        )
    return load_dataset(data)


def examples(cfg: DataConfig, num: int) -> Tensor:
    """`num` known images for editing (inpainting, colourisation): for the photos, held-out patches (columns no
    training patch touches); for the digits, every 97th image; otherwise the dataset's first images."""
    if cfg.name == "photos":
        from hkd.data import photos

        return photos.load(cfg.resolution, num, split="test", seed=1)[0]
    dataset = load_dataset(cfg)
    step = 97 if cfg.name == "digits" else 1
    return torch.stack([dataset[i] for i in range(0, min(len(dataset), step * num), step)][:num])
