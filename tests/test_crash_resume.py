"""Crash-safe training through the real command: ``kill -9`` and SIGTERM, then ``--resume``.

The signalled runs are real ``mriseg train`` processes; the uninterrupted reference and the
resumed runs go through Typer's CliRunner in this process (same single thread as the
subprocesses, so the numbers are the same). Resume is exact on CPU (data position, RNG,
optimiser and the TCL/HET buffers all come back), so a resumed run must reproduce the
uninterrupted one bit for bit; the test allows 1e-6 on logged losses and 0 on weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# what kill -9 inside an atomic checkpoint write leaves (shared with the loop tests)
from test_training_loop import killed_mid_write
from typer.testing import CliRunner

from mrisegcli.cli import app

STEPS, CKPT = 20, 3
ARGS = [
    "--size",
    "32",
    "--steps",
    str(STEPS),
    "--batch-size",
    "4",
    "--ckpt-every",
    str(CKPT),
    "--eval-every",
    "1000",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--seed",
    "1",
]
LOSS_RTOL = 1e-6
COMPARED = (
    "loss",
    "ce",
    "ce_plain",
    "nktp",
    "tcl",
    "het_weight",
    "acc",
    "grad_norm",
    "lr",
    "epoch",
)

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Match the subprocesses (OMP_NUM_THREADS=1): same reduction order, same numbers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Data, tokenizers shared by every run, and one uninterrupted reference run."""
    base = tmp_path_factory.mktemp("crash")
    data, tok, ref = base / "data", base / "tok", base / "reference"
    invoke(["synth", str(data), "--n-train", "16", "--n-val", "4", "--n-test", "0", "--size", "32"])
    invoke(
        [
            "tokenize",
            "--data",
            str(data),
            "--out",
            str(tok),
            "--size",
            "32",
            "--mask-steps",
            "10",
            "--image-steps",
            "10",
            "--device",
            "cpu",
            "--workers",
            "0",
        ]
    )
    invoke(["train", "--data", str(data), "--out", str(ref), "--tokenizer", str(tok), *ARGS])
    return {"base": base, "data": data, "tok": tok, "ref": ref}


def _train_cmd(p: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(p["data"]),
        "--out",
        str(run),
        "--tokenizer",
        str(p["tok"]),
        *ARGS,
        *extra,
    ]


def _start_and_signal(
    p: dict[str, Path], run: Path, sig: int, after_step: int
) -> subprocess.CompletedProcess:
    """Start ``mriseg train``, wait for the checkpoint of ``after_step``, send ``sig``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mrisegcli", *_train_cmd(p, run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = run / "checkpoints" / f"step_{after_step:08d}.safetensors"
    deadline = time.monotonic() + 120
    try:
        while not target.exists():
            assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _log(run: Path) -> dict[tuple[int, str], dict]:
    """The train log, one record per (step, split): the last one written wins."""
    path = run / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []  # nothing logged yet
    records = [json.loads(x) for x in lines]
    return {(r["step"], r["split"]): r for r in records}


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS:08d}.safetensors"))


def _assert_same_run(run: Path, ref: Path) -> None:
    got, want = _log(run), _log(ref)
    assert got.keys() == want.keys()
    for key, w in want.items():
        for name in COMPARED:
            if name in w:
                assert got[key][name] == pytest.approx(w[name], rel=LOSS_RTOL, abs=1e-9), (
                    key,
                    name,
                )
        if key[1] == "val":
            assert got[key]["dice"] == w["dice"]
    a, b = _final(run), _final(ref)
    assert a.keys() == b.keys()
    for name in a:  # model weights, optimiser moments, hard-token memory, TCL counts, RNG
        assert torch.equal(a[name], b[name]), name
    assert (run / "model.safetensors").is_file()


def test_reference_run_is_complete(prepared):
    ref = prepared["ref"]
    steps = sorted(s for s, split in _log(ref) if split == "train")
    assert steps == [10, 20]
    tensors = _final(ref)
    assert any(k.startswith("opt.") for k in tensors) and "rng.torch" in tensors


def test_kill_9_then_resume_finishes_like_an_uninterrupted_run(prepared):
    run = prepared["base"] / "killed"
    proc = _start_and_signal(prepared, run, signal.SIGKILL, after_step=2 * CKPT)
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts and all(p.startswith("step_") for p in ckpts)
    assert f"step_{STEPS:08d}.safetensors" not in ckpts  # it really died before the end
    stale = killed_mid_write(run / "checkpoints" / "step_00000099.safetensors")
    (run / "checkpoints" / "notes.tmp").write_text("not mriseg's")
    invoke(_train_cmd(prepared, run, "--resume"))
    _assert_same_run(run, prepared["ref"])
    assert not stale.exists()  # the resumed run removed the torn write's temp file ...
    assert not list(run.rglob(".*.tmp*"))
    assert (run / "checkpoints" / "notes.tmp").read_text() == "not mriseg's"  # ... and only it


def test_sigterm_saves_says_resume_and_resume_is_exact(prepared):
    run = prepared["base"] / "terminated"
    proc = _start_and_signal(prepared, run, signal.SIGTERM, after_step=CKPT)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mriseg: error:")]
    assert len(errors) == 1, proc.stderr
    assert "SIGTERM" in errors[0] and "checkpoint" in errors[0] and "--resume" in errors[0]
    stopped = int(errors[0].split("at step ")[1].split(";")[0])
    assert CKPT <= stopped < STEPS
    assert (run / "checkpoints" / f"step_{stopped:08d}.safetensors").is_file()
    assert not list(run.rglob(".*tmp*"))  # nothing half-written
    logged = [r["step"] for r in _log(run).values()]
    assert all(s <= stopped for s in logged)  # the log never runs ahead of the checkpoint
    invoke(_train_cmd(prepared, run, "--resume"))
    _assert_same_run(run, prepared["ref"])
    lines = (run / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == len(_log(run))  # no step logged twice after a clean stop
