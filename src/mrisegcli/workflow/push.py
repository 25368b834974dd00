"""``mriseg push``: publish a run folder on the Hugging Face Hub with a generated model card.

Only what ``predict`` needs goes up (config, weights, tokenizers, card, metrics, log; never
checkpoints, the code cache or temp files: ``hub.RUN_PATTERNS`` / ``hub.IGNORE_PATTERNS``), so
``--model user/name`` works on any machine afterwards. The run is checked before anything is
sent, and every failure of the Hub client (no token, refused, offline, no network) becomes one
:class:`MrisegError` line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mrisegcli import __version__, runfolder
from mrisegcli.errors import ConfigError, MrisegError
from mrisegcli.hub import IGNORE_PATTERNS, RUN_PATTERNS, hub_offline, model_card, parse_hub_id
from mrisegcli.io.atomic import atomic_write_text
from mrisegcli.runinfo import read_config
from mrisegcli.workflow.bundle import FILES, TEXT_FILE, needed_tokenizers

MODEL_FILE = runfolder.MODEL
CARD = runfolder.CARD
METRICS = runfolder.METRICS


def check_run(run_dir: Path) -> dict[str, Any]:
    """The run's config when the folder holds everything ``predict`` needs; else a clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MrisegError("no such run folder", run_dir)
    config = read_config(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        raise MrisegError(f"run has no {MODEL_FILE} (training not finished?)", run_dir)
    image_input = config.get("run", {}).get("strategies", {}).get("image_input", "codes")
    need = [FILES[n] for n in needed_tokenizers(config["paradigm"], image_input)] + [TEXT_FILE]
    missing = [name for name in need if not (run_dir / name).is_file()]
    if missing:
        raise MrisegError(f"run lacks {', '.join(missing)} (cannot predict without it)", run_dir)
    return config


def card_metrics(run_dir: Path) -> dict[str, Any]:
    """Scalars of ``metrics.json`` for the card (nested reports flattened to ``a.b``)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"corrupt metrics file ({e})", path) from e
    if not isinstance(raw, dict):
        raise ConfigError("corrupt metrics file (not a JSON object)", path)

    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value

    walk("", raw)
    return flat


def upload_plan(run_dir: Path) -> list[str]:
    """The run's files (relative, sorted) that a push uploads, chosen by the Hub client's own
    pattern filter so that this list is exactly what ``upload_folder`` sends."""
    from huggingface_hub.utils import filter_repo_objects

    run_dir = Path(run_dir)
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    return list(
        filter_repo_objects(files, allow_patterns=RUN_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    )


def _hub_error(e: Exception, repo_id: str) -> MrisegError:
    """One line for a failure of the Hub client, with the fix when there is an obvious one."""
    from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, LocalTokenNotFoundError) or status == 401:
        reason = "not logged in or the token is invalid (run `hf auth login`, set HF_TOKEN or pass --token)"
    elif status == 403:
        reason = "the token may not write to this repository (use a token with write access)"
    elif status == 404:
        reason = "repository or revision not found"
    elif isinstance(e, HFValidationError):
        reason = f"invalid repository id or revision ({str(e).splitlines()[0]})"
    elif isinstance(e, ConnectionError) or status is None:
        detail = str(e).splitlines()[0] if str(e) else ""
        reason = f"cannot reach the Hub ({type(e).__name__}: {detail})"
    else:
        reason = f"the Hub refused the upload (HTTP {status})"
    return MrisegError(f"push failed: {reason}", repo_id)


def push_run(
    run_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
    license: str | None = None,
    license_name: str | None = None,
) -> str:
    """Publish ``run_dir`` as the Hub model repo ``repo_id``; returns the repo URL.

    Checks the run, writes its model card (README.md, from config.json and metrics.json, with
    the weights' licence when ``license`` is given: :func:`mrisegcli.hub.render_card`),
    creates the repo if needed (and the branch ``revision``), then uploads the run's files.
    ``api`` defaults to ``huggingface_hub.HfApi(token=token)``.
    """
    run_dir = Path(run_dir)
    parsed = parse_hub_id(repo_id)
    if parsed is None or parsed[1] is not None:
        raise MrisegError(f"--repo-id must look like user/name, not {repo_id!r}")
    config = check_run(run_dir)
    files = upload_plan(run_dir)  # before the card exists: must already hold the model
    if MODEL_FILE not in files:
        raise MrisegError(f"{MODEL_FILE} would not be uploaded", run_dir)
    if hub_offline():
        raise MrisegError("cannot push while HF_HUB_OFFLINE is set (unset it to publish)", repo_id)
    card = model_card(config, card_metrics(run_dir), license=license, license_name=license_name)
    atomic_write_text(run_dir / CARD, card, overwrite=True)
    message = commit_message or f"Upload mriseg {config['paradigm']} run (mriseg {__version__})"
    try:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(
            folder_path=str(run_dir),
            repo_id=repo_id,
            revision=revision,
            allow_patterns=RUN_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            commit_message=message,
        )
    except MrisegError:
        raise
    except Exception as e:  # the client raises transport, OS and HTTP errors that vary by version
        raise _hub_error(e, repo_id) from e
    return str(url)
