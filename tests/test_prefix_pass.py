"""One pass over the prefix per decode: the prefill's states serve the refiner, the dense head
and the presence head (next-token, prefix LM), with the same outputs as the three passes they
replace (the KV-cache prefill, the heads' pass, the presence head's pass)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mrisegcli.config import run_preset, with_image_size
from mrisegcli.decode.next_token import MaskGenerator, generate_masks_speculative
from mrisegcli.models.image_encoder import ImageEncoderConfig
from mrisegcli.models.next_token import NextTokenConfig, NextTokenSegmenter
from mrisegcli.models.transformer import TransformerConfig
from mrisegcli.paradigms import DecodeOptions, get_paradigm
from mrisegcli.presence import PresenceHead, features_of_states, presence_features
from mrisegcli.tokenizers.mask_vq import MaskVQ, MaskVQConfig
from mrisegcli.workflow.bundle import TokenizerBundle
from mrisegcli.workflow.segmenter import Segmenter

S, G, K, L = 32, 4, 16, 6  # image side, mask grid, mask codebook, text context


def _model(**kw) -> NextTokenSegmenter:
    cfg = NextTokenConfig(
        transformer=TransformerConfig(
            dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=128
        ),
        image_input="pixels",
        image_size=S,
        image_grid=G,
        mask_grid=G,
        encoder=ImageEncoderConfig(patch=S // G),
        mask_codebook_size=K,
        text_vocab_size=40,
        text_len=L,
        prefix_attention="bidirectional",
        lambda_refine=1.0,
        lambda_dense=1.0,
        refine_width=8,
        nktp_k=3,
        mask_cell_image=True,
        **kw,
    )
    torch.manual_seed(0)
    return NextTokenSegmenter(cfg).eval()


def _segmenter(model: NextTokenSegmenter) -> Segmenter:
    torch.manual_seed(1)
    vq = MaskVQ(MaskVQConfig(image_size=S, downsample=S // G, codebook_size=K)).eval()
    cfg = replace(with_image_size(run_preset("tiny"), S), text_len=L)
    seg = Segmenter(
        "next-token", model, TokenizerBundle(None, mask_vq=vq), cfg, torch.device("cpu")
    )
    seg.presence_head = PresenceHead(3 * model.config.transformer.dim).eval()
    seg.presence_threshold = 0.5
    return seg


def _inputs(B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(B)
    image = torch.rand(B, 1, S, S, generator=g)
    ids = torch.randint(0, 40, (B, L), generator=g)
    mask = torch.arange(L)[None] < torch.randint(2, L + 1, (B, 1), generator=g)
    return image, ids, mask


def _old_decode(seg: Segmenter, image, ids, tmask, opts: DecodeOptions) -> dict[str, torch.Tensor]:
    """What decoding computed before: the codes, then one more pass over the prefix for the
    heads (``mask_outputs``) and one for the presence features (``presence_features``)."""
    model, n = seg.model, opts.samples
    x, ids_r, tm_r = (t.repeat_interleave(n, 0) for t in (image, ids, tmask))
    if opts.temperature == 0 and x.shape[0] == 1:
        codes = generate_masks_speculative(model, x, ids_r, tm_r)
    else:
        codes = MaskGenerator(model)(
            x, ids_r, tm_r, temperature=opts.temperature, generator=opts.generator
        )
    heads = model.mask_outputs(x, ids_r, tm_r, codes)
    return {
        "tokens": seg.bundle.mask_vq.decode(codes),
        **heads,
        "presence": presence_features(seg.impl, model, image, ids, tmask),
    }


@pytest.mark.parametrize(
    "B, samples, temperature",
    [(1, 1, 0.0), (3, 1, 0.0), (2, 2, 1.0), (1, 3, 1.0)],
    ids=["batch1-speculative", "batch3-greedy", "batch2-sampled", "batch1-sampled"],
)
@torch.no_grad()
def test_decode_gives_what_the_three_passes_gave(B, samples, temperature, one_thread) -> None:
    seg = _segmenter(_model())
    image, ids, tmask = _inputs(B)

    def opts(seed: int) -> DecodeOptions:
        return DecodeOptions(
            samples=samples,
            temperature=temperature,
            generator=torch.Generator().manual_seed(seed),
            parts=True,
            presence=True,
        )

    old = _old_decode(seg, image, ids, tmask, opts(7))
    new = seg.impl.decode(seg.model, seg.bundle, image, ids, tmask, opts(7), {})
    assert torch.equal(new.parts["tokens"], old["tokens"])  # the same codes
    torch.testing.assert_close(new.parts["refined"], old["refined"])
    torch.testing.assert_close(new.parts["dense"], old["dense"])
    torch.testing.assert_close(new.logits, old["refined"])
    assert new.presence_states is not None
    img_BNC, start_BC = new.presence_states
    assert img_BNC.shape[0] == start_BC.shape[0] == B  # one row per image, not per sample
    torch.testing.assert_close(features_of_states(img_BNC, start_BC), old["presence"])


@pytest.mark.parametrize("B", [1, 3])
@torch.no_grad()
def test_predict_probabilities_and_presence_are_the_old_ones(B, one_thread) -> None:
    seg = _segmenter(_model())
    image, ids, tmask = _inputs(B)
    old = _old_decode(seg, image, ids, tmask, DecodeOptions())
    pred = seg.predict_tensors(image, ids, tmask, parts=True)
    torch.testing.assert_close(pred.prob, torch.sigmoid(old["refined"])[:, 0])
    torch.testing.assert_close(pred.parts["dense"], torch.sigmoid(old["dense"])[:, 0])
    old_presence = seg.presence_tensors(image, ids, tmask)  # its own pass, as before
    torch.testing.assert_close(pred.presence, old_presence)
    assert (seg.is_present(pred.presence, B) == seg.is_present(old_presence, B)).all()


class _Passes:
    """Counts image-encoder passes (its projection, one call per pass over the prefix) and
    transformer passes over the whole prefix (the final norm, one call per pass)."""

    def __init__(self, model: NextTokenSegmenter) -> None:
        self.encoder = self.prefix = 0
        P = model.layout.prefix_len

        def on_encoder(*_) -> None:
            self.encoder += 1

        def on_norm(_module, args, _out) -> None:
            self.prefix += args[0].shape[1] >= P

        self.handles = [
            model.image_proj.register_forward_hook(on_encoder),
            model.transformer.norm.register_forward_hook(on_norm),
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("B", [1, 3], ids=["speculative", "plain"])
def test_one_encoder_and_one_prefix_pass_per_decode(B, one_thread) -> None:
    seg = _segmenter(_model())
    image, ids, tmask = _inputs(B)
    seg.predict_tensors(image, ids, tmask)  # warm (the decode cache)
    passes = _Passes(seg.model)
    seg.predict_tensors(image, ids, tmask, parts=True)
    passes.close()
    assert (passes.encoder, passes.prefix) == (1, 1)


class _CpuAutocast(MaskGenerator):
    """The CUDA decoder's bf16 autocast, on a CPU; keeps its last :class:`MaskDecode`."""

    def __init__(self, model: NextTokenSegmenter) -> None:
        super().__init__(model)
        self.amp_dtype = torch.bfloat16

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def decode(self, *args, **kwargs):
        self.last = super().decode(*args, **kwargs)
        return self.last


@torch.no_grad()
def test_a_prefill_under_autocast_leaves_one_full_precision_pass_for_the_rest(one_thread) -> None:
    """A bf16 prefill's states are not what the heads were given before (float32): then one
    full-precision pass serves the refiner, the dense head and presence (two passes, not three)."""
    seg = _segmenter(_model())
    image, ids, tmask = _inputs(3)
    seg._decode_cache["generator"] = generator = _CpuAutocast(seg.model)
    passes = _Passes(seg.model)
    pred = seg.predict_tensors(image, ids, tmask, parts=True)
    passes.close()
    assert generator.last.prefix is None
    assert (passes.encoder, passes.prefix) == (2, 2)
    heads = seg.model.mask_outputs(image, ids, tmask, generator.last.codes)  # float32
    torch.testing.assert_close(pred.prob, torch.sigmoid(heads["refined"])[:, 0])
    torch.testing.assert_close(pred.parts["dense"], torch.sigmoid(heads["dense"])[:, 0])
    torch.testing.assert_close(pred.presence, seg.presence_tensors(image, ids, tmask))


@torch.no_grad()
def test_prefill_states_equal_the_uncached_prefix_pass(one_thread) -> None:
    model = _model()
    image, ids, tmask = _inputs(2)
    model.setup_caches(2)
    cached = model.prefill_prefix(image, ids, tmask)
    plain = model.prefix_states(image, ids, tmask)
    torch.testing.assert_close(cached.h_BPC, plain.h_BPC)
    assert len(cached.skips) == len(plain.skips) > 0
    for a, b in zip(cached.skips, plain.skips, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(model.prefill_state(image, ids, tmask), plain.h_BPC[:, -1])


@torch.no_grad()
def test_presence_states_come_only_when_asked(one_thread) -> None:
    seg = _segmenter(_model())
    image, ids, tmask = _inputs(1)
    out = get_paradigm("next-token").decode(
        seg.model, seg.bundle, image, ids, tmask, DecodeOptions(), {}
    )
    assert out.presence_states is None and out.parts == {}
