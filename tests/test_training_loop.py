"""The generic training loop: it learns, checkpoints atomically, and resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrisegcli.errors import MrisegError
from mrisegcli.training.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mrisegcli.training.loop import TrainConfig, TrainingInterrupted, lr_at, make_optimizer, train


class Toy(torch.nn.Module):
    """A two-layer regressor; ``forward(batch)`` returns a loss dict like the real models."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.register_buffer("seen", torch.zeros(64))

    def forward(self, batch):
        pred = self.net(batch["x"]).squeeze(-1)
        self.seen[batch["i"]] += 1
        loss = torch.nn.functional.mse_loss(pred, batch["y"])
        return {"loss": loss, "mse": loss.detach()}


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.3
    return {"x": x, "y": y, "i": torch.arange(n)}


CFG = TrainConfig(steps=40, batch_size=16, lr=5e-2, warmup_steps=5, eval_every=20, ckpt_every=10)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, CFG, 40) for s in range(40)]
    assert lrs[0] < lrs[4] == pytest.approx(CFG.lr)
    assert lrs[-1] < lrs[10] and lrs[-1] >= CFG.lr * CFG.min_lr_ratio


def test_lr_schedule_by_steps_is_the_library_cosine():
    """Without a time budget, after the warm-up, ``lr_at`` is transformers' cosine schedule
    with a floor (``get_cosine_with_min_lr_schedule_with_warmup`` driving a torch LambdaLR);
    in the warm-up ours is one step ahead (its first step is not spent at lr 0)."""
    import transformers

    cfg = TrainConfig(steps=200, lr=3e-3, warmup_steps=20, min_lr_ratio=0.05)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        opt, cfg.warmup_steps, cfg.steps, min_lr_rate=cfg.min_lr_ratio
    )
    theirs = []
    for _ in range(cfg.steps):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_at(s, cfg, cfg.steps) for s in range(cfg.steps)]
    w = cfg.warmup_steps
    assert ours[w:] == pytest.approx(theirs[w:], rel=1e-9, abs=1e-15)
    assert ours[: w - 1] == pytest.approx(theirs[1:w], rel=1e-9)  # one step ahead


def test_training_reduces_loss_and_keeps_best(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    data = _data()
    best = {}

    def evaluate(m):
        with torch.no_grad():
            mse = torch.nn.functional.mse_loss(m.net(data["x"]).squeeze(-1), data["y"]).item()
        return {"dice": -mse}

    summary = train(
        model,
        data,
        CFG,
        tmp_path,
        device=torch.device("cpu"),
        evaluate=evaluate,
        on_best=lambda m, metrics: best.update(metrics),
    )
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if r["split"] == "train"]
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert summary["steps"] == 40 and best["dice"] == summary["best_dice"]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000040.safetensors"
    assert len(list((tmp_path / "checkpoints").iterdir())) == CFG.keep_checkpoints


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    data = _data()
    torch.manual_seed(0)
    reference = Toy()
    train(reference, data, CFG, tmp_path / "ref", device=torch.device("cpu"))

    torch.manual_seed(0)
    model = Toy()

    def kill_at_13(step, total, metrics):
        if step == 13:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="step 13"):
        train(model, data, CFG, tmp_path / "run", device=torch.device("cpu"), progress=kill_at_13)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000013.safetensors"

    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    resumed = Toy()
    train(resumed, data, CFG, tmp_path / "run", device=torch.device("cpu"), resume=True)
    for k, v in _weights(reference).items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(MrisegError, match="no checkpoint"):
        train(Toy(), _data(), CFG, tmp_path, device=torch.device("cpu"), resume=True)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    train(Toy(), _data(), CFG, tmp_path, device=torch.device("cpu"))
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(MrisegError, match="corrupt or truncated"):
        load_checkpoint(ckpt, Toy())


KILLED_WRITER = """
import os, signal, sys
from mrisegcli.io.atomic import atomic_path
writing = atomic_path(sys.argv[1], overwrite=True)
tmp = writing.__enter__()
tmp.write_bytes(b"half a checkpoint")
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_mid_write(target: Path) -> Path:
    """What ``kill -9`` during an atomic write of ``target`` leaves behind: its temp file."""
    before = set(target.parent.iterdir())
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (left,) = set(target.parent.iterdir()) - before
    assert not target.exists()
    return left


# Files in the checkpoints folder that look a bit like temp files but are not mriseg's own.
FOREIGN = [
    ".notes.tmp",
    "step_00000012.tmp",
    ".step_00000012.safetensors",
    "notes.txt",
    ".mask.abcdefgh.tmp.png",
    ".step_0012.abcdefgh.tmp.safetensors",
    ".step_00000012.abcdefgh.tmp.safetensors.bak",
]


def test_stale_checkpoint_temp_is_removed_on_resume_and_nothing_else(tmp_path):
    train(Toy(), _data(), CFG, tmp_path, device=torch.device("cpu"))
    ckpt_dir = tmp_path / "checkpoints"
    stale = killed_mid_write(ckpt_dir / "step_00000050.safetensors")
    assert stale.name.startswith(".step_00000050.") and ".tmp" in stale.name
    for name in FOREIGN:
        (ckpt_dir / name).write_text("keep me")
    st_stale = ckpt_dir / ".tmpAb12Cd"  # a save killed inside safetensors' own writer
    st_stale.write_bytes(b"half-written")
    (ckpt_dir / ".tmpAb12Cd.bak").write_text("keep me")  # not its name: kept
    kept_before = sorted(p.name for p in ckpt_dir.iterdir() if p not in (stale, st_stale))
    # the run is complete: resuming only loads the checkpoint (and tidies the folder)
    summary = train(Toy(), _data(), CFG, tmp_path, device=torch.device("cpu"), resume=True)
    assert summary["steps"] == CFG.steps
    assert not stale.exists() and not st_stale.exists()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == kept_before
    assert latest_checkpoint(ckpt_dir).name == "step_00000040.safetensors"


def test_stale_checkpoint_temp_is_removed_by_the_next_checkpoint(tmp_path):
    model = Toy()
    opt = make_optimizer(model, CFG)
    save_checkpoint(tmp_path / "step_00000001.safetensors", model, opt, TrainState(step=1))
    stale = killed_mid_write(tmp_path / "step_00000002.safetensors")
    for name in FOREIGN:
        (tmp_path / name).write_text("keep me")
    save_checkpoint(tmp_path / "step_00000003.safetensors", model, opt, TrainState(step=3))
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*FOREIGN, "step_00000001.safetensors", "step_00000003.safetensors"]
    )
    state, _, _ = load_checkpoint(tmp_path / "step_00000003.safetensors", Toy())
    assert state.step == 3
