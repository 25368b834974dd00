"""Self-speculative greedy decoding: the NkTP heads draft, one pass verifies; the codes equal
plain greedy decoding exactly, in causal and prefix modes, on a batch whose sequences keep
drafted runs of different lengths."""

from __future__ import annotations

import pytest
import torch

from mrisegcli.decode.next_token import generate_masks, generate_masks_speculative
from mrisegcli.models.next_token import NextTokenConfig, NextTokenSegmenter
from mrisegcli.models.transformer import TransformerConfig

G, K, VT, L = 4, 8, 12, 5


def _trained(prefix_attention: str, nktp_k: int = 3, steps: int = 100) -> NextTokenSegmenter:
    """A tiny model trained on masks whose codes follow the text (rows of one code, shifted by
    the image), so that the NkTP heads learn to guess and sometimes miss."""
    torch.manual_seed(0)
    cfg = NextTokenConfig(
        transformer=TransformerConfig(dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=64),
        image_codebook_size=K,
        image_grid=G,
        text_vocab_size=VT,
        text_len=L,
        mask_codebook_size=K,
        mask_grid=G,
        prefix_attention=prefix_attention,
        nktp_k=nktp_k,
        lambda_tcl=0.0,
        het_alpha=0.0,
    )
    model = NextTokenSegmenter(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = _batch(16, g)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _batch(B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    image = torch.randint(0, K, (B, G, G), generator=g)
    text = torch.randint(0, VT, (B, L), generator=g)
    rows = (text[:, :G] + image[:, :, 0]) % K  # (B, G): one code per row
    codes = rows[:, :, None].expand(B, G, G).clone()
    noise = torch.rand(B, G, G, generator=g) < 0.2  # some cells break the pattern
    codes[noise] = torch.randint(0, K, (int(noise.sum()),), generator=g)
    return {
        "image_codes": image,
        "text_ids": text,
        "text_mask": torch.ones(B, L, dtype=torch.bool),
        "mask_codes": codes,
    }


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize(
    ("prefix_attention", "nktp_k"), [("causal", 3), ("bidirectional", 3), ("bidirectional", 4)]
)
def test_speculative_equals_greedy_with_uneven_acceptance(
    prefix_attention: str, nktp_k: int
) -> None:
    model = _trained(prefix_attention, nktp_k=nktp_k)
    b = _batch(12, torch.Generator().manual_seed(7))
    lengths = torch.tensor([5, 3, 4, 5, 2, 5, 1, 5, 4, 3, 5, 2])
    tmask = torch.arange(L)[None, :] < lengths[:, None]  # padded prompts too
    plain = generate_masks(model, b["image_codes"], b["text_ids"], tmask)
    stats: dict[str, float] = {}
    fast = generate_masks_speculative(model, b["image_codes"], b["text_ids"], tmask, stats=stats)
    assert torch.equal(plain, fast)
    assert stats["uneven"] > 0  # sequences of the batch kept different runs
    assert 0 < stats["accepted"] < stats["drafted"]  # some guesses kept, some not
    assert stats["passes"] < G * G - 1  # fewer passes than one per code


def test_without_nktp_heads_it_is_plain_greedy() -> None:
    model = _trained("bidirectional", nktp_k=1, steps=5)
    b = _batch(3, torch.Generator().manual_seed(2))
    stats: dict[str, float] = {}
    fast = generate_masks_speculative(
        model, b["image_codes"], b["text_ids"], b["text_mask"], stats=stats
    )
    assert torch.equal(fast, generate_masks(model, b["image_codes"], b["text_ids"], b["text_mask"]))
    assert stats["drafted"] == 0 and stats["passes"] == G * G - 1


def test_draft_logits_are_the_training_heads_for_any_leading_shape() -> None:
    """The fused inference form (adapters as one matmul, the head over k inputs at once) gives
    the logits the NkTP loss trains, for one state per sequence and for a block of states."""
    model = _trained("bidirectional", steps=0)
    for adapter in model.nktp.adapters:  # trained adapters are not zero
        torch.nn.init.normal_(adapter.weight, std=0.3)
    h = torch.randn(3, 5, 32)
    with torch.no_grad():
        reference = torch.cat(
            [model.mask_head(h)[:, :, None], model.nktp.logits(h, model.mask_head)], 2
        )
        torch.testing.assert_close(model.draft_logits(h), reference)
        torch.testing.assert_close(model.draft_logits(h[:, 2]), reference[:, 2])
    assert model.draft_logits(h).shape == (3, 5, 3, K)
