"""The chest-radiograph model that ships in the package: the first command works.

Radiographs as users have them: DICOM CR/DX (MONOCHROME1 and 2, 12- and 16-bit, 2048 px) built
with pydicom from the shared JSRT/cxr-infection PNGs, and the PNGs themselves. Tests that need
the shared data skip when ``../shared/data`` is absent; the rest use files inside packages.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.metrics import dice_iou
from mrisegcli.shipped import DEFAULT_MODEL, ENV_VAR, choose_model, shipped_model

runner = CliRunner()
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "jsrt").is_dir(), reason="shared data not present")


def invoke(args: list[str], env: dict[str, str] | None = None):
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_the_default_model_ships_inside_the_package() -> None:
    model = shipped_model(DEFAULT_MODEL)
    assert model is not None, "the shipped chest-radiograph model is missing from the package"
    names = {p.name for p in model.path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "mask_vq.safetensors",
        "tokenizer.json",
        "README.md",
        "evaluation.json",
    } <= names
    assert model.size_bytes <= 25e6
    assert not any(n.endswith((".pt", ".pth", ".bin", ".pkl")) for n in names)  # safetensors only
    assert {"cxr-infection", "jsrt"} <= set(model.data.split(", "))
    card = (model.path / "README.md").read_text()
    for needed in (
        "CC BY-SA 4.0",
        "JSRT",
        "research",
        "not for diagnosis",
        "pip install mrisegcli",
    ):
        assert needed in card, needed


def test_models_lists_it_with_data_size_and_metrics() -> None:
    rows = [json.loads(line) for line in invoke(["models", "--json"]).stdout.splitlines()]
    default = next(r for r in rows if r["default"])
    assert default["name"] == DEFAULT_MODEL and default["size_bytes"] > 1e5
    assert "describe" in default["evaluation"]["kinds"]
    table = invoke(["models"]).stdout
    assert DEFAULT_MODEL in table and "MB" in table


def test_model_choice_order(tmp_path: Path) -> None:
    run = tmp_path / "my-run"
    run.mkdir()
    assert choose_model(None, {}).shipped == DEFAULT_MODEL
    assert choose_model(None, {ENV_VAR: str(run)}).spec == str(run)
    assert choose_model(None, {ENV_VAR: str(run)}).source == ENV_VAR
    assert choose_model(str(run), {ENV_VAR: "elsewhere"}).source == "--model"
    assert choose_model(DEFAULT_MODEL, {}).shipped == DEFAULT_MODEL  # by name
    assert choose_model("user/repo", {}).spec == "user/repo"  # a Hub id is left to the Hub


def _dicom(
    png: Path, out: Path, *, monochrome1: bool, bits: int, modality: str, side: int = 2048
) -> Path:
    """A CR/DX file with the PNG's pixels upsampled to ``side`` and stored at ``bits`` bits."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    grey = np.asarray(Image.open(png).convert("L").resize((side, side), Image.Resampling.BILINEAR))
    top = 2**bits - 1
    values = grey.astype(np.float64) / 255 * top
    stored = (top - values) if monochrome1 else values
    sop_class = "1.2.840.10008.5.1.4.1.1.1" if modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = modality, "TEST", "Test^Chest"
    ds.StudyDate, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "20261201", "1", 1, 1
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.PatientBirthDate, ds.PatientSex, ds.StudyTime = "", "O", "120000"
    ds.Manufacturer = "test"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelSpacing = ["0.175", "0.175"]
    ds.PixelData = np.round(stored).astype(np.uint16).tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def _rows(
    dataset: str, kind: str | None = None, target: str | None = None, split: str = "test"
) -> list[dict]:
    with open(DATA / dataset / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    return [
        r
        for r in rows
        if (kind is None or r["kind"] == kind) and (target is None or r["target"] == target)
    ]


def _gt(dataset: str, row: dict) -> np.ndarray:
    return np.asarray(Image.open(DATA / dataset / row["mask"])) > 0


@needs_data
@pytest.mark.parametrize("photometric,bits,modality", [(True, 12, "CR"), (False, 16, "DX")])
def test_first_command_on_dicom_radiographs(
    tmp_path: Path, photometric: bool, bits: int, modality: str
) -> None:
    row = _rows("jsrt", target="heart")[0]
    dcm = _dicom(
        DATA / "jsrt" / row["image"],
        tmp_path / "chest.dcm",
        monochrome1=photometric,
        bits=bits,
        modality=modality,
    )
    r = invoke(
        [
            "predict",
            str(dcm),
            "--text",
            "cardiac silhouette",
            "--out",
            str(tmp_path / "out"),
            "--format",
            "nii",
            "--json",
            "--device",
            "cpu",
        ],
        env={ENV_VAR: ""},
    )
    assert f"model: shipped {DEFAULT_MODEL}" in r.stderr
    assert "warning" not in r.stderr  # a radiograph: no modality warning
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["found"] and line["presence"] > 0.5 and line["modality"] == modality
    import nibabel as nib

    mask = np.asarray(nib.load(line["outputs"]["mask"]).dataobj).squeeze()
    assert mask.shape == (2048, 2048)
    small = np.asarray(Image.fromarray(mask.T.astype(np.uint8) * 255).resize((256, 256))) > 127
    small = (
        small
        if dice_iou(small, _gt("jsrt", row))[0] > dice_iou(small.T, _gt("jsrt", row))[0]
        else small.T
    )
    assert dice_iou(small, _gt("jsrt", row))[0] > 0.8


@needs_data
def test_png_radiograph_users_wording(tmp_path: Path) -> None:
    """A batch of test radiographs with a wording training never used (the golden check)."""
    rows = _rows("jsrt", target="left_lung")[:4]
    images = [str(DATA / "jsrt" / r["image"]) for r in rows]
    r = invoke(
        [
            "predict",
            *images,
            "--text",
            "the left lung field",
            "--out",
            str(tmp_path),
            "--json",
            "--device",
            "cpu",
        ]
    )
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    dices = [
        dice_iou(np.asarray(Image.open(line["outputs"]["mask"])) > 0, _gt("jsrt", row))[0]
        for line, row in zip(lines, rows, strict=True)
    ]
    assert np.mean(dices) > 0.85, dices


@needs_data
def test_a_finding_that_is_not_there_gives_no_region_mostly(tmp_path: Path) -> None:
    """Every normal test radiograph asked for the infection its manifest row names: "not
    found" (the presence head) on at least 95% of the 48."""
    rows = _rows("cxr-infection", kind="absent")
    assert len(rows) == 48
    found = []
    for text in sorted({r["text"] for r in rows}):
        images = [str(DATA / "cxr-infection" / r["image"]) for r in rows if r["text"] == text]
        out = tmp_path / str(len(found))
        r = invoke(["predict", *images, "--text", text, "--out", str(out), "--device", "cpu"])
        lines = r.stdout.strip().splitlines()
        assert len(lines) == len(images)
        found += ["not found (presence" not in line for line in lines]
    assert len(found) == 48 and sum(found) <= 48 * 0.05, sum(found)


def test_a_ct_slice_runs_with_a_warning(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")
    r = invoke(
        [
            "predict",
            ct,
            "--text",
            "left lung",
            "--out",
            str(tmp_path),
            "--format",
            "nii",
            "--device",
            "cpu",
        ]
    )
    assert "warning" in r.stderr and "CT" in r.stderr and "chest radiographs" in r.stderr
    assert len(r.stdout.strip().splitlines()) == 1


@needs_data
def test_evaluate_works_without_model_and_reports_kinds(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    rows = _rows("jsrt", target="heart")[:3] + _rows("jsrt", target="right_lung")[:3]
    for r in rows:
        for col in ("image", "mask"):
            dst = tmp_path / r[col]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes((DATA / "jsrt" / r[col]).read_bytes())
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = json.loads(
        invoke(["evaluate", "--data", str(manifest), "--json", "--device", "cpu"]).stdout
    )
    assert out["n"] == 6 and out["dice"] > 0.8
    assert set(out["targets"]) == {"heart", "right_lung"}


def test_a_prompt_longer_than_the_text_context_is_cut_with_a_warning(tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(png)
    long_prompt = " ".join(["left upper lung zone"] * 20)
    r = invoke(
        [
            "predict",
            str(png),
            "--text",
            long_prompt,
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert "warning: the prompt has 80 tokens" in r.stderr and "dropped" in r.stderr


def test_python_api_segments_arrays_at_their_own_size() -> None:
    from mrisegcli import Segmenter

    seg = Segmenter.load()
    masks = seg.segment(
        [np.full((300, 200), 7.0), np.zeros((64, 64), np.uint16)], ["heart", "left lung"]
    )
    assert [m.shape for m in masks] == [(300, 200), (64, 64)] and masks[0].dtype == bool
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        seg.segment([np.zeros((8, 8))] * 2, ["a", "b", "c"])


@needs_data
def test_python_api_on_files_matches_the_ground_truth() -> None:
    from mrisegcli import Segmenter

    rows = _rows("jsrt", target="heart")[:3]
    masks = Segmenter.load().segment([DATA / "jsrt" / r["image"] for r in rows], "heart")
    assert np.mean([dice_iou(m, _gt("jsrt", r))[0] for m, r in zip(masks, rows, strict=True)]) > 0.8


@needs_data
def test_the_readme_first_command_script(tmp_path: Path) -> None:
    """examples/readme_first_command.py: a 12-bit MONOCHROME1 CR file of a cxr-infection test
    radiograph, the README's command on it, a DICOM SEG referencing it that covers the
    radiologists' infection mask; a normal radiograph "not found", a prompt the model never
    learnt refused; run twice, the second run replaces its own output."""
    import subprocess
    import sys

    import pydicom

    script = Path(__file__).resolve().parents[1] / "examples" / "readme_first_command.py"
    cmd = [sys.executable, str(script), "--data", str(DATA), "--out", str(tmp_path)]
    for _ in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, ENV_VAR: ""})
        assert r.returncode == 0, r.stderr
    assert '$ mriseg predict chest.dcm --text "bilateral lower lobe opacity"' in r.stdout
    assert "chest.dcm -> chest_mask.dcm (" in r.stdout and "presence" in r.stdout
    assert "normal.dcm -> normal_mask.dcm: not found (presence 0." in r.stdout
    assert "chest.dcm: prompt refused, word(s) this model never learnt: 'pleural', 'effusion'" in (
        r.stdout
    )
    cr = pydicom.dcmread(tmp_path / "chest.dcm")
    assert (cr.Modality, cr.PhotometricInterpretation, cr.BitsStored, cr.Rows) == (
        "CR",
        "MONOCHROME1",
        12,
        2048,
    )
    seg = pydicom.dcmread(tmp_path / "chest_mask.dcm")
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == cr.SeriesInstanceUID
    row = _rows("cxr-infection", target="infection:left+right:lower")[0]  # the script's row
    pred = np.asarray(Image.fromarray(seg.pixel_array.astype(np.uint8) * 255).resize((256, 256)))
    assert dice_iou(pred > 127, _gt("cxr-infection", row))[0] > 0.5


def test_compare_shipped_evaluations_reads_both_files(tmp_path: Path) -> None:
    """examples/compare_shipped_evaluations.py: the shipped evaluation against a copy whose
    describe rows were all found prints both numbers in each cell."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    old = root / "src" / "mrisegcli" / "shipped" / "chest-xray" / "evaluation.json"
    ev = json.loads(old.read_text())
    ev["detection"]["kinds"]["describe"]["found"] = 1.0
    ev["kinds"].pop("zone")
    new = tmp_path / "new.json"
    new.write_text(json.dumps(ev))
    script = root / "examples" / "compare_shipped_evaluations.py"
    r = subprocess.run([sys.executable, str(script), str(old), str(new)], capture_output=True,
                       text=True, check=True)  # fmt: skip
    was = json.loads(old.read_text())["detection"]["kinds"]["describe"]["found"]
    assert f"| describe | - | {was:.1%} / 100.0% |" in r.stdout
    zone = json.loads(old.read_text())["kinds"]["zone"]["dice"]
    assert f"| zone | {zone:.3f} / - |" in r.stdout and "volumes" not in r.stdout
    brain = old.parents[1] / "brain-mri" / "evaluation.json"
    r = subprocess.run([sys.executable, str(script), str(brain), str(brain)], capture_output=True,
                       text=True, check=True)  # fmt: skip
    n = json.loads(brain.read_text())["volumes"]["n"]
    assert f"| {n} / {n} |" in r.stdout  # the brain model's volumes
