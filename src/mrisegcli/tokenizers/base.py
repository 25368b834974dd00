"""The small interface every discrete image/mask tokenizer implements, and the common base of
the built-in ones.

Anything with the :class:`GridTokenizer` members can be plugged in (for example the VQ
tokenizer of a large multimodal model wrapped in an adapter): the sequence builders, the code
cache and the decoders use nothing else.

The three built-in tokenizers (mask VQ, image VQ, multi-scale) share :class:`ConvVQConfig`
(geometry and codebook) and :class:`ConvVQTokenizer` (conv encoder, vector quantiser, conv
decoder and the protocol's properties); each adds its own losses and code layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mrisegcli.tokenizers.vq import (
    ConvDecoder,
    ConvEncoder,
    VectorQuantizer,
    check_geometry,
    check_input,
)


@runtime_checkable
class GridTokenizer(Protocol):
    """Maps a (B, 1, S, S) float tensor to a (B, h, w) grid of codes and back."""

    #: number of distinct codes (the vocabulary this tokenizer adds to the sequence)
    codebook_size: int
    #: input side S in pixels that ``encode`` expects
    image_size: int
    #: side of the code grid, h == w == image_size // downsample
    grid: int

    def encode(self, x_B1SS: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) in [0, 1] -> (B, grid, grid) int64 codes."""
        ...

    def decode(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """(B, grid, grid) int64 codes -> (B, 1, S, S): logits for masks, [0, 1] for images."""
        ...


@dataclass(frozen=True)
class ConvVQConfig:
    """Geometry and codebook fields every built-in tokenizer config starts with.

    The subclasses add their quantiser and loss settings after these fields (field order is
    part of a config's ``repr``, which code-cache fingerprints hash: keep it).
    """

    image_size: int = 128
    downsample: int = 8
    codebook_size: int = 512
    code_dim: int = 16
    channels: tuple[int, ...] = (16, 32, 64)
    res_blocks: int = 1


class ConvVQTokenizer(nn.Module):
    """Config, conv encoder and vector quantiser of a built-in tokenizer (a single channel).

    A subclass calls ``super().__init__`` first, then builds any module of its own and last its
    decoder (:meth:`_make_decoder`): parameters are drawn from the RNG in that order, so a seed
    always gives the same weights. State-dict keys: ``encoder.*``, ``quantizer.*``,
    ``decoder.*`` plus the subclass's own.
    """

    def __init__(
        self, cfg: ConvVQConfig, *, beta: float, restart_after: int, cosine: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self._n_down = n_down = check_geometry(cfg.image_size, cfg.downsample, cfg.channels)
        self._check_config()
        self.encoder = ConvEncoder(1, cfg.channels, n_down, cfg.code_dim, cfg.res_blocks)
        self.quantizer = VectorQuantizer(
            cfg.codebook_size, cfg.code_dim, beta=beta, cosine=cosine, restart_after=restart_after
        )

    def _check_config(self) -> None:
        """Override point: raise ConfigError for ``self.cfg`` settings beyond the geometry."""

    def _make_decoder(self) -> ConvDecoder:
        c = self.cfg
        return ConvDecoder(c.code_dim, c.channels, self._n_down, 1, c.res_blocks)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def grid(self) -> int:
        return self.cfg.image_size // self.cfg.downsample

    def _encode_unit(self, x_B1SS: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, 1, S, S) values in [0, 1] (bool for masks) -> encoder features (B, C, S/f, S/f).

        Checks the shape (S a multiple of ``downsample``; equal to ``size`` when given) and maps
        the input to [-1, 1] first.
        """
        check_input(x_B1SS, self.cfg.downsample, size)
        return self.encoder(x_B1SS.to(self.quantizer.embedding.dtype) * 2.0 - 1.0)

    def _nearest_grid(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B, h, w) int64 index of each position's nearest code."""
        B, C, h, w = z_BChw.shape
        return self.quantizer.nearest(z_BChw.permute(0, 2, 3, 1).reshape(-1, C)).view(B, h, w)

    def _code_map(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 codes -> (B, C, h, w) code vectors (differentiable w.r.t. the codebook)."""
        return self.quantizer.lookup(idx_Bhw).permute(0, 3, 1, 2).contiguous()
