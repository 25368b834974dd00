"""nnU-Net v2 / Decathlon folders read as they are: labels from dataset.json, channel files or
4-D files, texts from a texts file or the label names, every slice a sample (empty ones too),
whole cases carved to val; and the real lgg-flair volumes when ../shared/data is present."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mrisegcli.data.layouts import detect_layout, load_dataset
from mrisegcli.data.loading import load_split_arrays
from mrisegcli.data.validate import validate_dataset
from mrisegcli.data.volume_slices import clear_cache, slice_mask
from mrisegcli.errors import InputError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LGG = DATA / "lgg-flair"
AFFINE = np.diag([-1.2, 1.2, 3.0, 1.0])  # LAS, like the lgg-flair volumes


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, 1)
    img.set_qform(affine, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def case_volumes(seed: int, shape=(20, 16, 6)) -> tuple[np.ndarray, np.ndarray]:
    """(image (I, J, K) float32, label map uint8): label 1 in slices 1..2, label 2 in 2..3,
    slices 0, 4, 5 empty; the image is bright where a label is."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    labels[3:10, 2:8, 1:3] = 1
    labels[10:16, 6:12, 2:4] = 2
    image = rng.normal(20, 3, shape).astype(np.float32)
    image[labels == 1] = 150
    image[labels == 2] = 250
    return image, labels


def make_nnunet(root: Path, *, n_train: int = 4, n_test: int = 1, json_style: str = "v2") -> Path:
    """A small nnU-Net v2 folder (two channel files per case) or a Decathlon one (one 4-D file
    per case, ``json_style="msd"``)."""
    labels_v2 = {"background": 0, "edema": 1, "enhancing_tumour": 2, "whole tumour": [1, 2]}
    if json_style == "v2":
        meta = {"channel_names": {"0": "FLAIR", "1": "T1"}, "labels": labels_v2,
                "numTraining": n_train, "file_ending": ".nii.gz"}  # fmt: skip
    else:
        meta = {"name": "test", "modality": {"0": "FLAIR", "1": "T1"},
                "labels": {"0": "background", "1": "edema", "2": "enhancing_tumour"}}  # fmt: skip
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for i in range(n_train + n_test):
        split = "Tr" if i < n_train else "Ts"
        case = f"case_{i:03d}"
        image, labels = case_volumes(i)
        if json_style == "v2":
            _save(root / f"images{split}" / f"{case}_0000.nii.gz", image)
            _save(root / f"images{split}" / f"{case}_0001.nii.gz", image * 0 + 5)
        else:
            _save(root / f"images{split}" / f"{case}.nii.gz", np.stack([image, image * 0], -1))
        _save(root / f"labels{split}" / f"{case}.nii.gz", labels)
    return root


def test_nnunet_v2_folder_becomes_slices(tmp_path):
    root = make_nnunet(tmp_path / "Dataset001_Test")
    assert detect_layout(root) == "nnunet"
    ds = load_dataset(root)
    # 5 cases x 6 slices x 3 labels; one of the 4 training cases carved to val (10%, at least 1)
    assert ds.splits() == {"train": 54, "val": 18, "test": 18}
    val_cases = {s.volume.case for s in ds.split("val")}
    assert len(val_cases) == 1 and not val_cases & {s.volume.case for s in ds.split("train")}
    texts = sorted({s.text for s in ds.samples})
    assert texts == ["edema", "enhancing tumour", "whole tumour"]  # label names as texts
    test = [s for s in ds.split("test") if s.volume.label == "whole tumour"]
    assert [s.volume.index for s in test] == list(range(6))
    assert test[0].id == "case_004/whole_tumour/000" and test[0].kind == "whole tumour"
    assert test[0].image.name == "case_004_0000.nii.gz"  # the first channel
    assert test[0].volume.values == (1, 2)
    assert validate_dataset(ds, deep=True) == []
    images, masks = load_split_arrays(test, 16, workers=2)
    # slices 0, 4 and 5 hold no label: kept, as "not there" rows with empty masks
    assert [int(m.sum() > 0) for m in masks] == [0, 1, 1, 1, 0, 0]
    assert images.shape == (6, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert images[2][masks[2] > 0].mean() > 0.5 > images[0].mean()
    # the native-resolution mask is the label map's slice in the radiological view
    _, labels = case_volumes(4)
    want = np.isin(labels[:, :, 2], (1, 2)).T[::-1]  # (J, I) rows flipped: anterior at the top
    np.testing.assert_array_equal(slice_mask(test[2]), want)


def test_decathlon_4d_images_and_a_texts_file(tmp_path):
    root = make_nnunet(tmp_path / "Task01", json_style="msd", n_train=3)
    (root / "texts.csv").write_text(
        "label,text,case\n"
        "edema,peritumoural oedema,\n"
        "edema,FLAIR hyperintensity around the tumour,\n"
        "2,enhancing tumour,\n"
        "enhancing_tumour,contrast-enhancing rim,case_003\n"
    )
    ds = load_dataset(root)
    by_case: dict = {}
    for s in ds.samples:
        by_case.setdefault((s.volume.case, s.volume.label), set()).add(s.text)
    assert by_case[("case_000", "edema")] == {
        "peritumoural oedema",
        "FLAIR hyperintensity around the tumour",
    }
    assert by_case[("case_000", "enhancing_tumour")] == {"enhancing tumour"}
    assert by_case[("case_003", "enhancing_tumour")] == {"contrast-enhancing rim"}
    two = [s.id for s in ds.samples if s.volume.case == "case_000" and s.volume.label == "edema"]
    assert "case_000/edema/t1/005" in two and len(two) == 12
    s = next(x for x in ds.samples if x.volume.case == "case_000" and x.volume.index == 1)
    assert s.image.name == "case_000.nii.gz" and s.volume.channel == 0
    images, masks = load_split_arrays([s], 16)
    assert masks.sum() > 0 and images[0][masks[0] > 0].mean() > 0.5


def test_folder_without_dataset_json_needs_texts(tmp_path):
    root = tmp_path / "vols"
    image, labels = case_volumes(0)
    _save(root / "imagesTs" / "p1_0000.nii.gz", image)
    _save(root / "labelsTs" / "p1.nii.gz", (labels > 0).astype(np.uint8))
    with pytest.raises(InputError, match=r"vols: no text for label 'foreground'.*needs a texts"):
        load_dataset(root)
    texts = tmp_path / "mine.csv"
    texts.write_text("label,text\n1,FLAIR hyperintense lesion.\n")
    ds = load_dataset(root, texts=texts)  # --texts FILE: the dataset folder may be read-only
    assert ds.splits() == {"train": 0, "val": 0, "test": 6}
    assert {s.text for s in ds.samples} == {"FLAIR hyperintense lesion."}
    (root / "texts.jsonl").write_text('{"label": "foreground", "text": "lesion"}\n')
    assert {s.text for s in load_dataset(root).samples} == {"lesion"}
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,text\na.png,x\n")
    with pytest.raises(InputError, match="m.csv: a texts file applies to nnU-Net"):
        load_dataset(manifest, texts=texts)


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no label", r"labelsTr: no label map in labelsTr/ for case\(s\) case_001"),
        ("no channel", r"imagesTr: case 'case_001' lacks channel file\(s\) case_001_0001"),
        ("other grid", r"case_001.nii.gz: label map does not lie on the image's voxel grid"),
        ("bad json", r"dataset.json: not valid JSON"),
        ("unknown label", r"texts.csv: row 2: unknown label 'necrosis'; labels: edema \(1\)"),
        ("unknown case", r"texts.csv: row 2: no case 'case_999' in the dataset"),
    ],
)
def test_broken_folders_are_one_clear_error(tmp_path, breakage, message):
    root = make_nnunet(tmp_path / "d", n_train=2, n_test=0)
    if breakage == "no label":
        (root / "labelsTr" / "case_001.nii.gz").unlink()
    elif breakage == "no channel":
        (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    elif breakage == "other grid":
        _save(root / "labelsTr" / "case_001.nii.gz", np.zeros((20, 16, 5), np.uint8))
    elif breakage == "bad json":
        (root / "dataset.json").write_text("{labels: 1")
    else:
        case = "case_999" if breakage == "unknown case" else ""
        label = "necrosis" if breakage == "unknown label" else "edema"
        (root / "texts.csv").write_text(f"label,text,case\n{label},x,{case}\n")
    with pytest.raises(InputError, match=message):
        load_dataset(root)


def test_label_values_no_label_names_are_refused(tmp_path):
    root = make_nnunet(tmp_path / "d", n_train=2, n_test=0)
    _, labels = case_volumes(1)
    labels[0, 0, 0] = 7
    _save(root / "labelsTr" / "case_001.nii.gz", labels)
    clear_cache()
    ds = load_dataset(root, val_fraction=0)
    problems = validate_dataset(ds, deep=True)
    assert len(problems) == 1  # once per volume, not once per slice or label
    assert "value(s) 7 that no label names" in problems[0].reason
    case1 = [s for s in ds.samples if s.volume.case == "case_001"]
    with pytest.raises(InputError, match="case_001.nii.gz: label map holds value"):
        load_split_arrays(case1[:1], 16)


# ----------------------------------------------------------------------------- real volumes

needs_lgg = pytest.mark.skipif(
    not (LGG / "volumes" / "imagesTs").is_dir(), reason="shared lgg-flair volumes not present"
)


@needs_lgg
def test_lgg_flair_volumes_as_they_are(tmp_path):
    """The shared volumes (no dataset.json): 16 patients in imagesTs/labelsTs, every slice a
    test sample; a slice as the loader sees it is the 2-D set's JPEG of that slice (the
    radiological view of the LAS volume), and its mask the 2-D set's mask."""
    root = LGG / "volumes"
    assert not (root / "dataset.json").exists()
    texts = tmp_path / "texts.csv"
    texts.write_text("label,text\n1,FLAIR hyperintense lesion.\n")
    ds = load_dataset(root, texts=texts)
    cases = {s.volume.case for s in ds.samples}
    assert len(cases) == 16 and ds.splits()["train"] == 0
    assert ds.splits()["test"] == sum(
        nib.load(p).shape[2] for p in (root / "imagesTs").glob("*_0000.nii.gz")
    )
    case = "TCGA_CS_4943"
    s = next(x for x in ds.samples if x.volume.case == case and x.volume.index == 11)
    jpeg = np.asarray(Image.open(LGG / "images" / f"{case}_12.jpg").convert("L"), np.float32)
    from mrisegcli.data.volume_slices import volume_inputs

    shown = volume_inputs(s.image, 0, 256)[11]  # normalised over the volume, 256 px as stored
    corr = np.corrcoef(shown.ravel(), jpeg.ravel())[0, 1]
    assert corr > 0.99, corr
    masks = sorted((LGG / "masks").glob(f"{case}_12*.png"))
    lesion = next((m for m in masks if "absent" not in m.name and "contra" not in m.name), None)
    if lesion is not None and "_left" not in lesion.name and "_right" not in lesion.name:
        want = np.asarray(Image.open(lesion)) > 0
        np.testing.assert_array_equal(slice_mask(s), want)
    assert slice_mask(s).sum() > 0
