"""A user's work is never lost or mixed: one writer per run folder, tokenizers that belong to
their model, ``--overwrite`` only over a command's own files, masks that really are masks,
configs checked against the weights, a full disk named as such, ``--resume`` that honours or
refuses the options given, and inputs that cannot hang a command.

Everything runs on one tiny synthetic dataset (32 px) and one 2-step run, through the command
line where a user would meet the problem. docs/robustness.md lists each case with its test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.errors import ConfigError, MrisegError
from mrisegcli.io.atomic import atomic_path, atomic_write_text
from mrisegcli.io.read import read_mask, read_scan
from mrisegcli.runinfo import read_config
from mrisegcli.training.distributed import DistInfo

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
TEXT = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
LOCK_NAME = ".mriseg.lock"  # the run folder's lock file (pid, host, start time)
FAST = [
    "--size",
    "32",
    "--batch-size",
    "4",
    "--eval-every",
    "1000",
    "--device",
    "cpu",
    "--workers",
    "0",
]
TRAIN = [*FAST, "--steps", "2", "--mask-steps", "5", "--image-steps", "5"]

runner = CliRunner()


# ----------------------------------------------------------------------------- helpers


def cli_error(args: list[str], *, code: int = 1) -> str:
    """Run the CLI expecting failure: exit ``code``, no traceback, one ``mriseg: error:`` line
    (notes and stage lines aside), which is returned."""
    r = runner.invoke(app, args)
    assert r.exit_code == code, (r.stdout, r.stderr, r.exception)
    assert "Traceback" not in r.stdout + r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)
    lines = [x for x in r.stderr.splitlines() if x.startswith("mriseg: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def cli_ok(args: list[str]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r


def _digest(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _grey_png(path: Path, shape=(40, 36)) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a blocking open() is interrupted by the alarm)."""

    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> dict[str, Path]:
    """A tiny dataset and a finished 2-step next-token run (its last checkpoint is step 2)."""
    base = tmp_path_factory.mktemp("safety")
    data, run = base / "data", base / "run"
    cli_ok(["synth", str(data), "--n-train", "8", "--n-val", "2", "--n-test", "2", "--size", "32"])
    cli_ok(["train", "--data", str(data), "--out", str(run), *TRAIN])
    return {"data": data, "run": run}


def _copy_run(trained, tmp_path: Path, name: str = "run", *, keep=("checkpoints", "cache")) -> Path:
    skip = [p for p in ("checkpoints", "cache") if p not in keep]
    dst = tmp_path / name
    shutil.copytree(trained["run"], dst, ignore=shutil.ignore_patterns(*skip))
    return dst


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run: Path, pid: int, host: str | None = None) -> Path:
    lock = run / LOCK_NAME
    lock.write_text(
        json.dumps(
            {
                "pid": pid,
                "host": host or socket.gethostname(),
                "started": "2024-01-01T00:00:00",
                "command": "train",
                "token": "t",
            }
        )
    )
    return lock


# ----------------------------------------------------------------------------- 1. one writer


def test_second_writer_is_refused_naming_the_holder(trained, tmp_path):
    """A live lock (another process's, or one this process holds) refuses a second train on the
    folder, fresh or --resume, and leaves the folder as it was."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        lock = _write_lock(fresh, sleeper.pid)
        line = cli_error(["train", "--data", str(trained["data"]), "--out", str(fresh), *TRAIN])
        assert f"mriseg: error: {fresh}: another mriseg is writing this run folder" in line
        assert f"pid {sleeper.pid} on host {socket.gethostname()}" in line
        assert sorted(p.name for p in fresh.iterdir()) == [LOCK_NAME] and lock.read_text().endswith(
            '"t"}'
        )
        run = _copy_run(trained, tmp_path)
        _write_lock(run, sleeper.pid)
        before = _digest(run)
        line = cli_error(
            ["train", "--data", str(trained["data"]), "--out", str(run), "--resume", *TRAIN]
        )
        assert "another mriseg is writing" in line and _digest(run) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # a writer in this very process (a library caller holding the lock)
    from mrisegcli.runinfo import run_lock

    run2 = _copy_run(trained, tmp_path, "run2")
    with run_lock(run2):
        line = cli_error(
            ["train", "--data", str(trained["data"]), "--out", str(run2), "--resume", *TRAIN]
        )
        assert f"pid {os.getpid()}" in line
    assert not (run2 / LOCK_NAME).exists()  # released with the block


def test_two_train_processes_on_one_folder(trained, tmp_path):
    """A real second ``mriseg train`` while the first runs: refused naming the first; the first
    goes on, and its lock goes with it when SIGTERM stops it."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mrisegcli",
        "train",
        "--data",
        str(trained["data"]),
        "--out",
        str(run),
        "--tokenizer",
        str(trained["run"]),
        *FAST,
        "--steps",
        "100000",
        "--ckpt-every",
        "100000",
    ]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        limit = time.monotonic() + 120
        while not (run / "train_log.jsonl").is_file():  # training, not just starting
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < limit, "the first run did not start training within 120 s"
            time.sleep(0.05)
        for extra in ([], ["--resume"], ["--overwrite"]):
            line = cli_error(
                ["train", "--data", str(trained["data"]), "--out", str(run), *TRAIN, *extra]
            )
            assert f"another mriseg is writing this run folder (pid {proc.pid} on host" in line
        assert proc.poll() is None  # the first run was not disturbed
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and "stopped by SIGTERM" in err
    assert not (run / LOCK_NAME).exists()


def test_lock_of_another_host_is_not_taken_over(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    _write_lock(run, _dead_pid(), host="some-other-host")
    line = cli_error(
        ["train", "--data", str(trained["data"]), "--out", str(run), "--resume", *TRAIN]
    )
    assert "on host some-other-host" in line and f"delete {run / LOCK_NAME}" in line


def test_stale_lock_is_taken_over_with_a_note(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    pid = _dead_pid()
    _write_lock(run, pid)
    r = cli_ok(["train", "--data", str(trained["data"]), "--out", str(run), "--resume", *TRAIN])
    notes = [x for x in r.stderr.splitlines() if x.startswith("mriseg: note:")]
    assert len(notes) == 1 and f"pid {pid}" in notes[0] and "no longer running" in notes[0]
    assert not (run / LOCK_NAME).exists()


def test_lock_is_released_on_every_exit(trained, tmp_path, monkeypatch):
    run = _copy_run(trained, tmp_path)
    cli_ok(
        ["train", "--data", str(trained["data"]), "--out", str(run), "--resume", *TRAIN]
    )  # success
    assert not (run / LOCK_NAME).exists()
    cli_error(
        [
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(run),
            "--resume",
            *TRAIN,
            "--lr",
            "1",
        ]
    )
    assert not (run / LOCK_NAME).exists()  # refused after the lock was taken
    import mrisegcli.workflow.train as train_module

    def interrupted(*args, **kwargs):
        assert (run / LOCK_NAME).is_file()  # held while the run works
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    r = runner.invoke(
        app, ["train", "--data", str(trained["data"]), "--out", str(run), "--resume", *TRAIN]
    )
    assert r.exit_code == 130 and not (run / LOCK_NAME).exists()
    # a refused dataset leaves no folder behind (the lock made it, the lock removes it)
    bad = tmp_path / "nodata"
    cli_error(["train", "--data", str(tmp_path / "absent"), "--out", str(bad), *TRAIN])
    assert not bad.exists()


def test_only_rank_0_locks(tmp_path):
    from mrisegcli.workflow.train import holding_run_lock

    seen = []

    @holding_run_lock
    def work(data_root, run_dir, cfg, **kwargs):
        seen.append((run_dir / LOCK_NAME).exists())

    work(None, tmp_path / "r0", None, dist_info=DistInfo(rank=0, world_size=2))
    (tmp_path / "r1").mkdir()
    work(None, tmp_path / "r1", None, dist_info=DistInfo(rank=1, world_size=2))
    assert seen == [True, False] and not (tmp_path / "r0").exists()


# ----------------------------------------------------------------------------- 2. tokenizers


def test_config_records_each_tokenizer_file(trained):
    import hashlib

    files = read_config(trained["run"])["tokenizers"]["files"]
    assert {k: v["role"] for k, v in files.items()} == {
        "mask_vq.safetensors": "mask_vq",
        "image_vq.safetensors": "image_vq",
        "tokenizer.json": "text",
    }
    for name, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((trained["run"] / name).read_bytes()).hexdigest()
    assert "model.safetensors" not in files and "config.json" not in files


def _swap(run: Path) -> None:
    a, b = run / "mask_vq.safetensors", run / "image_vq.safetensors"
    tmp = run / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _foreign_mask_vq(run: Path) -> None:
    """A valid mask tokenizer with other weights (as if copied from another run)."""
    from mrisegcli.tokenizers.serialize import load_tokenizer, save_tokenizer

    tok = load_tokenizer(run / "mask_vq.safetensors")
    with torch.no_grad():
        next(tok.parameters()).add_(0.01)
    save_tokenizer(tok, run / "mask_vq.safetensors", overwrite=True)


def _foreign_text(run: Path) -> None:
    path = run / "tokenizer.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4))  # same vocab, other file


TOKENIZER_MIXUPS = {
    "swapped mask and image tokenizers": (_swap, "mask_vq.safetensors", "swapped"),
    "mask tokenizer of another run": (
        _foreign_mask_vq,
        "mask_vq.safetensors",
        "not the mask tokenizer this model",
    ),
    "text tokenizer of another run": (
        _foreign_text,
        "tokenizer.json",
        "not the text tokenizer this model",
    ),
    "tokenizer file missing": (
        lambda r: (r / "image_vq.safetensors").unlink(),
        "image_vq.safetensors",
        "lacks",
    ),
}


@pytest.mark.parametrize("case", list(TOKENIZER_MIXUPS))
def test_mixed_up_tokenizers_are_refused_naming_the_file(case, trained, tmp_path):
    damage, name, words = TOKENIZER_MIXUPS[case]
    run = _copy_run(trained, tmp_path, keep=())
    damage(run)
    img = _grey_png(tmp_path / "a.png")
    line = cli_error(["predict", str(img), "--text", TEXT, "--model", str(run), "--device", "cpu"])
    assert (
        line.startswith(f"mriseg: error: {run / name}: ")
        or f"{run}: tokenizer folder lacks {name}" in line
    )
    assert words in line and not (tmp_path / "a_mask.png").exists()


def test_mixed_up_tokenizers_of_a_hub_model_are_refused(trained, tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = _copy_run(trained, tmp_path, "snapshot", keep=())
    _foreign_mask_vq(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(snapshot))
    img = _grey_png(tmp_path / "a.png")
    line = cli_error(
        ["predict", str(img), "--text", TEXT, "--model", "someone/tiny", "--device", "cpu"]
    )
    assert line.startswith(
        f"mriseg: error: {snapshot / 'mask_vq.safetensors'}: not the mask tokenizer"
    )


def test_older_runs_and_shipped_copies_still_load(trained, tmp_path):
    """A run without per-file entries (written before them) loads; so does a shipped copy whose
    model.safetensors lost its training-only buffers (written by examples/ship_cxr_model.py,
    which records the new file's fingerprint) and whose config.json was rewritten."""
    import importlib.util

    old = _copy_run(trained, tmp_path, "old", keep=())
    config = json.loads((old / "config.json").read_text())
    del config["tokenizers"]["files"]
    (old / "config.json").write_text(json.dumps(config))
    shipped = _copy_run(trained, tmp_path, "shipped", keep=())
    script = Path(__file__).resolve().parents[1] / "examples" / "ship_cxr_model.py"
    spec = importlib.util.spec_from_file_location("ship_cxr_model", script)
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    ship.strip_training_buffers(trained["run"] / "model.safetensors", shipped)
    with safe_open(str(shipped / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("het_memory.") for k in f.keys())
    config = json.loads((shipped / "config.json").read_text())
    config["data"]["root"] = ["data"]
    (shipped / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    img = _grey_png(tmp_path / "a.png")
    for run in (old, shipped):
        out = tmp_path / f"out-{run.name}"
        cli_ok(
            [
                "predict",
                str(img),
                "--text",
                TEXT,
                "--model",
                str(run),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        assert (out / "a_mask.png").is_file()


# ----------------------------------------------------------------------------- 3. --overwrite


def test_synth_overwrite_refuses_files_it_did_not_write(trained, tmp_path):
    ds = tmp_path / "ds"
    cli_ok(["synth", str(ds), "--n-train", "2", "--n-val", "0", "--n-test", "0", "--size", "32"])
    extras = {
        "notes.txt": "notes.txt",
        "Train_Folder/img/my_scan.png": "Train_Folder/img/my_scan.png",
        "runs/r1/config.json": "runs/",
        "Train_Folder/labelcol/.DS_Store": "Train_Folder/labelcol/.DS_Store",
    }
    for rel, named in extras.items():
        extra = ds / rel
        extra.parent.mkdir(parents=True, exist_ok=True)
        extra.write_text("mine")
        before = _digest(ds)
        line = cli_error(
            [
                "synth",
                str(ds),
                "--n-train",
                "3",
                "--n-val",
                "0",
                "--n-test",
                "0",
                "--size",
                "32",
                "--overwrite",
            ]
        )
        assert f"{ds}: holds {named}, which synth does not write" in line, line
        assert _digest(ds) == before
        extra.unlink()
        shutil.rmtree(ds / "runs", ignore_errors=True)
    cli_ok(
        [
            "synth",
            str(ds),
            "--n-train",
            "3",
            "--n-val",
            "0",
            "--n-test",
            "0",
            "--size",
            "32",
            "--overwrite",
        ]
    )
    assert len(list((ds / "Train_Folder" / "img").iterdir())) == 3
    not_synth = tmp_path / "mine"
    not_synth.mkdir()
    (not_synth / "synth.json").write_text('{"my": "settings"}')
    assert "not a synthetic dataset" in cli_error(
        ["synth", str(not_synth), "--n-train", "2", "--overwrite"]
    )
    assert (not_synth / "synth.json").read_text() == '{"my": "settings"}'


def test_train_overwrite_refuses_a_folder_that_is_not_a_run(trained, tmp_path):
    user = tmp_path / "project"
    user.mkdir()
    (user / "config.json").write_text('{"learning_rate": 0.1}')
    (user / "metrics.json").write_text('{"accuracy": 0.9}')
    before = _digest(user)
    line = cli_error(
        ["train", "--data", str(trained["data"]), "--out", str(user), *TRAIN, "--overwrite"]
    )
    assert "not a mriseg run folder" in line and "config.json (it is not a mriseg config)" in line
    assert _digest(user) == before
    run = _copy_run(trained, tmp_path)
    (run / "notes.txt").write_text("my notes")
    (run / "checkpoints" / "keep.txt").write_text("mine")
    before = _digest(run)
    line = cli_error(
        ["train", "--data", str(trained["data"]), "--out", str(run), *TRAIN, "--overwrite"]
    )
    assert (
        "it holds checkpoints/keep.txt, which train does not write" in line
        and _digest(run) == before
    )
    (run / "checkpoints" / "keep.txt").unlink()
    assert "it holds notes.txt" in cli_error(
        ["train", "--data", str(trained["data"]), "--out", str(run), *TRAIN, "--overwrite"]
    )


def test_train_overwrite_replaces_a_run(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    (run / "README.md").write_text("model card")  # push's file: a run's, and left alone
    old_model = (run / "model.safetensors").read_bytes()
    shard = sorted((run / "cache").glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged cache is rebuilt, not an error
    cli_ok(
        [
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(run),
            *TRAIN,
            "--overwrite",
            "--seed",
            "5",
        ]
    )
    assert (run / "model.safetensors").read_bytes() != old_model
    assert read_config(run)["seed"] == 5 and (run / "README.md").read_text() == "model card"


# ----------------------------------------------------------------------------- 4. masks


def _save_mask(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(np.asarray(values).T, np.eye(4)), path)
    else:
        Image.fromarray(values).save(path)
    return path


def test_binary_masks_of_every_kind_are_read(tmp_path):
    m = np.zeros((6, 8), bool)
    m[1:4, 2:6] = True
    cases = {
        "01.png": m.astype(np.uint8),
        "0255.png": m.astype(np.uint8) * 255,
        "empty.png": np.zeros((6, 8), np.uint8),
        "full.png": np.full((6, 8), 255, np.uint8),
        "01.nii.gz": m.astype(np.int16),
        "0255.nii.gz": m.astype(np.uint8) * 255,
        "float.nii.gz": m.astype(np.float32),
    }
    for name, values in cases.items():
        out = read_mask(_save_mask(tmp_path / name, values), binary=True)
        assert out.dtype == bool and out.sum() in (0, m.sum(), m.size), name
    Image.fromarray(m).save(tmp_path / "bool.png")  # mode "1"
    np.testing.assert_array_equal(read_mask(tmp_path / "bool.png", binary=True), m)


NON_BINARY = {
    "background 3": np.where(np.eye(6, 8, dtype=bool), 255, 3).astype(np.uint8),
    "label map": (np.arange(48).reshape(6, 8) % 3).astype(np.uint8),
    "grey image": np.arange(48, dtype=np.uint8).reshape(6, 8) * 5,
    "0 and 2": (np.eye(6, 8) * 2).astype(np.uint8),
    "0, 1 and 255": np.array([[0, 1, 255] * 2] * 2, np.uint8),
}


@pytest.mark.parametrize("case", list(NON_BINARY))
@pytest.mark.parametrize("suffix", [".png", ".nii.gz"])
def test_non_binary_masks_are_refused_not_thresholded(case, suffix, tmp_path):
    from mrisegcli.io.scan import NonBinaryMaskError

    path = _save_mask(tmp_path / f"m{suffix}", NON_BINARY[case])
    with pytest.raises(NonBinaryMaskError) as err:
        read_mask(path, binary=True)
    assert str(err.value).startswith(f"{path}: not a binary mask") and "0 and 255" in str(err.value)


def test_non_binary_training_masks_are_listed_as_dataset_problems(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    masks = sorted((data / "Train_Folder" / "labelcol").iterdir())[:2]
    for m in masks:  # background 3: thresholded at > 0 it would be all foreground
        arr = np.asarray(Image.open(m))
        Image.fromarray(np.where(arr > 0, 255, 3).astype(np.uint8)).save(m)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), *TRAIN])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if not x.startswith(">")]
    assert lines[0] == "mriseg: error: dataset has 2 problem(s):"
    for m in masks:
        assert any("[non-binary mask]" in x and str(m) in x and "3, 255" in x for x in lines[1:])
    assert not run.exists()


def test_validation_report_lists_non_binary_masks(tmp_path):
    from mrisegcli.data.layouts import Dataset, Sample
    from mrisegcli.data.validate import NON_BINARY as KIND
    from mrisegcli.data.validate import format_problems, validate_dataset

    root = tmp_path / "ds"
    img = _save_mask(root / "a.png", np.full((6, 8), 80, np.uint8))
    labels = _save_mask(root / "labels.nii.gz", (np.arange(48).reshape(6, 8) % 3).astype(np.uint8))
    grey = _save_mask(root / "grey.png", NON_BINARY["grey image"])
    good = _save_mask(root / "good.png", NON_BINARY["0 and 2"] // 2 * 255)
    ds = Dataset(
        root,
        "manifest",
        [
            Sample("n", img, labels, "t", "train"),
            Sample("g", img, grey, "t", "train"),
            Sample("ok", img, good, "t", "train"),
        ],
    )
    problems = validate_dataset(ds)  # headers only for PNG: the NIfTI mask is read and checked
    assert [(p.sample_id, p.kind) for p in problems] == [("n", KIND)]
    assert "not a binary mask: it holds the values 0, 1, 2" in format_problems(problems)
    deep = validate_dataset(ds, deep=True)  # every file decoded: the grey PNG too
    assert [(p.sample_id, p.kind) for p in deep] == [("n", KIND), ("g", KIND)]


@pytest.mark.parametrize("side", ["pred", "gt"])
def test_evaluate_refuses_non_binary_masks(side, tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:6] = 255
    _save_mask(tmp_path / "gt" / "a.png", m)
    _save_mask(tmp_path / "pred" / "a_mask.png", m)
    bad = tmp_path / side / ("a_mask.png" if side == "pred" else "a.png")
    _save_mask(bad, np.where(m > 0, 255, 3).astype(np.uint8))
    line = cli_error(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")])
    assert line.startswith(f"mriseg: error: {bad}: not a binary mask: it holds the values 3, 255")


# ----------------------------------------------------------------------------- 5. config vs weights


def _edit_model(change):
    def damage(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        change(config["model"])
        (run / "config.json").write_text(json.dumps(config))

    return damage


HOSTILE_CONFIGS = {
    "huge dim": (
        _edit_model(lambda m: m["transformer"].update(dim=2**40)),
        "config.model.transformer.dim is",
    ),
    "huge vocabulary": (
        _edit_model(lambda m: m.update(text_vocab_size=10**12)),
        "config.model.text_vocab_size",
    ),
    "huge sequence": (
        _edit_model(lambda m: m["transformer"].update(max_seq_len=10**9)),
        "max_seq_len",
    ),
    "huge grid": (_edit_model(lambda m: m.update(mask_grid=10**6)), "config.model.mask_grid"),
    "endless channel list": (
        _edit_model(lambda m: m["encoder"].update(channels=[8] * 100000)),
        "100000 entries",
    ),
    "huge hard-token memory": (
        _edit_model(lambda m: m.update(het_buckets=9_000_000)),
        "weights do not match config.json: tensor",
    ),
    "other codebook size": (
        _edit_model(lambda m: m.update(mask_codebook_size=600)),
        "weights do not match config.json: tensor tok_emb.weight has shape",
    ),
    "one layer more": (
        _edit_model(lambda m: m["transformer"].update(n_layers=5)),
        "the model needs tensor transformer.layers.4.",
    ),
    "one layer less": (
        _edit_model(lambda m: m["transformer"].update(n_layers=3)),
        "the file has tensor transformer.layers.3.",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_config_is_checked_against_the_weights_before_anything_is_built(case, trained, tmp_path):
    damage, expected = HOSTILE_CONFIGS[case]
    run = _copy_run(trained, tmp_path, keep=())
    damage(run)
    img = _grey_png(tmp_path / "a.png")
    t0 = time.perf_counter()
    line = cli_error(["predict", str(img), "--text", TEXT, "--model", str(run), "--device", "cpu"])
    assert expected in line, line
    assert time.perf_counter() - t0 < 30 and len(line) < 400


# ----------------------------------------------------------------------------- 6. disk full


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_in_an_atomic_write_is_one_line_with_the_free_space(tmp_path, monkeypatch):
    from mrisegcli.io.atomic import DiskFullError

    monkeypatch.setattr(Path, "write_bytes", _enospc)
    target = tmp_path / "out" / "config.json"
    with pytest.raises(DiskFullError) as err:
        atomic_write_text(target, "{}")
    message = str(err.value)
    assert (
        message.startswith(f"{target}: cannot write: no space left on device (")
        and " free in " in message
    )
    assert not list((tmp_path / "out").iterdir())  # no temp file left behind


def test_disk_full_in_a_safetensors_write_and_a_checkpoint(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import mrisegcli.training.checkpoint as ckpt
    from mrisegcli.io.atomic import DiskFullError

    def rust_full(tensors, filename, metadata=None):
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
            'message: "No space left on device" })'
        )

    monkeypatch.setattr(ckpt, "save_file", rust_full)
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "checkpoints" / "step_00000001.safetensors"
    with pytest.raises(DiskFullError, match="no space left on device"):
        ckpt.save_checkpoint(path, model, torch.optim.AdamW(model.parameters()), ckpt.TrainState())
    assert not list(path.parent.iterdir())


def test_disk_full_in_train_and_predict_is_one_line(trained, tmp_path, monkeypatch):
    import mrisegcli.training.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "save_file", _enospc)
    run = tmp_path / "run"
    line = cli_error(
        [
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(run),
            "--tokenizer",
            str(trained["run"]),
            *TRAIN,
        ]
    )
    assert (
        "step_00000002.safetensors: cannot write: no space left on device" in line
        and "free in" in line
    )
    assert not (run / LOCK_NAME).exists()
    monkeypatch.undo()
    real_open = Path.open

    def full_log(self, mode="r", *args, **kwargs):  # the training log is appended, not replaced
        if self.name == "train_log.jsonl" and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_log)
    line = cli_error(
        [
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(tmp_path / "run2"),
            "--tokenizer",
            str(trained["run"]),
            *TRAIN,
        ]
    )
    assert line.startswith(
        f"mriseg: error: {tmp_path / 'run2' / 'train_log.jsonl'}: cannot write: no space left"
    )
    monkeypatch.undo()
    img = _grey_png(tmp_path / "a.png")
    monkeypatch.setattr(Image.Image, "save", _enospc)
    out = tmp_path / "pred"
    line = cli_error(
        [
            "predict",
            str(img),
            "--text",
            TEXT,
            "--model",
            str(trained["run"]),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert line.startswith(
        f"mriseg: error: {out / 'a_mask.png'}: cannot write: no space left on device"
    )
    assert not list(out.iterdir())


def test_outputs_get_the_mode_of_a_normal_write(trained, tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    for p in (
        trained["run"] / "model.safetensors",
        trained["run"] / "mask_vq.safetensors",
        *trained["run"].glob("checkpoints/*.safetensors"),
        *trained["run"].glob("cache/*"),
    ):
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(1)}, str(tmp))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o640


# ----------------------------------------------------------------------------- 7. --resume


def test_resume_applies_the_schedule_options_given(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    cli_ok(
        [
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(run),
            "--resume",
            *TRAIN,
            "--steps",
            "4",
            "--ckpt-every",
            "3",
        ]
    )
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000003.safetensors", "step_00000004.safetensors"]
    train_cfg = read_config(run)["run"]["train"]
    assert (train_cfg["steps"], train_cfg["ckpt_every"]) == (4, 3)
    cli_ok(
        ["train", "--data", str(trained["data"]), "--out", str(run), "--resume", *FAST]
    )  # nothing left
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names


def test_resume_refuses_other_changed_options_by_name(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    before = _digest(run)
    line = cli_error(
        [
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(run),
            "--resume",
            *TRAIN,
            "--batch-size",
            "8",
            "--lr",
            "0.5",
            "--paradigm",
            "next-scale",
        ]
    )
    assert (
        "--batch-size 8 (the run has 4)" in line
        and "--lr 0.5" in line
        and "--paradigm next-scale" in line
    )
    assert "Only --steps, --eval-every, --ckpt-every, --max-minutes, --cpu-bf16 may change" in line
    assert _digest(run) == before
    assert "--tokenizer" in cli_error(
        [
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(run),
            "--resume",
            *TRAIN,
            "--tokenizer",
            str(_swapped_copy(trained, tmp_path)),
        ]
    )
    assert _digest(run) == before


def _swapped_copy(trained, tmp_path: Path) -> Path:
    other = _copy_run(trained, tmp_path, "other-tokenizers", keep=())
    _foreign_mask_vq(other)
    return other


def test_run_stopped_before_its_first_checkpoint_says_overwrite(trained, tmp_path):
    run = _copy_run(trained, tmp_path, keep=("cache",))
    for name in ("model.safetensors", "metrics.json", "train_log.jsonl", "progress.png"):
        (run / name).unlink()
    args = ["train", "--data", str(trained["data"]), "--out", str(run), *TRAIN]
    for extra in ([], ["--resume"]):
        line = cli_error(args + extra)
        assert "start it again with --overwrite" in line and "--resume to continue" not in line
    (run / "config.json").unlink()  # killed even before the config was written
    assert "start it again with --overwrite" in cli_error(args + ["--resume"])
    cli_ok(args + ["--overwrite"])
    assert (run / "checkpoints" / "step_00000002.safetensors").is_file()


# ----------------------------------------------------------------------------- 8. inputs


def test_fifo_input_is_refused_not_read(trained, tmp_path):
    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    with deadline(60):
        line = cli_error(
            [
                "predict",
                str(fifo),
                "--text",
                TEXT,
                "--model",
                str(trained["run"]),
                "--device",
                "cpu",
            ]
        )
        assert (
            line
            == f"mriseg: error: {fifo}: is a FIFO (named pipe), not a file: mriseg reads regular files and folders only"
        )
        with pytest.raises(MrisegError, match="FIFO"):
            read_mask(fifo)
        folder = tmp_path / "folder"
        folder.mkdir()
        os.mkfifo(folder / "pipe.dcm")
        _grey_png(folder / "a.png")
        cli_ok(
            [
                "predict",
                str(folder),
                "--text",
                TEXT,
                "--model",
                str(trained["run"]),
                "--device",
                "cpu",
            ]
        )
    assert (folder / "a_mask.png").is_file()


def test_symlink_loop_and_dangling_link_say_so(trained, tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    for path, words in (
        (tmp_path / "a.png", "symlink loop"),
        (tmp_path / "gone.png", "dangling symlink"),
    ):
        line = cli_error(
            [
                "predict",
                str(path),
                "--text",
                TEXT,
                "--model",
                str(trained["run"]),
                "--device",
                "cpu",
            ]
        )
        assert line.startswith(f"mriseg: error: {path}: {words}")
        with pytest.raises(MrisegError, match=words):
            read_scan(path)


def test_nifti_without_voxels_is_refused(trained, tmp_path):
    for shape in ((0, 4), (4, 4, 0)):
        path = tmp_path / f"empty{len(shape)}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
        line = cli_error(
            [
                "predict",
                str(path),
                "--text",
                TEXT,
                "--model",
                str(trained["run"]),
                "--device",
                "cpu",
            ]
        )
        assert line == f"mriseg: error: {path}: NIfTI image has no voxels (shape {shape})"


def test_nifti_4d_hint_names_no_missing_option(tmp_path):
    from mrisegcli.errors import InputError

    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), path)
    with pytest.raises(InputError) as err:
        read_scan(path)
    assert "4-D with 2 volumes" in str(err.value) and "--frame" not in str(err.value)
    assert "save the volume you want as its own NIfTI file" in str(err.value)


def test_seg_and_output_folder_are_checked_before_the_model_loads(trained, tmp_path):
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")  # loading it would fail: the checks come first
    two_frames = shutil.copy(PYDICOM_FILES / "SC_rgb_rle_2frame.dcm", tmp_path / "two.dcm")
    line = cli_error(
        [
            "predict",
            str(two_frames),
            "--text",
            TEXT,
            "--model",
            str(broken),
            "--out",
            str(tmp_path / "o"),
            "--format",
            "dcm",
            "--device",
            "cpu",
        ]
    )
    assert "DICOM SEG cannot reference this multi-frame" in line and "--format nii" in line
    img = _grey_png(tmp_path / "a.png")
    (tmp_path / "file").write_text("a file")
    line = cli_error(
        [
            "predict",
            str(img),
            "--text",
            TEXT,
            "--model",
            str(broken),
            "--out",
            str(tmp_path / "file" / "sub"),
            "--device",
            "cpu",
        ]
    )
    assert "cannot create folder (Not a directory)" in line
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        line = cli_error(
            [
                "predict",
                str(img),
                "--text",
                TEXT,
                "--model",
                str(broken),
                "--out",
                str(ro),
                "--device",
                "cpu",
            ]
        )
        assert "cannot write here" in line


def test_tokenize_verifies_the_shards_it_reuses(trained, tmp_path):
    tok = tmp_path / "tok"
    args = [
        "tokenize",
        "--data",
        str(trained["data"]),
        "--out",
        str(tok),
        "--size",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--mask-steps",
        "5",
        "--image-steps",
        "5",
    ]
    cli_ok(args)
    shard = sorted((tok / "cache").glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor data: the header still parses
    shard.write_bytes(bytes(data))
    line = cli_error(args)
    assert line.startswith(f"mriseg: error: {shard}: corrupt cache shard") and "--overwrite" in line
    assert "12 encoded" in cli_ok(args + ["--overwrite"]).stdout


def test_schema_as_a_string_is_called_corrupt_not_newer(trained, tmp_path):
    run = _copy_run(trained, tmp_path, keep=("cache",))
    config = json.loads((run / "config.json").read_text())
    for bad in ("1", True, 0, 1.0):
        (run / "config.json").write_text(json.dumps({**config, "schema": bad}))
        with pytest.raises(ConfigError) as err:
            read_config(run)
        assert "corrupt config" in str(err.value) and "upgrade" not in str(err.value), bad
    index = run / "cache" / "index.json"
    (index).write_text(json.dumps({**json.loads(index.read_text()), "version": "1"}))
    from mrisegcli.tokenizers.cache import open_cache

    with pytest.raises(ConfigError) as err:
        open_cache(run / "cache", None, None, create=False)
    assert "must be a whole number" in str(err.value) and "newer" not in str(err.value)


# ----------------------------------------------------------------------------- the table


def test_every_row_of_the_robustness_table_names_tests_that_exist():
    """docs/robustness.md is the list of what is tested: every row names tests, and each named
    test function (and each ``[case]`` of tests/test_robustness.py) exists."""
    import re

    root = Path(__file__).resolve().parents[1]
    table = [
        x
        for x in (root / "docs" / "robustness.md").read_text().splitlines()
        if re.match(r"^\| \d+[a-z]? \|", x)
    ]
    sources = {p.name: p.read_text() for p in (root / "tests").glob("test_*.py")}
    defined = {m for text in sources.values() for m in re.findall(r"^def (test_\w+)", text, re.M)}
    robustness = sources["test_robustness.py"]
    assert len(table) >= 50
    for row in table:
        tests = row.rstrip(" |").rsplit("|", 1)[1]
        names = re.findall(r"\b(test_\w+)\b", tests)
        files = re.findall(r"(test_\w+)\.py", tests)
        cases = (
            re.findall(r"\[([^\]]+)\]", tests.split(";")[0])
            if tests.strip().startswith("R")
            else []
        )
        assert names or files or cases, row
        for name in set(names) - set(files):
            assert name in defined, (name, row[:40])
        for case in cases:  # a parametrised case of tests/test_robustness.py
            assert f'"{case}"' in robustness or f"'{case}'" in robustness, (case, row[:40])


def test_every_train_option_that_sets_the_config_is_checked_on_resume():
    """A --resume refuses a changed setting only if OPTION_FIELDS knows it: every train option
    except those naming files (--init-from refuses --resume itself), devices and output is
    there (one row of settings.SETTINGS makes both the option and its entry)."""
    import typer.main

    from mrisegcli.cli import app
    from mrisegcli.runinfo import OPTION_FIELDS

    train = typer.main.get_command(app).commands["train"]
    not_config = {
        "data",
        "out_dir",
        "layout",
        "tokenizer",
        "init_from",
        "cache",
        "device",
        "workers",
        "texts",
    }
    not_config |= {"resume", "overwrite", "quiet", "json_out"}
    options = {p.name for p in train.params} - not_config
    assert options == set(OPTION_FIELDS)


# ----------------------------------------------------------------------------- 7. second round:
# special output files, what --overwrite may delete, one mask per prompt, weights, DICOM


def _device_node(tmp_path: Path, name: str, minor: int) -> Path:
    """A character device like /dev/full (minor 7) or /dev/null (3), made in ``tmp_path`` when
    this user may (root): the system's own would be replaced by a broken writer. A normal user
    gets /dev's, which it cannot replace."""
    node = tmp_path / name
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, minor))
        return node
    except OSError:
        if os.geteuid() == 0:
            pytest.skip("cannot make device nodes here")
        return Path("/dev") / name


def _evaluate_args(tmp_path: Path) -> list[str]:
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:6] = 255
    _save_mask(tmp_path / "gt" / "a.png", m)
    _save_mask(tmp_path / "pred" / "a_mask.png", m)
    return ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]


def test_special_output_files_are_written_through_or_refused_never_replaced(tmp_path):
    args = _evaluate_args(tmp_path)
    full = _device_node(tmp_path, "full", 7)
    line = cli_error([*args, "--csv", str(full), "--overwrite"])
    assert line == (
        f"mriseg: error: {full}: cannot write: no space left on device (it is a character device)"
    )
    assert full.is_char_device()
    null = _device_node(tmp_path, "null", 3)
    cli_ok([*args, "--csv", str(null)])  # written through: nothing replaced, no --overwrite
    assert null.is_char_device()
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with deadline(30):
        line = cli_error([*args, "--csv", str(fifo), "--overwrite"])  # no reader: never blocks
        assert "is a FIFO (named pipe) that nothing reads from" in line
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            cli_ok([*args, "--csv", str(fifo)])
            os.set_blocking(reader, True)
            got = os.read(reader, 1 << 16).decode()
        finally:
            os.close(reader)
    assert got.startswith("name,dice,iou") and stat.S_ISFIFO(fifo.stat().st_mode)
    sock_path = tmp_path / "s.csv"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
        line = cli_error([*args, "--csv", str(sock_path), "--overwrite"])
    finally:
        sock.close()
    assert "is a socket, not a file: refusing to write to it" in line
    assert stat.S_ISSOCK(sock_path.lstat().st_mode)
    stdout = tmp_path / "stdout.txt"  # mriseg ... --csv /dev/stdout > stdout.txt
    with stdout.open("wb") as f:
        run = subprocess.run([sys.executable, "-m", "mrisegcli", *args, "--csv", "/dev/stdout"],
                             stdout=f, stderr=subprocess.PIPE, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert stdout.read_text().startswith("name,dice,iou") and "a,1.0,1.0" in stdout.read_text()
    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    target.write_text("old")
    link.symlink_to(target)
    assert "already exist" in cli_error([*args, "--csv", str(link)])
    cli_ok([*args, "--csv", str(link), "--overwrite"])
    assert link.is_symlink() and target.read_text().startswith("name,dice,iou")


def test_draft_heads_replaces_only_what_it_wrote(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "runs", "run", keep=())
    base = ["draft-heads", "--model", str(run), "--data", str(trained["data"])]
    base += ["--heads", "2", "--steps", "1", "--max-cases", "2", "--device", "cpu"]
    before, source = _digest(tmp_path / "runs"), _digest(run)
    line = cli_error([*base, "--out", str(tmp_path / "runs"), "--overwrite"])
    assert f"{tmp_path / 'runs'}: holds the source run {run}" in line
    line = cli_error([*base, "--out", str(run / "fast"), "--overwrite"])
    assert "is inside the source run" in line
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    line = cli_error([*base, "--out", str(mine), "--overwrite"])
    assert "not a mriseg run folder: it holds thesis.tex, which draft-heads does not write" in line
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert _digest(tmp_path / "runs") == before
    fast = tmp_path / "fast"
    cli_ok([*base, "--out", str(fast)])
    cli_ok([*base, "--out", str(fast), "--overwrite"])  # its own output: replaced
    recorded = read_config(fast)["weights"]  # the new file's fingerprint, not the source's
    assert recorded["sha256"] == _sha256(fast / "model.safetensors")
    assert _digest(run) == source


def test_train_overwrite_keeps_files_named_like_a_runs_in_a_folder_without_config(
    trained, tmp_path
):
    user = tmp_path / "plots"
    user.mkdir()
    for name in ("progress.png", "model.safetensors", "README.md"):
        (user / name).write_bytes(b"mine")
        before = _digest(user)
        line = cli_error(
            ["train", "--data", str(trained["data"]), "--out", str(user), *TRAIN, "--overwrite"]
        )
        assert f"it holds {name} (and no config.json of a mriseg run)" in line, line
        assert _digest(user) == before
        (user / name).unlink()


def test_one_image_on_several_prompt_rows_gets_one_mask_per_prompt(trained, tmp_path):
    from mrisegcli.workflow.predict import plan_outputs

    (tmp_path / "in").mkdir()
    img = _grey_png(tmp_path / "in" / "a.png")
    prompts = tmp_path / "p.csv"
    rows = ["left lung", "right lung", "Left lung!", "lower right lung"]
    prompts.write_text("path,text\n" + "".join(f"{img},{t}\n" for t in rows))
    out = tmp_path / "out"
    args = ["predict", "--prompts", str(prompts), "--model", str(trained["run"])]
    args += ["--device", "cpu", "--json"]
    results = [json.loads(x) for x in cli_ok([*args, "--out", str(out)]).stdout.splitlines()]
    names = [Path(r["outputs"]["mask"]).name for r in results]
    assert names == [
        "a_left-lung-row1_mask.png",
        "a_right-lung_mask.png",
        "a_left-lung-row3_mask.png",
        "a_lower-right-lung_mask.png",
    ]
    assert [r["text"] for r in results] == rows
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    (out / names[1]).write_bytes(b"kept")  # every name is checked before the first is written
    line = cli_error([*args[:-1], "--out", str(out)])
    assert "4 output file(s) already exist" in line and (out / names[1]).read_bytes() == b"kept"
    cli_ok(args[:-1])  # beside the image; the masks are not inputs of a later folder run
    again = cli_ok(["predict", str(tmp_path / "in"), "--text", TEXT, "--model",
                    str(trained["run"]), "--out", str(tmp_path / "o2"), "--device", "cpu",
                    "--json"])  # fmt: skip
    assert [json.loads(x)["input"] for x in again.stdout.splitlines()] == [str(img)]
    plans = plan_outputs([img, img], tmp_path / "o3", texts=["两肺", "lung"])  # no ASCII left
    assert [p.outputs["mask"].name for p in plans] == ["a_row1_mask.png", "a_lung_mask.png"]


def test_resume_refuses_other_data(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    other = tmp_path / "other"
    cli_ok(["synth", str(other), "--n-train", "8", "--n-val", "2", "--n-test", "2", "--size",
            "32", "--seed", "7"])  # fmt: skip
    resume = ["--out", str(run), *TRAIN, "--resume", "--steps", "3"]
    line = cli_error(["train", "--data", str(other), *resume])
    assert f"--data {other} (the run was trained on {trained['data']})" in line, line
    assert read_config(run)["run"]["train"]["steps"] == 2
    same = os.path.relpath(trained["data"])  # the same data, spelled another way
    cli_ok(["train", "--data", same, *resume])
    assert read_config(run)["run"]["train"]["steps"] == 3


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_are_fingerprinted_and_non_finite_weights_refused(trained, tmp_path):
    from mrisegcli.shipped import SHIPPED_DIR

    img = _grey_png(tmp_path / "a.png")

    def predict(run: Path) -> list[str]:
        return ["predict", str(img), "--text", TEXT, "--model", str(run), "--out",
                str(tmp_path / f"out-{run.name}"), "--device", "cpu"]  # fmt: skip

    damaged = _copy_run(trained, tmp_path, "damaged", keep=())
    raw = bytearray((damaged / "model.safetensors").read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4000] = np.random.default_rng(0).bytes(4000)
    (damaged / "model.safetensors").write_bytes(bytes(raw))
    line = cli_error(predict(damaged))
    assert (
        f"{damaged / 'model.safetensors'}: not the weights this model's config.json records" in line
    )
    recorded = read_config(trained["run"])["weights"]
    model = trained["run"] / "model.safetensors"
    assert recorded == {"file": "model.safetensors", "sha256": _sha256(model),
                        "bytes": model.stat().st_size}  # fmt: skip
    from mrisegcli.weights import save_weights

    with safe_open(str(model), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
    tensors[name].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    nan = _copy_run(trained, tmp_path, "nan", keep=())
    save_weights(tensors, nan, metadata=meta)  # the fingerprint fits: the values do not
    line = cli_error(predict(nan))
    assert (
        f"weights hold NaN or infinite values (2 of {tensors[name].numel()} in tensor {name})"
        in line
    )
    for run in (damaged, nan):  # a run written before weights were recorded
        config = json.loads((run / "config.json").read_text())
        del config["weights"]
        (run / "config.json").write_text(json.dumps(config))
    assert "NaN or infinite" in cli_error(predict(nan))  # refused whatever the config says
    older = _copy_run(trained, tmp_path, "older", keep=())
    config = json.loads((older / "config.json").read_text())
    del config["weights"]
    (older / "config.json").write_text(json.dumps(config))
    cli_ok(predict(older))
    shipped = SHIPPED_DIR / "chest-xray"
    recorded = json.loads((shipped / "config.json").read_text())["weights"]
    assert recorded["sha256"] == _sha256(shipped / "model.safetensors")


def _anonymised_radiograph(path: Path, how: str) -> Path:
    """A DX radiograph (pydicom's CT_small pixels) stripped as anonymisers strip them: type 2
    attributes removed, emptied, or a basic-profile pass (those and more removed, private tags
    dropped, UIDs replaced)."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality = "DX"
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
               "SliceThickness", "FrameOfReferenceUID", "KVP"):  # fmt: skip
        ds.pop(kw, None)
    type2 = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
             "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"]  # fmt: skip
    if how == "emptied":
        for kw in type2:
            setattr(ds, kw, "")
    else:
        more = ["SeriesNumber", "InstanceNumber", "Manufacturer", "InstitutionName",
                "ContentDate", "ContentTime", "AcquisitionDate", "StudyDescription",
                "SeriesDescription", "PatientAge"] if how == "basic profile" else []  # fmt: skip
        for kw in type2 + more:
            ds.pop(kw, None)
    if how == "basic profile":
        ds.remove_private_tags()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path)
    return path


@pytest.mark.parametrize("how", ["type 2 removed", "emptied", "basic profile"])
def test_anonymised_radiograph_gets_a_dicom_seg(how, trained, tmp_path):
    src = _anonymised_radiograph(tmp_path / "anon.dcm", how)
    before = src.read_bytes()
    out = tmp_path / "out"
    cli_ok(["predict", str(src), "--text", TEXT, "--model", str(trained["run"]), "--out",
            str(out), "--device", "cpu"])  # fmt: skip
    seg = pydicom.dcmread(out / "anon_mask.dcm")
    source = pydicom.dcmread(src)
    assert seg.Modality == "SEG" and src.read_bytes() == before
    for kw in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName"):
        assert kw in seg and seg.data_element(kw).value in ("", None), kw
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def _seg_of_two_segments(path: Path, tmp_path: Path) -> Path:
    """A DICOM SEG of two segments over one radiograph without a frame of reference: two
    frames, which the SEG planning would have taken for slices."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    src = pydicom.dcmread(_anonymised_radiograph(tmp_path / "src.dcm", "emptied"))
    described = [
        hd.seg.SegmentDescription(
            segment_number=i, segment_label=f"s{i}", segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i in (1, 2)
    ]  # fmt: skip
    pixels = np.zeros((1, src.Rows, src.Columns, 2), np.uint8)
    pixels[0, 10:20, 10:20, 0] = pixels[0, 30:40, 30:40, 1] = 1
    seg = hd.seg.Segmentation(
        source_images=[src], pixel_array=pixels, segment_descriptions=described,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, series_instance_uid=hd.UID(),
        series_number=2, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1",
    )  # fmt: skip
    seg.save_as(path)
    return path


@pytest.mark.parametrize("fmt", ["auto", "dcm", "nii", "png"])
def test_a_dicom_seg_given_as_input_is_called_a_segmentation(fmt, tmp_path):
    seg = _seg_of_two_segments(tmp_path / "lungs_seg.dcm", tmp_path)
    broken = tmp_path / "broken-run"  # loading it would fail: the check comes first
    broken.mkdir()
    line = cli_error(["predict", str(seg), "--text", TEXT, "--model", str(broken), "--out",
                      str(tmp_path / "o"), "--format", fmt, "--device", "cpu"])  # fmt: skip
    assert line == (
        f"mriseg: error: {seg}: is a DICOM Segmentation (a mask), not an image to segment: give "
        "the image it was made from"
    )
    assert not (tmp_path / "o").exists()


def test_prompts_that_are_not_utf8_are_named_as_such(tmp_path):
    img = _grey_png(tmp_path / "a.png")
    broken = tmp_path / "broken-run"
    broken.mkdir()
    latin1 = tmp_path / "p.csv"
    latin1.write_bytes(f"path,text\n{img},l\xe9sion\n".encode("latin-1"))
    line = cli_error(["predict", "--prompts", str(latin1), "--model", str(broken)])
    assert line.startswith(f"mriseg: error: {latin1}: is not UTF-8 text (byte 0xe9 at offset")
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"path": str(img), "text": "left \udcff lung"}) + "\n")
    line = cli_error(["predict", "--prompts", str(lines), "--model", str(broken)])
    assert "line 1 (row 1): the text is not valid UTF-8 text (the byte 0xff at character 6)" in line


def test_synth_into_a_folder_that_cannot_be_made_is_one_line(tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    line = cli_error(["synth", "/proc/mriseg-test", "--n-train", "2", "--size", "32"])
    assert (
        line == "mriseg: error: /proc/mriseg-test: cannot create folder (No such file or directory)"
    )
    (tmp_path / "file").write_text("a file")
    line = cli_error(["synth", str(tmp_path / "file" / "ds"), "--n-train", "2", "--size", "32"])
    assert (
        line == f"mriseg: error: {tmp_path / 'file' / 'ds'}: cannot create folder (Not a directory)"
    )


@pytest.fixture(scope="module")
def segmenter(trained):
    from mrisegcli.workflow.segmenter import load_segmenter

    return load_segmenter(trained["run"], torch.device("cpu"))


def test_segment_takes_one_path_or_array_as_well_as_lists(segmenter, tmp_path):
    png = _grey_png(tmp_path / "a.png", (40, 36))
    rng = np.random.default_rng(0)
    for images in (str(png), png, rng.random((30, 20)), rng.random((30, 20)) > 0.5,
                   (rng.random((30, 20)), str(png))):  # fmt: skip
        masks = segmenter.segment(images, "left lung")
        n = len(images) if isinstance(images, tuple) else 1
        assert len(masks) == n and all(m.dtype == bool and m.ndim == 2 for m in masks)
    assert segmenter.segment(str(png), "left lung")[0].shape == (40, 36)
    assert segmenter.segment(rng.random((30, 20)), ["left lung"])[0].shape == (30, 20)


BAD_SEGMENT_ARGS = {
    "None as text": (lambda: [np.zeros((8, 8))], None, TypeError, "texts must be a string"),
    "int as text": (lambda: [np.zeros((8, 8))], 5, TypeError, "texts must be a string"),
    "None in the texts": (lambda: [np.zeros((8, 8))], [None], TypeError, r"texts\[0\] is NoneType"),
    "empty text": (lambda: [np.zeros((8, 8))], " ", MrisegError, "texts is empty"),
    "no images": (lambda: [], "lung", ValueError, "no images"),
    "empty array": (lambda: np.array([]), "lung", ValueError, r"array of shape \(0,\)"),
    "0x0 array": (lambda: [np.zeros((0, 0))], "lung", ValueError, r"images\[0\] is empty"),
    "colour array": (lambda: [np.zeros((8, 8, 3))], "lung", ValueError, r"shape \(8, 8, 3\)"),
    "stack of slices": (lambda: np.zeros((2, 8, 8)), "lung", ValueError, "list of them"),
    "None as image": (lambda: [None], "lung", TypeError, r"images\[0\] is NoneType"),
    "int as images": (lambda: 3, "lung", TypeError, "images must be a path, a 2-D array"),
    "array of strings": (lambda: [np.full((4, 4), "x")], "lung", TypeError, "numbers or booleans"),
    "more texts": (lambda: [np.zeros((8, 8))], ["a", "b"], ValueError, "1 images but 2 texts"),
}


@pytest.mark.parametrize("case", list(BAD_SEGMENT_ARGS))
def test_segment_refuses_bad_arguments_saying_what_it_expects(case, segmenter):
    images, texts, error, match = BAD_SEGMENT_ARGS[case]
    with pytest.raises(error, match=match):
        segmenter.segment(images(), texts)


def test_tokenize_refused_for_a_grey_mask_leaves_no_tokenizer_files(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    grey = sorted((data / "Test_Folder" / "labelcol").iterdir())[0]
    shape = np.asarray(Image.open(grey)).shape
    Image.fromarray((np.arange(np.prod(shape)) % 200).reshape(shape).astype(np.uint8)).save(grey)
    args = ["tokenize", "--data", str(data), "--size", "32", "--mask-steps", "5",
            "--image-steps", "5", "--device", "cpu", "--workers", "0"]  # fmt: skip
    line = cli_error([*args, "--out", str(tmp_path / "tok")])
    assert "dataset has 1 problem(s)" in line
    assert not (tmp_path / "tok").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cli_error([*args, "--out", str(mine)])
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
