"""The README's picture: the shipped model on held-out test radiographs, several prompts each.

    python examples/cxr_figure.py --data ../shared/data --out docs/cxr_example.png

Each row is one test image of cxr-infection or jsrt (never seen in training); each column a
prompt in a user's own wording; the predicted mask is drawn in colour over the radiograph, the
ground truth of the matching manifest row as a white outline when there is one.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PROMPTS = [
    ("bilateral lower lobe opacity", None),
    ("right-sided consolidation", "infection:right"),
    ("the left lung field", "lung:left"),
    ("cardiac silhouette", "heart"),
]
SAME = {"lung:left": ("lung:left", "left_lung")}


def outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:-1, 1:-1] = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:] & m[1:-1, 1:-1]
    return m & ~inner


def panel(
    image: np.ndarray, mask: np.ndarray, gt: np.ndarray | None, title: str, size: int = 256
) -> Image.Image:
    grey = np.asarray(Image.fromarray(image).convert("L").resize((size, size)), dtype=np.float32)
    rgb = np.stack([grey] * 3, -1)
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size))) > 127
    rgb[m] = 0.55 * rgb[m] + 0.45 * np.array([255, 80, 40])
    if gt is not None:
        g = np.asarray(Image.fromarray(gt.astype(np.uint8) * 255).resize((size, size))) > 127
        rgb[outline(g)] = 255
    im = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    bar = Image.new("RGB", (size, 22), (20, 20, 20))
    ImageDraw.Draw(bar).text((4, 5), title[:40], fill=(240, 240, 240))
    out = Image.new("RGB", (size, size + 22))
    out.paste(bar, (0, 0))
    out.paste(im, (0, 22))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("docs/cxr_example.png"))
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--images",
        nargs="*",
        default=["cxr-infection:2", "jsrt:1"],
        help="dataset:k picks the k-th bilateral test case (cxr) or test image (jsrt)",
    )
    args = ap.parse_args()
    from mrisegcli import Segmenter

    seg = Segmenter.load(args.model)
    rows_out = []
    for spec in args.images:
        name, k = spec.split(":")
        with open(args.data / name / "manifest.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
        if name == "cxr-infection":  # an image with infection on both sides
            images = [r["image"] for r in rows if r["target"] == "infection:right"]
        else:
            images = list(dict.fromkeys(r["image"] for r in rows))
        image = images[int(k)]
        by_target = {r["target"]: r for r in rows if r["image"] == image}
        pixels = np.asarray(Image.open(args.data / name / image).convert("L"))
        masks = seg.segment([pixels] * len(PROMPTS), [p for p, _ in PROMPTS])
        panels = []
        for (prompt, target), mask in zip(PROMPTS, masks, strict=True):
            # the matching request in either manifest grammar (cxr "lung:left", jsrt "left_lung")
            row = next((by_target[t] for t in SAME.get(target, (target,)) if t in by_target), None)
            gt = np.asarray(Image.open(args.data / name / row["mask"])) > 0 if row else None
            panels.append(panel(pixels, mask, gt, f'"{prompt}"'))
        rows_out.append(panels)
    w, h = rows_out[0][0].size
    sheet = Image.new("RGB", (w * len(PROMPTS), h * len(rows_out)), (0, 0, 0))
    for i, panels in enumerate(rows_out):
        for j, p in enumerate(panels):
            sheet.paste(p, (j * w, i * h))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.size[0]}x{sheet.size[1]})")


if __name__ == "__main__":
    main()
