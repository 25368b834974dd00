"""The presence head and the prompt scope: statistics, fitting, and end to end through the
command line (train records both, predict refuses out-of-scope prompts and empties masks below
the presence threshold, calibrate refits them, models lists them, evaluate reports detection)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.presence import (
    auroc,
    choose_threshold,
    detection_report,
    fit_presence,
    platt_scaling,
)
from mrisegcli.scope import build_scope, content_words, is_known, refusal, unknown_words

runner = CliRunner()
TINY = ["--size", "32", "--steps", "12", "--batch-size", "8", "--mask-steps", "30",
        "--multiscale-steps", "30", "--image-steps", "20", "--device", "cpu", "--workers", "0"]  # fmt: skip


def invoke(args, ok=True):
    result = runner.invoke(app, args)
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


# ----------------------------------------------------------------------------- statistics


def test_auroc_matches_torchmetrics_with_ties():
    tm = pytest.importorskip("torchmetrics.functional")
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + labels * 0.4, 1)  # rounded: many ties
    want = float(tm.auroc(torch.tensor(scores), torch.tensor(labels.astype(int)), task="binary"))
    assert auroc(scores, labels) == pytest.approx(want, abs=1e-6)  # float32 there
    assert auroc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert np.isnan(auroc(np.array([0.1, 0.9]), np.array([True, True])))


def test_platt_scaling_recovers_the_logistic_it_was_drawn_from():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(20000, generator=g)
    labels = (torch.rand(20000, generator=g) < torch.sigmoid(2.0 * raw - 1.0)).float()
    a, b = platt_scaling(raw, labels)
    assert a == pytest.approx(2.0, abs=0.15) and b == pytest.approx(-1.0, abs=0.1)
    # scores that order the labels backwards: no negative scale, the identity instead
    assert platt_scaling(-raw, (raw > 0).float()) == (1.0, 0.0)


def test_threshold_finds_most_present_at_the_specificity():
    absent = np.linspace(0.0, 0.5, 20)  # 19 of 20 below 0.485: specificity 0.95
    present = np.array([0.485, 0.6, 0.7, 0.8, 0.9])
    probs = np.concatenate([absent, present])
    labels = np.concatenate([np.zeros(20, bool), np.ones(5, bool)])
    t = choose_threshold(probs, labels, min_specificity=0.95)
    rep = detection_report(probs, labels, t)
    assert rep["specificity"] >= 0.95 and rep["sensitivity"] == 1.0
    # perfectly separated: every present found, every absent left empty
    sep = np.concatenate([np.linspace(0, 0.3, 20), np.linspace(0.7, 1, 5)])
    t = choose_threshold(sep, labels)
    assert 0.3 < t < 0.7
    assert detection_report(sep, labels, t)["specificity"] == 1.0
    # unreachable specificity: falls back to the best sensitivity + specificity
    assert 0.0 <= choose_threshold(probs, labels, min_specificity=1.01) <= 1.0


def test_operating_points_name_what_a_lower_threshold_buys():
    from mrisegcli.presence import operating_points

    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 1], bool)
    p90, p97 = operating_points(probs, labels, (0.8, 1.0))
    assert p90["sensitivity"] >= 0.8 and p90["threshold"] == pytest.approx(0.55)  # 5 of 6 found
    assert p90["specificity"] == 1.0
    assert p97["sensitivity"] == 1.0 and p97["threshold"] == pytest.approx(0.35)
    assert p97["specificity"] == 0.75  # the empty truth scored 0.5 is drawn
    assert operating_points(probs, np.ones(10, bool)) == []


def test_weak_presence_head_is_reported_with_the_thresholds_that_find_more():
    from mrisegcli.report_lines import weak_presence_warnings

    val = {"sensitivity": 0.62, "specificity": 0.958, "threshold": 0.989, "auroc": 0.943}
    points = [{"for_sensitivity": 0.9, "threshold": 0.41, "sensitivity": 0.9, "specificity": 0.6}]
    (line,) = weak_presence_warnings({"report": {"val": val, "val_operating_points": points}})
    assert "finds 62% of the val findings at its threshold 0.989" in line
    assert "--presence-threshold 0.410 finds 90% and leaves 60% of them empty" in line
    strong = {**val, "sensitivity": 0.94}
    assert weak_presence_warnings({"report": {"val": strong}}) == []
    assert weak_presence_warnings(None) == []


def test_fit_presence_separates_and_calibrates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 12, generator=g)
    y = x[:, 0] + 0.3 * torch.randn(600, generator=g) > 0.8
    fit = fit_presence(x[:400], y[:400], x[400:], y[400:], steps=300, seed=0)
    assert fit.report["val"]["auroc"] > 0.95
    assert 0.0 < fit.threshold < 1.0
    assert fit.report["val"]["calibration_error"] < 0.1
    with pytest.raises(Exception, match="empty mask"):
        fit_presence(x[:10], torch.ones(10, dtype=torch.bool), x[:10], y[:10], steps=5)


# ----------------------------------------------------------------------------- scope


def lower(t: str) -> str:
    return t.lower()


def test_scope_words_variants_and_typos():
    scope = build_scope(
        ["Tumor in the left hemisphere.", "Lesion edema, right side."],
        ["lesion:left", "lesion:right"],
        lower,
    )
    vocab = set(scope["vocabulary"])
    assert {"tumor", "hemisphere", "left", "lesion", "edema"} <= vocab
    assert "the" not in vocab and "in" not in vocab
    for w in ("tumour", "oedema", "hemispheres", "lesions", "hemispere", "tumors"):
        assert is_known(w, vocab), w
    assert not is_known("pneumothorax", vocab)
    assert unknown_words("asdf qwerty", scope, lower) == ["asdf", "qwerty"]
    assert unknown_words("Please show the tumour on the LEFT", scope, lower) == []
    assert unknown_words("the entire left tumour, in full", scope, lower) == []  # extent words
    assert unknown_words("tumour projected over the left hemisphere", scope, lower) == []
    framed = "findings in keeping with a lesion, likely tumour, confined to the left hemisphere"
    assert unknown_words(framed, scope, lower) == []  # a report's framing and hedging
    assert unknown_words("restricted diffusion", scope, lower) == ["diffusion"]
    why = refusal("pleural effusion", scope, lower)
    assert "'pleural'" in why and "'effusion'" in why and "lesion:left" in why
    assert refusal("the", scope, lower) is not None  # names nothing
    assert refusal("left tumour", scope, lower) is None
    assert refusal("anything", {}, lower) is None  # no scope recorded: nothing refused
    assert content_words("the 15 mm nodule", lower) == ["mm", "nodule"]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def square_data(tmp_path_factory) -> Path:
    """A manifest of 32-px images: "bright square" rows with a square, and the same request on
    blank images with an empty mask (target none)."""
    root = tmp_path_factory.mktemp("squares")
    (root / "img").mkdir()
    (root / "msk").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    splits = ["train"] * 40 + ["val"] * 12 + ["test"] * 12
    for i, split in enumerate(splits):
        img = (rng.random((32, 32)) * 40).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        present = i % 2 == 0
        if present:
            y, x = rng.integers(2, 18, 2)
            img[y : y + 12, x : x + 12] = 230
            mask[y : y + 12, x : x + 12] = 255
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        Image.fromarray(mask).save(root / "msk" / f"{i}.png")
        rows.append(
            {
                "image": f"img/{i}.png",
                "mask": f"msk/{i}.png",
                "text": "bright square",
                "split": split,
                "kind": "describe" if present else "absent",
                "target": "square" if present else "none",
            }
        )
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module", params=["next-token", "next-scale"])
def square_run(request, square_data, tmp_path_factory, one_thread) -> Path:
    run = tmp_path_factory.mktemp("runs") / request.param
    invoke(["train", "--data", str(square_data), "--out", str(run), "--paradigm", request.param,
            "--seed", "0", *TINY])  # fmt: skip
    return run


def test_train_records_presence_head_and_scope(square_run):
    config = json.loads((square_run / "config.json").read_text())
    assert (square_run / "presence.safetensors").is_file()
    p = config["presence"]
    assert 0.0 <= p["threshold"] <= 1.0 and p["report"]["val"]["n_absent"] == 6
    scope = config["scope"]
    assert [t["target"] for t in scope["targets"]] == ["square"]
    assert scope["absent_rows"] == 20 and {"bright", "square"} <= set(scope["vocabulary"])
    listed = invoke(["models", str(square_run)]).output
    assert "square" in listed and "presence threshold" in listed


def test_predict_refuses_out_of_scope_prompt(square_run, square_data, tmp_path):
    image = square_data / "img" / "52.png"
    out = tmp_path / "out"
    res = invoke(["predict", str(image), "--text", "asdf qwerty", "--model", str(square_run),
                  "--out", str(out), "--device", "cpu", "--json"], ok=False)  # fmt: skip
    assert res.exit_code == 1
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["status"] == "refused" and "'asdf'" in row["error"] and "square" in row["error"]
    assert not out.exists() or not any(out.iterdir())
    # --force runs it anyway
    res = invoke(["predict", str(image), "--text", "asdf qwerty", "--model", str(square_run),
                  "--out", str(out), "--device", "cpu", "--json", "--force"])  # fmt: skip
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["status"] in ("found", "not found") and Path(row["outputs"]["mask"]).is_file()


def test_presence_threshold_empties_the_mask(square_run, square_data, tmp_path):
    image = square_data / "img" / "52.png"
    args = ["predict", str(image), "--text", "bright square", "--model", str(square_run),
            "--device", "cpu", "--json", "--overwrite"]  # fmt: skip
    above = json.loads(
        invoke([*args, "--out", str(tmp_path / "a"), "--presence-threshold", "1.0"]).stdout
    )
    assert above["status"] == "not found" and above["foreground_pixels"] == 0
    assert 0.0 <= above["presence"] <= 1.0
    mask = np.asarray(Image.open(above["outputs"]["mask"]))
    assert mask.max() == 0  # an empty mask is written
    text = invoke(
        ["predict", str(image), "--text", "bright square", "--model", str(square_run),
         "--device", "cpu", "--out", str(tmp_path / "b"), "--presence-threshold", "1.0"]
    ).output  # fmt: skip
    assert "not found (presence" in text


def test_calibrate_writes_a_new_run(square_run, square_data, tmp_path):
    out = tmp_path / "cal"
    res = invoke(["calibrate", "--model", str(square_run), "--data", str(square_data),
                  "--out", str(out), "--steps", "50", "--device", "cpu", "--json"])  # fmt: skip
    report = json.loads(res.stdout)
    points = report["report"]["val_operating_points"]
    assert [p["for_sensitivity"] for p in points] == [0.9, 0.97]
    weak = report["report"]["val"]["sensitivity"] < 0.8  # the warning says so, and only then
    assert ("presence head finds" in res.stderr) == weak
    assert report["report"]["val"]["n_absent"] == 6 and 0 <= report["threshold"] <= 1
    assert (out / "presence.safetensors").is_file() and (out / "model.safetensors").is_file()
    # --scope-only keeps the head as it is and writes the scope again
    kept = tmp_path / "kept"
    invoke(["calibrate", "--model", str(out), "--data", str(square_data), "--out", str(kept),
            "--device", "cpu", "--scope-only"])  # fmt: skip
    same = (kept / "presence.safetensors").read_bytes() == (
        out / "presence.safetensors"
    ).read_bytes()
    config = json.loads((kept / "config.json").read_text())
    assert same and config["presence"]["threshold"] == report["threshold"]
    assert config["scope"]["targets"][0]["target"] == "square"
    assert "scope_refresh" in config["presence"]
    # the source is never the destination, and a folder that is not a run is not replaced
    again = invoke(["calibrate", "--model", str(square_run), "--data", str(square_data),
                    "--out", str(square_run), "--device", "cpu"], ok=False)  # fmt: skip
    assert again.exit_code == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = invoke(["calibrate", "--model", str(square_run), "--data", str(square_data),
                  "--out", str(mine), "--device", "cpu", "--overwrite"], ok=False)  # fmt: skip
    assert res.exit_code == 1 and (mine / "notes.txt").read_text() == "keep"


def test_calibration_fits_the_train_rows_the_time_left_allows(square_run, square_data, monkeypatch):
    import functools
    import time

    from mrisegcli.workflow import calibrate
    from mrisegcli.workflow.prepare import open_dataset
    from mrisegcli.workflow.segmenter import load_segmenter

    seg = load_segmenter(square_run, torch.device("cpu"))
    ds = open_dataset([square_data], None, seed=0)
    monkeypatch.setattr(calibrate, "MIN_BUDGET_ROWS", 16)
    by_eight = functools.partial(calibrate.features_and_labels, batch=8)
    monkeypatch.setattr(calibrate, "features_and_labels", by_eight)
    late = calibrate.fit_calibration(seg, ds, steps=30, deadline=time.perf_counter())
    assert late.fit.report["train_rows"] == 16  # no time left: the fewest rows
    assert late.fit.report["train_rows_limited_by"] == "time budget"
    free = calibrate.fit_calibration(seg, ds, steps=30, deadline=time.perf_counter() + 600)
    assert free.fit.report["train_rows"] == 40 and "train_rows_limited_by" not in free.fit.report

    def no_pass(*args, **kwargs):
        raise AssertionError("features computed although no train row is empty")

    monkeypatch.setattr(calibrate, "features_and_labels", no_pass)
    none = calibrate.fit_calibration(seg, ds, train_has_empty=False)
    assert none.fit is None and "every train row has a region" in none.note
    assert none.scope["targets"][0]["target"] == "square"  # the scope is still built


def test_train_budget_keeps_time_for_the_presence_head(
    square_data, tmp_path, one_thread, monkeypatch
):
    """--max-minutes covers the presence head's fit: the loop leaves it its share (half here,
    so that a loop that ignored it would run for most of the budget)."""
    import time

    from mrisegcli.workflow import train

    monkeypatch.setattr(train, "PRESENCE_SHARE", 0.5)
    run = tmp_path / "run"
    t0 = time.perf_counter()
    invoke(["train", "--data", str(square_data), "--out", str(run), "--seed", "0", *TINY[:2],
            "--steps", "100000", "--batch-size", "8", "--mask-steps", "30", "--device", "cpu",
            "--workers", "0", "--max-minutes", "0.4", "--eval-every", "50"])  # fmt: skip
    wall = time.perf_counter() - t0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["calibration_reserved_seconds"] == pytest.approx(12.0)
    assert 0 < metrics["calibration_seconds"] < 30
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert 0 < max(r.get("elapsed_s", 0) for r in log) < 12.0
    assert (run / "presence.safetensors").is_file() and wall < 24 + 25


def test_init_from_fine_tunes_the_model_with_its_own_tokenizers(square_run, square_data, tmp_path):
    base = json.loads((square_run / "config.json").read_text())
    ft = tmp_path / "ft"
    probe = ["--lambda-presence", "0.5"] if base["paradigm"] == "next-token" else []
    invoke(["train", "--data", str(square_data), "--out", str(ft), "--init-from", str(square_run),
            "--steps", "4", "--lr", "1e-4", "--device", "cpu", "--workers", "0", *probe])  # fmt: skip
    config = json.loads((ft / "config.json").read_text())
    init = config["init_from"]
    assert init["model"] == str(square_run)
    assert init["weights"]["sha256"] == base["weights"]["sha256"]
    # the base model's architecture and tokenizers, the training options given applied
    assert config["model"]["transformer"] == base["model"]["transformer"]
    assert config["tokenizers"] == base["tokenizers"]
    assert config["run"]["train"]["steps"] == 4 and config["run"]["train"]["lr"] == 1e-4
    if probe:  # a probe the base model was not trained with starts fresh, and is named
        assert init["fresh_tensors"] and all("presence" in k for k in init["fresh_tensors"])
    else:
        assert init["fresh_tensors"] == []
    # options that would reshape the model are refused by name; so is a resume
    res = invoke(["train", "--data", str(square_data), "--out", str(tmp_path / "b"),
                  "--init-from", str(square_run), "--size", "64", *TINY[2:]], ok=False)  # fmt: skip
    assert res.exit_code == 1 and "--size" in res.output and not (tmp_path / "b").exists()
    res = invoke(["train", "--data", str(square_data), "--out", str(ft), "--resume",
                  "--init-from", str(square_run), "--device", "cpu"], ok=False)  # fmt: skip
    assert res.exit_code != 0 and "--init-from" in res.output


def test_init_weights_copies_every_tensor_and_refuses_another_architecture(square_run):
    from safetensors.torch import load_file

    from mrisegcli.errors import MrisegError
    from mrisegcli.workflow.segmenter import load_segmenter
    from mrisegcli.workflow.train import init_weights

    model = load_segmenter(square_run, torch.device("cpu")).model
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert init_weights(model, square_run) == []
    saved = load_file(str(square_run / "model.safetensors"))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())
    with pytest.raises(MrisegError, match="do not fit"):
        init_weights(torch.nn.Linear(3, 3), square_run)


def test_damaged_presence_head_is_refused(square_run, tmp_path):
    import shutil

    from mrisegcli.errors import MrisegError
    from mrisegcli.workflow.segmenter import load_segmenter

    copy = tmp_path / "copy"
    shutil.copytree(square_run, copy)
    (copy / "presence.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MrisegError, match="presence"):
        load_segmenter(copy, torch.device("cpu"))


def test_evaluate_reports_detection(square_run, square_data, tmp_path):
    rows = tmp_path / "cases.csv"
    res = invoke(["evaluate", "--model", str(square_run), "--data", str(square_data),
                  "--device", "cpu", "--json", "--csv", str(rows)])  # fmt: skip
    det = json.loads(res.stdout)["detection"]
    with open(rows, newline="") as f:  # each case's kind and presence score
        cases = list(csv.DictReader(f))
    assert len(cases) == 12 and {c["kind"] for c in cases} == {"absent", "describe"}
    assert all(0.0 <= float(c["presence"]) <= 1.0 for c in cases)
    drawn = [c for c in cases if int(c["pred_pixels"]) > 0]  # a mask only above the threshold
    assert all(float(c["presence"]) >= det["threshold"] for c in drawn)
    assert det["score"] == "presence head" and det["n"] == 12 and det["n_present"] == 6
    for key in ("auroc", "sensitivity", "specificity", "found", "dice_present",
                "drawn_on_empty", "fp_area_on_empty"):  # fmt: skip
        assert 0.0 <= det[key] <= 1.0, key
    assert set(det["kinds"]) == {"absent", "describe"}
    assert "drawn_on_empty" in det["kinds"]["absent"] and "found" in det["kinds"]["describe"]
    text = invoke(["evaluate", "--model", str(square_run), "--data", str(square_data),
                   "--device", "cpu"]).output  # fmt: skip
    assert "detection (presence head): AUROC" in text


def test_evaluate_names_the_cases_predict_would_refuse(square_run, square_data, tmp_path):
    data = tmp_path / "reworded"
    shutil.copytree(square_data, data)
    with open(data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tests = [r for r in rows if r["split"] == "test"]
    for r in tests[:5]:  # five test texts with a word the model never learnt
        r["text"] = "bright polygon"
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cases_csv = tmp_path / "cases.csv"
    args = ["evaluate", "--model", str(square_run), "--data", str(data), "--device", "cpu"]
    scope = json.loads(invoke([*args, "--json", "--csv", str(cases_csv)]).stdout)["scope"]
    assert scope["n"] == 12 and scope["refused"] == 5
    assert scope["unknown_words"] == {"polygon": 5}
    with open(cases_csv, newline="") as f:
        cases = list(csv.DictReader(f))
    inside = [float(c["dice"]) for c in cases if c["in_scope"] == "1"]
    outside = [float(c["dice"]) for c in cases if c["in_scope"] == "0"]
    assert len(outside) == 5 and len(inside) == 7  # every case is still scored
    assert {c["text"] for c in cases if c["in_scope"] == "0"} == {"bright polygon"}
    assert scope["dice_refused"] == pytest.approx(np.mean(outside))
    assert scope["dice_in_scope"] == pytest.approx(np.mean(inside))
    assert sum(k["refused"] for k in scope["kinds"].values()) == 5
    text = invoke(args).output
    assert "scope (predict refuses these; --force answers them): 5 of 12 prompts" in text
    assert "'polygon' 5" in text
    canon_csv = tmp_path / "canon.csv"
    plain = json.loads(invoke(["evaluate", "--model", str(square_run), "--data", str(square_data),
                               "--device", "cpu", "--json", "--csv", str(canon_csv)]).stdout)  # fmt: skip
    assert plain["scope"]["refused"] == 0 and "kinds" not in plain["scope"]
    # examples/wording_by_template.py pairs the two evaluations case by case
    out = tmp_path / "by_template.json"
    script = Path(__file__).resolve().parents[1] / "examples" / "wording_by_template.py"
    proc = subprocess.run([sys.executable, str(script), "--canonical", str(canon_csv),
                           "--reworded", str(cases_csv), "--json", str(out)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    result = json.loads(out.read_text())
    with open(canon_csv, newline="") as f:
        canon = {Path(c["gt"]).name: float(c["dice"]) for c in csv.DictReader(f)}
    polygon = [p for p in result["prompts"] if p["text"] == "bright polygon"]
    assert {p["kind"] for p in polygon} == {"describe", "absent"}  # a prompt per kind
    assert not any(p["in_scope"] for p in polygon) and sum(p["n"] for p in polygon) == 5
    for p in polygon:
        changed = [float(c["dice"]) - canon[Path(c["gt"]).name] for c in cases
                   if c["in_scope"] == "0" and c["kind"] == p["kind"]]  # fmt: skip
        assert p["change"] == pytest.approx(np.mean(changed))
    refused = sum(k["refused"]["n"] for k in result["kinds"].values())
    assert refused == 5 and "[refused by predict]" in proc.stdout


def test_evaluate_presence_threshold_overrides_the_models(square_run, square_data):
    args = ["evaluate", "--model", str(square_run), "--data", str(square_data), "--device",
            "cpu", "--json", "--presence-threshold"]  # fmt: skip
    gate_off = json.loads(invoke([*args, "0"]).stdout)["detection"]
    assert gate_off["threshold"] == 0.0 and gate_off["sensitivity"] == 1.0
    assert gate_off["specificity"] == 0.0  # every score clears 0: nothing is gated
    gate_all = json.loads(invoke([*args, "1"]).stdout)
    det = gate_all["detection"]
    assert det["threshold"] == 1.0 and det["found"] == 0.0 and det["drawn_on_empty"] == 0.0
    assert det["kinds"]["describe"]["dice_present"] == 0.0  # every mask left empty
    bad = invoke([*args, "1.5"], ok=False)
    assert bad.exit_code != 0 and "presence-threshold" in bad.output


def _prompt_list() -> list[tuple[str, str]]:
    with open(Path(__file__).parent / "data" / "chest_prompts.csv", newline="") as f:
        return [(r["prompt"], r["expect"]) for r in csv.DictReader(f)]


def test_shipped_chest_model_answers_its_scope_and_refuses_the_rest():
    """tests/data/chest_prompts.csv: findings it never learnt, other organs, other modalities'
    terms and gibberish are refused (>= 95%); report wordings of what it answers are accepted
    (>= 98%)."""
    from tokenizers import Tokenizer

    import mrisegcli

    shipped = Path(mrisegcli.__file__).parent / "shipped" / "chest-xray"
    scope = json.loads((shipped / "config.json").read_text())["scope"]
    norm = Tokenizer.from_file(str(shipped / "tokenizer.json")).normalizer.normalize_str
    rows = _prompt_list()
    inside = [p for p, e in rows if e == "in"]
    outside = [p for p, e in rows if e == "out"]
    assert len(inside) >= 120 and len(outside) >= 60
    wrongly_refused = [p for p in inside if refusal(p, scope, norm) is not None]
    wrongly_accepted = [p for p in outside if refusal(p, scope, norm) is None]
    assert len(wrongly_refused) <= 0.02 * len(inside), wrongly_refused
    assert len(wrongly_accepted) <= 0.05 * len(outside), wrongly_accepted


def test_shipped_brain_model_answers_its_scope_and_refuses_the_rest():
    """tests/data/brain_prompts.csv: neuroradiology wordings of the lesion are accepted (>= 95%
    of 40), other findings, organs and gibberish refused (>= 95% of 30)."""
    from tokenizers import Tokenizer

    import mrisegcli

    shipped = Path(mrisegcli.__file__).parent / "shipped" / "brain-mri"
    if not shipped.is_dir():
        pytest.skip("no brain-mri model in this installation")
    scope = json.loads((shipped / "config.json").read_text())["scope"]
    norm = Tokenizer.from_file(str(shipped / "tokenizer.json")).normalizer.normalize_str
    with open(Path(__file__).parent / "data" / "brain_prompts.csv", newline="") as f:
        rows = [(r["prompt"], r["expect"]) for r in csv.DictReader(f)]
    inside = [p for p, e in rows if e == "in"]
    outside = [p for p, e in rows if e == "out"]
    wrongly_refused = [p for p in inside if refusal(p, scope, norm) is not None]
    wrongly_accepted = [p for p in outside if refusal(p, scope, norm) is None]
    assert len(wrongly_refused) <= 0.05 * len(inside), wrongly_refused
    assert len(wrongly_accepted) <= 0.05 * len(outside), wrongly_accepted


def test_shipped_brain_model_reads_sentence_punctuation_as_nothing():
    """A full stop is no request: the lgg-flair rows asking of slices without a lesion all end
    with one, so a model that saw it could answer "FLAIR hyperintense lesion." with "nothing
    there" whatever the image shows. The shipped model's tokenizer folds it away (a decimal
    point stays)."""
    import mrisegcli
    from mrisegcli.tokenizers.text import load_text_tokenizer

    shipped = Path(mrisegcli.__file__).parent / "shipped" / "brain-mri"
    if not shipped.is_dir():
        pytest.skip("no brain-mri model in this installation")
    tk = load_text_tokenizer(shipped)
    for sentence, plain in [
        ("FLAIR hyperintense lesion.", "FLAIR hyperintense lesion"),
        ("Lesion in the left hemisphere!", "lesion in the left hemisphere"),
        ("glioma; right hemisphere?", "glioma right hemisphere"),
    ]:
        assert tk(sentence)["input_ids"] == tk(plain)["input_ids"], sentence
    assert "." in tk.tokenize("a 3.5 cm lesion")
