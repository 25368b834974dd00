"""``mriseg draft-heads``: refit a next-token model's drafting heads to its own greedy decoding.

Reads the train split of ``--data`` (fitting) and its val split (selection; without one, the
dataset loader carves it from train, as for training), fits the heads (:mod:`mrisegcli.training.draft_heads`) and
writes a new run folder: the source run's files, the new weights and a config.json whose
``model.nktp_k`` is the new head count and whose ``draft_heads`` entry records what was done.
The source folder is never changed. Before anything is written, speculative decoding with the
new heads is checked to give the plain greedy codes on the selection cases.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrisegcli import runfolder
from mrisegcli.errors import MrisegError
from mrisegcli.runinfo import read_config, rewrite_config
from mrisegcli.weights import weights_header
from mrisegcli.workflow.prepare import StageFactory, no_stage, open_dataset
from mrisegcli.workflow.segmenter import Segmenter, load_segmenter, save_model

#: files of a run folder that are not carried over (training state, caches, locks)
_SKIP = {runfolder.CHECKPOINTS, runfolder.CACHE, runfolder.LOCK}


def _batches(seg: Segmenter, cases: list, batch: int, stage: StageFactory, what: str):
    """(model input, text ids, text mask) per batch of ``cases``, read as needed."""
    from mrisegcli.data.loading import load_split_arrays

    with stage(f"decoding {len(cases)} {what} cases", len(cases)) as progress:
        for s in range(0, len(cases), batch):
            part = cases[s : s + batch]
            images, _ = load_split_arrays(part, seg.image_size)
            x = seg.image_input(torch.from_numpy(images)[:, None].to(seg.device))
            ids, tmask = seg.encode_text([c.text for c in part])
            yield x, ids.to(seg.device), tmask.to(seg.device)
            progress(min(s + batch, len(cases)), len(cases))


def check_derived_out(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is, holds or lies inside the source run, and with ``overwrite``
    one that is not a run folder (the files of a run, or of an earlier draft-heads or
    calibrate, only)."""
    real, src = out.resolve(), source.resolve()
    if real == src:
        raise MrisegError("is the source run: write the new model to another folder", out)
    if real in src.parents:
        raise MrisegError(
            f"holds the source run {source}; replacing it would delete that run: write the new "
            "model to another folder",
            out,
        )
    if src in real.parents:
        raise MrisegError(
            f"is inside the source run {source}, which draft-heads leaves as it is: write the "
            "new model to another folder",
            out,
        )
    if out.exists() and not out.is_dir():
        raise MrisegError("exists and is not a folder", out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MrisegError("exists and is not empty (pass --overwrite to replace it)", out)
        foreign = _foreign(out)
        if foreign is not None:
            raise MrisegError(
                f"not a mriseg run folder: it holds {foreign}, which draft-heads does not write; "
                "refusing to --overwrite it (choose another --out, or move that away)",
                out,
            )


def _foreign(out: Path) -> str | None:
    """What in ``out`` is not a run's (None: a run folder, or an earlier draft-heads output:
    the plain files of a run with a config.json that records ``draft_heads``)."""
    from mrisegcli.runinfo import foreign_entry

    foreign = foreign_entry(out)
    if foreign is None:
        return None
    try:
        config = read_config(out)
    except MrisegError:
        return foreign
    if "draft_heads" not in config and "presence" not in config:
        return foreign
    for p in sorted(out.iterdir()):
        if p.is_symlink() or not p.is_file():
            return p.name + ("/" if p.is_dir() else " (a symlink)" if p.is_symlink() else "")
    return None


def _same_codes(seg: Segmenter, batches: list[tuple[torch.Tensor, ...]]) -> tuple[bool, float]:
    """Speculative (batch 1) against plain greedy codes on ``batches``; passes per mask."""
    from mrisegcli.decode.next_token import generate_masks, generate_masks_speculative

    model, same, passes, n = seg.model, True, 0.0, 0
    with torch.no_grad():
        for x, ids, tmask in batches:
            plain = generate_masks(model, x, ids, tmask)
            for i in range(x.shape[0]):
                stats: dict[str, float] = {}
                fast = generate_masks_speculative(
                    model, x[i : i + 1], ids[i : i + 1], tmask[i : i + 1], stats=stats
                )
                same &= bool(torch.equal(fast, plain[i : i + 1]))
                passes += stats["passes"]
                n += 1
    return same, passes / max(n, 1)


def refit_draft_heads(
    run_dir: Path,
    data: list[Path],
    out: Path,
    *,
    heads: int,
    steps: int = 1500,
    max_cases: int | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    overwrite: bool = False,
    command: str | None = None,
    source: str | None = None,
    stage: StageFactory = no_stage,
) -> dict[str, Any]:
    """Fit ``heads`` - 1 drafting heads of the next-token model in ``run_dir`` on the train split
    of ``data`` and write the model to ``out`` -> the report (also in out's config.json).
    ``source`` and ``command`` are recorded as given (the model's name, the command line)."""
    from mrisegcli.training.draft_heads import collect_states, fit_draft_heads

    run_dir, out = Path(run_dir), Path(out)
    check_derived_out(out, run_dir, overwrite)
    if heads < 2:
        raise MrisegError(f"--heads must be at least 2 (the main head and one draft), got {heads}")
    t0 = time.perf_counter()
    seg = load_segmenter(run_dir, device or torch.device("cpu"))
    if not seg.impl.drafts:
        raise MrisegError(
            f"draft heads are for next-token models (this one is {seg.paradigm})", run_dir
        )
    # a dataset without a val split gets one carved from train by the loader (carve_val)
    ds = open_dataset([Path(d) for d in data], None, seed=seed, check=False)
    train, val = ds.split("train"), ds.split("val")[:512]
    if not train or not val:
        raise MrisegError(
            f"need train and val cases to fit and select draft heads (the dataset has {ds.splits()})",
            data[0],
        )
    if max_cases is not None and len(train) > max_cases:
        rng = np.random.default_rng(seed)
        train = [train[i] for i in sorted(rng.choice(len(train), max_cases, replace=False))]
    batch = min(32, seg.batch_size)
    seg.model.eval()
    tr = collect_states(seg.model, _batches(seg, train, batch, stage, "train"))
    check: list[tuple[torch.Tensor, ...]] = []  # the val batches, kept for the final check

    def kept(batches):
        for b in batches:
            check.append(b)
            yield b

    va = collect_states(seg.model, kept(_batches(seg, val, batch, stage, "val")))
    with stage(f"fitting {heads - 1} draft heads", steps) as progress:
        report = fit_draft_heads(
            seg.model, tr, va, k=heads, steps=steps, seed=seed, progress=progress
        )
    with stage("checking speculative codes against greedy", None):
        same, passes = _same_codes(seg, check[:2])
    if not same:
        raise MrisegError(
            "speculative decoding with the new heads changed the greedy codes (nothing written)",
            run_dir,
        )
    result = {
        **report.to_json(),
        "identical_codes_checked": sum(int(b[0].shape[0]) for b in check[:2]),
        "check_passes_per_mask": passes,
        "data": [str(d) for d in data],
        "seed": seed,
        "source": source or str(run_dir),
        "command": command,
        "total_seconds": time.perf_counter() - t0,
    }
    _write_run(run_dir, out, seg, result, overwrite)
    return result


def _write_run(
    run_dir: Path, out: Path, seg: Segmenter, report: dict[str, Any], overwrite: bool
) -> None:
    """The run with the new heads' weights and config, written to ``out``."""

    def fill(tmp: Path) -> None:
        config = read_config(run_dir)
        config["model"]["nktp_k"] = report["k"]
        config["run"]["strategies"]["nktp_k"] = report["k"]
        config["draft_heads"] = report
        config.pop("weights", None)  # the source's: save_model records the new file's
        rewrite_config(tmp, config)
        # the tensors the source stored (a shipped model leaves training-only buffers out), and
        # the new heads
        stored = set(weights_header(run_dir / runfolder.MODEL))
        save_model(seg.model, tmp, keep=lambda k: k in stored or k.startswith("nktp."))

    write_derived_run(
        run_dir, out, fill, overwrite=overwrite, tag="draft-heads", skip={runfolder.MODEL}
    )


def write_derived_run(
    run_dir: Path,
    out: Path,
    fill: Any,
    *,
    overwrite: bool,
    tag: str,
    skip: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Copy run ``run_dir`` (its plain files but ``skip``, checkpoints, caches and locks) to a
    temporary sibling of ``out``, let ``fill(tmp)`` write what is new, check ``out`` again and
    move the copy into place: an interrupted write leaves ``out`` as it was."""
    tmp = out.with_name(f".{out.name}.tmp-{tag}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for p in run_dir.iterdir():
            if p.name in _SKIP or p.name in skip or p.name.startswith("."):
                continue
            if p.is_file():
                shutil.copy2(p, tmp / p.name)
        fill(tmp)
        check_derived_out(out, run_dir, overwrite)  # again: it may have changed meanwhile
        old = None
        if out.is_dir():
            old = out.with_name(f".{out.name}.old-{tag}")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
