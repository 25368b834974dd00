"""``mriseg evaluate --model RUN --data D``: decode a whole split and score it honestly.

Masks are predicted at the model's size, resized back to each ground truth's own resolution
and thresholded there, so the numbers are comparable with any other tool's. Beside the model's
Dice stand the tokenizer ceiling (the Dice of the mask tokenizer's own reconstruction of the
ground truth: no model can beat it) and, on request, the same model with the text removed or
shuffled between cases (how much the model relies on the text).

On the volumes of an nnU-Net folder every slice is a case, and each volume is also scored as a
whole (Dice, HD95, absolute volume difference: :mod:`mrisegcli.workflow.volume_eval`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrisegcli.data.layouts import Sample
from mrisegcli.errors import MrisegError
from mrisegcli.metrics import CaseResult, summarize
from mrisegcli.workflow.prepare import StageFactory, no_stage, open_dataset
from mrisegcli.workflow.segmenter import Segmenter

ABLATIONS = ("empty", "shuffle")


@dataclass
class ModelEvalReport:
    cases: list[CaseResult]
    summary: dict[str, Any]
    ceiling: dict[str, Any] | None = None
    ablations: dict[str, dict[str, Any]] = field(default_factory=dict)
    uncertainty: list[float] | None = None
    seconds: float = 0.0
    volumes: list = field(default_factory=list)  # VolumeResult of each volume of the split


def _resize_threshold(prob_SS: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from mrisegcli.io.intensity import resize_prob

    if prob_SS.shape != shape:
        prob_SS = resize_prob(prob_SS, shape)
    return prob_SS > 0.5


def score_cases(
    samples: list[Sample], gts: list[np.ndarray], probs: np.ndarray
) -> list[CaseResult]:
    """One :class:`CaseResult` per sample: its model-resolution probability resized to the
    truth's own shape, thresholded at 0.5 and scored against the truth."""
    return [
        CaseResult.from_masks(s.id, _resize_threshold(p, g.shape), g, gt_path=s.mask)
        for s, g, p in zip(samples, gts, probs, strict=True)
    ]


@torch.no_grad()
def tokenizer_ceiling(
    seg: Segmenter, masks_NSS: np.ndarray, gts: list[np.ndarray], samples: list[Sample]
) -> list[CaseResult]:
    """Dice of decode(encode(ground truth)) — the best any model on these tokens can do.
    The paradigm's own tokenizer: a next-scale run may also hold a single-scale one."""
    tok = seg.impl.ceiling_tokenizer(seg.bundle)
    if tok is None:
        raise MrisegError(
            f"the {seg.paradigm} model's mask tokenizer is missing from its run folder"
        )
    probs = []
    for s in range(0, len(masks_NSS), 64):
        m = torch.from_numpy(masks_NSS[s : s + 64]).float()[:, None].to(seg.device)
        logits = tok.decode(tok.encode(m))
        probs.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
    return score_cases(samples, gts, np.concatenate(probs))


def evaluate_model(
    seg: Segmenter,
    data_root: Path | list[Path],
    *,
    split: str = "test",
    layout: str | None = None,
    samples: int = 1,
    temperature: float | None = None,
    ablations: tuple[str, ...] = (),
    image_ablation: bool = False,
    teacher_forced: bool = False,
    ceiling: bool = True,
    limit: int | None = None,
    workers: int = 0,
    seed: int = 0,
    stage: StageFactory = no_stage,
    texts: Path | None = None,
    presence_threshold: float | None = None,
    min_component_share: float | None = None,
) -> ModelEvalReport:
    """``seg`` on a dataset split: per-case Dice/IoU as ``predict`` answers (masks below the
    presence threshold, the model's or ``presence_threshold``, left empty), detection per kind,
    volumes scored whole (their components below the model's ``min_component_share`` of the
    largest, or the one given, dropped), and the ablations asked for."""
    for a in ablations:
        if a not in ABLATIONS:
            raise MrisegError(f"unknown text ablation {a!r}; choose from {', '.join(ABLATIONS)}")
    t0 = time.perf_counter()
    split_data = read_split(seg, data_root, split, layout, limit, workers, stage, texts)
    cases, images, masks, gts = split_data
    texts = [s.text for s in cases]
    with stage(f"decoding {len(cases)} masks", None):
        pred = seg.predict(
            images, texts, samples=samples, temperature=temperature, seed=seed, parts=True
        )
    cut = presence_threshold
    results = score_cases(cases, gts, answered_probs(seg, pred, cut))
    scores = None if pred.presence is None else pred.presence.numpy().tolist()
    for i, (r, c) in enumerate(zip(results, cases, strict=True)):
        r.kind = c.kind or ""
        r.text = c.text or ""
        r.presence = None if scores is None else float(scores[i])
    report = ModelEvalReport(
        results, _model_summary(seg, cases, gts, results, pred, samples, temperature)
    )
    report.summary["detection"] = detection_summary(seg, cases, results, pred, cut)
    scope = scope_summary(seg, cases, results)
    if scope is not None:
        report.summary["scope"] = scope
    share = min_component_share
    if share is None:
        share = getattr(seg, "min_component_share", 0.0)
    _score_volumes(report, cases, gts, answered_probs(seg, pred, cut), share)
    if ceiling:
        report.ceiling = summarize(tokenizer_ceiling(seg, masks, gts, cases))
    if pred.uncertainty is not None:
        report.uncertainty = _uncertainties(pred)
        report.summary["uncertainty"] = float(np.mean(report.uncertainty))
    rng = np.random.default_rng(seed)
    decode = {"samples": samples, "temperature": temperature, "seed": seed}
    for a in ablations:
        alt = (
            [""] * len(texts) if a == "empty" else [texts[i] for i in _other_cases(rng, len(texts))]
        )
        with stage(f"decoding with {a} text", None):
            p = seg.predict(images, alt, **decode)
        report.ablations[a] = _ablation_row(
            report, cases, gts, answered_probs(seg, p, cut), kinds=True
        )
    if image_ablation:  # each case's own text, another case's image: does the model read the image?
        perm = _other_cases(rng, len(texts))
        with stage("decoding with shuffled images", None):
            p = seg.predict(images[perm], texts, **decode)
        report.ablations["image_shuffle"] = _ablation_row(
            report, cases, gts, answered_probs(seg, p, cut)
        )
    if teacher_forced:  # what the model could do without its own mistakes (next-token only)
        with stage("teacher-forced pass", None):
            probs = teacher_forced_probs(seg, images, masks, texts)
        report.ablations["teacher_forced"] = _ablation_row(report, cases, gts, probs)
    report.seconds = time.perf_counter() - t0
    return report


def answered_probs(seg: Segmenter, pred: Any, threshold: float | None = None) -> np.ndarray:
    """(N, S, S) probabilities as ``predict`` answers them: zero where the calibrated presence
    is below the threshold, the model's unless ``threshold`` is given ("not found")."""
    prob = pred.prob.numpy()
    there = seg.is_present(pred.presence, len(prob), threshold)
    return np.where(there[:, None, None], prob, np.float32(0))


def _detection(
    results: list[CaseResult], scores: np.ndarray, threshold: float, idx: list[int]
) -> dict[str, Any]:
    from mrisegcli.presence import detection_report

    rs = [results[i] for i in idx]
    present = np.array([r.gt_pixels > 0 for r in rs])
    drawn = np.array([r.pred_pixels > 0 for r in rs])
    row: dict[str, Any] = {"n": len(rs), "n_present": int(present.sum())}
    if present.any() and (~present).any():
        row.update(detection_report(scores[idx], present, threshold))
    if present.any():
        row["found"] = float(drawn[present].mean())  # present findings given a non-empty mask
        row["dice_present"] = float(
            np.mean([r.dice for r, p in zip(rs, present, strict=True) if p])
        )
    if (~present).any():
        empty = [r for r, p in zip(rs, present, strict=True) if not p]
        row["drawn_on_empty"] = float(drawn[~present].mean())
        row["fp_area_on_empty"] = float(np.mean([r.pred_pixels / r.n_pixels for r in empty]))
    return row


def detection_summary(
    seg: Segmenter,
    cases: list[Sample],
    results: list[CaseResult],
    pred: Any,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Is the target there? The presence score against "the truth is not empty", overall and
    per kind: AUROC, sensitivity and specificity at the threshold, share of present findings
    found, share of empty truths drawn and their mean false-positive area, Dice of present
    findings. Without a presence head the score is the highest foreground probability (the
    threshold 0.5: a mask is drawn). ``threshold`` overrides the model's."""
    if pred.presence is not None and seg.presence_threshold is not None:
        threshold = seg.presence_threshold if threshold is None else threshold
        scores, source = pred.presence.numpy(), "presence head"
    else:
        scores = pred.prob.numpy().reshape(len(results), -1).max(1)
        threshold, source = 0.5, "max probability"
    out = {"score": source, **_detection(results, scores, threshold, list(range(len(results))))}
    kinds: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        if c.kind:
            kinds.setdefault(c.kind, []).append(i)
    if kinds:
        out["kinds"] = {
            k: _detection(results, scores, threshold, v) for k, v in sorted(kinds.items())
        }
    return out


def _scope_row(rs: list[CaseResult]) -> dict[str, Any]:
    inside = [r.dice for r in rs if r.in_scope]
    outside = [r.dice for r in rs if not r.in_scope]
    row: dict[str, Any] = {"n": len(rs), "refused": len(outside)}
    if inside:
        row["dice_in_scope"] = float(np.mean(inside))
    if outside:
        row["dice_refused"] = float(np.mean(outside))
    return row


def scope_summary(
    seg: Segmenter, cases: list[Sample], results: list[CaseResult]
) -> dict[str, Any] | None:
    """Which of the cases' texts ``predict`` would refuse as outside what the model answers
    (scope.py; ``evaluate`` scores them all, as ``predict --force`` answers them): each
    result's ``in_scope``, and the count and Dice of the refused and accepted cases, overall
    and per kind, with the unknown words behind the refusals. ``None`` for a model without a
    recorded scope or without text."""
    from collections import Counter

    from mrisegcli.scope import unknown_words

    if not seg.scope or not seg.cfg.use_text:
        return None
    why: dict[str, list[str] | None] = {}  # text -> its unknown words; None when in scope
    for c in cases:
        if c.text not in why:
            refused = seg.refusal(c.text) is not None
            why[c.text] = unknown_words(c.text, seg.scope, seg.normalize) if refused else None
    words: Counter[str] = Counter()
    for r, c in zip(results, cases, strict=True):
        r.in_scope = why[c.text] is None
        words.update(why[c.text] or [])
    out = {**_scope_row(results), "unknown_words": dict(words.most_common(10))}
    kinds: dict[str, list[CaseResult]] = {}
    for r in results:
        if r.kind:
            kinds.setdefault(r.kind, []).append(r)
    if kinds and out["refused"]:
        out["kinds"] = {k: _scope_row(v) for k, v in sorted(kinds.items())}
    return out


def read_split(
    seg: Segmenter,
    data_root: Path | list[Path],
    split: str,
    layout: str | None,
    limit: int | None,
    workers: int,
    stage: StageFactory,
    texts: Path | None = None,
) -> tuple[list[Sample], np.ndarray, np.ndarray, list[np.ndarray]]:
    """The cases of a split with masks -> (cases, model-size images, model-size masks, ground truths)."""
    roots = (
        [Path(r) for r in data_root] if isinstance(data_root, (list, tuple)) else [Path(data_root)]
    )
    ds = open_dataset(roots, layout, check=False, texts=texts)
    cases = ds.split(split)
    if not cases:
        raise MrisegError(f"dataset has no {split!r} split (it has {ds.splits()})", data_root)
    cases = cases[:limit] if limit else cases
    if any(s.mask is None for s in cases):
        raise MrisegError(
            f"the {split!r} split has samples without masks; cannot evaluate", data_root
        )
    images, masks, gts = read_cases(seg, cases, workers, stage, split)
    return cases, images, masks, gts


def read_cases(
    seg: Segmenter, cases: list[Sample], workers: int, stage: StageFactory, what: str = ""
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(model-size images, model-size masks, ground truths at their own resolution) of
    ``cases`` (each with a mask)."""
    from mrisegcli.data.loading import load_split_arrays
    from mrisegcli.io.read import read_mask

    with stage(f"reading {len(cases)} {what} cases", len(cases)) as progress:
        images, masks = load_split_arrays(cases, seg.image_size, workers=workers, progress=progress)
    gts = [_ground_truth(s, read_mask) for s in cases]
    for s, g in zip(cases, gts, strict=True):
        if g.ndim != 2:
            raise MrisegError("3-D ground truth masks are evaluated with --pred/--gt", s.mask)
    return images, masks, gts


def _ground_truth(s: Sample, read_mask: Any) -> np.ndarray:
    """A case's mask at its own resolution (a volume's slice: as the model saw the slice)."""
    if s.volume is not None:
        from mrisegcli.data.volume_slices import slice_mask

        return slice_mask(s)
    return read_mask(s.mask, binary=True)


def _score_volumes(
    report: ModelEvalReport,
    cases: list[Sample],
    gts: list[np.ndarray],
    probs: np.ndarray,
    min_share: float = 0.0,
) -> None:
    """Volumes of the split scored as wholes, as ``predict`` writes them (components below
    ``min_share`` of the largest dropped), into ``report.volumes`` and its summary, with every
    candidate share's mean Dice beside (``"components"``)."""
    if not any(s.volume is not None for s in cases):
        return
    from mrisegcli.postprocess import component_table
    from mrisegcli.volume_metrics import summarize_volumes
    from mrisegcli.workflow.volume_eval import score_stacked, stacked_volumes

    stacked, partial = stacked_volumes(cases, gts, probs)
    report.volumes = score_stacked(stacked, min_share)
    if report.volumes:
        report.summary["volumes"] = summarize_volumes(report.volumes)
        report.summary["volumes"]["n_partial"] = partial
        report.summary["volumes"]["min_component_share"] = min_share
        report.summary["volumes"]["components"] = component_table(  # Dice only: HD95 of
            [(pred, gt, spacing) for _, pred, gt, spacing, _ in stacked], hd95=False
        )  # every share would cost a distance transform per volume and share


def _model_summary(
    seg: Segmenter,
    cases: list[Sample],
    gts: list[np.ndarray],
    results: list[CaseResult],
    pred: Any,
    samples: int,
    temperature: float | None,
) -> dict[str, Any]:
    summary = summarize(results)
    if pred.parts:  # the same decoded codes drawn several ways: what each part contributes
        summary["parts"] = {
            name: {k: summarize(score_cases(cases, gts, prob.numpy()))[k] for k in ("dice", "miou")}
            for name, prob in pred.parts.items()
        }
    for key in ("kind", "target"):
        groups = group_summaries(cases, results, key)
        if groups:
            summary[f"{key}s"] = groups
    summary["samples"] = samples
    summary["uses_text"] = seg.cfg.use_text
    summary["temperature"] = (
        temperature if temperature is not None else (1.0 if samples > 1 else 0.0)
    )
    return summary


def _uncertainties(pred: Any) -> list[float]:
    from mrisegcli.decode.consensus import case_uncertainty

    return [
        case_uncertainty(torch.from_numpy(u), torch.from_numpy(p > 0.5))
        for u, p in zip(pred.uncertainty.numpy(), pred.prob.numpy(), strict=True)
    ]


def _ablation_row(
    report: ModelEvalReport,
    cases: list[Sample],
    gts: list[np.ndarray],
    probs: np.ndarray,
    kinds: bool = False,
) -> dict[str, Any]:
    scored = score_cases(cases, gts, probs)
    s = summarize(scored)
    row = {"dice": s["dice"], "miou": s["miou"], "dice_drop": report.summary["dice"] - s["dice"]}
    if kinds:
        row["kinds"] = group_summaries(cases, scored, "kind")
    return row


def _other_cases(rng: np.random.Generator, n: int) -> np.ndarray:
    """A derangement-ish shuffle of range(n): every case gets another case where possible."""
    perm = rng.permutation(n)
    if n > 1:
        perm = np.where(perm == np.arange(n), (perm + 1) % n, perm)
    return perm


@torch.no_grad()
def teacher_forced_probs(
    seg: Segmenter, images: np.ndarray, masks: np.ndarray, texts: list[str]
) -> np.ndarray:
    """Probabilities decoded from the argmax codes of one teacher-forced pass: each code is
    predicted from the ground truth's previous codes, not the model's own."""
    if not seg.impl.teacher_forcing:
        raise MrisegError(
            f"the teacher-forced evaluation is for next-token models, not {seg.paradigm}"
        )
    out = []
    for s in range(0, len(images), 32):
        img = torch.from_numpy(images[s : s + 32])[:, None].to(seg.device)
        gt = torch.from_numpy(masks[s : s + 32]).float()[:, None].to(seg.device)
        codes_BN = seg.bundle.mask_vq.encode(gt).flatten(1)
        ids, tmask = seg.encode_text(texts[s : s + 32])
        logits = seg.model.mask_logits(
            seg.image_input(img), ids, seg.hide_text(tmask), codes_BN[:, :-1]
        )
        g = seg.model.config.mask_grid
        pred = logits.argmax(-1).view(-1, g, g)
        out.append(torch.sigmoid(seg.bundle.mask_vq.decode(pred).float())[:, 0].cpu().numpy())
    return np.concatenate(out)


def group_summaries(
    cases: list[Sample], results: list[CaseResult], key: str
) -> dict[str, dict[str, Any]]:
    """Dice / mIoU per value of a manifest column (``kind`` or ``target``); {} when it is unset.

    A group whose ground truths are all empty (a finding that is not there) also reports
    ``drawn``: the share of cases where the model drew anything, and ``fp_fraction``: the mean
    share of the image it drew.
    """
    by: dict[str, list[int]] = {}
    for i, s in enumerate(cases):
        value = getattr(s, key, "")
        if value:
            by.setdefault(value, []).append(i)
    out: dict[str, dict[str, Any]] = {}
    for value, idx in sorted(by.items()):
        rs = [results[i] for i in idx]
        summ = summarize(rs)
        row: dict[str, Any] = {"dice": summ["dice"], "miou": summ["miou"], "n": len(rs)}
        if all(r.gt_pixels == 0 for r in rs):
            row["drawn"] = float(np.mean([r.pred_pixels > 0 for r in rs]))
            row["fp_fraction"] = float(np.mean([r.pred_pixels / max(1, r.n_pixels) for r in rs]))
        out[value] = row
    return out


def report_dict(report: ModelEvalReport) -> dict[str, Any]:
    out = dict(report.summary)
    if report.ceiling is not None:
        out["tokenizer_ceiling_dice"] = report.ceiling["dice"]
        out["tokenizer_ceiling_miou"] = report.ceiling["miou"]
    for name, a in report.ablations.items():
        key = name if name.startswith(("image_", "teacher_")) else f"text_{name}"
        out[f"{key}_dice"] = a["dice"]
        out[f"{key}_dice_drop"] = a["dice_drop"]
        if a.get("kinds"):
            out[f"{key}_kinds"] = a["kinds"]
    out["seconds"] = report.seconds
    if report.volumes:
        out["volumes"] = {**out["volumes"], "cases": [v.row() for v in report.volumes]}
    return out
