"""Dataset layouts on disk -> one list of samples (image, mask, text, split).

Three layouts are read:

* ``lvit``: ``{Train,Val,Test}_Folder/{img/, labelcol/, <Split>_text.xlsx}`` (QaTa-COV19 and
  MosMedData+ as LViT distributes them), or one ``Train_Val_text.xlsx`` for train and val.
* ``qata-v2``: ``Train|Test/{Images,GTs}`` with ``prompt/train.csv`` and ``prompt/test.csv``.
* ``manifest``: a CSV or JSONL file with ``image``, ``mask``, ``text`` and optional ``split``.
* ``nnunet``: an nnU-Net v2 / Medical Segmentation Decathlon folder (``imagesTr``,
  ``labelsTr``, ``imagesTs``, ``labelsTs``, ``dataset.json``): every slice of every volume is a
  sample (see ``nnunet.py``).

Loading only reads the index files; it never opens images (see ``validate.py`` for that). Every
path taken from an index file is refused if it leaves the dataset folder, symlinks included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mrisegcli.errors import InputError

SPLITS = ("train", "val", "test")
LAYOUTS = ("lvit", "qata-v2", "manifest", "nnunet")
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")

_LVIT_FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
_LVIT_TRAIN_VAL = "Train_Val_text.xlsx"
_QATA_FOLDERS = {"train": "Train", "val": "Val", "test": "Test"}
_SPLIT_ALIASES = {
    "": "train",
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class VolumeSlice:
    """Where a sample lies in a volume (nnU-Net layout): slice ``index`` of ``slices`` of case
    ``case`` as the model sees it (axial, radiological; see ``mrisegcli.io.volume``), the image
    ``channel``, the label values that make its mask (``label``: their name) and every value
    its label map may hold (``known``)."""

    case: str
    index: int
    slices: int
    values: tuple[int, ...]
    label: str
    channel: int = 0
    known: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sample:
    """One case: an image, its binary mask (``None`` when unknown) and the referring text."""

    id: str
    image: Path
    mask: Path | None
    text: str
    split: str  # "train" | "val" | "test"
    # optional manifest columns: the row's kind ("describe", "anatomy", ...; per-kind metrics in
    # ``evaluate``) and its meaning in a fixed grammar ("infection:left", used to generate
    # other wordings of the same request, see ``data/paraphrase.py``)
    kind: str = ""
    target: str = ""
    # a slice of a volume (nnU-Net layout): ``image`` and ``mask`` are the volume files
    volume: VolumeSlice | None = None


@dataclass
class Dataset:
    """Samples of one dataset; ``root`` is the folder that every sample path must stay inside."""

    root: Path
    layout: str
    samples: list[Sample]

    def split(self, name: str) -> list[Sample]:
        """The samples of split ``name`` ("train", "val" or "test"), in dataset order."""
        if name not in SPLITS:
            raise InputError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [s for s in self.samples if s.split == name]

    def splits(self) -> dict[str, int]:
        """Number of samples per split, always with the keys train, val, test."""
        counts = dict.fromkeys(SPLITS, 0)
        for s in self.samples:
            counts[s.split] += 1
        return counts


# --------------------------------------------------------------------------- detection


def detect_layout(root: str | Path) -> str:
    """Name the layout of ``root``: "lvit", "qata-v2" or "manifest"; a clear error otherwise."""
    root = Path(root)
    if not root.exists():
        raise InputError("does not exist", root)
    if root.is_file():
        if root.suffix.lower() in (".csv", ".jsonl"):
            return "manifest"
        raise InputError("is a file but not a .csv or .jsonl manifest", root)
    if any((root / f).is_dir() for f in _LVIT_FOLDERS.values()):
        return "lvit"
    has_qata_split = any(
        (root / f / "Images").is_dir() or (root / f / "GTs").is_dir()
        for f in _QATA_FOLDERS.values()
    )
    if has_qata_split or (root / "prompt").is_dir():
        return "qata-v2"
    from mrisegcli.data.nnunet import is_nnunet

    if is_nnunet(root):
        return "nnunet"
    manifests = [n for n in MANIFEST_NAMES if (root / n).is_file()]
    if len(manifests) == 1:
        return "manifest"
    if len(manifests) > 1:
        raise InputError("holds both manifest.csv and manifest.jsonl; pass one file", root)
    raise InputError(
        "no dataset layout found; looked for Train_Folder/Val_Folder/Test_Folder (lvit), "
        "Train|Test/{Images,GTs} or prompt/ (qata-v2), imagesTr/imagesTs or dataset.json "
        "(nnunet), manifest.csv or manifest.jsonl (manifest)",
        root,
    )


def load_dataset(
    root: str | Path,
    layout: str | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    texts: str | Path | None = None,
) -> Dataset:
    """Read the index of the dataset at ``root`` (layout detected unless given).

    When the dataset has training samples but no validation split, ``val_fraction`` of the
    training samples become validation samples (``carve_val``); ``val_fraction=0`` turns it off.
    ``texts``: a texts file for the volumes of an nnU-Net folder (see ``nnunet.py``).
    """
    root = Path(root).absolute()
    layout = detect_layout(root) if layout is None else layout
    if texts is not None and layout != "nnunet":
        raise InputError(f"a texts file applies to nnU-Net volume folders, this is {layout}", root)
    if layout == "nnunet":
        from mrisegcli.data.nnunet import load_nnunet

        base, samples = root, load_nnunet(root, texts=texts, val_fraction=val_fraction, seed=seed)
    elif layout == "lvit":
        base, samples = root, _load_lvit(root)
    elif layout == "qata-v2":
        base, samples = root, _load_qata_v2(root)
    elif layout == "manifest":
        base, samples = _load_manifest(root)
    else:
        raise InputError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    # (an nnU-Net folder carves whole cases itself: slices of one case never straddle splits)
    if val_fraction > 0 and layout != "nnunet" and not any(s.split == "val" for s in samples):
        samples = carve_val(samples, val_fraction, seed)
    return Dataset(root=base, layout=layout, samples=samples)


def carve_val(samples: list[Sample], fraction: float = 0.1, seed: int = 0) -> list[Sample]:
    """Move ``round(fraction * n_train)`` training samples (at least one) to "val".

    The samples with the smallest SHA-256 of (seed, id) are moved, so the choice is
    deterministic, independent of the order of the samples and of the machine.
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"validation fraction must be in [0, 1), got {fraction}")
    train = [s for s in samples if s.split == "train"]
    n_val = min(len(train) - 1, max(1, round(fraction * len(train)))) if fraction > 0 else 0
    if n_val <= 0:
        return list(samples)

    def key(s: Sample) -> str:
        return hashlib.sha256(f"{seed}\0{s.id}".encode()).hexdigest()

    chosen = {id(s) for s in sorted(train, key=key)[:n_val]}
    return [dataclasses.replace(s, split="val") if id(s) in chosen else s for s in samples]


# --------------------------------------------------------------------------- helpers


def safe_join(base: Path, name: str, root: Path, where: str) -> Path:
    """``base / name`` if it stays inside ``root`` after resolving ``..`` and symlinks."""
    rel = Path(name)
    drive = len(name) > 1 and name[0].isalpha() and name[1] == ":"
    if rel.is_absolute() or name.startswith(("/", "\\")) or drive:
        raise InputError(
            f"{where}: absolute path {name!r} not allowed; use a path relative to the dataset"
        )
    path = base / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise InputError(f"{where}: path {name!r} leads outside the dataset folder {root}")
    return path


def cell_text(value: object) -> str:
    """A table cell as stripped text; empty / NaN / None cells become ""."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def _columns(
    names: list[str], wanted: tuple[str, ...], optional: tuple[str, ...], path: Path
) -> dict[str, str]:
    """Map each wanted column (case and surrounding spaces ignored) to its name in the file."""
    by_key = {str(n).strip().lower(): n for n in names}
    missing = [w for w in wanted if w.lower() not in by_key]
    if missing:
        found = ", ".join(str(n) for n in names) or "none"
        raise InputError(f"missing column(s) {', '.join(missing)}; columns found: {found}", path)
    return {w: by_key[w.lower()] for w in wanted + optional if w.lower() in by_key}


def read_table(
    path: Path, wanted: tuple[str, ...], optional: tuple[str, ...] = ()
) -> list[dict[str, str]]:
    """Rows of an .xlsx / .csv / .jsonl file as {wanted column: stripped text}; blank rows dropped."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".xlsx":
            df = pd.read_excel(path, engine="openpyxl")
        elif suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        elif suffix == ".jsonl":
            return _read_jsonl(path, wanted, optional)
        else:
            raise InputError("unsupported table format (expected .xlsx, .csv or .jsonl)", path)
    except InputError:
        raise
    except Exception as err:  # pandas / openpyxl raise many kinds on corrupt files
        raise InputError(f"cannot read table ({type(err).__name__}: {err})", path) from err
    cols = _columns(list(df.columns), wanted, optional, path)
    rows = []
    for record in df.to_dict("records"):
        row = {w: cell_text(record[c]) for w, c in cols.items()}
        if any(row.values()):
            rows.append(row)
    return rows


def _read_jsonl(
    path: Path, wanted: tuple[str, ...], optional: tuple[str, ...]
) -> list[dict[str, str]]:
    records: list[dict] = []
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"line {n}: not valid JSON ({err.msg})", path) from err
            if not isinstance(obj, dict):
                raise InputError(f"line {n}: expected a JSON object", path)
            records.append(obj)
    names = list(dict.fromkeys(k for r in records for k in r))
    cols = _columns(names, wanted, optional, path)
    return [{w: cell_text(r.get(c)) for w, c in cols.items()} for r in records]


def _find(folder: Path, names: list[str], root: Path, where: str) -> Path:
    """The first of ``folder/name`` that exists, else the first candidate (reported later)."""
    paths = [safe_join(folder, n, root, where) for n in dict.fromkeys(names) if n]
    for p in paths:
        if p.is_file():
            return p
    return paths[0]


def _strip_mask_prefix(name: str) -> str:
    return name[len("mask_") :] if name.startswith("mask_") else name


# --------------------------------------------------------------------------- LViT


def _load_lvit(root: Path) -> list[Sample]:
    folders = {s: root / f for s, f in _LVIT_FOLDERS.items() if (root / f).is_dir()}
    if not folders:
        raise InputError("not an LViT dataset: no Train_Folder, Val_Folder or Test_Folder", root)
    own = {s: folders[s] / f"{_LVIT_FOLDERS[s].split('_')[0]}_text.xlsx" for s in folders}
    own = {s: p for s, p in own.items() if p.is_file()}
    shared = next(
        (
            p
            for p in (
                root / "Train_Folder" / _LVIT_TRAIN_VAL,
                root / "Val_Folder" / _LVIT_TRAIN_VAL,
                root / _LVIT_TRAIN_VAL,
            )
            if p.is_file()
        ),
        None,
    )
    served = [s for s in ("train", "val") if s in folders and s not in own and shared is not None]
    for s, folder in folders.items():
        if s not in own and s not in served:
            looked = f"{_LVIT_FOLDERS[s].split('_')[0]}_text.xlsx"
            extra = f" or {_LVIT_TRAIN_VAL}" if s != "test" else ""
            raise InputError(f"no text file; looked for {looked}{extra}", folder)
    samples: list[Sample] = []
    for s in SPLITS:
        if s in own:
            for n, row in enumerate(read_table(own[s], ("Image", "Description")), 2):
                samples.append(_lvit_sample(row, folders[s], s, root, f"{own[s]} row {n}"))
    if served:
        assert shared is not None
        for n, row in enumerate(read_table(shared, ("Image", "Description")), 2):
            s = _lvit_split_of(row["Image"], folders, served, root, f"{shared} row {n}")
            samples.append(_lvit_sample(row, folders[s], s, root, f"{shared} row {n}"))
    return samples


def _lvit_split_of(
    name: str, folders: dict[str, Path], served: list[str], root: Path, where: str
) -> str:
    """Which of the splits read from Train_Val_text.xlsx holds this mask (train if none does)."""
    for s in sorted(served, key=lambda s: s != "val"):
        if safe_join(folders[s] / "labelcol", name, root, where).is_file():
            return s
    return served[0]


def _lvit_sample(row: dict[str, str], folder: Path, split: str, root: Path, where: str) -> Sample:
    name = row["Image"]
    if not name:
        raise InputError(f"{where}: empty Image cell")
    mask = _find(folder / "labelcol", [name, _strip_mask_prefix(name)], root, where)
    image = _find(folder / "img", [_strip_mask_prefix(name), name], root, where)
    return Sample(
        id=Path(image.name).stem, image=image, mask=mask, text=row["Description"], split=split
    )


# --------------------------------------------------------------------------- QaTa-COV19-v2


def _load_qata_v2(root: Path) -> list[Sample]:
    prompt = root / "prompt"
    tables = {s: prompt / f"{s}.csv" for s in SPLITS if (prompt / f"{s}.csv").is_file()}
    if not tables:
        raise InputError("no prompt file; looked for prompt/train.csv and prompt/test.csv", root)
    samples: list[Sample] = []
    for s, table in tables.items():
        folder = root / _QATA_FOLDERS[s]
        if s == "val" and not folder.is_dir():
            folder = root / _QATA_FOLDERS["train"]  # val prompts usually point into Train/
        for n, row in enumerate(read_table(table, ("Image", "Description")), 2):
            where = f"{table} row {n}"
            name = row["Image"]
            if not name:
                raise InputError(f"{where}: empty Image cell")
            plain = _strip_mask_prefix(name)
            mask = _find(
                folder / "GTs", [name if name != plain else f"mask_{plain}", plain], root, where
            )
            image = _find(folder / "Images", [plain, name], root, where)
            samples.append(Sample(Path(image.name).stem, image, mask, row["Description"], s))
    return samples


# --------------------------------------------------------------------------- manifest


def _load_manifest(root: Path) -> tuple[Path, list[Sample]]:
    path = root
    if root.is_dir():
        found = [root / n for n in MANIFEST_NAMES if (root / n).is_file()]
        if len(found) != 1:
            raise InputError(f"expected exactly one of {', '.join(MANIFEST_NAMES)}", root)
        path = found[0]
    if not path.is_file():
        raise InputError("manifest file does not exist", path)
    base = path.parent
    rows = read_table(path, ("image", "text"), ("mask", "split", "id", "kind", "target"))
    is_csv = path.suffix.lower() == ".csv"
    image_count = Counter(row["image"] for row in rows)
    samples = []
    image_split: dict[str, tuple[str, str]] = {}
    for n, row in enumerate(rows, 2 if is_csv else 1):
        where = f"{path.name} {'row' if is_csv else 'line'} {n}"
        if not row["image"]:
            raise InputError(f"{where}: empty image path", path)
        split = _SPLIT_ALIASES.get(row.get("split", "").lower())
        if split is None:
            raise InputError(
                f"{where}: unknown split {row['split']!r} (use train, val or test)", path
            )
        # splits are by image: one image in two splits would leak test cases into training
        first = image_split.setdefault(row["image"], (split, where))
        if first[0] != split:
            raise InputError(
                f"{where}: image {row['image']!r} is in split {split!r} but {first[1]} puts it "
                f"in {first[0]!r} (an image in two splits leaks between them)",
                path,
            )
        try:
            image = safe_join(base, row["image"], base, where)
            mask = safe_join(base, row["mask"], base, where) if row.get("mask") else None
        except InputError as err:
            raise InputError(str(err), path) from err
        samples.append(
            Sample(
                _row_id(row, n, image_count),
                image,
                mask,
                row["text"],
                split,
                kind=row.get("kind", ""),
                target=row.get("target", ""),
            )
        )
    return base, samples


def _row_id(row: dict[str, str], n: int, image_count: Counter) -> str:
    """The id column, else the image path without suffix; an image that has several rows (one
    per text and mask) takes its mask's path instead, or the row number when there is no mask."""
    if row.get("id"):
        return row["id"]
    stem = Path(row["image"]).with_suffix("").as_posix()
    if image_count[row["image"]] == 1:
        return stem
    if row.get("mask"):
        return Path(row["mask"]).with_suffix("").as_posix()
    return f"{stem}#{n}"


# --------------------------------------------------------------------------- several datasets


def merge_datasets(datasets: list[Dataset], names: list[str]) -> Dataset:
    """One dataset of several (``--data A --data B``): ids are prefixed with each dataset's name
    so that they stay unique; the root is the folder that holds them all."""
    import os

    if len(datasets) == 1:
        return datasets[0]
    if len(set(names)) != len(names):
        names = [f"{name}{i}" for i, name in enumerate(names)]
    samples = [
        dataclasses.replace(s, id=f"{name}/{s.id}")
        for ds, name in zip(datasets, names, strict=True)
        for s in ds.samples
    ]
    root = Path(os.path.commonpath([str(Path(ds.root).resolve()) for ds in datasets]))
    layout = "+".join(ds.layout for ds in datasets)
    return Dataset(root=root, layout=layout, samples=samples)


def dataset_name(root: str | Path) -> str:
    """A short name for a dataset path: the folder name (a manifest file's folder)."""
    p = Path(root).absolute()
    if p.is_file() or p.suffix.lower() in (".csv", ".jsonl"):
        return p.parent.name if p.stem == "manifest" else p.stem
    return p.name
