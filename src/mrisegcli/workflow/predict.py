"""The file side of ``mriseg predict``: inputs -> planned outputs -> a mask on each scan's grid.

:func:`predict_batch` is the one entry point (the command line, the benchmarks and the tests
call it). A batch runs in two stages:

1. :func:`~mrisegcli.io.discover.expand_inputs` turns files, folders and ``-`` (paths on stdin)
   into a list of inputs (a folder holding one DICOM series is one input), or a prompts file
   gives the inputs and a text for each; :func:`plan_outputs` decides every output path up
   front: name collisions, outputs that already exist and paths outside ``out_dir`` are refused
   before any model work, so a batch never stops half-written on names.
2. Only then is the model loaded, and each input is read, its slices segmented, the
   probabilities resized back to each slice's own (H, W), thresholded and written (the mask,
   optionally uncertainty, overlay and coarse-to-fine pictures). Each file is written
   atomically; when one output of an input fails, that input's other outputs are removed again.

The running side sees the model as a :class:`SliceModel` (square slices and a text ->
probabilities), so the file handling here does not depend on the model code:
:class:`SegmenterSlices` puts a loaded :class:`~mrisegcli.workflow.segmenter.Segmenter` behind
that interface, and its batching is :meth:`Segmenter.predict`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from mrisegcli.errors import InputError, MrisegError, OutputExistsError
from mrisegcli.io import (
    normalize_intensity,
    output_path_for,
    resize_prob,
    scan_model_inputs,
    write_mask,
    write_overlay,
    write_prob_map,
)
from mrisegcli.io.discover import IMAGE_SUFFIXES, expand_inputs, is_volume, prompt_inputs
from mrisegcli.io.overlay import write_steps_png
from mrisegcli.io.prompts import MAX_TEXT_CHARS, PromptRow, read_prompts, validate_text
from mrisegcli.io.read import detect_format
from mrisegcli.io.scan import Scan
from mrisegcli.io.volume import IDENTITY, read_input_scan, slice_view, view_scan, volume_facts
from mrisegcli.io.write import (
    OUTPUT_SUFFIXES,
    check_not_segmentation,
    check_segmentation_source,
    prompt_tag,
)

FORMATS = ("auto", "png", "nii", "dcm")
_FORMAT_ALIASES = {"nii.gz": "nii", "nifti": "nii", "dicom": "dcm", "seg": "dcm"}
_SHOWN = 3  # existing outputs named in the refusal


# ----------------------------------------------------------------------------- model interface


@dataclass
class SlicePrediction:
    """What a slice model returns for N slices at its own square resolution S."""

    prob: np.ndarray  # (N, S, S) float32 in [0, 1]
    uncertainty: np.ndarray | None = None  # (N, S, S) float32 in [0, 1]
    steps: list[np.ndarray] | None = None  # coarse-to-fine probabilities, each (N, s, s)
    # (N,) calibrated probability that the prompt's target is in each slice (presence.py);
    # slices below the model's presence threshold get an empty mask
    presence: np.ndarray | None = None


class SliceModel(Protocol):
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
    # the model's calibrated presence (presence.py; a volume: its highest slice), else the
    # highest foreground probability anywhere in the scan
    presence: float = 0.0
    modality: str | None = None  # DICOM Modality of the input, when it has one
    seconds: float = 0.0
    error: str | None = None
    text: str | None = None  # the prompt this input was segmented with
    refused: bool = False  # the prompt is outside what the model answers (scope.py)
    # a volume's facts (:func:`~mrisegcli.io.volume.volume_facts`): how it was sliced, the
    # slices with foreground, the foreground's volume in mL, the channel of a 4-D input
    volume: dict[str, Any] | None = None
    model: str | None = None  # the shipped model the input was routed to (no --model given)

    @property
    def found(self) -> bool:
        return self.error is None and self.foreground_pixels > 0

    @property
    def status(self) -> str:
        """ "found", "not found", "refused" (prompt out of scope) or "error"."""
        if self.refused:
            return "refused"
        if self.error is not None:
            return "error"
        return "found" if self.found else "not found"

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
            "status": self.status,
            "presence": round(float(self.presence), 4),
            "modality": self.modality,
            "seconds": round(float(self.seconds), 4),
            "error": self.error,
            "text": self.text,
            "volume": self.volume,
            "model": self.model,
        }


# ----------------------------------------------------------------------------- planning


def _canonical_format(fmt: str) -> str:
    f = str(fmt).lower().lstrip(".")
    f = _FORMAT_ALIASES.get(f, f)
    if f not in FORMATS:
        raise MrisegError(f"unknown --format {fmt!r} (choose auto, png, nii or dcm)")
    return f


def _mask_format(path: Path, kind: str, fmt: str) -> str:
    if fmt == "auto":
        if kind == "dicom":
            return "dcm"
        if kind == "nifti":
            return "nii"
        return "nii" if is_volume(path, kind) else "png"
    if fmt == "png" and is_volume(path, kind):
        alt = "nii or dcm" if kind == "dicom" else "nii"
        raise InputError(f"is a volume; a PNG mask holds one slice, use --format {alt}", path)
    if fmt == "dcm" and kind != "dicom":
        raise InputError(
            f"DICOM SEG (--format dcm) needs a DICOM source, this is {kind}; use --format nii "
            "or png",
            path,
        )
    return fmt


def _plan_one(
    path: Path, out_dir: Path | None, fmt: str, keys: Iterable[str], tag: str = ""
) -> PlannedOutput:
    kind = detect_format(path)
    if kind == "dicom":
        check_not_segmentation(path)  # a mask given as the image, whatever the --format
    mask_fmt = _mask_format(path, kind, fmt)
    if mask_fmt == "dcm":
        check_segmentation_source(path)  # from the headers, before any model work
    outputs = {}
    for key in keys:
        out_fmt = {"mask": mask_fmt, "uncertainty": "png" if mask_fmt == "png" else "nii"}.get(
            key, "png"
        )
        suffix = f"_{tag}{OUTPUT_SUFFIXES[key]}" if tag else OUTPUT_SUFFIXES[key]
        outputs[key] = output_path_for(path, out_dir, out_fmt, suffix)
    return PlannedOutput(path, mask_fmt, outputs)


def _prompt_tags(inputs: Sequence[Path], texts: Sequence[str] | None) -> list[str]:
    """The tag each input's output names carry: none for an input named once; for an image on
    several rows of a prompts file, its row's prompt (``a_left-lung_mask.png``), with the row
    number where two rows' prompts give the same tag (``a_left-lung-row3_mask.png``)."""
    import os

    tags = [""] * len(inputs)
    if texts is None:
        return tags
    rows: dict[str, list[int]] = {}
    for i, path in enumerate(inputs):
        rows.setdefault(os.path.realpath(path), []).append(i)
    for same in rows.values():
        if len(same) < 2:
            continue
        wanted = [prompt_tag(texts[i]) for i in same]
        for i, tag in zip(same, wanted, strict=True):
            unique = tag and wanted.count(tag) == 1
            tags[i] = tag if unique else "-".join(filter(None, [tag, f"row{i + 1}"]))
    return tags


def _check_names(plans: list[PlannedOutput], out_dir: Path | None) -> None:
    """Refuse outputs outside ``out_dir``, outputs shared by two inputs (or two prompts of one
    input), outputs onto inputs."""
    root = out_dir.resolve() if out_dir is not None else None
    inputs = {p.input.resolve(): p.input for p in plans}
    owner: dict[Path, tuple[int, Path]] = {}
    for row, plan in enumerate(plans, start=1):
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
            if real in owner and owner[real][0] != row:
                first = owner[real][1]
                both = (
                    f"inputs {owner[real][0]} and {row} (both {first})"
                    if first == plan.input
                    else f"{first} and {plan.input}"
                )
                raise MrisegError(
                    f"{both} would both write this output; rename one or run them with "
                    "different --out folders",
                    out,
                )
            owner[real] = (row, plan.input)


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
    texts: Sequence[str] | None = None,
) -> list[PlannedOutput]:
    """Every output path of every input, decided and checked before any model work.

    ``fmt``: "auto" (PNG for 2-D rasters, NIfTI for NIfTI and raster volumes, DICOM SEG for
    DICOM), "png", "nii" or "dcm". ``out_dir=None`` writes beside each input. An input that
    cannot be planned (unreadable, a volume as PNG, SEG for a non-DICOM source) raises, or with
    ``keep_going`` gets ``error`` set. Name collisions, outputs outside ``out_dir`` and existing
    outputs (without ``overwrite``; all counted in one message) always raise. An input found
    in ``input_errors`` (see :func:`expand_inputs`) is planned with that error. With
    ``texts`` (one prompt per input), an image named on several rows gets one set of outputs
    per row, named after the row's prompt (:func:`_prompt_tags`).
    """
    fmt = _canonical_format(fmt)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise MrisegError("is not a folder (--out needs a folder)", out)
    keys = ["mask"] + [k for k, on in
                       (("uncertainty", uncertainty), ("overlay", overlay), ("steps", steps_png))
                       if on]  # fmt: skip
    plans = []
    for path, tag in zip(inputs, _prompt_tags(inputs, texts), strict=True):
        path = Path(path)
        if input_errors and path in input_errors:
            plans.append(PlannedOutput(path, error=input_errors[path]))
            continue
        try:
            plans.append(_plan_one(path, out, fmt, keys, tag))
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


def _read(path: Path, channel: int = 0) -> Scan:
    try:
        return read_input_scan(path, channel)  # a 4-D NIfTI gives that channel
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
    """(N, S, S) model-resolution maps of the scan's slice view (``meta["slice_view"]``, see
    :mod:`mrisegcli.io.volume`) -> scan.shape, each slice resized to its own (H, W)."""
    view = scan.meta.get("slice_view", IDENTITY)
    hw = view.to_view(scan.pixels).shape[-2:]
    resized = [np.clip(resize_prob(m, hw), 0.0, 1.0) for m in maps_NSS]
    if not view.moves:
        return scan.stack(resized)
    return np.ascontiguousarray(view.from_view(np.stack(resized)))


def _view_slices(scan: Scan) -> int:
    """How many slices the model sees of a scan (its view's first axis)."""
    view = scan.meta.get("slice_view", IDENTITY)
    return int(view.to_view(scan.pixels).shape[0]) if view.moves else scan.num_slices


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
    n = _view_slices(scan)
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
            k_view = _shown_slice(scan.meta.get("slice_view", IDENTITY).to_view(mask))
            written["steps"] = _write_steps(pred, k_view, n, outs["steps"], threshold, overwrite)
    except BaseException:
        for path in written.values():
            path.unlink(missing_ok=True)
        raise
    return written


def _write_steps(
    pred: SlicePrediction, k: int, n: int, out: Path, threshold: float, overwrite: bool
) -> Path:
    """The coarse-to-fine masks of slice ``k`` side by side."""
    masks = []
    for step in pred.steps or []:
        arr = np.asarray(step, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[0] != n:
            raise ValueError(f"a step map has shape {arr.shape}, expected ({n}, s, s)")
        masks.append(arr[k] > threshold)
    return write_steps_png(masks, out, overwrite=overwrite)


def _check_finite(scan: Scan, path: Path) -> None:
    """Refuse a scan none of whose voxels is a number (the readers replace some NaN or Inf
    voxels and count them in ``meta["nonfinite"]``): there is no image to segment."""
    counts = scan.meta.get("nonfinite") or {}
    bad = sum(int(v) for v in counts.values())
    if bad and bad >= scan.pixels.size:
        names = {"nan": "NaN", "posinf": "+Inf", "neginf": "-Inf"}
        kinds = ", ".join(f"{n} {names.get(k, k)}" for k, n in counts.items() if n)
        raise InputError(
            f"has no finite voxels: all {bad} are NaN or infinite ({kinds}); nothing to segment",
            path,
        )


def _predict_one(
    model: SliceModel,
    plan: PlannedOutput,
    text: str,
    threshold: float,
    overwrite: bool,
    channel: int = 0,
) -> PredictResult:
    start = time.perf_counter()
    scan = _read(plan.input, channel)
    _check_finite(scan, plan.input)
    if plan.fmt == "png" and scan.num_slices > 1:
        raise InputError(
            f"is a volume of {scan.num_slices} slices; a PNG mask holds one, use --format nii",
            plan.input,
        )
    size = int(model.image_size)
    scan.meta["slice_view"] = view = slice_view(scan)  # a volume: axial slices when oriented
    images_NSS = scan_model_inputs(view_scan(scan, view), size)  # (N, S, S) in [0, 1]
    pred = _decode(model, images_NSS, text, plan.input)
    if "uncertainty" in plan.outputs and pred.uncertainty is None:
        raise ModelOutputError("the model gave no uncertainty map (use --samples 2 or more)")
    if "steps" in plan.outputs and not pred.steps:
        raise ModelOutputError("the model gave no coarse-to-fine steps (needs next-scale)")
    prob_NSS = _model_maps(pred.prob, len(images_NSS), size, "probability")
    absent = _absent_slices(model, pred, len(images_NSS))
    if absent.any():  # below the presence threshold: "not there", an empty mask
        prob_NSS = np.where(absent[:, None, None], np.float32(0), prob_NSS)
    prob = _to_scan(prob_NSS, scan)  # scan.shape
    mask = prob > threshold
    share = float(getattr(model, "min_component_share", 0.0) or 0.0)
    if scan.is_volume and share > 0:  # the islands a slice-by-slice decoder draws, dropped
        from mrisegcli.postprocess import drop_small_components

        mask = drop_small_components(mask, share)
    written = _write_outputs(plan, scan, pred, size, mask, text, threshold, overwrite)
    fg = int(mask.sum())
    result = PredictResult(
        input=plan.input,
        outputs=written,
        shape=scan.shape,
        slices=scan.num_slices,
        foreground_pixels=fg,
        foreground_fraction=fg / mask.size,
        presence=_presence(pred, prob),
        modality=scan.meta.get("modality"),
        seconds=time.perf_counter() - start,
    )
    if scan.is_volume:
        result.volume = {**volume_facts(scan, view, mask), "min_component_share": share}
    return result


def _absent_slices(model: SliceModel, pred: SlicePrediction, n: int) -> np.ndarray:
    """(n,) bool: slices whose presence is below the model's presence threshold."""
    cut = getattr(model, "presence_threshold", None)
    per_slice = getattr(pred, "presence", None)
    if cut is None or per_slice is None:
        return np.zeros(n, bool)
    per_slice = np.asarray(per_slice, np.float64).reshape(-1)
    if per_slice.shape != (n,):
        raise ModelOutputError(f"the model gave {per_slice.size} presence values for {n} slices")
    return per_slice < float(cut)


def _presence(pred: SlicePrediction, prob: np.ndarray) -> float:
    """The model's per-slice presence when it gives one (the highest over a volume's slices),
    else the highest foreground probability anywhere in the scan."""
    per_slice = getattr(pred, "presence", None)
    if per_slice is not None and np.size(per_slice):
        return float(np.max(per_slice))
    return float(prob.max()) if prob.size else 0.0


def _decode(model: SliceModel, images_NSS: np.ndarray, text: str, path: Path) -> SlicePrediction:
    """The model on every slice; a volume shows a progress bar when the model has a stage."""
    if len(images_NSS) > 1 and getattr(model, "stage", None) is not None:
        return model(images_NSS, text, label=f"{path.name}: {len(images_NSS)} slices")
    return model(images_NSS, text)


class ModelPerInput:
    """The model of each input when inputs are routed (:func:`predict_batch` with ``route``):
    ``routes`` maps each input to its route (any object; its ``model`` attribute, else itself,
    is the key), ``load(route)`` gives the SliceModel of a key, loaded once, on first use."""

    def __init__(self, routes: Mapping[Path, Any], load: Callable[[Any], SliceModel]) -> None:
        self.routes, self.load = dict(routes), load
        self.loaded: dict[Any, SliceModel] = {}

    def for_input(self, path: Path) -> tuple[SliceModel, Any]:
        route = self.routes.get(path)
        key = getattr(route, "model", route)
        if key not in self.loaded:
            self.loaded[key] = self.load(route)
        return self.loaded[key], key


def _model_for(model: SliceModel | ModelPerInput, plan: PlannedOutput) -> tuple[SliceModel, Any]:
    if isinstance(model, ModelPerInput):
        return model.for_input(plan.input)
    return model, None


def _run_plans(
    model: SliceModel | ModelPerInput,
    plans: Sequence[PlannedOutput],
    texts: Sequence[str],
    *,
    overwrite: bool,
    threshold: float,
    keep_going: bool,
    on_result: Callable[[PredictResult], None] | None,
    channel: int = 0,
) -> list[PredictResult]:
    """Segment every planned input with its text (validated, one per plan), in order; a
    refused prompt writes nothing; with ``keep_going`` a failed input is recorded in its
    result and the batch goes on; ``on_result`` sees each result as soon as it is done."""
    results = []
    for plan, prompt in zip(plans, texts, strict=True):
        start = time.perf_counter()
        try:
            if plan.error is not None:
                raise MrisegError(plan.error)
            slice_model, key = _model_for(model, plan)
            why = slice_model.refusal(prompt) if hasattr(slice_model, "refusal") else None
            if why is not None:  # nothing is written for this input
                result = PredictResult(plan.input, error=why, refused=True)
            else:
                result = _predict_one(slice_model, plan, prompt, threshold, overwrite, channel)
            result.model = key
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


# ----------------------------------------------------------------------------- a loaded model


class SegmenterSlices:
    """A loaded :class:`~mrisegcli.workflow.segmenter.Segmenter` as the :class:`SliceModel`
    of this module: an input's slices go through :meth:`Segmenter.predict` (batches of the
    segmenter's batch size, each prompt tokenised once for the whole batch of inputs), and the
    sampling restarts from ``seed`` for every input."""

    def __init__(
        self,
        seg: Any,
        *,
        samples: int = 1,
        temperature: float | None = None,
        seed: int | None = 0,
        steps: bool = False,
        stage: Callable[[str, int | None], Any] | None = None,
        presence_threshold: float | None = None,
        force: bool = False,
        min_component_share: float | None = None,
    ) -> None:
        self.seg, self.samples, self.temperature, self.seed, self.steps = (
            seg,
            samples,
            temperature,
            seed,
            steps,
        )
        self.image_size = seg.image_size
        #: the model's presence threshold unless ``presence_threshold`` overrides it
        self.presence_threshold = (
            presence_threshold
            if presence_threshold is not None
            else getattr(seg, "presence_threshold", None)
        )
        self.force = force  # run prompts outside the model's scope too
        #: a volume's components below this share of its largest are dropped (the model's
        #: recorded share unless given; postprocess.py)
        self.min_component_share = (
            min_component_share
            if min_component_share is not None
            else getattr(seg, "min_component_share", 0.0)
        )
        self.stage = stage  # a progress factory: one bar per volume (see :func:`_decode`)

    def __call__(self, images_NSS: np.ndarray, text: str, label: str = "") -> SlicePrediction:
        """Decode every slice; with a ``label`` and a stage, under a progress bar of that name."""
        if self.stage is None or not label:
            return self._predict(images_NSS, text, None)
        with self.stage(label, len(images_NSS)) as progress:
            return self._predict(images_NSS, text, progress)

    def _predict(
        self, images_NSS: np.ndarray, text: str, progress: Callable[..., Any] | None
    ) -> SlicePrediction:
        p = self.seg.predict(
            images_NSS,
            text,
            samples=self.samples,
            temperature=self.temperature,
            seed=self.seed,
            steps=self.steps,
            progress=progress,
        )

        def arr(t: Any) -> np.ndarray:
            return t.float().numpy()

        return SlicePrediction(
            prob=arr(p.prob),
            uncertainty=None if p.uncertainty is None else arr(p.uncertainty),
            steps=None if p.steps is None else [arr(s) for s in p.steps],
            presence=None if p.presence is None else arr(p.presence),
        )

    def refusal(self, text: str) -> str | None:
        """Why ``text`` is outside what the model answers, or ``None`` (and always ``None``
        with ``force``)."""
        if self.force or not hasattr(self.seg, "refusal"):
            return None
        return self.seg.refusal(text)


class ModelOptionError(MrisegError):
    """An option the loaded model cannot honour (e.g. coarse-to-fine steps of a next-token model)."""


@dataclass(frozen=True)
class PredictOptions:
    """How :func:`predict_batch` writes and decodes; the defaults are ``mriseg predict``'s."""

    out_dir: Path | None = None  # None: beside each input
    fmt: str = "auto"
    samples: int = 1  # masks drawn per input and fused by consensus
    temperature: float | None = None  # None: 0 (greedy), or 1 with samples > 1
    seed: int = 0
    uncertainty: bool = False
    overlay: bool = False
    steps_png: bool = False
    overwrite: bool = False
    keep_going: bool = False
    threshold: float = 0.5
    # below this calibrated presence a mask is empty; None: the model's own threshold
    presence_threshold: float | None = None
    force: bool = False  # run prompts outside the model's scope too
    # a volume's components below this share of its largest dropped; None: the model's own
    min_component_share: float | None = None
    channel: int = 0  # the channel of a 4-D NIfTI input (channels last) that is segmented
    # a progress factory ``stage(description, total)`` (a context manager giving a callable):
    # a bar per volume while its slices are decoded; None: no progress
    progress: Callable[[str, int | None], Any] | None = None


def _gather(
    inputs: Sequence[str | Path],
    text: str | None,
    prompts: str | Path | None,
    stdin: TextIO | None,
    errors: dict[Path, str] | None,
) -> tuple[list[Path], list[str]]:
    """The inputs and one validated prompt per input: from a prompts file, or ``text`` for all."""
    if prompts is not None:
        if text is not None or inputs:
            raise MrisegError(
                "a prompts file gives the inputs and their texts: give no text and no input paths"
            )
        rows = read_prompts(prompts, stdin)
        return prompt_inputs(rows, errors), [row.text for row in rows]
    if text is None:
        raise MrisegError(
            "no text: give one for every input, or a prompts file with a text per input"
        )
    prompt = validate_text(text)
    paths = expand_inputs(inputs, stdin, errors=errors)
    return paths, [prompt] * len(paths)


def predict_batch(
    load_model: Callable[[], Any],
    *,
    inputs: Sequence[str | Path] = (),
    text: str | None = None,
    prompts: str | Path | None = None,
    options: PredictOptions = PredictOptions(),
    stdin: TextIO | None = None,
    on_result: Callable[[PredictResult], None] | None = None,
    route: Callable[[Path], Any] | None = None,
) -> list[PredictResult]:
    """``mriseg predict`` as one call: segment ``text`` in every input (files, folders, ``-``),
    or each row of a ``prompts`` file (CSV or JSON lines of path and text) in its input.

    With ``route`` (e.g. :func:`mrisegcli.shipped.route_input`), each input goes to the model
    of its route: ``load_model(route)`` is called once per model (its ``model`` attribute),
    when the first input that needs it comes, and each result names it in ``model``.

    Inputs, texts, options and every output path are checked first; only then is the model
    loaded with ``load_model()`` (a :class:`~mrisegcli.workflow.segmenter.Segmenter`, or an
    object with its ``image_size``, ``impl`` (the paradigm) and ``predict``). Each prompt is
    validated and tokenised once. Masks lie on each scan's own grid (probability >
    ``options.threshold``). A bad input raises (its outputs are not written; earlier inputs'
    files are complete and stay), or with ``options.keep_going`` is recorded in its result's
    ``error`` and the batch goes on; ``on_result`` sees each result as soon as it is written.
    """
    o = options
    if o.uncertainty and o.samples < 2:
        raise ModelOptionError("an uncertainty map needs 2 or more samples")
    if not 0.0 <= o.threshold <= 1.0:
        raise MrisegError(f"threshold must be in [0, 1], got {o.threshold}")
    errors: dict[Path, str] | None = {} if o.keep_going else None
    paths, texts = _gather(inputs, text, prompts, stdin, errors)
    plans = plan_outputs(
        paths,
        o.out_dir,
        o.fmt,
        overwrite=o.overwrite,
        uncertainty=o.uncertainty,
        overlay=o.overlay,
        steps_png=o.steps_png,
        keep_going=o.keep_going,
        input_errors=errors,
        texts=texts,
    )

    def slice_model(seg: Any) -> SegmenterSlices:
        if o.steps_png and not seg.impl.has_steps:
            raise ModelOptionError("coarse-to-fine steps (--steps-png) need a next-scale model")
        return SegmenterSlices(
            seg,
            samples=o.samples,
            temperature=o.temperature,
            seed=o.seed,
            steps=o.steps_png,
            stage=o.progress,
            presence_threshold=o.presence_threshold,
            force=o.force,
            min_component_share=o.min_component_share,
        )

    if route is None:
        model: SliceModel | ModelPerInput = slice_model(load_model())
    else:
        routes = {p.input: route(p.input) for p in plans if p.error is None}
        model = ModelPerInput(routes, lambda r: slice_model(load_model(r)))
    return _run_plans(
        model,
        plans,
        texts,
        overwrite=o.overwrite,
        threshold=o.threshold,
        keep_going=o.keep_going,
        on_result=on_result,
        channel=o.channel,
    )


__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "MAX_TEXT_CHARS",
    "OUTPUT_SUFFIXES",
    "ModelOptionError",
    "ModelOutputError",
    "ModelPerInput",
    "PlannedOutput",
    "PredictOptions",
    "PredictResult",
    "PromptRow",
    "SegmenterSlices",
    "SlicePrediction",
    "SliceModel",
    "expand_inputs",
    "plan_outputs",
    "predict_batch",
    "prompt_inputs",
    "read_prompts",
    "validate_text",
]
