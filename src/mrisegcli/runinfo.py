"""What every run folder records about itself: the full config, the versions, the command.

``config.json`` is the one file that says how to rebuild a run's models. It carries a schema
number; a file from a newer mriseg, a corrupt one, or one that is not ours is refused with a
clear error instead of being half-understood.

A run folder has one writer at a time: :func:`run_lock` holds ``.mriseg.lock`` (pid, host and
start time) for the whole of a ``train``; a second writer is refused naming the holder, and a
lock left by a process that died on this host is taken over with a note. :func:`foreign_entry`
says whether a folder holds anything ``train`` does not write (``--overwrite`` refuses such a
folder), and :func:`resume_config` applies the options a ``--resume`` may change.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from mrisegcli import __version__, runfolder
from mrisegcli.errors import ConfigError, MrisegError
from mrisegcli.io.atomic import SAFETENSORS_TEMP, atomic_write_text
from mrisegcli.settings import OPTION_FIELDS, RESUMABLE

CONFIG_SCHEMA = 1
CONFIG_NAME = runfolder.CONFIG
_PACKAGES = (
    "torch",
    "numpy",
    "safetensors",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "pydicom",
    "highdicom",
    "nibabel",
    "Pillow",
    "typer",
    "rich",
)
REQUIRED_KEYS = ("schema", "mriseg_version", "paradigm", "tokenizers", "model")


def package_versions() -> dict[str, str]:
    """Versions of Python, the platform and every package a run depends on."""
    versions = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "mriseg": __version__,
    }
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def rewrite_config(run_dir: Path, config: dict[str, Any]) -> Path:
    """Write a run's config, read and changed, as ``run_dir``'s config.json, stamped by this
    mriseg (its schema and version written anew)."""
    config = {k: v for k, v in config.items() if k not in ("schema", "mriseg_version")}
    return write_config(run_dir, config)


def write_config(run_dir: Path, config: dict[str, Any], *, overwrite: bool = True) -> Path:
    """Write ``config.json`` (schema and versions added) atomically."""
    full = {"schema": CONFIG_SCHEMA, "mriseg_version": __version__, **config}
    full.setdefault("versions", package_versions())
    return atomic_write_text(
        run_dir / CONFIG_NAME, json.dumps(full, indent=2, default=str) + "\n", overwrite
    )


def check_schema(value: Any, what: str, newest: int, path: Path, written_by: str = "?") -> int:
    """A format number must be a whole number >= 1 (not a string or a bool) and not newer than
    this mriseg reads."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"corrupt config ({what} must be a whole number, got {value!r})", path)
    if value < 1:
        raise ConfigError(f"corrupt config ({what} {value} does not exist; the first is 1)", path)
    if value > newest:
        raise ConfigError(
            f"written by mriseg {written_by} ({what} {value}); this mriseg {__version__} reads "
            f"{what} <= {newest}: upgrade mriseg",
            path,
        )
    return value


def read_config(run_dir: Path) -> dict[str, Any]:
    """Read and validate a run's ``config.json``."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise ConfigError("not a mriseg run folder (no config.json)", run_dir)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"corrupt config ({e})", path) from e
    if not isinstance(config, dict):
        raise ConfigError("corrupt config (not a JSON object)", path)
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f"not a mriseg config (missing {', '.join(missing)})", path)
    check_schema(
        config["schema"],
        "config schema",
        CONFIG_SCHEMA,
        path,
        str(config.get("mriseg_version", "?")),
    )
    from mrisegcli.paradigms import PARADIGMS

    if config["paradigm"] not in PARADIGMS:
        raise ConfigError(f"unknown paradigm {config['paradigm']!r}", path)
    return config


# ----------------------------------------------------------------------------- --resume

# which train option sets which RunConfig field, and which of them a --resume may change:
# settings.OPTION_FIELDS and settings.RESUMABLE


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _get(cfg: Any, field: str) -> Any:
    for part in field.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: Any, field: str, value: Any) -> Any:
    head, _, rest = field.partition(".")
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: _set(getattr(cfg, head), rest, value)})


def resume_config(
    saved: dict[str, Any],
    asked: Any,
    given: Iterable[str],
    run_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    data: Iterable[Path] | None = None,
) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """The RunConfig a ``--resume`` continues with: the run's own, with the options of
    :data:`RESUMABLE` that the user gave (``given``: option names, their values in ``asked``,
    the config the command line would make) applied. Any other option given with a value that
    differs from the run's is refused by name, and so is ``data`` (the ``--data`` given) when
    it is not the data the run was trained on. Returns the config and ``{option: (old, new)}``
    of what changed."""
    from mrisegcli.config import RunConfig, from_dict

    cfg = from_dict(RunConfig, saved["run"], "config.run")
    given = set(given)
    changed: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []
    for name in sorted(given & set(OPTION_FIELDS)):
        field = OPTION_FIELDS[name]
        old, new = _get(cfg, field), _get(asked, field)
        if name == "text_len" and new < old:
            continue  # the run lengthened its text context to fit its longest text
        if old == new:
            continue
        if name in RESUMABLE:
            changed[name] = (old, new)
            continue
        if name == "no_text":
            refused.append("--no-text (the run was trained with the text)")
        else:
            refused.append(f"{_option(name)} {new} (the run has {old})")
    if tokenizer_dir is not None and "tokenizer" in given:
        from mrisegcli.workflow.bundle import file_fingerprints

        mine = {k: v["sha256"] for k, v in file_fingerprints(run_dir).items()}
        theirs = {k: v["sha256"] for k, v in file_fingerprints(Path(tokenizer_dir)).items()}
        if any(theirs.get(k) != v for k, v in mine.items()):
            refused.append(f"--tokenizer {tokenizer_dir} (not the tokenizers of this run)")
    other_data = _other_data(saved, data)
    if other_data:
        refused.append(other_data)
    if refused:
        allowed = ", ".join(_option(n) for n in RESUMABLE)
        raise MrisegError(
            f"--resume continues the run as it was set up; these options differ from it: "
            f"{', '.join(refused)}. Only {allowed} may change on a resume; start a new run "
            "(another --out, or --overwrite) to change the others",
            run_dir,
        )
    if "steps" in changed and cfg.train.epochs is not None:
        cfg = _set(cfg, "train.epochs", None)  # --steps replaces an epoch count
    for name, (_, new) in changed.items():
        cfg = _set(cfg, OPTION_FIELDS[name], new)
    return cfg, changed


#: options that would give the model another shape than the one it starts from
FIXED_BY_INIT = ("paradigm", "preset", "size")


def finetune_config(saved: dict[str, Any], asked: Any, given: Iterable[str], init_dir: Path) -> Any:
    """The RunConfig of a run that starts from the model in ``init_dir`` (``saved``: its
    config.json): that model's own run config with every option the user gave (``given``,
    values in ``asked``) applied, so that training settings change and the architecture and
    tokenizers stay. Options that would reshape the model are refused by name."""
    from mrisegcli.config import RunConfig, from_dict

    cfg = from_dict(RunConfig, saved["run"], "config.run")
    given = set(given)
    fixed = [
        _option(n)
        for n in FIXED_BY_INIT
        if n in given and _get(asked, OPTION_FIELDS[n]) != _get(cfg, OPTION_FIELDS[n])
    ]
    if fixed:
        raise MrisegError(
            f"--init-from keeps the model's architecture and tokenizers; {', '.join(fixed)} "
            "differ from it (leave them out, or train a new model without --init-from)",
            init_dir,
        )
    for name in sorted(given & set(OPTION_FIELDS)):
        if name == "text_len":
            continue  # the model's text context is part of its shape
        cfg = _set(cfg, OPTION_FIELDS[name], _get(asked, OPTION_FIELDS[name]))
    if "steps" in given and cfg.train.epochs is not None:
        cfg = _set(cfg, "train.epochs", None)
    return cfg


def data_paths(roots: Iterable[Path]) -> list[str]:
    """The datasets of a run as config.json records them in ``data.paths``: absolute, links
    resolved, so that a resume from another folder compares them rightly."""
    return [os.path.realpath(str(r)) for r in roots]


def _other_data(saved: dict[str, Any], data: Iterable[Path] | None) -> str | None:
    """``--data X (the run was trained on Y)`` when the data given to a resume are not the
    run's (its ``data.paths``, or for an older run its ``data.root`` from the current folder)."""
    record = saved.get("data")
    if data is None or not isinstance(record, dict):
        return None
    recorded = record.get("paths") or record.get("root")
    if isinstance(recorded, str):
        recorded = [recorded]
    if not isinstance(recorded, list) or not all(isinstance(r, str) for r in recorded):
        return None
    given = [Path(d) for d in data]
    if sorted(data_paths(given)) == sorted(data_paths(Path(r) for r in recorded)):
        return None
    asked = " ".join(f"--data {d}" for d in given)
    return f"{asked} (the run was trained on {', '.join(recorded)})"


def record_resumed_config(run_dir: Path, saved: dict[str, Any], cfg: Any) -> None:
    """Rewrite ``config.json`` with the run section a resume continues with."""
    from mrisegcli.config import to_dict

    write_config(run_dir, {**saved, "run": to_dict(cfg)})


# ----------------------------------------------------------------------------- run folders

LOCK_NAME = runfolder.LOCK
#: what ``train`` writes at the top of a run folder (README.md: ``push``'s model card)
RUN_FILES = frozenset(
    {
        CONFIG_NAME,
        runfolder.MODEL,
        runfolder.METRICS,
        runfolder.TRAIN_LOG,
        runfolder.PROGRESS,
        runfolder.CARD,
        *runfolder.TOKENIZERS.values(),
        *runfolder.TEXT_TOKENIZER_FILES,
        runfolder.SPECIAL_TOKENS_MAP,
        runfolder.PRESENCE,
        LOCK_NAME,
    }
)
#: what train writes only once config.json is there
AFTER_CONFIG = frozenset(
    {
        runfolder.MODEL,
        runfolder.METRICS,
        runfolder.TRAIN_LOG,
        runfolder.PROGRESS,
        runfolder.CARD,
        runfolder.CHECKPOINTS,
    }
)
RUN_FOLDERS = {
    runfolder.CHECKPOINTS: re.compile(
        rf"^({runfolder.CHECKPOINT_PATTERN}|{runfolder.CHECKPOINT_TEMP_PATTERN}|{SAFETENSORS_TEMP})$"
    ),
    runfolder.CACHE: re.compile(
        r"^(index\.json|shard-\d{5,}\.safetensors|\.(shard-\d{5,}|index)\.[A-Za-z0-9_]+\.tmp.*|"
        rf"{SAFETENSORS_TEMP})$"
    ),
}
_STEMS = "|".join(re.escape(Path(n).name.split(".")[0]) for n in RUN_FILES if not n.startswith("."))
_RUN_TEMP = re.compile(
    rf"^(\.({_STEMS})\.[A-Za-z0-9_]+\.tmp.*|{re.escape(LOCK_NAME)}\..+|{SAFETENSORS_TEMP})$"
)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _not_ours(path: Path) -> str | None:
    """Why a file with one of train's names is not train's (None when it looks like it is)."""
    if path.name == CONFIG_NAME:
        c = _json(path)
        if not (isinstance(c, dict) and "schema" in c and "mriseg_version" in c):
            return "is not a mriseg config"
    elif path.name == runfolder.METRICS:
        m = _json(path)
        if not (isinstance(m, dict) and "best_val_dice" in m and "steps" in m):
            return "is not the metrics file of a mriseg run"
    elif path.name == runfolder.TRAIN_LOG:
        try:
            with path.open(encoding="utf-8") as f:
                first = f.readline()
            record = json.loads(first) if first.strip() else {"step": 0}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not (isinstance(record, dict) and "step" in record):
            return "is not the training log of a mriseg run"
    return None


def _only_temp_files(p: Path) -> bool:
    """A folder holding nothing but the temporary files of saves that were killed (or nothing):
    what a run leaves when it dies while writing, never a user's data."""
    if not p.is_dir() or p.is_symlink():
        return False
    pattern = re.compile(rf"^({SAFETENSORS_TEMP})$")
    return all(q.is_file() and not q.is_symlink() and pattern.match(q.name) for q in p.iterdir())


def foreign_entry(run_dir: Path) -> str | None:
    """The first thing in ``run_dir`` that ``train`` would not have written, described for a
    message (``'notes.txt'``, ``'config.json (it is not a mriseg config)'``); None when the
    folder holds only a run's own files. Without a mriseg ``config.json`` the folder is at most
    a run stopped before it wrote one (tokenizers, cache, lock): what train writes only after
    its config (weights, log, metrics, curves, checkpoints) is then someone else's file."""
    run_dir = Path(run_dir)
    config = run_dir / CONFIG_NAME
    configured = config.is_file() and not config.is_symlink() and _not_ours(config) is None
    for p in sorted(run_dir.iterdir()):
        if p.is_symlink():
            return f"{p.name} (a symlink)"
        if not configured and p.name in AFTER_CONFIG and not _only_temp_files(p):
            return f"{p.name} (and no config.json of a mriseg run)"
        if p.is_dir() and p.name in RUN_FOLDERS:
            pattern = RUN_FOLDERS[p.name]
            for q in sorted(p.iterdir()):
                if q.is_symlink() or not q.is_file() or not pattern.match(q.name):
                    return f"{p.name}/{q.name}"
            continue
        if p.is_file() and (p.name in RUN_FILES or _RUN_TEMP.match(p.name)):
            why = _not_ours(p)
            if why:
                return f"{p.name} (it {why})"
            continue
        return p.name + ("/" if p.is_dir() else "")
    return None


# ----------------------------------------------------------------------------- the run lock


class RunLockedError(MrisegError):
    """Another process holds the run folder's lock."""


_HELD: set[str] = set()  # tokens of the locks this process holds


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The holder's record; None when the file is gone; {} when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _holder(record: dict[str, Any]) -> str:
    if not record:
        return "an unknown holder (the lock file cannot be read)"
    return (
        f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
        f"started {record.get('started', '?')}"
    )


def _stale(record: dict[str, Any]) -> bool:
    """A lock of a process of this host that no longer runs (or of a past life of this pid)."""
    pid = record.get("pid")
    if not record or not isinstance(pid, int) or record.get("host") != socket.gethostname():
        return False
    if pid == os.getpid():
        return record.get("token") not in _HELD
    return not _pid_alive(pid)


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file whole and atomically; False when it exists already."""
    from mrisegcli.io.atomic import disk_full_error, is_disk_full

    data = json.dumps(record, indent=1) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, err) from err
        raise MrisegError(f"cannot write here ({err.strerror})", path.parent) from err
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # fails if the lock exists: the file appears complete or not at all
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create instead
            try:
                fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "w", encoding="utf-8") as f:
                f.write(data)
            return True
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, err) from err
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _take_over(path: Path, stale: dict[str, Any]) -> None:
    """Remove a stale lock, unless another process replaced it in the meantime."""
    grave = path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    moved = _read_lock(grave) or {}
    if moved.get("token") != stale.get("token"):  # a fresh lock of someone else: put it back
        with contextlib.suppress(OSError):
            os.link(grave, path)
    grave.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str = "train") -> Iterator[Path]:
    """Hold ``run_dir/.mriseg.lock`` exclusively while the block runs (the folder is created
    if needed, and removed again if the block left it empty); released on every way out."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MrisegError("exists and is not a folder", run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MrisegError(f"cannot create folder ({err.strerror})", run_dir) from err
    path = run_dir / LOCK_NAME
    token = uuid.uuid4().hex
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "token": token,
    }
    try:
        for _ in range(5):
            if _create(path, record):
                break
            held = _read_lock(path)
            if held is None:  # released while we looked
                continue
            if _stale(held):
                sys.stderr.write(
                    f"mriseg: note: {run_dir}: taking over the lock of {_holder(held)}, "
                    "which is no longer running\n"
                )
                _take_over(path, held)
                continue
            raise RunLockedError(
                f"another mriseg is writing this run folder ({_holder(held)}); wait for it to "
                f"finish, or if that process is gone, delete {path}",
                run_dir,
            )
        else:
            raise RunLockedError("the run folder's lock keeps changing hands; try again", run_dir)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    _HELD.add(token)
    try:
        yield path
    finally:
        _HELD.discard(token)
        if (_read_lock(path) or {}).get("token") == token:
            path.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when the run left nothing in it
