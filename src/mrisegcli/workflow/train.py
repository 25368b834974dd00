"""``mriseg train`` as a library call: raw data -> tokenizers -> code cache -> transformer.

Every stage reuses what exists (tokenizers in the run or given by ``tokenizer_dir``, cache
entries that are up to date), so a second run, or ``--resume`` after a crash, does only the
work that is left. Under torchrun, rank 0 prepares tokenizers and cache while the others wait.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mrisegcli import runfolder
from mrisegcli.config import RunConfig, to_dict
from mrisegcli.errors import MrisegError
from mrisegcli.io.atomic import atomic_write_text
from mrisegcli.runinfo import (
    data_paths,
    finetune_config,
    read_config,
    record_resumed_config,
    resume_config,
    write_config,
)
from mrisegcli.training.distributed import DistInfo, barrier
from mrisegcli.training.loop import train
from mrisegcli.workflow.bundle import file_fingerprints, load_bundle, needed_tokenizers
from mrisegcli.workflow.prepare import (
    StageFactory,
    build_cache,
    load_cached_split,
    no_stage,
    obtain_bundle,
    open_dataset,
)
from mrisegcli.workflow.segmenter import (
    Segmenter,
    build_model,
    load_segmenter,
    model_config,
    model_config_from_dict,
    save_model,
    training_tensors,
)

MAX_VAL = 256  # validation cases decoded at each evaluation
#: with --max-minutes, the share of the budget the tokenizers may take to fit (together)
TOKENIZER_SHARE = 0.15
#: with --max-minutes, the share of the budget kept after the loop for the presence head's fit
#: (when the train rows hold empty masks) and for the component rule (when val volumes exist)
PRESENCE_SHARE = 0.10
VOLUME_RULE_SHARE = 0.05


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
    precision: str = "fp32"  # the training step's arithmetic: "bf16" (autocast) or "fp32"
    calibration_seconds: float = 0.0  # the stage after the loop: scope, presence head, rule
    calibration_reserved_seconds: float = 0.0  # what --max-minutes kept for it


def _has_checkpoint(run_dir: Path) -> bool:
    from mrisegcli.training.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / runfolder.CHECKPOINTS) is not None


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into an existing one unless told how.

    ``--resume`` needs a run with a checkpoint; ``--overwrite`` only a folder that holds
    nothing but a run's own files (a folder of other files is refused, naming one of them).
    The lock file of the run's writer does not count.
    """
    from mrisegcli.runinfo import LOCK_NAME, foreign_entry

    if run_dir.exists() and not run_dir.is_dir():
        raise MrisegError("exists and is not a folder", run_dir)
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.is_dir() else []
    again = "start it again with --overwrite"
    if resume:
        if not (run_dir / runfolder.CONFIG).is_file():
            if entries:  # stopped before it wrote its config: nothing to continue
                raise MrisegError(
                    f"nothing to resume: the run stopped before it wrote config.json; {again}",
                    run_dir,
                )
            raise MrisegError("--resume needs an existing run folder with config.json", run_dir)
        if not _has_checkpoint(run_dir):
            raise MrisegError(
                f"nothing to resume: the run stopped before its first checkpoint; {again}", run_dir
            )
        return
    if not entries:
        return
    if not overwrite:
        if (run_dir / runfolder.CONFIG).is_file() and _has_checkpoint(run_dir):
            raise MrisegError(
                "run folder is not empty (use --resume to continue it or --overwrite)", run_dir
            )
        raise MrisegError(
            f"run folder is not empty and has no checkpoint to resume; {again}", run_dir
        )
    foreign = foreign_entry(run_dir)
    if foreign is not None:
        raise MrisegError(
            f"not a mriseg run folder: it holds {foreign}, which train does not write; refusing to "
            "--overwrite it (choose another --out, or move that away)",
            run_dir,
        )


def _clear_run(run_dir: Path) -> None:
    """Remove what a previous run left before a fresh --overwrite run: only the files train
    writes again (tokenizers and the code cache are reused; check_run_dir has made sure that
    the folder holds nothing else)."""
    from mrisegcli.runinfo import RUN_FOLDERS

    for name in (
        runfolder.MODEL,
        runfolder.TRAIN_LOG,
        runfolder.METRICS,
        runfolder.CONFIG,
        runfolder.PROGRESS,
    ):
        (run_dir / name).unlink(missing_ok=True)
    ckpts = run_dir / runfolder.CHECKPOINTS
    if ckpts.is_dir() and not ckpts.is_symlink():
        for p in ckpts.iterdir():
            if (
                RUN_FOLDERS[runfolder.CHECKPOINTS].match(p.name)
                and p.is_file()
                and not p.is_symlink()
            ):
                p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            ckpts.rmdir()


def holding_run_lock(fn: Any) -> Any:
    """Run ``train_run`` holding the run folder's lock (rank 0; the other ranks of a torchrun
    follow it): a second ``train`` on the same folder is refused naming the holder. The lock
    goes on every way out (an error, SIGTERM, Ctrl-C); after a ``kill -9`` the next run on
    this host takes the dead process's lock over with a note. A full disk anywhere in the run
    (the training log, a tokenizer, a checkpoint) is one error naming the file and the free
    space."""

    @functools.wraps(fn)
    def locked(data_root: Any, run_dir: Path, cfg: RunConfig, **kwargs: Any) -> TrainResult:
        from mrisegcli.io.atomic import disk_full_error, is_disk_full
        from mrisegcli.runinfo import run_lock

        try:
            if not kwargs.get("dist_info", DistInfo()).is_main:
                return fn(data_root, run_dir, cfg, **kwargs)
            with run_lock(Path(run_dir)):
                return fn(data_root, run_dir, cfg, **kwargs)
        except MrisegError:
            raise
        except Exception as err:
            if is_disk_full(err):
                raise disk_full_error(getattr(err, "filename", None) or Path(run_dir), err) from err
            raise

    return locked


def fit_text_len(cfg: RunConfig, bundle: Any, ds: Any, stage: StageFactory = no_stage) -> RunConfig:
    """The run's text context, lengthened (to a multiple of 8) when a text of the dataset has
    more tokens than ``cfg.text_len``: no prompt is ever cut in training."""
    from dataclasses import replace

    from mrisegcli.tokenizers.text import longest_text

    longest = longest_text(bundle.text, [s.text for s in ds.samples])
    if longest <= cfg.text_len:
        return cfg
    new = -(-longest // 8) * 8
    with stage(
        f"text context {cfg.text_len} -> {new} tokens (the longest text has {longest})", None
    ):
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


def _start_run(
    run_dir: Path,
    cfg: RunConfig,
    *,
    resume: bool,
    overwrite: bool,
    tokenizer_dir: Path | None,
    given: frozenset[str],
    dist_info: DistInfo,
    data: list[Path] | None = None,
) -> tuple[RunConfig, dict | None]:
    """Check the run folder; with ``resume`` the saved config (changes applied and recorded),
    with ``overwrite`` the previous run's files removed. Returns the config and the saved one."""
    if dist_info.is_main:
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    saved = None
    if resume:
        saved = read_config(run_dir)
        cfg, changed = resume_config(
            saved, cfg, given, run_dir, tokenizer_dir=tokenizer_dir, data=data
        )
        if changed and dist_info.is_main:
            record_resumed_config(run_dir, saved, cfg)
    elif overwrite and dist_info.is_main and run_dir.is_dir():
        _clear_run(run_dir)
    return cfg, saved


@dataclass
class _InitSource:
    """The model a fine-tuning run starts from."""

    run_dir: Path
    cfg: RunConfig  # its run config with the options given applied
    text_len: int
    fresh: list[str] | None = None  # the new run's tensors the model did not have
    label: str = ""  # how the user named it

    def check_text_len(self, text_len: int, data: Any) -> None:
        if text_len > self.text_len:
            raise MrisegError(
                f"a text of the data needs {text_len} text tokens, more than the "
                f"{self.text_len} of the model in {self.run_dir} (--init-from keeps its shape): "
                "shorten the texts or train a new model",
                data if not isinstance(data, (list, tuple)) else data[0],
            )

    def record(self) -> dict[str, Any]:
        from mrisegcli.weights import weights_fingerprint

        return {
            "model": self.label or str(self.run_dir),
            "weights": weights_fingerprint(self.run_dir / runfolder.MODEL),
            "fresh_tensors": self.fresh or [],
        }


def _init_source(
    run_dir: Path, cfg: RunConfig, given: frozenset[str], *, resume: bool, tokenizer_dir: Any
) -> _InitSource:
    """Check ``--init-from``: a new run (not a resume), the model's own tokenizers."""
    from mrisegcli.settings import SettingError

    if resume:
        raise SettingError("--init-from starts a new run and --resume continues one: give one")
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != run_dir.resolve():
        raise SettingError(
            "--init-from trains with that model's own tokenizers: leave out --tokenizer"
        )
    saved = read_config(run_dir)
    new = finetune_config(saved, cfg, given, run_dir)
    return _InitSource(run_dir, new, int(saved["model"].get("text_len", new.text_len)))


def init_weights(model: torch.nn.Module, run_dir: Path) -> list[str]:
    """Start ``model`` from the weights of the run in ``run_dir``: every tensor of the same name
    and shape is copied. The hard-token memory (a bucket per training sample of the old data)
    starts empty; tensors the old model did not have (a presence probe it was not trained
    with, say) keep their fresh initialisation and are returned. A tensor of another shape,
    or one the new model has no place for, is an error that names them."""
    from safetensors.torch import load_file

    from mrisegcli.weights import check_finite

    path = run_dir / runfolder.MODEL
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged or missing file, named for the user
        raise MrisegError(f"cannot read the weights to start from ({e})", path) from None
    check_finite(state, path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("het_memory.")}
    unknown = sorted(k for k in state if k not in own)
    reshaped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if unknown or reshaped:
        parts = [f"{k} {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in reshaped[:4]]
        parts += [f"{k} (no such tensor)" for k in unknown[:4]]
        raise MrisegError(
            "the weights do not fit the model of this run (another architecture): "
            + "; ".join(parts),
            path,
        )
    model.load_state_dict(state, strict=False)
    return sorted(k for k in own if k not in state and not k.startswith("het_memory."))


def _roots(data_root: Any) -> list[Path]:
    return (
        [Path(r) for r in data_root] if isinstance(data_root, (list, tuple)) else [Path(data_root)]
    )


@dataclass
class _Prepared:
    """Tokenizers and code cache of a run, ready for the model."""

    cfg: RunConfig  # with the text context fitted to the data
    bundle: Any
    reports: dict[str, dict]
    cache_info: dict[str, Any]


def _prepare(
    ds: Any,
    cfg: RunConfig,
    run_dir: Path,
    cache_dir: Path,
    *,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    tokenizer_dir: Path | None,
    workers: int,
    stage: StageFactory,
    dist_info: DistInfo,
) -> _Prepared:
    """Rank 0 fits (or reuses) the tokenizers and builds the code cache; the others wait and
    load the tokenizers it saved."""
    prepared = None
    if dist_info.is_main:
        fit_budget = None
        if cfg.train.max_minutes is not None:  # the tokenizers' share of a time-budgeted run
            fit_budget = TOKENIZER_SHARE * cfg.train.max_minutes * 60.0
        bundle, reports, _ = obtain_bundle(
            cfg,
            ds,
            tokenizer_dir=tokenizer_dir,
            save_dir=run_dir,
            device=device,
            workers=workers,
            stage=stage,
            max_seconds=fit_budget,
        )
        cfg = fit_text_len(cfg, bundle, ds, stage)
        rep = build_cache(
            cache_dir,
            ds,
            bundle,
            cfg,
            device=device,
            workers=workers,
            overwrite=overwrite and not resume,
            stage=stage,
        )
        cache_info = {"encoded": rep.encoded, "reused": rep.reused, "seconds": rep.seconds}
        prepared = _Prepared(cfg, bundle, reports, cache_info)
    barrier(dist_info)
    if prepared is None:
        bundle = load_bundle(
            run_dir, need=needed_tokenizers(cfg.paradigm, cfg.strategies.image_input)
        ).to(device)
        prepared = _Prepared(fit_text_len(cfg, bundle, ds), bundle, {}, {})
    return prepared


def _run_record(
    cfg: RunConfig,
    mcfg: Any,
    bundle: Any,
    ds: Any,
    roots: list[Path],
    run_dir: Path,
    command: str,
) -> dict[str, Any]:
    """The run's config.json: paradigm, data, tokenizers (with file fingerprints), model, run."""
    return {
        "paradigm": cfg.paradigm,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "data": {
            "root": [str(r) for r in roots] if len(roots) > 1 else str(roots[0]),
            "paths": data_paths(roots),  # absolute: what a --resume compares its --data with
            "layout": ds.layout,
            "image_size": cfg.image_size,
            "splits": ds.splits(),
        },
        "tokenizers": {
            "present": bundle.present(),
            "fingerprint": bundle.fingerprint(),
            "files": file_fingerprints(run_dir),
        },
        "model": to_dict(mcfg),
        "run": to_dict(cfg),
        "command": command,
    }


def _augmenter(
    cfg: Any, bundle: Any, train_codes: Any, data: dict[str, torch.Tensor], rank: int
) -> Any:
    """The batch transform of ``--augment P`` (None when off); adds the pixels and masks it
    transforms to ``data`` when the model's own tensors do not hold them."""
    if cfg.strategies.augment <= 0:
        return None
    from mrisegcli.paradigms import image_pixels
    from mrisegcli.training.augment import Augmenter

    if "image" not in data:
        data["image"] = image_pixels(train_codes)
    data.setdefault("mask", train_codes.fields["mask"])
    return Augmenter(bundle, cfg.strategies.augment, cfg.seed, rank=rank)


def _validation(
    val_codes: Any,
    model: torch.nn.Module,
    bundle: Any,
    cfg: RunConfig,
    device: torch.device,
    dist_info: DistInfo,
) -> Any:
    """The loop's ``evaluate`` (rank 0, when the data have a validation split) or None."""
    if not val_codes.ids or not dist_info.is_main:
        return None
    n_val = len(val_codes.ids)  # evenly spaced, so that every dataset of a merged set counts
    pick = torch.linspace(0, n_val - 1, min(n_val, MAX_VAL)).round().long().unique()
    val = {k: v[pick] for k, v in val_codes.fields.items()}
    return val_dice_fn(Segmenter(cfg.paradigm, model, bundle, cfg, device), val)


def _write_metrics(result: TrainResult, run_dir: Path, resume: bool) -> None:
    """RUN/metrics.json (a resumed run keeps the tokenizer reports of its first part) and
    RUN/progress.png."""
    metrics = {
        "best_val_dice": result.best_val_dice,
        "best_step": result.best_step,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "precision": result.precision,
        "calibration_seconds": result.calibration_seconds,
        "calibration_reserved_seconds": result.calibration_reserved_seconds,
        "tokenizers": result.tokenizer_reports,
        "cache": result.cache,
    }
    old = run_dir / runfolder.METRICS
    if old.is_file() and resume:
        prev = json.loads(old.read_text())
        metrics["tokenizers"] = metrics["tokenizers"] or prev.get("tokenizers", {})
    atomic_write_text(old, json.dumps(metrics, indent=2, default=float) + "\n", overwrite=True)
    from mrisegcli.training.curves import write_progress_png

    result.curves = write_progress_png(run_dir)


@holding_run_lock
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
    stage: StageFactory = no_stage,
    train_progress: Any = None,
    dist_info: DistInfo = DistInfo(),
    command: str = "",
    given: frozenset[str] = frozenset(),
    texts: Path | None = None,
    init_from: Path | None = None,
    init_label: str | None = None,
) -> TrainResult:
    """``given``: the options the user set on the command line (their values are in ``cfg``);
    with ``resume`` those that may change are applied, the others must match the run. With
    ``init_from`` (a model's run folder) the new run starts from that model: its architecture,
    tokenizers and weights, with the training options given applied (fine-tuning); ``init_label``
    names it in config.json (the name the user gave; default the folder)."""
    from mrisegcli.data.paraphrase import add_paraphrases

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    init = None
    if init_from is not None:
        init = _init_source(Path(init_from), cfg, given, resume=resume, tokenizer_dir=tokenizer_dir)
        cfg, tokenizer_dir = init.cfg, init.run_dir
        init.label = init_label or str(init.run_dir)
    cfg, saved = _start_run(
        run_dir,
        cfg,
        resume=resume,
        overwrite=overwrite,
        tokenizer_dir=tokenizer_dir,
        given=given,
        dist_info=dist_info,
        data=_roots(data_root),
    )
    cache_dir = Path(cache_dir) if cache_dir is not None else run_dir / runfolder.CACHE
    torch.manual_seed(cfg.seed)
    roots = _roots(data_root)
    ds = open_dataset(
        roots, layout, seed=cfg.seed, check=dist_info.is_main and not resume, texts=texts
    )
    ds = add_paraphrases(ds, cfg.paraphrases, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the data are known to be usable
    prep = _prepare(
        ds,
        cfg,
        run_dir,
        cache_dir,
        device=device,
        resume=resume,
        overwrite=overwrite,
        tokenizer_dir=tokenizer_dir,
        workers=workers,
        stage=stage,
        dist_info=dist_info,
    )
    cfg, bundle = prep.cfg, prep.bundle

    train_codes = load_cached_split(cache_dir, bundle, cfg, "train")
    if not train_codes.ids:
        raise MrisegError("no training samples", data_root)
    val_codes = load_cached_split(cache_dir, bundle, cfg, "val")
    if (
        saved is not None and "model" in saved
    ):  # the model as it was built, whatever today's defaults are
        mcfg = model_config_from_dict(cfg.paradigm, saved["model"])
    else:
        mcfg = model_config(cfg, bundle, n_train=len(train_codes.ids))
    model = build_model(cfg.paradigm, mcfg, bundle)
    if init is not None:
        init.check_text_len(cfg.text_len, data_root)
        init.fresh = init_weights(model, init.run_dir)
    data = training_tensors(cfg.paradigm, train_codes, mcfg)
    if not cfg.use_text:  # image-only baseline: every text position is padding
        data["text_mask"] = torch.zeros_like(data["text_mask"])
    augment = _augmenter(cfg, bundle, train_codes, data, dist_info.rank)
    full = _run_record(cfg, mcfg, bundle, ds, roots, run_dir, command)
    if init is not None:
        full["init_from"] = init.record()
    if dist_info.is_main and not resume:
        write_config(run_dir, full)

    evaluate = _validation(val_codes, model, bundle, cfg, device, dist_info)
    tokens = data["mask_codes"][0].numel() if "mask_codes" in data else data["ms_codes"].shape[1]
    has_empty = _has_empty_rows(train_codes)
    head_s, rule_s = _calibration_reserve(cfg, ds, has_empty)
    reserve = head_s + rule_s
    t0 = time.perf_counter()
    summary = train(
        model,
        data,
        cfg.train,
        run_dir,
        device=device,
        dist_info=dist_info,
        evaluate=evaluate,
        on_best=lambda m, metrics: save_model(m, run_dir),
        resume=resume,
        progress=train_progress,
        config_dict=full,
        tokens_per_sample=tokens,
        prep_seconds=time.perf_counter() - t_start,
        augment=augment,
        reserve_seconds=reserve,
    )
    if dist_info.is_main and evaluate is None:
        save_model(model, run_dir)  # no validation split: keep the last weights
    result = TrainResult(
        run_dir=run_dir,
        best_val_dice=summary["best_dice"],
        best_step=summary["best_step"],
        steps=summary["steps"],
        train_seconds=time.perf_counter() - t0,
        tokenizer_reports=prep.reports,
        cache=prep.cache_info,
        precision=summary["precision"],
    )
    if dist_info.is_main:
        t_cal = time.perf_counter()
        deadline = t_cal + head_s if cfg.train.max_minutes is not None else None
        _calibrate(run_dir, ds, cfg, device, stage, deadline=deadline, has_empty=has_empty)
        result.calibration_seconds = time.perf_counter() - t_cal
        result.calibration_reserved_seconds = reserve
        _write_metrics(result, run_dir, resume)
    return result


def _has_empty_rows(codes: Any) -> bool | None:
    """Whether some cached train row has an empty mask (None when the cache holds no masks)."""
    masks = codes.fields.get("mask")
    if masks is None or not len(masks):
        return None
    return bool((masks.reshape(len(masks), -1).amax(1) == 0).any())


def _calibration_reserve(cfg: RunConfig, ds: Any, has_empty: bool | None) -> tuple[float, float]:
    """Seconds of a ``--max-minutes`` budget the loop leaves to the stages after it: the
    presence head's and the component rule's."""
    if cfg.train.max_minutes is None or not ds.split("val"):
        return 0.0, 0.0
    budget = cfg.train.max_minutes * 60.0
    head = PRESENCE_SHARE * budget if has_empty is not False else 0.0
    rule = VOLUME_RULE_SHARE * budget if any(s.volume is not None for s in ds.split("val")) else 0.0
    return head, rule


def _calibrate(
    run_dir: Path,
    ds: Any,
    cfg: RunConfig,
    device: torch.device,
    stage: Any,
    *,
    deadline: float | None = None,
    has_empty: bool | None = None,
) -> None:
    """The last stage: the trained model's scope, its presence head when the train rows hold
    empty masks (``workflow/calibrate.py``) and, with val volumes, the component rule of its
    volumes (``postprocess.py``), recorded in the run folder. With ``deadline`` (the end of the
    head's share of a ``--max-minutes`` budget) the head is fitted on as many train rows as the
    time left allows."""
    from mrisegcli.workflow.calibrate import fit_calibration, record_calibration, use_presence

    if not (run_dir / runfolder.MODEL).is_file():
        return
    seg = load_segmenter(run_dir, device)
    cal = fit_calibration(
        seg, ds, seed=cfg.seed, stage=stage, deadline=deadline, train_has_empty=has_empty
    )
    rule = None
    if any(s.volume is not None for s in ds.split("val")):  # nnU-Net data: val volumes
        from mrisegcli.workflow.volume_eval import component_rule

        use_presence(seg, cal)  # the volumes answered as predict will, with the new head
        rule = component_rule(seg, ds.split("val"), chosen_on="val split", stage=stage)
    record_calibration(run_dir, cal, postprocess=rule)
