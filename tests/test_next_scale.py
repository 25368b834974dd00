"""Next-scale segmenter: block-causal mask, KV-cached scale steps, batched sampling, overfitting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mrisegcli.decode.next_scale import generate_scales, generate_scales_uncached, temperatures
from mrisegcli.errors import ConfigError
from mrisegcli.models.image_encoder import ConvImageEncoder, ImageEncoder, ImageEncoderConfig
from mrisegcli.models.next_scale import (
    NextScaleConfig,
    NextScaleSegmenter,
    flatten_scales,
    split_scales,
)
from mrisegcli.models.transformer import TransformerConfig
from mrisegcli.tokenizers.multiscale import MultiScaleConfig, MultiScaleMaskQuantizer

SCALES = (1, 2, 4, 8)
S = 32


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_quantizer(seed: int = 0) -> MultiScaleMaskQuantizer:
    torch.manual_seed(seed)
    cfg = MultiScaleConfig(
        image_size=S,
        downsample=4,
        codebook_size=32,
        code_dim=8,
        channels=(8, 16),
        scales=SCALES,
        n_phi=2,
    )
    return MultiScaleMaskQuantizer(cfg).eval()


def make_config(**kw) -> NextScaleConfig:
    base = dict(
        transformer=TransformerConfig(
            dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=256
        ),
        image_size=S,
        encoder=ImageEncoderConfig(patch=4, channels=(8, 16), res_blocks=1, out_dim=16),
        text_vocab_size=20,
        text_len=6,
        mask_codebook_size=32,
        code_dim=8,
        scales=SCALES,
    )
    base.update(kw)
    return NextScaleConfig(**base)


def make_model(seed: int = 0, **kw) -> tuple[NextScaleSegmenter, MultiScaleMaskQuantizer]:
    q = make_quantizer(seed)
    torch.manual_seed(seed + 1)
    return NextScaleSegmenter(make_config(**kw), q).eval(), q


def make_inputs(B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 1, S, S, generator=g)
    text_ids = torch.randint(0, 20, (B, 5), generator=g)
    text_mask = torch.ones(B, 5, dtype=torch.bool)
    text_mask[1 % B, 2:] = False  # padded prompt
    if B > 2:
        text_mask[2, :] = False  # no text at all: only the image conditions it
    return image, text_ids, text_mask


def test_block_causal_mask_structure():
    model, _ = make_model()
    lay = model.layout
    n_cond = 64 + 6
    assert lay.n_cond == n_cond and lay.seq_len == n_cond + 1 + 4 + 16 + 64
    mask = model.mask_TT
    T = lay.seq_len
    assert mask.shape == (T, T) and mask.dtype == torch.bool
    block = [0] * n_cond  # 0 = condition, k + 1 = scale k
    for k, p in enumerate(SCALES):
        block += [k + 1] * (p * p)
    expected = torch.tensor([[block[j] <= block[i] for j in range(T)] for i in range(T)])
    assert torch.equal(mask, expected)
    # spelled out: condition rows see the whole condition and no scale token
    assert mask[:n_cond, :n_cond].all() and not mask[:n_cond, n_cond:].any()
    for k in range(len(SCALES)):
        a, b = lay.scale_slots(k)
        assert mask[a:b, :b].all()  # condition, earlier scales, own scale (whole block)
        assert not mask[a:b, b:].any()  # nothing later


def test_split_and_flatten_scales_round_trip():
    q = make_quantizer()
    idx = q.encode((torch.rand(3, 1, S, S) > 0.5).float())
    codes = flatten_scales(idx)
    assert codes.shape == (3, sum(p * p for p in SCALES))
    back = split_scales(codes, SCALES)
    assert all(torch.equal(a, b) for a, b in zip(idx, back, strict=True))
    with pytest.raises(ValueError):
        split_scales(codes[:, :-1], SCALES)


def test_presence_reads_the_teacher_forced_states():
    from mrisegcli.paradigms import get_paradigm

    model, _ = make_model()
    image, text_ids, text_mask = make_inputs(3)
    none = image.new_zeros(3, 0, 8)  # no scale inputs: the condition and the start tokens
    with torch.no_grad():
        h_BTC = model.teacher_forced_states(image, text_ids, text_mask, none)
        images_BNC, start_BC = get_paradigm("next-scale").presence_states(
            model, image, text_ids, text_mask
        )
        logits = model.scale_logits(image, text_ids, text_mask, none)
    lay = model.layout
    assert h_BTC.shape == (3, lay.n_cond + 1, 32)
    torch.testing.assert_close(images_BNC, h_BTC[:, : lay.n_image])
    torch.testing.assert_close(start_BC, h_BTC[:, lay.n_cond :].mean(1))
    torch.testing.assert_close(logits, model.head(h_BTC[:, lay.n_cond :]))


def test_config_round_trip_and_quantizer_mismatch():
    cfg = make_config(balance_scales=True)
    import json

    from mrisegcli.config import from_dict, to_dict

    assert from_dict(NextScaleConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ConfigError):
        from_dict(NextScaleConfig, {**to_dict(cfg), "bogus": 1})
    with pytest.raises(ConfigError):
        NextScaleSegmenter(make_config(mask_codebook_size=64), make_quantizer())
    with pytest.raises(ConfigError):
        NextScaleSegmenter(make_config(code_dim=4), make_quantizer())
    with pytest.raises(ConfigError):
        make_config(scales=(2, 1, 8))
    short = TransformerConfig(dim=32, n_layers=1, n_heads=2, mlp_hidden=64, max_seq_len=100)
    with pytest.raises(ConfigError):  # 155 tokens do not fit
        NextScaleSegmenter(make_config(transformer=short), make_quantizer())


def test_quantizer_is_a_reference_not_a_submodule():
    model, q = make_model()
    q_params = {id(p) for p in q.parameters()}
    assert not any(id(p) in q_params for p in model.parameters())
    assert not any(k.startswith(("quantizer", "_quantizer")) for k in model.state_dict())
    assert model.quantizer is q
    model.double()  # .to() and friends move the referenced quantiser along
    assert q.quantizer.embedding.dtype == torch.float64
    assert model.head.weight.dtype == torch.float64


def test_cached_scale_steps_match_full_forward():
    model, q = make_model(seed=3)
    B = 3
    image, text_ids, text_mask = make_inputs(B)
    idx = q.encode((torch.rand(B, 1, S, S) > 0.5).float())
    x_BnCv = q.idx_to_teacher_inputs(idx)
    with torch.no_grad():
        full_BLK = model.scale_logits(image, text_ids, text_mask, x_BnCv)
        model.setup_caches(B)
        steps = [model.prefill(image, text_ids, text_mask)]
        # a scale step reads only the slots up to its own end: NaN in the slots not yet
        # written would otherwise reach the logits
        for layer in model.transformer.layers:
            layer.attn.kv_cache.k_BHSD[:, :, model.layout.prefill_len :] = float("nan")
            layer.attn.kv_cache.v_BHSD[:, :, model.layout.prefill_len :] = float("nan")
        off = 0
        for k in range(1, len(SCALES)):
            n = SCALES[k] ** 2
            steps.append(model.decode_scale(k, x_BnCv[:, off : off + n]))
            off += n
    cached_BLK = torch.cat(steps, 1)
    assert cached_BLK.shape == full_BLK.shape == (B, 85, 32)
    torch.testing.assert_close(cached_BLK, full_BLK, atol=1e-5, rtol=1e-5)
    # padding really is hidden: changing ids under the padded positions changes nothing
    ids2 = text_ids.clone()
    ids2[1, 2:] = (ids2[1, 2:] + 7) % 20
    with torch.no_grad():
        again = model.scale_logits(image, ids2, text_mask, x_BnCv)
    torch.testing.assert_close(again, full_BLK, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("samples", [1, 3])
def test_cached_generation_equals_uncached_greedy(samples):
    model, q = make_model(seed=5)
    image, text_ids, text_mask = make_inputs(3, seed=1)
    got, steps = generate_scales(
        model, q, image, text_ids, text_mask, samples=samples, return_steps=True
    )
    ref, ref_steps = generate_scales_uncached(
        model, q, image, text_ids, text_mask, samples=samples, return_steps=True
    )
    assert [t.shape for t in got] == [(3 * samples, p, p) for p in SCALES]
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    assert len(steps) == len(SCALES) and steps[-1].shape == (3 * samples, 1, S, S)
    for a, b in zip(steps, ref_steps, strict=True):
        torch.testing.assert_close(a, b)
    # the last step is the decoding of all K maps
    torch.testing.assert_close(steps[-1], q.idx_to_logits(got), atol=1e-5, rtol=1e-5)


def test_cached_equals_uncached_when_sampling_with_same_seed():
    model, q = make_model(seed=6)
    image, text_ids, text_mask = make_inputs(2, seed=2)
    kw = dict(samples=2, temperature=1.0, top_k=8)
    got = generate_scales(
        model, q, image, text_ids, text_mask, generator=torch.Generator().manual_seed(9), **kw
    )
    ref = generate_scales_uncached(
        model, q, image, text_ids, text_mask, generator=torch.Generator().manual_seed(9), **kw
    )
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    with pytest.raises(TypeError):  # options are checked by name
        generate_scales_uncached(model, q, image, text_ids, text_mask, temprature=1.0)


def test_samples_expand_batch_and_differ_only_when_sampling():
    model, q = make_model(seed=7)
    B, N = 2, 4
    image, text_ids, text_mask = make_inputs(B, seed=3)
    hot = generate_scales(
        model,
        q,
        image,
        text_ids,
        text_mask,
        samples=N,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    cold = generate_scales(model, q, image, text_ids, text_mask, samples=N, temperature=0.0)
    hot_BN = flatten_scales(hot).view(B, N, -1)
    cold_BN = flatten_scales(cold).view(B, N, -1)
    assert hot_BN.shape == (B, N, 85)
    for b in range(B):
        assert all(torch.equal(cold_BN[b, j], cold_BN[b, 0]) for j in range(N))
        n_distinct = len({tuple(r.tolist()) for r in hot_BN[b]})
        assert n_distinct == N  # 85 tokens from a near-uniform 32-way draw never coincide
    # greedy samples of case b equal a single greedy decode of case b
    single = flatten_scales(generate_scales(model, q, image, text_ids, text_mask))
    assert torch.equal(cold_BN[:, 0], single)
    # a per-scale schedule: greedy on the coarse scales makes the samples share them
    sched = generate_scales(
        model,
        q,
        image,
        text_ids,
        text_mask,
        samples=N,
        temperature=[0, 0, 1, 1],
        generator=torch.Generator().manual_seed(1),
    )
    assert all(torch.equal(sched[k], cold[k]) for k in (0, 1))
    assert not torch.equal(sched[3], cold[3])


def test_temperature_schedule_validation():
    assert temperatures(0.5, 3) == [0.5, 0.5, 0.5]
    assert temperatures([0, 1, 2], 3) == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        temperatures([1.0, 1.0], 3)
    with pytest.raises(ValueError):
        temperatures(-1.0, 3)


def test_forward_loss_and_scale_balancing():
    model, q = make_model(seed=8, balance_scales=True)
    image, text_ids, text_mask = make_inputs(2)
    codes = flatten_scales(q.encode((torch.rand(2, 1, S, S) > 0.5).float()))
    out = model({"image": image, "text_ids": text_ids, "text_mask": text_mask, "ms_codes": codes})
    logits = out["logits"]
    assert logits.shape == (2, 85, 32)
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), codes.flatten(), reduction="none"
    ).view(2, 85)
    per_scale = [c.mean() for c in torch.split(ce, [p * p for p in SCALES], 1)]
    torch.testing.assert_close(out["loss"], torch.stack(per_scale).mean())
    assert not torch.allclose(out["loss"], ce.mean())  # differs from the plain token mean
    torch.testing.assert_close(out["ce_last"], per_scale[-1])
    with pytest.raises(ValueError):
        model(
            {
                "image": image,
                "text_ids": text_ids,
                "text_mask": text_mask,
                "ms_codes": codes[:, :-1],
            }
        )


def test_image_encoder_and_custom_encoder():
    enc = ConvImageEncoder(
        ImageEncoderConfig(patch=8, channels=(8, 16), res_blocks=1, out_dim=24), 64
    )
    assert isinstance(enc, ImageEncoder) and enc.grid == 8
    assert enc(torch.rand(2, 1, 64, 64)).shape == (2, 64, 24)
    with pytest.raises(ValueError):
        enc(torch.rand(2, 1, 32, 32))
    with pytest.raises(ConfigError):
        ImageEncoderConfig(patch=6)

    class Pooled(nn.Module):  # a stand-in for a wrapped pretrained backbone
        out_dim, grid = 12, 4

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(1, 12)

        def forward(self, x):
            x = torch.nn.functional.adaptive_avg_pool2d(x, 4)  # (B, 1, 4, 4)
            return self.proj(x.flatten(2).transpose(1, 2))

    model = NextScaleSegmenter(make_config(), make_quantizer(), encoder=Pooled()).eval()
    assert model.layout.n_image == 16
    image, text_ids, text_mask = make_inputs(2)
    got = generate_scales(model, model.quantizer, image, text_ids, text_mask)
    ref = generate_scales_uncached(model, model.quantizer, image, text_ids, text_mask)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def _toy_cases(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n images with one bright rectangle each; the mask is that rectangle."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 1, S, S)
    for i in range(n):
        r, c = torch.randint(0, S - 12, (2,), generator=g).tolist()
        h, w = torch.randint(6, 12, (2,), generator=g).tolist()
        masks[i, 0, r : r + h, c : c + w] = 1.0
    images = (0.2 + 0.6 * masks + 0.05 * torch.rand(n, 1, S, S, generator=g)).clamp(0, 1)
    text_ids = torch.randint(0, 20, (n, 4), generator=g)
    return images, masks, text_ids, torch.ones(n, 4, dtype=torch.bool)


def _fit_quantizer(q: MultiScaleMaskQuantizer, masks: torch.Tensor, steps: int = 40) -> None:
    """A few steps of the quantiser's own loss, so different masks get different codes."""
    q.train()
    opt = torch.optim.Adam(q.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = q.training_loss(masks).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    q.eval().requires_grad_(False)


def test_tiny_model_overfits_a_few_cases():
    model, q = make_model(seed=11)
    images, masks, text_ids, text_mask = _toy_cases(4)
    _fit_quantizer(q, masks)
    codes = flatten_scales(q.encode(masks))
    assert len(codes.unique()) >= 6
    # every case has its own code sequence, so the model must read its condition
    assert all((codes[i] != codes[j]).sum() >= 10 for i in range(4) for j in range(i))
    batch = {"image": images, "text_ids": text_ids, "text_mask": text_mask, "ms_codes": codes}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(120):
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        first = float(out["loss"].detach()) if first is None else first
    model.eval()
    with torch.no_grad():
        final = model(batch)
    assert float(final["loss"]) < 0.1 * first, (first, float(final["loss"]))
    assert float(final["acc"]) > 0.95
    # greedy decoding from scratch (its own samples fed back) reproduces each case's codes
    got = flatten_scales(generate_scales(model, q, images, text_ids, text_mask))
    assert (got == codes).float().mean(1).min() > 0.9


def test_dense_condition_loss_adds_to_ce_and_leaves_decoding_alone():
    with pytest.raises(ConfigError):
        make_config(lambda_dense=-1.0)
    model, q = make_model(seed=8, lambda_dense=0.5)
    plain, _ = make_model(seed=8)
    assert model.dense is not None and plain.dense is None
    assert "dense.proj.weight" in model.state_dict() and not any(
        k.startswith("dense") for k in plain.state_dict()
    )
    image, text_ids, text_mask = make_inputs(2)
    mask = (torch.rand(2, S, S) > 0.5).to(torch.uint8)
    codes = flatten_scales(q.encode(mask[:, None].float()))
    batch = {
        "image": image,
        "text_ids": text_ids,
        "text_mask": text_mask,
        "ms_codes": codes,
        "mask": mask,
    }
    out, ref = model(batch), plain(batch)
    # same initial weights apart from the head: same CE, plus the weighted dense term
    torch.testing.assert_close(out["ce"], ref["loss"])
    torch.testing.assert_close(out["loss"], ref["loss"] + 0.5 * out["dense"])
    out["loss"].backward()
    assert (
        model.encoder.net[0].weight.grad is not None
        and model.dense.proj.weight.grad.abs().sum() > 0
    )
    a = generate_scales(model, q, image, text_ids, text_mask)
    b = generate_scales(plain, q, image, text_ids, text_mask)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(KeyError):
        model({k: v for k, v in batch.items() if k != "mask"})
