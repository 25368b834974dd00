"""Writing masks and probability maps as PNG, NIfTI (source geometry) or DICOM SEG.

Every writer goes through :func:`mrisegcli.io.atomic.atomic_path`: the file appears whole or
not at all, and an existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, PngImagePlugin

from mrisegcli import __version__
from mrisegcli.errors import MrisegError
from mrisegcli.io.atomic import atomic_path, check_writable
from mrisegcli.io.overlay import heat_colormap
from mrisegcli.io.scan import Scan

if TYPE_CHECKING:  # highdicom is imported only when a SEG is written (it is slow to import)
    import highdicom as hd

MASK_FORMATS = ("png", "nii", "dcm")
EXTENSIONS = {"png": ".png", "nii": ".nii.gz", "dcm": ".dcm"}
_ALIASES = {"nii.gz": "nii", "nifti": "nii", "dicom": "dcm", "seg": "dcm"}
_INPUT_SUFFIXES = (
    ".dcm", ".dicom", ".dic", ".ima", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
    ".gif",
)  # fmt: skip

# The target is whatever the text prompt names, so the SEG uses the generic SNOMED CT "Tissue"
# code (85756007) for category and type and carries the prompt itself in SegmentDescription.
SEGMENT_LABEL = "Target"


def _format(fmt: str) -> str:
    f = _ALIASES.get(fmt.lower().lstrip("."), fmt.lower().lstrip("."))
    if f not in MASK_FORMATS:
        raise MrisegError(f"unknown output format {fmt!r} (choose png, nii or dcm)")
    return f


#: What one input of ``mriseg predict`` may write: key -> file-name suffix (the extension
#: follows the format).
OUTPUT_SUFFIXES = {"mask": "_mask", "uncertainty": "_uncertainty", "overlay": "_overlay",
                   "steps": "_steps"}  # fmt: skip


#: what a prompt tag in an output name looks like (:func:`prompt_tag`, ``<stem>_<tag>_mask.png``)
PROMPT_TAG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_TAG_CHARS = 40


def prompt_tag(text: str) -> str:
    """A prompt as part of a file name: accents folded, lower case, runs of anything but ASCII
    letters and digits as one ``-``, at most 40 characters ("Left lung!" -> "left-lung");
    empty when nothing is left (a prompt in another script)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", folded).strip("-")[:_TAG_CHARS].rstrip("-")


def output_path_for(
    input_path: str | Path, out_dir: str | Path | None, fmt: str, suffix: str = "_mask"
) -> Path:
    """``<out_dir>/<stem><suffix><ext>`` for an input file or DICOM folder.

    The stem drops ``.nii.gz`` and known image suffixes; a DICOM folder uses its name; other
    names (extension-less or UID-named DICOM files) are kept whole. ``out_dir=None`` puts the
    output beside the input. An output that would replace the input is refused.
    """
    src = Path(input_path)
    name = src.name or src.resolve().name
    if src.is_dir():
        stem = name
    elif name.lower().endswith(".nii.gz"):
        stem = name[: -len(".nii.gz")]
    elif src.suffix.lower() in _INPUT_SUFFIXES:
        stem = src.stem
    else:
        stem = name
    folder = Path(out_dir) if out_dir is not None else src.parent
    out = folder / f"{stem}{suffix}{EXTENSIONS[_format(fmt)]}"
    if src.exists() and out.resolve() == src.resolve():
        raise MrisegError("output name would replace the input; use another suffix", out)
    return out


def _check_array(array: np.ndarray, scan: Scan, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != scan.shape:
        raise MrisegError(f"{what} shape {array.shape} does not match the scan {scan.shape}")
    return array


def _as_2d(array: np.ndarray, out_path: Path, what: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] == 1:
        return array[0]
    if array.ndim != 2:
        raise MrisegError(
            f"a {what} of a volume {array.shape} cannot be a PNG; use --format nii or dcm",
            out_path,
        )
    return array


def _png_info(description: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"mriseg {__version__}")
    if description:
        info.add_text("Description", description)
    return info


def _check_nii_name(out_path: Path) -> None:
    if not out_path.name.lower().endswith((".nii", ".nii.gz")):
        raise MrisegError("a NIfTI output must end in .nii or .nii.gz", out_path)


def _write_nifti(
    data: np.ndarray,
    scan: Scan,
    dtype: type,
    description: str,
    out_path: Path,
    overwrite: bool,
) -> None:
    """``data`` in the scan's geometry as a NIfTI file (``cal_max`` 1); nibabel is imported
    here, only when a NIfTI is written."""
    import nibabel as nib

    from mrisegcli.io.nifti import make_nifti

    _check_nii_name(out_path)
    nii = make_nifti(data, scan, dtype, description)
    nii.header["cal_max"] = 1.0
    with atomic_path(out_path, overwrite) as tmp:
        nib.save(nii, str(tmp))


def write_mask(
    mask: np.ndarray,
    scan: Scan,
    out_path: str | Path,
    fmt: str,
    *,
    overwrite: bool = False,
    description: str = "",
) -> Path:
    """Write a binary mask of ``scan.shape`` as "png" (0/255, 2-D), "nii" or "dcm" (SEG).

    ``description`` (e.g. the text prompt) is stored in the file's metadata.
    """
    out_path, fmt = Path(out_path), _format(fmt)
    fg = _check_array(mask, scan, "mask") > 0
    check_writable(out_path, overwrite)
    if fmt == "png":
        img = Image.fromarray(_as_2d(fg, out_path, "mask").astype(np.uint8) * 255)
        with atomic_path(out_path, overwrite) as tmp:
            img.save(tmp, format="PNG", pnginfo=_png_info(description))
    elif fmt == "nii":
        _write_nifti(fg, scan, np.uint8, description or "mriseg mask", out_path, overwrite)
    else:
        seg = build_segmentation(fg, scan, description)
        with atomic_path(out_path, overwrite) as tmp:
            seg.save_as(tmp)
    return out_path


def write_prob_map(
    prob: np.ndarray,
    scan: Scan,
    out_path: str | Path,
    fmt: str,
    *,
    overwrite: bool = False,
    description: str = "",
) -> Path:
    """Write a float map in [0, 1] (soft mask, uncertainty) as "nii" (float32) or "png".

    NIfTI keeps the scan's geometry; PNG is a colour heat map (2-D only).
    """
    out_path, fmt = Path(out_path), _format(fmt)
    p = np.clip(np.nan_to_num(_check_array(prob, scan, "map").astype(np.float32)), 0.0, 1.0)
    check_writable(out_path, overwrite)
    if fmt == "png":
        rgb = heat_colormap(_as_2d(p, out_path, "map"))
        with atomic_path(out_path, overwrite) as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG", pnginfo=_png_info(description))
    elif fmt == "nii":
        _write_nifti(p, scan, np.float32, description or "mriseg probability", out_path, overwrite)
    else:
        raise MrisegError("probability maps are written as nii or png, not dcm", out_path)
    return out_path


def _segment_description(description: str) -> hd.seg.SegmentDescription:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    item = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="mriseg", version=__version__, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    if description:
        item.SegmentDescription = description[:64]  # LO: 64 characters at most
    return item


def _check_seg_reference(src, num_slices: int, path: Path) -> None:
    """Refuse a DICOM source that a SEG could not reference (headers only)."""
    try:
        n_frames = int(src.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames > 1 and "SharedFunctionalGroupsSequence" not in src:
        raise MrisegError(
            f"DICOM SEG cannot reference this multi-frame {src.get('Modality', '')} image "
            "(no functional groups); use --format nii",
            path,
        )
    if num_slices > 1 and "FrameOfReferenceUID" not in src:
        raise MrisegError(
            "DICOM SEG of several slices needs a FrameOfReferenceUID; use --format nii", path
        )


def check_not_segmentation(path: str | Path) -> None:
    """Refuse a DICOM SEG file given as the image to segment, from its header: before the
    model loads, and before a SEG of it is planned (whose checks would suggest a format)."""
    from mrisegcli.errors import InputError
    from mrisegcli.io.dicom import SEG_SOP_CLASSES, load_dataset

    path = Path(path)
    if path.is_dir():
        return  # a folder's SEG files are never inputs (io.discover)
    try:
        ds = load_dataset(path, strict=False)
    except MrisegError:
        return  # unreadable: the reader says why when it reads the file
    if ds is not None and str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES:
        raise InputError(
            "is a DICOM Segmentation (a mask), not an image to segment: give the image it "
            "was made from",
            path,
        )


def check_segmentation_source(path: str | Path) -> None:
    """Whether a DICOM SEG can be written for the DICOM file or series folder ``path``, from
    its headers alone (no pixel data decoded): called before the model runs, so that an
    impossible SEG is refused up front instead of after the work. An unreadable input is left
    to the reader (it reports why when it reads the file)."""
    from mrisegcli.errors import InputError
    from mrisegcli.io.dicom import load_dataset, num_frames, series_headers

    path = Path(path)
    try:
        if path.is_dir():
            ordered = series_headers(path, allow_seg=False)[0]
            if not ordered:
                return
            src = ordered[0][1]
            slices = len(ordered) if len(ordered) > 1 else num_frames(src, ordered[0][0])
        else:
            src = load_dataset(path)
            slices = num_frames(src, path)
    except InputError:
        return
    _check_seg_reference(src, slices, path)


#: Type 2 attributes of the Patient and General Study modules that a SEG copies from its
#: source: anonymisers often remove them, and DICOM lets them be empty (type 2: present, maybe
#: without a value), so a source without them gets them empty
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip


def _fill_type2(datasets: list) -> None:
    """Give the source datasets (in memory; the files are not touched) every type 2 attribute
    the SEG copies, empty where an anonymiser removed it."""
    for ds in datasets:
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")


def build_segmentation(mask: np.ndarray, scan: Scan, description: str = "") -> hd.seg.Segmentation:
    """A BINARY DICOM SEG of ``mask`` (scan.shape) referencing the scan's source datasets.

    Works for one image, a series (one frame per slice, in slice order) and an enhanced
    multi-frame image; legacy multi-frame files (no functional groups) and sources without a
    frame of reference but with several frames are refused, as the SEG could not be placed.
    """
    if scan.format != "dicom" or not scan.datasets:
        raise MrisegError(
            f"DICOM SEG needs a DICOM source, this scan is {scan.format}; use --format nii or png",
            scan.path,
        )
    src = scan.datasets[0]
    _check_seg_reference(src, scan.num_slices, scan.path)
    import highdicom as hd

    fg = (np.asarray(mask) > 0).astype(np.uint8)  # (H, W) or (D, H, W)
    _fill_type2(scan.datasets)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            seg = hd.seg.Segmentation(
                source_images=scan.datasets,
                pixel_array=fg,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[_segment_description(description)],
                series_instance_uid=hd.UID(),
                series_number=int(src.get("SeriesNumber") or 0) + 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="mriseg",
                manufacturer_model_name="mriseg",
                software_versions=__version__,
                device_serial_number="0",
                content_description=(description or "mriseg segmentation")[:64],
                omit_empty_frames=False,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise MrisegError(
            f"cannot build a DICOM SEG for this source ({err}); use --format nii", scan.path
        ) from err
    if int(seg.NumberOfFrames) != scan.num_slices:
        raise MrisegError(
            f"DICOM SEG got {seg.NumberOfFrames} frames for {scan.num_slices} slices; "
            "use --format nii",
            scan.path,
        )
    seg.SeriesDescription = "mriseg mask"
    return seg
