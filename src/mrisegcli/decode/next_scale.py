"""Next-scale mask decoding: one prefill over the condition, then one forward pass per scale.

Every token of a scale is sampled at once from that scale's logits; the quantiser turns the
sampled map into f_hat and the next scale's input (``next_input``). ``samples=N`` decodes N
masks per case in one batched run of B*N rows ordered case-major (row b*N + j is sample j of
case b): the condition is prefilled once per case and its cache rows are copied to the N
samples (:meth:`NextScaleSegmenter.repeat_cache`).

:func:`generate_scales_uncached` recomputes the full block-causal sequence at every scale; it is
the reference for tests and the baseline for the speed benchmark. Both run the same sampling
loop (:func:`_draw_scales`). The model should be in eval mode (dropout would make every step
random).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch

from mrisegcli.decode.sampling import Sampler
from mrisegcli.models.next_scale import NextScaleSegmenter
from mrisegcli.tokenizers.multiscale import MultiScaleMaskQuantizer

Temperature = float | Sequence[float]
# (k, x_BlCv) -> (B, p_k**2, Km) logits of scale k, given the quantiser's input x for scale k
NextLogits = Callable[[int, torch.Tensor], torch.Tensor]


def temperatures(temperature: Temperature, n_scales: int) -> list[float]:
    """A float for every scale, or a per-scale schedule of length ``n_scales``; all >= 0."""
    if isinstance(temperature, (int, float)):
        temps = [float(temperature)] * n_scales
    else:
        temps = [float(t) for t in temperature]
        if len(temps) != n_scales:
            raise ValueError(f"temperature schedule has {len(temps)} entries for {n_scales} scales")
    if any(t < 0 for t in temps):
        raise ValueError(f"temperatures must be >= 0, got {temps}")
    return temps


def fhat_to_logits(quantizer: MultiScaleMaskQuantizer, f_hat_BChw: torch.Tensor) -> torch.Tensor:
    """Mask logits (B, 1, S, S) of a partial reconstruction (f_hat after the first k scales)."""
    return quantizer.decoder(f_hat_BChw)


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """The quantiser runs outside autocast: f_hat accumulates in its own dtype."""
    return torch.autocast(device_type=device.type, enabled=False)


def _autocast(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _check_samples(samples: int) -> None:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")


def _draw_scales(
    logits_BlK: torch.Tensor,
    next_logits: NextLogits,
    quantizer: MultiScaleMaskQuantizer,
    samplers: Sequence[Sampler],
    return_steps: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Draw scale 0 from ``logits_BlK``, then scale k from ``next_logits(k, x)`` (x: the quantiser's
    input for scale k) -> (K token maps (B, p_k, p_k), mask logits after each scale if asked)."""
    BN, device = logits_BlK.shape[0], logits_BlK.device
    with _full_precision(device):
        f_hat_BChw = quantizer.empty_fhat(BN, device=device)
    idx_list: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    for k, p in enumerate(quantizer.scales):
        idx_Bpp = samplers[k](logits_BlK).view(BN, p, p)
        idx_list.append(idx_Bpp)
        with _full_precision(device):
            f_hat_BChw, x_BlCv = quantizer.next_input(k, f_hat_BChw, idx_Bpp)
            if return_steps:
                steps.append(fhat_to_logits(quantizer, f_hat_BChw))
        if x_BlCv is not None:  # None after the last scale
            logits_BlK = next_logits(k + 1, x_BlCv)
    return idx_list, steps


def _samplers(
    model: NextScaleSegmenter,
    temperature: Temperature = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Sampler]:
    """One :class:`Sampler` per scale (``temperature``: one value or a per-scale schedule)."""
    return [
        Sampler(t, top_k, generator) for t in temperatures(temperature, len(model.layout.scales))
    ]


@overload
def generate_scales(
    model: NextScaleSegmenter,
    quantizer: MultiScaleMaskQuantizer,
    image: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    samples: int = ...,
    temperature: Temperature = ...,
    top_k: int | None = ...,
    generator: torch.Generator | None = ...,
    return_steps: Literal[False] = ...,
    amp_dtype: torch.dtype | None = ...,
) -> list[torch.Tensor]: ...


@overload
def generate_scales(
    model: NextScaleSegmenter,
    quantizer: MultiScaleMaskQuantizer,
    image: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    samples: int = ...,
    temperature: Temperature = ...,
    top_k: int | None = ...,
    generator: torch.Generator | None = ...,
    return_steps: Literal[True],
    amp_dtype: torch.dtype | None = ...,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...


@torch.no_grad()
def generate_scales(
    model: NextScaleSegmenter,
    quantizer: MultiScaleMaskQuantizer,
    image: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    samples: int = 1,
    temperature: Temperature = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    return_steps: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decode K token maps [(B*N, p_k, p_k)] with the KV cache (N = ``samples``).

    ``temperature`` is one value or a per-scale schedule; 0 is greedy. With
    ``return_steps=True`` also returns the mask logits (B*N, 1, S, S) after each scale.
    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the transformer under autocast with the cache
    in that dtype.
    """
    _check_samples(samples)
    samplers = _samplers(model, temperature, top_k, generator)
    device = model.head.weight.device
    B = text_ids.shape[0]
    model.setup_caches(B * samples, dtype=amp_dtype or model.head.weight.dtype, device=device)
    with _autocast(device, amp_dtype):
        logits_BlK = model.prefill(image, text_ids, text_mask).repeat_interleave(samples, 0)
        model.repeat_cache(B, samples)

    def next_logits(k: int, x_BlCv: torch.Tensor) -> torch.Tensor:
        with _autocast(device, amp_dtype):
            return model.decode_scale(k, x_BlCv)

    idx_list, steps = _draw_scales(logits_BlK, next_logits, quantizer, samplers, return_steps)
    return (idx_list, steps) if return_steps else idx_list


@torch.no_grad()
def generate_scales_uncached(
    model: NextScaleSegmenter,
    quantizer: MultiScaleMaskQuantizer,
    image: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    **options: Any,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Same contract as :func:`generate_scales`, recomputing the whole sequence at every scale.

    ``options``: ``samples``, ``temperature``, ``top_k``, ``generator``, ``return_steps`` as
    there (no ``amp_dtype``). The inputs are expanded to B*N rows up front (no shared prefill);
    with the same ``generator`` it draws exactly the random numbers the cached decoder draws.
    """
    samples, return_steps = options.pop("samples", 1), options.pop("return_steps", False)
    _check_samples(samples)
    samplers = _samplers(model, **options)
    image, text_ids, text_mask = (
        t.repeat_interleave(samples, 0) for t in (image, text_ids, text_mask)
    )
    x_parts: list[torch.Tensor] = []  # inputs of scales 2..k, growing

    def logits_of(k: int, x_BlCv: torch.Tensor | None) -> torch.Tensor:
        if x_BlCv is not None:
            x_parts.append(x_BlCv)
        x_BnCv = (
            torch.cat(x_parts, 1)
            if x_parts
            else image.new_zeros(image.shape[0], 0, model.config.code_dim)
        )
        p = model.layout.scales[k]
        return model.scale_logits(image, text_ids, text_mask, x_BnCv)[:, -p * p :]

    idx_list, steps = _draw_scales(logits_of(0, None), logits_of, quantizer, samplers, return_steps)
    return (idx_list, steps) if return_steps else idx_list
