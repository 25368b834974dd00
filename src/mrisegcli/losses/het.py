"""HET: a memory of hard tokens, up-weighted when their sample comes back.

The memory holds a score s in [0, 1] per (sample, position), an exponentially weighted rate
of mis-predictions (argmax != target) over the visits of that sample:

    weight = 1 + alpha * s                      (read before the step)
    s <- decay * s + (1 - decay) * miss         (written after the step)

so a token missed once is weighted up next time and fades when predicted correctly; one
missed on every visit tends to weight 1 + alpha. Sample ids are integers; they are folded
into ``num_buckets`` rows by modulo (size the memory to the training set to avoid sharing).
The scores are a buffer, so checkpoints carry them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HardTokenMemory(nn.Module):
    """Decaying per-token mis-prediction scores keyed by (sample id, position)."""

    def __init__(self, num_buckets: int, seq_len: int, decay: float = 0.5) -> None:
        super().__init__()
        if num_buckets <= 0 or seq_len <= 0:
            raise ValueError("HardTokenMemory needs positive num_buckets and seq_len")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("scores", torch.zeros(num_buckets, seq_len))

    def _rows(self, ids_B: torch.Tensor) -> torch.Tensor:
        return ids_B.long().remainder(self.scores.shape[0])

    def weights(self, ids_B: torch.Tensor, alpha: float) -> torch.Tensor:
        """(B,) sample ids -> (B, seq_len) CE weights 1 + alpha * score."""
        return 1.0 + alpha * self.scores[self._rows(ids_B)]

    @torch.no_grad()
    def update(self, ids_B: torch.Tensor, miss_BN: torch.Tensor) -> None:
        """Decay the scores of these samples and raise those of tokens missed this time."""
        rows = self._rows(ids_B)
        new = self.decay * self.scores[rows] + (1.0 - self.decay) * miss_BN.to(self.scores.dtype)
        self.scores[rows] = new


def weighted_ce(
    logits_BNK: torch.Tensor, targets_BN: torch.Tensor, weights_BN: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy with per-token weights, normalised by the weight sum (a re-weighting)."""
    nll_BN = F.cross_entropy(
        logits_BNK.flatten(0, 1).float(), targets_BN.flatten(), reduction="none"
    )
    w = weights_BN.flatten().float()
    return (w * nll_BN).sum() / w.sum()
