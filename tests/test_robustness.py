"""Messy inputs through the command line: every bad input is one ``mriseg: error:`` line and
exit 1 (2 for usage), no traceback, no output file, and the inputs left as they were.
docs/robustness.md lists every case with its message and the test that covers it; cases already
covered by the unit tests of io/, data/, the cache and the hub are referenced there, not repeated.

The readers are also fuzzed (hypothesis): random bytes, and valid files truncated or with
flipped bytes, named like PNG/TIFF/JPEG/DICOM/NIfTI, must give a ``MrisegError`` (or a scan),
never another exception. ``MRISEG_FUZZ_EXAMPLES`` raises the example count for a long run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import unicodedata
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.errors import MrisegError
from mrisegcli.io.read import read_mask, read_scan
from mrisegcli.tokenizers.text import encode_texts, load_text_tokenizer
from mrisegcli.workflow.predict import MAX_TEXT_CHARS, validate_text

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
NIBABEL_FILES = Path(nib.__file__).parent / "tests" / "data"
TEXT = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
TRAIN = [
    "--size",
    "32",
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--mask-steps",
    "5",
    "--image-steps",
    "5",
    "--eval-every",
    "1000",
    "--ckpt-every",
    "1000",
    "--device",
    "cpu",
    "--workers",
    "0",
]
FUZZ = int(os.environ.get("MRISEG_FUZZ_EXAMPLES", "150"))

runner = CliRunner()


# ----------------------------------------------------------------------------- helpers


def _digest(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root`` (to show inputs are left untouched)."""
    if root.is_file():
        return {root.name: hashlib.sha1(root.read_bytes()).hexdigest()}
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def cli_error(args: list[str], *, code: int = 1, stdin: str | None = None) -> str:
    """Run the CLI expecting failure; returns the single error line (exit 1) or the output."""
    r = runner.invoke(app, args, input=stdin)
    assert r.exit_code == code, (r.stdout, r.stderr, r.exception)
    assert "Traceback" not in r.stdout + r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit)
    if code == 2:
        return r.stderr
    # "> stage" notes and the "model: NAME (from --model)" line predict and evaluate start with
    lines = [x for x in r.stderr.splitlines() if not x.startswith(("> ", "model: "))]
    assert len(lines) == 1 and lines[0].startswith("mriseg: error: "), r.stderr
    assert r.stdout == ""
    return lines[0]


def cli_ok(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r.stdout


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height but holds (almost) no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def _grey_png(path: Path, shape=(40, 36)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> dict[str, Path]:
    """A tiny next-token run and its dataset (seconds on one CPU thread)."""
    base = tmp_path_factory.mktemp("robust")
    data, run = base / "data", base / "run"
    cli_ok(["synth", str(data), "--n-train", "8", "--n-val", "2", "--n-test", "2", "--size", "32"])
    cli_ok(["train", "--data", str(data), "--out", str(run), *TRAIN])
    return {"data": data, "run": run}


def _run_copy(trained, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    """A copy of the trained run (no checkpoints / cache) with ``damage`` applied."""
    dst = tmp_path / "run"
    shutil.copytree(trained["run"], dst, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    damage(dst)
    return dst


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def _edit_config(change: Callable[[dict], dict]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / "config.json").write_text(
            json.dumps(change(json.loads((run / "config.json").read_text())))
        )

    return damage


def _swap_tokenizers(run: Path) -> None:
    a, b = run / "mask_vq.safetensors", run / "image_vq.safetensors"
    a.rename(run / "tmp")
    b.rename(a)
    (run / "tmp").rename(b)


# ----------------------------------------------------------------------------- predict: inputs


def _truncated_dicom(tmp: Path) -> Path:
    raw = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    (tmp / "cut.dcm").write_bytes(raw[: len(raw) // 2])
    return tmp / "cut.dcm"


def _text_as_png(tmp: Path) -> Path:
    (tmp / "notes.png").write_text("these are notes, not a picture\n")
    return tmp / "notes.png"


def _empty_png(tmp: Path) -> Path:
    (tmp / "empty.png").write_bytes(b"")
    return tmp / "empty.png"


def _empty_nifti(tmp: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 3), np.float32), np.eye(4)), tmp / "empty.nii.gz")
    return tmp / "empty.nii.gz"


def _fifo(tmp: Path) -> Path:
    """A named pipe: reading it would block for ever (the test would hang, not fail)."""
    os.mkfifo(tmp / "pipe.png")
    return tmp / "pipe.png"


def _symlink_loop(tmp: Path) -> Path:
    (tmp / "a.png").symlink_to(tmp / "b.png")
    (tmp / "b.png").symlink_to(tmp / "a.png")
    return tmp / "a.png"


def _dangling_link(tmp: Path) -> Path:
    (tmp / "gone.png").symlink_to(tmp / "deleted.png")
    return tmp / "gone.png"


def _all_nan_nifti(tmp: Path) -> Path:
    nib.save(nib.Nifti1Image(np.full((8, 8), np.nan, np.float32), np.eye(4)), tmp / "nan.nii.gz")
    return tmp / "nan.nii.gz"


def _random_dcm(tmp: Path) -> Path:
    (tmp / "noise.dcm").write_bytes(np.random.default_rng(3).bytes(700))
    return tmp / "noise.dcm"


BAD_INPUTS = {
    "truncated DICOM": (_truncated_dicom, "truncated or corrupt DICOM pixel data"),
    "DICOM without pixel data": (
        lambda t: Path(shutil.copy(PYDICOM_FILES / "rtplan.dcm", t / "plan.dcm")),
        "not an image: a RT Plan Storage",
    ),
    "NIfTI without voxels": (_empty_nifti, "NIfTI image has no voxels (shape (4, 0, 3))"),
    "all-NaN NIfTI": (_all_nan_nifti, "has no finite voxels: all 64 are NaN or infinite (64 NaN)"),
    "0x0 PNG": (lambda t: _png_header(t / "zero.png", 0, 0), "not a valid PNG/JPEG/TIFF/BMP image"),
    "30000x30000 PNG": (lambda t: _png_header(t / "huge.png", 30000, 30000), "too large"),
    "text file named .png": (_text_as_png, "not a valid PNG/JPEG/TIFF/BMP image"),
    "empty file": (_empty_png, "file is empty"),
    "random bytes named .dcm": (_random_dcm, "not a DICOM file"),
    "missing file": (lambda t: t / "absent.png", "no such file or folder"),
    "FIFO": (_fifo, "is a FIFO (named pipe), not a file"),
    "symlink loop": (_symlink_loop, "symlink loop"),
    "dangling symlink": (_dangling_link, "dangling symlink (points to"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_file_is_one_line_and_writes_nothing(case, trained, tmp_path):
    make, expected = BAD_INPUTS[case]
    src = tmp_path / "in"
    src.mkdir()
    path = make(src)
    before = _digest(src)
    out = tmp_path / "out"
    line = cli_error(
        [
            "predict",
            str(path),
            "--text",
            TEXT,
            "--model",
            str(trained["run"]),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert expected in line and str(path) in line
    assert not out.exists() or not any(out.iterdir())
    assert _digest(src) == before


def test_nan_inf_and_tiny_images_are_segmented_not_refused(trained, tmp_path):
    data = np.random.default_rng(0).random((24, 20)).astype(np.float32)
    data[0, :], data[1, :], data[2, :3] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    Image.fromarray(np.array([[200]], np.uint8)).save(tmp_path / "one.png")
    out = tmp_path / "out"
    stdout = cli_ok(
        [
            "predict",
            str(tmp_path / "nan.nii.gz"),
            str(tmp_path / "one.png"),
            "--text",
            TEXT,
            "--model",
            str(trained["run"]),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--json",
        ]
    )
    rows = [json.loads(x) for x in stdout.splitlines()]
    assert [r["error"] for r in rows] == [None, None]  # all-NaN: BAD_INPUTS
    assert nib.load(out / "nan_mask.nii.gz").shape == (24, 20)
    assert np.asarray(Image.open(out / "one_mask.png")).shape == (1, 1)


# ----------------------------------------------------------------------------- predict: text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "--text is empty"),
        ("  \t\n ", "--text is empty"),
        ("x" * (MAX_TEXT_CHARS + 1), f"the limit is {MAX_TEXT_CHARS}"),
        # a byte that is not UTF-8 reaches Python as a lone surrogate (surrogateescape)
        ("left \udcff lung", "--text is not valid UTF-8 text (the byte 0xff at character 6)"),
    ],
    ids=["empty", "whitespace", "too-long", "not-UTF-8"],
)
def test_bad_text_is_refused_before_the_model_loads(text, expected, trained, tmp_path):
    img = _grey_png(tmp_path / "a.png")
    line = cli_error(
        [
            "predict",
            str(img),
            "--text",
            text,
            "--model",
            str(tmp_path / "not-loaded"),
            "--device",
            "cpu",
        ]
    )
    assert expected in line  # the (missing) model was never looked at
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_long_and_non_ascii_texts_work(trained, tmp_path):
    img = _grey_png(tmp_path / "a.png")
    for i, text in enumerate(
        ["Lésion bilatérale, 两个感染区域, ünïcödé 🫁", "lung " * (MAX_TEXT_CHARS // 5)]
    ):
        stdout = cli_ok(
            [
                "predict",
                str(img),
                "--text",
                text,
                "--model",
                str(trained["run"]),
                "--out",
                str(tmp_path / f"o{i}"),
                "--device",
                "cpu",
                "--json",
                "--force",  # the words are outside the tiny model's scope: text handling here
            ]
        )
        assert json.loads(stdout)["error"] is None


# ----------------------------------------------------------------------------- predict: outputs


def test_existing_output_is_kept_without_overwrite(trained, tmp_path):
    img = _grey_png(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.png").write_bytes(b"precious")
    line = cli_error(
        [
            "predict",
            str(img),
            "--text",
            TEXT,
            "--model",
            str(trained["run"]),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert "already exist" in line and "--overwrite" in line
    assert (out / "a_mask.png").read_bytes() == b"precious" and len(list(out.iterdir())) == 1


def test_unwritable_output_folder(trained, tmp_path):
    img = _grey_png(tmp_path / "a.png")
    (tmp_path / "file").write_text("a file, not a folder")
    line = cli_error(
        [
            "predict",
            str(img),
            "--text",
            TEXT,
            "--model",
            str(trained["run"]),
            "--out",
            str(tmp_path / "file" / "sub"),
            "--device",
            "cpu",
        ]
    )
    assert "cannot create folder" in line
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs a normal user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            line = cli_error(
                [
                    "predict",
                    str(img),
                    "--text",
                    TEXT,
                    "--model",
                    str(trained["run"]),
                    "--out",
                    str(ro),
                    "--device",
                    "cpu",
                ]
            )
            assert "cannot write here" in line and not list(ro.iterdir())
        finally:
            ro.chmod(0o700)


# ----------------------------------------------------------------------------- predict: model

BAD_RUNS = {
    "truncated model.safetensors": (_truncate("model.safetensors"), "corrupt or truncated weights"),
    "8-byte model.safetensors": (
        _truncate("model.safetensors", 1e-9),
        "corrupt or truncated weights",
    ),
    "truncated mask tokenizer": (_truncate("mask_vq.safetensors"), "truncated or corrupt"),
    "truncated text tokenizer": (
        _truncate("tokenizer.json", 0.1),
        "cannot load the text tokenizer",
    ),
    "newer config schema": (
        _edit_config(lambda c: {**c, "schema": 99, "mriseg_version": "9.0"}),
        "upgrade mriseg",
    ),
    "unknown config key": (
        _edit_config(lambda c: {**c, "run": {**c["run"], "from_the_future": 1}}),
        "unknown keys",
    ),
    "corrupt config.json": (lambda r: (r / "config.json").write_text("{oops"), "corrupt config"),
    "no model.safetensors": (lambda r: (r / "model.safetensors").unlink(), "training not finished"),
    "config schema as a string": (
        _edit_config(lambda c: {**c, "schema": "1"}),
        "corrupt config (config schema must be a whole number, got '1')",
    ),
    "config not fitting the weights": (
        _edit_config(lambda c: {**c, "model": {**c["model"], "mask_codebook_size": 600}}),
        "weights do not match config.json: tensor",
    ),
    "hostile config size": (
        _edit_config(lambda c: {**c, "model": {**c["model"], "text_vocab_size": 10**12}}),
        "config.model.text_vocab_size is 1000000000000, above the limit",
    ),
    "swapped tokenizer files": (_swap_tokenizers, "tokenizer files swapped?"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_damaged_run_folder_is_one_line(case, trained, tmp_path):
    damage, expected = BAD_RUNS[case]
    run = _run_copy(trained, tmp_path, damage)
    before = _digest(run)
    img = _grey_png(tmp_path / "a.png")
    line = cli_error(["predict", str(img), "--text", TEXT, "--model", str(run), "--device", "cpu"])
    assert expected in line
    assert not (tmp_path / "a_mask.png").exists() and _digest(run) == before


def test_model_option_errors(trained, tmp_path, monkeypatch):
    img = _grey_png(tmp_path / "a.png")
    from mrisegcli.shipped import DEFAULT_MODEL, shipped_model

    monkeypatch.delenv("MRISEG_MODEL", raising=False)
    if (
        shipped_model(DEFAULT_MODEL) is None
    ):  # without --model the shipped model runs, when there is one
        line = cli_error(["predict", str(img), "--text", TEXT])
        assert "no model given" in line and "--model" in line
    line = cli_error(["predict", str(img), "--text", TEXT, "--model", str(tmp_path / "no" / "run")])
    assert "no such run folder" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = cli_error(
        ["predict", str(img), "--text", TEXT, "--model", "nobody-xyz/never-pushed-abc"]
    )
    assert "HF_HUB_OFFLINE" in line and line.startswith(
        "mriseg: error: nobody-xyz/never-pushed-abc:"
    )
    usage = cli_error(
        ["predict", str(img), "--text", TEXT, "--model", str(trained["run"]), "--samples", "0"],
        code=2,
    )
    assert "--samples" in usage
    if not torch.cuda.is_available():
        line = cli_error(
            [
                "predict",
                str(img),
                "--text",
                TEXT,
                "--model",
                str(trained["run"]),
                "--device",
                "cuda",
            ]
        )
        assert "no CUDA device" in line
    line = cli_error(["predict", "-", "--text", TEXT, "--model", str(trained["run"])], stdin="")
    assert "no inputs" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


# ----------------------------------------------------------------------------- train: data


def _copy_data(trained, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(trained["data"], dst)
    return dst


def test_xlsx_without_the_expected_columns(trained, tmp_path):
    data = _copy_data(trained, tmp_path)
    xlsx = data / "Train_Folder" / "Train_text.xlsx"
    pd.read_excel(xlsx).rename(columns={"Description": "Caption"}).to_excel(xlsx, index=False)
    line = cli_error(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN])
    assert line.startswith(f"mriseg: error: {xlsx}: missing column(s) Description")
    assert not list((tmp_path / "run").rglob("*"))  # at most an empty folder


def test_image_and_mask_of_different_sizes_lists_every_problem(trained, tmp_path):
    data = _copy_data(trained, tmp_path)
    masks = sorted((data / "Train_Folder" / "labelcol").iterdir())[:2]
    for m in masks:
        Image.open(m).resize((20, 24)).save(m)
    before = _digest(data)
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()  # the one exception to one line: every problem is listed
    assert lines[0] == f"mriseg: error: {data}: dataset has 2 problem(s):"
    for m in masks:
        assert any(str(m) in x and "mask is 24x20 but image is 32x32" in x for x in lines[1:])
    assert _digest(data) == before and not list((tmp_path / "run").rglob("*"))


def test_manifest_path_escaping_the_root(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    for p in (tmp_path / "secret.png", root / "images" / "a.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(p)
    (root / "list.csv").write_text(
        "image,mask,text,split\n../secret.png,images/a.png,hello,train\n"
    )
    line = cli_error(
        ["train", "--data", str(root / "list.csv"), "--out", str(tmp_path / "run"), *TRAIN]
    )
    assert "leads outside the dataset folder" in line and "list.csv row 2" in line


def test_corrupt_cache_shard_names_the_shard(trained, tmp_path):
    shutil.copytree(trained["run"], tmp_path / "src", ignore=shutil.ignore_patterns("checkpoints"))
    shard = sorted((tmp_path / "src" / "cache").glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    line = cli_error(
        [
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(tmp_path / "run"),
            "--tokenizer",
            str(tmp_path / "src"),
            "--cache",
            str(tmp_path / "src" / "cache"),
            *TRAIN,
        ]
    )
    assert line.startswith(f"mriseg: error: {shard}: corrupt cache shard")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_run_folder_guards(trained, tmp_path):
    line = cli_error(
        ["train", "--data", str(trained["data"]), "--out", str(trained["run"]), *TRAIN]
    )
    assert "not empty" in line and "--resume" in line
    line = cli_error(
        [
            "train",
            "--data",
            str(trained["data"]),
            "--out",
            str(tmp_path / "new"),
            "--resume",
            *TRAIN,
        ]
    )
    assert "--resume needs an existing run folder" in line


# ----------------------------------------------------------------------------- fuzzing the readers


def _seed_files() -> dict[str, bytes]:
    """Small valid files of every format the readers take (to corrupt)."""
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = {}
    for suffix, fmt in ((".png", "PNG"), (".tif", "TIFF"), (".jpg", "JPEG"), (".bmp", "BMP")):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt)
        out[suffix] = buf.getvalue()
    out[".dcm"] = (PYDICOM_FILES / "MR_small.dcm").read_bytes()
    out[""] = (PYDICOM_FILES / "liver_1frame.dcm").read_bytes()[:9000]  # a SEG, no suffix
    out[".nii"] = gzip.decompress((NIBABEL_FILES / "standard.nii.gz").read_bytes())
    out[".nii.gz"] = (NIBABEL_FILES / "standard.nii.gz").read_bytes()
    return out


SEEDS = _seed_files()
FUZZ_SETTINGS = settings(
    max_examples=FUZZ,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _read_both(path: Path) -> None:
    """Both readers either succeed or raise MrisegError; anything else fails the test."""
    for reader in (read_scan, read_mask):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                reader(path)
            except MrisegError as err:
                assert "\n" not in str(err) and str(err).startswith(str(path))


@FUZZ_SETTINGS
@given(
    suffix=st.sampled_from([".png", ".jpg", ".tif", ".dcm", ".nii", ".nii.gz", ""]),
    payload=st.binary(min_size=1, max_size=600),
)
def test_random_bytes_never_escape_as_other_exceptions(tmp_path, suffix, payload):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(payload)
    _read_both(path)


@FUZZ_SETTINGS
@given(
    suffix=st.sampled_from(sorted(SEEDS)),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=8
    ),
)
def test_damaged_valid_files_never_escape_as_other_exceptions(tmp_path, suffix, cut, flips):
    data = bytearray(SEEDS[suffix])
    for where, value in flips:  # flipped bytes, most of them in the header where parsers branch
        data[int(where * min(len(data), 2048))] = value
    data = data[: max(1, int(len(data) * cut))] if cut < 0.98 else data
    path = tmp_path / f"y{suffix}"
    path.write_bytes(bytes(data))
    _read_both(path)


@pytest.fixture(scope="module")
def text_tokenizer(trained):
    return load_text_tokenizer(trained["run"])


def _words(tok, text: str) -> list[str]:
    """What the text tokenizer's own normaliser and pre-tokeniser leave of ``text``."""
    backend = tok.backend_tokenizer
    return [
        w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    ]


@settings(max_examples=FUZZ, deadline=None, derandomize=True)
@given(text=st.text(max_size=300))
def test_any_unicode_text_is_refused_cleanly_or_encoded(text_tokenizer, text):
    try:
        clean = validate_text(text)
    except MrisegError as err:
        no_word = not any(unicodedata.category(c)[0] in "LN" for c in text)
        assert "--text" in str(err) and (not text.strip() or no_word)
        return
    ids, mask = encode_texts(text_tokenizer, [clean], 32)
    assert ids.shape == mask.shape == (1, 32)
    assert bool(mask.any()) == bool(_words(text_tokenizer, clean))  # a token for any word left


def test_text_without_any_word_is_refused(trained, tmp_path):
    img = _grey_png(tmp_path / "a.png")
    cli_error(
        [
            "predict",
            str(img),
            "--text",
            "\x1b \u0301 \u00b4",
            "--model",
            str(trained["run"]),
            "--device",
            "cpu",
        ]
    )
