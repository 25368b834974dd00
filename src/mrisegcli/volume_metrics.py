"""Per-volume scores: Dice, the 95th-percentile Hausdorff distance (HD95) and the absolute
volume difference. No I/O here; the voxel size comes with the masks.

HD95 follows the definition of MONAI's ``compute_hausdorff_distance(percentile=95)`` (and of
the Medical Segmentation Decathlon and BraTS): the surface of a mask is its foreground voxels
that touch the background across a face (the mask minus its erosion by the 6-neighbourhood,
with the outside of the array counted as background); for every surface voxel of one mask the
Euclidean distance, in millimetres, to the nearest surface voxel of the other; HD95 is the
larger of the two directions' 95th percentiles (linear interpolation). ``tests`` compare it
with MONAI's on random shapes and anisotropic voxels.

Empty masks, in line with the Dice policy of :mod:`mrisegcli.metrics`: both empty -> HD95 = 0
(a correct "nothing here"); exactly one empty -> undefined (None: JSON null, an empty CSV cell),
left out of the mean and counted in ``n_hd95_undefined``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrisegcli.metrics import as_bool_mask, check_same_shape, dice_iou_from_counts

HD_PERCENTILE = 95.0
VOLUME_CSV_COLUMNS = (
    "name", "dice", "iou", "hd95_mm", "avd_ml", "pred_ml", "gt_ml", "pred_voxels", "gt_voxels",
    "slices", "pred", "gt",
)  # fmt: skip


def _crop(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union, one voxel of margin (exact: every
    surface voxel and every distance between them lies inside)."""
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.nonzero(union.any(axis=other))[0]
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    return pred[tuple(box)], gt[tuple(box)]


def surface(mask: np.ndarray) -> np.ndarray:
    """The mask's surface voxels: foreground with a background face-neighbour (outside = 0)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``gt``, and back.
    Both masks must hold foreground."""
    from scipy import ndimage

    pred, gt = _crop(pred, gt)
    s_pred, s_gt = surface(pred), surface(gt)
    sampling = None if spacing is None else [float(s) for s in spacing]
    to_gt = ndimage.distance_transform_edt(~s_gt, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=sampling)
    return to_gt[s_pred], to_pred[s_gt]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float | None:
    """The 95th-percentile Hausdorff distance in mm (voxels when ``spacing`` is None); 0 when
    both masks are empty, None when only one is."""
    pred, gt = as_bool_mask(pred, "prediction"), as_bool_mask(gt, "ground truth")
    check_same_shape(pred.shape, gt.shape)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return None
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    return float(max(np.percentile(d_pg, HD_PERCENTILE), np.percentile(d_gp, HD_PERCENTILE)))


@dataclass
class VolumeResult:
    """One volume's scores. ``spacing`` is the voxel size (mm) along the masks' axes;
    ``spacing_known`` is False when it was not recorded (1 mm assumed: distances in voxels)."""

    name: str
    dice: float
    iou: float
    hd95_mm: float | None
    pred_ml: float
    gt_ml: float
    pred_voxels: int
    gt_voxels: int
    tp: int
    n_voxels: int
    slices: int
    spacing: tuple[float, ...]
    spacing_known: bool = True
    pred_path: Path | None = None
    gt_path: Path | None = None

    @property
    def avd_ml(self) -> float:
        """Absolute volume difference |V_pred - V_gt| in millilitres."""
        return abs(self.pred_ml - self.gt_ml)

    @classmethod
    def from_masks(
        cls,
        name: str,
        pred: np.ndarray,
        gt: np.ndarray,
        spacing: Sequence[float] | None = None,
        *,
        pred_path: Path | None = None,
        gt_path: Path | None = None,
    ) -> VolumeResult:
        """Score a predicted volume (D, H, W) against its ground truth; ``spacing`` in mm
        along the same axes (None: unknown, 1 mm assumed)."""
        pred, gt = as_bool_mask(pred, "prediction"), as_bool_mask(gt, "ground truth")
        check_same_shape(pred.shape, gt.shape)
        known = spacing is not None
        spacing_t = tuple(float(s) for s in spacing) if known else (1.0,) * gt.ndim
        tp = int(np.count_nonzero(pred & gt))
        n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
        dice, iou = dice_iou_from_counts(tp, n_pred, n_gt)
        ml = float(np.prod(spacing_t)) / 1000.0
        return cls(
            name, dice, iou, hd95(pred, gt, spacing_t), n_pred * ml, n_gt * ml, n_pred, n_gt, tp,
            int(gt.size), int(gt.shape[0]) if gt.ndim == 3 else 1, spacing_t, known,
            pred_path, gt_path,
        )  # fmt: skip

    def row(self) -> dict:
        """Plain JSON types: the volume's CSV row as a dict."""
        return {
            "name": self.name,
            "dice": float(self.dice),
            "iou": float(self.iou),
            "hd95_mm": None if self.hd95_mm is None else float(self.hd95_mm),
            "avd_ml": float(self.avd_ml),
            "pred_ml": float(self.pred_ml),
            "gt_ml": float(self.gt_ml),
            "pred_voxels": int(self.pred_voxels),
            "gt_voxels": int(self.gt_voxels),
            "slices": int(self.slices),
            "pred": None if self.pred_path is None else str(self.pred_path),
            "gt": None if self.gt_path is None else str(self.gt_path),
        }


def summarize_volumes(volumes: Sequence[VolumeResult]) -> dict:
    """Means (and medians) over volumes: Dice, HD95 (over the volumes where it is defined) and
    the absolute volume difference; plain Python numbers."""
    dice = [v.dice for v in volumes]
    hds = [v.hd95_mm for v in volumes if v.hd95_mm is not None]
    avd = [v.avd_ml for v in volumes]
    return {
        "n": len(volumes),
        "dice": float(statistics.fmean(dice)) if dice else None,
        "dice_std": float(statistics.pstdev(dice)) if dice else None,
        "dice_median": float(statistics.median(dice)) if dice else None,
        "hd95_mm": float(statistics.fmean(hds)) if hds else None,
        "hd95_mm_median": float(statistics.median(hds)) if hds else None,
        "n_hd95_undefined": len(volumes) - len(hds),
        "avd_ml": float(statistics.fmean(avd)) if avd else None,
        "avd_ml_median": float(statistics.median(avd)) if avd else None,
        "spacing_known": all(v.spacing_known for v in volumes),
        "hd_percentile": HD_PERCENTILE,
    }


__all__ = [
    "HD_PERCENTILE",
    "VOLUME_CSV_COLUMNS",
    "VolumeResult",
    "hd95",
    "summarize_volumes",
    "surface",
    "surface_distances",
]
