"""The autoregressive baseline on SEDD's trunk: the same DDiT blocks, causal attention, no time.

Shapes: B batch, L length, N real tokens (the output width), D hidden size, C cond_dim, H heads,
d = D / H head size.

    logits = model(x)          [B, L, N];   logits[:, i] scores x[:, i] given x[:, :i]

The network reads ``[BOS, x_0, …, x_{L−2}]``: BOS = N is an input-only id (the embedding has
N + 1 rows, the output layer N) that marks the start of a block, so every one of the L tokens of
a block is predicted, the first from BOS alone, and −Σ_i log softmax(logits_i)[x_i] is the exact
−log p(block), the number SEDD's likelihood bound bounds for the same block (docs/math.md,
"Autoregressive baseline"). BOS is "start of a packed block", not "start of a document": training
blocks start anywhere in the stream, as SEDD's do.

What differs from :class:`sedd.model.SEDD`, and nothing else:

* attention is causal (position i attends to positions ≤ i; with ``segment_ids`` only within
  its document, with ``attention_mask`` never to padding): :func:`sedd.model.attention.plan_attention`
  with ``causal=True``;
* there is no σ: the adaLN conditioning of every block and of the output layer comes from one
  learned vector ``cond_embed`` [C] (c = SiLU(cond_embed)) in place of ``sigma_map(σ)``, the
  mechanism of the time-independent SEDD (``model.time_conditioning: false``);
* the output is logits over the N real tokens (no MASK column, no σ shift, no ŝ[x_t] = 0).

``attention_mask`` and ``segment_ids`` describe the sequence ``x`` (the targets): position i,
which predicts x_i, attends to the positions j ≤ i whose targets x_j are real and in x_i's
document. So the first token of a document is predicted from the EOS before it alone, and a
padded position is never attended to; the first real position after padding reads BOS, so a row
padded at either end scores its real tokens as the same tokens unpadded would be.

Sampling token by token (:mod:`sedd.sampling.ancestral`) uses :meth:`ARModel.step`, which runs
the same blocks over new positions only, with the keys and values of the earlier positions kept
in a :class:`KVCache`.

Files: ``config.json`` (``"objective": "ar"``, ``tokens``, ``model``; no graph or noise) and
``model.safetensors``, read and written as SEDD's (:mod:`sedd.model.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sedd.model.checkpoint import normalise_config
from sedd.model.ddit import PRESETS, DDiTTrunk, resolve_preset
from sedd.model.layers import HEAD_MULTIPLE, EmbeddingLayer

__all__ = ["ARModel", "KVCache"]


class KVCache:
    """Keys and values of every block for the positions an :meth:`ARModel.step` has seen.

    ``keys[i]``, ``values[i]``: [B, H, capacity, d] in the compute dtype; ``length`` positions
    are filled."""

    def __init__(self, model: "ARModel", batch: int, capacity: int, device: torch.device):
        dtype = model.compute_dtype(device)
        shape = (batch, model.n_heads, capacity, model.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in model.blocks]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in model.blocks]
        self.capacity, self.length = capacity, 0


class ARModel(DDiTTrunk):
    """The autoregressive DDiT (module docstring).

    Arguments:
        config: the whole config as a nested dict: ``"objective": "ar"``, ``tokens`` (N),
            ``model.{hidden_size, cond_dim, n_blocks, n_heads}`` and optionally
            ``model.{length, dropout, mlp_ratio}`` (SEDD's model section; its diffusion keys are
            not read). :meth:`config_for` makes one from a preset.
        attn_backend, autocast_dtype, pad_head_to: as for :class:`sedd.model.SEDD`.

    Attributes: ``tokens`` = ``vocab_size`` (N, the output width), ``bos_id`` (N, an input-only
    id), ``length`` (training length), ``objective`` ("ar"), ``validate_inputs``.
    """

    objective = "ar"

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        attn_backend: str = "auto",
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        pad_head_to: int = HEAD_MULTIPLE,
    ):
        super().__init__()
        self.config = normalise_config(config, objective=self.objective)
        m = self.config["model"]
        self.tokens = self.vocab_size = int(self.config["tokens"])
        if self.tokens < 2:
            raise ValueError(f"config tokens = {self.tokens}: an autoregressive model needs at least 2 tokens")
        self.bos_id = self.tokens
        cond_dim, n_blocks, mlp_ratio, dropout = self._read_sizes(m)

        self.vocab_embed = EmbeddingLayer(self.hidden_size, self.tokens + 1)  # + BOS
        # random, at the spread sigma_map's output starts with in SEDD (std ≈ 0.12): a zero vector
        # would leave the adaLN weights without a gradient at the first steps
        self.cond_embed = nn.Parameter(0.125 * torch.randn(cond_dim))
        self._build_trunk(cond_dim, n_blocks, mlp_ratio, dropout, self.tokens, attn_backend=attn_backend,
                          autocast_dtype=autocast_dtype, pad_head_to=pad_head_to)

    @staticmethod
    def config_for(preset: str, *, tokens: int = 50257, **model_overrides: Any) -> dict[str, Any]:
        """A whole config for a preset of :data:`sedd.model.PRESETS` (the trunk SEDD uses at that
        size), e.g. ``ARModel(ARModel.config_for("cpu", tokens=4096))``."""
        preset = resolve_preset(preset)
        model = {"name": preset, "type": "ddit", **PRESETS[preset], **model_overrides}
        return {"objective": ARModel.objective, "tokens": int(tokens), "model": model}

    # -- inputs -------------------------------------------------------------------------------

    def _check_tokens(self, x: Any) -> None:
        self._check_ids("x", x, self.tokens, f"the model's real tokens; BOS = {self.bos_id} is added by the model")

    def _inputs(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[BOS, x_0, …, x_{L−2}]: what position i reads to predict x_i (BOS also at the first
        real position after padding)."""
        bos = torch.full_like(x[:, :1], self.bos_id)
        inputs = torch.cat([bos, x[:, :-1]], dim=1).long()
        if attention_mask is not None:
            starts = attention_mask & ~F.pad(attention_mask[:, :-1], (1, 0), value=False)
            inputs = torch.where(starts, self.bos_id, inputs)
        return inputs

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> torch.Tensor:
        """Next-token logits of every position of ``x``.

        Arguments:
            x: [B, L] integer token ids in [0, N): the sequence scored (position i is predicted
                from x[:, :i]; x[:, L − 1] is never read).
            attention_mask: [B, L] bool (or 0/1), True where x holds a real token; a padded
                position is never attended to and its own logits are unspecified. Padding at
                the start or the end of a row (a hole between real tokens is not a new start).
            segment_ids: [B, L] document ids of x (maximal runs): no attention across documents.
            head: replaces the output linear, as for :class:`sedd.model.SEDD` (e.g. the loss
                fused with the head, :func:`sedd.ops.linear_cross_entropy`).
        Returns:
            [B, L, N] logits in the compute dtype (bf16 on CUDA with the default autocast; a view
            of the padded head's [B, L, N_pad] output), or what ``head`` returns.
        """
        self._check_tokens(x)
        attention_mask, segment_ids = self._check_layouts(x, attention_mask, segment_ids)
        h = self.vocab_embed(self._inputs(x, attention_mask))  # [B, L, D]
        c = F.silu(self.cond_embed)[None]  # [1, C]: the same conditioning for every row
        return self._run_blocks(h, c, attention_mask, segment_ids, head, causal=True)

    def new_cache(self, batch: int, capacity: int | None = None, device: torch.device | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` rows and up to ``capacity`` positions (default:
        the training length)."""
        device = device if device is not None else self.vocab_embed.embedding.device
        return KVCache(self, batch, capacity or self.length, torch.device(device))

    @torch.no_grad()
    def step(self, inputs: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of the next ``n`` positions, reading only what is new: ``inputs`` [B, n] are the
        model's inputs at positions ``cache.length`` … ``cache.length + n − 1`` (BOS at position
        0, then x_{i−1} at position i); their keys and values are appended to ``cache``.

        Returns [B, n, N] logits: row i scores the token at position ``cache.length + i``. The
        same numbers as :meth:`forward` of the whole prefix, up to float rounding (eval mode, no
        padding or documents)."""
        if self.training:
            raise RuntimeError("ARModel.step runs in eval mode only (no dropout): call model.eval() first")
        start, n = cache.length, inputs.shape[1]
        if start + n > cache.capacity:
            raise ValueError(f"the cache holds {cache.capacity} positions; {start} + {n} do not fit")
        h = self.vocab_embed(inputs.long())
        c = F.silu(self.cond_embed)[None]
        cos, sin = (t[start:] for t in self.rotary_emb(start + n, h.device))
        mask = None
        if n > 1 and start > 0:  # the new queries see every cached key and the new ones up to themselves
            mask = torch.ones(n, start + n, dtype=torch.bool, device=h.device).tril(start)
        with self._amp(h.device):
            for i, block in enumerate(self.blocks):
                h = block.step(h, c, cos, sin, cache.keys[i], cache.values[i], start, mask,
                               causal=start == 0 and n > 1)
            logits = self.output_layer(h, c)
        cache.length = start + n
        return logits

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_label(self) -> str:
        return f"autoregressive, N={self.tokens}, hidden={self.hidden_size}, blocks={len(self.blocks)}"
