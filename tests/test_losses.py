"""NkTP, TCL and HET: hand-made cases, and each switch off giving plain cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mrisegcli.losses.het import HardTokenMemory, weighted_ce
from mrisegcli.losses.nktp import IGNORE, NextKHeads, distance_weights, nktp_loss, shifted_targets
from mrisegcli.losses.tcl import TokenContrastive, boundary_map, info_nce, rarity_weights
from mrisegcli.models.next_token import NextTokenConfig, NextTokenSegmenter
from mrisegcli.models.transformer import TransformerConfig

KM = 8


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- NkTP


def test_nktp_targets_alignment_hand_made():
    y = torch.tensor([[10, 11, 12, 13]])
    t = shifted_targets(y, 3)
    assert t.shape == (1, 4, 2)
    assert t[0, :, 0].tolist() == [11, 12, 13, IGNORE]  # head j=2: y[n+1]
    assert t[0, :, 1].tolist() == [12, 13, IGNORE, IGNORE]  # head j=3: y[n+2]
    assert shifted_targets(y, 1).shape == (1, 4, 0)
    assert shifted_targets(torch.tensor([[5, 6]]), 4)[0].tolist() == [
        [6, IGNORE, IGNORE],
        [IGNORE, IGNORE, IGNORE],
    ]
    assert distance_weights(4, 0.5) == [0.5, 0.25, 0.125]


def test_nktp_loss_uses_shifted_targets_and_ignores_tail():
    y = torch.tensor([[1, 2, 3, 0, 1]])
    t = shifted_targets(y, 3)
    # logits that put all mass on the right shifted targets: loss ~ 0
    good = 20.0 * F.one_hot(t.clamp_min(0), 4).float()
    assert nktp_loss(good, t, 0.5) < 1e-6
    # predicting the unshifted target instead is penalised
    wrong = 20.0 * F.one_hot(y[:, :, None].expand(-1, -1, 2), 4).float()
    assert nktp_loss(wrong, t, 0.5) > 10
    # garbage where the target is past the end changes nothing
    messy = good.clone()
    messy[0, -1, 0] = torch.randn(4) * 50
    messy[0, -2:, 1] = torch.randn(2, 4) * 50
    assert torch.equal(nktp_loss(messy, t, 0.5), nktp_loss(good, t, 0.5))
    # weights gamma^(j-1): only head 3 wrong -> 0.25 * its CE
    half = good.clone()
    half[:, :, 1] = 0.0  # uniform for head j=3
    torch.testing.assert_close(
        nktp_loss(half, t, 0.5), 0.25 * torch.log(torch.tensor(4.0)), atol=1e-5, rtol=0
    )


def test_nktp_heads_start_equal_to_main_head():
    heads = NextKHeads(16, 3)
    main = torch.nn.Linear(16, KM)
    h = torch.randn(2, 5, 16)
    logits = heads.logits(h, main)
    assert logits.shape == (2, 5, 2, KM)
    torch.testing.assert_close(logits[:, :, 0], main(h))
    with pytest.raises(ValueError):
        NextKHeads(16, 1)


# ----------------------------------------------------------------------------- TCL


def test_boundary_map_hand_made():
    codes = torch.tensor([[[1, 1, 1, 1], [1, 2, 2, 1], [1, 1, 1, 1], [1, 1, 1, 1]]])
    expected = torch.tensor(
        [[[0, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]]], dtype=torch.bool
    )
    assert torch.equal(boundary_map(codes), expected)
    assert not boundary_map(torch.zeros(2, 3, 3, dtype=torch.long)).any()


def test_info_nce_lower_for_aligned_than_random():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(KM, 16, generator=g)
    y = torch.randint(0, KM, (2, 10), generator=g)
    w = torch.ones(2, 10)
    aligned = e[y] + 0.1 * torch.randn(2, 10, 16, generator=g)
    random = torch.randn(2, 10, 16, generator=g)
    assert info_nce(aligned, e, y, w, 0.1) < 0.5 * info_nce(random, e, y, w, 0.1)


def test_info_nce_weights_select_tokens():
    e = torch.eye(4)
    y = torch.tensor([[0, 1]])
    z = torch.stack([e[0], e[2]])[None]  # token 0 right, token 1 wrong
    only_right = info_nce(z, e, y, torch.tensor([[1.0, 0.0]]), 0.1)
    only_wrong = info_nce(z, e, y, torch.tensor([[0.0, 1.0]]), 0.1)
    assert only_right < 0.01 and only_wrong > 5


def test_rarity_and_token_weights():
    counts = torch.tensor([100.0, 100.0, 1.0, 25.0])
    w = rarity_weights(counts, 0.5, 5.0)
    assert w[0] == 1.0 and w[1] == 1.0  # frequent codes: weight 1
    assert w[2] == 5.0  # clipped at max
    assert 1.0 < w[3] < 5.0
    tcl = TokenContrastive(16, 4, proj_dim=8, boundary_weight=1.0)
    tcl.code_counts.copy_(counts)
    codes = torch.tensor([[[0, 0], [0, 2]]])
    tw = tcl.token_weights(codes)  # (1, 4): all boundary except (0, 0)
    assert tw.shape == (1, 4)
    assert tw[0, 0] == 1.0 and tw[0, 1] == 2.0 and tw[0, 3] == 2.0 * 5.0


def test_tcl_counts_update_only_in_training():
    tcl = TokenContrastive(16, 4, proj_dim=8)
    codes = torch.tensor([[[0, 0], [1, 3]]])
    tcl.eval()
    tcl(torch.randn(1, 4, 16), torch.randn(4, 16), codes)
    assert tcl.code_counts.tolist() == [1, 1, 1, 1]
    tcl.train()
    tcl(torch.randn(1, 4, 16), torch.randn(4, 16), codes)
    assert tcl.code_counts.tolist() == [3, 2, 1, 2]


# ----------------------------------------------------------------------------- HET


def test_het_memory_raises_and_decays():
    mem = HardTokenMemory(num_buckets=10, seq_len=4, decay=0.5)
    ids = torch.tensor([3, 7])
    assert torch.equal(mem.weights(ids, 1.0), torch.ones(2, 4))
    miss = torch.tensor([[True, False, False, True], [False, False, False, False]])
    mem.update(ids, miss)
    w = mem.weights(ids, 2.0)
    assert w[0].tolist() == [2.0, 1.0, 1.0, 2.0]  # 1 + 2 * 0.5
    assert w[1].tolist() == [1.0] * 4
    assert torch.equal(
        mem.weights(torch.tensor([4]), 2.0), torch.ones(1, 4)
    )  # other samples untouched
    mem.update(ids, torch.zeros(2, 4, dtype=torch.bool))  # predicted right: decay
    assert mem.weights(ids, 2.0)[0].tolist() == [1.5, 1.0, 1.0, 1.5]
    mem.update(ids[:1], torch.tensor([[True, False, False, False]]))  # missed again: raised
    assert mem.weights(ids[:1], 2.0)[0].tolist() == [1.0 + 2.0 * 0.625, 1.0, 1.0, 1.25]
    # ids fold into buckets by modulo
    assert torch.equal(mem.weights(torch.tensor([13]), 2.0), mem.weights(torch.tensor([3]), 2.0))
    # a checkpoint carries the memory
    fresh = HardTokenMemory(10, 4, 0.5)
    fresh.load_state_dict(mem.state_dict())
    assert torch.equal(fresh.weights(ids, 1.0), mem.weights(ids, 1.0))


def test_weighted_ce_with_unit_weights_is_ce_and_weights_matter():
    logits = torch.randn(2, 5, KM)
    y = torch.randint(0, KM, (2, 5))
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(weighted_ce(logits, y, torch.ones(2, 5)), ce)
    w = torch.ones(2, 5)
    w[0, 0] = 10.0
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    torch.testing.assert_close(weighted_ce(logits, y, w), (nll * w.flatten()).sum() / w.sum())


# ----------------------------------------------------------------------------- model switches


def _model(**kw) -> NextTokenSegmenter:
    torch.manual_seed(0)
    cfg = NextTokenConfig(
        transformer=TransformerConfig(dim=32, n_layers=1, n_heads=2, mlp_hidden=48, max_seq_len=64),
        image_codebook_size=16,
        image_grid=4,
        text_vocab_size=20,
        text_len=5,
        mask_codebook_size=KM,
        mask_grid=4,
        **kw,
    )
    return NextTokenSegmenter(cfg).train()


def _batch(B: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(
        image_codes=torch.randint(0, 16, (B, 4, 4), generator=g),
        text_ids=torch.randint(0, 20, (B, 5), generator=g),
        text_mask=torch.ones(B, 5, dtype=torch.bool),
        mask_codes=torch.randint(0, KM, (B, 4, 4), generator=g),
        sample_ids=torch.arange(B) + 100,
    )


OFF = dict(nktp_k=1, lambda_tcl=0.0, het_alpha=0.0)


def _plain_ce(out, batch):
    return F.cross_entropy(out["logits"].flatten(0, 1).float(), batch["mask_codes"].flatten())


def test_all_switches_off_is_plain_ce_exactly():
    batch = _batch()
    out = _model(**OFF)(batch)
    assert torch.equal(out["loss"], _plain_ce(out, batch))
    assert (
        float(out["nktp"]) == 0.0 and float(out["tcl"]) == 0.0 and float(out["het_weight"]) == 1.0
    )
    assert {"loss", "ce", "ce_plain", "nktp", "tcl", "het_weight", "acc", "logits"} <= set(out)


def test_nktp_switch():
    batch = _batch()
    out = _model(**{**OFF, "nktp_k": 3, "lambda_nktp": 0.7})(batch)
    assert torch.equal(out["ce"], _plain_ce(out, batch))
    assert out["nktp"] > 0
    torch.testing.assert_close(out["loss"], out["ce"] + 0.7 * out["nktp"])


def test_tcl_switch():
    batch = _batch()
    model = _model(**{**OFF, "lambda_tcl": 0.3})
    out = model(batch)
    assert torch.equal(out["ce"], _plain_ce(out, batch))
    assert out["tcl"] > 0
    torch.testing.assert_close(out["loss"], out["ce"] + 0.3 * out["tcl"])
    out["loss"].backward()
    assert model.tcl.proj_h.weight.grad.abs().sum() > 0


def test_het_switch_and_memory_in_model():
    batch = _batch()
    model = _model(**{**OFF, "het_alpha": 1.0, "het_buckets": 8})
    out = model(batch)  # fresh memory: unit weights, same value as CE
    torch.testing.assert_close(out["loss"], _plain_ce(out, batch))
    miss = out["logits"].argmax(-1) != batch["mask_codes"].flatten(1)
    assert miss.any()
    w = model.het_memory.weights(batch["sample_ids"], 1.0)
    torch.testing.assert_close(w, 1.0 + 0.5 * miss.float())  # raised exactly where missed
    out2 = model(batch)
    assert out2["het_weight"] > 1.0
    assert not torch.allclose(out2["ce"], out2["ce_plain"])
    # eval: memory untouched, plain CE
    before = model.het_memory.scores.clone()
    model.eval()
    out3 = model(batch)
    assert torch.equal(model.het_memory.scores, before)
    assert torch.equal(out3["ce"], out3["ce_plain"])
    model.train()
    with pytest.raises(KeyError, match="sample_ids"):
        model({k: v for k, v in batch.items() if k != "sample_ids"})


def test_bad_codes_are_rejected():
    batch = _batch()
    batch["mask_codes"] = batch["mask_codes"] + KM
    with pytest.raises(ValueError, match="mask codes"):
        _model(**OFF)(batch)
    batch = _batch()
    batch["text_ids"] = batch["text_ids"] + 20
    with pytest.raises(ValueError, match="text ids"):
        _model(**OFF)(batch)


def test_dense_prefix_head_folds_patches_in_raster_order():
    from mrisegcli.losses.dense import DensePrefixHead

    torch.manual_seed(0)
    head = DensePrefixHead(dim=16, grid=2, patch=3)
    h = torch.randn(2, 4, 16)
    logits = head.logits(h)  # (2, 1, 6, 6)
    per_token = head.proj(h).view(2, 4, 3, 3)
    for n, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        torch.testing.assert_close(
            logits[:, 0, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3], per_token[:, n]
        )
    mask = torch.zeros(2, 6, 6, dtype=torch.uint8)
    mask[:, :3, 3:] = 1  # the patch of token 1
    loss = head(h, mask)
    assert loss.ndim == 0 and loss > 0
    # the loss is minimised by logits that match the mask: gradient steps reduce it
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        head(h, mask).backward()
        opt.step()
    assert head(h, mask) < 0.5 * loss
    with pytest.raises(ValueError):
        head(h, torch.zeros(2, 5, 5))
