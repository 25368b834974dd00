"""``mriseg train`` as a library call: raw data -> tokenizers -> code cache -> transformer.

Every stage reuses what exists (tokenizers in the run or given by ``tokenizer_dir``, cache
entries that are up to date), so a second run, or ``--resume`` after a crash, does only the
work that is left. Under torchrun, rank 0 prepares tokenizers and cache while the others wait.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mrisegcli.config import RunConfig, from_dict, to_dict
from mrisegcli.errors import MrisegError
from mrisegcli.io.atomic import atomic_write_text
from mrisegcli.runinfo import read_config, write_config
from mrisegcli.training.distributed import DistInfo, barrier
from mrisegcli.training.loop import train
from mrisegcli.workflow.bundle import load_bundle, needed_tokenizers
from mrisegcli.workflow.prepare import (
    StageFactory,
    _no_stage,
    build_cache,
    load_cached_split,
    obtain_bundle,
    open_dataset,
)
from mrisegcli.workflow.segmenter import (
    Segmenter,
    build_model,
    model_config,
    model_config_from_dict,
    save_model,
    training_tensors,
)

MAX_VAL = 256  # validation cases decoded at each evaluation
#: with --max-minutes, the share of the budget the tokenizers may take to fit (together)
TOKENIZER_SHARE = 0.15


@dataclass
class TrainResult:
    run_dir: Path
    best_val_dice: float | None
    best_step: int
    steps: int
    train_seconds: float
    tokenizer_reports: dict[str, dict]
    cache: dict[str, Any]
    curves: Path | None = None  # RUN/progress.png: training loss and validation Dice over steps


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into an existing one unless told how."""
    if resume:
        if not (run_dir / "config.json").is_file():
            raise MrisegError("--resume needs an existing run folder with config.json", run_dir)
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise MrisegError("exists and is not a folder", run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise MrisegError("run folder is not empty (use --resume to continue it or --overwrite)", run_dir)


def _clear_run(run_dir: Path) -> None:
    """Remove what a previous run left (only mriseg's own files) before a fresh --overwrite run."""
    import shutil

    for name in ("model.safetensors", "train_log.jsonl", "metrics.json", "config.json"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def fit_text_len(cfg: RunConfig, bundle: Any, ds: Any, stage: StageFactory = _no_stage) -> RunConfig:
    """The run's text context, lengthened (to a multiple of 8) when a text of the dataset has
    more tokens than ``cfg.text_len``: no prompt is ever cut in training."""
    from dataclasses import replace

    from mrisegcli.tokenizers.text import longest_text

    longest = longest_text(bundle.text, [s.text for s in ds.samples])
    if longest <= cfg.text_len:
        return cfg
    new = -(-longest // 8) * 8
    with stage(f"text context {cfg.text_len} -> {new} tokens (the longest text has {longest})", None):
        pass
    return replace(cfg, text_len=new)


def val_dice_fn(segmenter: Segmenter, val: dict[str, torch.Tensor], batch: int = 64):
    """A closure for the loop: greedy decoding of the validation cases, Dice at model size."""
    from mrisegcli.metrics import dice_iou_batch

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        segmenter.model = model
        dices = []
        n = val["mask"].shape[0]
        for s in range(0, n, batch):
            img = val["image"][s : s + batch].float().div(255)[:, None].to(segmenter.device)
            ids = val["text_ids"][s : s + batch].long().to(segmenter.device)
            tm = val["text_mask"][s : s + batch].bool().to(segmenter.device)
            prob = segmenter.predict_tensors(img, ids, tm).prob
            d, _ = dice_iou_batch(prob.cpu() > 0.5, val["mask"][s : s + batch].bool())
            dices.append(d)
        return {"dice": float(torch.cat(dices).mean())}

    return evaluate


def train_run(
    data_root: Path,
    run_dir: Path,
    cfg: RunConfig,
    *,
    layout: str | None = None,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    tokenizer_dir: Path | None = None,
    cache_dir: Path | None = None,
    workers: int = 0,
    stage: StageFactory = _no_stage,
    train_progress: Any = None,
    dist_info: DistInfo = DistInfo(),
    command: str = "",
) -> TrainResult:
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    if dist_info.is_main:
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        saved = read_config(run_dir)
        cfg = from_dict(RunConfig, saved["run"], "config.run")
    elif overwrite and dist_info.is_main and run_dir.is_dir():
        _clear_run(run_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else run_dir / "cache"
    torch.manual_seed(cfg.seed)

    from mrisegcli.data.paraphrase import add_paraphrases

    roots = [Path(r) for r in data_root] if isinstance(data_root, (list, tuple)) else [Path(data_root)]
    ds = open_dataset(roots, layout, seed=cfg.seed, check=dist_info.is_main and not resume)
    ds = add_paraphrases(ds, cfg.paraphrases, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the data are known to be usable
    reports: dict[str, dict] = {}
    cache_info: dict[str, Any] = {}
    if dist_info.is_main:
        fit_budget = None
        if cfg.train.max_minutes is not None:  # the tokenizers' share of a time-budgeted run
            fit_budget = TOKENIZER_SHARE * cfg.train.max_minutes * 60.0
        bundle, reports, _ = obtain_bundle(
            cfg, ds, tokenizer_dir=tokenizer_dir, save_dir=run_dir, device=device, workers=workers, stage=stage,
            max_seconds=fit_budget,
        )
        cfg = fit_text_len(cfg, bundle, ds, stage)
        rep = build_cache(cache_dir, ds, bundle, cfg, device=device, workers=workers,
                          overwrite=overwrite and not resume, stage=stage)
        cache_info = {"encoded": rep.encoded, "reused": rep.reused, "seconds": rep.seconds}
    barrier(dist_info)
    if not dist_info.is_main:
        bundle = load_bundle(run_dir, need=needed_tokenizers(cfg.paradigm, cfg.strategies.image_input)).to(device)
        cfg = fit_text_len(cfg, bundle, ds)

    train_codes = load_cached_split(cache_dir, bundle, cfg, "train")
    if not train_codes.ids:
        raise MrisegError("no training samples", data_root)
    val_codes = load_cached_split(cache_dir, bundle, cfg, "val")
    if resume and "model" in saved:  # the model as it was built, whatever today's defaults are
        mcfg = model_config_from_dict(cfg.paradigm, saved["model"])
    else:
        mcfg = model_config(cfg, bundle, n_train=len(train_codes.ids))
    model = build_model(cfg.paradigm, mcfg, bundle)
    data = training_tensors(cfg.paradigm, train_codes, mcfg)
    if not cfg.use_text:  # image-only baseline: every text position is padding
        data["text_mask"] = torch.zeros_like(data["text_mask"])
    full = {
        "paradigm": cfg.paradigm, "preset": cfg.preset, "seed": cfg.seed,
        "data": {"root": [str(r) for r in roots] if len(roots) > 1 else str(roots[0]), "layout": ds.layout, "image_size": cfg.image_size,
                 "splits": ds.splits()},
        "tokenizers": {"present": bundle.present(), "fingerprint": bundle.fingerprint()},
        "model": to_dict(mcfg), "run": to_dict(cfg), "command": command,
    }
    if dist_info.is_main and not resume:
        write_config(run_dir, full)

    evaluate = None
    if val_codes.ids and dist_info.is_main:
        n_val = len(val_codes.ids)  # evenly spaced, so that every dataset of a merged set counts
        pick = torch.linspace(0, n_val - 1, min(n_val, MAX_VAL)).round().long().unique()
        val = {k: v[pick] for k, v in val_codes.fields.items()}
        seg = Segmenter(cfg.paradigm, model, bundle, cfg, device)
        evaluate = val_dice_fn(seg, val)
    tokens = data["mask_codes"][0].numel() if "mask_codes" in data else data["ms_codes"].shape[1]
    t0 = time.perf_counter()
    summary = train(
        model, data, cfg.train, run_dir, device=device, dist_info=dist_info, evaluate=evaluate,
        on_best=lambda m, metrics: save_model(m, run_dir), resume=resume, progress=train_progress,
        config_dict=full, tokens_per_sample=tokens, prep_seconds=time.perf_counter() - t_start,
    )
    if dist_info.is_main and evaluate is None:
        save_model(model, run_dir)  # no validation split: keep the last weights
    result = TrainResult(
        run_dir=run_dir, best_val_dice=summary["best_dice"], best_step=summary["best_step"],
        steps=summary["steps"], train_seconds=time.perf_counter() - t0,
        tokenizer_reports=reports, cache=cache_info,
    )
    if dist_info.is_main:
        metrics = {
            "best_val_dice": result.best_val_dice, "best_step": result.best_step,
            "steps": result.steps, "train_seconds": result.train_seconds,
            "tokenizers": reports, "cache": cache_info,
        }
        old = run_dir / "metrics.json"
        if old.is_file() and resume:
            prev = json.loads(old.read_text())
            metrics["tokenizers"] = metrics["tokenizers"] or prev.get("tokenizers", {})
        atomic_write_text(old, json.dumps(metrics, indent=2, default=float) + "\n", overwrite=True)
        from mrisegcli.training.curves import write_progress_png

        result.curves = write_progress_png(run_dir)
    return result
