"""Is the prompt's target in the image at all? A learned, calibrated presence score.

A referring model asked for something that is not there (an infection on a healthy chest, a
lesion in the hemisphere without one) must answer "not found", and the maximum of a
probability map does not say so: it is near 1 for almost every prompt. The presence head is a
small classifier on the trained model's own text-aware states:

* features (:func:`presence_features`): one pass over the prefix (image and text tokens, which
  read each other), then the mean and the maximum of the image-token states and the state that
  starts the mask (next-token: the ``[BOM]`` state; next-scale: the mean of the first scale's
  states) -> ``3 C`` numbers per (image, prompt); at predict time a next-token decoder's own
  prefill is that pass (:func:`features_of_states`);
* head (:class:`PresenceHead`): layer norm, a two-layer MLP and one logit, trained with binary
  cross-entropy on the train rows whose mask is empty (normal chests, the side without a
  lesion) against the rows whose mask is not, the transformer frozen;
* calibration: a temperature and a bias fitted on the val split (Platt scaling), so the
  probability means what it says on data like the val split;
* threshold: chosen on the val split (among those that leave at least 95% of the absent rows
  empty, the one that finds the most present findings, and of those the one that leaves the
  most absent rows empty), saved with the head; below it ``predict`` writes an empty mask and says
  "not found (presence p)".

The head lives in ``presence.safetensors`` of the run folder, its settings and val report in
``config.json`` under ``"presence"``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mrisegcli import runfolder
from mrisegcli.errors import MrisegError


class PresenceHead(nn.Module):
    """(B, F) features -> (B,) calibrated logits that the prompt's target is present."""

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim, self.hidden = in_dim, hidden
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )
        # Platt scaling fitted on val: calibrated logit = scale * raw + bias
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))

    def raw(self, feats_BF: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(feats_BF.float()))[:, 0]

    def forward(self, feats_BF: torch.Tensor) -> torch.Tensor:
        return self.raw(feats_BF) * self.scale + self.bias


@torch.no_grad()
def presence_features(
    impl: Any, model: nn.Module, x: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """(B, 3C) features of a batch: mean and max of the text-aware image states and the state
    that starts the mask (the paradigm's :meth:`presence_states`), in float32."""
    return features_of_states(*impl.presence_states(model, x, text_ids, text_mask))


def features_of_states(img_BNC: torch.Tensor, start_BC: torch.Tensor) -> torch.Tensor:
    """(B, 3C) float32 features of states a pass over the prefix already gave (a decoder's
    prefill): the same numbers as :func:`presence_features` of that pass."""
    from mrisegcli.losses.presence import prefix_presence_features

    return prefix_presence_features(img_BNC, start_BC)


# ----------------------------------------------------------------------------- statistics


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (the probability that a random present case scores above a
    random absent one, ties counting half); NaN when one class is missing."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _cuts(probs: np.ndarray) -> np.ndarray:
    """Candidate thresholds on ``probs``: 0, the midpoints between neighbouring scores, 1."""
    cands = np.unique(probs)
    return np.concatenate([[0.0], (cands[:-1] + cands[1:]) / 2.0, [1.0]])


def choose_threshold(probs: np.ndarray, labels: np.ndarray, min_specificity: float = 0.95) -> float:
    """The threshold on (``probs``, ``labels``) that finds the most present cases while leaving
    at least ``min_specificity`` of the absent ones empty, and of those the one that leaves the
    most absent ones empty (the lowest on ties); when no threshold reaches that specificity,
    the one that maximises sensitivity + specificity.
    Thresholds are midpoints between neighbouring scores; 0.5 with one class."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return 0.5
    cuts = _cuts(probs)
    best, best_spec, best_t, youden, youden_t = -1.0, -1.0, None, -1.0, 0.5
    for t in cuts:
        pred = probs >= t
        sens, spec = pred[labels].mean(), (~pred[~labels]).mean()
        better = sens > best + 1e-12 or (abs(sens - best) <= 1e-12 and spec > best_spec + 1e-12)
        if spec >= min_specificity and better:
            best, best_spec, best_t = sens, spec, float(t)
        if sens + spec > youden + 1e-12:
            youden, youden_t = sens + spec, float(t)
    return best_t if best_t is not None else youden_t


def operating_points(
    probs: np.ndarray, labels: np.ndarray, sensitivities: tuple[float, ...] = (0.9, 0.97)
) -> list[dict[str, float]]:
    """For each wanted sensitivity, the highest threshold on (``probs``, ``labels``) that
    reaches it, with the sensitivity and specificity there (what a lower
    ``--presence-threshold`` would buy and cost); empty with one class."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return []
    points = []
    for want in sensitivities:
        for t in _cuts(probs)[::-1]:  # highest first
            pred = probs >= t
            sens = float(pred[labels].mean())
            if sens >= want - 1e-12:
                spec = float((~pred[~labels]).mean())
                points.append(
                    {
                        "for_sensitivity": want,
                        "threshold": float(t),
                        "sensitivity": sens,
                        "specificity": spec,
                    }
                )
                break
    return points


def detection_report(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """AUROC, sensitivity and specificity at ``threshold``, counts and the mean calibration
    error (10 equal-width bins) of presence probabilities against present (1) / absent (0)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels).astype(bool)
    pred = probs >= threshold
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    bins = np.minimum((probs * 10).astype(int), 9)
    ece = 0.0
    for b in range(10):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(probs[sel].mean() - labels[sel].mean())
    return {
        "auroc": auroc(probs, labels),
        "threshold": float(threshold),
        "sensitivity": float(pred[labels].mean()) if n_pos else float("nan"),
        "specificity": float((~pred[~labels]).mean()) if n_neg else float("nan"),
        "n_present": n_pos,
        "n_absent": n_neg,
        "calibration_error": float(ece),
    }


# ----------------------------------------------------------------------------- fitting


@dataclass
class PresenceFit:
    head: PresenceHead
    threshold: float
    report: dict[str, Any]


def platt_scaling(raw: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Scale and bias minimising the log loss of ``scale * raw + bias`` on ``labels``."""
    a = torch.ones((), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(raw * a + b, labels)
        loss.backward()
        return loss

    opt.step(closure)
    a_v, b_v = float(a.detach()), float(b.detach())
    if not (math.isfinite(a_v) and math.isfinite(b_v)) or a_v <= 0:
        return 1.0, 0.0
    return a_v, b_v


def fit_presence(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    steps: int = 1500,
    batch: int = 256,
    lr: float = 2e-3,
    hidden: int = 128,
    seed: int = 0,
    eval_every: int = 100,
    progress: Callable[[int, int], None] | None = None,
) -> PresenceFit:
    """Train a :class:`PresenceHead` on (features, present) pairs, keep the step with the best
    val log loss, calibrate it on val and choose its threshold there."""
    if train_labels.all() or not train_labels.any():
        raise MrisegError(
            "the presence head needs train rows with an empty mask and rows with a region "
            f"({int(train_labels.sum())} of {len(train_labels)} have a region)"
        )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = PresenceHead(train_feats.shape[1], hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    y_tr, y_va = train_labels.float(), val_labels.float()
    best_loss, best_state, best_step = float("inf"), copy.deepcopy(head.state_dict()), 0
    n = train_feats.shape[0]
    for step in range(1, steps + 1):
        head.train()
        idx = torch.randint(n, (min(batch, n),), generator=gen)
        loss = F.binary_cross_entropy_with_logits(head.raw(train_feats[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            head.eval()
            with torch.no_grad():
                val_loss = float(F.binary_cross_entropy_with_logits(head.raw(val_feats), y_va))
            if val_loss < best_loss - 1e-6:
                best_loss, best_state, best_step = val_loss, copy.deepcopy(head.state_dict()), step
        if progress is not None:
            progress(step, steps)
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        raw_va = head.raw(val_feats)
    if y_va.min() != y_va.max():
        a, b = platt_scaling(raw_va, y_va)
        head.scale.fill_(a)
        head.bias.fill_(b)
    with torch.no_grad():
        p_va = torch.sigmoid(head(val_feats)).numpy()
        p_tr = torch.sigmoid(head(train_feats)).numpy()
    threshold = choose_threshold(p_va, val_labels.numpy())
    report = {
        "best_step": best_step,
        "steps": steps,
        "val_log_loss": best_loss,
        "scale": float(head.scale),
        "bias": float(head.bias),
        "train": detection_report(p_tr, train_labels.numpy(), threshold),
        "val": detection_report(p_va, val_labels.numpy(), threshold),
        "val_operating_points": operating_points(p_va, val_labels.numpy()),
    }
    return PresenceFit(head, threshold, report)


# ----------------------------------------------------------------------------- files


def save_presence(head: PresenceHead, run_dir: Path) -> Path:
    from safetensors.torch import save_file

    from mrisegcli.io.atomic import atomic_path

    path = Path(run_dir) / runfolder.PRESENCE
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "mriseg-presence-1"})
    return path


def presence_config(fit: PresenceFit) -> dict[str, Any]:
    """The ``"presence"`` section of config.json."""
    return {
        "file": runfolder.PRESENCE,
        "in_dim": fit.head.in_dim,
        "hidden": fit.head.hidden,
        "features": "mean,max(image states),mask-start state",
        "threshold": fit.threshold,
        "report": fit.report,
    }


def load_presence(run_dir: Path, section: Any, device: torch.device) -> PresenceHead | None:
    """The presence head a run folder records, or ``None`` when it has none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(section, dict):
        return None
    path = Path(run_dir) / runfolder.PRESENCE
    config_path = Path(run_dir) / runfolder.CONFIG
    try:
        in_dim, hidden = int(section["in_dim"]), int(section["hidden"])
        threshold = float(section["threshold"])
    except (KeyError, TypeError, ValueError) as e:
        raise MrisegError(f"config.json has a damaged 'presence' section ({e})", config_path) from e
    if not (0 < in_dim <= 1 << 16 and 0 < hidden <= 1 << 16 and 0.0 <= threshold <= 1.0):
        raise MrisegError("config.json has a damaged 'presence' section", config_path)
    if not path.is_file():
        raise MrisegError(f"config.json names a presence head but {path.name} is missing", path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise MrisegError(f"corrupt or truncated presence head ({e})", path) from e
    head = PresenceHead(in_dim, hidden)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise MrisegError(f"presence head does not match config.json ({e})", path) from e
    floats = [v.reshape(-1).float() for v in state.values() if v.is_floating_point()]
    if floats and not np.isfinite(torch.cat(floats).numpy()).all():  # one pass over them all
        raise MrisegError("presence head holds NaN or infinite weights", path)
    return head.to(device).eval()


__all__ = [
    "PresenceFit",
    "PresenceHead",
    "auroc",
    "choose_threshold",
    "detection_report",
    "features_of_states",
    "fit_presence",
    "load_presence",
    "presence_config",
    "presence_features",
    "save_presence",
]
