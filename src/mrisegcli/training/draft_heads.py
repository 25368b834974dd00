"""Draft heads fitted to the model's own greedy decoding (self-distillation).

Self-speculative decoding (:func:`mrisegcli.decode.next_token.generate_masks_speculative`)
keeps a drafted code only when the main head would have chosen it. The NkTP heads were trained
with the rest of the model to predict the *radiologist's* codes t+2 .. t+k, which is what
helps the model learn; for drafting, what counts is agreement with the *model's* own greedy
choices. This module refits only the heads' adapters (and may add heads) to exactly that:

1. decode every training case greedily (plain cached decoding) and keep the hidden state that
   predicts each code (:func:`greedy_states`: one prefill, one cached block pass over the codes,
   the same arithmetic decoding does);
2. train new :class:`~mrisegcli.losses.nktp.NextKHeads` on those states: head j's target at
   state n is the greedy code n + j, through the model's own (frozen) output head
   (:func:`fit_draft_heads`), selecting the step with the most codes per verifying pass on
   held-out states.

The transformer, the main head and every other weight stay as they are, and verification keeps
only codes the main head agrees with, so the decoded masks are the same codes as before: only
the number of forward passes changes.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mrisegcli.losses.nktp import IGNORE, NextKHeads, shifted_targets
from mrisegcli.models.next_token import NextTokenSegmenter

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # model input, text ids, text mask


@torch.no_grad()
def greedy_states(
    model: NextTokenSegmenter, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy codes (B, N) of a batch and the hidden states (B, N, C) that predict them: state n
    is the one decoding sees when it chooses code n (state 0 from the prefill)."""
    from mrisegcli.decode.next_token import generate_masks

    B, N = text_ids.shape[0], model.layout.n_mask
    codes_BN = generate_masks(model, image, text_ids, text_mask).reshape(B, N)
    model.setup_caches(B)
    h0_BC = model.prefill_state(image, text_ids, text_mask)
    h_BNC = model.decode_block(codes_BN[:, : N - 1], model.layout.prefix_len)
    return codes_BN, torch.cat([h0_BC[:, None], h_BNC], 1)


def collect_states(
    model: NextTokenSegmenter, batches: Iterable[Batch]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`greedy_states` over ``batches`` -> codes (M, N) and states (M, N, C), on the CPU."""
    codes, states = [], []
    for image, ids, tmask in batches:
        c, h = greedy_states(model, image, ids, tmask)
        codes.append(c.cpu())
        states.append(h.float().cpu())
    return torch.cat(codes), torch.cat(states)


def _hits(heads: NextKHeads, head_weight: torch.Tensor, states_MNC, codes_MN):
    """-> (M, N, k-1) bool: head j's guess at state n equals greedy code n + j, and the (M, N,
    k-1) bool of the targets that exist (inside the mask)."""
    with torch.no_grad():
        guess_MNJ = F.linear(heads.adapted(states_MNC), head_weight).argmax(-1)
    target_MNJ = shifted_targets(codes_MN, heads.k)
    valid_MNJ = target_MNJ != IGNORE
    return (guess_MNJ == target_MNJ) & valid_MNJ, valid_MNJ


def draft_runs(heads: NextKHeads, head_weight: torch.Tensor, states_MNC, codes_MN) -> torch.Tensor:
    """How many drafted codes verification would keep from every state -> (M, N) int: the run
    of leading heads j = 1 .. k-1 whose guess at state n equals greedy code n + j."""
    return _hits(heads, head_weight, states_MNC, codes_MN)[0].long().cumprod(-1).sum(-1)


def _measure(heads: NextKHeads, w: torch.Tensor, states, codes) -> tuple[float, list[float]]:
    """(:func:`passes_per_mask`, each head's share of right guesses) on (states, codes)."""
    ok_MNJ, valid_MNJ = _hits(heads, w, states, codes)
    passes = passes_per_mask(ok_MNJ.long().cumprod(-1).sum(-1))
    acc = ok_MNJ.sum((0, 1)) / valid_MNJ.sum((0, 1)).clamp_min(1)
    return passes, acc.tolist()


def passes_per_mask(runs_MN: torch.Tensor) -> float:
    """Verifying passes greedy speculative decoding (batch 1) makes per mask with these runs:
    from code n, a pass emits runs[n] + 1 codes; the mask's last code needs no pass."""
    M, N = runs_MN.shape
    total = 0
    for runs in runs_MN.tolist():
        n = 0
        while n < N - 1:
            total += 1
            n += min(runs[n], N - 1 - n) + 1
    return total / max(M, 1)


@dataclass
class DraftReport:
    """What :func:`fit_draft_heads` measured; ``*_before`` with the model's own heads."""

    k: int
    k_before: int
    train_sequences: int
    val_sequences: int
    steps: int
    best_step: int
    seconds: float
    val_passes_per_mask_before: float
    val_passes_per_mask: float
    val_head_accuracy_before: list[float] = field(default_factory=list)
    val_head_accuracy: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fit_draft_heads(
    model: NextTokenSegmenter,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    k: int,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    eval_every: int = 100,
    progress: Callable[..., None] | None = None,
) -> DraftReport:
    """Fit k-1 draft heads on (codes (M, N), states (M, N, C)) from :func:`collect_states` and
    install them in ``model`` (``model.nktp``, ``model.config.nktp_k``).

    Every head's cross-entropy counts equally (a guess is only useful if the ones before it
    were kept; the selection below weighs that in). The model's own heads start the first ones
    (new heads start at zero, i.e. as the main head). Selection: the step with the fewest
    verifying passes per mask on ``val`` (:func:`passes_per_mask`); when the model's current
    heads need fewer, they stay and the report says so (``k`` = ``k_before``). ``progress``
    (a :class:`mrisegcli.progress.StageProgress`, say) hears (step, steps, metrics) at
    every evaluation.
    """
    if k < 2:
        raise ValueError(f"draft heads need k >= 2, got {k}")
    codes_tr, h_tr = train
    codes_va, h_va = val
    w = model.mask_head.weight.detach().float().cpu()
    old = model.nktp
    k_before = old.k if old is not None else 1
    before_heads = copy.deepcopy(old).float().cpu() if old is not None else None
    if before_heads is not None:
        passes_before, acc_before = _measure(before_heads, w, h_va, codes_va)
    else:
        passes_before, acc_before = float(codes_va.shape[1] - 1), []

    gen = torch.Generator().manual_seed(seed)
    heads = NextKHeads(w.shape[1], k, old.gamma if old is not None else 0.5)
    if before_heads is not None:
        with torch.no_grad():
            for a, b in zip(heads.adapters, before_heads.adapters, strict=False):
                a.weight.copy_(b.weight)
    targets_tr = shifted_targets(codes_tr, k)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    best = (passes_per_mask(draft_runs(heads, w, h_va, codes_va)), 0, copy.deepcopy(heads))
    t0 = time.perf_counter()
    M = codes_tr.shape[0]
    for step in range(1, steps + 1):
        idx = torch.randint(0, M, (min(batch, M),), generator=gen)
        logits_BNJK = F.linear(heads.adapted(h_tr[idx]), w)
        loss = F.cross_entropy(
            logits_BNJK.flatten(0, 2), targets_tr[idx].flatten(), ignore_index=IGNORE
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            p = passes_per_mask(draft_runs(heads, w, h_va, codes_va))
            if p < best[0]:
                best = (p, step, copy.deepcopy(heads))
            if progress is not None:
                progress(step, steps, {"loss": loss.detach().item(), "val_passes": p})
    seconds = time.perf_counter() - t0
    passes, best_step, heads = best
    if before_heads is not None and passes_before <= passes:  # ours are no better: keep theirs
        passes, acc, k = passes_before, acc_before, k_before
    else:
        acc = _measure(heads, w, h_va, codes_va)[1]
        param = next(model.parameters())
        model.nktp = heads.to(device=param.device, dtype=param.dtype)
        model.config = dataclasses.replace(model.config, nktp_k=k)
    return DraftReport(
        k=k,
        k_before=k_before,
        train_sequences=int(M),
        val_sequences=int(codes_va.shape[0]),
        steps=steps,
        best_step=best_step,
        seconds=seconds,
        val_passes_per_mask_before=passes_before,
        val_passes_per_mask=passes,
        val_head_accuracy_before=acc_before,
        val_head_accuracy=acc,
    )
