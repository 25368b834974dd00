"""Copy a trained brain-MRI run into the package, with its test metrics and model card.

    python examples/ship_brain_model.py --run runs/brain --eval work/brain-eval

``--eval`` is the folder ``examples/evaluate_brain_model.sh`` wrote: ``slices.json`` (``mriseg
evaluate --json`` on the lgg-flair test slices, text removed too), ``volumes.json`` (the test
patients' volumes) and ``report_wording.json`` (the test slices asked in report words). The
run's files that predict needs go to ``src/mrisegcli/shipped/brain-mri/``, ``evaluation.json``
gathers the numbers and ``README.md`` is the model card.
"""

from __future__ import annotations

import json
from pathlib import Path

from ship_cxr_model import _detection_rows, ship_cli

from mrisegcli.hub import render_card

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "mrisegcli" / "shipped" / "brain-mri"


def gather(eval_dir: Path) -> dict:
    slices = json.loads((eval_dir / "slices.json").read_text())
    volumes = json.loads((eval_dir / "volumes.json").read_text())
    report = json.loads((eval_dir / "report_wording.json").read_text())
    empty_kinds = slices.get("text_empty_kinds", {})
    side_contra = [k for k in ("side", "contra") if k in slices.get("kinds", {})]
    n = sum(slices["kinds"][k]["n"] for k in side_contra)
    with_text = sum(slices["kinds"][k]["dice"] * slices["kinds"][k]["n"] for k in side_contra)
    without = sum(
        empty_kinds.get(k, {}).get("dice", 0.0) * slices["kinds"][k]["n"] for k in side_contra
    )
    return {
        "kinds": slices.get("kinds", {}),
        "detection": slices.get("detection", {}),
        "slices_test": {
            k: slices[k] for k in ("dice", "miou", "n", "tokenizer_ceiling_dice") if k in slices
        },
        "text_removed_kinds": empty_kinds,
        "text_removed_drop_side_contra": (with_text - without) / n if n else None,
        "volumes": {
            **volumes.get("volumes", {}),
            "cases": [  # the evaluation machine's paths left out
                {k: v for k, v in c.items() if k not in ("gt", "pred")}
                for c in volumes.get("volumes", {}).get("cases", [])
            ],
        },
        "report_wording": report.get("kinds", {}),
        "report_wording_detection": report.get("detection", {}),
    }


def card(config: dict, metrics: dict, ev: dict) -> str:
    run = config["run"]
    p, scope = config.get("presence") or {}, config.get("scope", {})
    kinds = "\n".join(
        f"| {k} | {v['dice']:.3f} | {v['n']} | "
        f"{ev['report_wording'].get(k, {}).get('dice', float('nan')):.3f} | "
        f"{ev['text_removed_kinds'].get(k, {}).get('dice', float('nan')):.3f} | "
        + (f"{v['drawn']:.1%}" if "drawn" in v else "-")
        + " |"
        for k, v in ev["kinds"].items()
    )
    vol = ev["volumes"]
    vol_line = (
        f"Dice {vol.get('dice', float('nan')):.3f}, HD95 {vol.get('hd95_mm', float('nan')):.1f} mm, "
        f"absolute volume difference {vol.get('avd_ml', float('nan')):.1f} mL "
        f"(mean over {vol.get('n', 0)} test patients)"
        if vol
        else "not measured"
    )
    det = "\n".join(_detection_rows(ev["detection"])) if ev.get("detection") else ""
    val = (p.get("report") or {}).get("val", {})
    presence = (
        f"below {p['threshold']:.3f} (chosen on val: AUROC {val.get('auroc', float('nan')):.3f}, "
        f"sensitivity {val.get('sensitivity', float('nan')):.3f}, specificity "
        f"{val.get('specificity', float('nan')):.3f}) the mask is empty"
        if p
        else "no presence head"
    )
    side = ev.get("detection", {}).get("kinds", {}).get("side", {})
    side_n = side.get("n_present", 0)
    side_found = f"{round(side.get('found', 0.0) * side_n)} of {side_n}"
    side_dice = side.get("dice_present", float("nan"))
    rule = config.get("postprocess") or {}
    share = rule.get("min_component_share", 0.0)
    rows = {r["min_component_share"]: r for r in rule.get("candidates", [])}
    post = (
        f"A volume's mask drops the 3-D connected components smaller than {share:g} of its "
        f"largest (chosen on the {len(rule.get('volumes', []))} val patients' volumes by "
        f"`mriseg calibrate --volumes`: mean Dice {rows[0.0]['dice']:.3f} -> "
        f"{rows[share]['dice']:.3f}, HD95 {rows[0.0]['hd95_mm']:.1f} -> "
        f"{rows[share]['hd95_mm']:.1f} mm; `--min-component-share 0` keeps them)."
        if share and 0.0 in rows and share in rows
        else "A volume's mask is the stack of its slices' masks (no component rule)."
    )
    drop = ev.get("text_removed_drop_side_contra")
    drop_line = f"{drop:.3f}" if drop is not None else "not measured"
    init = config.get("init_from")
    how = (
        f"fine-tuned from the `{init['model']}` model (`mriseg train --init-from`, "
        "`examples/finetune_with_presence_probe.sh`)"
        if init
        else "`examples/train_brain_model.sh`"
    )
    augment = run.get("strategies", {}).get("augment", 0.0)
    flips = (
        f"Augmentation {augment:g} (rotation, zoom, shift, contrast); no flips"
        if augment
        else "No flips"
    )
    reproduce = (
        "FROM=runs/brain MODEL=brain-mri bash examples/finetune_with_presence_probe.sh  # then ship_brain_model.py"
        if init
        else "bash examples/evaluate_brain_model.sh     # test slices, volumes, report wording; copies it here"
    )
    body = f"""# mriseg brain-mri: text-prompted segmentation of FLAIR hyperintense lesions

The model `mriseg predict` uses for an MR series or a 3-D NIfTI when no `--model` is given. It
segments the FLAIR-hyperintense lesion of a lower-grade glioma on axial FLAIR slices: the whole
lesion, or its part in the left or right hemisphere; asked for the side without a lesion, or a
slice without one, it answers with an empty mask. A volume in gives a 3-D mask out, in the
volume's geometry.

**Intended use: research and method development, not for diagnosis or any clinical decision.**

```bash
mriseg predict flair.nii.gz --text "FLAIR hyperintense lesion"
mriseg predict flair.nii.gz --text "tumour in the left hemisphere" --format nii
```

## Model

* next-token paradigm, preset `{config.get("preset")}`: {run["image_size"]}-px axial slices through a
  conv encoder, {run["image_size"] // run["mask_vq"]["downsample"]}x{run["image_size"] // run["mask_vq"]["downsample"]} mask tokens, a {run["transformer"]["n_layers"]}-layer
  transformer of width {run["transformer"]["dim"]}, the full-resolution refiner; prompts through a
  WordPiece text tokenizer with neuroradiology synonym folding (T2/FLAIR hyperintensity, signal
  abnormality, glioma, tumour -> lesion; lobes -> hemisphere; crossing the midline -> both).
* Trained {metrics["steps"]} steps, {metrics["train_seconds"] / 60:.0f} minutes of training on a 2-core CPU
  shared with other work ({how}); best validation Dice
  {metrics["best_val_dice"]:.3f} at step {metrics["best_step"]}. Every training row also appeared in
  {run["paraphrases"]} rewordings of its target. {flips} (they would swap left and right).
* Presence: {presence}. Scope: it answers {", ".join(t["target"] for t in scope.get("targets", []))};
  prompts with other words are refused (`mriseg models brain-mri`).
* {post}

## Training data

**LGG segmentation data**: 80 patients of The Cancer Genome Atlas lower-grade glioma collection
(images from The Cancer Imaging Archive), axial FLAIR slices with the FLAIR-abnormality mask
drawn by a radiologist. Cite Buda et al., "Association of genomic subtypes of lower-grade
gliomas with shape features automatically extracted by a deep learning algorithm", Computers in
Biology and Medicine 2019, and Mazurowski et al., J Neurooncol 2017. Research use. Split by
patient: 64 train, 8 val (model selection), 8 test (every number below).

## Test metrics

Per-slice Dice per kind (masks scored at 256 px; an empty answer on an empty truth is Dice 1),
the same slices asked in report words (`examples/report_wording_testset.py`, written before any
result on them was seen), with the text removed, and the share of empty truths given a region:

| kind | Dice | n | Dice, report wording | Dice, text removed | drew on empty |
|---|---|---|---|---|---|
{kinds}

* Volumes (the 8 test patients, "FLAIR hyperintense lesion" on every slice): {vol_line}.
* Removing the text costs {drop_line} Dice on the `side` + `contra` rows.

Detection (the presence score against a non-empty truth):

| rows | n | AUROC | found | drawn on empty | Dice on present |
|---|---|---|---|---|---|
{det}

## Limitations

* Axial FLAIR of adult brains with lower-grade glioma, 256x256 exports of one collection: other
  sequences, other tumours, other scanners and post-operative brains are untested.
* The slices are decoded one by one at {run["image_size"]} px: there is no 3-D context.
* The side is taken in the radiological view (image left = patient right), as in the data.
* Sentence punctuation is folded away before the model reads a prompt: the training data asks
  "FLAIR hyperintense lesion." (with the full stop) only of slices without a lesion, and a
  model that sees the full stop learns it as "nothing here". This one decides from the image.
* The `side` rows (the part of a lesion that crosses the midline, {side_n} test slices) are
  mostly missed: found on {side_found}, Dice {side_dice:.3f}.

## Licence

These weights are for research use only (the terms of the LGG data), with the citations above;
the mriseg code is Apache-2.0. `MODEL_LICENSES.md` in the source says why.

## Reproduce

```bash
bash examples/train_brain_model.sh        # RUN=runs/brain, DATA=../shared/data
{reproduce}
```
"""
    return render_card(
        body,
        license="other",
        license_name="LicenseRef-mriseg-research-data",
        tags=[
            "medical-imaging",
            "mri",
            "brain",
            "flair",
            "glioma",
            "segmentation",
            "referring-segmentation",
            "mriseg",
        ],
    )


def main() -> None:
    ship_cli(__doc__, DEST, gather, card, "runs/brain")


if __name__ == "__main__":
    main()
