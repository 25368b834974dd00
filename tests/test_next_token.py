"""Next-token segmenter: layout, cached decoding vs full forward, padding, overfitting."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from mrisegcli.decode.next_token import MaskGenerator, generate_masks, generate_masks_uncached
from mrisegcli.decode.sampling import logits_to_probs, sample
from mrisegcli.errors import ConfigError
from mrisegcli.models.image_encoder import ImageEncoderConfig
from mrisegcli.models.next_token import (
    NextTokenConfig,
    NextTokenSegmenter,
    SequenceLayout,
    sequence_mask,
    sequence_positions,
)
from mrisegcli.models.transformer import TransformerConfig, causal_mask

GI, GM, KI, KM, VT, L = 4, 4, 16, 8, 20, 6


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw) -> NextTokenConfig:
    base = dict(
        transformer=TransformerConfig(dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=64),
        image_codebook_size=KI,
        image_grid=GI,
        text_vocab_size=VT,
        text_len=L,
        mask_codebook_size=KM,
        mask_grid=GM,
    )
    base.update(kw)
    if base.get("image_input") == "pixels":  # a small conv encoder, one token per patch
        base.setdefault(
            "encoder",
            ImageEncoderConfig(
                patch=base["image_size"] // base["image_grid"],
                channels=(8, 16),
                res_blocks=1,
                out_dim=16,
            ),
        )
    return NextTokenConfig(**base)


def _model(seed: int = 0, **kw) -> NextTokenSegmenter:
    torch.manual_seed(seed)
    return NextTokenSegmenter(_cfg(**kw)).eval()


def _inputs(B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, KI, (B, GI, GI), generator=g)
    text = torch.randint(0, VT, (B, L), generator=g)
    lengths = torch.tensor([3, 6, 2, 5, 4][:B])
    tmask = torch.arange(L)[None, :] < lengths[:, None]
    codes = torch.randint(0, KM, (B, GM, GM), generator=g)
    return image, text, tmask, codes


# ----------------------------------------------------------------------------- layout


def test_layout_offsets_and_lengths():
    lay = SequenceLayout.from_config(_cfg())
    assert (lay.image_offset, lay.text_offset, lay.mask_offset) == (3, 3 + KI, 3 + KI + VT)
    assert lay.vocab_size == 3 + KI + VT + KM
    assert lay.prefix_len == GI * GI + L + 3
    assert lay.input_len == lay.prefix_len + GM * GM - 1
    pix = SequenceLayout.from_config(_cfg(image_input="pixels", image_size=16))
    assert pix.text_offset == 3 and pix.vocab_size == 3 + VT + KM  # no image-code rows


def test_positions_mask_shares_image_grid():
    cfg = _cfg()
    pos = sequence_positions(cfg)
    lay = SequenceLayout.from_config(cfg)
    assert pos.shape == (lay.input_len, 2)
    img = pos[1 : 1 + GI * GI]
    msk = pos[lay.prefix_len :]  # mask tokens 0 .. Nm-2
    torch.testing.assert_close(msk, img[: GM * GM - 1])
    assert pos[0].tolist() == [-1.0, -1.0]
    diag = pos[1 + GI * GI : lay.prefix_len]  # BOT, text, BOM on the diagonal beyond the image
    assert torch.equal(diag[:, 0], diag[:, 1]) and diag[0, 0] == GI
    assert torch.equal(diag[:, 0], torch.arange(GI, GI + L + 2).float())
    # a coarser mask grid maps to cell centres of the image grid
    coarse = sequence_positions(_cfg(mask_grid=2))
    assert coarse[-3:].tolist() == [[0.5, 0.5], [0.5, 2.5], [2.5, 0.5]]


def test_target_positions_put_each_query_on_the_cell_it_predicts():
    fed, target = sequence_positions(_cfg()), sequence_positions(_cfg(mask_positions="target"))
    lay = SequenceLayout.from_config(_cfg())
    P = lay.prefix_len
    img = fed[1 : 1 + GI * GI]
    # the state at input position P - 1 + n predicts mask cell n: BOM cell 0, mask input n
    # (which feeds code n) cell n + 1, so every query lies on the image patch of its target
    torch.testing.assert_close(target[P - 1 :], img[: GM * GM])
    assert torch.equal(target[: P - 1], fed[: P - 1])  # BOS, image, BOT and text unchanged
    assert fed[P - 1].tolist() == [GI + L + 1] * 2 and torch.equal(fed[P:], img[: GM * GM - 1])
    with pytest.raises(ConfigError, match="mask_positions"):
        _cfg(mask_positions="next")
    # the two layouts are different models: the first mask logits already differ
    image, text, tmask, codes = _inputs()
    with torch.no_grad():
        a = _model(mask_positions="fed").mask_logits(image, text, tmask, codes.flatten(1)[:, :-1])
        b = _model(mask_positions="target").mask_logits(
            image, text, tmask, codes.flatten(1)[:, :-1]
        )
    assert not torch.allclose(a, b, atol=1e-4)


def test_cell_image_input_reaches_every_decoding_path():
    """With ``mask_cell_image`` each fed code carries its target cell's image token: the
    teacher-forced logits of cell n move when only the image under cell n changes, and the
    cached, uncached, fixed-shape and speculative decoders agree."""
    from mrisegcli.decode.next_token import generate_masks_speculative

    model = _model(mask_cell_image=True, mask_positions="target", nktp_k=3)
    image, text, tmask, codes = _inputs()
    with torch.no_grad():
        cells = model._cell_inputs(model._embed_prefix(image, text, tmask)[0])
    assert cells.shape == (3, GM * GM, 32)
    greedy = generate_masks(model, image, text, tmask)
    assert torch.equal(greedy, generate_masks_uncached(model, image, text, tmask))
    assert torch.equal(greedy, MaskGenerator(model, fixed_shapes=True)(image, text, tmask))
    assert torch.equal(greedy, generate_masks_speculative(model, image, text, tmask))
    # a smaller batch after a larger one reuses the buffer's first rows
    assert torch.equal(generate_masks(model, image[:1], text[:1], tmask[:1]), greedy[:1])
    with pytest.raises(ConfigError, match="mask_cell_image"):
        _cfg(mask_cell_image=True, mask_grid=2)
    assert _model().cell_proj is None  # off by default: old configs load as they were


def test_config_round_trip_and_validation():
    cfg = _cfg(nktp_k=2, het_alpha=0.0)
    from mrisegcli.config import from_dict, to_dict
    from mrisegcli.errors import ConfigError

    assert from_dict(NextTokenConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg

    with pytest.raises(ConfigError):
        _cfg(image_input="voxels")
    with pytest.raises(ConfigError):
        from_dict(NextTokenConfig, {**to_dict(cfg), "bogus": 1})
    with pytest.raises(ConfigError, match="max_seq_len"):
        NextTokenSegmenter(_cfg(text_len=40))


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "positions,cells", [("fed", False), ("target", False), ("target", True), ("fed", True)]
)
@pytest.mark.parametrize("prefix", ["causal", "bidirectional"])
@pytest.mark.parametrize("keys", ["whole_cache", "filled_prefix"])
def test_cached_logits_match_full_forward(keys, prefix, positions, cells):
    model = _model(prefix_attention=prefix, mask_positions=positions, mask_cell_image=cells)
    image, text, tmask, codes = _inputs()
    codes_BN = codes.flatten(1)
    P = model.layout.prefix_len
    with torch.no_grad():
        full = model.mask_logits(image, text, tmask, codes_BN[:, :-1])  # (B, Nm, Km)
        model.setup_caches(4)
        steps = [model.prefill(image, text, tmask)]
        if keys == "filled_prefix":  # slots not yet written hold NaN: reading one would show
            for layer in model.transformer.layers:
                layer.attn.kv_cache.k_BHSD[:, :, P:] = float("nan")
                layer.attn.kv_cache.v_BHSD[:, :, P:] = float("nan")
        for n in range(1, GM * GM):
            pos = torch.tensor([P + n - 1])
            n_keys = P + n if keys == "filled_prefix" else None
            steps.append(model.decode_step(codes_BN[:, n - 1], pos, n_keys))
    cached = torch.stack(steps, 1)
    assert cached.shape == full.shape == (3, GM * GM, KM)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_prefix_lm_mask_opens_only_the_prefix():
    m = sequence_mask(6, 3, bidirectional=True)
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)
    assert torch.equal(sequence_mask(6, 3, bidirectional=False), causal_mask(6))
    # in a prefix LM the image tokens read the text: the first mask token's logits then depend
    # on the text through the image states too, so the two modes give different models
    image, text, tmask, codes = _inputs()
    with torch.no_grad():
        a = _model(prefix_attention="causal").mask_logits(
            image, text, tmask, codes.flatten(1)[:, :-1]
        )
        b = _model(prefix_attention="bidirectional").mask_logits(
            image, text, tmask, codes.flatten(1)[:, :-1]
        )
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ConfigError):
        _cfg(prefix_attention="full")


def test_fixed_shape_decoding_gives_the_same_codes():
    model = _model()
    image, text, tmask, _ = _inputs()
    kw = dict(temperature=1.0, top_k=4)
    a = MaskGenerator(model)(image, text, tmask, generator=torch.Generator().manual_seed(2), **kw)
    b = MaskGenerator(model, fixed_shapes=True)(
        image, text, tmask, generator=torch.Generator().manual_seed(2), **kw
    )
    assert torch.equal(a, b)
    with pytest.raises(TypeError):  # sampling options are checked by name
        generate_masks_uncached(model, image, text, tmask, temprature=1.0)


def test_greedy_cached_equals_uncached():
    model = _model()
    image, text, tmask, _ = _inputs()
    a = generate_masks(model, image, text, tmask)
    b = generate_masks_uncached(model, image, text, tmask)
    assert a.shape == (3, GM, GM) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < KM


def test_sampled_cached_equals_uncached_with_same_generator():
    model = _model()
    image, text, tmask, _ = _inputs()
    kw = dict(temperature=1.0, top_k=4)
    a = generate_masks(model, image, text, tmask, generator=torch.Generator().manual_seed(5), **kw)
    b = generate_masks_uncached(
        model, image, text, tmask, generator=torch.Generator().manual_seed(5), **kw
    )
    assert torch.equal(a, b)


def test_batch_with_padding_equals_each_alone():
    model = _model()
    image, text, tmask, _ = _inputs(B=3)
    batched = generate_masks(model, image, text, tmask)
    with torch.no_grad():
        logits_b = model.mask_logits(image, text, tmask, batched.flatten(1)[:, :-1])
    for i in range(3):
        alone = generate_masks(model, image[i : i + 1], text[i : i + 1], tmask[i : i + 1])
        assert torch.equal(alone, batched[i : i + 1])
        # an unpadded (shorter) text tensor is padded inside the model to the same result
        n = int(tmask[i].sum())
        with torch.no_grad():
            short = model.mask_logits(
                image[i : i + 1],
                text[i : i + 1, :n],
                tmask[i : i + 1, :n],
                batched[i : i + 1].flatten(1)[:, :-1],
            )
        torch.testing.assert_close(short, logits_b[i : i + 1], atol=1e-5, rtol=1e-5)


def test_padded_text_positions_are_invisible():
    model = _model()
    image, text, tmask, codes = _inputs()
    other = torch.where(tmask, text, (text + 7) % VT)  # change only padded ids
    assert not torch.equal(other, text)
    prev = codes.flatten(1)[:, :-1]
    with torch.no_grad():
        a = model.mask_logits(image, text, tmask, prev)
        b = model.mask_logits(image, other, tmask, prev)
        c = model.mask_logits(image, (text + 7) % VT, tmask, prev)  # real words changed too
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a, c, atol=1e-4)
    assert torch.equal(
        generate_masks(model, image, text, tmask), generate_masks(model, image, other, tmask)
    )


def test_kv_cache_not_reallocated():
    model = _model()
    image, text, tmask, _ = _inputs()
    model.setup_caches(3)

    def ptrs():
        return [
            (layer.attn.kv_cache.k_BHSD.data_ptr(), layer.attn.kv_cache.v_BHSD.data_ptr())
            for layer in model.transformer.layers
        ] + [model.transformer.key_valid_BS.data_ptr()]

    before = ptrs()
    gen = MaskGenerator(model)
    gen(image, text, tmask)
    gen(image[:2], text[:2], tmask[:2])  # smaller batch reuses the same buffers
    assert ptrs() == before
    with torch.no_grad():
        model.prefill(image, text, tmask)
        seen = []
        tok = torch.zeros(3, dtype=torch.long)
        for n in range(1, 4):
            model.decode_step(tok, torch.tensor([model.layout.prefix_len + n - 1]))
            seen.append(ptrs())
    assert all(p == before for p in seen)
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.prefill(*_inputs(B=5)[:3])


def test_pixels_mode_cached_matches_full():
    model = _model(image_input="pixels", image_size=16)
    _, text, tmask, codes = _inputs()
    pixels = torch.rand(3, 1, 16, 16)
    batch = dict(
        image=pixels, text_ids=text, text_mask=tmask, mask_codes=codes, sample_ids=torch.arange(3)
    )
    model.train()
    out = model(batch)
    out["loss"].backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0  # trained end to end
    model.eval()
    assert torch.equal(
        generate_masks(model, pixels, text, tmask),
        generate_masks_uncached(model, pixels, text, tmask),
    )
    with pytest.raises(ValueError):
        model.prefill(torch.rand(3, 1, 8, 8), text, tmask)


def test_sampling_functions():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits).tolist() == [1]
    p = logits_to_probs(logits, temperature=1.0, top_k=2)
    assert p[0, 0] == 0 and p[0, 2] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    g = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(4000, 4), temperature=1.0, top_k=2, generator=g)
    assert set(draws.tolist()) <= {1, 3}
    frac = (draws == 1).float().mean().item()
    expected = torch.e / (torch.e + 1)  # softmax of (3, 2)
    assert abs(frac - expected) < 0.03
    with pytest.raises(ValueError):
        logits_to_probs(logits, temperature=0.0)


# ----------------------------------------------------------------------------- training


def test_tiny_model_overfits_a_few_sequences():
    cfg = _cfg(
        transformer=TransformerConfig(dim=64, n_layers=2, n_heads=4, mlp_hidden=128, max_seq_len=64)
    )
    torch.manual_seed(0)
    model = NextTokenSegmenter(cfg)
    image, text, tmask, codes = _inputs(B=4, seed=3)
    batch = dict(
        image_codes=image,
        text_ids=text,
        text_mask=tmask,
        mask_codes=codes,
        sample_ids=torch.arange(4),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else float(out["ce_plain"].detach())
    model.eval()
    with torch.no_grad():
        final = float(model(batch)["ce_plain"])
    assert first > 1.5  # ~ln(8) at start
    assert final < 0.05 * first
    decoded = generate_masks(model, image, text, tmask)
    assert (decoded == codes).float().mean() > 0.95


def test_config_switches_build_only_what_is_used():
    model = _model(nktp_k=1, lambda_tcl=0.0, het_alpha=0.0)
    assert model.nktp is None and model.tcl is None and model.het_memory is None
    full = _model()
    assert full.nktp is not None and full.tcl is not None and full.het_memory is not None
    assert "het_memory.scores" in full.state_dict() and "tcl.code_counts" in full.state_dict()
    assert not any(k.startswith("transformer.layers.0.attn.kv_cache") for k in full.state_dict())
    assert dataclasses.asdict(full.config)["transformer"]["dim"] == 32


def _batch_with_mask(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A training batch of :func:`_inputs` (three rows) with the pixel ``mask`` (3, S, S)."""
    image, text, tmask, codes = _inputs()
    return {
        "image_codes": image,
        "text_ids": text,
        "text_mask": tmask,
        "mask_codes": codes,
        "sample_ids": torch.arange(3),
        "mask": mask,
    }


def test_dense_prefix_loss_is_switchable_and_trains_the_image_states():
    with pytest.raises(ConfigError):  # image tokens must read the text
        _cfg(lambda_dense=1.0, image_size=8)
    model = _model(lambda_dense=1.0, prefix_attention="bidirectional", image_size=8).train()
    assert model.dense is not None and _model().dense is None
    batch = _batch_with_mask((torch.rand(3, 8, 8) > 0.5).to(torch.uint8))
    out = model(batch)
    assert out["dense"] > 0
    off = _model(prefix_attention="bidirectional", image_size=8).train()(batch)
    torch.testing.assert_close(out["loss"] - out["dense"], off["loss"], atol=1e-5, rtol=1e-5)
    out["loss"].backward()
    assert model.dense.proj.weight.grad.abs().sum() > 0
    with pytest.raises(KeyError):
        model({k: v for k, v in batch.items() if k != "mask"})


def test_presence_probe_learns_from_the_prefix_states_and_leaves_the_rest_unchanged():
    model = _model(lambda_presence=0.5, prefix_attention="bidirectional").train()
    assert model.presence_probe is not None and _model().presence_probe is None
    assert not any(k.startswith("presence_probe") for k in _model().state_dict())
    mask = torch.zeros(3, 8, 8, dtype=torch.uint8)
    mask[0, 2:4, 2:4] = 1  # row 0 has a region, rows 1 and 2 are empty
    batch = _batch_with_mask(mask)
    image, text, tmask, codes = (
        batch[k] for k in ("image_codes", "text_ids", "text_mask", "mask_codes")
    )
    out = model(batch)
    # the same weights without the probe give the same other terms: the probe is built last
    off = _model(prefix_attention="bidirectional").train()(batch)
    torch.testing.assert_close(
        out["loss"] - 0.5 * out["presence"], off["loss"], atol=1e-5, rtol=1e-5
    )
    # the loss is the BCE of the probe's logits against "the mask is not empty"
    lay = model.layout
    h = model.teacher_forced_states(image, text, tmask, codes.flatten(1)[:, :0])
    logits = model.presence_probe(h[:, 1 : 1 + lay.n_image], h[:, lay.prefix_len - 1])
    expected = F.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(out["presence"], expected, atol=1e-5, rtol=1e-5)
    # its gradient reaches the transformer (the states learn), not only the probe
    model.zero_grad()
    out["presence"].backward()
    assert model.presence_probe.proj.weight.grad.abs().sum() > 0
    assert model.transformer.layers[0].attn.wqkv.weight.grad.abs().sum() > 0
    with pytest.raises(KeyError):
        model({k: v for k, v in batch.items() if k != "mask"})
    with pytest.raises(ConfigError):
        _cfg(lambda_presence=-1.0)


def test_input_noise_corrupts_teacher_inputs_only_in_training():
    with pytest.raises(ConfigError):
        _cfg(input_noise=1.0)
    model = _model(input_noise=0.5, het_alpha=0.0)
    image, text, tmask, codes = _inputs()
    batch = {"image_codes": image, "text_ids": text, "text_mask": tmask, "mask_codes": codes}
    with torch.no_grad():
        clean = model.mask_logits(image, text, tmask, codes.flatten(1)[:, :-1])
        torch.testing.assert_close(
            model.eval()(batch)["logits"], clean
        )  # eval: teacher inputs as given
        torch.manual_seed(3)
        noisy = model.train()(batch)["logits"]
    assert not torch.allclose(noisy, clean, atol=1e-4)
    # the first mask token is predicted from the prefix alone: no input of it can be corrupted
    torch.testing.assert_close(noisy[:, 0], clean[:, 0], atol=1e-5, rtol=1e-5)
