"""Folder pairing, folder evaluation on PNG masks, CSV / JSON / table outputs."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from mrisegcli.errors import InputError, MrisegError, OutputExistsError
from mrisegcli.evaluation import (
    case_key,
    evaluate_folders,
    pair_folders,
    render_table,
    report_json,
    split_suffix,
    write_cases_csv,
)
from mrisegcli.metrics import dice_iou


def _png(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def _names(pairs) -> list[tuple[str, str | None, str]]:
    return [(k, None if p is None else p.name, g.name) for k, p, g in pairs]


def test_split_suffix_and_case_key():
    assert split_suffix("covid_1.nii.gz") == ("covid_1", ".nii.gz")
    assert split_suffix("a.b.PNG") == ("a.b", ".PNG")
    assert split_suffix("noext") == ("noext", "")
    assert case_key("mask_covid_1.png") == "covid_1"
    assert case_key("covid_1_mask.nii.gz") == "covid_1"
    assert case_key("mask_covid_1_mask.tif") == "covid_1"
    assert case_key("mask.png") == "mask"
    assert case_key("Covid_1.png") == "Covid_1"


def test_pairing_conventions(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _touch(
        gt,
        "mask_covid_1.png",
        "mask_covid_2.png",
        "covid_10.png",
        "study_3.nii.gz",
        "notes.txt",
        ".hidden.png",
    )
    _touch(pred, "covid_1.png", "covid_2_mask.png", "mask_covid_10.jpg", "study_3_mask.nii.gz")
    (gt / "subdir.png").mkdir()  # folders are never masks
    assert _names(pair_folders(pred, gt)) == [
        ("covid_1", "covid_1.png", "mask_covid_1.png"),
        ("covid_2", "covid_2_mask.png", "mask_covid_2.png"),
        ("covid_10", "mask_covid_10.jpg", "covid_10.png"),  # natural order: 2 before 10
        ("study_3", "study_3_mask.nii.gz", "study_3.nii.gz"),
    ]


def test_missing_prediction_is_an_error_listing_names_and_count(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _touch(gt, *[f"mask_case_{i}.png" for i in range(13)])
    _touch(pred, "case_0_mask.png")
    with pytest.raises(InputError) as err:
        pair_folders(pred, gt)
    msg = str(err.value)
    assert msg.startswith(str(pred))
    assert "12 of 13" in msg and "--allow-missing" in msg
    assert "mask_case_1.png" in msg and "mask_case_10.png" in msg
    assert "mask_case_11.png" not in msg and "2 more" in msg  # at most 10 listed
    assert "\n" not in msg


def test_case_sensitive_names(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _touch(gt, "Covid_1.png")
    _touch(pred, "covid_1.png")
    with pytest.raises(InputError, match="Covid_1.png"):
        pair_folders(pred, gt)


def test_allow_missing_pairs_with_none(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _touch(gt, "a.png", "b.png")
    _touch(pred, "a_mask.png")
    assert _names(pair_folders(pred, gt, allow_missing=True)) == [
        ("a", "a_mask.png", "a.png"),
        ("b", None, "b.png"),
    ]


def test_ambiguous_matches(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _touch(gt, "mask_a.png")
    _touch(pred, "a.png", "a_mask.nii.gz")
    with pytest.raises(InputError, match=r"ambiguous prediction.*a\.png and a_mask\.nii\.gz"):
        pair_folders(pred, gt)
    _touch(tmp_path / "gt2", "a.png", "mask_a.png")
    with pytest.raises(InputError, match="ambiguous ground-truth"):
        pair_folders(pred, tmp_path / "gt2")


def test_folder_errors(tmp_path):
    _touch(tmp_path / "gt", "a.png")
    with pytest.raises(InputError, match="does not exist"):
        pair_folders(tmp_path / "nope", tmp_path / "gt")
    with pytest.raises(InputError, match="same folder"):
        pair_folders(tmp_path / "gt", tmp_path / "gt")
    _touch(tmp_path / "empty")
    with pytest.raises(InputError, match="no mask files"):
        pair_folders(tmp_path / "gt", tmp_path / "empty")
    with pytest.raises(InputError, match="not a folder"):
        pair_folders(tmp_path / "gt" / "a.png", tmp_path / "gt")


def _dataset(
    tmp_path: Path, n: int = 5, seed: int = 0
) -> tuple[Path, Path, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    arrays = []
    for i in range(n):
        g = rng.random((24, 20)) < 0.3
        p = g ^ (rng.random((24, 20)) < 0.1)  # flip ~10 % of pixels
        _png(gt / f"mask_img_{i}.png", g)
        _png(pred / f"img_{i}_mask.png", p)
        arrays.append((p, g))
    return pred, gt, arrays


def test_evaluate_folders_end_to_end(tmp_path, caplog):
    pred, gt, arrays = _dataset(tmp_path)
    _png(pred / "extra_mask.png", np.ones((24, 20), bool))  # no ground truth
    _png(pred / "img_0_uncertainty.png", np.ones((24, 20), bool))
    calls = []
    with caplog.at_level(logging.WARNING, logger="mrisegcli.evaluation"):
        report = evaluate_folders(
            pred, gt, progress=lambda done, total: calls.append((done, total))
        )
    assert calls == [(i + 1, 5) for i in range(5)]
    assert [c.name for c in report.cases] == [f"img_{i}" for i in range(5)]
    for c, (p, g) in zip(report.cases, arrays, strict=True):
        assert (c.dice, c.iou) == dice_iou(p, g)
        assert (c.pred_pixels, c.gt_pixels) == (p.sum(), g.sum())
    assert report.summary["dice"] == pytest.approx(np.mean([dice_iou(p, g)[0] for p, g in arrays]))
    assert report.unmatched_predictions == ["extra_mask.png", "img_0_uncertainty.png"]
    assert report.summary["n_unmatched_predictions"] == 2
    assert "2 prediction(s)" in caplog.text


def test_evaluate_nifti_volumes(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(3)
    g_XYZ = (rng.random((6, 7, 3)) < 0.4).astype(np.uint8)
    p_XYZ = (rng.random((6, 7, 3)) < 0.4).astype(np.uint8) * 255  # masks hold 0/1 or 0/255
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    nib.save(nib.Nifti1Image(g_XYZ, np.eye(4)), tmp_path / "gt" / "mask_vol_1.nii.gz")
    nib.save(nib.Nifti1Image(p_XYZ, np.eye(4)), tmp_path / "pred" / "vol_1_mask.nii.gz")
    (case,) = evaluate_folders(tmp_path / "pred", tmp_path / "gt").cases
    assert case.name == "vol_1" and case.n_pixels == g_XYZ.size
    assert (case.dice, case.iou) == dice_iou(
        p_XYZ > 0, g_XYZ > 0
    )  # axis order does not change counts


def test_evaluate_allow_missing_counts_empty(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    g = np.zeros((8, 8), bool)
    g[2:5, 2:5] = True
    _png(gt / "a.png", g)
    _png(gt / "b.png", g)
    _png(gt / "c.png", np.zeros((8, 8), bool))
    _png(pred / "a_mask.png", g)
    with pytest.raises(InputError, match="2 of 3"):
        evaluate_folders(pred, gt)
    report = evaluate_folders(pred, gt, allow_missing=True)
    by_name = {c.name: c for c in report.cases}
    assert by_name["b"].dice == 0.0 and by_name["b"].pred_path is None
    assert by_name["c"].dice == 1.0  # both empty: policy
    assert report.summary["dice"] == pytest.approx(2 / 3)
    assert report.summary["n_missing_predictions"] == 2
    assert report.missing_predictions == ["b.png", "c.png"]


def test_shape_mismatch_names_files_and_shapes(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _png(gt / "mask_a.png", np.zeros((10, 12), bool))
    _png(pred / "a.png", np.zeros((12, 10), bool))
    with pytest.raises(MrisegError) as err:
        evaluate_folders(pred, gt)
    msg = str(err.value)
    assert str(pred / "a.png") in msg and str(gt / "mask_a.png") in msg
    assert "(12, 10)" in msg and "(10, 12)" in msg


def test_csv_atomic_and_no_overwrite(tmp_path):
    pred, gt, _ = _dataset(tmp_path, n=3)
    report = evaluate_folders(pred, gt)
    out = tmp_path / "out" / "cases.csv"
    assert write_cases_csv(report, out) == out
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "name", "dice", "iou", "pred_pixels", "gt_pixels", "pred", "gt", "kind", "presence",
        "in_scope", "text",
    ]  # fmt: skip
    for row, c in zip(rows, report.cases, strict=True):
        assert row["name"] == c.name and float(row["dice"]) == c.dice and float(row["iou"]) == c.iou
        assert row["kind"] == row["presence"] == row["in_scope"] == row["text"] == ""  # no model
        assert int(row["gt_pixels"]) == c.gt_pixels and Path(row["gt"]) == c.gt_path
    before = out.read_bytes()
    with pytest.raises(OutputExistsError):
        write_cases_csv(report, out)
    assert out.read_bytes() == before
    report.cases.reverse()
    write_cases_csv(report, out, overwrite=True)
    assert out.read_bytes() != before
    report.cases.append(None)  # fails mid-write: nothing may be left behind
    bad = tmp_path / "out" / "bad.csv"
    with pytest.raises(AttributeError):
        write_cases_csv(report, bad)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cases.csv"]


def test_report_json_and_table(tmp_path):
    pred, gt, _ = _dataset(tmp_path, n=4)
    report = evaluate_folders(pred, gt)
    j = report_json(report)
    back = json.loads(json.dumps(j))
    assert back["n"] == 4 and back["empty_policy"] == "both-empty=1"
    assert back["dice"] == report.summary["dice"] and back["miou"] == report.summary["miou"]
    assert type(j["dice"]) is float and type(j["miou_fg_bg"]) is float
    assert "cases" not in j
    jc = json.loads(json.dumps(report_json(report, cases=True)))
    assert [c["name"] for c in jc["cases"]] == [c.name for c in report.cases]

    def render(**kw) -> str:
        console = Console(record=True, width=120)
        console.print(render_table(report, **kw))
        return console.export_text()

    text = render()
    assert "img_3" in text and f"{100 * report.summary['dice']:.2f}" in text
    short = render(max_rows=2)
    assert "img_3" not in short and "mean" in short
