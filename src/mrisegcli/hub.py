"""Run folders on the Hugging Face Hub: ``--model user/repo[@revision]`` wherever a run folder
is accepted (downloaded once into the Hub cache; ``HF_HUB_OFFLINE=1`` uses the cache only),
and ``mriseg push`` to publish a run with a generated model card (its licence: ``--license``,
else the one the run's own card states: :func:`push_license`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mrisegcli import runfolder
from mrisegcli.errors import MrisegError

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
#: what a run needs to predict; checkpoints and caches stay local
RUN_PATTERNS = [
    runfolder.CONFIG,
    "*.safetensors",
    *runfolder.TEXT_TOKENIZER_FILES,
    runfolder.SPECIAL_TOKENS_MAP,
    runfolder.CARD,
    runfolder.METRICS,
    runfolder.TRAIN_LOG,
]
IGNORE_PATTERNS = [f"{runfolder.CHECKPOINTS}/*", f"{runfolder.CACHE}/*", "*.tmp*"]


def hub_offline() -> bool:
    """Whether the Hub is off limits: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is true.

    Read as huggingface_hub reads it ("1", "on", "yes", "true" in any case; "0", "false", "no"
    or "" are online), but now rather than when huggingface_hub was imported. huggingface_hub's
    own import-time value counts too, because its downloads obey that one in any case.
    """
    from huggingface_hub import constants

    true_values = getattr(constants, "ENV_VARS_TRUE_VALUES", {"1", "ON", "YES", "TRUE"})
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None and value.upper() in true_values:
        return True
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """``user/repo@rev`` -> ("user/repo", "rev"); None when ``model`` is not a Hub id."""
    m = _HUB_ID.match(model)
    return (m.group("repo"), m.group("rev")) if m else None


def resolve_run(model: str | Path, *, cache_dir: Path | None = None) -> Path:
    """A local run folder for ``model``: the folder itself, or a Hub snapshot in the cache."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MrisegError("is a file; --model takes a run folder or a Hub id user/repo", path)
        return path
    parsed = parse_hub_id(str(model))
    if parsed is None:
        raise MrisegError(
            "no such run folder (and not a Hub id of the form user/repo[@revision])", path
        )
    repo_id, revision = parsed
    import huggingface_hub

    offline = hub_offline()
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=RUN_PATTERNS,
            cache_dir=str(cache_dir) if cache_dir else None,
            local_files_only=offline,
        )
    except Exception as e:  # the client's errors vary by version (requests or httpx underneath)
        if not isinstance(e, (OSError, ValueError)) and not _is_network_error(e):
            raise
        raise fetch_error(e, repo_id, revision, offline=offline) from e
    return Path(folder)


#: class names (anywhere in the MRO) of the transport errors of requests, httpx and the stdlib
_NETWORK_ERRORS = frozenset(
    {
        "ConnectionError",
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "Timeout",
        "TimeoutError",
        "TimeoutException",
        "NetworkError",
        "TransportError",
        "ProxyError",
        "SSLError",
        "OfflineModeIsEnabled",
    }
)


def _is_network_error(e: BaseException) -> bool:
    return any(cls.__name__ in _NETWORK_ERRORS for cls in type(e).__mro__)


def _client_reason(
    e: Exception, repo_id: str, revision: str | None, offline: bool, login: str
) -> str | None:
    """The reason for one of the Hub client's own error classes (None for any other error)."""
    from huggingface_hub import errors as hf

    # LocalEntryNotFoundError first: in older clients it is also an EntryNotFoundError
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if offline:
            return (
                "offline: HF_HUB_OFFLINE is set and the model is not (fully) in the Hub cache "
                "(unset HF_HUB_OFFLINE to download it)"
            )
        return (
            "offline: the Hub cannot be reached (no network?) and the model is not "
            "(fully) in the Hub cache"
        )
    if isinstance(e, hf.GatedRepoError):
        return (
            f"not authorised: the repository is gated (accept its conditions on "
            f"https://huggingface.co/{repo_id}, then {login})"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        return f"not found: no such model repository on the Hub (if it is private, {login})"
    if isinstance(e, hf.RevisionNotFoundError):
        return f"not found: the repository has no revision {revision or 'main'!r}"
    if isinstance(e, hf.EntryNotFoundError):
        return "not found: a file of the run is missing from the repository"
    if isinstance(e, hf.DisabledRepoError):
        return "not authorised: the repository is disabled"
    return None


def _other_reason(e: Exception, status: int | None, login: str) -> str:
    """The reason for an error the client does not classify: by HTTP status, network, id."""
    from huggingface_hub import errors as hf

    if status in (401, 403):
        return f"not authorised (HTTP {status}): {login} with a token that may read this repository"
    if status == 404:
        return "not found: no such model repository or revision on the Hub"
    if _is_network_error(e):
        detail = str(e).splitlines()[0] if str(e) else ""
        return f"offline: the Hub cannot be reached ({type(e).__name__}{': ' + detail if detail else ''})"
    if isinstance(e, hf.HFValidationError):
        return f"invalid Hub id or revision ({str(e).splitlines()[0]})"
    if status is not None:
        return f"the Hub answered HTTP {status}"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def fetch_error(
    e: Exception, repo_id: str, revision: str | None = None, *, offline: bool = False
) -> MrisegError:
    """Why a Hub id could not be fetched, in one line that says which: offline, not found or
    not authorised (with the fix when there is one); anything else keeps the client's words."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    login = "log in with `hf auth login` or set HF_TOKEN"
    reason = _client_reason(e, repo_id, revision, offline, login) or _other_reason(e, status, login)
    name = f"{repo_id}@{revision}" if revision else repo_id
    return MrisegError(f"cannot get the model from the Hub: {reason}", name)


# ----------------------------------------------------------------------------- the licence
#: Hub licence ids that are also SPDX identifiers (lower-cased): such a licence is the card's
#: ``license``; any other SPDX expression is ``license: other`` with ``license_name``
HUB_SPDX_LICENSES = frozenset(
    """afl-3.0 agpl-3.0 apache-2.0 artistic-2.0 bsd-2-clause bsd-3-clause bsd-3-clause-clear
    bsl-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0
    cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cc-by-nd-4.0
    cc-by-sa-3.0 cc-by-sa-4.0 cc0-1.0 cdla-permissive-1.0 cdla-permissive-2.0 cdla-sharing-1.0
    ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 gpl-2.0 gpl-3.0 isc lgpl-2.1 lgpl-3.0
    lppl-1.3c mit mpl-2.0 ms-pl ncsa ofl-1.1 osl-3.0 postgresql unlicense wtfpl zlib""".split()
)
_SPDX_TOKENS = re.compile(r"[()]|[^\s()]+")
_SPDX_ID = re.compile(r"(?:DocumentRef-[A-Za-z0-9.-]+:)?[A-Za-z0-9][A-Za-z0-9.-]*\+?")
_SPDX_OPERATORS = ("AND", "OR", "WITH")


def _spdx_well_formed(tokens: Sequence[str]) -> bool:
    """Identifiers joined by AND, OR or WITH, in balanced parentheses (the SPDX grammar, with
    the identifiers' spelling checked but not looked up in the SPDX list)."""
    depth, want_id = 0, True
    for tok in tokens:
        if want_id and tok == "(":
            depth += 1
        elif want_id:
            if tok.upper() in _SPDX_OPERATORS or not _SPDX_ID.fullmatch(tok):
                return False
            want_id = False
        elif tok == ")":
            depth -= 1
            if depth < 0:
                return False
        elif tok in _SPDX_OPERATORS:  # upper case, as the SPDX specification writes them
            want_id = True
        else:
            return False
    return bool(tokens) and not want_id and depth == 0


def spdx_expression(value: str) -> str:
    """``value`` as one SPDX licence identifier or expression (``Apache-2.0``,
    ``CC-BY-SA-4.0 AND LicenseRef-mriseg-research-data``, ``(MIT OR Apache-2.0)``), spaces
    normalised; anything else is a one-line :class:`MrisegError`."""
    tokens = _SPDX_TOKENS.findall(value)
    if not _spdx_well_formed(tokens):
        raise MrisegError(
            f"{value!r} is not an SPDX licence identifier or expression such as Apache-2.0, "
            "CC-BY-NC-4.0 or 'CC-BY-SA-4.0 AND LicenseRef-my-data'"
        )
    return re.sub(r"\( | \)", lambda m: m.group(0).strip(), " ".join(tokens))


def card_license(spdx: str | None) -> tuple[str | None, str | None]:
    """``(license, license_name)`` of a model card for an SPDX expression: a Hub licence id
    where the Hub knows it (``apache-2.0``, ``cc-by-sa-4.0``, ...), else ``("other", spdx)``;
    ``(None, None)`` without one, so that no licence is assumed."""
    if spdx is None:
        return None, None
    spdx = spdx_expression(spdx)
    if spdx.lower() in HUB_SPDX_LICENSES:
        return spdx.lower(), None
    return "other", spdx


def recorded_license(run_dir: str | Path) -> str | None:
    """The licence the model card of a run folder (its ``README.md``: a shipped model's, or
    the card an earlier ``push`` wrote) states: ``license_name`` for ``license: other``, else
    ``license``; None without a card or a licence in its metadata."""
    import yaml
    from huggingface_hub import metadata_load

    card = Path(run_dir) / runfolder.CARD
    try:
        meta = metadata_load(card) if card.is_file() else None
    except (ValueError, yaml.YAMLError):  # front matter that is not a YAML mapping: none stated
        meta = None
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("license_name") if meta.get("license") == "other" else meta.get("license")
    return name if isinstance(name, str) and name and name != "other" else None


def push_license(run_dir: str | Path, spdx: str | None = None) -> tuple[str | None, str | None]:
    """The card's ``(license, license_name)`` for ``mriseg push``: of ``spdx`` (``--license``)
    when given, else of the licence the run folder records (:func:`recorded_license`), else
    none (nothing is assumed: the terms of the training data decide it)."""
    if spdx is not None:
        return card_license(spdx)
    recorded = recorded_license(run_dir)
    try:
        return card_license(recorded)
    except MrisegError as e:
        raise MrisegError(
            f"its licence {recorded!r} is not an SPDX licence identifier or expression "
            "(give one with --license)",
            Path(run_dir) / runfolder.CARD,
        ) from e


#: the Hub tags of every mriseg model card
CARD_TAGS = ("medical-imaging", "segmentation", "referring-segmentation", "mriseg")


def render_card(
    body: str,
    *,
    license: str | None = None,
    license_name: str | None = None,
    tags: Sequence[str] = CARD_TAGS,
    datasets: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
) -> str:
    """A model card's text: the Hub metadata as YAML front matter (built by
    ``huggingface_hub.ModelCardData``: ``library_name: mriseg``, the licence, tags, Hub dataset
    ids, metric names; a field left ``None`` is left out) above the Markdown ``body``.

    ``license`` is a Hub licence id; ``"other"`` with ``license_name`` (an SPDX expression)
    for anything else, as the shipped models' cards do."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="mriseg",
        license=license,
        license_name=license_name,
        tags=list(tags),
        datasets=list(datasets) if datasets else None,
        metrics=list(metrics) if metrics else None,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def model_card(
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    *,
    license: str | None = None,
    license_name: str | None = None,
) -> str:
    """A README.md for the Hub: what the model is, how it was trained, what it scored; the
    licence of the weights when given (see :func:`render_card`: the terms of the training
    data decide it, so nothing is assumed)."""
    metrics = metrics or {}
    data = config.get("data", {})
    lines = [
        f"# mriseg {config.get('paradigm', '?')} model",
        "",
        "Text-prompted medical image segmentation by autoregressive token prediction.",
        "",
        "```bash",
        "pip install mrisegcli",
        'mriseg predict scan.png --text "..." --model THIS_REPO_ID',
        "```",
        "",
        "## Training",
        "",
        f"* paradigm: `{config.get('paradigm')}`, preset: `{config.get('preset')}`",
        f"* data: `{data.get('root', '?')}` (layout `{data.get('layout', '?')}`), "
        f"image size {data.get('image_size', '?')} px",
        f"* mriseg {config.get('mriseg_version')}, seed {config.get('seed')}",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in metrics.items()
        ]
    else:
        lines.append("Not evaluated.")
    lines += ["", "## Config", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    scored = ["dice"] if any(k.endswith("dice") for k in metrics) else None
    return render_card("\n".join(lines), license=license, license_name=license_name, metrics=scored)
