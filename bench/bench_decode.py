"""Decode speed of both paradigms on one batch: KV cache vs recomputation, next-scale vs next-token.

    python bench/bench_decode.py                                  # tiny preset, 128 px (16x16 grid)
    python bench/bench_decode.py --batch 8 --threads 1 --uncached-tokens 32
    python bench/bench_decode.py --device cuda --preset base --batch 64   # + compile and bf16
    python bench/bench_decode.py --paradigm next-token --batch 1 --threads 2 --uncached-tokens 256 --compile

Models and tokenizers are randomly initialised at the preset (speed does not depend on the
weights); image codes / pixels and text ids are random. Decoding is greedy, so the cached and
uncached decoders must give identical codes, which is checked.

The uncached next-token decoder runs one full forward pass per mask token, which is very slow
on a CPU. ``--uncached-tokens N`` times only N of the Gm*Gm steps (evenly spaced over the mask,
each fed the cached decoder's codes as its prefix, exactly the work the uncached decoder does at
that step) and estimates the whole decode by linear interpolation between them. Default: all
steps on CUDA, 32 on a CPU; 0 skips the uncached next-token decode (``identical`` and the
summary's ``greedy_identical`` are then null: not checked). ``ms_per_step`` is the cached
decode's time less its prefill (timed alone), over the Gm*Gm - 1 steps. ``--compile`` also times
the compiled step on a CPU (``MaskGenerator(compile=True)``; CUDA always does).

Ratios that matter are timed in turns (a, b, a, b, ...) in one process, so that a change of the
machine's load hits both sides: the cached next-scale vs next-token decode (``head_to_head``,
the summary's ``next_scale_over_next_token_time``) and, for next-token, steps that read only
the filled prefix of the KV cache vs the whole cache (``keys_read``; the whole cache is what the
compiled, fixed-shape step reads). For next-scale, ``parts_ms_per_mask`` splits the decode time
into the conv image encoder, the quantiser's per-scale f_hat updates and the rest, and
``arithmetic`` counts the transformer's FLOPs per mask, the FLOP/s it reached against a float32
matmul peak measured in the same run (``--matmul-size``) and the next-scale speed-up over
next-token that running at that peak would give (the summary's
``next_scale_speedup_bound_at_peak``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from common import (
    CallCounter,
    PeakMemory,
    Reporter,
    Timing,
    add_common_args,
    add_matmul_size_arg,
    args_dict,
    machine_info,
    matmul_peak,
    matmul_size,
    random_model,
    random_text,
    run_config,
    setup,
    sync,
    time_it,
)

from mrisegcli.decode.next_scale import generate_scales, generate_scales_uncached
from mrisegcli.decode.next_token import MaskGenerator, generate_masks_uncached
from mrisegcli.decode.sampling import sample
from mrisegcli.tokenizers.text import text_vocab_size
from mrisegcli.training.loop import cpu_has_native_bf16

Result = tuple[dict[str, Any], Callable[[], Any]]  # (numbers, the cached decode to time again)


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, *, warmup: int, repeats: int
) -> dict[str, Timing]:
    """Time several callables in turns (a, b, a, b, ...), so that a change of machine load hits
    all of them alike: their ratio is what such a measurement is for."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].seconds.append(time.perf_counter() - t0)
    return times


def count_passes(model: torch.nn.Module, fn: Any) -> int:
    """Forward passes of the transformer during ``fn()`` (calls of its final norm, one per pass
    in training and cached passes alike)."""
    counter = CallCounter(model.transformer.norm)
    try:
        fn()
    finally:
        counter.close()
    return counter.count


@torch.no_grad()
def uncached_steps_estimate(
    model: torch.nn.Module,
    image: torch.Tensor,
    ids: torch.Tensor,
    tmask: torch.Tensor,
    codes_BN: torch.Tensor,
    n_steps: int,
    device: torch.device,
) -> dict[str, Any]:
    """Time ``n_steps`` evenly spaced steps of the uncached decoder and interpolate the rest.

    Step n is one full pass over the prefix and the first n codes (the cached decoder's, so the
    greedy token it picks must equal the cached one). Returns the estimated total seconds, the
    measured steps and whether every measured step agreed with the cached decode.
    """
    n_mask = codes_BN.shape[1]
    positions = np.unique(np.linspace(0, n_mask - 1, max(2, n_steps)).round().astype(int))

    def step(n: int) -> torch.Tensor:
        logits_BK = model.mask_logits(image, ids, tmask, codes_BN[:, :n])[:, -1]
        return sample(logits_BK, 0.0)

    step(int(positions[-1]))  # warm-up at the longest sequence
    times, agree = [], 0
    for n in positions:
        sync(device)
        t0 = time.perf_counter()
        tok_B = step(int(n))
        sync(device)
        times.append(time.perf_counter() - t0)
        agree += int(torch.equal(tok_B, codes_BN[:, n]))
    per_step = np.interp(np.arange(n_mask), positions, times)
    return {
        "estimated_s": float(per_step.sum()),
        "measured_steps": positions.tolist(),
        "measured_step_s": times,
        "identical": agree == len(positions),
    }


@torch.no_grad()
def detokenize_ms(
    fn: Any, batch: int, args: argparse.Namespace, device: torch.device, rep: Reporter
) -> float:
    """Milliseconds per mask of codes -> full-size mask logits (not part of the decode times)."""
    ms = 1e3 * time_it(fn, device, warmup=args.warmup, repeats=args.repeats).median / batch
    rep.line(f"  codes -> mask logits: {ms:.3f} ms/mask (not in the decode times)")
    return ms


def eval_model(
    args: argparse.Namespace, paradigm: str, device: torch.device
) -> tuple[Any, Any, Any, Any]:
    """(run config, random model in eval mode, model config, tokenizers) at the preset."""
    cfg = run_config(args.preset, args.size, paradigm)
    model, mcfg, bundle = random_model(cfg, device)
    return cfg, model.eval(), mcfg, bundle


def bench_next_token(args: argparse.Namespace, device: torch.device, rep: Reporter) -> Result:
    """Next-token numbers, and the cached decode as a callable for the head-to-head timing."""
    cfg, model, mcfg, bundle = eval_model(args, "next-token", device)
    lay, B = model.layout, args.batch
    gen = torch.Generator().manual_seed(args.seed)
    image = torch.randint(
        0, mcfg.image_codebook_size, (B, mcfg.image_grid, mcfg.image_grid), generator=gen
    )
    image = image.to(device)
    ids, tmask = random_text(B, cfg.text_len, text_vocab_size(bundle.text), device, gen)
    rep.line(
        f"next-token: {mcfg.mask_grid}x{mcfg.mask_grid} mask grid = {lay.n_mask} tokens, "
        f"prefix {lay.prefix_len} tokens, batch {B}"
    )

    decode = MaskGenerator(model)
    with PeakMemory(device) as mem:
        cached = time_it(
            lambda: decode(image, ids, tmask), device, warmup=args.warmup, repeats=args.repeats
        )
    codes = decode(image, ids, tmask)
    passes = count_passes(model, lambda: decode(image, ids, tmask))

    def prefill_only() -> None:
        with torch.no_grad():
            model.prefill(image, ids, tmask)

    pre = time_it(prefill_only, device, warmup=args.warmup, repeats=args.repeats)
    ms_step = 1e3 * max(cached.median - pre.median, 0.0) / (lay.n_mask - 1)
    out: dict[str, Any] = {
        "mask_grid": mcfg.mask_grid,
        "n_mask_tokens": lay.n_mask,
        "prefix_len": lay.prefix_len,
        "forward_passes": passes,
        "forward_passes_formula": f"1 prefill + {lay.n_mask - 1} steps",
        "cached": {
            **cached.to_json(),
            "ms_per_mask": 1e3 * cached.median / B,
            "masks_per_s": B / cached.median,
            "memory": mem.to_json(),
            "prefill_ms": 1e3 * pre.median,
            "ms_per_step": ms_step,
        },
    }
    rep.line(
        f"  cached   : {B / cached.median:9.2f} masks/s  ({1e3 * cached.median / B:.2f} ms/mask, "
        f"{passes} forward passes, {mem.describe()})"
    )
    rep.line(
        f"  cached step: {ms_step:.3f} ms per step of the batch (prefill {1e3 * pre.median:.1f} ms)"
    )
    fixed = MaskGenerator(model, fixed_shapes=True)  # every step reads the whole cache
    pair = time_interleaved(
        {
            "filled_prefix": lambda: decode(image, ids, tmask),
            "whole_cache": lambda: fixed(image, ids, tmask),
        },
        device,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    speedup = pair["whole_cache"].median / pair["filled_prefix"].median
    out["keys_read"] = {
        **{name: {**t.to_json(), "ms_per_mask": 1e3 * t.median / B} for name, t in pair.items()},
        "prefix_speedup": speedup,
        "identical": torch.equal(fixed(image, ids, tmask), codes),
    }
    rep.line(
        f"  keys read per step, timed in turns: filled prefix "
        f"{1e3 * pair['filled_prefix'].median / B:.2f} ms/mask, whole cache (fixed shapes, as compiled) "
        f"{1e3 * pair['whole_cache'].median / B:.2f} ms/mask: {speedup:.2f}x, "
        f"codes identical: {out['keys_read']['identical']}"
    )
    out["detokenize_ms_per_mask"] = detokenize_ms(
        lambda: bundle.mask_vq.decode(codes), B, args, device, rep
    )

    n_unc = args.uncached_tokens
    if n_unc is None:
        n_unc = lay.n_mask if device.type == "cuda" else 32
    if n_unc >= lay.n_mask:
        t = time_it(
            lambda: generate_masks_uncached(model, image, ids, tmask),
            device,
            warmup=min(args.warmup, 1),
            repeats=args.repeats,
        )
        same = torch.equal(generate_masks_uncached(model, image, ids, tmask), codes)
        unc = {**t.to_json(), "seconds": t.median, "estimated": False, "identical": same}
    elif n_unc > 0:
        est = uncached_steps_estimate(model, image, ids, tmask, codes.flatten(1), n_unc, device)
        unc = {**est, "seconds": est["estimated_s"], "estimated": True}
    else:
        unc = None
    if unc is not None:
        unc.update(
            ms_per_mask=1e3 * unc["seconds"] / B,
            masks_per_s=B / unc["seconds"],
            kv_speedup=unc["seconds"] / cached.median,
        )
        out["uncached"] = unc
        how = (
            f"estimated from {len(unc['measured_steps'])} of {lay.n_mask} steps, linear interpolation"
            if unc["estimated"]
            else "all steps timed"
        )
        rep.line(
            f"  uncached : {unc['masks_per_s']:9.2f} masks/s  ({unc['ms_per_mask']:.2f} ms/mask; {how})"
        )
        rep.line(
            f"  KV cache speed-up: {unc['kv_speedup']:.1f}x   greedy codes identical: {unc['identical']}"
        )
    else:
        rep.line(
            "  uncached : skipped (--uncached-tokens 0); greedy identity vs uncached not checked"
        )
    if device.type == "cpu" and args.compile:
        out["cpu_compile"] = cpu_compile(
            model, image, ids, tmask, codes, decode, unc, args, device, rep
        )
    if device.type == "cuda":
        out["cuda_variants"] = cuda_variants(
            model, image, ids, tmask, codes, cached.median, args, device, rep
        )
    return out, lambda: decode(image, ids, tmask)


def cuda_variants(
    model: torch.nn.Module,
    image: torch.Tensor,
    ids: torch.Tensor,
    tmask: torch.Tensor,
    codes: torch.Tensor,
    eager_s: float,
    args: argparse.Namespace,
    device: torch.device,
    rep: Reporter,
) -> dict[str, Any]:
    """Cached next-token decode with bf16 autocast and/or the compiled (CUDA-graph) step."""
    B, res = args.batch, {}
    for name, kw in [
        ("bf16", {"amp_dtype": torch.bfloat16}),
        ("compile", {"compile": True}),
        ("compile_bf16", {"compile": True, "amp_dtype": torch.bfloat16}),
    ]:
        try:
            decode = MaskGenerator(model, **kw)
            t = time_it(
                lambda d=decode: d(image, ids, tmask),
                device,
                warmup=max(3, args.warmup),
                repeats=args.repeats,
            )
            agree = (decode(image, ids, tmask) == codes).float().mean().item()
        except Exception as e:  # e.g. no compiler toolchain: report and go on
            res[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            rep.line(f"  {name:<13}: failed ({res[name]['error']})")
            continue
        res[name] = {
            **t.to_json(),
            "masks_per_s": B / t.median,
            "speedup_vs_eager_fp32": eager_s / t.median,
            "codes_agree_with_fp32": agree,
        }
        rep.line(
            f"  {name:<13}: {B / t.median:9.2f} masks/s  ({eager_s / t.median:.2f}x eager fp32, "
            f"{100 * agree:.1f}% codes as fp32)"
        )
    return res


def cpu_compile(
    model: torch.nn.Module,
    image: torch.Tensor,
    ids: torch.Tensor,
    tmask: torch.Tensor,
    codes: torch.Tensor,
    eager: Callable[..., Any],
    unc: dict[str, Any] | None,
    args: argparse.Namespace,
    device: torch.device,
    rep: Reporter,
) -> dict[str, Any]:
    """The compiled decode step on a CPU (Inductor C++ kernels, whole cache read), timed in turns
    with the eager decode; compile time reported apart."""
    B = args.batch
    try:
        compiled = MaskGenerator(model, compile=True)
        t0 = time.perf_counter()
        first = compiled(image, ids, tmask)
        compile_s = time.perf_counter() - t0
    except Exception as e:  # e.g. no C++ compiler: report and go on
        err = f"{type(e).__name__}: {e}".splitlines()[0]
        rep.line(f"  compiled step: failed ({err})")
        return {"error": err}
    pair = time_interleaved(
        {
            "eager": lambda: eager(image, ids, tmask),
            "compiled": lambda: compiled(image, ids, tmask),
        },
        device,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    res = {
        **{name: {**t.to_json(), "ms_per_mask": 1e3 * t.median / B} for name, t in pair.items()},
        "compile_s": compile_s,
        "speedup_vs_eager": pair["eager"].median / pair["compiled"].median,
        "codes_agree_with_eager": (first == codes).float().mean().item(),
    }
    if unc is not None:
        res["kv_speedup"] = unc["seconds"] / pair["compiled"].median
    rep.line(
        f"  compiled step (CPU): {res['compiled']['ms_per_mask']:.2f} ms/mask vs eager "
        f"{res['eager']['ms_per_mask']:.2f} in turns ({res['speedup_vs_eager']:.2f}x; compile {compile_s:.0f} s; "
        f"{100 * res['codes_agree_with_eager']:.1f}% codes as eager)"
    )
    return res


def bench_next_scale(args: argparse.Namespace, device: torch.device, rep: Reporter) -> Result:
    """Next-scale numbers, and the cached decode as a callable for the head-to-head timing."""
    cfg, model, mcfg, bundle = eval_model(args, "next-scale", device)
    q, lay, B = bundle.multiscale, model.layout, args.batch
    gen = torch.Generator().manual_seed(args.seed + 1)
    image = torch.rand(B, 1, cfg.image_size, cfg.image_size, generator=gen).to(device)
    ids, tmask = random_text(B, cfg.text_len, text_vocab_size(bundle.text), device, gen)
    K = len(lay.scales)
    rep.line(
        f"next-scale: scales {list(lay.scales)} = {lay.n_scale_tokens} tokens in {K} steps, "
        f"condition {lay.n_cond} tokens, batch {B}"
    )

    def cached_fn(amp: torch.dtype | None = None) -> list[torch.Tensor]:
        return generate_scales(model, q, image, ids, tmask, amp_dtype=amp)

    with PeakMemory(device) as mem:
        cached = time_it(cached_fn, device, warmup=args.warmup, repeats=args.repeats)
    idx = cached_fn()
    passes = count_passes(model, cached_fn)
    uncached = time_it(
        lambda: generate_scales_uncached(model, q, image, ids, tmask),
        device,
        warmup=min(args.warmup, 1),
        repeats=args.repeats,
    )
    idx_unc = generate_scales_uncached(model, q, image, ids, tmask)
    same = all(torch.equal(a, b) for a, b in zip(idx, idx_unc, strict=True))
    out: dict[str, Any] = {
        "scales": list(lay.scales),
        "n_scale_tokens": lay.n_scale_tokens,
        "cond_len": lay.n_cond,
        "forward_passes": passes,
        "forward_passes_formula": f"1 prefill + {K - 1} scale steps",
        "cached": {
            **cached.to_json(),
            "ms_per_mask": 1e3 * cached.median / B,
            "masks_per_s": B / cached.median,
            "memory": mem.to_json(),
        },
        "uncached": {
            **uncached.to_json(),
            "ms_per_mask": 1e3 * uncached.median / B,
            "masks_per_s": B / uncached.median,
            "identical": same,
        },
        "kv_speedup": uncached.median / cached.median,
    }
    rep.line(
        f"  cached   : {B / cached.median:9.2f} masks/s  ({1e3 * cached.median / B:.2f} ms/mask, "
        f"{passes} forward passes, {mem.describe()})"
    )
    rep.line(
        f"  uncached : {B / uncached.median:9.2f} masks/s  ({1e3 * uncached.median / B:.2f} ms/mask)"
    )
    rep.line(f"  KV cache speed-up: {out['kv_speedup']:.2f}x   greedy codes identical: {same}")
    out["parts_ms_per_mask"] = next_scale_parts(
        model, q, image, idx, cached.median, args, device, rep
    )
    out["arithmetic"] = next_scale_flops(model)
    out["detokenize_ms_per_mask"] = detokenize_ms(
        lambda: q.idx_to_logits(idx), B, args, device, rep
    )
    if device.type == "cuda" or cpu_has_native_bf16():
        # bf16 autocast (a CPU: only where it multiplies bf16 natively); greedy codes may differ
        # from float32's where two codes are nearly tied, so they are compared and reported
        pair = time_interleaved(
            {"fp32": cached_fn, "bf16": lambda: cached_fn(torch.bfloat16)},
            device,
            warmup=args.warmup,
            repeats=args.repeats,
        )
        t, t32 = pair["bf16"], pair["fp32"]
        idx16 = cached_fn(torch.bfloat16)
        agree = sum(int((a == b).sum()) for a, b in zip(idx, idx16, strict=True))
        out["bf16"] = {
            **t.to_json(),
            "ms_per_mask": 1e3 * t.median / B,
            "masks_per_s": B / t.median,
            "speedup_vs_fp32": t32.median / t.median,
            "codes_same_as_fp32": agree / sum(a.numel() for a in idx),
        }
        rep.line(
            f"  bf16     : {B / t.median:9.2f} masks/s  ({t32.median / t.median:.2f}x fp32 timed "
            f"in turns; {100 * out['bf16']['codes_same_as_fp32']:.1f}% of codes as fp32)"
        )
    return out, cached_fn


@torch.no_grad()
def next_scale_parts(
    model: torch.nn.Module,
    q: torch.nn.Module,
    image: torch.Tensor,
    idx: list[torch.Tensor],
    total_s: float,
    args: argparse.Namespace,
    device: torch.device,
    rep: Reporter,
) -> dict[str, float]:
    """Where a cached next-scale decode spends its time (ms/mask): the conv image encoder, the
    quantiser's K f_hat updates (upsampling + refinement conv + next input), the rest (mostly
    the transformer: prefill and K - 1 scale steps, and sampling)."""
    B = image.shape[0]

    def quantiser_updates() -> None:
        f_hat = q.empty_fhat(B, device=device)
        for k, idx_Bpp in enumerate(idx):
            f_hat, _ = q.next_input(k, f_hat, idx_Bpp)

    ms = {
        name: 1e3 * time_it(fn, device, warmup=args.warmup, repeats=args.repeats).median / B
        for name, fn in (
            ("image_encoder", lambda: model.encoder(image)),
            ("quantiser", quantiser_updates),
        )
    }
    ms["transformer_and_rest"] = 1e3 * total_s / B - ms["image_encoder"] - ms["quantiser"]
    rep.line("  parts: " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()) + " ms/mask")
    return ms


def next_scale_flops(model: torch.nn.Module) -> dict[str, Any]:
    """FLOPs of one cached next-scale decode per mask, counted from the model's shapes.

    Each pass (the prefill over the condition and scale 0, then one pass per later scale) costs
    2 * (the transformer's linear weights) per token it processes, plus the output head over the
    scale tokens, plus attention 4 * dim * queries * keys per layer with every key before and
    within the pass counted (the block mask is ignored: an upper bound of what attention needs).
    The conv image encoder and the quantiser are timed apart (``parts_ms_per_mask``)."""
    lay, tc = model.layout, model.config.transformer
    lin = sum(
        m.weight.numel() for m in model.transformer.modules() if isinstance(m, torch.nn.Linear)
    )
    head = model.head.weight.numel() + model.code_proj.weight.numel()
    passes = [lay.n_cond + lay.scale_lengths[0], *lay.scale_lengths[1:]]
    flops, keys = 0, 0
    for n in passes:
        keys += n
        flops += 2 * n * (lin + head) + 4 * tc.n_layers * tc.dim * n * keys
    return {
        "flops_per_mask": flops,
        "tokens_per_mask": sum(passes),
        "formula": "sum over passes of 2 n (W_linear + W_head) + 4 n_layers dim n keys",
    }


def arithmetic_bound(
    ns: dict[str, Any],
    head_to_head: dict[str, Any] | None,
    matmul_side: int,
    repeats: int,
    device: torch.device,
    rep: Reporter,
) -> dict[str, Any]:
    """How close next-scale's transformer runs to this machine's float32 matmul peak (measured
    here), and the next-scale speed-up over next-token that running at the peak would give:
    next-token's ms/mask (head to head) over (FLOPs / peak + image encoder + quantiser)."""
    peak = matmul_peak(matmul_side, torch.float32, device, repeats)
    parts, flops = ns["parts_ms_per_mask"], ns["arithmetic"]["flops_per_mask"]
    achieved = flops / (1e-3 * parts["transformer_and_rest"])
    at_peak_ms = 1e3 * flops / peak["flops_per_s"] + parts["image_encoder"] + parts["quantiser"]
    out: dict[str, Any] = {
        "matmul_peak": peak,
        "flops_per_s": achieved,
        "fraction_of_peak": achieved / peak["flops_per_s"],
        "ms_per_mask_at_peak": at_peak_ms,
        "speedup_bound_at_peak": None,
    }
    rep.line(
        f"next-scale arithmetic: {flops / 1e9:.2f} GFLOP/mask, {achieved / 1e9:.1f} GFLOP/s "
        f"= {100 * out['fraction_of_peak']:.0f}% of the float32 matmul peak "
        f"({peak['flops_per_s'] / 1e9:.0f} GFLOP/s, {matmul_side}^2); at the peak "
        f"{at_peak_ms:.1f} ms/mask"
    )
    if head_to_head is not None:
        out["speedup_bound_at_peak"] = head_to_head["next_token"]["ms_per_mask"] / at_peak_ms
        rep.line(
            f"  next-scale over next-token if its transformer ran at the peak: "
            f"{out['speedup_bound_at_peak']:.1f}x"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, batch=16, warmup=1, repeats=3)
    p.add_argument(
        "--uncached-tokens",
        type=int,
        default=None,
        help="uncached next-token steps to time (default: all on CUDA, 32 on CPU; 0: skip)",
    )
    p.add_argument(
        "--paradigm",
        default="both",
        choices=["next-token", "next-scale", "both"],
        help="decoders to time (the head-to-head ratio needs both)",
    )
    p.add_argument(
        "--compile", action="store_true", help="also time the compiled next-token step on a CPU"
    )
    add_matmul_size_arg(p, also="; next-scale's arithmetic bound, 0 skips it")
    args = p.parse_args(argv)
    device = setup(args)
    args.matmul_size = matmul_size(args, device)
    rep = Reporter(args)
    rep.line(
        f"decode benchmark: preset {args.preset}, {args.size} px, batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warm-up"
    )
    nt = ns = head_to_head = None
    ratio: float | None = None
    if args.paradigm in ("next-token", "both"):
        nt, nt_decode = bench_next_token(args, device, rep)
    if args.paradigm in ("next-scale", "both"):
        ns, ns_decode = bench_next_scale(args, device, rep)
    if nt is not None and ns is not None:
        # the headline ratio: both cached decoders timed in turns, same batch, same transformer
        pair = time_interleaved(
            {"next_token": nt_decode, "next_scale": ns_decode},
            device,
            warmup=args.warmup,
            repeats=args.repeats,
        )
        ratio = pair["next_scale"].median / pair["next_token"].median
        head_to_head = {
            name: {**t.to_json(), "ms_per_mask": 1e3 * t.median / args.batch}
            for name, t in pair.items()
        }
        rep.line(
            f"head to head, timed in turns: next-token {head_to_head['next_token']['ms_per_mask']:.2f} ms/mask, "
            f"next-scale {head_to_head['next_scale']['ms_per_mask']:.2f} ms/mask"
        )
        rep.line(
            f"next-scale / next-token cached decode time: {ratio:.3f} "
            f"(next-scale {1 / ratio:.2f}x faster; {ns['forward_passes']} vs {nt['forward_passes']} forward passes)"
        )
    if ns is not None and args.matmul_size > 0:
        ns["arithmetic"].update(
            arithmetic_bound(ns, head_to_head, args.matmul_size, args.repeats, device, rep)
        )
    nt_, ns_ = nt or {}, ns or {}
    bound = ns_.get("arithmetic", {})
    checks = [
        nt_.get("uncached", {}).get("identical"),
        nt_.get("keys_read", {}).get("identical"),
        ns_.get("uncached", {}).get("identical"),
    ]
    done = [c for c in checks if c is not None]
    rep.emit(
        {
            "bench": "decode",
            "machine": machine_info(device),
            "args": args_dict(args),
            "next_token": nt,
            "next_scale": ns,
            "head_to_head": head_to_head,
            "summary": {
                "kv_speedup_next_token": nt_.get("uncached", {}).get("kv_speedup"),
                "kv_speedup_next_token_estimated": nt_.get("uncached", {}).get("estimated"),
                "kv_speedup_next_token_compiled": nt_.get("cpu_compile", {}).get("kv_speedup"),
                "ms_per_step_next_token_cached": nt_.get("cached", {}).get("ms_per_step"),
                "kv_speedup_next_scale": ns_.get("kv_speedup"),
                "next_scale_over_next_token_time": ratio,
                "next_scale_speedup_over_next_token": None if ratio is None else 1 / ratio,
                "next_token_prefix_speedup": nt_.get("keys_read", {}).get("prefix_speedup"),
                "next_scale_bf16_speedup_vs_fp32": ns_.get("bf16", {}).get("speedup_vs_fp32"),
                "next_scale_fraction_of_peak": bound.get("fraction_of_peak"),
                "next_scale_speedup_bound_at_peak": bound.get("speedup_bound_at_peak"),
                "forward_passes_next_token": nt_.get("forward_passes"),
                "forward_passes_next_scale": ns_.get("forward_passes"),
                "masks_per_s_next_token_cached": nt_.get("cached", {}).get("masks_per_s"),
                "masks_per_s_next_scale_cached": ns_.get("cached", {}).get("masks_per_s"),
                # null when the uncached next-token check was skipped (--uncached-tokens 0): not checked
                "greedy_identical": None
                if (nt is not None and "uncached" not in nt) or not done
                else all(done),
                "greedy_checks_done": len(done),
            },
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
