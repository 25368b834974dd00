"""Fit each neural tokenizer on a dataset and print reconstruction quality, usage and speed.

    python bench/bench_tokenizers.py                       # built-in synthetic set, defaults
    python bench/bench_tokenizers.py --kvasir /work/shared/data/kvasir-seg --steps 1500
    python bench/bench_tokenizers.py --only mask --steps 300 --n-train 256   # quick look

Masks / images are fitted on the train split; recon Dice / PSNR are reported on the held-out
slice ``fit_*`` keeps aside AND on the test split. Timings are wall-clock on this machine
(noisy when the CPU is shared with other jobs).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mrisegcli.config import scale_schedule
from mrisegcli.data.synth import render_case
from mrisegcli.tokenizers.fit import (
    fit_image_vq,
    fit_mask_vq,
    fit_multiscale,
    image_psnr,
    recon_dice,
    to_tensor_images,
    to_tensor_masks,
)
from mrisegcli.tokenizers.image_vq import ImageVQConfig
from mrisegcli.tokenizers.mask_vq import MaskVQConfig
from mrisegcli.tokenizers.multiscale import MultiScaleConfig


def synthetic(split: str, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images float32, masks uint8) of the built-in synthetic set (``mrisegcli.data.synth``)."""
    cases = [render_case(seed, split, i, size=size) for i in range(n)]
    images = np.stack([c.image for c in cases]).astype(np.float32)
    masks = np.stack([c.mask for c in cases]).astype(np.uint8)
    return images, masks


def kvasir(root: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(grey images float32, masks uint8) of one split of a kvasir-seg style manifest."""
    from PIL import Image

    with open(root / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split", "train") == split]
    images, masks = [], []
    for r in rows:
        img = Image.open(root / r["image"]).convert("L").resize((size, size), Image.BILINEAR)
        images.append(np.asarray(img, np.float32) / 255.0)
        m = np.asarray(Image.open(root / r["mask"]).convert("L")) > 127
        masks.append(to_tensor_masks(m[None], size)[0, 0].numpy().astype(np.uint8))
    return np.stack(images), np.stack(masks)


@torch.no_grad()
def encode_rate(tok: torch.nn.Module, x_N1SS: torch.Tensor, batch: int = 64) -> float:
    """Images per second through ``encode`` (batched, after one warm-up batch)."""
    tok.encode(x_N1SS[:batch])
    t0 = time.perf_counter()
    for i in range(0, x_N1SS.shape[0], batch):
        tok.encode(x_N1SS[i : i + batch])
    return x_N1SS.shape[0] / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--kvasir", type=Path, help="kvasir-seg folder (manifest.csv with split)")
    p.add_argument("--only", choices=["mask", "multiscale", "image"], action="append")
    p.add_argument("--steps", type=int, help="training steps (default: each fit_* default)")
    p.add_argument("--batch-size", type=int, help="batch size (default: each fit_* default)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-train", type=int, default=800, help="synthetic training cases")
    p.add_argument("--n-test", type=int, default=200, help="synthetic test cases")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.kvasir:
        (tr_img, tr_msk), (te_img, te_msk) = (
            kvasir(a.kvasir, s, a.size) for s in ("train", "test")
        )
        name = "kvasir-seg"
    else:
        tr_img, tr_msk = synthetic("train", a.n_train, a.size, a.seed)
        te_img, te_msk = synthetic("test", a.n_test, a.size, a.seed)
        name = "synthetic"
    print(
        f"{name}: {len(tr_msk)} train / {len(te_msk)} test at {a.size}px, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    def log(step: int, total: int, m: dict[str, float]) -> None:
        if step % max(1, total // 10) == 0 or step == total:
            shown = " ".join(f"{k}={v:.4g}" for k, v in m.items())
            print(f"  {step:>6}/{total} {shown}", flush=True)

    kinds = a.only or ["mask", "multiscale", "image"]
    results = {}
    common = dict(lr=a.lr, seed=a.seed, progress=log)
    common |= {k: v for k, v in (("steps", a.steps), ("batch_size", a.batch_size)) if v}
    for kind in kinds:
        print(f"[{kind}]", flush=True)
        if kind == "image":
            tok, rep = fit_image_vq(tr_img, ImageVQConfig(image_size=a.size), **common)
            rep["test_psnr"] = image_psnr(tok, te_img)
            x = to_tensor_images(te_img, a.size)
        else:
            if kind == "mask":
                tok, rep = fit_mask_vq(tr_msk, MaskVQConfig(image_size=a.size), **common)
            else:  # the default schedule ends at the 128 px grid: stretch it to this size
                grid = a.size // MultiScaleConfig.downsample
                ms_cfg = MultiScaleConfig(image_size=a.size, scales=scale_schedule(grid))
                tok, rep = fit_multiscale(tr_msk, ms_cfg, **common)
            rep["test_recon_dice"] = recon_dice(tok, te_msk)
            x = to_tensor_masks(te_msk, a.size)
        rep["encode_images_per_s"] = encode_rate(tok, x)
        results[kind] = rep
        print("  " + json.dumps({k: round(v, 4) for k, v in rep.items()}), flush=True)
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "dataset": name,
                    "args": {k: str(v) for k, v in vars(a).items()},
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
