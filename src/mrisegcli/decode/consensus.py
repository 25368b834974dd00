"""Consensus aggregation of several sampled masks: final mask, uncertainty map, case score.

For S samples of one case with foreground probabilities q_s = sigmoid(logits_s):

* mean probability  m = (1/S) sum_s q_s;  final mask  = m > 0.5 (the soft majority vote);
* uncertainty       u = 2 * std_s(b_s), with b_s = q_s > 0.5 the sample's binary mask and the
  population std. With f the fraction of samples that call a pixel foreground,
  std = sqrt(f (1 - f)), so u = 0 where all samples agree and u = 1 where they split evenly;
  it measures disagreement between plausible masks, not the calibration of one mask;
* case uncertainty  = mean of u over the union of the samples' foregrounds (0 when no sample
  finds any foreground): one number per case that does not shrink with the amount of
  background, so small and large lesions are comparable.

"""

from __future__ import annotations

from typing import NamedTuple

import torch

THRESHOLD = 0.5


class Consensus(NamedTuple):
    """Per-pixel fusion of S samples; every field has the input's shape without the sample axis."""

    mean_prob: torch.Tensor  # float in [0, 1]
    mask: torch.Tensor  # bool, mean_prob > 0.5
    uncertainty: torch.Tensor  # float in [0, 1], 2 * std of the samples' binary masks


def _check(prob: torch.Tensor) -> None:
    if prob.dim() < 3:
        raise ValueError(f"expected (..., S, H, W) samples, got shape {tuple(prob.shape)}")
    if prob.shape[-3] < 1:
        raise ValueError("need at least one sample")


def consensus(prob_SHW: torch.Tensor) -> Consensus:
    """Fuse sample probabilities (..., S, H, W) (sample axis third from last) -> Consensus (..., H, W)."""
    _check(prob_SHW)
    prob = prob_SHW.float()
    mean_HW = prob.mean(-3)
    frac_fg_HW = (prob > THRESHOLD).float().mean(-3)  # fraction of samples calling foreground
    unc_HW = 2.0 * torch.sqrt((frac_fg_HW * (1.0 - frac_fg_HW)).clamp_min(0.0))
    return Consensus(mean_HW, mean_HW > THRESHOLD, unc_HW)


def consensus_logits(logits_SHW: torch.Tensor) -> Consensus:
    """:func:`consensus` of decoded mask logits (..., S, H, W) (probabilities = sigmoid)."""
    return consensus(torch.sigmoid(logits_SHW.float()))


def foreground_union(prob_SHW: torch.Tensor) -> torch.Tensor:
    """(..., S, H, W) probabilities -> (..., H, W) bool: foreground in at least one sample."""
    _check(prob_SHW)
    return (prob_SHW > THRESHOLD).any(-3)


def case_uncertainty(unc_HW: torch.Tensor, region_HW: torch.Tensor) -> float:
    """Mean uncertainty over ``region`` (use :func:`foreground_union`); 0.0 for an empty region."""
    if unc_HW.shape != region_HW.shape:
        raise ValueError(
            f"uncertainty {tuple(unc_HW.shape)} and region {tuple(region_HW.shape)} differ"
        )
    region = region_HW.bool()
    if not bool(region.any()):
        return 0.0
    return float(unc_HW.float()[region].mean())
