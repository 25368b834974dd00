"""Volumes in, volumes out: NIfTI (3-D, 4-D channel-last, any orientation) and DICOM MR series,
cut into axial radiological slices, one 3-D mask back in the source geometry."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid
from test_io_read import PYDICOM_FILES
from test_predict_workflow import FakeSegmenter, run_predict

from mrisegcli.io import read_mask, read_scan
from mrisegcli.io.volume import VIEW_CODES, read_input_scan, slice_view
from mrisegcli.workflow.predict import PredictResult, SegmenterSlices
from mrisegcli.workflow.segmenter import Prediction

TEXT = "FLAIR hyperintense lesion."


class RecordingModel(FakeSegmenter):
    """Foreground = normalised image > 0.5 (none with ``empty``); keeps the slices of every
    input it was given."""

    def __init__(self, size: int = 16, empty: bool = False) -> None:
        super().__init__(size, with_extras=False)
        self.empty = empty
        self.seen: list[np.ndarray] = []

    def predict(self, images_NSS, texts, **kwargs):
        self.seen.append(images_NSS.copy())
        return super().predict(images_NSS, texts, **kwargs)

    def rule(self, image_BSS):
        return Prediction(torch.zeros_like(image_BSS) if self.empty else (image_BSS > 0.5).float())


def _volume_XYZ(shape=(24, 20, 6), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy dark volume with a bright box (I, J, K); returns (data, truth)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 30, size=shape).astype(np.float32)
    truth = np.zeros(shape, bool)
    truth[4:12, 3:9, 1:4] = True
    data[truth] = 200
    return data, truth


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, 1)
    img.set_qform(affine, 1)
    nib.save(img, path)
    return path


def test_las_volume_is_seen_in_radiological_view(tmp_path):
    """An LAS volume (as the lgg-flair set stores it): each slice reaches the model with
    anterior at the top, the patient's right on the left; the mask comes back on the source
    grid with the source affine."""
    data, truth = _volume_XYZ()
    affine = np.diag([-0.9, 0.9, 3.0, 1.0])
    affine[:3, 3] = [10, -20, 5]
    src = _save(tmp_path / "flair.nii.gz", data, affine)
    model = RecordingModel(size=data.shape[0])  # square, no resizing for the J axis' 20 -> 24
    (r,) = run_predict(model, [src], TEXT, out_dir=tmp_path / "out")
    scan = read_scan(src)
    view = slice_view(scan)
    assert view.oriented and view.source_codes == ("L", "A", "S")
    (seen,) = model.seen
    assert seen.shape == (6, 24, 24)
    # the view flips the rows (J runs posterior -> anterior in the file): the box of the file's
    # rows 3..8 sits at rows 11..16 of 20 in the view, i.e. lower half after the stretch to 24
    fg_rows = np.nonzero((seen[2] > 0.5).any(axis=1))[0]
    assert fg_rows.min() > 10 and fg_rows.max() < 21
    out = nib.load(r.outputs["mask"])
    assert out.shape == data.shape
    np.testing.assert_allclose(out.affine, affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj) > 0, truth)
    facts = r.volume
    assert facts["sliced"] == "axial" and facts["stored_plane"] == "axial"
    assert facts["slices"] == 6 and facts["slices_with_foreground"] == 3
    assert facts["foreground_voxels"] == truth.sum() == r.foreground_pixels
    assert facts["foreground_ml"] == pytest.approx(truth.sum() * 0.9 * 0.9 * 3.0 / 1000)
    assert facts["spacing_mm"] == pytest.approx([3.0, 0.9, 0.9])
    assert json.loads(json.dumps(r.to_json()))["volume"] == facts


def test_sagittal_volume_is_cut_axially(tmp_path):
    """A volume stored as sagittal slices (I -> A, J -> S, K -> R) is cut along the
    superior-inferior axis: the model sees J-many slices, not K-many; the mask is on the source
    grid voxel for voxel."""
    data, truth = _volume_XYZ(shape=(14, 10, 8))
    affine = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    src = _save(tmp_path / "sag.nii", data, affine)
    model = RecordingModel(size=16)
    (r,) = run_predict(model, [src], TEXT, out_dir=tmp_path)
    assert model.seen[0].shape[0] == data.shape[1]  # the J axis points superior
    assert r.volume["stored_plane"] == "sagittal" and r.volume["sliced"] == "axial"
    assert r.volume["slices"] == 10 and r.slices == 8  # the source keeps its own slices
    mask = nib.load(r.outputs["mask"])
    assert mask.shape == data.shape
    np.testing.assert_allclose(mask.affine, affine)
    got = np.asarray(mask.dataobj) > 0
    assert (got & truth).sum() / (got | truth).sum() > 0.9


def test_volume_without_orientation_keeps_stored_slices(tmp_path):
    """No qform/sform code: the orientation is unknown, the stored slices are used."""
    data, _ = _volume_XYZ(shape=(12, 10, 5))
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_sform(None, 0)
    img.set_qform(None, 0)
    nib.save(img, tmp_path / "plain.nii")
    scan = read_scan(tmp_path / "plain.nii")
    assert not slice_view(scan).oriented
    model = RecordingModel()
    (r,) = run_predict(model, [tmp_path / "plain.nii"], TEXT, out_dir=tmp_path / "o")
    assert model.seen[0].shape[0] == 5 and r.volume["sliced"] == "as stored"


def test_view_round_trip_every_orientation():
    """For all 48 axis orders and flips: to_view / from_view are exact inverses, and in the view
    the columns run to the patient's left (RAS x falls), the rows posterior (y falls) and the
    slices superior (z rises)."""
    from itertools import permutations, product

    from mrisegcli.io.scan import Scan

    shape = (3, 4, 5)  # (D, H, W)
    d, h, w = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    whd1 = np.stack([w, h, d, np.ones_like(w)]).reshape(4, -1).astype(float)
    for perm, signs in product(permutations(range(3)), product((1, -1), repeat=3)):
        aff = np.zeros((4, 4))
        aff[3, 3] = 1
        for axis, (target, sign) in enumerate(zip(perm, signs, strict=True)):
            aff[target, axis] = sign * (axis + 1)
        hdr = nib.Nifti1Header()
        hdr.set_sform(aff, 1)
        ras = (aff @ whd1)[:3].reshape(3, *shape).astype(np.float32)  # x, y, z of each voxel
        scan = Scan(ras[0], Path("x.nii"), "nifti", (1, 1, 1), aff, [], hdr, {})
        view = slice_view(scan)
        assert view.oriented and view.moves != (perm == (0, 1, 2) and signs == (-1, -1, 1))
        for coord in ras:
            np.testing.assert_array_equal(view.from_view(view.to_view(coord)), coord)
        x, y, z = (view.to_view(c) for c in ras)
        assert (np.diff(x, axis=2) < 0).all() and (np.diff(y, axis=1) < 0).all()
        assert (np.diff(z, axis=0) > 0).all()
    assert VIEW_CODES == ("L", "P", "S")


def test_4d_channel_last_gives_first_channel_and_3d_mask(tmp_path):
    data, truth = _volume_XYZ(shape=(16, 16, 4))
    other = np.full_like(data, 7.0)  # channel 1: flat, would give an empty mask
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    src = _save(tmp_path / "BRATS_001.nii.gz", np.stack([data, other], axis=-1), affine)
    scan = read_input_scan(src)
    assert scan.shape == (4, 16, 16) and scan.meta["channels"] == 2
    with pytest.raises(Exception, match="BRATS_001.nii.gz: has 2 channels.*channel 5"):
        read_input_scan(src, channel=5)
    (r,) = run_predict(RecordingModel(), [src], TEXT, out_dir=tmp_path / "o")
    out = nib.load(r.outputs["mask"])
    assert out.shape == (16, 16, 4)  # 3-D: one mask for the volume
    np.testing.assert_allclose(out.affine, affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj) > 0, truth)
    assert r.volume["channel"] == 0 and r.volume["channels"] == 2


def test_channel_option_picks_the_channel_of_a_4d_input(tmp_path):
    from typer.testing import CliRunner

    from mrisegcli.cli import app

    data, truth = _volume_XYZ(shape=(16, 16, 4))
    flat = np.full_like(data, 7.0)
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    src = _save(tmp_path / "BRATS_002.nii.gz", np.stack([flat, data], axis=-1), affine)
    (first,) = run_predict(RecordingModel(), [src], TEXT, out_dir=tmp_path / "a")
    assert not first.found  # channel 0 is flat: nothing above half the range
    (second,) = run_predict(RecordingModel(), [src], TEXT, out_dir=tmp_path / "b", channel=1)
    np.testing.assert_array_equal(np.asarray(nib.load(second.outputs["mask"]).dataobj) > 0, truth)
    assert second.volume["channel"] == 1 and second.volume["channels"] == 2
    # the command line: a channel that is not there is one line naming the file, nothing written
    r = CliRunner().invoke(
        app, ["predict", str(src), "--text", TEXT, "--channel", "2", "--out", str(tmp_path / "c")]
    )
    assert r.exit_code != 0 and "BRATS_002.nii.gz: has 2 channels (0..1); channel 2" in r.output
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_empty_volume_is_not_found(tmp_path):
    data, _ = _volume_XYZ()
    src = _save(tmp_path / "v.nii.gz", data, np.diag([-1.0, 1, 1, 1]))
    (r,) = run_predict(RecordingModel(empty=True), [src], TEXT, out_dir=tmp_path / "o")
    assert not r.found and r.foreground_pixels == 0
    assert r.volume["slices_with_foreground"] == 0 and r.volume["foreground_ml"] == 0
    assert not np.asarray(nib.load(r.outputs["mask"]).dataobj).any()


def test_presence_comes_from_the_models_slices(tmp_path):
    """A model that reports a per-slice presence: the volume's presence is its highest."""

    class WithPresence(RecordingModel):
        def predict(self, images_NSS, texts, **kwargs):
            pred = super().predict(images_NSS, texts, **kwargs)
            pred.presence = torch.linspace(0.1, 0.7, len(images_NSS))
            return pred

    data, _ = _volume_XYZ()
    src = _save(tmp_path / "v.nii.gz", data, np.diag([-1.0, 1, 1, 1]))
    (r,) = run_predict(WithPresence(), [src], TEXT, out_dir=tmp_path / "o")
    assert r.presence == pytest.approx(0.7)


def mr_series(folder: Path, n: int = 6) -> tuple[list[Path], np.ndarray]:
    """``n`` MR slices (MR_small moved along its normal), a bright box in slices 2..3;
    returns the paths in spatial order and the truth (n, 64, 64)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    iop = np.array(base.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    series_uid, paths = generate_uid(), []
    truth = np.zeros((n, 64, 64), bool)
    truth[2:4, 20:40, 10:30] = True
    for k in range(n):
        ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        pos = np.array(base.ImagePositionPatient, dtype=float) + normal * 4.0 * k
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        px = np.full((64, 64), 100, np.int16)
        px[truth[k]] = 3000
        ds.PixelData = px.tobytes()
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, truth


def test_dicom_mr_series_gives_seg_of_every_slice(tmp_path):
    paths, truth = mr_series(tmp_path / "mr")
    model = RecordingModel(size=64)  # no resizing: the mask is the box exactly
    (r,) = run_predict(model, [tmp_path / "mr"], TEXT, out_dir=tmp_path / "o")
    assert r.outputs["mask"].name == "mr_mask.dcm" and r.modality == "MR"
    seg = pydicom.dcmread(r.outputs["mask"])
    refs = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for i in s.ReferencedInstanceSequence}  # fmt: skip
    assert refs == {pydicom.dcmread(p).SOPInstanceUID for p in paths}
    assert int(seg.NumberOfFrames) == len(paths)
    np.testing.assert_array_equal(read_mask(r.outputs["mask"]), truth)
    assert r.volume["sliced"] == "axial" and r.volume["slices_with_foreground"] == 2
    assert r.volume["foreground_ml"] == pytest.approx(truth.sum() * 0.3125**2 * 4.0 / 1000)


def test_segmenter_slices_progress_per_volume():
    """Slices decoded in batches of the segmenter's batch size, one bar per volume."""
    bars: list[tuple[str, int | None, list]] = []

    @contextmanager
    def stage(description, total):
        calls: list = []
        bars.append((description, total, calls))
        yield lambda done, total=None: calls.append((done, total))

    seg = FakeSegmenter(8, batch_size=4, with_extras=False)
    model = SegmenterSlices(seg, stage=stage)
    pred = model(np.zeros((10, 8, 8), np.float32), TEXT, label="v.nii.gz: 10 slices")
    assert pred.prob.shape == (10, 8, 8) and pred.prob.dtype == np.float32
    assert bars == [("v.nii.gz: 10 slices", 10, [(4, 10), (8, 10), (10, 10)])]
    assert seg.batches == [4, 4, 2]
    model(np.zeros((1, 8, 8), np.float32), TEXT)  # no label (a 2-D image): no bar
    assert len(bars) == 1 and seg.bundle.text.calls == [[TEXT]]  # tokenised once


def test_result_json_of_a_2d_image_has_no_volume():
    assert PredictResult(Path("a.png")).to_json()["volume"] is None
