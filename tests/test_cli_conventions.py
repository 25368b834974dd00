"""Command-line conventions, exercised through the real ``mriseg`` app on tiny 64 px data.

Exit codes: 2 for every usage error (bad option value, missing or clashing options), 1 for a
run that fails. Before these tests, a bad value of a choice-like option exited 1 for most
options (validated deep inside the run) and 2 for a few (validated in the CLI):

    case                                          before  after
    predict ... --format jpg                         1      2
    predict ... --device tpu                         1      2
    train ... --preset huge                          1      2
    train ... --paradigm foo                         1      2
    train ... --device tpu                           1      2
    train ... --layout foo                           1      2
    train ... --image-input foo                      2      2
    train ... --prefix-attention foo                 2      2
    tokenize ... --preset huge / --paradigm foo      1      2
    synth OUT --mode foo                             2      2
    evaluate ... --split foo                         1      2
    evaluate ... --text-ablation foo                 1      2
    predict ... --device cuda:1 (valid form)         1      1 (no CUDA device here)
    train --data D (no --out)                        2      0 (new runs/D-<time> folder)
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mrisegcli import cli_support
from mrisegcli.cli import app

runner = CliRunner()
SIZE = "64"
FAST_FIT = ["--mask-steps", "20", "--image-steps", "10"]
FAST_TRAIN = [
    "--preset",
    "tiny",
    "--size",
    SIZE,
    "--batch-size",
    "8",
    "--eval-every",
    "2",
    "--device",
    "cpu",
    "--workers",
    "0",
]


def invoke(args: list[str], ok: bool = True, **kw):
    result = runner.invoke(app, args, **kw)
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mriseg: error: "), lines[0]
    return lines[0]


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conv") / "phantoms"
    invoke(
        [
            "synth",
            str(root),
            "--n-train",
            "16",
            "--n-val",
            "4",
            "--n-test",
            "4",
            "--size",
            SIZE,
            "--quiet",
        ]
    )
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """(run folder, train --json object, stderr of the run)."""
    run = tmp_path_factory.mktemp("conv_runs") / "run"
    r = invoke(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--steps",
            "4",
            *FAST_FIT,
            *FAST_TRAIN,
            "--json",
        ]
    )
    return run, json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.fixture()
def images(data, tmp_path) -> list[Path]:
    """Two test images copied into the test's own folder."""
    srcs = sorted((data / "Test_Folder" / "img").iterdir())[:2]
    dst = []
    for i, src in enumerate(srcs):
        p = tmp_path / f"case{i + 1}.png"
        p.write_bytes(src.read_bytes())
        dst.append(p)
    return dst


# ------------------------------------------------------------------------- 1. usage errors: exit 2
USAGE_CASES = [
    (
        ["predict", "x.png", "--text", "t", "--format", "jpg"],
        "--format must be",
        ["auto", "png", "nii", "dcm"],
    ),
    (["predict", "x.png", "--text", "t", "--device", "tpu"], "--device must be", ["cuda:N", "mps"]),
    (["train", "--data", "d", "--preset", "huge"], "--preset must be", ["cpu", "cxr", "tiny"]),
    (
        ["train", "--data", "d", "--paradigm", "foo"],
        "--paradigm must be",
        ["next-token", "next-scale"],
    ),
    (["train", "--data", "d", "--device", "gpu"], "--device must be", ["cuda:N"]),
    (
        ["train", "--data", "d", "--layout", "foo"],
        "--layout must be",
        ["lvit", "qata-v2", "manifest"],
    ),
    (
        ["train", "--data", "d", "--image-input", "foo"],
        "--image-input must be",
        ["codes", "pixels"],
    ),
    (
        ["train", "--data", "d", "--prefix-attention", "foo"],
        "--prefix-attention must be",
        ["bidirectional", "causal"],
    ),
    (["tokenize", "--data", "d", "--out", "o", "--preset", "huge"], "--preset must be", ["cxr"]),
    (
        ["tokenize", "--data", "d", "--out", "o", "--paradigm", "foo"],
        "--paradigm must be",
        ["next-scale"],
    ),
    (["synth", "o", "--mode", "foo"], "--mode must be", ["refer", "describe"]),
    (
        ["evaluate", "--model", "m", "--data", "d", "--split", "foo"],
        "--split must be",
        ["train", "val", "test"],
    ),
    (
        ["evaluate", "--model", "m", "--data", "d", "--text-ablation", "foo"],
        "--text-ablation must be",
        ["empty", "shuffle"],
    ),
    (
        ["evaluate", "--model", "m", "--data", "d", "--device", "cuda:x"],
        "--device must be",
        ["cuda:N"],
    ),
    (["predict", "x.png", "--prompts", "p.csv"], "--prompts", ["--text"]),
    (["predict", "--prompts", "p.csv", "--text", "t"], "--prompts", ["--text"]),
    (["predict", "x.png"], "--text", ["--prompts"]),
    (["predict"], "missing argument", ["--prompts"]),
    (["train", "--data", "d", "--resume"], "--resume", ["--out"]),
]


@pytest.mark.parametrize(
    "args, option, listed", USAGE_CASES, ids=[" ".join(c[0]) for c in USAGE_CASES]
)
def test_usage_errors_exit_2_on_one_line(args, option, listed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    line = one_error_line(result)
    assert option in line and f"(see 'mriseg {args[0]} --help')" in line, line
    for value in listed:
        assert value in line, (value, line)
    assert "Value error" not in line and "Traceback" not in result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []  # refused before anything ran


def test_bad_choice_from_the_console_script_exits_2(tmp_path):
    import subprocess
    import sys

    script = Path(sys.executable).with_name("mriseg")
    proc = subprocess.run(
        [str(script), "predict", "x.png", "--text", "t", "--format", "jpg"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == "mriseg: error: --format must be auto, png, nii or dcm, not 'jpg' (see 'mriseg predict --help')\n"
    )


def _metavar(help_text: str, option: str) -> set[str]:
    m = re.search(re.escape(option) + r" <([^>]*)>", help_text)
    assert m, (option, help_text)
    return set(m.group(1).split("|"))


def test_help_lists_the_allowed_values():
    from mrisegcli.config import RUN_PRESETS
    from mrisegcli.data.layouts import LAYOUTS, SPLITS
    from mrisegcli.workflow.evaluate_model import ABLATIONS
    from mrisegcli.workflow.predict import FORMATS

    helps = {
        c: invoke([c, "--help"]).stdout
        for c in ("train", "tokenize", "predict", "evaluate", "synth")
    }
    for command in ("train", "tokenize"):
        assert _metavar(helps[command], "--preset") == set(RUN_PRESETS)  # cpu and cxr included
        assert _metavar(helps[command], "--paradigm") == {"next-token", "next-scale"}
        assert _metavar(helps[command], "--layout") == set(LAYOUTS)
    assert _metavar(helps["train"], "--image-input") == {"codes", "pixels"}
    assert _metavar(helps["train"], "--prefix-attention") == {"bidirectional", "causal"}
    assert _metavar(helps["predict"], "--format") == set(FORMATS)
    assert _metavar(helps["evaluate"], "--split") == set(SPLITS)
    assert _metavar(helps["evaluate"], "--text-ablation") == set(ABLATIONS)
    assert _metavar(helps["synth"], "--mode") == {"refer", "describe"}
    for command in ("train", "tokenize", "predict", "evaluate"):
        assert _metavar(helps[command], "--device") == {"auto", "cpu", "cuda", "cuda:N", "mps"}
        assert "<str>" not in helps[command].split("--device")[1][:40]


def test_help_shows_square_brackets_literally():
    for command in ("predict", "evaluate"):
        assert "user/repo[@revision]" in flat(invoke([command, "--help"]).stdout)


# ------------------------------------------------------------------------------ 2. --device cuda:N
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_forms_are_accepted_and_fail_clearly_without_cuda(device, data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = invoke(
        ["tokenize", "--data", str(data), "--out", str(tmp_path / "o"), "--device", device],
        ok=False,
    )
    assert r.exit_code == 1
    assert (
        one_error_line(r)
        == f"mriseg: error: --device {device}: no CUDA device is available (use --device cpu)"
    )


def test_cuda_index_out_of_range_is_a_run_error(monkeypatch):
    import torch

    from mrisegcli.devices import torch_device
    from mrisegcli.errors import MrisegError
    from mrisegcli.settings import SettingError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert torch_device("cuda:1") == torch.device("cuda", 1)
    assert torch_device("CUDA") == torch.device("cuda")
    with pytest.raises(
        MrisegError, match=r"--device cuda:2: there is no CUDA device 2; this machine has 2"
    ):
        torch_device("cuda:2")
    with pytest.raises(SettingError):
        torch_device("tpu")  # library callers too get the usage error (exit 2 in a command)


# -------------------------------------------------------------- 3./8./9. train: run folder, curves
def test_train_json_curves_and_tokenizer_warning(trained):
    run, summary, stderr = trained
    assert summary["run_dir"] == str(run) and summary["steps"] == 4
    assert set(summary) >= {"run_dir", "steps", "best_val_dice", "best_step", "seconds", "curves"}
    assert summary["curves"] == str(run / "progress.png")
    picture = Image.open(run / "progress.png")
    assert picture.format == "PNG" and picture.size == (960, 540)
    pixels = {tuple(p) for p in np.asarray(picture.convert("RGB")).reshape(-1, 3)}
    from mrisegcli.training.curves import DICE_COLOUR, LOSS_COLOUR

    assert LOSS_COLOUR in pixels and DICE_COLOUR in pixels  # both curves drawn
    dice = json.loads((run / "metrics.json").read_text())["tokenizers"]["mask_vq"]["recon_dice"]
    warned = "mriseg: warning: the mask tokenizer reconstructs held-out masks with Dice" in stderr
    assert warned == (dice < 0.8), (dice, stderr)
    if warned:
        assert f"Dice {dice:.2f} < 0.8; fit longer with --mask-steps" in stderr


def test_train_without_out_makes_a_new_run_folder(data, trained, tmp_path, monkeypatch):
    run, _, _ = trained
    monkeypatch.chdir(tmp_path)
    r = invoke(
        ["train", "--data", str(data) + "/", "--tokenizer", str(run), "--steps", "2", *FAST_TRAIN]
    )
    first = r.stderr.splitlines()[0]
    m = re.fullmatch(r"run folder: (runs/phantoms-\d{8}-\d{6})", first)
    assert m, r.stderr
    folder = tmp_path / m.group(1)
    assert (folder / "model.safetensors").is_file() and (folder / "progress.png").is_file()
    assert (
        f"run {m.group(1)}" in r.stdout
        and f"training curves: {m.group(1)}/progress.png" in r.stdout
    )


def test_default_run_folders_never_clobber(data, tmp_path, monkeypatch):
    import torch

    from mrisegcli.training.distributed import DistInfo
    from mrisegcli.workflow.commands import new_run_dir

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(dt, "datetime", Frozen)
    made = [
        new_run_dir([data], DistInfo(), torch.device("cpu"), root=tmp_path / "runs")
        for _ in range(3)
    ]
    assert [p.name for p in made] == [
        "phantoms-20260102-030405",
        "phantoms-20260102-030405-2",
        "phantoms-20260102-030405-3",
    ]
    assert all(p.is_dir() for p in made)


def test_failed_train_leaves_no_empty_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    r = invoke(["train", "--data", "empty", *FAST_TRAIN], ok=False)
    assert r.exit_code == 1 and r.stderr.splitlines()[-1].startswith("mriseg: error: ")
    assert not any((tmp_path / "runs").iterdir())


def test_resume_redraws_the_curves(data, trained):
    run, _, _ = trained
    (run / "progress.png").unlink()
    r = invoke(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--resume",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--json",
            "--quiet",
        ]
    )
    assert json.loads(r.stdout)["curves"] == str(run / "progress.png")
    assert (run / "progress.png").is_file()


def test_curves_read_the_last_row_of_a_repeated_step(tmp_path):
    from mrisegcli.training.curves import read_curves, write_progress_png

    log = tmp_path / "train_log.jsonl"
    log.write_text(
        "\n".join(
            [
                '{"step": 10, "split": "train", "loss": 3.0}',
                '{"step": 10, "split": "val", "dice": 0.2}',
                '{"step": 20, "split": "train", "loss": 2.0}',
                '{"step": 20, "split": "train", "loss": 1.5}',  # resumed from step 10: the later row wins
                '{"step": 20, "split": "val", "dice": NaN}',
                '{"step": 30, "split": "va',  # a crash mid-line
            ]
        )
        + "\n"
    )
    assert read_curves(log) == ([(10, 3.0), (20, 1.5)], [(10, 0.2)])
    assert write_progress_png(tmp_path) == tmp_path / "progress.png"
    assert write_progress_png(tmp_path / "no-such-run") is None  # never fails a finished training


def test_weak_tokenizer_warning_text(capsys):
    cli_support.warn_weak_parts(
        {"mask_vq": {"recon_dice": 0.42, "n_heldout": 3}, "image_vq": {"psnr": 9.0}}
    )
    assert capsys.readouterr().err.strip() == (
        "mriseg: warning: the mask tokenizer reconstructs held-out masks with Dice 0.42 < 0.8; "
        "fit longer with --mask-steps"
    )
    cli_support.warn_weak_parts(
        {"multiscale": {"recon_dice": 0.5, "n_heldout": 0}, "mask_vq": {"recon_dice": 0.9}}
    )
    err = capsys.readouterr().err
    assert (
        "multi-scale mask tokenizer reconstructs its training masks" in err
        and "--multiscale-steps" in err
    )
    assert "the mask tokenizer" not in err


def test_weak_presence_head_warning_reads_the_run_folder(tmp_path, capsys):
    shipped = Path(cli_support.__file__).parent / "shipped" / "brain-mri" / "config.json"
    config = json.loads(shipped.read_text())
    config["presence"]["report"]["val"].update(sensitivity=0.5, threshold=0.9, auroc=0.9)
    (tmp_path / "config.json").write_text(json.dumps(config))
    cli_support.warn_weak_parts({}, tmp_path)
    assert "presence head finds 50% of the val findings" in capsys.readouterr().err
    cli_support.warn_weak_parts({}, tmp_path / "no-run")  # nothing to read: nothing said
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------ 4. --quiet, --json
def test_synth_quiet_and_json(tmp_path):
    r = invoke(
        [
            "synth",
            str(tmp_path / "d"),
            "--n-train",
            "2",
            "--n-val",
            "0",
            "--n-test",
            "0",
            "--size",
            SIZE,
            "--quiet",
            "--json",
        ]
    )
    assert r.stderr == ""
    obj = json.loads(r.stdout)
    assert obj["cases"] == 2 and obj["out"] == str(tmp_path / "d") and obj["size"] == 64
    loud = invoke(
        [
            "synth",
            str(tmp_path / "e"),
            "--n-train",
            "2",
            "--n-val",
            "0",
            "--n-test",
            "0",
            "--size",
            SIZE,
        ]
    )
    assert "synthesising" in loud.stderr


def test_tokenize_quiet_json_and_warning(data, tmp_path):
    r = invoke(
        [
            "tokenize",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "tok"),
            "--size",
            SIZE,
            "--mask-steps",
            "2",
            "--image-steps",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--quiet",
            "--json",
        ]
    )
    obj = json.loads(r.stdout)
    assert obj["encoded"] == 24 and obj["cache"] == str(tmp_path / "tok" / "cache")
    dice = obj["tokenizers"]["mask_vq"]["recon_dice"]
    lines = r.stderr.splitlines()
    assert all(line.startswith("mriseg: warning: ") for line in lines), r.stderr  # no stage lines
    assert (len(lines) == 1) == (dice < 0.8)


def test_train_quiet_prints_no_stage_lines(data, trained, tmp_path):
    run, _, _ = trained
    r = invoke(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "q"),
            "--tokenizer",
            str(run),
            "--steps",
            "2",
            *FAST_TRAIN,
            "--quiet",
        ]
    )
    assert r.stderr == ""
    assert r.stdout.startswith("trained 2 steps")


def test_presets_json_lists_every_preset():
    from mrisegcli.config import RUN_PRESETS

    rows = [json.loads(line) for line in invoke(["presets", "--json"]).stdout.splitlines()]
    names = [row["name"] for row in rows]
    assert set(names) <= set(RUN_PRESETS) and "tiny" in names
    assert all(row["params"] > 0 for row in rows)


# ------------------------------------------------------------------ 5./6. predict --prompts, keep going
def _spy(monkeypatch) -> tuple[list[str], list[int]]:
    """Record the texts the model sees and how often it is loaded."""
    import mrisegcli.workflow.segmenter as segmenter
    from mrisegcli.workflow.predict import SegmenterSlices

    texts, loads = [], []
    real_call, real_load = SegmenterSlices.__call__, segmenter.load_segmenter

    def call(self, images, text):
        texts.append(text)
        return real_call(self, images, text)

    def load(*a, **kw):
        loads.append(1)
        return real_load(*a, **kw)

    monkeypatch.setattr(SegmenterSlices, "__call__", call)
    monkeypatch.setattr(segmenter, "load_segmenter", load)
    return texts, loads


def test_predict_prompts_csv_one_line_per_row_model_loaded_once(
    trained, images, tmp_path, monkeypatch
):
    run, _, _ = trained
    monkeypatch.chdir(tmp_path)  # paths in the prompts file are relative to the current folder
    texts, loads = _spy(monkeypatch)
    (tmp_path / "prompts.csv").write_text(
        'path,text\ncase2.png,"Bilateral pulmonary infection, two infected areas"\n'
        "case1.png,Unilateral pulmonary infection\n"
    )
    r = invoke(
        [
            "predict",
            "--prompts",
            "prompts.csv",
            "--model",
            str(run),
            "--out",
            "o",
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("case2.png -> o/case2_mask.png")
    assert lines[1].startswith("case1.png -> o/case1_mask.png")
    assert texts == [
        "Bilateral pulmonary infection, two infected areas",
        "Unilateral pulmonary infection",
    ]
    assert loads == [1]
    assert (tmp_path / "o" / "case1_mask.png").is_file() and (
        tmp_path / "o" / "case2_mask.png"
    ).is_file()


def test_predict_prompts_jsonl_from_stdin(trained, images, tmp_path, monkeypatch):
    run, _, _ = trained
    monkeypatch.chdir(tmp_path)
    texts, _ = _spy(monkeypatch)
    rows = [{"path": "case1.png", "text": "left lung"}, {"path": "case2.png", "text": "right lung"}]
    stdin = "\n".join(json.dumps(x) for x in rows) + "\n"
    r = invoke(
        [
            "predict",
            "--prompts",
            "-",
            "--model",
            str(run),
            "--out",
            "o",
            "--device",
            "cpu",
            "--json",
        ],
        input=stdin,
    )
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(g["input"], g["text"]) for g in got] == [
        ("case1.png", "left lung"),
        ("case2.png", "right lung"),
    ]
    assert texts == ["left lung", "right lung"]


@pytest.mark.parametrize(
    "content, name, where",
    [
        (
            "path,text\ncase1.png,left lung\ncase2.png,   \n",
            "p.csv",
            "line 3 (row 2): the text is empty",
        ),
        ("path,txt\ncase1.png,left lung\n", "p.csv", "line 1: the first line must be a header"),
        ("path,text\ncase1.png\n", "p.csv", "line 2 (row 1): no 'text' value"),
        (
            '{"path": "case1.png", "text": "a"}\n{"path": "case2.png"}\n',
            "p.jsonl",
            "line 2 (row 2): no 'text' value",
        ),
        (
            '{"path": "case1.png", "text": "a"}\n\n{"text": "b"}\n',
            "p.jsonl",
            "line 3 (row 2): no 'path' value",
        ),
    ],
    ids=["empty text", "no text column", "short row", "jsonl no text", "jsonl no path"],
)
def test_predict_prompts_bad_rows(content, name, where, trained, images, tmp_path, monkeypatch):
    run, _, _ = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(content)
    _, loads = _spy(monkeypatch)
    r = invoke(
        ["predict", "--prompts", name, "--model", str(run), "--out", "o", "--device", "cpu"],
        ok=False,
    )
    assert r.exit_code == 1
    assert one_error_line(r).startswith(f"mriseg: error: {name}: {where}")
    assert not (tmp_path / "o").exists() and loads == []  # refused before the model and any output


def test_keep_going_continues_past_a_missing_input(trained, images, tmp_path, monkeypatch):
    run, _, _ = trained
    monkeypatch.chdir(tmp_path)
    args = [
        "predict",
        "case1.png",
        "missing.png",
        "case2.png",
        "--text",
        "left lung",
        "--model",
        str(run),
        "--out",
        "o",
        "--device",
        "cpu",
    ]
    stop = invoke(args, ok=False)
    assert (
        stop.exit_code == 1
        and one_error_line(stop) == "mriseg: error: missing.png: no such file or folder"
    )
    assert not (tmp_path / "o").exists()
    r = invoke([*args, "--keep-going", "--json"], ok=False)
    assert r.exit_code == 1
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["input"] for g in got] == ["case1.png", "missing.png", "case2.png"]
    assert got[1]["error"] == "missing.png: no such file or folder" and got[1]["outputs"] == {}
    assert got[0]["error"] is None and got[2]["error"] is None
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "case1_mask.png",
        "case2_mask.png",
    ]


def test_keep_going_with_a_prompts_row_naming_a_missing_file(
    trained, images, tmp_path, monkeypatch
):
    run, _, _ = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.csv").write_text("path,text\nnope.png,left lung\ncase1.png,right lung\n")
    r = invoke(
        [
            "predict",
            "--prompts",
            "p.csv",
            "--model",
            str(run),
            "--out",
            "o",
            "--device",
            "cpu",
            "-q",
            "--keep-going",
        ],
        ok=False,
    )
    assert r.exit_code == 1
    assert r.stderr == "mriseg: error: nope.png: no such file or folder\n"
    assert r.stdout.startswith("case1.png -> o/case1_mask.png")


# ----------------------------------------------------------------------- 7. evaluate: empty vs missing
def _mask(path: Path, box: bool) -> None:
    m = np.zeros((32, 32), np.uint8)
    if box:
        m[4:12, 4:12] = 255
    Image.fromarray(m).save(path)


def _table_rows(output: str) -> dict[str, list[str]]:
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 5:
            rows[cells[0]] = cells
    return rows


def test_evaluate_shows_an_empty_prediction_as_zero_not_missing(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for name in ("a", "b", "c"):
        _mask(gt / f"{name}.png", True)
    _mask(pred / "a.png", False)  # exists, empty
    _mask(pred / "b.png", True)  # c has no prediction
    r = invoke(["evaluate", "--pred", str(pred), "--gt", str(gt), "--allow-missing", "--quiet"])
    assert r.stderr == ""
    rows = _table_rows(r.stdout)
    assert rows["a"][3] == "0" and rows["b"][3] == "64" and rows["c"][3] == "missing"
    assert "1 missing prediction(s) counted as empty" in flat(r.stdout)


def test_model_evaluation_table_has_no_missing_predictions(trained, data):
    run, _, _ = trained
    r = invoke(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(data),
            "--device",
            "cpu",
            "--workers",
            "0",
            "-q",
        ]
    )
    assert r.stderr == ""
    assert "missing" not in r.stdout and "test: Dice" in r.stdout
