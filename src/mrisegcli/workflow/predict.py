"""The file side of ``mriseg predict``: inputs -> planned outputs -> a mask on each scan's grid.

The model is any :class:`SliceSegmenter`: a callable from square slices to probabilities, so
this module does not depend on the model code. A batch runs in two stages:

1. :func:`expand_inputs` turns files, folders and ``-`` (paths on stdin) into a list of inputs
   (a folder holding one DICOM series is one input), and :func:`plan_outputs` decides every
   output path up front: name collisions, outputs that already exist and paths outside
   ``out_dir`` are refused before any model work, so a batch never stops half-written on names.
2. :func:`run_plans` reads each scan, asks the model for every slice, resizes the
   probabilities back to each slice's own (H, W), thresholds them and writes the mask (and
   optionally uncertainty, overlay and coarse-to-fine pictures). Each file is written atomically;
   when one output of an input fails, that input's other outputs are removed again.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from mrisegcli.errors import InputError, MrisegError, OutputExistsError
from mrisegcli.io import (
    normalize_intensity,
    output_path_for,
    read_scan,
    resize_prob,
    scan_model_inputs,
    write_mask,
    write_overlay,
    write_prob_map,
)
from mrisegcli.io.read import check_input_path, detect_format
from mrisegcli.io.scan import Scan
from mrisegcli.io.write import check_segmentation_source

MAX_TEXT_CHARS = 10_000
FORMATS = ("auto", "png", "nii", "dcm")
_FORMAT_ALIASES = {"nii.gz": "nii", "nifti": "nii", "dicom": "dcm", "seg": "dcm"}
_NAMED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz")
IMAGE_SUFFIXES = (*_NAMED_SUFFIXES, ".dcm")  # inputs found in folders (plus DICOM by preamble)
# What one input may write: key -> file-name suffix (the extension follows the format).
OUTPUT_SUFFIXES = {"mask": "_mask", "uncertainty": "_uncertainty", "overlay": "_overlay",
                   "steps": "_steps"}  # fmt: skip
_SHOWN = 3  # existing outputs named in the refusal


# ----------------------------------------------------------------------------- model interface


@dataclass
class SlicePrediction:
    """What a segmenter returns for N slices at its own square resolution S."""

    prob: np.ndarray  # (N, S, S) float32 in [0, 1]
    uncertainty: np.ndarray | None = None  # (N, S, S) float32 in [0, 1]
    steps: list[np.ndarray] | None = None  # coarse-to-fine probabilities, each (N, s, s)


class SliceSegmenter(Protocol):
    """A model behind ``predict``: (N, S, S) images in [0, 1] and one text -> SlicePrediction."""

    image_size: int

    def __call__(self, images_NSS: np.ndarray, text: str) -> SlicePrediction: ...


class ModelOutputError(MrisegError):
    """The model's output lacks what the options ask for; fatal even with ``keep_going``."""


@dataclass
class PlannedOutput:
    """One input and every path it will write (``error`` set when it cannot be planned)."""

    input: Path
    fmt: str = ""  # mask format: "png", "nii" or "dcm"
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PredictResult:
    """The outcome of one input; ``error`` is the one-line message when it failed."""

    input: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    slices: int = 0
    foreground_pixels: int = 0
    foreground_fraction: float = 0.0
    # the highest foreground probability anywhere in the scan: how sure the model is that what
    # the text names is there at all (an empty mask means "no region found")
    presence: float = 0.0
    modality: str | None = None  # DICOM Modality of the input, when it has one
    seconds: float = 0.0
    error: str | None = None
    text: str | None = None  # the prompt this input was segmented with


    @property
    def found(self) -> bool:
        return self.error is None and self.foreground_pixels > 0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (paths as strings)."""
        return {
            "input": str(self.input),
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "shape": [int(s) for s in self.shape],
            "slices": int(self.slices),
            "foreground_pixels": int(self.foreground_pixels),
            "foreground_fraction": float(self.foreground_fraction),
            "found": self.found,
            "presence": round(float(self.presence), 4),
            "modality": self.modality,
            "seconds": round(float(self.seconds), 4),
            "error": self.error,
            "text": self.text,
        }


def validate_text(text: str, what: str = "--text") -> str:
    """The prompt without surrounding whitespace; empty or over 10000 characters is refused.

    ``what`` names the prompt in the messages (``--text``, or a prompts file's row).
    """
    stripped = (text or "").strip()
    if not stripped:
        raise MrisegError(f"{what} is empty")
    if len(stripped) > MAX_TEXT_CHARS:
        raise MrisegError(
            f"{what} is {len(stripped)} characters long; the limit is {MAX_TEXT_CHARS}"
        )
    if not any(unicodedata.category(c)[0] in "LN" for c in stripped):
        raise MrisegError(f"{what} has no letters or digits")
    return stripped


# ----------------------------------------------------------------------------- inputs


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


def _dicom_kind(path: Path) -> tuple[str, Any]:
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


def _frames(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


@dataclass
class _Folder:
    series: bool  # the folder's images are one DICOM series (one input)
    images: list[Path]  # the image files in natural order (when not a series)
    subfolders: list[Path]


def _scan_folder(folder: Path) -> _Folder:
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
    candidates = [p for p in candidates if p.name not in own]
    images, dicoms = [], []
    for p in candidates:
        if p.name.lower().endswith(_NAMED_SUFFIXES):  # raster or NIfTI by name
            images.append(p)
            continue
        kind, ds = _dicom_kind(p)
        if kind == "image":
            images.append(p)
            dicoms.append(ds)
        elif kind == "unreadable":
            images.append(p)  # kept, so that reading it reports why
    series = (
        len(dicoms) >= 2
        and len(dicoms) == len(images)
        and len({str(ds.get("SeriesInstanceUID", "")) for ds in dicoms}) == 1
        and all(_frames(ds) == 1 and "ImagePositionPatient" in ds for ds in dicoms)
    )
    return _Folder(series, images, subfolders)


def _expand_one(path: Path) -> list[Path]:
    if not check_input_path(path):  # missing, a symlink loop, a FIFO or device: refused here
        return [path]
    listing = _scan_folder(path)
    series_subs = [s for s in listing.subfolders if _scan_folder(s).series]
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


def _read_stdin(stdin: TextIO | None, what: str) -> str:
    stream = sys.stdin if stdin is None else stdin
    if stream is None:
        raise MrisegError(f"'-' reads {what} from stdin, but there is no stdin")
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        raise MrisegError(f"'-' reads {what} from stdin, but stdin is a terminal")
    return stream.read()


def _stdin_paths(stdin: TextIO | None) -> list[str]:
    text = _read_stdin(stdin, "input paths")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _expand_or_record(path: Path, errors: dict[Path, str] | None) -> list[Path]:
    """:func:`_expand_one`, or with ``errors`` the path itself with its message recorded."""
    try:
        return _expand_one(path)
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


# ----------------------------------------------------------------------------- prompts files


@dataclass(frozen=True)
class PromptRow:
    """One row of a prompts file: an input path (relative to the current folder) and its text."""

    path: Path
    text: str
    line: int  # line of the file the row starts on (1-based), for messages


PROMPT_COLUMNS = ("path", "text")


def _row_error(name: str, line: int, row: int, problem: str) -> MrisegError:
    return MrisegError(f"line {line} (row {row}): {problem}", name)


def _prompt_row(name: str, line: int, row: int, values: Mapping[str, Any]) -> PromptRow:
    for column in PROMPT_COLUMNS:
        value = values.get(column)
        if value is None:
            raise _row_error(name, line, row, f"no {column!r} value")
        if not isinstance(value, str):
            raise _row_error(name, line, row, f"{column!r} must be a string, not {type(value).__name__}")
    path = values["path"].strip()
    if not path:
        raise _row_error(name, line, row, "the path is empty")
    try:
        text = validate_text(values["text"], what="the text")
    except MrisegError as err:
        raise _row_error(name, line, row, str(err)) from None
    return PromptRow(Path(path).expanduser(), text, line)


def _csv_rows(name: str, content: str) -> list[PromptRow]:
    reader = csv.reader(io.StringIO(content))
    header: list[str] | None = None
    rows: list[PromptRow] = []
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue  # blank line
            if header is None:
                header = [c.strip().lower() for c in cells]
                lacking = [c for c in PROMPT_COLUMNS if c not in header]
                if lacking:
                    raise MrisegError(
                        f"line {line}: the first line must be a header naming the columns path and "
                        f"text (found {', '.join(repr(c) for c in cells)})", name)
                continue
            if len(cells) > len(header):
                raise _row_error(name, line, len(rows) + 1,
                                 f"{len(cells)} values for {len(header)} columns (quote a text with commas)")
            values = dict(zip(header, cells, strict=False))  # a short row lacks the last values
            rows.append(_prompt_row(name, line, len(rows) + 1, values))
    except csv.Error as err:
        raise MrisegError(f"line {reader.line_num}: not valid CSV ({err})", name) from None
    if header is None:
        raise MrisegError("empty prompts file (expected a header path,text and one row per input)", name)
    return rows


def _jsonl_rows(name: str, content: str) -> list[PromptRow]:
    rows: list[PromptRow] = []
    for line, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _row_error(name, line, len(rows) + 1, f"not valid JSON ({err.msg})") from None
        if not isinstance(values, dict):
            raise _row_error(name, line, len(rows) + 1, 'expected an object {"path": ..., "text": ...}')
        rows.append(_prompt_row(name, line, len(rows) + 1, values))
    return rows


def read_prompts(source: str | Path, stdin: TextIO | None = None) -> list[PromptRow]:
    """The rows of a prompts file: CSV with a header naming ``path`` and ``text`` (other
    columns are ignored), or JSON lines ``{"path": ..., "text": ...}``; ``-`` reads stdin.

    The kind follows the extension (``.csv``, ``.jsonl``/``.ndjson``), else the content (a
    first line starting with ``{`` is JSON lines). The first bad row (a missing value, an empty
    or unusable text, bad CSV or JSON) raises a :class:`MrisegError` naming the file and row.
    """
    if str(source) == "-":
        name, content = "<stdin>", _read_stdin(stdin, "the prompts")
        kind = ""
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise InputError("no such prompts file" if not path.exists() else "is not a file", path)
        try:
            content = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read the prompts file ({err})", path) from err
        kind = path.suffix.lower()
    content = content.lstrip("\ufeff")
    if kind not in (".csv", ".jsonl", ".ndjson"):
        first = next((x.strip() for x in content.splitlines() if x.strip()), "")
        kind = ".jsonl" if first.startswith("{") else ".csv"
    rows = _jsonl_rows(name, content) if kind in (".jsonl", ".ndjson") else _csv_rows(name, content)
    if not rows:
        raise MrisegError("the prompts file has no rows", name)
    return rows


def prompt_inputs(rows: Sequence[PromptRow], errors: dict[Path, str] | None = None) -> list[Path]:
    """One input per row, in order (no de-duplication): a file, or a folder holding one DICOM
    series. A missing path or a folder of several images raises, or with an ``errors`` dict is
    recorded there (see :func:`expand_inputs`)."""
    found = []
    for row in rows:
        try:
            paths = _expand_one(row.path)
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


# ----------------------------------------------------------------------------- planning


def _canonical_format(fmt: str) -> str:
    f = str(fmt).lower().lstrip(".")
    f = _FORMAT_ALIASES.get(f, f)
    if f not in FORMATS:
        raise MrisegError(f"unknown --format {fmt!r} (choose auto, png, nii or dcm)")
    return f


def _is_volume(path: Path, kind: str) -> bool:
    """Whether an input has several slices, from its header only (False when unsure)."""
    try:
        if path.is_dir():
            listing = _scan_folder(path)
            if listing.series:
                return True
            return len(listing.images) == 1 and _is_volume(listing.images[0], "dicom")
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
        kind, ds = _dicom_kind(path)
        return kind == "image" and _frames(ds) > 1
    except (MrisegError, OSError, ValueError, EOFError):
        return False  # unreadable: reading it later reports the reason


def _mask_format(path: Path, kind: str, fmt: str) -> str:
    if fmt == "auto":
        if kind == "dicom":
            return "dcm"
        if kind == "nifti":
            return "nii"
        return "nii" if _is_volume(path, kind) else "png"
    if fmt == "png" and _is_volume(path, kind):
        alt = "nii or dcm" if kind == "dicom" else "nii"
        raise InputError(f"is a volume; a PNG mask holds one slice, use --format {alt}", path)
    if fmt == "dcm" and kind != "dicom":
        raise InputError(
            f"DICOM SEG (--format dcm) needs a DICOM source, this is {kind}; use --format nii "
            "or png",
            path,
        )
    return fmt


def _plan_one(path: Path, out_dir: Path | None, fmt: str, keys: Iterable[str]) -> PlannedOutput:
    mask_fmt = _mask_format(path, detect_format(path), fmt)
    if mask_fmt == "dcm":
        check_segmentation_source(path)  # from the headers, before any model work
    outputs = {}
    for key in keys:
        out_fmt = {"mask": mask_fmt, "uncertainty": "png" if mask_fmt == "png" else "nii"}.get(
            key, "png"
        )
        outputs[key] = output_path_for(path, out_dir, out_fmt, OUTPUT_SUFFIXES[key])
    return PlannedOutput(path, mask_fmt, outputs)


def _check_names(plans: list[PlannedOutput], out_dir: Path | None) -> None:
    """Refuse outputs outside ``out_dir``, outputs shared by two inputs, outputs onto inputs."""
    root = out_dir.resolve() if out_dir is not None else None
    inputs = {p.input.resolve(): p.input for p in plans}
    owner: dict[Path, Path] = {}
    for plan in plans:
        for out in plan.outputs.values():
            real = out.resolve()
            if root is not None and real.parent != root:
                raise MrisegError(f"would be written outside the output folder {out_dir}", out)
            if real in inputs:
                raise MrisegError(
                    f"the output of {plan.input} would replace the input {inputs[real]}; "
                    "use --out to write elsewhere",
                    out,
                )
            if real in owner and owner[real] != plan.input:
                raise MrisegError(
                    f"{owner[real]} and {plan.input} would both write this output; rename one "
                    "or run them with different --out folders",
                    out,
                )
            owner[real] = plan.input


def _check_existing(plans: list[PlannedOutput], overwrite: bool) -> None:
    outs = [o for p in plans for o in p.outputs.values()]
    for out in outs:
        if out.is_dir():
            raise MrisegError("is a folder, expected a file path", out)
    existing = [o for o in outs if o.exists() or o.is_symlink()]
    if existing and not overwrite:
        shown = ", ".join(str(o) for o in existing[:_SHOWN])
        more = f" and {len(existing) - _SHOWN} more" if len(existing) > _SHOWN else ""
        raise OutputExistsError(
            f"{len(existing)} output file(s) already exist (use --overwrite to replace "
            f"them): {shown}{more}"
        )


def plan_outputs(
    inputs: Sequence[Path],
    out_dir: str | Path | None,
    fmt: str = "auto",
    *,
    overwrite: bool = False,
    uncertainty: bool = False,
    overlay: bool = False,
    steps_png: bool = False,
    keep_going: bool = False,
    input_errors: Mapping[Path, str] | None = None,
) -> list[PlannedOutput]:
    """Every output path of every input, decided and checked before any model work.

    ``fmt``: "auto" (PNG for 2-D rasters, NIfTI for NIfTI and raster volumes, DICOM SEG for
    DICOM), "png", "nii" or "dcm". ``out_dir=None`` writes beside each input. An input that
    cannot be planned (unreadable, a volume as PNG, SEG for a non-DICOM source) raises, or with
    ``keep_going`` gets ``error`` set. Name collisions, outputs outside ``out_dir`` and existing
    outputs (without ``overwrite``; all counted in one message) always raise. An input found
    in ``input_errors`` (see :func:`expand_inputs`) is planned with that error.
    """
    fmt = _canonical_format(fmt)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise MrisegError("is not a folder (--out needs a folder)", out)
    keys = ["mask"] + [k for k, on in
                       (("uncertainty", uncertainty), ("overlay", overlay), ("steps", steps_png))
                       if on]  # fmt: skip
    plans = []
    for path in inputs:
        path = Path(path)
        if input_errors and path in input_errors:
            plans.append(PlannedOutput(path, error=input_errors[path]))
            continue
        try:
            plans.append(_plan_one(path, out, fmt, keys))
        except MrisegError as err:
            if not keep_going:
                raise
            plans.append(PlannedOutput(path, error=str(err)))
    _check_names(plans, out)
    _check_existing(plans, overwrite)
    _check_folders_writable(plans, keep_going)
    return plans


def _check_folders_writable(plans: list[PlannedOutput], keep_going: bool) -> None:
    """Every output folder must be creatable and writable before the model loads."""
    from mrisegcli.io.atomic import check_folder_writable

    seen: dict[Path, str | None] = {}
    for plan in plans:
        if plan.error is not None or "mask" not in plan.outputs:
            continue
        folder = plan.outputs["mask"].parent
        if folder not in seen:
            try:
                check_folder_writable(folder)
                seen[folder] = None
            except MrisegError as err:
                if not keep_going:
                    raise
                seen[folder] = str(err)
        plan.error = seen[folder]


# ----------------------------------------------------------------------------- running


def _read(path: Path) -> Scan:
    try:
        return read_scan(path)
    except MrisegError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"cannot read ({type(err).__name__}: {err})", path) from err


def _model_maps(maps_NSS: Any, n: int, size: int, what: str) -> np.ndarray:
    arr = np.asarray(maps_NSS, dtype=np.float32)
    if arr.shape != (n, size, size):
        raise ValueError(f"the model's {what} has shape {arr.shape}, expected {(n, size, size)}")
    return np.clip(np.nan_to_num(arr), 0.0, 1.0)


def _to_scan(maps_NSS: np.ndarray, scan: Scan) -> np.ndarray:
    """(N, S, S) model-resolution maps -> scan.shape, each slice resized to its own (H, W)."""
    hw = scan.pixels.shape[-2:]
    return scan.stack([np.clip(resize_prob(m, hw), 0.0, 1.0) for m in maps_NSS])


def _shown_slice(mask: np.ndarray) -> int:
    """The slice with the largest mask area, or the middle one when the mask is empty."""
    if mask.ndim == 2:
        return 0
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    return int(np.argmax(area)) if area.max() > 0 else mask.shape[0] // 2


def _write_outputs(
    plan: PlannedOutput,
    scan: Scan,
    pred: SlicePrediction,
    size: int,
    mask: np.ndarray,
    text: str,
    threshold: float,
    overwrite: bool,
) -> dict[str, Path]:
    """Write the planned files; on any failure remove the ones written so far and re-raise."""
    n = scan.num_slices
    written: dict[str, Path] = {}
    try:
        outs = plan.outputs
        written["mask"] = write_mask(
            mask, scan, outs["mask"], plan.fmt, overwrite=overwrite, description=text
        )
        if "uncertainty" in outs:
            unc = _to_scan(_model_maps(pred.uncertainty, n, size, "uncertainty"), scan)
            unc_fmt = "png" if plan.fmt == "png" else "nii"
            written["uncertainty"] = write_prob_map(
                unc, scan, outs["uncertainty"], unc_fmt, overwrite=overwrite, description=text
            )
        k = _shown_slice(mask)
        if "overlay" in outs:
            norm = normalize_intensity(scan.pixels, scan.meta.get("window"))
            image = norm if norm.ndim == 2 else norm[k]
            written["overlay"] = write_overlay(
                image, mask if mask.ndim == 2 else mask[k], outs["overlay"], overwrite=overwrite
            )
        if "steps" in outs:
            written["steps"] = _write_steps(pred, k, n, outs["steps"], threshold, overwrite)
    except BaseException:
        for path in written.values():
            path.unlink(missing_ok=True)
        raise
    return written


def _write_steps(
    pred: SlicePrediction, k: int, n: int, out: Path, threshold: float, overwrite: bool
) -> Path:
    """The coarse-to-fine masks of slice ``k`` side by side (steps_picture takes logits)."""
    import torch

    from mrisegcli.decode.consensus import steps_picture

    logits = []
    for step in pred.steps:
        arr = np.asarray(step, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[0] != n:
            raise ValueError(f"a step map has shape {arr.shape}, expected ({n}, s, s)")
        logits.append(torch.from_numpy(arr[k] - threshold))  # > 0 exactly where prob > threshold
    return steps_picture(logits, out, overwrite=overwrite)


def _predict_one(
    segmenter: SliceSegmenter,
    plan: PlannedOutput,
    text: str,
    threshold: float,
    overwrite: bool,
) -> PredictResult:
    start = time.perf_counter()
    scan = _read(plan.input)
    if plan.fmt == "png" and scan.num_slices > 1:
        raise InputError(
            f"is a volume of {scan.num_slices} slices; a PNG mask holds one, use --format nii",
            plan.input,
        )
    size = int(segmenter.image_size)
    images_NSS = scan_model_inputs(scan, size)  # (N, S, S) in [0, 1]
    pred = segmenter(images_NSS, text)
    if "uncertainty" in plan.outputs and pred.uncertainty is None:
        raise ModelOutputError("the model gave no uncertainty map (use --samples 2 or more)")
    if "steps" in plan.outputs and not pred.steps:
        raise ModelOutputError("the model gave no coarse-to-fine steps (needs next-scale)")
    prob_NSS = _model_maps(pred.prob, scan.num_slices, size, "probability")
    prob = _to_scan(prob_NSS, scan)  # scan.shape
    mask = prob > threshold
    written = _write_outputs(plan, scan, pred, size, mask, text, threshold, overwrite)
    fg = int(mask.sum())
    return PredictResult(
        input=plan.input,
        outputs=written,
        shape=scan.shape,
        slices=scan.num_slices,
        foreground_pixels=fg,
        foreground_fraction=fg / mask.size,
        presence=float(prob.max()) if prob.size else 0.0,
        modality=scan.meta.get("modality"),
        seconds=time.perf_counter() - start,
    )


def run_plans(
    segmenter: SliceSegmenter,
    plans: Sequence[PlannedOutput],
    text: str | Sequence[str],
    *,
    overwrite: bool = False,
    threshold: float = 0.5,
    keep_going: bool = False,
    on_result: Callable[[PredictResult], None] | None = None,
) -> list[PredictResult]:
    """Segment every planned input (see :func:`predict_files`).

    ``text`` is one prompt for every input, or a sequence of one prompt per plan (in order).
    """
    if isinstance(text, str):
        texts = [validate_text(text)] * len(plans)
    else:
        texts = [validate_text(t) for t in text]
        if len(texts) != len(plans):
            raise MrisegError(f"{len(texts)} texts for {len(plans)} inputs: give one text, or one per input")
    if not 0.0 <= threshold <= 1.0:
        raise MrisegError(f"threshold must be in [0, 1], got {threshold}")
    results = []
    for plan, prompt in zip(plans, texts, strict=True):
        start = time.perf_counter()
        try:
            if plan.error is not None:
                raise MrisegError(plan.error)
            result = _predict_one(segmenter, plan, prompt, threshold, overwrite)
        except ModelOutputError:
            raise
        except MrisegError as err:
            if not keep_going:
                raise
            result = PredictResult(plan.input, error=str(err),
                                   seconds=time.perf_counter() - start)  # fmt: skip
        result.text = prompt
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def predict_files(
    segmenter: SliceSegmenter,
    inputs: Sequence[str | Path],
    text: str,
    *,
    out_dir: str | Path | None,
    fmt: str = "auto",
    overwrite: bool = False,
    uncertainty: bool = False,
    overlay: bool = False,
    steps_png: bool = False,
    threshold: float = 0.5,
    keep_going: bool = False,
    on_result: Callable[[PredictResult], None] | None = None,
    stdin: TextIO | None = None,
) -> list[PredictResult]:
    """Segment what ``text`` describes in every input and write one mask per input.

    Inputs are expanded (:func:`expand_inputs`) and every output planned and checked
    (:func:`plan_outputs`) before the model runs. Masks lie on each scan's own grid
    (prob > ``threshold``). A bad input raises (its outputs are not written; earlier inputs'
    files are complete and stay), or with ``keep_going`` is recorded in its result's ``error``
    and the batch goes on. ``on_result`` sees each result as soon as it is done.
    """
    text = validate_text(text)
    paths = expand_inputs(inputs, stdin)
    plans = plan_outputs(
        paths, out_dir, fmt, overwrite=overwrite, uncertainty=uncertainty, overlay=overlay,
        steps_png=steps_png, keep_going=keep_going,
    )  # fmt: skip
    return run_plans(
        segmenter, plans, text, overwrite=overwrite, threshold=threshold, keep_going=keep_going,
        on_result=on_result,
    )  # fmt: skip
