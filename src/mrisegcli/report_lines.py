"""What the commands print about their results, as text: one place for every summary line,
warning and JSON record, so that ``cli.py`` only prints them.

Each function takes a command's result and returns lines (or a dict for ``--json``); none
prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECON_DICE_WARN = 0.8  # a mask tokenizer below this caps every model trained on its codes
_MASK_TOKENIZERS = {
    "mask_vq": ("mask tokenizer", "--mask-steps"),
    "multiscale": ("multi-scale mask tokenizer", "--multiscale-steps"),
}


def _number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else f"{v}"


# ----------------------------------------------------------------------------- synth
def synth_json(report: Any, out_dir: Path, **asked: Any) -> dict[str, Any]:
    """``synth --json``: the folder, the cases written (``asked``: train, val, test, size,
    mode, seed) and the time."""
    return {
        "out": str(out_dir),
        "cases": report.n_total,
        **{k: asked[k] for k in ("train", "val", "test", "size", "mode", "seed")},
        "seconds": round(report.seconds, 3),
        "images_per_s": round(report.images_per_s, 1),
    }


def synth_line(report: Any, out_dir: Path, **asked: Any) -> str:
    a = asked
    return (
        f"wrote {report.n_total} cases ({a['train']} train / {a['val']} val / {a['test']} test, "
        f"{a['size']} px, mode {a['mode']}) to {out_dir} in {report.seconds:.1f} s "
        f"({report.images_per_s:.0f} images/s)"
    )


# ----------------------------------------------------------------------------- presets
def preset_records() -> list[dict[str, Any]]:
    """``presets``: each named preset with its transformer's size and its schedule."""
    from mrisegcli.config import RUN_PRESETS, run_preset
    from mrisegcli.models.presets import count_params

    records = []
    for name in RUN_PRESETS:
        cfg = run_preset(name)
        t = cfg.transformer
        records.append(
            {
                "name": name,
                "params": count_params(t),
                "dim": t.dim,
                "layers": t.n_layers,
                "train_steps": cfg.train.steps,
                "batch_size": cfg.train.batch_size,
                "image_size": cfg.image_size,
            }
        )
    return records


def presets_table(records: list[dict[str, Any]]) -> Any:
    """``presets``' table (a rich Table) of :func:`preset_records`."""
    from rich.table import Table

    table = Table(
        "preset", "parameters (next-token)", "dim x layers", "input px", "train steps", "batch"
    )
    for p in records:
        table.add_row(
            p["name"], f"{p['params'] / 1e6:.1f} M", f"{p['dim']} x {p['layers']}",
            str(p["image_size"]), str(p["train_steps"]), str(p["batch_size"]),
        )  # fmt: skip
    return table


# ----------------------------------------------------------------------------- tokenize, train
def tokenizer_lines(reports: dict[str, dict]) -> list[str]:
    """``mask_vq: recon_dice 0.91, steps 1200`` for each tokenizer fitted or reused."""
    return [
        f"{name}: " + ", ".join(f"{k} {_number(v)}" for k, v in rep.items())
        for name, rep in reports.items()
    ]


def cache_json(out_dir: Path, rep: Any, reports: dict[str, dict]) -> dict[str, Any]:
    """``tokenize --json``: the cache, what was encoded and reused, the tokenizers' reports."""
    return {
        "out": str(out_dir),
        "cache": str(out_dir / "cache"),
        "encoded": rep.encoded,
        "reused": rep.reused,
        "seconds": round(rep.seconds, 3),
        "tokenizers": reports,
    }


def cache_line(out_dir: Path, rep: Any) -> str:
    return (
        f"cache {out_dir / 'cache'}: {rep.encoded} encoded, {rep.reused} up to date, "
        f"{rep.seconds:.1f} s"
    )


def weak_tokenizer_warnings(reports: dict[str, dict]) -> list[str]:
    """A warning for each freshly fitted mask tokenizer that reconstructs masks poorly."""
    lines = []
    for name, report in reports.items():
        if name not in _MASK_TOKENIZERS or "recon_dice" not in report:
            continue
        dice = float(report["recon_dice"])
        if dice >= RECON_DICE_WARN:
            continue
        what, option = _MASK_TOKENIZERS[name]
        masks = (
            "held-out masks"
            if report.get("n_heldout", 1)
            else "its training masks (fewer than 10: none held out)"
        )
        lines.append(
            f"mriseg: warning: the {what} reconstructs {masks} with Dice {dice:.2f} < "
            f"{RECON_DICE_WARN}; fit longer with {option}"
        )
    return lines


#: a presence head finding fewer of the val findings than this at its threshold is reported
WEAK_PRESENCE_SENSITIVITY = 0.8


def weak_presence_warnings(presence: dict[str, Any] | None) -> list[str]:
    """A warning when the presence head (``config.json`` ``"presence"``) finds few of the val
    findings at its threshold, with the thresholds that would find more and what they cost."""
    report = (presence or {}).get("report") or {}
    val = report.get("val") or {}
    sens = val.get("sensitivity")
    if sens is None or sens != sens or sens >= WEAK_PRESENCE_SENSITIVITY:
        return []
    others = "; ".join(
        f"--presence-threshold {p['threshold']:.3f} finds {p['sensitivity']:.0%} and leaves "
        f"{p['specificity']:.0%} of them empty"
        for p in report.get("val_operating_points") or []
    )
    return [
        f"mriseg: warning: the presence head finds {sens:.0%} of the val findings at its "
        f"threshold {val['threshold']:.3f} (val AUROC {val['auroc']:.3f}, "
        f"{val['specificity']:.0%} of the val rows with an empty truth left empty), and "
        "predict and evaluate empty the masks it does not find" + (f"; {others}" if others else "")
    ]


def training_json(result: Any, out_dir: Path) -> dict[str, Any]:
    """``train --json``: the run folder, steps, best val Dice, seconds, precision, curves."""
    return {
        "run_dir": str(out_dir),
        "steps": result.steps,
        "best_val_dice": result.best_val_dice,
        "best_step": result.best_step,
        "seconds": round(result.train_seconds, 3),
        "precision": result.precision,
        "curves": None if result.curves is None else str(result.curves),
    }


def training_lines(result: Any, out_dir: Path) -> list[str]:
    """What ``train`` prints at the end: the summary line (and where the curves are)."""
    best = (
        f"{result.best_val_dice:.4f} (step {result.best_step})"
        if result.best_val_dice is not None
        else "n/a"
    )
    lines = [
        f"trained {result.steps} steps in {result.train_seconds:.0f} s; best val Dice {best}; "
        f"run {out_dir}"
    ]
    if result.curves is not None:
        lines.append(f"training curves: {result.curves}")
    return lines


# ----------------------------------------------------------------------------- evaluate
_PART_NAMES = {
    "tokens": "mask tokenizer (tokens only)",
    "refined": "refiner",
    "dense": "dense head (no codes)",
}
#: (summary key, label) of the optional numbers on the summary line, in print order
_SUMMARY_EXTRAS = (
    ("teacher_forced_dice", "teacher-forced Dice"),
    ("image_shuffle_dice", "shuffled image Dice"),
    ("uncertainty", "mean uncertainty"),
)


def _summary_line(summary: dict[str, Any], split: str, text_ablation: list[str]) -> str:
    line = f"{split}: Dice {summary['dice']:.4f}  mIoU {summary['miou']:.4f}  (n={summary['n']})"
    if not summary.get("uses_text", True):
        line += "  image-only model (trained with --no-text)"
    if "tokenizer_ceiling_dice" in summary:
        line += f"  tokenizer ceiling Dice {summary['tokenizer_ceiling_dice']:.4f}"
    for a in text_ablation:
        line += f"  {a} text Dice {summary[f'text_{a}_dice']:.4f} (drop {summary[f'text_{a}_dice_drop']:.4f})"
    for key, label in _SUMMARY_EXTRAS:
        if key in summary:
            drop = summary.get(f"{key}_drop")
            line += f"  {label} {summary[key]:.4f}" + (
                f" (drop {drop:.4f})" if key.startswith("image_") and drop is not None else ""
            )
    return line


def model_summary_lines(summary: dict[str, Any], split: str, text_ablation: list[str]) -> list[str]:
    """The lines under ``evaluate``'s table for a model: totals, ablations, parts, kinds."""
    lines = [_summary_line(summary, split, text_ablation)]
    if summary.get("parts"):  # the same codes drawn by each part of the model
        lines.append(
            "  mask drawn from the same codes by: "
            + ", ".join(
                f"{_PART_NAMES.get(k, k)} Dice {v['dice']:.4f}" for k, v in summary["parts"].items()
            )
        )
    for kind, row in summary.get("kinds", {}).items():
        extra = ""
        if "drawn" in row:
            extra = f"  drew a region on {row['drawn']:.1%} (mean area {row['fp_fraction']:.2%} of the image)"
        lines.append(
            f"  {kind}: Dice {row['dice']:.4f}  mIoU {row['miou']:.4f}  (n={row['n']}){extra}"
        )
    if summary.get("detection"):
        lines += detection_lines(summary["detection"])
    if summary.get("scope", {}).get("refused"):
        lines += refused_prompt_lines(summary["scope"])
    return lines


def _scope_line(row: dict[str, Any]) -> str:
    parts = [f"{row['refused']} of {row['n']} prompts outside the model's scope"]
    if "dice_refused" in row:
        parts.append(f"Dice {row['dice_refused']:.4f} on them")
    if "dice_in_scope" in row:
        parts.append(f"{row['dice_in_scope']:.4f} on the rest")
    return "; ".join(parts)


def refused_prompt_lines(scope: dict[str, Any]) -> list[str]:
    """``evaluate``: the cases whose text ``predict`` would refuse (scored here as ``--force``
    answers them), with the words behind it, overall and per kind."""
    words = ", ".join(f"{w!r} {n}" for w, n in scope.get("unknown_words", {}).items())
    head = f"scope (predict refuses these; --force answers them): {_scope_line(scope)}"
    lines = [head + (f"; unknown words: {words}" if words else "")]
    lines += [
        f"  {kind}: {_scope_line(row)}"
        for kind, row in scope.get("kinds", {}).items()
        if row["refused"]
    ]
    return lines


def _detection_line(row: dict[str, Any]) -> str:
    parts = []
    if "auroc" in row:
        parts.append(
            f"AUROC {row['auroc']:.3f}, sensitivity {row['sensitivity']:.3f}, "
            f"specificity {row['specificity']:.3f}"
        )
    if "found" in row:
        parts.append(f"found {row['found']:.1%} of {row['n_present']} present")
        parts.append(f"Dice on present {row['dice_present']:.4f}")
    if "drawn_on_empty" in row:
        parts.append(
            f"drew on {row['drawn_on_empty']:.1%} of {row['n'] - row['n_present']} empty "
            f"(mean area {row['fp_area_on_empty']:.2%})"
        )
    return "; ".join(parts)


def detection_lines(det: dict[str, Any]) -> list[str]:
    """Is the target there? The presence score against non-empty truths, overall and per kind."""
    lines = [f"detection ({det['score']}): {_detection_line(det)}"]
    lines += [f"  {kind}: {_detection_line(row)}" for kind, row in det.get("kinds", {}).items()]
    return lines


# ----------------------------------------------------------------------------- new runs from a model
def draft_heads_line(out_dir: Path, report: dict[str, Any]) -> str:
    """``draft-heads``: tokens per pass, passes per mask before and after, codes checked."""
    return (
        f"{out_dir}: {report['k']} tokens per pass (was {report['k_before']}); verifying passes "
        f"per mask on {report['val_sequences']} held-out cases "
        f"{report['val_passes_per_mask_before']:.1f} -> {report['val_passes_per_mask']:.1f}; "
        f"greedy codes unchanged on {report['identical_codes_checked']} checked cases"
    )


def calibrate_line(out_dir: Path, report: dict[str, Any]) -> str:
    """``calibrate``: the presence threshold, its val scores, the targets recorded (and the
    component rule chosen on volumes)."""
    val = report["report"]["val"]
    line = (
        f"{out_dir}: presence threshold {report['threshold']:.3f}; val AUROC {val['auroc']:.3f}, "
        f"sensitivity {val['sensitivity']:.3f}, specificity {val['specificity']:.3f} "
        f"({val['n_present']} present, {val['n_absent']} absent rows); "
        f"{report['targets']} targets recorded"
    )
    rule = report.get("postprocess")
    if rule:
        rows = {r["min_component_share"]: r for r in rule["candidates"]}
        kept, chosen = rows[0.0], rows[rule["min_component_share"]]
        line += (
            f"; volumes keep components of >= {rule['min_component_share']:g} of the largest "
            f"(mean Dice {kept['dice']:.3f} -> {chosen['dice']:.3f} on {kept['volumes']} volumes)"
        )
    return line


# ----------------------------------------------------------------------------- predict
def _volume_note(facts: dict[str, Any] | None) -> str:
    """', 12.3 mL in 5 of 20 slices' for a volume's mask ('' for a 2-D image)."""
    if not facts:
        return ""
    ml = facts.get("foreground_ml")
    size = f"{ml:.1f} mL" if ml is not None else f"{facts['foreground_voxels']} voxels"
    return f", {size} in {facts['slices_with_foreground']} of {facts['slices']} slices"


def predict_line(result: Any) -> tuple[str, str]:
    """``(stream, line)`` for one predict result without ``--json``: ``"err"`` for a refusal or
    an error, ``"out"`` for a mask written (found or not)."""
    if result.refused:
        return "err", f"mriseg: {result.input}: {result.error}"
    if result.error:
        return "err", f"mriseg: error: {result.error}"
    mask = result.outputs.get("mask")
    if not result.found:
        return "out", f"{result.input} -> {mask}: not found (presence {result.presence:.2f})"
    return "out", (
        f"{result.input} -> {mask} ({result.foreground_fraction:.1%} foreground"
        f"{_volume_note(result.volume)}, presence {result.presence:.2f})"
    )


def not_a_radiograph_warning(result: Any) -> str | None:
    """The warning for an input of the shipped chest-radiograph model that is no radiograph
    (a volume, or a scan of another modality); None for a radiograph."""
    from mrisegcli.shipped import RADIOGRAPH_MODALITIES

    if result.slices <= 1 and (result.modality or "").upper() in RADIOGRAPH_MODALITIES:
        return None
    what = f"a {result.modality} scan" if result.modality else f"a volume of {result.slices} slices"
    return (
        f"mriseg: warning: {result.input} is {what}; the default model was trained on "
        "chest radiographs and segments it slice by slice"
    )


# ----------------------------------------------------------------------------- models
def shipped_model_json(m: Any, default: str) -> dict[str, Any]:
    """``models --json``: one shipped model."""
    return {
        "name": m.name,
        "default": m.name == default,
        "path": str(m.path),
        "data": m.data,
        "size_bytes": m.size_bytes,
        "paradigm": m.config.get("paradigm"),
        "preset": m.config.get("preset"),
        "targets": [t["target"] for t in m.config.get("scope", {}).get("targets", [])],
        "presence_threshold": m.config.get("presence", {}).get("threshold"),
        "license": m.license,
        "evaluation": m.evaluation,
    }


def shipped_models_table(found: list[Any], default: str) -> Any:
    """``models``' table (a rich Table): a row of :func:`shipped_model_row` per model."""
    from rich.table import Table

    table = Table("model", "data", "size", "answers", "test Dice by kind (canonical wording)")
    for m in found:
        table.add_row(*shipped_model_row(m, default))
    return table


def shipped_model_row(m: Any, default: str) -> tuple[str, ...]:
    """``models``' table row: model, data, size, what it answers, test Dice by kind."""
    from mrisegcli.scope import describe_scope

    kinds = m.evaluation.get("kinds", {})
    dice = ", ".join(f"{k} {v['dice']:.3f}" for k, v in kinds.items()) or "not evaluated"
    label = f"{m.name} (default)" if m.name == default else m.name
    return (
        label,
        m.data,
        f"{m.size_bytes / 1e6:.1f} MB",
        describe_scope(m.config.get("scope", {}), limit=4) or "not recorded",
        dice,
    )


def shipped_models_footer(found: list[Any], env_var: str) -> str:
    """The line under ``models``' table: how to choose, the weights' licences, the cards."""
    return (
        f"--model NAME|RUN|HUB_ID chooses another; {env_var} sets the default; "
        "'mriseg models NAME' lists what a model answers. Weights' licences (the code is "
        "Apache-2.0): "
        + "; ".join(f"{m.name} {m.license}" for m in found)
        + ". Model cards: "
        + ", ".join(f"mrisegcli/shipped/{m.name}/README.md" for m in found)
    )


def scope_json(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """``models NAME --json``: a model's targets, vocabulary and presence threshold."""
    scope, presence = config.get("scope") or {}, config.get("presence") or {}
    return {
        "name": name,
        "targets": scope.get("targets", []),
        "vocabulary": scope.get("vocabulary", []),
        "presence_threshold": presence.get("threshold"),
        "presence_val": presence.get("report", {}).get("val"),
        "min_component_share": (config.get("postprocess") or {}).get("min_component_share", 0.0),
    }


def scope_lines(name: str, config: dict[str, Any]) -> list[str]:
    """``models NAME``: a model's targets with example prompts, its presence head and its
    volumes' component rule."""
    scope, presence = config.get("scope") or {}, config.get("presence") or {}
    if not scope:
        return [f"{name}: no scope recorded (trained before mriseg recorded one)"]
    lines = [f"{name} answers ({scope.get('source')}):"]
    for t in scope.get("targets", []):
        examples = "; ".join(f'"{e}"' for e in t.get("examples", []))
        lines.append(f"  {t['target']:<28} {t['rows']:>6} rows  e.g. {examples}")
    if scope.get("absent_rows"):
        lines.append(
            f"  and 'not there': {scope['absent_rows']} training rows ask for something absent"
        )
    lines.append(f"  vocabulary: {len(scope.get('vocabulary', []))} words")
    if not presence:
        lines.append("no presence head: every mask is drawn, none is refused as absent")
    else:
        val = presence.get("report", {}).get("val", {})
        lines.append(
            f"presence threshold {presence['threshold']:.3f} (val: AUROC "
            f"{val.get('auroc', 0):.3f}, sensitivity {val.get('sensitivity', 0):.3f}, "
            f"specificity {val.get('specificity', 0):.3f})"
        )
    share = (config.get("postprocess") or {}).get("min_component_share")
    if share:
        lines.append(
            f"volumes: 3-D components below {share:g} of the largest dropped "
            f"(chosen on {len(config['postprocess'].get('volumes', []))} validation volumes)"
        )
    return lines
