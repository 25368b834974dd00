"""nnU-Net v2 / Medical Segmentation Decathlon folders, read as they are.

    dataset.json                          labels (and channel names, file ending); optional
    imagesTr/<case>_0000.nii.gz ...       one file per channel (nnU-Net v2), or
    imagesTr/<case>.nii.gz                one 4-D file, channels last (the Decathlon)
    labelsTr/<case>.nii.gz                integer label map on the image's grid
    imagesTs/...  labelsTs/...            the test cases (optional)
    texts.csv | texts.jsonl               the referring texts (optional): label,text[,case]

Every slice of every volume becomes a sample, for each label and each of its texts: the slices
are those a model sees (axial, radiological, see :mod:`mrisegcli.io.volume`), the image is the
first channel, and the mask is where the label map holds the label's value(s). Slices where the
label is absent stay as samples with an empty mask ("not there"), so that a model learns to
answer "nothing here" on them.

Splits: ``imagesTr`` is train, ``imagesTs`` test (only with ``labelsTs``); ``val_fraction`` of
the training *cases* (never single slices: the slices of one patient never straddle two splits)
become val, chosen by the SHA-256 of ``(seed, case)`` like :func:`~mrisegcli.data.layouts.
carve_val`.

Texts, for each case and label, from the first source that has them: the texts file's rows for
that case, its rows without a case, the label's name in ``dataset.json`` ("enhancing_tumor" ->
"enhancing tumor"). A folder without ``dataset.json`` holds binary label maps (0/1, the label
"foreground") and needs a texts file. The ``label`` column names a label by name or by value.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mrisegcli.data.layouts import Sample, VolumeSlice, read_table
from mrisegcli.errors import InputError

SPLIT_FOLDERS = (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs"))
TEXTS_NAMES = ("texts.csv", "texts.jsonl")
#: file endings tried when dataset.json does not give one
ENDINGS = (".nii.gz", ".nii", ".png", ".tif", ".tiff", ".bmp")
FOREGROUND = "foreground"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def is_nnunet(root: Path) -> bool:
    """Whether ``root`` looks like an nnU-Net / Decathlon folder."""
    root = Path(root)
    return (root / "dataset.json").is_file() or any(
        (root / images).is_dir() for _, images, _ in SPLIT_FOLDERS
    )


@dataclass
class LabelSet:
    """The labels of a dataset: name -> label values (background excluded), and where from."""

    labels: dict[str, tuple[int, ...]]
    from_json: bool
    channels: dict[int, str] = field(default_factory=dict)
    ending: str | None = None

    def values(self) -> set[int]:
        """Every value a label map may hold (0 included)."""
        return {0} | {v for vs in self.labels.values() for v in vs}


def _label_values(value: object, where: Path, name: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(
            f"label {name!r}: value {value!r} is not an integer label", where
        ) from None
    if not out or any(v < 0 or v != float(x) for v, x in zip(out, values, strict=True)):
        raise InputError(f"label {name!r}: value {value!r} is not an integer label", where)
    return out


def read_labels(root: Path) -> LabelSet:
    """The labels of ``root/dataset.json``: nnU-Net v2 (``{"name": value or [values]}``) or the
    Decathlon's / nnU-Net v1's (``{"value": "name"}``); background (value 0) left out."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return LabelSet({FOREGROUND: (1, 255)}, from_json=False)  # a 0/1 or 0/255 map
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", path) from err
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict) or not meta["labels"]:
        raise InputError('no "labels" object (e.g. {"background": 0, "tumour": 1})', path)
    raw = meta["labels"]
    if all(isinstance(k, str) and k.strip().isdigit() for k in raw):  # {"1": "edema"}: v1 / MSD
        pairs = [(str(name), _label_values(k, path, str(name))) for k, name in raw.items()]
    else:
        pairs = [(str(name), _label_values(v, path, str(name))) for name, v in raw.items()]
    labels = {name: vals for name, vals in pairs if vals != (0,)}
    if not labels:
        raise InputError("dataset.json names no label other than the background", path)
    channels_raw = meta.get("channel_names") or meta.get("modality") or {}
    channels = {}
    if isinstance(channels_raw, dict):
        channels = {int(k): str(v) for k, v in channels_raw.items() if str(k).isdigit()}
    ending = meta.get("file_ending")
    return LabelSet(labels, True, channels, ending if isinstance(ending, str) else None)


# ------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    name: str
    split: str
    channels: tuple[Path, ...]  # one file per channel, or one 4-D file
    label: Path | None


def _ending_of(name: str, endings: tuple[str, ...]) -> str | None:
    return next((e for e in endings if name.lower().endswith(e)), None)


def _list_cases(folder: Path, endings: tuple[str, ...]) -> tuple[dict[str, dict[int, Path]], bool]:
    """Case name -> {channel: file}, and whether the files are channels: files named
    ``<case>_0000<ending>`` are, a folder with none of those holds one file per case (a
    Decathlon 4-D file, channels last)."""
    files = {}
    for p in sorted(folder.iterdir()):
        ending = _ending_of(p.name, endings)
        if p.name.startswith(".") or not p.is_file() or ending is None:
            continue
        files[p] = p.name[: -len(ending)]
    by_channel = {p: _CHANNEL.match(stem) for p, stem in files.items()}
    cases: dict[str, dict[int, Path]] = {}
    if any(by_channel.values()):
        for p, m in by_channel.items():
            if m is None:
                raise InputError(
                    "is not named <case>_<4-digit channel> like the other images here", p
                )
            cases.setdefault(m["case"], {})[int(m["channel"])] = p
        return cases, True
    return {stem: {0: p} for p, stem in files.items()}, False


def _channels(case: str, found: dict[int, Path], n: int, folder: Path) -> tuple[Path, ...]:
    missing = [c for c in range(n) if c not in found]
    if missing:
        names = ", ".join(f"{case}_{c:04d}" for c in missing)
        raise InputError(f"case {case!r} lacks channel file(s) {names}", folder)
    return tuple(found[c] for c in range(n))


def find_cases(root: Path, labels: LabelSet) -> list[Case]:
    """Every case of every split folder, with its channel files and label file."""
    endings = (labels.ending,) if labels.ending else ENDINGS
    out: list[Case] = []
    for split, images, label_dir in SPLIT_FOLDERS:
        folder = root / images
        if not folder.is_dir():
            continue
        listed, per_channel = _list_cases(folder, endings)
        n = 1  # a Decathlon file holds its channels
        if per_channel:
            n = len(labels.channels) or max((max(ch) + 1 for ch in listed.values()), default=1)
        labelled = (root / label_dir).is_dir()
        if split == "test" and not labelled:
            continue  # test images without labels: nothing to train or score on
        missing = []
        for case, found in listed.items():
            label = _find_label(root / label_dir, case, endings)
            if label is None:
                missing.append(case)
            out.append(Case(case, split, _channels(case, found, n, folder), label))
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" ... ({len(missing)} in all)" if len(missing) > 5 else ""
            )
            raise InputError(f"no label map in {label_dir}/ for case(s) {shown}", root / label_dir)
    if not out:
        raise InputError("no cases: imagesTr/ and imagesTs/ (with labelsTs/) hold no images", root)
    return out


def _find_label(folder: Path, case: str, endings: tuple[str, ...]) -> Path | None:
    return next((folder / f"{case}{e}" for e in endings if (folder / f"{case}{e}").is_file()), None)


# ------------------------------------------------------------------------------------ texts


@dataclass
class Texts:
    """The referring texts of each (case, label): per-case rows, then rows for every case."""

    per_case: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    every_case: dict[str, list[str]] = field(default_factory=dict)
    path: Path | None = None


def _texts_file(root: Path, given: str | Path | None) -> Path | None:
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise InputError("texts file does not exist", path)
        return path
    found = [root / n for n in TEXTS_NAMES if (root / n).is_file()]
    if len(found) > 1:
        raise InputError("holds both texts.csv and texts.jsonl; keep one", root)
    return found[0] if found else None


def read_texts(path: Path | None, labels: LabelSet, cases: set[str]) -> Texts:
    """Rows ``label,text[,case]`` -> :class:`Texts`; the label by name or value."""
    texts = Texts(path=path)
    if path is None:
        return texts
    by_value = {str(v): name for name, vs in labels.labels.items() for v in vs}
    line = 2 if path.suffix.lower() == ".csv" else 1
    for n, row in enumerate(read_table(path, ("label", "text"), ("case",)), line):
        where = f"{'row' if line == 2 else 'line'} {n}"
        name = row["label"] if row["label"] in labels.labels else by_value.get(row["label"])
        if name is None:
            known = ", ".join(f"{k} ({'+'.join(map(str, v))})" for k, v in labels.labels.items())
            raise InputError(f"{where}: unknown label {row['label']!r}; labels: {known}", path)
        if not row["text"]:
            raise InputError(f"{where}: empty text", path)
        case = row.get("case", "")
        if case and case not in cases:
            raise InputError(f"{where}: no case {case!r} in the dataset", path)
        if case:
            texts.per_case.setdefault((case, name), []).append(row["text"])
        else:
            texts.every_case.setdefault(name, []).append(row["text"])
    return texts


def texts_for(case: str, label: str, texts: Texts, labels: LabelSet, root: Path) -> list[str]:
    if (case, label) in texts.per_case:
        return texts.per_case[(case, label)]
    if label in texts.every_case:
        return texts.every_case[label]
    if labels.from_json:
        return [label.replace("_", " ").strip()]
    where = f"no text for label {label!r} of case {case!r}"
    if texts.path is None:
        raise InputError(
            f"{where}: a folder without dataset.json needs a texts file (texts.csv beside "
            "imagesTr/imagesTs, or --texts FILE) with the columns label,text[,case], e.g. "
            "'1,FLAIR hyperintense lesion.'",
            root,
        )
    raise InputError(f"{where}", texts.path)


# ------------------------------------------------------------------------------------ samples


def carve_cases(cases: list[Case], fraction: float, seed: int) -> list[Case]:
    """Move ``round(fraction * n)`` training cases (at least one, never all) to val."""
    train = [c for c in cases if c.split == "train"]
    if fraction <= 0 or len(train) < 2:
        return cases
    n_val = min(len(train) - 1, max(1, round(fraction * len(train))))

    def key(c: Case) -> str:
        return hashlib.sha256(f"{seed}\0{c.name}".encode()).hexdigest()

    chosen = {c.name for c in sorted(train, key=key)[:n_val]}
    return [Case(c.name, "val", c.channels, c.label) if c.name in chosen else c for c in cases]


def _slices(case: Case) -> int:
    """The number of slices the model sees of a case; its label map must share the grid."""
    from mrisegcli.io.volume import file_view

    view, shape = file_view(case.channels[0])
    if case.label is not None:
        lview, lshape = file_view(case.label)
        if lshape != shape or lview.source_codes != view.source_codes:
            raise InputError(
                f"label map does not lie on the image's voxel grid: {lshape} "
                f"({_codes(lview)}) against {shape} ({_codes(view)}) of {case.channels[0].name}",
                case.label,
            )
    return shape[0]


def _codes(view) -> str:
    return "".join(view.source_codes) if view.source_codes else "orientation unknown"


def _slug(name: str) -> str:
    return re.sub(r"[/\\\s]+", "_", name.strip()) or "label"


def load_nnunet(
    root: Path, *, texts: str | Path | None = None, val_fraction: float = 0.1, seed: int = 0
) -> list[Sample]:
    """The samples of an nnU-Net / Decathlon folder: one per slice, label and text."""
    root = Path(root)
    labels = read_labels(root)
    cases = carve_cases(find_cases(root, labels), val_fraction, seed)
    table = read_texts(_texts_file(root, texts), labels, {c.name for c in cases})
    known = tuple(sorted(labels.values()))
    samples: list[Sample] = []
    for case in cases:
        n = _slices(case)
        for label, values in labels.labels.items():
            prompts = texts_for(case.name, label, table, labels, root)
            for j, text in enumerate(prompts):
                base = f"{case.name}/{_slug(label)}" + (f"/t{j}" if len(prompts) > 1 else "")
                for k in range(n):
                    part = VolumeSlice(case.name, k, n, values, label, 0, known)
                    samples.append(
                        Sample(
                            f"{base}/{k:03d}",
                            case.channels[0],
                            case.label,
                            text,
                            case.split,
                            kind=label,
                            volume=part,
                        )  # fmt: skip
                    )
    return samples


__all__ = [
    "FOREGROUND",
    "LabelSet",
    "carve_cases",
    "find_cases",
    "is_nnunet",
    "load_nnunet",
    "read_labels",
    "read_texts",
]
