"""Presence probe: the prefix states learn whether the prompt's target is in the image at all.

``mriseg calibrate`` (and the end of ``mriseg train``) fits a presence head on the frozen
model's prefix states (``presence.py``: the mean and the maximum of the text-aware image-token
states and the state that starts the mask). States trained only to predict mask codes carry
"is it there?" as a by-product: small findings on a chest radiograph look much like a healthy
chest in a mean and a maximum. The probe puts the question into training: a layer norm and one
linear map on the same ``3 C`` features give one logit, trained with binary cross-entropy of
"the row's mask is not empty",

    L_presence = BCE(w . LN([mean h_img, max h_img, h_BOM]) + b, [mask != 0])

so that the states the presence head reads later separate present from absent targets.
Training only: ``predict`` reads the calibrated presence head, never the probe.
``lambda_presence = 0`` switches it off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def prefix_presence_features(img_BNC: torch.Tensor, start_BC: torch.Tensor) -> torch.Tensor:
    """(B, 3C) float32: mean and max of the image-token states and the mask-start state."""
    img_BNC = img_BNC.float()
    return torch.cat([img_BNC.mean(1), img_BNC.amax(1), start_BC.float()], 1)


class PresenceProbe(nn.Module):
    """(B, N, C) image-token states and (B, C) mask-start states -> (B,) logits and their loss."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3 * dim)
        self.proj = nn.Linear(3 * dim, 1)

    def forward(self, img_BNC: torch.Tensor, start_BC: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(prefix_presence_features(img_BNC, start_BC)))[:, 0]

    def loss(
        self, img_BNC: torch.Tensor, start_BC: torch.Tensor, mask_BSS: torch.Tensor | None
    ) -> torch.Tensor:
        """Binary cross-entropy of the logits against "the mask is not empty"."""
        if mask_BSS is None:
            raise KeyError("the presence probe needs the batch's 'mask' (B, S, S)")
        present_B = mask_BSS.flatten(1).any(1).float()
        return F.binary_cross_entropy_with_logits(self(img_BNC, start_BC), present_B)


__all__ = ["PresenceProbe", "prefix_presence_features"]
