"""Every setting of a run, declared once: the table :data:`SETTINGS`.

A row says what a setting is called (``--scheduled-sampling`` on the command line), where its
value goes in a :class:`~mrisegcli.config.RunConfig` (``strategies.scheduled_sampling``), its
type (a ``Literal`` lists the allowed values), its default, its help and its range, and whether
a ``--resume`` may change it. From this table follow:

* the ``mriseg train`` options (``cli_support.with_settings`` turns each row with
  ``option=True`` into one), and those ``mriseg tokenize`` shares with it;
* the config sections ``StrategyConfig`` and ``FitConfig`` (``config.py`` builds them from the
  rows of their section; ``TrainConfig`` and ``RunConfig`` declare their own fields and
  defaults, the rows here give their options);
* the routing of the command line's values into the config (:func:`route`);
* the resume check (:data:`OPTION_FIELDS`, :data:`RESUMABLE`, used by ``runinfo.py``);
* the choices of every option with a fixed set of values (:func:`choices`);
* the strategy fields of the model configs (``NextTokenConfig``, ``NextScaleConfig``): a row
  that names a paradigm in ``models`` is a field of that model's config (:func:`model_fields`),
  which ``paradigms.py`` fills from the run's ``strategies``. Its default there is
  ``model_default`` where a row gives one: the value of the runs saved before the setting
  existed, so that their ``config.json`` loads as they were trained.

Adding a setting: one row here, and the code that uses the value. This module imports
neither torch nor the configs, so ``mriseg --help`` stays fast.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from mrisegcli.errors import MrisegError

ParadigmName = Literal["next-token", "next-scale"]
#: the named presets (``config.RUN_PRESETS`` builds one config for each, in this order)
PresetName = Literal["cpu", "cxr", "tiny", "small", "base"]
PRESETS: tuple[str, ...] = typing.get_args(PresetName)
ImageInput = Literal["codes", "pixels"]
# (in the order ``--help`` lists them)
PrefixAttention = Literal["bidirectional", "causal"]
MaskPositions = Literal["target", "fed"]

_MISSING: Any = object()


class SettingError(MrisegError):
    """A value the command line refuses (a usage error: exit code 2)."""


@dataclass(frozen=True)
class Setting:
    """One setting of a run (see the module docstring)."""

    #: the Python name of the option (``--name`` with dashes); a config-only row: the field's
    name: str
    #: where the value goes: ``section.field`` of RunConfig, or a field of RunConfig itself
    path: str
    #: int, float, bool, str, or a Literal of the allowed values
    type: Any
    #: the option's help; for a config-only row, what the field means
    help: str
    #: the config's default (the sections built from this table: strategies, fit)
    default: Any = _MISSING
    #: a ``mriseg train`` option (False: a config field without one)
    option: bool = True
    #: the option's default when it is not left to the preset (None: the preset's value)
    cli_default: Any = None
    min: float | None = None
    max: float | None = None
    #: the option's spelling when not ``--name`` (a bool: ``--x/--no-x``, or one flag)
    flags: tuple[str, ...] = ()
    #: a flag that switches its (bool) field off when given (``--no-text`` -> use_text False)
    negates: bool = False
    #: a ``--resume`` may change it (the schedule's length, bookkeeping, the precision)
    resumable: bool = False
    #: the paradigms whose model reads it: a field of the same name in their model config
    models: tuple[str, ...] = ()
    #: the model config's default when not ``default``: the value of the runs saved before
    #: the setting existed (their config.json lacks it and loads as they were trained)
    model_default: Any = _MISSING

    @property
    def section(self) -> str:
        """The RunConfig section (``strategies``, ``fit``, ``train``) or ``""`` for RunConfig."""
        return self.path.rpartition(".")[0]

    @property
    def field(self) -> str:
        return self.path.rpartition(".")[2]

    @property
    def flag(self) -> str:
        """``--scheduled-sampling``: how messages name the option."""
        return "--" + self.name.replace("_", "-")


def _row(name: str, path: str, type_: Any, help_: str, **kw: Any) -> Setting:
    return Setting(name, path, type_, help_, **kw)


_S = "strategies."
_NT: tuple[str, ...] = ("next-token",)
_BOTH: tuple[str, ...] = ("next-token", "next-scale")
# fmt: off
SETTINGS: tuple[Setting, ...] = (
    # ------------------------------------------------------------------ the run and its schedule
    _row("paradigm", "paradigm", ParadigmName, "Autoregressive paradigm.", cli_default="next-token"),
    _row("preset", "preset", PresetName,
         "Model size and budget (see `mriseg presets`). Default: cxr (the best measured, "
         "docs/benchmarks.md) at --size 128 and above; cpu from 64 px; tiny below."),
    _row("steps", "train.steps", int, "Optimiser steps (default: the preset's).", min=1,
         resumable=True),
    _row("epochs", "train.epochs", int, "Train for this many epochs instead of --steps.", min=1),
    _row("batch_size", "train.batch_size", int, "Global batch size.", min=1),
    _row("lr", "train.lr", float, "Peak learning rate."),
    _row("eval_every", "train.eval_every", int, "Validate (and keep the best) every N steps.",
         min=1, resumable=True),
    _row("ckpt_every", "train.ckpt_every", int, "Checkpoint every N steps.", min=1,
         resumable=True),
    _row("size", "image_size", int, "Model input side in pixels (default 128)."),
    # ------------------------------------------------------------------ fitting the tokenizers
    _row("mask_steps", "fit.mask_steps", int, "Mask tokenizer fitting steps.", default=1500),
    _row("image_steps", "fit.image_steps", int, "Image tokenizer fitting steps.", default=1500),
    _row("multiscale_steps", "fit.multiscale_steps", int, "Multi-scale tokenizer fitting steps.",
         default=1500),
    _row("batch_size", "fit.batch_size", int, "Tokenizer fitting batch.", default=32,
         option=False),
    _row("lr", "fit.lr", float, "Tokenizer fitting learning rate.", default=2e-3, option=False),
    _row("text_vocab_size", "fit.text_vocab_size", int, "WordPiece vocabulary of the text "
         "tokenizer.", default=1000, option=False),
    # ------------------------------------------------------------------ training strategies
    # (docs/method.md); 0 switches a term off. ``models``: the paradigms whose model config
    # carries the setting as a field (models/next_token.py, models/next_scale.py); augment and
    # encoder_stage_blocks are read by the training loop and the image encoder instead.
    # NkTP: extra heads for tokens t+2..t+k, weight gamma^(j-1) (losses/nktp.py)
    _row("nktp_k", _S + "nktp_k", int, "Next-k token prediction: k (1 = off).", default=3,
         models=_NT),
    _row("nktp_gamma", _S + "nktp_gamma", float, "NkTP: weight gamma^(j-1) of head j.",
         default=0.5, option=False, models=_NT),
    _row("lambda_nktp", _S + "lambda_nktp", float, "NkTP loss weight.", default=1.0,
         option=False, models=_NT),
    # TCL: InfoNCE of hidden states vs mask-code embeddings (losses/tcl.py)
    _row("lambda_tcl", _S + "lambda_tcl", float, "Token contrastive loss weight (0 = off).",
         default=0.1, models=_NT),
    # HET: hard-token memory, CE weight 1 + alpha * score (losses/het.py)
    _row("het_alpha", _S + "het_alpha", float, "Hard-error-token weight (0 = off).", default=1.0,
         models=_NT),
    _row("het_decay", _S + "het_decay", float, "Hard-error-token memory decay.", default=0.5,
         option=False, models=_NT),
    _row("image_input", _S + "image_input", ImageInput, "next-token image tokens.",
         default="codes", models=_NT),
    # exposure bias: each teacher-forced input mask token is replaced by a random code (targets
    # unchanged), so that a state cannot just copy its neighbours' codes and must read the image
    _row("input_noise", _S + "input_noise", float,
         "Share of teacher-forced mask tokens replaced by random codes (0 = off).", default=0.3,
         models=_NT, model_default=0.0),
    # exposure bias from the model's own errors (parallel scheduled sampling): a first pass
    # without gradients predicts every mask token from the true codes, and each teacher-forced
    # input is replaced by that prediction, so that the model learns to continue from the
    # mistakes it makes when decoding
    _row("scheduled_sampling", _S + "scheduled_sampling", float,
         "Share of teacher-forced mask tokens replaced by the model's own predictions (0 = off).",
         default=0.0, min=0.0, max=0.99, models=_NT),
    # training/augment.py, both paradigms
    _row("augment", _S + "augment", float,
         "Share of training samples randomly rotated, zoomed, shifted and re-contrasted "
         "(0 = off; no flips).", default=0.0, min=0.0, max=1.0),
    # image-token states predict their patch's mask pixels (losses/dense.py); the next-token
    # model needs the bidirectional prefix for it, so that image tokens read the text
    _row("lambda_dense", _S + "lambda_dense", float, "Dense prefix supervision weight (0 = off).",
         default=1.0, models=_BOTH, model_default=0.0),
    # a linear probe on the prefix states that presence.py reads, trained with the model on
    # "the mask is not empty" (losses/presence.py): the states learn whether the target is there
    _row("lambda_presence", _S + "lambda_presence", float,
         "Presence probe weight: the prefix states learn whether the target is there "
         "(0 = off; next-token).", default=0.0, min=0.0, models=_NT),
    # the full-resolution refiner of the next-token model (models/refiner.py): a U-Net decoder
    # from the decided codes, the image-token states and the encoder's feature maps
    _row("lambda_refine", _S + "lambda_refine", float,
         "Full-resolution refiner weight (0 = off; next-token, pixels).", default=0.0,
         models=_NT),
    # free-running codes are worse than the teacher-forced ones the refiner is trained on: with
    # random codes among them it learns to check the codes against the image
    _row("refine_code_noise", _S + "refine_code_noise", float,
         "Share of the refiner's training codes replaced by random ones (0 = off).",
         default=0.0, min=0.0, max=0.99, models=_NT),
    # off: the refiner's logits come at half the side, upsampled bilinearly
    _row("refine_full_res", _S + "refine_full_res", bool,
         "The refiner's last level at the input side, reading the pixels.", default=False,
         flags=("--refine-full-res/--no-refine-full-res",), models=_NT),
    # models/image_encoder.py: deeper features for the refiner's skip connections
    _row("encoder_stage_blocks", _S + "encoder_stage_blocks", int,
         "Residual blocks after each finer stage of the conv image encoder (pixels input).",
         default=0, min=0, max=8),
    # attention inside BOS..BOM: "causal" (one left-to-right sequence) or "bidirectional"
    # (prefix LM: image and text tokens read each other; mask tokens stay causal)
    _row("prefix_attention", _S + "prefix_attention", PrefixAttention,
         "next-token image+text attention.", default="bidirectional", models=_NT,
         model_default="causal"),
    # "fed": where the fed code lies (cell n-1; BOM on the text diagonal); "target": on cell n,
    # so that the query predicting a cell sits on the image patch under it
    _row("mask_positions", _S + "mask_positions", MaskPositions,
         "next-token: RoPE place of the state predicting a mask cell: on that cell (target) or "
         "on the cell of the code fed in (fed).", default="fed", models=_NT),
    # a projection of the image token of the cell (needs image_grid == mask_grid): the local
    # evidence for a cell's code sits in the residual stream of the token that decides it
    _row("mask_cell_image", _S + "mask_cell_image", bool,
         "next-token: each fed mask token also carries the image token of the cell it predicts.",
         default=False, flags=("--mask-cell-image/--no-mask-cell-image",), models=_NT),
    # ------------------------------------------------------------------ the text
    _row("no_text", "use_text", bool, "Image-only baseline: the model never sees the prompt.",
         cli_default=False, flags=("--no-text",), negates=True),
    _row("paraphrases", "paraphrases", int,
         "Reworded copies of each training row with a 'target' column (0 = none).", min=0),
    _row("text_len", "text_len", int,
         "Text context in tokens (lengthened when a training text is longer).", min=1, max=512),
    # ------------------------------------------------------------------ time and precision
    _row("max_minutes", "train.max_minutes", float,
         "Wall-clock budget of the whole run in minutes (tokenizers and cache included); the "
         "schedule follows it.", min=0.1, resumable=True),
    _row("cpu_bf16", "train.cpu_bf16", bool,
         "bf16 autocast on the CPU, ~1.5x the steps a minute where the CPU computes bf16 "
         "natively (AVX512-BF16/AMX). Default: on exactly there (the run's config.json records "
         "which).", flags=("--cpu-bf16/--no-cpu-bf16",), resumable=True),
    _row("seed", "seed", int, "Random seed.", cli_default=0),
)
# fmt: on

#: the rows that are ``mriseg train`` options, by name
OPTIONS: dict[str, Setting] = {s.name: s for s in SETTINGS if s.option}
#: train option (its Python name) -> the RunConfig field it sets
OPTION_FIELDS: dict[str, str] = {s.name: s.path for s in OPTIONS.values()}
#: train options a --resume may change: the schedule's length, bookkeeping and the arithmetic
#: precision on a CPU (the model, data and losses stay the run's)
RESUMABLE: tuple[str, ...] = tuple(s.name for s in OPTIONS.values() if s.resumable)


def choices(type_: Any) -> tuple[str, ...] | None:
    """The allowed values of a Literal type (None for any other type)."""
    return typing.get_args(type_) if typing.get_origin(type_) is Literal else None


def section_fields(section: str) -> list[tuple[str, Any, Any]]:
    """``(field, type, default)`` of every row of ``section``, for ``dataclasses.make_dataclass``."""
    from dataclasses import field

    rows = [s for s in SETTINGS if s.section == section]
    missing = [s.name for s in rows if s.default is _MISSING]
    if missing:
        raise TypeError(f"settings of the {section} section without a default: {missing}")
    return [(s.field, s.type, field(default=s.default)) for s in rows]


def model_fields(paradigm: str) -> list[tuple[str, Any, Any]]:
    """``(field, type, default)`` of every setting the model of ``paradigm`` reads (the rows
    that name it in ``models``), for its config's ``dataclasses.make_dataclass``: the default
    is the row's ``model_default`` where it gives one, else its ``default``."""
    from dataclasses import field

    rows = [s for s in SETTINGS if paradigm in s.models]
    defaults = [s.default if s.model_default is _MISSING else s.model_default for s in rows]
    return [(s.field, s.type, field(default=d)) for s, d in zip(rows, defaults, strict=True)]


def check_choice(name: str, value: Any) -> None:
    """A value of an option with fixed choices that is not one of them: a usage error."""
    allowed = choices(OPTIONS[name].type)
    if allowed and value not in allowed:
        raise SettingError(
            f"{OPTIONS[name].flag} must be {' or '.join(sorted(allowed))}, not {value!r}"
        )


def route(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Option values -> ``{section: {field: value}}`` (``""``: RunConfig's own fields). Options
    left out (None) are not routed; a negating flag that is not given neither; a value outside
    its choices is a :class:`SettingError`."""
    routed: dict[str, dict[str, Any]] = {"": {}, "train": {}, "strategies": {}, "fit": {}}
    for name, value in values.items():
        if name not in OPTIONS:
            raise MrisegError(f"internal error: no setting is called {name!r}")
        s = OPTIONS[name]
        if value is None or (s.negates and not value):
            continue
        check_choice(name, value)
        routed[s.section][s.field] = (not value) if s.negates else value
    return routed


__all__ = [
    "OPTIONS",
    "OPTION_FIELDS",
    "PRESETS",
    "RESUMABLE",
    "SETTINGS",
    "Setting",
    "SettingError",
    "check_choice",
    "choices",
    "model_fields",
    "route",
    "section_fields",
]
