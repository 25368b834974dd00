"""The library calls behind the commands that do more than call one function: ``cli.py``
parses the options and calls one of these.

* :func:`run_config`: the run's config from the preset and the settings given (``train``,
  ``tokenize``);
* :func:`train_command`: the whole of a ``train``: the device, torchrun's process group, a new
  run folder when none is given, then :func:`mrisegcli.workflow.train.train_run`;
* :func:`tokenize_command`: the tokenizers fitted and the code cache written;
* :func:`model_loader`: the model of a ``predict``, loaded when the inputs are known;
* :func:`evaluate_command`: a model on a dataset, or a folder of masks against the truth;
* :func:`derive_run`: a new run written from a model (``draft-heads``, ``calibrate``).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mrisegcli.errors import MrisegError
from mrisegcli.settings import SettingError, route


def run_config(
    preset: str | None, paradigm: str, size: int | None, seed: int, **settings: Any
) -> Any:
    """The preset's RunConfig with the command line's settings applied: each to the config
    field its row in :data:`mrisegcli.settings.SETTINGS` names (None: the preset's value).
    ``preset`` None: :func:`mrisegcli.config.default_preset` for ``size``."""
    from mrisegcli.config import Paradigm, default_preset, run_preset, with_image_size

    if preset is None:
        preset = default_preset(size)
    paradigms = typing.get_args(Paradigm)
    if paradigm not in paradigms:
        raise MrisegError(f"--paradigm must be {' or '.join(paradigms)}, not {paradigm!r}")
    sections = route(settings)
    cfg = replace(run_preset(preset), paradigm=paradigm, seed=seed)
    if size is not None:
        cfg = with_image_size(cfg, size)
    train = dict(sections["train"], seed=seed)
    if "epochs" in train:
        train["steps"] = 0
    return replace(
        cfg,
        **sections[""],
        train=replace(cfg.train, **train),
        strategies=replace(cfg.strategies, **sections["strategies"]),
        fit=replace(cfg.fit, **sections["fit"]),
    )


@dataclass(frozen=True)
class TrainPlaces:
    """Where ``train`` reads and writes, and how it runs (the options that are no setting)."""

    layout: str | None = None
    texts: Path | None = None
    tokenizer: Path | None = None
    cache: Path | None = None
    device: str = "auto"
    workers: int = 2
    resume: bool = False
    overwrite: bool = False
    init_from: str | None = None  # a model to fine-tune: run folder, Hub id or shipped name


def train_command(
    data: list[Path],
    out_dir: Path | None,
    settings: dict[str, Any],
    places: TrainPlaces,
    *,
    quiet: bool,
    given: frozenset[str],
    command: str,
    stage: Callable[[bool], Any],
    note: Callable[[str], None],
) -> tuple[Any, Path]:
    """Train a model as ``mriseg train`` does. ``settings``: train's settings by name (None: the
    preset's); ``given``: the options set on the command line (a resume checks them);
    ``stage(silent)``: the progress of each stage; ``note``: a line for the user (the run
    folder chosen). ``cpu_bf16`` left out is on where the CPU computes bf16 natively (a new run
    on the CPU). Under torchrun every rank calls this; the main rank makes the run folder and
    tells the others. Returns the TrainResult (None on the other ranks) and the run folder."""
    from mrisegcli.devices import torch_device
    from mrisegcli.progress import task_progress
    from mrisegcli.training.distributed import init_distributed, shutdown
    from mrisegcli.workflow.train import train_run

    if out_dir is None and places.resume:
        raise SettingError(
            "--resume needs --out RUN, the run folder to continue (see 'mriseg train --help')"
        )
    if settings.get("cpu_bf16") is None and not places.resume and places.device in ("auto", "cpu"):
        from mrisegcli.training.loop import cpu_has_native_bf16

        settings = dict(settings, cpu_bf16=cpu_has_native_bf16() or None)
    cfg = run_config(**settings)
    init_from = None
    if places.init_from is not None:
        from mrisegcli.shipped import resolve_model

        init_from = resolve_model(places.init_from)[1]
    dev = torch_device(places.device)
    info = init_distributed(dev.type)
    if info.enabled and dev.type == "cuda":
        import torch

        dev = torch.device("cuda", info.local_rank)
    silent = quiet or not info.is_main
    made: Path | None = None  # a default run folder made here, removed again if nothing went in
    try:
        if out_dir is None:
            out_dir = made = new_run_dir(data, info, dev)
            if not silent:
                note(f"run folder: {out_dir}")
        with task_progress("training", total=None, quiet=silent) as progress:
            result = train_run(
                data, out_dir, cfg, layout=places.layout, device=dev, resume=places.resume,
                overwrite=places.overwrite, tokenizer_dir=places.tokenizer,
                cache_dir=places.cache, workers=places.workers, stage=stage(silent),
                train_progress=progress, dist_info=info, command=command, given=given,
                texts=places.texts, init_from=init_from, init_label=places.init_from,
            )  # fmt: skip
    except BaseException:
        if made is not None and info.is_main and made.is_dir() and not any(made.iterdir()):
            made.rmdir()
        raise
    finally:
        shutdown(info)
    return (result if info.is_main else None), out_dir


def new_run_dir(data: list[Path], info: Any, device: Any, root: Path = Path("runs")) -> Path:
    """A new run folder ``runs/<first dataset's name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... when
    taken), made here so that two runs started in the same second never share it. Under
    torchrun the main rank makes it and tells the others."""
    from datetime import datetime

    from mrisegcli.data.layouts import dataset_name

    chosen: Path | None = None
    if info.is_main:
        base = f"{dataset_name(data[0])}-{datetime.now():%Y%m%d-%H%M%S}"
        for n in range(1, 10_000):
            candidate = root / (base if n == 1 else f"{base}-{n}")
            try:
                candidate.mkdir(parents=True)
            except FileExistsError:
                continue
            chosen = candidate
            break
        else:
            raise MrisegError(f"no free run folder name like {root / base}; give --out")
    if info.enabled:
        import torch.distributed as dist

        box = [None if chosen is None else str(chosen)]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        chosen = Path(box[0])
    assert chosen is not None
    return chosen


def tokenize_command(
    data: list[Path],
    out_dir: Path,
    settings: dict[str, Any],
    places: TrainPlaces,
    *,
    stage: Any,
    on_tokenizers: Callable[[dict[str, dict]], None],
) -> tuple[dict[str, dict], Any]:
    """``mriseg tokenize``: fit the tokenizers (unless ``places.tokenizer`` gives them) into
    ``out_dir`` and cache the codes of every sample in ``out_dir/cache``. ``on_tokenizers``
    gets the tokenizers' reports before the cache is built. A refused dataset leaves no
    tokenizers behind. Returns the reports and the cache's report."""
    from mrisegcli.devices import torch_device
    from mrisegcli.runfolder import RunPaths
    from mrisegcli.workflow.prepare import (
        build_cache,
        obtain_bundle,
        open_dataset,
        removed_on_error,
    )

    cfg = run_config(**settings)
    dev = torch_device(places.device)
    ds = open_dataset(data, places.layout, seed=cfg.seed, texts=places.texts)
    with removed_on_error(out_dir):
        bundle, reports, _ = obtain_bundle(
            cfg, ds, tokenizer_dir=places.tokenizer, save_dir=out_dir, device=dev,
            workers=places.workers, stage=stage,
        )  # fmt: skip
        on_tokenizers(reports)
        rep = build_cache(
            RunPaths(out_dir).cache, ds, bundle, cfg, device=dev, workers=places.workers,
            overwrite=places.overwrite, stage=stage,
        )  # fmt: skip
    return reports, rep


def model_loader(
    model: str | None,
    device: str,
    *,
    announce: Callable[[str], None] | None,
    on_choice: Callable[[Any], None],
    warn: Callable[[str], None],
    **load: Any,
) -> Callable[..., Any]:
    """``load(route=None)``: the device checked, the model chosen (``--model``, else
    ``MRISEG_MODEL``, else the shipped model of ``route``; named through ``announce`` and
    given to ``on_choice``), resolved and loaded (``load``: :func:`load_segmenter`'s options;
    compiled on a GPU), its warnings going to ``warn``. ``predict_batch`` calls it once every
    input and output has been checked."""

    def load_model(route: Any = None) -> Any:
        from mrisegcli.devices import torch_device
        from mrisegcli.shipped import resolve_model
        from mrisegcli.workflow.segmenter import load_segmenter

        dev = torch_device(device)
        choice, run = resolve_model(model, route=route, announce=announce)
        on_choice(choice)
        seg = load_segmenter(run, dev, compile=dev.type == "cuda", **load)
        seg.warn = warn
        return seg

    return load_model


def evaluate_command(
    model: str | None,
    data: list[Path] | None,
    pred: Path | None,
    gt: Path | None,
    *,
    csv: Path | None,
    overwrite: bool,
    allow_missing: bool,
    device: str,
    speculative: bool,
    quiet: bool,
    announce: Callable[[str], None] | None,
    stage: Any,
    **options: Any,
) -> tuple[Any, dict[str, Any], bool]:
    """``mriseg evaluate``: a model (``model``, default the shipped one) on ``data`` with
    ``options`` (:func:`~mrisegcli.workflow.evaluate_model.evaluate_model`'s), or the masks in
    ``pred`` against those in ``gt``; the per-case rows written to ``csv`` when given. Either
    way only; a ``csv`` that exists without ``overwrite`` is refused before any work. Returns
    the report, its summary (the ``--json`` object) and whether a model was evaluated."""
    from mrisegcli.evaluation import EvalReport, report_json, write_cases_csv
    from mrisegcli.io.atomic import check_writable

    by_model = model is not None or data is not None
    by_folder = pred is not None or gt is not None
    if (
        by_model == by_folder
        or (by_model and data is None)
        or (by_folder and (pred is None or gt is None))
    ):
        raise SettingError("give either --data DIR [--model RUN], or --pred DIR --gt DIR")
    if csv is not None:
        check_writable(csv, overwrite)
    if by_model:
        from mrisegcli.devices import torch_device
        from mrisegcli.shipped import resolve_model, route_dataset
        from mrisegcli.workflow.evaluate_model import evaluate_model, report_dict
        from mrisegcli.workflow.segmenter import load_segmenter

        run = resolve_model(model, route=route_dataset(data), announce=announce)[1]
        seg = load_segmenter(run, torch_device(device), speculative=speculative)
        mreport = evaluate_model(seg, data, stage=stage, **options)
        report = EvalReport(mreport.cases, mreport.summary, [], [], mreport.volumes)
        summary = report_dict(mreport)
    else:
        from mrisegcli.evaluation import evaluate_folders
        from mrisegcli.progress import task_progress

        with task_progress("evaluating", total=None, quiet=quiet) as progress:
            report = evaluate_folders(pred, gt, allow_missing=allow_missing, progress=progress)
        summary = report_json(report)
    if csv is not None:
        write_cases_csv(report, csv, overwrite=overwrite)
    return report, summary, by_model


def derive_run(
    fn: Callable[..., Any],
    model: str | None,
    data: list[Path],
    out_dir: Path,
    *,
    announce: Callable[[str], None] | None,
    **kw: Any,
) -> Any:
    """A command that writes a new run from a model (``draft-heads``, ``calibrate``): the model
    chosen (named through ``announce``) and resolved, then ``fn(run, data, out_dir,
    source=..., **kw)`` with ``source`` the shipped model's name or the model given."""
    from mrisegcli.shipped import resolve_model, route_dataset

    choice, run = resolve_model(model, route=route_dataset(data), announce=announce)
    return fn(run, data, out_dir, source=choice.shipped or str(choice.spec), **kw)
