"""End to end through the command line on tiny settings: synth -> train -> predict -> evaluate,
for both paradigms, plus resume, tokenizer reuse and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mrisegcli.cli import app

runner = CliRunner()
TINY = [
    "--size",
    "32",
    "--steps",
    "16",
    "--batch-size",
    "8",
    "--mask-steps",
    "40",
    "--image-steps",
    "30",
    "--multiscale-steps",
    "40",
    "--device",
    "cpu",
    "--workers",
    "0",
]


def invoke(args: list[str], ok: bool = True):
    result = runner.invoke(app, args)
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    invoke(["synth", str(root), "--n-train", "24", "--n-val", "8", "--n-test", "6", "--size", "32"])
    return root


@pytest.fixture(scope="module", params=["next-token", "next-scale"])
def trained(request, synth_data, tmp_path_factory) -> tuple[str, Path]:
    run = tmp_path_factory.mktemp("runs") / request.param
    invoke(
        ["train", "--data", str(synth_data), "--out", str(run), "--paradigm", request.param, *TINY]
    )
    return request.param, run


def test_run_folder_holds_everything_to_predict(trained):
    paradigm, run = trained
    names = {p.name for p in run.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_log.jsonl",
        "checkpoints",
    } <= names
    assert (
        "mask_vq.safetensors" if paradigm == "next-token" else "multiscale.safetensors"
    ) in names
    config = json.loads((run / "config.json").read_text())
    assert config["paradigm"] == paradigm and config["run"]["train"]["steps"] == 16
    assert config["versions"]["torch"]
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" and 0.0 <= r["dice"] <= 1.0 for r in log)


def test_predict_png_writes_mask_at_input_size(trained, synth_data, tmp_path):
    _, run = trained
    src = sorted((synth_data / "Test_Folder" / "img").iterdir())[0]
    big = tmp_path / "case.png"
    Image.open(src).resize((50, 41)).save(big)
    out = tmp_path / "out"
    r = invoke(
        [
            "predict",
            str(big),
            "--text",
            "Unilateral pulmonary infection, one infected area, all right lung.",
            "--model",
            str(run),
            "--out",
            str(out),
            "--overlay",
            "--json",
            "--device",
            "cpu",
        ]
    )
    row = json.loads(r.stdout.strip().splitlines()[-1])
    mask = np.asarray(Image.open(row["outputs"]["mask"]))
    assert mask.shape == (41, 50) and set(np.unique(mask)) <= {0, 255}
    assert Path(row["outputs"]["overlay"]).is_file()
    again = invoke(
        ["predict", str(big), "--text", "x", "--model", str(run), "--out", str(out)], ok=False
    )
    assert again.exit_code == 1 and "already exist" in again.output


def test_evaluate_model_reports_ceiling_and_ablation(trained, synth_data, tmp_path):
    _, run = trained
    csv = tmp_path / "cases.csv"
    r = invoke(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(synth_data),
            "--split",
            "test",
            "--json",
            "--text-ablation",
            "empty",
            "--image-ablation",
            "--csv",
            str(csv),
            "--device",
            "cpu",
        ]
    )
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n"] == 6 and 0 <= summary["dice"] <= 1 and 0 <= summary["miou"] <= 1
    assert 0 <= summary["tokenizer_ceiling_dice"] <= 1
    assert summary["text_empty_dice_drop"] == pytest.approx(
        summary["dice"] - summary["text_empty_dice"]
    )
    assert summary["image_shuffle_dice_drop"] == pytest.approx(
        summary["dice"] - summary["image_shuffle_dice"]
    )
    if trained[0] == "next-token":
        r = invoke(
            [
                "evaluate",
                "--model",
                str(run),
                "--data",
                str(synth_data),
                "--json",
                "--teacher-forced",
                "--device",
                "cpu",
            ]
        )
        assert 0 <= json.loads(r.stdout.strip().splitlines()[-1])["teacher_forced_dice"] <= 1
    assert len(csv.read_text().splitlines()) == 7


def test_next_scale_samples_give_uncertainty(trained, synth_data, tmp_path):
    paradigm, run = trained
    src = sorted((synth_data / "Test_Folder" / "img").iterdir())[0]
    out = tmp_path / "o"
    args = [
        "predict",
        str(src),
        "--text",
        "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
        "--model",
        str(run),
        "--out",
        str(out),
        "--samples",
        "3",
        "--uncertainty",
        "--json",
        "--device",
        "cpu",
    ]
    if paradigm == "next-scale":
        args.append("--steps-png")
    row = json.loads(invoke(args).stdout.strip().splitlines()[-1])
    unc = np.asarray(Image.open(row["outputs"]["uncertainty"]))
    assert unc.shape[:2] == (32, 32)
    if paradigm == "next-scale":
        assert Path(row["outputs"]["steps"]).is_file()


def test_resume_continues_to_more_steps(synth_data, tmp_path):
    run = tmp_path / "run"
    invoke(["train", "--data", str(synth_data), "--out", str(run), *TINY])
    again = invoke(["train", "--data", str(synth_data), "--out", str(run), *TINY], ok=False)
    assert again.exit_code == 1 and "not empty" in again.output
    invoke(["train", "--data", str(synth_data), "--out", str(run), "--resume", *TINY])
    assert (run / "model.safetensors").is_file()


def test_tokenize_then_train_reuses_tokenizers(synth_data, tmp_path):
    cache = tmp_path / "tok"
    args = [
        "tokenize",
        "--data",
        str(synth_data),
        "--out",
        str(cache),
        "--size",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    first = invoke(args + ["--preset", "tiny", "--mask-steps", "40", "--image-steps", "30"])
    assert "38 encoded" in first.output
    second = invoke(args)
    assert "0 encoded, 38 up to date" in second.output
    run = tmp_path / "run"
    invoke(
        ["train", "--data", str(synth_data), "--out", str(run), "--tokenizer", str(cache), *TINY]
    )
    a = (cache / "mask_vq.safetensors").read_bytes()
    assert (run / "mask_vq.safetensors").read_bytes() == a


def test_errors_are_one_line(tmp_path):
    r = invoke(
        [
            "train",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "r"),
            "--device",
            "cpu",
        ],
        ok=False,
    )
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("mriseg: error:")
    r = invoke(["predict", str(tmp_path / "x.png"), "--text", "t", "--model", "run"], ok=False)
    assert r.exit_code == 1 and "x.png: no such file" in r.output
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    r = invoke(
        [
            "predict",
            str(tmp_path / "x.png"),
            "--text",
            "t",
            "--model",
            str(tmp_path / "no" / "run"),
        ],
        ok=False,
    )
    assert r.exit_code == 1 and "no such run folder" in r.output
    assert not (tmp_path / "x_mask.png").exists()
    r = invoke(["evaluate", "--pred", str(tmp_path)], ok=False)
    assert r.exit_code == 2
    for option, value in (("--prefix-attention", "full"), ("--image-input", "jpeg")):
        r = invoke(
            ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), option, value],
            ok=False,
        )
        assert r.exit_code == 2 and r.output.count("\n") == 1 and f"{option} must be" in r.output
        assert not (tmp_path / "r").exists()


def test_evaluate_with_samples_reports_uncertainty(trained, synth_data):
    _, run = trained
    r = invoke(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(synth_data),
            "--samples",
            "2",
            "--limit",
            "3",
            "--json",
            "--device",
            "cpu",
        ]
    )
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["n"] == 3 and summary["samples"] == 2 and summary["temperature"] == 1.0
    assert 0.0 <= summary["uncertainty"] <= 1.0
    # one sample drawn at temperature 1 is a sample, not the greedy mask: same seed, same result
    args = [
        "evaluate",
        "--model",
        str(run),
        "--data",
        str(synth_data),
        "--temperature",
        "1",
        "--limit",
        "3",
        "--json",
        "--device",
        "cpu",
        "--seed",
        "3",
    ]
    a, b = (json.loads(invoke(args).stdout.strip().splitlines()[-1]) for _ in range(2))
    assert a["temperature"] == 1.0 and a["dice"] == b["dice"] and "uncertainty" not in a


def test_no_text_trains_an_image_only_baseline(synth_data, tmp_path):
    import torch

    from mrisegcli.workflow.segmenter import load_segmenter

    run = tmp_path / "image_only"
    invoke(["train", "--data", str(synth_data), "--out", str(run), "--no-text", *TINY])
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["use_text"] is False
    seg = load_segmenter(run, torch.device("cpu"))
    img = (
        np.asarray(
            Image.open(sorted((synth_data / "Test_Folder" / "img").iterdir())[0]), np.float32
        )
        / 255
    )
    texts = [
        "Unilateral pulmonary infection, one infected area, all right lung.",
        "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    ]
    a, b = (seg.predict(img[None], [t]).prob for t in texts)
    assert torch.equal(a, b)  # the prompt never reaches the model
    # ... although the same weights would read it if it were shown
    ids, tm = seg.encode_text(texts)
    x = torch.from_numpy(img)[None, None].repeat(2, 1, 1, 1)
    seg.model.setup_caches(2)
    shown = seg.model.prefill(seg.image_input(x), ids, tm)
    assert not torch.allclose(shown[0], shown[1])
    r = invoke(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(synth_data),
            "--json",
            "--text-ablation",
            "shuffle",
            "--device",
            "cpu",
        ]
    )
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["uses_text"] is False and summary["text_shuffle_dice_drop"] == 0.0
    r = invoke(["evaluate", "--model", str(run), "--data", str(synth_data), "--device", "cpu"])
    summary_line = next(line for line in r.stdout.splitlines() if line.startswith("test: Dice"))
    assert "image-only model" in summary_line


def test_resume_rebuilds_the_saved_model_not_todays_defaults(synth_data, tmp_path):
    """A run written before an option existed resumes with the model it was trained with."""
    run = tmp_path / "old"
    invoke(
        [
            "train",
            "--data",
            str(synth_data),
            "--out",
            str(run),
            *TINY,
            "--steps",
            "8",
            "--ckpt-every",
            "4",
            "--prefix-attention",
            "causal",
            "--lambda-dense",
            "0",
            "--input-noise",
            "0",
        ]
    )
    path = run / "config.json"
    config = json.loads(path.read_text())
    for key in ("prefix_attention", "lambda_dense", "input_noise"):  # what an older mriseg wrote
        config["run"]["strategies"].pop(key)
        config["model"].pop(key)
    path.write_text(json.dumps(config))
    (run / "checkpoints" / "step_00000008.safetensors").unlink(
        missing_ok=True
    )  # resume from step 4
    invoke(["train", "--data", str(synth_data), "--out", str(run), "--resume", *TINY])
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log if r["split"] == "train") >= 8


@pytest.mark.slow
def test_trained_model_beats_trivial_masks(tmp_path):
    """A model that learnt something: on held-out synthetic cases its Dice clears a floor well
    above what an empty mask (0) or an all-foreground mask scores. A model that ignores its
    input, a decoder that returns the wrong codes or masks written on the wrong grid fail here;
    the tiny runs above only show that the pipeline runs. Measured: Dice 0.23 (the mask
    tokenizer's ceiling at these settings), all-foreground 0.05."""
    data = tmp_path / "data"
    invoke(["synth", str(data), "--n-train", "48", "--n-val", "8", "--n-test", "8", "--size", "32"])
    run = tmp_path / "run"
    invoke(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--size",
            "32",
            "--batch-size",
            "8",
            "--mask-steps",
            "300",
            "--steps",
            "80",
            "--image-input",
            "pixels",
            "--device",
            "cpu",
            "--workers",
            "0",
            "-q",
        ]
    )
    r = invoke(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(data),
            "--split",
            "test",
            "--json",
            "--device",
            "cpu",
            "-q",
        ]
    )
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    masks = [
        np.asarray(Image.open(p)) > 0 for p in sorted((data / "Test_Folder" / "labelcol").iterdir())
    ]
    assert len(masks) == summary["n"] == 8 and all(m.any() for m in masks)
    all_foreground = float(np.mean([2 * m.sum() / (m.sum() + m.size) for m in masks]))
    assert summary["dice"] > max(0.1, 2 * all_foreground), (summary["dice"], all_foreground)
    assert summary["n_empty_pred"] < summary["n"]  # not the empty mask everywhere
