"""Full-resolution mask from the decided codes: a detokenizer that also reads the image.

The autoregressive model decides *which* region the prompt refers to, one coarse code per
``patch x patch`` pixels. The mask tokenizer's decoder turns the codes back into pixels, but it
sees only the codes, so every boundary is drawn from a 16-pixel grid. The refiner is a small
U-Net decoder that starts from the same codes and adds what the tokens cannot carry:

* the decided codes, embedded and placed on their grid (the decision);
* the transformer's final states of the image tokens (text-aware: in the prefix LM they read
  the prompt), projected onto the same grid;
* the image encoder's conv feature maps after every stride-2 stage (skip connections), so that
  boundaries are placed at (nearly) full resolution.

Coarse to fine, each level upsamples by two, concatenates the skip features of its resolution
and applies 3x3 conv + GroupNorm + SiLU layers (two on the coarse levels, one on the two finest);
a 1x1 conv gives the mask logits at half the input side, upsampled bilinearly to the input side
(boundaries to within a pixel or two at a fraction of the cost of full-resolution convs). With
``full_res`` a last level works at the input side itself: the half-resolution features upsampled
and concatenated with a 3x3 conv stem of the image pixels (the only input that carries
single-pixel edges), one conv layer, then the 1x1 logits. Trained
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


def _block(c_in: int, c_out: int, convs: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1),
            nn.GroupNorm(min(8, c_out), c_out),
            nn.SiLU(),
        ]
    return nn.Sequential(*layers)


class MaskRefiner(nn.Module):
    """(codes, image-token states, encoder feature maps, image) -> (B, 1, S, S) mask logits.

    ``skip_channels``: widths of the encoder's maps, finest (S/2) to coarsest (S/2**n = grid).
    ``width``: channels at half resolution; level k (stride 2**k) has ``width * min(k, 4)``.
    ``full_res``: add a level at the input side (``width // 2`` channels) that reads the pixels.
    """

    def __init__(
        self,
        code_vocab: int,
        grid: int,
        state_dim: int,
        skip_channels: list[int],
        width: int = 16,
        full_res: bool = False,
    ) -> None:
        super().__init__()
        self.grid = grid
        n = len(skip_channels)
        widths = {k: width * min(k, 4) for k in range(1, n + 1)}  # level k: stride 2**k
        top = widths[n]
        self.code_emb = nn.Embedding(code_vocab, top)
        self.state_proj = nn.Linear(state_dim, top)
        self.top = _block(2 * top + skip_channels[-1], top)
        # level k < n: upsampled level k+1 + the encoder's map at stride 2**k (skip_channels[k-1])
        self.ups = nn.ModuleList(
            _block(widths[k + 1] + skip_channels[k - 1], widths[k], convs=1 if k <= 2 else 2)
            for k in reversed(range(1, n))
        )
        fine = max(4, width // 2)
        self.stem = _block(1, fine, convs=1) if full_res else None
        self.fine = _block(widths[1] + fine, fine, convs=1) if full_res else None
        self.out = nn.Conv2d(fine if full_res else widths[1], 1, 1)

    def forward(
        self,
        codes_BHW: torch.Tensor,
        states_BNC: torch.Tensor,
        skips: list[torch.Tensor],
        image_B1SS: torch.Tensor,
    ) -> torch.Tensor:
        B, g = codes_BHW.shape[0], self.grid
        if codes_BHW.shape[1:] != (g, g) or states_BNC.shape[1] != g * g:
            raise ValueError(
                f"refiner expects ({g}, {g}) codes and {g * g} image states, "
                f"got {tuple(codes_BHW.shape[1:])} and {states_BNC.shape[1]}"
            )
        code_BCgg = self.code_emb(codes_BHW).permute(0, 3, 1, 2)
        state_BCgg = (
            self.state_proj(states_BNC.to(self.state_proj.weight.dtype))
            .transpose(1, 2)
            .reshape(B, -1, g, g)
        )
        x = self.top(torch.cat([code_BCgg, state_BCgg, skips[-1]], 1))
        for block, skip in zip(self.ups, reversed(skips[:-1]), strict=True):  # stride ..., 4, 2
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip.to(x.dtype)], 1))
        if self.stem is not None and self.fine is not None:  # the level at the input side
            x = F.interpolate(x, size=image_B1SS.shape[-2:], mode="bilinear", align_corners=False)
            pixels = self.stem(image_B1SS.to(x.dtype) * 2.0 - 1.0)  # [0, 1] -> [-1, 1]
            return self.out(self.fine(torch.cat([x, pixels], 1)))
        return F.interpolate(
            self.out(x), size=image_B1SS.shape[-2:], mode="bilinear", align_corners=False
        )

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
