"""One declaration per setting (settings.py): the train options, the config sections, the routing
of the command line's values, the resume check and the next-token model's config all follow
from the table."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mrisegcli import runinfo, settings
from mrisegcli.settings import OPTIONS, SETTINGS, SettingError, choices, route


def _params(command: str = "train") -> dict:
    import typer.main

    from mrisegcli.cli import app

    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


def _train_params() -> dict:
    return _params("train")


def test_each_train_option_follows_its_row():
    from typer.testing import CliRunner

    from mrisegcli.cli import app

    params = _train_params()
    usage = CliRunner().invoke(app, ["train", "--help"]).stdout
    for s in OPTIONS.values():
        p = params[s.name]
        assert p.help == s.help, s.name
        spelled = s.flags[0].split("/")[0] if s.flags else s.flag
        assert spelled in p.opts, (s.name, p.opts)
        allowed = choices(s.type)
        if allowed:  # --help lists them, in their order
            assert f"{spelled} <{'|'.join(allowed)}>" in usage, s.name
        if s.cli_default is None:
            assert p.default is None, s.name
        if s.min is not None or s.max is not None:
            assert (p.min, p.max) == (s.min, s.max), s.name
    assert [n for n in params if n in OPTIONS] == list(OPTIONS)  # the table's order


TOKENIZE_SETTINGS = ("paradigm", "preset", "size", "mask_steps", "image_steps",
                     "multiscale_steps", "seed")  # fmt: skip


def test_tokenize_takes_the_settings_it_shares_with_train_from_the_table(monkeypatch):
    from typer.testing import CliRunner

    import mrisegcli.workflow.commands as commands
    from mrisegcli.cli import app

    train, tokenize = _params("train"), _params("tokenize")
    assert [n for n in tokenize if n in OPTIONS] == list(TOKENIZE_SETTINGS)
    for name in TOKENIZE_SETTINGS:
        a, b = train[name], tokenize[name]
        assert (b.opts, b.default, b.min, b.max, b.metavar) == (a.opts, a.default, a.min, a.max,
                                                                a.metavar), name  # fmt: skip
    # tokenize reads these for its tokenizers only, and says so
    assert tokenize["paradigm"].help == "Which tokenizers to fit."
    assert tokenize["preset"].help.startswith("Preset for the tokenizers' fitting budget")
    assert tokenize["mask_steps"].help == OPTIONS["mask_steps"].help
    assert tokenize["seed"].default == 0 and str(tokenize["paradigm"].default) == "next-token"

    seen = {}

    def fake(data, out_dir, settings, places, **kw):
        seen.update(settings)
        raise SystemExit(0)

    monkeypatch.setattr(commands, "tokenize_command", fake)
    args = ["tokenize", "--data", "d", "--out", "o", "--paradigm", "next-scale", "--size", "64",
            "--multiscale-steps", "7"]  # fmt: skip
    CliRunner().invoke(app, args)
    assert seen == {"paradigm": "next-scale", "preset": None, "size": 64, "mask_steps": None,
                    "image_steps": None, "multiscale_steps": 7, "seed": 0}  # fmt: skip


def test_config_sections_are_the_rows_of_the_table():
    from mrisegcli.config import FitConfig, RunConfig, StrategyConfig

    for cls, section in ((StrategyConfig, "strategies"), (FitConfig, "fit")):
        rows = [s for s in SETTINGS if s.section == section]
        assert [(f.name, f.type, f.default) for f in dataclasses.fields(cls)] == [
            (s.field, s.type, s.default) for s in rows
        ]
    defaults = RunConfig()
    for s in OPTIONS.values():  # every option sets a field the config has
        runinfo._get(defaults, s.path)


def test_route_sends_each_value_to_its_section():
    given = {
        "scheduled_sampling": 0.5,
        "steps": 10,
        "mask_steps": 5,
        "no_text": True,
        "paraphrases": 2,
        "lr": None,  # left out: the preset's
    }
    assert route(given) == {
        "": {"use_text": False, "paraphrases": 2},
        "train": {"steps": 10},
        "strategies": {"scheduled_sampling": 0.5},
        "fit": {"mask_steps": 5},
    }
    assert route({"no_text": False}) == {"": {}, "train": {}, "strategies": {}, "fit": {}}
    with pytest.raises(SettingError, match=r"^--image-input must be codes or pixels, not 'x'$"):
        route({"image_input": "x"})


def test_run_config_applies_the_settings_over_the_preset():
    from mrisegcli.workflow.commands import run_config

    cfg = run_config(
        "cxr", "next-token", None, 3, scheduled_sampling=0.25, epochs=2, no_text=True, batch_size=8
    )
    assert cfg.preset == "cxr" and cfg.seed == 3 and cfg.train.seed == 3
    assert cfg.strategies.scheduled_sampling == 0.25
    assert cfg.strategies.mask_cell_image is True  # the preset's, not given
    assert (cfg.train.epochs, cfg.train.steps) == (2, 0)  # epochs replace the step count
    assert cfg.train.batch_size == 8 and cfg.fit.batch_size == 32  # train's, not the tokenizers'
    assert cfg.use_text is False


@pytest.mark.parametrize(
    ("size", "preset", "side"),
    [(None, "cxr", 128), (128, "cxr", 128), (256, "cxr", 256), (136, "cpu", 136),
     (96, "cpu", 96), (64, "cpu", 64), (48, "tiny", 48), (32, "tiny", 32)],
)  # fmt: skip
def test_a_run_without_preset_gets_the_best_measured_one_that_fits_its_size(size, preset, side):
    from mrisegcli.workflow.commands import run_config

    cfg = run_config(None, "next-token", size, 0)
    assert (cfg.preset, cfg.image_size, cfg.mask_vq.image_size) == (preset, side, side)
    named = run_config("tiny", "next-token", size, 0)  # a preset named is the one used
    assert named.preset == "tiny"


def test_resume_check_follows_the_table():
    assert runinfo.OPTION_FIELDS is settings.OPTION_FIELDS
    assert settings.OPTION_FIELDS["refine_code_noise"] == "strategies.refine_code_noise"
    assert settings.OPTION_FIELDS["no_text"] == "use_text"
    assert settings.RESUMABLE == ("steps", "eval_every", "ckpt_every", "max_minutes", "cpu_bf16")


def test_next_token_model_takes_every_strategy_it_declares(monkeypatch):
    import mrisegcli.tokenizers.text as text
    from mrisegcli.config import run_preset
    from mrisegcli.models.next_token import NextTokenConfig
    from mrisegcli.paradigms import get_paradigm

    monkeypatch.setattr(text, "text_vocab_size", lambda tok: 100)
    cfg = run_preset("cxr")
    cfg = dataclasses.replace(
        cfg, strategies=dataclasses.replace(cfg.strategies, refine_code_noise=0.2, nktp_k=2)
    )
    bundle = SimpleNamespace(mask_vq=SimpleNamespace(codebook_size=64, grid=8), text=None)
    mcfg = get_paradigm("next-token").model_config(cfg, bundle, n_train=10)
    model_fields = {f.name for f in dataclasses.fields(NextTokenConfig)}
    shared = model_fields & {f.name for f in dataclasses.fields(cfg.strategies)}
    assert {"scheduled_sampling", "refine_code_noise", "mask_positions"} <= shared
    assert shared == {s.field for s in SETTINGS if "next-token" in s.models}
    for name in shared:
        assert getattr(mcfg, name) == getattr(cfg.strategies, name), name
    assert mcfg.encoder.stage_blocks == cfg.strategies.encoder_stage_blocks
    # the cxr preset trains the presence probe (bench/presence_probe_ab.sh measured it)
    assert mcfg.lambda_presence == 0.5


@pytest.mark.parametrize("paradigm", ["next-token", "next-scale"])
def test_model_configs_declare_their_strategies_only_in_the_table(paradigm):
    """A model config's strategy fields are the rows that name its paradigm, of the row's type;
    their defaults are those of the runs saved before a strategy existed, so that an old
    config.json without the key loads as it was trained."""
    from mrisegcli.config import StrategyConfig
    from mrisegcli.models.next_scale import NextScaleConfig, NextScaleStrategies
    from mrisegcli.models.next_token import NextTokenConfig, NextTokenStrategies

    config, strategies = {
        "next-token": (NextTokenConfig, NextTokenStrategies),
        "next-scale": (NextScaleConfig, NextScaleStrategies),
    }[paradigm]
    assert issubclass(config, strategies)
    rows = [s for s in SETTINGS if paradigm in s.models]
    assert [(f.name, f.type) for f in dataclasses.fields(strategies)] == [
        (s.field, s.type) for s in rows
    ]
    run_names = {f.name for f in dataclasses.fields(StrategyConfig)}
    assert not (run_names - {s.field for s in rows}) & {f.name for f in dataclasses.fields(config)}
    older = {f.name: f.default for f in dataclasses.fields(strategies)}
    if paradigm == "next-token":  # what these strategies were before they had a row
        assert older["prefix_attention"] == "causal" and older["input_noise"] == 0.0
        assert StrategyConfig().prefix_attention == "bidirectional"
    assert older["lambda_dense"] == 0.0 and StrategyConfig().lambda_dense == 1.0


def test_the_command_line_reads_the_table_without_torch():
    code = "import sys, mrisegcli.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
