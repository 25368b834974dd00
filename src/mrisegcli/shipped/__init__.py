"""Models that ship inside the package, and which model a command uses.

Each subfolder of this package that holds a ``config.json`` is a complete run folder (weights,
tokenizers, config, model card, ``evaluation.json`` with its test metrics), so nothing is ever
downloaded to use it. :func:`resolve_model` picks the model of a command:
``--model`` > the ``MRISEG_MODEL`` environment variable > :data:`DEFAULT_MODEL`.

``predict`` without either routes each input to the shipped model for its kind of image
(:func:`route_input`): a DICOM MR input or a 3-D NIfTI volume to :data:`BRAIN_MODEL` when the
package holds it, anything else (CR/DX radiographs, 2-D images) to :data:`DEFAULT_MODEL`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrisegcli import runfolder
from mrisegcli.errors import MrisegError

SHIPPED_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "chest-xray"
BRAIN_MODEL = "brain-mri"
ENV_VAR = "MRISEG_MODEL"
#: what each shipped model was trained on, for the line that names the model
TRAINED_ON = {DEFAULT_MODEL: "chest radiographs", BRAIN_MODEL: "brain MRI"}
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
    def license(self) -> str:
        """The weights' licence as the model card's metadata states it (its ``license:`` line;
        "other" points to the card's own words), or "?" without a card."""
        card = self.path / "README.md"
        meta: dict[str, str] = {}
        if card.is_file():
            for line in card.read_text(encoding="utf-8").splitlines()[:12]:
                key, sep, value = line.partition(":")
                if sep and key in ("license", "license_name"):
                    meta[key] = value.strip()
        if meta.get("license") == "other":
            return meta.get("license_name", "other")
        return meta.get("license", "?")

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
    reason: str = ""  # why a shipped model was routed to (see :func:`route_input`)

    def describe(self) -> str:
        if self.shipped is not None:
            how = {"shipped": "the default", "--model": "--model", ENV_VAR: ENV_VAR}[self.source]
            how = self.reason or how
            trained = TRAINED_ON.get(self.shipped)
            trained = f"; trained on {trained}" if trained else ""
            return f"model: shipped {self.shipped} ({how}{trained})"
        return f"model: {self.spec} (from {self.source})"


def chosen_by_user(model: str | None, environ: dict[str, str] | None = None) -> bool:
    """Whether ``--model`` or ``MRISEG_MODEL`` names the model (else inputs are routed)."""
    env = os.environ if environ is None else environ
    return bool(model) or bool(env.get(ENV_VAR, "").strip())


def choose_model(
    model: str | None, environ: dict[str, str] | None = None, route: Route | None = None
) -> ModelChoice:
    """``--model`` > ``MRISEG_MODEL`` > the shipped model of ``route`` (see
    :func:`route_input`) > the shipped default. A shipped model can also be named by its name
    (``--model chest-xray``) unless a folder of that name exists."""
    env = os.environ if environ is None else environ
    reason = ""
    if model:
        spec, source = model, "--model"
    elif env.get(ENV_VAR, "").strip():
        spec, source = env[ENV_VAR].strip(), ENV_VAR
    elif route is not None:
        spec, source, reason = route.model, "shipped", route.reason
    else:
        spec, source = DEFAULT_MODEL, "shipped"
    if not Path(spec).expanduser().exists():
        found = shipped_model(spec)
        if found is not None:
            return ModelChoice(str(found.path), source, found.name, reason)
        if source == "shipped":
            raise MrisegError(
                f"no model given and the default model {DEFAULT_MODEL!r} is not in this "
                f"installation ({SHIPPED_DIR}); pass --model RUN or set {ENV_VAR}"
            )
    return ModelChoice(spec, source)


def resolve_model(
    model: str | None,
    *,
    route: Route | None = None,
    announce: Callable[[str], None] | None = None,
) -> tuple[ModelChoice, Path]:
    """The model a command runs (:func:`choose_model`), named through ``announce`` (the line
    that says which model runs and why), and its run folder (a Hub id is downloaded)."""
    from mrisegcli.hub import resolve_run

    choice = choose_model(model, route=route)
    if announce is not None:
        announce(choice.describe())
    return choice, resolve_run(choice.spec)


@dataclass(frozen=True)
class Route:
    """The shipped model an input goes to without ``--model``, and why (one phrase)."""

    model: str
    reason: str


def _dicom_modality(path: Path) -> str:
    """The Modality of a DICOM file, or of the first image of a series folder ("" if none)."""
    from mrisegcli.io.discover import dicom_kind, scan_folder

    try:
        files = scan_folder(path).images if path.is_dir() else [path]
        for f in files:
            kind, ds = dicom_kind(f)
            if kind == "image":
                return str(ds.get("Modality", "") or "").upper()
    except MrisegError:
        pass
    return ""


def route_input(path: str | Path) -> Route:
    """Which shipped model segments ``path`` when no model is named, from its headers alone.

    A DICOM MR file or series and a 3-D NIfTI volume go to :data:`BRAIN_MODEL` when the package
    holds it; everything else (CR/DX radiographs, 2-D images, and CT, which no shipped model
    was trained on) goes to :data:`DEFAULT_MODEL`. An unreadable input goes to the default: its
    reader reports why when it is read.
    """
    from mrisegcli.io.discover import is_volume
    from mrisegcli.io.read import detect_format

    path = Path(path)
    try:
        kind = detect_format(path)
    except MrisegError:
        return Route(DEFAULT_MODEL, "the default")
    modality = _dicom_modality(path) if kind == "dicom" else ""
    volume = is_volume(path, kind)
    if modality == "MR":
        brain = f"chosen for {path.name}, a DICOM MR {'series' if volume else 'image'}"
    elif kind == "nifti" and volume:
        brain = f"chosen for {path.name}, a 3-D NIfTI volume"
    elif modality in ("CR", "DX", "DR", "RG"):
        return Route(DEFAULT_MODEL, f"chosen for {path.name}, a {modality} radiograph")
    elif not volume and modality in RADIOGRAPH_MODALITIES:
        return Route(DEFAULT_MODEL, f"chosen for {path.name}, a 2-D image")
    else:  # CT, a raster stack, ...: no shipped model was trained on these
        return Route(DEFAULT_MODEL, "the default")
    if shipped_model(BRAIN_MODEL) is None:  # not in this installation: today's default
        return Route(DEFAULT_MODEL, "the default")
    return Route(BRAIN_MODEL, brain)


def route_dataset(roots: Iterable[str | Path]) -> Route | None:
    """Which shipped model ``evaluate`` (or ``calibrate``) runs on a dataset when no model is
    named: a dataset in the nnU-Net / Medical Segmentation Decathlon layout goes where its
    first image goes (:func:`route_input`: 3-D NIfTI volumes to :data:`BRAIN_MODEL`); any
    other dataset, None (the default model)."""
    for root in roots:
        root = Path(root)
        for folder in ("imagesTs", "imagesTr"):
            images = sorted((root / folder).glob("*.nii*")) if (root / folder).is_dir() else []
            if not images:
                continue
            route = route_input(images[0])
            if route.model == DEFAULT_MODEL:
                return None
            return Route(route.model, f"chosen for {root.name}, a dataset of 3-D NIfTI volumes")
    return None


__all__ = [
    "BRAIN_MODEL",
    "DEFAULT_MODEL",
    "ENV_VAR",
    "ModelChoice",
    "Route",
    "ShippedModel",
    "choose_model",
    "resolve_model",
    "chosen_by_user",
    "route_dataset",
    "route_input",
    "shipped_models",
    "shipped_model",
    "SHIPPED_DIR",
    "RADIOGRAPH_MODALITIES",
]
