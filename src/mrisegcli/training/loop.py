"""One training loop for both paradigms: AdamW, warm-up + cosine, clipping, AMP on CUDA,
DDP under torchrun, periodic validation with the best weights kept, atomic checkpoints,
exact resume (data position, RNG, optimiser) and a clean stop on SIGTERM/SIGINT.

The model is any ``nn.Module`` whose ``forward(batch)`` returns a dict with a scalar ``loss``
(other scalar entries are logged). The data are in-memory tensors of codes (the code cache),
indexed along their first axis.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mrisegcli import runfolder
from mrisegcli.errors import MrisegError
from mrisegcli.training.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    save_checkpoint,
)
from mrisegcli.training.distributed import DistInfo, any_rank, barrier, mean_over_ranks, wrap_ddp

logger = logging.getLogger(__name__)


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
    amp: bool = True  # bf16 autocast on CUDA
    # bf16 autocast on a CPU as well, where the CPU computes in bf16 natively (AVX512-BF16, AMX):
    # matmuls and convs run ~4x faster than float32 there; elsewhere the run stays in float32
    cpu_bf16: bool = False
    seed: int = 0
    # wall-clock budget of the whole run in minutes (tokenizer fitting and code caching
    # included); the run stops at ``steps`` or at the budget, whichever comes first, and the
    # learning-rate schedule follows the budget
    max_minutes: float | None = None


class TrainingInterrupted(MrisegError):
    """Raised after a checkpoint was saved because SIGTERM/SIGINT arrived."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm).

    Without it PyTorch emulates bf16 on a CPU, several times slower than float32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    try:  # no /proc (macOS, Windows): oneDNN's own check
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the training step runs under bf16 autocast on ``device``."""
    if device.type == "cuda":
        return cfg.amp
    if device.type == "cpu" and cfg.cpu_bf16:
        if cpu_has_native_bf16():
            return True
        logger.warning("this CPU has no native bf16 (AVX512-BF16/AMX): training in float32")
    return False


#: with a time budget the warm-up lasts at most this share of it
WARMUP_SHARE = 0.05


def lr_at(step: int, cfg: TrainConfig, total: int, done: float | None = None) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.lr * min_lr_ratio``.

    ``done``: the fraction of a time budget spent; the decay then follows whichever of steps
    and time is further along, and the warm-up ends at ``warmup_steps`` or at
    :data:`WARMUP_SHARE` of the time, whichever comes first.

    By steps alone this is transformers' ``get_cosine_with_min_lr_schedule_with_warmup``
    (tests compare them), except that the warm-up's first step is not spent at lr 0. It stays
    ours because of ``done``: the library schedules (``torch.optim.lr_scheduler``,
    transformers') are functions of a step counter the scheduler advances after each
    optimiser step, while under ``--max-minutes`` the rate follows the clock read when the
    step starts (validation and checkpoint time included) and the warm-up ends with its share
    of the budget. A ``LambdaLR`` around this function would only add a counter to checkpoint
    and read the clock when the previous step ends (before validation and checkpoints)
    instead of when the step starts, which changes the rates of a budgeted run.
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


@dataclass
class _Step:
    """What one optimiser step leaves for logging and the progress bar."""

    out: dict[str, Any]  # the model's output (``loss`` and other scalars)
    lr: float
    grad_norm: float
    samples: int  # this rank's share of the batch


class _Loop:
    """The moving parts of one training run; :func:`train` calls them in order."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: dict[str, torch.Tensor],
        cfg: TrainConfig,
        run_dir: Path,
        *,
        device: torch.device,
        dist_info: DistInfo,
        evaluate: Callable[[torch.nn.Module], dict[str, float]] | None,
        on_best: Callable[[torch.nn.Module, dict[str, float]], None] | None,
        config_dict: dict | None,
        tokens_per_sample: int,
        augment: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] | None = None,
        reserve_seconds: float = 0.0,
    ) -> None:
        self.model, self.data, self.cfg, self.run_dir = model, data, cfg, run_dir
        self.augment = augment
        self.reserve_s = reserve_seconds  # the budget's end kept for the stages after the loop
        self.device, self.dist_info = device, dist_info
        self.evaluate, self.on_best = evaluate, on_best
        self.config_dict = config_dict
        self.tokens_per_sample = tokens_per_sample
        self.n = next(iter(data.values())).shape[0]
        self.total = total_steps(cfg, self.n)
        self.ckpt_dir = run_dir / runfolder.CHECKPOINTS
        self.log_path = run_dir / runfolder.TRAIN_LOG
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        model.to(device)
        self.optimizer = make_optimizer(model, cfg)
        self.state = TrainState()
        self.budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes is not None else None
        self.use_amp = autocast_bf16(cfg, device)
        self.net: torch.nn.Module = model
        self.last_metrics: dict[str, float] = {}  # the last logged scalars, means over all ranks
        self.val_metrics: dict[str, float] = {}
        self.t0 = self.elapsed0 = 0.0
        self.window_t, self.window_tokens = 0.0, 0

    # ------------------------------------------------------------------------ start and resume
    def start(self, resume: bool, prep_seconds: float) -> None:
        """Restore the last checkpoint (or seed a fresh run), then start the clocks."""
        if resume:
            self._resume()
        else:
            torch.manual_seed(self.cfg.seed)
            self.state.prep_s = prep_seconds
        self.state.elapsed_s += prep_seconds
        # Buffers (e.g. the hard-token memory) stay per rank: each rank sees its own samples.
        if self.dist_info.enabled:
            self.net = wrap_ddp(self.model, self.dist_info, self.device)
        self.model.train()
        self.t0 = time.perf_counter()
        self.elapsed0 = self.state.elapsed_s
        self.window_t, self.window_tokens = time.perf_counter(), 0

    def _resume(self) -> None:
        last = latest_checkpoint(self.ckpt_dir)
        if last is None:
            raise MrisegError("--resume given but the run has no checkpoint", self.ckpt_dir)
        self.state, _, _ = load_checkpoint(last, self.model, self.optimizer)
        if self.dist_info.is_main:  # a checkpoint write cut by kill -9 leaves its temp file
            remove_stale_temp_files(self.ckpt_dir)
            self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop the log records past the checkpoint the run continues from."""
        if not self.log_path.is_file():
            return
        kept = [
            line
            for line in self.log_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= self.state.step
        ]
        self.log_path.write_text("".join(f"{line}\n" for line in kept))

    # ------------------------------------------------------------------------ time budget
    def time_done(self) -> float | None:
        """Share of the loop's time budget spent (None without a budget)."""
        if self.budget_s is None:
            return None
        loop_budget = max(1.0, self.budget_s - self.state.prep_s - self.reserve_s)
        return (self.elapsed0 + time.perf_counter() - self.t0 - self.state.prep_s) / loop_budget

    def done(self, spent: float | None) -> bool:
        return self.state.step >= self.total or (spent is not None and spent >= 1.0)

    def shown_total(self, spent: float | None, finished: bool) -> int:
        """The progress bar's total: with a time budget the projected number of steps."""
        if finished:
            return self.state.step
        if not spent:
            return self.total
        return min(self.total, max(self.state.step, round(self.state.step / spent)))

    # ------------------------------------------------------------------------ one step
    def step(self) -> _Step:
        """One optimiser step on the next batch; advances the data position and the clock."""
        state, cfg = self.state, self.cfg
        idx = _rank_slice(
            next_batch_indices(state, self.n, cfg.batch_size, cfg.seed), self.dist_info
        )
        batch = _to_device({k: v[idx] for k, v in self.data.items()}, self.device)
        if self.augment is not None:
            batch = self.augment(batch, state.step)
        lr = lr_at(state.step, cfg, self.total, self.time_done())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            out = self.net(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise MrisegError(f"loss became {loss.item()} at step {state.step}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        state.step += 1
        state.elapsed_s = self.elapsed0 + time.perf_counter() - self.t0
        return _Step(out, lr, float(gnorm), len(idx))

    # ------------------------------------------------------------------------ logging
    def log(self, record: dict[str, Any]) -> None:
        if self.dist_info.is_main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def log_train(self, step: _Step, finished: bool) -> None:
        """Count the step's tokens; every ``log_every`` steps (and at the end) log the window."""
        info = self.dist_info
        self.window_tokens += self.tokens_per_sample * step.samples * info.world_size
        if not (self.state.step % self.cfg.log_every == 0 or finished):
            return
        dt = time.perf_counter() - self.window_t
        # Each rank saw its own slice: log the means over ranks (one all-reduce).
        scalars = {
            k: float(v.detach()) for k, v in step.out.items() if torch.is_tensor(v) and v.dim() == 0
        }
        self.last_metrics = mean_over_ranks(scalars, info, self.device)
        self.log(
            {
                "step": self.state.step,
                "split": "train",
                "lr": step.lr,
                "grad_norm": step.grad_norm,
                "epoch": self.state.epoch,
                "tokens_per_s": self.window_tokens / max(dt, 1e-9),
                "elapsed_s": time.perf_counter() - self.t0,
                **self.last_metrics,
            }
        )
        self.window_t, self.window_tokens = time.perf_counter(), 0

    def show(self, progress: Callable[..., None] | None, step: _Step, total: int) -> None:
        if progress is None or not self.dist_info.is_main:
            return
        # One process: this step's loss. Several: the last logged mean over ranks
        # (this step's would be rank 0's alone, and averaging it costs a collective).
        if not self.dist_info.enabled:
            shown = {"loss": float(step.out["loss"].detach())}
        else:
            shown = {"loss": self.last_metrics["loss"]} if "loss" in self.last_metrics else {}
        progress(self.state.step, total, {**shown, **self.val_metrics})

    # ------------------------------------------------------------------------ validate, checkpoint
    def validate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.evaluate is not None and self.dist_info.is_main:
            self.model.eval()
            metrics = self.evaluate(self.model)
            self.model.train()
            if metrics.get("dice", float("-inf")) > self.state.best_metric:
                self.state.best_metric = metrics["dice"]
                self.state.best_step = self.state.step
                if self.on_best is not None:
                    self.on_best(self.model, metrics)
            self.log({"step": self.state.step, "split": "val", **metrics})
        barrier(self.dist_info)
        return metrics

    def checkpoint(self) -> None:
        if self.dist_info.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(
                self.ckpt_dir / runfolder.checkpoint_name(self.state.step),
                self.model,
                self.optimizer,
                self.state,
                config=self.config_dict,
            )
            prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        barrier(self.dist_info)

    def validate_and_checkpoint(self, finished: bool) -> None:
        """Validation every ``eval_every`` steps and a checkpoint every ``ckpt_every`` (and both
        at the end)."""
        step = self.state.step
        # Every rank enters validate() (it ends in a barrier); only rank 0 has ``evaluate``.
        eval_due = step % self.cfg.eval_every == 0 or finished
        if eval_due and (self.evaluate is not None or self.dist_info.enabled):
            self.val_metrics = {f"val_{k}": v for k, v in self.validate().items() if k == "dice"}
        if step % self.cfg.ckpt_every == 0 or finished:
            self.checkpoint()

    def stop_if_signalled(self, signum: int | None) -> None:
        """Ranks may see a signal at different steps: they stop together or not at all."""
        if any_rank(signum is not None, self.dist_info, self.device):
            self.checkpoint()
            name = signal.Signals(signum or signal.SIGTERM).name
            raise TrainingInterrupted(
                f"stopped by {name} at step {self.state.step}; checkpoint saved, continue with --resume",
                self.run_dir,
            )

    def summary(self) -> dict[str, Any]:
        state = self.state
        return {
            "steps": state.step,
            "seconds": time.perf_counter() - self.t0,
            "run_seconds": state.elapsed_s,
            "stopped_by": "time" if state.step < self.total else "steps",
            "precision": "bf16" if self.use_amp else "fp32",
            "best_dice": state.best_metric if state.best_step >= 0 else None,
            "best_step": state.best_step,
            "last": self.last_metrics,
            "config": asdict(self.cfg),
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
    tokens_per_sample: int = 0,
    prep_seconds: float = 0.0,
    augment: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] | None = None,
    reserve_seconds: float = 0.0,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` for the configured steps; returns a summary dict.

    ``evaluate`` (rank 0) returns metrics with a ``dice`` key; the best weights are handed to
    ``on_best``; state outside the weights (the hard-token memory) lives in model buffers and
    travels with them. ``prep_seconds``: time this invocation spent before the loop; with
    ``cfg.max_minutes`` it counts against the budget. ``augment(batch, step)``, when given,
    transforms each batch on the device before the step (:mod:`mrisegcli.training.augment`).
    ``reserve_seconds``: with ``cfg.max_minutes``, the end of the budget the loop leaves to the
    stages after it (the presence head's fit).
    """
    loop = _Loop(
        model,
        data,
        cfg,
        run_dir,
        device=device,
        dist_info=dist_info,
        evaluate=evaluate,
        on_best=on_best,
        config_dict=config_dict,
        tokens_per_sample=tokens_per_sample,
        augment=augment,
        reserve_seconds=reserve_seconds,
    )
    loop.start(resume, prep_seconds)
    with _StopFlag() as stop:
        finished = loop.done(loop.time_done())
        while not finished:
            step = loop.step()
            spent = loop.time_done()
            finished = loop.done(spent)
            loop.log_train(step, finished)
            loop.show(progress, step, loop.shown_total(spent, finished))
            loop.validate_and_checkpoint(finished)
            loop.stop_if_signalled(stop.signum)
    return loop.summary()
