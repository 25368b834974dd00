"""Next-token mask prediction: one decoder-only transformer over image, text and mask tokens.

Sequence (fixed layout, so a batch of prompts shares it)::

    [BOS] image (Gi*Gi) [BOT] text (text_len, padded) [BOM] mask (Gm*Gm, raster order)

One embedding table holds every token kind at an offset::

    0 .. 2                      BOS, BOT, BOM
    3 .. 3+Ki-1                 image codes        (absent when image_input == "pixels")
    image_end .. +Vt-1          text ids
    text_end .. +Km-1           mask codes

Padded text positions are hidden as attention keys, so no token ever reads them. The hidden
state before mask token n predicts it through a head over the mask codebook only; decoding is
therefore confined to mask codes, and no end-of-mask token is needed because the mask length
is fixed (Gm*Gm).

Entry points: :meth:`forward` (training, a dict of losses), :meth:`mask_logits` (teacher-forced
logits, the uncached reference), :meth:`teacher_forced_states` (the hidden states of that pass),
:meth:`setup_caches`, :meth:`prefill`, :meth:`decode_step`.

The prefix's states do not depend on the mask tokens (they come before them, and mask tokens are
never keys of a prefix query), so one pass over the prefix serves every part that reads it: the
cached prefill (:meth:`prefill_prefix`) returns its :class:`PrefixStates`, from which the
refiner and the dense head (:meth:`prefix_heads`) and the presence features are read;
:meth:`prefix_states` is the same pass without a cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrisegcli.errors import ConfigError
from mrisegcli.losses.dense import DensePrefixHead
from mrisegcli.losses.het import HardTokenMemory, weighted_ce
from mrisegcli.losses.nktp import NextKHeads
from mrisegcli.losses.presence import PresenceProbe
from mrisegcli.losses.tcl import TokenContrastive
from mrisegcli.models.image_encoder import ConvImageEncoder, ImageEncoderConfig
from mrisegcli.models.refiner import MaskRefiner
from mrisegcli.models.transformer import Transformer, TransformerConfig, causal_mask
from mrisegcli.settings import choices, model_fields

BOS, BOT, BOM = 0, 1, 2
N_SPECIAL = 3


#: the training strategies the model reads: one field per row of ``settings.SETTINGS`` that
#: names "next-token" in its ``models`` (its type, meaning and, for the runs saved before it
#: existed, its default come from there); ``paradigms.py`` fills them from the run's config
NextTokenStrategies = make_dataclass("NextTokenStrategies", model_fields("next-token"), frozen=True)
NextTokenStrategies.__module__ = __name__


@dataclass(frozen=True)
class NextTokenConfig(NextTokenStrategies):
    """Everything needed to rebuild a :class:`NextTokenSegmenter` (saved with each run): the
    strategies it reads (:data:`NextTokenStrategies`, declared in ``settings.py``), then the
    sizes of its parts and the constants of its losses."""

    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    image_codebook_size: int = 512
    image_grid: int = 16
    text_vocab_size: int = 8192
    text_len: int = 32
    mask_codebook_size: int = 512
    mask_grid: int = 16
    image_size: int = 256  # pixel side for image_input == "pixels"
    # pixels mode: conv encoder with patch = image_size / image_grid
    encoder: ImageEncoderConfig = field(default_factory=lambda: ImageEncoderConfig(patch=16))
    # TCL (lambda_tcl > 0): InfoNCE of hidden states vs mask-code embeddings
    tcl_tau: float = 0.1
    tcl_proj_dim: int = 128
    tcl_boundary_weight: float = 1.0
    tcl_rare_power: float = 0.5
    tcl_rare_max: float = 5.0
    # HET (het_alpha > 0): buckets of the hard-token memory (one per training sample)
    het_buckets: int = 4096
    # the refiner's (lambda_refine > 0) first width
    refine_width: int = 16

    def __post_init__(self) -> None:
        for f in fields(NextTokenStrategies):  # the settings with a fixed set of values
            allowed = choices(f.type)
            if allowed and getattr(self, f.name) not in allowed:
                raise ConfigError(
                    f"{f.name} must be {' or '.join(map(repr, allowed))}, got {getattr(self, f.name)!r}"
                )
        if self.image_input == "pixels" and self.encoder.grid(self.image_size) != self.image_grid:
            raise ConfigError(
                f"encoder patch {self.encoder.patch} turns image_size {self.image_size} into a "
                f"{self.encoder.grid(self.image_size)}-grid, not image_grid {self.image_grid}"
            )
        for name in (
            "image_codebook_size",
            "image_grid",
            "text_vocab_size",
            "text_len",
            "mask_codebook_size",
            "mask_grid",
            "nktp_k",
            "het_buckets",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        weights = [f.name for f in fields(NextTokenStrategies) if f.name.startswith("lambda_")]
        if min(getattr(self, name) for name in [*weights, "het_alpha"]) < 0:
            raise ConfigError("loss weights must be >= 0")
        for name in ("input_noise", "scheduled_sampling", "refine_code_noise"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        self._check_heads()

    def _check_heads(self) -> None:
        """What the dense head, the refiner and the cell image input need from the config."""
        if self.mask_cell_image and self.image_grid != self.mask_grid:
            raise ConfigError(
                f"mask_cell_image needs image_grid == mask_grid, got {self.image_grid} and {self.mask_grid}"
            )
        if self.lambda_refine > 0:
            if self.image_input != "pixels":
                raise ConfigError(
                    "lambda_refine > 0 needs image_input 'pixels' (the refiner reads the encoder's feature maps)"
                )
            if self.image_grid != self.mask_grid:
                raise ConfigError(
                    f"the refiner needs image_grid == mask_grid, got {self.image_grid} and {self.mask_grid}"
                )
            if self.refine_width < 1:
                raise ConfigError(f"refine_width must be positive, got {self.refine_width}")
        if self.lambda_dense > 0:
            if self.prefix_attention != "bidirectional":
                raise ConfigError(
                    "lambda_dense > 0 needs prefix_attention 'bidirectional' (image tokens must read the text)"
                )
            if self.image_size % self.image_grid:
                raise ConfigError(
                    f"image_size {self.image_size} is not a multiple of image_grid {self.image_grid}"
                )


@dataclass(frozen=True)
class SequenceLayout:
    """Token counts, vocabulary offsets and sequence indices derived from a config."""

    n_image: int
    n_text: int
    n_mask: int
    image_offset: int
    text_offset: int
    mask_offset: int
    vocab_size: int

    @classmethod
    def from_config(cls, cfg: NextTokenConfig) -> SequenceLayout:
        n_img_codes = cfg.image_codebook_size if cfg.image_input == "codes" else 0
        text_offset = N_SPECIAL + n_img_codes
        mask_offset = text_offset + cfg.text_vocab_size
        return cls(
            n_image=cfg.image_grid**2,
            n_text=cfg.text_len,
            n_mask=cfg.mask_grid**2,
            image_offset=N_SPECIAL,
            text_offset=text_offset,
            mask_offset=mask_offset,
            vocab_size=mask_offset + cfg.mask_codebook_size,
        )

    @property
    def prefix_len(self) -> int:
        """BOS + image + BOT + text + BOM: what prefill consumes."""
        return self.n_image + self.n_text + 3

    @property
    def input_len(self) -> int:
        """Longest input: the prefix plus all mask tokens but the last (never fed back)."""
        return self.prefix_len + self.n_mask - 1


def sequence_positions(cfg: NextTokenConfig) -> torch.Tensor:
    """(input_len, 2) float (row, col) RoPE positions of the whole sequence.

    Image tokens sit on their grid (0..Gi-1); BOS, BOT, text and BOM lie on the diagonal
    (t, t) just outside the image (BOS at -1, the rest from Gi on); mask tokens share the image
    coordinates (cell centres rescaled when Gm != Gi). With ``mask_positions`` "fed" the token
    that feeds code n-1 sits on cell n-1; with "target" it sits on cell n, the cell its state
    predicts (and BOM, which predicts cell 0, on cell 0), so that the query predicting a cell
    and the image patch under it are at relative offset zero.
    """
    gi, gm, L = cfg.image_grid, cfg.mask_grid, cfg.text_len
    r, c = torch.meshgrid(torch.arange(gi), torch.arange(gi), indexing="ij")
    img = torch.stack([r.flatten(), c.flatten()], -1).float()  # (Ni, 2)
    diag = torch.arange(gi, gi + L + 2, dtype=torch.float32)  # BOT, text, BOM
    diag = torch.stack([diag, diag], -1)  # (L + 2, 2)
    rm, cm = torch.meshgrid(torch.arange(gm), torch.arange(gm), indexing="ij")
    scale = gi / gm
    msk = torch.stack([rm.flatten(), cm.flatten()], -1).float()
    msk = (msk + 0.5) * scale - 0.5  # (Nm, 2) in image-grid units
    bos = torch.full((1, 2), -1.0)
    if cfg.mask_positions == "target":
        return torch.cat([bos, img, diag[:1], diag[1:-1], msk])
    return torch.cat([bos, img, diag[:1], diag[1:-1], diag[-1:], msk[:-1]])


def sequence_mask(
    n: int, prefix_len: int, bidirectional: bool, device: torch.device | None = None
) -> torch.Tensor:
    """(n, n) bool structural mask of the first ``n`` sequence tokens (True = may attend).

    Causal everywhere, except that with ``bidirectional`` every token also sees the whole
    prefix (BOS..BOM, the first ``prefix_len`` tokens): a prefix LM. Mask tokens never see
    later mask tokens either way, so cached decoding is unchanged.
    """
    mask = causal_mask(n, device=device)
    if bidirectional:
        mask = mask | (torch.arange(n, device=device) < prefix_len)[None, :]
    return mask


@dataclass
class PrefixStates:
    """One pass over the prefix BOS..BOM: what the parts that read the prefix need."""

    h_BPC: torch.Tensor  # (B, P, C) final hidden states; row 1 + i: image token i, row P - 1: BOM
    skips: list[torch.Tensor]  # the image encoder's feature maps, finest first (pixels mode)


def _check_range(name: str, t: torch.Tensor, n: int) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"{name} must lie in [0, {n}), got range [{int(t.min())}, {int(t.max())}]")


class NextTokenSegmenter(nn.Module):
    """Image + text prompt -> mask codes, one token at a time."""

    def __init__(self, cfg: NextTokenConfig) -> None:
        super().__init__()
        self.config = cfg
        self.layout = SequenceLayout.from_config(cfg)
        dim = cfg.transformer.dim
        if self.layout.input_len > cfg.transformer.max_seq_len:
            raise ConfigError(
                f"sequence of {self.layout.input_len} tokens exceeds max_seq_len {cfg.transformer.max_seq_len}"
            )
        self.tok_emb = nn.Embedding(self.layout.vocab_size, dim)
        # pixels mode: the image goes through a conv encoder trained end to end (one token per
        # image_size / image_grid pixels), projected to the transformer width
        self.encoder = (
            ConvImageEncoder(cfg.encoder, cfg.image_size) if cfg.image_input == "pixels" else None
        )
        self.image_proj = nn.Linear(cfg.encoder.out_dim, dim) if self.encoder is not None else None
        self.transformer = Transformer(cfg.transformer)
        self.mask_head = nn.Linear(dim, cfg.mask_codebook_size, bias=False)
        self.nktp = NextKHeads(dim, cfg.nktp_k, cfg.nktp_gamma) if cfg.nktp_k > 1 else None
        self.tcl = (
            TokenContrastive(
                dim,
                cfg.mask_codebook_size,
                cfg.tcl_proj_dim,
                cfg.tcl_tau,
                cfg.tcl_boundary_weight,
                cfg.tcl_rare_power,
                cfg.tcl_rare_max,
            )
            if cfg.lambda_tcl > 0
            else None
        )
        self.het_memory = (
            HardTokenMemory(cfg.het_buckets, self.layout.n_mask, cfg.het_decay)
            if cfg.het_alpha > 0
            else None
        )
        self.register_buffer("pos_T2", sequence_positions(cfg), persistent=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.mask_head.weight, std=0.02)
        # built last, so switching it on leaves every other initial weight as it was
        self.dense = (
            DensePrefixHead(dim, cfg.image_grid, cfg.image_size // cfg.image_grid)
            if cfg.lambda_dense > 0
            else None
        )
        self.refiner = (
            MaskRefiner(
                cfg.mask_codebook_size,
                cfg.mask_grid,
                dim,
                self.encoder.skip_channels(),
                cfg.refine_width,
                cfg.refine_full_res,
            )
            if cfg.lambda_refine > 0 and self.encoder is not None
            else None
        )
        # (B, Nm, C) projected image tokens of the cells, filled by prefill for decoding
        self.cell_proj = nn.Linear(dim, dim, bias=False) if cfg.mask_cell_image else None
        self._cells_BNC: torch.Tensor | None = None
        # built after every other module, so switching it on leaves their initial weights
        self.presence_probe = PresenceProbe(dim) if cfg.lambda_presence > 0 else None

    # -- sequence building ------------------------------------------------------------------

    def _structure(self, n: int, device: torch.device) -> torch.Tensor:
        bidirectional = self.config.prefix_attention == "bidirectional"
        return sequence_mask(n, self.layout.prefix_len, bidirectional, device)

    def _pad_text(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = text_ids.shape
        n = self.layout.n_text
        if L > n:
            raise ValueError(f"text has {L} tokens, the model takes at most text_len={n}")
        if text_mask.shape != text_ids.shape:
            raise ValueError(
                f"text_mask {tuple(text_mask.shape)} does not match text_ids {tuple(text_ids.shape)}"
            )
        if L < n:
            text_ids = F.pad(text_ids, (0, n - L))
            text_mask = F.pad(text_mask, (0, n - L))
        return text_ids, text_mask.bool()

    def _embed_prefix(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        skips: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B, P, C) prefix embeddings and (B, P) key validity (False at text padding).
        ``skips``, when given a list, receives the image encoder's feature maps."""
        lay, cfg = self.layout, self.config
        text_ids, text_mask = self._pad_text(text_ids, text_mask)
        B = text_ids.shape[0]
        _check_range("text ids", text_ids, cfg.text_vocab_size)
        if self.encoder is not None:
            tokens_BND, maps = self.encoder.pyramid(image)
            if skips is not None:
                skips.extend(maps)
            img_BNC = self.image_proj(tokens_BND)  # (B, Gi*Gi, C)
        else:
            if image.shape[1:] != (cfg.image_grid, cfg.image_grid):
                raise ValueError(
                    f"expected image codes (B, {cfg.image_grid}, {cfg.image_grid}), got {tuple(image.shape)}"
                )
            _check_range("image codes", image, cfg.image_codebook_size)
            img_BNC = self.tok_emb(image.flatten(1) + lay.image_offset)
        if img_BNC.shape[0] != B:
            raise ValueError(f"batch of {img_BNC.shape[0]} images but {B} texts")
        img_BNC = img_BNC.to(self.tok_emb.weight.dtype)
        special = self.tok_emb.weight[:N_SPECIAL]  # (3, C)
        sp = special[None].expand(B, -1, -1)
        txt_BLC = self.tok_emb(text_ids + lay.text_offset)
        x_BPC = torch.cat(
            [sp[:, BOS : BOS + 1], img_BNC, sp[:, BOT : BOT + 1], txt_BLC, sp[:, BOM : BOM + 1]], 1
        )
        ones = text_mask.new_ones(B, lay.n_image + 2)
        valid_BP = torch.cat([ones, text_mask, ones[:, :1]], 1)
        return x_BPC, valid_BP

    def teacher_forced_states(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        mask_codes_BN: torch.Tensor,
        skips: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Teacher-forced pass over the prefix and the N mask codes ``mask_codes_BN`` (B, N)
        (N may be 0) -> (B, P+N, C) hidden states: row 1 + i is image token i, row P - 1 + n
        the state that predicts mask code n. ``skips``, when given a list, receives the image
        encoder's feature maps. Uncached; what training, the heads and the presence score read."""
        lay = self.layout
        N = mask_codes_BN.shape[1]
        if N >= lay.n_mask:
            raise ValueError(f"at most {lay.n_mask - 1} mask tokens can be fed, got {N}")
        x_BPC, valid_BP = self._embed_prefix(image, text_ids, text_mask, skips)
        m_BNC = self.tok_emb(mask_codes_BN + lay.mask_offset)
        if self.cell_proj is not None and N > 0:  # fed code n predicts cell n + 1
            m_BNC = m_BNC + self._cell_inputs(x_BPC)[:, 1 : N + 1]
        x_BTC = torch.cat([x_BPC, m_BNC], 1)
        T = x_BTC.shape[1]
        valid_BT = torch.cat([valid_BP, valid_BP.new_ones(valid_BP.shape[0], N)], 1)
        mask = (
            self._structure(T, x_BTC.device)[None, None] & valid_BT[:, None, None, :]
        )  # (B, 1, T, T)
        return self.transformer(x_BTC, self.pos_T2[:T], mask)

    def _cell_inputs(self, x_BPC: torch.Tensor) -> torch.Tensor:
        """Prefix embeddings -> (B, Nm, C) the cell image inputs (row n: mask cell n)."""
        assert self.cell_proj is not None
        return self.cell_proj(x_BPC[:, 1 : 1 + self.layout.n_image])

    def _mask_hidden(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        mask_codes_BN: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced pass -> (B, N+1, C) hidden states that predict mask tokens 0..N."""
        return self.teacher_forced_states(image, text_ids, text_mask, mask_codes_BN)[
            :, self.layout.prefix_len - 1 :
        ]

    # -- training ---------------------------------------------------------------------------

    def mask_logits(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        mask_codes_BN: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, N+1, Km) for mask tokens 0..N given the first N codes."""
        return self.mask_head(self._mask_hidden(image, text_ids, text_mask, mask_codes_BN))

    def scheduled_inputs(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        codes_BN: torch.Tensor,
    ) -> torch.Tensor:
        """The (B, N-1) teacher-forced inputs with scheduled sampling: each of the true codes
        0..N-2 is replaced, with probability ``scheduled_sampling``, by the model's own greedy
        prediction of it from the true codes before it (one pass without gradients)."""
        inputs_BN = codes_BN[:, :-1]
        with torch.no_grad():
            own_BN = self.mask_logits(image, text_ids, text_mask, inputs_BN).argmax(-1)[:, :-1]
        fed = torch.rand(inputs_BN.shape, device=inputs_BN.device) < self.config.scheduled_sampling
        return torch.where(fed, own_BN, inputs_BN)

    def _teacher_inputs(
        self, image: torch.Tensor, batch: Mapping[str, torch.Tensor], codes_BN: torch.Tensor
    ) -> torch.Tensor:
        """The (B, N-1) mask codes a teacher-forced pass reads: the true codes 0..N-2, in
        training with scheduled sampling, then input noise, applied."""
        cfg = self.config
        inputs_BN = codes_BN[:, :-1]
        if not self.training:
            return inputs_BN
        if cfg.scheduled_sampling > 0:
            inputs_BN = self.scheduled_inputs(
                image, batch["text_ids"], batch["text_mask"], codes_BN
            )
        if cfg.input_noise > 0:
            noisy = torch.rand(inputs_BN.shape, device=inputs_BN.device) < cfg.input_noise
            random_BN = torch.randint_like(inputs_BN, cfg.mask_codebook_size)
            inputs_BN = torch.where(noisy, random_BN, inputs_BN)
        return inputs_BN

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training losses for a batch.

        Keys: ``image_codes`` (B, Gi, Gi) int64 or ``image`` (B, 1, S, S) float (pixels mode);
        ``text_ids`` (B, L) int64 and ``text_mask`` (B, L) bool (L <= text_len); ``mask_codes``
        (B, Gm, Gm) int64; ``sample_ids`` (B,) int64 (needed when HET is on and training).
        Returns ``loss`` = ce + lambda_nktp * nktp + lambda_tcl * tcl + lambda_dense * dense +
        lambda_refine * refine + lambda_presence * presence (the terms that are on), every term, ``ce_plain``
        (unweighted CE), ``het_weight`` (mean CE weight), ``acc`` and ``logits`` (B, Gm*Gm, Km).
        """
        cfg, lay = self.config, self.layout
        image = batch["image"] if cfg.image_input == "pixels" else batch["image_codes"]
        codes_BHW = batch["mask_codes"]
        if codes_BHW.shape[1:] != (cfg.mask_grid, cfg.mask_grid):
            raise ValueError(
                f"expected mask codes (B, {cfg.mask_grid}, {cfg.mask_grid}), got {tuple(codes_BHW.shape)}"
            )
        _check_range("mask codes", codes_BHW, cfg.mask_codebook_size)
        codes_BN = codes_BHW.flatten(1)
        inputs_BN = self._teacher_inputs(image, batch, codes_BN)
        skips: list[torch.Tensor] = []
        h_BTC = self.teacher_forced_states(
            image, batch["text_ids"], batch["text_mask"], inputs_BN, skips
        )
        h_BNC = h_BTC[:, lay.prefix_len - 1 :]
        logits_BNK = self.mask_head(h_BNC)
        ce_plain = F.cross_entropy(logits_BNK.flatten(0, 1).float(), codes_BN.flatten())
        zero = ce_plain.new_zeros(())

        ce, het_weight = ce_plain, zero + 1.0
        if self.het_memory is not None and self.training:
            if "sample_ids" not in batch:
                raise KeyError("HET is on: the batch needs 'sample_ids' (B,) int64")
            ids_B = batch["sample_ids"]
            w_BN = self.het_memory.weights(ids_B, cfg.het_alpha)
            ce = weighted_ce(logits_BNK, codes_BN, w_BN)
            het_weight = w_BN.mean()
            self.het_memory.update(ids_B, logits_BNK.detach().argmax(-1) != codes_BN)

        nktp = self.nktp(h_BNC, codes_BN, self.mask_head) if self.nktp is not None else zero
        if self.tcl is not None:
            code_emb_KC = self.tok_emb.weight[
                lay.mask_offset : lay.mask_offset + cfg.mask_codebook_size
            ]
            tcl = self.tcl(h_BNC, code_emb_KC, codes_BHW)
        else:
            tcl = zero
        dense = (
            self.dense(h_BTC[:, 1 : 1 + lay.n_image], batch.get("mask"))
            if self.dense is not None
            else zero
        )
        refine = zero
        if self.refiner is not None:  # from the codes the model itself predicts (teacher forced)
            predicted_BHW = logits_BNK.detach().argmax(-1).view_as(codes_BHW)
            if self.training and cfg.refine_code_noise > 0:
                noisy = (
                    torch.rand(predicted_BHW.shape, device=predicted_BHW.device)
                    < cfg.refine_code_noise
                )
                predicted_BHW = torch.where(
                    noisy, torch.randint_like(predicted_BHW, cfg.mask_codebook_size), predicted_BHW
                )
            refined = self.refiner(predicted_BHW, h_BTC[:, 1 : 1 + lay.n_image], skips, image)
            refine = self.refiner.loss(refined, batch.get("mask"))
        presence = zero
        if self.presence_probe is not None:
            presence = self.presence_probe.loss(
                h_BTC[:, 1 : 1 + lay.n_image], h_BTC[:, lay.prefix_len - 1], batch.get("mask")
            )
        loss = ce + cfg.lambda_presence * presence
        if self.dense is not None:
            loss = loss + cfg.lambda_dense * dense
        if self.refiner is not None:
            loss = loss + cfg.lambda_refine * refine
        if self.nktp is not None:
            loss = loss + cfg.lambda_nktp * nktp
        if self.tcl is not None:
            loss = loss + cfg.lambda_tcl * tcl
        with torch.no_grad():
            acc = (logits_BNK.argmax(-1) == codes_BN).float().mean()
        return {
            "loss": loss,
            "ce": ce,
            "ce_plain": ce_plain,
            "nktp": nktp,
            "tcl": tcl,
            "dense": dense,
            "refine": refine,
            "presence": presence,
            "het_weight": het_weight,
            "acc": acc,
            "logits": logits_BNK,
        }

    # -- inference --------------------------------------------------------------------------

    def mask_outputs(
        self,
        image: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        codes_BHW: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One pass over the prefix -> the (B, 1, S, S) logits of the heads that are on
        (:meth:`prefix_heads`). A decoder that has the prefill's :class:`PrefixStates` passes
        those to :meth:`prefix_heads` instead."""
        return self.prefix_heads(self.prefix_states(image, text_ids, text_mask), image, codes_BHW)

    def prefix_states(
        self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> PrefixStates:
        """The uncached pass over the prefix (no mask tokens) -> its :class:`PrefixStates`:
        the same states as :meth:`prefill_prefix`, without touching the caches."""
        skips: list[torch.Tensor] = []
        h_BPC = self.teacher_forced_states(
            image, text_ids, text_mask, text_ids.new_zeros(text_ids.shape[0], 0), skips
        )
        return PrefixStates(h_BPC, skips)

    def image_states(self, prefix: PrefixStates) -> torch.Tensor:
        """(B, Gi*Gi, C) the final, text-aware states of the image tokens."""
        return prefix.h_BPC[:, 1 : 1 + self.layout.n_image]

    def prefix_heads(
        self, prefix: PrefixStates, image: torch.Tensor, codes_BHW: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The prefix's states -> the (B, 1, S, S) logits of the heads that are on:
        ``refined`` (the refiner on the decided ``codes_BHW``, the image-token states and the
        encoder's maps) and ``dense`` (the dense supervision head, which never reads the codes)."""
        states_BNC = self.image_states(prefix)
        out: dict[str, torch.Tensor] = {}
        if self.refiner is not None:
            out["refined"] = self.refiner(codes_BHW, states_BNC, prefix.skips, image)
        if self.dense is not None:
            out["dense"] = self.dense.logits(states_BNC)
        return out

    def setup_caches(
        self, max_batch: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        """Allocate static KV caches for ``max_batch`` sequences (no-op if suitable ones exist),
        and the RoPE rotation of every sequence position, so that a decode step computes none."""
        self.transformer.ensure_caches(max_batch, self.layout.input_len, dtype, device)
        self._rot_table()
        if self.cell_proj is not None:  # a static buffer, so that a compiled step can read it
            dtype = dtype or self.tok_emb.weight.dtype
            device = device or self.tok_emb.weight.device
            cells = self._cells_BNC
            if (
                cells is None
                or cells.shape[0] < max_batch
                or cells.dtype != dtype
                or cells.device != torch.device(device)
            ):
                shape = (max_batch, self.layout.n_mask, self.config.transformer.dim)
                self._cells_BNC = torch.zeros(shape, dtype=dtype, device=device)

    def _rot_table(self) -> torch.Tensor:
        """RoPE rotation (input_len, D/2, 2) of every position, computed once per device
        (each row has the bits :meth:`Transformer.rotation` gives for that position alone)."""
        rot = getattr(self, "_rot_T", None)
        if rot is None or rot.device != self.pos_T2.device:
            rot = self._rot_T = self.transformer.rotation(self.pos_T2)
        return rot

    def prefill(
        self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Run BOS..BOM into the caches -> (B, Km) logits of the first mask token."""
        return self.mask_head(self.prefill_state(image, text_ids, text_mask))

    def prefill_state(
        self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Run BOS..BOM into the caches -> (B, C) hidden state that predicts mask token 0."""
        return self.prefill_prefix(image, text_ids, text_mask).h_BPC[:, -1]

    def prefill_prefix(
        self, image: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> PrefixStates:
        """Run BOS..BOM into the caches -> the pass's :class:`PrefixStates` (its last state
        predicts mask token 0; the heads and the presence features read the rest)."""
        skips: list[torch.Tensor] = []
        x_BPC, valid_BP = self._embed_prefix(image, text_ids, text_mask, skips)
        B, P, _ = x_BPC.shape
        if self.cell_proj is not None:
            if self._cells_BNC is None or self._cells_BNC.shape[0] < B:
                raise RuntimeError("call setup_caches(max_batch) before prefill")
            self._cells_BNC[:B].copy_(self._cell_inputs(x_BPC))
        tf = self.transformer
        tf.start_sequences(valid_BP)
        mask = self._structure(P, x_BPC.device)[None, None] & tf.key_padding(B, P)  # (B, 1, P, P)
        h_BPC = tf.forward_cached(x_BPC, self.pos_T2[:P], tf.slots_S[:P], mask)
        return PrefixStates(h_BPC, skips)

    def decode_block(self, tok_BT: torch.Tensor, first: int) -> torch.Tensor:
        """Feed T consecutive mask codes per sequence at cache slots first .. first+T-1, each
        attending to the filled slots up to its own, -> (B, T, C) hidden states; state t predicts
        the code after ``tok_BT[:, t]``. Slots [0, first + T) are read.

        Like :meth:`decode_next`, nothing is built per pass but the mask (one add of two views):
        positions, rotations and cell inputs are slices."""
        tf = self.transformer
        B, T = tok_BT.shape
        return tf.forward_step(
            self._embed_mask_codes(tok_BT, first),
            self._rot_table()[first : first + T],
            tf.slots_S[first : first + T],
            tf.block_bias(B, first, T),
        )

    def _embed_mask_codes(self, tok_BT: torch.Tensor, slots_T: torch.Tensor | int) -> torch.Tensor:
        """Embeddings of mask codes (B, T) fed at cache slots ``slots_T`` (T,) (or the first
        slot, an int) -> (B, T, C): rows of the mask-code block of ``tok_emb`` (the same values
        as ``tok_emb(tok + mask_offset)``, one kernel fewer), plus the cell image inputs that
        :meth:`prefill_state` stored when ``mask_cell_image`` is on."""
        off = self.layout.mask_offset
        x_BTC = F.embedding(tok_BT, self.tok_emb.weight[off : off + self.config.mask_codebook_size])
        if self.cell_proj is None:
            return x_BTC
        assert self._cells_BNC is not None
        B, T = tok_BT.shape
        first = 1 - self.layout.prefix_len  # the code fed at slot s predicts cell s + first
        if isinstance(slots_T, int):
            cells_BTC = self._cells_BNC[:B, slots_T + first : slots_T + first + T]
        else:
            cells_BTC = self._cells_BNC[:B].index_select(1, slots_T + first)
        return x_BTC + cells_BTC.to(x_BTC.dtype)

    def decode_next(self, tok_B: torch.Tensor, n_keys: int) -> torch.Tensor:
        """Feed mask codes ``tok_B`` (B,) at cache slot ``n_keys - 1``, the first free one, so the
        filled slots [0, n_keys) are exactly the keys -> (B, Km) next logits.

        The fast eager step: the rotation is a row of the table made by :meth:`setup_caches`,
        the mask a view of the key padding's additive form; nothing is built per step.
        """
        tf = self.transformer
        slot = n_keys - 1
        h_B1C = tf.forward_step(
            self._embed_mask_codes(tok_B[:, None], slot),
            self._rot_table()[slot : slot + 1],
            tf.slots_S[slot:n_keys],
            tf.key_bias(tok_B.shape[0], n_keys),
        )
        return F.linear(h_B1C[:, -1], self.mask_head.weight)

    def draft_logits(self, h_xC: torch.Tensor) -> torch.Tensor:
        """(..., C) states -> (..., k, Km) logits of the next k codes: the main head, then the
        NkTP heads (k = 1 without them). Only the first is exact; the rest are guesses to verify.

        Inference form, a handful of kernels for any number of states: the adapters as one
        matmul (:meth:`NextKHeads.adapted`), then the shared head over the k inputs at once.
        """
        heads_xkC = h_xC[..., None, :]
        if self.nktp is not None:
            heads_xkC = torch.cat([heads_xkC, self.nktp.adapted(h_xC)], -2)
        return F.linear(heads_xkC, self.mask_head.weight)

    def decode_step(
        self, tok_B: torch.Tensor, input_pos: torch.Tensor, n_keys: int | None = None
    ) -> torch.Tensor:
        """Feed mask codes ``tok_B`` (B,) at cache slot ``input_pos`` (1,) -> (B, Km) next logits.

        Mask token n goes to slot ``layout.prefix_len + n``. Attention reads cache slots
        [0, ``n_keys``): ``input_pos + 1`` (the filled prefix) is the fast choice; the default,
        the whole cache, keeps every shape fixed from step to step, as CUDA graphs need.
        """
        tf = self.transformer
        B = tok_B.shape[0]
        n_keys = tf.max_len if n_keys is None else n_keys
        x_B1C = self._embed_mask_codes(tok_B[:, None], input_pos)
        bias = tf.key_bias(B, n_keys).masked_fill(
            tf.slots_S[:n_keys] > input_pos, float("-inf")
        )  # (B, 1, 1, S)
        h_B1C = tf.forward_step(x_B1C, self._rot_table()[input_pos], input_pos, bias)
        return F.linear(h_B1C[:, -1], self.mask_head.weight)
