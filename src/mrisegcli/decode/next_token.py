"""Next-token mask decoding: one prefill over image + text, then one mask token per step.

The decode step reads and writes the model's static KV cache, so its tensors keep their
addresses from step to step; :func:`decode_one_token` is the small pure function that is
compiled when asked: ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) on CUDA, plain
``torch.compile`` (Inductor's C++ kernels; it takes about a minute the first time) on a CPU.
Eager steps (:meth:`NextTokenSegmenter.decode_next`) attend only to the filled prefix of the
cache (slots [0, slot + 1)), which halves the keys read on average, and build nothing per step
(the RoPE rotation is a table row, the mask a view of the key padding); the compiled step
reads the whole cache so that every step has the same shapes and one compiled graph serves
them all.

:func:`generate_masks_uncached` recomputes the whole sequence at every step; it is the
reference for tests and the baseline for the speed benchmark. Both draw tokens through the same
loop (:func:`_draw_tokens`), so with the same generator they draw the same random numbers.

Every decoder also returns the prefill's pass over the prefix (:class:`MaskDecode`): the
refiner, the dense head and the presence features read those states instead of running the image
encoder and the prefix again (the prefix's states do not depend on the mask tokens). A prefill
run under autocast returns none: its states are rounded to the autocast dtype, and the heads read
a full-precision pass instead, as before.

The model should be in eval mode (dropout would make every step random).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mrisegcli.decode.sampling import Sampler, logits_to_probs
from mrisegcli.models.next_token import NextTokenSegmenter, PrefixStates

DecodeFn = Callable[[NextTokenSegmenter, torch.Tensor, torch.Tensor, int], torch.Tensor]
# (n, codes_BN) -> (B, Km) logits of mask token n, given codes_BN[:, :n]
NextLogits = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class MaskDecode:
    """What a decoder gives: the codes and the prefill's pass over the prefix."""

    codes: torch.Tensor  # (B, Gm, Gm) int64 mask codes
    # the prefill's states and encoder maps (the heads' and the presence features' input);
    # None when the prefill ran under autocast
    prefix: PrefixStates | None


def prefill(
    model: NextTokenSegmenter, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, PrefixStates]:
    """Fill the caches with BOS..BOM -> (B, Km) logits of the first mask token and the pass's
    :class:`PrefixStates`."""
    prefix = model.prefill_prefix(image, text_ids, text_mask)
    return model.mask_head(prefix.h_BPC[:, -1]), prefix


def decode_one_token(
    model: NextTokenSegmenter, tok_B: torch.Tensor, input_pos: torch.Tensor, n_keys: int
) -> torch.Tensor:
    """Feed one mask code per sequence at cache slot ``input_pos`` (1,), attending to cache
    slots [0, n_keys) -> (B, Km) logits."""
    return model.decode_step(tok_B, input_pos, n_keys)


def _param(model: torch.nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _draw_tokens(
    logits_BK: torch.Tensor, next_logits: NextLogits, n_mask: int, sampler: Sampler
) -> torch.Tensor:
    """Draw mask token 0 from ``logits_BK``, then token n from ``next_logits(n, codes)`` -> (B, n_mask)."""
    codes_BN = torch.empty(logits_BK.shape[0], n_mask, dtype=torch.long, device=logits_BK.device)
    codes_BN[:, 0] = sampler(logits_BK)
    for n in range(1, n_mask):
        codes_BN[:, n] = sampler(next_logits(n, codes_BN))
    return codes_BN


class MaskGenerator:
    """Batched cached decoding; holds the (optionally compiled) decode step across calls.

    ``compile`` compiles the decode step (CUDA graphs on CUDA, C++ kernels on a CPU);
    ``amp_dtype`` (e.g. ``torch.bfloat16`` autocast, with the KV cache in that dtype) takes
    effect only when the model is on CUDA; elsewhere decoding runs in the model's dtype. Each step attends to the filled prefix of the cache, unless ``fixed_shapes``
    (implied by a compiled step): then it reads the whole cache, so that every step has the same
    shapes and one CUDA graph serves all of them (same codes, more keys read per step).
    """

    def __init__(
        self,
        model: NextTokenSegmenter,
        *,
        compile: bool = False,
        amp_dtype: torch.dtype | None = None,
        fixed_shapes: bool = False,
    ) -> None:
        self.model = model
        on_cuda = _param(model).device.type == "cuda"
        self.amp_dtype = amp_dtype if on_cuda else None
        self.step: DecodeFn = decode_one_token
        self.fixed_shapes = fixed_shapes or compile
        if compile and on_cuda:
            self.step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        elif compile:
            self.step = torch.compile(decode_one_token, fullgraph=True, dynamic=False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """-> (B, Gm, Gm) int64 mask codes."""
        return self.decode(
            image, text_ids, text_mask, temperature=temperature, top_k=top_k, generator=generator
        ).codes

    @torch.no_grad()
    def decode(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> MaskDecode:
        """-> the (B, Gm, Gm) codes and the prefill's states (none under autocast)."""
        model, lay = self.model, self.model.layout
        B = text_ids.shape[0]
        device = _param(model).device
        model.setup_caches(B, dtype=self.amp_dtype or _param(model).dtype, device=device)
        slots = torch.arange(
            lay.prefix_len, lay.input_len, device=device
        )  # slot of mask token n is slots[n]
        n_cache = model.transformer.max_len

        def next_logits(n: int, codes_BN: torch.Tensor) -> torch.Tensor:
            # token n-1 goes to slot prefix_len + n - 1; the filled prefix ends right after it
            if not self.fixed_shapes:  # eager: nothing built per step (model.decode_next)
                return model.decode_next(codes_BN[:, n - 1], lay.prefix_len + n)
            return self.step(model, codes_BN[:, n - 1], slots[n - 1 : n], n_cache)

        sampler = Sampler(temperature, top_k, generator)
        with self._autocast():
            first_BK, prefix = prefill(model, image, text_ids, text_mask)
            codes_BN = _draw_tokens(first_BK, next_logits, lay.n_mask, sampler)
        g = model.config.mask_grid
        return MaskDecode(codes_BN.view(B, g, g), prefix if self.amp_dtype is None else None)


def generate_masks_speculative(
    model: NextTokenSegmenter,
    image: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    stats: dict[str, float] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The (B, Gm, Gm) codes of :func:`decode_speculative`."""
    return decode_speculative(
        model,
        image,
        text_ids,
        text_mask,
        stats=stats,
        temperature=temperature,
        top_k=top_k,
        generator=generator,
    ).codes


@torch.no_grad()
def decode_speculative(
    model: NextTokenSegmenter,
    image: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    stats: dict[str, float] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> MaskDecode:
    """Decoding drafted by the model's own NkTP heads -> the (B, Gm, Gm) codes and the
    prefill's states (:class:`MaskDecode`): greedy by default, the same codes as greedy
    :func:`generate_masks`; with ``temperature > 0`` speculative sampling
    (:func:`_speculative_sampling`), whose codes have the distribution of plain sampling.

    From the state that predicts code n, the main head gives code n (exact) and the k-1 NkTP
    heads guess codes n+1 .. n+k-1. One cached pass over that block gives the main head's
    choice after each of its codes; the guesses are kept up to the first one the main head
    would not have chosen. A batch advances by the shortest run kept by any of its sequences,
    so every sequence's codes are exactly greedy. Cache slots past the kept codes are stale but
    never read: the next block overwrites them before any query can see them.

    ``stats``, when given, receives ``passes`` (forward passes after prefill), ``accepted``
    (guesses the main head agreed with), ``drafted`` (guesses made) and ``uneven`` (passes where
    the sequences of the batch kept runs of different lengths).
    """
    if temperature > 0:
        return _speculative_sampling(
            model, image, text_ids, text_mask, Sampler(temperature, top_k, generator), stats
        )
    lay = model.layout
    B, N = text_ids.shape[0], lay.n_mask
    device = _param(model).device
    model.setup_caches(B, dtype=_param(model).dtype, device=device)
    codes_BN = torch.empty(B, N, dtype=torch.long, device=device)
    # (B, k): code n, then the guesses; the verify pass below drafts the next block too
    prefix = model.prefill_prefix(image, text_ids, text_mask)
    draft_Bk = model.draft_logits(prefix.h_BPC[:, -1]).argmax(-1)
    n, passes, accepted, drafted, uneven = 0, 0, 0, 0, 0
    while n < N:
        block_BL = draft_Bk[:, : N - n]  # (B, L): code n, then guesses
        L = block_BL.shape[1]
        L_feed = L - 1 if n + L == N else L  # the mask's last code is never fed back
        if L_feed == 0:
            codes_BN[:, n] = block_BL[:, 0]
            break
        h_BLC = model.decode_block(block_BL[:, :L_feed], lay.prefix_len + n)
        passes += 1
        # (B, L_feed): after block[:, :t+1], the main head's code n+1+t
        choice_BL = F.linear(h_BLC, model.mask_head.weight).argmax(-1)
        agree_BL = choice_BL[:, : L - 1] == block_BL[:, 1:]  # guess t+1 matches the main head
        kept = agree_BL.long().cumprod(1).sum(1).tolist()  # guesses kept per sequence
        a = min(kept)
        uneven += max(kept) != a
        drafted += (L - 1) * B
        accepted += sum(kept)
        codes_BN[:, n : n + a + 1] = block_BL[:, : a + 1]
        n += a + 1
        if n < N:  # then a < L_feed: the state after the kept codes predicts code n; only
            # its guesses are needed (drafting from every state would cost k x the logits)
            draft_Bk = model.draft_logits(h_BLC[:, a]).argmax(-1)
            draft_Bk[:, 0] = choice_BL[:, a]  # code n as verified (the same head, same state)
    if stats is not None:
        stats.update(
            passes=float(passes),
            accepted=float(accepted),
            drafted=float(drafted),
            uneven=float(uneven),
        )
    g = model.config.mask_grid
    return MaskDecode(codes_BN.view(B, g, g), prefix)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(..., K) probabilities -> (...) indices (the exponential race of :func:`sample`)."""
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


def _speculative_sampling(
    model: NextTokenSegmenter,
    image: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    sampler: Sampler,
    stats: dict[str, float] | None,
) -> MaskDecode:
    """Speculative sampling with the NkTP heads as the draft: codes distributed as plain sampling.

    The target p of every code is the main head's distribution after ``sampler``'s temperature
    and top-k (what plain sampling draws from); the draft q_j of the code j places ahead is the
    NkTP head j's, under the same transform. From the state that predicts code n: code n is
    drawn from p (or was decided by the previous pass), guesses g_j ~ q_j for codes n+j; one
    cached pass over the block gives p at each guess. Guess j is accepted with probability
    min(1, p(g_j) / q_j(g_j)); at the first rejection the code is drawn from the residual
    max(0, p - q_j) renormalised, which makes each emitted code distributed exactly as p
    (Leviathan et al. 2023, Chen et al. 2023). A batch advances by the shortest accepted run a;
    every sequence's code after the kept ones (its accepted guess a+1, or its residual draw) is
    carried to the next pass as that pass's first code, so stopping early for another sequence's
    sake changes no distribution.
    """
    lay = model.layout
    B, N = text_ids.shape[0], lay.n_mask
    device = _param(model).device
    model.setup_caches(B, dtype=_param(model).dtype, device=device)
    codes_BN = torch.empty(B, N, dtype=torch.long, device=device)
    # (B, k, K) logits of code n (p), then of the guesses (q_1 .. q_{k-1}); the verify pass
    # below gives the next block's
    prefix = model.prefill_prefix(image, text_ids, text_mask)
    draft_BkK = model.draft_logits(prefix.h_BPC[:, -1])
    gen, T, top_k = sampler.generator, sampler.temperature, sampler.top_k
    first_B: torch.Tensor | None = None  # code n when the previous pass decided it
    n, passes, accepted, drafted, uneven = 0, 0, 0, 0, 0
    while n < N:
        probs_BLK = logits_to_probs(draft_BkK[:, : N - n], T, top_k)  # p, then q_1 .. q_{L-1}
        L = probs_BLK.shape[1]
        block_BL = _draw(probs_BLK, gen)
        if first_B is not None:
            block_BL[:, 0] = first_B
        L_feed = L - 1 if n + L == N else L
        if L_feed == 0:
            codes_BN[:, n] = block_BL[:, 0]
            break
        h_BLC = model.decode_block(block_BL[:, :L_feed], lay.prefix_len + n)
        passes += 1
        next_BLkK = model.draft_logits(h_BLC)  # (B, L_feed, k, K)
        p_BLK = logits_to_probs(
            next_BLkK[:, :, 0], T, top_k
        )  # p of code n+1+t after block[:, :t+1]
        g_BG = block_BL[:, 1:]  # guesses (B, L-1), verified by p_BLK[:, : L-1]
        q_BGK = probs_BLK[:, 1:]
        p_g = p_BLK[:, : L - 1].gather(-1, g_BG[..., None])[..., 0]
        q_g = q_BGK.gather(-1, g_BG[..., None])[..., 0]
        u_BG = torch.rand(g_BG.shape, generator=gen, device=device)
        ok_BG = u_BG * q_g < p_g  # u < p/q without dividing (q(g) > 0: g was drawn from q)
        kept = ok_BG.long().cumprod(1).sum(1).tolist()
        a = min(kept)
        uneven += max(kept) != a
        drafted += (L - 1) * B
        accepted += sum(kept)
        codes_BN[:, n : n + a + 1] = block_BL[:, : a + 1]
        n += a + 1
        if n >= N:
            break
        draft_BkK = next_BLkK[:, a]  # from the state that predicts code n
        if a + 1 < L:  # guess a+1 exists: the accepted guess, or a draw from the residual
            residual_BK = (p_BLK[:, a] - q_BGK[:, a]).clamp_min(0)
            norm_B1 = residual_BK.sum(-1, keepdim=True)
            residual_BK = torch.where(
                norm_B1 > 0, residual_BK / norm_B1.clamp_min(1e-30), p_BLK[:, a]
            )
            first_B = torch.where(ok_BG[:, a], g_BG[:, a], _draw(residual_BK, gen))
        else:  # every guess kept and the block used up: code n is drawn from p next pass
            first_B = None
    if stats is not None:
        stats.update(
            passes=float(passes),
            accepted=float(accepted),
            drafted=float(drafted),
            uneven=float(uneven),
        )
    g = model.config.mask_grid
    return MaskDecode(codes_BN.view(B, g, g), prefix)


def generate_masks(
    model: NextTokenSegmenter,
    image: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    compile: bool = False,
    amp_dtype: torch.dtype | None = None,
    **sampling: Any,
) -> torch.Tensor:
    """Decode (B, Gm, Gm) mask codes with the KV cache, batched over images.

    ``sampling``: ``temperature``, ``top_k``, ``generator`` as in :meth:`MaskGenerator.__call__`.
    For repeated calls with ``compile=True`` keep one :class:`MaskGenerator` instead, so the
    compiled step is reused.
    """
    return MaskGenerator(model, compile=compile, amp_dtype=amp_dtype)(
        image, text_ids, text_mask, **sampling
    )


@torch.no_grad()
def generate_masks_uncached(
    model: NextTokenSegmenter,
    image: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    **sampling: Any,
) -> torch.Tensor:
    """Same result as :func:`generate_masks`, recomputing the full sequence for every token.

    ``sampling``: ``temperature``, ``top_k``, ``generator`` (the fields of :class:`Sampler`).
    """

    def logits_after(n: int, codes_BN: torch.Tensor) -> torch.Tensor:
        return model.mask_logits(image, text_ids, text_mask, codes_BN[:, :n])[:, -1]

    B, g = text_ids.shape[0], model.config.mask_grid
    first_BK = logits_after(0, torch.empty(B, 0, dtype=torch.long, device=_param(model).device))
    return _draw_tokens(first_BK, logits_after, model.layout.n_mask, Sampler(**sampling)).view(
        B, g, g
    )
