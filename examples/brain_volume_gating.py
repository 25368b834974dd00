"""Does the presence threshold limit the brain model's volume Dice? Per-slice presence and
masks of whole volumes, scored under other gating rules.

``mriseg evaluate`` on a folder of volumes empties every slice whose presence is below the
model's threshold. This script decodes every slice once with no gate, then scores the volumes
as ``evaluate`` does (``workflow/volume_eval.py``) under: no gate, a lower threshold, and a
hysteresis along the slice axis (a slice joins a lesion found on a neighbouring slice when its
presence is at least a lower threshold), and prints how many lesion slices the presence head
misses and how many of those the mask itself leaves empty.

    python examples/brain_test_volumes.py --data ../shared/data/lgg-flair --out V --split val
    python examples/brain_volume_gating.py --model brain-mri --data V
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def hysteresis(p: np.ndarray, high: float, low: float) -> np.ndarray:
    """Slices at or above ``high``, grown along the slice axis over slices at or above ``low``."""
    out, ok = p >= high, p >= low
    while True:
        grown = out.copy()
        grown[1:] |= out[:-1] & ok[1:]
        grown[:-1] |= out[1:] & ok[:-1]
        if (grown == out).all():
            return out
        out = grown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="brain-mri")
    ap.add_argument("--data", type=Path, required=True, help="nnU-Net folder of volumes")
    ap.add_argument("--split", default="test")
    args = ap.parse_args()

    from mrisegcli.data.loading import load_split_arrays
    from mrisegcli.data.volume_slices import slice_mask
    from mrisegcli.workflow.prepare import open_dataset
    from mrisegcli.workflow.segmenter import Segmenter
    from mrisegcli.workflow.volume_eval import volume_results

    seg = Segmenter.load(args.model, device="cpu")
    cases = open_dataset([args.data], None, check=False).split(args.split)
    images, _ = load_split_arrays(cases, seg.image_size)
    pred = seg.predict(images, [c.text for c in cases])
    prob, presence = pred.prob.numpy(), pred.presence.numpy()
    gts = [slice_mask(c) for c in cases]
    lesion = np.array([g.any() for g in gts])
    drawn = (prob.reshape(len(prob), -1) > 0.5).any(1)
    volumes: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        volumes.setdefault(c.id.rsplit("/", 1)[0], []).append(i)

    def score(rule) -> tuple[float, float, float]:
        keep = np.zeros(len(cases), bool)
        for idx in volumes.values():
            idx = sorted(idx, key=lambda i: cases[i].volume.index)
            keep[idx] = rule(presence[idx])
        results, _ = volume_results(cases, gts, np.where(keep[:, None, None], prob, 0))
        dice = float(np.mean([r.dice for r in results]))
        return dice, float(keep[lesion].mean()), float((~keep[~lesion]).mean())

    t = float(seg.presence_threshold)
    missed = lesion & (presence < t)
    print(f"{len(volumes)} volumes, {len(cases)} slices, {int(lesion.sum())} with a lesion")
    print(
        f"lesion slices below the threshold {t:.3f}: {int(missed.sum())}; "
        f"of those the mask itself is empty on {int((missed & ~drawn).sum())}"
    )
    rules = {
        "no gate": lambda p: np.ones(len(p), bool),
        f"threshold {t:.3f} (the model's)": lambda p: p >= t,
        "threshold 0.1": lambda p: p >= 0.1,
        "threshold 0.01": lambda p: p >= 0.01,
        f"hysteresis {t:.3f} / 0.01": lambda p: hysteresis(p, t, 0.01),
    }
    print("| gating | volume Dice | lesion slices kept | lesion-free slices empty |")
    print("|---|---|---|---|")
    for name, rule in rules.items():
        dice, sens, spec = score(rule)
        print(f"| {name} | {dice:.3f} | {sens:.3f} | {spec:.3f} |")


if __name__ == "__main__":
    main()
