"""Code cache: round trip across shards, incremental passes, crash safety, error cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mrisegcli.errors import ConfigError, InputError, MrisegError
from mrisegcli.tokenizers.cache import (
    CodeCache,
    file_fingerprint,
    open_cache,
    sample_fingerprint,
    state_fingerprint,
)

FIELDS = ("image_codes", "mask_codes", "ms_codes", "text_ids", "emb")
FP = "tok-fingerprint-a"


def make_tensors(i: int, version: int = 0) -> dict[str, torch.Tensor]:
    """Distinct, deterministic tensors per (sample, version), one dtype per field."""
    g = torch.Generator().manual_seed(1000 * version + i)
    return {
        "image_codes": torch.randint(0, 30000, (4, 4), generator=g, dtype=torch.int16),
        "mask_codes": torch.randint(0, 2**20, (4, 4), generator=g, dtype=torch.int32),
        "ms_codes": torch.randint(0, 2**40, (7,), generator=g, dtype=torch.int64),
        "text_ids": torch.randint(0, 500, (5,), generator=g, dtype=torch.int64),
        "emb": torch.randn(3, generator=g).to(torch.bfloat16),
    }


def make_sources(folder: Path, n: int) -> list[dict]:
    """n fake samples with image/mask files on disk; returns their meta dicts."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        img, msk = folder / f"img_{i}.png", folder / f"mask_{i}.png"
        img.write_bytes(bytes([i % 256]) * (50 + i))
        msk.write_bytes(bytes([(7 * i) % 256]) * 40)
        text = f"Unilateral pulmonary infection, case {i}."
        samples.append(
            {
                "id": f"case_{i}",
                "split": "val" if i % 4 == 3 else "train",
                "image": str(img),
                "mask": str(msk),
                "size": (100 + i, 80 + i),
                "text": text,
            }
        )
    return samples


def fp_of(s: dict) -> str:
    return sample_fingerprint(s["image"], s["mask"], s["text"])


def add_sample(cache: CodeCache, i: int, s: dict, version: int = 0) -> None:
    meta = {k: v for k, v in s.items() if k != "id"} | {"source_fp": fp_of(s)}
    cache.add(s["id"], meta, make_tensors(i, version))


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("shard-*.safetensors"))


def check_equal(loaded, samples: list[dict], versions: dict[int, int] | None = None) -> None:
    versions = versions or {}
    assert loaded.ids == [s["id"] for s in samples]
    for row, sid in enumerate(loaded.ids):
        i = int(sid.removeprefix("case_"))  # the number make_tensors was called with
        want = make_tensors(i, versions.get(i, 0))
        for f in FIELDS:
            got = loaded.fields[f][row]
            assert got.dtype == want[f].dtype and torch.equal(got, want[f]), (sid, f)
    assert loaded.texts == [s["text"] for s in samples]
    assert loaded.sizes == [tuple(s["size"]) for s in samples]


@pytest.fixture
def built(tmp_path):
    """10 samples cached with 4 entries per shard (3 shards)."""
    samples = make_sources(tmp_path / "data", 10)
    folder = tmp_path / "cache"
    with open_cache(folder, FP, FIELDS, flush_every=4) as cache:
        for i, s in enumerate(samples):
            add_sample(cache, i, s)
    return folder, samples


def test_round_trip_across_shards(built):
    folder, samples = built
    assert shard_files(folder) == [f"shard-0000{k}.safetensors" for k in range(3)]
    cache = open_cache(folder, FP, FIELDS, create=False)
    check_equal(cache.load(), samples)
    train = [s for s in samples if s["split"] == "train"]
    check_equal(cache.load("train"), train)
    check_equal(cache.load("val"), [s for s in samples if s["split"] == "val"])
    assert cache.load("train").fields["image_codes"].shape == (len(train), 4, 4)
    e = cache.entries("val")[0]
    assert (e.id, e.image, e.size, e.source_fp) == (
        "case_3",
        samples[3]["image"],
        (103, 83),
        fp_of(samples[3]),
    )
    st = cache.stats()
    assert st["entries"] == 10 and st["shards"] == 3 and st["splits"] == {"train": 8, "val": 2}
    assert st["dead_slots"] == 0 and st["bytes"] > 0
    index = json.loads((folder / "index.json").read_text())
    assert index["tokenizer_fingerprint"] == FP and index["fields"] == list(FIELDS)


def test_second_pass_does_no_work(built):
    folder, samples = built
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with open_cache(folder, FP, FIELDS) as cache:
        assert not any(cache.needs(s["id"], fp_of(s)) for s in samples)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_changed_source_is_redone_and_replaced(built):
    folder, samples = built
    img = Path(samples[5]["image"])
    data = img.read_bytes()
    img.write_bytes(bytes([255]) + data[1:])  # same size, new content
    cache = open_cache(folder, FP, FIELDS, flush_every=4)
    assert [s["id"] for s in samples if cache.needs(s["id"], fp_of(s))] == ["case_5"]
    add_sample(cache, 5, samples[5], version=1)
    assert not cache.needs("case_5", fp_of(samples[5]))
    cache.flush()
    again = open_cache(folder, FP, FIELDS, create=False)
    check_equal(again.load(), samples, versions={5: 1})  # same order, new data
    assert again.entries()[5].source_fp == fp_of(samples[5])
    assert again.stats()["dead_slots"] == 1


def test_sparse_shards_are_compacted(built):
    folder, samples = built
    cache = open_cache(folder, FP, FIELDS, flush_every=4)
    for i in (0, 1, 2):  # 3 of the 4 entries of shard-00000
        add_sample(cache, i, samples[i], version=2)
    cache.flush()
    assert "shard-00000.safetensors" not in shard_files(folder)
    assert cache.stats()["dead_slots"] == 0
    assert shard_files(folder) == sorted(json.loads((folder / "index.json").read_text())["shards"])
    check_equal(open_cache(folder, FP, FIELDS).load(), samples, versions={0: 2, 1: 2, 2: 2})


def test_remove(built):
    folder, samples = built
    cache = open_cache(folder, FP, FIELDS)
    cache.remove("case_0")
    assert "case_0" not in cache and cache.needs("case_0", fp_of(samples[0]))
    cache.flush()
    check_equal(open_cache(folder, FP, FIELDS).load(), samples[1:])


def test_crash_without_flush_resumes(tmp_path):
    samples = make_sources(tmp_path / "data", 7)
    folder = tmp_path / "cache"

    def run(stop_at: int | None) -> None:
        cache = open_cache(folder, FP, FIELDS, flush_every=4)
        for i, s in enumerate(samples):
            if i == stop_at:
                raise RuntimeError("crash")
            if cache.needs(s["id"], fp_of(s)):
                add_sample(cache, i, s)
        cache.flush()

    with pytest.raises(RuntimeError):
        run(stop_at=6)  # 4 flushed, 2 pending lost
    cache = open_cache(folder, FP, FIELDS, create=False)
    check_equal(cache.load(), samples[:4])
    assert [s["id"] for s in samples if cache.needs(s["id"], fp_of(s))] == [
        "case_4", "case_5", "case_6"
    ]  # fmt: skip
    run(stop_at=None)
    check_equal(open_cache(folder, FP, FIELDS).load(), samples)


def test_exception_in_with_block_keeps_added(tmp_path):
    samples = make_sources(tmp_path / "data", 3)
    folder = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt), open_cache(folder, FP, FIELDS) as cache:
        add_sample(cache, 0, samples[0])
        add_sample(cache, 1, samples[1])
        raise KeyboardInterrupt
    check_equal(open_cache(folder, FP, FIELDS).load(), samples[:2])


def test_crash_between_shard_and_index(built, monkeypatch):
    folder, samples = built
    more = make_sources(folder.parent / "more", 12)[10:]
    cache = open_cache(folder, FP, FIELDS, flush_every=4)

    def boom(self) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(CodeCache, "_write_index", boom)
    add_sample(cache, 10, more[0])
    with pytest.raises(OSError):
        cache.flush()
    assert len(shard_files(folder)) == 4  # orphan shard written, index not
    assert cache.stats()["shards"] == 3 and cache.stats()["pending"] == 1  # rolled back
    monkeypatch.undo()
    reopened = open_cache(folder, FP, FIELDS, flush_every=4)
    assert len(shard_files(folder)) == 3  # orphan removed
    check_equal(reopened.load(), samples)
    assert reopened.needs(more[0]["id"], fp_of(more[0]))
    cache.flush()  # the first handle retries its pending sample
    check_equal(open_cache(folder, FP, FIELDS).load(), samples + more[:1])


KILL_CHILD = """
import sys, torch
from mrisegcli.tokenizers.cache import open_cache
cache = open_cache(sys.argv[1], "fp", ["a", "b"], flush_every=2)
for i in range(100000):
    a = torch.arange(64, dtype=torch.int32) + i
    cache.add(f"s{i}", {"split": "train", "source_fp": str(i)}, {"a": a, "b": a.to(torch.int16)})
"""


def test_killed_writer_leaves_consistent_cache(tmp_path):
    folder = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(folder)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(shard_files(folder)) < 6:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    cache = open_cache(folder, "fp", ["a", "b"], flush_every=2)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # temp files removed
    assert shard_files(folder) == sorted({e.shard for e in cache.entries()})
    loaded = cache.load()
    n = len(loaded)
    assert n >= 20 and loaded.ids == [f"s{i}" for i in range(n)]
    want = torch.arange(64, dtype=torch.int32)[None] + torch.arange(n, dtype=torch.int32)[:, None]
    assert torch.equal(loaded.fields["a"], want) and torch.equal(loaded.fields["b"], want.short())
    assert cache.needs(f"s{n}", str(n)) and not cache.needs("s0", "0")


def test_temp_files_of_a_killed_shard_write_are_removed_on_open(built):
    """A writer killed inside safetensors' own save leaves its ``.tmpXXXXXX`` file (and one
    killed in our atomic write ``.shard-N.*.tmp...``); opening the cache removes both, and a
    run folder holding them is still recognised as a run's own."""
    from mrisegcli.runinfo import foreign_entry

    folder, samples = built
    for name in (".tmpAb12Cd", ".shard-00009.x1y2.tmp.safetensors"):
        (folder / name).write_bytes(b"partial")
    run = folder.parent / "run"  # a run folder whose saves were all killed inside safetensors
    for sub in ("cache", "checkpoints", "."):
        (run / sub).mkdir(parents=True, exist_ok=True)
        (run / sub / ".tmpXy12Ab").write_bytes(b"partial")
    assert foreign_entry(run) is None
    (run / "cache" / "notes.txt").write_bytes(b"")
    assert foreign_entry(run) == "cache/notes.txt"
    (folder / "notes.tmpAb12Cd").write_bytes(b"")  # not a temp name of ours: left alone
    open_cache(folder, FP, FIELDS).load()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert (folder / "notes.tmpAb12Cd").exists()


def test_corrupt_or_missing_shard(built):
    folder, _ = built
    shard = folder / "shard-00001.safetensors"
    data = shard.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "bad header": b"\xff" * 8 + data[8:],
        "garbage json": data[:8] + b"{" * (len(data) - 8),
    }
    for case, payload in cases.items():
        shard.write_bytes(payload)
        with pytest.raises(MrisegError, match="--overwrite") as err:
            open_cache(folder, FP, FIELDS).load()
        assert str(err.value).startswith(str(shard)), case
        assert "\n" not in str(err.value)
    shard.unlink()
    with pytest.raises(MrisegError, match="missing") as err:
        open_cache(folder, FP, FIELDS, create=False).load("train")
    assert str(err.value).startswith(str(shard))


def test_corrupt_index(built):
    folder, _ = built
    index = folder / "index.json"
    index.write_text(index.read_text()[:100])
    with pytest.raises(ConfigError, match="--overwrite") as err:
        open_cache(folder, FP, FIELDS)
    assert str(err.value).startswith(str(index))


def test_other_fingerprint_is_refused_then_overwritten(built):
    folder, samples = built
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(MrisegError, match="different tokenizer.*--overwrite.*--out"):
        open_cache(folder, "tok-fingerprint-b", FIELDS)
    with pytest.raises(MrisegError, match="fields"):
        open_cache(folder, FP, ["image_codes"])
    cache = open_cache(folder, "tok-fingerprint-b", FIELDS, overwrite=True)
    assert len(cache) == 0 and shard_files(folder) == [] and not (folder / "index.json").exists()
    assert (folder / "notes.txt").read_text() == "keep me"
    assert all(cache.needs(s["id"], fp_of(s)) for s in samples)


def test_newer_format_version_is_refused(built):
    folder, _ = built
    index = json.loads((folder / "index.json").read_text())
    index["version"] = 99
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="newer"):
        open_cache(folder, FP, FIELDS)


def test_open_errors(tmp_path):
    with pytest.raises(InputError, match="tokenize"):
        open_cache(tmp_path / "none", FP, FIELDS, create=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError):
        open_cache(f, FP, FIELDS)
    cache = open_cache(tmp_path / "c", FP, ["a"])
    with pytest.raises(ValueError):
        cache.add("x", {"split": "train", "source_fp": "1"}, {"b": torch.zeros(1)})


def test_unstackable_field_is_a_clear_error(tmp_path):
    cache = open_cache(tmp_path, FP, ["t"])
    for n in (3, 4):
        cache.add(f"s{n}", {"split": "train", "source_fp": "x"}, {"t": torch.zeros(n)})
    with pytest.raises(MrisegError, match="cannot stack"):
        cache.load()
    assert cache.tensors("s4")["t"].shape == (4,)


def test_file_fingerprint(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"abcdef" * 1000)
    fp = file_fingerprint(a)
    os.utime(a, ns=(1, 1))
    assert file_fingerprint(a) == fp  # mtime alone does not count
    a.write_bytes(b"abcdeF" * 1000)
    os.utime(a, ns=(1, 1))
    assert file_fingerprint(a) != fp  # same size and mtime, new content
    with pytest.raises(InputError):
        file_fingerprint(tmp_path / "missing.png")


def test_state_fingerprint():
    w = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2)}
    fp = state_fingerprint(w, {"codebook": 512})
    assert fp == state_fingerprint({k: v.clone() for k, v in w.items()}, {"codebook": 512})
    assert fp != state_fingerprint(w, {"codebook": 256})
    w2 = dict(w, w=w["w"].clone())
    w2["w"][1, 2] += 1e-3
    assert fp != state_fingerprint(w2, {"codebook": 512})
    assert fp != state_fingerprint(dict(w, w=w["w"].reshape(3, 2)), {"codebook": 512})
