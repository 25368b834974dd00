"""Input discovery for ``mriseg predict``: files, folders and ``-`` (paths on stdin) into a
list of inputs, where a folder holding one DICOM series is one input.

Folders are listed one level deep in natural order ('img2' before 'img10'); DICOM files are
recognised by their 'DICM' preamble whatever their names; DICOM objects without pixels and DICOM
SEGs are never inputs, nor are files named like this tool's outputs of another entry.
:func:`is_volume` tells from the headers alone whether an input has several slices.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from mrisegcli.errors import InputError, MrisegError
from mrisegcli.io.read import check_input_path
from mrisegcli.io.write import OUTPUT_SUFFIXES, PROMPT_TAG, output_path_for

if TYPE_CHECKING:
    from mrisegcli.io.prompts import PromptRow

_NAMED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz")
IMAGE_SUFFIXES = (*_NAMED_SUFFIXES, ".dcm")  # inputs found in folders (plus DICOM by preamble)


def _natural_key(name: str) -> list:
    """'img2' < 'img10': digit runs compare as numbers (split alternates text and digits)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _has_dicm(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _known_image_name(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def dicom_kind(path: Path) -> tuple[str, Any]:
    """("image", dataset) for a DICOM image (pixels deferred), ("other", None) for a DICOM
    object that is no image to segment (no pixels, or a SEG mask), ("unreadable", None)."""
    from mrisegcli.io.dicom import PIXEL_KEYWORDS, SEG_SOP_CLASSES, load_dataset

    try:
        ds = load_dataset(path, strict=False)
    except MrisegError:
        ds = None
    if ds is None:
        return "unreadable", None
    if not any(k in ds for k in PIXEL_KEYWORDS):
        return "other", None
    if str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES:
        return "other", None
    return "image", ds


def frames(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


@dataclass
class Folder:
    series: bool  # the folder's images are one DICOM series (one input)
    images: list[Path]  # the image files in natural order (when not a series)
    subfolders: list[Path]


def _is_tagged_output(name: str, stems: set[str]) -> bool:
    """Whether ``name`` is ``<stem>_<prompt tag><suffix><ext>`` for one of ``stems``: an output
    of an image segmented with several prompts (:func:`~mrisegcli.io.write.prompt_tag`)."""
    for suffix in OUTPUT_SUFFIXES.values():
        for ext in (".png", ".nii.gz", ".dcm"):
            if not name.endswith(suffix + ext):
                continue
            rest = name[: -len(suffix + ext)]
            for m in re.finditer("_", rest):
                if rest[: m.start()] in stems and PROMPT_TAG.fullmatch(rest[m.start() + 1 :]):
                    return True
    return False


def scan_folder(folder: Path) -> Folder:
    """Classify a folder's entries (one level): image files, DICOM series, sub-folders.

    The folder is one series when it holds at least two DICOM images, all single-frame with a
    position and of one SeriesInstanceUID, and no other image files. DICOM objects without
    pixels and DICOM SEGs (masks) are never inputs; neither are files named like this tool's
    outputs of another entry (``<stem>_mask.png`` beside ``<stem>.png``).
    """
    try:
        entries = sorted(
            (p for p in folder.iterdir() if not p.name.startswith(".")),
            key=lambda p: _natural_key(p.name),
        )
    except OSError as err:
        raise InputError(f"cannot list folder ({err.strerror})", folder) from err
    subfolders = [p for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    candidates = [p for p in files if _known_image_name(p) or _has_dicm(p)]
    own = {
        output_path_for(c, folder, fmt, suffix).name
        for c in candidates + subfolders
        for suffix in OUTPUT_SUFFIXES.values()
        for fmt in ("png", "nii", "dcm")
    }
    stems = {output_path_for(c, folder, "png").name[: -len("_mask.png")]
             for c in candidates + subfolders}  # fmt: skip
    candidates = [
        p for p in candidates if p.name not in own and not _is_tagged_output(p.name, stems)
    ]
    images, dicoms = [], []
    for p in candidates:
        if p.name.lower().endswith(_NAMED_SUFFIXES):  # raster or NIfTI by name
            images.append(p)
            continue
        kind, ds = dicom_kind(p)
        if kind == "image":
            images.append(p)
            dicoms.append(ds)
        elif kind == "unreadable":
            images.append(p)  # kept, so that reading it reports why
    series = (
        len(dicoms) >= 2
        and len(dicoms) == len(images)
        and len({str(ds.get("SeriesInstanceUID", "")) for ds in dicoms}) == 1
        and all(frames(ds) == 1 and "ImagePositionPatient" in ds for ds in dicoms)
    )
    return Folder(series, images, subfolders)


def expand_one(path: Path) -> list[Path]:
    if not check_input_path(path):  # missing, a symlink loop, a FIFO or device: refused here
        return [path]
    listing = scan_folder(path)
    series_subs = [s for s in listing.subfolders if scan_folder(s).series]
    found = [path] + series_subs if listing.series else listing.images + series_subs
    if not found:
        raise InputError(
            "no images in this folder (png jpg jpeg tif tiff bmp nii nii.gz dcm or DICOM "
            "files; sub-folders count only when each holds one DICOM series)",
            path,
        )
    if not listing.series:
        found.sort(key=lambda p: _natural_key(p.name))
    return found


def read_stdin(stdin: TextIO | None, what: str) -> str:
    stream = sys.stdin if stdin is None else stdin
    if stream is None:
        raise MrisegError(f"'-' reads {what} from stdin, but there is no stdin")
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        raise MrisegError(f"'-' reads {what} from stdin, but stdin is a terminal")
    return stream.read()


def _stdin_paths(stdin: TextIO | None) -> list[str]:
    text = read_stdin(stdin, "input paths")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _expand_or_record(path: Path, errors: dict[Path, str] | None) -> list[Path]:
    """:func:`expand_one`, or with ``errors`` the path itself with its message recorded."""
    try:
        return expand_one(path)
    except InputError as err:
        if errors is None:
            raise
        errors[path] = str(err)
        return [path]


def expand_inputs(
    inputs: Sequence[str | Path],
    stdin: TextIO | None = None,
    *,
    errors: dict[Path, str] | None = None,
) -> list[Path]:
    """Files, folders and ``-`` (paths on ``stdin``, default ``sys.stdin``) -> input paths.

    A file is an input as given. A folder holding one DICOM series is one input; any other
    folder gives its image files (known extensions, or DICOM by the 'DICM' preamble) and its
    sub-folders that each hold one DICOM series, in natural order. Duplicates (same resolved
    path) are dropped, first occurrence kept.

    A path that does not exist (or a folder without images) raises; given an ``errors`` dict
    (``--keep-going``), it stays in the list as given and its message goes into ``errors``, for
    :func:`plan_outputs` (``input_errors``) to record as that input's error.
    """
    found: list[Path] = []
    for raw in inputs:
        if str(raw) == "-":
            for line in _stdin_paths(stdin):
                found.extend(_expand_or_record(Path(line), errors))
        else:
            found.extend(_expand_or_record(Path(raw), errors))
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    if not unique:
        raise MrisegError("no inputs: give files, folders, or - to read paths from stdin")
    return list(unique.values())


def prompt_inputs(rows: Sequence[PromptRow], errors: dict[Path, str] | None = None) -> list[Path]:
    """One input per row, in order (no de-duplication): a file, or a folder holding one DICOM
    series. A missing path or a folder of several images raises, or with an ``errors`` dict is
    recorded there (see :func:`expand_inputs`)."""
    found = []
    for row in rows:
        try:
            paths = expand_one(row.path)
            if len(paths) != 1:
                raise InputError(
                    f"is a folder of {len(paths)} inputs; a prompts row names one image, volume "
                    "or DICOM series folder",
                    row.path,
                )
        except InputError as err:
            if errors is None:
                raise
            errors[row.path] = str(err)
            paths = [row.path]
        found.append(paths[0])
    return found


def is_volume(path: Path, kind: str) -> bool:
    """Whether an input has several slices, from its header only (False when unsure)."""
    try:
        if path.is_dir():
            listing = scan_folder(path)
            if listing.series:
                return True
            return len(listing.images) == 1 and is_volume(listing.images[0], "dicom")
        if kind == "raster":
            from mrisegcli.io.raster import open_image

            with open_image(path) as im:
                if im.format != "TIFF" or getattr(im, "n_frames", 1) < 2:
                    return False
                sizes = set()
                for i in range(im.n_frames):
                    im.seek(i)
                    sizes.add(im.size)
                return len(sizes) == 1
        if kind == "nifti":
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(str(path)).shape)
            return len(shape) >= 3 and int(np.prod(shape[2:])) > 1
        kind, ds = dicom_kind(path)
        return kind == "image" and frames(ds) > 1
    except (MrisegError, OSError, ValueError, EOFError):
        return False  # unreadable: reading it later reports the reason


__all__ = [
    "IMAGE_SUFFIXES",
    "Folder",
    "dicom_kind",
    "expand_inputs",
    "expand_one",
    "frames",
    "is_volume",
    "prompt_inputs",
    "read_stdin",
    "scan_folder",
]
