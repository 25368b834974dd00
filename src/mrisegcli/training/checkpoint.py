"""Crash-safe checkpoints in safetensors: model, optimiser, scheduler position, RNG, data position.

One checkpoint is one ``.safetensors`` file: every tensor (model weights, optimiser moments,
RNG states, extra state such as the hard-token memory) under a prefixed name, and everything
that is not a tensor (step, data position, optimiser hyper-parameters, config) as JSON in the
file's metadata. Nothing is ever pickled. Files are written to a temp name and renamed, so a
``kill -9`` at any moment leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mrisegcli import runfolder
from mrisegcli.errors import ConfigError
from mrisegcli.io.atomic import SAFETENSORS_TEMP, atomic_path

CKPT_FORMAT = 1
_NAME = re.compile(rf"^{runfolder.CHECKPOINT_PATTERN}$")
# The temp name ``atomic_path`` gives a checkpoint while it is written
# (``runfolder.CHECKPOINT_TEMP_PATTERN``, e.g. ``.step_00000040.k3j_x9a2.tmp.safetensors``), and
# inside it safetensors writes its own ``.tmpXXXXXX``. A ``kill -9`` mid-write leaves either
# behind; nothing else in the folder is ever taken for one.
_TEMP_NAME = re.compile(rf"^({runfolder.CHECKPOINT_TEMP_PATTERN}|{SAFETENSORS_TEMP})$")


@dataclass
class TrainState:
    """Everything besides the model and optimiser tensors needed to continue exactly."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # index into the current epoch's permutation
    best_metric: float = float("-inf")
    best_step: int = -1
    elapsed_s: float = 0.0  # wall-clock seconds of the run so far (preparation included)
    prep_s: float = 0.0  # seconds spent before the first training step (tokenizers, cache)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    *,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
) -> Path:
    """Write one checkpoint file atomically (replacing ``path`` if present)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
    meta = {
        "format": str(CKPT_FORMAT),
        "state": json.dumps(state.__dict__),
        "optimizer": json.dumps(opt_meta),
        "config": json.dumps(config or {}),
    }
    with atomic_path(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    remove_stale_temp_files(path.parent)
    return path


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> tuple[TrainState, dict[str, torch.Tensor], dict]:
    """Restore model (+ optimiser, RNG) from ``path``; returns state, extra tensors, config."""
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"corrupt or truncated checkpoint ({e})", path) from e
    if int(meta.get("format", "0")) > CKPT_FORMAT:
        raise ConfigError("checkpoint from a newer mriseg version", path)
    try:
        state = TrainState(**json.loads(meta["state"]))
        opt_meta = json.loads(meta["optimizer"])
        config = json.loads(meta.get("config", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint metadata is incomplete ({e})", path) from e
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint does not fit the model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})",
            path,
        )
    if optimizer is not None:
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("opt.")}
        optimizer.load_state_dict(_optimizer_state(opt_tensors, opt_meta))
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if (
            cuda_states
            and torch.cuda.is_available()
            and len(cuda_states) == torch.cuda.device_count()
        ):
            torch.cuda.set_rng_state_all(cuda_states)
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return state, extra, config


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest step in ``folder`` (None when there is none)."""
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete checkpoint temp files left by a writer that was killed; returns what went.

    Only names of the form ``atomic_path`` gives a checkpoint being written are touched. Call
    it when no checkpoint of this folder is being written (one writer per run: rank 0).
    """
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if _TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def prune_checkpoints(folder: Path, keep: int = 2) -> None:
    """Delete all but the ``keep`` most recent step checkpoints."""
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    for _, p in found[:-keep]:
        p.unlink(missing_ok=True)
