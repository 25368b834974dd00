"""The paradigm registry: every paradigm-specific decision goes through one object, so that a
new paradigm is one class in ``paradigms.py``."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch

import mrisegcli
from mrisegcli import paradigms
from mrisegcli.config import Paradigm, RunConfig
from mrisegcli.errors import MrisegError
from mrisegcli.workflow import segmenter
from mrisegcli.workflow.bundle import needed_tokenizers

SRC = Path(mrisegcli.__file__).parent


def test_registry_matches_the_config_choices() -> None:
    assert set(paradigms.PARADIGMS) == set(typing.get_args(Paradigm))
    for name, p in paradigms.PARADIGMS.items():
        assert p.name == name


def test_unknown_paradigm_is_one_clear_error() -> None:
    with pytest.raises(
        MrisegError, match="unknown paradigm 'next-pixel'; choose one of next-token, next-scale"
    ):
        paradigms.get_paradigm("next-pixel")


def test_no_paradigm_name_is_compared_outside_the_registry() -> None:
    """`paradigm == "next-token"` and friends live in paradigms.py only."""
    pattern = re.compile(
        r"""(==|!=|\bin\b)\s*\(?\s*["']next-(token|scale)["']|["']next-(token|scale)["']\s*(==|!=)"""
    )
    offenders = [
        f"{path.relative_to(SRC)}:{i}"
        for path in SRC.rglob("*.py")
        if path.name != "paradigms.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


class _Third(paradigms.Paradigm):
    """A stand-in third paradigm: the package's dispatch must reach it without other edits."""

    name = "next-third"

    def tokenizers(self, image_input: str) -> tuple[str, ...]:
        return ("third_vq",)

    def model_config(self, cfg, bundle, n_train):
        return {"n_train": n_train}

    def config_from_dict(self, d):
        return dict(d)

    def build(self, mcfg, bundle):
        return torch.nn.Linear(1, 1)

    def training_tensors(self, codes, mcfg):
        return {"codes": codes}

    def decode(self, model, bundle, image, text_ids, text_mask, opts, cache):
        cache["calls"] = cache.get("calls", 0) + 1
        return paradigms.Decoded(torch.zeros(image.shape[0] * opts.samples, 1, *image.shape[-2:]))


def test_a_third_paradigm_is_reached_through_the_registry(monkeypatch) -> None:
    monkeypatch.setitem(paradigms.PARADIGMS, "next-third", _Third())
    assert needed_tokenizers("next-third") == ("third_vq",)
    cfg = RunConfig(paradigm="next-token")  # the config type is only read for the paradigm name
    cfg = cfg.__class__(**{**cfg.__dict__, "paradigm": "next-third"})
    assert segmenter.model_config(cfg, None, n_train=7) == {"n_train": 7}
    assert isinstance(segmenter.build_model("next-third", {}, None), torch.nn.Linear)
    assert segmenter.model_config_from_dict("next-third", {"a": 1}) == {"a": 1}
    assert segmenter.training_tensors("next-third", "c", None) == {"codes": "c"}
    seg = segmenter.Segmenter(
        "next-third", torch.nn.Linear(1, 1), None, RunConfig(), torch.device("cpu")
    )
    pred = seg.predict_tensors(
        torch.zeros(2, 1, 8, 8),
        torch.zeros(2, 3, dtype=torch.long),
        torch.ones(2, 3, dtype=torch.bool),
        samples=3,
    )
    assert pred.prob.shape == (2, 8, 8) and torch.all(pred.prob == 0.5)
    assert pred.uncertainty is not None and seg._decode_cache["calls"] == 1


def test_each_paradigm_names_its_own_ceiling_tokenizer() -> None:
    class Bundle:
        mask_vq, multiscale = "single-scale", "multi-scale"

    assert paradigms.get_paradigm("next-token").ceiling_tokenizer(Bundle) == "single-scale"
    assert paradigms.get_paradigm("next-scale").ceiling_tokenizer(Bundle) == "multi-scale"
    assert (
        paradigms.get_paradigm("next-scale").has_steps
        and not paradigms.get_paradigm("next-token").has_steps
    )
    assert paradigms.get_paradigm("next-token").teacher_forcing
