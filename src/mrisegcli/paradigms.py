"""One object per paradigm: what it needs, how it is built, trained and decoded.

Everything that differs between next-token and next-scale prediction lives here, behind one
interface (:class:`Paradigm`); the rest of the package asks :func:`get_paradigm` for the run's
paradigm and never compares paradigm names. Adding a third paradigm means writing one class
here and adding its name to ``config.Paradigm``.

Both decoders answer the same call, :meth:`Paradigm.decode`: a batch of images and prompts in,
:class:`Decoded` out -- mask logits at the model's input size for every drawn sample (samples
of one image adjacent), optionally the same codes drawn by each part of the model
(``parts``) and the mask after each coarse-to-fine step (``steps``), and, when asked
(``presence``), the prefix states the presence head reads, taken from the decoder's own pass
over the prefix so that no second pass is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import nn

from mrisegcli.config import RunConfig, from_dict
from mrisegcli.errors import ConfigError, MrisegError


@dataclass(frozen=True)
class DecodeOptions:
    samples: int = 1  # masks drawn per image (temperature 0 draws the same one)
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    generator: torch.Generator | None = None
    steps: bool = False  # also the mask after each step (paradigms with ``has_steps``)
    parts: bool = False  # also each part's mask from the same codes
    speculative: bool = True  # greedy next-token decoding drafted by the NkTP heads
    compile: bool = False
    amp_dtype: torch.dtype | None = None
    presence: bool = False  # also the states the presence head reads (Decoded.presence_states)


@dataclass
class Decoded:
    logits: torch.Tensor  # (B * samples, 1, S, S): the model's answer
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B * samples, 1, S, S)
    steps: list[torch.Tensor] | None = None  # (B * samples, 1, S, S) after each step
    # with ``DecodeOptions.presence``: the (B, N, C) image-token states and (B, C) mask-start
    # states (one row per image, not per sample; :meth:`Paradigm.presence_states`) from the
    # decoder's own pass; None when it has none (the caller runs presence_states itself)
    presence_states: tuple[torch.Tensor, torch.Tensor] | None = None


def _seq_room(transformer: Any, needed: int) -> Any:
    return (
        transformer
        if transformer.max_seq_len >= needed
        else replace(transformer, max_seq_len=needed)
    )


class Paradigm:
    """The interface; see :class:`NextToken` and :class:`NextScale`."""

    name: ClassVar[str]
    #: the decoder can report the mask after each coarse-to-fine step
    has_steps: ClassVar[bool] = False
    #: ``evaluate --teacher-forced`` applies
    teacher_forcing: ClassVar[bool] = False
    #: decoding is drafted by the model's own heads (``mriseg draft-heads`` applies)
    drafts: ClassVar[bool] = False

    def tokenizers(self, image_input: str) -> tuple[str, ...]:
        """Names of the image/mask tokenizers a run needs (the text tokenizer always)."""
        raise NotImplementedError

    def ceiling_tokenizer(self, bundle: Any) -> Any:
        """The mask tokenizer whose reconstruction bounds this paradigm's Dice."""
        raise NotImplementedError

    def model_input(self, model: nn.Module, bundle: Any, image_B1SS: torch.Tensor) -> torch.Tensor:
        """What the model reads of (B, 1, S, S) images: the pixels by default."""
        return image_B1SS

    def model_config(self, cfg: RunConfig, bundle: Any, n_train: int) -> Any:
        """The model config of a run: the preset's transformer, sized by the tokenizers."""
        raise NotImplementedError

    def config_from_dict(self, d: dict) -> Any:
        raise NotImplementedError

    def build(self, mcfg: Any, bundle: Any) -> nn.Module:
        raise NotImplementedError

    def training_tensors(self, codes: Any, mcfg: Any) -> dict[str, torch.Tensor]:
        """Cached codes of a split (``LoadedCodes.fields``) -> the batch dict the model trains on."""
        raise NotImplementedError

    def decode(
        self,
        model: nn.Module,
        bundle: Any,
        image_B1SS: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        opts: DecodeOptions,
        cache: dict[str, Any],
    ) -> Decoded:
        """Images (B, 1, S, S) in [0, 1] and prompts -> :class:`Decoded`. ``cache`` is the
        caller's per-model dict for things worth keeping between calls."""
        raise NotImplementedError

    def presence_states(
        self, model: nn.Module, x: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over image and text (``x``: :meth:`model_input`) -> the (B, N, C) text-aware
        image-token states and the (B, C) state that starts the mask (``presence.py``)."""
        raise NotImplementedError


def image_pixels(codes: Any) -> torch.Tensor:
    """The cached uint8 images of a split as the (N, 1, S, S) float input in [0, 1]."""
    return codes.fields["image"].float().div(255.0)[:, None]


def _common_tensors(codes: Any, mcfg: Any, pixels: bool) -> dict[str, torch.Tensor]:
    f = codes.fields
    data = {"text_ids": f["text_ids"].long(), "text_mask": f["text_mask"].bool()}
    if pixels:
        data["image"] = image_pixels(codes)
    if any(getattr(mcfg, w, 0.0) > 0 for w in ("lambda_dense", "lambda_refine", "lambda_presence")):
        data["mask"] = f["mask"]  # (N, S, S) uint8 0/1, the dense, refiner and presence target
    return data


def _shared_fields(section: Any, strategies: type) -> dict[str, Any]:
    """The values of ``section`` (the run's ``strategies``) for every field of ``strategies``
    (``NextTokenStrategies``, ``NextScaleStrategies``: the settings whose row names the
    model's paradigm)."""
    return {f.name: getattr(section, f.name) for f in fields(strategies)}


class NextToken(Paradigm):
    """NTP-MRISeg: one sequence of image, text and mask tokens, mask codes one at a time."""

    name = "next-token"
    teacher_forcing = True
    drafts = True

    def tokenizers(self, image_input: str) -> tuple[str, ...]:
        return ("mask_vq", "image_vq") if image_input == "codes" else ("mask_vq",)

    def ceiling_tokenizer(self, bundle: Any) -> Any:
        return bundle.mask_vq

    def model_config(self, cfg: RunConfig, bundle: Any, n_train: int) -> Any:
        from mrisegcli.models.image_encoder import ImageEncoderConfig
        from mrisegcli.models.next_token import NextTokenConfig, NextTokenStrategies, SequenceLayout
        from mrisegcli.tokenizers.text import text_vocab_size

        s, mask = cfg.strategies, bundle.mask_vq
        if mask is None:
            raise ConfigError("the next-token paradigm needs a mask tokenizer (mask_vq)")
        use_codes = s.image_input == "codes"
        if use_codes and bundle.image_vq is None:
            raise ConfigError("image_input 'codes' needs an image tokenizer (image_vq)")
        mc = NextTokenConfig(
            transformer=cfg.transformer,
            image_codebook_size=bundle.image_vq.codebook_size if use_codes else 1,
            image_grid=bundle.image_vq.grid if use_codes else mask.grid,
            text_vocab_size=text_vocab_size(bundle.text),
            text_len=cfg.text_len,
            mask_codebook_size=mask.codebook_size,
            mask_grid=mask.grid,
            image_size=cfg.image_size,
            encoder=ImageEncoderConfig(
                patch=max(2, cfg.image_size // mask.grid), stage_blocks=s.encoder_stage_blocks
            ),
            **_shared_fields(s, NextTokenStrategies),
            het_buckets=max(1, n_train),
        )
        return replace(
            mc, transformer=_seq_room(mc.transformer, SequenceLayout.from_config(mc).input_len)
        )

    def config_from_dict(self, d: dict) -> Any:
        from mrisegcli.models.next_token import NextTokenConfig

        return from_dict(NextTokenConfig, d, "config.model")

    def build(self, mcfg: Any, bundle: Any) -> nn.Module:
        from mrisegcli.models.next_token import NextTokenSegmenter

        return NextTokenSegmenter(mcfg)

    def training_tensors(self, codes: Any, mcfg: Any) -> dict[str, torch.Tensor]:
        data = _common_tensors(codes, mcfg, pixels=mcfg.image_input == "pixels")
        f = codes.fields
        if mcfg.image_input == "codes":
            data["image_codes"] = f["image_codes"].long()
        data["mask_codes"] = f["mask_codes"].long()
        data["sample_ids"] = torch.arange(len(codes.ids)) % mcfg.het_buckets
        return data

    def model_input(self, model: nn.Module, bundle: Any, image_B1SS: torch.Tensor) -> torch.Tensor:
        return (
            bundle.image_vq.encode(image_B1SS)
            if model.config.image_input == "codes"
            else image_B1SS
        )

    def decode(
        self,
        model: nn.Module,
        bundle: Any,
        image_B1SS: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        opts: DecodeOptions,
        cache: dict[str, Any],
    ) -> Decoded:
        x = self.model_input(model, bundle, image_B1SS)
        if opts.samples > 1:
            x, text_ids, text_mask = (
                t.repeat_interleave(opts.samples, 0) for t in (x, text_ids, text_mask)
            )
        out = self._codes(model, x, text_ids, text_mask, opts, cache)
        tokens = bundle.mask_vq.decode(out.codes)
        heads = model.refiner is not None or (opts.parts and model.dense is not None)
        if not (heads or opts.presence):
            return Decoded(tokens)
        # the prefill's pass over the prefix serves the heads and the presence features; a
        # prefill under autocast gave none, and one full-precision pass serves them all
        prefix = out.prefix
        if prefix is None:
            prefix = model.prefix_states(x, text_ids, text_mask)
        presence = None
        if opts.presence:  # the samples of one image share its prefix: its first row
            img_BNC, start_BC = self._presence_of(model, prefix)
            presence = (img_BNC[:: opts.samples], start_BC[:: opts.samples])
        parts = {"tokens": tokens}
        if heads:
            parts.update(model.prefix_heads(prefix, x, out.codes))
        return Decoded(
            parts.get("refined", tokens), parts if opts.parts else {}, presence_states=presence
        )

    @staticmethod
    def _codes(
        model: nn.Module,
        x: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        opts: DecodeOptions,
        cache: dict[str, Any],
    ) -> Any:
        """The decoder's :class:`~mrisegcli.decode.next_token.MaskDecode`: drafted by the NkTP
        heads when that pays, else plain cached decoding."""
        from mrisegcli.decode.next_token import MaskGenerator, decode_speculative

        # drafting pays at batch 1 (bench/bench_trained_decode.py, shipped model: 2.32x fewer
        # passes, 1.40-1.46x wall time); a batch advances by its shortest kept run, which costs
        # more than it saves
        if (
            opts.speculative
            and opts.temperature == 0
            and x.shape[0] == 1
            and model.nktp is not None
        ):
            return decode_speculative(model, x, text_ids, text_mask)
        if "generator" not in cache:
            cache["generator"] = MaskGenerator(
                model, compile=opts.compile, amp_dtype=opts.amp_dtype
            )
        return cache["generator"].decode(
            x,
            text_ids,
            text_mask,
            temperature=opts.temperature,
            top_k=opts.top_k,
            generator=opts.generator,
        )

    @staticmethod
    def _presence_of(model: nn.Module, prefix: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A pass over the prefix (``PrefixStates``) -> the image-token states and the [BOM]
        state (the one that predicts mask token 0)."""
        return model.image_states(prefix), prefix.h_BPC[:, model.layout.prefix_len - 1]

    def presence_states(
        self, model: nn.Module, x: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._presence_of(model, model.prefix_states(x, text_ids, text_mask))


class NextScale(Paradigm):
    """AR-Seg: multi-scale residual mask tokens, one whole scale per step, coarse to fine."""

    name = "next-scale"
    has_steps = True

    def tokenizers(self, image_input: str) -> tuple[str, ...]:
        return ("multiscale",)

    def ceiling_tokenizer(self, bundle: Any) -> Any:
        return bundle.multiscale

    def model_config(self, cfg: RunConfig, bundle: Any, n_train: int) -> Any:
        from mrisegcli.models.next_scale import NextScaleConfig, NextScaleStrategies, ScaleLayout
        from mrisegcli.tokenizers.text import text_vocab_size

        q = bundle.multiscale
        if q is None:
            raise ConfigError("the next-scale paradigm needs a multi-scale mask tokenizer")
        mc = NextScaleConfig(
            transformer=cfg.transformer,
            image_size=cfg.image_size,
            text_vocab_size=text_vocab_size(bundle.text),
            text_len=cfg.text_len,
            mask_codebook_size=q.codebook_size,
            code_dim=q.cfg.code_dim,
            scales=tuple(q.scales),
            **_shared_fields(cfg.strategies, NextScaleStrategies),
        )
        grid = mc.encoder.grid(cfg.image_size)
        needed = ScaleLayout(grid * grid, cfg.text_len, tuple(q.scales)).seq_len
        return replace(mc, transformer=_seq_room(mc.transformer, needed))

    def config_from_dict(self, d: dict) -> Any:
        from mrisegcli.models.next_scale import NextScaleConfig

        return from_dict(NextScaleConfig, d, "config.model")

    def build(self, mcfg: Any, bundle: Any) -> nn.Module:
        from mrisegcli.models.next_scale import NextScaleSegmenter

        return NextScaleSegmenter(mcfg, bundle.multiscale)

    def training_tensors(self, codes: Any, mcfg: Any) -> dict[str, torch.Tensor]:
        data = _common_tensors(codes, mcfg, pixels=True)
        data["ms_codes"] = codes.fields["ms_codes"].long()
        return data

    def decode(
        self,
        model: nn.Module,
        bundle: Any,
        image_B1SS: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        opts: DecodeOptions,
        cache: dict[str, Any],
    ) -> Decoded:
        from mrisegcli.decode.next_scale import generate_scales

        out = generate_scales(
            model,
            bundle.multiscale,
            image_B1SS,
            text_ids,
            text_mask,
            samples=opts.samples,
            temperature=opts.temperature,
            top_k=opts.top_k,
            generator=opts.generator,
            return_steps=opts.steps,
            amp_dtype=opts.amp_dtype,
        )
        idx_list, step_logits = out if opts.steps else (out, None)
        return Decoded(bundle.multiscale.idx_to_logits(idx_list), steps=step_logits)

    def presence_states(
        self, model: nn.Module, x: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lay = model.layout
        none = x.new_zeros(x.shape[0], 0, model.code_proj.in_features)
        h_BTC = model.teacher_forced_states(x, text_ids, text_mask, none)
        return h_BTC[:, : lay.n_image], h_BTC[:, lay.n_cond :].mean(1)


PARADIGMS: dict[str, Paradigm] = {p.name: p for p in (NextToken(), NextScale())}


def get_paradigm(name: str) -> Paradigm:
    """The paradigm called ``name``; a one-line error naming the choices otherwise."""
    if name not in PARADIGMS:
        raise MrisegError(f"unknown paradigm {name!r}; choose one of {', '.join(PARADIGMS)}")
    return PARADIGMS[name]
