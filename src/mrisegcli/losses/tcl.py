"""TCL: token-level contrastive learning between hidden states and mask-code embeddings.

The hidden state that predicts mask code y_n is projected (z_n) and pulled towards the
projected embedding of y_n and pushed away from every other code of the codebook (InfoNCE
over the whole codebook, temperature tau):

    l_n = -log softmax_c( cos(z_n, e_c) / tau )[y_n]
    L_tcl = sum_n w_n l_n / sum_n w_n,   w_n = (1 + beta_b * boundary_n) * rare(y_n)

``boundary_n`` is 1 when a 4-neighbour of the code in the mask grid differs (the tokens that
decide the contour), ``rare(c) = clip((mean_count / count_c) ** p, 1, r_max)`` up-weights
long-tail codes from a running count of the training targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def boundary_map(codes_BHW: torch.Tensor) -> torch.Tensor:
    """(B, H, W) codes -> (B, H, W) bool: True where a 4-neighbour inside the grid differs."""
    out = torch.zeros_like(codes_BHW, dtype=torch.bool)
    dv = codes_BHW[:, 1:, :] != codes_BHW[:, :-1, :]  # (B, H-1, W)
    dh = codes_BHW[:, :, 1:] != codes_BHW[:, :, :-1]  # (B, H, W-1)
    out[:, 1:, :] |= dv
    out[:, :-1, :] |= dv
    out[:, :, 1:] |= dh
    out[:, :, :-1] |= dh
    return out


def rarity_weights(counts_K: torch.Tensor, power: float, max_weight: float) -> torch.Tensor:
    """(K,) running counts -> (K,) weights >= 1, larger for codes rarer than average."""
    w = (counts_K.mean() / counts_K.clamp_min(1e-6)) ** power
    return w.clamp(1.0, max_weight)


def info_nce(
    z_BND: torch.Tensor,
    e_KD: torch.Tensor,
    targets_BN: torch.Tensor,
    weights_BN: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Weighted InfoNCE of queries against the whole codebook (cosine similarity / tau)."""
    z = F.normalize(z_BND.float(), dim=-1)
    e = F.normalize(e_KD.float(), dim=-1)
    logits_BNK = z @ e.T / tau
    nll_BN = F.cross_entropy(logits_BNK.flatten(0, 1), targets_BN.flatten(), reduction="none")
    w = weights_BN.flatten().float()
    return (w * nll_BN).sum() / w.sum().clamp_min(1e-12)


class TokenContrastive(nn.Module):
    """Projections for hidden states and code embeddings, plus the running code counts."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        proj_dim: int = 128,
        tau: float = 0.1,
        boundary_weight: float = 1.0,
        rare_power: float = 0.5,
        rare_max: float = 5.0,
    ) -> None:
        super().__init__()
        self.tau, self.boundary_weight = tau, boundary_weight
        self.rare_power, self.rare_max = rare_power, rare_max
        self.proj_h = nn.Linear(dim, proj_dim, bias=False)
        self.proj_e = nn.Linear(dim, proj_dim, bias=False)
        # Laplace-smoothed running counts of target codes (halved when large, ratios kept).
        self.register_buffer("code_counts", torch.ones(codebook_size))

    def token_weights(self, codes_BHW: torch.Tensor) -> torch.Tensor:
        """(B, H, W) target codes -> (B, H*W) per-token weights (boundary x rarity)."""
        w_b = 1.0 + self.boundary_weight * boundary_map(codes_BHW).float()
        w_r = rarity_weights(self.code_counts, self.rare_power, self.rare_max)[codes_BHW]
        return (w_b * w_r).flatten(1)

    @torch.no_grad()
    def update_counts(self, codes: torch.Tensor) -> None:
        self.code_counts += torch.bincount(codes.flatten(), minlength=self.code_counts.numel()).to(
            self.code_counts.dtype
        )
        if self.code_counts.sum() > 1e7:
            self.code_counts *= 0.5

    def forward(
        self, h_BNC: torch.Tensor, code_emb_KC: torch.Tensor, codes_BHW: torch.Tensor
    ) -> torch.Tensor:
        """L_tcl for hidden states ``h`` whose targets are the raster-ordered ``codes_BHW``."""
        weights_BN = self.token_weights(codes_BHW)
        loss = info_nce(
            self.proj_h(h_BNC), self.proj_e(code_emb_KC), codes_BHW.flatten(1), weights_BN, self.tau
        )
        if self.training:
            self.update_counts(codes_BHW)
        return loss
