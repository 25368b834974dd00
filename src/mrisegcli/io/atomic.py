"""Atomic file writes: a temp file in the target folder, renamed into place on success.

Nothing is left behind on failure and nothing is replaced unless ``overwrite`` is true. The
file gets the mode of a normal write (``0666`` less the umask), whatever the writer did to the
temp file. A full disk (``ENOSPC``, or a quota: ``EDQUOT``) is one clear error naming the file
and the free space, not the writer's own exception.

An output path that is not a regular file is never replaced: a character device (``/dev/null``,
``/dev/full``, a terminal) or a FIFO is written through (the writer's file is made in the temp
folder, then copied into it), and so is one of this process's open descriptors named by path
(``/dev/stdout``, ``/dev/fd/3``, ``/proc/self/fd/3``: written to the descriptor, whatever it is
open on); any other kind (a block device, a socket) is refused. A symlink to a file keeps the
link: its target is the file replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import sys
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


_DESCRIPTOR = "an open descriptor of this process"
#: kinds of special file an output is written through (anything else not a file is refused)
_WRITE_THROUGH = ("a character device", "a FIFO (named pipe)", _DESCRIPTOR)
_FD_PATH = re.compile(
    r"/dev/(?:std(?P<std>in|out|err)|fd/(?P<dev>\d+))|/proc/(?P<pid>self|thread-self|\d+)/fd/(?P<fd>\d+)"
)


def own_descriptor(path: str | Path) -> int | None:
    """The descriptor number when ``path`` names one of this process's open descriptors
    (``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N``), else None."""
    m = _FD_PATH.fullmatch(str(path))
    if m is None or (m["pid"] and m["pid"].isdigit() and int(m["pid"]) != os.getpid()):
        return None
    fd = {"in": 0, "out": 1, "err": 2}[m["std"]] if m["std"] else int(m["dev"] or m["fd"])
    try:
        os.fstat(fd)
    except OSError:
        return None
    return fd


def special_kind(path: str | Path) -> str | None:
    """What ``path`` is when it exists (links followed) and is neither a regular file nor a
    folder: "a character device", "a FIFO (named pipe)", "a block device", "a socket", or
    one of this process's descriptors named by path (``/dev/stdout``: whatever it is open on);
    None otherwise (absent, a file, a folder)."""
    if own_descriptor(path) is not None:
        return _DESCRIPTOR
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"  # pragma: no cover


def _check_special(path: Path, kind: str) -> None:
    if kind not in _WRITE_THROUGH:
        raise MrisegError(f"is {kind}, not a file: refusing to write to it", path)


def check_writable(path: Path, overwrite: bool) -> None:
    """Raise before any work is done if ``path`` exists (without overwrite) or is a folder.

    A character device or a FIFO is written through, replacing nothing (no ``overwrite``
    needed); another special file is refused."""
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:
        _check_special(path, kind)
        return
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
    what = (
        "disk quota exceeded"
        if isinstance(err, OSError) and err.errno == errno.EDQUOT
        else "no space left on device"
    )
    kind = special_kind(path)
    if kind is not None:  # /dev/full, a FIFO's far end: there is no folder to free
        return DiskFullError(f"cannot write: {what} (it is {kind})", path)
    where = path if path.is_dir() else path.parent
    free = _free_bytes(where)
    room = "free space unknown" if free is None else f"{human_bytes(free)} free in {where}"
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

    A character device or FIFO at ``path`` is written through (:func:`_through`), a symlink to
    a file has its target replaced (the link stays), another special file is refused.
    """
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:
        _check_special(path, kind)
        with _through(path, kind) as tmp:
            yield tmp
        return
    if path.is_symlink() and Path(os.path.realpath(path)).is_file():
        path = Path(os.path.realpath(path))  # replace the file the link points to, not the link
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


@contextlib.contextmanager
def _through(path: Path, kind: str) -> Iterator[Path]:
    """Yield a temp file in the system's temp folder; on clean exit copy it into the device or
    FIFO ``path`` (opened for writing, never created, truncated or replaced). A FIFO that
    nothing reads from is refused at once instead of blocking."""
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=".mriseg.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _copy_into(tmp, path, kind)
    except MrisegError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_error(path, err) from err
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _open_for_writing(path: Path, kind: str) -> int:
    """A descriptor to write ``path`` through: a copy of this process's own descriptor, or
    the device or FIFO opened for writing (never created or truncated)."""
    if kind == _DESCRIPTOR:
        fd = own_descriptor(path)
        for stream in (sys.stdout, sys.stderr):  # what was printed before comes first
            with contextlib.suppress(Exception):
                stream.flush()
        return os.dup(fd if fd is not None else 1)
    fifo = kind == "a FIFO (named pipe)"
    return os.open(path, os.O_WRONLY | (os.O_NONBLOCK if fifo else 0))


def _copy_into(src: Path, path: Path, kind: str) -> None:
    fifo = kind == "a FIFO (named pipe)"
    try:
        fd = _open_for_writing(path, kind)
    except OSError as err:
        if fifo and err.errno == errno.ENXIO:
            raise MrisegError(
                "is a FIFO (named pipe) that nothing reads from; start its reader first", path
            ) from err
        raise MrisegError(f"cannot write ({err.strerror})", path) from err
    try:
        if fifo:
            os.set_blocking(fd, True)
        with src.open("rb") as f:
            while chunk := f.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, err) from err
        raise MrisegError(f"cannot write ({err.strerror})", path) from err
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite)
