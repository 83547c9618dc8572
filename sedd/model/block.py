"""Block diffusion on SEDD's trunk (BD3-LM: Arriola et al., ICLR 2025, here with SEDD's score
entropy): the sequence is cut into blocks of b tokens, and each block is an absorbing SEDD model of
its b tokens given the clean blocks before it. b = 1 is an autoregressive model, b = L is SEDD.

Shapes: B batch, L length (a multiple of b), K = L / b blocks, N real tokens, V = N + 1 score width
(MASK = N), D hidden size, H heads, d = D / H head size.

    z = model(x_t, x0, raw=True)      [B, L, V]: block k of z scores the noisy block k of x_t given
                                      the clean blocks 0 … k − 1 of x0 (x0's own block k and the
                                      later ones are never read)
    ŝ = z + shift(σ_k) on block k     σ [B, K]: one noise level per block;  ŝ[x_t] = 0

Training runs every block at once: one forward over the 2L − b tokens [x_t ; x0 without its last
block] with the block-causal mask of :func:`block_diffusion_mask`: a noisy block attends to itself
(bidirectionally) and to the clean blocks before it; a clean block attends to the clean blocks up
to itself. The clean stream never reads a noisy token, so its keys and values are those of x0 alone,
and a noisy block sees neither its own clean tokens nor anything after it; x0's last block would
be read by nobody and is left out (for b = L nothing clean is left: the forward is SEDD's). Both
streams take the positions 0 … L − 1 of their tokens (rotary).

σ conditioning (``model.time_conditioning``; off by default, as it measured better). Without it
the network is the time-independent SEDD: c = SiLU(cond_embed) for every token, and σ_k enters
only through block k's score shift, as the exact score does (docs/math.md, "Block diffusion").
With it, every block has its own noise level σ_k, so the adaLN conditioning is per token
(:class:`sedd.model.layers.PerToken`): the tokens of noisy block k read c_k = SiLU(sigma_map(σ_k)),
the clean tokens c_0 = SiLU(sigma_map(0)) (they are x0, noise level 0, and their keys and values
then stay a function of x0 alone: the KV cache is exact). With one block and nothing clean (b = L)
the conditioning is per sequence, SEDD's.

Attention runs on SDPA with a boolean mask on every device (flash-attn's varlen kernel has no
block-causal mask; FlexAttention is not used).

Generation (:func:`sedd.sampling.sample_block_diffusion`) keeps the keys and values of the
finished clean blocks in a :class:`BlockKVCache`: :meth:`BlockSEDD.extend` appends clean blocks,
and :meth:`BlockSEDD.block_scores` scores a noisy block against the cache; both run the DDiT
blocks outside ``forward`` (like :meth:`sedd.model.ARModel.step`), where FSDP2 has not gathered
the weights, so a sharded model samples through ``forward(..., only_last_block=True)`` instead.

Files: ``config.json`` (``"objective": "block"``, SEDD's ``tokens``, ``graph``, ``noise`` and
``model`` with ``block_size`` and ``time_conditioning``) and ``model.safetensors``, SEDD's layout
and keys (:mod:`sedd.model.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from sedd.model.ar import KVCache
from sedd.model.attention import AttentionPlan, check_backend, document_ids
from sedd.model.ddit import SEDD
from sedd.model.layers import HEAD_MULTIPLE, PerToken

__all__ = ["BlockKVCache", "BlockSEDD", "block_diffusion_mask"]


def block_diffusion_mask(n_noisy: int, n_clean: int, block_size: int, *, start: int = 0, context: int | None = None,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """[S, S] bool (True = may attend), S = n_noisy + n_clean: the attention of the tokens
    [noisy ; clean], the noisy ones at positions ``start`` … ``start + n_noisy − 1``, the clean ones
    at 0 … n_clean − 1, each in block ⌊position / block_size⌋:

        noisy q → noisy k:  same block          (a noisy block sees itself, bidirectionally)
        noisy q → clean k:  block(k) < block(q)  (and the clean blocks before it)
        clean q → clean k:  block(k) ≤ block(q)  (clean blocks are causal by block)
        clean q → noisy k:  never

    ``context`` (a multiple of ``block_size``, or None: no limit) also keeps every query from the
    clean blocks more than ``context`` tokens before its own block: block(k) ≥ block(q) − context/b
    (generation past the training length, :meth:`BlockSEDD.extend`).
    """
    noisy_blocks = torch.arange(start, start + n_noisy, device=device) // block_size
    clean_blocks = torch.arange(n_clean, device=device) // block_size
    blocks = torch.cat([noisy_blocks, clean_blocks])
    clean = torch.arange(n_noisy + n_clean, device=device) >= n_noisy
    q_block, k_block = blocks[:, None], blocks[None, :]
    q_clean, k_clean = clean[:, None], clean[None, :]
    allowed = ((~q_clean & ~k_clean & (k_block == q_block)) | (~q_clean & k_clean & (k_block < q_block))
               | (q_clean & k_clean & (k_block <= q_block)))
    if context is not None:
        allowed &= k_block >= q_block - context // block_size
    return allowed


class BlockKVCache(KVCache):
    """Keys and values of every DDiT block for the clean positions [0, ``length``) of each row
    (``keys[i]``, ``values[i]``: [B, H, capacity, d] in the compute dtype). ``length`` is a multiple
    of the block size; a noisy block scored against the cache uses the next block's slots as
    scratch."""

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the batch rows ``rows`` (int64 indices) only, in that order."""
        rows = rows.to(self.keys[0].device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class BlockSEDD(SEDD):
    """The block-diffusion network (module docstring): :class:`sedd.model.SEDD`'s weights and
    config, a block-causal forward over noisy and clean tokens, and a KV cache for generation.

    Arguments:
        config: a whole SEDD config with ``"objective": "block"``, the absorbing graph and
            ``model.block_size`` (b, a divisor of ``model.length``); ``model.time_conditioning``
            true (SEDD's default for a config without the key) conditions each block on its own
            σ; :meth:`config_for` makes one (without σ unless asked).
        attn_backend: "auto" or "sdpa" (both run SDPA); "flash" is refused.
        autocast_dtype, pad_head_to: as for :class:`sedd.model.SEDD`.

    Attributes: those of :class:`~sedd.model.SEDD`, and ``block_size`` (b), ``objective`` ("block").
    """

    objective = "block"

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        attn_backend: str = "auto",
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        pad_head_to: int = HEAD_MULTIPLE,
    ):
        super().__init__(config, attn_backend=attn_backend, autocast_dtype=autocast_dtype, pad_head_to=pad_head_to)
        m = self.config["model"]
        if "block_size" not in m:
            raise ValueError("config model.block_size is missing: the tokens per diffusion block, a divisor of "
                             f"model.length ({self.length})")
        self.block_size = int(m["block_size"])
        if self.length % self.block_size:
            raise ValueError(f"config model.block_size ({self.block_size}) must divide model.length ({self.length})")

    def _check_graph(self) -> None:
        if not self.absorb:
            raise ValueError(f"a block model needs the absorbing graph (got {self.graph_type!r}): a block's score "
                             "given the clean blocks before it is the absorbing graph's")

    @staticmethod
    def config_for(preset: str, *, block_size: int, tokens: int = 50257, noise: str | Mapping[str, Any] | None = None,
                   time_conditioning: bool = False, **model_overrides: Any) -> dict[str, Any]:
        """A whole config for a preset of :data:`sedd.model.PRESETS` with blocks of ``block_size``
        tokens on the absorbing graph, the network reading no σ unless ``time_conditioning`` (each
        block then conditioned on its own σ; at the cpu preset it gave b = 4 a worse bound), e.g.
        ``BlockSEDD(BlockSEDD.config_for("cpu", block_size=16, tokens=4096))``."""
        config = SEDD.config_for(preset, tokens=tokens, noise=noise, time_conditioning=time_conditioning,
                                 block_size=block_size, **model_overrides)
        return {"objective": "block", **config}

    # -- attention backend ----------------------------------------------------------------------

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        if value == "flash":
            raise ValueError("a block model runs attention on SDPA: flash-attn's varlen kernel has no block-causal "
                             "mask; use attn_backend='auto' or 'sdpa'")
        self._attn_backend = check_backend(value)

    # -- checks ---------------------------------------------------------------------------------

    def _check_blocks(self, name: str, x: torch.Tensor) -> int:
        """The number of blocks of ``x`` [B, L]; ValueError unless b divides L."""
        if x.shape[1] % self.block_size:
            raise ValueError(f"{name} has length {x.shape[1]}, not a multiple of the block size {self.block_size}")
        return x.shape[1] // self.block_size

    def _check_clean(self, x0: Any, like: torch.Tensor) -> None:
        if isinstance(x0, torch.Tensor) and x0.is_floating_point():
            raise TypeError("a block model is called as model(x_t, x0, sigma): x0, the clean tokens, was a float "
                            "tensor (called as a SEDD model, model(x_t, sigma)? sample it with "
                            "sedd.sampling.sample_block_diffusion)")
        self._check_ids("x0", x0, self.tokens, "clean tokens are real tokens")
        if x0.shape != like.shape or x0.device != like.device:
            raise ValueError(f"x0 must have the shape and device of x_t ({list(like.shape)} on {like.device}), got "
                             f"{list(x0.shape)} on {x0.device}")

    def _check_context(self, context: Any) -> None:
        if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 0
                                    or context % self.block_size):
            raise ValueError(f"context must be None or a multiple of the block size {self.block_size} (clean tokens "
                             f"a block reads before it), got {context!r}")

    def _check_block_sigma(self, sigma: Any, B: int, K: int, device: torch.device) -> torch.Tensor:
        if sigma is None:
            raise ValueError(f"sigma is missing: this block model reads the noise of every block ([B, K] = [{B}, {K}]; "
                             "model.time_conditioning is true)")
        if not isinstance(sigma, torch.Tensor) or sigma.shape != (B, K):
            got = list(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
            raise ValueError(f"sigma must be a [B, K] = [{B}, {K}] tensor (the noise of every block), got {got}")
        return self._check_sigma(sigma.reshape(-1), B * K, device).view(B, K)

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        x_t: torch.Tensor,
        x0: torch.Tensor,
        sigma: torch.Tensor | None = None,
        *,
        raw: bool = False,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None,
        only_last_block: bool = False,
        context: int | None = None,
    ) -> torch.Tensor:
        """Log concrete scores of every noisy block given the clean blocks before it.

        Arguments:
            x_t: [B, L] noisy token ids in [0, V), L a multiple of the block size.
            x0: [B, L] clean token ids in [0, N); block k of the output reads blocks < k of it.
            sigma: [B, K] total noise of every block, finite and > 0: what a time-conditioned
                network reads (block k's tokens at σ_k, module docstring); without time
                conditioning only the scores (``raw=False``) need it. With ``only_last_block``
                the last column is read.
            raw: return the network output z (the shift per block is :meth:`score_shift` of σ_k).
            attention_mask: [B, L] bool, True on real tokens: padding is never attended to (in
                either stream) and its own outputs are unspecified.
            segment_ids: [B, L] document ids of a packed batch: no attention across documents.
            head: replaces the output linear, as for :class:`sedd.model.SEDD`; it gets the hidden
                states of the noisy tokens, [B, L, D] (or [B, b, D] with ``only_last_block``).
            only_last_block: score x_t's last block only (the others are not read): [B, b, V].
                What a sampler without the KV cache runs.
            context: no token reads the clean blocks more than ``context`` tokens (a multiple
                of b) before its own block (:func:`block_diffusion_mask`); None: all of them. What
                the sampler past the training length runs (:meth:`extend`).
        Returns:
            raw=False: ŝ [B, L, V] float32 with ŝ[x_t] = 0; raw=True: z in the compute dtype; or
            what ``head`` returns.
        """
        self._check_tokens(x_t)
        self._check_clean(x0, x_t)
        B, L = x_t.shape
        K, b = self._check_blocks("x_t", x_t), self.block_size
        attention_mask, segment_ids = self._check_layouts(x_t, attention_mask, segment_ids)
        self._check_context(context)
        if sigma is not None or (not raw and head is None) or self.time_conditioning:
            sigma = self._check_block_sigma(sigma, B, K, x_t.device)
        first = L - b if only_last_block else 0  # the first noisy position scored
        # the tokens of both streams and their positions; x0's last block is read by no one
        noisy, clean = x_t[:, first:], x0[:, : L - b]
        positions = torch.cat([torch.arange(first, L, device=x_t.device), torch.arange(L - b, device=x_t.device)])
        allowed = None
        if L - b > 0:  # with one block and nothing clean, the mask is all True: SEDD's forward
            allowed = block_diffusion_mask(L - first, L - b, b, start=first, context=context, device=x_t.device)[None]
        if attention_mask is not None or segment_ids is not None:
            allowed = self._layout_mask(allowed, positions, attention_mask, segment_ids)
        c = self._conditioning(None if sigma is None else sigma[:, first // b :], L - b)
        z = self._run_masked(torch.cat([noisy, clean], dim=1), positions, allowed, L - first, head, c)
        if raw or head is not None:
            return z
        shift = self._score_shift(sigma.reshape(-1)).view(B, K)[:, first // b :]
        return self._postprocess_blocks(z, x_t[:, first:], shift)

    @staticmethod
    def _layout_mask(allowed, positions, attention_mask, segment_ids) -> torch.Tensor:
        """``allowed`` [1 or B, S, S] intersected with the padding and the documents of the tokens
        at ``positions`` [S]."""
        S = positions.numel()
        if allowed is None:
            allowed = torch.ones(1, S, S, dtype=torch.bool, device=positions.device)
        if segment_ids is not None:
            docs = document_ids(segment_ids)[:, positions]  # [B, S]
            allowed = allowed & (docs[:, :, None] == docs[:, None, :])
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, positions][:, None, :]
            # a padding query may be left with no key: let it see itself (NaN rows would reach the
            # real tokens through 0 · NaN in the next layer)
            allowed = allowed | torch.eye(S, dtype=torch.bool, device=positions.device)
        return allowed

    def _block_cond(self, sigma: torch.Tensor | None) -> torch.Tensor:
        """The conditioning of a block at the noise ``sigma`` [r] of each row: [r, C] (σ = 0: the
        clean stream's), or the time-independent model's one row [1, C] (``sigma`` unread).
        Outside autocast, as SEDD's (σ's features feed every block's scale and gate)."""
        if not self.time_conditioning:
            return F.silu(self.cond_embed)[None]  # one row for the whole batch
        return F.silu(self.sigma_map(sigma))

    def _conditioning(self, sigma: torch.Tensor | None, n_clean: int) -> torch.Tensor | PerToken:
        """The conditioning of the noisy blocks at ``sigma`` [B, K'] followed by ``n_clean`` clean
        tokens: one row per sequence where every token reads the same one (no time conditioning;
        one block and nothing clean: SEDD's c), else :class:`PerToken` with K' + 1 rows per
        sequence, noisy block k's tokens reading row k and the clean tokens row K' (σ = 0)."""
        if not self.time_conditioning:
            return self._block_cond(None)
        B, K = sigma.shape
        if K == 1 and not n_clean:
            return self._block_cond(sigma[:, 0])
        noisy = self._block_cond(sigma.reshape(-1)).view(B, K, -1)
        clean = self._block_cond(sigma.new_zeros(1))  # [1, C]
        rows = torch.cat([noisy, clean[:, None].expand(B, 1, -1)], dim=1)
        groups = torch.cat([torch.arange(K, device=sigma.device).repeat_interleave(self.block_size),
                            torch.full((n_clean,), K, device=sigma.device)])
        return PerToken(rows, groups)

    def _run_masked(self, tokens, positions, allowed, n_noisy: int, head, c):
        """The DDiT blocks over ``tokens`` [B, S] (noisy first) at ``positions`` [S] with the
        attention ``allowed`` ([1 or B, S, S], or None for full attention) and the conditioning
        ``c``; the output layer (or ``head``) on the first ``n_noisy`` tokens."""
        h = self.vocab_embed(tokens.long())
        cos, sin = (t[positions] for t in self.rotary_emb(int(positions.max()) + 1, h.device))
        plan = AttentionPlan("sdpa", sdpa_mask=None if allowed is None else allowed[:, None])
        with self._amp(h.device):
            for block in self.blocks:
                h = block(h, c, cos, sin, plan)
            return self.output_layer(h[:, :n_noisy], c.first(n_noisy) if isinstance(c, PerToken) else c, head)

    def _postprocess_blocks(self, z: torch.Tensor, x_t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """ŝ = z + shift of each position's block (shift [B, K]), then ŝ[x_t] = 0: float32."""
        out = z.float() + shift.repeat_interleave(self.block_size, dim=1)[:, :, None]
        return out.scatter_(-1, x_t.long().unsqueeze(-1), 0.0)

    def postprocess(self, raw: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The post-processing ``forward`` applies: raw z [B, L, V], x_t [B, L], sigma [B, K] (one
        σ per block) -> ŝ [B, L, V] float32."""
        self._check_tokens(x_t)
        K = self._check_blocks("x_t", x_t)
        if raw.dim() != 3 or raw.shape[:2] != x_t.shape or raw.shape[2] != self.vocab_size:
            raise ValueError(f"raw must have shape {[*x_t.shape, self.vocab_size]}, got {list(raw.shape)}")
        sigma = self._check_block_sigma(sigma, x_t.shape[0], K, x_t.device)
        return self._postprocess_blocks(raw, x_t, self._score_shift(sigma.reshape(-1)).view(sigma.shape))

    # -- generation with a KV cache -------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int | None = None, device: torch.device | None = None) -> BlockKVCache:
        """An empty :class:`BlockKVCache` for ``batch`` rows and up to ``capacity`` positions
        (default: the training length; a multiple of the block size)."""
        capacity = capacity or self.length
        if capacity % self.block_size:
            raise ValueError(f"capacity {capacity} is not a multiple of the block size {self.block_size}")
        device = device if device is not None else self.vocab_embed.embedding.device
        return BlockKVCache(self, batch, capacity, torch.device(device))

    def _cache_inputs(self, tokens: torch.Tensor, start: int, sigma: torch.Tensor | None):
        if self.training:
            raise RuntimeError("the KV-cached steps run in eval mode only (no dropout): call model.eval() first")
        h = self.vocab_embed(tokens.long())
        cos, sin = (t[start:] for t in self.rotary_emb(start + tokens.shape[1], h.device))
        return h, self._block_cond(sigma), cos, sin

    @torch.no_grad()
    def extend(self, x0: torch.Tensor, cache: BlockKVCache, *, context: int | None = None) -> None:
        """Append the clean blocks ``x0`` [B, n·b] (token ids < N) at ``cache.length``: their keys
        and values as the clean stream of :meth:`forward` (with the same ``context``) computes
        them: block-causal among themselves, every cached block before them, or only the cached
        blocks within ``context`` tokens (a multiple of b) before each block.

        A block at position p reads positions [p − context, p + b) only, so a cache longer than
        ``context`` + b costs no more per block, and every query meets the relative positions of
        training when ``context`` ≤ L − b (rotary positions are relative): what generation past
        the training length runs (:func:`sedd.sampling.sample_block_diffusion`, ``window``)."""
        self._check_ids("x0", x0, self.tokens, "clean tokens are real tokens")
        self._check_blocks("x0", x0)
        self._check_context(context)
        start, n, b = cache.length, x0.shape[1], self.block_size
        if start + n > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} positions; {start} + {n} do not fit")
        # clean tokens at σ = 0, as the clean stream of forward reads them
        h, c, cos, sin = self._cache_inputs(x0, start, x0.new_zeros(1, dtype=torch.float32))
        lo = 0 if context is None else max(0, start - context)  # the first cached position any of them reads
        mask = None  # one block sees itself and the cache from lo: no mask
        if n > b:
            q = ((start + torch.arange(n, device=h.device)) // b)[:, None]
            k = (torch.arange(lo, start + n, device=h.device) // b)[None, :]
            mask = (k <= q) if context is None else (k <= q) & (k >= q - context // b)
        with self._amp(h.device):
            for i, block in enumerate(self.blocks):
                h = block.step(h, c, cos, sin, cache.keys[i][:, :, lo:], cache.values[i][:, :, lo:], start - lo, mask)
        cache.length = start + n

    @torch.no_grad()
    def block_scores(self, x_t: torch.Tensor, cache: BlockKVCache, *, sigma: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None,
                     head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None,
                     context: int | None = None) -> Any:
        """The raw output z [r, b, V] (compute dtype) of the noisy block ``x_t`` [r, b] at positions
        ``cache.length`` … and noise ``sigma`` [r] (what a time-conditioned network reads), given
        the cached clean blocks of the batch rows ``rows`` (default: all of them, r = the cache's
        batch), the last ``context`` tokens of them only where given (as :meth:`extend`), or what
        ``head`` returns for its hidden states [r, b, D]. The cache is not extended. The numbers of
        :meth:`forward`'s block at that position, up to float rounding."""
        self._check_tokens(x_t)
        self._check_context(context)
        if sigma is None and self.time_conditioning:
            raise ValueError(f"sigma is missing: this block model reads the noise of the block ([r] = "
                             f"[{x_t.shape[0]}]; model.time_conditioning is true)")
        if sigma is not None:
            sigma = self._check_sigma(sigma, x_t.shape[0], x_t.device)
        start, b = cache.length, self.block_size
        lo = 0 if context is None else max(0, start - context)
        if x_t.shape[1] != b:
            raise ValueError(f"x_t must be one block [r, {b}], got {list(x_t.shape)}")
        if start + b > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} positions: no room for a block after {start}")
        h, c, cos, sin = self._cache_inputs(x_t, start, sigma)
        if rows is not None:
            rows = rows.to(h.device)
        with self._amp(h.device):
            for i, block in enumerate(self.blocks):
                # the block's own keys go to the scratch slots past the cache (of a copy for a sub-batch)
                keys, values = (t[:, :, lo : start + b] if rows is None else t[rows, :, lo : start + b]
                                for t in (cache.keys[i], cache.values[i]))
                h = block.step(h, c, cos, sin, keys, values, start - lo)
            return self.output_layer(h, c, head)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_label(self) -> str:
        return f"block diffusion, b={self.block_size}, {super().checkpoint_label()}"
