"""Copy a trained chest-radiograph run into the package, with its test metrics and model card.

    python examples/ship_cxr_model.py --run runs/cxr --eval work/cxr-eval

``--eval`` is the folder ``examples/evaluate_cxr_model.sh`` wrote: ``cxr.json`` and ``jsrt.json``
(``mriseg evaluate --json`` on the test splits with canonical texts, text ablation included)
and ``paraphrase.json`` (the same on the unseen-wording test set). The run's files that predict
needs are copied into ``src/mrisegcli/shipped/chest-xray/`` (never checkpoints or caches),
``evaluation.json`` gathers the numbers, and ``README.md`` is the model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mrisegcli.hub import render_card

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "mrisegcli" / "shipped" / "chest-xray"
FILES = (
    "config.json",
    "model.safetensors",
    "mask_vq.safetensors",
    "image_vq.safetensors",
    "multiscale.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "metrics.json",
    "presence.safetensors",
)


def _kinds(ev: dict, prefix: str = "") -> dict[str, dict]:
    return {f"{prefix}{k}": v for k, v in ev.get("kinds", {}).items()}


def gather(eval_dir: Path) -> dict:
    cxr = json.loads((eval_dir / "cxr.json").read_text())
    jsrt = json.loads((eval_dir / "jsrt.json").read_text())
    para = json.loads((eval_dir / "paraphrase.json").read_text())
    kinds = {**_kinds(cxr)}
    for target in ("heart", "left_lung", "right_lung", "left_clavicle", "right_clavicle"):
        if target in jsrt.get("targets", {}):
            kinds[f"jsrt {target.replace('_', ' ')}"] = jsrt["targets"][target]
    if "nodule" in jsrt.get("kinds", {}):
        kinds["jsrt nodule"] = jsrt["kinds"]["nodule"]
    unseen = _kinds(para)
    report_path = eval_dir / "report_wording.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return {
        "detection": cxr.get("detection", {}),
        "report_wording": _kinds(report),
        "report_wording_detection": report.get("detection", {}),
        "kinds": kinds,
        "unseen_wording": unseen,
        "cxr_test": {
            k: cxr[k]
            for k in (
                "dice",
                "miou",
                "n",
                "tokenizer_ceiling_dice",
                "text_empty_dice",
                "text_empty_dice_drop",
                "text_empty_kinds",
                "image_shuffle_dice",
                "image_shuffle_dice_drop",
            )
            if k in cxr
        },
        "jsrt_test": {
            k: jsrt[k]
            for k in (
                "dice",
                "miou",
                "n",
                "tokenizer_ceiling_dice",
                "text_empty_dice",
                "text_empty_dice_drop",
            )
            if k in jsrt
        },
        "unseen_wording_test": {k: para[k] for k in ("dice", "miou", "n") if k in para},
    }


def card(config: dict, metrics: dict, ev: dict) -> str:
    run = config["run"]
    rows = []
    for kind, v in ev["kinds"].items():
        u = ev["unseen_wording"].get(kind)
        unseen = f"{u['dice']:.3f}" if u else "-"
        extra = (
            f"drew a region on {v['drawn']:.0%}, mean area {v['fp_fraction']:.2%}"
            if "drawn" in v
            else ""
        )
        rows.append(
            f"| {kind} | {v['dice']:.3f} | {v['miou']:.3f} | {v['n']} | {unseen} | {extra} |"
        )
    unseen_rows = [
        f"| {k} | {v['dice']:.3f} | {v['miou']:.3f} | {v['n']} |"
        for k, v in ev["unseen_wording"].items()
    ]
    c, j = ev["cxr_test"], ev["jsrt_test"]
    presence = _presence_section(config, ev)
    ds = run["mask_vq"]["downsample"]
    grid = run["image_size"] // ds
    budget = run["train"].get("max_minutes")
    budget = (
        f" within a {budget:g}-minute budget for the whole run (tokenizer fitting and code caching included)"
        if budget
        else ""
    )
    precision = " (bf16 autocast, float32 weights)" if metrics.get("precision") == "bf16" else ""
    dh = config.get("draft_heads")
    drafting = (
        f"\n* Greedy decoding is drafted by {dh['k'] - 1} heads refitted to the model's own greedy codes "
        f"(`mriseg draft-heads`):\n  {dh['val_passes_per_mask']:.1f} verifying passes per mask on "
        f"{dh['val_sequences']} validation cases instead of {dh['val_passes_per_mask_before']:.1f} "
        "with the heads as trained; the masks are the same."
        if dh
        else ""
    )
    body = f"""# mriseg chest-xray: text-prompted segmentation of chest radiographs

The model that `mriseg predict` uses when no `--model` is given. It segments what a short text
names on a frontal chest radiograph: infection (opacity, consolidation, ground glass; all of it,
one side, or some zones), the lungs, the heart, the clavicles and nodules. When its presence
score says the named finding is not there it answers "not found" (an empty mask); a prompt
with words it never learnt is refused.

**Intended use: research and method development, not for diagnosis or any clinical decision.**

```bash
pip install mrisegcli
mriseg predict chest.dcm --text "bilateral lower lobe opacity"
mriseg predict chest.png --text "cardiac silhouette" --overlay
```

## Model

* next-token paradigm, preset `{config.get("preset")}`: {run["image_size"]}-px input through a conv
  encoder, {grid}x{grid} mask tokens of {ds}x{ds} pixels (mask tokenizer with {run["mask_vq"]["codebook_size"]}
  codes), a {run["transformer"]["n_layers"]}-layer transformer of width {run["transformer"]["dim"]};
  prompts through a WordPiece text tokenizer with clinical synonym folding (e.g. "consolidation",
  "ground-glass opacity" -> "infection", "lobe" -> "zone", "cardiac silhouette" -> "heart").
* Trained {metrics["steps"]} steps, {metrics["train_seconds"] / 60:.0f} minutes of training on a 2-core
  CPU{precision}{budget}; best validation Dice {metrics["best_val_dice"]:.3f} at step {metrics["best_step"]}.
* Every training row also appeared in {run["paraphrases"]} generated rewordings of its `target`
  (`mrisegcli.data.paraphrase`). No left/right flips (they would swap the meaning of the text).{drafting}

## Training data

* **COVID-QU-Ex** infection-segmentation subset (Tahir et al., "COVID-19 infection localization and
  severity grading from chest X-ray images", Computers in Biology and Medicine 2021; Qatar
  University; the Kaggle release states **CC BY-SA 4.0**): 1,864 COVID-19 radiographs with
  radiologists' lung and infection masks, QaTa-COV19-style referring rows (describe, side, zone,
  anatomy), plus normal radiographs asked for an infection that is not there (an empty mask).
* **JSRT** (Shiraishi et al., AJR 2000; research use) with the SCR organ masks (van Ginneken et
  al., Medical Image Analysis 2006): 247 radiographs, heart, lungs, clavicles, nodules.
* Train splits only; model selection on the validation splits; the numbers below are the test
  splits. Images are 256x256 grey exports; the model reads any size (resized to
  {run["image_size"]} px) and writes the mask at the input's size and geometry.

## Test metrics

Dice and mIoU per kind (`mriseg evaluate`, masks scored at the ground truth's resolution; empty
prediction on an empty truth counts as Dice 1). "Unseen wording": the same test cases asked with
wordings no training row used (`examples/cxr_paraphrase_testset.py`, 5-6 templates per kind).
Many of the organ wordings ("cardiac silhouette", "both hemithoraces") read like a training text
once the synonym rules have folded them, so for the organ rows that column measures the rules
more than the model; the infection kinds are the cleaner test (docs/cxr_model.md).

| kind | Dice | mIoU | n | Dice, unseen wording | absent findings |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Unseen-wording test set per kind:

| kind | Dice | mIoU | n |
|---|---|---|---|
{chr(10).join(unseen_rows)}

* cxr-infection test, all kinds: Dice {c["dice"]:.3f}, mIoU {c["miou"]:.3f} (n={c["n"]}); with the
  text removed Dice {c.get("text_empty_dice", float("nan")):.3f} (drop {c.get("text_empty_dice_drop", float("nan")):.3f});
  mask tokenizer ceiling {c.get("tokenizer_ceiling_dice", float("nan")):.3f}.
* jsrt test, all targets: Dice {j["dice"]:.3f}, mIoU {j["miou"]:.3f} (n={j["n"]}); empty text
  Dice {j.get("text_empty_dice", float("nan")):.3f}; tokenizer ceiling {j.get("tokenizer_ceiling_dice", float("nan")):.3f}.

{presence}
## Limitations

* Frontal (PA/AP) adult chest radiographs only; COVID-19-era infection patterns. A CT or MR
  input runs slice by slice, with a warning, and is not what the model knows.
* The mask is decoded from {grid}x{grid} tokens of {ds}x{ds} pixels of the {run["image_size"]}-px input: thin structures
  (clavicles) and small nodules are coarse.
* A prompt with a word outside the model's vocabulary (after synonym folding, spelling
  variants and one-letter typos) is refused (`--force` runs it); the synonym rules cover common
  radiology wording (Fleischner glossary terms), not every phrasing.

## Licence

These weights are shared under CC BY-SA 4.0 (the licence of COVID-QU-Ex) and for research use
only (the terms of JSRT); the mriseg code is Apache-2.0. `MODEL_LICENSES.md` in the source says
why.

## Reproduce

```bash
bash examples/train_cxr_model.sh          # RUN=runs/cxr (then runs/cxr-fast), DATA=../shared/data
bash examples/evaluate_cxr_model.sh       # test splits, unseen wordings, copies runs/cxr-fast here
```
"""
    return render_card(
        body,
        license="other",
        license_name="CC-BY-SA-4.0 AND LicenseRef-mriseg-research-data",
        tags=["medical-imaging", "chest-x-ray", "segmentation", "referring-segmentation", "mriseg"],
    )


def _detection_rows(det: dict) -> list[str]:
    rows = []
    for kind, d in [("all rows", det), *det.get("kinds", {}).items()]:
        auroc = f"{d['auroc']:.3f}" if "auroc" in d else "-"
        found = f"{d['found']:.1%}" if "found" in d else "-"
        drawn = f"{d['drawn_on_empty']:.1%}" if "drawn_on_empty" in d else "-"
        dice = f"{d['dice_present']:.3f}" if "dice_present" in d else "-"
        rows.append(f"| {kind} | {d['n']} | {auroc} | {found} | {drawn} | {dice} |")
    return rows


def _presence_section(config: dict, ev: dict) -> str:
    p, scope = config.get("presence"), config.get("scope", {})
    if not p:
        return ""
    val = p["report"]["val"]
    targets = ", ".join(t["target"] for t in scope.get("targets", []))
    table = "\n".join(_detection_rows(ev.get("detection", {}))) if ev.get("detection") else ""
    report = ev.get("report_wording", {})
    report_rows = "\n".join(f"| {k} | {v['dice']:.3f} | {v['n']} |" for k, v in report.items())
    return f"""## Presence and scope

* **Presence**: a head on the model's text-aware states (`mrisegcli/presence.py`, fitted by
  `mriseg calibrate` on the train rows, calibrated on val) gives the probability that what the
  prompt names is in the image; below {p["threshold"]:.3f} (chosen on val) the mask is empty and
  `predict` says "not found (presence p)". Val: AUROC {val["auroc"]:.3f}, sensitivity
  {val["sensitivity"]:.3f}, specificity {val["specificity"]:.3f} ({val["n_present"]} present,
  {val["n_absent"]} absent rows).
* **Scope**: the model answers {targets}; {len(scope.get("vocabulary", []))} words after synonym
  folding. Prompts with other words are refused (`mriseg models chest-xray` lists them).

Detection on the cxr-infection test split (the presence score against a non-empty truth; "found":
present findings given a non-empty mask; "drawn": empty truths given a region):

| rows | n | AUROC | found | drawn on empty | Dice on present |
|---|---|---|---|---|---|
{table}

Report wording (`examples/report_wording_testset.py`: Fleischner-glossary wordings of every test
row, written before any result on them was seen), Dice per kind:

| kind | Dice | n |
|---|---|---|
{report_rows}
"""


def strip_training_buffers(src: Path, dst_run: Path) -> None:
    """The weights without the hard-token memory (a training-only buffer, a float per training
    row and mask token: most of the file), which inference never reads, written as
    ``dst_run/model.safetensors`` with its fingerprint recorded in ``dst_run/config.json``
    (written first)."""
    from safetensors import safe_open

    from mrisegcli.weights import save_weights

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("het_memory.")}
    save_weights(tensors, dst_run, metadata=meta)


def _without_paths(command: str, names: dict[str, str]) -> str:
    """A command line without this machine's paths: known ones by name, other absolute paths
    by their last part."""
    words = command.split()
    words[0] = Path(words[0]).name
    return " ".join(
        names.get(w.rstrip("/"), Path(w).name if w.startswith("/") else w) for w in words
    )


def ship(run: Path, eval_dir: Path, dest: Path, gather_fn, card_fn, run_name: str) -> None:
    """Copy ``run`` into ``dest`` with the numbers ``gather_fn(eval_dir)`` and the card
    ``card_fn(config, metrics, numbers)``; ``run_name`` stands for the run's path."""
    ev = gather_fn(eval_dir)
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FILES:
        if name not in ("model.safetensors", "config.json") and (run / name).is_file():
            shutil.copyfile(run / name, tmp / name)
    # the training machine's paths mean nothing elsewhere: keep the datasets' names
    roots = config["data"]["root"]
    roots = roots if isinstance(roots, list) else [roots]
    config["data"]["root"] = [Path(r).name for r in roots]
    config["data"].pop("paths", None)  # absolute paths of the training machine
    names = {str(r): Path(r).name for r in roots} | {str(run): run_name}
    if isinstance(config.get("command"), str):
        config["command"] = _without_paths(config["command"], names)
    if isinstance(config.get("presence"), dict):  # the calibration's data and command, by name
        pres = config["presence"]
        for section in (pres, pres.get("scope_refresh") or {}):
            section["data"] = [Path(d).name for d in section.get("data", [])]
            for key in ("command", "source"):
                if isinstance(section.get(key), str):
                    section[key] = _without_paths(section[key], names)
    if isinstance(config.get("postprocess"), dict):  # the volumes' folder, by name
        post = config["postprocess"]
        post["chosen_on"] = Path(str(post.get("chosen_on", ""))).name or post.get("chosen_on")
    config.pop("weights", None)  # the run's file; the stripped one is recorded below
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    strip_training_buffers(run / "model.safetensors", tmp)
    (tmp / "evaluation.json").write_text(json.dumps(ev, indent=2) + "\n")
    (tmp / "README.md").write_text(card_fn(config, metrics, ev))
    for f in tmp.iterdir():  # safetensors' writer leaves 0600: an installed package is read by all
        f.chmod(0o644)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(f"shipped {run} -> {dest} ({size / 1e6:.1f} MB)")


def ship_cli(doc: str, dest: Path, gather_fn, card_fn, run_name: str) -> None:
    """The command line of a ship script: ``--run``, ``--eval``, ``--dest``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--dest", type=Path, default=dest)
    args = ap.parse_args()
    ship(args.run, args.eval, args.dest, gather_fn, card_fn, run_name)


def main() -> None:
    ship_cli(__doc__, DEST, gather, card, "runs/cxr-cal")


if __name__ == "__main__":
    main()
