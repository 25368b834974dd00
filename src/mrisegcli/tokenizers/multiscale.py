"""Multi-scale residual mask quantiser (the tokenizer of the next-scale paradigm).

A mask is encoded once to a feature map f (B, C, H, W) on the full code grid (H = W = S/f).
It is then described coarse to fine by K token maps of growing side p_1 < ... < p_K = H, all
drawn from ONE shared codebook:

    rest = f, f_hat = 0
    for k in 0..K-1:
        idx_k  = nearest_code(area_downsample(rest, p_k))          # (B, p_k, p_k)
        part_k = phi_k(upsample(codebook[idx_k], H))               # (B, C, H, W)
        f_hat += part_k ; rest -= part_k
    mask logits = decoder(f_hat)

``phi_k`` is a small learned 3x3 conv, mixed with the identity (h*(1-r) + r*conv(h)), that
repairs the blur of upsampling a coarse map. ``n_phi`` convs are shared over the scales: scale
k uses the one whose anchor (evenly spaced on [0, 1]) is nearest to k / (K-1), so coarse
scales share one conv and fine scales another (``n_phi == K`` gives one conv per scale).

Teacher forcing for a next-scale transformer: the input that predicts scale k (k >= 1) is
f_hat after scales < k, area-downsampled to p_k x p_k and flattened (:meth:`idx_to_teacher_inputs`);
:meth:`next_input` builds the same thing one scale at a time during generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrisegcli.errors import ConfigError
from mrisegcli.tokenizers.base import ConvVQConfig, ConvVQTokenizer
from mrisegcli.tokenizers.vq import LossOutput, mask_objective


@dataclass(frozen=True)
class MultiScaleConfig(ConvVQConfig):
    """Geometry, scale schedule, codebook and loss weights of a :class:`MultiScaleMaskQuantizer`."""

    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    n_phi: int = 4  # shared refinement convs (1 = fully shared, len(scales) = one per scale)
    phi_ratio: float = 0.5  # weight of the conv against the identity in phi
    upsample: str = "bicubic"  # "bicubic" or "bilinear": coarse map -> full grid
    beta: float = 0.25
    restart_after: int = 50
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    vq_weight: float = 1.0


class Phi(nn.Module):
    """h -> (1 - r) h + r conv3x3(h): a residual refinement of an upsampled token map."""

    def __init__(self, code_dim: int, ratio: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(code_dim, code_dim, 3, padding=1)
        self.ratio = ratio

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw * (1.0 - self.ratio) + self.conv(h_BChw) * self.ratio


class MultiScaleMaskQuantizer(ConvVQTokenizer):
    """VAR-style residual quantiser over a schedule of scales, with its own encoder/decoder.

    Has the GridTokenizer members ``codebook_size``, ``image_size`` and ``grid``, but its codes
    are a list of maps, one per scale.
    """

    cfg: MultiScaleConfig

    def __init__(self, cfg: MultiScaleConfig | None = None) -> None:
        cfg = cfg or MultiScaleConfig()
        super().__init__(cfg, beta=cfg.beta, restart_after=cfg.restart_after, cosine=False)
        self.phis = nn.ModuleList(Phi(cfg.code_dim, cfg.phi_ratio) for _ in range(cfg.n_phi))
        K = len(cfg.scales)
        self.phi_of_scale = tuple(
            round(k / max(K - 1, 1) * (cfg.n_phi - 1)) for k in range(K)
        )  # scale k -> index of its phi conv
        self.decoder = self._make_decoder()

    def _check_config(self) -> None:
        """The scale schedule must run from 1 to the grid; n_phi and upsample must be valid."""
        cfg = self.cfg
        grid = cfg.image_size // cfg.downsample
        sc = cfg.scales
        if (
            not sc
            or sc[-1] != grid
            or sc[0] < 1
            or any(a >= b for a, b in zip(sc[:-1], sc[1:], strict=True))
        ):
            raise ConfigError(f"scales must increase strictly from >= 1 to the grid {grid}: {sc}")
        if not 1 <= cfg.n_phi <= len(sc):
            raise ConfigError(f"n_phi must be in 1..{len(sc)}, got {cfg.n_phi}")
        if cfg.upsample not in ("bicubic", "bilinear"):
            raise ConfigError(f"upsample must be 'bicubic' or 'bilinear', got {cfg.upsample!r}")

    # ---- scale schedule ---------------------------------------------------------------------
    @property
    def scales(self) -> tuple[int, ...]:
        return self.cfg.scales

    @property
    def scale_lengths(self) -> tuple[int, ...]:
        """Tokens per scale, p_k ** 2 (their sum is the full token sequence length)."""
        return tuple(p * p for p in self.cfg.scales)

    # ---- resampling and per-scale parts ---------------------------------------------------
    def _down(self, f_BChw: torch.Tensor, p: int) -> torch.Tensor:
        return f_BChw if p == f_BChw.shape[-1] else F.interpolate(f_BChw, size=(p, p), mode="area")

    def _up(self, h_BCpp: torch.Tensor) -> torch.Tensor:
        H = self.grid
        if h_BCpp.shape[-1] == H:
            return h_BCpp
        return F.interpolate(h_BCpp, size=(H, H), mode=self.cfg.upsample, align_corners=False)

    def part(self, k: int, idx_Bpp: torch.Tensor) -> torch.Tensor:
        """Contribution of scale k's token map to f_hat: phi_k(upsample(codes)) (B, C, H, W)."""
        return self.phis[self.phi_of_scale[k]](self._up(self._code_map(idx_Bpp)))

    def empty_fhat(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The f_hat generation starts from: zeros (B, C, H, W)."""
        dtype = self.quantizer.embedding.dtype
        device = device or self.quantizer.embedding.device
        return torch.zeros(
            batch, self.cfg.code_dim, self.grid, self.grid, dtype=dtype, device=device
        )

    def _check_idx(self, idx_list: list[torch.Tensor], n: int | None = None) -> None:
        n = len(self.scales) if n is None else n
        if len(idx_list) != n:
            raise ValueError(f"expected {n} token maps, got {len(idx_list)}")
        for p, idx in zip(self.scales[:n], idx_list, strict=True):
            if idx.shape[-2:] != (p, p):
                raise ValueError(f"token map of scale {p} has shape {tuple(idx.shape)}")

    # ---- encoding ---------------------------------------------------------------------------
    def features(self, mask_B1SS: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) mask (binarised at 0.5) -> (B, C, H, W) continuous features f."""
        return self._encode_unit(mask_B1SS > 0.5, self.image_size)

    @torch.no_grad()
    def quantize(self, f_BChw: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residual quantisation of f: (token maps [(B, p_k, p_k)], f_hat (B, C, H, W))."""
        B, C = f_BChw.shape[:2]
        rest_BChw = f_BChw.clone()
        f_hat_BChw = torch.zeros_like(f_BChw)
        idx_list = []
        for k, p in enumerate(self.scales):
            z_NC = self._down(rest_BChw, p).permute(0, 2, 3, 1).reshape(-1, C)
            idx_Bpp = self.quantizer.nearest(z_NC).view(B, p, p)
            h_BChw = self.part(k, idx_Bpp)
            f_hat_BChw += h_BChw
            rest_BChw -= h_BChw
            idx_list.append(idx_Bpp)
        return idx_list, f_hat_BChw

    def features_to_idx(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) features -> one (B, p_k, p_k) int64 index map per scale."""
        return self.quantize(f_BChw)[0]

    @torch.no_grad()
    def encode(self, mask_B1SS: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, S, S) mask -> one (B, p_k, p_k) int64 index map per scale, coarse to fine."""
        return self.features_to_idx(self.features(mask_B1SS))

    # ---- decoding ---------------------------------------------------------------------------
    def scale_parts(self, idx_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale contributions [(B, C, H, W)]; their sum is f_hat."""
        self._check_idx(idx_list)
        return [self.part(k, idx_Bpp) for k, idx_Bpp in enumerate(idx_list)]

    def idx_to_fhat(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """All K token maps -> f_hat (B, C, H, W)."""
        return torch.stack(self.scale_parts(idx_list)).sum(0)

    def idx_to_logits(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """All K token maps -> (B, 1, S, S) mask logits (threshold at 0; resizable bilinearly)."""
        return self.decoder(self.idx_to_fhat(idx_list))

    def decode(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Same as :meth:`idx_to_logits` (the tokenizer-protocol name)."""
        return self.idx_to_logits(idx_list)

    # ---- next-scale transformer inputs ----------------------------------------------------
    def idx_to_teacher_inputs(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs for scales 2..K: (B, L, C) with L = sum_{k>=1} p_k ** 2.

        Block k-1 of the output is f_hat after scales < k, area-downsampled to p_k x p_k and
        flattened row-major. ``idx_list`` has K maps (the last is not needed) or K - 1.
        """
        K = len(self.scales)
        self._check_idx(list(idx_list[: K - 1]), K - 1)
        f_hat_BChw = None
        x_list = []
        for k in range(1, K):
            part_BChw = self.part(k - 1, idx_list[k - 1])
            f_hat_BChw = part_BChw if f_hat_BChw is None else f_hat_BChw + part_BChw
            x_list.append(self._down(f_hat_BChw, self.scales[k]).flatten(2).transpose(1, 2))
        return torch.cat(x_list, dim=1)  # (B, L, C)

    def next_input(
        self, k: int, f_hat_BChw: torch.Tensor, idx_Bpp: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale k's tokens to f_hat; return (new f_hat, input for scale k+1 or None).

        The input is (B, p_{k+1} ** 2, C), exactly the matching block of
        :meth:`idx_to_teacher_inputs`; None after the last scale. f_hat is not modified in place.
        """
        f_hat_BChw = f_hat_BChw + self.part(k, idx_Bpp)
        if k == len(self.scales) - 1:
            return f_hat_BChw, None
        p_next = self.scales[k + 1]
        return f_hat_BChw, self._down(f_hat_BChw, p_next).flatten(2).transpose(1, 2)

    # ---- training -----------------------------------------------------------------------------
    def training_loss(self, mask_B1SS: torch.Tensor) -> LossOutput:
        """BCE + soft Dice on the decoded logits + the residual-VQ loss averaged over scales.

        The codebook and the phi convs learn from ||f_hat_k - sg(f)||^2 after every scale k,
        the encoder from beta * ||sg(f_hat_k) - f||^2 and, through a straight-through
        estimator, from the reconstruction loss.
        """
        target_B1SS = (mask_B1SS > 0.5).to(self.quantizer.embedding.dtype)
        f_BChw = self.features(mask_B1SS)
        B, C = f_BChw.shape[:2]
        f_ng = f_BChw.detach()
        rest_BChw = f_ng.clone()
        f_hat_BChw = torch.zeros_like(f_ng)
        vq = f_ng.new_zeros(())
        idx_all, z_all = [], []
        for k, p in enumerate(self.scales):
            z_NC = self._down(rest_BChw, p).permute(0, 2, 3, 1).reshape(-1, C)
            idx_Bpp = self.quantizer.nearest(z_NC).view(B, p, p)
            h_BChw = self.part(k, idx_Bpp)
            f_hat_BChw = f_hat_BChw + h_BChw
            rest_BChw = rest_BChw - h_BChw.detach()
            vq = (
                vq
                + F.mse_loss(f_hat_BChw, f_ng)
                + self.cfg.beta * F.mse_loss(f_hat_BChw.detach(), f_BChw)
            )
            idx_all.append(idx_Bpp.reshape(-1))
            z_all.append(z_NC)
        vq = vq / len(self.scales)
        f_st_BChw = f_BChw + (f_hat_BChw - f_BChw).detach()
        c = self.cfg
        loss, metrics = mask_objective(
            self.decoder(f_st_BChw),
            target_B1SS,
            vq,
            bce_weight=c.bce_weight,
            dice_weight=c.dice_weight,
            vq_weight=c.vq_weight,
        )
        return LossOutput(loss=loss, metrics=metrics, idx=torch.cat(idx_all), z_NC=torch.cat(z_all))
