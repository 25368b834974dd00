"""The ``mriseg`` command line: each command parses its options and calls the library once
(``workflow/commands.py`` and the other ``workflow/`` modules); what it prints comes from
``report_lines.py``, train's settings from the table in ``settings.py``, and what the commands
share (errors and exit codes, option types, printing) from ``cli_support.py``. No maths here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mrisegcli import __version__
from mrisegcli.cli_support import (
    STATE,
    ChannelOpt,
    DeviceOpt,
    ForceOpt,
    JsonLinesOpt,
    JsonOpt,
    LayoutOpt,
    MaskFormat,
    MinComponentOpt,
    OneLineUsageErrors,
    PredictLines,
    PresenceThresholdOpt,
    QuietOpt,
    ScopeOnlyOpt,
    SpeculativeOpt,
    Split,
    SynthMode,
    TextAblation,
    TextsOpt,
    VolumesOpt,
    WorkersOpt,
    check_predict_usage,
    emit,
    emit_calibration,
    err,
    fail,
    given_options,
    handled,
    license_value,
    out,
    plain,
    print_json,
    print_lines,
    say,
    stage_printer,
    to_device,
    warn_weak_parts,
    with_settings,
)

app = typer.Typer(
    name="mriseg",
    cls=OneLineUsageErrors,
    help="Text-prompted medical image segmentation by autoregressive token prediction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: no rich markup, so that text in square brackets ("[@revision]") shows as written.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"mriseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Text-prompted medical image segmentation by autoregressive token prediction."""
    STATE["debug"] = debug or STATE["debug"]


# ----------------------------------------------------------------------------------------- synth
@app.command()
@handled
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to create (LViT layout).")],
    n_train: Annotated[int, typer.Option(min=1, help="Training cases.")] = 800,
    n_val: Annotated[int, typer.Option(min=0, help="Validation cases.")] = 100,
    n_test: Annotated[int, typer.Option(min=0, help="Test cases.")] = 200,
    size: Annotated[int, typer.Option(min=32, max=2048, help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    mode: Annotated[
        SynthMode,
        typer.Option(help="refer: the text names only some opacities; describe: all of them."),
    ] = SynthMode.refer,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an OUT folder made by an earlier synth.")
    ] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write the built-in referring dataset (chest-radiograph phantoms + QaTa-style texts)."""
    from mrisegcli.data.synth import synthesize
    from mrisegcli.progress import task_progress
    from mrisegcli.report_lines import synth_json, synth_line

    mode = plain(mode)
    with task_progress("synthesising", total=n_train + n_val + n_test, quiet=quiet) as progress:
        report = synthesize(
            out_dir, n_train=n_train, n_val=n_val, n_test=n_test, size=size, seed=seed, mode=mode,
            overwrite=overwrite, progress=progress,
        )  # fmt: skip
    asked = dict(train=n_train, val=n_val, test=n_test, size=size, mode=mode, seed=seed)
    emit(json_out, synth_json(report, out_dir, **asked), [synth_line(report, out_dir, **asked)])


# ----------------------------------------------------------------------------------- presets
@app.command()
@handled
def presets(
    json_out: JsonLinesOpt = False,
) -> None:
    """List the model presets with their parameter counts."""
    from mrisegcli.report_lines import preset_records, presets_table

    records = preset_records()
    for p in records if json_out else ():
        print_json(p)
    if not json_out:
        out.print(presets_table(records))


# ------------------------------------------------------------------------------------ models
@app.command()
@handled
def models(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="[NAME]", help="A shipped model's name or a run folder: list what it answers."
        ),
    ] = None,
    json_out: JsonLinesOpt = False,
) -> None:
    """List the models that ship inside the package, with their data, size, targets and test
    metrics; with NAME, what that model answers (targets, example prompts, presence threshold)."""
    from mrisegcli import report_lines as lines
    from mrisegcli.shipped import DEFAULT_MODEL, ENV_VAR, resolve_model, shipped_models

    if name is not None:  # what one model answers
        from mrisegcli.runinfo import read_config

        config = read_config(resolve_model(name)[1])
        emit(json_out, lines.scope_json(name, config), lines.scope_lines(name, config))
        return
    found = shipped_models()
    for m in found if json_out else ():
        print_json(lines.shipped_model_json(m, DEFAULT_MODEL))
    if json_out:
        return
    if not found:
        out.print("no models ship with this installation; pass --model RUN")
        return
    out.print(lines.shipped_models_table(found, DEFAULT_MODEL))
    out.print(lines.shipped_models_footer(found, ENV_VAR), markup=False)


# ---------------------------------------------------------------------------------- tokenize
@app.command()
@handled
@with_settings(  # the options it shares with train (settings.py); its own help where it differs
    after="tokenizer",
    names=("paradigm", "preset", "size", "mask_steps", "image_steps", "multiscale_steps", "seed"),
    helps={
        "paradigm": "Which tokenizers to fit.",
        "preset": "Preset for the tokenizers' fitting budget (default: as train's).",
        "size": "Model input side in pixels.",
    },
)
def tokenize(
    data: Annotated[
        list[Path],
        typer.Option(metavar="<path>", help="Dataset folder or manifest; repeat for several."),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Cache folder to create or update.")],
    tokenizer: Annotated[
        Path | None, typer.Option(help="Reuse the tokenizers of a run or tokenize output.")
    ] = None,
    layout: LayoutOpt = None,
    texts: TextsOpt = None,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    overwrite: Annotated[
        bool, typer.Option(help="Rebuild a cache made with other tokenizers.")
    ] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    **settings: Any,
) -> None:
    """Fit the tokenizers (unless given) and cache the codes of every sample."""
    from mrisegcli.report_lines import cache_json, cache_line, tokenizer_lines
    from mrisegcli.workflow.commands import TrainPlaces, tokenize_command

    def on_tokenizers(reports: dict[str, dict]) -> None:
        if not json_out:
            print_lines(tokenizer_lines(reports))
        warn_weak_parts(reports)

    places = TrainPlaces(layout=plain(layout), texts=texts, tokenizer=tokenizer, device=device,
                         workers=workers, overwrite=overwrite)  # fmt: skip
    reports, rep = tokenize_command(
        data, out_dir, settings, places, stage=stage_printer(quiet), on_tokenizers=on_tokenizers
    )
    emit(json_out, cache_json(out_dir, rep, reports), [cache_line(out_dir, rep)])


# ------------------------------------------------------------------------------------- train
@app.command()
@handled
@with_settings(after="out_dir")  # every setting of settings.SETTINGS: one option each
def train(
    ctx: typer.Context,
    data: Annotated[
        list[Path],
        typer.Option(
            metavar="<path>",
            help="Dataset folder (LViT, QaTa-v2) or manifest CSV/JSONL; repeat to train on several.",
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder (default: a new runs/<data name>-<date>-<time>)."),
    ] = None,
    layout: LayoutOpt = None,
    texts: TextsOpt = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizers of a run or tokenize.")] = None,
    init_from: Annotated[
        str | None,
        typer.Option(
            metavar="<model>",
            help="Fine-tune: start from this model (run folder, Hub id or shipped name), its architecture, tokenizers and weights.",
        ),
    ] = None,
    cache: Annotated[Path | None, typer.Option(help="Code cache (default RUN/cache).")] = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 2,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over in a non-empty run folder.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,  # run folder, steps, best val Dice, seconds, curves
    **settings: Any,
) -> None:
    """Train a model from raw data: tokenizers, code cache, then the transformer."""
    from mrisegcli.report_lines import training_json, training_lines
    from mrisegcli.workflow.commands import TrainPlaces, train_command

    places = TrainPlaces(layout=plain(layout), texts=texts, tokenizer=tokenizer, cache=cache,
                         device=device, workers=workers, resume=resume, overwrite=overwrite,
                         init_from=init_from)  # fmt: skip
    result, out_dir = train_command(
        data, out_dir, settings, places, quiet=quiet, given=given_options(ctx),
        command=" ".join(sys.argv), stage=stage_printer,
        note=lambda line: err.print(line, markup=False),
    )  # fmt: skip
    if result is None:  # another rank of torchrun: the main rank reports
        return
    warn_weak_parts(result.tokenizer_reports, out_dir)
    emit(json_out, training_json(result, out_dir), training_lines(result, out_dir))


# ----------------------------------------------------------------------------------- predict
@app.command()
@handled
def predict(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(show_default=False, help="Files, folders, or - to read paths from stdin."),
    ] = None,
    text: Annotated[str | None, typer.Option(help="The referring text (for every input).")] = None,
    prompts: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            help='A text per input instead of --text and INPUTS: CSV with a header path,text, or JSON lines {"path": ..., "text": ...}; - reads stdin. Paths are relative to the current folder.',
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Run folder, Hub id user/repo[@revision], or a shipped model's name (default: $MRISEG_MODEL, else the shipped chest-xray model)."
        ),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: beside each input).")
    ] = None,
    fmt: Annotated[
        MaskFormat,
        typer.Option(
            "--format",
            case_sensitive=False,
            help="Mask format; dcm is DICOM SEG (default: png for 2-D images, nii for volumes, dcm for DICOM).",
        ),
    ] = MaskFormat.auto,
    samples: Annotated[
        int, typer.Option(min=1, help="Masks drawn per input and fused by consensus.")
    ] = 1,
    temperature: Annotated[
        float | None,
        typer.Option(help="Sampling temperature (default 0, or 1 with --samples > 1)."),
    ] = None,
    uncertainty: Annotated[
        bool, typer.Option(help="Also write the uncertainty map (needs --samples > 1).")
    ] = False,
    overlay: Annotated[
        bool, typer.Option(help="Also write a PNG of the mask over the image.")
    ] = False,
    steps_png: Annotated[
        bool, typer.Option("--steps-png", help="Next-scale: write the mask after each scale.")
    ] = False,
    json_out: JsonLinesOpt = False,  # one per input
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Slices decoded together.")] = 32,
    keep_going: Annotated[
        bool, typer.Option(help="Continue after a bad or missing input (exit 1 at the end).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    speculative: SpeculativeOpt = True,
    presence_threshold: PresenceThresholdOpt = None,
    min_component_share: MinComponentOpt = None,
    force: ForceOpt = False,
    channel: ChannelOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Segment what the text describes in each input; one output line per input."""
    from mrisegcli.shipped import chosen_by_user, route_input
    from mrisegcli.workflow.commands import model_loader
    from mrisegcli.workflow.predict import ModelOptionError, PredictOptions, predict_batch

    check_predict_usage(inputs, text, prompts, uncertainty=uncertainty, samples=samples)
    options = PredictOptions(
        out_dir=out_dir, fmt=plain(fmt), samples=samples, temperature=temperature, seed=seed,
        uncertainty=uncertainty, overlay=overlay, steps_png=steps_png, overwrite=overwrite,
        keep_going=keep_going, progress=stage_printer(quiet=quiet),  # a bar per volume
        presence_threshold=presence_threshold, force=force, channel=channel, min_component_share=min_component_share,
    )  # fmt: skip
    lines = PredictLines(json_out)

    load = model_loader(  # called once every input and output has been checked
        model, device, batch_size=batch_size, speculative=speculative,
        announce=None if quiet else say, on_choice=lines.chose,
        warn=lambda message: err.print(f"mriseg: warning: {message}", markup=False),
    )  # fmt: skip
    try:
        results = predict_batch(
            load, inputs=inputs or [], text=text, prompts=prompts, options=options, on_result=lines,
            route=None if chosen_by_user(model) else route_input,  # each input to its model
        )  # fmt: skip
    except ModelOptionError as e:
        raise fail(str(e), 2) from None
    if PredictLines.failed(results):
        raise typer.Exit(1)


# -------------------------------------------------------------------------------------- evaluate
@app.command()
@handled
def evaluate(
    model: Annotated[
        str | None,
        typer.Option(
            help="Run folder, Hub id user/repo[@revision] or shipped model to evaluate on --data (default: $MRISEG_MODEL, else the shipped model for the data: brain-mri for NIfTI volumes in the nnU-Net layout, else chest-xray)."
        ),
    ] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="<path>", help="Dataset to evaluate the model on (repeat for several)."
        ),
    ] = None,
    split: Annotated[Split, typer.Option(help="Dataset split to evaluate on.")] = Split.test,
    layout: LayoutOpt = None,
    texts: TextsOpt = None,
    pred: Annotated[Path | None, typer.Option(help="Folder of predicted masks.")] = None,
    gt: Annotated[Path | None, typer.Option(help="Folder of ground-truth masks.")] = None,
    samples: Annotated[
        int, typer.Option(min=1, help="Masks drawn per case, fused by consensus.")
    ] = 1,
    temperature: Annotated[
        float | None,
        typer.Option(min=0.0, help="Sampling temperature (default 0, or 1 with --samples > 1)."),
    ] = None,
    text_ablation: Annotated[
        list[TextAblation] | None,
        typer.Option(
            metavar="<empty|shuffle>", help="Also score with empty or shuffled text (repeatable)."
        ),
    ] = None,
    image_ablation: Annotated[
        bool,
        typer.Option(
            "--image-ablation",
            help="Also score each case's text on another case's image (does the model read the image?).",
        ),
    ] = False,
    teacher_forced: Annotated[
        bool,
        typer.Option(
            "--teacher-forced",
            help="Next-token: also score the codes of one teacher-forced pass (the model without its own mistakes).",
        ),
    ] = False,
    presence_threshold: PresenceThresholdOpt = None,
    min_component_share: MinComponentOpt = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N cases.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    csv: Annotated[Path | None, typer.Option(help="Write per-case rows to this CSV file.")] = None,
    allow_missing: Annotated[
        bool, typer.Option(help="Count ground truths without a prediction as empty predictions.")
    ] = False,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 2,
    seed: Annotated[int, typer.Option(help="Random seed (sampling, shuffled text).")] = 0,
    speculative: SpeculativeOpt = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --csv file.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Dice and mIoU: of a model on a dataset split, or of a folder of predicted masks."""
    from mrisegcli.evaluation import render_table
    from mrisegcli.workflow.commands import evaluate_command

    split, text_ablation = plain(split), [plain(a) for a in text_ablation or ()]
    report, summary, by_model = evaluate_command(
        model, data, pred, gt, csv=csv, overwrite=overwrite, allow_missing=allow_missing,
        device=device, speculative=speculative, quiet=quiet or json_out,
        announce=None if quiet else say, stage=stage_printer(quiet=quiet or json_out), split=split,
        layout=plain(layout), texts=texts, samples=samples, temperature=temperature,
        ablations=tuple(text_ablation), image_ablation=image_ablation,
        teacher_forced=teacher_forced, limit=limit, workers=workers, seed=seed,
        presence_threshold=presence_threshold, min_component_share=min_component_share,
    )  # fmt: skip
    if json_out:
        print_json(summary)
        return
    out.print(render_table(report))
    if by_model:
        from mrisegcli.report_lines import model_summary_lines

        print_lines(model_summary_lines(summary, split, text_ablation))


# -------------------------------------------------------------------------------------- draft-heads
@app.command("draft-heads")
@handled
def draft_heads(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the new model (a copy of the run, new heads).")
    ],
    data: Annotated[
        list[Path],
        typer.Option(
            metavar="<path>",
            help="Dataset whose train split is decoded to fit the heads (repeat for several).",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="Next-token run folder, Hub id or shipped model (default: $MRISEG_MODEL, else the shipped model for the data, as for evaluate)."
        ),
    ] = None,
    heads: Annotated[
        int,
        typer.Option(min=2, help="Codes per verifying pass: the main head's and heads-1 drafted."),
    ] = 6,
    steps: Annotated[int, typer.Option(min=1, help="Optimisation steps of the heads.")] = 1500,
    max_cases: Annotated[
        int | None, typer.Option(min=1, help="Decode at most N train cases (a random subset).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Refit a next-token model's drafting heads to its own greedy codes (same masks, fewer passes)."""
    from mrisegcli.report_lines import draft_heads_line
    from mrisegcli.workflow.commands import derive_run
    from mrisegcli.workflow.draft_heads import refit_draft_heads

    report = derive_run(
        refit_draft_heads, model, data, out_dir, announce=None if quiet or json_out else say,
        stage=stage_printer(quiet or json_out), command=" ".join(["mriseg", *sys.argv[1:]]), heads=heads, steps=steps,
        max_cases=max_cases, seed=seed, device=to_device(device), overwrite=overwrite,
    )  # fmt: skip
    emit(json_out, report, [draft_heads_line(out_dir, report)])


# -------------------------------------------------------------------------------------- calibrate
@app.command()
@handled
def calibrate(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the new model (a copy of the run).")
    ],
    data: Annotated[
        list[Path],
        typer.Option(
            metavar="<path>",
            help="Dataset: train rows fit the presence head, val rows calibrate it and choose its threshold (repeat for several).",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="Run folder, Hub id or shipped model (default: $MRISEG_MODEL, else the shipped model for the data, as for evaluate)."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimisation steps of the head.")] = 1500,
    max_cases: Annotated[
        int | None, typer.Option(min=1, help="Use at most N train rows (a random subset).")
    ] = 16000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out when it is a run folder.")] = False,
    scope_only: ScopeOnlyOpt = False,
    volumes: VolumesOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fit a model's presence head (is the prompt's target there?) and record its scope."""
    from mrisegcli.workflow.calibrate import calibrate_run
    from mrisegcli.workflow.commands import derive_run

    report = derive_run(
        calibrate_run, model, data, out_dir, announce=None if quiet or json_out else say,
        stage=stage_printer(quiet or json_out), command=" ".join(["mriseg", *sys.argv[1:]]), steps=steps, max_cases=max_cases,
        seed=seed, device=to_device(device), overwrite=overwrite, scope_only=scope_only, volumes=volumes,
    )  # fmt: skip
    emit_calibration(json_out, report, out_dir)


# -------------------------------------------------------------------------------------- push
@app.command()
@handled
def push(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run folder to publish.")],
    repo_id: Annotated[
        str, typer.Option(help="Hub model repository user/name (created if needed).")
    ],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch (made if needed).")] = None,
    token: Annotated[
        str | None, typer.Option(help="Hub token (default: HF_TOKEN or the saved login).")
    ] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    spdx: Annotated[
        str | None,
        typer.Option(
            "--license",
            metavar="SPDX",
            callback=license_value,
            help="Licence of the weights in the model card, an SPDX identifier or expression "
            "(Apache-2.0, CC-BY-NC-4.0, CC-BY-SA-4.0 AND LicenseRef-my-data); the terms of the "
            "training data decide it. Default: the licence the run's model card states "
            "(a shipped model's, an earlier push's), else none.",
        ),
    ] = None,
) -> None:
    """Publish a run on the Hugging Face Hub: weights, tokenizers, config and a model card."""
    from mrisegcli.hub import push_license
    from mrisegcli.workflow.push import push_run

    license_id, license_name = push_license(run, spdx)
    url = push_run(
        run, repo_id, private=private, revision=revision, token=token,
        commit_message=commit_message, license=license_id, license_name=license_name,
    )  # fmt: skip
    model = f"{repo_id}@{revision}" if revision else repo_id
    out.print(f"pushed {run} to {url}; use it with --model {model}", markup=False)


def main() -> None:
    """Console-script entry point."""
    import atexit
    import gc

    # at exit, after every other exit handler: the interpreter's last garbage collection would
    # walk every object torch made (~0.3 s) to free memory the OS takes back anyway; outputs are
    # closed and renamed into place before this (io/atomic.py), so no finaliser is needed
    atexit.register(gc.freeze)
    app()


if __name__ == "__main__":
    main()
