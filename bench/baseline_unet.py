"""The baseline users know: a MONAI BasicUNet that gets the text as bag-of-words channels.

Same data loading, input size, time budget and metrics as ``mriseg train`` / ``mriseg
evaluate``: samples are read by mriseg's loaders (every layout, several ``--data``), images are
resized to ``--size``, the prompt is tokenised by mriseg's text tokenizer (synonym folding
included) into a bag of words, projected by one learnt linear layer to ``--text-channels``
channels and tiled over the image; the U-Net sees image + text channels. Training: AdamW,
BCE + soft Dice, warm-up then cosine over the wall-clock budget, validation Dice every
``--eval-every`` steps with the best weights kept. The test split is scored exactly as
``mriseg evaluate`` scores it (probabilities resized to each ground truth's resolution,
thresholded at 0.5; per-kind rows when the manifest has a ``kind`` column). ``--augment P``
applies mriseg's own training augmentation (``mrisegcli.training.augment.augment_pair``, the
transforms of ``mriseg train --augment P``) to each batch, so that a comparison with an
augmented mriseg run is fair.

    pip install "mrisegcli[bench]"        # MONAI
    python bench/baseline_unet.py --data ../shared/data/kvasir-seg --max-minutes 15 --json
    python bench/baseline_unet.py --data ../shared/data/kvasir-seg --max-minutes 15 --no-text

The budget counts everything from reading the data to the last validation (as
``mriseg train --max-minutes`` does); the test scoring after it is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TextUNet(nn.Module):
    """BasicUNet over [image, tiled projection of the prompt's bag of words]."""

    def __init__(self, vocab: int, text_channels: int, features: tuple[int, ...]) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.text = nn.Linear(vocab, text_channels) if text_channels > 0 else None
        self.unet = BasicUNet(
            spatial_dims=2, in_channels=1 + text_channels, out_channels=1, features=features
        )

    def forward(self, image_B1SS: torch.Tensor, bow_BV: torch.Tensor) -> torch.Tensor:
        x = image_B1SS * 2 - 1
        if self.text is not None:
            t_BC = self.text(bow_BV)  # (B, C)
            t_BCSS = t_BC[:, :, None, None].expand(-1, -1, *image_B1SS.shape[-2:])
            x = torch.cat([x, t_BCSS], 1)
        return self.unet(x)[:, 0]  # (B, S, S) logits


def bag_of_words(tok, texts: list[str], vocab: int) -> torch.Tensor:
    """(N, V) counts of each token id in each text (0 rows for empty texts), L1-normalised."""
    from mrisegcli.tokenizers.text import token_ids

    bow = torch.zeros(len(texts), vocab)
    for i, ids in enumerate(token_ids(tok, texts)):
        for j in ids:
            bow[i, j] += 1.0
    return bow / bow.sum(1, keepdim=True).clamp(min=1.0)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


@torch.no_grad()
def predict(model: TextUNet, images: np.ndarray, bow: torch.Tensor, batch: int = 32) -> np.ndarray:
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s : s + batch])[:, None]
        out.append(torch.sigmoid(model(x, bow[s : s + batch])).numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:], np.float32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, action="append", required=True)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--max-minutes", type=float, default=15.0)
    ap.add_argument("--max-steps", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--features", type=int, nargs=6, default=(16, 16, 32, 64, 128, 16))
    ap.add_argument("--text-channels", type=int, default=8)
    ap.add_argument("--no-text", action="store_true", help="The image-only U-Net.")
    ap.add_argument(
        "--augment",
        type=float,
        default=0.0,
        help="share of training samples randomly rotated, zoomed, shifted and re-contrasted "
        "(the transforms of mriseg train --augment)",
    )
    ap.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="train under bf16 autocast where the CPU has native bf16 (as mriseg train --cpu-bf16)",
    )
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)

    from mrisegcli.data.loading import load_split_arrays
    from mrisegcli.io.read import read_mask
    from mrisegcli.metrics import summarize
    from mrisegcli.tokenizers.text import text_vocab_size, train_text_tokenizer
    from mrisegcli.training.augment import augment_pair
    from mrisegcli.training.loop import TrainConfig, autocast_bf16
    from mrisegcli.workflow.evaluate_model import group_summaries, score_cases
    from mrisegcli.workflow.prepare import open_dataset

    if not 0.0 <= args.augment <= 1.0:
        ap.error(f"--augment must lie in [0, 1], got {args.augment}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # mriseg train's own rule (and its warning where the CPU has no native bf16)
    bf16 = autocast_bf16(TrainConfig(cpu_bf16=args.cpu_bf16), torch.device("cpu"))
    t0 = time.perf_counter()
    budget = args.max_minutes * 60.0
    ds = open_dataset(args.data, None, seed=args.seed, check=False)
    train, val, test = ds.split("train"), ds.split("val"), ds.split(args.split)
    tok = train_text_tokenizer([s.text for s in train])
    vocab = text_vocab_size(tok)
    img_tr, msk_tr = load_split_arrays(train, args.size, workers=2)
    img_va, msk_va = load_split_arrays(val[:256], args.size, workers=2)
    text_ch = 0 if args.no_text else args.text_channels
    bow_tr = bag_of_words(tok, [s.text for s in train], vocab)
    bow_va = bag_of_words(tok, [s.text for s in val[:256]], vocab)
    model = TextUNet(vocab, text_ch, tuple(args.features))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    x_tr, y_tr = torch.from_numpy(img_tr)[:, None], torch.from_numpy(msk_tr).float()
    best, best_state, step, log = -1.0, None, 0, []
    t_loop = time.perf_counter()
    loop_budget = max(1.0, budget - (t_loop - t0))
    g = torch.Generator().manual_seed(args.seed)
    while step < args.max_steps:
        done = (time.perf_counter() - t_loop) / loop_budget
        if done >= 1.0:
            break
        lr = args.lr * (
            min(1.0, done / 0.05)
            if done < 0.05
            else 0.5 * (1 + math.cos(math.pi * (done - 0.05) / 0.95))
        )
        for group in opt.param_groups:
            group["lr"] = max(lr, args.lr * 0.01)
        idx = torch.randint(0, len(train), (args.batch_size,), generator=g)
        x, y = x_tr[idx], y_tr[idx]
        if args.augment > 0:
            x, y = augment_pair(x, y, args.augment, g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x, bow_tr[idx]).float()
        loss = F.binary_cross_entropy_with_logits(logits, y) + dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.eval_every == 0 and len(val):
            prob = predict(model, img_va, bow_va)
            inter = ((prob > 0.5) & (msk_va > 0)).sum((1, 2))
            total = (prob > 0.5).sum((1, 2)) + (msk_va > 0).sum((1, 2))
            val_dice = float(np.mean(np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))))
            log.append(
                {
                    "step": step,
                    "loss": float(loss),
                    "val_dice": val_dice,
                    "elapsed_s": time.perf_counter() - t0,
                }
            )
            if val_dice > best:
                best, best_state = val_dice, {k: v.clone() for k, v in model.state_dict().items()}
    train_seconds = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    img_te, _ = load_split_arrays(test, args.size, workers=2)
    gts = [read_mask(s.mask) for s in test]
    bow_te = bag_of_words(tok, [s.text for s in test], vocab)
    results = score_cases(test, gts, predict(model, img_te, bow_te))
    summary = summarize(results)
    out = {
        "model": ("unet" if text_ch else "unet-no-text") + ("@aug" if args.augment else ""),
        "augment": args.augment,
        "precision": "bf16" if bf16 else "fp32",
        "data": [str(d) for d in args.data],
        "size": args.size,
        "max_minutes": args.max_minutes,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "best_val_dice": best,
        "split": args.split,
        "dice": summary["dice"],
        "miou": summary["miou"],
        "n": summary["n"],
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "kinds": group_summaries(test, results, "kind"),
        **present_and_empty(results),
    }
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        print(
            f"{out['model']}: {step} steps in {train_seconds:.0f} s, best val Dice {best:.4f}; "
            f"{args.split} Dice {out['dice']:.4f} mIoU {out['miou']:.4f} (n={out['n']})"
        )
    return out


def present_and_empty(results: list) -> dict[str, float]:
    """Dice of the rows whose truth is not empty, and the share of empty truths drawn on (a
    model that never leaves a mask empty scores 0 on each of those, which the all-rows mean
    mixes in)."""
    present = [r.dice for r in results if r.gt_pixels > 0]
    empty = [r.pred_pixels > 0 for r in results if r.gt_pixels == 0]
    out = {}
    if present:
        out["dice_present"] = float(np.mean(present))
    if empty:
        out["drawn_on_empty"] = float(np.mean(empty))
    return out


if __name__ == "__main__":
    main()
