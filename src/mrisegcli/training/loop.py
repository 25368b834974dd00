"""One training loop for both paradigms: AdamW, warm-up + cosine, clipping, AMP on CUDA,
DDP under torchrun, periodic validation with the best weights kept, atomic checkpoints,
exact resume (data position, RNG, optimiser) and a clean stop on SIGTERM/SIGINT.

The model is any ``nn.Module`` whose ``forward(batch)`` returns a dict with a scalar ``loss``
(other scalar entries are logged). The data are in-memory tensors of codes (the code cache),
indexed along their first axis.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mrisegcli.errors import MrisegError
from mrisegcli.training.checkpoint import (
    TrainState,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    save_checkpoint,
)
from mrisegcli.training.distributed import DistInfo, any_rank, barrier, mean_over_ranks, wrap_ddp


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; saved in every run's config.json."""

    steps: int = 3000
    epochs: int | None = None  # when set, steps = epochs * ceil(N / batch_size)
    batch_size: int = 32  # global batch (split evenly across DDP ranks)
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 250
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    amp: bool = True  # bf16 autocast, CUDA only
    seed: int = 0
    # wall-clock budget of the whole run in minutes (tokenizer fitting and code caching
    # included); the run stops at ``steps`` or at the budget, whichever comes first, and the
    # learning-rate schedule follows the budget
    max_minutes: float | None = None


class TrainingInterrupted(MrisegError):
    """Raised after a checkpoint was saved because SIGTERM/SIGINT arrived."""


#: with a time budget the warm-up lasts at most this share of it
WARMUP_SHARE = 0.05


def lr_at(step: int, cfg: TrainConfig, total: int, done: float | None = None) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.lr * min_lr_ratio``.

    ``done``: the fraction of a time budget spent; the decay then follows whichever of steps
    and time is further along, and the warm-up ends at ``warmup_steps`` or at
    :data:`WARMUP_SHARE` of the time, whichever comes first.
    """
    if step < cfg.warmup_steps:
        warm = (step + 1) / cfg.warmup_steps
        if done is None or done < WARMUP_SHARE:
            return cfg.lr * (warm if done is None else max(warm, done / WARMUP_SHARE))
        step = cfg.warmup_steps  # a short budget: the warm-up ends with its first share of time
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if done is not None:
        progress = min(1.0, max(progress, done))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def total_steps(cfg: TrainConfig, n: int) -> int:
    if cfg.epochs is not None:
        return cfg.epochs * math.ceil(n / cfg.batch_size)
    return cfg.steps


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or embeddings' gains)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def next_batch_indices(state: TrainState, n: int, batch: int, seed: int) -> torch.Tensor:
    """The next global batch of sample indices; advances the data position in ``state``.

    Batches never straddle epochs (the remainder of an epoch starts the next one), so a resumed
    run sees exactly the same batches as an uninterrupted one.
    """
    if n < batch:
        batch = n
    if state.position + batch > n:
        state.epoch += 1
        state.position = 0
    order = _epoch_order(n, state.epoch, seed)
    idx = order[state.position : state.position + batch]
    state.position += batch
    return idx


def _rank_slice(idx: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return idx
    if len(idx) % info.world_size:
        raise MrisegError(
            f"batch size {len(idx)} is not divisible by the number of processes {info.world_size}"
        )
    per = len(idx) // info.world_size
    return idx[info.rank * per : (info.rank + 1) * per]


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    pin = device.type == "cuda"
    return {
        k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()
    }


def train(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],
    cfg: TrainConfig,
    run_dir: Path,
    *,
    device: torch.device,
    dist_info: DistInfo = DistInfo(),
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    on_best: Callable[[torch.nn.Module, dict[str, float]], None] | None = None,
    resume: bool = False,
    progress: Callable[..., None] | None = None,
    config_dict: dict | None = None,
    extra_state: Callable[[], dict[str, torch.Tensor]] | None = None,
    load_extra_state: Callable[[dict[str, torch.Tensor]], None] | None = None,
    tokens_per_sample: int = 0,
    prep_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` for the configured steps; returns a summary dict.

    ``evaluate`` (rank 0) returns metrics with a ``dice`` key; the best weights are handed to
    ``on_best``. ``extra_state`` / ``load_extra_state`` carry state outside the model (none
    today: the hard-token memory is a model buffer) through checkpoints. ``prep_seconds``: time
    this invocation spent before the loop; with ``cfg.max_minutes`` it counts against the budget.
    """
    n = next(iter(data.values())).shape[0]
    total = total_steps(cfg, n)
    ckpt_dir = run_dir / "checkpoints"
    log_path = run_dir / "train_log.jsonl"
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    state = TrainState()
    if resume:
        last = latest_checkpoint(ckpt_dir)
        if last is None:
            raise MrisegError("--resume given but the run has no checkpoint", ckpt_dir)
        state, extra, _ = load_checkpoint(last, model, optimizer)
        if dist_info.is_main:  # a checkpoint write cut by kill -9 leaves its temp file
            remove_stale_temp_files(ckpt_dir)
        if dist_info.is_main and log_path.is_file():  # drop records past the checkpoint
            kept = [line for line in log_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.step]
            log_path.write_text("".join(f"{line}\n" for line in kept))
        if load_extra_state is not None:
            load_extra_state(extra)
    else:
        torch.manual_seed(cfg.seed)
        state.prep_s = prep_seconds
    state.elapsed_s += prep_seconds
    budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes is not None else None
    # Buffers (e.g. the hard-token memory) stay per rank: each rank sees its own samples.
    net = wrap_ddp(model, dist_info, device) if dist_info.enabled else model
    use_amp = cfg.amp and device.type == "cuda"

    def log(record: dict[str, Any]) -> None:
        if dist_info.is_main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        if dist_info.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                ckpt_dir / checkpoint_name(state.step), model, optimizer, state,
                extra_tensors=extra_state() if extra_state else None, config=config_dict,
            )
            prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        barrier(dist_info)

    def validate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if evaluate is not None and dist_info.is_main:
            model.eval()
            metrics = evaluate(model)
            model.train()
            if metrics.get("dice", float("-inf")) > state.best_metric:
                state.best_metric = metrics["dice"]
                state.best_step = state.step
                if on_best is not None:
                    on_best(model, metrics)
            log({"step": state.step, "split": "val", **metrics})
        barrier(dist_info)
        return metrics

    model.train()
    t0 = time.perf_counter()
    elapsed0 = state.elapsed_s

    def time_done() -> float | None:
        """Share of the loop's time budget spent (None without a budget)."""
        if budget_s is None:
            return None
        loop_budget = max(1.0, budget_s - state.prep_s)
        return (elapsed0 + time.perf_counter() - t0 - state.prep_s) / loop_budget

    window_t, window_tokens = time.perf_counter(), 0
    last_metrics: dict[str, float] = {}  # the last logged scalars, means over all ranks
    val_metrics: dict[str, float] = {}
    with _StopFlag() as stop:
        finished = state.step >= total or (time_done() or 0.0) >= 1.0
        while not finished:
            idx = _rank_slice(next_batch_indices(state, n, cfg.batch_size, cfg.seed), dist_info)
            batch = _to_device({k: v[idx] for k, v in data.items()}, device)
            lr = lr_at(state.step, cfg, total, time_done())
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = net(batch)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise MrisegError(f"loss became {loss.item()} at step {state.step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            state.step += 1
            state.elapsed_s = elapsed0 + time.perf_counter() - t0
            spent = time_done()
            finished = state.step >= total or (spent is not None and spent >= 1.0)
            # with a time budget the bar's total is the projected number of steps
            shown_total = total if not spent else min(total, max(state.step, round(state.step / spent)))
            if finished:
                shown_total = state.step
            window_tokens += tokens_per_sample * len(idx) * dist_info.world_size
            if state.step % cfg.log_every == 0 or finished:
                dt = time.perf_counter() - window_t
                # Each rank saw its own slice: log the means over ranks (one all-reduce).
                last_metrics = mean_over_ranks(
                    {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0},
                    dist_info, device,
                )
                record = {
                    "step": state.step, "split": "train", "lr": lr, "grad_norm": float(gnorm),
                    "epoch": state.epoch, "tokens_per_s": window_tokens / max(dt, 1e-9),
                    "elapsed_s": time.perf_counter() - t0, **last_metrics,
                }
                log(record)
                window_t, window_tokens = time.perf_counter(), 0
            if progress is not None and dist_info.is_main:
                # One process: this step's loss. Several: the last logged mean over ranks
                # (this step's would be rank 0's alone, and averaging it costs a collective).
                shown = ({"loss": float(loss.detach())} if not dist_info.enabled
                         else {"loss": last_metrics["loss"]} if "loss" in last_metrics else {})
                progress(state.step, shown_total, {**shown, **val_metrics})
            # Every rank enters validate() (it ends in a barrier); only rank 0 has ``evaluate``.
            eval_due = state.step % cfg.eval_every == 0 or finished
            if eval_due and (evaluate is not None or dist_info.enabled):
                val_metrics = {f"val_{k}": v for k, v in validate().items() if k == "dice"}
            if state.step % cfg.ckpt_every == 0 or finished:
                checkpoint()
            # Ranks may see a signal at different steps: they stop together or not at all.
            if any_rank(stop.signum is not None, dist_info, device):
                checkpoint()
                name = signal.Signals(stop.signum or signal.SIGTERM).name
                raise TrainingInterrupted(
                    f"stopped by {name} at step {state.step}; checkpoint saved, continue with --resume",
                    run_dir,
                )
    return {
        "steps": state.step,
        "seconds": time.perf_counter() - t0,
        "run_seconds": state.elapsed_s,
        "stopped_by": "time" if state.step < total else "steps",
        "best_dice": state.best_metric if state.best_step >= 0 else None,
        "best_step": state.best_step,
        "last": last_metrics,
        "config": asdict(cfg),
    }
