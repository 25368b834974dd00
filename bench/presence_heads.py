"""Which presence head reads the frozen model's states best? Pooling variants compared on val.

``presence.py`` fits a small head on three pooled features of the text-aware prefix states
(the mean and the maximum of the image-token states and the state that starts the mask). This
script keeps every image-token state instead and fits, on the same train rows, with the same
recipe (AdamW, 1,500 steps of 256, best val log loss, Platt scaling and the threshold chosen on
val):

* ``base``: the head of presence.py (mean, max, mask-start state -> MLP);
* ``mil-lse`` / ``mil-max``: a score per image token (its state beside the mask-start state),
  pooled by log-mean-exp or max (multiple-instance learning: one small finding is enough);
* ``attn``: attention pooling with the mask-start state as the query;
* ``-w4``: the empty rows weighted 4x in the loss.

Two seeds each; it prints val and test AUROC, sensitivity and specificity at the val threshold
and the share of `describe` rows found.

    python bench/presence_heads.py --model chest-xray --data ../shared/data/cxr-infection \\
        --data ../shared/data/jsrt --states /tmp/states.pt      # ~6 min of states, ~20 min fits
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def extract_states(model: str, data: list[Path], max_cases: int, path: Path) -> dict:
    """Image-token and mask-start states of train (a random subset, as calibrate takes it),
    val and test rows, saved to ``path`` (float16)."""
    from mrisegcli.data.loading import load_split_arrays
    from mrisegcli.data.paraphrase import add_paraphrases
    from mrisegcli.hub import resolve_run
    from mrisegcli.shipped import choose_model
    from mrisegcli.workflow.calibrate import refresh_synonyms
    from mrisegcli.workflow.prepare import open_dataset
    from mrisegcli.workflow.segmenter import load_segmenter

    seg = load_segmenter(resolve_run(choose_model(model).spec), torch.device("cpu"))
    ds = open_dataset(data, None, seed=0, check=False)
    ds = add_paraphrases(ds, seg.cfg.paraphrases, seg.cfg.seed)
    refresh_synonyms(seg, sorted({s.text for s in ds.split("train")}))
    train = ds.split("train")
    rng = np.random.default_rng(0)
    if len(train) > max_cases:
        train = [train[i] for i in sorted(rng.choice(len(train), max_cases, replace=False))]
    out = {}
    for name, cases in (("val", ds.split("val")), ("test", ds.split("test")), ("train", train)):
        h, s, y, kinds = [], [], [], []
        for i in range(0, len(cases), 64):
            part = cases[i : i + 64]
            images, masks = load_split_arrays(part, seg.image_size)
            x = seg.impl.model_input(seg.model, seg.bundle, torch.from_numpy(images)[:, None])
            ids, tmask = seg.encode_text([c.text for c in part])
            with torch.no_grad():
                img, start = seg.impl.presence_states(seg.model, x, ids, seg.hide_text(tmask))
            h.append(img.half())
            s.append(start.half())
            y.append(torch.from_numpy(masks.reshape(len(part), -1).any(1)))
            kinds += [c.kind or "" for c in part]
        out[name] = {"h": torch.cat(h), "s": torch.cat(s), "y": torch.cat(y), "kind": kinds}
        print(f"{name}: {len(cases)} rows", flush=True)
    torch.save(out, path)
    return out


class Base(nn.Module):
    def __init__(self, C: int, hid: int = 128) -> None:
        super().__init__()
        self.n = nn.LayerNorm(3 * C)
        self.m = nn.Sequential(nn.Linear(3 * C, hid), nn.GELU(), nn.Dropout(0.1), nn.Linear(hid, 1))

    def forward(self, h: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
        return self.m(self.n(torch.cat([h.mean(1), h.amax(1), st], 1)))[:, 0]


class MIL(nn.Module):
    def __init__(self, C: int, hid: int = 128, pool: str = "lse") -> None:
        super().__init__()
        self.pool = pool
        self.n = nn.LayerNorm(2 * C)
        self.m = nn.Sequential(nn.Linear(2 * C, hid), nn.GELU(), nn.Dropout(0.1), nn.Linear(hid, 1))
        self.g = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, 1))

    def forward(self, h: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
        t = self.m(self.n(torch.cat([h, st[:, None].expand_as(h)], 2)))[..., 0]
        if self.pool == "lse":
            pooled = torch.logsumexp(t, 1) - np.log(t.shape[1])
        else:
            pooled = t.amax(1)
        return pooled + self.g(st)[:, 0]


class Attn(nn.Module):
    def __init__(self, C: int, hid: int = 128) -> None:
        super().__init__()
        self.nh, self.ns = nn.LayerNorm(C), nn.LayerNorm(C)
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.m = nn.Sequential(
            nn.LayerNorm(3 * C),
            nn.Linear(3 * C, hid),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hid, 1),
        )

    def forward(self, h: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
        hn, sn = self.nh(h), self.ns(st)
        a = torch.softmax((self.k(hn) @ self.q(sn)[:, :, None])[..., 0] / np.sqrt(h.shape[2]), 1)
        pooled = (a[..., None] * self.v(hn)).sum(1)
        return self.m(torch.cat([pooled, h.mean(1), st], 1))[:, 0]


HEADS = {
    "base": (Base, {}),
    "mil-lse": (MIL, {}),
    "mil-max": (lambda C: MIL(C, pool="max"), {}),
    "attn": (Attn, {}),
    "base-w4": (Base, {"wneg": 4.0}),
    "mil-lse-w4": (MIL, {"wneg": 4.0}),
    "attn-w4": (Attn, {"wneg": 4.0}),
}


def fit(states: dict, make, seed: int, steps: int = 1500, wneg: float = 1.0) -> dict:
    from mrisegcli.presence import choose_threshold, detection_report, platt_scaling

    def split(n: str):
        d = states[n]
        return d["h"].float(), d["s"].float(), d["y"].float(), np.array(d["kind"])

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    htr, s_tr, ytr, _ = split("train")
    hva, s_va, yva, _ = split("val")
    model = make(htr.shape[2])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    weight = torch.where(ytr > 0, 1.0, wneg)
    best = (float("inf"), None, 0)
    for step in range(1, steps + 1):
        model.train()
        i = torch.randint(len(ytr), (256,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(model(htr[i], s_tr[i]), ytr[i], weight=weight[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                val_loss = float(F.binary_cross_entropy_with_logits(model(hva, s_va), yva))
            if val_loss < best[0]:
                best = (val_loss, copy.deepcopy(model.state_dict()), step)
    model.load_state_dict(best[1])
    model.eval()
    with torch.no_grad():
        raw_va = model(hva, s_va)
    a, b = platt_scaling(raw_va, yva)
    threshold = choose_threshold(torch.sigmoid(raw_va * a + b).numpy(), yva.numpy())
    row: dict = {"best_step": best[2], "threshold": round(threshold, 4)}
    for name in ("val", "test"):
        h, s, y, kinds = split(name)
        with torch.no_grad():
            p = torch.sigmoid(model(h, s) * a + b).numpy()
        r = detection_report(p, y.numpy(), threshold)
        describe = kinds == "describe"
        row[name] = {
            "auroc": round(r["auroc"], 4),
            "sensitivity": round(r["sensitivity"], 3),
            "specificity": round(r["specificity"], 3),
            "describe_found": round(float((p[describe] >= threshold).mean()), 3)
            if describe.any()
            else None,
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="chest-xray")
    ap.add_argument("--data", type=Path, action="append", required=True)
    ap.add_argument("--max-cases", type=int, default=12000)
    ap.add_argument("--states", type=Path, required=True, help="states file (reused if present)")
    ap.add_argument("--heads", nargs="*", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    if args.states.is_file():
        states = torch.load(args.states)
    else:
        states = extract_states(args.model, args.data, args.max_cases, args.states)
    for name in args.heads:
        make, kw = HEADS[name]
        for seed in range(args.seeds):
            print(name, seed, fit(states, make, seed, **kw), flush=True)


if __name__ == "__main__":
    main()
