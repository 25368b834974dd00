"""Atomic file writes: a temp file in the target folder, renamed into place on success.

Nothing is left behind on failure and nothing is replaced unless ``overwrite`` is true. The
file gets the mode of a normal write (``0666`` less the umask), whatever the writer did to the
temp file. A full disk (``ENOSPC``, or a quota: ``EDQUOT``) is one clear error naming the file
and the free space, not the writer's own exception.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mrisegcli.errors import MrisegError, OutputExistsError

_FULL = (errno.ENOSPC, errno.EDQUOT)
#: name pattern (no anchors) of the temp file safetensors' own writer makes beside its target
#: and renames onto it: ``.tmp`` + 6 characters; a writer killed mid-save leaves it behind
SAFETENSORS_TEMP = r"\.tmp[A-Za-z0-9]{6}"
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28")


class DiskFullError(MrisegError):
    """Writing failed because the file system is full (or the user's quota is used up)."""


def check_writable(path: Path, overwrite: bool) -> None:
    """Raise before any work is done if ``path`` exists (without overwrite) or is a folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError("already exists (use --overwrite to replace it)", path)
    if path.exists() and path.is_dir():
        raise MrisegError("is a folder, expected a file path", path)


def check_folder_writable(folder: str | Path) -> None:
    """Raise now if files cannot be written into ``folder`` (created on demand), so that a
    long computation does not end in a write error: the nearest existing folder on the way
    must be a folder this process may write into."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise MrisegError(f"cannot create folder ({os.strerror(errno.ENOTDIR)})", folder)
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        where = folder if probe == folder else probe
        raise MrisegError(f"cannot write here ({os.strerror(errno.EACCES)})", where)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (an OSError, or a library's wrapper of one) says the disk is full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return True
        if any(word in str(err) for word in _FULL_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def _free_bytes(path: Path) -> int | None:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def disk_full_error(path: str | Path, err: BaseException | None = None) -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space."""
    path = Path(path)
    where = path if path.is_dir() else path.parent
    free = _free_bytes(where)
    room = "free space unknown" if free is None else f"{human_bytes(free)} free in {where}"
    what = (
        "disk quota exceeded"
        if isinstance(err, OSError) and err.errno == errno.EDQUOT
        else "no space left on device"
    )
    return DiskFullError(f"cannot write: {what} ({room}); free some space and run again", path)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on clean exit rename it onto ``path``.

    The temporary name keeps the suffixes of ``path`` (``.nii.gz`` included) so writers that
    pick a format by extension behave the same. Writers may replace the temp file (safetensors
    writes its own temp file and renames it): the mode is set once the writer is done.
    """
    path = Path(path)
    check_writable(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in _FULL:
            raise disk_full_error(path, err) from err
        raise MrisegError(f"cannot create folder ({err.strerror})", path.parent) from err
    suffix = "".join(path.suffixes) if path.suffixes else ""
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent
        )
    except OSError as err:
        if err.errno in _FULL:
            raise disk_full_error(path, err) from err
        raise MrisegError(f"cannot write here ({err.strerror})", path.parent) from err
    os.close(fd)
    tmp = Path(tmp_name)
    mode = 0o666 & ~umask()  # mkstemp makes 0600; outputs get the user's usual mode
    os.chmod(tmp, mode)
    try:
        try:
            yield tmp
            if tmp.exists():
                os.chmod(tmp, mode)  # again: the writer may have made a new file
            if path.exists() and not overwrite:  # appeared while we were writing
                raise OutputExistsError("already exists (use --overwrite to replace it)", path)
            os.replace(tmp, path)
        except MrisegError:
            raise
        except Exception as err:
            if is_disk_full(err):
                raise disk_full_error(path, err) from err
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)
