"""The training curves of a run as one picture, ``progress.png``, drawn with Pillow only.

It plots, from the run's ``train_log.jsonl``, the training loss (left axis) and the validation
Dice (right axis, 0 to 1) over optimiser steps, like nnU-Net's ``progress.png``. The log holds
one JSON object per line: ``{"step": 10, "split": "train", "loss": 1.23, ...}`` every
``log_every`` steps and ``{"step": 20, "split": "val", "dice": 0.61}`` at each evaluation. A
resumed run appends to the same log; when a step appears twice the later row wins.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrisegcli import runfolder
from mrisegcli.io.atomic import atomic_path

logger = logging.getLogger(__name__)

PICTURE_NAME = runfolder.PROGRESS
LOSS_COLOUR = (31, 119, 180)
DICE_COLOUR = (214, 39, 40)
_W, _H = 960, 540
_LEFT, _RIGHT, _TOP, _BOTTOM = 90, 90, 50, 70


def read_curves(log_path: str | Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(loss, dice)``: (step, value) pairs sorted by step from a train_log.jsonl.

    Unreadable lines (a crash mid-write) and non-finite values are skipped.
    """
    loss: dict[int, float] = {}
    dice: dict[int, float] = {}
    with Path(log_path).open(encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(row, dict):
                continue
            split, key, into = row.get("split"), None, None
            if split == "train":
                key, into = "loss", loss
            elif split == "val":
                key, into = "dice", dice
            value = row.get(key) if key else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                into[step] = float(value)  # type: ignore[index]
    return sorted(loss.items()), sorted(dice.items())


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5, least: float = 0.0) -> list[float]:
    """About ``n`` round tick values covering [lo, hi], at least ``least`` apart."""
    if hi <= lo:
        hi = lo + 1.0
    raw = max((hi - lo) / n, least)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _label(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class _Axes:
    """The plot box (pixels; y grows downwards) and the value ranges it shows."""

    x0: float
    x1: float
    y0: float
    y1: float
    s_lo: float
    s_hi: float
    l_lo: float
    l_hi: float

    def px(self, step: float) -> float:
        return self.x0 + (step - self.s_lo) / (self.s_hi - self.s_lo) * (self.x1 - self.x0)

    def py_loss(self, v: float) -> float:
        return self.y1 - (v - self.l_lo) / (self.l_hi - self.l_lo) * (self.y1 - self.y0)

    def py_dice(self, v: float) -> float:
        return self.y1 - v * (self.y1 - self.y0)


def _axes(loss: list[tuple[int, float]], dice: list[tuple[int, float]]) -> _Axes:
    steps = [s for s, _ in loss] + [s for s, _ in dice]
    s_lo, s_hi = (min(steps), max(steps)) if steps else (0, 1)
    if s_hi == s_lo:
        s_lo, s_hi = s_lo - 1, s_hi + 1
    values = [v for _, v in loss]
    l_lo, l_hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (l_hi - l_lo) * 0.05 or max(abs(l_hi) * 0.05, 0.05)
    l_lo, l_hi = l_lo - pad, l_hi + pad
    if l_lo < 0 <= min(values, default=0.0):
        l_lo = 0.0  # a loss is not negative: keep 0 as the floor
    return _Axes(_LEFT, _W - _RIGHT, _TOP, _H - _BOTTOM, s_lo, s_hi, l_lo, l_hi)


def _draw_grid(d: Any, ax: _Axes, small: Any) -> None:
    """Grid and ticks: steps below, loss on the left, Dice on the right."""
    x0, x1, y0, y1 = ax.x0, ax.x1, ax.y0, ax.y1
    for t in _nice_ticks(ax.s_lo, ax.s_hi, 8, least=1):
        if ax.s_lo <= t <= ax.s_hi:
            x = ax.px(t)
            d.line([(x, y0), (x, y1)], fill=(232, 232, 232))
            d.line([(x, y1), (x, y1 + 5)], fill="black")
            d.text((x, y1 + 8), _label(t), fill="black", font=small, anchor="mt")
    for t in _nice_ticks(ax.l_lo, ax.l_hi, 6):
        if ax.l_lo <= t <= ax.l_hi:
            y = ax.py_loss(t)
            d.line([(x0 - 5, y), (x0, y)], fill=LOSS_COLOUR)
            d.text((x0 - 8, y), _label(t), fill=LOSS_COLOUR, font=small, anchor="rm")
    for i in range(6):
        t = i / 5
        y = ax.py_dice(t)
        d.line([(x0, y), (x1, y)], fill=(232, 232, 232))
        d.line([(x1, y), (x1 + 5, y)], fill=DICE_COLOUR)
        d.text((x1 + 8, y), f"{t:.1f}", fill=DICE_COLOUR, font=small, anchor="lm")
    d.rectangle([x0, y0, x1, y1], outline="black")


def _draw_lines(
    d: Any, ax: _Axes, loss: list[tuple[int, float]], dice: list[tuple[int, float]]
) -> None:
    """The curves: a polyline each, with dots so that one or two points still show."""
    for points, py, colour in ((loss, ax.py_loss, LOSS_COLOUR), (dice, ax.py_dice, DICE_COLOUR)):
        xy = [(ax.px(s), py(v)) for s, v in points]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2, joint="curve")
        if len(xy) <= 60:
            for x, y in xy:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def _draw_labels(
    d: Any, ax: _Axes, loss: list[tuple[int, float]], dice: list[tuple[int, float]], title: str
) -> None:
    """Title, axis names, legend and the best validation Dice."""
    font, small = _font(16), _font(13)
    x0, x1, y0, y1 = ax.x0, ax.x1, ax.y0, ax.y1
    d.text((_W / 2, 16), title, fill="black", font=font, anchor="mt")
    d.text(((x0 + x1) / 2, _H - 22), "step", fill="black", font=font, anchor="mm")
    d.text((16, (y0 + y1) / 2), "loss", fill=LOSS_COLOUR, font=font, anchor="lm")
    d.text((_W - 16, (y0 + y1) / 2), "Dice", fill=DICE_COLOUR, font=font, anchor="rm")
    lx, ly = x0 + 12, y0 + 10
    for name, colour, n in (
        ("training loss", LOSS_COLOUR, len(loss)),
        ("validation Dice", DICE_COLOUR, len(dice)),
    ):
        d.line([(lx, ly + 8), (lx + 26, ly + 8)], fill=colour, width=3)
        d.text(
            (lx + 34, ly + 8),
            name if n else f"{name} (none logged)",
            fill="black",
            font=small,
            anchor="lm",
        )
        ly += 22
    best = max(dice, key=lambda p: p[1]) if dice else None
    if best is not None:
        d.text(
            (x1, y0 - 6),
            f"best val Dice {best[1]:.4f} (step {best[0]})",
            fill=DICE_COLOUR,
            font=small,
            anchor="rb",
        )


def draw_curves(
    loss: list[tuple[int, float]],
    dice: list[tuple[int, float]],
    out: str | Path,
    *,
    title: str = "training progress",
    overwrite: bool = True,
) -> Path:
    """Draw the two curves into a PNG at ``out`` (written atomically) and return its path."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (_W, _H), "white")
    d = ImageDraw.Draw(img)
    ax = _axes(loss, dice)
    _draw_grid(d, ax, _font(13))
    _draw_lines(d, ax, loss, dice)
    _draw_labels(d, ax, loss, dice, title)
    out = Path(out)
    with atomic_path(out, overwrite) as tmp:
        img.save(tmp, format="PNG")
    return out


def write_progress_png(run_dir: str | Path) -> Path | None:
    """``RUN/progress.png`` from ``RUN/train_log.jsonl``; None (and a logged warning) when the log
    is missing or the picture cannot be written: a finished training never fails on its picture."""
    run_dir = Path(run_dir)
    log = run_dir / runfolder.TRAIN_LOG
    try:
        loss, dice = read_curves(log)
        return draw_curves(
            loss, dice, run_dir / PICTURE_NAME, title=f"training progress: {run_dir.name}"
        )
    except (OSError, ValueError) as e:
        logger.warning("could not draw %s: %s", run_dir / PICTURE_NAME, e)
        return None


__all__ = ["PICTURE_NAME", "draw_curves", "read_curves", "write_progress_png"]
