"""Decoder-only transformer blocks shared by both paradigms.

Pre-norm blocks (RMSNorm -> attention -> RMSNorm -> SwiGLU), 2-D rotary position embedding
and attention through ``scaled_dot_product_attention`` with an explicit boolean mask, so the
same blocks serve causal (next-token), block-causal (next-scale) and padded sequences. The
module maps embeddings to normalised hidden states; token embeddings and output heads belong
to the model that owns the vocabulary.

What every layer of one pass shares (the RoPE rotation of the new tokens, the mask, the cache
slots) is computed once per pass into an :class:`AttnContext` and handed down the stack. The
boolean mask is turned once per pass into the additive float mask (0 / -inf) that
``scaled_dot_product_attention`` would otherwise build from it in every layer, with the same
values, so the result is bit for bit the same.

Cached passes (prefill, decode steps) run :meth:`Block.step`, the inference form of a block:
the same arithmetic as :meth:`Block.forward` without the submodule calls, with SwiGLU's two
input projections as one matmul over their concatenated weights (a copy kept next to the
parameters and refreshed when they change; names and shapes of the parameters stay as they
are). Decoders that know their positions ahead may hand in the RoPE rotation and the additive
mask directly (:meth:`Transformer.forward_step`, :meth:`Transformer.key_bias`), so that a step
builds neither.

Inference uses a static :class:`KVCache` per layer: buffers are allocated once by
:meth:`Transformer.setup_caches` and written in place at ``input_pos`` (no growth by
concatenation), which keeps tensor addresses fixed for CUDA graphs. A cached pass reads only
the first S' slots of the cache, S' being the width of its mask: decoding attends to the filled
prefix instead of the whole buffer (pass S' = max_len for shapes that never change). Next to
the caches the transformer keeps which slots hold real keys (``key_valid_BS``, False at
padding), so the models that drive it share one bookkeeping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrisegcli.errors import ConfigError


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of the transformer; saved with every run so a model can be rebuilt from it."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 688  # SwiGLU hidden width (about 8/3 * dim)
    rope_base: float = 10000.0
    dropout: float = 0.0
    max_seq_len: int = 1024  # longest sequence a KV cache may be set up for
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0 or self.mlp_hidden <= 0:
            raise ConfigError(f"transformer sizes must be positive, got {self}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"head_dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# ----------------------------------------------------------------------------- masks


def causal_mask(
    n_query: int, n_key: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """(n_query, n_key) bool, True where key index <= query index (queries end-aligned at 0)."""
    n_key = n_query if n_key is None else n_key
    q_T1 = torch.arange(n_query, device=device)[:, None]
    k_1S = torch.arange(n_key, device=device)[None, :]
    return k_1S <= q_T1


def block_causal_mask(
    block_sizes: Sequence[int], device: torch.device | None = None
) -> torch.Tensor:
    """(T, T) bool for consecutive blocks: a token sees its whole block and all earlier blocks."""
    sizes = torch.as_tensor(list(block_sizes), device=device)
    block_T = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)  # (T,)
    return block_T[None, :] <= block_T[:, None]


def with_key_padding(mask_TS: torch.Tensor, key_valid_BS: torch.Tensor) -> torch.Tensor:
    """Combine a (T, S) structural mask with (B, S) key validity -> (B, 1, T, S)."""
    return mask_TS[None, None] & key_valid_BS[:, None, None, :]


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = attend) -> additive float mask in ``dtype``: 0 where True, -inf where
    False, the values ``scaled_dot_product_attention`` derives from a boolean mask itself."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the attention's queries for input ``x``: the autocast dtype when autocast is on."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _as_4d(attn_mask: torch.Tensor) -> torch.Tensor:
    """Accept (T, S), (B, T, S) or (B, 1|H, T, S) boolean masks; return a 4-D view."""
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be boolean (True = attend), got {attn_mask.dtype}")
    if attn_mask.dim() == 2:
        return attn_mask[None, None]
    if attn_mask.dim() == 3:
        return attn_mask[:, None]
    return attn_mask


# ----------------------------------------------------------------------------- RoPE


def rope_angles(pos: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Rotation angles for 2-D positions.

    ``pos`` is (..., T, 2) holding (row, col), integer or float. Returns (..., T, head_dim // 2)
    float32: the first half of the pairs rotates with the row, the second half with the column,
    each half using ``head_dim // 4`` geometric frequencies.
    """
    n_freq = head_dim // 4
    freqs_F = base ** (-torch.arange(n_freq, device=pos.device, dtype=torch.float32) / n_freq)
    pos = pos.to(torch.float32)
    row = pos[..., 0:1] * freqs_F  # (..., T, F)
    col = pos[..., 1:2] * freqs_F  # (..., T, F)
    return torch.cat([row, col], dim=-1)  # (..., T, 2F)


def rope_rotation(pos: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """(cos, sin) of :func:`rope_angles`, stacked: (..., T, head_dim // 2, 2) float32.

    Computed once per pass and shared by every layer (not recomputed per layer and per q/k).
    """
    angles = rope_angles(pos, head_dim, base)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x_BTxD: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` (B, T, ..., D) by ``rot`` ((T, D/2, 2) or (B, T, D/2, 2)).

    Any dims between T and D (e.g. q/k and heads) share the rotation. The pair (x0, x1) becomes
    (x0 cos - x1 sin, x0 sin + x1 cos), in float32: one complex product in eager mode (several
    times faster on a CPU than the same in real arithmetic), real arithmetic under
    ``torch.compile``, whose code generator fuses it but has no complex support.
    """
    if rot.dim() == 3:
        rot = rot[None]  # (1, T, D/2, 2)
    rot = rot.view(
        *rot.shape[:2], *([1] * (x_BTxD.dim() - 3)), *rot.shape[-2:]
    )  # (B|1, T, 1.., D/2, 2)
    x_pairs = x_BTxD.float().unflatten(-1, (-1, 2))  # (B, T, ..., D/2, 2)
    if torch.compiler.is_compiling():
        x0, x1 = x_pairs.unbind(-1)
        c, s = rot.unbind(-1)
        out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(x_pairs) * torch.view_as_complex(rot))
    return out.flatten(-2).type_as(x_BTxD)


# ----------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class AttnContext:
    """What every layer of one pass shares, computed once per pass.

    ``rot``: RoPE (cos, sin) of the T new tokens, (T, D/2, 2) or (B, T, D/2, 2); ``mask``: bool
    (True = attend) or additive float (0 / -inf), (B|1, 1|H, T, S); ``input_pos``: (T,) cache
    slots of the new tokens, or None for a pass without cache (keys = the new tokens). A cached
    pass reads cache slots [0, S).
    """

    rot: torch.Tensor
    mask: torch.Tensor
    input_pos: torch.Tensor | None = None

    @property
    def n_keys(self) -> int:
        return self.mask.shape[-1]


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class KVCache(nn.Module):
    """Static key/value buffers (max_batch, n_heads, max_len, head_dim), written in place."""

    def __init__(
        self,
        max_batch: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        shape = (max_batch, n_heads, max_len, head_dim)
        self.register_buffer(
            "k_BHSD", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "v_BHSD", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )

    def update(
        self,
        input_pos_T: torch.Tensor,
        k_BHTD: torch.Tensor,
        v_BHTD: torch.Tensor,
        n_keys: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values at ``input_pos``; return views (B, H, S, D) of slots [0, n_keys).

        ``n_keys`` defaults to the whole buffer.
        """
        B = k_BHTD.shape[0]
        k_out = self.k_BHSD[:B, :, :n_keys]
        v_out = self.v_BHSD[:B, :, :n_keys]
        k_out.index_copy_(2, input_pos_T, k_BHTD.to(k_out.dtype))
        v_out.index_copy_(2, input_pos_T, v_BHTD.to(v_out.dtype))
        return k_out, v_out

    def repeat_rows(self, batch: int, samples: int, n_slots: int) -> None:
        """Copy rows [0, batch) to rows b*samples .. b*samples+samples-1 (slots [0, n_slots))."""
        n = batch * samples
        for buf_BHSD in (self.k_BHSD, self.v_BHSD):
            buf_BHSD[:n, :, :n_slots].copy_(
                buf_BHSD[:batch, :, :n_slots].repeat_interleave(samples, 0)
            )


def float32_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """bf16 attention computed in float32 (CPU training under bf16 autocast): PyTorch's CPU
    flash-attention backward is about twice as slow in bf16 as in float32 at these sizes, while
    the projections around it gain ~4x from bf16. Returns bf16 like the bf16 kernel would."""
    if mask is not None and mask.is_floating_point():
        mask = mask.float()  # an additive bias made in the compute dtype
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout
        )
    return y.to(q.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE and an explicit boolean mask (True = attend)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x_BTC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, T, C = x_BTC.shape
        qkv = self.wqkv(x_BTC).view(B, T, 3, self.n_heads, self.head_dim)
        qk = apply_rope(qkv[:, :, :2], ctx.rot)  # (B, T, 2, H, D), q and k rotated together
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, T, D)
        if ctx.input_pos is not None:
            k, v = self.kv_cache.update(ctx.input_pos, k, v, ctx.n_keys)  # (B, H, S, D)
        dropout = self.dropout if self.training else 0.0
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled():
            y = float32_attention(q, k, v, ctx.mask, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, dropout_p=dropout)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))  # y: (B, H, T, D)

    def step(self, x_BTC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Inference form of :meth:`forward` (no dropout, no submodule calls), cached passes only."""
        B, T, C = x_BTC.shape
        qkv = F.linear(x_BTC, self.wqkv.weight).view(B, T, 3, self.n_heads, self.head_dim)
        qk = apply_rope(qkv[:, :, :2], ctx.rot)  # (B, T, 2, H, D)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        k, v = self.kv_cache.update(ctx.input_pos, k, qkv[:, :, 2].transpose(1, 2), ctx.n_keys)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)  # (B, H, T, D)
        return F.linear(y.transpose(1, 2).reshape(B, T, C), self.wo.weight)


def _rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """:meth:`RMSNorm.forward` as one kernel where that gives the same bits (float32)."""
    # F.rms_norm exists from torch 2.4; the declared floor is 2.3
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32 and hasattr(F, "rms_norm"):
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm(x)


class SwiGLU(nn.Module):
    """Gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

        self._w13: torch.Tensor | None = None  # cat([w1, w3]) for inference, see fused_w13
        self._w13_key: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def refresh_fused(self) -> None:
        """Rebuild the concatenated [w1; w3] weight if either parameter changed since (a new
        tensor, an in-place update: its version counter moves, or another dtype/device)."""
        w1, w3 = self.w1.weight, self.w3.weight
        key = (w1.data_ptr(), w3.data_ptr(), w1._version, w3._version, w1.dtype, w1.device)
        if key != self._w13_key:
            with torch.no_grad():
                self._w13 = torch.cat([w1, w3]).detach()
            self._w13_key = key

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Inference form of :meth:`forward`: one matmul for w1 and w3 (same values, bit for bit).
        Needs :meth:`refresh_fused` after any change of the weights (the transformer calls it)."""
        a, b = F.linear(x, self._w13).chunk(2, -1)
        return F.linear(F.silu(a) * b, self.w2.weight)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x_BTC = x_BTC + self.drop(self.attn(self.attn_norm(x_BTC), ctx))
        return x_BTC + self.drop(self.mlp(self.mlp_norm(x_BTC)))

    def step(self, x_BTC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Inference form of :meth:`forward` for cached passes: same arithmetic, fewer calls."""
        x_BTC = x_BTC + self.attn.step(_rms_norm(x_BTC, self.attn_norm), ctx)
        return x_BTC + self.mlp.step(_rms_norm(x_BTC, self.mlp_norm))


class Transformer(nn.Module):
    """A stack of blocks plus the final norm: embeddings (B, T, C) -> hidden states (B, T, C)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.max_batch = 0
        self.max_len = 0
        self.register_buffer("key_valid_BS", None, persistent=False)
        self.register_buffer("key_bias_BS", None, persistent=False)  # 0 / -inf of key_valid_BS
        self.register_buffer("slots_S", None, persistent=False)
        self.register_buffer("causal_bias_SS", None, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        std_out = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, std=std_out)
            else:
                nn.init.normal_(p, std=0.02)

    def rotation(self, pos: torch.Tensor) -> torch.Tensor:
        """RoPE (cos, sin) (see :func:`rope_rotation`) of (T, 2) or (B, T, 2) positions."""
        return rope_rotation(pos, self.config.head_dim, self.config.rope_base)

    def _run(self, x_BTC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        for layer in self.layers:
            x_BTC = layer(x_BTC, ctx)
        return self.norm(x_BTC)

    def _run_cached(self, x_BTC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if self.training and self.config.dropout > 0:
            return self._run(x_BTC, ctx)  # dropout lives in the module path only
        if not torch.compiler.is_compiling():
            self.refresh_fused()
        for layer in self.layers:
            x_BTC = layer.step(x_BTC, ctx)
        return self.norm(x_BTC)  # a module call: one per pass (hooks count passes here)

    def refresh_fused(self) -> None:
        """Bring the inference copies of concatenated weights up to date (cheap when current)."""
        for layer in self.layers:
            layer.mlp.refresh_fused()

    # -- training ---------------------------------------------------------------------------

    def forward(
        self, x_BTC: torch.Tensor, pos: torch.Tensor, attn_mask: torch.Tensor
    ) -> torch.Tensor:
        """Full-sequence pass without cache.

        ``pos``: (T, 2) or (B, T, 2) (row, col) positions; ``attn_mask``: boolean (T, T),
        (B, T, T) or (B, 1, T, T), True where a query may attend to a key.
        """
        mask = _as_4d(attn_mask)
        bias = attention_bias(mask, _compute_dtype(x_BTC))  # once, not in every layer
        return self._run(x_BTC, AttnContext(self.rotation(pos), bias))

    # -- inference --------------------------------------------------------------------------

    def setup_caches(
        self, max_batch: int, max_len: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        """Allocate one static KV cache per layer and the key validity (replacing any previous)."""
        if max_len > self.config.max_seq_len:
            raise ConfigError(
                f"cache length {max_len} exceeds max_seq_len {self.config.max_seq_len}"
            )
        cfg = self.config
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(
                max_batch, cfg.n_heads, max_len, cfg.head_dim, dtype, device
            )
        self.key_valid_BS = torch.ones(max_batch, max_len, dtype=torch.bool, device=device)
        self.key_bias_BS = torch.zeros(max_batch, max_len, dtype=dtype, device=device)
        self.slots_S = torch.arange(max_len, device=device)
        # causal_bias_SS[q, s] = 0 where slot s <= q else -inf: a block of consecutive queries
        # reads its causal mask as a slice (:meth:`block_bias`) instead of building one per pass
        self.causal_bias_SS = torch.zeros(max_len, max_len, dtype=dtype, device=device).masked_fill(
            self.slots_S[None, :] > self.slots_S[:, None], float("-inf")
        )
        self.refresh_fused()
        self.max_batch, self.max_len = max_batch, max_len

    def ensure_caches(
        self,
        max_batch: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        """:meth:`setup_caches` unless the current caches already hold ``max_batch`` x ``max_len``
        in ``dtype`` on ``device`` (defaults: those of the weights), so buffers are reused."""
        w = self.norm.weight
        dtype = dtype or w.dtype
        device = torch.device(device) if device is not None else w.device
        kv = self.layers[0].attn.kv_cache
        if (
            kv is not None
            and self.max_batch >= max_batch
            and self.max_len >= max_len
            and kv.k_BHSD.dtype == dtype
            and kv.k_BHSD.device == device
        ):
            return
        self.setup_caches(max_batch, max_len, dtype, device)

    def clear_caches(self) -> None:
        """Drop the KV caches (frees their memory)."""
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.key_valid_BS = self.key_bias_BS = self.slots_S = None
        self.max_batch = self.max_len = 0

    def start_sequences(self, valid_BP: torch.Tensor) -> None:
        """New batch of B sequences: slots [0, P) get key validity ``valid_BP`` (B, P), the rest True."""
        B, P = valid_BP.shape
        if B > self.max_batch:
            raise RuntimeError(
                f"caches hold {self.max_batch} sequences, got {B}: call setup_caches"
            )
        self.key_valid_BS[:B].fill_(True)
        self.key_valid_BS[:B, :P].copy_(valid_BP)
        self.key_bias_BS[:B].copy_(attention_bias(self.key_valid_BS[:B], self.key_bias_BS.dtype))

    def repeat_rows(self, batch: int, samples: int, n_slots: int) -> None:
        """Copy the caches of rows [0, batch) to rows b*samples .. b*samples+samples-1.

        Slots [0, n_slots) of every layer's keys/values and the key validity are copied, so the
        ``samples`` continuations of a case share one prefill.
        """
        n = batch * samples
        if n > self.max_batch:
            raise RuntimeError(
                f"caches hold {self.max_batch} sequences, need {n}: call setup_caches"
            )
        for layer in self.layers:
            layer.attn.kv_cache.repeat_rows(batch, samples, n_slots)
        self.key_valid_BS[:n].copy_(self.key_valid_BS[:batch].repeat_interleave(samples, 0))
        self.key_bias_BS[:n].copy_(self.key_bias_BS[:batch].repeat_interleave(samples, 0))

    def key_padding(self, batch: int, n_keys: int) -> torch.Tensor:
        """(B, 1, 1, n_keys) bool view of the key validity of cache slots [0, n_keys)."""
        return self.key_valid_BS[:batch, None, None, :n_keys]

    def key_bias(self, batch: int, n_keys: int) -> torch.Tensor:
        """(B, 1, 1, n_keys) additive float view (0 / -inf) of the key validity of slots [0, n_keys).

        A step whose keys are exactly the filled prefix needs no other mask: this view is it."""
        return self.key_bias_BS[:batch, None, None, :n_keys]

    def block_bias(self, batch: int, first: int, T: int) -> torch.Tensor:
        """(B, 1, T, first + T) additive mask of T queries at consecutive slots first ..
        first+T-1: each reads the valid filled slots up to its own. One add of two views."""
        n_keys = first + T
        return self.key_bias(batch, n_keys) + self.causal_bias_SS[first:n_keys, :n_keys]

    def forward_step(
        self, x_BTC: torch.Tensor, rot: torch.Tensor, input_pos: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward_cached` for decoders that prepared the pass themselves: ``rot`` the
        RoPE rotation of the new tokens (:meth:`rotation`), ``bias`` the additive float mask
        (B|1, 1, T, S) (e.g. :meth:`key_bias`), in the dtype of the queries. No checks."""
        return self._run_cached(x_BTC, AttnContext(rot, bias, input_pos))

    def forward_cached(
        self,
        x_BTC: torch.Tensor,
        pos: torch.Tensor,
        input_pos: torch.Tensor,
        attn_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Prefill or decode: the T new tokens go to cache slots ``input_pos`` (T,).

        ``pos``: (T, 2) or (B, T, 2) positions of the new tokens; ``attn_mask``: boolean over the
        first S cache slots, (T, S), (B, T, S) or (B, 1, T, S) with S <= max_len: only those
        slots are read (S = the filled prefix is the fast choice; S = max_len keeps every shape
        fixed). It must cover ``input_pos`` and hide slots not yet written.
        """
        if self.max_len == 0:
            raise RuntimeError("KV caches are not set up: call setup_caches first")
        mask = _as_4d(attn_mask)
        if mask.shape[-1] > self.max_len:
            raise ValueError(
                f"mask covers {mask.shape[-1]} cache slots, the caches hold {self.max_len}"
            )
        bias = attention_bias(mask, _compute_dtype(x_BTC))
        return self._run_cached(x_BTC, AttnContext(self.rotation(pos), bias, input_pos))
