"""Named transformer sizes: a registry of small functions that the CLI lists.

``tiny`` trains on a laptop CPU in minutes; ``small`` and ``base`` are for a GPU. Parameter
counts reported by :func:`list_presets` are for the next-token model on the standard
sequence (16x16 image codes from a 512-code VQ, 32 text tokens from an 8192-word vocabulary,
16x16 mask codes from a 512-code VQ, all training losses on).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from mrisegcli.errors import ConfigError
from mrisegcli.models.transformer import TransformerConfig

PRESETS: dict[str, Callable[[], TransformerConfig]] = {}


def register(
    name: str,
) -> Callable[[Callable[[], TransformerConfig]], Callable[[], TransformerConfig]]:
    """Decorator adding a preset function to :data:`PRESETS` under ``name``."""

    def add(fn: Callable[[], TransformerConfig]) -> Callable[[], TransformerConfig]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        PRESETS[name] = fn
        return fn

    return add


@register("cpu")
def cpu() -> TransformerConfig:
    """About 0.8M parameters in the blocks: the quickstart size, minutes on two CPU cores."""
    return TransformerConfig(dim=128, n_layers=4, n_heads=4, mlp_hidden=352, dropout=0.0)


@register("tiny")
def tiny() -> TransformerConfig:
    """About 1.8M parameters in the blocks (3.8M with embeddings); minutes on a CPU."""
    return TransformerConfig(dim=192, n_layers=4, n_heads=6, mlp_hidden=512, dropout=0.0)


@register("small")
def small() -> TransformerConfig:
    return TransformerConfig(dim=384, n_layers=8, n_heads=6, mlp_hidden=1024, dropout=0.0)


@register("base")
def base() -> TransformerConfig:
    return TransformerConfig(dim=768, n_layers=12, n_heads=12, mlp_hidden=2048, dropout=0.0)


def get_preset(name: str) -> TransformerConfig:
    """The config of preset ``name``; a ConfigError naming the choices otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


class PresetInfo(NamedTuple):
    name: str
    params: int


def count_params(cfg: TransformerConfig) -> int:
    """Parameters of a next-token model with this transformer on the standard sequence."""
    from mrisegcli.models.next_token import NextTokenConfig, NextTokenSegmenter

    with torch.device("meta"):  # shapes only, no memory
        model = NextTokenSegmenter(NextTokenConfig(transformer=cfg))
    return sum(p.numel() for p in model.parameters())


def list_presets() -> list[PresetInfo]:
    """(name, parameter count) of every registered preset, in registration order."""
    return [PresetInfo(name, count_params(fn())) for name, fn in PRESETS.items()]
