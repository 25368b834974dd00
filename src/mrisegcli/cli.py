"""The ``mriseg`` command line: options -> configs -> library calls. No maths here."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from mrisegcli import __version__
from mrisegcli.errors import MrisegError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])
_state = {"debug": os.environ.get("MRISEG_DEBUG", "") not in ("", "0")}

# The exceptions of the click that Typer runs on (recent Typer carries its own copy of click).
_click_exceptions = importlib.import_module(typer.BadParameter.__module__)
UsageError: type[Exception] = _click_exceptions.UsageError
NoArgsIsHelpError: type[Exception] | tuple[()] = getattr(_click_exceptions, "NoArgsIsHelpError", ())


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"mriseg: error: {message}", markup=False)
    return typer.Exit(code)


_BAD_CHOICE = re.compile(
    r"invalid value for '(?P<option>-[^']+)': (?P<value>'.*'|\".*\") is not one of (?P<allowed>'.*')"
)


def usage_error_line(e: Exception) -> str:
    """The reason of a click usage error on one line, naming the help that explains it."""
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    reason = " ".join(message.split()).rstrip(".")
    reason = reason.replace(": Value error, ", ": ")  # Typer's coercion prefix on a bad choice
    if len(reason) > 1 and reason[0].isupper() and reason[1].islower():
        reason = reason[0].lower() + reason[1:]  # "Missing option" -> "missing option"
    choice = _BAD_CHOICE.fullmatch(reason)
    if choice:  # "--format must be auto, png, nii or dcm, not 'jpg'"
        allowed = re.findall(r"'([^']*)'", choice["allowed"])
        listed = (
            ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else "".join(allowed)
        )
        reason = f"{choice['option']} must be {listed}, not {choice['value']}"
    ctx = getattr(e, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        reason += f" (see '{ctx.command_path} {ctx.help_option_names[0]}')"
    return reason


@contextlib.contextmanager
def _usage_errors_as_one_line() -> Iterator[None]:
    try:
        yield
    except NoArgsIsHelpError:  # a bare ``mriseg``: the help was printed, keep Typer's exit
        raise
    except UsageError as e:
        raise _fail(usage_error_line(e), 2) from None


class _OneLineUsageErrors(TyperGroup):
    """The root group: a usage error (unknown option or command, bad or missing value) is one
    line on stderr, ``mriseg: error: <reason> (see 'mriseg CMD --help')``, exit code 2.

    Typer would print the usage and a boxed panel instead. The root's options are parsed in
    this group's ``make_context`` and every subcommand's in its ``invoke``, so both are
    covered; ``--help`` and a bare ``mriseg`` print the help as before.
    """

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        with _usage_errors_as_one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_as_one_line():
            return super().invoke(ctx)


app = typer.Typer(
    name="mriseg",
    cls=_OneLineUsageErrors,
    help="Text-prompted medical image segmentation by autoregressive token prediction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: no rich markup, so that text in square brackets ("[@revision]") shows as written.
    rich_markup_mode=None,
)


def handled(fn: F) -> F:
    """Turn user-fixable errors into one line on stderr and exit 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except MrisegError as e:
            if _state["debug"]:
                raise
            raise _fail(str(e)) from None
        except KeyboardInterrupt:
            err.print("mriseg: interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # an unexpected failure: still one line unless --debug
            if _state["debug"]:
                raise
            raise _fail(
                f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)"
            ) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"mriseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Text-prompted medical image segmentation by autoregressive token prediction."""
    _state["debug"] = debug or _state["debug"]


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------ option values
# Options with a fixed set of values are Enum-typed: ``--help`` lists the values and anything
# else is a usage error (exit 2). The values are spelled out here so that ``--help`` needs no
# torch import; tests/test_cli_conventions.py checks them against the library's own lists.
class _Choice(str, Enum):
    def __str__(self) -> str:
        return str(self.value)


class Paradigm(_Choice):
    next_token = "next-token"
    next_scale = "next-scale"


class Preset(_Choice):  # mrisegcli.config.RUN_PRESETS
    cpu = "cpu"
    cxr = "cxr"
    tiny = "tiny"
    small = "small"
    base = "base"


class Layout(_Choice):  # mrisegcli.data.layouts.LAYOUTS
    lvit = "lvit"
    qata_v2 = "qata-v2"
    manifest = "manifest"
    nnunet = "nnunet"


class Split(_Choice):  # mrisegcli.data.layouts.SPLITS
    train = "train"
    val = "val"
    test = "test"


class MaskFormat(_Choice):  # mrisegcli.workflow.predict.FORMATS
    auto = "auto"
    png = "png"
    nii = "nii"
    dcm = "dcm"


class SynthMode(_Choice):
    refer = "refer"
    describe = "describe"


class ImageInput(_Choice):
    codes = "codes"
    pixels = "pixels"


class PrefixAttention(_Choice):
    bidirectional = "bidirectional"
    causal = "causal"


class MaskPositions(_Choice):
    target = "target"
    fed = "fed"


class TextAblation(_Choice):  # mrisegcli.workflow.evaluate_model.ABLATIONS
    empty = "empty"
    shuffle = "shuffle"


def _value(choice: Any) -> Any:
    """The plain string of an Enum-typed option (None stays None)."""
    return choice.value if isinstance(choice, Enum) else choice


DEVICE_FORMS = "auto, cpu, cuda, cuda:N (GPU index N) or mps"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _device_value(value: str) -> str:
    """``--device`` at parse time: a bad spelling is a usage error; availability is checked later."""
    name = value.strip().lower()
    if not _DEVICE_RE.fullmatch(
        name
    ):  # the message reads like a bad choice's (see usage_error_line)
        raise typer.BadParameter(f"{value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    return name


DeviceOpt = Annotated[
    str,
    typer.Option(
        callback=_device_value, metavar="<auto|cpu|cuda|cuda:N|mps>", help=f"{DEVICE_FORMS}."
    ),
]
TextsOpt = Annotated[
    Path | None,
    typer.Option(
        "--texts",
        metavar="FILE",
        help="nnU-Net volume folders: the referring texts, CSV or JSON lines with label,text[,case] (default: texts.csv in the folder, else the label names of dataset.json).",
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress or stage lines on stderr (errors and warnings still print).",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
]


# ----------------------------------------------------------------------------------------- synth
@app.command()
@handled
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to create (LViT layout).")],
    n_train: Annotated[int, typer.Option(min=1, help="Training cases.")] = 800,
    n_val: Annotated[int, typer.Option(min=0, help="Validation cases.")] = 100,
    n_test: Annotated[int, typer.Option(min=0, help="Test cases.")] = 200,
    size: Annotated[int, typer.Option(min=32, max=2048, help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    mode: Annotated[
        SynthMode,
        typer.Option(help="refer: the text names only some opacities; describe: all of them."),
    ] = SynthMode.refer,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an OUT folder made by an earlier synth.")
    ] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write the built-in referring dataset (chest-radiograph phantoms + QaTa-style texts)."""
    from mrisegcli.data.synth import synthesize
    from mrisegcli.progress import task_progress

    mode = _value(mode)
    with task_progress("synthesising", total=n_train + n_val + n_test, quiet=quiet) as progress:
        report = synthesize(
            out_dir,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            size=size,
            seed=seed,
            mode=mode,
            overwrite=overwrite,
            progress=progress,
        )
    if json_out:
        _print_json(
            {
                "out": str(out_dir),
                "cases": report.n_total,
                "train": n_train,
                "val": n_val,
                "test": n_test,
                "size": size,
                "mode": mode,
                "seed": seed,
                "seconds": round(report.seconds, 3),
                "images_per_s": round(report.images_per_s, 1),
            }
        )
        return
    out.print(
        f"wrote {report.n_total} cases ({n_train} train / {n_val} val / {n_test} test, {size} px, "
        f"mode {mode}) to {out_dir} in {report.seconds:.1f} s ({report.images_per_s:.0f} images/s)",
        markup=False,
    )


# ---------------------------------------------------------------------------------- helpers
def _device(name: str) -> Any:
    """auto, cpu, cuda, cuda:N or mps -> a torch device that exists on this machine."""
    import torch

    name = name.strip().lower()
    if not _DEVICE_RE.fullmatch(name):
        raise _fail(f"--device must be {DEVICE_FORMS}, not {name!r}", 2)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MrisegError(f"--device {name}: no CUDA device is available (use --device cpu)")
        index = int(name.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise MrisegError(
                f"--device {name}: there is no CUDA device {index}; this machine has {count} "
                f"(cuda:0 to cuda:{count - 1})"
            )
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise MrisegError("--device mps: MPS is not available (use --device cpu)")
    return torch.device(name)


def _stage(quiet: bool = False) -> Callable[[str, int | None], Any]:
    from mrisegcli.progress import task_progress

    def stage(description: str, total: int | None) -> Any:
        if not quiet:
            from rich.markup import escape

            err.print(f"[bold]>[/] {escape(description)}")
        return task_progress(description, total, quiet=quiet)

    return stage


def _run_config(preset: str, paradigm: str, size: int | None, seed: int, **overrides: Any) -> Any:
    """The preset's RunConfig with the command line's settings applied. Each setting goes to the
    config section that declares it (training first: ``batch_size`` and ``lr`` are the
    transformer's, not the tokenizers'); allowed values come from the configs' own types."""
    import typing
    from dataclasses import replace

    from mrisegcli.config import Paradigm, StrategyConfig, run_preset, with_image_size

    preset, paradigm = _value(preset), _value(paradigm)
    overrides = {k: _value(v) for k, v in overrides.items() if v is not None}
    paradigms = typing.get_args(Paradigm)
    if paradigm not in paradigms:
        raise MrisegError(f"--paradigm must be {' or '.join(paradigms)}, not {paradigm!r}")
    hints = typing.get_type_hints(StrategyConfig)
    for key, value in overrides.items():
        allowed = (
            typing.get_args(hints[key])
            if typing.get_origin(hints.get(key)) is typing.Literal
            else None
        )
        if allowed and value not in allowed:
            raise _fail(
                f"--{key.replace('_', '-')} must be {' or '.join(sorted(allowed))}, not {value!r}",
                2,
            )
    cfg = replace(run_preset(preset), paradigm=paradigm, seed=seed)
    if size is not None:
        cfg = with_image_size(cfg, size)
    sections = _route_settings(cfg, overrides)
    train = dict(sections["train"], seed=seed)
    if "epochs" in train:
        train["steps"] = 0
    return replace(
        cfg,
        train=replace(cfg.train, **train),
        strategies=replace(cfg.strategies, **sections["strategies"]),
        fit=replace(cfg.fit, **sections["fit"]),
    )


def _route_settings(cfg: Any, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``settings`` split by the RunConfig section whose dataclass declares each of them."""
    from dataclasses import fields

    order = ("train", "strategies", "fit")
    names = {section: {f.name for f in fields(getattr(cfg, section))} for section in order}
    routed: dict[str, dict[str, Any]] = {section: {} for section in order}
    for key, value in settings.items():
        section = next((s for s in order if key in names[s]), None)
        if section is None:
            raise MrisegError(f"internal error: no config section declares the setting {key!r}")
        routed[section][key] = value
    return routed


# ----------------------------------------------------------------------------------- presets
@app.command()
@handled
def presets(
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per preset, one per line.")
    ] = False,
) -> None:
    """List the model presets with their parameter counts."""
    from rich.table import Table

    from mrisegcli.config import RUN_PRESETS, run_preset
    from mrisegcli.models.presets import count_params

    table = Table(
        "preset", "parameters (next-token)", "dim x layers", "input px", "train steps", "batch"
    )
    for name in RUN_PRESETS:
        cfg = run_preset(name)
        t = cfg.transformer
        params = count_params(t)
        if json_out:
            _print_json(
                {
                    "name": name,
                    "params": params,
                    "dim": t.dim,
                    "layers": t.n_layers,
                    "train_steps": cfg.train.steps,
                    "batch_size": cfg.train.batch_size,
                    "image_size": cfg.image_size,
                }
            )
            continue
        table.add_row(
            name,
            f"{params / 1e6:.1f} M",
            f"{t.dim} x {t.n_layers}",
            str(cfg.image_size),
            str(cfg.train.steps),
            str(cfg.train.batch_size),
        )
    if not json_out:
        out.print(table)


# ------------------------------------------------------------------------------------ models
@app.command()
@handled
def models(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="[NAME]", help="A shipped model's name or a run folder: list what it answers."
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON object per model, one per line.")
    ] = False,
) -> None:
    """List the models that ship inside the package, with their data, size, targets and test
    metrics; with NAME, what that model answers (targets, example prompts, presence threshold)."""
    from rich.table import Table

    from mrisegcli.shipped import DEFAULT_MODEL, ENV_VAR, shipped_models

    if name is not None:
        _model_scope(name, json_out)
        return
    found = shipped_models()
    if json_out:
        for m in found:
            _print_json(
                {
                    "name": m.name,
                    "default": m.name == DEFAULT_MODEL,
                    "path": str(m.path),
                    "data": m.data,
                    "size_bytes": m.size_bytes,
                    "paradigm": m.config.get("paradigm"),
                    "preset": m.config.get("preset"),
                    "targets": [t["target"] for t in m.config.get("scope", {}).get("targets", [])],
                    "presence_threshold": m.config.get("presence", {}).get("threshold"),
                    "license": m.license,
                    "evaluation": m.evaluation,
                }
            )
        return
    if not found:
        out.print("no models ship with this installation; pass --model RUN")
        return
    from mrisegcli.scope import describe_scope

    table = Table("model", "data", "size", "answers", "test Dice by kind (canonical wording)")
    for m in found:
        kinds = m.evaluation.get("kinds", {})
        dice = ", ".join(f"{k} {v['dice']:.3f}" for k, v in kinds.items()) or "not evaluated"
        label = f"{m.name} (default)" if m.name == DEFAULT_MODEL else m.name
        table.add_row(
            label,
            m.data,
            f"{m.size_bytes / 1e6:.1f} MB",
            describe_scope(m.config.get("scope", {}), limit=4) or "not recorded",
            dice,
        )
    out.print(table)
    out.print(
        f"--model NAME|RUN|HUB_ID chooses another; {ENV_VAR} sets the default; "
        "'mriseg models NAME' lists what a model answers. Weights' licences (the code is "
        "Apache-2.0): "
        + "; ".join(f"{m.name} {m.license}" for m in found)
        + ". Model cards: "
        + ", ".join(f"mrisegcli/shipped/{m.name}/README.md" for m in found),
        markup=False,
    )


def _model_scope(name: str, json_out: bool) -> None:
    """``mriseg models NAME``: a model's targets with example prompts, and its presence head."""
    from mrisegcli.hub import resolve_run
    from mrisegcli.runinfo import read_config
    from mrisegcli.shipped import choose_model

    config = read_config(resolve_run(choose_model(name).spec))
    scope, presence = config.get("scope") or {}, config.get("presence") or {}
    if json_out:
        _print_json(
            {
                "name": name,
                "targets": scope.get("targets", []),
                "vocabulary": scope.get("vocabulary", []),
                "presence_threshold": presence.get("threshold"),
                "presence_val": presence.get("report", {}).get("val"),
            }
        )
        return
    if not scope:
        out.print(f"{name}: no scope recorded (trained before mriseg recorded one)", markup=False)
        return
    out.print(f"{name} answers ({scope.get('source')}):", markup=False)
    for t in scope.get("targets", []):
        examples = "; ".join(f'"{e}"' for e in t.get("examples", []))
        out.print(f"  {t['target']:<28} {t['rows']:>6} rows  e.g. {examples}", markup=False)
    if scope.get("absent_rows"):
        out.print(
            f"  and 'not there': {scope['absent_rows']} training rows ask for something absent",
            markup=False,
        )
    out.print(f"  vocabulary: {len(scope.get('vocabulary', []))} words", markup=False)
    if presence:
        val = presence.get("report", {}).get("val", {})
        out.print(
            f"presence threshold {presence['threshold']:.3f} (val: AUROC {val.get('auroc', 0):.3f}, "
            f"sensitivity {val.get('sensitivity', 0):.3f}, specificity "
            f"{val.get('specificity', 0):.3f})",
            markup=False,
        )
    else:
        out.print("no presence head: every mask is drawn, none is refused as absent", markup=False)


# ---------------------------------------------------------------------------------- tokenize
@app.command()
@handled
def tokenize(
    data: Annotated[
        list[Path],
        typer.Option(metavar="<path>", help="Dataset folder or manifest; repeat for several."),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Cache folder to create or update.")],
    tokenizer: Annotated[
        Path | None, typer.Option(help="Reuse the tokenizers of a run or tokenize output.")
    ] = None,
    paradigm: Annotated[
        Paradigm, typer.Option(help="Which tokenizers to fit.")
    ] = Paradigm.next_token,
    preset: Annotated[
        Preset, typer.Option(help="Preset for the tokenizers' fitting budget.")
    ] = Preset.tiny,
    size: Annotated[int | None, typer.Option(help="Model input side in pixels.")] = None,
    layout: Annotated[
        Layout | None, typer.Option(help="Force the layout (default: detected).")
    ] = None,
    texts: TextsOpt = None,
    workers: Annotated[int, typer.Option(min=0, help="Threads decoding images.")] = 2,
    device: DeviceOpt = "auto",
    mask_steps: Annotated[int | None, typer.Option(help="Mask tokenizer fitting steps.")] = None,
    image_steps: Annotated[int | None, typer.Option(help="Image tokenizer fitting steps.")] = None,
    multiscale_steps: Annotated[
        int | None, typer.Option(help="Multi-scale tokenizer fitting steps.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Rebuild a cache made with other tokenizers.")
    ] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fit the tokenizers (unless given) and cache the codes of every sample."""
    from mrisegcli.runfolder import RunPaths
    from mrisegcli.workflow.prepare import (
        build_cache,
        obtain_bundle,
        open_dataset,
        removed_on_error,
    )

    cfg = _run_config(
        preset,
        paradigm,
        size,
        seed,
        mask_steps=mask_steps,
        image_steps=image_steps,
        multiscale_steps=multiscale_steps,
    )
    dev = _device(device)
    stage = _stage(quiet)
    ds = open_dataset(data, _value(layout), seed=seed, texts=texts)
    with removed_on_error(out_dir):  # a refused dataset leaves no tokenizers behind
        bundle, reports, _ = obtain_bundle(
            cfg, ds, tokenizer_dir=tokenizer, save_dir=out_dir, device=dev, workers=workers,
            stage=stage,
        )  # fmt: skip
        if not json_out:
            for name, rep in reports.items():
                out.print(
                    f"{name}: "
                    + ", ".join(
                        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in rep.items()
                    )
                )
        _warn_weak_tokenizers(reports)
        rep = build_cache(
            RunPaths(out_dir).cache,
            ds,
            bundle,
            cfg,
            device=dev,
            workers=workers,
            overwrite=overwrite,
            stage=stage,
        )
    if json_out:
        _print_json(
            {
                "out": str(out_dir),
                "cache": str(RunPaths(out_dir).cache),
                "encoded": rep.encoded,
                "reused": rep.reused,
                "seconds": round(rep.seconds, 3),
                "tokenizers": reports,
            }
        )
        return
    out.print(
        f"cache {out_dir / 'cache'}: {rep.encoded} encoded, {rep.reused} up to date, {rep.seconds:.1f} s",
        markup=False,
    )


RECON_DICE_WARN = 0.8  # a mask tokenizer below this caps every model trained on its codes
_MASK_TOKENIZERS = {
    "mask_vq": ("mask tokenizer", "--mask-steps"),
    "multiscale": ("multi-scale mask tokenizer", "--multiscale-steps"),
}


def _warn_weak_tokenizers(reports: dict[str, dict]) -> None:
    """A loud warning on stderr for a freshly fitted mask tokenizer that reconstructs masks poorly."""
    for name, report in reports.items():
        if name not in _MASK_TOKENIZERS or "recon_dice" not in report:
            continue
        dice = float(report["recon_dice"])
        if dice >= RECON_DICE_WARN:
            continue
        what, option = _MASK_TOKENIZERS[name]
        masks = (
            "held-out masks"
            if report.get("n_heldout", 1)
            else "its training masks (fewer than 10: none held out)"
        )
        err.print(
            f"mriseg: warning: the {what} reconstructs {masks} with Dice {dice:.2f} < {RECON_DICE_WARN}; "
            f"fit longer with {option}",
            style="bold yellow",
            markup=False,
        )


# ------------------------------------------------------------------------------------- train
@app.command()
@handled
def train(
    ctx: typer.Context,
    data: Annotated[
        list[Path],
        typer.Option(
            metavar="<path>",
            help="Dataset folder (LViT, QaTa-v2) or manifest CSV/JSONL; repeat to train on several.",
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder (default: a new runs/<data name>-<date>-<time>)."),
    ] = None,
    paradigm: Annotated[
        Paradigm, typer.Option(help="Autoregressive paradigm.")
    ] = Paradigm.next_token,
    preset: Annotated[
        Preset, typer.Option(help="Model size and budget (see `mriseg presets`).")
    ] = Preset.tiny,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Optimiser steps (default: the preset's).")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Train for this many epochs instead of --steps.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Global batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    eval_every: Annotated[
        int | None, typer.Option(min=1, help="Validate (and keep the best) every N steps.")
    ] = None,
    ckpt_every: Annotated[int | None, typer.Option(min=1, help="Checkpoint every N steps.")] = None,
    size: Annotated[
        int | None, typer.Option(help="Model input side in pixels (default 128).")
    ] = None,
    layout: Annotated[
        Layout | None, typer.Option(help="Force the layout (default: detected).")
    ] = None,
    texts: TextsOpt = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Reuse tokenizers from a run or tokenize output.")
    ] = None,
    cache: Annotated[
        Path | None, typer.Option(help="Code cache folder (default RUN/cache).")
    ] = None,
    mask_steps: Annotated[int | None, typer.Option(help="Mask tokenizer fitting steps.")] = None,
    image_steps: Annotated[int | None, typer.Option(help="Image tokenizer fitting steps.")] = None,
    multiscale_steps: Annotated[
        int | None, typer.Option(help="Multi-scale tokenizer fitting steps.")
    ] = None,
    nktp_k: Annotated[
        int | None, typer.Option(help="Next-k token prediction: k (1 = off).")
    ] = None,
    lambda_tcl: Annotated[
        float | None, typer.Option(help="Token contrastive loss weight (0 = off).")
    ] = None,
    het_alpha: Annotated[
        float | None, typer.Option(help="Hard-error-token weight (0 = off).")
    ] = None,
    image_input: Annotated[ImageInput | None, typer.Option(help="next-token image tokens.")] = None,
    input_noise: Annotated[
        float | None,
        typer.Option(
            help="Share of teacher-forced mask tokens replaced by random codes (0 = off)."
        ),
    ] = None,
    scheduled_sampling: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.99,
            help="Share of teacher-forced mask tokens replaced by the model's own predictions (0 = off).",
        ),
    ] = None,
    augment: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of training samples randomly rotated, zoomed, shifted and re-contrasted (0 = off; no flips).",
        ),
    ] = None,
    lambda_dense: Annotated[
        float | None, typer.Option(help="Dense prefix supervision weight (0 = off).")
    ] = None,
    lambda_refine: Annotated[
        float | None,
        typer.Option(help="Full-resolution refiner weight (0 = off; next-token, pixels)."),
    ] = None,
    refine_code_noise: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=0.99,
            help="Share of the refiner's training codes replaced by random ones (0 = off).",
        ),
    ] = None,
    refine_full_res: Annotated[
        bool | None,
        typer.Option(
            "--refine-full-res/--no-refine-full-res",
            help="The refiner's last level at the input side, reading the pixels.",
        ),
    ] = None,
    encoder_stage_blocks: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=8,
            help="Residual blocks after each finer stage of the conv image encoder (pixels input).",
        ),
    ] = None,
    prefix_attention: Annotated[
        PrefixAttention | None, typer.Option(help="next-token image+text attention.")
    ] = None,
    mask_positions: Annotated[
        MaskPositions | None,
        typer.Option(
            help="next-token: RoPE place of the state predicting a mask cell: on that cell "
            "(target) or on the cell of the code fed in (fed)."
        ),
    ] = None,
    mask_cell_image: Annotated[
        bool | None,
        typer.Option(
            "--mask-cell-image/--no-mask-cell-image",
            help="next-token: each fed mask token also carries the image token of the cell it predicts.",
        ),
    ] = None,
    no_text: Annotated[
        bool,
        typer.Option("--no-text", help="Image-only baseline: the model never sees the prompt."),
    ] = False,
    paraphrases: Annotated[
        int | None,
        typer.Option(
            min=0, help="Reworded copies of each training row with a 'target' column (0 = none)."
        ),
    ] = None,
    text_len: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=512,
            help="Text context in tokens (lengthened when a training text is longer).",
        ),
    ] = None,
    cpu_bf16: Annotated[
        bool | None,
        typer.Option(
            "--cpu-bf16/--no-cpu-bf16",
            help="bf16 autocast on the CPU, ~1.5x the steps a minute where the CPU computes bf16 natively (AVX512-BF16/AMX). Default: on exactly there (the run's config.json records which).",
        ),
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="Wall-clock budget of the whole run in minutes (tokenizers and cache included); the schedule follows it.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    workers: Annotated[int, typer.Option(min=0, help="Threads decoding images.")] = 2,
    resume: Annotated[
        bool, typer.Option(help="Continue the run from its last checkpoint.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over in a non-empty run folder.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    quiet: QuietOpt = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object at the end (run folder, steps, best val Dice, seconds, curves).",
        ),
    ] = False,
) -> None:
    """Train a model from raw data: tokenizers, code cache, then the transformer."""
    from mrisegcli.progress import task_progress
    from mrisegcli.training.distributed import init_distributed, shutdown
    from mrisegcli.workflow.train import train_run

    if out_dir is None and resume:
        raise _fail(
            "--resume needs --out RUN, the run folder to continue (see 'mriseg train --help')", 2
        )
    if cpu_bf16 is None and not resume and device in ("auto", "cpu"):
        from mrisegcli.training.loop import cpu_has_native_bf16

        cpu_bf16 = cpu_has_native_bf16() or None  # on where native; elsewhere the preset's
    cfg = _run_config(
        preset,
        paradigm,
        size,
        seed,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        eval_every=eval_every,
        ckpt_every=ckpt_every,
        max_minutes=max_minutes,
        cpu_bf16=cpu_bf16,
        mask_steps=mask_steps,
        image_steps=image_steps,
        multiscale_steps=multiscale_steps,
        nktp_k=nktp_k,
        lambda_tcl=lambda_tcl,
        het_alpha=het_alpha,
        image_input=image_input,
        prefix_attention=prefix_attention,
        lambda_dense=lambda_dense,
        input_noise=input_noise,
        scheduled_sampling=scheduled_sampling,
        augment=augment,
        lambda_refine=lambda_refine,
        refine_code_noise=refine_code_noise,
        refine_full_res=refine_full_res,
        encoder_stage_blocks=encoder_stage_blocks,
        mask_positions=mask_positions,
        mask_cell_image=mask_cell_image,
    )
    cfg = _with_text_options(cfg, no_text, paraphrases, text_len)
    dev = _device(device)
    info = init_distributed(dev.type)
    if info.enabled and dev.type == "cuda":
        import torch

        dev = torch.device("cuda", info.local_rank)
    silent = quiet or not info.is_main
    made: Path | None = None  # a default run folder made here, removed again if nothing went in
    try:
        if out_dir is None:
            out_dir = made = _new_run_dir(data, info, dev)
            if not silent:
                err.print(f"run folder: {out_dir}", markup=False)
        with task_progress("training", total=None, quiet=silent) as progress:
            result = train_run(
                data,
                out_dir,
                cfg,
                layout=_value(layout),
                device=dev,
                resume=resume,
                overwrite=overwrite,
                tokenizer_dir=tokenizer,
                cache_dir=cache,
                workers=workers,
                stage=_stage(silent),
                train_progress=progress,
                dist_info=info,
                command=" ".join(sys.argv),
                given=_given_options(ctx),
                texts=texts,
            )
    except BaseException:
        if made is not None and info.is_main and made.is_dir() and not any(made.iterdir()):
            made.rmdir()
        raise
    finally:
        shutdown(info)
    if info.is_main:
        _report_training(result, out_dir, json_out)


def _with_text_options(
    cfg: Any, no_text: bool, paraphrases: int | None, text_len: int | None
) -> Any:
    """``cfg`` with train's text options applied: --no-text, --paraphrases, --text-len."""
    from dataclasses import replace

    if no_text:
        cfg = replace(cfg, use_text=False)
    if paraphrases is not None:
        cfg = replace(cfg, paraphrases=paraphrases)
    if text_len is not None:
        cfg = replace(cfg, text_len=text_len)
    return cfg


def _report_training(result: Any, out_dir: Path, json_out: bool) -> None:
    """What train prints at the end: one JSON object, or a summary line (and the curves)."""
    _warn_weak_tokenizers(result.tokenizer_reports)
    if json_out:
        _print_json(
            {
                "run_dir": str(out_dir),
                "steps": result.steps,
                "best_val_dice": result.best_val_dice,
                "best_step": result.best_step,
                "seconds": round(result.train_seconds, 3),
                "precision": result.precision,
                "curves": None if result.curves is None else str(result.curves),
            }
        )
        return
    best = (
        f"{result.best_val_dice:.4f} (step {result.best_step})"
        if result.best_val_dice is not None
        else "n/a"
    )
    out.print(
        f"trained {result.steps} steps in {result.train_seconds:.0f} s; best val Dice {best}; run {out_dir}",
        markup=False,
    )
    if result.curves is not None:
        out.print(f"training curves: {result.curves}", markup=False)


def _given_options(ctx: Any) -> frozenset[str]:
    """The options set on the command line (or from the environment), not left at their default."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.add(name)
    return frozenset(given)


def _new_run_dir(data: list[Path], info: Any, device: Any, root: Path = Path("runs")) -> Path:
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


# ----------------------------------------------------------------------------------- predict
@app.command()
@handled
def predict(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(show_default=False, help="Files, folders, or - to read paths from stdin."),
    ] = None,
    text: Annotated[str | None, typer.Option(help="The referring text (for every input).")] = None,
    prompts: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help='A text per input instead of --text and INPUTS: CSV with a header path,text, or JSON lines {"path": ..., "text": ...}; - reads stdin. Paths are relative to the current folder.',
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Run folder, Hub id user/repo[@revision], or a shipped model's name (default: $MRISEG_MODEL, else the shipped chest-xray model)."
        ),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: beside each input).")
    ] = None,
    fmt: Annotated[
        MaskFormat,
        typer.Option(
            "--format",
            case_sensitive=False,
            help="Mask format; dcm is DICOM SEG (default: png for 2-D images, nii for volumes, dcm for DICOM).",
        ),
    ] = MaskFormat.auto,
    samples: Annotated[
        int, typer.Option(min=1, help="Masks drawn per input and fused by consensus.")
    ] = 1,
    temperature: Annotated[
        float | None,
        typer.Option(help="Sampling temperature (default 0, or 1 with --samples > 1)."),
    ] = None,
    uncertainty: Annotated[
        bool, typer.Option(help="Also write the uncertainty map (needs --samples > 1).")
    ] = False,
    overlay: Annotated[
        bool, typer.Option(help="Also write a PNG of the mask over the image.")
    ] = False,
    steps_png: Annotated[
        bool, typer.Option("--steps-png", help="Next-scale: write the mask after each scale.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per input.")] = False,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Slices decoded together.")] = 32,
    keep_going: Annotated[
        bool, typer.Option(help="Continue after a bad or missing input (exit 1 at the end).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    speculative: Annotated[
        bool,
        typer.Option(
            "--speculative/--no-speculative",
            help="Greedy next-token decoding drafted by the model's NkTP heads (same masks, fewer passes).",
        ),
    ] = True,
    presence_threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Below this calibrated presence the mask is empty ('not found'); default: the threshold the model chose on its val split.",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Run prompts with words the model never learnt instead of refusing them."
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Segment what the text describes in each input; one output line per input."""
    from mrisegcli.hub import resolve_run
    from mrisegcli.shipped import chosen_by_user, route_input
    from mrisegcli.workflow import segmenter
    from mrisegcli.workflow.predict import ModelOptionError, PredictOptions, predict_batch

    see = " (see 'mriseg predict --help')"
    if prompts is not None and (text is not None or inputs):
        raise _fail(
            "--prompts gives the inputs and their texts: use it without --text and without input paths"
            + see,
            2,
        )
    if prompts is None and not inputs:
        raise _fail(
            "missing argument 'INPUTS...' (files, folders or -), or give --prompts FILE" + see, 2
        )
    if prompts is None and text is None:
        raise _fail(
            "missing option '--text' (or give --prompts FILE with a text per input)" + see, 2
        )
    if uncertainty and samples < 2:
        raise _fail("--uncertainty needs --samples 2 or more", 2)
    options = PredictOptions(
        out_dir=out_dir,
        fmt=_value(fmt),
        samples=samples,
        temperature=temperature,
        seed=seed,
        uncertainty=uncertainty,
        overlay=overlay,
        steps_png=steps_png,
        overwrite=overwrite,
        keep_going=keep_going,
        progress=_stage(quiet=quiet),  # a bar per volume
        presence_threshold=presence_threshold,
        force=force,
    )
    lines = _PredictLines(json_out)

    def load(route: Any = None) -> Any:  # called once every input and output has been checked
        dev = _device(device)
        choice = _chosen_model(model, quiet, route)
        lines.shipped = choice.shipped
        seg = segmenter.load_segmenter(
            resolve_run(choice.spec),
            dev,
            batch_size=batch_size,
            compile=dev.type == "cuda",
            speculative=speculative,
        )
        seg.warn = lambda message: err.print(f"mriseg: warning: {message}", markup=False)
        return seg

    try:
        results = predict_batch(
            load, inputs=inputs or [], text=text, prompts=prompts, options=options, on_result=lines,
            route=None if chosen_by_user(model) else route_input,  # each input to its model
        )  # fmt: skip
    except ModelOptionError as e:
        raise _fail(str(e), 2) from None
    refused = [r for r in results if r.refused]
    if any(r.error and not r.refused for r in results) or (
        results and len(refused) == len(results)
    ):
        raise typer.Exit(1)


class _PredictLines:
    """Prints each predict result as it comes: one line (or JSON object) per input, and once a
    warning when the shipped chest-radiograph model is given something else."""

    def __init__(self, json_out: bool) -> None:
        self.json_out, self.shipped, self.warned = json_out, False, False

    def __call__(self, result: Any) -> None:
        from mrisegcli.shipped import DEFAULT_MODEL

        chest = (result.model or self.shipped) == DEFAULT_MODEL  # routed, or the one model
        if chest and not result.error and not self.warned and _not_a_radiograph(result):
            self.warned = True
            what = (
                f"a {result.modality} scan"
                if result.modality
                else f"a volume of {result.slices} slices"
            )
            err.print(
                f"mriseg: warning: {result.input} is {what}; the default model was trained on "
                "chest radiographs and segments it slice by slice",
                markup=False,
            )
        if self.json_out:
            _print_json(result.to_json())
        elif result.refused:
            err.print(f"mriseg: {result.input}: {result.error}", markup=False)
        elif result.error:
            err.print(f"mriseg: error: {result.error}", markup=False)
        elif not result.found:
            mask = result.outputs.get("mask")
            out.print(
                f"{result.input} -> {mask}: not found (presence {result.presence:.2f})",
                markup=False,
            )
        else:
            mask = result.outputs.get("mask")
            out.print(
                f"{result.input} -> {mask} ({result.foreground_fraction:.1%} foreground"
                f"{_volume_note(result.volume)}, presence {result.presence:.2f})",
                markup=False,
            )


def _volume_note(facts: dict[str, Any] | None) -> str:
    """', 12.3 mL in 5 of 20 slices' for a volume's mask ('' for a 2-D image)."""
    if not facts:
        return ""
    ml = facts.get("foreground_ml")
    size = f"{ml:.1f} mL" if ml is not None else f"{facts['foreground_voxels']} voxels"
    return f", {size} in {facts['slices_with_foreground']} of {facts['slices']} slices"


def _chosen_model(model: str | None, quiet: bool = False, route: Any = None) -> Any:
    """--model > MRISEG_MODEL > the shipped model of the input's route > the shipped default;
    says once on stderr which one runs (and why)."""
    from mrisegcli.shipped import choose_model

    choice = choose_model(model, route=route)
    if not quiet:
        err.print(choice.describe(), markup=False)
    return choice


def _not_a_radiograph(result: Any) -> bool:
    from mrisegcli.shipped import RADIOGRAPH_MODALITIES

    return result.slices > 1 or (result.modality or "").upper() not in RADIOGRAPH_MODALITIES


# -------------------------------------------------------------------------------------- evaluate
@app.command()
@handled
def evaluate(
    model: Annotated[
        str | None,
        typer.Option(
            help="Run folder, Hub id user/repo[@revision] or shipped model to evaluate on --data (default: $MRISEG_MODEL, else the shipped chest-xray model)."
        ),
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="<path>", help="Dataset to evaluate the model on (repeat for several)."
        ),
    ] = None,
    split: Annotated[Split, typer.Option(help="Dataset split to evaluate on.")] = Split.test,
    layout: Annotated[
        Layout | None, typer.Option(help="Force the layout (default: detected).")
    ] = None,
    texts: TextsOpt = None,
    pred: Annotated[Path | None, typer.Option(help="Folder of predicted masks.")] = None,
    gt: Annotated[Path | None, typer.Option(help="Folder of ground-truth masks.")] = None,
    samples: Annotated[
        int, typer.Option(min=1, help="Masks drawn per case, fused by consensus.")
    ] = 1,
    temperature: Annotated[
        float | None,
        typer.Option(min=0.0, help="Sampling temperature (default 0, or 1 with --samples > 1)."),
    ] = None,
    text_ablation: Annotated[
        list[TextAblation] | None,
        typer.Option(
            metavar="<empty|shuffle>", help="Also score with empty or shuffled text (repeatable)."
        ),
    ] = None,
    image_ablation: Annotated[
        bool,
        typer.Option(
            "--image-ablation",
            help="Also score each case's text on another case's image (does the model read the image?).",
        ),
    ] = False,
    teacher_forced: Annotated[
        bool,
        typer.Option(
            "--teacher-forced",
            help="Next-token: also score the codes of one teacher-forced pass (the model without its own mistakes).",
        ),
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N cases.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    csv: Annotated[Path | None, typer.Option(help="Write per-case rows to this CSV file.")] = None,
    allow_missing: Annotated[
        bool, typer.Option(help="Count ground truths without a prediction as empty predictions.")
    ] = False,
    device: DeviceOpt = "auto",
    workers: Annotated[int, typer.Option(min=0, help="Threads decoding images.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed (sampling, shuffled text).")] = 0,
    speculative: Annotated[
        bool,
        typer.Option(
            "--speculative/--no-speculative",
            help="Greedy next-token decoding drafted by the model's NkTP heads (same masks, fewer passes).",
        ),
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --csv file.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Dice and mIoU: of a model on a dataset split, or of a folder of predicted masks."""
    split, layout = _value(split), _value(layout)
    text_ablation = [_value(a) for a in text_ablation or ()]
    from mrisegcli.evaluation import EvalReport, render_table, report_json, write_cases_csv
    from mrisegcli.io.atomic import check_writable
    from mrisegcli.progress import task_progress

    by_model = model is not None or data is not None
    by_folder = pred is not None or gt is not None
    if (
        by_model == by_folder
        or (by_model and data is None)
        or (by_folder and (pred is None or gt is None))
    ):
        raise _fail("give either --data DIR [--model RUN], or --pred DIR --gt DIR", 2)
    if csv is not None:
        check_writable(csv, overwrite)
    if by_model:
        from mrisegcli.hub import resolve_run
        from mrisegcli.workflow.evaluate_model import evaluate_model, report_dict
        from mrisegcli.workflow.segmenter import load_segmenter

        seg = load_segmenter(
            resolve_run(_chosen_model(model, quiet).spec), _device(device), speculative=speculative
        )
        mreport = evaluate_model(
            seg,
            data,
            split=split,
            layout=layout,
            texts=texts,
            samples=samples,
            temperature=temperature,
            ablations=tuple(text_ablation or ()),
            image_ablation=image_ablation,
            teacher_forced=teacher_forced,
            limit=limit,
            workers=workers,
            seed=seed,
            stage=_stage(quiet=quiet or json_out),
        )
        report = EvalReport(mreport.cases, mreport.summary, [], [], mreport.volumes)
        summary = report_dict(mreport)
    else:
        from mrisegcli.evaluation import evaluate_folders

        with task_progress("evaluating", total=None, quiet=quiet or json_out) as progress:
            report = evaluate_folders(pred, gt, allow_missing=allow_missing, progress=progress)
        summary = report_json(report)
    if csv is not None:
        write_cases_csv(report, csv, overwrite=overwrite)
    if json_out:
        _print_json(summary)
        return
    out.print(render_table(report))
    if by_model:
        _print_model_summary(summary, split, text_ablation)


_PART_NAMES = {
    "tokens": "mask tokenizer (tokens only)",
    "refined": "refiner",
    "dense": "dense head (no codes)",
}
#: (summary key, label) of the optional numbers on the summary line, in print order
_SUMMARY_EXTRAS = (
    ("teacher_forced_dice", "teacher-forced Dice"),
    ("image_shuffle_dice", "shuffled image Dice"),
    ("uncertainty", "mean uncertainty"),
)


def _print_model_summary(summary: dict[str, Any], split: str, text_ablation: list[str]) -> None:
    """The lines under ``evaluate``'s table for a model: totals, ablations, parts, kinds."""
    line = f"{split}: Dice {summary['dice']:.4f}  mIoU {summary['miou']:.4f}  (n={summary['n']})"
    if not summary.get("uses_text", True):
        line += "  image-only model (trained with --no-text)"
    if "tokenizer_ceiling_dice" in summary:
        line += f"  tokenizer ceiling Dice {summary['tokenizer_ceiling_dice']:.4f}"
    for a in text_ablation:
        line += f"  {a} text Dice {summary[f'text_{a}_dice']:.4f} (drop {summary[f'text_{a}_dice_drop']:.4f})"
    for key, label in _SUMMARY_EXTRAS:
        if key in summary:
            drop = summary.get(f"{key}_drop")
            line += f"  {label} {summary[key]:.4f}" + (
                f" (drop {drop:.4f})" if key.startswith("image_") and drop is not None else ""
            )
    out.print(line)
    if summary.get("parts"):  # the same codes drawn by each part of the model
        out.print(
            "  mask drawn from the same codes by: "
            + ", ".join(
                f"{_PART_NAMES.get(k, k)} Dice {v['dice']:.4f}" for k, v in summary["parts"].items()
            )
        )
    for kind, row in summary.get("kinds", {}).items():
        extra = ""
        if "drawn" in row:
            extra = f"  drew a region on {row['drawn']:.1%} (mean area {row['fp_fraction']:.2%} of the image)"
        out.print(
            f"  {kind}: Dice {row['dice']:.4f}  mIoU {row['miou']:.4f}  (n={row['n']}){extra}",
            markup=False,
        )
    if summary.get("detection"):
        _print_detection(summary["detection"])


def _detection_line(row: dict[str, Any]) -> str:
    parts = []
    if "auroc" in row:
        parts.append(
            f"AUROC {row['auroc']:.3f}, sensitivity {row['sensitivity']:.3f}, "
            f"specificity {row['specificity']:.3f}"
        )
    if "found" in row:
        parts.append(f"found {row['found']:.1%} of {row['n_present']} present")
        parts.append(f"Dice on present {row['dice_present']:.4f}")
    if "drawn_on_empty" in row:
        parts.append(
            f"drew on {row['drawn_on_empty']:.1%} of {row['n'] - row['n_present']} empty "
            f"(mean area {row['fp_area_on_empty']:.2%})"
        )
    return "; ".join(parts)


def _print_detection(det: dict[str, Any]) -> None:
    """Is the target there? The presence score against non-empty truths, overall and per kind."""
    out.print(f"detection ({det['score']}): {_detection_line(det)}", markup=False)
    for kind, row in det.get("kinds", {}).items():
        out.print(f"  {kind}: {_detection_line(row)}", markup=False)


def _derive(
    fn: Any, model: str | None, data: list[Path], out_dir: Path, quiet: bool, **kw: Any
) -> Any:
    """A command that writes a new run from a model (draft-heads, calibrate): the model chosen
    and resolved, ``fn(run, data, out_dir, ...)`` called with the command line and progress."""
    from mrisegcli.hub import resolve_run

    choice = _chosen_model(model, quiet)
    return fn(
        resolve_run(choice.spec),
        data,
        out_dir,
        command=" ".join(["mriseg", *sys.argv[1:]]),
        source=choice.shipped or str(choice.spec),
        stage=_stage(quiet=quiet),
        **kw,
    )


# -------------------------------------------------------------------------------------- draft-heads
@app.command("draft-heads")
@handled
def draft_heads(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the new model (a copy of the run, new heads).")
    ],
    data: Annotated[
        list[Path],
        typer.Option(
            metavar="<path>",
            help="Dataset whose train split is decoded to fit the heads (repeat for several).",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="Next-token run folder, Hub id or shipped model (default: $MRISEG_MODEL, else the shipped chest-xray model)."
        ),
    ] = None,
    heads: Annotated[
        int,
        typer.Option(min=2, help="Codes per verifying pass: the main head's and heads-1 drafted."),
    ] = 6,
    steps: Annotated[int, typer.Option(min=1, help="Optimisation steps of the heads.")] = 1500,
    max_cases: Annotated[
        int | None, typer.Option(min=1, help="Decode at most N train cases (a random subset).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Refit a next-token model's drafting heads to its own greedy codes (same masks, fewer passes)."""
    from mrisegcli.workflow.draft_heads import refit_draft_heads

    report = _derive(
        refit_draft_heads, model, data, out_dir, quiet or json_out, heads=heads, steps=steps,
        max_cases=max_cases, seed=seed, device=_device(device), overwrite=overwrite,
    )  # fmt: skip
    if json_out:
        _print_json(report)
        return
    out.print(
        f"{out_dir}: {report['k']} tokens per pass (was {report['k_before']}); verifying passes "
        f"per mask on {report['val_sequences']} held-out cases "
        f"{report['val_passes_per_mask_before']:.1f} -> {report['val_passes_per_mask']:.1f}; "
        f"greedy codes unchanged on {report['identical_codes_checked']} checked cases",
        markup=False,
    )


# -------------------------------------------------------------------------------------- calibrate
@app.command()
@handled
def calibrate(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the new model (a copy of the run).")
    ],
    data: Annotated[
        list[Path],
        typer.Option(
            metavar="<path>",
            help="Dataset: train rows fit the presence head, val rows calibrate it and choose its threshold (repeat for several).",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="Run folder, Hub id or shipped model (default: $MRISEG_MODEL, else the shipped chest-xray model)."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimisation steps of the head.")] = 1500,
    max_cases: Annotated[
        int | None, typer.Option(min=1, help="Use at most N train rows (a random subset).")
    ] = 16000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it is a run folder.")] = False,
    scope_only: Annotated[
        bool,
        typer.Option(
            help="Keep the model's presence head: refresh its synonym rules and scope only."
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit a model's presence head (is the prompt's target there?) and record its scope."""
    from mrisegcli.workflow.calibrate import calibrate_run

    report = _derive(
        calibrate_run, model, data, out_dir, quiet or json_out, steps=steps, max_cases=max_cases,
        seed=seed, device=_device(device), overwrite=overwrite, scope_only=scope_only,
    )  # fmt: skip
    if json_out:
        _print_json(report)
        return
    val = report["report"]["val"]
    out.print(
        f"{out_dir}: presence threshold {report['threshold']:.3f}; val AUROC {val['auroc']:.3f}, "
        f"sensitivity {val['sensitivity']:.3f}, specificity {val['specificity']:.3f} "
        f"({val['n_present']} present, {val['n_absent']} absent rows); "
        f"{report['targets']} targets recorded",
        markup=False,
    )


# -------------------------------------------------------------------------------------- push
@app.command()
@handled
def push(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder to publish.")],
    repo_id: Annotated[
        str, typer.Option(help="Hub model repository user/name (created if needed).")
    ],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to push to (created if needed).")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="Hub token (default: HF_TOKEN or the saved login).")
    ] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
) -> None:
    """Publish a run on the Hugging Face Hub: weights, tokenizers, config and a model card."""
    from mrisegcli.workflow.push import push_run

    url = push_run(
        run, repo_id, private=private, revision=revision, token=token, commit_message=commit_message
    )
    model = f"{repo_id}@{revision}" if revision else repo_id
    out.print(f"pushed {run} to {url}; use it with --model {model}", markup=False)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
