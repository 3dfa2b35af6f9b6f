"""The backbone: a DDPM++-style U-Net (as in EDM), split into an encoder (down path) and a decoder (middle + up path).

The split is what HKD needs: the encoder's outputs are the hierarchical latents z^(l) that the Koopman generators
evolve, and the decoder turns (evolved) latents back into an image. `forward = decode(encode(x))`.

The latents (what `encode` returns, what `decode` consumes): one tensor per resolution level l = 0..L-1,
    z^(l) of shape (B, d_l, R / 2^l, R / 2^l),  L = len(channel_mult),
the channel-concatenation of every down-path output at that resolution, in order:
    level 0:  [input conv, block 0, ..., block n-1]         (n = num_blocks)
    level l:  [downsampling block, block 0, ..., block n-1]
These are exactly the U-Net's skip connections; the deepest level's last chunk is also the bottleneck, the input of
the middle blocks. `latent_chunks[l]` lists the chunk widths of level l (d_l = their sum), `latent_shapes` the
(d_l, h_l, w_l) per level. The up path has n + 1 blocks per level; each takes one chunk (from the last) as its skip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (fewer groups when the width is small)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (the noise label), `channels` wide."""

    def __init__(self, channels: int, max_positions: int = 10000):
        super().__init__()
        half = channels // 2
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()[:, None] * self.freqs[None, :]
        return torch.cat([x.cos(), x.sin()], dim=1)


class Attention(nn.Module):
    """Single-head self-attention over the spatial positions, residual (output projection initialised to zero)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv (+ noise embedding) -> GroupNorm -> SiLU -> dropout -> conv, residual, optionally
    resampling by 2 (nearest up / average-pool down) and followed by self-attention."""

    def __init__(self, in_channels, out_channels, emb_channels, *, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.up, self.down = up, down
        self.norm0 = group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, out_channels) if emb_channels else None
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        resample_or_widen = up or down or in_channels != out_channels
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if resample_or_widen else None
        self.attention = Attention(out_channels) if attention else None

    def resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = self.conv0(self.resample(F.silu(self.norm0(x))))
        if self.affine is not None:
            h = h + self.affine(emb)[:, :, None, None].to(h.dtype)
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        skip = self.resample(x)
        x = (h + (self.skip(skip) if self.skip is not None else skip)) * math.sqrt(0.5)
        if self.attention is not None:
            x = (x + self.attention(x)) * math.sqrt(0.5)
        return x


# The U-Net's architecture: the constructor arguments beyond image size and channels that a config section sets
ARCHITECTURE = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout", "stem_channels")


# The largest U-Net a config may declare. A config.json, an imported teacher or an EDM pickle is untrusted, and
# building its modules costs time and memory before any weight is read. EDM's and ADM's largest networks fit inside.
LIMITS = {
    "img_resolution": 8192, "in_channels": 64, "out_channels": 64, "model_channels": 4096, "channel_mult": 64,
    "levels": 10, "num_blocks": 32, "attn_resolutions": 10, "stem_channels": 16384, "label_dim": 100_000,
    "width": 16384,  # model_channels * max(channel_mult): the widest level's channels
}  # fmt: skip


def check_size(args: dict, where: str) -> None:
    """A ConfigError naming the key and its limit when the U-Net arguments `args` declare more than LIMITS allows,
    or a size that is not a positive integer (checked before anything is built)."""
    from hkd.errors import ConfigError, brief

    mult = args.get("channel_mult", (1,))
    sizes = {k: v for k, v in args.items() if k in LIMITS and k != "channel_mult"}
    if not isinstance(mult, (list, tuple)) or not mult or len(mult) > LIMITS["levels"]:
        raise ConfigError(f"{where}.channel_mult must be a list of 1 to {LIMITS['levels']} integers, got {brief(mult)}")
    if not isinstance(args.get("attn_resolutions", ()), (list, tuple)):
        raise ConfigError(f"{where}.attn_resolutions must be a list, got {brief(args['attn_resolutions'])}")
    sizes["attn_resolutions"] = len(args.get("attn_resolutions", ()))
    sizes |= {f"channel_mult[{i}]": m for i, m in enumerate(mult)}
    for key, value in sizes.items():
        limit = LIMITS[key.split("[")[0]]
        minimum = 0 if key in ("label_dim", "attn_resolutions") else 1
        if value is None and key == "stem_channels":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= limit:
            rule = f"an integer in [{minimum}, {limit}] (hkd's limit)"
            raise ConfigError(f"{where}.{key} must be {rule}, got {brief(value)}")
    width = args.get("model_channels", 1) * max(mult)
    if width > LIMITS["width"]:
        raise ConfigError(f"{where}: model_channels x max(channel_mult) = {width} channels, above hkd's limit of "
                          f"{LIMITS['width']}")  # fmt: skip


def architecture(section) -> dict:
    """The ARCHITECTURE fields that a config section (model, teacher) has, as UNet keyword arguments."""
    return {name: getattr(section, name) for name in ARCHITECTURE if hasattr(section, name)}


class UNet(nn.Module):
    """DDPM++-style U-Net: `forward(x, noise_labels)`, noise_labels (B,) = EDM c_noise = ln(sigma) / 4.

    channel_mult[l] * model_channels is the width at resolution img_resolution / 2^l; num_blocks residual blocks per
    level on the way down (num_blocks + 1 on the way up); self-attention after the blocks at the resolutions in
    attn_resolutions and in the middle. embed_noise=False drops the noise embedding (noise_labels ignored).
    stem_channels sets the input convolution's width (default channel_mult[0] * model_channels; EDM's SongUNet uses
    model_channels). label_dim > 0 makes it class-conditional: `forward(x, noise_labels, class_labels)`.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        model_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (),
        dropout: float = 0.0,
        embed_noise: bool = True,
        stem_channels: int | None = None,
        label_dim: int = 0,
    ):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or img_resolution % 2 ** (levels - 1):
            raise ValueError(
                f"img_resolution {img_resolution} must be divisible by 2^(levels - 1) = {2 ** (levels - 1)}"
            )
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.architecture = dict(  # the remaining constructor arguments, for copying weights between equal nets
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_blocks=num_blocks,
            attn_resolutions=tuple(attn_resolutions),
            dropout=dropout,
            embed_noise=embed_noise,
            stem_channels=stem_channels,
            label_dim=label_dim,
        )
        if label_dim and not embed_noise:
            raise ValueError("label_dim > 0 needs embed_noise=True (the class labels join the noise embedding)")
        emb = 4 * model_channels if embed_noise else 0
        if embed_noise:
            self.map_noise = PositionalEmbedding(model_channels)
            self.map_layer0 = nn.Linear(model_channels, emb)
            self.map_layer1 = nn.Linear(emb, emb)
        self.map_label = nn.Linear(label_dim, model_channels) if label_dim else None
        self.embed_noise, self.label_dim = embed_noise, label_dim

        # Down path: record each output's width; one chunk of the latent per output.
        self.enc = nn.ModuleDict()
        self.latent_chunks: list[list[int]] = []
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                width = stem_channels or model_channels * mult
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(cout, width, 3, padding=1)
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = ResBlock(cout, cout, emb, down=True, dropout=dropout)
            chunks = [cout]
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attention = res in attn_resolutions
                self.enc[f"{res}x{res}_block{i}"] = ResBlock(cin, cout, emb, attention=attention, dropout=dropout)
                chunks.append(cout)
            self.latent_chunks.append(chunks)
        self.latent_shapes = [
            (sum(chunks), img_resolution >> level, img_resolution >> level)
            for level, chunks in enumerate(self.latent_chunks)
        ]

        # Middle + up path: each block after the middle takes one skip chunk, deepest first.
        self.dec = nn.ModuleDict()
        skips = [c for chunks in self.latent_chunks for c in chunks]
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_mid0"] = ResBlock(cout, cout, emb, attention=True, dropout=dropout)
                self.dec[f"{res}x{res}_mid1"] = ResBlock(cout, cout, emb, dropout=dropout)
            else:
                self.dec[f"{res}x{res}_up"] = ResBlock(cout, cout, emb, up=True, dropout=dropout)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = ResBlock(cin, cout, emb, attention=attention, dropout=dropout)
        self.out_norm = group_norm(cout)
        self.out_conv = zero_init(nn.Conv2d(cout, out_channels, 3, padding=1))

    def embed(self, noise_labels: Tensor | None, class_labels: Tensor | None = None) -> Tensor | None:
        """The noise embedding fed to every block, (B, 4 * model_channels); None when embed_noise=False. With
        label_dim > 0, class_labels (B, label_dim) (one-hot; None: all zero) join it through map_label."""
        if not self.embed_noise:
            return None
        emb = self.map_noise(noise_labels.reshape(-1))
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.zeros(1, self.label_dim, device=emb.device)
            emb = emb + self.map_label(class_labels.float().reshape(-1, self.label_dim) * math.sqrt(self.label_dim))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def encode(self, x: Tensor, noise_labels: Tensor | None, class_labels: Tensor | None = None) -> list[Tensor]:
        """The down path: the latents, one (B, d_l, h_l, w_l) tensor per level (see the module docstring)."""
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet expects images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        emb = self.embed(noise_labels, class_labels)
        outputs = []
        for block in self.enc.values():
            x = block(x) if isinstance(block, nn.Conv2d) else block(x, emb)
            outputs.append(x)
        latents, start = [], 0
        for chunks in self.latent_chunks:
            latents.append(torch.cat(outputs[start : start + len(chunks)], dim=1))
            start += len(chunks)
        return latents

    def decode(self, latents: list[Tensor], noise_labels: Tensor | None, class_labels: Tensor | None = None) -> Tensor:
        """The middle and up path: an image (B, out_channels, R, R) from the latents `encode` returns."""
        if len(latents) != len(self.latent_shapes) or any(
            tuple(z.shape[1:]) != shape for z, shape in zip(latents, self.latent_shapes, strict=False)
        ):
            got = [tuple(z.shape[1:]) for z in latents]
            raise ValueError(f"UNet.decode expects latents of shapes {self.latent_shapes} (after the batch), got {got}")
        emb = self.embed(noise_labels, class_labels)
        skips = [
            s for z, chunks in zip(latents, self.latent_chunks, strict=True) for s in torch.split(z, chunks, dim=1)
        ]
        x = skips[-1]  # the bottleneck
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

    def forward(self, x: Tensor, noise_labels: Tensor | None, class_labels: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x, noise_labels, class_labels), noise_labels, class_labels)
