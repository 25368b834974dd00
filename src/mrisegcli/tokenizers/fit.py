"""Fit the neural tokenizers on arrays of masks / images, and measure their reconstructions.

One small loop serves all three tokenizers: seeded batches with flip/rotate augmentation,
AdamW with linear warm-up and cosine decay, dead-code restarts after every optimiser step,
and a held-out slice (10 % of the data, at most 256 samples) that is never trained on and
gives the reported reconstruction quality.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mrisegcli.errors import InputError
from mrisegcli.tokenizers.base import ConvVQConfig, ConvVQTokenizer
from mrisegcli.tokenizers.image_vq import ImageVQ, ImageVQConfig
from mrisegcli.tokenizers.mask_vq import MaskVQ, MaskVQConfig
from mrisegcli.tokenizers.multiscale import MultiScaleConfig, MultiScaleMaskQuantizer
from mrisegcli.tokenizers.vq import usage_stats

ProgressFn = Callable[[int, int, dict[str, float]], None]

_EVAL_BATCH = 64


def to_tensor_masks(masks_NSS: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(N, S, S) masks (any value > 0 is foreground) -> (N, 1, size, size) float {0, 1}.

    Other sizes are resized by area averaging and re-thresholded at one half.
    """
    m = torch.as_tensor(np.asarray(masks_NSS))
    if m.ndim != 3:
        raise InputError(f"expected masks of shape (N, S, S), got {tuple(m.shape)}")
    m_N1SS = (m > 0).float()[:, None]
    if m_N1SS.shape[-2:] != (size, size):
        m_N1SS = (F.interpolate(m_N1SS, size=(size, size), mode="area") >= 0.5).float()
    return m_N1SS


def to_tensor_images(images_NSS: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(N, S, S) grey images in [0, 1] -> (N, 1, size, size) float32 (area resize if needed)."""
    x = torch.as_tensor(np.asarray(images_NSS, dtype=np.float32))
    if x.ndim != 3:
        raise InputError(f"expected images of shape (N, S, S), got {tuple(x.shape)}")
    x_N1SS = x[:, None].clamp(0.0, 1.0)
    if x_N1SS.shape[-2:] != (size, size):
        x_N1SS = F.interpolate(x_N1SS, size=(size, size), mode="area")
    return x_N1SS


def _split(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, held-out) index split; tiny sets evaluate on the training data."""
    perm = torch.randperm(n, generator=gen)
    n_val = min(max(n // 10, 1), 256) if n >= 10 else 0
    if n_val == 0:
        return perm, perm
    return perm[n_val:], perm[:n_val]


def _augment(x_B1SS: torch.Tensor, gen: torch.Generator, rotate: bool) -> torch.Tensor:
    """Random horizontal/vertical flips (and 90-degree turns for masks), per batch."""
    flips = torch.rand(3, generator=gen)
    if flips[0] < 0.5:
        x_B1SS = x_B1SS.flip(-1)
    if flips[1] < 0.5:
        x_B1SS = x_B1SS.flip(-2)
    if rotate and flips[2] < 0.5:
        x_B1SS = x_B1SS.transpose(-1, -2)
    return x_B1SS


def _crop(
    x_B1SS: torch.Tensor, size: int, align: int, gen: torch.Generator, focus: bool
) -> torch.Tensor:
    """Random (B, 1, size, size) crops on the code grid (so token boundaries stay put).

    With ``focus`` (masks), three crops in four are centred near a random foreground pixel:
    small structures then fill the batch instead of empty background.
    """
    B, _, S, _ = x_B1SS.shape
    if size >= S:
        return x_B1SS
    n_pos = (S - size) // align + 1
    starts = torch.randint(0, n_pos, (B, 2), generator=gen) * align
    if focus:
        pick = torch.rand(B, generator=gen) < 0.75
        jitter = torch.randint(-size // 4, size // 4 + 1, (B, 2), generator=gen)
        for b in torch.nonzero(pick).flatten().tolist():
            fg = torch.nonzero(x_B1SS[b, 0] > 0.5)
            if fg.shape[0]:
                yx = fg[torch.randint(0, fg.shape[0], (1,), generator=gen)][0] + jitter[b]
                top_left = ((yx - size // 2).clamp(0, S - size) // align) * align
                starts[b] = top_left
    return torch.stack(
        [x_B1SS[b, :, y : y + size, x : x + size] for b, (y, x) in enumerate(starts.tolist())]
    )


def _crop_size(crop: int | None, cfg: ConvVQConfig) -> int | None:
    """-1 (default): half the image side, rounded to the code grid; None/0: no cropping."""
    if crop == -1:
        crop = max(cfg.downsample * 4, cfg.image_size // 2 // cfg.downsample * cfg.downsample)
    if not crop or crop >= cfg.image_size:
        return None
    if crop % cfg.downsample:
        raise InputError(f"crop {crop} must be a multiple of the downsample {cfg.downsample}")
    return crop


def _lr_factor(step: int, total: int) -> float:
    warm = max(1, min(100, total // 20))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))


def _lr_factor_time(progress: float, warm: float = 0.05) -> float:
    """Warm-up then cosine to 5 % over a fraction of a time budget (``progress`` in [0, 1])."""
    if progress < warm:
        return max(progress / warm, 0.01)
    t = min(1.0, (progress - warm) / (1.0 - warm))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))


def _fit(
    model: torch.nn.Module,
    data_N1SS: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    gen: torch.Generator,
    device: str,
    rotate: bool,
    crop: int | None,
    align: int,
    focus: bool,
    progress: ProgressFn | None,
    max_seconds: float | None = None,
) -> float:
    """The shared training loop; returns the mean loss of the last 10 % of steps.

    ``max_seconds``: a wall-clock budget. The loop then ends at ``steps`` or when the budget is
    spent, whichever comes first, and the learning rate follows the larger of the two fractions
    done, so that the schedule completes in either case.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    model.to(device).train()
    codebook = model.quantizer.embedding
    others = [p for p in model.parameters() if p is not codebook]
    opt = torch.optim.AdamW(
        [{"params": others, "weight_decay": 1e-4}, {"params": [codebook], "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.99),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    tail: list[float] = []
    n = data_N1SS.shape[0]
    t0 = time.perf_counter()
    for step in range(steps):
        if max_seconds is not None:
            done = max(step / steps, (time.perf_counter() - t0) / max(max_seconds, 1e-9))
            if done >= 1.0:
                break
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor_time(done)
        rows = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x_B1SS = data_N1SS[rows]
        if crop:
            x_B1SS = _crop(x_B1SS, crop, align, gen, focus=focus)
        x_B1SS = _augment(x_B1SS, gen, rotate).to(device)
        out = model.training_loss(x_B1SS)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if max_seconds is None:
            sched.step()
        restarted = model.quantizer.update_usage(out.idx, out.z_NC, generator=gen)
        tail = (tail + [out.metrics["loss"]])[-max(1, steps // 10) :]
        if progress is not None:
            progress(step + 1, steps, {**out.metrics, "restarted": float(restarted)})
    model.eval()
    return float(np.mean(tail))


@torch.no_grad()
def _encode_all(tok: Any, x_N1SS: torch.Tensor) -> torch.Tensor:
    """Every code the tokenizer emits for ``x_N1SS``, flattened (lists of scales included)."""
    device = next(tok.parameters()).device
    chunks = []
    for i in range(0, x_N1SS.shape[0], _EVAL_BATCH):
        idx = tok.encode(x_N1SS[i : i + _EVAL_BATCH].to(device))
        parts = idx if isinstance(idx, (list, tuple)) else [idx]
        chunks.append(torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1).reshape(-1).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def recon_dice(tokenizer: Any, masks: np.ndarray | torch.Tensor) -> float:
    """Mean per-mask Dice of ``decode(encode(m)) > 0`` against ``m`` (both empty counts as 1).

    ``masks`` is (N, S, S) with any value > 0 as foreground, or (N, 1, S, S); it is resized to
    the tokenizer's ``image_size`` first. Works for grid and multi-scale tokenizers alike.
    """
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    m_N1SS = to_tensor_masks(m[:, 0] if m.ndim == 4 else m, tokenizer.image_size)
    device = next(tokenizer.parameters()).device
    dices = []
    for i in range(0, m_N1SS.shape[0], _EVAL_BATCH):
        gt_B1SS = m_N1SS[i : i + _EVAL_BATCH].to(device)
        pred_BN = (tokenizer.decode(tokenizer.encode(gt_B1SS)) > 0).flatten(1).float()
        gt_BN = gt_B1SS.flatten(1)
        inter_B = (pred_BN * gt_BN).sum(1)
        denom_B = pred_BN.sum(1) + gt_BN.sum(1)
        dice_B = torch.where(
            denom_B > 0, 2 * inter_B / denom_B.clamp_min(1), torch.ones_like(denom_B)
        )
        dices.append(dice_B.cpu())
    return float(torch.cat(dices).mean())


@torch.no_grad()
def image_psnr(tokenizer: Any, images: np.ndarray | torch.Tensor) -> float:
    """Mean per-image PSNR (dB, peak 1) of ``decode(encode(x))`` for (N, S, S) images in [0, 1]."""
    x_N1SS = to_tensor_images(images, tokenizer.image_size)
    device = next(tokenizer.parameters()).device
    psnrs = []
    for i in range(0, x_N1SS.shape[0], _EVAL_BATCH):
        x_B1SS = x_N1SS[i : i + _EVAL_BATCH].to(device)
        rec_B1SS = tokenizer.decode(tokenizer.encode(x_B1SS)).clamp(0, 1)
        mse_B = (rec_B1SS - x_B1SS).square().flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append((-10.0 * torch.log10(mse_B)).cpu())
    return float(torch.cat(psnrs).mean())


def _seeded_model(factory: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build a model from ``seed`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


@dataclass(frozen=True)
class _Recipe:
    """What differs between the tokenizers' fits; :func:`_fit_and_report` does the rest."""

    build: Callable[[Any], ConvVQTokenizer]  # config -> untrained tokenizer
    to_tensor: Callable[[Any, int], torch.Tensor]  # (N, S, S) inputs, side -> (N, 1, side, side)
    quality_key: str  # report key of the held-out measure
    quality: Callable[[Any, torch.Tensor], float]  # (tokenizer, held-out (N, 1, S, S)) -> measure
    rotate: bool  # 90-degree turns as augmentation (masks have no fixed orientation)
    focus: bool  # crops centred near foreground pixels (single-scale masks)


_MASK_VQ = _Recipe(MaskVQ, to_tensor_masks, "recon_dice", recon_dice, rotate=True, focus=True)
_MULTISCALE = _Recipe(
    MultiScaleMaskQuantizer, to_tensor_masks, "recon_dice", recon_dice, rotate=True, focus=False
)
_IMAGE_VQ = _Recipe(
    ImageVQ,
    to_tensor_images,
    "psnr",
    lambda tok, x_N1SS: image_psnr(tok, x_N1SS[:, 0]),
    rotate=False,
    focus=False,
)


def _fit_and_report(
    recipe: _Recipe,
    inputs_NSS: np.ndarray | torch.Tensor,
    cfg: ConvVQConfig,
    *,
    crop: int | None,
    seed: int,
    **loop_kw: Any,
) -> tuple[Any, dict]:
    """Convert, split, build, train, then measure: the body every ``fit_*`` shares.

    ``loop_kw`` (steps, batch_size, lr, device, progress) goes to the training loop :func:`_fit`.
    """
    t0 = time.perf_counter()
    data_N1SS = recipe.to_tensor(inputs_NSS, cfg.image_size)
    crop_size = _crop_size(crop, cfg)
    if data_N1SS.shape[0] == 0:
        raise InputError("nothing to fit on: no samples given")
    gen = torch.Generator().manual_seed(seed)
    train, held = _split(data_N1SS.shape[0], gen)
    model = _seeded_model(lambda: recipe.build(cfg), seed)
    loss = _fit(
        model,
        data_N1SS[train],
        gen=gen,
        rotate=recipe.rotate,
        crop=crop_size,
        align=cfg.downsample,
        focus=recipe.focus,
        **loop_kw,
    )
    usage, perplexity = usage_stats(_encode_all(model, data_N1SS[:2048]), model.codebook_size)
    report = {
        "loss": loss,
        recipe.quality_key: recipe.quality(model, data_N1SS[held]),
        "codebook_usage": usage,
        "perplexity": perplexity,
        "n_train": len(train),
        "n_heldout": len(held) if len(held) != len(train) else 0,
        "seconds": time.perf_counter() - t0,
    }
    return model, report


def fit_mask_vq(
    masks_NSS: np.ndarray,
    cfg: MaskVQConfig | None = None,
    *,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    crop: int | None = -1,
    max_seconds: float | None = None,
) -> tuple[MaskVQ, dict]:
    """Fit a :class:`MaskVQ` on (N, S, S) binary masks; returns it (eval mode) and a report.

    Report keys: ``loss`` (mean of the last 10 % of steps), ``recon_dice`` (held-out slice),
    ``codebook_usage`` / ``perplexity`` (over up to 2048 of the masks), ``seconds``,
    ``n_train``, ``n_heldout`` (0 when fewer than 10 masks: then the training masks are
    measured). ``crop``: side of the random training crops (-1: half the image, None: none).
    ``max_seconds``: stop at this wall-clock budget if it comes before ``steps``.
    """
    return _fit_and_report(
        _MASK_VQ,
        masks_NSS,
        cfg or MaskVQConfig(),
        crop=crop,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        device=device,
        progress=progress,
        max_seconds=max_seconds,
    )


def fit_multiscale(
    masks_NSS: np.ndarray,
    cfg: MultiScaleConfig | None = None,
    *,
    steps: int = 1200,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    max_seconds: float | None = None,
) -> tuple[MultiScaleMaskQuantizer, dict]:
    """Fit a :class:`MultiScaleMaskQuantizer` on (N, S, S) masks; report as :func:`fit_mask_vq`.

    Trains on full images (the scale schedule is tied to the full grid), so a step costs about
    four times a cropped :func:`fit_mask_vq` step per sample: hence the smaller default batch.
    """
    return _fit_and_report(
        _MULTISCALE,
        masks_NSS,
        cfg or MultiScaleConfig(),
        crop=None,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        device=device,
        progress=progress,
        max_seconds=max_seconds,
    )


def fit_image_vq(
    images_NSS: np.ndarray,
    cfg: ImageVQConfig | None = None,
    *,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    crop: int | None = -1,
    max_seconds: float | None = None,
) -> tuple[ImageVQ, dict]:
    """Fit an :class:`ImageVQ` on (N, S, S) grey images in [0, 1]; report has ``psnr``."""
    return _fit_and_report(
        _IMAGE_VQ,
        images_NSS,
        cfg or ImageVQConfig(),
        crop=crop,
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        device=device,
        progress=progress,
        max_seconds=max_seconds,
    )


__all__: Sequence[str] = [
    "fit_image_vq",
    "fit_mask_vq",
    "fit_multiscale",
    "image_psnr",
    "recon_dice",
    "to_tensor_images",
    "to_tensor_masks",
]
