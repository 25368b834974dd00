"""NIfTI-1/-2 reading and mask image building (nibabel).

Axis mapping: a NIfTI voxel array ``data[i, j, k]`` becomes ``pixels[k, j, i]`` (all axes
reversed: D = k, H = j, W = i; a 2-D file ``data[i, j]`` becomes ``pixels[j, i]``). Reversing the
axes is its own inverse, so :func:`dhw_to_nifti` restores the exact voxel grid, and the file's
affine (which maps ``[i, j, k]``) is kept unchanged as ``scan.affine``.

4-D files are refused unless a ``frame`` (volume index along the 4th axis) is chosen (a library
argument; the command line has no such option: the message says how to extract one volume); a
4-D file with a single volume reads as 3-D. Files with an empty axis are refused. NaN/Inf
voxels are replaced (see :func:`mrisegcli.io.intensity.replace_nonfinite`) and counted in
``meta["nonfinite"]``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from mrisegcli.errors import InputError
from mrisegcli.io.intensity import replace_nonfinite, rgb_to_grey
from mrisegcli.io.scan import Scan, check_binary, check_slice_size

_READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    OSError,
    EOFError,
    ValueError,
    OverflowError,
    zlib.error,
)


def _why(err: BaseException) -> str:
    """The reader's message on one line (some span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def nifti_to_dhw(data: np.ndarray) -> np.ndarray:
    """NIfTI voxel order (I, J[, K]) -> pixels (J, I) / (K, J, I): the axes reversed."""
    return np.transpose(data)


def dhw_to_nifti(pixels: np.ndarray) -> np.ndarray:
    """Exact inverse of :func:`nifti_to_dhw` (reversing the axes again)."""
    return np.transpose(pixels)


def _load(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as err:
        raise InputError(f"not a readable NIfTI file ({_why(err)})", path) from err
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"not a NIfTI image ({type(img).__name__})", path)
    return img


def _shape(img: nib.Nifti1Image, path: Path) -> tuple[int, ...]:
    """The image shape without trailing singleton axes beyond the 3rd; 2 to 4 axes."""
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if not 2 <= len(shape) <= 4:
        raise InputError(f"unsupported NIfTI shape {img.shape} (need 2-D, 3-D or 4-D)", path)
    if any(s <= 0 for s in shape):
        raise InputError(f"NIfTI image has no voxels (shape {tuple(img.shape)})", path)
    check_slice_size(shape[1], shape[0], path)
    return shape


def _voxels(img: nib.Nifti1Image, frame: int | None, *, raw: bool) -> np.ndarray:
    """The voxel array (scaled unless ``raw``), only volume ``frame`` of a 4-D file."""
    proxy = img.dataobj
    unscaled = raw and hasattr(proxy, "get_unscaled")
    if frame is None:
        return np.asarray(proxy.get_unscaled() if unscaled else proxy)
    index = (slice(None),) * 3 + (frame,) + (0,) * (len(img.shape) - 4)
    return np.asarray(proxy.get_unscaled())[index] if unscaled else np.asarray(proxy[index])


def _to_float(data: np.ndarray, path: Path) -> np.ndarray:
    if data.dtype.names:  # RGB24 / RGBA32 records
        return rgb_to_grey(np.stack([data[c] for c in data.dtype.names[:3]], axis=-1))
    if np.iscomplexobj(data):
        raise InputError("complex-valued NIfTI is not supported", path)
    return data.astype(np.float32)


def read_nifti(path: Path, frame: int | None = None) -> Scan:
    """A ``.nii`` / ``.nii.gz`` file -> Scan (2-D (H, W) or 3-D (D, H, W), affine kept)."""
    img = _load(path)
    shape = _shape(img, path)
    if len(shape) == 4:
        if frame is None:
            raise InputError(
                f"is 4-D with {shape[3]} volumes; mriseg segments one 2-D or 3-D image at a "
                "time: save the volume you want as its own NIfTI file (e.g. fslroi IN OUT N 1, "
                "or nibabel's img.slicer[..., N])",
                path,
            )
        if not 0 <= frame < shape[3]:
            raise InputError(f"frame {frame} out of range 0..{shape[3] - 1}", path)
    elif frame is not None:
        raise InputError(
            f"frame={frame} applies to 4-D NIfTI only, this one is {len(shape)}-D", path
        )
    spatial = shape[:3]
    try:
        data = _to_float(_voxels(img, frame, raw=False), path).reshape(spatial)
    except _READ_ERRORS as err:
        raise InputError(f"truncated or corrupt NIfTI data ({_why(err)})", path) from err
    data, nonfinite = replace_nonfinite(data)
    zooms = [float(z) for z in img.header.get_zooms()[: len(spatial)]]
    zooms = [z if np.isfinite(z) and z > 0 else 1.0 for z in zooms]
    meta: dict = {
        "nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        "nifti_shape": tuple(int(s) for s in img.shape),
    }
    if frame is not None:
        meta["frame"] = frame
    if nonfinite:
        meta["nonfinite"] = nonfinite
    pixels = np.ascontiguousarray(nifti_to_dhw(data))
    affine = np.asarray(img.affine, dtype=np.float64)
    return Scan(pixels, path, "nifti", tuple(reversed(zooms)), affine, [], img.header.copy(), meta)


def read_nifti_mask(path: Path, binary: bool = False) -> np.ndarray:
    """Stored (unscaled) voxel values > 0 -> bool (H, W) or (D, H, W); RGB: any channel > 0.

    ``binary``: refuse stored values other than 0/1 or 0/255 (:class:`NonBinaryMaskError`).
    """
    img = _load(path)
    shape = _shape(img, path)
    if len(shape) == 4:
        raise InputError(f"a mask must be 2-D or 3-D, this NIfTI has shape {img.shape}", path)
    try:
        data = _voxels(img, None, raw=True)
    except _READ_ERRORS as err:
        raise InputError(f"truncated or corrupt NIfTI data ({_why(err)})", path) from err
    if data.dtype.names:
        channels = np.stack([data[c] for c in data.dtype.names[:3]], axis=-1)
        if binary:
            check_binary(channels, path)
        fg = (channels > 0).any(axis=-1)
    else:
        if binary:
            check_binary(data, path)
        fg = data > 0
    return np.ascontiguousarray(nifti_to_dhw(fg.reshape(shape)))


def make_nifti(
    array: np.ndarray, scan: Scan, dtype: type, description: str = ""
) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` (scan.shape) on the scan's voxel grid.

    NIfTI sources: the source header is copied (same class, affine, sform/qform codes and
    units) with the data type set to ``dtype``, scaling and intent reset. Other sources get the
    RAS affine of :meth:`Scan.ras_affine` (scanner-based for DICOM, spacing-only otherwise).
    """
    data = np.ascontiguousarray(dhw_to_nifti(np.asarray(array).astype(dtype)))
    if scan.format == "nifti" and scan.nifti_header is not None:
        src = scan.nifti_header
        cls = nib.Nifti2Image if scan.meta.get("nifti_version") == 2 else nib.Nifti1Image
        hdr = src.copy()
        hdr.set_data_dtype(dtype)
        img = cls(data, scan.affine, header=hdr)
        sform, sform_code = src.get_sform(coded=True)
        qform, qform_code = src.get_qform(coded=True)
        img.set_sform(sform if sform is not None else scan.affine, int(sform_code))
        img.set_qform(qform if qform is not None else scan.affine, int(qform_code))
    else:
        img = nib.Nifti1Image(data, scan.ras_affine())
        code = 1 if scan.format == "dicom" and scan.affine is not None else 2  # scanner / aligned
        img.set_sform(scan.ras_affine(), code)
        img.set_qform(scan.ras_affine(), code)
        img.header.set_xyzt_units("mm")
    hdr = img.header
    hdr.set_slope_inter(1.0, 0.0)
    hdr.set_intent("none")
    hdr["descrip"] = description.encode("ascii", "replace")[:79]
    hdr["cal_min"], hdr["cal_max"] = 0.0, 0.0
    return img
