"""The one in-memory image type every reader returns and every writer takes.

Axis convention (all formats): ``pixels`` is ``(H, W)`` for a 2-D image or ``(D, H, W)`` for a
volume, slices first, so ``pixels[k]`` is one 2-D slice that the model segments on its own.

Geometry: ``affine`` (when known) maps the *reversed* pixel index to millimetres,
``affine @ [w, h, d, 1]`` is the position of ``pixels[d, h, w]`` (``[w, h, 0, 1]`` for 2-D).
For NIfTI this is exactly the file's affine (RAS+, see :mod:`mrisegcli.io.nifti`); for DICOM it
is built from ImagePositionPatient / ImageOrientationPatient / PixelSpacing and is in the DICOM
patient frame (LPS+). :meth:`Scan.ras_affine` gives the RAS+ form for any scan.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrisegcli.errors import InputError

FORMATS = ("dicom", "nifti", "raster")

# Largest 2-D slice any reader accepts: 16384 x 16384 (268 M pixels, 1 GiB as float32). Larger
# images are refused before their pixels are decoded wherever the format allows it.
MAX_SIDE = 16384
MAX_PIXELS = MAX_SIDE * MAX_SIDE

# RAS+ = diag(-1, -1, 1) @ LPS+ (DICOM patient axes point Left/Posterior, NIfTI's Right/Anterior).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def check_slice_size(height: int, width: int, path: str | Path) -> None:
    """Refuse an empty slice, or one larger than :data:`MAX_PIXELS` (cheap: call it before
    decoding)."""
    if int(height) <= 0 or int(width) <= 0:
        raise InputError(f"image has no pixels ({width}x{height})", path)
    if int(height) * int(width) > MAX_PIXELS:
        raise InputError(
            f"image too large: {width}x{height} pixels per slice, the limit is "
            f"{MAX_SIDE}x{MAX_SIDE} ({MAX_PIXELS} pixels)",
            path,
        )


class NonBinaryMaskError(InputError):
    """A mask holds values other than 0/1 or 0/255 (a label map, a grey image, a soft mask)."""


BINARY_VALUES = "0 and 1, or 0 and 255"


def check_binary(values: np.ndarray, path: str | Path) -> None:
    """Refuse mask values other than {0, 1} or {0, 255} (a bool array always passes).

    Thresholding anything else at > 0 would silently turn a label map, or a mask whose
    background is not 0, into something else (a background of 3 becomes all foreground).
    """
    values = np.asarray(values)
    if values.dtype == bool or values.size == 0:
        return
    hi = values.max()
    ok = values.min() >= 0 and hi in (0, 1, 255)
    if ok and hi != 0:
        ok = not np.count_nonzero((values != 0) & (values != hi))
    if not ok:
        seen = np.unique(values)
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in seen[:6].tolist())
        more = f" ... ({len(seen)} values)" if len(seen) > 6 else ""
        raise NonBinaryMaskError(
            f"not a binary mask: it holds the values {shown}{more}; a mask holds {BINARY_VALUES}",
            path,
        )


@dataclass
class Scan:
    """An image (2-D) or volume (3-D) with its geometry and the source objects writers need.

    ``datasets`` holds the pydicom Datasets of a DICOM source in slice order with their pixel
    data dropped (the pixels live in ``pixels``); DICOM SEG writing references them.
    ``nifti_header`` is the source NIfTI header (mask writers copy it), else None.
    """

    pixels: np.ndarray  # (H, W) or (D, H, W) float32
    path: Path
    format: str
    spacing: tuple[float, ...]  # mm per axis of ``pixels``, 1.0 where unknown
    affine: np.ndarray | None = None  # (4, 4), see module docstring
    datasets: list = field(default_factory=list)
    nifti_header: Any = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.pixels.ndim not in (2, 3):
            raise ValueError(f"pixels must be (H, W) or (D, H, W), got shape {self.pixels.shape}")
        if self.pixels.dtype != np.float32:
            self.pixels = self.pixels.astype(np.float32)
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        self.spacing = tuple(float(s) for s in self.spacing)
        if len(self.spacing) != self.pixels.ndim:
            raise ValueError(f"spacing {self.spacing} does not match shape {self.pixels.shape}")
        if self.affine is not None:
            self.affine = np.asarray(self.affine, dtype=np.float64)
            if self.affine.shape != (4, 4):
                raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    @property
    def is_volume(self) -> bool:
        return self.pixels.ndim == 3

    @property
    def num_slices(self) -> int:
        return self.pixels.shape[0] if self.is_volume else 1

    def slices(self) -> Iterator[np.ndarray]:
        """Yield each 2-D slice (H, W) float32: the image itself for 2-D scans."""
        if self.is_volume:
            yield from self.pixels
        else:
            yield self.pixels

    def stack(self, per_slice: Sequence[np.ndarray]) -> np.ndarray:
        """Assemble one (H, W) array per slice (e.g. predictions) into an array of ``shape``."""
        arrays = [np.asarray(a) for a in per_slice]
        if len(arrays) != self.num_slices:
            raise ValueError(f"expected {self.num_slices} slices, got {len(arrays)}")
        out = np.stack(arrays)  # (D, H, W)
        if out.shape[1:] != self.pixels.shape[-2:]:
            raise ValueError(f"slice shape {out.shape[1:]} != {self.pixels.shape[-2:]}")
        return out if self.is_volume else out[0]

    def ras_affine(self) -> np.ndarray:
        """4x4 RAS+ affine over the reversed pixel index (what a NIfTI file of this grid needs).

        NIfTI: the source affine. DICOM with geometry: the LPS affine flipped to RAS. Otherwise
        (rasters, DICOM without geometry): a diagonal affine of the pixel spacing.
        """
        if self.affine is not None:
            if self.format == "dicom":
                return LPS_TO_RAS @ self.affine
            return self.affine.copy()
        zooms = list(reversed(self.spacing)) + [1.0] * (3 - len(self.spacing))  # (w, h, d)
        return np.diag(zooms + [1.0])
