"""A run's ``model.safetensors``: written in one place, fingerprinted, checked when loaded.

:func:`save_weights` is the one writer of a run's weights (training's best and last weights,
``draft-heads``, a shipped copy): it writes the file atomically and records its sha256 and size
in the run's ``config.json`` (``"weights"``), as the tokenizer files are recorded
(``tokenizers.files``). Loading checks the file against that record (:func:`verify_weights`):
weights damaged on disk or copied in from elsewhere are refused by name instead of giving
an empty mask. A run written before the record was kept loads as before. Weights holding
NaN or infinite values are always refused (:func:`check_finite`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mrisegcli import runfolder
from mrisegcli.errors import ConfigError, MrisegError

#: the config.json entry that records the weights file
CONFIG_KEY = "weights"


def weights_fingerprint(path: Path) -> dict[str, Any]:
    """``{"file": "model.safetensors", "sha256": hex, "bytes": size}`` of a weights file."""
    from mrisegcli.workflow.bundle import file_sha256

    path = Path(path)
    return {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def record_weights(run_dir: Path) -> bool:
    """Record the fingerprint of ``run_dir/model.safetensors`` in ``run_dir/config.json`` (the
    rest of the config kept as it is); False when the folder has no readable config yet."""
    from mrisegcli.io.atomic import atomic_write_text

    run_dir = Path(run_dir)
    config_path = run_dir / runfolder.CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(config, dict):
        return False
    config[CONFIG_KEY] = weights_fingerprint(run_dir / runfolder.MODEL)
    atomic_write_text(config_path, json.dumps(config, indent=2, default=str) + "\n", overwrite=True)
    return True


def save_weights(
    tensors: Mapping[str, Any], run_dir: Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``run_dir/model.safetensors`` atomically and record its fingerprint in the run's
    config.json (when the folder has one: write the config first)."""
    from safetensors.torch import save_file

    from mrisegcli.io.atomic import atomic_path

    path = Path(run_dir) / runfolder.MODEL
    with atomic_path(path, overwrite=True) as tmp:
        save_file(dict(tensors), str(tmp), metadata=metadata or {"format": "mriseg-model-1"})
    record_weights(Path(run_dir))
    return path


def weights_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (no tensor data read); a damaged
    file raises :class:`MrisegError` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ... for a damaged file
        raise MrisegError(f"corrupt or truncated weights ({e})", path) from e


def verify_weights(path: Path, recorded: Any, config_path: Path) -> None:
    """Check the weights file against the fingerprint config.json records; None (a run written
    before weights were recorded) checks nothing."""
    if recorded is None:
        return
    ok = (
        isinstance(recorded, dict)
        and isinstance(recorded.get("sha256"), str)
        and isinstance(recorded.get("bytes"), int)
        and not isinstance(recorded.get("bytes"), bool)
    )
    if not ok:
        raise ConfigError(f"corrupt config ({CONFIG_KEY} is not a file fingerprint)", config_path)
    from mrisegcli.workflow.bundle import file_sha256

    size = Path(path).stat().st_size
    digest = file_sha256(path) if size == recorded["bytes"] else None
    if digest == recorded["sha256"]:
        return
    seen = f"{size} bytes" if digest is None else f"sha256 {digest[:12]}..."
    want = f"{recorded['bytes']} bytes" if digest is None else f"{recorded['sha256'][:12]}..."
    raise ConfigError(
        f"not the weights this model's config.json records ({seen}, config.json records "
        f"{want}): damaged, or copied in from another run; put back the run's own file",
        path,
    )


def check_finite(state: Mapping[str, Any], path: Path) -> None:
    """Refuse weights with NaN or infinite values (a diverged training, a damaged file)."""
    import torch

    for name, tensor in state.items():
        if not (torch.is_tensor(tensor) and tensor.is_floating_point()):
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise MrisegError(
                f"weights hold NaN or infinite values ({bad} of {tensor.numel()} in tensor "
                f"{name}); this model cannot segment: train it again or restore the file",
                path,
            )


__all__ = [
    "CONFIG_KEY",
    "check_finite",
    "record_weights",
    "save_weights",
    "verify_weights",
    "weights_fingerprint",
]
