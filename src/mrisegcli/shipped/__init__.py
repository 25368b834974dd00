"""Models that ship inside the package, and which model a command uses.

Each subfolder of this package that holds a ``config.json`` is a complete run folder (weights,
tokenizers, config, model card, ``evaluation.json`` with its test metrics), so nothing is ever
downloaded to use it. :func:`resolve_model` picks the model of a command:
``--model`` > the ``MRISEG_MODEL`` environment variable > :data:`DEFAULT_MODEL`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrisegcli import runfolder
from mrisegcli.errors import MrisegError

SHIPPED_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "chest-xray"
ENV_VAR = "MRISEG_MODEL"
#: modalities the shipped chest-radiograph model was trained on (DICOM Modality values)
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG", "OT", "")


@dataclass
class ShippedModel:
    """A model folder inside the package and what its files say about it."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    @property
    def data(self) -> str:
        """The names of the datasets it was trained on."""
        roots = self.config.get("data", {}).get("root", [])
        roots = roots if isinstance(roots, list) else [roots]
        return ", ".join(Path(r).name or str(r) for r in roots) or "?"


def shipped_models() -> list[ShippedModel]:
    """Every model folder in the package, the default first."""
    found = []
    for folder in sorted(SHIPPED_DIR.iterdir()):
        cfg_file = folder / runfolder.CONFIG
        if not folder.is_dir() or not cfg_file.is_file():
            continue
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
        ev_file = folder / "evaluation.json"
        evaluation = json.loads(ev_file.read_text(encoding="utf-8")) if ev_file.is_file() else {}
        found.append(ShippedModel(folder.name, folder, config, evaluation))
    return sorted(found, key=lambda m: m.name != DEFAULT_MODEL)


def shipped_model(name: str) -> ShippedModel | None:
    return next((m for m in shipped_models() if m.name == name), None)


@dataclass(frozen=True)
class ModelChoice:
    """The model a command runs: the spec to resolve and where the choice came from."""

    spec: str  # a run folder, a Hub id, or the folder of a shipped model
    source: str  # "--model", "MRISEG_MODEL" or "shipped"
    shipped: str | None = None  # the shipped model's name, when it is one

    def describe(self) -> str:
        if self.shipped is not None:
            how = {"shipped": "the default", "--model": "--model", ENV_VAR: ENV_VAR}[self.source]
            return f"model: shipped {self.shipped} ({how}; trained on chest radiographs)"
        return f"model: {self.spec} (from {self.source})"


def choose_model(model: str | None, environ: dict[str, str] | None = None) -> ModelChoice:
    """``--model`` > ``MRISEG_MODEL`` > the shipped default. A shipped model can also be named
    by its name (``--model chest-xray``) unless a folder of that name exists."""
    env = os.environ if environ is None else environ
    if model:
        spec, source = model, "--model"
    elif env.get(ENV_VAR, "").strip():
        spec, source = env[ENV_VAR].strip(), ENV_VAR
    else:
        spec, source = DEFAULT_MODEL, "shipped"
    if not Path(spec).expanduser().exists():
        found = shipped_model(spec)
        if found is not None:
            return ModelChoice(str(found.path), source, found.name)
        if source == "shipped":
            raise MrisegError(
                f"no model given and the default model {DEFAULT_MODEL!r} is not in this "
                f"installation ({SHIPPED_DIR}); pass --model RUN or set {ENV_VAR}"
            )
    return ModelChoice(spec, source)


__all__ = [
    "DEFAULT_MODEL",
    "ENV_VAR",
    "ModelChoice",
    "ShippedModel",
    "choose_model",
    "shipped_models",
    "shipped_model",
    "SHIPPED_DIR",
    "RADIOGRAPH_MODALITIES",
]
