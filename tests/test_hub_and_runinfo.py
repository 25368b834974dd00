"""Run config validation and resolving ``--model`` to a folder (local or Hub cache, offline)."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import errors

from mrisegcli.errors import ConfigError, MrisegError
from mrisegcli.hub import RUN_PATTERNS, hub_offline, model_card, parse_hub_id, resolve_run
from mrisegcli.runinfo import CONFIG_SCHEMA, read_config, write_config

MINIMAL = {"paradigm": "next-token", "tokenizers": {}, "model": {}, "preset": "tiny"}


def test_config_round_trip_records_versions(tmp_path):
    write_config(tmp_path, MINIMAL)
    config = read_config(tmp_path)
    assert config["schema"] == CONFIG_SCHEMA
    assert config["versions"]["torch"] and config["versions"]["python"]


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "corrupt config"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"schema": 1}), "missing"),
        (
            json.dumps({**MINIMAL, "schema": CONFIG_SCHEMA + 1, "mriseg_version": "9.0"}),
            "upgrade mriseg",
        ),
        (
            json.dumps({**MINIMAL, "schema": 1, "mriseg_version": "0", "paradigm": "x"}),
            "unknown paradigm",
        ),
    ],
)
def test_bad_configs_are_refused(tmp_path, content, match):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=match):
        read_config(tmp_path)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a mriseg run folder"):
        read_config(tmp_path)


def test_parse_hub_id():
    assert parse_hub_id("user/repo") == ("user/repo", None)
    assert parse_hub_id("user/repo@v1.0") == ("user/repo", "v1.0")
    assert parse_hub_id("runs/a/b") is None
    assert parse_hub_id("just-a-name") is None


def _fake_hub_cache(cache, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """The Hub cache layout: models--user--repo/{refs/main, snapshots/<commit>/...}."""
    base = cache / f"models--{repo_id.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_resolve_local_folder_and_hub_cache_offline(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    assert resolve_run(run) == run
    cache = tmp_path / "hub"
    snap = _fake_hub_cache(cache, "someone/mriseg-tiny", {"config.json": "{}"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_run("someone/mriseg-tiny", cache_dir=cache).resolve() == snap.resolve()
    with pytest.raises(MrisegError, match="HF_HUB_OFFLINE"):
        resolve_run("someone/not-cached", cache_dir=cache)


@pytest.fixture
def hub_calls(monkeypatch):
    """Record how resolve_run calls snapshot_download (nothing is downloaded) from a clean
    environment: no offline variable set, huggingface_hub imported online."""
    import huggingface_hub
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return "/nowhere"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("value", ["0", "false", "False", "FALSE", "no", "off", "", "2", "offline"])
def test_hf_hub_offline_false_values_are_online(hub_calls, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is False
    resolve_run("someone/mriseg-tiny@v1")
    assert hub_calls == [
        {
            "repo_id": "someone/mriseg-tiny",
            "revision": "v1",
            "allow_patterns": RUN_PATTERNS,
            "cache_dir": None,
            "local_files_only": False,
        }
    ]


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "YES", "on", "On"])
def test_hf_hub_offline_true_values_are_offline(hub_calls, monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is True
    resolve_run("someone/mriseg-tiny")
    assert [c["local_files_only"] for c in hub_calls] == [True]


def test_offline_as_huggingface_hub_reads_it(hub_calls, monkeypatch):
    from huggingface_hub import constants

    assert hub_offline() is False  # nothing set
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # huggingface_hub honours it too
    assert hub_offline() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # ... unless HF_HUB_OFFLINE says otherwise
    assert hub_offline() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    # huggingface_hub was imported with HF_HUB_OFFLINE=1: its downloads stay offline, so do we
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_offline() is True
    resolve_run("someone/mriseg-tiny")
    assert [c["local_files_only"] for c in hub_calls] == [True]


def test_resolve_missing_local_path_is_clear(tmp_path):
    with pytest.raises(MrisegError, match="no such run folder"):
        resolve_run(tmp_path / "nope" / "deeper")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(MrisegError, match="is a file"):
        resolve_run(tmp_path / "f.txt")


def test_model_card_holds_config_and_metrics():
    card = model_card({**MINIMAL, "data": {"root": "qata"}}, {"dice": 0.8123})
    assert "0.8123" in card and '"paradigm": "next-token"' in card and card.startswith("---")
    # the PyPI distribution is mrisegcli ("mriseg" on PyPI is another project); the command is mriseg
    assert "\npip install mrisegcli\n" in card and "pip install mriseg\n" not in card
    assert "\nmriseg predict " in card


def test_model_card_metadata_is_read_by_huggingface_hub():
    from huggingface_hub import ModelCard

    card = model_card(MINIMAL, {"best_val_dice": 0.5, "steps": 3})
    data = ModelCard(card).data
    assert data.library_name == "mriseg" and "referring-segmentation" in data.tags
    assert data.metrics == ["dice"] and data.license is None  # no licence is assumed
    assert ModelCard(model_card(MINIMAL)).data.metrics is None  # nothing scored, none named
    card = model_card(MINIMAL, license="other", license_name="CC-BY-SA-4.0")
    data = ModelCard(card).data
    assert (data.license, data.license_name) == ("other", "CC-BY-SA-4.0")
    assert "\nlicense: other\nlicense_name: CC-BY-SA-4.0\n" in card  # what `mriseg models` reads
    assert card.split("---\n", 2)[2] == model_card(MINIMAL).split("---\n", 2)[2]  # same body


@pytest.mark.parametrize(
    "spdx, card",
    [
        ("Apache-2.0", ("apache-2.0", None)),  # a licence the Hub knows: its id
        ("cc-by-sa-4.0", ("cc-by-sa-4.0", None)),
        ("LicenseRef-mriseg-research-data", ("other", "LicenseRef-mriseg-research-data")),
        ("CC-BY-SA-4.0 AND LicenseRef-x", ("other", "CC-BY-SA-4.0 AND LicenseRef-x")),
        ("GPL-2.0-or-later WITH Classpath-exception-2.0",
         ("other", "GPL-2.0-or-later WITH Classpath-exception-2.0")),
        ("(MIT OR Apache-2.0)", ("other", "(MIT OR Apache-2.0)")),
        (None, (None, None)),  # none given: none assumed
    ],
)  # fmt: skip
def test_card_license_of_an_spdx_expression(spdx, card):
    from mrisegcli.hub import card_license

    license_id, name = card_license(spdx)
    assert (license_id, name) == card
    if license_id == "other":  # what `mriseg models` reads back from the card
        text = model_card(MINIMAL, license=license_id, license_name=name)
        assert f"\nlicense: other\nlicense_name: {name}\n" in text


@pytest.mark.parametrize("bad", ["", "Apache 2.0", "MIT and BSD-3-Clause", "MIT OR", "(MIT", "a,b"])
def test_spdx_expression_refuses_anything_else_in_one_line(bad):
    from mrisegcli.hub import spdx_expression

    with pytest.raises(MrisegError, match="is not an SPDX licence identifier or expression") as e:
        spdx_expression(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "script, folder", [("ship_cxr_model", "chest-xray"), ("ship_brain_model", "brain-mri")]
)
def test_ship_scripts_write_the_shipped_cards(script, folder, monkeypatch):
    """The cards the ship scripts write now (front matter by huggingface_hub) say what the
    shipped cards say: the same metadata, the same text."""
    import importlib
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "examples"))
    ship = importlib.import_module(script)
    shipped = root / "src" / "mrisegcli" / "shipped" / folder
    config, metrics, ev = (
        json.loads((shipped / name).read_text())
        for name in ("config.json", "metrics.json", "evaluation.json")
    )
    new = ship.card(config, metrics, ev).split("---\n", 2)
    old = (shipped / "README.md").read_text().split("---\n", 2)
    assert new[0] == old[0] == ""
    assert yaml.safe_load(new[1]) == yaml.safe_load(old[1])
    assert yaml.safe_load(new[1])["license"] == "other"
    assert new[2] == old[2]


# ------------------------------------------------------- a Hub id that cannot be fetched says why
class _Response:
    """Just what the Hub client's HTTP errors read from a response."""

    def __init__(self, status: int) -> None:
        self.status_code, self.headers, self.request = status, {}, None


def _http(cls_name: str, status: int):
    return getattr(errors, cls_name)(f"{status} Client Error", response=_Response(status))


def _local_entry_not_found():
    """What snapshot_download raises when the Hub cannot be reached and the cache lacks the run."""
    return errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")


class ConnectError(Exception):
    """Named like httpx's: a transport error that is no OSError."""


# newer huggingface_hub raises RemoteEntryNotFoundError, older ones EntryNotFoundError itself
_REMOTE_ENTRY = (
    "RemoteEntryNotFoundError"
    if hasattr(errors, "RemoteEntryNotFoundError")
    else "EntryNotFoundError"
)


def _raising(monkeypatch, error):
    import huggingface_hub
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def snapshot_download(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: _http("RepositoryNotFoundError", 404), ["not found", "no such model repository"]),
        (
            lambda: _http("RepositoryNotFoundError", 401),
            ["not found", "if it is private", "hf auth login"],
        ),
        (lambda: _http("RevisionNotFoundError", 404), ["not found", "no revision 'v2'"]),
        (lambda: _http(_REMOTE_ENTRY, 404), ["not found", "file of the run is missing"]),
        (
            lambda: _http("GatedRepoError", 403),
            ["not authorised", "gated", "https://huggingface.co/someone/mriseg-tiny"],
        ),
        (lambda: _http("HfHubHTTPError", 401), ["not authorised", "HTTP 401", "HF_TOKEN"]),
        (lambda: _http("HfHubHTTPError", 403), ["not authorised", "HTTP 403"]),
        (lambda: _http("HfHubHTTPError", 404), ["not found"]),
        (lambda: _http("HfHubHTTPError", 503), ["HTTP 503"]),
        (
            lambda: _local_entry_not_found(),
            ["offline", "cannot be reached", "not (fully) in the Hub cache"],
        ),
        (
            lambda: ConnectError("[Errno -3] Temporary failure in name resolution"),
            ["offline", "ConnectError"],
        ),
        (lambda: TimeoutError("timed out"), ["offline", "TimeoutError: timed out"]),
        (
            lambda: PermissionError(13, "Permission denied"),
            ["PermissionError", "Permission denied"],
        ),
    ],
    ids=[
        "repo 404",
        "repo 401",
        "revision",
        "entry",
        "gated",
        "http 401",
        "http 403",
        "http 404",
        "http 503",
        "no network",
        "httpx connect",
        "timeout",
        "cache not writable",
    ],
)
def test_hub_fetch_failure_says_which(monkeypatch, make, words):
    _raising(monkeypatch, make())
    with pytest.raises(MrisegError) as info:
        resolve_run("someone/mriseg-tiny@v2")
    message = str(info.value)
    assert message.startswith("someone/mriseg-tiny@v2: cannot get the model from the Hub: "), (
        message
    )
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    kinds = [k for k in ("offline", "not found", "not authorised") if k in message]
    assert len(kinds) <= 1, message  # never two verdicts at once


def test_hub_fetch_offline_names_hf_hub_offline(monkeypatch):
    _raising(monkeypatch, _local_entry_not_found())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        MrisegError, match=r"offline: HF_HUB_OFFLINE is set .* \(unset HF_HUB_OFFLINE"
    ):
        resolve_run("someone/mriseg-tiny")


def test_hub_fetch_keeps_programming_errors(monkeypatch):
    _raising(monkeypatch, TypeError("a bug, not the Hub"))
    with pytest.raises(TypeError, match="a bug"):
        resolve_run("someone/mriseg-tiny")
