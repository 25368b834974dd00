"""Binary segmentation metrics: per-case Dice / IoU, batched torch versions, dataset summary.

Everything is computed from three integer counts per case — true positives ``tp``, predicted
pixels ``|P|`` and ground-truth pixels ``|G|`` — so the numpy and torch paths give bit-identical
results and a summary can be rebuilt from a CSV of counts. No I/O here.

Empty masks follow one named policy, :data:`EMPTY_POLICY`: when prediction and ground truth are
both empty the case scores Dice = IoU = 1 (a correct "nothing here"); when only one is empty it
scores 0 (which the formulas give anyway). See docs/metrics.md.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mrisegcli.errors import MrisegError

EMPTY_POLICY = "both-empty=1"
"""Both masks empty -> Dice = IoU = 1; exactly one empty -> 0. Stated in every JSON summary."""


def as_bool_mask(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as a bool mask: bool as is, integers by the mask-file rule (> 0 is foreground);
    a float array is refused (``what`` names it), since it must be thresholded first."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return x
    if np.issubdtype(x.dtype, np.integer):
        return x > 0  # the mask-file rule: any value > 0 is foreground
    raise TypeError(
        f"{what} must be a bool or integer mask, got dtype {x.dtype} (threshold it first)"
    )


def check_same_shape(pred_shape: tuple[int, ...], gt_shape: tuple[int, ...]) -> None:
    """Raise :class:`MrisegError` naming both shapes when prediction and truth differ."""
    if tuple(pred_shape) != tuple(gt_shape):
        raise MrisegError(
            f"prediction shape {tuple(pred_shape)} does not match "
            f"ground-truth shape {tuple(gt_shape)}"
        )


def dice_iou_from_counts(tp: int, pred_pixels: int, gt_pixels: int) -> tuple[float, float]:
    """Dice = 2TP / (|P| + |G|), IoU = TP / (|P| + |G| - TP), with the both-empty policy."""
    total = pred_pixels + gt_pixels
    if total == 0:
        return 1.0, 1.0
    return 2.0 * tp / total, tp / (total - tp)


def mask_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """``(tp, |P|, |G|)`` of two same-shape masks (2-D or 3-D, any shape really)."""
    pred = as_bool_mask(pred, "prediction")
    gt = as_bool_mask(gt, "ground truth")
    check_same_shape(pred.shape, gt.shape)
    tp = int(np.count_nonzero(pred & gt))
    return tp, int(np.count_nonzero(pred)), int(np.count_nonzero(gt))


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and foreground IoU of one case; raises :class:`MrisegError` on a shape mismatch."""
    return dice_iou_from_counts(*mask_counts(pred, gt))


def counts_batch(
    pred_BHW: torch.Tensor, gt_BHW: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``(tp_B, pred_B, gt_B)`` int64 counts; any trailing dims (B, ...) are reduced."""
    if pred_BHW.shape != gt_BHW.shape:
        check_same_shape(tuple(pred_BHW.shape), tuple(gt_BHW.shape))
    for t, what in ((pred_BHW, "prediction"), (gt_BHW, "ground truth")):
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(
                f"{what} must be a bool or integer mask, got {t.dtype} (threshold it first)"
            )
    p_BN = (pred_BHW > 0).flatten(1)  # (B, N)
    g_BN = (gt_BHW > 0).flatten(1)  # (B, N)
    tp_B = (p_BN & g_BN).sum(dim=1, dtype=torch.int64)  # (B,)
    return tp_B, p_BN.sum(dim=1, dtype=torch.int64), g_BN.sum(dim=1, dtype=torch.int64)


def dice_iou_batch(
    pred_BHW: torch.Tensor, gt_BHW: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Dice and IoU of a batch of masks, float64, same empty policy as :func:`dice_iou`.

    Counts are reduced on the input device; the float64 division runs there too, except on MPS
    (no float64 support) where the ``3B`` counts are moved to the CPU first.
    """
    tp_B, p_B, g_B = counts_batch(pred_BHW, gt_BHW)
    if tp_B.device.type == "mps":
        tp_B, p_B, g_B = tp_B.cpu(), p_B.cpu(), g_B.cpu()
    tp_B, total_B = tp_B.double(), (p_B + g_B).double()  # (B,), (B,)
    empty_B = total_B == 0
    safe_B = torch.where(empty_B, torch.ones_like(total_B), total_B)
    dice_B = torch.where(empty_B, torch.ones_like(total_B), 2.0 * tp_B / safe_B)
    union_B = torch.where(empty_B, torch.ones_like(total_B), total_B - tp_B)
    iou_B = torch.where(empty_B, torch.ones_like(total_B), tp_B / union_B)
    return dice_B, iou_B


@dataclass
class CaseResult:
    """One evaluated case: its scores, the counts they came from, and where the masks live.

    ``pred_path`` is ``None`` for a missing prediction counted as empty (``allow_missing``).
    ``n_pixels`` (voxels for 3-D) is needed for the background IoU of ``miou_fg_bg``.
    """

    name: str
    dice: float
    iou: float
    pred_pixels: int
    gt_pixels: int
    pred_path: Path | None
    gt_path: Path | None
    tp: int
    n_pixels: int
    kind: str = ""  # the manifest's kind column, when a model is evaluated on a dataset
    presence: float | None = None  # the model's calibrated presence score, when it has a head
    in_scope: bool | None = None  # would ``predict`` answer this text (scope.py); None: no scope
    text: str = ""  # the prompt, when a model is evaluated on a dataset

    @classmethod
    def from_counts(
        cls,
        name: str,
        tp: int,
        pred_pixels: int,
        gt_pixels: int,
        n_pixels: int,
        *,
        pred_path: Path | None = None,
        gt_path: Path | None = None,
    ) -> CaseResult:
        """Build from counts (e.g. one row of :func:`counts_batch`)."""
        tp, pred_pixels, gt_pixels, n_pixels = (
            int(tp),
            int(pred_pixels),
            int(gt_pixels),
            int(n_pixels),
        )
        if not 0 <= tp <= min(pred_pixels, gt_pixels) or max(pred_pixels, gt_pixels) > n_pixels:
            raise ValueError(
                f"inconsistent counts tp={tp} |P|={pred_pixels} |G|={gt_pixels} N={n_pixels}"
            )
        dice, iou = dice_iou_from_counts(tp, pred_pixels, gt_pixels)
        return cls(name, dice, iou, pred_pixels, gt_pixels, pred_path, gt_path, tp, n_pixels)

    @classmethod
    def from_masks(
        cls,
        name: str,
        pred: np.ndarray,
        gt: np.ndarray,
        *,
        pred_path: Path | None = None,
        gt_path: Path | None = None,
    ) -> CaseResult:
        """Score one pair of same-shape masks."""
        tp, n_pred, n_gt = mask_counts(pred, gt)
        return cls.from_counts(
            name, tp, n_pred, n_gt, int(np.asarray(gt).size), pred_path=pred_path, gt_path=gt_path
        )

    @property
    def background_iou(self) -> float:
        """IoU of the background class: TN / (N - TP), both-empty policy when N == TP."""
        tn = self.n_pixels - self.pred_pixels - self.gt_pixels + self.tp
        bg_union = self.n_pixels - self.tp
        return 1.0 if bg_union == 0 else tn / bg_union


def summarize(cases: Sequence[CaseResult]) -> dict:
    """Dataset summary: case-averaged (macro) scores, spreads, global (micro) Dice, empty counts.

    ``miou`` is the mean over cases of the foreground IoU (the number LViT-style papers call
    mIoU); ``miou_fg_bg`` averages foreground and background IoU per case, then over cases.
    Standard deviations are population ones (ddof=0). All values are plain Python numbers.
    """
    if not cases:
        raise MrisegError("no cases to summarise")
    dice = [c.dice for c in cases]
    iou = [c.iou for c in cases]
    fg_bg = [(c.iou + c.background_iou) / 2.0 for c in cases]
    tp = sum(c.tp for c in cases)
    n_pred = sum(c.pred_pixels for c in cases)
    n_gt = sum(c.gt_pixels for c in cases)
    dice_global, iou_global = dice_iou_from_counts(tp, n_pred, n_gt)
    return {
        "n": len(cases),
        "dice": float(statistics.fmean(dice)),
        "miou": float(statistics.fmean(iou)),
        "miou_fg_bg": float(statistics.fmean(fg_bg)),
        "dice_std": float(statistics.pstdev(dice)),
        "iou_std": float(statistics.pstdev(iou)),
        "dice_median": float(statistics.median(dice)),
        "iou_median": float(statistics.median(iou)),
        "dice_global": float(dice_global),
        "iou_global": float(iou_global),
        "empty_policy": EMPTY_POLICY,
        "n_empty_gt": sum(1 for c in cases if c.gt_pixels == 0),
        "n_empty_pred": sum(1 for c in cases if c.pred_pixels == 0),
    }
