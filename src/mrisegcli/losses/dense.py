"""Dense prefix supervision: the image tokens' states predict the mask pixels under them.

In the prefix LM (``prefix_attention="bidirectional"``) every image token reads the prompt, so
its final hidden state can say which of its pixels belong to the referred region. A linear head
maps the state of image token (r, c) to the ``patch x patch`` mask logits of its patch; BCE +
soft Dice against the ground-truth mask at the model's input size:

    L_dense = BCE(fold(W h_img), m) + (1 - softDice(fold(W h_img), m))

The autoregressive mask tokens then read image states that already carry the answer's layout
at relative offset zero (their 2-D RoPE positions coincide). Training only: decoding never uses
the head. ``lambda_dense = 0`` switches it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mrisegcli.tokenizers.vq import soft_dice_loss


class DensePrefixHead(nn.Module):
    """(B, g*g, C) image-token states -> (B, 1, g*patch, g*patch) mask logits, and their loss."""

    def __init__(self, dim: int, grid: int, patch: int) -> None:
        super().__init__()
        self.grid, self.patch = grid, patch
        self.proj = nn.Linear(dim, patch * patch)

    def logits(self, h_BNC: torch.Tensor) -> torch.Tensor:
        B, g, p = h_BNC.shape[0], self.grid, self.patch
        x_BNP = self.proj(h_BNC).float()  # (B, g*g, p*p)
        return x_BNP.view(B, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(B, 1, g * p, g * p)

    def forward(self, h_BNC: torch.Tensor, mask_BSS: torch.Tensor | None) -> torch.Tensor:
        """Loss against ``mask_BSS`` (B, S, S), the batch's ``mask`` (None: it has none)."""
        if mask_BSS is None:
            raise KeyError("dense supervision is on: the batch needs 'mask' (B, S, S)")
        logits_B1SS = self.logits(h_BNC)
        S = self.grid * self.patch
        if mask_BSS.shape[-2:] != (S, S):
            raise ValueError(
                f"dense supervision needs (B, {S}, {S}) masks, got {tuple(mask_BSS.shape)}"
            )
        target_B1SS = (mask_BSS > 0.5).float().view(-1, 1, S, S)
        return F.binary_cross_entropy_with_logits(logits_B1SS, target_B1SS) + soft_dice_loss(
            logits_B1SS, target_B1SS
        )
