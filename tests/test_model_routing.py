"""Without --model, each predict input goes to the shipped model for its kind of image: DICOM MR
and 3-D NIfTI volumes to brain-mri (when the package holds it), radiographs and 2-D images to
chest-xray; stderr says which model runs and why.

The shipped-model folder is monkeypatched to a temporary one holding the real chest-xray model
and, where a test needs it, a model folder named brain-mri (the chest model's files under that
name: a real run folder, so the command runs end to end without training anything here).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from test_io_read import PYDICOM_FILES
from test_volume_predict import mr_series
from typer.testing import CliRunner

import mrisegcli.shipped as shipped
from mrisegcli.cli import app
from mrisegcli.shipped import BRAIN_MODEL, DEFAULT_MODEL, choose_model, route_input

REAL_CHEST = shipped.SHIPPED_DIR / DEFAULT_MODEL
runner = CliRunner()


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """A shipped-models folder holding chest-xray only; ``add_brain()`` adds brain-mri."""
    root = tmp_path / "shipped"
    root.mkdir()
    (root / DEFAULT_MODEL).symlink_to(REAL_CHEST, target_is_directory=True)
    monkeypatch.setattr(shipped, "SHIPPED_DIR", root)
    monkeypatch.delenv(shipped.ENV_VAR, raising=False)

    def add_brain() -> Path:
        (root / BRAIN_MODEL).symlink_to(REAL_CHEST, target_is_directory=True)
        return root / BRAIN_MODEL

    return add_brain


def _nifti(path: Path, shape=(24, 24, 3)) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 40, size=shape).astype(np.float32)
    data[6:16, 8:18] = 220
    img = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 2.0, 1.0]))
    img.set_sform(img.affine, 1)
    nib.save(img, path)
    return path


def _png(path: Path) -> Path:
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(path)
    return path


def _cr(path: Path) -> Path:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.Modality = "CR"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_routes_by_kind_of_image(tmp_path, models_dir):
    vol, flat = _nifti(tmp_path / "head.nii.gz"), _nifti(tmp_path / "flat.nii", (24, 24, 1))
    png, cr = _png(tmp_path / "chest.png"), _cr(tmp_path / "chest.dcm")
    mr_series(tmp_path / "mr", n=3)
    ct = PYDICOM_FILES / "CT_small.dcm"
    # brain-mri not installed: volumes keep today's default
    assert route_input(vol) == shipped.Route(DEFAULT_MODEL, "the default")
    assert route_input(tmp_path / "mr").model == DEFAULT_MODEL
    models_dir()
    assert route_input(vol) == shipped.Route(
        BRAIN_MODEL, "chosen for head.nii.gz, a 3-D NIfTI volume"
    )
    assert route_input(tmp_path / "mr") == shipped.Route(
        BRAIN_MODEL, "chosen for mr, a DICOM MR series"
    )
    assert route_input(PYDICOM_FILES / "MR_small.dcm").reason.endswith("a DICOM MR image")
    assert route_input(flat) == shipped.Route(DEFAULT_MODEL, "chosen for flat.nii, a 2-D image")
    assert route_input(png) == shipped.Route(DEFAULT_MODEL, "chosen for chest.png, a 2-D image")
    assert route_input(cr) == shipped.Route(DEFAULT_MODEL, "chosen for chest.dcm, a CR radiograph")
    assert route_input(ct) == shipped.Route(DEFAULT_MODEL, "the default")  # CT: no CT model
    assert route_input(tmp_path / "missing.nii.gz").model == DEFAULT_MODEL  # read later, fails
    choice = choose_model(None, {}, route=route_input(vol))
    assert choice.shipped == BRAIN_MODEL
    assert choice.describe() == (
        "model: shipped brain-mri (chosen for head.nii.gz, a 3-D NIfTI volume; trained on brain "
        "MRI)"
    )
    # --model and MRISEG_MODEL win over the route
    assert choose_model(DEFAULT_MODEL, {}, route=route_input(vol)).shipped == DEFAULT_MODEL
    run = tmp_path / "run"
    run.mkdir()
    assert choose_model(None, {shipped.ENV_VAR: str(run)}, route=route_input(vol)).spec == str(run)


def _predict(args: list[str]):
    r = runner.invoke(app, ["predict", *args, "--text", "left lung", "--device", "cpu", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    return [json.loads(line) for line in r.stdout.splitlines()], r.stderr


def test_predict_routes_each_input_and_says_why(tmp_path, models_dir):
    models_dir()
    vol, png = _nifti(tmp_path / "head.nii.gz"), _png(tmp_path / "chest.png")
    rows, stderr = _predict([str(vol), str(png), "--out", str(tmp_path / "o")])
    assert [r["model"] for r in rows] == [BRAIN_MODEL, DEFAULT_MODEL]
    assert (
        "model: shipped brain-mri (chosen for head.nii.gz, a 3-D NIfTI volume; trained on brain "
        "MRI)" in stderr
    )
    assert "model: shipped chest-xray (chosen for chest.png, a 2-D image" in stderr
    assert "warning" not in stderr  # the volume went to the brain model
    assert nib.load(rows[0]["outputs"]["mask"]).shape == (24, 24, 3)
    assert rows[0]["volume"]["slices"] == 3
    # --model chooses: the volume goes to the chest model, with today's warning
    rows, stderr = _predict([str(vol), "--model", DEFAULT_MODEL, "--out", str(tmp_path / "o2")])
    assert rows[0]["model"] is None and f"model: shipped {DEFAULT_MODEL} (--model" in stderr
    assert "warning" in stderr and "chest radiographs" in stderr


def test_without_a_brain_model_volumes_keep_the_default_and_its_warning(tmp_path, models_dir):
    vol = _nifti(tmp_path / "head.nii.gz")
    rows, stderr = _predict([str(vol), "--out", str(tmp_path / "o")])
    assert rows[0]["model"] == DEFAULT_MODEL
    assert "model: shipped chest-xray (the default; trained on chest radiographs)" in stderr
    assert "warning" in stderr and "chest radiographs and segments it slice by slice" in stderr


def test_evaluate_without_model_routes_a_dataset_of_volumes(tmp_path, models_dir):
    from test_nnunet_layout import make_nnunet

    from mrisegcli.shipped import route_dataset

    data = make_nnunet(tmp_path / "Dataset003_Brain", n_train=1, n_test=1)
    assert route_dataset([data]) is None  # brain-mri not installed: the default model
    models_dir()
    assert route_dataset([data]) == shipped.Route(
        BRAIN_MODEL, "chosen for Dataset003_Brain, a dataset of 3-D NIfTI volumes"
    )
    flat = tmp_path / "flat"
    (flat / "imagesTs").mkdir(parents=True)
    _nifti(flat / "imagesTs" / "a_0000.nii.gz", (24, 24, 1))
    assert route_dataset([flat]) is None  # 2-D NIfTI files: the default
    assert route_dataset([tmp_path]) is None  # no nnU-Net folders
    r = runner.invoke(
        app, ["evaluate", "--data", str(data), "--split", "test", "--device", "cpu", "--json"]
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert "model: shipped brain-mri (chosen for Dataset003_Brain, a dataset of 3-D NIfTI" in (
        r.stderr
    )
    assert json.loads(r.stdout)["n"] > 0
    # --model chooses
    r = runner.invoke(
        app,
        ["evaluate", "--data", str(data), "--model", DEFAULT_MODEL, "--split", "test",
         "--device", "cpu", "--json"],
    )  # fmt: skip
    assert r.exit_code == 0 and f"model: shipped {DEFAULT_MODEL} (--model" in r.stderr
