"""The full-resolution refiner: a detokenizer that reads the decided codes, the text-aware image
states and the encoder's feature maps; predict/evaluate report each way of drawing the mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mrisegcli.cli import app
from mrisegcli.errors import ConfigError
from mrisegcli.models.image_encoder import ConvImageEncoder, ImageEncoderConfig
from mrisegcli.models.next_token import NextTokenConfig, NextTokenSegmenter
from mrisegcli.models.refiner import MaskRefiner
from mrisegcli.models.transformer import TransformerConfig

runner = CliRunner()


def _cfg(**kw) -> NextTokenConfig:
    base = dict(
        transformer=TransformerConfig(
            dim=32, n_layers=1, n_heads=2, mlp_hidden=64, max_seq_len=128
        ),
        image_input="pixels",
        image_size=32,
        image_grid=4,
        mask_grid=4,
        encoder=ImageEncoderConfig(patch=8),
        mask_codebook_size=16,
        text_vocab_size=40,
        text_len=6,
        prefix_attention="bidirectional",
        lambda_refine=1.0,
        refine_width=8,
    )
    return NextTokenConfig(**{**base, **kw})


def _batch(B: int = 4, S: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    centres = torch.randint(8, S - 8, (B, 2), generator=g)
    mask = torch.stack([((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 36) for c in centres]).to(
        torch.uint8
    )
    image = (0.2 + 0.6 * mask.float() + 0.05 * torch.randn(B, S, S, generator=g)).clamp(0, 1)[
        :, None
    ]
    return {
        "image": image,
        "mask": mask,
        "text_ids": torch.randint(0, 40, (B, 6), generator=g),
        "text_mask": torch.ones(B, 6, dtype=torch.bool),
        "mask_codes": torch.randint(0, 16, (B, 4, 4), generator=g),
        "sample_ids": torch.arange(B),
    }


def test_encoder_pyramid_gives_the_tokens_and_one_map_per_stride() -> None:
    enc = ConvImageEncoder(ImageEncoderConfig(patch=8, channels=(8, 16), res_blocks=1), 32)
    x = torch.rand(2, 1, 32, 32)
    tokens, maps = enc.pyramid(x)
    assert torch.equal(tokens, enc(x))
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 16, 16), (16, 8, 8), (16, 4, 4)]
    assert enc.skip_channels() == [8, 16, 16]


def test_encoder_stage_blocks_deepen_the_finer_maps_and_keep_the_plain_layout() -> None:
    cfg = ImageEncoderConfig(patch=8, channels=(8, 16), res_blocks=1)
    plain = ConvImageEncoder(cfg, 32)
    deep = ConvImageEncoder(ImageEncoderConfig(**{**cfg.__dict__, "stage_blocks": 2}), 32)
    # the layout of every model trained without stage blocks (checkpoints load unchanged)
    assert [type(m).__name__ for m in plain.net] == [
        *("Conv2d", "SiLU") * 3,
        "_ResBlock",
        "SiLU",
        "Conv2d",
    ]
    assert sum(type(m).__name__ == "_ResBlock" for m in deep.net) == 1 + 2 * 2
    x = torch.rand(2, 1, 32, 32)
    (t0, m0), (t1, m1) = plain.pyramid(x), deep.pyramid(x)
    assert t0.shape == t1.shape and [m.shape for m in m0] == [m.shape for m in m1]
    assert deep.skip_channels() == plain.skip_channels()
    # the finer maps come after their blocks: they differ from the strided conv's output
    first = deep.net[1](deep.net[0](x * 2 - 1))
    assert not torch.allclose(m1[0], first)
    torch.testing.assert_close(m1[0], deep.net[3](deep.net[2](first)))
    with pytest.raises(ConfigError, match="stage_blocks"):
        ImageEncoderConfig(stage_blocks=-1)


def test_refiner_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="pixels"):
        _cfg(image_input="codes", image_codebook_size=8)
    with pytest.raises(ConfigError, match="mask_grid"):
        _cfg(mask_grid=2)
    with pytest.raises(ConfigError, match=">= 0"):
        _cfg(lambda_refine=-1.0)
    assert (
        NextTokenSegmenter(_cfg(lambda_refine=0.0)).refiner is None
    )  # off: no module, old weights load


def test_refiner_loss_trains_encoder_transformer_and_refiner(one_thread) -> None:
    torch.manual_seed(0)
    model = NextTokenSegmenter(_cfg())
    out = model(_batch())
    assert out["refine"] > 0
    out["loss"].backward()
    for name in (
        "refiner.out.weight",
        "refiner.code_emb.weight",
        "encoder.net.0.weight",
        "transformer.layers.0.attn.wqkv.weight",
    ):
        p = dict(model.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_refiner_learns_boundaries_the_codes_cannot_carry(one_thread) -> None:
    """Codes that say nothing (all zero): the refiner must place the disc from the image alone,
    at full resolution, which a 4x4 code grid cannot do."""
    torch.manual_seed(0)
    batch = _batch(B=6)
    enc = ConvImageEncoder(ImageEncoderConfig(patch=8, channels=(8, 16), res_blocks=0), 32)
    ref = MaskRefiner(16, 4, 16, enc.skip_channels(), width=8)
    opt = torch.optim.Adam([*enc.parameters(), *ref.parameters()], lr=1e-2)
    codes = torch.zeros(6, 4, 4, dtype=torch.long)
    states = torch.zeros(6, 16, 16)
    losses = []
    for _ in range(120):
        tokens, maps = enc.pyramid(batch["image"])
        logits = ref(codes, states, maps, batch["image"])
        loss = MaskRefiner.loss(logits, batch["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pred = (logits[:, 0] > 0).float()
    gt = batch["mask"].float()
    dice = float(2 * (pred * gt).sum() / (pred.sum() + gt.sum()))
    assert losses[-1] < 0.5 * losses[0]
    assert dice > 0.85


def test_full_res_level_places_single_pixel_detail(one_thread) -> None:
    """A mask of one-pixel stripes that the image shows: the half-resolution logits upsampled
    bilinearly cannot draw it, the level at the input side that reads the pixels can."""
    S, B = 32, 4
    g = torch.Generator().manual_seed(0)
    stripes = (torch.rand(B, 1, S, generator=g) > 0.5).float().expand(B, S, S)  # per column
    image = (0.25 + 0.5 * stripes + 0.02 * torch.randn(B, S, S, generator=g))[:, None]
    codes = torch.zeros(B, 4, 4, dtype=torch.long)
    states = torch.zeros(B, 16, 8)

    def fit(full_res: bool) -> float:
        torch.manual_seed(0)
        enc = ConvImageEncoder(ImageEncoderConfig(patch=8, channels=(8, 16), res_blocks=0), S)
        ref = MaskRefiner(16, 4, 8, enc.skip_channels(), width=8, full_res=full_res)
        opt = torch.optim.Adam([*enc.parameters(), *ref.parameters()], lr=1e-2)
        for _ in range(80):
            logits = ref(codes, states, enc.pyramid(image)[1], image)
            loss = MaskRefiner.loss(logits, stripes)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert logits.shape == (B, 1, S, S)
        pred = (logits[:, 0] > 0).float()
        return float(2 * (pred * stripes).sum() / (pred.sum() + stripes.sum()))

    full, half = fit(True), fit(False)
    assert full > 0.95
    assert full > half + 0.05, (full, half)  # measured: 1.00 against 0.87


def test_full_res_level_is_optional_and_off_by_default() -> None:
    """Off, the refiner has exactly the weights it had before (earlier runs load strictly)."""
    off = NextTokenSegmenter(_cfg()).refiner.state_dict()
    on = NextTokenSegmenter(_cfg(refine_full_res=True)).refiner.state_dict()
    assert not any(k.startswith(("stem.", "fine.")) for k in off)
    assert {k.split(".")[0] for k in set(on) - set(off)} == {"stem", "fine"}
    assert off["out.weight"].shape[1] == 8 and on["out.weight"].shape[1] == 4


def test_mask_outputs_match_the_training_path(one_thread) -> None:
    torch.manual_seed(0)
    model = NextTokenSegmenter(_cfg(lambda_dense=1.0)).eval()
    b = _batch()
    out = model.mask_outputs(b["image"], b["text_ids"], b["text_mask"], b["mask_codes"])
    assert set(out) == {"refined", "dense"}
    assert out["refined"].shape == out["dense"].shape == (4, 1, 32, 32)
    # the same pieces by hand: the refiner on the prefix states and the encoder's maps
    skips: list[torch.Tensor] = []
    h = model.teacher_forced_states(
        b["image"], b["text_ids"], b["text_mask"], b["mask_codes"].flatten(1)[:, :0], skips
    )
    by_hand = model.refiner(b["mask_codes"], h[:, 1 : 1 + model.layout.n_image], skips, b["image"])
    torch.testing.assert_close(out["refined"], by_hand)
    # the refined mask depends on the codes (it is not the dense head under another name)
    other = model.mask_outputs(
        b["image"], b["text_ids"], b["text_mask"], (b["mask_codes"] + 1) % 16
    )
    assert not torch.allclose(other["refined"], out["refined"])
    torch.testing.assert_close(other["dense"], out["dense"])


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    r = runner.invoke(
        app,
        ["synth", str(root), "--n-train", "24", "--n-val", "6", "--n-test", "6", "--size", "32"],
    )
    assert r.exit_code == 0, r.output
    return root


def test_train_predict_evaluate_with_the_refiner(synth_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(synth_data),
            "--out",
            str(run),
            "--preset",
            "cpu",
            "--size",
            "32",
            "--steps",
            "12",
            "--batch-size",
            "8",
            "--mask-steps",
            "40",
            "--eval-every",
            "6",
            "--lambda-refine",
            "1",
            "--refine-code-noise",
            "0.25",
            "--scheduled-sampling",
            "0.25",
            "--mask-positions",
            "target",
            "--mask-cell-image",
            "--refine-full-res",
            "--encoder-stage-blocks",
            "1",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["lambda_refine"] == 1.0
    assert (
        cfg["model"]["refine_code_noise"] == 0.25 == cfg["run"]["strategies"]["refine_code_noise"]
    )
    assert (
        cfg["model"]["scheduled_sampling"] == 0.25 == cfg["run"]["strategies"]["scheduled_sampling"]
    )
    assert cfg["model"]["mask_positions"] == "target" == cfg["run"]["strategies"]["mask_positions"]
    assert cfg["model"]["mask_cell_image"] is True is cfg["run"]["strategies"]["mask_cell_image"]
    assert cfg["model"]["refine_full_res"] is True is cfg["run"]["strategies"]["refine_full_res"]
    assert cfg["model"]["encoder"]["stage_blocks"] == 1
    assert cfg["run"]["strategies"]["encoder_stage_blocks"] == 1
    r = runner.invoke(
        app,
        ["evaluate", "--model", str(run), "--data", str(synth_data), "--json", "--device", "cpu"],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    summary = json.loads(r.stdout)
    assert set(summary["parts"]) == {"tokens", "refined", "dense"}
    # the reported Dice is the refined mask's
    assert summary["dice"] == pytest.approx(summary["parts"]["refined"]["dice"])

    from mrisegcli.workflow.segmenter import load_segmenter

    seg = load_segmenter(run, torch.device("cpu"))
    assert seg.model.cell_proj is not None and seg.model.config.mask_positions == "target"
    assert seg.model.encoder.config.stage_blocks == 1
    images = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    pred = seg.predict(images, ["left lung opacity", "right lung opacity"], parts=True)
    torch.testing.assert_close(pred.prob, pred.parts["refined"])
    assert not torch.allclose(pred.parts["tokens"], pred.parts["refined"])


def test_refine_code_noise_replaces_the_codes_the_refiner_reads_in_training_only(
    one_thread, monkeypatch
) -> None:
    torch.manual_seed(0)
    seen: list[torch.Tensor] = []
    model = NextTokenSegmenter(_cfg(refine_code_noise=0.5, mask_codebook_size=512))
    original = model.refiner.forward

    def spy(codes, *args):
        seen.append(codes.clone())
        return original(codes, *args)

    monkeypatch.setattr(model.refiner, "forward", spy)
    b = _batch(B=8)
    model(b)
    out = model(b)
    predicted = out["logits"].argmax(-1).view(8, 4, 4)
    changed = (seen[-1] != predicted).float().mean()
    assert 0.3 < changed < 0.7  # about half replaced (a random code rarely equals the argmax)
    with pytest.raises(ConfigError, match="refine_code_noise"):
        _cfg(refine_code_noise=1.0)
    model.eval()
    seen.clear()
    model(b)
    assert torch.equal(seen[-1], model(b)["logits"].argmax(-1).view(8, 4, 4))  # off in eval mode


def test_cxr_preset_trains_with_the_levers_measured_on_chest_radiographs() -> None:
    """docs/benchmarks.md: the refiner, target-cell queries with the cell's image token,
    scheduled sampling and the encoder's stage blocks, measured on cxr-infection and JSRT; the
    shipped model was trained with the preset's levers, and its script overrides none of them."""
    import json

    from mrisegcli.config import run_preset
    from mrisegcli.shipped import SHIPPED_DIR

    s = run_preset("cxr").strategies
    assert (s.lambda_refine, s.mask_positions, s.mask_cell_image, s.scheduled_sampling) == (
        1.0,
        "target",
        True,
        0.5,
    )
    assert s.image_input == "pixels"  # the refiner and the cell image input need it
    assert s.encoder_stage_blocks == 1
    shipped = json.loads((SHIPPED_DIR / "chest-xray" / "config.json").read_text())
    for field in (
        "lambda_refine",
        "mask_positions",
        "mask_cell_image",
        "scheduled_sampling",
        "encoder_stage_blocks",
    ):
        assert shipped["run"]["strategies"][field] == getattr(s, field), field
    script = (Path(__file__).resolve().parents[1] / "examples" / "train_cxr_model.sh").read_text()
    assert "--preset cxr" in script
    assert "--encoder-stage-blocks" not in script  # the preset's, as measured
    assert not any(flag in script for flag in ("--lambda-refine", "--mask-positions", "--sched"))
    # the script trains what ships: every option of the shipped run's command is in it
    options = [w for w in shipped["command"].split() if w.startswith("--")]
    assert {"--preset", "--cpu-bf16", "--nktp-k", "--max-minutes"} <= set(options)
    assert all(o in script for o in options), options
    # trained with three drafting heads, then refitted to five (`mriseg draft-heads`)
    assert "--nktp-k 4" in script and shipped["draft_heads"]["k_before"] == 4
    heads = shipped["draft_heads"]["k"]
    assert shipped["run"]["strategies"]["nktp_k"] == shipped["model"]["nktp_k"] == heads == 6
    assert "mriseg draft-heads" in script and f"--heads {heads}" in script
