"""A volume's mask cleaned of the small islands a slice-by-slice model draws away from the
lesion, by the rule nnU-Net's post-processing uses: keep a connected component only when it is
large enough, with the rule chosen on labelled volumes the model did not train on.

* :func:`drop_small_components`: keep the connected components (26-connected in 3-D, 8 in 2-D)
  holding at least ``min_share`` of the largest one's voxels (0 keeps everything, 1 the largest
  component only).
* :func:`component_table`: every candidate share scored on labelled volumes (mean Dice and
  HD95), and :func:`choose_min_share`: the smallest share with the best mean Dice, 0 unless a
  share beats keeping everything.
* :func:`min_component_share`: the share a run folder records (``config.json``
  ``"postprocess"``, written by ``mriseg calibrate --volumes``); 0 when it records none.

The rule applies to volumes only (``predict`` on a 3-D input, the volume rows of
``evaluate``): a 2-D image's mask, and a volume's per-slice rows, are the decoder's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mrisegcli.errors import ConfigError

#: the shares tried by :func:`component_table` (0: keep every component)
CANDIDATE_SHARES = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
SECTION = "postprocess"


def drop_small_components(mask: np.ndarray, min_share: float) -> np.ndarray:
    """``mask`` (bool, 2-D or 3-D) without the connected components smaller than ``min_share``
    of its largest one (a new array; ``mask`` itself when nothing is dropped)."""
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share must be in [0, 1], not {min_share}")
    mask = np.asarray(mask, bool)
    if min_share <= 0.0 or not mask.any():
        return mask
    labels, sizes = _components(mask)
    if np.count_nonzero(sizes) <= 1:
        return mask
    keep = sizes >= min_share * sizes.max()
    keep[0] = False
    return keep[labels]


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label map, voxel count of each label; label 0 is the background and counts 0)."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels, sizes


def component_table(
    volumes: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float] | None]],
    shares: Sequence[float] = CANDIDATE_SHARES,
    *,
    hd95: bool = True,
) -> list[dict[str, Any]]:
    """One row per share: the mean Dice of ``volumes`` = (pred, gt, spacing) with
    :func:`drop_small_components` applied and, with ``hd95``, the mean HD95 (mm, over the
    volumes where it is defined). The Dice of every share comes from one labelling of each
    volume; HD95 needs each share's mask and costs a distance transform per volume and share."""
    from mrisegcli.metrics import dice_iou_from_counts
    from mrisegcli.volume_metrics import hd95 as hd95_of

    dice: dict[float, list[float]] = {float(s): [] for s in shares}
    dist: dict[float, list[float]] = {float(s): [] for s in shares}
    for pred, gt, spacing in volumes:
        pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
        labels, sizes = _components(pred)
        hits = np.bincount(labels[gt], minlength=len(sizes))  # true voxels in each component
        hits[0] = 0
        n_gt = int(np.count_nonzero(gt))
        for share in dice:
            keep = sizes >= share * sizes.max() if share > 0 else sizes > 0
            keep[0] = False
            dice[share].append(
                dice_iou_from_counts(int(hits[keep].sum()), int(sizes[keep].sum()), n_gt)[0]
            )
            if hd95:
                d = hd95_of(keep[labels], gt, spacing)
                if d is not None:
                    dist[share].append(d)
    rows = []
    for share in dice:
        row: dict[str, Any] = {
            "min_component_share": share,
            "dice": float(np.mean(dice[share])) if dice[share] else float("nan"),
        }
        if hd95:
            row["hd95_mm"] = float(np.mean(dist[share])) if dist[share] else None
        row["volumes"] = len(volumes)
        rows.append(row)
    return rows


def choose_min_share(table: Sequence[dict[str, Any]]) -> float:
    """The smallest share whose mean Dice is the table's best; 0 unless that beats keeping
    every component (a tie keeps everything)."""
    base = next((r["dice"] for r in table if r["min_component_share"] == 0.0), None)
    best = max(r["dice"] for r in table)
    if base is not None and best <= base + 1e-9:
        return 0.0
    return min(r["min_component_share"] for r in table if r["dice"] >= best - 1e-9)


def min_component_share(section: Any, where: Any = None) -> float:
    """The share recorded in a run config's ``"postprocess"`` section (0 without one)."""
    if section is None:
        return 0.0
    share = section.get("min_component_share") if isinstance(section, dict) else None
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ConfigError(
            f"config.{SECTION}.min_component_share must be a number in [0, 1], not {share!r}",
            where,
        )
    return float(share)


__all__ = [
    "CANDIDATE_SHARES",
    "SECTION",
    "choose_min_share",
    "component_table",
    "drop_small_components",
    "min_component_share",
]
