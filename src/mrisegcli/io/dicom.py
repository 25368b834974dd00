"""DICOM reading (pydicom 3): single files, multi-frame files and folders of one series.

* Pixels: decoded by pydicom's plugins (compressed syntaxes need ``pip install "mrisegcli[dicom]"``),
  palette colour expanded, YBR converted to RGB, colour turned into grey luma, the modality LUT
  applied (Rescale Slope/Intercept or a Modality LUT table, also from enhanced functional
  groups; RT Dose grids scaled by DoseGridScaling), a VOI LUT *table* applied, MONOCHROME1
  inverted (high values are always bright). A linear VOI window is not applied but kept in
  ``meta["window"]`` = (center, width) so that normalisation uses it.
* Slices: a folder is sorted along the slice normal (ImagePositionPatient . normal), else by
  InstanceNumber; frames of a multi-frame file keep their stored order.
* RT Dose counts as an image (a gridded volume with full geometry); DICOM SEG is refused as an
  image (read it with :func:`read_dicom_mask`); objects without pixel data (SR, RTSTRUCT,
  RTPLAN, ...) are refused.
"""

from __future__ import annotations

import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from mrisegcli.errors import InputError
from mrisegcli.io.intensity import replace_nonfinite, rgb_to_grey
from mrisegcli.io.scan import Scan, check_binary, check_slice_size

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
INSTALL_HINT = 'pip install "mrisegcli[dicom]"'
_REQUIRED = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")


def _plugin_packages(ts: UID) -> str:
    """The pip packages that decode transfer syntax ``ts`` (for error messages)."""
    name = ts.name
    if "2000" in name or "HTJ2K" in name:
        return "pylibjpeg-openjpeg"
    if "RLE" in name:
        return "pylibjpeg-rle"
    if "JPEG" in name:
        return "pylibjpeg-libjpeg"
    return "pylibjpeg"


# ----------------------------------------------------------------------------- loading


def _looks_like_dicom(ds: Dataset) -> bool:
    return "SOPClassUID" in ds or ("Rows" in ds and any(k in ds for k in PIXEL_KEYWORDS))


# what pydicom raises on corrupt element bytes (an unknown VR is a NotImplementedError, an
# ambiguous VR that cannot be resolved an AttributeError)
_ELEMENT_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    NotImplementedError,
    BytesLengthException,
    struct.error,
)


def _why(err: BaseException) -> str:
    """The reader's message on one line (some span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def _parse_elements(ds: Dataset) -> None:
    """Convert every top-level element now (pydicom parses lazily), so corrupt bytes fail
    here, once, rather than at some later attribute access; deferred large values stay unread."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        if not (isinstance(raw, RawDataElement) and raw.value is None):
            ds[tag]


def load_dataset(path: Path, *, strict: bool = True) -> Dataset | None:
    """Read a DICOM file's elements (large values deferred until used).

    Files without the 128-byte preamble are read with ``force`` and accepted only when they
    carry recognisable image/SOP elements. Returns None for non-DICOM files when not ``strict``.
    """
    ds, reason, error = None, "", None
    try:
        ds = pydicom.dcmread(path, defer_size="256 KB")
    except InvalidDicomError:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, defer_size="256 KB", force=True)
        except Exception as err:  # force-reading arbitrary bytes can fail in many ways
            reason, error = "not a DICOM file (no DICM header and unreadable)", err
        if ds is not None and not _looks_like_dicom(ds):
            ds, reason = None, "not a DICOM file (no DICM header, no image elements)"
    except _ELEMENT_ERRORS as err:
        reason, error = f"truncated or corrupt DICOM file ({_why(err)})", err
    if ds is not None:
        try:
            _parse_elements(ds)
        except _ELEMENT_ERRORS as err:
            ds, reason, error = None, f"corrupt DICOM element ({_why(err)})", err
    if ds is None:
        if strict:
            raise InputError(reason, path) from error
        return None
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta still need a transfer syntax for pixel decoding."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit:
        ts = ImplicitVRLittleEndian
    else:
        ts = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = ts


def _printable(value: object, limit: int) -> str:
    """A header value fit for a one-line message (a corrupt file's values may hold any bytes)."""
    return "".join(c for c in str(value) if c.isprintable())[:limit]


def _describe(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID")
    kind = _printable(UID(str(sop)).name, 80) if sop else "DICOM object"
    modality = _printable(ds.get("Modality") or "", 16)
    return f"{kind} ({modality})" if modality else kind


def _check_image(ds: Dataset, path: Path, *, allow_seg: bool) -> None:
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise InputError(f"not an image: a {_describe(ds)} without pixel data", path)
    if not allow_seg and str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES:
        raise InputError("is a DICOM Segmentation (a mask), not an image to segment", path)
    for kw in _REQUIRED:
        if kw not in ds or ds[kw].value in (None, ""):
            raise InputError(f"broken DICOM image: missing required element {kw}", path)
    check_slice_size(int(ds.Rows), int(ds.Columns), path)
    num_frames(ds, path)


def num_frames(ds: Dataset, path: Path) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        n = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError) as err:
        raise InputError(f"broken DICOM image: invalid NumberOfFrames {value!r}", path) from err
    if n < 1:
        raise InputError(f"broken DICOM image: NumberOfFrames is {n}", path)
    return n


def _drop_pixels(ds: Dataset) -> None:
    for kw in PIXEL_KEYWORDS:
        if kw in ds:
            del ds[kw]


# ----------------------------------------------------------------------------- decoding


def decode_frames(ds: Dataset, path: Path) -> np.ndarray:
    """Stored pixel values as (F, H, W) or (F, H, W, 3) RGB; no LUTs applied."""
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as err:
        name = _printable(ts.name, 80)
        raise InputError(
            f"unsupported DICOM transfer syntax {name} ({_printable(ts, 80)})", path
        ) from err
    if not decoder.is_available:
        raise InputError(
            f"cannot decode {ts.name} pixel data: no decoder plugin installed (needs "
            f"{_plugin_packages(ts)}; install with {INSTALL_HINT})",
            path,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, info = decoder.as_array(ds, as_rgb=True)
    except Exception as err:  # pydicom and its plugins raise many exception types
        lines = [ln.strip().rstrip(":") for ln in str(err).splitlines() if ln.strip()]
        reason = ("; ".join(lines) if lines else type(err).__name__)[:400]
        if "less than expected" in reason or isinstance(err, EOFError):
            raise InputError(f"truncated or corrupt DICOM pixel data ({reason})", path) from err
        raise InputError(f"cannot decode {ts.name} pixel data: {reason}", path) from err
    samples = int(info.get("samples_per_pixel", 1))
    pi = str(info.get("photometric_interpretation", ds.PhotometricInterpretation))
    if arr.ndim == (3 if samples > 1 else 2):
        arr = arr[None]  # (1, H, W[, 3])
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif pi.startswith("YBR") and samples == 3:
        arr = convert_color_space(arr, pi, "RGB")
    return arr


# ----------------------------------------------------------------------------- geometry


def _group_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """Functional-group item ``keyword`` for ``frame``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame) and per_frame[frame].get(keyword):
        return per_frame[frame].get(keyword)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(keyword):
        return shared[0].get(keyword)[0]
    return None


def _floats(value: object, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


def frame_geometry(
    ds: Dataset, n: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, float | None]:
    """(positions (n, 3) | None, orientation (6,) | None, pixel spacing (row, col) | None,
    slice thickness | None) of the frames of one file."""
    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        ori, meas = (
            _group_item(ds, 0, "PlaneOrientationSequence"),
            _group_item(ds, 0, "PixelMeasuresSequence"),
        )
        iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None
        ps = _floats(meas.get("PixelSpacing"), 2) if meas is not None else None
        thick = meas.get("SliceThickness") if meas is not None else None
        items = [_group_item(ds, i, "PlanePositionSequence") for i in range(n)]
        pos = [
            _floats(it.get("ImagePositionPatient"), 3) if it is not None else None for it in items
        ]
        positions = np.stack(pos) if all(p is not None for p in pos) else None
    else:
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
        ps = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
        thick = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
        ipp = _floats(ds.get("ImagePositionPatient"), 3)
        positions = None
        if ipp is not None and n == 1:
            positions = ipp[None]
        elif ipp is not None and iop is not None and "GridFrameOffsetVector" in ds:  # RT Dose
            offsets = _floats(ds.GridFrameOffsetVector, n)
            if offsets is not None:
                positions = ipp + np.outer(offsets - offsets[0], _normal(iop))
    try:
        thickness = float(thick) if thick not in (None, "") else None
    except (TypeError, ValueError):
        thickness = None
    return positions, iop, ps, thickness


def _normal(iop: np.ndarray) -> np.ndarray:
    return np.cross(iop[:3], iop[3:])


def build_affine(
    positions: np.ndarray, iop: np.ndarray, ps: np.ndarray | None, thickness: float | None
) -> tuple[np.ndarray | None, float]:
    """LPS affine over (column, row, slice) indices and the slice spacing (mm).

    Slices are assumed evenly spaced (first to last); a single slice uses its thickness.
    """
    ps = ps if ps is not None else np.ones(2)
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        dz = float(np.linalg.norm(step))
        if dz < 1e-6:  # all frames at one place (e.g. cine): no 3-D geometry
            return None, 1.0
    else:
        dz = thickness if thickness and thickness > 0 else 1.0
        step = _normal(iop) * dz
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * ps[1]  # along a row: column index grows
    affine[:3, 1] = iop[3:] * ps[0]  # down a column: row index grows
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return affine, dz


# ----------------------------------------------------------------------------- grey values


def _window(ds: Dataset) -> tuple[float, float] | None:
    src = ds
    if "WindowCenter" not in ds:
        item = _group_item(ds, 0, "FrameVOILUTSequence")
        if item is None:
            return None
        src = item
    c, w = src.get("WindowCenter"), src.get("WindowWidth")
    c = c[0] if isinstance(c, pydicom.multival.MultiValue) else c
    w = w[0] if isinstance(w, pydicom.multival.MultiValue) else w
    try:
        c, w = float(c), float(w)
    except (TypeError, ValueError):
        return None
    return (c, w) if np.isfinite(c) and np.isfinite(w) and w > 0 else None


def _modality_values(ds: Dataset, frames: np.ndarray) -> np.ndarray:
    """(F, H, W) stored values -> float32 modality values (rescale / LUT, per frame)."""
    out = np.empty(frames.shape, dtype=np.float32)
    top_level = "RescaleSlope" in ds or "ModalityLUTSequence" in ds
    for i, frame in enumerate(frames):
        if top_level:
            out[i] = apply_modality_lut(frame, ds)
            continue
        item = _group_item(ds, i, "PixelValueTransformationSequence")
        slope = float(item.get("RescaleSlope", 1) or 1) if item is not None else 1.0
        inter = float(item.get("RescaleIntercept", 0) or 0) if item is not None else 0.0
        out[i] = frame.astype(np.float32) * slope + inter
    if "DoseGridScaling" in ds:
        out *= np.float32(float(ds.DoseGridScaling))
    return out


def _grey_values(ds: Dataset, frames: np.ndarray, meta: dict) -> np.ndarray:
    """Decoded frames of one file -> (F, H, W) float32: colour luma or modality values."""
    if frames.ndim == 4:  # (F, H, W, 3) RGB: modality and VOI LUTs do not apply
        return rgb_to_grey(frames)
    grey = _modality_values(ds, frames)
    if _window(ds) is None and "VOILUTSequence" in ds:
        grey = np.stack([apply_voi_lut(f, ds) for f in grey]).astype(np.float32)
        meta["voi"] = "lut"
    return grey


def _finish_grey(ds: Dataset, grey: np.ndarray, meta: dict) -> np.ndarray:
    """Non-finite cleanup, MONOCHROME1 inversion and the window of a whole scan."""
    grey, nonfinite = replace_nonfinite(grey)
    if nonfinite:
        meta["nonfinite"] = nonfinite
    if int(ds.SamplesPerPixel) != 1 or "PALETTE" in str(ds.PhotometricInterpretation):
        return grey  # colour: no window, no inversion
    window = None if meta.get("voi") == "lut" else _window(ds)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        lo, hi = float(grey.min()), float(grey.max())
        grey = (lo + hi) - grey
        window = (lo + hi - window[0], window[1]) if window else None
        meta["inverted"] = True
    if window is not None:
        meta["window"] = window
        meta["voi"] = "window"
    return grey


def _base_meta(ds: Dataset) -> dict:
    return {
        "modality": str(ds.get("Modality", "")) or None,
        "sop_class": _describe(ds),
        "transfer_syntax": UID(str(ds.file_meta.TransferSyntaxUID)).name,
        "photometric": str(ds.PhotometricInterpretation),
        "series_uid": str(ds.get("SeriesInstanceUID", "")) or None,
    }


def _assemble(
    grey: np.ndarray,
    datasets: list[Dataset],
    path: Path,
    positions: np.ndarray | None,
    iop: np.ndarray | None,
    ps: np.ndarray | None,
    thickness: float | None,
    meta: dict,
) -> Scan:
    """Build the Scan from (N, H, W) grey values and the geometry of its slices."""
    affine, dz = None, 1.0
    if positions is not None and iop is not None:
        affine, dz = build_affine(positions, iop, ps, thickness)
        if len(positions) > 2:
            gaps = np.diff(positions @ _normal(iop))
            if np.ptp(gaps) > 0.01 * max(abs(float(np.mean(gaps))), 1e-6):
                meta["uneven_spacing"] = True
    rs, cs = (float(ps[0]), float(ps[1])) if ps is not None else (1.0, 1.0)
    for ds in datasets:
        _drop_pixels(ds)
    meta["frames"] = len(grey)
    if len(grey) == 1:
        return Scan(grey[0], path, "dicom", (rs, cs), affine, datasets, None, meta)
    return Scan(grey, path, "dicom", (dz, rs, cs), affine, datasets, None, meta)


def read_dicom_file(path: Path) -> Scan:
    """One DICOM file (single- or multi-frame) -> Scan."""
    ds = load_dataset(path)
    _check_image(ds, path, allow_seg=False)
    frames = decode_frames(ds, path)
    meta = _base_meta(ds)
    grey = _finish_grey(ds, _grey_values(ds, frames, meta), meta)
    positions, iop, ps, thickness = frame_geometry(ds, len(grey))
    return _assemble(grey, [ds], path, positions, iop, ps, thickness, meta)


# ----------------------------------------------------------------------------- series


def _series_files(folder: Path) -> tuple[list[tuple[Path, Dataset]], list[str]]:
    """DICOM images of one series in ``folder`` (not recursive) and the names skipped."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images, skipped = [], []
    for p in files:
        ds = load_dataset(p, strict=False)
        if ds is None or not any(k in ds for k in PIXEL_KEYWORDS):
            skipped.append(p.name)
        else:
            images.append((p, ds))
    if not images:
        raise InputError("no DICOM images in this folder (sub-folders are not searched)", folder)
    series = Counter(str(ds.get("SeriesInstanceUID", "unknown")) for _, ds in images)
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({n} files)" for uid, n in series.most_common())
        raise InputError(
            f"holds {len(series)} DICOM series, pass a folder with one series: "
            f"SeriesInstanceUIDs {listing}",
            folder,
        )
    return images, skipped


def _sort_series(
    images: list[tuple[Path, Dataset]], folder: Path
) -> tuple[list[tuple[Path, Dataset]], np.ndarray | None, np.ndarray | None]:
    """Sort single-frame slices along the normal (else by InstanceNumber).

    Returns the sorted slices, their positions (N, 3) and the orientation, or None, None.
    """
    geoms = [frame_geometry(ds, 1) for _, ds in images]
    if all(g[0] is not None and g[1] is not None for g in geoms):
        iop = geoms[0][1]
        if any(not np.allclose(g[1], iop, atol=1e-3) for g in geoms):
            raise InputError("slices of the series have different orientations", folder)
        keys = np.array([g[0][0] @ _normal(iop) for g in geoms])
        order = np.argsort(keys, kind="stable")
        gaps = np.diff(keys[order])
        if (gaps < 1e-4).any():
            raise InputError(
                f"{int((gaps < 1e-4).sum()) + 1} files share slice positions "
                "(several acquisitions in one series?); split them into folders",
                folder,
            )
        positions = np.stack([geoms[i][0][0] for i in order])
        return [images[i] for i in order], positions, iop

    def instance(item: tuple[Path, Dataset]) -> tuple[int, str]:
        try:
            return int(item[1].get("InstanceNumber") or 0), item[0].name
        except (TypeError, ValueError):
            return 0, item[0].name

    return sorted(images, key=instance), None, None


def series_headers(
    folder: Path, *, allow_seg: bool
) -> tuple[list[tuple[Path, Dataset]], list[str], np.ndarray | None, np.ndarray | None]:
    """The one series of ``folder`` from its headers (no pixel data decoded): its (path,
    dataset) pairs in slice order, the files skipped (not DICOM images), the slice positions
    and the orientation (``None`` when unknown). Refused: a SEG among the images (unless
    ``allow_seg``), several multi-frame files, slices of different sizes."""
    images, skipped = _series_files(folder)
    for p, ds in images:
        _check_image(ds, p, allow_seg=allow_seg)
    if len(images) > 1:
        if any(num_frames(ds, p) > 1 for p, ds in images):
            raise InputError("holds several multi-frame DICOM files; pass one file", folder)
        if len({(int(ds.Rows), int(ds.Columns)) for _, ds in images}) > 1:
            raise InputError("slices of the series have different sizes", folder)
    ordered, positions, iop = _sort_series(images, folder)
    return ordered, skipped, positions, iop


def read_dicom_folder(folder: Path) -> Scan:
    """A folder holding one series (single-frame files, or one multi-frame file) -> Scan."""
    ordered, skipped, positions, iop = series_headers(folder, allow_seg=False)
    if len(ordered) == 1:
        scan = read_dicom_file(ordered[0][0])
        scan.path = folder
    else:
        first = ordered[0][1]
        meta = _base_meta(first)
        grey = np.concatenate(
            [_grey_values(ds, decode_frames(ds, p), meta) for p, ds in ordered]
        )  # (N, H, W)
        grey = _finish_grey(first, grey, meta)
        _, _, ps, thickness = frame_geometry(first, 1)
        datasets = [ds for _, ds in ordered]
        scan = _assemble(grey, datasets, folder, positions, iop, ps, thickness, meta)
        scan.meta["files"] = [p.name for p, _ in ordered]
    if skipped:
        scan.meta["skipped"] = skipped
    return scan


def read_dicom(path: Path) -> Scan:
    return read_dicom_folder(path) if path.is_dir() else read_dicom_file(path)


# ----------------------------------------------------------------------------- masks


def _foreground(frames: np.ndarray) -> np.ndarray:
    """(F, H, W[, 3]) stored values -> (F, H, W) bool: any channel > 0."""
    return (frames > 0).any(axis=-1) if frames.ndim == 4 else frames > 0


def _seg_mask(ds: Dataset, frames: np.ndarray) -> np.ndarray:
    """DICOM SEG frames -> (N, H, W) bool, all segments merged, slices in spatial order.

    Frames are keyed by their referenced source frame number, else their position along the
    normal, else their order within a segment; frames sharing a key are OR-ed.
    """
    fg = _foreground(frames)
    ori = _group_item(ds, 0, "PlaneOrientationSequence")
    iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None
    slices: dict[tuple, np.ndarray] = {}
    seen: Counter = Counter()
    for i in range(len(fg)):
        seg_item = _group_item(ds, i, "SegmentIdentificationSequence")
        segment = int(seg_item.get("ReferencedSegmentNumber", 1)) if seg_item is not None else 1
        key: tuple = ("order", seen[segment])
        seen[segment] += 1
        deriv = _group_item(ds, i, "DerivationImageSequence")
        src = deriv.get("SourceImageSequence") if deriv is not None else None
        ref = src[0].get("ReferencedFrameNumber") if src else None
        pos_item = _group_item(ds, i, "PlanePositionSequence")
        pos = _floats(pos_item.get("ImagePositionPatient"), 3) if pos_item is not None else None
        if ref not in (None, ""):
            key = ("frame", int(ref[0] if isinstance(ref, pydicom.multival.MultiValue) else ref))
        elif pos is not None and iop is not None:
            key = ("pos", round(float(pos @ _normal(iop)), 3))
        slices[key] = slices[key] | fg[i] if key in slices else fg[i]
    return np.stack([slices[k] for k in sorted(slices)])


def _binary_frames(frames: np.ndarray, path: Path, binary: bool) -> np.ndarray:
    if binary:
        check_binary(frames, path)
    return frames


def read_dicom_mask(path: Path, binary: bool = False) -> np.ndarray:
    """A DICOM mask (image > 0, or a DICOM SEG) -> bool (H, W) or (D, H, W).

    ``binary``: refuse stored values of a mask image other than 0/1 or 0/255
    (:class:`NonBinaryMaskError`); a DICOM SEG is a segmentation by definition.
    """
    if path.is_dir():
        ordered, _, _, _ = series_headers(path, allow_seg=True)
        if len(ordered) == 1:
            return read_dicom_mask(ordered[0][0], binary)
        mask = np.concatenate(
            [_foreground(_binary_frames(decode_frames(ds, p), p, binary)) for p, ds in ordered]
        )
    else:
        ds = load_dataset(path)
        _check_image(ds, path, allow_seg=True)
        frames = decode_frames(ds, path)
        is_seg = str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES
        mask = (
            _seg_mask(ds, frames) if is_seg else _foreground(_binary_frames(frames, path, binary))
        )
    return mask[0] if len(mask) == 1 else mask
