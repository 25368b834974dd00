"""``mriseg train`` under torchrun (2 processes, gloo on CPU) against a single-process run.

One 2-rank launch and one plain launch with the same seed and global batch. The launch goes
through a small probe script (written at test time) that records, per rank, which stages ran,
which samples each rank trained on and the loss of each of its training forwards, who wrote
checkpoints, and each rank's final weights, and it logs every step (``log_every=1``); then it
runs ``python -m mrisegcli`` exactly as a user would. TCL and HET are off (their buffers are per
rank, so ranks would weight their losses differently; see docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mrisegcli.cli import app

STEPS, BATCH = 8, 8
TRAIN = [
    "train",
    "--size",
    "32",
    "--steps",
    str(STEPS),
    "--batch-size",
    str(BATCH),
    "--lr",
    "0.05",
    "--mask-steps",
    "10",
    "--image-steps",
    "10",
    "--ckpt-every",
    "4",
    "--eval-every",
    "1000",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--lambda-tcl",
    "0",
    "--het-alpha",
    "0",
    "--seed",
    "3",
    "--input-noise",
    "0",
]  # random corruption differs between a rank's half and one process
# DDP averages gradients in another order than one process sums them: float32 round-off only.
ATOL = 1e-5

PROBE = """
import dataclasses, json, os, runpy, sys
from pathlib import Path
from safetensors.torch import save_file
import mrisegcli.training.loop as loop
import mrisegcli.workflow.prepare as prepare
import mrisegcli.workflow.train as wtrain

rank = os.environ.get("RANK", "single")
out = Path(os.environ["PROBE_DIR"])

def note(event, **kw):
    with (out / f"rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps({"event": event, **kw}) + "\\n")

def counted(module, name):
    real = getattr(module, name)
    def wrapper(*a, **k):
        note(name)
        return real(*a, **k)
    setattr(module, name, wrapper)

counted(prepare, "fit_bundle")
counted(wtrain, "build_cache")
counted(loop, "save_checkpoint")
real_slice = loop._rank_slice
def rank_slice(idx, info):
    mine = real_slice(idx, info)
    note("batch", world=info.world_size, global_=idx.tolist(), mine=mine.tolist())
    return mine
loop._rank_slice = rank_slice
real_train = wtrain.train
def train(model, data, cfg, *a, **k):
    cfg = dataclasses.replace(cfg, log_every=1)  # a train_log line for every step
    real_forward = model.forward
    def forward(batch):
        result = real_forward(batch)
        if model.training:  # this rank's own numbers for its slice, step by step
            note("forward", **{n: float(v.detach()) for n, v in result.items() if v.dim() == 0})
        return result
    model.forward = forward
    summary = real_train(model, data, cfg, *a, **k)
    sd = {n: v.detach().contiguous() for n, v in model.state_dict().items()}
    save_file(sd, str(out / f"weights_rank{rank}.safetensors"))
    return summary
wtrain.train = train
sys.argv = ["mriseg", *sys.argv[1:]]
runpy.run_module("mrisegcli", run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ddp")
    data = base / "data"
    r = CliRunner().invoke(
        app,
        ["synth", str(data), "--n-train", "16", "--n-val", "4", "--n-test", "0", "--size", "32"],
    )
    assert r.exit_code == 0, r.output
    probe = base / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = {}
    for name, launcher in [
        (
            "ddp",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(_free_port()),
            ],
        ),
        ("single", [sys.executable]),
    ]:
        (base / f"probe_{name}").mkdir()
        cmd = [*launcher, str(probe), *TRAIN, "--data", str(data), "--out", str(base / name)]
        procs[name] = subprocess.run(
            cmd,
            env={**env, "PROBE_DIR": str(base / f"probe_{name}")},
            capture_output=True,
            text=True,
            timeout=180,
        )
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{p.stdout}\n{p.stderr[-3000:]}"
    return {"base": base, "ddp_stderr": procs["ddp"].stderr, "ddp_stdout": procs["ddp"].stdout}


def test_both_ranks_trained_on_disjoint_halves_of_each_global_batch(runs):
    probe = runs["base"] / "probe_ddp"
    r0 = [e for e in _events(probe / "rank0.jsonl") if e["event"] == "batch"]
    r1 = [e for e in _events(probe / "rank1.jsonl") if e["event"] == "batch"]
    single = [
        e
        for e in _events(runs["base"] / "probe_single" / "ranksingle.jsonl")
        if e["event"] == "batch"
    ]
    assert len(r0) == len(r1) == len(single) == STEPS
    for a, b, s in zip(r0, r1, single, strict=True):
        assert a["world"] == b["world"] == 2 and s["world"] == 1
        assert a["global_"] == b["global_"] == s["global_"]  # same data order as one process
        assert len(a["mine"]) == len(b["mine"]) == BATCH // 2
        assert not set(a["mine"]) & set(b["mine"])
        assert sorted(a["mine"] + b["mine"]) == sorted(s["mine"])


def test_only_rank_zero_fits_caches_checkpoints_and_logs(runs):
    probe = runs["base"] / "probe_ddp"
    r0 = [
        e["event"] for e in _events(probe / "rank0.jsonl") if e["event"] not in ("batch", "forward")
    ]
    r1 = [
        e["event"] for e in _events(probe / "rank1.jsonl") if e["event"] not in ("batch", "forward")
    ]
    assert r0.count("fit_bundle") == 1 and r0.count("build_cache") == 1
    assert r0.count("save_checkpoint") == STEPS // 4
    assert r1 == []  # rank 1 neither fitted, cached nor saved anything
    assert runs["ddp_stderr"].count("> fitting mask tokenizer") == 1
    assert runs["ddp_stdout"].count("trained ") == 1
    run = runs["base"] / "ddp"
    lines = (run / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))
    records = [json.loads(x) for x in lines]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == STEPS
    assert [r["step"] for r in records if r["split"] == "val"] == [STEPS]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000004.safetensors",
        "step_00000008.safetensors",
    ]
    single = {p.name for p in (runs["base"] / "single").iterdir()}
    assert {p.name for p in run.iterdir()} == single  # no per-rank or temp files


def _forwards(path: Path) -> list[dict]:
    return [
        {k: v for k, v in e.items() if k != "event"}
        for e in _events(path)
        if e["event"] == "forward"
    ]


def test_logged_metrics_are_means_over_ranks(runs):
    probe = runs["base"] / "probe_ddp"
    r0, r1 = _forwards(probe / "rank0.jsonl"), _forwards(probe / "rank1.jsonl")
    single = _forwards(runs["base"] / "probe_single" / "ranksingle.jsonl")
    assert len(r0) == len(r1) == len(single) == STEPS
    logged = [
        json.loads(x) for x in (runs["base"] / "ddp" / "train_log.jsonl").read_text().splitlines()
    ]
    train_rows = [r for r in logged if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))  # the probe logs every step
    # the ranks' halves give losses far apart at the start (later the tiny model fits both)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(r0, r1, strict=True)) > 1e-3
    for row in train_rows:
        a, b = r0[row["step"] - 1], r1[row["step"] - 1]  # the forward of that step on each rank
        assert a.keys() == b.keys() and "loss" in a
        for name in a:
            assert row[name] == pytest.approx((a[name] + b[name]) / 2, rel=1e-9, abs=1e-12), name
        # equal-sized halves: the mean of the two halves' losses is the whole batch's loss
        assert row["loss"] == pytest.approx(single[row["step"] - 1]["loss"], rel=1e-4)
    one = [
        json.loads(x)
        for x in (runs["base"] / "single" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in one if r["split"] == "train"] == [
        single[r["step"] - 1]["loss"] for r in one if r["split"] == "train"
    ]  # one process: as is


def test_ddp_is_built_without_deprecated_arguments(runs):
    assert "broadcast_buffers" not in runs["ddp_stderr"]
    assert "FutureWarning" not in runs["ddp_stderr"], runs["ddp_stderr"][-3000:]


def test_ranks_end_identical(runs):
    probe = runs["base"] / "probe_ddp"
    w0 = load_file(str(probe / "weights_rank0.safetensors"))
    w1 = load_file(str(probe / "weights_rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:  # all-reduced gradients are the same bits on every rank
        assert torch.equal(w0[k], w1[k]), k


def test_weights_match_single_process_run(runs):
    ckpt = f"checkpoints/step_{STEPS:08d}.safetensors"
    ddp = load_file(str(runs["base"] / "ddp" / ckpt))
    one = load_file(str(runs["base"] / "single" / ckpt))
    start = load_file(str(runs["base"] / "ddp" / "checkpoints" / "step_00000004.safetensors"))
    names = [k for k in ddp if k.startswith("model.")]
    assert names and set(names) == {k for k in one if k.startswith("model.")}
    moved = max((ddp[k].float() - start[k].float()).abs().max().item() for k in names)
    assert moved > 100 * ATOL  # the weights really changed, so the comparison means something
    worst = max((ddp[k].float() - one[k].float()).abs().max().item() for k in names)
    assert worst <= ATOL, worst
    # tokenizers fitted on rank 0 equal the single-process ones
    for name in ("mask_vq.safetensors", "image_vq.safetensors"):
        a = load_file(str(runs["base"] / "ddp" / name))
        b = load_file(str(runs["base"] / "single" / name))
        assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
