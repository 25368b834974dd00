"""Predict latency per image with the model warm, and one PNG end to end.

    python bench/bench_predict.py                            # tiny preset, 128 px, both paradigms
    python bench/bench_predict.py --paradigm next-scale --threads 1
    python bench/bench_predict.py --device cuda --preset base

A :class:`~mrisegcli.workflow.segmenter.Segmenter` is built from a randomly initialised model
and untrained tokenizers at the preset (speed does not depend on the weights) and timed on
``Segmenter.predict``: one image (batch 1) and ``--batch`` images at once, after warm-up;
greedy decoding, one sample. The end-to-end time is ``read_scan -> scan_model_inputs ->
predict -> resize to the scan -> write_mask`` for one ``--png-size`` PNG, as ``mriseg predict``
does it per input. On CUDA the Segmenter decodes under bf16 autocast (its default there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    PeakMemory,
    Reporter,
    add_common_args,
    args_dict,
    machine_info,
    process_peak_rss_mb,
    random_model,
    run_config,
    sample_texts,
    setup,
    sync,
    time_it,
)
from PIL import Image

from mrisegcli.io import read_scan, resize_prob, scan_model_inputs, write_mask
from mrisegcli.workflow.segmenter import Segmenter

PARADIGMS = ("next-token", "next-scale")


def write_png(path: Path, size: int, seed: int) -> None:
    """A grey test image: a bright disc on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - 0.4 * size) ** 2 + (xx - 0.6 * size) ** 2 < (0.2 * size) ** 2
    img = rng.integers(20, 80, (size, size)) + 140 * disc
    Image.fromarray(img.astype(np.uint8)).save(path)


def end_to_end(
    seg: Segmenter, png: Path, out: Path, text: str, device: torch.device
) -> dict[str, float]:
    """Seconds of each stage of one input, the way ``mriseg predict`` runs it."""
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    scan = read_scan(png)
    t["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    x_NSS = scan_model_inputs(scan, seg.image_size)
    t["inputs_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prob_NSS = seg.predict(x_NSS, [text] * len(x_NSS)).prob.numpy()
    sync(device)
    t["predict_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hw = scan.pixels.shape[-2:]
    mask = scan.stack([resize_prob(p, hw) for p in prob_NSS]) > 0.5
    write_mask(mask, scan, out, "png", overwrite=True, description=text)
    t["write_s"] = time.perf_counter() - t0
    t["total_s"] = sum(t.values())
    return t


def bench_paradigm(
    paradigm: str, args: argparse.Namespace, device: torch.device, rep: Reporter, tmp: Path
) -> dict[str, Any]:
    cfg = run_config(args.preset, args.size, paradigm)
    model, _, bundle = random_model(cfg, device)
    seg = Segmenter(paradigm, model, bundle, cfg, device, batch_size=args.batch)
    rng = np.random.default_rng(args.seed)
    images = rng.random((args.batch, cfg.image_size, cfg.image_size), dtype=np.float32)
    texts = sample_texts()
    texts = [texts[i % len(texts)] for i in range(args.batch)]
    rep.line(f"{paradigm}: batch size {args.batch}, {cfg.image_size} px, amp {seg.amp_dtype}")

    with PeakMemory(device) as mem1:
        one = time_it(
            lambda: seg.predict(images[:1], texts[:1]),
            device,
            warmup=args.warmup,
            repeats=args.repeats,
        )
    with PeakMemory(device) as memb:
        many = time_it(
            lambda: seg.predict(images, texts), device, warmup=args.warmup, repeats=args.repeats
        )
    png, out = tmp / f"{paradigm}.png", tmp / f"{paradigm}_mask.png"
    write_png(png, args.png_size, args.seed)
    end_to_end(seg, png, out, texts[0], device)  # warm-up
    e2e = [end_to_end(seg, png, out, texts[0], device) for _ in range(args.repeats)]
    e2e_med = {k: float(np.median([r[k] for r in e2e])) for k in e2e[0]}
    res = {
        "batch1": {**one.to_json(), "ms_per_image": 1e3 * one.median, "memory": mem1.to_json()},
        "batch_n": {
            "batch": args.batch,
            **many.to_json(),
            "ms_per_image": 1e3 * many.median / args.batch,
            "images_per_s": args.batch / many.median,
            "memory": memb.to_json(),
        },
        "end_to_end_png": {"png_size": args.png_size, **e2e_med, "runs": e2e},
    }
    rep.line(f"  batch 1       : {1e3 * one.median:8.1f} ms/image   ({mem1.describe()})")
    rep.line(
        f"  batch {args.batch:<8}: {1e3 * many.median / args.batch:8.1f} ms/image   "
        f"{args.batch / many.median:.1f} images/s ({memb.describe()})"
    )
    rep.line(
        f"  PNG end to end: {1e3 * e2e_med['total_s']:8.1f} ms = read {1e3 * e2e_med['read_s']:.1f} + inputs "
        f"{1e3 * e2e_med['inputs_s']:.1f} + predict {1e3 * e2e_med['predict_s']:.1f} + resize/write "
        f"{1e3 * e2e_med['write_s']:.1f} ms ({args.png_size}x{args.png_size} PNG)"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, batch=32, warmup=1, repeats=3)
    p.add_argument("--paradigm", default="both", choices=[*PARADIGMS, "both"])
    p.add_argument("--png-size", type=int, default=256, help="side of the end-to-end test PNG")
    args = p.parse_args(argv)
    device = setup(args)
    rep = Reporter(args)
    rep.line(
        f"predict benchmark: preset {args.preset}, {args.size} px, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warm-up"
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mriseg-bench-") as tmp:
        for paradigm in PARADIGMS if args.paradigm == "both" else (args.paradigm,):
            results[paradigm.replace("-", "_")] = bench_paradigm(
                paradigm, args, device, rep, Path(tmp)
            )
    peak = process_peak_rss_mb()
    rep.line(f"process peak RSS: {peak:.0f} MB")
    rep.emit(
        {
            "bench": "predict",
            "machine": machine_info(device),
            "args": args_dict(args),
            "results": results,
            "process_peak_rss_mb": peak,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
