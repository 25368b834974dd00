"""Tests of the neural tokenizers: quantiser, mask/image VQ, multi-scale identities, fitting, files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mrisegcli.errors import ConfigError, MrisegError, OutputExistsError
from mrisegcli.tokenizers.base import GridTokenizer
from mrisegcli.tokenizers.fit import (
    fit_image_vq,
    fit_mask_vq,
    fit_multiscale,
    image_psnr,
    recon_dice,
)
from mrisegcli.tokenizers.image_vq import ImageVQ, ImageVQConfig
from mrisegcli.tokenizers.mask_vq import MaskVQ, MaskVQConfig
from mrisegcli.tokenizers.multiscale import MultiScaleConfig, MultiScaleMaskQuantizer
from mrisegcli.tokenizers.serialize import load_tokenizer, read_metadata, save_tokenizer
from mrisegcli.tokenizers.vq import VectorQuantizer, usage_stats

TINY_MASK = MaskVQConfig(
    image_size=32, downsample=4, codebook_size=32, code_dim=8, channels=(16, 32)
)
TINY_IMAGE = ImageVQConfig(
    image_size=32, downsample=4, codebook_size=32, code_dim=8, channels=(8, 16)
)
TINY_MS = MultiScaleConfig(
    image_size=32,
    downsample=4,
    codebook_size=32,
    code_dim=8,
    channels=(8, 16),
    scales=(1, 2, 4, 6, 8),
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ellipses(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size) uint8 masks with one or two random ellipses each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            cx, cy = rng.uniform(0.25, 0.75, 2) * size
            ax, ay = rng.uniform(0.1, 0.25, 2) * size
            t = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
            v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
            out[i] |= ((u / ax) ** 2 + (v / ay) ** 2 < 1).astype(np.uint8)
    return out


def seeded(factory, seed: int = 0):
    torch.manual_seed(seed)
    return factory().eval()


# ---------------------------------------------------------------- quantiser


@pytest.mark.parametrize("cosine", [True, False])
def test_quantizer_picks_the_nearest_code(cosine: bool) -> None:
    vq = seeded(lambda: VectorQuantizer(64, 8, cosine=cosine))
    z_NC = torch.randn(500, 8)
    idx = vq.nearest(z_NC)
    cb = vq.codebook()
    if cosine:
        want = torch.argmax(torch.nn.functional.normalize(z_NC, dim=1) @ cb.T, dim=1)
        assert torch.allclose(cb.norm(dim=1), torch.ones(64), atol=1e-5)
    else:
        want = torch.cdist(z_NC, cb).argmin(1)
    assert torch.equal(idx, want)
    # a code vector (slightly perturbed) maps back to itself
    picks = torch.randperm(64)[:20]
    probe = cb[picks] * (1.5 if cosine else 1.0) + 1e-4
    assert torch.equal(vq.nearest(probe), picks)


def test_straight_through_and_losses() -> None:
    vq = seeded(lambda: VectorQuantizer(16, 4, cosine=False)).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    assert out.idx_Bhw.shape == (2, 3, 3) and out.idx_Bhw.dtype == torch.int64
    # forward value is the codebook vector, the gradient goes straight to z
    want = vq.codebook()[out.idx_Bhw].permute(0, 3, 1, 2)
    assert torch.allclose(out.zq_BChw, want, atol=1e-6)
    out.zq_BChw.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    assert out.loss.item() > 0 and out.z_NC.shape == (18, 4)


def test_dead_code_restart() -> None:
    vq = seeded(lambda: VectorQuantizer(8, 4, cosine=True, restart_after=3))
    before = vq.embedding.detach().clone()
    z_NC = torch.randn(50, 4) * 3
    used = torch.zeros(10, dtype=torch.long)  # only code 0 is ever used
    gen = torch.Generator().manual_seed(0)
    assert vq.update_usage(used, z_NC, gen) == 0
    assert vq.update_usage(used, z_NC, gen) == 0
    assert torch.equal(vq.embedding.detach(), before)
    assert vq.update_usage(used, z_NC, gen) == 7  # codes 1..7 idle for 3 steps
    after = vq.embedding.detach()
    assert torch.equal(after[0], before[0])
    # each restarted code now sits (up to 1 % noise) on one of the batch's inputs
    dist = torch.cdist(after[1:], z_NC).min(1).values
    assert (dist < 0.05 * z_NC.norm(dim=1).max()).all()
    assert (vq.idle_steps == 0).all()


def test_usage_stats() -> None:
    usage, ppl = usage_stats(torch.tensor([0, 1, 2, 3] * 5), 8)
    assert usage == 0.5 and ppl == pytest.approx(4.0)
    assert usage_stats(torch.zeros(7, dtype=torch.long), 4) == (0.25, pytest.approx(1.0))


# ---------------------------------------------------------------- grid tokenizers


@pytest.mark.parametrize("factory", [lambda: MaskVQ(TINY_MASK), lambda: ImageVQ(TINY_IMAGE)])
def test_grid_round_trip_shapes(factory) -> None:
    tok = seeded(factory)
    assert isinstance(tok, GridTokenizer)
    assert tok.grid == 8 and tok.image_size == 32
    x = torch.rand(3, 1, 32, 32)
    idx = tok.encode(x)
    assert idx.shape == (3, 8, 8) and idx.dtype == torch.int64
    assert 0 <= int(idx.min()) and int(idx.max()) < tok.codebook_size
    with torch.no_grad():
        y = tok.decode(idx)
    assert y.shape == (3, 1, 32, 32) and y.dtype == torch.float32
    if isinstance(tok, ImageVQ):
        assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    with pytest.raises(ValueError):
        tok.encode(torch.rand(3, 2, 32, 32))


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        MaskVQ(MaskVQConfig(image_size=32, downsample=3))
    with pytest.raises(ConfigError):
        MultiScaleMaskQuantizer(MultiScaleConfig(image_size=32, downsample=4, scales=(1, 2, 4)))
    with pytest.raises(ConfigError):
        MultiScaleMaskQuantizer(MultiScaleConfig(image_size=32, downsample=4, scales=(1, 4, 2, 8)))


def test_config_fields_keep_their_saved_order() -> None:
    """Field names are the saved JSON keys and their order is part of the repr that cache
    fingerprints hash: the shared geometry fields first, then each tokenizer's own."""
    shared = ["image_size", "downsample", "codebook_size", "code_dim", "channels", "res_blocks"]
    own = {
        MaskVQConfig: ["beta", "restart_after", "bce_weight", "dice_weight", "vq_weight"],
        ImageVQConfig: [
            "beta",
            "restart_after",
            "l1_weight",
            "l2_weight",
            "grad_weight",
            "vq_weight",
        ],
        MultiScaleConfig: [
            "scales",
            "n_phi",
            "phi_ratio",
            "upsample",
            "beta",
            "restart_after",
            "bce_weight",
            "dice_weight",
            "vq_weight",
        ],
    }
    for cls, names in own.items():
        assert [f.name for f in dataclasses.fields(cls)] == shared + names, cls.__name__
        assert repr(cls()).startswith(f"{cls.__name__}(image_size=128, downsample=8, ")
    assert ImageVQConfig().codebook_size == 1024 and MaskVQConfig().codebook_size == 512


# ---------------------------------------------------------------- multi-scale identities


def _ms_with_codes():
    tok = seeded(lambda: MultiScaleMaskQuantizer(TINY_MS))
    masks = torch.from_numpy(ellipses(4, 32, seed=1)).float()[:, None]
    return tok, masks


def test_multiscale_parts_sum_to_fhat_and_logits() -> None:
    tok, masks = _ms_with_codes()
    with torch.no_grad():
        f = tok.features(masks)
        idx_list, f_hat = tok.quantize(f)
        assert [tuple(i.shape) for i in idx_list] == [(4, p, p) for p in TINY_MS.scales]
        assert all(i.dtype == torch.int64 and int(i.max()) < 32 for i in idx_list)
        assert all(torch.equal(a, b) for a, b in zip(idx_list, tok.encode(masks), strict=True))
        parts = tok.scale_parts(idx_list)
        assert torch.allclose(torch.stack(parts).sum(0), f_hat, atol=1e-5)
        assert torch.allclose(tok.idx_to_fhat(idx_list), f_hat, atol=1e-5)
        logits = tok.idx_to_logits(idx_list)
        assert logits.shape == (4, 1, 32, 32)
        assert torch.allclose(tok.decoder(f_hat), logits, atol=1e-5)
        assert torch.allclose(tok.decode(idx_list), logits)
        assert tok.scale_lengths == tuple(p * p for p in TINY_MS.scales)


def test_teacher_inputs_equal_step_by_step_inputs() -> None:
    tok, masks = _ms_with_codes()
    with torch.no_grad():
        idx_list = tok.encode(masks)
        x_BLC = tok.idx_to_teacher_inputs(idx_list)
        L = sum(p * p for p in TINY_MS.scales[1:])
        assert x_BLC.shape == (4, L, TINY_MS.code_dim)
        f_hat = tok.empty_fhat(4)
        steps = []
        for k, idx in enumerate(idx_list):
            f_hat, nxt = tok.next_input(k, f_hat, idx)
            if k < len(idx_list) - 1:
                assert nxt.shape == (4, TINY_MS.scales[k + 1] ** 2, TINY_MS.code_dim)
                steps.append(nxt)
            else:
                assert nxt is None
        assert torch.allclose(torch.cat(steps, 1), x_BLC, atol=1e-5)
        assert torch.allclose(f_hat, tok.idx_to_fhat(idx_list), atol=1e-5)
        # the K-1 prefix alone gives the same inputs
        assert torch.allclose(tok.idx_to_teacher_inputs(idx_list[:-1]), x_BLC)


def test_multiscale_training_loss_backprops_everywhere() -> None:
    tok, masks = _ms_with_codes()
    tok.train()
    out = tok.training_loss(masks)
    out.loss.backward()
    assert out.idx.numel() == 4 * sum(p * p for p in TINY_MS.scales)
    for name in ("encoder", "decoder", "quantizer", "phis"):
        grads = [p.grad for p in getattr(tok, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name


# ---------------------------------------------------------------- fitting and metrics


class _Identity(torch.nn.Module):
    """A 'tokenizer' whose codes are the mask itself: Dice 1 by construction."""

    image_size = 16

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.shift = shift

    def encode(self, x):
        return x.roll(self.shift, dims=-1)

    def decode(self, idx):
        return idx * 2.0 - 1.0


def test_recon_dice_definition() -> None:
    m = np.zeros((3, 16, 16), np.uint8)
    m[1, 4:8, 4:8] = 1
    m[2, 0:4, 0:2] = 1
    assert recon_dice(_Identity(), m) == pytest.approx(1.0)
    # shifted by 2 columns: mask 1 overlaps 2 of 4 columns, mask 2 not at all, empty stays 1
    assert recon_dice(_Identity(shift=2), m) == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_fit_mask_vq_learns_blobs() -> None:
    masks = ellipses(200, 32, seed=0)
    tok, rep = fit_mask_vq(masks, TINY_MASK, steps=150, batch_size=16, lr=3e-3, seed=0)
    assert not tok.training
    assert rep["recon_dice"] > 0.85, rep
    assert 0 < rep["codebook_usage"] <= 1 and rep["perplexity"] > 2
    assert {"loss", "seconds", "n_train"} <= set(rep)
    assert recon_dice(tok, ellipses(50, 32, seed=99)) > 0.85


def test_fit_is_deterministic_and_reports_progress() -> None:
    masks = ellipses(20, 32, seed=0)
    seen = []
    a, _ = fit_mask_vq(
        masks,
        TINY_MASK,
        steps=5,
        batch_size=4,
        seed=3,
        progress=lambda s, t, m: seen.append((s, t, m["loss"])),
    )
    b, _ = fit_mask_vq(masks, TINY_MASK, steps=5, batch_size=4, seed=3)
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5] and all(t == 5 for _, t, _ in seen)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_fit_rejects_bad_arguments() -> None:
    masks = ellipses(4, 32, seed=0)
    with pytest.raises(MrisegError, match="multiple of the downsample"):
        fit_mask_vq(masks, TINY_MASK, steps=1, crop=6)
    with pytest.raises(MrisegError, match="no samples"):
        fit_mask_vq(masks[:0], TINY_MASK, steps=1)
    with pytest.raises(MrisegError, match="steps"):
        fit_mask_vq(masks, TINY_MASK, steps=0)
    with pytest.raises(MrisegError, match="shape"):
        fit_mask_vq(masks[0], TINY_MASK, steps=1)


def test_fit_multiscale_and_image_vq_improve() -> None:
    masks = ellipses(120, 32, seed=0)
    ms, rep = fit_multiscale(masks, TINY_MS, steps=100, batch_size=16, lr=3e-3, seed=0)
    assert rep["recon_dice"] > 0.75, rep
    images = (0.2 + 0.6 * masks + 0.05 * np.random.default_rng(0).random(masks.shape)).astype(
        np.float32
    )
    tok, rep = fit_image_vq(
        images, TINY_IMAGE, steps=200, batch_size=16, lr=5e-3, seed=0, crop=None
    )
    # far better than the best constant image (the mean) and than the untrained model
    mse = ((images - images.mean()) ** 2).reshape(len(images), -1).mean(1)
    constant_psnr = float((-10 * np.log10(mse)).mean())
    assert rep["psnr"] > constant_psnr + 5, rep
    assert (
        image_psnr(tok, images[:20])
        > image_psnr(seeded(lambda: ImageVQ(TINY_IMAGE)), images[:20]) + 5
    )


# ---------------------------------------------------------------- files


@pytest.mark.parametrize(
    "factory",
    [
        lambda: MaskVQ(TINY_MASK),
        lambda: ImageVQ(TINY_IMAGE),
        lambda: MultiScaleMaskQuantizer(TINY_MS),
    ],
)
def test_save_load_round_trip(tmp_path, factory) -> None:
    tok = seeded(factory)
    path = save_tokenizer(tok, tmp_path / "tok.safetensors")
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok) and loaded.cfg == tok.cfg and not loaded.training
    assert json.loads(read_metadata(path)["mriseg_config"])["image_size"] == 32
    x = torch.from_numpy(ellipses(3, 32, seed=5)).float()[:, None]
    with torch.no_grad():
        ia, ib = tok.encode(x), loaded.encode(x)
        if isinstance(ia, list):
            assert all(torch.equal(a, b) for a, b in zip(ia, ib, strict=True))
        else:
            assert torch.equal(ia, ib)
        assert torch.equal(tok.decode(ia), loaded.decode(ib))
    with pytest.raises(OutputExistsError):
        save_tokenizer(tok, path)
    save_tokenizer(tok, path, overwrite=True)


def test_damaged_or_foreign_files_raise(tmp_path) -> None:
    tok = seeded(lambda: MaskVQ(TINY_MASK))
    good = save_tokenizer(tok, tmp_path / "good.safetensors")
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "header_only": data[:20],
        "garbage": b"\x00\x01not a safetensors file" * 10,
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(MrisegError, match=name):
            load_tokenizer(p)
    state = {k: v.contiguous() for k, v in tok.state_dict().items()}
    meta = {
        "kind": "mask_vq",
        "mriseg_config": json.dumps(
            {**json.loads(read_metadata(good)["mriseg_config"]), "codebook_size": 64}
        ),
    }
    save_file(state, str(tmp_path / "mismatch.safetensors"), metadata=meta)
    with pytest.raises(MrisegError, match="do not match"):
        load_tokenizer(tmp_path / "mismatch.safetensors")
    save_file(state, str(tmp_path / "kind.safetensors"), metadata={**meta, "kind": "banana"})
    with pytest.raises(MrisegError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path / "kind.safetensors")
    save_file(state, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(MrisegError):
        load_tokenizer(tmp_path / "nometa.safetensors")
    with pytest.raises(MrisegError, match="no such"):
        load_tokenizer(tmp_path / "missing.safetensors")
