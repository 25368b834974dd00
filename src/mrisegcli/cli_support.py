"""What every command of ``cli.py`` shares: the consoles, one-line errors and their exit codes
(:func:`handled`, :class:`OneLineUsageErrors`), the option types with fixed choices, the
options generated from the table of settings (:func:`with_settings`), the options several
commands take, and the printing of progress, lines and JSON.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from mrisegcli.data.layouts import LAYOUTS, SPLITS
from mrisegcli.devices import DEVICE_FORMS, DEVICE_RE
from mrisegcli.errors import MrisegError
from mrisegcli.settings import OPTIONS, Setting, SettingError, choices

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])
#: ``--debug`` (or MRISEG_DEBUG): errors raise with their traceback
STATE = {"debug": os.environ.get("MRISEG_DEBUG", "") not in ("", "0")}

# The exceptions of the click that Typer runs on (recent Typer carries its own copy of click).
_click_exceptions = importlib.import_module(typer.BadParameter.__module__)
UsageError: type[Exception] = _click_exceptions.UsageError
NoArgsIsHelpError: type[Exception] | tuple[()] = getattr(_click_exceptions, "NoArgsIsHelpError", ())


def fail(message: str, code: int = 1) -> typer.Exit:
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
def usage_errors_as_one_line() -> Iterator[None]:
    try:
        yield
    except NoArgsIsHelpError:  # a bare ``mriseg``: the help was printed, keep Typer's exit
        raise
    except UsageError as e:
        raise fail(usage_error_line(e), 2) from None


class OneLineUsageErrors(TyperGroup):
    """The root group: a usage error (unknown option or command, bad or missing value) is one
    line on stderr, ``mriseg: error: <reason> (see 'mriseg CMD --help')``, exit code 2.

    Typer would print the usage and a boxed panel instead. The root's options are parsed in
    this group's ``make_context`` and every subcommand's in its ``invoke``, so both are
    covered; ``--help`` and a bare ``mriseg`` print the help as before.
    """

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        with usage_errors_as_one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with usage_errors_as_one_line():
            return super().invoke(ctx)


def handled(fn: F) -> F:
    """Turn user-fixable errors into one line on stderr and exit 1 (traceback with --debug); a
    value the command line refuses (:class:`SettingError`) exits 2, as a usage error does."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except SettingError as e:  # a value the command line refuses: a usage error
            raise fail(str(e), 2) from None
        except MrisegError as e:
            if STATE["debug"]:
                raise
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            err.print("mriseg: interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # an unexpected failure: still one line unless --debug
            if STATE["debug"]:
                raise
            raise fail(
                f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)"
            ) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------ option values
# Options with a fixed set of values are Enum-typed: ``--help`` lists the values and anything
# else is a usage error (exit 2). The values come from the light modules that declare them
# (settings.py, data/layouts.py), so that ``--help`` needs no torch import; those spelled out
# here are checked against the library's own lists by tests/test_cli_conventions.py.
class _Choice(str, Enum):
    def __str__(self) -> str:
        return str(self.value)


def choice_enum(name: str, values: Iterable[str]) -> Any:
    """An Enum whose values are ``values`` (the option's choices, in their order)."""
    return _Choice(name, [(v.replace("-", "_"), v) for v in values])


Layout = choice_enum("Layout", LAYOUTS)
Split = choice_enum("Split", SPLITS)
MaskFormat = choice_enum("MaskFormat", ("auto", "png", "nii", "dcm"))  # workflow.predict.FORMATS
SynthMode = choice_enum("SynthMode", ("refer", "describe"))  # data.synth.MODES
TextAblation = choice_enum("TextAblation", ("empty", "shuffle"))  # evaluate_model.ABLATIONS


def plain(choice: Any) -> Any:
    """The plain string of an Enum-typed option (None stays None)."""
    return choice.value if isinstance(choice, Enum) else choice


def setting_parameter(s: Setting, help_text: str | None = None) -> inspect.Parameter:
    """The typer option of one row of settings.SETTINGS: its name, help (``help_text`` instead
    when given), range and choices; left out it is None (the preset's value) unless the row
    gives the option a default."""
    allowed = choices(s.type)
    kind = choice_enum(s.name, allowed) if allowed else s.type
    default = kind(s.cli_default) if allowed and s.cli_default is not None else s.cli_default
    annotation = kind if s.cli_default is not None else kind | None
    option = typer.Option(*s.flags, help=help_text or s.help, min=s.min, max=s.max)
    return inspect.Parameter(
        s.name, inspect.Parameter.KEYWORD_ONLY, default=default,
        annotation=Annotated[annotation, option],
    )  # fmt: skip


def with_settings(
    after: str, names: Iterable[str] | None = None, helps: dict[str, str] | None = None
) -> Callable[[F], F]:
    """A command that takes one option per train setting (settings.OPTIONS, or the rows
    ``names`` of it; in the table's order, listed after its parameter ``after``); it receives
    them as ``**settings`` with plain values (an Enum's string). ``helps`` gives an option
    another help where the command reads the setting for less than a run (``tokenize``: its
    tokenizers); type, default, range and choices stay the row's."""
    helps = helps or {}
    unknown = sorted({*(names or ()), *helps} - set(OPTIONS))
    if unknown:
        raise KeyError(f"no train setting is called {', '.join(unknown)}")
    wanted = set(OPTIONS if names is None else names)
    rows = [s for s in OPTIONS.values() if s.name in wanted]

    def decorate(fn: F) -> F:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(fn, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        at = [p.name for p in own].index(after) + 1
        table = [setting_parameter(s, helps.get(s.name)) for s in rows]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            settings = {s.name: plain(kwargs.pop(s.name)) for s in rows}
            return fn(**kwargs, **settings)

        wrapper.__signature__ = inspect.Signature([*own[:at], *table, *own[at:]])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def device_value(value: str) -> str:
    """``--device`` at parse time: a bad spelling is a usage error; availability is checked later."""
    name = value.strip().lower()
    if not DEVICE_RE.fullmatch(name):  # the message reads like a bad choice's (usage_error_line)
        raise typer.BadParameter(f"{value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    return name


def license_value(value: str | None) -> str | None:
    """``--license`` at parse time: an SPDX licence identifier or expression, else a usage
    error (:func:`mrisegcli.hub.spdx_expression`)."""
    if value is None:
        return None
    from mrisegcli.hub import spdx_expression

    try:
        return spdx_expression(value)
    except MrisegError as e:
        raise typer.BadParameter(str(e)) from None


def to_device(name: str) -> Any:
    """The torch device of a ``--device`` name (:func:`mrisegcli.devices.torch_device`)."""
    from mrisegcli.devices import torch_device

    return torch_device(name)


DeviceOpt = Annotated[
    str,
    typer.Option(
        callback=device_value, metavar="<auto|cpu|cuda|cuda:N|mps>", help=f"{DEVICE_FORMS}."
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
ForceOpt = Annotated[
    bool,
    typer.Option(help="Run prompts with words the model never learnt instead of refusing them."),
]
ChannelOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="Which channel of a 4-D NIfTI input (channels last, as in the Medical Segmentation "
        "Decathlon) is segmented.",
    ),
]
PresenceThresholdOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Below this calibrated presence the mask is empty ('not found'); default: the threshold the model chose on its val split; 0 draws every mask.",
    ),
]
MinComponentOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Volumes: drop the 3-D connected components of the mask smaller than this share of its largest (0 keeps all, 1 the largest only); default: the model's, chosen on validation volumes by 'mriseg calibrate --volumes'.",
    ),
]
ScopeOnlyOpt = Annotated[
    bool,
    typer.Option(help="Keep the model's presence head: refresh its synonym rules and scope only."),
]
VolumesOpt = Annotated[
    Path | None,
    typer.Option(
        help="nnU-Net folder of labelled validation volumes (not the ones you report on): choose there which small 3-D components a volume's mask drops.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
]
JsonLinesOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
LayoutOpt = Annotated[Layout | None, typer.Option(help="Force the layout (default: detected).")]
WorkersOpt = Annotated[int, typer.Option(min=0, help="Threads decoding images.")]
SpeculativeOpt = Annotated[
    bool,
    typer.Option(
        "--speculative/--no-speculative",
        help="Greedy next-token decoding drafted by the model's NkTP heads (same masks, fewer passes).",
    ),
]


def stage_printer(quiet: bool = False) -> Callable[[str, int | None], Any]:
    """The progress of each stage: a ``> stage`` line on stderr and its bar (none when quiet)."""
    from mrisegcli.progress import task_progress

    def stage(description: str, total: int | None) -> Any:
        if not quiet:
            from rich.markup import escape

            err.print(f"[bold]>[/] {escape(description)}")
        return task_progress(description, total, quiet=quiet)

    return stage


def warn(lines: Iterable[str]) -> None:
    for line in lines:
        err.print(line, style="bold yellow", markup=False)


def warn_weak_parts(reports: dict[str, dict], run_dir: Path | None = None) -> None:
    """Loud warnings on stderr for a freshly fitted mask tokenizer that reconstructs masks
    poorly and for a presence head of ``run_dir`` that finds few of the val findings."""
    from mrisegcli import runfolder
    from mrisegcli.report_lines import weak_presence_warnings, weak_tokenizer_warnings
    from mrisegcli.runinfo import read_config

    warn(weak_tokenizer_warnings(reports))
    if run_dir is not None and (Path(run_dir) / runfolder.CONFIG).is_file():
        warn(weak_presence_warnings(read_config(run_dir).get("presence")))


def emit_calibration(json_out: bool, report: dict[str, Any], out_dir: Path) -> None:
    """``calibrate``'s result: the warning of a weak presence head, then the line (or JSON)."""
    from mrisegcli.report_lines import calibrate_line

    warn_weak_parts({}, out_dir)
    emit(json_out, report, [calibrate_line(out_dir, report)])


def print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        out.print(line, markup=False)


def emit(json_out: bool, record: Any, lines: Iterable[str]) -> None:
    """A command's result: ``record`` as one JSON object with ``--json``, else ``lines``."""
    if json_out:
        print_json(record)
    else:
        print_lines(lines)


def given_options(ctx: Any) -> frozenset[str]:
    """The options set on the command line (or from the environment), not left at their default."""
    given = set()
    for name in ctx.params:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.add(name)
    return frozenset(given)


def say(line: str) -> None:
    """A line for the user on stderr (which model runs, and why)."""
    err.print(line, markup=False)


def check_predict_usage(
    inputs: list[str] | None,
    text: str | None,
    prompts: str | None,
    *,
    uncertainty: bool,
    samples: int,
) -> None:
    """``predict``'s options that only make sense together: a usage error (exit 2) otherwise."""
    see = " (see 'mriseg predict --help')"
    if prompts is not None and (text is not None or inputs):
        raise fail(
            "--prompts gives the inputs and their texts: use it without --text and without input paths"
            + see,
            2,
        )
    if prompts is None and not inputs:
        raise fail(
            "missing argument 'INPUTS...' (files, folders or -), or give --prompts FILE" + see, 2
        )
    if prompts is None and text is None:
        raise fail(
            "missing option '--text' (or give --prompts FILE with a text per input)" + see, 2
        )
    if uncertainty and samples < 2:
        raise fail("--uncertainty needs --samples 2 or more", 2)


class PredictLines:
    """Prints each predict result as it comes: one line (or JSON object) per input, and once a
    warning when the shipped chest-radiograph model is given something else."""

    def __init__(self, json_out: bool) -> None:
        self.json_out, self.shipped, self.warned = json_out, False, False

    @staticmethod
    def failed(results: list[Any]) -> bool:
        """``predict`` exits 1 when an input failed, or when every input was refused."""
        refused = [r for r in results if r.refused]
        return any(r.error and not r.refused for r in results) or bool(
            results and len(refused) == len(results)
        )

    def chose(self, choice: Any) -> None:
        """The model chosen (a shipped one's name says which inputs to warn about)."""
        self.shipped = choice.shipped

    def __call__(self, result: Any) -> None:
        from mrisegcli.report_lines import not_a_radiograph_warning, predict_line
        from mrisegcli.shipped import DEFAULT_MODEL

        chest = (result.model or self.shipped) == DEFAULT_MODEL  # routed, or the one model
        warning = (
            None if result.error or self.warned or not chest else not_a_radiograph_warning(result)
        )
        if warning is not None:
            self.warned = True
            err.print(warning, markup=False)
        if self.json_out:
            print_json(result.to_json())
            return
        stream, line = predict_line(result)
        (err if stream == "err" else out).print(line, markup=False)
