"""``evaluate --model`` on volumes: the per-slice predictions of a volume's slices stacked back
into the volume and scored as one (:mod:`mrisegcli.volume_metrics`).

A volume here is one (case, label, text) of an nnU-Net folder: its slices are samples of the
split (``sample.volume``). Each slice's probability is resized to the slice's own resolution
and thresholded there (as for the per-slice scores), the slices are stacked in the view's order
(axial, radiological), and the voxel size follows the same view. A volume some of whose slices
are not in the evaluation (``--limit``) is left out and counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mrisegcli.data.layouts import Sample
from mrisegcli.volume_metrics import VolumeResult


def view_spacing(image: Path) -> tuple[float, ...] | None:
    """Voxel size (mm) along the view's axes (D', H', W') of a NIfTI volume (None otherwise)."""
    from mrisegcli.io.read import is_nifti_name
    from mrisegcli.io.volume import file_view

    if not is_nifti_name(image):
        return None
    import nibabel as nib

    zooms = [float(z) for z in nib.load(str(image)).header.get_zooms()[:3]]
    if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        return None
    return file_view(image)[0].spacing(tuple(reversed(zooms)))


def _at(prob_SS: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A probability map at a slice's own resolution."""
    from mrisegcli.io.intensity import resize_prob

    return prob_SS if prob_SS.shape == shape else resize_prob(prob_SS, shape)


def stacked_volumes(
    cases: list[Sample], gts: list[np.ndarray], probs: np.ndarray, threshold: float = 0.5
) -> tuple[list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...] | None, Sample]], int]:
    """(name, predicted volume, true volume, spacing, first slice's sample) of each complete
    volume in order of first appearance, and the number of volumes left out."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(cases):
        if s.volume is not None:
            groups.setdefault(s.id.rsplit("/", 1)[0], []).append(i)
    out, partial = [], 0
    for name, idx in groups.items():
        first = cases[idx[0]]
        assert first.volume is not None
        order = sorted(idx, key=lambda i: cases[i].volume.index)  # type: ignore[union-attr]
        if [cases[i].volume.index for i in order] != list(range(first.volume.slices)):  # type: ignore[union-attr]
            partial += 1
            continue
        gt = np.stack([gts[i] for i in order])
        pred = np.stack([_at(probs[i], gts[i].shape) > threshold for i in order])
        out.append((name, pred, gt, view_spacing(first.image), first))
    return out, partial


def score_stacked(
    stacked: list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...] | None, Sample]],
    min_share: float = 0.0,
) -> list[VolumeResult]:
    """One result per :func:`stacked_volumes` entry, each predicted volume without its
    components below ``min_share`` of its largest
    (:func:`mrisegcli.postprocess.drop_small_components`), as ``predict`` writes it."""
    from mrisegcli.postprocess import drop_small_components

    return [
        VolumeResult.from_masks(
            name, drop_small_components(pred, min_share), gt, spacing, gt_path=first.mask
        )
        for name, pred, gt, spacing, first in stacked
    ]


def volume_results(
    cases: list[Sample],
    gts: list[np.ndarray],
    probs: np.ndarray,
    threshold: float = 0.5,
    min_share: float = 0.0,
) -> tuple[list[VolumeResult], int]:
    """(one result per complete volume in order of first appearance, volumes left out), scored
    by :func:`score_stacked`."""
    stacked, partial = stacked_volumes(cases, gts, probs, threshold)
    return score_stacked(stacked, min_share), partial


def component_rule(
    seg: Any, cases: list[Sample], *, chosen_on: str, workers: int = 0, stage: Any = None
) -> dict[str, Any] | None:
    """The share of :func:`mrisegcli.postprocess.drop_small_components` chosen on the complete
    volumes among ``cases`` (labelled slices of volumes the model did not train on), the model
    answering as ``predict`` does -> the run config's ``"postprocess"`` section (the share and
    every candidate's mean Dice and HD95), or None when ``cases`` hold no complete volume."""
    from mrisegcli.postprocess import choose_min_share, component_table
    from mrisegcli.workflow.evaluate_model import answered_probs, read_cases
    from mrisegcli.workflow.prepare import no_stage

    stage = stage or no_stage
    cases = [c for c in cases if c.volume is not None and c.mask is not None]
    if not cases:
        return None
    images, _, gts = read_cases(seg, cases, workers, stage, "volume")
    with stage(f"decoding {len(cases)} volume slices", None):
        pred = seg.predict(images, [c.text for c in cases])
    stacked, _ = stacked_volumes(cases, gts, answered_probs(seg, pred))
    if not stacked:
        return None
    table = component_table([(p, g, sp) for _, p, g, sp, _ in stacked])
    return {
        "min_component_share": choose_min_share(table),
        "chosen_on": chosen_on,
        "volumes": [name for name, *_ in stacked],
        "candidates": table,
    }


def fit_component_rule(
    seg: Any, root: Path, *, workers: int = 0, stage: Any = None
) -> dict[str, Any]:
    """:func:`component_rule` on every labelled volume of the nnU-Net folder ``root``."""
    from mrisegcli.errors import MrisegError
    from mrisegcli.workflow.prepare import open_dataset

    cases = [s for s in open_dataset([Path(root)], None, check=False).samples]
    rule = component_rule(seg, cases, chosen_on=str(root), workers=workers, stage=stage)
    if rule is None:
        raise MrisegError("has no labelled volumes to choose the component rule on", root)
    return rule


__all__ = [
    "component_rule",
    "fit_component_rule",
    "stacked_volumes",
    "view_spacing",
    "volume_results",
]
