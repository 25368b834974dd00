"""Transformer blocks: 2-D RoPE, masks, static KV cache, presets."""

from __future__ import annotations

import pytest
import torch

from mrisegcli.errors import ConfigError
from mrisegcli.models.presets import PRESETS, count_params, get_preset, list_presets
from mrisegcli.models.transformer import (
    Transformer,
    TransformerConfig,
    apply_rope,
    block_causal_mask,
    causal_mask,
    rope_angles,
    rope_rotation,
    with_key_padding,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw) -> TransformerConfig:
    base = dict(dim=32, n_layers=2, n_heads=2, mlp_hidden=48, max_seq_len=64)
    base.update(kw)
    return TransformerConfig(**base)


# ----------------------------------------------------------------------------- RoPE


def _rotate(x_BTHD, pos, base):
    return apply_rope(x_BTHD, rope_rotation(pos, x_BTHD.shape[-1], base))


def _scores(q, k, pos_q, pos_k, base=100.0):
    qr = _rotate(q, pos_q, base).transpose(1, 2)  # (1, H, Tq, D)
    kr = _rotate(k, pos_k, base).transpose(1, 2)
    return qr @ kr.transpose(-1, -2)  # (1, H, Tq, Tk)


def test_rope_2d_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 2, 16, generator=g)  # (B, T, H, D)
    k = torch.randn(1, 7, 2, 16, generator=g)
    pq = torch.randint(0, 10, (5, 2), generator=g).float()
    pk = torch.randint(0, 10, (7, 2), generator=g).float()
    shift = torch.tensor([3.0, -2.5])
    s0 = _scores(q, k, pq, pk)
    s1 = _scores(q, k, pq + shift, pk + shift)
    torch.testing.assert_close(s0, s1, atol=1e-4, rtol=1e-4)
    # a shift of the keys only changes the scores (positions matter at all)
    assert not torch.allclose(s0, _scores(q, k, pq, pk + shift), atol=1e-3)


def test_rope_rows_rotate_first_half_cols_second_half():
    x = torch.randn(1, 4, 1, 16)
    pos = torch.randint(0, 8, (4, 2)).float()
    base = _rotate(x, pos, 100.0)
    row_moved = _rotate(x, pos + torch.tensor([5.0, 0.0]), 100.0)
    col_moved = _rotate(x, pos + torch.tensor([0.0, 5.0]), 100.0)
    torch.testing.assert_close(row_moved[..., 8:], base[..., 8:])  # column half untouched
    assert not torch.allclose(row_moved[..., :8], base[..., :8])
    torch.testing.assert_close(col_moved[..., :8], base[..., :8])  # row half untouched
    assert not torch.allclose(col_moved[..., 8:], base[..., 8:])


def test_rope_identity_at_origin_and_norm_preserving():
    x = torch.randn(2, 6, 3, 8)
    zero = torch.zeros(6, 2)
    torch.testing.assert_close(_rotate(x, zero, 1e4), x)
    pos = torch.rand(6, 2) * 50
    y = _rotate(x, pos, 1e4)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_rope_batched_positions_match_shared():
    x = torch.randn(2, 5, 2, 8)
    pos = torch.rand(5, 2) * 9
    torch.testing.assert_close(_rotate(x, pos, 1e4), _rotate(x, pos.expand(2, 5, 2), 1e4))


def test_rope_is_the_pairwise_rotation_in_eager_and_compiled_form(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 2, 3, 8, generator=g)  # (B, T, q/k, H, D): middle dims share the rotation
    pos = torch.rand(2, 5, 2, generator=g) * 7
    ang = rope_angles(pos, 8, 100.0)  # (B, T, 4)
    cos, sin = ang.cos()[:, :, None, None], ang.sin()[:, :, None, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)
    rot = rope_rotation(pos, 8, 100.0)
    assert rot.shape == (2, 5, 4, 2)
    eager = apply_rope(x, rot)  # one complex product
    torch.testing.assert_close(eager, expected, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the real-arithmetic form
    torch.testing.assert_close(apply_rope(x, rot), expected, atol=1e-6, rtol=1e-6)
    half = apply_rope(x.to(torch.bfloat16), rot)  # computed in float32, returned in x's dtype
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=0.05, rtol=0.02)


# ----------------------------------------------------------------------------- masks


def test_block_causal_mask_hand_made():
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(block_causal_mask([1, 2, 3]), expected)
    assert torch.equal(causal_mask(4), torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(block_causal_mask([1, 1, 1, 1]), causal_mask(4))


def test_causal_forward_ignores_future_and_masked_keys():
    torch.manual_seed(0)
    model = Transformer(_cfg()).eval()
    x = torch.randn(2, 10, 32)
    pos = torch.stack([torch.arange(10), torch.arange(10)], -1)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 3:5] = False
    mask = with_key_padding(causal_mask(10), valid)
    y = model(x, pos, mask)
    x2 = x.clone()
    x2[:, 7:] += torch.randn(2, 3, 32)  # future tokens
    x2[:, 3:5] += torch.randn(2, 2, 32)  # masked keys of sample 0, valid ones of sample 1
    y2 = model(x2, pos, mask)
    keep = [0, 1, 2, 5, 6]
    torch.testing.assert_close(y[0, keep], y2[0, keep])
    torch.testing.assert_close(y[1, :3], y2[1, :3])
    assert not torch.allclose(y[1, 3:7], y2[1, 3:7])  # sample 1 does read positions 3, 4


def test_attn_mask_must_be_boolean():
    model = Transformer(_cfg())
    with pytest.raises(TypeError):
        model(torch.randn(1, 3, 32), torch.zeros(3, 2), torch.ones(3, 3))


# ----------------------------------------------------------------------------- KV cache


def test_cached_forward_matches_full_and_keeps_buffers():
    torch.manual_seed(0)
    model = Transformer(_cfg()).eval()
    B, T, S = 2, 9, 12
    x = torch.randn(B, T, 32)
    pos = torch.randint(0, 6, (T, 2))
    full = model(x, pos, causal_mask(T))
    model.setup_caches(B, S, torch.float32)
    ptrs = [
        (layer.attn.kv_cache.k_BHSD.data_ptr(), layer.attn.kv_cache.v_BHSD.data_ptr())
        for layer in model.layers
    ]
    slots = torch.arange(S)
    P = 5
    outs = [model.forward_cached(x[:, :P], pos[:P], slots[:P], causal_mask(P, S))]
    for t in range(P, T):
        step_mask = (slots <= t)[None, :]  # (1, S)
        outs.append(
            model.forward_cached(x[:, t : t + 1], pos[t : t + 1], slots[t : t + 1], step_mask)
        )
    cached = torch.cat(outs, 1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    after = [
        (layer.attn.kv_cache.k_BHSD.data_ptr(), layer.attn.kv_cache.v_BHSD.data_ptr())
        for layer in model.layers
    ]
    assert after == ptrs


def _poison_unwritten(model: Transformer, first_free: int) -> None:
    """NaN in every cache slot from ``first_free`` on: a pass that reads such a slot turns NaN."""
    for layer in model.layers:
        layer.attn.kv_cache.k_BHSD[:, :, first_free:] = float("nan")
        layer.attn.kv_cache.v_BHSD[:, :, first_free:] = float("nan")


def test_sliced_cache_attention_equals_full_cache_and_skips_unwritten_slots():
    torch.manual_seed(1)
    model = Transformer(_cfg()).eval()
    B, T, S, P = 3, 10, 16, 4
    x = torch.randn(B, T, 32)
    pos = torch.randint(0, 6, (T, 2))
    valid_BS = torch.ones(B, S, dtype=torch.bool)
    valid_BS[1, 1:3] = False  # padded keys of sequence 1
    slots = torch.arange(S)
    runs = {}
    for name in ("full", "sliced"):
        model.setup_caches(B, S, torch.float32)
        if name == "sliced":
            _poison_unwritten(model, P)
        width = S if name == "full" else P
        prefill_mask = with_key_padding(
            causal_mask(P, width), valid_BS[:, :width]
        )  # (B, 1, P, width)
        outs = [model.forward_cached(x[:, :P], pos[:P], slots[:P], prefill_mask)]
        for t in range(P, T):
            n_keys = S if name == "full" else t + 1  # the whole buffer or the filled prefix
            step_mask = with_key_padding(
                (slots[:n_keys] <= t)[None, :], valid_BS[:, :n_keys]
            )  # (B, 1, 1, n)
            outs.append(
                model.forward_cached(x[:, t : t + 1], pos[t : t + 1], slots[t : t + 1], step_mask)
            )
        runs[name] = torch.cat(outs, 1)
    assert torch.isfinite(runs["sliced"]).all()  # no NaN slot beyond the filled prefix was read
    torch.testing.assert_close(runs["sliced"], runs["full"], atol=1e-6, rtol=1e-6)
    reference = model(x, pos, with_key_padding(causal_mask(T), valid_BS[:, :T]))
    torch.testing.assert_close(runs["sliced"], reference, atol=1e-5, rtol=1e-5)


def test_cache_bookkeeping_reuse_validity_and_repeat():
    model = Transformer(_cfg()).eval()
    keys = set(model.state_dict())
    model.ensure_caches(4, 20)
    kv = model.layers[0].attn.kv_cache
    assert kv.k_BHSD.shape == (4, 2, 20, 16) and model.key_valid_BS.shape == (4, 20)
    model.ensure_caches(2, 12)  # fits: same buffers
    assert model.layers[0].attn.kv_cache is kv
    model.ensure_caches(5, 20)  # more rows: new buffers
    assert model.layers[0].attn.kv_cache is not kv and model.max_batch == 5
    model.ensure_caches(5, 20, dtype=torch.float64)
    assert model.layers[0].attn.kv_cache.k_BHSD.dtype == torch.float64
    assert set(model.state_dict()) == keys  # caches and key validity are never saved

    model.setup_caches(6, 8, torch.float32)
    valid = torch.tensor([[True, False, True], [True, True, False]])
    model.start_sequences(valid)
    assert model.key_padding(2, 8).shape == (2, 1, 1, 8)
    assert model.key_padding(2, 8)[:, 0, 0].tolist() == [
        [True, False, True] + [True] * 5,
        [True, True, False] + [True] * 5,
    ]
    for layer in model.layers:
        layer.attn.kv_cache.k_BHSD[:2] = (
            torch.arange(2.0)[:, None, None, None] + 1
        )  # row b holds b + 1
    model.repeat_rows(2, 3, n_slots=5)
    k = model.layers[1].attn.kv_cache.k_BHSD
    assert k[:6, :, :5, 0].amax((1, 2)).tolist() == [1, 1, 1, 2, 2, 2]
    assert (
        model.key_padding(6, 3)[:, 0, 0].tolist()
        == [valid[0].tolist()] * 3 + [valid[1].tolist()] * 3
    )
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.repeat_rows(2, 4, n_slots=5)  # 8 rows > 6
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.start_sequences(torch.ones(7, 3, dtype=torch.bool))
    model.clear_caches()
    assert (
        model.max_len == 0 and model.layers[0].attn.kv_cache is None and model.key_valid_BS is None
    )


def test_cache_errors():
    model = Transformer(_cfg())
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.forward_cached(
            torch.randn(1, 1, 32),
            torch.zeros(1, 2),
            torch.zeros(1, dtype=torch.long),
            torch.ones(1, 1, dtype=torch.bool),
        )
    with pytest.raises(ConfigError):
        model.setup_caches(1, 65, torch.float32)
    model.setup_caches(1, 8, torch.float32)
    with pytest.raises(ValueError, match="cache slots"):  # a mask wider than the cache
        model.forward_cached(
            torch.randn(1, 1, 32),
            torch.zeros(1, 2),
            torch.zeros(1, dtype=torch.long),
            torch.ones(1, 9, dtype=torch.bool),
        )


def test_config_validation():
    with pytest.raises(ConfigError):
        TransformerConfig(dim=30, n_heads=4)
    with pytest.raises(ConfigError):
        TransformerConfig(dim=24, n_heads=4)  # head_dim 6 is not a multiple of 4
    with pytest.raises(ConfigError):
        TransformerConfig(dropout=1.0)


# ----------------------------------------------------------------------------- presets


def test_presets_registry():
    assert list(PRESETS) == ["cpu", "tiny", "small", "base"]
    tiny = get_preset("tiny")
    assert isinstance(tiny, TransformerConfig) and 192 <= tiny.dim <= 256 and tiny.n_layers <= 6
    with pytest.raises(ConfigError, match="tiny"):
        get_preset("huge")
    infos = list_presets()
    assert [i.name for i in infos] == list(PRESETS)
    assert infos[0].params < infos[1].params < infos[2].params < infos[3].params


def test_preset_param_count_matches_real_model():
    from mrisegcli.models.next_token import NextTokenConfig, NextTokenSegmenter

    model = NextTokenSegmenter(NextTokenConfig(transformer=get_preset("tiny")))
    assert count_params(get_preset("tiny")) == sum(p.numel() for p in model.parameters())
