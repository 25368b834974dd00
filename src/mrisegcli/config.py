"""Frozen run configs, named presets, and their exact JSON round trip.

A :class:`RunConfig` holds every setting of a run: data size, the tokenizers' configs and
fitting budgets, the transformer preset, the training schedule and the loss switches. It is
saved in ``config.json`` of every run and every checkpoint, and read back strictly: an unknown
key is an error (a config from a newer mriseg), not silently dropped.

The sections :data:`StrategyConfig` and :data:`FitConfig` are built from the table of settings
(``settings.py``: one row per setting, with its type, default and help); ``RunConfig`` and
``TrainConfig`` declare their own fields, which the table's rows name.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass, replace
from typing import Any, Literal

from mrisegcli.errors import ConfigError
from mrisegcli.models.presets import get_preset
from mrisegcli.models.transformer import TransformerConfig
from mrisegcli.settings import PRESETS, ParadigmName, section_fields
from mrisegcli.tokenizers.image_vq import ImageVQConfig
from mrisegcli.tokenizers.mask_vq import MaskVQConfig
from mrisegcli.tokenizers.multiscale import MultiScaleConfig
from mrisegcli.training.loop import TrainConfig

Paradigm = ParadigmName


def _section(name: str, section: str, doc: str) -> Any:
    """A frozen config section whose fields are the rows of ``section`` in settings.SETTINGS."""
    cls = make_dataclass(name, section_fields(section), frozen=True)
    cls.__module__, cls.__doc__ = __name__, doc
    return cls


#: how long the tokenizers are fitted when a run has none (steps of batch_size)
FitConfig = _section("FitConfig", "fit", "How long the tokenizers are fitted (settings.py).")
#: training strategies (docs/method.md; settings.py); 0 switches a term off
StrategyConfig = _section(
    "StrategyConfig", "strategies", "Training strategies (docs/method.md; settings.py)."
)


@dataclass(frozen=True)
class RunConfig:
    paradigm: Paradigm = "next-token"
    preset: str = "tiny"
    image_size: int = 128
    text_len: int = 32
    # False: the image-only baseline -- the prompt is hidden from the model in training and at
    # inference (every text position is padding), so it segments from the image alone
    use_text: bool = True
    # reworded copies of every training row with a ``target`` (data/paraphrase.py); 0 = none
    paraphrases: int = 0
    seed: int = 0
    fit: FitConfig = field(default_factory=FitConfig)
    mask_vq: MaskVQConfig = field(default_factory=MaskVQConfig)
    image_vq: ImageVQConfig = field(default_factory=ImageVQConfig)
    multiscale: MultiScaleConfig = field(default_factory=MultiScaleConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    strategies: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _cpu() -> RunConfig:
    """The quickstart: 64-px model input (8x8 mask tokens), image as pixels through a small
    conv encoder (no image tokenizer to fit), a 0.8M-parameter transformer."""
    cfg = RunConfig(
        preset="cpu",
        transformer=get_preset("cpu"),
        strategies=StrategyConfig(image_input="pixels"),
        fit=FitConfig(mask_steps=2000, image_steps=600, multiscale_steps=2000),
        # about 0.3 s a step on two cores: 2500 steps are 12-13 minutes (docs/method.md)
        train=TrainConfig(
            steps=2500, batch_size=32, lr=3e-3, warmup_steps=100, eval_every=250, ckpt_every=250
        ),
    )
    return with_image_size(cfg, 64)


def _cxr() -> RunConfig:
    """The chest-radiograph preset: 128-px input through the conv encoder, 8x8 mask tokens of
    16x16 pixels (a deeper mask tokenizer), the cpu transformer, two reworded copies of every
    training row; the full-resolution refiner reading an image encoder with a residual block
    after each finer stage, mask queries on their target cells with the cell's image token,
    parallel scheduled sampling, and the presence probe trained with the model (docs/method.md;
    the levers measured in docs/benchmarks.md, the probe in docs/presence.md).
    A step of 32 takes 0.67 s on two CPU cores with ``--cpu-bf16`` (AVX512-BF16), 1.13 s
    without (``bench/bench_train.py --preset cxr``)."""
    from mrisegcli.tokenizers.mask_vq import MaskVQConfig
    from mrisegcli.tokenizers.multiscale import MultiScaleConfig

    cfg = RunConfig(
        preset="cxr",
        transformer=get_preset("cpu"),
        paraphrases=2,
        mask_vq=MaskVQConfig(downsample=16, channels=(16, 32, 64, 64)),
        multiscale=MultiScaleConfig(downsample=16, channels=(16, 32, 64, 64)),
        strategies=StrategyConfig(
            image_input="pixels",
            lambda_refine=1.0,
            mask_positions="target",
            mask_cell_image=True,
            scheduled_sampling=0.5,
            encoder_stage_blocks=1,
            lambda_presence=0.5,
        ),
        fit=FitConfig(mask_steps=1500, image_steps=600, multiscale_steps=1500),
        train=TrainConfig(
            steps=3500, batch_size=32, lr=3e-3, warmup_steps=100, eval_every=250, ckpt_every=250
        ),
    )
    return with_image_size(cfg, 128)


def _tiny() -> RunConfig:
    return RunConfig(
        preset="tiny",
        transformer=get_preset("tiny"),
        fit=FitConfig(mask_steps=1200, image_steps=800, multiscale_steps=1200),
        train=TrainConfig(
            steps=1500, batch_size=32, lr=2e-3, warmup_steps=100, eval_every=250, ckpt_every=250
        ),
    )


def _small() -> RunConfig:
    return RunConfig(
        preset="small",
        transformer=get_preset("small"),
        fit=FitConfig(mask_steps=3000, image_steps=3000, multiscale_steps=3000),
        train=TrainConfig(
            steps=10000, batch_size=64, lr=1e-3, warmup_steps=500, eval_every=1000, ckpt_every=500
        ),
    )


def _base() -> RunConfig:
    return RunConfig(
        preset="base",
        transformer=get_preset("base"),
        fit=FitConfig(mask_steps=6000, image_steps=6000, multiscale_steps=6000),
        train=TrainConfig(
            steps=30000,
            batch_size=128,
            lr=6e-4,
            warmup_steps=1000,
            eval_every=2000,
            ckpt_every=1000,
        ),
    )


RUN_PRESETS = {"cpu": _cpu, "cxr": _cxr, "tiny": _tiny, "small": _small, "base": _base}
if tuple(RUN_PRESETS) != PRESETS:  # the command line offers settings.PRESETS
    raise ImportError(f"settings.PRESETS {PRESETS} differs from RUN_PRESETS {tuple(RUN_PRESETS)}")


def default_preset(size: int | None) -> str:
    """The preset a run gets when none is named: ``cxr`` (the one that leads the U-Net + text
    at 15 minutes on kvasir-seg, jsrt and cxr-infection in docs/benchmarks.md) wherever its
    16-pixel mask tokens fit (``size`` left out, i.e. 128, or a multiple of 16 from 128 up);
    the 64-pixel quickstart ``cpu`` from 64 pixels; ``tiny`` below."""
    if size is None or (size >= 128 and size % 16 == 0):
        return "cxr"
    return "cpu" if size >= 64 else "tiny"


def run_preset(name: str) -> RunConfig:
    if name not in RUN_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(RUN_PRESETS)}")
    return RUN_PRESETS[name]()


def scale_schedule(
    grid: int, reference: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
) -> tuple[int, ...]:
    """The reference 16-grid schedule stretched to another grid side (always from 1 to grid)."""
    ref_grid = reference[-1]
    scaled = {max(1, round(s * grid / ref_grid)) for s in reference}
    return tuple(sorted(scaled | {1, grid}))


def with_image_size(cfg: RunConfig, size: int) -> RunConfig:
    """Set the pixel side everywhere it appears (tokenizers and the scale schedule included)."""
    ms = cfg.multiscale
    if size % ms.downsample:
        raise ConfigError(
            f"--size {size} must be a multiple of the tokenizer downsampling {ms.downsample}"
        )
    return replace(
        cfg,
        image_size=size,
        mask_vq=replace(cfg.mask_vq, image_size=size),
        image_vq=replace(cfg.image_vq, image_size=size),
        multiscale=replace(ms, image_size=size, scales=scale_schedule(size // ms.downsample)),
    )


# ----------------------------------------------------------------------------- JSON round trip
def to_dict(obj: Any) -> Any:
    """A dataclass tree -> plain JSON-able dicts/lists (tuples become lists)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        return tuple(_convert(a, v, where) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Rebuild dataclass ``cls`` from :func:`to_dict` output; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (written by a newer mriseg?)")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


__all__ = [
    "FitConfig",
    "RunConfig",
    "StrategyConfig",
    "RUN_PRESETS",
    "default_preset",
    "run_preset",
    "with_image_size",
    "to_dict",
    "from_dict",
]
