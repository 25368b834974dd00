"""Parallel scheduled sampling: the teacher-forced inputs mix the true codes with the model's own
greedy predictions of them, in training only."""

from __future__ import annotations

import pytest
import torch
from test_refiner import _batch, _cfg

from mrisegcli.errors import ConfigError
from mrisegcli.models.next_token import NextTokenSegmenter


def test_scheduled_inputs_mix_true_codes_with_the_models_own_predictions(one_thread) -> None:
    torch.manual_seed(0)
    model = NextTokenSegmenter(_cfg(scheduled_sampling=0.5, lambda_refine=0.0))
    b = _batch(B=16)
    codes_BN = b["mask_codes"].flatten(1)
    truth_BN = codes_BN[:, :-1]
    with torch.no_grad():
        own_BN = model.mask_logits(b["image"], b["text_ids"], b["text_mask"], truth_BN)
    own_BN = own_BN.argmax(-1)[:, :-1]
    inputs_BN = model.scheduled_inputs(b["image"], b["text_ids"], b["text_mask"], codes_BN)
    assert inputs_BN.shape == truth_BN.shape
    # every input is either the true code or the model's prediction of that same position
    assert bool(((inputs_BN == truth_BN) | (inputs_BN == own_BN)).all())
    differ = own_BN != truth_BN  # an untrained model mostly predicts another code
    assert differ.sum() > 100
    fed = (inputs_BN == own_BN)[differ].float().mean()
    assert 0.35 < fed < 0.65  # about half of them are fed the model's own code


def test_training_feeds_the_mixed_codes_and_inference_does_not(one_thread, monkeypatch) -> None:
    torch.manual_seed(0)
    model = NextTokenSegmenter(_cfg(scheduled_sampling=0.9, input_noise=0.0, lambda_refine=0.0))
    fed: list[torch.Tensor] = []
    original = model.teacher_forced_states

    def spy(image, text_ids, text_mask, codes_BN, skips=None):
        fed.append(codes_BN.clone())
        return original(image, text_ids, text_mask, codes_BN, skips)

    monkeypatch.setattr(model, "teacher_forced_states", spy)
    b = _batch(B=8)
    truth_BN = b["mask_codes"].flatten(1)[:, :-1]
    out = model(b)
    assert len(fed) == 2  # the prediction pass, then the trained pass
    torch.testing.assert_close(fed[0], truth_BN)
    assert (fed[1] != truth_BN).float().mean() > 0.5
    out["loss"].backward()  # gradients flow through the second pass only
    assert model.mask_head.weight.grad is not None

    model.eval()
    fed.clear()
    with torch.no_grad():
        model(b)
    assert len(fed) == 1
    torch.testing.assert_close(fed[0], truth_BN)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_scheduled_sampling_outside_its_range_is_refused(p: float) -> None:
    with pytest.raises(ConfigError, match="scheduled_sampling"):
        _cfg(scheduled_sampling=p)
