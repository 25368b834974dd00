"""The fast decode paths give what the plain ones give: the eager step that builds nothing per
step, the fused inference block, the mask made once per pass, and speculative sampling, whose
codes must have the distribution of plain sampling (a chi-square test against the exact
distribution, enumerated on a tiny model)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mrisegcli.decode.next_token import (
    MaskGenerator,
    generate_masks_speculative,
    generate_masks_uncached,
)
from mrisegcli.models.next_token import NextTokenConfig, NextTokenSegmenter
from mrisegcli.models.transformer import Transformer, TransformerConfig, attention_bias, causal_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(G: int = 4, K: int = 8, nktp_k: int = 3, seed: int = 0) -> NextTokenSegmenter:
    torch.manual_seed(seed)
    cfg = NextTokenConfig(
        transformer=TransformerConfig(dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=64),
        image_codebook_size=K,
        image_grid=G,
        text_vocab_size=12,
        text_len=3,
        mask_codebook_size=K,
        mask_grid=G,
        nktp_k=nktp_k,
        lambda_tcl=0.0,
        het_alpha=0.0,
    )
    return NextTokenSegmenter(cfg).eval()


def _inputs(model: NextTokenSegmenter, B: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    image = torch.randint(
        0, cfg.image_codebook_size, (B, cfg.image_grid, cfg.image_grid), generator=g
    )
    text = torch.randint(0, cfg.text_vocab_size, (B, cfg.text_len), generator=g)
    tmask = torch.ones(B, cfg.text_len, dtype=torch.bool)
    tmask[0, -1] = False  # a padded text key
    return image, text, tmask


def test_decode_next_equals_decode_step_bit_for_bit():
    model = _model()
    image, text, tmask = _inputs(model, 3)
    P, N = model.layout.prefix_len, model.layout.n_mask
    codes = torch.randint(0, 8, (3, N), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.setup_caches(3)
        model.prefill(image, text, tmask)
        steps = [
            model.decode_step(codes[:, n - 1], torch.tensor([P + n - 1]), P + n)
            for n in range(1, N)
        ]
        model.prefill(image, text, tmask)
        fast = [model.decode_next(codes[:, n - 1], P + n) for n in range(1, N)]
    assert all(torch.equal(a, b) for a, b in zip(steps, fast, strict=True))


def test_block_pass_equals_the_codes_fed_one_at_a_time():
    """decode_block (the verify pass of speculative decoding) reads its causal mask as a slice
    of a table made once: it must give each position the state decode_next gives it."""
    model = _model()
    image, text, tmask = _inputs(model, 3)
    P, N = model.layout.prefix_len, model.layout.n_mask
    codes = torch.randint(0, 8, (3, N), generator=torch.Generator().manual_seed(3))
    tf = model.transformer
    with torch.no_grad():
        model.setup_caches(3)
        model.prefill(image, text, tmask)
        one = torch.stack([model.decode_next(codes[:, t], P + t + 1) for t in range(N - 1)], 1)
        model.prefill(image, text, tmask)
        blocks = []
        for first, T in ((0, 3), (3, 1), (4, 5), (9, N - 10)):  # uneven blocks, as accepted
            h = model.decode_block(codes[:, first : first + T], P + first)
            blocks.append(torch.nn.functional.linear(h, model.mask_head.weight))
        # the additive mask is the boolean one: valid keys up to each query's own slot
        S = P + 6
        want = tf.key_padding(3, S) & (torch.arange(S)[None, :] <= torch.arange(P + 4, S)[:, None])
        assert torch.equal(tf.block_bias(3, P + 4, 2) == 0, want)
    torch.testing.assert_close(torch.cat(blocks, 1), one, rtol=1e-5, atol=1e-5)


def test_greedy_fast_path_equals_uncached_and_fixed_shapes():
    model = _model()
    image, text, tmask = _inputs(model, 3)
    fast = MaskGenerator(model)(image, text, tmask)
    assert torch.equal(fast, MaskGenerator(model, fixed_shapes=True)(image, text, tmask))
    assert torch.equal(fast, generate_masks_uncached(model, image, text, tmask))


def test_fused_mlp_weight_follows_parameter_updates():
    model = _model()
    image, text, tmask = _inputs(model, 2)
    P = model.layout.prefix_len
    tok = torch.tensor([1, 2])

    def step_logits() -> torch.Tensor:
        with torch.no_grad():
            model.setup_caches(2)
            model.prefill(image, text, tmask)
            return model.decode_next(tok, P + 1)

    before = step_logits()
    with torch.no_grad():  # an in-place change, as an optimiser step makes it
        for layer in model.transformer.layers:
            layer.mlp.w1.weight.mul_(-30.0)
        reference = model.mask_logits(image, text, tmask, tok[:, None])[:, -1]
    after = step_logits()
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3)


def test_mask_made_once_per_pass_gives_the_boolean_mask_result():
    torch.manual_seed(0)
    tf = Transformer(
        TransformerConfig(dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=16)
    ).eval()
    x, pos = torch.randn(2, 7, 32), torch.randint(0, 4, (7, 2))
    mask = (
        causal_mask(7)[None, None]
        & torch.tensor([[True] * 7, [True, False] + [True] * 5])[:, None, None]
    )
    bias = attention_bias(mask, torch.float32)
    assert bias.dtype == torch.float32 and set(bias.unique().tolist()) == {0.0, float("-inf")}
    with torch.no_grad():
        h = x
        for layer in tf.layers:  # the boolean mask handed to every layer, as sdpa takes it
            a = layer.attn
            n = layer.attn_norm(h)
            qkv = a.wqkv(n).view(2, 7, 3, a.n_heads, a.head_dim)
            from mrisegcli.models.transformer import apply_rope

            q, k = apply_rope(qkv[:, :, :2], tf.rotation(pos)).permute(2, 0, 3, 1, 4).unbind(0)
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, qkv[:, :, 2].transpose(1, 2), attn_mask=mask
            )
            h = h + a.wo(y.transpose(1, 2).reshape(2, 7, 32))
            h = h + layer.mlp(layer.mlp_norm(h))
        assert torch.equal(tf.norm(h), tf(x, pos, mask))


# ----------------------------------------------------------------------------- speculative sampling


def _exact_distribution(
    model: NextTokenSegmenter, image, text, tmask, temperature: float
) -> torch.Tensor:
    """P(codes) of plain sampling for every one of the K ** N code sequences (one input)."""
    K, N = model.config.mask_codebook_size, model.layout.n_mask
    seqs = torch.tensor(list(itertools.product(range(K), repeat=N)))  # (K^N, N)
    M = seqs.shape[0]
    with torch.no_grad():
        logits = model.mask_logits(
            image.expand(M, -1, -1), text.expand(M, -1), tmask.expand(M, -1), seqs[:, :-1]
        )
    logp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, seqs[..., None])[..., 0]
    return logp.sum(1).exp()


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value; cells expected under 5 times are pooled into one."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].sum().double()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    chi2 = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), chi2 / 2))


def _peaked_model() -> NextTokenSegmenter:
    """Random tiny model (2x2 mask of 4 codes: 256 outcomes) whose heads are sharpened, so the
    main head and the NkTP drafts disagree often enough to exercise rejections."""
    model = _model(G=2, K=4, nktp_k=3, seed=3)
    with torch.no_grad():
        model.mask_head.weight.mul_(40.0)
    return model


def _codes_as_index(codes_BGG: torch.Tensor, K: int) -> torch.Tensor:
    flat = codes_BGG.flatten(1)
    weights = K ** torch.arange(flat.shape[1] - 1, -1, -1)
    return (flat * weights).sum(1)


@pytest.mark.parametrize("top_k", [None, 3])
def test_speculative_sampling_has_the_plain_sampling_distribution(top_k):
    model = _peaked_model()
    image, text, tmask = _inputs(model, 1, seed=4)
    tmask[:] = True
    K, T, n = 4, 1.0, 6000
    exact = _exact_distribution(model, image, text, tmask, T)
    if top_k is not None:  # the exact law of plain top-k sampling, by drawing it a lot
        pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(5)
    stats: dict[str, float] = {}
    spec = generate_masks_speculative(
        model,
        image.expand(n, -1, -1),
        text.expand(n, -1),
        tmask.expand(n, -1),
        temperature=T,
        top_k=top_k,
        generator=g,
        stats=stats,
    )
    assert 0 < stats["accepted"] < stats["drafted"]  # guesses both kept and rejected
    spec_counts = torch.bincount(_codes_as_index(spec, K), minlength=K**4)
    if top_k is None:
        assert _chi_square_p(spec_counts, exact) > 1e-3
        return
    # top-k: compare with plain sampling of the same size (two-sample chi-square)
    plain = MaskGenerator(model)(
        image.expand(n, -1, -1),
        text.expand(n, -1),
        tmask.expand(n, -1),
        temperature=T,
        top_k=top_k,
        generator=torch.Generator().manual_seed(6),
    )
    plain_counts = torch.bincount(_codes_as_index(plain, K), minlength=K**4)
    pooled = (spec_counts + plain_counts).double() / (2 * n)
    assert _chi_square_p(spec_counts, pooled) > 1e-3 and _chi_square_p(plain_counts, pooled) > 1e-3


def test_the_test_has_power_a_draft_only_sampler_fails():
    """Taking every drafted code unchecked is far from the target: the chi-square test sees it."""
    model = _peaked_model()
    image, text, tmask = _inputs(model, 1, seed=4)
    tmask[:] = True
    K, n = 4, 6000
    exact = _exact_distribution(model, image, text, tmask, 1.0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.setup_caches(1)
        h = model.prefill_state(image, text, tmask)
        probs = torch.softmax(model.draft_logits(h), -1)[0]  # (3, K): p of code 0, q of codes 1, 2
        first3 = torch.stack(
            [torch.multinomial(probs[j], n, replacement=True, generator=g) for j in range(3)], 1
        )
    # the last code exactly as plain sampling would draw it, after the unchecked first three
    M = n
    with torch.no_grad():
        last = model.mask_logits(
            image.expand(M, -1, -1), text.expand(M, -1), tmask.expand(M, -1), first3
        )[:, -1]
    codes = torch.cat([first3, torch.multinomial(torch.softmax(last, -1), 1, generator=g)], 1)
    counts = torch.bincount(_codes_as_index(codes.view(n, 2, 2), K), minlength=K**4)
    assert _chi_square_p(counts, exact) < 1e-6


def test_speculative_sampling_needs_no_heads_and_keeps_greedy_at_temperature_zero():
    model = _model(nktp_k=1)
    image, text, tmask = _inputs(model, 2)
    g = torch.Generator().manual_seed(0)
    out = generate_masks_speculative(model, image, text, tmask, temperature=1.0, generator=g)
    assert out.shape == (2, 4, 4) and int(out.max()) < 8
    greedy = generate_masks_speculative(_model(), image, text, tmask)
    assert torch.equal(greedy, MaskGenerator(_model())(image, text, tmask))
