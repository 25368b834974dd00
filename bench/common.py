"""Shared helpers of the speed/memory benchmarks: options, timing, memory, random models.

Every benchmark is a script with the same core options (``--device --preset --size --batch
--json``), builds its models and tokenizers *untrained* from the preset's configs (speed does
not depend on the weights), times a callable after warm-up with the device synchronised, and
ends with one JSON line holding every number it printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mrisegcli.config import RunConfig, run_preset, with_image_size
from mrisegcli.workflow.bundle import TokenizerBundle

# ----------------------------------------------------------------------------- options


def add_common_args(
    p: argparse.ArgumentParser, *, batch: int, warmup: int = 1, repeats: int = 3
) -> None:
    """The options every benchmark shares; ``batch``/``warmup``/``repeats`` set the defaults."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base", "cpu", "cxr"])
    p.add_argument(
        "--size", type=int, default=128, help="image side in pixels (mask grid = size / 8)"
    )
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls before timing")
    p.add_argument(
        "--repeats", type=int, default=repeats, help="timed calls (the median is reported)"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: leave the default)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json",
        action="store_true",
        help="stdout holds only the JSON line (the readable lines go to stderr)",
    )
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def setup(args: argparse.Namespace) -> torch.device:
    """Threads, seed and device from the parsed options."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--batch and --repeats must be >= 1, --warmup >= 0")
    return pick_device(args.device)


# ----------------------------------------------------------------------------- output


class Reporter:
    """Readable lines to stdout (stderr with ``--json``), then one JSON line to stdout."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.stream = sys.stderr if args.json else sys.stdout
        self.out: Path | None = args.out

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def emit(self, result: dict[str, Any]) -> None:
        text = json.dumps(result, default=_json_default)
        print(text, flush=True)
        if self.out is not None:
            self.out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-able: {type(obj).__name__}")


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def args_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds of each timed call."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "runs_s": self.seconds}


def time_it(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times, each timed to device sync."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = Timing()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        t.seconds.append(time.perf_counter() - t0)
    return t


# ----------------------------------------------------------------------------- memory

_MB = 1024 * 1024


def add_matmul_size_arg(p: argparse.ArgumentParser, also: str = "") -> None:
    """``--matmul-size``: the side of the peak-FLOP/s matmul (see :func:`matmul_size`)."""
    p.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help=f"side of the peak-FLOP/s matmul (default: 2048 on a CPU, 8192 on CUDA{also})",
    )


def matmul_size(args: argparse.Namespace, device: torch.device) -> int:
    """``--matmul-size`` as given, else large enough to reach the peak on ``device``."""
    if args.matmul_size is None:
        return 8192 if device.type == "cuda" else 2048
    return args.matmul_size


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict[str, Any]:
    """FLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` (best of ``repeats`` after one warm-up).

    On CUDA each timed call runs 10 matmuls back to back, so launch and sync latency do not count.
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    inner = 10 if device.type == "cuda" else 1

    def run() -> None:
        for _ in range(inner):
            torch.matmul(a, b)

    t = time_it(run, device, warmup=1, repeats=repeats)
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "matmuls_per_call": inner,
        **t.to_json(),
        "flops_per_s": inner * 2 * n**3 / t.min,
    }


def process_peak_rss_mb() -> float:
    """Peak resident memory of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """Resident memory now (psutil, else /proc/self/statm); None where neither is available."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / _MB
    except ImportError:
        pass
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / _MB


class PeakMemory:
    """Peak memory over a ``with`` block.

    CPU: resident memory sampled every ``interval`` s by a thread (``ru_maxrss`` cannot be reset,
    so it would report the process's earlier peaks); ``rss_peak_mb`` is the highest sample,
    ``rss_start_mb`` the value on entry. CUDA: ``torch.cuda.max_memory_allocated`` after a reset.
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.rss_start_mb = self.rss_peak_mb = current_rss_mb()
        self.cuda_peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = current_rss_mb()
        if now is not None and (self.rss_peak_mb is None or now > self.rss_peak_mb):
            self.rss_peak_mb = now

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_start_mb = self.rss_peak_mb = current_rss_mb()
        if self.rss_start_mb is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self._sample()
        if self.device.type == "cuda":
            sync(self.device)
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / _MB

    def to_json(self) -> dict[str, Any]:
        return {
            "rss_start_mb": self.rss_start_mb,
            "rss_peak_mb": self.rss_peak_mb,
            "cuda_max_allocated_mb": self.cuda_peak_mb,
        }

    def describe(self) -> str:
        if self.cuda_peak_mb is not None:
            return f"CUDA max allocated {self.cuda_peak_mb:.0f} MB"
        if self.rss_peak_mb is None:
            return "RSS not measurable here"
        return f"RSS peak {self.rss_peak_mb:.0f} MB (from {self.rss_start_mb:.0f} MB)"


# ----------------------------------------------------------------------------- models


def run_config(preset: str, size: int, paradigm: str) -> RunConfig:
    """The preset's run config at ``size`` pixels for ``paradigm``."""
    return replace(with_image_size(run_preset(preset), size), paradigm=paradigm)


def sample_texts() -> list[str]:
    """Prompts in the QaTa grammar (one per zone pair), to build a text tokenizer from."""
    from mrisegcli.data.synth import ZONES, describe

    return [describe([a, b]) for i, a in enumerate(ZONES) for b in ZONES[i:]]


def random_bundle(cfg: RunConfig) -> TokenizerBundle:
    """Untrained tokenizers the paradigm of ``cfg`` needs, built from its configs."""
    from mrisegcli.tokenizers.image_vq import ImageVQ
    from mrisegcli.tokenizers.mask_vq import MaskVQ
    from mrisegcli.tokenizers.multiscale import MultiScaleMaskQuantizer
    from mrisegcli.tokenizers.text import train_text_tokenizer
    from mrisegcli.workflow.bundle import needed_tokenizers

    need = needed_tokenizers(cfg.paradigm, cfg.strategies.image_input)
    text = train_text_tokenizer(sample_texts(), vocab_size=cfg.fit.text_vocab_size)
    parts = {
        "mask_vq": MaskVQ(cfg.mask_vq) if "mask_vq" in need else None,
        "image_vq": ImageVQ(cfg.image_vq) if "image_vq" in need else None,
        "multiscale": MultiScaleMaskQuantizer(cfg.multiscale) if "multiscale" in need else None,
    }
    return TokenizerBundle(text=text, **{k: v.eval() for k, v in parts.items() if v is not None})


def random_model(
    cfg: RunConfig, device: torch.device
) -> tuple[torch.nn.Module, Any, TokenizerBundle]:
    """(model, model config, tokenizers), randomly initialised at the preset, on ``device``."""
    from mrisegcli.workflow.segmenter import build_model, model_config

    bundle = random_bundle(cfg).to(device)
    mcfg = model_config(cfg, bundle)
    model = build_model(cfg.paradigm, mcfg, bundle).to(device)
    return model, mcfg, bundle


def random_text(
    batch: int, text_len: int, vocab: int, device: torch.device, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text ids (B, L) and a padding mask with 1..L valid tokens per row."""
    ids_BL = torch.randint(0, vocab, (batch, text_len), generator=gen)
    lens_B = torch.randint(1, text_len + 1, (batch,), generator=gen)
    mask_BL = torch.arange(text_len)[None] < lens_B[:, None]
    return ids_BL.to(device), mask_BL.to(device)


class CallCounter:
    """Counts calls of a module (e.g. the first transformer block = one forward pass)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
