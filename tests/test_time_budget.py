"""``train --max-minutes``: one wall-clock budget for the whole run, tokenizers included; the
learning-rate schedule and the tokenizers' share follow it; the run stops cleanly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.tokenizers.fit import fit_mask_vq
from mrisegcli.tokenizers.mask_vq import MaskVQConfig
from mrisegcli.training.loop import TrainConfig, lr_at

runner = CliRunner()


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    r = runner.invoke(
        app,
        ["synth", str(root), "--n-train", "24", "--n-val", "8", "--n-test", "4", "--size", "32"],
    )
    assert r.exit_code == 0, r.output
    return root


def test_schedule_follows_the_time_spent() -> None:
    cfg = TrainConfig(steps=1000, lr=1.0, warmup_steps=10, min_lr_ratio=0.0)
    assert lr_at(50, cfg, 1000) > 0.9  # by steps: early
    assert lr_at(50, cfg, 1000, done=0.5) == pytest.approx(0.5, abs=1e-6)  # by time: half way
    assert lr_at(50, cfg, 1000, done=1.0) == pytest.approx(0.0, abs=1e-9)
    assert lr_at(5, cfg, 1000, done=0.01) == pytest.approx(0.6)  # warm-up: steps or time share
    assert lr_at(1, cfg, 1000, done=0.04) == pytest.approx(0.8)
    assert lr_at(1, cfg, 1000, done=0.5) == pytest.approx(0.5, abs=1e-6)  # short budget: decaying


def test_tokenizer_fit_stops_at_its_budget() -> None:
    rng = np.random.default_rng(0)
    masks = (rng.random((40, 32, 32)) > 0.7).astype(np.uint8)
    cfg = MaskVQConfig(image_size=32, codebook_size=16, channels=(8, 8, 8))
    t0 = time.perf_counter()
    _, report = fit_mask_vq(masks, cfg, steps=100_000, batch_size=4, max_seconds=1.5)
    assert time.perf_counter() - t0 < 15
    _, plain = fit_mask_vq(masks, cfg, steps=3, batch_size=4)
    assert report["loss"] > 0 and plain["loss"] > 0


def test_train_with_max_minutes_stops_by_time_with_best_weights(
    synth_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    t0 = time.perf_counter()
    r = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(synth_data),
            "--out",
            str(run),
            "--size",
            "32",
            "--steps",
            "100000",
            "--batch-size",
            "8",
            "--mask-steps",
            "400",
            "--max-minutes",
            "0.5",
            "--eval-every",
            "20",
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
    )
    wall = time.perf_counter() - t0
    assert r.exit_code == 0, (r.output, r.exception)
    assert wall < 0.5 * 60 + 25  # the budget plus one validation and loading slack
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [rec["step"] for rec in log if rec["split"] == "train"]
    assert 0 < steps[-1] < 100_000  # stopped by time, not steps
    assert any(
        rec["split"] == "val" and rec["step"] == steps[-1] for rec in log
    )  # validated at the end
    lrs = [rec["lr"] for rec in log if rec["split"] == "train"]
    assert lrs[-1] < 0.5 * max(lrs)  # the schedule decayed within the budget
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["train"]["max_minutes"] == 0.5
    assert (run / "model.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tokenizers"]["mask_vq"]["seconds"] < 0.5 * 60 * 0.15 + 5  # its share


def test_the_budget_keeps_a_share_for_each_stage_after_the_loop() -> None:
    """The presence head's share only when the train rows hold empty masks (or may: no masks
    cached), the component rule's only with val volumes, nothing without a budget."""
    from types import SimpleNamespace

    from mrisegcli.workflow.train import PRESENCE_SHARE, VOLUME_RULE_SHARE, _calibration_reserve

    class Data:
        def __init__(self, volumes: bool, val: bool = True) -> None:
            self.rows = [SimpleNamespace(volume="v" if volumes else None)] if val else []

        def split(self, name: str) -> list:
            return self.rows

    cfg = SimpleNamespace(train=SimpleNamespace(max_minutes=10.0))
    head, rule = PRESENCE_SHARE * 600, VOLUME_RULE_SHARE * 600
    assert _calibration_reserve(cfg, Data(False), True) == (head, 0.0)
    assert _calibration_reserve(cfg, Data(False), False) == (0.0, 0.0)
    assert _calibration_reserve(cfg, Data(True), None) == (head, rule)
    assert _calibration_reserve(cfg, Data(True), False) == (0.0, rule)
    assert _calibration_reserve(cfg, Data(True, val=False), True) == (0.0, 0.0)
    cfg.train.max_minutes = None
    assert _calibration_reserve(cfg, Data(True), True) == (0.0, 0.0)
