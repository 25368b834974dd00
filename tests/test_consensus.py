"""Consensus aggregation maths and the coarse-to-fine picture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mrisegcli.decode.consensus import (
    case_uncertainty,
    consensus,
    consensus_logits,
    foreground_union,
)
from mrisegcli.errors import OutputExistsError


def test_mean_threshold_and_uncertainty_on_hand_made_samples():
    # 4 samples of a 1 x 4 image: pixel 0 all agree fg, 1 all agree bg,
    # 2 splits 2/2, 3 has 1 of 4 foreground
    prob = torch.tensor(
        [
            [[0.9, 0.1, 0.8, 0.7]],
            [[0.8, 0.2, 0.9, 0.2]],
            [[0.7, 0.0, 0.3, 0.1]],
            [[1.0, 0.3, 0.2, 0.3]],
        ]
    )  # (S=4, H=1, W=4)
    c = consensus(prob)
    torch.testing.assert_close(c.mean_prob, torch.tensor([[0.85, 0.15, 0.55, 0.325]]))
    assert c.mask.tolist() == [[True, False, True, False]]
    assert c.mask.dtype == torch.bool
    expected_u = [0.0, 0.0, 1.0, 2 * math.sqrt(0.25 * 0.75)]
    torch.testing.assert_close(c.uncertainty, torch.tensor([expected_u]))
    assert float(c.uncertainty.min()) >= 0 and float(c.uncertainty.max()) <= 1


def test_agreeing_samples_have_zero_uncertainty_and_threshold_is_strict():
    prob = torch.full((5, 3, 3), 0.5)  # exactly 0.5 is background in every sample and overall
    prob[:, 0, 0] = 0.9
    c = consensus(prob)
    assert c.uncertainty.abs().max() == 0
    assert c.mask.sum() == 1 and bool(c.mask[0, 0])
    single = consensus(prob[:1])  # one sample: no spread
    assert single.uncertainty.abs().max() == 0


def test_batched_and_logit_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, 7, generator=g)  # (N cases, S samples, H, W)
    c = consensus_logits(logits)
    assert c.mean_prob.shape == c.mask.shape == c.uncertainty.shape == (3, 5, 7)
    for n in range(3):
        one = consensus(torch.sigmoid(logits[n]))
        torch.testing.assert_close(c.mean_prob[n], one.mean_prob)
        torch.testing.assert_close(c.uncertainty[n], one.uncertainty)
    frac = (logits > 0).float().mean(1)
    torch.testing.assert_close(c.uncertainty, 2 * (frac * (1 - frac)).sqrt())
    with pytest.raises(ValueError):
        consensus(torch.rand(4, 4))


def test_case_uncertainty_over_the_foreground_union():
    prob = torch.zeros(2, 4, 4)
    prob[0, :2, :2] = 0.9  # sample 0: 4 pixels
    prob[1, :2, :1] = 0.9  # sample 1: 2 of them
    c = consensus(prob)
    union = foreground_union(prob)
    assert int(union.sum()) == 4
    # 2 agreeing pixels (u = 0) and 2 split pixels (u = 1) in the union
    assert case_uncertainty(c.uncertainty, union) == pytest.approx(0.5)
    assert case_uncertainty(c.uncertainty, torch.zeros(4, 4, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError):
        case_uncertainty(c.uncertainty, union[:2])


def test_steps_png_writes_masks_side_by_side(tmp_path):
    from mrisegcli.io.overlay import write_steps_png

    steps = [np.zeros((8, 8), bool), np.zeros((8, 8), bool), np.ones((8, 8), bool)]
    steps[1][:4] = True  # top half foreground after step 2
    out = tmp_path / "steps.png"
    assert write_steps_png(steps, out, gap=2) == out
    arr = np.asarray(Image.open(out))
    assert arr.shape == (8, 3 * 8 + 2 * 2)
    assert (arr[:, :8] == 0).all()
    assert (arr[:4, 10:18] == 255).all() and (arr[4:, 10:18] == 0).all()
    assert (arr[:, 20:] == 255).all()
    assert (arr[:, 8:10] == 128).all()  # separator
    with pytest.raises(OutputExistsError):
        write_steps_png(steps, out)
    write_steps_png(steps[:1], out, overwrite=True)
    assert np.asarray(Image.open(out)).shape == (8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.png"]  # no temp files left
    with pytest.raises(ValueError):
        write_steps_png([np.zeros((2, 8, 8), bool)], tmp_path / "bad.png")
