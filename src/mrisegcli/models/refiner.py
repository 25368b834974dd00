"""Full-resolution mask from the decided codes: a detokenizer that also reads the image.

The autoregressive model decides *which* region the prompt refers to, one coarse code per
``patch x patch`` pixels. The mask tokenizer's decoder turns the codes back into pixels, but it
sees only the codes, so every boundary is drawn from a 16-pixel grid. The refiner is a small
U-Net decoder that starts from the same codes and adds what the tokens cannot carry:

* the decided codes, embedded and placed on their grid (the decision);
* the transformer's final states of the image tokens (text-aware: in the prefix LM they read
  the prompt), projected onto the same grid;
* the image encoder's conv feature maps after every stride-2 stage (skip connections) and the
  image itself, so that boundaries are placed at full resolution.

Coarse to fine, each level upsamples by two, concatenates the skip features of its resolution
and applies two 3x3 conv + GroupNorm + SiLU layers; a 1x1 conv gives the mask logits. Trained
with BCE + soft Dice against the ground truth, from the codes the model itself predicts under
teacher forcing (argmax, detached), so that it learns to correct the kind of code errors the
model makes. ``mriseg evaluate`` reports the token-only mask (the tokenizer's decoder on the
same codes) beside the refined one, so the autoregressive part's contribution stays visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mrisegcli.tokenizers.vq import soft_dice_loss


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU(),
    )


class MaskRefiner(nn.Module):
    """(codes, image-token states, encoder feature maps, image) -> (B, 1, S, S) mask logits.

    ``skip_channels``: widths of the encoder's maps, finest (S/2) to coarsest (S/2**n = grid).
    ``width``: channels at full resolution; level k (stride 2**k) has ``width * min(k + 1, 4)``.
    """

    def __init__(self, code_vocab: int, grid: int, state_dim: int, skip_channels: list[int], width: int = 16) -> None:
        super().__init__()
        self.grid = grid
        n = len(skip_channels)
        widths = [width * min(k + 1, 4) for k in range(n + 1)]  # index = level, 0 = full res
        top = widths[n]
        self.code_emb = nn.Embedding(code_vocab, top)
        self.state_proj = nn.Linear(state_dim, top)
        self.top = _block(2 * top + skip_channels[-1], top)
        # level k < n: upsampled level k+1 + skip at stride 2**k (the image itself at k = 0)
        self.ups = nn.ModuleList(
            _block(widths[k + 1] + (skip_channels[k - 1] if k > 0 else 1), widths[k]) for k in reversed(range(n))
        )
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(
        self, codes_BHW: torch.Tensor, states_BNC: torch.Tensor, skips: list[torch.Tensor], image_B1SS: torch.Tensor
    ) -> torch.Tensor:
        B, g = codes_BHW.shape[0], self.grid
        if codes_BHW.shape[1:] != (g, g) or states_BNC.shape[1] != g * g:
            raise ValueError(
                f"refiner expects ({g}, {g}) codes and {g * g} image states, "
                f"got {tuple(codes_BHW.shape[1:])} and {states_BNC.shape[1]}"
            )
        code_BCgg = self.code_emb(codes_BHW).permute(0, 3, 1, 2)
        state_BCgg = self.state_proj(states_BNC.to(self.state_proj.weight.dtype)).transpose(1, 2).reshape(B, -1, g, g)
        x = self.top(torch.cat([code_BCgg, state_BCgg, skips[-1]], 1))
        fine = [image_B1SS * 2.0 - 1.0, *skips[:-1]]  # stride 1, 2, 4, ...
        for block, skip in zip(self.ups, reversed(fine), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip.to(x.dtype)], 1))
        return self.out(x)

    @staticmethod
    def loss(logits_B1SS: torch.Tensor, mask_BSS: torch.Tensor | None) -> torch.Tensor:
        """BCE + soft Dice against the ground truth ``mask_BSS`` (B, S, S)."""
        if mask_BSS is None:
            raise KeyError("the refiner is on: the batch needs 'mask' (B, S, S)")
        S = logits_B1SS.shape[-1]
        if mask_BSS.shape[-2:] != (S, S):
            raise ValueError(f"the refiner needs (B, {S}, {S}) masks, got {tuple(mask_BSS.shape)}")
        target = (mask_BSS > 0.5).float().view(-1, 1, S, S)
        logits = logits_B1SS.float()
        return F.binary_cross_entropy_with_logits(logits, target) + soft_dice_loss(logits, target)
