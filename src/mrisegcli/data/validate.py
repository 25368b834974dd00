"""Check a dataset before spending hours on it: every problem found, in one report.

Raster files (PNG, JPEG, TIFF, BMP) are checked from their headers with Pillow (no pixel
decoding); other formats (DICOM, NIfTI) are opened with the project's readers. ``deep=True``
decodes every file through the readers the training loader uses.

Masks must hold 0 and 1, or 0 and 255 (:data:`NON_BINARY` otherwise). A mask read here (a
DICOM or NIfTI mask, or any mask with ``deep=True``) is checked now; a raster mask checked from
its header alone is checked when the training loader decodes it
(:func:`mrisegcli.data.loading.load_split_arrays`), which reports in this module's format.
Files that are not regular files (a FIFO, a device) are refused without being opened.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mrisegcli.data.layouts import Dataset, Sample

MISSING_FILE = "missing file"
UNREADABLE = "unreadable"
SIZE_MISMATCH = "size mismatch"
EMPTY_TEXT = "empty text"
DUPLICATE_ID = "duplicate id"
ESCAPES_ROOT = "escapes root"
NO_MASK = "no mask"
NON_BINARY = "non-binary mask"
NOT_A_FILE = "not a file"

_RASTER = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}

Progress = Callable[[int, int], None]  # called with (done, total)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one sample; ``kind`` is one of the constants of this module."""

    sample_id: str
    path: Path | None
    reason: str
    kind: str = UNREADABLE


def validate_dataset(
    ds: Dataset,
    *,
    check_images: bool = True,
    deep: bool = False,
    require_masks: bool = True,
    progress: Progress | None = None,
) -> list[Problem]:
    """Return all problems of ``ds`` (an empty list when it is clean).

    Checks: duplicate ids, paths outside ``ds.root``, missing files, missing masks (unless
    ``require_masks`` is false), empty texts and, with ``check_images``, that image and mask
    can be opened and have the same height and width.
    """
    problems: list[Problem] = []
    counts = Counter(s.id for s in ds.samples)
    for sid, n in counts.items():
        if n > 1:
            splits = sorted({s.split for s in ds.samples if s.id == sid})
            problems.append(
                Problem(sid, None, f"id used by {n} samples ({', '.join(splits)})", DUPLICATE_ID)
            )
    root = Path(ds.root).resolve()
    total = len(ds.samples)
    seen: set[tuple] = set()  # a volume's files (and each text) are checked once, not per slice
    for done, sample in enumerate(ds.samples, 1):
        if sample.volume is None:
            problems.extend(_check_sample(sample, root, check_images, deep, require_masks))
        elif (sample.image, sample.mask, sample.text) not in seen:
            first = (sample.image, sample.mask) not in seen
            seen.update({(sample.image, sample.mask), (sample.image, sample.mask, sample.text)})
            problems.extend(
                _check_volume(sample, root, check_images and first, deep, require_masks)
            )
        if progress is not None:
            progress(done, total)
    return problems


def _check_sample(
    s: Sample, root: Path, check_images: bool, deep: bool, require_masks: bool
) -> list[Problem]:
    out: list[Problem] = []
    if not s.text.strip():
        out.append(Problem(s.id, None, "the text is empty", EMPTY_TEXT))
    if s.mask is None and require_masks:
        out.append(Problem(s.id, None, "no mask given", NO_MASK))
    present = [
        path for path in (s.image, s.mask) if path is not None and _check_path(s, path, root, out)
    ]
    if check_images and present:
        _check_contents(s, present, deep, out)
    return out


def _check_volume(
    s: Sample, root: Path, contents: bool, deep: bool, require_masks: bool
) -> list[Problem]:
    """The slices of one volume (nnU-Net layout), checked once: text, paths, and with ``deep``
    the label map's values (the grids were compared when the index was read)."""
    out = _check_sample(s, root, False, deep, require_masks)
    if contents and deep and s.mask is not None and not out:
        from mrisegcli.data.volume_slices import volume_labels

        try:
            volume_labels(s.mask, set(s.volume.known) or None)
        except Exception as err:  # any reader failure means the file cannot be used
            out.append(Problem(s.id, s.mask, _short(err, s.mask), UNREADABLE))
    return out


def _check_path(s: Sample, path: Path, root: Path, out: list[Problem]) -> bool:
    """Whether ``path`` is a file inside ``root``; otherwise a problem is added to ``out``."""
    if not Path(path).resolve().is_relative_to(root):
        out.append(
            Problem(s.id, path, f"path leads outside the dataset folder {root}", ESCAPES_ROOT)
        )
    elif not Path(path).exists():
        out.append(Problem(s.id, path, "file does not exist", MISSING_FILE))
    elif not Path(path).is_file():
        what = "a folder" if Path(path).is_dir() else "not a regular file (a FIFO or device?)"
        out.append(Problem(s.id, path, f"is {what}, expected an image file", NOT_A_FILE))
    else:
        return True
    return False


def _check_contents(s: Sample, present: list[Path], deep: bool, out: list[Problem]) -> None:
    """Read the files present (headers only unless ``deep``): unreadable files, a non-binary
    mask and a mask of another size than its image are added to ``out``."""
    from mrisegcli.io.scan import NonBinaryMaskError

    shapes: dict[Path, tuple[int, ...]] = {}
    for path in present:
        try:
            shapes[path] = _shape(path, is_mask=path == s.mask, deep=deep)
        except NonBinaryMaskError as err:
            out.append(Problem(s.id, path, _short(err, path), NON_BINARY))
        except Exception as err:  # any reader failure means the file cannot be used
            out.append(Problem(s.id, path, f"cannot read ({_short(err)})", UNREADABLE))
    if s.mask is not None and s.image in shapes and s.mask in shapes:
        hw_img, hw_mask = shapes[s.image][-2:], shapes[s.mask][-2:]
        if hw_img != hw_mask:
            out.append(
                Problem(
                    s.id,
                    s.mask,
                    f"mask is {hw_mask[0]}x{hw_mask[1]} but image is {hw_img[0]}x{hw_img[1]} (HxW)",
                    SIZE_MISMATCH,
                )
            )


def _shape(path: Path, is_mask: bool, deep: bool) -> tuple[int, ...]:
    """Array shape of an image file, from its header where possible."""
    if not deep and path.suffix.lower() in _RASTER:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            im.verify()  # walks the chunks / checksums without decoding pixels
        return (h, w)
    if is_mask:
        from mrisegcli.io.read import read_mask

        return tuple(read_mask(path, binary=True).shape)
    from mrisegcli.io.read import read_scan

    return tuple(read_scan(path).pixels.shape)


def _short(err: Exception, path: Path | None = None) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if path is not None:
        text = text.removeprefix(f"{path}: ")
    return text if len(text) <= 120 else text[:117] + "..."


def format_problems(problems: list[Problem], limit: int = 20) -> str:
    """A readable report: a count per kind, then the first ``limit`` problems one per line."""
    if not problems:
        return "no problems found"
    by_kind: dict[str, int] = defaultdict(int)
    for p in problems:
        by_kind[p.kind] += 1
    n_samples = len({p.sample_id for p in problems})
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    lines = [f"{len(problems)} problem(s) in {n_samples} sample(s): {summary}"]
    for p in problems[:limit]:
        where = f" {p.path}:" if p.path is not None else ""
        lines.append(f"  [{p.kind}] {p.sample_id}:{where} {p.reason}")
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)
