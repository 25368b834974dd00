"""PNG / JPEG / TIFF / BMP reading (Pillow).

Grey modes (1, L, I;16*, I, F) keep their stored values; LA keeps L; palette images are
expanded; colour images (RGB, RGBA with alpha dropped, CMYK, YCbCr, ...) become ITU-R BT.601
luma. A multi-page TIFF whose pages share one size is a volume (pages = slices); other
animated formats give their first frame. The pixel grid is used as stored (EXIF orientation is
not applied), spacing is unknown (1.0). Pillow's decompression-bomb guard (about 179 M pixels)
and :data:`mrisegcli.io.scan.MAX_PIXELS` both refuse an image before its pixels are decoded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mrisegcli.errors import InputError
from mrisegcli.io.intensity import replace_nonfinite, rgb_to_grey
from mrisegcli.io.scan import Scan, check_binary, check_slice_size

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_GREY_MODES = ("1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """Open lazily (header only), turning Pillow's failures into one clear error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as err:
        detail = str(err).split(",")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        raise InputError(f"image too large: {detail} (decompression-bomb guard)", path) from err
    except UnidentifiedImageError as err:
        raise InputError(
            "not a valid PNG/JPEG/TIFF/BMP image (unrecognised content)", path
        ) from err
    except OSError as err:
        raise InputError(f"cannot read image ({err})", path) from err
    except (ValueError, TypeError, SyntaxError, EOFError) as err:  # corrupt header fields
        raise InputError(f"corrupt image header ({err})", path) from err
    with im:
        check_slice_size(im.height, im.width, path)
        yield im


def _frames(im: Image.Image, path: Path) -> Iterator[Image.Image]:
    """The pages of a multi-page TIFF, else just the first frame."""
    try:  # counting / seeking pages parses each page's header
        n = getattr(im, "n_frames", 1) if im.format == "TIFF" else 1
        for i in range(n):
            im.seek(i)
            yield im
    except (OSError, ValueError, TypeError, SyntaxError, EOFError) as err:
        raise InputError(f"corrupt multi-page image ({err})", path) from err


def _load(im: Image.Image, path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"truncated or corrupt image data ({err})", path) from err


def _grey(im: Image.Image) -> np.ndarray:
    """One decoded frame -> (H, W) float32 grey values."""
    if im.mode in _GREY_MODES:
        return np.asarray(im).astype(np.float32)
    if im.mode in ("LA", "La"):
        return np.asarray(im.getchannel(0)).astype(np.float32)
    return rgb_to_grey(np.asarray(im.convert("RGB")))  # palette, RGB(A), CMYK, YCbCr, ...


def _foreground(im: Image.Image, path: Path | None = None) -> np.ndarray:
    """One decoded frame -> (H, W) bool: stored value > 0, any colour channel > 0.

    With ``path`` the stored values must be binary (see :func:`check_binary`).
    """
    if im.mode in _GREY_MODES:
        values = np.asarray(im)
    elif im.mode in ("LA", "La"):
        values = np.asarray(im.getchannel(0))
    else:
        values = np.asarray(im.convert("RGB"))
    if path is not None:
        check_binary(values, path)
    fg = values > 0
    return fg.any(axis=-1) if fg.ndim == 3 else fg


def _read(path: Path, per_frame) -> tuple[np.ndarray, dict]:
    """Apply ``per_frame`` to every frame; returns (H, W) or (D, H, W) and meta."""
    with open_image(path) as im:
        meta = {"image_format": im.format, "mode": im.mode}
        arrays = []
        for frame in _frames(im, path):
            _load(frame, path)
            arrays.append(per_frame(frame))
    if len({a.shape for a in arrays}) > 1:
        raise InputError("multi-page TIFF with pages of different sizes", path)
    meta["frames"] = len(arrays)
    return (arrays[0] if len(arrays) == 1 else np.stack(arrays)), meta


def read_raster(path: Path) -> Scan:
    """A PNG/JPEG/TIFF/BMP file -> Scan (H, W), or (D, H, W) for a multi-page TIFF."""
    pixels, meta = _read(path, _grey)
    if not np.isfinite(pixels).all():  # 'F' mode TIFFs can hold NaN/Inf
        pixels, meta["nonfinite"] = replace_nonfinite(pixels)
    return Scan(pixels, path, "raster", (1.0,) * pixels.ndim, None, [], None, meta)


def read_raster_mask(path: Path, binary: bool = False) -> np.ndarray:
    """A mask image -> bool (H, W) (or (D, H, W) for a multi-page TIFF).

    ``binary``: refuse stored values other than 0/1 or 0/255 (:class:`NonBinaryMaskError`).
    """
    return _read(path, lambda im: _foreground(im, path if binary else None))[0]
