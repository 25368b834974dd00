"""Visual checks: a built-in heat colour map and RGB PNG overlays of a mask on its image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mrisegcli.errors import MrisegError
from mrisegcli.io.atomic import atomic_path
from mrisegcli.io.intensity import normalize_intensity

# Piecewise-linear "heat" map: black -> purple -> red -> orange -> pale yellow.
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_RGB = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)
FILL_RGB = np.array([255, 48, 48], dtype=np.float32)
CONTOUR_RGB = np.array([255, 230, 0], dtype=np.float32)
FILL_ALPHA = 0.35


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape, NaN -> 0) -> uint8 RGB of shape (..., 3)."""
    v = np.nan_to_num(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0), nan=0.0)
    rgb = [np.interp(v, _HEAT_STOPS, _HEAT_RGB[:, c]) for c in range(3)]
    return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)


def mask_contour(mask2d: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the mask (the image border counts)."""
    m = np.asarray(mask2d, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)  # (H+2, W+2)
    interior = (
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )  # (H, W): all four neighbours inside
    return m & ~interior


def render_overlay(
    image2d: np.ndarray, mask2d: np.ndarray, prob: np.ndarray | None = None
) -> np.ndarray:
    """(H, W, 3) uint8: the grey image, a translucent fill of the mask and its contour.

    With ``prob`` (H, W) in [0, 1] the fill is the heat colour of the probability, blended in
    proportion to it everywhere, so soft or uncertain regions show too.
    """
    img = np.asarray(image2d)
    mask = np.asarray(mask2d) > 0
    if img.ndim != 2 or mask.shape != img.shape:
        raise MrisegError(
            f"overlay needs a 2-D image and mask of one shape, got {img.shape} and {mask.shape}"
        )
    grey = normalize_intensity(img)[..., None] * 255.0  # (H, W, 1)
    rgb = np.repeat(grey, 3, axis=-1)  # (H, W, 3)
    if prob is not None:
        p = np.clip(np.nan_to_num(np.asarray(prob, dtype=np.float32)), 0.0, 1.0)
        if p.shape != img.shape:
            raise MrisegError(f"probability map shape {p.shape} != image shape {img.shape}")
        alpha = (0.6 * p)[..., None]  # (H, W, 1)
        rgb = (1 - alpha) * rgb + alpha * heat_colormap(p).astype(np.float32)
    else:
        rgb[mask] = (1 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * FILL_RGB
    rgb[mask_contour(mask)] = CONTOUR_RGB
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def write_overlay(
    image2d: np.ndarray,
    mask2d: np.ndarray,
    out_path: str | Path,
    *,
    overwrite: bool = False,
    prob: np.ndarray | None = None,
) -> Path:
    """Write :func:`render_overlay` as an RGB PNG (atomically). Returns the path."""
    rgb = render_overlay(image2d, mask2d, prob)
    with atomic_path(out_path, overwrite) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return Path(out_path)


def write_steps_png(
    masks: list[np.ndarray], out_path: str | Path, *, overwrite: bool = False, gap: int = 2
) -> Path:
    """The coarse-to-fine masks of one slice, left to right as one PNG (foreground white).

    Each entry is one boolean (h, w) mask; all are shown at the largest size, nearest-neighbour,
    separated by a ``gap``-pixel grey bar. Written atomically.
    """
    if not masks:
        raise ValueError("no steps to draw")
    arrays = [np.asarray(m, dtype=bool) for m in masks]
    for m in arrays:
        if m.ndim != 2:
            raise ValueError(f"each step must be one (H, W) mask, got shape {m.shape}")
    H = max(m.shape[0] for m in arrays)
    W = max(m.shape[1] for m in arrays)
    canvas = np.full((H, len(arrays) * (W + gap) - gap), 128, dtype=np.uint8)
    for i, m in enumerate(arrays):
        img = Image.fromarray(m.astype(np.uint8) * 255).resize((W, H), Image.Resampling.NEAREST)
        canvas[:, i * (W + gap) : i * (W + gap) + W] = np.asarray(img)
    out_path = Path(out_path)
    with atomic_path(out_path, overwrite) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return out_path
