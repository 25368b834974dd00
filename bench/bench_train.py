"""Training throughput of both paradigms and achieved FLOP/s against a matmul peak of this machine.

    python bench/bench_train.py                              # tiny preset, 128 px, both paradigms
    python bench/bench_train.py --batch 8 --threads 1 --steps 3
    python bench/bench_train.py --device cuda --preset base --batch 64
    python bench/bench_train.py --threads 2 --batch 16 --cpu-bf16     # bf16 on a native-bf16 CPU

One training step = forward (all losses of the preset) + backward + gradient clipping + AdamW,
as in the training loop (bf16 autocast on CUDA; float32 on a CPU, bf16 autocast with
``--cpu-bf16`` where the CPU has native bf16), on random codes at the
preset with a randomly initialised model.

FLOPs of one step (a lower bound: embeddings, output heads, losses, norms and the conv image
encoder are left out)::

    B * (6 * N * T  +  12 * n_layers * T**2 * dim)

N = parameters of the transformer blocks, T = tokens in the sequence (condition + mask inputs).
6 N T counts the block matmuls forward (2 N T) and backward (4 N T); the attention term counts
QK^T and attention-times-V (2 T^2 dim each forward per layer, x3 with backward). The peak is a
square float32 ``torch.matmul`` (2 n^3 FLOPs) timed in the same run, plus bf16 on CUDA (and with
``--cpu-bf16``), where training runs under bf16 autocast and the fraction is taken against the
bf16 peak.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

import torch
from common import (
    PeakMemory,
    Reporter,
    add_common_args,
    add_matmul_size_arg,
    args_dict,
    machine_info,
    matmul_peak,
    matmul_size,
    param_count,
    process_peak_rss_mb,
    random_model,
    random_text,
    run_config,
    setup,
    time_it,
)

from mrisegcli.tokenizers.text import text_vocab_size
from mrisegcli.training.loop import autocast_bf16, make_optimizer

PARADIGMS = ("next-token", "next-scale")


def random_batch(
    paradigm: str,
    model: torch.nn.Module,
    mcfg: Any,
    cfg: Any,
    vocab: int,
    batch: int,
    device: torch.device,
    seed: int,
) -> dict[str, torch.Tensor]:
    """A training batch of random codes with the shapes the model trains on."""
    gen = torch.Generator().manual_seed(seed)
    ids, tmask = random_text(batch, cfg.text_len, vocab, device, gen)
    out = {"text_ids": ids, "text_mask": tmask}
    if paradigm == "next-token":
        gi, gm = mcfg.image_grid, mcfg.mask_grid
        out["image_codes"] = torch.randint(
            0, mcfg.image_codebook_size, (batch, gi, gi), generator=gen
        )
        out["mask_codes"] = torch.randint(
            0, mcfg.mask_codebook_size, (batch, gm, gm), generator=gen
        )
        out["sample_ids"] = torch.randint(0, mcfg.het_buckets, (batch,), generator=gen)
        if mcfg.image_input == "pixels":  # the conv encoder's input (the cxr preset)
            out["image"] = torch.rand(batch, 1, cfg.image_size, cfg.image_size, generator=gen)
    else:
        L = model.layout.n_scale_tokens
        out["image"] = torch.rand(batch, 1, cfg.image_size, cfg.image_size, generator=gen)
        out["ms_codes"] = torch.randint(0, mcfg.mask_codebook_size, (batch, L), generator=gen)
    if mcfg.lambda_dense > 0 or getattr(mcfg, "lambda_refine", 0) > 0:
        # dense supervision and refiner target: a binary mask at the model's input size
        S = cfg.image_size
        out["mask"] = (torch.rand(batch, S, S, generator=gen) > 0.5).to(torch.uint8)
    return {k: v.to(device) for k, v in out.items()}


def seq_tokens(paradigm: str, model: torch.nn.Module) -> tuple[int, int]:
    """(tokens in the training sequence, tokens predicted per sample)."""
    lay = model.layout
    if paradigm == "next-token":
        return lay.input_len, lay.n_mask
    return lay.seq_len, lay.n_scale_tokens


def bench_paradigm(
    paradigm: str, args: argparse.Namespace, device: torch.device, rep: Reporter
) -> dict[str, Any]:
    cfg = run_config(args.preset, args.size, paradigm)
    model, mcfg, bundle = random_model(cfg, device)
    model.train()
    batch = random_batch(
        paradigm, model, mcfg, cfg, text_vocab_size(bundle.text), args.batch, device, args.seed
    )
    opt = make_optimizer(model, cfg.train)
    if args.fused_adamw:  # the same groups and hyper-parameters, one fused kernel per step
        groups = [
            {"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups
        ]
        opt = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas, fused=True)
    use_amp = autocast_bf16(replace(cfg.train, cpu_bf16=args.cpu_bf16), device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()

    with PeakMemory(device) as mem:
        t = time_it(step, device, warmup=args.warmup, repeats=args.steps)
    T, predicted = seq_tokens(paradigm, model)
    tc = mcfg.transformer
    n_blocks = param_count(model.transformer)
    flops = args.batch * (6 * n_blocks * T + 12 * tc.n_layers * T**2 * tc.dim)
    res = {
        "params_total": param_count(model),
        "params_blocks": n_blocks,
        "seq_len": T,
        "predicted_tokens_per_sample": predicted,
        "amp_bf16": use_amp,
        **t.to_json(),
        "step_s": t.median,
        "samples_per_s": args.batch / t.median,
        "tokens_per_s": args.batch * predicted / t.median,
        "seq_tokens_per_s": args.batch * T / t.median,
        "flops_per_step": flops,
        "flops_per_s": flops / t.median,
        "memory": mem.to_json(),
        "optimizer": "AdamW fused" if args.fused_adamw else "AdamW (training.loop.make_optimizer)",
    }
    rep.line(
        f"{paradigm}: {res['params_total'] / 1e6:.2f}M params ({n_blocks / 1e6:.2f}M in blocks), "
        f"T={T}, {predicted} predicted tokens/sample, batch {args.batch}"
    )
    rep.line(
        f"  step {1e3 * t.median:.0f} ms: {res['tokens_per_s']:.0f} predicted tokens/s, "
        f"{res['seq_tokens_per_s']:.0f} sequence tokens/s, {res['flops_per_s'] / 1e9:.2f} GFLOP/s; "
        f"{mem.describe()}"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p, batch=32, warmup=2, repeats=3)
    p.add_argument("--paradigm", default="both", choices=[*PARADIGMS, "both"])
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after --warmup)")
    p.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="on a CPU with native bf16: the step under bf16 autocast (mriseg train --cpu-bf16), "
        "its fraction taken against the bf16 matmul peak",
    )
    p.add_argument(
        "--fused-adamw",
        action="store_true",
        help="AdamW(fused=True) with make_optimizer's groups instead of make_optimizer's own",
    )
    add_matmul_size_arg(p)
    args = p.parse_args(argv)
    device = setup(args)
    args.matmul_size = matmul_size(args, device)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    rep = Reporter(args)
    rep.line(
        f"train benchmark: preset {args.preset}, {args.size} px, batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps after {args.warmup} warm-up"
    )
    peaks = {"float32": matmul_peak(args.matmul_size, torch.float32, device, args.repeats)}
    if device.type == "cuda" or args.cpu_bf16:
        peaks["bfloat16"] = matmul_peak(args.matmul_size, torch.bfloat16, device, args.repeats)
    for name, pk in peaks.items():
        rep.line(f"matmul peak {name} ({pk['n']}^2): {pk['flops_per_s'] / 1e9:.1f} GFLOP/s")
    results: dict[str, Any] = {}
    for paradigm in PARADIGMS if args.paradigm == "both" else (args.paradigm,):
        res = bench_paradigm(paradigm, args, device, rep)
        ref = peaks["bfloat16" if res["amp_bf16"] else "float32"]
        res["peak_dtype"] = ref["dtype"]
        res["fraction_of_peak"] = res["flops_per_s"] / ref["flops_per_s"]
        rep.line(f"  = {100 * res['fraction_of_peak']:.1f}% of the {ref['dtype']} matmul peak")
        results[paradigm.replace("-", "_")] = res
    rep.emit(
        {
            "bench": "train",
            "machine": machine_info(device),
            "args": args_dict(args),
            "flops_formula": "B * (6 * N_blocks * T + 12 * n_layers * T^2 * dim) per step",
            "matmul_peak": peaks,
            "results": results,
            "process_peak_rss_mb": process_peak_rss_mb(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
