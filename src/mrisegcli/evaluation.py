"""Evaluate a folder of predicted masks against a folder of ground-truth masks.

Files are paired by case name (rules in :func:`case_key` and docs/metrics.md). A ground-truth
mask without a prediction is an error unless ``allow_missing`` counts it as an empty
prediction: a missing prediction is never skipped silently. Predictions without ground truth
are ignored and counted in the report.

Volumes (3-D masks) are also scored as volumes (:mod:`mrisegcli.volume_metrics`: Dice, HD95 in
mm, absolute volume difference in mL, with the voxel size of the ground truth's NIfTI header);
the CSV then has one row per volume.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from mrisegcli.errors import InputError, MrisegError
from mrisegcli.io.atomic import atomic_path
from mrisegcli.metrics import CaseResult, summarize
from mrisegcli.volume_metrics import VOLUME_CSV_COLUMNS, VolumeResult, summarize_volumes

logger = logging.getLogger(__name__)

MASK_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".nii",
    ".nii.gz",
    ".dcm",
    ".dicom",
    ".dic",
    ".ima",
)
"""File endings (case-insensitive) taken as masks when listing a folder; others are ignored."""

CSV_COLUMNS = (
    "name", "dice", "iou", "pred_pixels", "gt_pixels", "pred", "gt", "kind", "presence",
    "in_scope", "text",
)  # fmt: skip
_MAX_LISTED = 10

Pair = tuple[str, Path | None, Path]


@dataclass(frozen=True)
class Pairing:
    """Result of matching two folders: ``(name, pred, gt)`` pairs (``pred`` is None when missing
    and allowed), prediction file names without ground truth, and ground-truth file names
    without a prediction."""

    pairs: list[Pair]
    unmatched_predictions: list[str]
    missing_predictions: list[str]


@dataclass
class EvalReport:
    """Per-case results, the dataset summary, and the file names that could not be paired."""

    cases: list[CaseResult]
    summary: dict
    unmatched_predictions: list[str] = field(default_factory=list)
    missing_predictions: list[str] = field(default_factory=list)
    volumes: list[VolumeResult] = field(default_factory=list)  # 3-D cases scored as volumes


def split_suffix(name: str) -> tuple[str, str]:
    """Split off the extension: ``.nii.gz`` as one, else the last suffix (``a.b.png`` -> ``a.b``)."""
    if name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")], name[-len(".nii.gz") :]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def case_key(file_name: str) -> str:
    """Case name of a mask file: stem without extension, one ``mask_`` prefix and one ``_mask``
    suffix removed (``mask_covid_1.png``, ``covid_1_mask.nii.gz``, ``covid_1.png`` -> ``covid_1``).
    Case-sensitive, as the names are on disk."""
    key = split_suffix(file_name)[0]
    if key.startswith("mask_") and len(key) > len("mask_"):
        key = key[len("mask_") :]
    if key.endswith("_mask") and len(key) > len("_mask"):
        key = key[: -len("_mask")]
    return key


def _natural(key: str) -> list:
    """Sort key that orders ``covid_2`` before ``covid_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _list_masks(folder: Path, role: str) -> dict[str, list[Path]]:
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{role} folder does not exist", folder)
    if not folder.is_dir():
        raise InputError(f"{role} path is not a folder", folder)
    by_key: dict[str, list[Path]] = {}
    for p in folder.iterdir():
        if p.name.startswith(".") or not p.is_file() or not p.name.lower().endswith(MASK_SUFFIXES):
            continue
        by_key.setdefault(case_key(p.name), []).append(p)
    for paths in by_key.values():
        paths.sort(key=lambda q: q.name)
    return by_key


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def match_folders(
    pred_dir: str | Path, gt_dir: str | Path, *, allow_missing: bool = False
) -> Pairing:
    """Pair every ground-truth mask with exactly one prediction; see :func:`pair_folders`."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gts = _list_masks(gt_dir, "ground-truth")
    preds = _list_masks(pred_dir, "prediction")
    if pred_dir.resolve() == gt_dir.resolve():
        raise InputError("prediction and ground-truth folders are the same folder", pred_dir)
    if not gts:
        raise InputError(f"no mask files ({', '.join(MASK_SUFFIXES)}) found", gt_dir)
    for role, folder, by_key in (("ground-truth", gt_dir, gts), ("prediction", pred_dir, preds)):
        clashes = [
            f"{' and '.join(p.name for p in ps)} (case '{k}')"
            for k, ps in sorted(by_key.items())
            if len(ps) > 1
        ]
        if clashes:
            raise InputError(
                f"ambiguous {role} files: {len(clashes)} case(s) match more than one file: "
                + _listing(clashes),
                folder,
            )
    pairs: list[Pair] = []
    missing: list[str] = []
    used: set[str] = set()
    for key in sorted(gts, key=_natural):
        gt_path = gts[key][0]
        # nnU-Net: the mask of image <case>_0000.nii.gz pairs with the label <case>.nii.gz
        pred_key = key if key in preds or f"{key}_0000" not in preds else f"{key}_0000"
        pred = preds.get(pred_key)
        if pred is None:
            missing.append(gt_path.name)
        used.add(pred_key)
        pairs.append((key, pred[0] if pred else None, gt_path))
    if missing and not allow_missing:
        raise InputError(
            f"{len(missing)} of {len(gts)} ground-truth masks have no prediction: "
            f"{_listing(missing)} "
            "(use --allow-missing to count them as empty predictions)",
            pred_dir,
        )
    unmatched = sorted(
        (p.name for k, ps in preds.items() if k not in used for p in ps), key=_natural
    )
    if unmatched:
        logger.warning(
            "%d prediction(s) in %s have no ground truth and are ignored: %s",
            len(unmatched),
            pred_dir,
            _listing(unmatched),
        )
    return Pairing(pairs, unmatched, missing)


def pair_folders(
    pred_dir: str | Path, gt_dir: str | Path, *, allow_missing: bool = False
) -> list[Pair]:
    """``(name, pred_path, gt_path)`` for every ground-truth mask, in natural name order.

    Names match after removing the extension (``.nii.gz`` counts as one), a ``mask_`` prefix and
    a ``_mask`` suffix, on either side. Raises :class:`InputError` for ground truth without a
    prediction (unless ``allow_missing``: then ``pred_path`` is None) and for a case that matches
    two files. Predictions without ground truth are ignored (see :func:`match_folders`).
    """
    return match_folders(pred_dir, gt_dir, allow_missing=allow_missing).pairs


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    *,
    allow_missing: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Read, pair and score every case; ``progress(done, total)`` is called after each case."""
    from mrisegcli.io.read import read_mask
    from mrisegcli.io.volume import check_same_grid, mask_geometry

    pairing = match_folders(pred_dir, gt_dir, allow_missing=allow_missing)
    cases: list[CaseResult] = []
    volumes: list[VolumeResult] = []
    total = len(pairing.pairs)
    for i, (name, pred_path, gt_path) in enumerate(pairing.pairs):
        gt = read_mask(
            gt_path, binary=True
        )  # a label map or grey image is refused, not thresholded
        pred = (
            np.zeros(gt.shape, dtype=bool)
            if pred_path is None
            else read_mask(pred_path, binary=True)
        )
        if pred.shape != gt.shape:
            raise MrisegError(
                f"case '{name}': prediction has shape {tuple(pred.shape)} but ground truth "
                f"{gt_path} has shape {tuple(gt.shape)}",
                pred_path,
            )
        cases.append(CaseResult.from_masks(name, pred, gt, pred_path=pred_path, gt_path=gt_path))
        if gt.ndim == 3:
            spacing = (
                check_same_grid(pred_path, gt_path) if pred_path else mask_geometry(gt_path)[0]
            )
            volumes.append(
                VolumeResult.from_masks(
                    name, pred, gt, spacing, pred_path=pred_path, gt_path=gt_path
                )
            )
        if progress is not None:
            progress(i + 1, total)
    if volumes and len(volumes) != len(cases):
        raise InputError(
            f"mixes {len(volumes)} volume(s) and {len(cases) - len(volumes)} 2-D mask(s); "
            "evaluate volumes and 2-D images separately",
            gt_dir,
        )
    summary = summarize(cases)
    summary["n_missing_predictions"] = len(pairing.missing_predictions)
    summary["n_unmatched_predictions"] = len(pairing.unmatched_predictions)
    if volumes:
        summary["volumes"] = summarize_volumes(volumes)
    return EvalReport(
        cases, summary, pairing.unmatched_predictions, pairing.missing_predictions, volumes
    )


def write_cases_csv(report: EvalReport, path: str | Path, *, overwrite: bool = False) -> Path:
    """One row per case (:data:`CSV_COLUMNS`; ``kind``, ``presence``, ``in_scope`` and ``text``
    filled when a model was evaluated on a dataset with kinds / a presence head / a recorded
    scope / texts: ``in_scope`` 1 when ``predict`` would answer the case's text, 0 when it
    would refuse it), written atomically;
    for volumes one row per volume (:data:`~mrisegcli.volume_metrics.VOLUME_CSV_COLUMNS`)."""
    path = Path(path)
    with atomic_path(path, overwrite) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if report.volumes:
            w.writerow(VOLUME_CSV_COLUMNS)
            for v in report.volumes:
                row = v.row()
                w.writerow(["" if row[c] is None else _cell(row[c]) for c in VOLUME_CSV_COLUMNS])
            return path
        w.writerow(CSV_COLUMNS)
        for c in report.cases:
            w.writerow(
                [
                    c.name,
                    repr(c.dice),
                    repr(c.iou),
                    c.pred_pixels,
                    c.gt_pixels,
                    "" if c.pred_path is None else str(c.pred_path),
                    "" if c.gt_path is None else str(c.gt_path),
                    c.kind,
                    "" if c.presence is None else repr(c.presence),
                    "" if c.in_scope is None else int(c.in_scope),
                    c.text,
                ]
            )
    return path


def _cell(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def report_json(report: EvalReport, *, cases: bool = False) -> dict:
    """Summary as a JSON-ready dict (plain floats in [0, 1]); per-case rows only if ``cases``.
    Volumes: ``volumes`` holds their summary and one row per volume (``volumes["cases"]``)."""
    out = dict(report.summary)
    if report.volumes:
        out["volumes"] = {**report.summary["volumes"], "cases": [v.row() for v in report.volumes]}
    out["missing_predictions"] = list(report.missing_predictions)
    out["unmatched_predictions"] = list(report.unmatched_predictions)
    if cases:
        out["cases"] = [
            {
                "name": c.name,
                "dice": float(c.dice),
                "iou": float(c.iou),
                "pred_pixels": int(c.pred_pixels),
                "gt_pixels": int(c.gt_pixels),
                "pred": None if c.pred_path is None else str(c.pred_path),
                "gt": None if c.gt_path is None else str(c.gt_path),
            }
            for c in report.cases
        ]
    return out


def _is_missing(case: CaseResult, missing: set[str]) -> bool:
    """Whether the case had no prediction file (counted as empty with ``allow_missing``).

    A prediction that exists but is empty is not missing (it shows 0 pixels), and neither is a
    case scored from a model's output, which has no prediction file at all.
    """
    return case.pred_path is None and case.gt_path is not None and case.gt_path.name in missing


def render_table(report: EvalReport, *, max_rows: int = 20) -> Table:
    """Rich table in percent: one row per case when there are at most ``max_rows``, then the
    mean, median and global (micro) rows. Volumes: one row per volume with HD95 and volumes."""
    if report.volumes:
        return render_volume_table(report, max_rows=max_rows)
    s = report.summary
    table = Table(title=f"Segmentation metrics ({s['n']} cases, empty policy {s['empty_policy']})")
    for col, justify in (
        ("case", "left"),
        ("Dice %", "right"),
        ("IoU %", "right"),
        ("pred px", "right"),
        ("GT px", "right"),
    ):
        table.add_column(col, justify=justify)
    missing = set(report.missing_predictions)  # ground-truth file names without a prediction
    if len(report.cases) <= max_rows:
        for c in report.cases:
            pred = "missing" if _is_missing(c, missing) else str(c.pred_pixels)
            table.add_row(
                c.name, f"{100 * c.dice:.2f}", f"{100 * c.iou:.2f}", pred, str(c.gt_pixels)
            )
        table.add_section()
    table.add_row(
        "mean",
        f"{100 * s['dice']:.2f} ± {100 * s['dice_std']:.2f}",
        f"{100 * s['miou']:.2f} ± {100 * s['iou_std']:.2f}",
        "",
        "",
        style="bold",
    )
    table.add_row("median", f"{100 * s['dice_median']:.2f}", f"{100 * s['iou_median']:.2f}", "", "")
    table.add_row("global", f"{100 * s['dice_global']:.2f}", f"{100 * s['iou_global']:.2f}", "", "")
    notes = [f"mIoU with background: {100 * s['miou_fg_bg']:.2f}"]
    if report.missing_predictions:
        notes.append(f"{len(report.missing_predictions)} missing prediction(s) counted as empty")
    if report.unmatched_predictions:
        notes.append(
            f"{len(report.unmatched_predictions)} prediction(s) without ground truth ignored"
        )
    table.caption = "; ".join(notes)
    return table


def _mm(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_volume_table(report: EvalReport, *, max_rows: int = 20) -> Table:
    """One row per volume (Dice %, HD95 mm, |dV| mL, predicted and true mL), then mean and
    median rows; the caption gives the per-slice Dice beside them."""
    vs, s = report.volumes, report.summary
    v = s["volumes"]
    unit = "mm" if v["spacing_known"] else "voxels"
    volumes = f"{v['n']} volume" + ("s" if v["n"] != 1 else "")
    table = Table(title=f"Volume metrics ({volumes}, HD95 in {unit})")
    for col in ("volume", "Dice %", f"HD95 {unit}", "|dV| mL", "pred mL", "GT mL"):
        table.add_column(col, justify="left" if col == "volume" else "right")
    if len(vs) <= max_rows:
        for r in vs:
            table.add_row(
                r.name, f"{100 * r.dice:.2f}", _mm(r.hd95_mm), f"{r.avd_ml:.2f}",
                f"{r.pred_ml:.2f}", f"{r.gt_ml:.2f}",
            )  # fmt: skip
        table.add_section()
    table.add_row(
        "mean", f"{100 * v['dice']:.2f} ± {100 * v['dice_std']:.2f}", _mm(v["hd95_mm"]),
        _mm(v["avd_ml"]), "", "", style="bold",
    )  # fmt: skip
    table.add_row("median", f"{100 * v['dice_median']:.2f}", _mm(v["hd95_mm_median"]),
                  _mm(v["avd_ml_median"]), "", "")  # fmt: skip
    notes = [f"per slice: Dice {100 * s['dice']:.2f}, mIoU {100 * s['miou']:.2f} ({s['n']} slices)"]
    if s["n"] == v["n"]:  # --pred/--gt: the cases are the volumes
        notes = [f"global Dice {100 * s['dice_global']:.2f}"]
    if v["n_hd95_undefined"]:
        notes.append(f"HD95 undefined for {v['n_hd95_undefined']} volume(s) (one mask empty)")
    if v.get("min_component_share"):
        notes.append(f"components below {v['min_component_share']:g} of the largest dropped")
    table.caption = "; ".join(notes)
    return table
