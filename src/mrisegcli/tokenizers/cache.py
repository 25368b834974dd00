"""On-disk cache of the codes of every sample, written once by the tokenize stage.

Layout (see docs/cache.md): ``index.json`` (format version, tokenizer fingerprint, field names,
shards, entries) and safetensors shards ``shard-00000.safetensors``, ... holding the tensors of
up to ``flush_every`` entries each under the keys ``"<slot>/<field>"``. The cache stores any
name -> tensor fields, so it does not depend on which tokenizers made the codes.

Writes are crash-safe for a single writer: a shard is written to a temporary file and renamed
into place, then the index is written the same way. The index is the only source of truth: a
shard it does not name (left by a crash between the two renames) is deleted when the cache is
next opened for writing, so an interrupted run resumes from the last flush.

The index records each shard's size and content hash (``sums``). Opening a cache for writing
(``tokenize``, ``train``) checks every shard it would reuse against them, so a damaged shard is
named at once instead of its entries being counted "up to date"; an index written before the
hashes existed gets the shards' headers checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mrisegcli.errors import ConfigError, InputError, MrisegError
from mrisegcli.io.atomic import SAFETENSORS_TEMP, atomic_path

FORMAT = "mriseg-code-cache"
VERSION = 1
INDEX = "index.json"
_SHARD = re.compile(r"^shard-(\d{5,})\.safetensors$")
_ST_TEMP = re.compile(rf"^{SAFETENSORS_TEMP}$")
_REDO = "re-run with --overwrite to rebuild the cache"
_META_KEYS = ("split", "image", "mask", "source_fp", "size", "text")


# ---------------------------------------------------------------- fingerprints


def file_fingerprint(path: str | Path) -> str:
    """``"<size>-<blake2b-128 of the bytes>"``: changes exactly when the content changes.

    The modification time is left out on purpose: a copied or moved dataset (new mtimes, same
    bytes) keeps its cache, while a rewrite with the same size and mtime is still caught.
    """
    path = Path(path)
    h = hashlib.blake2b(digest_size=16)
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    except OSError as err:
        raise InputError(f"cannot read ({err.strerror})", path) from err
    return f"{size}-{h.hexdigest()}"


_VOLUME_FPS: dict[tuple, str] = {}


def _volume_fingerprint(path: str | Path) -> str:
    """:func:`file_fingerprint` of a volume file, computed once per process for all its slices
    (while its size, modification time and inode stay the same)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _VOLUME_FPS:
        _VOLUME_FPS[key] = file_fingerprint(path)
    return _VOLUME_FPS[key]


def sample_fingerprint(
    image: str | Path, mask: str | Path | None, text: str, part: Any = None
) -> str:
    """One fingerprint for a sample's sources: image bytes, mask bytes and text (and, for a
    slice of a volume, which slice, channel and label values: ``part``)."""
    fingerprint = file_fingerprint if part is None else _volume_fingerprint
    parts = [fingerprint(image), fingerprint(mask) if mask is not None else "-", text]
    if part is not None:
        parts.append(repr(part))
    return hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=16).hexdigest()


def state_fingerprint(state: Mapping[str, torch.Tensor], config: Any = None) -> str:
    """Fingerprint of weights (names, dtypes, shapes, bytes) and a JSON-able config.

    Handy as the ``tokenizer_fingerprint`` of a cache: any change of the tokenizer's weights or
    settings invalidates the codes made with it.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """Index record of one cached sample; its tensors live in ``shard`` under ``slot``."""

    id: str
    split: str
    image: str
    mask: str
    source_fp: str
    size: tuple[int, int]  # original (H, W)
    text: str
    shard: str
    slot: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "split": self.split, "image": self.image, "mask": self.mask,
            "source_fp": self.source_fp, "size": list(self.size), "text": self.text,
            "shard": self.shard, "slot": self.slot, "extra": self.extra,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        return cls(
            id=str(d["id"]), split=str(d["split"]), image=str(d["image"]), mask=str(d["mask"]),
            source_fp=str(d["source_fp"]), size=(int(d["size"][0]), int(d["size"][1])),
            text=str(d["text"]), shard=str(d["shard"]), slot=int(d["slot"]),
            extra=dict(d.get("extra", {})),
        )  # fmt: skip


@dataclass
class LoadedCodes:
    """The stacked fields of a split: ``fields[name]`` is (N, ...) in the order of ``ids``."""

    fields: dict[str, torch.Tensor]
    ids: list[str]
    texts: list[str]
    sizes: list[tuple[int, int]]  # original (H, W) of each sample
    splits: list[str]

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------- the cache


class CodeCache:
    """A folder of code shards plus ``index.json``; use :func:`open_cache` to get one."""

    def __init__(
        self,
        folder: Path,
        fingerprint: str,
        fields: Sequence[str],
        *,
        flush_every: int = 512,
        index: dict[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.fields = tuple(fields)
        self.flush_every = flush_every
        index = index or {}
        self._shards: dict[str, int] = dict(index.get("shards", {}))  # name -> entries written
        sums = index.get("sums", {})
        self._sums: dict[str, str] = (
            dict(sums) if isinstance(sums, dict) else {}
        )  # name -> fingerprint
        self._next_shard = int(index.get("next_shard", 0))
        self._entries: dict[str, Entry] = {}
        for d in index.get("entries", []):
            e = Entry.from_json(d)
            self._entries[e.id] = e
        self._pending: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
        self._removed: set[str] = set()

    # -- context manager: flush on exit, also after an error (what was added is kept)
    def __enter__(self) -> CodeCache:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.flush()
        else:
            with contextlib.suppress(Exception):
                self.flush()

    # -- queries
    def needs(self, sample_id: str, source_fp: str) -> bool:
        """True if ``sample_id`` is absent or was cached from different sources."""
        if sample_id in self._pending:
            return self._pending[sample_id][0]["source_fp"] != source_fp
        e = self._entries.get(sample_id)
        return e is None or sample_id in self._removed or e.source_fp != source_fp

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._pending or (
            sample_id in self._entries and sample_id not in self._removed
        )

    def __len__(self) -> int:
        return len(self._live_ids())

    def _live_ids(self) -> list[str]:
        ids = [i for i in self._entries if i not in self._removed]
        return ids + [i for i in self._pending if i not in self._entries]

    # -- writing
    def add(
        self, sample_id: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Queue one sample (replacing any cached version); flush every ``flush_every`` adds.

        ``meta`` needs ``split`` and ``source_fp``; ``image``, ``mask``, ``size`` (H, W) and
        ``text`` are recorded too, other JSON-able keys are kept in ``Entry.extra``.
        """
        if set(tensors) != set(self.fields):
            raise ValueError(f"tensors {sorted(tensors)} != cache fields {sorted(self.fields)}")
        for key in ("split", "source_fp"):
            if key not in meta:
                raise ValueError(f"meta lacks {key!r}")
        meta = dict(meta)
        json.dumps(meta, default=str)  # fail now, not at flush, on odd values
        # own, contiguous CPU copies: safetensors refuses views that share storage
        own = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        self._pending.pop(sample_id, None)  # re-insert at the end
        self._pending[sample_id] = (meta, own)
        self._removed.discard(sample_id)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def remove(self, sample_id: str) -> None:
        """Drop a sample (e.g. gone from the dataset); takes effect on disk at the next flush."""
        self._pending.pop(sample_id, None)
        if sample_id in self._entries:
            self._removed.add(sample_id)

    def flush(self) -> None:
        """Write pending samples as one new shard, then the index; compact sparse shards.

        If writing fails the in-memory state is rolled back (pending samples kept), matching
        what is on disk.
        """
        if not self._pending and not self._removed:
            return
        saved = (dict(self._entries), dict(self._shards), self._next_shard, dict(self._sums))
        try:
            if self._pending:
                name = self._new_shard_name()
                flat: dict[str, torch.Tensor] = {}
                for slot, (sid, (meta, tensors)) in enumerate(self._pending.items()):
                    for f, t in tensors.items():
                        flat[f"{slot}/{f}"] = t
                    self._entries[sid] = _entry(sid, meta, name, slot)
                self._write_shard(name, flat)
                self._shards[name] = len(self._pending)
            for sid in self._removed:
                self._entries.pop(sid, None)
            self._prune_shard_table()
            self._write_index()
        except BaseException:
            self._entries, self._shards, self._next_shard, self._sums = saved
            raise
        self._pending.clear()
        self._removed.clear()
        self._delete_stray_files()
        self.compact()

    def compact(self) -> None:
        """Rewrite each shard in which fewer than half the entries are still live."""
        live = Counter(e.shard for e in self._entries.values())
        sparse = [s for s, n in self._shards.items() if 0 < live[s] and 2 * live[s] < n]
        for old in sparse:
            data = self._read_shard(old)
            name = self._new_shard_name()
            moved = [e for e in self._entries.values() if e.shard == old]
            flat: dict[str, torch.Tensor] = {}
            for slot, e in enumerate(moved):
                for f in self.fields:
                    flat[f"{slot}/{f}"] = data[f"{e.slot}/{f}"]
                self._entries[e.id] = _replace(e, shard=name, slot=slot)
            self._write_shard(name, flat)
            self._shards[name] = len(moved)
        if sparse:
            self._prune_shard_table()
            self._write_index()
            self._delete_stray_files()

    # -- reading
    def entries(self, split: str | None = None) -> list[Entry]:
        """Index records (flushes pending samples first), in first-added order."""
        self.flush()
        return [e for e in self._entries.values() if split is None or e.split == split]

    def tensors(self, sample_id: str) -> dict[str, torch.Tensor]:
        """The field tensors of one sample."""
        self.flush()
        e = self._entries.get(sample_id)
        if e is None:
            raise KeyError(sample_id)
        data = self._read_shard(e.shard)
        return {f: self._get(data, e, f) for f in self.fields}

    def load(self, split: str | None = None) -> LoadedCodes:
        """Stack every field over the entries of ``split`` (all entries if None)."""
        chosen = self.entries(split)
        by_shard: dict[str, list[int]] = {}
        for i, e in enumerate(chosen):
            by_shard.setdefault(e.shard, []).append(i)
        rows: list[dict[str, torch.Tensor]] = [{} for _ in chosen]
        for shard, idx in by_shard.items():
            data = self._read_shard(shard)
            for i in idx:
                rows[i] = {f: self._get(data, chosen[i], f) for f in self.fields}
        stacked: dict[str, torch.Tensor] = {}
        for f in self.fields:
            ts = [r[f] for r in rows]
            shapes = {(tuple(t.shape), t.dtype) for t in ts}
            if len(shapes) > 1:
                seen = sorted(map(str, shapes))[:3]
                raise MrisegError(
                    f"field {f!r} differs in shape/dtype across samples ({seen}); cannot stack "
                    "it — read samples one by one with tensors()",
                    self.folder,
                )
            stacked[f] = torch.stack(ts) if ts else torch.empty(0)
        return LoadedCodes(
            fields=stacked,
            ids=[e.id for e in chosen],
            texts=[e.text for e in chosen],
            sizes=[e.size for e in chosen],
            splits=[e.split for e in chosen],
        )

    def stats(self) -> dict[str, Any]:
        """Counts for logs: live entries per split, shards, dead slots, bytes on disk, pending."""
        live = Counter(e.shard for e in self._entries.values() if e.id not in self._removed)
        return {
            "entries": len(self),
            "pending": len(self._pending),
            "splits": dict(
                Counter(e.split for e in self._entries.values() if e.id not in self._removed)
            ),
            "shards": len(self._shards),
            "dead_slots": sum(n - live[s] for s, n in self._shards.items()),
            "bytes": sum(
                (self.folder / s).stat().st_size for s in self._shards if (self.folder / s).exists()
            ),
            "fields": list(self.fields),
            "tokenizer_fingerprint": self.fingerprint,
        }

    # -- files
    def _new_shard_name(self) -> str:
        name = f"shard-{self._next_shard:05d}.safetensors"
        self._next_shard += 1
        return name

    def _write_shard(self, name: str, flat: dict[str, torch.Tensor]) -> None:
        with atomic_path(self.folder / name, overwrite=True) as tmp:
            save_file(flat, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
            _fsync(tmp)
            self._sums[name] = file_fingerprint(tmp)

    def verify_shards(self) -> None:
        """Check every shard the index names: present, a readable safetensors file holding
        its entries' tensors, and (when recorded) the bytes that were written."""
        from safetensors import safe_open

        slots: dict[str, set[str]] = {}
        for e in self._entries.values():
            slots.setdefault(e.shard, set()).update(f"{e.slot}/{f}" for f in self.fields)
        for name in self._shards:
            path = self.folder / name
            if not path.is_file():
                raise MrisegError(
                    f"the cache index names this shard but it is missing; {_REDO}", path
                )
            expected = self._sums.get(name)
            if expected is not None:
                actual = file_fingerprint(path)
                if actual != expected:
                    raise MrisegError(
                        f"corrupt cache shard (its bytes changed since it was written: size-hash "
                        f"{actual[:24]}, the index records {expected[:24]}); {_REDO}", path
                    )  # fmt: skip
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
            except Exception as err:  # SafetensorError, OSError, ...
                raise MrisegError(f"corrupt cache shard ({err}); {_REDO}", path) from err
            lost = sorted(slots.get(name, set()) - keys)
            if lost:
                raise MrisegError(f"corrupt cache shard (no tensor {lost[0]!r}); {_REDO}", path)

    def _write_index(self) -> None:
        index = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer_fingerprint": self.fingerprint,
            "fields": list(self.fields),
            "next_shard": self._next_shard,
            "shards": self._shards,
            "sums": {s: self._sums[s] for s in self._shards if s in self._sums},
            "entries": [e.to_json() for e in self._entries.values()],
        }
        with atomic_path(self.folder / INDEX, overwrite=True) as tmp:
            tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False), encoding="utf-8")
            _fsync(tmp)

    def _prune_shard_table(self) -> None:
        """Forget shards that no entry uses any more (their files go after the index write)."""
        used = {e.shard for e in self._entries.values()}
        self._shards = {s: n for s, n in self._shards.items() if s in used}
        self._sums = {s: v for s, v in self._sums.items() if s in used}

    def _delete_stray_files(self) -> None:
        """Delete shard files the index does not name and temp files of a killed writer."""
        for f in self.folder.iterdir():
            if _SHARD.match(f.name) and f.name not in self._shards:
                f.unlink(missing_ok=True)
            elif f.name.startswith((".shard-", ".index.")) and ".tmp" in f.name:
                f.unlink(missing_ok=True)
            elif _ST_TEMP.match(f.name):  # a shard write killed inside safetensors
                f.unlink(missing_ok=True)

    def _read_shard(self, name: str) -> dict[str, torch.Tensor]:
        path = self.folder / name
        if not path.is_file():
            raise MrisegError(f"the cache index names this shard but it is missing; {_REDO}", path)
        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError, OSError, ...
            raise MrisegError(f"corrupt cache shard ({err}); {_REDO}", path) from err

    def _get(self, data: dict[str, torch.Tensor], e: Entry, f: str) -> torch.Tensor:
        try:
            return data[f"{e.slot}/{f}"]
        except KeyError:
            raise MrisegError(
                f"corrupt cache shard (no tensor {f!r} for sample {e.id!r}); {_REDO}",
                self.folder / e.shard,
            ) from None


def _entry(sid: str, meta: dict[str, Any], shard: str, slot: int) -> Entry:
    size = meta.get("size") or (0, 0)
    extra = {k: v for k, v in meta.items() if k not in _META_KEYS}
    return Entry(
        id=sid, split=str(meta["split"]), image=str(meta.get("image", "")),
        mask=str(meta.get("mask", "")), source_fp=str(meta["source_fp"]),
        size=(int(size[0]), int(size[1])), text=str(meta.get("text", "")),
        shard=shard, slot=slot, extra=json.loads(json.dumps(extra, default=str)),
    )  # fmt: skip


def _replace(e: Entry, **changes: Any) -> Entry:
    d = e.to_json()
    d.update(changes)
    return Entry.from_json(d)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"unreadable cache index ({err}); {_REDO}", path) from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ConfigError(f"not an mriseg code cache index; {_REDO} or choose another --out", path)
    version = index.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(
            f"corrupt cache index (format version must be a whole number >= 1, got {version!r}); {_REDO}",
            path,
        )
    if version > VERSION:
        raise ConfigError(
            f"cache format version {version} is newer than this mriseg reads ({VERSION}); "
            f"upgrade mriseg or {_REDO}", path
        )  # fmt: skip
    entries, shards = index.get("entries"), index.get("shards")
    if not isinstance(entries, list) or not isinstance(shards, dict):
        raise ConfigError(f"corrupt cache index (no entries/shards); {_REDO}", path)
    try:
        unknown = {str(e["shard"]) for e in entries} - set(shards)
        [Entry.from_json(e) for e in entries]
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ConfigError(f"corrupt cache index (bad entry: {err!r}); {_REDO}", path) from err
    if unknown:
        raise ConfigError(f"corrupt cache index (unlisted shards {sorted(unknown)}); {_REDO}", path)
    return index


def open_cache(
    folder: str | Path,
    fingerprint: str | None,
    fields: Sequence[str] | None,
    *,
    create: bool = True,
    overwrite: bool = False,
    flush_every: int = 512,
) -> CodeCache:
    """Open (or with ``create`` start) the cache in ``folder``.

    ``fingerprint`` identifies the tokenizers that made the codes; a cache made with another one
    or with other ``fields`` is refused (None accepts what is there — for readers only).
    ``overwrite`` discards an existing cache first (only its own files are deleted).
    """
    folder = Path(folder)
    if flush_every < 1:
        raise ValueError("flush_every must be >= 1")
    if folder.exists() and not folder.is_dir():
        raise InputError("is a file, expected a cache folder", folder)
    has_index = (folder / INDEX).is_file()
    if overwrite and has_index:
        _discard(folder)
        has_index = False
    if not has_index:
        if not create:
            raise InputError(
                f"no code cache here ({INDEX} missing); run `mriseg tokenize` first", folder
            )
        if fingerprint is None or fields is None:
            raise ValueError("a new cache needs a fingerprint and its fields")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MrisegError(f"cannot create folder ({err.strerror})", folder) from err
        cache = CodeCache(folder, fingerprint, fields, flush_every=flush_every)
        cache._delete_stray_files()  # leftovers of a cache killed before its first index
        return cache
    index = _read_index(folder)
    have_fp = str(index.get("tokenizer_fingerprint"))
    if fingerprint is not None and have_fp != fingerprint:
        raise MrisegError(
            f"this code cache was made with a different tokenizer (fingerprint {have_fp[:12]}, "
            f"now {fingerprint[:12]}); {_REDO}, or choose a different --out", folder
        )  # fmt: skip
    have_fields = [str(f) for f in index.get("fields", [])]
    if fields is not None and sorted(have_fields) != sorted(fields):
        raise MrisegError(
            f"this code cache holds fields {have_fields}, expected {list(fields)}; {_REDO}", folder
        )
    cache = CodeCache(folder, have_fp, have_fields, flush_every=flush_every, index=index)
    if create:
        cache.verify_shards()  # a writer reuses every entry it finds: they must be intact
        cache._delete_stray_files()
    return cache


def _discard(folder: Path) -> None:
    """Delete a cache's own files: the index first, so a crash midway leaves no cache."""
    (folder / INDEX).unlink()
    for f in folder.iterdir():
        if _SHARD.match(f.name):
            f.unlink(missing_ok=True)
