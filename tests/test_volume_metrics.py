"""Volume metrics: HD95 by hand and its empty-mask policy, absolute volume difference;
evaluate --pred/--gt on NIfTI volumes (one CSV row per volume, grids checked). MONAI's metrics
as the reference: ``test_metrics_vs_monai.py``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.errors import InputError
from mrisegcli.evaluation import evaluate_folders, write_cases_csv
from mrisegcli.metrics import dice_iou
from mrisegcli.volume_metrics import VolumeResult, hd95, summarize_volumes, surface

runner = CliRunner()


def blobs(rng: np.random.Generator, shape=(14, 22, 20), n=3) -> np.ndarray:
    """A few ellipsoids (anisotropic) at random places: a mask with an irregular surface."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    mask = np.zeros(shape, bool)
    for _ in range(n):
        c = rng.integers(0, shape)
        r = rng.uniform(2, 6, size=3)
        mask |= ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 < 1
    return mask


def test_hd95_by_hand_and_empty_policy():
    a = np.zeros((5, 9, 9), bool)
    a[2, 2:7, 2:7] = True
    b = np.roll(a, 2, axis=2)  # the same square moved two voxels along W
    assert hd95(a, a) == 0.0
    assert hd95(a, b, (1.0, 1.0, 0.5)) == pytest.approx(1.0)  # 2 voxels of 0.5 mm
    assert hd95(a, b) == pytest.approx(2.0)
    empty = np.zeros_like(a)
    assert hd95(empty, empty) == 0.0  # both empty: a correct "nothing here"
    assert hd95(a, empty) is None and hd95(empty, a) is None  # undefined
    # a filled cube's surface: its outer shell only
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert surface(cube).sum() == 26 and not surface(cube)[2, 2, 2]


def test_volume_result_and_summary():
    rng = np.random.default_rng(1)
    gt, pred = blobs(rng), blobs(rng)
    r = VolumeResult.from_masks("v", pred, gt, (2.0, 1.0, 0.5))
    assert (r.dice, r.iou) == dice_iou(pred, gt)
    assert r.gt_ml == pytest.approx(gt.sum() / 1000) and r.pred_ml == pytest.approx(
        pred.sum() / 1000
    )
    assert r.avd_ml == pytest.approx(abs(int(pred.sum()) - int(gt.sum())) / 1000)
    assert r.slices == 14 and r.spacing_known
    empty = VolumeResult.from_masks("e", np.zeros_like(gt), gt)
    assert empty.hd95_mm is None and not empty.spacing_known
    s = summarize_volumes([r, empty])
    assert s["n"] == 2 and s["n_hd95_undefined"] == 1 and s["hd95_mm"] == r.hd95_mm
    assert s["dice"] == pytest.approx((r.dice + 0.0) / 2) and not s["spacing_known"]
    json.dumps(s)  # plain JSON types


def _nii(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), path)


def test_evaluate_pred_gt_nifti_volumes_cli(tmp_path):
    """evaluate --pred DIR --gt DIR on NIfTI volumes: per-volume Dice, HD95 (mm, from the
    header's voxel size), |dV|; --csv one row per volume; nnU-Net names (<case>_0000_mask
    beside <case>) pair."""
    rng = np.random.default_rng(2)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    rows = {}
    for i in range(3):
        gt_XYZ, pred_XYZ = blobs(rng, (20, 22, 14)), blobs(rng, (20, 22, 14))
        gt_XYZ[5:9, 5:9, 5:9] = pred_XYZ[5:9, 5:9, 5:9] = True  # never empty
        _nii(tmp_path / "gt" / f"case_{i}.nii.gz", gt_XYZ, affine)
        _nii(tmp_path / "pred" / f"case_{i}_0000_mask.nii.gz", pred_XYZ, affine)
        rows[f"case_{i}"] = (pred_XYZ, gt_XYZ)
    out_csv = tmp_path / "vols.csv"
    args = ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    r = runner.invoke(app, [*args, "--json", "--csv", str(out_csv)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    vols = summary["volumes"]
    assert vols["n"] == 3 and vols["spacing_known"] and len(vols["cases"]) == 3
    for row in vols["cases"]:
        pred_XYZ, gt_XYZ = rows[row["name"]]
        assert row["hd95_mm"] == pytest.approx(hd95(pred_XYZ, gt_XYZ, (0.8, 0.8, 2.5)))
        assert row["dice"] == pytest.approx(dice_iou(pred_XYZ, gt_XYZ)[0])
        assert row["avd_ml"] == pytest.approx(
            abs(int(pred_XYZ.sum()) - int(gt_XYZ.sum())) * 0.8 * 0.8 * 2.5 / 1000
        )
    with out_csv.open() as f:
        table = list(csv.DictReader(f))
    assert [t["name"] for t in table] == ["case_0", "case_1", "case_2"]
    assert float(table[0]["hd95_mm"]) == pytest.approx(vols["cases"][0]["hd95_mm"])
    assert summary["n_unmatched_predictions"] == 0
    shown = runner.invoke(app, args)
    assert shown.exit_code == 0 and "HD95 mm" in shown.stdout and "case_2" in shown.stdout


def test_volumes_on_other_grids_are_refused(tmp_path):
    mask = np.zeros((8, 8, 4), bool)
    mask[2:5, 2:5, 1:3] = True
    _nii(tmp_path / "gt" / "a.nii.gz", mask, np.diag([1.0, 1.0, 3.0, 1.0]))
    _nii(tmp_path / "pred" / "a_mask.nii.gz", mask, np.diag([-1.0, 1.0, 3.0, 1.0]))
    with pytest.raises(InputError, match=r"a_mask.nii.gz: lies on another voxel grid than its"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    r = runner.invoke(
        app, ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    )
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1


def test_volume_csv_has_empty_cell_for_undefined_hd95(tmp_path):
    gt = np.zeros((6, 6, 3), bool)
    gt[1:4, 1:4, 1] = True
    _nii(tmp_path / "gt" / "a.nii.gz", gt, np.eye(4))
    _nii(tmp_path / "pred" / "a_mask.nii.gz", np.zeros_like(gt), np.eye(4))
    report = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    path = write_cases_csv(report, tmp_path / "v.csv")
    (row,) = list(csv.DictReader(path.open()))
    assert row["hd95_mm"] == "" and float(row["dice"]) == 0.0
