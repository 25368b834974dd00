"""ImageVQ: a grey image in [0, 1] <-> a grid of discrete codes (the image tokens).

Same conv encoder / cosine VQ / conv decoder as the mask tokenizer, with a reconstruction loss
for intensities: L1 + L2, plus an optional gradient-difference term that penalises blurred
edges (the plain pixel losses alone favour the blurry average of plausible edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mrisegcli.tokenizers.base import ConvVQConfig, ConvVQTokenizer
from mrisegcli.tokenizers.vq import LossOutput


@dataclass(frozen=True)
class ImageVQConfig(ConvVQConfig):
    """Geometry, codebook and loss weights of an :class:`ImageVQ` (saved with its weights)."""

    codebook_size: int = 1024
    beta: float = 0.25
    restart_after: int = 50
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    grad_weight: float = 0.5  # gradient-difference loss; 0 turns it off
    vq_weight: float = 1.0


def gradient_difference(x_B1SS: torch.Tensor, y_B1SS: torch.Tensor) -> torch.Tensor:
    """Mean |d x - d y| over horizontal and vertical finite differences."""
    dx = (x_B1SS[..., :, 1:] - x_B1SS[..., :, :-1]) - (y_B1SS[..., :, 1:] - y_B1SS[..., :, :-1])
    dy = (x_B1SS[..., 1:, :] - x_B1SS[..., :-1, :]) - (y_B1SS[..., 1:, :] - y_B1SS[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


class ImageVQ(ConvVQTokenizer):
    """Grey-image VQ tokenizer; implements :class:`~mrisegcli.tokenizers.base.GridTokenizer`."""

    cfg: ImageVQConfig

    def __init__(self, cfg: ImageVQConfig | None = None) -> None:
        cfg = cfg or ImageVQConfig()
        super().__init__(cfg, beta=cfg.beta, restart_after=cfg.restart_after)
        self.decoder = self._make_decoder()

    def features(self, x_B1SS: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) image in [0, 1] -> (B, C, S/f, S/f) features (any S multiple of f)."""
        return self._encode_unit(x_B1SS)

    def _pixels(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_BChw) * 0.5 + 0.5  # (B, 1, S, S), unclamped

    @torch.no_grad()
    def encode(self, x_B1SS: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) image -> (B, grid, grid) int64 codes."""
        return self._nearest_grid(self.features(x_B1SS))

    def decode(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """(B, grid, grid) int64 codes -> (B, 1, S, S) image clamped to [0, 1]."""
        return self._pixels(self._code_map(idx_Bhw)).clamp(0.0, 1.0)

    def training_loss(self, x_B1SS: torch.Tensor) -> LossOutput:
        """L1 + L2 (+ gradient difference) on the reconstruction + codebook/commitment loss."""
        target = x_B1SS.to(self.quantizer.embedding.dtype)
        q = self.quantizer(self.features(x_B1SS))
        rec_B1SS = self._pixels(q.zq_BChw)
        l1 = (rec_B1SS - target).abs().mean()
        l2 = F.mse_loss(rec_B1SS, target)
        c = self.cfg
        loss = c.l1_weight * l1 + c.l2_weight * l2 + c.vq_weight * q.loss
        if c.grad_weight > 0:
            loss = loss + c.grad_weight * gradient_difference(rec_B1SS, target)
        metrics = {
            "loss": float(loss.detach()),
            "l1": float(l1.detach()),
            "psnr": float(-10.0 * torch.log10(l2.detach().clamp_min(1e-10))),
            "vq": float(q.loss.detach()),
        }
        return LossOutput(loss=loss, metrics=metrics, idx=q.idx_Bhw, z_NC=q.z_NC)
