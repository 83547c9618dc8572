"""The DDiT building blocks of :class:`sedd.model.SEDD`: σ and position embeddings, the
adaLN-Zero transformer block and the output layer. Attribute names are the checkpoint's key names.

Shapes: B batch, L length, V score width, D hidden size, C cond_dim, H heads, d = D / H head size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from sedd.model.attention import AttentionPlan, attention

SIGMA_EMBED_DIM = 256  # fixed by the checkpoints: sigma_map.mlp.0.weight is [C, 256]
ROTARY_BASE = 10_000.0

__all__ = [
    "DDiTBlock",
    "DDiTFinalLayer",
    "EmbeddingLayer",
    "HEAD_MULTIPLE",
    "LayerNorm",
    "PerToken",
    "Rotary",
    "SigmaEmbedder",
    "apply_rotary",
    "block_forward",
    "sigma_embedding",
]


def sigma_embedding(sigma: torch.Tensor, dim: int = SIGMA_EMBED_DIM, max_period: float = 1e4) -> torch.Tensor:
    """Sinusoidal features of the noise level σ itself (not of t).

    Arguments:
        sigma: [B], any float dtype.
        dim: even number of features.
    Returns:
        [B, dim] float32: ``cat(cos(σ·f), sin(σ·f))`` with ``f_k = exp(−ln(max_period)·k/(dim/2))``,
        k = 0 .. dim/2 − 1 (first half cos, second half sin).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    )
    args = sigma.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the rotate-half (GPT-NeoX) layout: channel i pairs with i + d/2.

    Arguments:
        x: [B, L, ..., d], any float dtype (e.g. [B, L, 2, H, d] for q and k together).
        cos, sin: [L, d] float32 from :class:`Rotary`.
    Returns:
        same shape and dtype as ``x``; computed in fp32 because a bf16 product at position ~1000
        loses the phase of the high-frequency channels.
    """
    xf = x.float()
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 3) + (x.shape[-1],)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos.view(shape) + rotated * sin.view(shape)).to(x.dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class PerToken(NamedTuple):
    """adaLN conditioning that differs between the tokens of a sequence (block diffusion: each
    noisy block at its own σ, the clean tokens at σ = 0), in place of one row c [B, C] per sequence.

    ``rows`` [B, G, C]: the G distinct conditionings of each sequence; ``groups`` [S] int64: the
    row each of the S tokens reads (the same for every sequence). The adaLN linear runs on the G
    rows, not on the S tokens (G ≪ S), and its output is gathered per token."""

    rows: torch.Tensor
    groups: torch.Tensor

    def first(self, n: int) -> PerToken:
        """The conditioning of the first ``n`` tokens."""
        return PerToken(self.rows, self.groups[:n])


def modulation(linear: nn.Linear, c: torch.Tensor | PerToken, chunks: int) -> tuple[torch.Tensor, ...]:
    """The adaLN modulations of ``linear`` for the conditioning ``c``: ``chunks`` tensors of
    [B, 1, D] for one row c [B, C] per sequence (broadcast over the tokens), of [B, S, D] for
    :class:`PerToken`."""
    if isinstance(c, PerToken):
        # index_select, not c.rows[:, groups]: on the CPU its backward is an index_add, 4x faster
        # than advanced indexing's accumulating index_put at the cpu preset's shapes
        return linear(c.rows).index_select(1, c.groups).chunk(chunks, dim=2)
    return linear(c)[:, None].chunk(chunks, dim=2)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with a learned scale and no bias. x: [..., D] -> same dtype.

    Statistics in fp32 whatever the input: a bf16 mean/variance over 768 channels is off by
    percents, and the checkpoints were trained with fp32 norms.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (autocast keeps layer_norm in fp32 too, so no autocast-disabled region is needed)
        y = F.layer_norm(x.float(), (self.dim,), weight=self.weight.float())
        return y.to(x.dtype)


class EmbeddingLayer(nn.Module):
    """Token embedding as a bare [V, D] parameter (the checkpoint key is ``vocab_embed.embedding``)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.embedding)


class SigmaEmbedder(nn.Module):
    """σ [B] -> [B, C]: :func:`sigma_embedding` (256 features) then Linear -> SiLU -> Linear."""

    def __init__(self, cond_dim: int, frequency_dim: int = SIGMA_EMBED_DIM):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, cond_dim, bias=True),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim, bias=True),
        )

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        emb = sigma_embedding(sigma, self.frequency_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Rotary tables for head size d, base 10000. ``inv_freq`` [d/2] is a persistent buffer
    because the public checkpoints carry it."""

    def __init__(self, head_dim: int, base: float = ROTARY_BASE):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head size, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.register_buffer("inv_freq", self._inv_freq(None))

    def _inv_freq(self, device: torch.device | None) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base**exponent)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos, sin), each [seq_len, d] float32, for positions 0 .. seq_len − 1."""
        inv_freq = self.inv_freq
        if inv_freq.dtype not in (torch.float32, torch.float64):
            # model.to(bfloat16) also casts buffers; 8-bit-mantissa frequencies would scramble
            # the phases at long positions, so rebuild them exactly.
            inv_freq = self._inv_freq(inv_freq.device)
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq.to(device=device, dtype=torch.float32))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


class DDiTBlock(nn.Module):
    """One transformer block with adaLN-Zero conditioning. x: [B, L, D], c: [B, C] (or
    :class:`PerToken`) -> [B, L, D]."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim, bias=True),
        )
        # adaLN-Zero: with zero modulation every block starts as the identity.
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)
        # what forward runs: block_forward, or the one compiled copy of it that every block of a
        # model shares (DDiTTrunk.compile_blocks)
        self.forward_fn: Callable = block_forward

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan
    ) -> torch.Tensor:
        # the module call stays outside the compiled function, so DDP's and FSDP2's hooks (which
        # gather the block's parameters around forward) run eagerly, as without compile
        return self.forward_fn(self, x, c, cos, sin, plan)

    def step(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
             values: torch.Tensor, start: int, mask: torch.Tensor | None = None, *, causal: bool = False) -> torch.Tensor:
        """:meth:`forward` for n new positions ``start`` … ``start + n − 1`` against a KV cache
        (inference: no dropout). Their keys and values are written into ``keys``/``values``
        [B, H, ≥ start + n, d] at [start, start + n); their queries attend to positions
        [0, start + n) as ``mask`` [n, start + n] (True = may attend) says, or all of them
        (``causal``: the lower triangle, for start = 0). ``cos``, ``sin``: [n, d], the rows of the
        new positions. The KV-cached steps of :class:`sedd.model.ARModel` and
        :class:`sedd.model.BlockSEDD` (their tests hold it equal to :meth:`forward`)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation(self.adaLN_modulation, c, 6)
        h = _modulate(self.norm1(x), shift1, scale1)
        qkv = rearrange(self.attn_qkv(h), "b s (three h d) -> b s three h d", three=3, h=self.n_heads)
        qk = apply_rotary(qkv[:, :, :2], cos, sin)
        n = x.shape[1]
        keys[:, :, start : start + n] = qk[:, :, 1].transpose(1, 2)
        values[:, :, start : start + n] = qkv[:, :, 2].transpose(1, 2)
        q = qk[:, :, 0].transpose(1, 2)  # [B, H, n, d]
        k, v = keys[:, :, : start + n], values[:, :, : start + n]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5,
                                             is_causal=causal and mask is None)
        x = x + gate1 * self.attn_out(rearrange(out, "b h s d -> b s (h d)"))
        h = _modulate(self.norm2(x), shift2, scale2)
        return x + gate2 * self.mlp(h)


def block_forward(block: DDiTBlock, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  plan: AttentionPlan) -> torch.Tensor:
    """The computation of a :class:`DDiTBlock`, as a function of the block: ``torch.compile`` traces
    it once and every block of the model reuses the compiled code (its weights are inputs)."""
    shift1, scale1, gate1, shift2, scale2, gate2 = modulation(block.adaLN_modulation, c, 6)

    h = _modulate(block.norm1(x), shift1, scale1)
    qkv = rearrange(block.attn_qkv(h), "b s (three h d) -> b s three h d", three=3, h=block.n_heads)
    qkv = torch.cat([apply_rotary(qkv[:, :, :2], cos, sin), qkv[:, :, 2:]], dim=2)
    a = rearrange(attention(qkv, plan), "b s h d -> b s (h d)")
    x = x + gate1 * F.dropout(block.attn_out(a), block.dropout, block.training)

    h = _modulate(block.norm2(x), shift2, scale2)
    return x + gate2 * F.dropout(block.mlp(h), block.dropout, block.training)


HEAD_MULTIPLE = 64  # the output layer's rows are padded to a multiple of this in memory (see DDiTFinalLayer)


def padded_rows(rows: int, multiple: int) -> int:
    """``rows`` rounded up to a multiple of ``multiple`` (≥ 1)."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"pad_head_to must be a positive integer (1: no padding), got {multiple!r}")
    return -(-rows // multiple) * multiple


class DDiTFinalLayer(nn.Module):
    """x: [B, L, D], c: [B, C] (or :class:`PerToken` of the L tokens) -> z [B, L, V].
    Zero-initialised, so a fresh model outputs z = 0.

    The aligned head. ``linear`` holds ``V_pad`` = V rounded up to a multiple of ``pad_to`` rows
    (50258 -> 50304 at GPT-2's width): a bf16 row of 50258 logits is not 16-byte aligned, so
    cuBLAS falls back to slower kernels for the head and every kernel reading a score row loads
    it element by element. The matmul writes [.., V_pad] rows and ``forward`` returns the view
    [.., :V] (last stride 1, row stride V_pad): the padding columns are never read as scores. The
    padding rows of the weight and bias start at zero and get no gradient from any loss here;
    :meth:`state_dict` holds the public [V, D] / [V] tensors and loading pads them back.
    """

    def __init__(self, hidden_size: int, vocab_size: int, cond_dim: int, pad_to: int = HEAD_MULTIPLE):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.vocab_size = vocab_size
        self.linear = nn.Linear(hidden_size, vocab_size)  # drawn at [V, D] as before: the same RNG stream
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        rows = padded_rows(vocab_size, pad_to)
        if rows != vocab_size:
            self.linear.weight = nn.Parameter(torch.zeros(rows, hidden_size))
            self.linear.bias = nn.Parameter(torch.zeros(rows))
        self._register_state_dict_hook(_public_head_rows)
        self._register_load_state_dict_pre_hook(_pad_loaded_head_rows, with_module=True)

    @property
    def rows(self) -> int:
        """V_pad: the rows of the output linear in memory (V ≤ V_pad)."""
        return self.linear.weight.shape[0]

    def forward(self, x: torch.Tensor, c: torch.Tensor, head: Callable | None = None) -> Any:
        shift, scale = modulation(self.adaLN_modulation, c, 2)
        h = _modulate(self.norm_final(x), shift, scale)
        if head is None:
            out = self.linear(h)  # [B, L, V_pad]: aligned rows
            return out if self.rows == self.vocab_size else out[..., : self.vocab_size]
        weight, bias = self.linear.weight, self.linear.bias
        if torch.is_autocast_enabled(h.device.type):  # the casts nn.Linear would get from autocast
            dtype = torch.get_autocast_dtype(h.device.type)
            h, weight, bias = h.to(dtype), weight.to(dtype), bias.to(dtype)
        # Called here, inside this module's forward, so DDP and FSDP2 (whose hooks gather the
        # parameters around the forward) see the head's parameters in use. The head gets the
        # padded [V_pad, D] weight and [V_pad] bias: its scores are the first V columns.
        return head(h, weight, bias)


HEAD_KEYS = ("linear.weight", "linear.bias")


def _public_head_rows(module: DDiTFinalLayer, state: dict, prefix: str, local_metadata) -> None:
    # the checkpoint layout: [V, D] and [V], whatever the padding in memory
    for key in HEAD_KEYS:
        if prefix + key in state and state[prefix + key].shape[0] != module.vocab_size:
            state[prefix + key] = state[prefix + key][: module.vocab_size]


def _pad_loaded_head_rows(module: DDiTFinalLayer, state: dict, prefix: str, *args) -> None:
    for key in HEAD_KEYS:
        value = state.get(prefix + key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == module.vocab_size < module.rows:
            state[prefix + key] = pad_head_rows(value, module.rows)


def pad_head_rows(value: torch.Tensor, rows: int) -> torch.Tensor:
    """``value`` [V, ...] with zero rows appended up to ``rows`` (a new tensor)."""
    out = value.new_zeros((rows, *value.shape[1:]))
    out[: value.shape[0]] = value
    return out
