"""A model's presence head and scope, fitted on its data: ``mriseg calibrate`` and the last
stage of ``mriseg train``.

* :func:`fit_calibration` reads the train rows (with the rewordings training used) and the val
  rows of a dataset, computes the frozen model's presence features of every row
  (:func:`mrisegcli.presence.presence_features`), fits the presence head when the train rows
  hold both empty and non-empty masks (:func:`mrisegcli.presence.fit_presence`: calibrated and
  thresholded on val), and builds the scope (:func:`mrisegcli.scope.build_scope`).
* :func:`record_calibration` writes both into a run folder (``presence.safetensors``,
  ``config.json`` ``"presence"`` and ``"scope"``).
* :func:`calibrate_run` does both for ``mriseg calibrate``: the source run is copied to a new
  folder and never changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrisegcli import runfolder
from mrisegcli.errors import MrisegError
from mrisegcli.presence import PresenceFit, fit_presence, presence_config, save_presence
from mrisegcli.runinfo import read_config, rewrite_config
from mrisegcli.scope import build_scope
from mrisegcli.workflow.prepare import StageFactory, no_stage, open_dataset
from mrisegcli.workflow.segmenter import Segmenter, load_segmenter


@dataclass
class Calibration:
    fit: PresenceFit | None  # None when the data has no empty (or no non-empty) train rows
    scope: dict[str, Any]
    note: str = ""


def refresh_synonyms(seg: Segmenter, texts: list[str]) -> dict[str, Any]:
    """Give ``seg``'s text tokenizer today's synonym rules of its domain when they read every
    training text exactly as the rules it was trained with (so the model sees the same tokens
    for what it learnt, and folds the new wordings onto them) -> what was done."""
    from mrisegcli.data.paraphrase import synonym_domain
    from mrisegcli.tokenizers.text import with_synonym_rules

    old = seg.bundle.text
    domain = synonym_domain(texts)
    new = with_synonym_rules(old, domain)
    if new.backend_tokenizer.to_str() == old.backend_tokenizer.to_str():
        return {"refreshed": False, "domain": domain, "reason": "the rules are today's"}
    before = old.backend_tokenizer.normalizer.normalize_str
    after = new.backend_tokenizer.normalizer.normalize_str
    differ = sum(before(t) != after(t) for t in texts)
    if differ:
        return {
            "refreshed": False,
            "domain": domain,
            "reason": f"today's rules read {differ} training texts differently",
        }
    seg.set_text_tokenizer(new)
    return {"refreshed": True, "domain": domain, "texts_checked": len(texts)}


def features_and_labels(
    seg: Segmenter,
    cases: list,
    stage: StageFactory,
    what: str,
    batch: int = 64,
    *,
    stop_at: float | None = None,
    min_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, F) presence features and (M,) bool "the mask is not empty" of ``cases`` (``stop_at``,
    a ``time.perf_counter()`` value: the first M rows whose batches began before it, at least
    ``min_rows``)."""
    from mrisegcli.data.loading import load_split_arrays
    from mrisegcli.presence import presence_features

    feats, labels = [], []
    seg.model.eval()
    with stage(f"presence features of {len(cases)} {what} rows", len(cases)) as progress:
        for s in range(0, len(cases), batch):
            if stop_at is not None and s >= min_rows and time.perf_counter() >= stop_at:
                break
            part = cases[s : s + batch]
            images, masks = load_split_arrays(part, seg.image_size)
            image = torch.from_numpy(images)[:, None].to(seg.device)
            x = seg.impl.model_input(seg.model, seg.bundle, image)
            ids, tmask = seg.encode_text([c.text for c in part])
            feats.append(presence_features(seg.impl, seg.model, x, ids, seg.hide_text(tmask)).cpu())
            labels.append(torch.from_numpy(masks.reshape(len(part), -1).any(1)))
            if progress is not None:
                progress(min(s + batch, len(cases)), len(cases))
    return torch.cat(feats), torch.cat(labels)


#: with a time budget, the fewest train rows the presence head is fitted on (when fewer fit
#: in the time left, the budget is overrun rather than the head starved)
MIN_BUDGET_ROWS = 1000
#: seconds kept for the head's own fit (1,500 small steps: 8 s on a 2-core CPU) when the train
#: rows' feature pass stops at a deadline
HEAD_FIT_SECONDS = 15.0


def fit_calibration(
    seg: Segmenter,
    ds: Any,
    *,
    steps: int = 1500,
    max_cases: int | None = 16000,
    seed: int = 0,
    stage: StageFactory = no_stage,
    deadline: float | None = None,
    train_has_empty: bool | None = None,
) -> Calibration:
    """Presence head (when the data allow one) and scope of ``seg`` from dataset ``ds`` (its
    train rows with their rewordings, its val rows for calibration and the threshold).

    ``deadline`` (a ``time.perf_counter()`` value; ``mriseg train --max-minutes``): the val
    rows' features are computed first, then those of the train rows in a random order until
    the time left is what the head's fit needs (at least ``MIN_BUDGET_ROWS`` rows).
    ``train_has_empty`` False (known from the training masks) skips the feature pass."""
    train, val = ds.split("train"), ds.split("val")
    originals = [s for s in train if "~p" not in s.id]
    norm = seg.normalize
    scope = build_scope(
        [s.text for s in originals],
        [s.target for s in originals],
        norm,
        extra_texts=[s.text for s in train if "~p" in s.id],
    )
    no_empty = "no presence head: every train row has a region (or none has)"
    if not train or not val or max_cases == 0:
        return Calibration(None, scope, "no presence head: the data has no train or no val rows")
    if train_has_empty is False:
        return Calibration(None, scope, no_empty)
    x_va, y_va = features_and_labels(seg, val, stage, "val")
    rng = np.random.default_rng(seed)
    stop_at = None
    if deadline is not None:  # any first rows of a shuffled order are a random draw
        train = [train[i] for i in rng.permutation(len(train))[: max_cases or None]]
        stop_at = deadline - HEAD_FIT_SECONDS
    elif max_cases is not None and len(train) > max_cases:
        train = [train[i] for i in sorted(rng.choice(len(train), max_cases, replace=False))]
    x_tr, y_tr = features_and_labels(
        seg, train, stage, "train", stop_at=stop_at, min_rows=MIN_BUDGET_ROWS
    )
    if bool(y_tr.all()) or not bool(y_tr.any()):
        return Calibration(None, scope, no_empty)
    with stage(f"fitting the presence head ({int((~y_tr).sum())} empty rows)", steps) as progress:
        fit = fit_presence(x_tr, y_tr, x_va, y_va, steps=steps, seed=seed, progress=progress)
    fit.report["train_rows"] = len(y_tr)
    fit.report["val_rows"] = len(val)
    if len(y_tr) < len(train):
        fit.report["train_rows_limited_by"] = "time budget"
    return Calibration(fit, scope)


def _save_text_tokenizer(seg: Segmenter, folder: Path) -> None:
    """Write ``seg``'s text tokenizer into run ``folder`` and record its new fingerprints."""
    from mrisegcli.tokenizers.text import save_text_tokenizer
    from mrisegcli.workflow.bundle import file_fingerprints

    for name in runfolder.TEXT_TOKENIZER_FILES + (runfolder.SPECIAL_TOKENS_MAP,):
        (folder / name).unlink(missing_ok=True)
    save_text_tokenizer(seg.bundle.text, folder, overwrite=True)
    config = read_config(folder)
    files = config.get("tokenizers", {}).get("files")
    if isinstance(files, dict):
        fresh = file_fingerprints(folder)
        for name in runfolder.TEXT_TOKENIZER_FILES:
            if name in fresh:
                files[name] = fresh[name]
    rewrite_config(folder, config)


def record_calibration(
    run_dir: Path,
    cal: Calibration,
    extra: dict[str, Any] | None = None,
    *,
    keep_presence: bool = False,
    postprocess: dict[str, Any] | None = None,
) -> None:
    """Write the presence head and the scope into ``run_dir`` (config.json updated);
    ``keep_presence`` leaves the folder's presence head as it is and writes the scope only;
    ``postprocess``: the component rule of the model's volumes
    (:func:`mrisegcli.workflow.volume_eval.component_rule`), recorded too."""
    from mrisegcli.postprocess import SECTION

    config = read_config(run_dir)
    if keep_presence:
        if extra and isinstance(config.get("presence"), dict):
            config["presence"]["scope_refresh"] = extra
    elif cal.fit is not None:
        save_presence(cal.fit.head, run_dir)
        config["presence"] = {**presence_config(cal.fit), **(extra or {})}
    else:
        config.pop("presence", None)
        (run_dir / runfolder.PRESENCE).unlink(missing_ok=True)
    config["scope"] = cal.scope
    if postprocess is not None:
        config[SECTION] = postprocess
    rewrite_config(run_dir, config)


def use_presence(seg: Segmenter, cal: Calibration) -> None:
    """Let ``seg`` answer with the presence head ``cal`` fitted (when it fitted one)."""
    if cal.fit is not None:
        seg.presence_head = cal.fit.head.to(seg.device).eval()
        seg.presence_threshold = cal.fit.threshold


def _write_run(
    run_dir: Path,
    out: Path,
    seg: Segmenter,
    cal: Calibration,
    extra: dict[str, Any],
    *,
    scope_only: bool,
    overwrite: bool,
    postprocess: dict[str, Any] | None = None,
) -> None:
    """The run with the calibration (and a refreshed text tokenizer, the component rule of
    its volumes), written to ``out``."""
    from mrisegcli.workflow.draft_heads import write_derived_run

    def fill(tmp: Path) -> None:
        if extra["synonyms"]["refreshed"]:
            _save_text_tokenizer(seg, tmp)
        record_calibration(tmp, cal, extra, keep_presence=scope_only, postprocess=postprocess)

    write_derived_run(run_dir, out, fill, overwrite=overwrite, tag="calibrate")


def calibrate_run(
    run_dir: Path,
    data: list[Path],
    out: Path,
    *,
    steps: int = 1500,
    max_cases: int | None = 16000,
    seed: int = 0,
    device: torch.device | None = None,
    overwrite: bool = False,
    command: str | None = None,
    source: str | None = None,
    stage: StageFactory = no_stage,
    scope_only: bool = False,
    volumes: Path | None = None,
) -> dict[str, Any]:
    """Fit the presence head and scope of the model in ``run_dir`` on ``data`` and write the
    model with them to ``out`` (a new folder) -> the report (also in out's config.json).
    ``scope_only``: keep the model's presence head; refresh its synonym rules and scope only
    (after the rules have learnt new wordings). ``volumes``: an nnU-Net folder of labelled
    validation volumes on which the component rule of :mod:`mrisegcli.postprocess` is chosen
    (with the new presence head)."""
    from mrisegcli.data.paraphrase import add_paraphrases
    from mrisegcli.workflow.draft_heads import check_derived_out

    run_dir, out = Path(run_dir), Path(out)
    check_derived_out(out, run_dir, overwrite)
    t0 = time.perf_counter()
    seg = load_segmenter(run_dir, device or torch.device("cpu"))
    ds = open_dataset([Path(d) for d in data], None, seed=seed, check=False)
    ds = add_paraphrases(ds, seg.cfg.paraphrases, seg.cfg.seed)
    synonyms = refresh_synonyms(seg, sorted({s.text for s in ds.split("train")}))
    if scope_only:
        if seg.presence_head is None:
            raise MrisegError("has no presence head to keep (run without --scope-only)", run_dir)
        cal = fit_calibration(seg, ds, max_cases=0, seed=seed, stage=stage)
    else:
        cal = fit_calibration(seg, ds, steps=steps, max_cases=max_cases, seed=seed, stage=stage)
        if cal.fit is None:
            raise MrisegError(cal.note, data[0])
    extra = {
        "synonyms": synonyms,
        "data": [str(d) for d in data],
        "seed": seed,
        "source": source or str(run_dir),
        "command": command,
        "seconds": time.perf_counter() - t0,
    }
    postprocess = None
    if volumes is not None:
        from mrisegcli.workflow.volume_eval import fit_component_rule

        if not scope_only:  # the volumes answered with the new head
            use_presence(seg, cal)
        postprocess = fit_component_rule(seg, Path(volumes), stage=stage)
        extra["seconds"] = time.perf_counter() - t0
    _write_run(run_dir, out, seg, cal, extra, scope_only=scope_only, overwrite=overwrite,
               postprocess=postprocess)  # fmt: skip
    report = read_config(out)["presence"] if scope_only else presence_config(cal.fit)
    report = {**report, **extra, "targets": len(cal.scope["targets"])}
    return report if postprocess is None else {**report, "postprocess": postprocess}


__all__ = [
    "Calibration",
    "calibrate_run",
    "features_and_labels",
    "fit_calibration",
    "record_calibration",
    "use_presence",
]
