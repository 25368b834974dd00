"""NkTP: next-k token prediction, an auxiliary loss against exposure bias.

Besides the main head (hidden state at t -> token t+1), k-1 light heads predict tokens
t+2 .. t+k from the same hidden state, so each state must carry information about a longer
stretch of the mask than the single next code. At inference the extra heads draft codes for
self-speculative decoding (:func:`mrisegcli.decode.next_token.generate_masks_speculative`;
``mriseg draft-heads`` refits them to the model's own greedy codes for that).

    L_nktp = sum_{j=2..k} gamma^(j-1) * CE(head_j(h_t), y_{t+j-1})

Targets past the end of the mask are ignored (``IGNORE``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def shifted_targets(targets_BN: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) targets of the main head -> (B, N, k-1): column j-2 holds y[n + j - 1] (j=2..k).

    Entries past the end of the sequence are ``IGNORE``.
    """
    B, N = targets_BN.shape
    out_BNJ = torch.full(
        (B, N, max(k - 1, 0)), IGNORE, dtype=targets_BN.dtype, device=targets_BN.device
    )
    for j in range(2, k + 1):
        shift = j - 1
        if shift < N:
            out_BNJ[:, : N - shift, j - 2] = targets_BN[:, shift:]
    return out_BNJ


def distance_weights(k: int, gamma: float) -> list[float]:
    """Weights gamma^(j-1) for the extra heads j = 2..k (the main head has gamma^0 = 1)."""
    return [gamma ** (j - 1) for j in range(2, k + 1)]


def nktp_loss(logits_BNJK: torch.Tensor, targets_BNJ: torch.Tensor, gamma: float) -> torch.Tensor:
    """Sum over extra heads of gamma^(j-1) times the mean CE over that head's valid targets."""
    k = logits_BNJK.shape[2] + 1
    total = logits_BNJK.new_zeros((), dtype=torch.float32)
    for j, w in zip(range(2, k + 1), distance_weights(k, gamma), strict=True):
        tgt = targets_BNJ[:, :, j - 2]
        if (tgt != IGNORE).any():
            ce = F.cross_entropy(
                logits_BNJK[:, :, j - 2].flatten(0, 1).float(), tgt.flatten(), ignore_index=IGNORE
            )
            total = total + w * ce
    return total


class NextKHeads(nn.Module):
    """k-1 light residual adapters h + silu(W_j h), each followed by the shared output head.

    The adapters start at zero, so every extra head initially equals the main head and then
    learns its own offset; sharing the output matrix keeps them cheap.
    """

    def __init__(self, dim: int, k: int, gamma: float = 0.5) -> None:
        super().__init__()
        if k < 2:
            raise ValueError(f"NextKHeads needs k >= 2, got {k}")
        self.k, self.gamma = k, gamma
        self.adapters = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(k - 1))
        for a in self.adapters:
            nn.init.zeros_(a.weight)

    def adapted(self, h_xC: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., k-1, C) inputs h + silu(W_j h) of the extra heads,
        the k-1 adapters as one matmul (their weights side by side)."""
        w = torch.cat([a.weight for a in self.adapters])
        return h_xC[..., None, :] + F.silu(
            F.linear(h_xC, w).unflatten(-1, (len(self.adapters), -1))
        )

    def logits(
        self, h_BNC: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """(B, N, C) hidden states -> (B, N, k-1, K) logits of the extra heads."""
        return head(self.adapted(h_BNC))

    def forward(
        self,
        h_BNC: torch.Tensor,
        targets_BN: torch.Tensor,
        head: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The NkTP loss for hidden states whose main-head targets are ``targets_BN``."""
        return nktp_loss(self.logits(h_BNC, head), shifted_targets(targets_BN, self.k), self.gamma)
