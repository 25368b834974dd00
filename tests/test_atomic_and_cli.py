"""The CLI skeleton and atomic writes: help, version, one-line errors, no partial files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mrisegcli import __version__
from mrisegcli.cli import app
from mrisegcli.errors import OutputExistsError
from mrisegcli.io.atomic import atomic_path, atomic_write_text

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "evaluate"):
        assert command in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_module_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "mrisegcli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert __version__ in proc.stdout


def test_atomic_write_refuses_existing_and_keeps_it(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("precious")
    with pytest.raises(OutputExistsError):
        atomic_write_text(target, "new")
    assert target.read_text() == "precious"
    atomic_write_text(target, "new", overwrite=True)
    assert target.read_text() == "new"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "mask.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer failed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


# --------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize(
    "args, names",
    [
        (["train", "--steps", "abc"], ["--steps", "integer", "mriseg train --help"]),
        (
            ["train", "--data", "d", "--out", "o", "--steps", "0"],
            ["--steps", "mriseg train --help"],
        ),
        (["predict"], ["missing argument", "mriseg predict --help"]),
        (["train"], ["missing option", "--data", "mriseg train --help"]),
        (["nosuchcommand"], ["no such command", "nosuchcommand", "mriseg --help"]),
        (["tran"], ["no such command", "'train'"]),  # Typer's suggestion is kept
        (["--bogus"], ["no such option", "--bogus"]),
        (["evaluate", "--pred", "p", "--gt", "g", "--samples", "x"], ["--samples"]),
    ],
    ids=[
        "bad int",
        "out of range",
        "no inputs",
        "missing option",
        "unknown command",
        "typo",
        "unknown root option",
        "bad int evaluate",
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mriseg: error: "), lines[0]
    assert "Usage:" not in lines[0] and "╭" not in lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert list(tmp_path.iterdir()) == []  # refused before anything ran


def test_help_is_unchanged_by_the_one_line_errors():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "mriseg: error" not in result.output
    assert "Usage:" in result.output and "--steps" in result.output and "--resume" in result.output
    bare = runner.invoke(app, [])  # no command: the help, as before
    assert (
        "Usage:" in bare.output and "predict" in bare.output and "mriseg: error" not in bare.output
    )


def test_usage_error_from_the_console_script(tmp_path):
    script = Path(sys.executable).with_name("mriseg")
    assert script.is_file(), "the mriseg console script is not installed in this environment"
    proc = subprocess.run(
        [str(script), "train", "--steps", "abc"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.rstrip("\n")]
    assert proc.stderr.startswith("mriseg: error: invalid value for '--steps'")
    assert "Traceback" not in proc.stderr
