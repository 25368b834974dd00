"""The predict workflow with a fake model: inputs, output planning, masks on the scan's grid."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from test_io_read import NIBABEL_FILES, PYDICOM_FILES, ct_series

from mrisegcli.config import RunConfig
from mrisegcli.errors import InputError, MrisegError, OutputExistsError
from mrisegcli.io import read_mask, read_scan
from mrisegcli.workflow.predict import (
    ModelOptionError,
    ModelOutputError,
    PredictOptions,
    expand_inputs,
    plan_outputs,
    predict_batch,
    validate_text,
)
from mrisegcli.workflow.segmenter import Prediction, Segmenter

TEXT = "  Unilateral pulmonary infection, one infected area, all right lung.  "
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class FakeTokenizer:
    """What a Segmenter reads of its text tokenizer: two tokens a prompt; records each call."""

    pad_token_id, eos_token_id = 0, None

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts, **kwargs):
        self.calls.append(list(texts))
        return {"input_ids": [[5, 6] for _ in texts]}


class FakeSegmenter(Segmenter):
    """A Segmenter whose decoding is a rule (:meth:`rule`) and all else its own (batching,
    prompts, presence): foreground = normalised image > 0.5; with extras, uncertainty = the
    image and two coarse-to-fine steps."""

    def __init__(
        self,
        size: int = 32,
        *,
        with_extras: bool = True,
        batch_size: int = 32,
        paradigm: str = "next-scale",
    ) -> None:
        cfg = RunConfig(image_size=size, text_len=4)
        text = SimpleNamespace(text=FakeTokenizer())
        device = torch.device("cpu")
        super().__init__(paradigm, torch.nn.Identity(), text, cfg, device, batch_size=batch_size)
        self.with_extras = with_extras
        self.calls: list[tuple[tuple[int, ...], str]] = []  # (slices' shape, text) per input
        self.batches: list[int] = []  # the batch sizes the model was given

    def predict(self, images_NSS, texts, **kwargs):
        self.calls.append((images_NSS.shape, texts))
        return super().predict(images_NSS, texts, **kwargs)

    def predict_tensors(self, image_B1SS, text_ids, text_mask, **kwargs):
        assert text_ids.shape == text_mask.shape == (image_B1SS.shape[0], 4)
        self.batches.append(image_B1SS.shape[0])
        return self.rule(image_B1SS[:, 0])

    def rule(self, image_BSS: torch.Tensor) -> Prediction:
        prob = (image_BSS > 0.5).float()
        if not self.with_extras:
            return Prediction(prob)
        coarse = prob[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2)  # blocky
        return Prediction(prob, image_BSS.clone(), [coarse, prob])


def run_predict(model, inputs, text, *, out_dir, stdin=None, on_result=None, **options):
    """:func:`predict_batch` with ``model`` already loaded and ``options`` the fields of
    :class:`PredictOptions`."""
    return predict_batch(
        lambda: model,
        inputs=inputs,
        text=text,
        options=PredictOptions(out_dir=out_dir, **options),
        stdin=stdin,
        on_result=on_result,
    )


def _box_png(
    path: Path, shape=(37, 53), box=(slice(8, 30), slice(10, 40)), fmt="PNG"
) -> np.ndarray:
    """A bright box on a dark noisy background; returns the true box mask (H, W)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 40, size=shape).astype(np.uint8)
    truth = np.zeros(shape, dtype=bool)
    truth[box] = True
    img[truth] = 220
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format=fmt)
    return truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- text


def test_text_validation(tmp_path):
    assert validate_text("  Läsion links, 左肺  ") == "Läsion links, 左肺"
    for bad in ["", "   \n\t"]:
        with pytest.raises(MrisegError, match="--text is empty"):
            validate_text(bad)
    with pytest.raises(MrisegError, match="10000"):
        validate_text("a" * 10_001)
    _box_png(tmp_path / "a.png")
    seg = FakeSegmenter()
    with pytest.raises(MrisegError, match="--text is empty"):
        run_predict(seg, [tmp_path / "a.png"], " ", out_dir=tmp_path / "out")
    assert seg.calls == [] and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- formats


def test_nonsquare_png_with_all_extras(tmp_path):
    truth = _box_png(tmp_path / "in" / "chest.png")
    seg = FakeSegmenter(32)
    seen = []
    results = run_predict(
        seg, [str(tmp_path / "in" / "chest.png")], TEXT, out_dir=tmp_path / "out",
        uncertainty=True, samples=2, overlay=True, steps_png=True, on_result=seen.append,
    )  # fmt: skip
    (r,) = results
    assert seen == results and r.error is None
    assert seg.calls == [((1, 32, 32), TEXT.strip())]
    out = tmp_path / "out"
    assert r.outputs == {
        "mask": out / "chest_mask.png",
        "uncertainty": out / "chest_uncertainty.png",
        "overlay": out / "chest_overlay.png",
        "steps": out / "chest_steps.png",
    }
    assert _files(out) == sorted(p.name for p in r.outputs.values())  # no temp files left
    mask = read_mask(out / "chest_mask.png")
    assert mask.shape == (37, 53)
    assert _iou(mask, truth) > 0.85
    assert r.shape == (37, 53) and r.slices == 1
    assert r.foreground_pixels == int(mask.sum())
    assert r.foreground_fraction == pytest.approx(mask.mean())
    assert Image.open(out / "chest_mask.png").info["Description"] == TEXT.strip()
    unc = np.asarray(Image.open(out / "chest_uncertainty.png"))
    assert unc.shape == (37, 53, 3)  # heat map on the scan's grid
    assert unc[truth].mean() > unc[~truth].mean() + 50  # "uncertainty" = the bright image
    over = np.asarray(Image.open(out / "chest_overlay.png"))
    assert over.shape == (37, 53, 3)
    steps = np.asarray(Image.open(out / "chest_steps.png"))
    assert steps.shape == (32, 2 * 32 + 2)  # two steps side by side, 2-pixel gap
    assert not np.array_equal(steps[:, :32], steps[:, 34:])  # coarse differs from fine
    js = json.loads(json.dumps(r.to_json()))
    assert js["outputs"]["mask"] == str(out / "chest_mask.png")
    assert js["shape"] == [37, 53] and js["error"] is None


def test_jpeg_beside_input(tmp_path):
    truth = _box_png(tmp_path / "x-ray.jpg", shape=(60, 41), box=(slice(5, 50), slice(4, 20)),
                     fmt="JPEG")  # fmt: skip
    (r,) = run_predict(FakeSegmenter(), [tmp_path / "x-ray.jpg"], TEXT, out_dir=None)
    assert r.outputs["mask"] == tmp_path / "x-ray_mask.png"
    mask = read_mask(r.outputs["mask"])
    assert mask.shape == (60, 41) and _iou(mask, truth) > 0.85


def test_dicom_file_gives_seg_referencing_source(tmp_path):
    src = PYDICOM_FILES / "CT_small.dcm"
    (r,) = run_predict(FakeSegmenter(), [src], TEXT, out_dir=tmp_path, uncertainty=True, samples=2)
    assert r.outputs["mask"] == tmp_path / "CT_small_mask.dcm"
    assert r.outputs["uncertainty"] == tmp_path / "CT_small_uncertainty.nii.gz"
    seg = pydicom.dcmread(r.outputs["mask"])
    source = pydicom.dcmread(src)
    assert seg.SOPClassUID == SEG_CLASS
    refs = [i.ReferencedSOPInstanceUID
            for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]  # fmt: skip
    assert refs == [source.SOPInstanceUID]
    assert seg.SegmentSequence[0].SegmentDescription == TEXT.strip()[:64]
    mask = read_mask(r.outputs["mask"])
    assert mask.shape == (128, 128)
    assert 0 < int(mask.sum()) == r.foreground_pixels < mask.size
    unc = nib.load(r.outputs["uncertainty"])
    assert unc.shape == (128, 128) and unc.get_data_dtype() == np.float32
    assert 0.0 <= unc.get_fdata().min() and unc.get_fdata().max() <= 1.0


def test_dicom_series_folder_is_one_input(tmp_path):
    paths = ct_series(tmp_path / "ct", n=4)
    assert expand_inputs([tmp_path / "ct"]) == [tmp_path / "ct"]
    seg = FakeSegmenter()
    (r,) = run_predict(seg, [tmp_path / "ct"], TEXT, out_dir=None, overlay=True)
    assert seg.calls[0][0] == (4, 32, 32)  # all slices in one call
    assert r.outputs["mask"] == tmp_path / "ct_mask.dcm"  # beside the folder, not inside
    assert _files(tmp_path / "ct") == sorted(p.name for p in paths)
    out = pydicom.dcmread(r.outputs["mask"])
    assert int(out.NumberOfFrames) == 4 and r.slices == 4 and r.shape == (4, 128, 128)
    refs = {i.ReferencedSOPInstanceUID
            for s in out.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}  # fmt: skip
    assert refs == {pydicom.dcmread(p).SOPInstanceUID for p in paths}
    assert read_mask(r.outputs["mask"]).shape == (4, 128, 128)
    assert np.asarray(Image.open(r.outputs["overlay"])).shape == (128, 128, 3)
    with pytest.raises(InputError, match="volume.*--format nii or dcm"):
        run_predict(seg, [tmp_path / "ct"], TEXT, out_dir=tmp_path / "o", fmt="png")
    assert not (tmp_path / "o").exists()


def test_nifti_volume_keeps_geometry(tmp_path):
    src = NIBABEL_FILES / "anatomical.nii"
    img = nib.load(src)
    seg = FakeSegmenter(16)
    (r,) = run_predict(seg, [src], TEXT, out_dir=tmp_path, uncertainty=True, samples=2,
                       overlay=True)  # fmt: skip
    assert seg.calls[0][0] == (25, 16, 16)
    assert r.outputs["mask"] == tmp_path / "anatomical_mask.nii.gz"
    out = nib.load(r.outputs["mask"])
    assert out.shape == img.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, img.affine)
    data = np.asarray(out.dataobj)
    assert data.sum() == r.foreground_pixels > 0 and set(np.unique(data)) <= {0, 1}
    unc = nib.load(r.outputs["uncertainty"])
    assert unc.shape == img.shape and unc.get_data_dtype().newbyteorder("=") == np.float32
    np.testing.assert_allclose(unc.affine, img.affine)
    # overlay: the slice (third NIfTI axis) with the largest mask area, as (J, I) pixels
    over = np.asarray(Image.open(r.outputs["overlay"]))
    assert over.shape == (img.shape[1], img.shape[0], 3)
    k = int(np.argmax(data.reshape(-1, data.shape[2]).sum(axis=0)))
    contour = np.all(over == [255, 230, 0], axis=-1)  # the contour colour marks mask pixels
    assert contour.any() and data[:, :, k].T[contour].all()
    with pytest.raises(InputError, match="volume.*--format nii"):
        run_predict(seg, [src], TEXT, out_dir=tmp_path / "png", fmt="png")
    assert not (tmp_path / "png").exists()


# ----------------------------------------------------------------------------- inputs


def test_mixed_folder_stdin_and_dedup(tmp_path):
    d = tmp_path / "mixed"
    for name in ["b10.png", "b2.png", "a.jpg"]:
        _box_png(d / name, fmt="JPEG" if name.endswith("jpg") else "PNG")
    _box_png(d / "b2_mask.png")  # an earlier output of b2.png: not an input
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", d / "IMG0001")  # DICOM without extension
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.png").write_bytes(b"x")
    ct_series(d / "series", n=2)
    (d / "other").mkdir()
    _box_png(d / "other" / "deep.png")  # not searched: one level only
    expected = [d / "a.jpg", d / "b2.png", d / "b10.png", d / "IMG0001", d / "series"]
    assert expand_inputs([d]) == expected
    assert expand_inputs([str(d / "b2.png"), d, d / "series"]) == [d / "b2.png"] + [
        p for p in expected if p.name != "b2.png"
    ]
    stdin = io.StringIO(f"\n  {d / 'b10.png'}  \n\n{d}\r\n{d / 'b10.png'}\n")
    assert expand_inputs(["-"], stdin) == [d / "b10.png"] + [
        p for p in expected if p.name != "b10.png"
    ]
    with pytest.raises(InputError, match="missing.png: no such file"):
        expand_inputs([d / "a.jpg", d / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no images"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(MrisegError, match="no inputs"):
        expand_inputs(["-"], io.StringIO("\n \n"))
    results = run_predict(FakeSegmenter(), ["-"], TEXT, out_dir=tmp_path / "out",
                            stdin=io.StringIO(f"{d}\n"))  # fmt: skip
    assert [r.error for r in results] == [None] * 5
    assert _files(tmp_path / "out") == sorted(
        ["a_mask.png", "b2_mask.png", "b10_mask.png", "IMG0001_mask.dcm", "series_mask.dcm"]
    )


def test_plan_formats(tmp_path):
    _box_png(tmp_path / "a.png")
    pages = [Image.fromarray(np.full((9, 7), v, dtype=np.uint8)) for v in (10, 200, 30)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    plans = plan_outputs([tmp_path / "a.png", tmp_path / "stack.tif"], tmp_path / "o", "auto")
    assert [p.fmt for p in plans] == ["png", "nii"]
    assert plans[1].outputs["mask"] == tmp_path / "o" / "stack_mask.nii.gz"
    assert plan_outputs([tmp_path / "a.png"], None, "NIfTI")[0].fmt == "nii"
    with pytest.raises(MrisegError, match="unknown --format 'jpg'"):
        plan_outputs([tmp_path / "a.png"], None, "jpg")
    with pytest.raises(InputError, match="a.png: DICOM SEG .* needs a DICOM source"):
        plan_outputs([tmp_path / "a.png"], None, "dcm")
    with pytest.raises(InputError, match="stack.tif: is a volume"):
        plan_outputs([tmp_path / "stack.tif"], None, "png")
    (bad,) = plan_outputs([tmp_path / "stack.tif"], None, "png", keep_going=True)
    assert bad.outputs == {} and "volume" in bad.error
    (tmp_path / "file").write_text("x")
    with pytest.raises(MrisegError, match="not a folder"):
        plan_outputs([tmp_path / "a.png"], tmp_path / "file")


# ----------------------------------------------------------------------------- output safety


def test_existing_outputs_refused_up_front_then_overwrite(tmp_path):
    names = [f"img{i}.png" for i in range(6)]
    for n in names:
        _box_png(tmp_path / "in" / n)
    out = tmp_path / "out"
    out.mkdir()
    for i in (1, 2, 3, 5):  # 4 of 6 masks exist already
        (out / f"img{i}_mask.png").write_bytes(b"original")
    seg = FakeSegmenter()
    with pytest.raises(OutputExistsError, match=r"^4 output file\(s\) already exist.*and 1 more$"):
        run_predict(seg, [tmp_path / "in"], TEXT, out_dir=out)
    assert seg.calls == []  # refused before the model ran
    assert _files(out) == ["img1_mask.png", "img2_mask.png", "img3_mask.png", "img5_mask.png"]
    assert all((out / n).read_bytes() == b"original" for n in _files(out))
    results = run_predict(seg, [tmp_path / "in"], TEXT, out_dir=out, overwrite=True)
    assert len(results) == 6 and _files(out) == sorted(n[:-4] + "_mask.png" for n in names)
    assert read_mask(out / "img1_mask.png").shape == (37, 53)


def test_collisions_refused(tmp_path):
    _box_png(tmp_path / "scan.png")
    _box_png(tmp_path / "scan.jpg", fmt="JPEG")
    with pytest.raises(MrisegError, match="scan.jpg and .*scan.png would both write"):
        run_predict(FakeSegmenter(), [tmp_path], TEXT, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _box_png(tmp_path / "b.png")
    _box_png(tmp_path / "b_mask.png")  # given explicitly, it is an input
    with pytest.raises(MrisegError, match="would replace the input"):
        run_predict(FakeSegmenter(), [tmp_path / "b_mask.png", tmp_path / "b.png"], TEXT,
                      out_dir=None, overwrite=True)  # fmt: skip
    assert Image.open(tmp_path / "b_mask.png").size == (53, 37)


def test_out_dir_escape_refused(tmp_path):
    _box_png(tmp_path / "in" / "a.png")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.png").symlink_to(outside)
    with pytest.raises(MrisegError, match="outside the output folder"):
        run_predict(FakeSegmenter(), [tmp_path / "in" / "a.png"], TEXT, out_dir=out,
                      overwrite=True)  # fmt: skip
    assert outside.read_bytes() == b"keep me"
    # '..' in an input path only changes where it is read from, never where it is written
    (out / "a_mask.png").unlink()
    odd = tmp_path / "in" / ".." / "in" / "a.png"
    (r,) = run_predict(FakeSegmenter(), [odd], TEXT, out_dir=out)
    assert r.outputs["mask"].resolve().parent == out.resolve()


def test_bad_file_keep_going_and_stop(tmp_path):
    d = tmp_path / "in"
    _box_png(d / "1good.png")
    (d / "2bad.png").write_text("this is text, not a PNG")
    _box_png(d / "3good.png")
    with pytest.raises(InputError, match="2bad.png: not a valid PNG"):
        run_predict(FakeSegmenter(), [d], TEXT, out_dir=tmp_path / "stop")
    assert _files(tmp_path / "stop") == ["1good_mask.png"]  # earlier output complete, kept
    assert read_mask(tmp_path / "stop" / "1good_mask.png").shape == (37, 53)
    seen = []
    results = run_predict(FakeSegmenter(), [d], TEXT, out_dir=tmp_path / "go", keep_going=True,
                            on_result=seen.append)  # fmt: skip
    assert seen == results and [r.input.name for r in results] == [
        "1good.png",
        "2bad.png",
        "3good.png",
    ]
    bad = results[1]
    assert bad.error.startswith(str(d / "2bad.png")) and bad.outputs == {}
    assert json.loads(json.dumps(bad.to_json()))["error"] == bad.error
    assert results[0].error is None and results[2].error is None
    assert _files(tmp_path / "go") == ["1good_mask.png", "3good_mask.png"]


def test_model_output_problems_leave_nothing(tmp_path):
    _box_png(tmp_path / "a.png")
    out = tmp_path / "out"
    seg = FakeSegmenter(with_extras=False)
    with pytest.raises(ModelOutputError, match="no uncertainty"):  # fatal even with keep_going
        run_predict(seg, [tmp_path / "a.png"], TEXT, out_dir=out, uncertainty=True, samples=2,
                    keep_going=True)  # fmt: skip
    with pytest.raises(ModelOutputError, match="no coarse-to-fine steps"):
        run_predict(seg, [tmp_path / "a.png"], TEXT, out_dir=out, steps_png=True)
    assert _files(out) == []

    class BadSteps(FakeSegmenter):  # steps for the wrong number of slices: fails last
        def rule(self, image_BSS):
            pred = super().rule(image_BSS)
            return Prediction(pred.prob, pred.uncertainty, [torch.zeros(3, 8, 8)])

    with pytest.raises(ValueError, match="step map"):
        run_predict(BadSteps(), [tmp_path / "a.png"], TEXT, out_dir=out, uncertainty=True,
                    samples=2, overlay=True, steps_png=True)  # fmt: skip
    assert _files(out) == []  # mask, uncertainty and overlay were written, then removed
    with pytest.raises(MrisegError, match="threshold"):
        run_predict(seg, [tmp_path / "a.png"], TEXT, out_dir=out, threshold=1.5)
    assert seg.calls == [((1, 32, 32), TEXT.strip())] * 2  # an impossible threshold: no model


def test_threshold_moves_the_mask(tmp_path):
    # a horizontal ramp: the fake model's probability is the image itself
    ramp = np.tile(np.linspace(0, 255, 64), (20, 1)).astype(np.uint8)  # (20, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")

    class Ramp(FakeSegmenter):
        def rule(self, image_BSS):
            return Prediction(image_BSS.clone())

    fractions = []
    for t in (0.25, 0.5, 0.75):
        (r,) = run_predict(Ramp(), [tmp_path / "ramp.png"], TEXT, out_dir=tmp_path / str(t),
                             threshold=t)  # fmt: skip
        fractions.append(r.foreground_fraction)
        mask = read_mask(r.outputs["mask"])
        assert mask.shape == (20, 64) and (mask == mask[0]).all()  # same in every row
        assert mask[0, -1] and not mask[0, 0]
    np.testing.assert_allclose(fractions, [0.75, 0.5, 0.25], atol=0.05)
    assert read_scan(tmp_path / "ramp.png").shape == (20, 64)


# ----------------------------------------------------------------------------- one library call


def test_predict_batch_checks_first_then_tokenises_each_prompt_once(tmp_path):
    truth = _box_png(tmp_path / "in" / "a.png")
    _box_png(tmp_path / "in" / "b.png")
    vol = np.zeros((5, 20, 24), np.int16)  # (z, y, x): 5 slices, decoded in batches of 2
    vol[:, 5:15, 6:18] = 1000
    nib.save(
        nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0)), np.eye(4)),
        tmp_path / "in" / "c.nii.gz",
    )
    loaded = FakeSegmenter(batch_size=2, with_extras=False)
    results = predict_batch(
        lambda: loaded,
        inputs=[tmp_path / "in"],
        text=TEXT,
        options=PredictOptions(out_dir=tmp_path / "out"),
    )
    assert [r.error for r in results] == [None, None, None]
    assert loaded.bundle.text.calls == [[TEXT.strip()]]  # one prompt, tokenised once: 3 inputs
    assert loaded.batches == [1, 1, 2, 2, 1]
    assert _iou(read_mask(tmp_path / "out" / "a_mask.png"), truth) > 0.85
    assert results[2].slices == 5 and results[2].foreground_pixels > 0
    # outputs that exist are refused before the model is loaded
    never = []
    with pytest.raises(OutputExistsError):
        predict_batch(
            lambda: never.append(1),
            inputs=[tmp_path / "in"],
            text=TEXT,
            options=PredictOptions(out_dir=tmp_path / "out"),
        )
    assert never == []


def test_predict_batch_prompts_file_and_model_options(tmp_path):
    _box_png(tmp_path / "a.png")
    _box_png(tmp_path / "b.png")
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        "\n".join(
            json.dumps({"path": str(tmp_path / n), "text": t})
            for n, t in (("a.png", "left lung"), ("b.png", "left lung"))
        )
        + "\n"
    )
    loaded = FakeSegmenter(with_extras=False, paradigm="next-token")
    results = predict_batch(
        lambda: loaded, prompts=rows, options=PredictOptions(out_dir=tmp_path / "o")
    )
    assert [r.text for r in results] == ["left lung", "left lung"]
    assert loaded.bundle.text.calls == [["left lung"]]
    with pytest.raises(ModelOptionError, match="next-scale"):
        predict_batch(
            lambda: loaded,
            inputs=[tmp_path / "a.png"],
            text="x",
            options=PredictOptions(out_dir=tmp_path / "s", steps_png=True),
        )
    with pytest.raises(MrisegError, match="prompts file"):
        predict_batch(lambda: loaded, prompts=rows, text="x")
