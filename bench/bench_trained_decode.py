"""Decoding a trained model: self-speculative vs plain cached greedy, and warm predict latency.

    python bench/bench_trained_decode.py                      # the shipped chest-xray model
    python bench/bench_trained_decode.py --model runs/cxr --data ../shared/data/jsrt --n 32 --threads 2

Random weights accept no drafted code, so this benchmark needs a trained model (default: the
model shipped in the package) and real inputs: the first ``--n`` cases of ``--split`` of
``--data`` (default: synthetic noise images with chest prompts when no data are given).

Reported, each timed in turns (plain, speculative, plain, ...) in one process so that a change
of the machine's load hits both sides:

* ``passes_per_mask``: forward passes after prefill, plain (one per code but the last) and
  speculative; ``acceptance``: the share of drafted codes the main head agreed with;
* ``ms_per_mask`` at batch 1 (every case in turn) and at ``--batch``, and their ratio (medians
  over ``--repeats`` turns; ``speedup_batch1_per_turn``: each turn's own ratio);
* ``identical``: whether both decoders gave the same codes on every case (they must);
* ``predict_ms``: one warm ``Segmenter.predict`` call on one image (what ``mriseg predict``
  does per 2-D input once the model is loaded), speculative on;
* ``one_prefix_pass``: warm ``Segmenter.predict_tensors`` (one pass over the prefix serves the
  decoder, the refiner, the dense head and presence) against the three passes it replaced (the
  decoder's prefill, then ``mask_outputs`` and ``presence_features``, each over the prefix
  again), timed in turns at batch 1 (every case) and at ``--batch``: ms per image, the
  speed-ups, and the largest differences of probability and presence between the two
  (``max_prob_diff``, ``max_presence_diff``: float tolerance at most).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def load_inputs(seg, data: list[Path] | None, split: str, n: int) -> tuple[np.ndarray, list[str]]:
    if data:
        from mrisegcli.data.loading import load_split_arrays
        from mrisegcli.workflow.prepare import open_dataset

        cases = open_dataset(data, None, check=False).split(split)[:n]
        images, _ = load_split_arrays(cases, seg.image_size)
        return images, [s.text for s in cases]
    rng = np.random.default_rng(0)
    texts = ["left lung", "heart", "bilateral lower lobe opacity", "right-sided consolidation"]
    return rng.random((n, seg.image_size, seg.image_size), dtype=np.float32), [
        texts[i % 4] for i in range(n)
    ]


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def three_passes(seg, image_B1SS, ids, tmask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, S, S) probabilities and (B,) presence as ``predict_tensors`` computed them before one
    pass over the prefix served all (greedy, one sample): the decoder's prefill, then one pass
    for the heads (``mask_outputs``) and one for the presence features."""
    from mrisegcli.decode.next_token import MaskGenerator, generate_masks_speculative
    from mrisegcli.presence import presence_features

    model, tm = seg.model, seg.hide_text(tmask)
    x = seg.image_input(image_B1SS)
    if seg.speculative and x.shape[0] == 1 and model.nktp is not None:
        codes = generate_masks_speculative(model, x, ids, tm)
    else:
        codes = MaskGenerator(model)(x, ids, tm)
    logits = seg.bundle.mask_vq.decode(codes)
    if model.refiner is not None:
        logits = model.mask_outputs(x, ids, tm, codes)["refined"]
    presence = None
    if seg.presence_head is not None:
        feats = presence_features(seg.impl, model, x, ids, tm)
        presence = torch.sigmoid(seg.presence_head(feats)).float()
    return torch.sigmoid(logits.float())[:, 0], presence


@torch.no_grad()
def one_prefix_pass(seg, images: np.ndarray, texts: list[str], batch: int, repeats: int) -> dict:
    """Warm predict with one pass over the prefix against the three passes it replaced, timed
    in turns at batch 1 (every case) and at ``batch``."""
    img = torch.from_numpy(images)[:, None]
    ids, tmask = seg.encode_text(texts)
    n, b = len(texts), min(batch, len(texts))
    diff = {"prob": 0.0, "presence": 0.0}
    for i in range(n):  # the same answers, case by case
        new = seg.predict_tensors(img[i : i + 1], ids[i : i + 1], tmask[i : i + 1])
        prob, presence = three_passes(seg, img[i : i + 1], ids[i : i + 1], tmask[i : i + 1])
        diff["prob"] = max(diff["prob"], float((new.prob - prob).abs().max()))
        if presence is not None:
            diff["presence"] = max(diff["presence"], float((new.presence - presence).abs().max()))
    runs = {
        "three_1": lambda: [
            three_passes(seg, img[i : i + 1], ids[i : i + 1], tmask[i : i + 1]) for i in range(n)
        ],
        "one_1": lambda: [
            seg.predict_tensors(img[i : i + 1], ids[i : i + 1], tmask[i : i + 1]) for i in range(n)
        ],
        "three_b": lambda: three_passes(seg, img[:b], ids[:b], tmask[:b]),
        "one_b": lambda: seg.predict_tensors(img[:b], ids[:b], tmask[:b]),
    }
    for fn in runs.values():  # warm-up
        fn()
    t: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # in turns
        for name, fn in runs.items():
            t[name].append(timed(fn, 1))
    med = {k: statistics.median(v) for k, v in t.items()}
    return {
        "ms_per_image": {
            "three_passes_batch1": 1e3 * med["three_1"] / n,
            "one_pass_batch1": 1e3 * med["one_1"] / n,
            f"three_passes_batch{b}": 1e3 * med["three_b"] / b,
            f"one_pass_batch{b}": 1e3 * med["one_b"] / b,
        },
        "speedup_batch1": med["three_1"] / med["one_1"],
        "speedup_batch1_per_turn": [p / q for p, q in zip(t["three_1"], t["one_1"], strict=True)],
        f"speedup_batch{b}": med["three_b"] / med["one_b"],
        "max_prob_diff": diff["prob"],
        "max_presence_diff": diff["presence"],
    }


def main(argv: list[str] | None = None) -> dict:  # noqa: C901 -- split pending
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=None, help="run folder or shipped model (default: the shipped one)"
    )
    ap.add_argument("--data", type=Path, action="append")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=32, help="cases decoded")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mrisegcli.decode.next_token import generate_masks, generate_masks_speculative
    from mrisegcli.hub import resolve_run
    from mrisegcli.shipped import choose_model
    from mrisegcli.workflow.segmenter import load_segmenter

    choice = choose_model(args.model)
    seg = load_segmenter(resolve_run(choice.spec), torch.device("cpu"))
    if seg.paradigm != "next-token":
        raise SystemExit("error: speculative decoding is for next-token models")
    model = seg.model
    images, texts = load_inputs(seg, args.data, args.split, args.n)
    img_N1SS = torch.from_numpy(images)[:, None]
    ids, tmask = seg.encode_text(texts)
    x = seg.image_input(img_N1SS)

    # codes and pass counts over all cases, batch by batch
    same, passes, accepted, drafted = True, 0.0, 0.0, 0.0
    with torch.no_grad():
        for s in range(0, len(texts), args.batch):
            part = slice(s, s + args.batch)
            stats: dict[str, float] = {}
            fast = generate_masks_speculative(model, x[part], ids[part], tmask[part], stats=stats)
            plain = generate_masks(model, x[part], ids[part], tmask[part])
            same &= bool(torch.equal(fast, plain))
            passes += stats["passes"]
            accepted += stats["accepted"]
            drafted += stats["drafted"]
    n_batches = -(-len(texts) // args.batch)
    single: dict[str, float] = {}
    with torch.no_grad():
        for i in range(len(texts)):
            st: dict[str, float] = {}
            generate_masks_speculative(
                model, x[i : i + 1], ids[i : i + 1], tmask[i : i + 1], stats=st
            )
            for k, v in st.items():
                single[k] = single.get(k, 0.0) + v

    # batch 1 over every case, one after the other (as a folder predict does): acceptance, and
    # so the pass count, differs from case to case
    def plain_1():
        with torch.no_grad():
            for i in range(len(texts)):
                generate_masks(model, x[i : i + 1], ids[i : i + 1], tmask[i : i + 1])

    def spec_1():
        with torch.no_grad():
            for i in range(len(texts)):
                generate_masks_speculative(model, x[i : i + 1], ids[i : i + 1], tmask[i : i + 1])

    def plain_b():
        with torch.no_grad():
            generate_masks(model, x[: args.batch], ids[: args.batch], tmask[: args.batch])

    def spec_b():
        with torch.no_grad():
            generate_masks_speculative(
                model, x[: args.batch], ids[: args.batch], tmask[: args.batch]
            )

    for fn in (plain_1, spec_1, plain_b, spec_b):  # warm-up
        fn()
    t = {"plain_1": [], "spec_1": [], "plain_b": [], "spec_b": []}
    for _ in range(args.repeats):  # in turns
        for name, fn in (
            ("plain_1", plain_1),
            ("spec_1", spec_1),
            ("plain_b", plain_b),
            ("spec_b", spec_b),
        ):
            t[name].append(timed(fn, 1))
    med = {k: statistics.median(v) for k, v in t.items()}
    b = min(args.batch, len(texts))
    seg.predict(images[:1], texts[:1])  # warm
    predict_s = timed(lambda: seg.predict(images[:1], texts[:1]), args.repeats + 2)
    n_mask = model.layout.n_mask
    out = {
        "model": choice.shipped or choice.spec,
        "cases": len(texts),
        "batch": b,
        "threads": torch.get_num_threads(),
        "identical": same,
        "acceptance": accepted / max(1.0, drafted),
        "passes_per_mask": {
            "plain": n_mask - 1,
            "speculative_batch1": single.get("passes", 0) / len(texts),
            f"speculative_batch{b}": passes / n_batches,
        },
        "ms_per_mask": {
            "plain_batch1": 1e3 * med["plain_1"] / len(texts),
            "speculative_batch1": 1e3 * med["spec_1"] / len(texts),
            f"plain_batch{b}": 1e3 * med["plain_b"] / b,
            f"speculative_batch{b}": 1e3 * med["spec_b"] / b,
        },
        "speedup_batch1": med["plain_1"] / med["spec_1"],
        # each turn's own ratio (plain then speculative, back to back): the machine's speed
        # drifts between turns more than within one
        "speedup_batch1_per_turn": [p / q for p, q in zip(t["plain_1"], t["spec_1"], strict=True)],
        f"speedup_batch{b}": med["plain_b"] / med["spec_b"],
        "predict_ms": 1e3 * predict_s,
        "one_prefix_pass": one_prefix_pass(seg, images, texts, args.batch, args.repeats),
    }
    out["fewer_passes_batch1"] = out["passes_per_mask"]["plain"] / max(
        1e-9, out["passes_per_mask"]["speculative_batch1"]
    )
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
