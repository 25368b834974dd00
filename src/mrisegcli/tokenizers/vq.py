"""Shared building blocks of the neural tokenizers: conv encoder/decoder and a vector quantiser.

The encoder maps a (B, in, S, S) image to a (B, C, S/f, S/f) feature map with a low code dim C
(8-32); the decoder maps such a map back to (B, out, S, S). Both are plain stride-2 / transposed
conv stacks: cheap enough to fit on a CPU in minutes, deep enough at the coarse levels to place
mask boundaries with sub-code precision.

The :class:`VectorQuantizer` keeps its codebook alive with *dead-code restarts*: a code that
no input has picked for ``restart_after`` training steps is re-initialised from a random
quantiser input of the current batch (see :meth:`VectorQuantizer.update_usage`, called by the
fitting loop after each optimiser step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrisegcli.errors import ConfigError


def check_geometry(image_size: int, downsample: int, channels: tuple[int, ...]) -> int:
    """Validate the encoder geometry and return the number of stride-2 stages."""
    n_down = int(round(math.log2(downsample))) if downsample >= 1 else -1
    if downsample < 2 or 2**n_down != downsample:
        raise ConfigError(f"downsample must be a power of two >= 2, got {downsample}")
    if image_size % downsample:
        raise ConfigError(f"image_size {image_size} is not divisible by downsample {downsample}")
    if not channels or any(c < 1 for c in channels):
        raise ConfigError(f"channels must be positive widths, got {channels}")
    return n_down


def check_input(x_B1SS: torch.Tensor, downsample: int, size: int | None = None) -> None:
    """Raise ValueError unless x is (B, 1, S, S) with S a multiple of ``downsample`` (== size)."""
    shape = tuple(x_B1SS.shape)
    ok = x_B1SS.ndim == 4 and shape[1] == 1 and shape[2] == shape[3] and shape[2] % downsample == 0
    if not ok or (size is not None and shape[2] != size):
        want = f"{size}" if size is not None else f"a multiple of {downsample}"
        raise ValueError(f"expected (B, 1, S, S) with S {want}, got {shape}")


def _stage_width(channels: tuple[int, ...], i: int) -> int:
    """Width after the i-th stride-2 stage (the last width repeats if there are more stages)."""
    return channels[min(i, len(channels) - 1)]


class ResBlock(nn.Module):
    """x + conv(silu(conv(silu(x)))): the coarse-level workhorse of encoder and decoder."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return x_BChw + self.conv2(F.silu(self.conv1(F.silu(x_BChw))))


class ConvEncoder(nn.Module):
    """(B, in_ch, S, S) -> (B, code_dim, S/f, S/f) with log2(f) stride-2 4x4 convs.

    ``channels[i]`` is the width after the i-th stride-2 stage, so the costly high-resolution
    levels stay narrow; ``res_blocks`` residual blocks run at the coarsest level.
    """

    def __init__(
        self, in_ch: int, channels: tuple[int, ...], n_down: int, code_dim: int, res_blocks: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_ch
        for i in range(n_down):
            width = _stage_width(channels, i)
            layers += [nn.Conv2d(prev, width, 4, stride=2, padding=1), nn.SiLU()]
            prev = width
        layers += [ResBlock(prev) for _ in range(res_blocks)]
        layers += [nn.SiLU(), nn.Conv2d(prev, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x_BiSS: torch.Tensor) -> torch.Tensor:
        return self.net(x_BiSS)  # (B, C, h, w)


class ConvDecoder(nn.Module):
    """(B, code_dim, h, w) -> (B, out_ch, h*f, w*f): the mirror image of :class:`ConvEncoder`.

    A 3x3 conv lifts the codes (so each position sees its neighbours' codes), residual blocks
    run at the coarse level, transposed 4x4 convs upsample, and the last one emits ``out_ch``
    maps at full resolution directly (no wide conv at the expensive full resolution).
    """

    def __init__(
        self, code_dim: int, channels: tuple[int, ...], n_down: int, out_ch: int, res_blocks: int
    ) -> None:
        super().__init__()
        top = _stage_width(channels, n_down - 1)
        layers: list[nn.Module] = [nn.Conv2d(code_dim, top, 3, padding=1)]
        layers += [ResBlock(top) for _ in range(res_blocks)]
        prev = top
        for i in reversed(range(n_down)):
            if i == 0:
                layers += [nn.SiLU(), nn.ConvTranspose2d(prev, out_ch, 4, stride=2, padding=1)]
            else:
                width = _stage_width(channels, i - 1)
                layers += [
                    nn.SiLU(),
                    nn.ConvTranspose2d(prev, width, 4, stride=2, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(width, width, 3, padding=1),
                ]
                prev = width
        self.net = nn.Sequential(*layers)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return self.net(z_BChw)  # (B, out_ch, S, S)


@dataclass
class QuantOutput:
    """What one quantiser pass returns during training."""

    zq_BChw: torch.Tensor  # straight-through quantised features: value of the codes, grad to z
    idx_Bhw: torch.Tensor  # (B, h, w) int64 chosen codes
    loss: torch.Tensor  # codebook + beta * commitment
    z_NC: torch.Tensor  # (N, C) detached quantiser inputs, candidates for dead-code restarts


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with a straight-through estimator and dead-code restarts.

    ``cosine=True`` (single-scale tokenizers): inputs and codes are l2-normalised and the code
    with the largest cosine similarity wins; the quantised vector is the unit-norm code. This
    keeps all codes on one sphere, so none drifts out of reach. ``cosine=False`` (residual
    multi-scale quantiser, where magnitudes must shrink from scale to scale): plain Euclidean
    nearest neighbour on raw vectors.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        *,
        beta: float = 0.25,
        cosine: bool = True,
        restart_after: int = 50,
    ) -> None:
        super().__init__()
        if codebook_size < 2 or code_dim < 1:
            raise ConfigError(f"bad codebook {codebook_size} x {code_dim}")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.cosine = cosine
        self.restart_after = restart_after
        scale = 1.0 if cosine else 1.0 / math.sqrt(code_dim)
        self.embedding = nn.Parameter(torch.randn(codebook_size, code_dim) * scale)  # (V, C)
        # training-only bookkeeping, deliberately not saved with the weights
        self.register_buffer("idle_steps", torch.zeros(codebook_size, dtype=torch.long), False)

    def codebook(self) -> torch.Tensor:
        """(V, C) the vectors codes stand for (unit norm when ``cosine``)."""
        return F.normalize(self.embedding, dim=1) if self.cosine else self.embedding

    def project(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Map quantiser inputs onto the space the codes live in (the unit sphere if cosine)."""
        return F.normalize(z_NC, dim=-1) if self.cosine else z_NC

    @torch.no_grad()
    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (N,) int64 index of the nearest code."""
        cb_VC = self.codebook().to(z_NC.dtype)
        if self.cosine:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ cb_VC.T, dim=1)
        d_NV = (
            z_NC.square().sum(1, keepdim=True) - 2.0 * z_NC @ cb_VC.T + cb_VC.square().sum(1)[None]
        )
        return torch.argmin(d_NV, dim=1)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """(...) int64 -> (..., C) code vectors (differentiable w.r.t. the codebook)."""
        return F.embedding(idx, self.codebook())

    def forward(self, z_BChw: torch.Tensor) -> QuantOutput:
        """Quantise a feature map for training (use :meth:`nearest` for inference)."""
        B, C, h, w = z_BChw.shape
        z_BhwC = self.project(z_BChw.permute(0, 2, 3, 1))  # (B, h, w, C)
        z_NC = z_BhwC.reshape(-1, C)
        idx_N = self.nearest(z_NC)
        zq_NC = self.lookup(idx_N)
        codebook_loss = F.mse_loss(zq_NC, z_NC.detach())
        commit_loss = F.mse_loss(z_NC, zq_NC.detach())
        zq_st_NC = z_NC + (zq_NC - z_NC).detach()
        zq_BChw = zq_st_NC.view(B, h, w, C).permute(0, 3, 1, 2)
        return QuantOutput(
            zq_BChw=zq_BChw,
            idx_Bhw=idx_N.view(B, h, w),
            loss=codebook_loss + self.beta * commit_loss,
            z_NC=z_NC.detach(),
        )

    @torch.no_grad()
    def update_usage(
        self, idx: torch.Tensor, z_NC: torch.Tensor, generator: torch.Generator | None = None
    ) -> int:
        """Count idle steps per code and restart the dead ones; returns how many were restarted.

        Call once per training step, after the optimiser step: ``idx`` holds every code chosen
        in the step, ``z_NC`` the (projected) quantiser inputs they were chosen for. A code idle
        for ``restart_after`` steps is moved onto a random row of ``z_NC`` (plus a little noise
        so that two restarted codes never coincide), where it will be picked again.
        """
        used_V = torch.bincount(idx.reshape(-1), minlength=self.codebook_size) > 0
        self.idle_steps.add_(1).masked_fill_(used_V.to(self.idle_steps.device), 0)
        if self.restart_after <= 0 or z_NC.shape[0] == 0:
            return 0
        dead = torch.nonzero(self.idle_steps >= self.restart_after).flatten()
        if dead.numel() == 0:
            return 0
        rows = torch.randint(0, z_NC.shape[0], (dead.numel(),), generator=generator)
        new_KC = z_NC[rows.to(z_NC.device)].to(self.embedding.dtype)
        noise = torch.randn(new_KC.shape, generator=generator).to(new_KC.device)
        new_KC = new_KC + 0.01 * new_KC.norm(dim=1, keepdim=True).clamp_min(1e-3) * noise
        self.embedding.data[dead.to(self.embedding.device)] = new_KC
        self.idle_steps[dead] = 0
        return int(dead.numel())


def usage_stats(idx: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of codes used at least once, perplexity = exp(entropy of the code histogram))."""
    counts_V = torch.bincount(idx.reshape(-1).cpu(), minlength=codebook_size).double()
    if counts_V.sum() == 0:
        return 0.0, 0.0
    p_V = counts_V / counts_V.sum()
    entropy = -(p_V[p_V > 0] * p_V[p_V > 0].log()).sum()
    return float((counts_V > 0).double().mean()), float(entropy.exp())


def soft_dice_loss(logits_B1SS: torch.Tensor, target_B1SS: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice per sample (smoothing 1 keeps empty masks well-defined)."""
    p_BN = torch.sigmoid(logits_B1SS).flatten(1)
    t_BN = target_B1SS.flatten(1)
    dice_B = (2 * (p_BN * t_BN).sum(1) + 1.0) / (p_BN.sum(1) + t_BN.sum(1) + 1.0)
    return 1.0 - dice_B.mean()


def mask_objective(
    logits_B1SS: torch.Tensor,
    target_B1SS: torch.Tensor,
    vq_loss: torch.Tensor,
    *,
    bce_weight: float,
    dice_weight: float,
    vq_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The mask tokenizers' loss, weighted BCE + soft Dice of the logits + VQ, and its metrics."""
    bce = F.binary_cross_entropy_with_logits(logits_B1SS, target_B1SS)
    dice = soft_dice_loss(logits_B1SS, target_B1SS)
    loss = bce_weight * bce + dice_weight * dice + vq_weight * vq_loss
    metrics = {
        "loss": float(loss.detach()),
        "bce": float(bce.detach()),
        "dice_loss": float(dice.detach()),
        "vq": float(vq_loss.detach()),
    }
    return loss, metrics


@dataclass
class LossOutput:
    """A tokenizer's training loss plus what the fitting loop needs for logging and restarts."""

    loss: torch.Tensor
    metrics: dict[str, float]
    idx: torch.Tensor  # every code chosen in this step (any shape)
    z_NC: torch.Tensor  # (N, C) quantiser inputs of this step (restart candidates)
