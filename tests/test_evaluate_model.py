"""``evaluate_model`` and the tokenizer ceiling, against stand-ins whose right answers are known:
an oracle that returns the ground truth, a model that draws nothing without text, tokenizers
that reconstruct perfectly or not at all."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.data.loading import load_split_arrays
from mrisegcli.metrics import CaseResult
from mrisegcli.paradigms import get_paradigm
from mrisegcli.workflow.evaluate_model import evaluate_model, report_dict, tokenizer_ceiling
from mrisegcli.workflow.prepare import open_dataset
from mrisegcli.workflow.segmenter import Prediction

SIZE = 32


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    r = CliRunner().invoke(
        app,
        [
            "synth",
            str(root),
            "--n-train",
            "2",
            "--n-val",
            "2",
            "--n-test",
            "8",
            "--size",
            str(SIZE),
        ],
    )
    assert r.exit_code == 0, r.output
    return root


class _Identity:
    """A 'tokenizer' whose reconstruction is the mask itself (logits +-10)."""

    def encode(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes * 20.0 - 10.0


class _Blank(_Identity):
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.full_like(codes, -10.0)


class _Oracle:
    """Returns the ground truth of each case (found by its image), nothing for an empty prompt."""

    def __init__(self, paradigm: str, images: np.ndarray, masks: np.ndarray) -> None:
        self.paradigm, self.image_size, self.device = paradigm, SIZE, torch.device("cpu")
        self.impl = get_paradigm(paradigm)
        self.cfg = SimpleNamespace(use_text=True)
        self.bundle = SimpleNamespace(mask_vq=_Blank(), multiscale=_Identity())
        self._by_image = {im.tobytes(): m for im, m in zip(images, masks, strict=True)}
        self.presence_threshold = None  # no presence head: every mask is drawn
        self.scope = None  # no recorded scope: no prompt is refused

    def is_present(self, presence, n: int, threshold=None) -> np.ndarray:
        return np.ones(n, bool)

    def predict(self, images, texts, **kw) -> Prediction:
        probs = np.stack(
            [
                self._by_image[im.tobytes()].astype(np.float32) * (t != "")
                for im, t in zip(images, texts, strict=True)
            ]
        )
        prob = torch.from_numpy(probs)
        return Prediction(prob, parts={"tokens": torch.zeros_like(prob), "refined": prob})


def _split(root: Path) -> tuple[list, np.ndarray, np.ndarray]:
    cases = open_dataset([root], None, check=False).split("test")
    images, masks = load_split_arrays(cases, SIZE)
    return cases, images, masks


def test_oracle_scores_one_and_empty_text_scores_the_empty_cases_only(synth_data: Path) -> None:
    cases, images, masks = _split(synth_data)
    seg = _Oracle("next-scale", images, masks)
    report = evaluate_model(seg, synth_data, ablations=("empty",))
    out = report_dict(report)
    assert out["dice"] == pytest.approx(1.0) and out["miou"] == pytest.approx(1.0)
    assert out["n"] == len(cases) == 8
    # with no text the oracle draws nothing: Dice 1 only where the ground truth is empty
    empty_share = float(np.mean([m.sum() == 0 for m in masks]))
    assert out["text_empty_dice"] == pytest.approx(empty_share)
    assert out["text_empty_dice_drop"] == pytest.approx(1.0 - empty_share)
    # each part of the prediction is scored on its own
    assert out["parts"]["refined"]["dice"] == pytest.approx(1.0)
    assert out["parts"]["tokens"]["dice"] == pytest.approx(empty_share)


@pytest.mark.parametrize(("paradigm", "expected"), [("next-scale", 1.0), ("next-token", None)])
def test_ceiling_uses_the_paradigms_own_tokenizer(
    synth_data: Path, paradigm: str, expected: float | None
) -> None:
    """The run holds both tokenizers; the next-scale ceiling is the multi-scale one's (perfect
    here), the next-token ceiling the single-scale one's (blank here: Dice of empty masks)."""
    cases, images, masks = _split(synth_data)
    seg = _Oracle(paradigm, images, masks)
    gts = [m.astype(bool) for m in masks]
    results: list[CaseResult] = tokenizer_ceiling(seg, masks, gts, cases)
    dice = float(np.mean([r.dice for r in results]))
    if expected is None:
        expected = float(np.mean([m.sum() == 0 for m in masks]))
    assert dice == pytest.approx(expected)
    report = report_dict(evaluate_model(seg, synth_data))
    assert report["tokenizer_ceiling_dice"] == pytest.approx(expected)
