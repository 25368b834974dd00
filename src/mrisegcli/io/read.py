"""Entry points: read any supported image as a :class:`Scan`, or any mask as a bool array.

The reader is chosen by content first (DICOM preamble, image magic numbers), then by name
(``.nii`` / ``.nii.gz``, image suffixes); folders are DICOM series; anything else is tried as
DICOM without a preamble. Every failure the user can fix is an :class:`InputError` naming the
file. pydicom and nibabel are imported only when a DICOM or NIfTI file is read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mrisegcli.errors import InputError
from mrisegcli.io.raster import RASTER_SUFFIXES, read_raster, read_raster_mask
from mrisegcli.io.scan import Scan

DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".dic", ".ima")
_RASTER_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"II*\x00",  # TIFF little endian
    b"MM\x00*",  # TIFF big endian
    b"BM",  # BMP
    b"GIF8",
)
_EXPECTED = "expected DICOM, NIfTI (.nii/.nii.gz) or PNG/JPEG/TIFF/BMP"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the readers' chatter about tolerated irregularities (errors still raise)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"nibabel(\.|$)")
        yield


def is_nifti_name(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_input_path(path: str | Path) -> bool:
    """Raise unless ``path`` is a regular file or a folder (following symlinks); returns
    whether it is a folder.

    Reading a FIFO or a device would block forever or never end, so they are refused from
    their metadata alone; a symlink loop and a dangling symlink say so.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(
                f"dangling symlink (points to {os.readlink(path)}, which does not exist)", path
            ) from None
        raise InputError("no such file or folder", path) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputError(
                "symlink loop: following the links never reaches a file or folder", path
            ) from None
        if err.errno == errno.ENOTDIR:
            raise InputError(
                "no such file or folder (a part of the path is a file)", path
            ) from None
        raise InputError(f"cannot read ({err.strerror})", path) from err
    if stat.S_ISDIR(mode):
        return True
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise InputError(
            f"is {kind}, not a file: mriseg reads regular files and folders only", path
        )
    return False


def detect_format(path: str | Path) -> str:
    """Which reader handles ``path``: "dicom", "nifti" or "raster" (raises if none can)."""
    path = Path(path)
    if check_input_path(path):
        return "dicom"
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as err:
        raise InputError(f"cannot read ({err.strerror})", path) from err
    if not head:
        raise InputError("file is empty", path)
    if is_nifti_name(path):
        return "nifti"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_RASTER_MAGIC) or path.suffix.lower() in RASTER_SUFFIXES:
        return "raster"
    if head.startswith(b"\x1f\x8b"):
        raise InputError(f"gzip-compressed file of unknown kind ({_EXPECTED})", path)
    return "dicom"


def read_scan(path: str | Path, *, frame: int | None = None) -> Scan:
    """Read a DICOM file or series folder, a NIfTI file or a raster image as a Scan.

    ``frame`` picks one volume of a 4-D NIfTI (required there, refused elsewhere).
    """
    path = Path(path)
    fmt = detect_format(path)
    if frame is not None and fmt != "nifti":
        raise InputError(f"frame={frame} applies to 4-D NIfTI only, this is {fmt}", path)
    with _quiet():
        if fmt == "raster":
            return read_raster(path)
        if fmt == "nifti":
            from mrisegcli.io.nifti import read_nifti

            return read_nifti(path, frame)
        from mrisegcli.io.dicom import read_dicom

        return _as_dicom(path, read_dicom)


def read_mask(path: str | Path, *, binary: bool = False) -> np.ndarray:
    """Read a mask as bool (H, W) or (D, H, W) (same axis convention as :class:`Scan`).

    Raw stored values decide (no LUT, no windowing): any value > 0 is foreground; colour
    masks: any channel > 0. A DICOM SEG gives its frames with all segments merged.

    ``binary=True`` (datasets, ``evaluate --pred/--gt``): the stored values must be 0 and 1,
    or 0 and 255 (any channel of a colour mask); anything else (a label map, a background of
    3, a JPEG's ringing) raises :class:`~mrisegcli.io.scan.NonBinaryMaskError` naming the file
    instead of being thresholded at > 0.
    """
    path = Path(path)
    fmt = detect_format(path)
    with _quiet():
        if fmt == "raster":
            return read_raster_mask(path, binary)
        if fmt == "nifti":
            from mrisegcli.io.nifti import read_nifti_mask

            return read_nifti_mask(path, binary)
        from mrisegcli.io.dicom import read_dicom_mask

        return _as_dicom(path, lambda p: read_dicom_mask(p, binary))


def _as_dicom(path: Path, reader):
    """Run a DICOM reader; a file with an unknown suffix that is not DICOM gets a format error."""
    try:
        return reader(path)
    except InputError as err:
        unknown = not path.is_dir() and path.suffix.lower() not in DICOM_SUFFIXES
        if unknown and "not a DICOM file" in str(err):
            raise InputError(f"unrecognised file format ({_EXPECTED})", path) from err
        raise
