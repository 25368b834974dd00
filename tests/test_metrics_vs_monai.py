"""Our Dice, IoU and HD95 (``metrics.py``, ``volume_metrics.py``) against MONAI's
(``DiceMetric``, ``MeanIoU``, ``compute_hausdorff_distance(percentile=95)``) on random masks,
2-D and 3-D, with anisotropic voxels, and on the edge cases where a reporting policy decides.

The code stays ours because it states the policy; MONAI is the reference for every case where
both are defined:

* Dice / IoU: MONAI with ``ignore_empty=False`` gives 1 for two empty masks and 0 when exactly
  one is empty, which is our ``both-empty=1`` policy: every case must agree.
* HD95: MONAI gives NaN whenever a mask is empty; ours is 0 for two empty masks (a correct
  "nothing here") and undefined (None) when only one is (``volume_metrics``' docstring).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance

from mrisegcli.metrics import dice_iou, dice_iou_batch
from mrisegcli.volume_metrics import VolumeResult, hd95

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SPACINGS_3D = [(1.0, 1.0, 1.0), (2.5, 0.7, 1.1), (5.0, 0.4, 0.4)]


def blobs(rng: np.random.Generator, shape: tuple[int, ...], n: int = 3) -> np.ndarray:
    """A few anisotropic ellipses / ellipsoids at random places (an irregular surface)."""
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    mask = np.zeros(shape, bool)
    for _ in range(n):
        c = rng.integers(0, shape)
        r = rng.uniform(1.5, 6, size=len(shape))
        mask |= sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r, strict=True)) < 1
    return mask


def _t(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()  # (1, 1, ...)


def monai_dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    return float(dice(_t(pred), _t(gt))), float(iou(_t(pred), _t(gt)))


def monai_hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    hd = compute_hausdorff_distance(
        _t(pred), _t(gt), include_background=True, percentile=95, spacing=list(spacing)
    )
    return float(hd)


def edge_cases(shape: tuple[int, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pairs (prediction, truth) where a policy or a border decides."""
    empty = np.zeros(shape, bool)
    full = np.ones(shape, bool)
    dot = empty.copy()
    dot[(1,) * len(shape)] = True
    far = empty.copy()
    far[tuple(s - 1 for s in shape)] = True  # a voxel in the opposite corner, on the border
    box = empty.copy()
    box[tuple(slice(1, max(2, s - 2)) for s in shape)] = True
    return {
        "both empty": (empty, empty),
        "prediction only": (dot, empty),
        "truth only": (empty, box),
        "identical": (box, box),
        "one voxel each, apart": (dot, far),
        "one voxel inside a box": (dot, box),
        "everything against a box": (full, box),
        "everything": (full, full),
        "disjoint": (far, box),
    }


@pytest.mark.parametrize("shape", [(40, 36), (12, 18, 16)])
def test_dice_iou_match_monai_on_random_masks(shape):
    rng = np.random.default_rng(len(shape))
    preds, gts = [], []
    for _ in range(12):
        pred, gt = blobs(rng, shape), blobs(rng, shape)
        preds.append(pred)
        gts.append(gt)
        ours = dice_iou(pred, gt)
        assert ours == pytest.approx(monai_dice_iou(pred, gt), abs=1e-6)
        if len(shape) == 3:  # the per-volume scores say the same
            vol = VolumeResult.from_masks("v", pred, gt, (2.0, 0.8, 0.8))
            assert (vol.dice, vol.iou) == pytest.approx(ours, abs=1e-12)
    # the batched version used in training validation, against MONAI's batched metric
    p_B, g_B = torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(gts))
    dice_B, iou_B = dice_iou_batch(p_B, g_B)
    ref_dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(
        p_B[:, None].float(), g_B[:, None].float()
    )[:, 0]
    ref_iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(
        p_B[:, None].float(), g_B[:, None].float()
    )[:, 0]
    np.testing.assert_allclose(dice_B.numpy(), ref_dice.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(iou_B.numpy(), ref_iou.double().numpy(), atol=1e-6)


@pytest.mark.parametrize("shape", [(9, 11), (5, 7, 6)])
def test_dice_iou_edge_cases_match_monai(shape):
    """MONAI with ignore_empty=False has our policy: both empty 1, one empty 0."""
    for name, (pred, gt) in edge_cases(shape).items():
        ours = dice_iou(pred, gt)
        assert ours == pytest.approx(monai_dice_iou(pred, gt), abs=1e-6), name
    empty = np.zeros(shape, bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)


@pytest.mark.parametrize("spacing", SPACINGS_3D)
def test_hd95_matches_monai_on_random_volumes(spacing):
    """The same surfaces, distances and percentile as MONAI, with anisotropic voxels."""
    rng = np.random.default_rng(int(spacing[0] * 10))
    compared = 0
    for _ in range(6):
        pred, gt = blobs(rng, (14, 22, 20)), blobs(rng, (14, 22, 20))
        if not pred.any() or not gt.any():
            continue
        assert hd95(pred, gt, spacing) == pytest.approx(
            monai_hd95(pred, gt, spacing), rel=1e-5, abs=1e-5
        )
        vol = VolumeResult.from_masks("v", pred, gt, spacing)
        assert vol.hd95_mm == hd95(pred, gt, spacing)
        compared += 1
    assert compared >= 4


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.3)])
def test_hd95_matches_monai_on_random_slices(spacing):
    rng = np.random.default_rng(7)
    for _ in range(6):
        pred, gt = blobs(rng, (40, 36)), blobs(rng, (40, 36))
        if pred.any() and gt.any():
            assert hd95(pred, gt, spacing) == pytest.approx(
                monai_hd95(pred, gt, spacing), rel=1e-5, abs=1e-5
            )


@pytest.mark.parametrize("shape, spacing", [((9, 11), (0.5, 2.0)), ((5, 7, 6), (3.0, 0.9, 0.6))])
def test_hd95_edge_cases_against_monai(shape, spacing):
    """Where both masks hold foreground, ours is MONAI's (masks on the array's border
    included); where one is empty MONAI has no number and our policy gives one or None."""
    for name, (pred, gt) in edge_cases(shape).items():
        ours, ref = hd95(pred, gt, spacing), monai_hd95(pred, gt, spacing)
        if pred.any() and gt.any():
            assert ours == pytest.approx(ref, rel=1e-5, abs=1e-5), name
        else:
            assert math.isnan(ref), name  # MONAI: undefined for any empty mask
            assert ours == (0.0 if not pred.any() and not gt.any() else None), name
