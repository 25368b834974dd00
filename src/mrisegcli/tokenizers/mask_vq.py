"""MaskVQ: a binary mask <-> a grid of discrete codes (the mask tokens of the next-token paradigm).

(B, 1, S, S) mask -> conv encoder -> (B, C, S/f, S/f) -> cosine VQ -> (B, S/f, S/f) codes ->
conv decoder -> (B, 1, S, S) mask *logits*. Trained with BCE + soft Dice on the logits plus the
quantiser's codebook/commitment loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mrisegcli.tokenizers.base import ConvVQConfig, ConvVQTokenizer
from mrisegcli.tokenizers.vq import LossOutput, mask_objective


@dataclass(frozen=True)
class MaskVQConfig(ConvVQConfig):
    """Geometry, codebook and loss weights of a :class:`MaskVQ` (saved with its weights)."""

    beta: float = 0.25  # commitment weight
    restart_after: int = 50  # steps a code may stay unused before it is restarted
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    vq_weight: float = 1.0


class MaskVQ(ConvVQTokenizer):
    """Binary-mask VQ tokenizer; implements :class:`~mrisegcli.tokenizers.base.GridTokenizer`.

    ``decode`` returns logits, not probabilities: threshold at 0 for a mask. The logits are
    smooth, so they can first be resized (bilinear) to any output resolution -- e.g. the
    original scan size -- and thresholded there, which gives smoother boundaries than
    upsampling a binary mask.
    """

    cfg: MaskVQConfig

    def __init__(self, cfg: MaskVQConfig | None = None) -> None:
        cfg = cfg or MaskVQConfig()
        super().__init__(cfg, beta=cfg.beta, restart_after=cfg.restart_after)
        self.decoder = self._make_decoder()

    def features(self, mask_B1SS: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) mask in [0, 1] (binarised at 0.5) -> (B, C, S/f, S/f) features.

        Fully convolutional: any S that is a multiple of ``downsample`` works (training uses
        crops); the protocol size is ``image_size``.
        """
        return self._encode_unit(mask_B1SS > 0.5)

    @torch.no_grad()
    def encode(self, mask_B1SS: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) mask -> (B, grid, grid) int64 codes."""
        return self._nearest_grid(self.features(mask_B1SS))

    def decode(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """(B, grid, grid) int64 codes -> (B, 1, S, S) mask logits (threshold at 0)."""
        return self.decoder(self._code_map(idx_Bhw))

    def training_loss(self, mask_B1SS: torch.Tensor) -> LossOutput:
        """BCE + soft Dice on the reconstructed logits + codebook/commitment loss."""
        target_B1SS = (mask_B1SS > 0.5).to(self.quantizer.embedding.dtype)
        q = self.quantizer(self.features(mask_B1SS))
        c = self.cfg
        loss, metrics = mask_objective(
            self.decoder(q.zq_BChw),
            target_B1SS,
            q.loss,
            bce_weight=c.bce_weight,
            dice_weight=c.dice_weight,
            vq_weight=c.vq_weight,
        )
        return LossOutput(loss=loss, metrics=metrics, idx=q.idx_Bhw, z_NC=q.z_NC)
