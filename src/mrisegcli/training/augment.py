"""Training-time augmentation: random geometry and intensity per sample, codes re-tokenized.

The code cache holds the tokens of the images and masks as they are on disk; a transformed
sample needs the tokens of the transformed mask (and image), so :class:`Augmenter` re-encodes
them with the run's own tokenizers (:func:`mrisegcli.workflow.prepare.tokenize_tensors`, the
function that built the cache). No flips: a prompt may name a side ("left lower zone"), and a
mirrored image would contradict it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentRanges:
    """Ranges the transforms are drawn from, uniformly."""

    degrees: float = 10.0  # rotation, +-
    scale: float = 0.15  # zoom, log-uniform in [1 - scale, 1 + scale]
    shift: float = 0.06  # translation, +- this share of the image side
    gamma: float = 1.4  # intensity gamma, log-uniform in [1/gamma, gamma]
    contrast: float = 0.15  # +- around mid-grey
    brightness: float = 0.08  # +-


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def augment_pair(
    image_B1SS: torch.Tensor,
    mask_BSS: torch.Tensor,
    p: float,
    gen: torch.Generator,
    ranges: AugmentRanges = AugmentRanges(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample, with probability ``p``: one random rotation, zoom and shift applied to the
    image (bilinear) and its mask (nearest) alike, then a random gamma, contrast and brightness
    on the image. Other samples are returned unchanged. ``gen`` is a CPU generator; the random
    draws do not depend on the device. -> (image (B, 1, S, S) in [0, 1], mask (B, S, S) of the
    input's dtype, 0/1)."""
    B = image_B1SS.shape[0]
    r = ranges
    apply_B = torch.rand(B, generator=gen) < p
    angle = _uniform(B, -r.degrees, r.degrees, gen) * math.pi / 180
    zoom = torch.exp(_uniform(B, math.log(1 - r.scale), math.log(1 + r.scale), gen))
    tx, ty = (_uniform(B, -2 * r.shift, 2 * r.shift, gen) for _ in range(2))
    gamma = torch.exp(_uniform(B, -math.log(r.gamma), math.log(r.gamma), gen))
    contrast = _uniform(B, 1 - r.contrast, 1 + r.contrast, gen)
    bright = _uniform(B, -r.brightness, r.brightness, gen)
    if not bool(apply_B.any()):
        return image_B1SS, mask_BSS
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta_B23 = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    dev, dt = image_B1SS.device, image_B1SS.dtype
    grid = F.affine_grid(theta_B23.to(dev, dt), list(image_B1SS.shape), align_corners=False)
    img = F.grid_sample(image_B1SS, grid, "bilinear", "border", align_corners=False)
    msk = F.grid_sample(mask_BSS[:, None].to(dt), grid, "nearest", "border", align_corners=False)

    def per_sample(v: torch.Tensor) -> torch.Tensor:
        return v.to(dev, dt)[:, None, None, None]

    img = img.clamp(0, 1) ** per_sample(gamma)
    img = ((img - 0.5) * per_sample(contrast) + 0.5 + per_sample(bright)).clamp(0, 1)
    on = apply_B.to(dev)
    image = torch.where(on[:, None, None, None], img, image_B1SS)
    mask = torch.where(on[:, None, None], msk[:, 0].round().to(mask_BSS.dtype), mask_BSS)
    return image, mask


class Augmenter:
    """Transforms a training batch (``image`` (B, 1, S, S) float, ``mask`` (B, S, S)) with
    :func:`augment_pair` and replaces the code fields it holds by the tokens of the result.
    Reproducible: the draws of step ``s`` depend only on the seed, the DDP ``rank`` and ``s``
    (a resumed run draws what an uninterrupted one would; each rank its own transforms)."""

    def __init__(
        self,
        bundle: Any,
        p: float,
        seed: int,
        ranges: AugmentRanges = AugmentRanges(),
        rank: int = 0,
    ) -> None:
        from mrisegcli.workflow.prepare import tokenize_tensors

        if not 0.0 < p <= 1.0:
            raise ValueError(f"augmentation probability must lie in (0, 1], got {p}")
        self.bundle, self.p, self.ranges = bundle, p, ranges
        self.seed = (seed * 1_000_003 + rank) * 1_000_003
        self._tokenize = tokenize_tensors

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed + step)
        image, mask = augment_pair(batch["image"], batch["mask"], self.p, gen, self.ranges)
        out = dict(batch, image=image, mask=mask)
        codes = self._tokenize(self.bundle, image, mask[:, None].float())
        for key, value in codes.items():
            if key in batch:
                out[key] = value.to(batch[key].dtype)
        return out
