"""Next-scale mask prediction: a transformer predicts whole token maps, coarse to fine.

Sequence (fixed layout)::

    condition: image features (g*g) | text (text_len, padded)
    scales:    start (p_1**2) | f_hat_1 at p_2 x p_2 | ... | f_hat_{K-1} at p_K x p_K

The tokens of scale k are all predicted at once from the hidden states at their own slots:
scale 1 from a learned start embedding, scale k >= 2 from the multi-scale quantiser's
accumulated reconstruction f_hat after scales < k, area-downsampled to p_k x p_k (teacher
forcing in training, the sampled codes at inference). Every input token carries a learned
segment embedding (image, text, or its scale level); positions are 2-D RoPE on one common grid
(the finest scale's), so the image patch and the scale tokens covering the same spot share a
position at every scale.

Attention is block-causal: condition tokens see the whole condition (bidirectional); a token
of scale k sees the condition and every token of scales <= k. Padded text positions are
hidden as keys.

The multi-scale quantiser is frozen and shared: the segmenter keeps a *reference* to it (not a
sub-module) to build teacher inputs inside :meth:`forward`, so its weights are neither saved
twice nor trained nor handed to the optimiser. ``model.to(...)`` moves it along (see
:meth:`NextScaleSegmenter._apply`).

Entry points: :meth:`forward` (training losses), :meth:`scale_logits` (the full block-causal
pass, the uncached reference), :meth:`teacher_forced_states` (the hidden states of that pass),
:meth:`setup_caches`, :meth:`prefill`, :meth:`repeat_cache`, :meth:`decode_scale`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, make_dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrisegcli.errors import ConfigError
from mrisegcli.losses.dense import DensePrefixHead
from mrisegcli.models.image_encoder import ConvImageEncoder, ImageEncoder, ImageEncoderConfig
from mrisegcli.models.transformer import Transformer, TransformerConfig, block_causal_mask
from mrisegcli.settings import model_fields
from mrisegcli.tokenizers.multiscale import MultiScaleMaskQuantizer

SEG_IMAGE, SEG_TEXT, SEG_SCALE0 = 0, 1, 2  # segment ids; scale k has SEG_SCALE0 + k


#: the training strategies the model reads: one field per row of ``settings.SETTINGS`` that
#: names "next-scale" in its ``models`` (``lambda_dense``: dense condition supervision,
#: losses/dense.py; image-token states predict their patch's mask pixels, 0 = off)
NextScaleStrategies = make_dataclass("NextScaleStrategies", model_fields("next-scale"), frozen=True)
NextScaleStrategies.__module__ = __name__


@dataclass(frozen=True)
class NextScaleConfig(NextScaleStrategies):
    """Everything needed to rebuild a :class:`NextScaleSegmenter` (saved with each run): the
    strategies it reads (:data:`NextScaleStrategies`, declared in ``settings.py``), then the
    sizes of its parts and how its loss weighs the scales."""

    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    image_size: int = 128
    encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_vocab_size: int = 8192
    text_len: int = 32
    mask_codebook_size: int = 512
    code_dim: int = 16
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    # False: CE averaged over all scale tokens (fine scales dominate, as in VAR);
    # True: every scale weighs the same (CE averaged per scale, then over scales).
    balance_scales: bool = False

    def __post_init__(self) -> None:
        if self.lambda_dense < 0:
            raise ConfigError(f"lambda_dense must be >= 0, got {self.lambda_dense}")
        for name in ("image_size", "text_vocab_size", "text_len", "mask_codebook_size", "code_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        sc = tuple(self.scales)
        if len(sc) < 2 or sc[0] < 1 or any(a >= b for a, b in itertools.pairwise(sc)):
            raise ConfigError(f"scales must be >= 2 strictly increasing sides >= 1, got {sc}")
        self.encoder.grid(self.image_size)  # raises if the image does not tile into patches


@dataclass(frozen=True)
class ScaleLayout:
    """Token counts and slot ranges of the next-scale sequence."""

    n_image: int
    n_text: int
    scales: tuple[int, ...]

    @property
    def n_cond(self) -> int:
        return self.n_image + self.n_text

    @property
    def scale_lengths(self) -> tuple[int, ...]:
        return tuple(p * p for p in self.scales)

    @property
    def n_scale_tokens(self) -> int:
        """L: all scale tokens, sum of p_k ** 2."""
        return sum(self.scale_lengths)

    @property
    def seq_len(self) -> int:
        return self.n_cond + self.n_scale_tokens

    @property
    def prefill_len(self) -> int:
        """Condition plus the start tokens of scale 1: what :meth:`prefill` consumes."""
        return self.n_cond + self.scale_lengths[0]

    def scale_begin(self, k: int) -> int:
        """Index of scale k's first token among the scale tokens."""
        return sum(self.scale_lengths[:k])

    def scale_slots(self, k: int) -> tuple[int, int]:
        """Sequence slots [a, b) of scale k."""
        a = self.n_cond + self.scale_begin(k)
        return a, a + self.scale_lengths[k]


def grid_positions(p: int, common: int) -> torch.Tensor:
    """(p*p, 2) float (row, col) cell centres of a p x p grid in units of a common x common grid."""
    r, c = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    rc = torch.stack([r.flatten(), c.flatten()], -1).float()
    return (rc + 0.5) * (common / p) - 0.5


def sequence_positions(layout: ScaleLayout, image_grid: int) -> torch.Tensor:
    """(T, 2) RoPE positions: image and scale tokens on the finest scale's grid, text at its centre.

    Text order comes from a learned position embedding instead; placing all text tokens at the
    grid centre keeps their rotary offset to any image/scale token small and symmetric.
    """
    common = layout.scales[-1]
    centre = torch.full((layout.n_text, 2), (common - 1) / 2)
    parts = [grid_positions(image_grid, common), centre]
    parts += [grid_positions(p, common) for p in layout.scales]
    return torch.cat(parts)


def segment_ids(layout: ScaleLayout) -> torch.Tensor:
    """(T,) int64: 0 image, 1 text, 2 + k for the tokens of scale k."""
    ids = [torch.full((layout.n_image,), SEG_IMAGE), torch.full((layout.n_text,), SEG_TEXT)]
    ids += [torch.full((n,), SEG_SCALE0 + k) for k, n in enumerate(layout.scale_lengths)]
    return torch.cat(ids)


def next_scale_mask(layout: ScaleLayout) -> torch.Tensor:
    """(T, T) bool, True = may attend: condition is one bidirectional block, then one block per scale."""
    return block_causal_mask([layout.n_cond, *layout.scale_lengths])


def flatten_scales(idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """[(B, p_k, p_k)] -> (B, L) int64, each map row-major, coarse to fine."""
    return torch.cat([idx.flatten(1) for idx in idx_list], dim=1)


def split_scales(codes_BL: torch.Tensor, scales: Sequence[int]) -> list[torch.Tensor]:
    """Inverse of :func:`flatten_scales`: (B, L) -> [(B, p_k, p_k)]."""
    L = sum(p * p for p in scales)
    if codes_BL.dim() != 2 or codes_BL.shape[1] != L:
        raise ValueError(f"expected multi-scale codes (B, {L}), got {tuple(codes_BL.shape)}")
    parts = torch.split(codes_BL, [p * p for p in scales], dim=1)
    return [x.reshape(-1, p, p) for x, p in zip(parts, scales, strict=True)]


class _Reference:
    """Holds a module without registering it (kept out of parameters, state_dict and optimiser)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


class NextScaleSegmenter(nn.Module):
    """Image + text prompt -> multi-scale mask codes, one whole scale per step."""

    def __init__(
        self,
        cfg: NextScaleConfig,
        quantizer: MultiScaleMaskQuantizer,
        encoder: ImageEncoder | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        _check_quantizer(cfg, quantizer)
        self._quantizer = _Reference(quantizer)
        # A custom (e.g. pretrained) encoder replaces the default one; the caller rebuilds it.
        self.encoder = (
            encoder if encoder is not None else ConvImageEncoder(cfg.encoder, cfg.image_size)
        )
        self.layout = ScaleLayout(self.encoder.grid**2, cfg.text_len, tuple(cfg.scales))
        lay, dim = self.layout, cfg.transformer.dim
        if lay.seq_len > cfg.transformer.max_seq_len:
            raise ConfigError(
                f"sequence of {lay.seq_len} tokens exceeds max_seq_len {cfg.transformer.max_seq_len}"
            )
        self.image_proj = nn.Linear(self.encoder.out_dim, dim)
        self.text_emb = nn.Embedding(cfg.text_vocab_size, dim)
        self.text_pos = nn.Parameter(torch.empty(cfg.text_len, dim))
        self.segment_emb = nn.Embedding(SEG_SCALE0 + len(cfg.scales), dim)
        self.start_emb = nn.Parameter(torch.empty(lay.scale_lengths[0], dim))
        self.code_proj = nn.Linear(cfg.code_dim, dim)  # f_hat features -> model width
        self.transformer = Transformer(cfg.transformer)
        self.head = nn.Linear(dim, cfg.mask_codebook_size)
        for w in (
            self.text_emb.weight,
            self.text_pos,
            self.segment_emb.weight,
            self.start_emb,
            self.head.weight,
        ):
            nn.init.normal_(w, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("pos_T2", sequence_positions(lay, self.encoder.grid), persistent=False)
        self.register_buffer("seg_T", segment_ids(lay), persistent=False)
        self.register_buffer("mask_TT", next_scale_mask(lay), persistent=False)
        # built last, so switching it on leaves every other initial weight as it was
        g = self.encoder.grid
        self.dense = DensePrefixHead(dim, g, cfg.image_size // g) if cfg.lambda_dense > 0 else None

    @property
    def quantizer(self) -> MultiScaleMaskQuantizer:
        """The frozen multi-scale quantiser this model predicts codes of (a reference)."""
        return self._quantizer.module

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> NextScaleSegmenter:
        """``.to()``, ``.cuda()``, ``.double()``... also apply to the referenced quantiser."""
        super()._apply(fn, recurse)
        self.quantizer._apply(fn, recurse)
        return self

    # -- sequence building ------------------------------------------------------------------

    def _pad_text(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.layout.n_text
        if text_ids.dim() != 2 or text_mask.shape != text_ids.shape:
            raise ValueError(
                f"text_ids {tuple(text_ids.shape)} and text_mask {tuple(text_mask.shape)} must be equal (B, L)"
            )
        if text_ids.shape[1] > n:
            raise ValueError(
                f"text has {text_ids.shape[1]} tokens, the model takes at most text_len={n}"
            )
        if text_ids.numel() and (
            int(text_ids.min()) < 0 or int(text_ids.max()) >= self.config.text_vocab_size
        ):
            raise ValueError(f"text ids must lie in [0, {self.config.text_vocab_size})")
        pad = n - text_ids.shape[1]
        return F.pad(text_ids, (0, pad)), F.pad(text_mask.bool(), (0, pad))

    def embed_condition(
        self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B, n_cond, C) condition embeddings and (B, n_cond) key validity (False at padding)."""
        lay = self.layout
        text_ids, text_mask = self._pad_text(text_ids, text_mask)
        img_BNC = self.image_proj(self.encoder(image))  # (B, g*g, C)
        if img_BNC.shape[0] != text_ids.shape[0]:
            raise ValueError(f"batch of {img_BNC.shape[0]} images but {text_ids.shape[0]} texts")
        txt_BLC = self.text_emb(text_ids) + self.text_pos  # (B, text_len, C)
        x_BPC = torch.cat([img_BNC, txt_BLC.to(img_BNC.dtype)], 1) + self.segment_emb(
            self.seg_T[: lay.n_cond]
        )
        valid_BP = torch.cat([text_mask.new_ones(text_mask.shape[0], lay.n_image), text_mask], 1)
        return x_BPC, valid_BP

    def embed_start(self, batch: int) -> torch.Tensor:
        """(B, p_1**2, C) inputs of scale 1: the learned start embedding."""
        x_lC = self.start_emb + self.segment_emb.weight[SEG_SCALE0]
        return x_lC[None].expand(batch, -1, -1)

    def embed_scale_inputs(self, x_BnCv: torch.Tensor, first_scale: int = 1) -> torch.Tensor:
        """(B, n, code_dim) f_hat inputs of consecutive scales from ``first_scale`` -> (B, n, C)."""
        a = self.layout.n_cond + self.layout.scale_begin(first_scale)
        return self.code_proj(x_BnCv) + self.segment_emb(self.seg_T[a : a + x_BnCv.shape[1]])

    @torch.no_grad()
    def teacher_inputs(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs of scales 2..K, (B, L - p_1**2, code_dim), in full precision."""
        device_type = idx_list[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.quantizer.idx_to_teacher_inputs(list(idx_list))

    # -- training ---------------------------------------------------------------------------

    def scale_logits(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        x_BnCv: torch.Tensor,
    ) -> torch.Tensor:
        """Full block-causal pass -> (B, p_1**2 + n, Km) logits of scales 1..k.

        ``x_BnCv``: f_hat inputs of scales 2..k (n = sum_{j=2..k} p_j**2, may be 0), as built by
        the quantiser's ``idx_to_teacher_inputs`` / ``next_input``.
        """
        return self.head(
            self.teacher_forced_states(image, text_ids, text_mask, x_BnCv)[:, self.layout.n_cond :]
        )

    def teacher_forced_states(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        x_BnCv: torch.Tensor,
    ) -> torch.Tensor:
        """Full block-causal pass -> (B, T, C) hidden states of the condition (the image tokens,
        then the text) and scales 1..k (``x_BnCv`` as for :meth:`scale_logits`)."""
        lay = self.layout
        n = x_BnCv.shape[1]
        if n not in {
            lay.scale_begin(k) - lay.scale_lengths[0] for k in range(1, len(lay.scales) + 1)
        }:
            raise ValueError(f"{n} scale inputs do not end on a scale boundary")
        cond_BPC, valid_BP = self.embed_condition(image, text_ids, text_mask)
        B = cond_BPC.shape[0]
        x_BTC = torch.cat([cond_BPC, self.embed_start(B), self.embed_scale_inputs(x_BnCv)], 1)
        T = x_BTC.shape[1]
        valid_BT = torch.cat([valid_BP, valid_BP.new_ones(B, T - lay.n_cond)], 1)
        mask = self.mask_TT[:T, :T][None, None] & valid_BT[:, None, None, :]  # (B, 1, T, T)
        return self.transformer(x_BTC, self.pos_T2[:T], mask)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training losses.

        Keys: ``image`` (B, 1, S, S) float in [0, 1]; ``text_ids`` (B, L) int64 and ``text_mask``
        (B, L) bool (L <= text_len); ``ms_codes`` (B, L_total) int64, the per-scale index maps
        concatenated row-major, coarse to fine. Returns ``loss`` (CE over all scale tokens, see
        ``balance_scales``), ``ce_last`` and ``acc_last`` (finest scale), ``acc`` and ``logits``
        (B, L_total, Km).
        """
        lay = self.layout
        codes_BL = batch["ms_codes"]
        idx_list = split_scales(codes_BL, lay.scales)
        if int(codes_BL.min()) < 0 or int(codes_BL.max()) >= self.config.mask_codebook_size:
            raise ValueError(f"ms_codes must lie in [0, {self.config.mask_codebook_size})")
        x_BnCv = self.teacher_inputs(idx_list[:-1])
        h_BTC = self.teacher_forced_states(
            batch["image"], batch["text_ids"], batch["text_mask"], x_BnCv
        )
        logits_BLK = self.head(h_BTC[:, lay.n_cond :])
        ce_BL = F.cross_entropy(
            logits_BLK.flatten(0, 1).float(), codes_BL.flatten(), reduction="none"
        )
        ce_BL = ce_BL.view_as(codes_BL)
        per_scale = [c.mean() for c in torch.split(ce_BL, lay.scale_lengths, dim=1)]
        ce = torch.stack(per_scale).mean() if self.config.balance_scales else ce_BL.mean()
        dense = ce.new_zeros(())
        if self.dense is not None:
            dense = self.dense(h_BTC[:, : lay.n_image], batch.get("mask"))
        loss = ce + self.config.lambda_dense * dense
        with torch.no_grad():
            hit_BL = (logits_BLK.argmax(-1) == codes_BL).float()
            last = lay.scale_lengths[-1]
        return {
            "loss": loss,
            "ce": ce.detach(),
            "dense": dense.detach(),
            "ce_last": per_scale[-1].detach(),
            "acc": hit_BL.mean(),
            "acc_last": hit_BL[:, -last:].mean(),
            "logits": logits_BLK,
        }

    # -- inference --------------------------------------------------------------------------

    def setup_caches(
        self, max_batch: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        """Allocate static KV caches for ``max_batch`` sequences (no-op if suitable ones exist)."""
        self.transformer.ensure_caches(max_batch, self.layout.seq_len, dtype, device)

    def prefill(
        self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Run the condition and the start tokens into the caches -> (B, p_1**2, Km) scale-1 logits."""
        lay, tf = self.layout, self.transformer
        cond_BPC, valid_BP = self.embed_condition(image, text_ids, text_mask)
        B = cond_BPC.shape[0]
        tf.start_sequences(valid_BP)
        x_BPC = torch.cat([cond_BPC, self.embed_start(B)], 1)
        P = lay.prefill_len
        mask = self.mask_TT[:P, :P][None, None] & tf.key_padding(B, P)  # (B, 1, P, P)
        h_BPC = tf.forward_cached(x_BPC, self.pos_T2[:P], tf.slots_S[:P], mask)
        return self.head(h_BPC[:, lay.n_cond :])

    def repeat_cache(self, batch: int, samples: int) -> None:
        """After :meth:`prefill` of ``batch`` cases, copy case b to rows b*samples .. b*samples+samples-1.

        This shares one prefill among the samples of a case (the condition is the costly part).
        """
        if samples > 1:
            self.transformer.repeat_rows(batch, samples, self.layout.prefill_len)

    def decode_scale(self, k: int, x_BlCv: torch.Tensor) -> torch.Tensor:
        """Feed scale k's inputs (B, p_k**2, code_dim) (k >= 1) -> (B, p_k**2, Km) logits of scale k.

        ``x_BlCv`` is the quantiser's ``next_input`` after scale k-1; scales must come in order.
        Attention reads only cache slots [0, b), b = the end of scale k: a token of scale k sees
        all of them (block-causal), so the mask is the key padding alone.
        """
        lay, tf = self.layout, self.transformer
        if not 1 <= k < len(lay.scales):
            raise ValueError(
                f"decode_scale takes k in 1..{len(lay.scales) - 1} (scale 0 is in prefill), got {k}"
            )
        B, n, _ = x_BlCv.shape
        if n != lay.scale_lengths[k]:
            raise ValueError(f"scale {k} has {lay.scale_lengths[k]} tokens, got {n}")
        a, b = lay.scale_slots(k)
        x_BlC = self.embed_scale_inputs(x_BlCv, first_scale=k)
        h_BlC = tf.forward_cached(x_BlC, self.pos_T2[a:b], tf.slots_S[a:b], tf.key_padding(B, b))
        return self.head(h_BlC)


def _check_quantizer(cfg: NextScaleConfig, q: MultiScaleMaskQuantizer) -> None:
    """The quantiser must match the config: same scales, codebook size and code dim."""
    code_dim = q.empty_fhat(1, device="meta").shape[1]
    if tuple(q.scales) != tuple(cfg.scales):
        raise ConfigError(
            f"quantiser scales {tuple(q.scales)} differ from the model's {tuple(cfg.scales)}"
        )
    if q.codebook_size != cfg.mask_codebook_size:
        raise ConfigError(
            f"quantiser has {q.codebook_size} codes, the model expects {cfg.mask_codebook_size}"
        )
    if code_dim != cfg.code_dim:
        raise ConfigError(f"quantiser code_dim {code_dim} differs from the model's {cfg.code_dim}")
