"""Reading: every local pydicom / nibabel test file, DICOM series, rasters in all modes, masks,
intensity handling and the size limit. Only local files (no downloads)."""

from __future__ import annotations

import gzip
import struct
import time
import warnings
import zlib
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import get_decoder
from pydicom.uid import generate_uid

from mrisegcli.errors import InputError, MrisegError
from mrisegcli.io import (
    MAX_SIDE,
    normalize_intensity,
    read_mask,
    read_scan,
    resize_prob,
    scan_model_inputs,
    to_model_input,
)

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
NIBABEL_FILES = Path(nib.__file__).parent / "tests" / "data"
SLICE_GAP = 2.5
LUMA = np.array([0.299, 0.587, 0.114])


# ----------------------------------------------------------------------------- helpers


def ct_series(folder: Path, n: int = 5, *, seed: int = 0) -> list[Path]:
    """Write ``n`` CT slices (CT_small moved along its normal) under shuffled file names.

    Slice k in spatial order stores raw + 10 * k (its content identifies it); InstanceNumber
    runs against space and names are shuffled, so only a sort along the normal is right.
    Returns the paths in spatial order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    iop = np.array(base.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    series_uid = generate_uid()
    names = np.random.default_rng(seed).permutation(n)
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n - k
        pos = np.array(base.ImagePositionPatient, dtype=float) + normal * SLICE_GAP * k
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.PixelData = (ds.pixel_array + 10 * k).astype(ds.pixel_array.dtype).tobytes()
        path = folder / f"IM{names[k]:04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def enhanced_ct(series: list[Path], out: Path) -> Path:
    """An enhanced (functional-group) multi-frame CT made from a single-frame series."""
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in series], generate_uid(), 2, generate_uid(), 1
    )
    mf.save_as(out, enforce_file_format=True)
    return out


# ----------------------------------------------------------------------------- every local DICOM

# Facts about pydicom's local test files that are not plain readable images.
REFUSED = {
    "JPEG-lossy.dcm": "cannot decode",  # 12-bit JPEG Extended: no installed plugin decodes it
    "JPEG2000-embedded-sequence-delimiter.dcm": "cannot decode",  # corrupt J2K codestream
    "MR_truncated.dcm": "truncated",
    "badVR.dcm": "NumberOfFrames",
    "meta_missing_tsyntax.dcm": "missing required element",
    "nested_priv_SQ.dcm": "missing required element",
    "no_meta.dcm": "not a DICOM file",
    "liver_1frame.dcm": "Segmentation",
    "liver_expb_1frame.dcm": "Segmentation",
}
ALL_DICOM = sorted(p.name for p in PYDICOM_FILES.glob("*.dcm"))


def _has_pixels(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return "PixelData" in pydicom.dcmread(path, force=True, defer_size=64)


@pytest.mark.parametrize("name", ALL_DICOM)
def test_every_local_dicom_reads_or_is_refused_clearly(name):
    path = PYDICOM_FILES / name
    if name in REFUSED or not _has_pixels(path):
        with pytest.raises(InputError) as err:
            read_scan(path)
        expected = REFUSED.get(name, "not an image")
        assert expected in str(err.value)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
        return
    scan = read_scan(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on tolerated irregularities
        ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected_shape = (int(ds.Rows), int(ds.Columns))
    assert scan.shape == (expected_shape if frames == 1 else (frames, *expected_shape))
    assert scan.pixels.dtype == np.float32 and np.isfinite(scan.pixels).all()
    assert scan.format == "dicom" and len(scan.datasets) == 1
    assert "PixelData" not in scan.datasets[0]  # pixels live in scan.pixels only


def test_non_image_objects_name_their_sop_class():
    for name, kind in [("rtplan.dcm", "RT Plan"), ("rtstruct.dcm", "RT Structure Set"),
                       ("reportsi.dcm", "SR"), ("rtplan_truncated.dcm", "RT Plan")]:  # fmt: skip
        with pytest.raises(InputError, match=kind):
            read_scan(PYDICOM_FILES / name)


COMPRESSED = [
    ("SC_rgb_jpeg_dcmtk.dcm", "pylibjpeg-libjpeg"),  # JPEG baseline, YBR
    ("MR_small_jpeg_ls_lossless.dcm", "pylibjpeg-libjpeg"),
    ("MR_small_jp2klossless.dcm", "pylibjpeg-openjpeg"),
    ("MR_small_RLE.dcm", "pylibjpeg-rle"),
]


@pytest.mark.parametrize(("name", "package"), COMPRESSED)
def test_missing_decoder_plugin_gives_install_hint(name, package, monkeypatch):
    path = PYDICOM_FILES / name
    assert read_scan(path).pixels.size > 0  # decodes with the installed plugins
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    monkeypatch.setattr(get_decoder(ts), "_available", {})  # pydicom now sees no plugin
    with pytest.raises(InputError) as err:
        read_scan(path)
    msg = str(err.value)
    assert ts.name in msg and package in msg and 'pip install "mrisegcli[dicom]"' in msg


def test_compressed_equals_uncompressed():
    ref = read_scan(PYDICOM_FILES / "MR_small.dcm").pixels
    for name in ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]:  # fmt: skip
        np.testing.assert_array_equal(read_scan(PYDICOM_FILES / name).pixels, ref)


# ----------------------------------------------------------------------------- DICOM values


def test_modality_lut_and_window():
    ct = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    scan = read_scan(PYDICOM_FILES / "CT_small.dcm")
    expected = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    np.testing.assert_allclose(scan.pixels, expected)
    assert "window" not in scan.meta
    mr = read_scan(PYDICOM_FILES / "MR_small.dcm")
    assert mr.meta["window"] == (600.0, 1600.0)
    norm = normalize_intensity(mr.pixels, mr.meta["window"])
    lo, hi = 600 - 0.5 - 1599 / 2, 600 - 0.5 + 1599 / 2
    inside = (mr.pixels > lo) & (mr.pixels < hi)
    np.testing.assert_allclose(norm[inside], ((mr.pixels[inside] - 599.5) / 1599 + 0.5), atol=1e-5)


def test_voi_lut_table_is_applied(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 16]  # 256 entries, first input value 0, 16-bit output
    item.add_new(0x00283006, "US", [4 * (255 - v) for v in range(256)])  # LUTData, decreasing
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "voi.dcm")
    scan = read_scan(tmp_path / "voi.dcm")
    raw = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm").pixel_array
    np.testing.assert_array_equal(scan.pixels, 4 * (255 - np.clip(raw, 0, 255)))
    assert scan.meta["voi"] == "lut" and "window" not in scan.meta


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    m2 = read_scan(PYDICOM_FILES / "MR_small.dcm")
    m1 = read_scan(tmp_path / "m1.dcm")
    lo, hi = m2.pixels.min(), m2.pixels.max()
    np.testing.assert_allclose(m1.pixels, lo + hi - m2.pixels)
    assert m1.meta["inverted"] and m1.meta["window"] == (lo + hi - 600.0, 1600.0)
    # bright stays bright on screen: windowed M1 is the mirror image of windowed M2
    a = normalize_intensity(m1.pixels, m1.meta["window"])
    b = normalize_intensity(m2.pixels, m2.meta["window"])
    assert np.abs(a - (1 - b)).max() < 2e-3


def test_colour_dicom_to_grey():
    ds = pydicom.dcmread(PYDICOM_FILES / "examples_rgb_color.dcm")
    scan = read_scan(PYDICOM_FILES / "examples_rgb_color.dcm")
    np.testing.assert_allclose(scan.pixels, ds.pixel_array @ LUMA, atol=1e-3)
    # uncompressed YBR_FULL_422 and the RLE RGB file hold the same picture
    ybr = read_scan(PYDICOM_FILES / "SC_ybr_full_422_uncompressed.dcm").pixels
    rgb = read_scan(PYDICOM_FILES / "SC_rgb_rle.dcm").pixels
    assert np.abs(ybr - rgb).mean() < 3.0
    pal = pydicom.dcmread(PYDICOM_FILES / "examples_palette.dcm")
    expected = pydicom.pixels.apply_color_lut(pal.pixel_array, pal) @ LUMA
    np.testing.assert_allclose(
        read_scan(PYDICOM_FILES / "examples_palette.dcm").pixels, expected, rtol=1e-5
    )


def test_multiframe_files():
    dose = read_scan(PYDICOM_FILES / "rtdose.dcm")  # RT Dose counts as an image (a 3-D grid)
    ds = pydicom.dcmread(PYDICOM_FILES / "rtdose.dcm")
    assert dose.shape == (15, 10, 10) and dose.spacing == (5.0, 10.0, 10.0)
    np.testing.assert_allclose(dose.pixels, ds.pixel_array * float(ds.DoseGridScaling), rtol=1e-6)
    np.testing.assert_allclose(dose.affine[:3, 2], [0, 0, 5.0])  # GridFrameOffsetVector step
    np.testing.assert_allclose(dose.affine[:3, 3], [float(v) for v in ds.ImagePositionPatient])
    two = read_scan(PYDICOM_FILES / "SC_rgb_rle_2frame.dcm")
    assert two.shape == (2, 100, 100) and two.is_volume and len(list(two.slices())) == 2
    cine = read_scan(PYDICOM_FILES / "examples_ybr_color.dcm")
    assert cine.shape == (30, 240, 320)


def test_dicom_size_limit_refused_before_decoding(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.Rows, ds.Columns = 30000, 30000  # pixel data stays tiny: decoding would fail
    ds.save_as(tmp_path / "huge.dcm")
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=f"too large.*{MAX_SIDE}x{MAX_SIDE}"):
        read_scan(tmp_path / "huge.dcm")
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------- series


def test_series_folder_sorted_along_normal(tmp_path):
    paths = ct_series(tmp_path / "series")
    (tmp_path / "series" / "README.txt").write_text("not dicom")
    sr = pydicom.dcmread(PYDICOM_FILES / "reportsi.dcm")
    sr.SeriesInstanceUID = pydicom.dcmread(paths[0]).SeriesInstanceUID
    sr.save_as(tmp_path / "series" / "report.dcm")
    scan = read_scan(tmp_path / "series")
    assert scan.shape == (5, 128, 128) and scan.path == tmp_path / "series"
    base = read_scan(PYDICOM_FILES / "CT_small.dcm").pixels
    for k in range(5):
        np.testing.assert_allclose(scan.pixels[k], base + 10 * k)  # spatial order
    assert [ds.SOPInstanceUID for ds in scan.datasets] == [
        pydicom.dcmread(p).SOPInstanceUID for p in paths
    ]
    assert scan.spacing[0] == pytest.approx(SLICE_GAP)
    np.testing.assert_allclose(scan.affine[:3, 2], [0, 0, SLICE_GAP], atol=1e-4)
    np.testing.assert_allclose(
        scan.affine[:3, 3], [float(v) for v in pydicom.dcmread(paths[0]).ImagePositionPatient]
    )
    assert sorted(scan.meta["skipped"]) == ["README.txt", "report.dcm"]
    # a mask folder is read in the same order
    mask = read_mask(tmp_path / "series")
    assert mask.shape == (5, 128, 128)


def test_mixed_series_and_duplicates_refused(tmp_path):
    ct_series(tmp_path / "mixed", 3, seed=1)
    other = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    other.save_as(tmp_path / "mixed" / "other.dcm")
    with pytest.raises(InputError) as err:
        read_scan(tmp_path / "mixed")
    msg = str(err.value)
    assert "2 DICOM series" in msg and str(other.SeriesInstanceUID) in msg
    paths = ct_series(tmp_path / "dupes", 3)
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "dupes" / "copy.dcm")
    with pytest.raises(InputError, match="2 files share slice positions"):
        read_scan(tmp_path / "dupes")


def test_enhanced_multiframe_matches_series(tmp_path):
    paths = ct_series(tmp_path / "series", 4)
    series = read_scan(tmp_path / "series")
    mf = read_scan(enhanced_ct(paths, tmp_path / "enhanced.dcm"))
    assert mf.shape == series.shape and len(mf.datasets) == 1
    # the converter stores frames by InstanceNumber (against space); frames keep stored order
    np.testing.assert_allclose(mf.pixels, series.pixels[::-1])  # rescale from functional groups
    n = series.num_slices
    for d in range(n):  # each frame sits where its slice of the series sits
        np.testing.assert_allclose(
            mf.affine @ [3, 5, d, 1], series.affine @ [3, 5, n - 1 - d, 1], atol=1e-3
        )
    assert mf.spacing == pytest.approx(series.spacing)


def test_bad_inputs(tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text_png = tmp_path / "fake.png"
    text_png.write_text("this is text, not a PNG\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n" * 50)
    fake_nii = tmp_path / "fake.nii"
    fake_nii.write_text("not nifti\n" * 60)
    (tmp_path / "nodicom").mkdir()
    (tmp_path / "nodicom" / "a.txt").write_text("x")
    cases = {
        tmp_path / "missing.png": "no such file",
        empty: "empty",
        text_png: "not a valid PNG/JPEG/TIFF/BMP",
        notes: "unrecognised file format",
        fake_nii: "not a readable NIfTI",
        tmp_path / "nodicom": "no DICOM images",
    }
    for path, message in cases.items():
        with pytest.raises(InputError, match=message):
            read_scan(path)
        with pytest.raises(InputError, match=message):
            read_mask(path)
    with pytest.raises(InputError, match="4-D NIfTI only"):
        read_scan(PYDICOM_FILES / "CT_small.dcm", frame=0)


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_axes_and_geometry():
    for name in ["anatomical.nii", "standard.nii.gz"]:
        img = nib.load(NIBABEL_FILES / name)
        data = img.get_fdata()
        scan = read_scan(NIBABEL_FILES / name)
        assert scan.format == "nifti" and scan.shape == tuple(reversed(img.shape))
        i, j, k = (s // 2 for s in img.shape)
        assert scan.pixels[k, j, i] == pytest.approx(data[i, j, k])
        np.testing.assert_array_equal(scan.affine, img.affine)
        assert scan.spacing == tuple(reversed(img.header.get_zooms()))


def test_nifti_4d_needs_frame():
    for name, version in [("example4d.nii.gz", 1), ("example_nifti2.nii.gz", 2)]:
        with pytest.raises(InputError, match="4-D with 2 volumes"):
            read_scan(NIBABEL_FILES / name)
        scan = read_scan(NIBABEL_FILES / name, frame=1)
        data = nib.load(NIBABEL_FILES / name).get_fdata()[..., 1]
        np.testing.assert_allclose(scan.pixels, data.T, rtol=1e-6)
        assert scan.meta["frame"] == 1 and scan.meta["nifti_version"] == version
        with pytest.raises(InputError, match="out of range"):
            read_scan(NIBABEL_FILES / name, frame=2)
    with pytest.raises(InputError, match="4-D NIfTI only"):
        read_scan(NIBABEL_FILES / "anatomical.nii", frame=0)


def test_nifti_2d_nonfinite_and_corrupt(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(4, 3)  # (I, J) -> pixels (J, I)
    data[0, 0], data[1, 0], data[2, 0] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 2.0, 1.0, 1.0])), tmp_path / "x.nii.gz")
    scan = read_scan(tmp_path / "x.nii.gz")
    assert scan.shape == (3, 4) and scan.spacing == (2.0, 0.5)
    assert np.isfinite(scan.pixels).all()
    assert scan.meta["nonfinite"] == {"nan": 1, "posinf": 1, "neginf": 1}
    norm = normalize_intensity(scan.pixels)
    assert norm[0, 0] == 0.0 and norm[0, 1] == 1.0 and norm[0, 2] == 0.0
    raw = (tmp_path / "x.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="NIfTI"):
        read_scan(tmp_path / "cut.nii.gz")


def test_nifti_size_limit_from_header(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((20000, 20000, 1))
    hdr.set_data_dtype(np.uint8)
    with gzip.open(tmp_path / "huge.nii.gz", "wb") as fh:  # header only, no voxels
        fh.write(hdr.binaryblock + b"\x00" * 4)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="too large"):
        read_scan(tmp_path / "huge.nii.gz")
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------- rasters


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height but holds a single tiny IDAT chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_raster_modes(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    u16 = rng.integers(0, 65536, (7, 9), dtype=np.uint16)
    cases = {
        "l.png": (Image.fromarray(grey), grey),
        "l.jpg": (Image.fromarray(grey), None),  # lossy: shape only
        "l.bmp": (Image.fromarray(grey), grey),
        "one.png": (Image.fromarray(grey > 127), (grey > 127).astype(float)),
        "la.png": (Image.fromarray(np.stack([grey, grey // 2], -1), "LA"), grey),
        "rgb.png": (Image.fromarray(rgb), rgb @ LUMA),
        "rgba.png": (Image.fromarray(np.dstack([rgb, grey])), rgb @ LUMA),  # alpha dropped
        "p.png": (Image.fromarray(rgb).quantize(16), None),
        "i16.png": (Image.fromarray(u16), u16),
        "i32.tif": (Image.fromarray(u16.astype(np.int32) * 100), u16.astype(np.int64) * 100),
        "f.tif": (Image.fromarray(u16.astype(np.float32) / 7), u16 / 7),
    }
    for name, (im, expected) in cases.items():
        im.save(tmp_path / name)
        scan = read_scan(tmp_path / name)
        assert scan.format == "raster" and scan.shape == (7, 9), name
        assert scan.pixels.dtype == np.float32 and scan.affine is None
        if expected is not None:
            np.testing.assert_allclose(scan.pixels, expected, rtol=1e-5, atol=1e-3, err_msg=name)
    pal = Image.fromarray(rgb).quantize(16)
    expected = np.asarray(pal.convert("RGB")) @ LUMA
    np.testing.assert_allclose(read_scan(tmp_path / "p.png").pixels, expected, atol=1e-3)
    assert read_scan(tmp_path / "i16.png").pixels.max() > 255  # 16-bit range kept


def test_raster_tiny_and_multipage(tmp_path):
    Image.fromarray(np.array([[200]], dtype=np.uint8)).save(tmp_path / "one.png")
    scan = read_scan(tmp_path / "one.png")
    assert scan.shape == (1, 1) and scan.pixels[0, 0] == 200
    pages = [Image.fromarray(np.full((4, 5), v, dtype=np.uint8)) for v in (1, 2, 3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    vol = read_scan(tmp_path / "stack.tif")
    assert vol.shape == (3, 4, 5) and list(vol.pixels[:, 0, 0]) == [1, 2, 3]


def test_huge_png_fails_fast(tmp_path):
    _png_header_only(tmp_path / "huge.png", 30000, 30000)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="too large"):
        read_scan(tmp_path / "huge.png")
    with pytest.raises(InputError, match="too large"):
        read_mask(tmp_path / "huge.png")
    assert time.perf_counter() - t0 < 1.0


# ----------------------------------------------------------------------------- masks


def test_read_mask_formats(tmp_path):
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:6] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "m01.png")  # 0/1 values
    colour = np.zeros((6, 8, 3), dtype=np.uint8)
    colour[mask, 2] = 40  # only the blue channel set
    Image.fromarray(colour).save(tmp_path / "rgb.png")
    for name in ["m.png", "m01.png", "rgb.png"]:
        out = read_mask(tmp_path / name)
        assert out.dtype == bool
        np.testing.assert_array_equal(out, mask, err_msg=name)
    vol = np.zeros((3, 6, 8), dtype=np.int16)  # (D, H, W)
    vol[1][mask] = 7
    nii = nib.Nifti1Image(np.transpose(vol), np.eye(4))
    nii.header.set_slope_inter(-1.0, 0.0)  # raw values decide, not scaled ones
    nib.save(nii, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.nii.gz"), vol > 0)
    ct = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    np.testing.assert_array_equal(read_mask(PYDICOM_FILES / "CT_small.dcm"), ct.pixel_array > 0)
    seg = read_mask(PYDICOM_FILES / "liver_1frame.dcm")  # a DICOM SEG is a mask
    assert seg.shape == (512, 512) and 0 < seg.sum() < seg.size


# ----------------------------------------------------------------------------- intensity


def test_normalize_intensity():
    assert not normalize_intensity(np.full((4, 4), 7.0)).any()
    x = np.linspace(0, 1, 10000, dtype=np.float32).reshape(100, 100)
    x[0, 0] = 1e6  # one outlier does not squash the rest
    out = normalize_intensity(x)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert 0.45 < out[50, 50] < 0.55
    nan = np.array([[np.nan, 1.0], [2.0, np.inf]], dtype=np.float32)
    out = normalize_intensity(nan)
    assert np.isfinite(out).all() and out[0, 0] == 0 and out[1, 1] == 1
    assert not normalize_intensity(np.full((2, 2), np.nan)).any()
    win = normalize_intensity(np.array([-1000.0, 40.0, 1000.0]), (40.0, 400.0))
    assert win[0] == 0 and win[2] == 1 and win[1] == pytest.approx(0.5, abs=0.01)


def test_model_input_and_back():
    img = np.indices((64, 96)).sum(0) % 2 * 100.0  # (64, 96) checkerboard
    x = to_model_input(img, 16)
    assert x.shape == (16, 16) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert abs(float(x.mean()) - 0.5) < 0.05 and float(x.std()) < 0.1  # antialiased, no aliasing
    prob = np.zeros((16, 16), dtype=np.float32)
    prob[:, 8:] = 1.0
    back = resize_prob(prob, (64, 96))
    assert back.shape == (64, 96) and back.dtype == np.float32
    assert back[:, :40].max() < 0.01 and back[:, 56:].min() > 0.99  # stretched, not padded
    scan = read_scan(NIBABEL_FILES / "standard.nii.gz")
    stack = scan_model_inputs(scan, 8)
    assert stack.shape == (scan.num_slices, 8, 8) and stack.max() <= 1.0


def test_errors_are_mriseg_errors():
    assert issubclass(InputError, MrisegError)
