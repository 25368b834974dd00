"""``mriseg push`` without a network: a fake Hub client records every call and applies the Hub
client's own pattern filter, so the tests see exactly which files would be uploaded. The fake
can also lay the upload out as a Hub cache snapshot, which closes the loop: push, then
``mriseg predict --model user/name`` with ``HF_HUB_OFFLINE=1`` on that cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.errors import ConfigError, MrisegError
from mrisegcli.hub import resolve_run
from mrisegcli.workflow.push import card_metrics, push_run, upload_plan
from mrisegcli.workflow.segmenter import load_segmenter

runner = CliRunner()
TEXT = "Unilateral pulmonary infection, one infected area, all right lung."
TRAIN = [
    "--size",
    "32",
    "--steps",
    "4",
    "--batch-size",
    "4",
    "--mask-steps",
    "10",
    "--image-steps",
    "10",
    "--ckpt-every",
    "2",
    "--eval-every",
    "1000",
    "--device",
    "cpu",
    "--workers",
    "0",
]


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records calls; optionally writes a cache."""

    def __init__(self, cache: Path | None = None, fail: Exception | None = None) -> None:
        self.cache, self.fail = cache, fail
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kw):
        self.calls.append(
            ("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": exist_ok, **kw})
        )
        if self.fail is not None:
            raise self.fail
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kw):
        self.calls.append(
            ("create_branch", {"repo_id": repo_id, "branch": branch, "exist_ok": exist_ok})
        )

    def upload_folder(
        self,
        *,
        folder_path,
        repo_id,
        revision=None,
        allow_patterns=None,
        ignore_patterns=None,
        commit_message=None,
        **kw,
    ):
        root = Path(folder_path)
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        chosen = list(
            filter_repo_objects(
                names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
            )
        )
        self.uploaded = {n: (root / n).read_bytes() for n in chosen}
        self.calls.append(
            (
                "upload_folder",
                {
                    "repo_id": repo_id,
                    "revision": revision,
                    "commit_message": commit_message,
                    "files": chosen,
                },
            )
        )
        if (
            self.cache is not None
        ):  # the Hub cache layout: models--u--r/{refs/<rev>, snapshots/<sha>/}
            sha = hashlib.sha1(
                b"".join(n.encode() + b for n, b in self.uploaded.items())
            ).hexdigest()
            base = self.cache / f"models--{repo_id.replace('/', '--')}"
            (base / "refs").mkdir(parents=True, exist_ok=True)
            (base / "refs" / (revision or "main")).write_text(sha)
            for n, data in self.uploaded.items():
                (base / "snapshots" / sha / n).parent.mkdir(parents=True, exist_ok=True)
                (base / "snapshots" / sha / n).write_bytes(data)


def _http_error(status: int) -> HfHubHTTPError:
    """An HfHubHTTPError carrying only a status (its constructor wants a live HTTP response)."""
    err = HfHubHTTPError.__new__(HfHubHTTPError)
    Exception.__init__(err, f"{status} Client Error")
    err.response = type("Response", (), {"status_code": status})()
    return err


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread is many times faster than contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("push")
    data, run = base / "data", base / "run"
    for args in (
        ["synth", str(data), "--n-train", "8", "--n-val", "2", "--n-test", "2", "--size", "32"],
        ["train", "--data", str(data), "--out", str(run), *TRAIN],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (r.output, r.exception)
    return {"data": data, "run": run}


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run (pushing writes README.md into it)."""
    dst = tmp_path / "run"
    shutil.copytree(trained["run"], dst)
    return dst


def test_upload_holds_what_predict_needs_and_nothing_else(run, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (run / ".model.x1y2.tmp.safetensors").write_bytes(b"half-written")  # an interrupted write
    assert any(p.is_file() for p in (run / "checkpoints").iterdir())
    assert any(p.is_file() for p in (run / "cache").rglob("*"))
    hub = FakeHub()
    url = push_run(run, "someone/tiny-seg", private=True, api=hub)
    assert url == "https://huggingface.co/someone/tiny-seg"
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": "someone/tiny-seg", "private": True, "exist_ok": True}
    files = hub.calls[1][1]["files"]
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "mask_vq.safetensors",
        "image_vq.safetensors",
        "README.md",
        "metrics.json",
        "train_log.jsonl",
    } <= set(files)
    assert not [f for f in files if f.startswith(("checkpoints/", "cache/")) or "tmp" in f]
    assert files == [f for f in upload_plan(run)]  # the plan is what the client uploads
    assert hub.uploaded["model.safetensors"] == (run / "model.safetensors").read_bytes()
    assert hub.calls[1][1]["commit_message"].startswith("Upload mriseg next-token run")


def test_model_card_is_written_from_config_and_metrics_and_refreshed(run, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = FakeHub()
    push_run(run, "someone/tiny-seg", commit_message="first", api=hub)
    card = (run / "README.md").read_text()
    assert hub.uploaded["README.md"].decode() == card
    metrics = json.loads((run / "metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: mriseg")
    assert "# mriseg next-token model" in card and '"paradigm": "next-token"' in card
    assert "pip install mrisegcli\n" in card and "pip install mriseg\n" not in card  # the PyPI name
    assert f"| steps | {metrics['steps']} |" in card
    assert "| tokenizers.mask_vq.n_train |" in card  # nested reports are flattened
    assert hub.calls[-1][1]["commit_message"] == "first"
    metrics["steps"] = 12345
    (run / "metrics.json").write_text(json.dumps(metrics))
    push_run(run, "someone/tiny-seg", api=hub)
    assert "| steps | 12345 |" in (run / "README.md").read_text()
    assert "license" not in (run / "README.md").read_text()  # none given, none assumed
    push_run(run, "someone/tiny-seg", api=hub, license="other", license_name="CC-BY-SA-4.0")
    card = (run / "README.md").read_text()
    assert "\nlicense: other\nlicense_name: CC-BY-SA-4.0\n" in card.split("\n---\n")[0]
    assert hub.uploaded["README.md"].decode() == card


def test_revision_creates_the_branch_and_uploads_there(run, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = FakeHub()
    push_run(run, "someone/tiny-seg", revision="exp-1", api=hub)
    assert (
        "create_branch",
        {"repo_id": "someone/tiny-seg", "branch": "exp-1", "exist_ok": True},
    ) in hub.calls
    assert hub.calls[-1][1]["revision"] == "exp-1"


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_offline_refuses_before_touching_anything(run, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    hub = FakeHub()
    with pytest.raises(MrisegError, match="HF_HUB_OFFLINE"):
        push_run(run, "someone/tiny-seg", api=hub)
    assert hub.calls == [] and not (run / "README.md").exists()


def test_bad_runs_and_ids_are_refused_before_any_call(run, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = FakeHub()
    for bad_id in ("noslash", "user/name@main", "a/b/c"):
        with pytest.raises(MrisegError, match="--repo-id"):
            push_run(run, bad_id, api=hub)
    with pytest.raises(MrisegError, match="no such run folder"):
        push_run(tmp_path / "missing", "u/r", api=hub)
    with pytest.raises(ConfigError, match="not a mriseg run folder"):
        push_run(tmp_path, "u/r", api=hub)
    (run / "metrics.json").write_text("{broken")
    with pytest.raises(ConfigError, match="corrupt metrics"):
        push_run(run, "u/r", api=hub)
    (run / "mask_vq.safetensors").unlink()
    with pytest.raises(MrisegError, match="lacks mask_vq.safetensors"):
        push_run(run, "u/r", api=hub)
    (run / "model.safetensors").unlink()
    with pytest.raises(MrisegError, match="no model.safetensors"):
        push_run(run, "u/r", api=hub)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "schema": 99}))
    with pytest.raises(ConfigError, match="upgrade mriseg"):
        push_run(run, "u/r", api=hub)
    assert hub.calls == []


@pytest.mark.parametrize(
    "failure, expected",
    [
        (LocalTokenNotFoundError("no token"), "not logged in"),
        (_http_error(401), "not logged in"),
        (_http_error(403), "write access"),
        (_http_error(500), "HTTP 500"),
        (ConnectionError("Name or service not known"), "cannot reach the Hub"),
        (TimeoutError(), "cannot reach the Hub (TimeoutError"),
    ],
)
def test_hub_failures_become_one_line(run, monkeypatch, failure, expected):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(MrisegError) as err:
        push_run(run, "someone/tiny-seg", api=FakeHub(fail=failure))
    msg = str(err.value)
    assert msg.startswith("someone/tiny-seg: push failed:") and expected in msg and "\n" not in msg


def test_cli_push_prints_url_and_errors_in_one_line(run, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    made: list[FakeHub] = []

    def fake_api(token=None):
        made.append(FakeHub())
        made[-1].token = token
        return made[-1]

    monkeypatch.setattr(huggingface_hub, "HfApi", fake_api)
    r = runner.invoke(
        app, ["push", str(run), "--repo-id", "someone/tiny-seg", "--token", "hf_x", "--private"]
    )
    assert r.exit_code == 0, r.output
    assert "https://huggingface.co/someone/tiny-seg" in r.output and made[0].token == "hf_x"
    assert made[0].calls[0][1]["private"] is True and "--model someone/tiny-seg\n" in r.output
    r = runner.invoke(
        app, ["push", str(run), "--repo-id", "someone/tiny-seg", "--revision", "exp-1"]
    )
    assert r.exit_code == 0 and "--model someone/tiny-seg@exp-1" in r.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(app, ["push", str(run), "--repo-id", "someone/tiny-seg"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("mriseg: error:")
    r = runner.invoke(app, ["push", str(run)])
    assert r.exit_code == 2  # --repo-id is required


SHIPPED = Path(__file__).resolve().parents[1] / "src" / "mrisegcli" / "shipped"


@pytest.fixture
def shipped_run(tmp_path) -> Path:
    """A run folder with the brain-mri model's config, card and tokenizer, and stand-ins for
    its weights (a push checks that they are there, not what they hold): no training needed."""
    run = tmp_path / "brain"
    run.mkdir()
    for name in ("config.json", "README.md", "metrics.json", "tokenizer.json"):
        shutil.copy(SHIPPED / "brain-mri" / name, run / name)
    for name in ("model.safetensors", "mask_vq.safetensors"):
        (run / name).write_bytes(b"weights")
    return run


def _front_matter(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "README.md").read_text().split("---\n", 2)[1])


def _cli_push(run: Path, *args: str, monkeypatch) -> tuple[object, list[FakeHub]]:
    made: list[FakeHub] = []

    def api(token=None) -> FakeHub:
        made.append(FakeHub())
        return made[-1]

    monkeypatch.setattr(huggingface_hub, "HfApi", api)
    return runner.invoke(app, ["push", str(run), "--repo-id", "someone/brain", *args]), made


def test_push_license_defaults_to_the_runs_own_and_the_option_sets_it(shipped_run, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    r, made = _cli_push(shipped_run, monkeypatch=monkeypatch)  # the shipped card's licence
    assert r.exit_code == 0, r.output
    meta = _front_matter(shipped_run)
    assert (meta["license"], meta["license_name"]) == ("other", "LicenseRef-mriseg-research-data")
    assert made[0].uploaded["README.md"] == (shipped_run / "README.md").read_bytes()
    r, _ = _cli_push(shipped_run, "--license", "Apache-2.0", monkeypatch=monkeypatch)
    assert r.exit_code == 0, r.output
    assert _front_matter(shipped_run)["license"] == "apache-2.0"  # the Hub's id of it
    assert "license_name" not in _front_matter(shipped_run)
    _cli_push(shipped_run, monkeypatch=monkeypatch)  # the card records it now: kept
    assert _front_matter(shipped_run)["license"] == "apache-2.0"
    expression = "( CC-BY-SA-4.0 OR MIT ) AND LicenseRef-my-data"
    _cli_push(shipped_run, "--license", expression, monkeypatch=monkeypatch)
    meta = _front_matter(shipped_run)
    assert (meta["license"], meta["license_name"]) == (
        "other",
        "(CC-BY-SA-4.0 OR MIT) AND LicenseRef-my-data",
    )
    (shipped_run / "README.md").unlink()  # no card, no licence: none is assumed
    _cli_push(shipped_run, monkeypatch=monkeypatch)
    assert "license" not in _front_matter(shipped_run)


@pytest.mark.parametrize("bad", ["my licence", "MIT and Apache-2.0", "(MIT", "GPL/MIT", ""])
def test_push_refuses_a_license_that_is_not_spdx_in_one_line(shipped_run, monkeypatch, bad):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    card = (shipped_run / "README.md").read_text()
    r, made = _cli_push(shipped_run, "--license", bad, monkeypatch=monkeypatch)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("mriseg: error: invalid value for '--license': ")
    assert "SPDX" in r.output and made == [] and (shipped_run / "README.md").read_text() == card


def test_push_refuses_a_recorded_license_that_is_not_spdx(shipped_run, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    card = shipped_run / "README.md"
    card.write_text(card.read_text().replace("LicenseRef-mriseg-research-data", "research only"))
    r, made = _cli_push(shipped_run, monkeypatch=monkeypatch)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and made == [], r.output
    assert "README.md: its licence 'research only' is not an SPDX" in r.output
    assert "--license" in r.output
    r, _ = _cli_push(shipped_run, "--license", "CC-BY-NC-4.0", monkeypatch=monkeypatch)
    assert r.exit_code == 0 and _front_matter(shipped_run)["license"] == "cc-by-nc-4.0"


def test_card_metrics_flattens_and_skips_non_scalars(tmp_path):
    (tmp_path / "metrics.json").write_text(
        json.dumps(
            {
                "best_val_dice": 0.5,
                "best_step": 3,
                "gone": None,
                "list": [1],
                "tok": {"m": {"dice": 0.25}},
            }
        )
    )
    assert card_metrics(tmp_path) == {"best_val_dice": 0.5, "best_step": 3, "tok.m.dice": 0.25}
    assert card_metrics(tmp_path / "nowhere") == {}


def test_offline_round_trip_push_then_predict_from_hub_cache(run, trained, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = tmp_path / "hf" / "hub"
    push_run(run, "someone/tiny-seg", api=FakeHub(cache=cache))
    push_run(run, "someone/tiny-seg", revision="exp-1", api=FakeHub(cache=cache))
    # a revision resolves to its own snapshot, which loads as a model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = resolve_run("someone/tiny-seg@exp-1", cache_dir=cache)
    assert (
        snap.parent.parent.name == "models--someone--tiny-seg"
        and not (snap / "checkpoints").exists()
    )
    assert load_segmenter(snap, torch.device("cpu")).paradigm == "next-token"
    # the real command in a fresh process, offline, with only the Hub cache to go on
    src = sorted((trained["data"] / "Test_Folder" / "img").iterdir())[0]
    img = tmp_path / "work" / "scan.png"
    img.parent.mkdir()
    Image.open(src).resize((40, 36)).save(img)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
    }
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrisegcli",
            "predict",
            str(img),
            "--text",
            TEXT,
            "--model",
            "someone/tiny-seg",
            "--json",
            "--device",
            "cpu",
        ],
        env=env,
        cwd=img.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout.strip().splitlines()[-1])
    mask = np.asarray(Image.open(row["outputs"]["mask"]))
    assert mask.shape == (36, 40) and set(np.unique(mask)) <= {0, 255}
