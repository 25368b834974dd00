"""The built-in referring dataset: chest-radiograph-like phantoms with described opacities.

Each case is a frontal chest phantom (body, two dark lung fields, mediastinum, spine, heart,
rib shadows, smooth noise) with 1-3 soft, irregular opacities in lung zones, and a text in
the grammar of the QaTa-COV19 / MosMedData+ descriptions:

    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."

Zones are {upper, middle, lower, all} x {left, right} lung, where left and right are the
PATIENT's sides (radiological convention): the patient's right lung is on the image's left.

* ``mode="refer"``: the image also holds opacities the text does not name; the mask holds only
  the named ones, so a model has to read the text to segment correctly.
* ``mode="describe"``: the text names every opacity and the mask holds them all.

Every case is drawn from its own generator seeded by (seed, split, index), so a case does not
change when the split sizes do, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import datetime
import io
import json
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from openpyxl import Workbook
from PIL import Image

from mrisegcli.errors import InputError, MrisegError, OutputExistsError

MODES = ("refer", "describe")
LEVELS = ("upper", "middle", "lower", "all")
SIDES = ("left", "right")  # the patient's sides
ZONES = tuple((level, side) for side in SIDES for level in LEVELS)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_FOLDER = {"train": "Train", "val": "Val", "test": "Test"}
_MARKER = "synth.json"
_FIXED_TIME = "2020-01-01T00:00:00Z"

Progress = Callable[[int, int], None]  # called with (done, total)
Zone = tuple[str, str]  # (level, side)


@dataclass(frozen=True)
class SynthCase:
    """One rendered case; arrays are (S, S)."""

    image: np.ndarray  # float32 in [0, 1]
    mask: np.ndarray  # bool, the named opacities
    background: np.ndarray  # float32, the same phantom without any opacity
    opacity: np.ndarray  # bool, every opacity (named or not)
    zones: tuple[Zone, ...]  # every opacity's zone
    named: tuple[Zone, ...]  # the zones the text names (and the mask holds)
    text: str
    lung_rows: dict[str, tuple[int, int]]  # side -> (top, bottom) row of that lung field


@dataclass(frozen=True)
class SynthReport:
    """What :func:`synthesize` wrote and how fast."""

    out: Path
    counts: dict[str, int]
    size: int
    seed: int
    mode: str
    seconds: float
    images_per_s: float

    @property
    def n_total(self) -> int:
        return sum(self.counts.values())


# --------------------------------------------------------------------------- text


def describe(zones: tuple[Zone, ...] | list[Zone]) -> str:
    """The QaTa-style sentence naming ``zones`` (ordered left lung first, top to bottom)."""
    if not zones:
        raise ValueError("a description needs at least one zone")
    order = sorted(set(zones), key=lambda z: (SIDES.index(z[1]), LEVELS.index(z[0])))
    n = len(order)
    lateral = "Bilateral" if len({side for _, side in order}) == 2 else "Unilateral"
    parts = [f"{level} {side} lung" for level, side in order]
    places = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{lateral} pulmonary infection, {_NUMBERS[n]} infected area{'s' if n > 1 else ''}, {places}."


def parse_zones(text: str) -> list[Zone]:
    """The zones a description names (inverse of :func:`describe` for its own grammar)."""
    return [
        (m[0], m[1]) for m in re.findall(r"\b(upper|middle|lower|all) (left|right) lung\b", text)
    ]


# --------------------------------------------------------------------------- rendering


class _Grid:
    """Pixel coordinates and bilinear upsampling weights for one image size."""

    def __init__(self, size: int) -> None:
        self.size = size
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.y = c[:, None]  # (S, 1) in [0, 1]
        self.x = c[None, :]  # (1, S)
        self.rows = np.arange(size, dtype=np.float32)[:, None]  # (S, 1) pixel index
        self.cols = np.arange(size, dtype=np.float32)[None, :]  # (1, S)
        self.interp = {g: _interp_weights(size, g) for g in (5, 9)}

    def smooth(self, rng: np.random.Generator, g: int) -> np.ndarray:
        """A smooth random field: g x g standard normals, bilinearly upsampled to (S, S).

        Separable gathers rather than a matrix product: BLAS threads cost more than the job.
        """
        lo, w0, w1 = self.interp[g]  # (S,) each
        knots = rng.standard_normal((g, g), dtype=np.float32)
        rows = w0[:, None] * knots[lo] + w1[:, None] * knots[lo + 1]  # (S, g)
        return rows[:, lo] * w0[None, :] + rows[:, lo + 1] * w1[None, :]  # (S, S)


def _interp_weights(size: int, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Knots g spread over ``size`` pixel centres: (left knot index, its weight, right weight)."""
    pos = (np.arange(size) + 0.5) / size * (g - 1)
    lo = np.minimum(pos.astype(int), g - 2)
    frac = (pos - lo).astype(np.float32)
    return lo, 1 - frac, frac


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _ellipse(grid: _Grid, cx: float, cy: float, ax: float, ay: float, edge: float) -> np.ndarray:
    r = np.sqrt(((grid.x - cx) / ax) ** 2 + ((grid.y - cy) / ay) ** 2)
    return _sigmoid((1 - r) / edge)


def _phantom(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The chest without opacities (linear intensity) and each lung's soft field."""
    u = rng.uniform
    x, y = grid.x, grid.y
    mid = 0.5 + u(-0.015, 0.015)
    # thorax: a squarish superellipse cut by the top edge, plus the neck above it
    bx, by, p = u(0.43, 0.48), u(0.52, 0.58), u(2.4, 3.0)
    r_body = (np.abs((x - mid) / bx) ** p + np.abs((y - 0.6 - u(-0.02, 0.02)) / by) ** p) ** (1 / p)
    neck = _sigmoid((0.11 - np.abs(x - mid)) / 0.015) * _sigmoid((0.3 - y) / 0.02)
    body = np.maximum(_sigmoid((1 - r_body) / 0.03), neck)
    lcy, lay, sep = 0.49 + u(-0.03, 0.03), u(0.25, 0.30), u(0.17, 0.21)
    lungs = {}
    for side, sign, narrow in (("right", -1.0, 1.0), ("left", 1.0, u(0.85, 0.95))):
        cx = mid + sign * (sep + u(-0.01, 0.01))
        ax, ay = u(0.12, 0.15) * narrow, lay * u(0.95, 1.05)
        t = (y - lcy - u(-0.015, 0.015)) / ay  # (S, 1)
        r = np.sqrt(((x - cx) / (ax * (1 + 0.3 * t))) ** 2 + t**2)  # egg: wider at the base
        lungs[side] = _sigmoid((1 - r) / 0.05)
    heart = _ellipse(
        grid, mid + u(0.02, 0.05), lcy + u(0.15, 0.2), u(0.11, 0.14), u(0.10, 0.13), 0.2
    )
    band = np.abs(x - mid)
    mediastinum = _sigmoid((u(0.05, 0.065) - band) / 0.01) * _sigmoid((0.78 - y) / 0.02)
    spine = _sigmoid((0.022 - band) / 0.006)
    phase = (
        2 * np.pi * (u(7.0, 9.0) * (y - 0.25 * np.abs(x - mid) + 1.2 * (x - mid) ** 2) + u(0, 1))
    )
    ribs = 0.5 + 0.5 * np.sin(phase)
    ribs = ribs * ribs * ribs  # narrow bright bands
    lung = lungs["left"] + lungs["right"]
    img = 0.04 + body * (u(0.50, 0.62) + u(0.05, 0.08) * ribs + 0.05 * grid.smooth(rng, 5))
    img = img + body * (0.12 * mediastinum + 0.07 * spine + 0.06 * heart)
    img = img - u(0.30, 0.38) * lung * (1 - 0.7 * heart)
    return img.astype(np.float32), lungs


def _pick_zones(rng: np.random.Generator) -> list[Zone]:
    """1-3 distinct zones; an "all" zone excludes every other zone of its lung."""
    k = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    chosen: list[Zone] = []
    for _ in range(k):
        cands = [
            z
            for z in ZONES
            if z not in chosen and not any(c[1] == z[1] and "all" in (c[0], z[0]) for c in chosen)
        ]
        if not cands:
            break
        w = np.array([0.35 if z[0] == "all" else 1.0 for z in cands])
        chosen.append(cands[int(rng.choice(len(cands), p=w / w.sum()))])
    return chosen


def _opacity(
    rng: np.random.Generator, grid: _Grid, lung_soft: np.ndarray, level: str, texture: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(intensity to add, hard mask) of one irregular, soft-edged opacity in one lung zone.

    Zone opacities stay inside the middle ~70% of their third of the lung's height, so those
    of neighbouring zones never touch; "all" opacities span the whole lung field.
    """
    u = rng.uniform
    lung = lung_soft > 0.5
    rows = np.flatnonzero(lung.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1])
    h = bottom - top + 1
    if level == "all":
        cy, ry = (top + bottom) / 2, u(0.45, 0.55) * h
    else:
        third = h / 3
        cy = top + (LEVELS.index(level) + 0.5 + u(-0.08, 0.08)) * third
        ry = u(0.15, 0.32) * third
    cols = np.flatnonzero(lung[int(round(cy))])
    c0, c1 = int(cols[0]), int(cols[-1])
    hw, cmid = (c1 - c0 + 1) / 2, (c0 + c1) / 2
    if level == "all":
        cx, rx = cmid, u(0.75, 1.05) * hw
    else:
        cx, rx = cmid + u(-0.25, 0.25) * hw, u(0.35, 0.8) * hw
    # work in the bounding box only: the sigmoid tail is negligible beyond 1.6 radii
    S = grid.size
    r0, r1 = max(int(cy - 1.6 * ry), 0), min(int(cy + 1.6 * ry) + 2, S)
    q0, q1 = max(int(cx - 1.6 * rx), 0), min(int(cx + 1.6 * rx) + 2, S)
    dx = (grid.cols[:, q0:q1] - cx) / rx  # (1, w)
    dy = (grid.rows[r0:r1] - cy) / ry  # (h, 1)
    rho = np.sqrt(dx**2 + dy**2)  # (h, w)
    theta = np.arctan2(dy, dx)
    edge = np.ones_like(rho)
    for k in (2, 3, 5):  # irregular outline, |bulge| <= 0.12 in total
        edge += u(0.0, 0.04) * np.cos(k * theta + u(0, 2 * np.pi))
    soft = _sigmoid((edge - rho) / u(0.10, 0.2))
    amp = u(0.18, 0.32) if level == "all" else u(0.14, 0.3)
    win = (slice(r0, r1), slice(q0, q1))
    add = np.zeros_like(lung_soft)
    add[win] = amp * soft * lung_soft[win] * (0.75 + 0.12 * texture[win])
    hard = np.zeros_like(lung)
    hard[win] = (rho < edge) & lung[win]
    return add.astype(np.float32), hard


def _render(rng: np.random.Generator, grid: _Grid, mode: str, background: bool = True) -> SynthCase:
    if mode not in MODES:
        raise InputError(f"unknown synth mode {mode!r}; expected one of {', '.join(MODES)}")
    base, lungs = _phantom(rng, grid)
    zones = _pick_zones(rng)
    if mode == "describe" or len(zones) == 1 or rng.random() < 0.3:
        named = list(zones)
    else:
        m = int(rng.integers(1, len(zones)))
        named = [zones[i] for i in sorted(rng.choice(len(zones), size=m, replace=False))]
    texture = grid.smooth(rng, 9)
    add_total = np.zeros_like(base)
    mask = np.zeros(base.shape, dtype=bool)
    opacity = np.zeros(base.shape, dtype=bool)
    for zone in zones:
        add, hard = _opacity(rng, grid, lungs[zone[1]], zone[0], texture)
        add_total += add
        opacity |= hard
        if zone in named:
            mask |= hard
    grain = rng.random(base.shape, dtype=np.float32) - 0.5  # uniform, std 1/sqrt(12)
    noise = 0.04 * grid.smooth(rng, 9) + 0.04 * grain
    gamma = rng.uniform(0.85, 1.15)

    def finish(lin: np.ndarray) -> np.ndarray:
        return np.clip(lin + noise, 0.0, 1.0) ** np.float32(gamma)

    lung_rows = {}
    for side, soft in lungs.items():
        rows = np.flatnonzero((soft > 0.5).any(axis=1))
        lung_rows[side] = (int(rows[0]), int(rows[-1]))
    return SynthCase(
        image=finish(base + add_total).astype(np.float32),
        mask=mask,
        background=finish(base).astype(np.float32) if background else np.empty(0, np.float32),
        opacity=opacity,
        zones=tuple(zones),
        named=tuple(named),
        text=describe(named),
        lung_rows=lung_rows,
    )


def case_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of case ``index`` of ``split``: independent of every other case."""
    if split not in _SPLIT_CODE:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(_SPLIT_CODE)}")
    if seed < 0 or index < 0:
        raise InputError(f"seed and index must be non-negative (got {seed}, {index})")
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]))


def render_case(
    seed: int, split: str, index: int, size: int = 128, mode: str = "refer"
) -> SynthCase:
    """Render one case exactly as :func:`synthesize` writes it (before 8-bit rounding)."""
    return _render(case_rng(seed, split, index), _Grid(size), mode)


# --------------------------------------------------------------------------- writing


def synthesize(
    out: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    size: int = 128,
    seed: int = 0,
    mode: str = "refer",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> SynthReport:
    """Write the synthetic dataset in the LViT layout under ``out``.

    Files: ``<Split>_Folder/img/covid_<i>.png`` (8-bit grey), ``labelcol/mask_covid_<i>.png``
    (0/255) and ``<Split>_text.xlsx`` (columns Image = mask file name, Description), numbered
    1..N across the splits. Everything is written into a temporary folder beside ``out`` and
    renamed at the end. An existing non-empty ``out`` is refused unless ``overwrite`` is true,
    and even then unless it is an earlier synthetic dataset holding nothing but synth's own
    files (``synth.json``, the split folders, images, masks and xlsx files): anything else in
    it is named and the folder left alone.
    """
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 0 for n in counts.values()) or sum(counts.values()) == 0:
        raise InputError(
            f"case counts must be >= 0 and not all zero (got {n_train}, {n_val}, {n_test})"
        )
    if size < 32:
        raise InputError(f"image size must be at least 32 (got {size})")
    if mode not in MODES:
        raise InputError(f"unknown synth mode {mode!r}; expected one of {', '.join(MODES)}")
    _check_out(out, overwrite)
    start = time.perf_counter()
    tmp = _make_temp_dir(out)
    try:
        _write_all(tmp, counts, size, seed, mode, progress)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    return SynthReport(out, counts, size, seed, mode, seconds, total / max(seconds, 1e-9))


def _make_temp_dir(out: Path) -> Path:
    """The temporary folder beside ``out`` (its parents created): a folder that cannot be made
    there (``/proc/x``, under a file, read-only, a full disk) is one error naming ``out``."""
    from mrisegcli.io.atomic import disk_full_error, is_disk_full

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(out, err) from err
        # mkdir(parents=True) says "File exists" for a file on the way: it is not a folder
        why = "Not a directory" if isinstance(err, FileExistsError) else err.strerror
        raise MrisegError(f"cannot create folder ({why})", out) from err


_SPLIT_DIR = re.compile(r"^(Train|Val|Test)_Folder$")
_OWN_FILES = {
    "img": re.compile(r"^covid_\d+\.png$"),
    "labelcol": re.compile(r"^mask_covid_\d+\.png$"),
}


def _is_marker(path: Path) -> bool:
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(params, dict) and params.get("generator") == "mriseg synth"


def _unknown_entry(out: Path) -> str | None:
    """The first file or folder under ``out`` that synth does not write (None: all are its own)."""
    for p in sorted(out.iterdir()):
        if p.is_symlink():
            return p.name
        if p.name == _MARKER and p.is_file():
            continue
        match = _SPLIT_DIR.match(p.name)
        if not (match and p.is_dir()):
            return p.name + ("/" if p.is_dir() else "")
        for q in sorted(p.iterdir()):
            rel = f"{p.name}/{q.name}"
            if q.is_symlink():
                return rel
            if q.is_file() and q.name == f"{match.group(1)}_text.xlsx":
                continue
            if not (q.is_dir() and q.name in _OWN_FILES):
                return rel
            for f in sorted(q.iterdir()):
                if f.is_symlink() or not f.is_file() or not _OWN_FILES[q.name].match(f.name):
                    return f"{rel}/{f.name}"
    return None


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is not an empty folder, unless ``overwrite`` and it holds nothing
    but an earlier synth's files (its ``synth.json``, split folders, images, masks, xlsx)."""
    if out.exists() and not out.is_dir():
        raise MrisegError("exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                "already exists and is not empty (use --overwrite to replace it)", out
            )
        if not ((out / _MARKER).is_file() and _is_marker(out / _MARKER)):
            raise MrisegError(
                f"not a synthetic dataset (no {_MARKER} of mriseg synth); refusing to replace it",
                out,
            )
        unknown = _unknown_entry(out)
        if unknown is not None:
            raise MrisegError(
                f"holds {unknown}, which synth does not write; refusing to replace the folder "
                "(--overwrite replaces an earlier synth's files only: move that away, or choose "
                "another folder)",
                out,
            )


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            _check_out(out, overwrite)  # it may have changed while we were writing
            old = out.with_name(f".{out.name}.old-{tmp.name}")
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_all(
    root: Path, counts: dict[str, int], size: int, seed: int, mode: str, progress: Progress | None
) -> None:
    grid = _Grid(size)
    total, done, number = sum(counts.values()), 0, 0
    for split, n in counts.items():
        if n == 0:
            continue
        folder = root / f"{_FOLDER[split]}_Folder"
        (folder / "img").mkdir(parents=True)
        (folder / "labelcol").mkdir()
        rows = []
        for i in range(n):
            number += 1
            case = _render(case_rng(seed, split, i), grid, mode, background=False)
            img_u8 = np.round(case.image * 255).astype(np.uint8)  # (S, S)
            Image.fromarray(img_u8).save(folder / "img" / f"covid_{number}.png", compress_level=1)
            mask_u8 = case.mask.astype(np.uint8) * 255  # (S, S)
            Image.fromarray(mask_u8).save(
                folder / "labelcol" / f"mask_covid_{number}.png", compress_level=1
            )
            rows.append((f"mask_covid_{number}.png", case.text))
            done += 1
            if progress is not None:
                progress(done, total)
        write_xlsx(folder / f"{_FOLDER[split]}_text.xlsx", ["Image", "Description"], rows)
    params = {
        "generator": "mriseg synth",
        "version": 1,
        "seed": seed,
        "size": size,
        "mode": mode,
        "counts": counts,
        "layout": "lvit",
    }
    (root / _MARKER).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")


def write_xlsx(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> None:
    """Write a one-sheet workbook with reproducible bytes (fixed zip and document times)."""
    wb = Workbook()
    ws = wb.active
    ws.append(header)
    for row in rows:
        ws.append(list(row))
    fixed = datetime.datetime(2020, 1, 1)
    wb.properties.created = fixed
    buf = io.BytesIO()
    wb.save(buf)  # stamps the current time into docProps/core.xml and every zip entry
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = re.sub(
                    rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*",
                    rb"\g<1>" + _FIXED_TIME.encode(),
                    data,
                )
            entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            dst.writestr(entry, data)
