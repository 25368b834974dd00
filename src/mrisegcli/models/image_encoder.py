"""Continuous image features for the next-scale segmenter: (B, 1, S, S) -> (B, g*g, D).

The default :class:`ConvImageEncoder` is a small conv stack trained end to end with the
transformer: log2(patch) stride-2 4x4 convs (narrow at high resolution; ``stage_blocks``
residual blocks after each of the finer ones), residual blocks at the coarsest level, a 1x1
projection to ``out_dim`` and an RMSNorm per token. ``patch`` 8 or
16 gives a grid of S/8 or S/16 tokens per side.

Plugging in a pretrained encoder: anything that satisfies :class:`ImageEncoder` (an
``nn.Module`` with ``out_dim``, ``grid`` and ``__call__(image_B1SS) -> feats_BND``, N = grid**2,
tokens row-major) can be handed to ``NextScaleSegmenter(cfg, quantizer, encoder=...)``. A
wrapper around, say, a ViT would resize the image, repeat the grey channel to RGB, normalise
with the backbone's statistics and return its patch tokens without the class token; freeze it
with ``requires_grad_(False)`` or let it fine-tune. The segmenter projects ``out_dim`` to its
width and places the tokens on the ``grid`` (see ``docs/next_scale.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from mrisegcli.errors import ConfigError
from mrisegcli.models.transformer import RMSNorm


@runtime_checkable
class ImageEncoder(Protocol):
    """What the next-scale segmenter needs from an image encoder."""

    #: feature width D of every output token
    out_dim: int
    #: side g of the token grid: N = g * g tokens, row-major
    grid: int

    def __call__(self, image_B1SS: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) float in [0, 1] -> (B, g*g, D) features."""
        ...


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Shape of the default conv encoder (the image side S comes from the model config)."""

    patch: int = 8  # pixels per token side: grid = S / patch (8 or 16 are typical)
    channels: tuple[int, ...] = (32, 64, 128)  # width after each stride-2 stage (last repeats)
    res_blocks: int = 2  # residual blocks at the coarsest level
    out_dim: int = 128
    # residual blocks after each finer stride-2 stage (S/2 .. 2*patch): features the refiner's
    # skip connections read at those resolutions; 0 keeps one strided conv per stage
    stage_blocks: int = 0

    def __post_init__(self) -> None:
        n = math.log2(self.patch) if self.patch > 0 else -1.0
        if self.patch < 2 or n != int(n):
            raise ConfigError(f"encoder patch must be a power of two >= 2, got {self.patch}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"encoder channels must be positive, got {self.channels}")
        if self.res_blocks < 0 or self.stage_blocks < 0 or self.out_dim < 1:
            raise ConfigError(
                f"invalid encoder sizes: res_blocks={self.res_blocks}, "
                f"stage_blocks={self.stage_blocks}, out_dim={self.out_dim}"
            )

    def grid(self, image_size: int) -> int:
        """Token grid side for an S x S input (S must be a multiple of ``patch``)."""
        if image_size % self.patch:
            raise ConfigError(
                f"image_size {image_size} is not a multiple of encoder patch {self.patch}"
            )
        return image_size // self.patch


class _ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, ch), ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, ch), ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        return x_BChw + self.conv2(F.silu(self.norm2(h)))


class ConvImageEncoder(nn.Module):
    """Default trainable encoder: (B, 1, S, S) in [0, 1] -> (B, (S/patch)**2, out_dim)."""

    def __init__(self, cfg: ImageEncoderConfig, image_size: int) -> None:
        super().__init__()
        self.config = cfg
        self.image_size = image_size
        self.grid = cfg.grid(image_size)
        self.out_dim = cfg.out_dim
        n_down = int(math.log2(cfg.patch))
        layers: list[nn.Module] = []
        self._skip_after: list[int] = []  # index of the layer whose output is each skip map
        prev = 1
        for i in range(n_down):
            width = cfg.channels[min(i, len(cfg.channels) - 1)]
            layers += [nn.Conv2d(prev, width, 4, stride=2, padding=1), nn.SiLU()]
            if i < n_down - 1:
                layers += [_ResBlock(width) for _ in range(cfg.stage_blocks)]
                self._skip_after.append(len(layers) - 1)
            prev = width
        layers += [_ResBlock(prev) for _ in range(cfg.res_blocks)]
        self._skip_after.append(len(layers) - 1)  # the coarsest: after the residual blocks
        layers += [nn.SiLU(), nn.Conv2d(prev, cfg.out_dim, 1)]
        self.net = nn.Sequential(*layers)
        self.norm = RMSNorm(cfg.out_dim)

    def forward(self, image_B1SS: torch.Tensor) -> torch.Tensor:
        return self.pyramid(image_B1SS)[0]

    def skip_channels(self) -> list[int]:
        """Widths of :meth:`pyramid`'s feature maps, finest (S/2) to coarsest (S/patch)."""
        return [m.out_channels for m in self.net if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]

    def pyramid(self, image_B1SS: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (B, g*g, D) tokens and the conv feature maps after every stride-2 stage, finest
        (S/2) to coarsest (S/patch, after the residual blocks): the skip connections of a
        full-resolution mask decoder (:class:`mrisegcli.models.refiner.MaskRefiner`)."""
        S = self.image_size
        if image_B1SS.dim() != 4 or image_B1SS.shape[1:] != (1, S, S):
            raise ValueError(f"expected image (B, 1, {S}, {S}), got {tuple(image_B1SS.shape)}")
        x = image_B1SS * 2.0 - 1.0  # [0, 1] -> [-1, 1]
        skips: list[torch.Tensor] = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in self._skip_after:
                skips.append(x)
        return self.norm(x.flatten(2).transpose(1, 2)), skips  # (B, g*g, D)
