"""train, tokenize and evaluate read an nnU-Net folder directly; evaluate reports each volume
(Dice, HD95, |dV|) beside the per-slice numbers, --csv one row per volume; predict on the test
images and evaluate --pred/--gt against labelsTs pair by case."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from test_cli_pipeline import TINY, invoke
from test_nnunet_layout import make_nnunet

from mrisegcli.postprocess import CANDIDATE_SHARES


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    return make_nnunet(tmp_path_factory.mktemp("nnunet") / "Dataset002_Tiny", n_train=4, n_test=2)


@pytest.mark.slow
def test_train_tokenize_evaluate_on_an_nnunet_folder(nnunet, tmp_path, one_thread):
    run = tmp_path / "run"
    invoke(["train", "--data", str(nnunet), "--out", str(run), *TINY])
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["layout"] == "nnunet"
    trained = config["postprocess"]  # chosen on the val case's volumes at the end of training
    assert trained["chosen_on"] == "val split" and len(trained["volumes"]) == 3
    assert trained["min_component_share"] in CANDIDATE_SHARES
    tok = tmp_path / "tok"
    first = invoke(
        [
            "tokenize",
            "--data",
            str(nnunet),
            "--out",
            str(tok),
            "--tokenizer",
            str(run),
            "--size",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]  # fmt: skip
    )
    assert "108 encoded" in first.output  # 6 cases x 6 slices x 3 labels, empty slices too
    again = invoke(
        [
            "tokenize",
            "--data",
            str(nnunet),
            "--out",
            str(tok),
            "--tokenizer",
            str(run),
            "--size",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]  # fmt: skip
    )
    assert "0 encoded, 108 up to date" in again.output

    out_csv = tmp_path / "volumes.csv"
    r = invoke(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(nnunet),
            "--split",
            "test",
            "--json",
            "--csv",
            str(out_csv),
            "--device",
            "cpu",
            "--workers",
            "0",
        ]  # fmt: skip
    )
    summary = json.loads(r.stdout)
    assert summary["n"] == 36  # per slice: 2 cases x 6 slices x 3 labels
    vols = summary["volumes"]
    assert vols["n"] == 6 and vols["spacing_known"] and vols["n_partial"] == 0
    names = [v["name"] for v in vols["cases"]]
    assert names[:3] == ["case_004/edema", "case_004/enhancing_tumour", "case_004/whole_tumour"]
    for v in vols["cases"]:
        assert 0 <= v["dice"] <= 1 and v["gt_ml"] > 0
        assert v["hd95_mm"] is None or v["hd95_mm"] >= 0
    assert set(summary["kinds"]) == {"edema", "enhancing_tumour", "whole tumour"}
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == names and "hd95_mm" in rows[0]
    table = invoke(
        [
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(nnunet),
            "--device",
            "cpu",
            "--workers",
            "0",
            "--limit",
            "8",
        ]  # fmt: skip
    ).stdout
    assert "Volume metrics" in table and "per slice" in table  # one complete volume of 8 slices

    # predict the test images, then score the masks against labelsTs by case
    pred = tmp_path / "pred"
    invoke(
        [
            "predict",
            str(nnunet / "imagesTs"),
            "--text",
            "edema",
            "--model",
            str(run),
            "--out",
            str(pred),
            "--device",
            "cpu",
            "--quiet",
        ]  # fmt: skip
    )
    masks = sorted(p.name for p in pred.iterdir())
    assert masks == ["case_004_0000_mask.nii.gz", "case_004_0001_mask.nii.gz",
                     "case_005_0000_mask.nii.gz", "case_005_0001_mask.nii.gz"]  # fmt: skip
    for p in pred.iterdir():
        p.unlink() if "_0001_" in p.name else None
    assert nib.load(pred / masks[0]).shape == (20, 16, 6)
    labels_ts = nnunet / "labelsTs"
    r = invoke(["evaluate", "--pred", str(pred), "--gt", str(labels_ts)], ok=False)
    assert r.exit_code == 1 and "case_004.nii.gz: not a binary mask" in r.stderr  # 3 labels
    gt = tmp_path / "gt_edema"  # the edema label (1) as binary masks, on the same grid
    gt.mkdir()
    for p in labels_ts.iterdir():
        img = nib.load(p)
        edema = (np.asarray(img.dataobj) == 1).astype(np.uint8)
        nib.save(nib.Nifti1Image(edema, img.affine, img.header), gt / p.name)
    r = invoke(["evaluate", "--pred", str(pred), "--gt", str(gt), "--json"])
    scored = json.loads(r.stdout)
    assert scored["volumes"]["n"] == 2 and scored["n_missing_predictions"] == 0
    assert [v["name"] for v in scored["volumes"]["cases"]] == ["case_004", "case_005"]

    # the component rule chosen on labelled volumes, recorded in a new run, applied by evaluate
    cal = tmp_path / "cal"
    r = invoke(["calibrate", "--model", str(run), "--data", str(nnunet), "--volumes", str(nnunet),
                "--out", str(cal), "--device", "cpu", "--json", "--steps", "20"])  # fmt: skip
    rule = json.loads(r.stdout)["postprocess"]
    assert rule["min_component_share"] in CANDIDATE_SHARES and len(rule["volumes"]) == 18
    assert json.loads((cal / "config.json").read_text())["postprocess"] == rule
    assert json.loads((run / "config.json").read_text())["postprocess"] == trained  # unchanged
    r = invoke(["evaluate", "--model", str(cal), "--data", str(nnunet), "--split", "test",
                "--json", "--device", "cpu", "--workers", "0"])  # fmt: skip
    vols = json.loads(r.stdout)["volumes"]
    assert vols["min_component_share"] == rule["min_component_share"]
    chosen = {c["min_component_share"]: c for c in vols["components"]}
    assert vols["dice"] == pytest.approx(chosen[rule["min_component_share"]]["dice"])
    r = invoke(["evaluate", "--model", str(cal), "--data", str(nnunet), "--split", "test", "--json",
                "--device", "cpu", "--workers", "0", "--min-component-share", "1"])  # fmt: skip
    largest = json.loads(r.stdout)["volumes"]
    assert largest["min_component_share"] == 1.0
    assert largest["dice"] == pytest.approx(chosen[1.0]["dice"])
    r = invoke(["predict", str(nnunet / "imagesTs" / "case_004_0000.nii.gz"), "--text", "edema",
                "--model", str(cal), "--out", str(tmp_path / "pred1"), "--device", "cpu", "--json",
                "--min-component-share", "1", "--quiet"])  # fmt: skip
    one = json.loads(r.stdout.splitlines()[0])
    assert one["volume"]["min_component_share"] == 1.0
    mask = np.asarray(nib.load(tmp_path / "pred1" / "case_004_0000_mask.nii.gz").dataobj) > 0
    assert ndimage.label(mask, np.ones((3, 3, 3)))[1] <= 1  # the largest component only
