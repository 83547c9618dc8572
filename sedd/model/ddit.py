"""The DDiT transformer of SEDD: a non-causal, σ-conditioned transformer that maps noisy tokens to
log concrete scores, state-dict compatible with the public checkpoints (``louaaron/sedd-small``,
``louaaron/sedd-medium``).

Shapes: B batch, L length, V score width (``tokens + 1`` for the absorbing graph, whose MASK id is
V − 1; ``tokens`` for uniform), D hidden size, C cond_dim, H heads, d = D / H head size.

    z      = network(x_t, σ)                                  [B, L, V]   (``raw=True``)
    z      = network(x_t)              with ``model.time_conditioning: false`` (absorbing only)
    ŝ      = z + score_shift(σ)[:, None, None];  ŝ[..., x_t] = 0          (default)
    shift  = −log E(σ) − log(V − 1)  for absorbing with ``scale_by_sigma``, 0 otherwise

The block, with c = SiLU(sigma_map(σ)) (or SiLU(cond_embed), one learned constant, for a model without
time conditioning) and (shift, scale, gate) from ``adaLN_modulation(c)``:

    x += gate₁ · Drop(W_o · Attn(rotary(W_qkv · (LN₁(x)(1 + scale₁) + shift₁))))
    x += gate₂ · Drop(MLP(LN₂(x)(1 + scale₂) + shift₂))

Attention runs on flash-attn's varlen kernel (CUDA, fp16/bf16) or on
``torch.nn.functional.scaled_dot_product_attention`` (everywhere else); padded batches
(``attention_mask``) and packed documents (``segment_ids``) never attend across a boundary.

Files: the blocks are in :mod:`sedd.model.layers`, the attention backends and the padded / packed plan
in :mod:`sedd.model.attention`, config normalisation and the checkpoint files in :mod:`sedd.model.checkpoint`.

Precision: the residual stream and the σ conditioning stay in the parameter dtype (fp32 for the
checkpoints); on CUDA the blocks and the output layer run under bf16 autocast, as the checkpoints
were trained; LayerNorm and rotary always compute in fp32. The post-processed scores are fp32.

The math: docs/math.md, "Network and checkpoint", "Model output".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sedd import ops
from sedd.graph import GRAPHS, get_graph
from sedd.model.attention import (
    ATTN_BACKENDS,
    FLASH_ATTN_AVAILABLE,
    backend_for_layout,
    check_backend,
    plan_attention,
    resolve_backend,
)
from sedd.model.checkpoint import Checkpointed, normalise_config
from sedd.model.layers import (
    HEAD_MULTIPLE,
    DDiTBlock,
    DDiTFinalLayer,
    EmbeddingLayer,
    Rotary,
    SigmaEmbedder,
    apply_rotary,
    block_forward,
    sigma_embedding,
)

__all__ = [
    "ATTN_BACKENDS",
    "FLASH_ATTN_AVAILABLE",
    "PRESETS",
    "SEDD",
    "apply_rotary",
    "sigma_embedding",
]

# Model sections of the public configs (configs/model/{small,medium}.yaml) plus the CPU one that
# `python train/run.py` trains by default. ``SEDD.config_for`` wraps one into a whole config.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(hidden_size=128, cond_dim=64, length=128, n_blocks=4, n_heads=4, dropout=0.0),
    "small": dict(hidden_size=768, cond_dim=128, length=1024, n_blocks=12, n_heads=12, dropout=0.1),
    "medium": dict(hidden_size=1024, cond_dim=128, length=1024, n_blocks=24, n_heads=16, dropout=0.1),
}


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be true or false, got {value!r}")


def resolve_preset(preset: str) -> str:
    """``preset`` checked to be a name in :data:`PRESETS`; ValueError for an unknown one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return preset


class DDiTTrunk(Checkpointed, nn.Module):
    """What :class:`SEDD` and the autoregressive baseline (:class:`sedd.model.ARModel`) share: the
    model section's sizes, the rotary embedding, the DDiT blocks and the output layer, the
    attention backend and autocast, the input checks' switch and the forward through the blocks.
    A subclass reads the config, builds its embedding and conditioning, then the trunk (in this
    order: the order fixes how the weights are drawn from the torch seed)."""

    def _read_sizes(self, m: Mapping[str, Any]) -> tuple[int, int, int, float]:
        """Set ``hidden_size``, ``n_heads``, ``head_dim`` and ``length`` from the model section
        ``m``; return (cond_dim, n_blocks, mlp_ratio, dropout)."""
        hidden, n_heads = int(m["hidden_size"]), int(m["n_heads"])
        if hidden % n_heads:
            raise ValueError(f"model.hidden_size ({hidden}) must be divisible by model.n_heads ({n_heads})")
        self.hidden_size, self.n_heads, self.head_dim = hidden, n_heads, hidden // n_heads
        self.length = int(m.get("length", 1024))
        return int(m["cond_dim"]), int(m["n_blocks"]), int(m.get("mlp_ratio", 4)), float(m.get("dropout", 0.1))

    def _build_trunk(self, cond_dim: int, n_blocks: int, mlp_ratio: int, dropout: float, outputs: int, *,
                     attn_backend: str, autocast_dtype: torch.dtype | None, pad_head_to: int) -> None:
        """The rotary embedding, the blocks and the output layer (``outputs`` logits per position,
        its rows padded in memory to a multiple of ``pad_head_to``)."""
        hidden, n_heads = self.hidden_size, self.n_heads
        self.rotary_emb = Rotary(self.head_dim)
        self.blocks = nn.ModuleList(
            DDiTBlock(hidden, n_heads, cond_dim, mlp_ratio=mlp_ratio, dropout=dropout) for _ in range(n_blocks)
        )
        self.output_layer = DDiTFinalLayer(hidden, outputs, cond_dim, pad_to=pad_head_to)
        self.attn_backend = attn_backend
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
        self.autocast_dtype = autocast_dtype
        self.validate_inputs = True

    # -- compiled blocks ------------------------------------------------------------------------

    def compile_blocks(self, **options: Any) -> str:
        """``torch.compile`` the blocks, regionally: one compiled copy of
        :func:`sedd.model.layers.block_forward` that every block runs (its weights are inputs), so
        compile time is one block's whatever the depth. The embedding, the σ conditioning, the
        output layer and the fused heads stay eager (a head loops over chunks of a data-dependent
        row count), and so do the module calls, whose hooks DDP and FSDP2 use. ``options`` go to
        ``torch.compile`` (``backend``, ``mode``, ``dynamic``). Returns the line that says what
        was compiled."""
        compiled = torch.compile(block_forward, **options)
        for block in self.blocks:
            block.forward_fn = compiled
        how = ", ".join(f"{k}={v}" for k, v in options.items()) or "inductor"
        return (f"compiled: the {len(self.blocks)} transformer blocks (one torch.compile'd block function, {how}); "
                "embedding, output layer and loss run eagerly")

    @property
    def blocks_compiled(self) -> bool:
        return any(block.forward_fn is not block_forward for block in self.blocks)

    # -- attention backend and dtype ------------------------------------------------------------

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        self._attn_backend = check_backend(value)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """dtype the blocks compute in on ``device`` (the dtype of a raw output there)."""
        device = torch.device(device)
        if device.type == "cuda":
            if self.autocast_dtype is not None:
                return self.autocast_dtype
            if torch.is_autocast_enabled("cuda"):
                return torch.get_autocast_dtype("cuda")
        return self.vocab_embed.embedding.dtype

    def resolved_attn_backend(self, device: torch.device) -> str:
        """"sdpa" or "flash": the backend a forward on ``device`` uses. Raises where "flash" was
        asked for and cannot run there."""
        return resolve_backend(self.attn_backend, device, self.compute_dtype(device))

    def _amp(self, device: torch.device):
        if device.type == "cuda" and self.autocast_dtype is not None:
            # autocast's cache of cast weights must not outlive a CUDA graph capture (torch.cuda.graph's notes)
            return torch.autocast("cuda", dtype=self.autocast_dtype,
                                  cache_enabled=not torch.cuda.is_current_stream_capturing())
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def inference_weights(self):
        """Inside the block the matmul weights of the blocks and the output layer are held in the
        autocast dtype (bf16), cast once, instead of autocast casting them again at every forward:
        the same numbers (autocast rounds them the same way), fewer kernels and bytes per call. For
        inference on CUDA (the samplers use it); a no-op without autocast, for a model with no
        plain CUDA weights (FSDP2 shards), and while gradients are enabled."""
        linears = [m for part in (self.blocks, self.output_layer) for m in part.modules() if isinstance(m, nn.Linear)]
        params = [p for m in linears for p in (m.weight, m.bias) if p is not None]
        plain = all(type(p.data) is torch.Tensor and p.device.type == "cuda" for p in params)
        if self.autocast_dtype is None or not plain or torch.is_grad_enabled():
            yield
            return
        saved = [p.data for p in params]
        for p in params:
            p.data = p.data.to(self.autocast_dtype)
        try:
            yield
        finally:
            for p, data in zip(params, saved):
                p.data = data

    # -- input checks ---------------------------------------------------------------------------

    def _checking(self) -> bool:
        # the same switch as the ops' value checks, so the sampler and the training loss (which
        # turn those off for tensors they made) run the model without a device sync
        return self.validate_inputs and ops.checking_values()

    def _check_ids(self, name: str, x: Any, limit: int, why: str) -> None:
        """TypeError/ValueError unless ``x`` is a [B, L] integer tensor of ids in [0, ``limit``)
        (the range read on the host only when :meth:`_checking`); ``why`` says what the limit is."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of token ids, got {type(x).__name__}")
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(f"{name} must be an integer tensor of token ids, got {x.dtype}")
        if x.dim() != 2 or x.numel() == 0:
            raise ValueError(f"{name} must have shape [B, L] with B, L > 0, got {list(x.shape)}")
        if self._checking():
            lo, hi = (int(v) for v in torch.aminmax(x))
            if lo < 0 or hi >= limit:
                raise ValueError(f"{name} holds token ids outside [0, {limit}) ({why}): min {lo}, max {hi}")

    @staticmethod
    def _check_layout(name: str, t: Any, x_t: torch.Tensor, allow_bool: bool) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of shape {list(x_t.shape)}, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or (t.dtype == torch.bool and not allow_bool):
            raise TypeError(f"{name} must be {'a bool or ' if allow_bool else 'an '}integer tensor, got {t.dtype}")
        if t.shape != x_t.shape:
            raise ValueError(f"{name} must have the shape of x_t {list(x_t.shape)}, got {list(t.shape)}")
        if t.device != x_t.device:
            raise ValueError(f"{name} is on {t.device} but x_t is on {x_t.device}")
        return t

    def _check_layouts(self, x: torch.Tensor, attention_mask, segment_ids):
        """(attention_mask as bool, segment_ids), each checked against the tokens ``x``, or None."""
        if attention_mask is not None:
            attention_mask = self._check_layout("attention_mask", attention_mask, x, allow_bool=True) != 0
        if segment_ids is not None:
            segment_ids = self._check_layout("segment_ids", segment_ids, x, allow_bool=False)
        return attention_mask, segment_ids

    # -- forward --------------------------------------------------------------------------------

    def _run_blocks(self, h: torch.Tensor, c: torch.Tensor, attention_mask, segment_ids, head, *,
                    causal: bool = False):
        """The blocks and the output layer (or ``head``) on the embedded inputs ``h`` [B, L, D]
        with the conditioning ``c``, under the model's autocast; attention as planned for the
        padding, the documents and ``causal``."""
        B, L = h.shape[:2]
        cos, sin = self.rotary_emb(L, h.device)
        backend = backend_for_layout(self.resolved_attn_backend(h.device), self.attn_backend,
                                     varlen=attention_mask is not None or segment_ids is not None,
                                     host_sync=ops.host_sync_allowed(h.device))
        plan = plan_attention(backend, B, L, h.device, attention_mask, segment_ids, causal=causal)
        with self._amp(h.device):
            for block in self.blocks:
                h = block(h, c, cos, sin, plan)
            return self.output_layer(h, c, head)

class SEDD(DDiTTrunk):
    """The DDiT score network of SEDD.

    Arguments:
        config: the whole training config as a nested dict (or OmegaConf DictConfig), as in the
            public ``config.json``: ``tokens``, ``graph.type`` ("absorb" | "uniform"),
            ``model.{hidden_size, cond_dim, n_blocks, n_heads}`` and optionally
            ``model.{length, scale_by_sigma (default True), dropout (default 0.1), mlp_ratio (default 4),
            time_conditioning (default True)}``.
            Extra keys are kept: ``self.config`` is a plain-dict copy of all of it, and
            :meth:`save_pretrained` writes it back.
        attn_backend: "auto" (flash-attn for CUDA fp16/bf16 when installed, else SDPA), "sdpa"
            or "flash" (an error where flash-attn cannot run). Settable later as an attribute.
            With a padding mask or document ids, flash-attn reads the document lengths on the
            host (a device sync): "auto" then takes SDPA under :func:`sedd.ops.sync_free`, CUDA
            graph capture and ``torch.compile``; "flash" keeps flash-attn and its sync.
        autocast_dtype: dtype of the CUDA autocast around the blocks and output layer
            (bf16, as the checkpoints were trained), or None to run in the parameter dtype.
        pad_head_to: the output layer holds its V rows padded in memory to a multiple of this
            (default 64: 50258 -> 50304), so every row of scores starts 16-byte aligned; the
            scores are the view [..., :V] of the padded output, and checkpoints keep V rows
            (:class:`sedd.model.layers.DDiTFinalLayer`). 1: no padding.

    Attributes: ``vocab_size`` (V), ``tokens`` (N), ``graph_type``, ``absorb``, ``mask_id``
    (V − 1, or None for uniform), ``scale_by_sigma``, ``length`` (training length; rotary has no
    length limit), ``validate_inputs`` (set False to skip the checks that synchronise with the
    device; they also follow :func:`sedd.ops.value_checks` / ``SEDD_CHECK_VALUES``, so they are
    skipped inside the sampler and the training loss and under ``torch.compile``).

    ``scale_by_sigma`` only applies to the absorbing graph (the public code never used it with
    uniform); a uniform model's shift is always 0.

    ``time_conditioning: false`` (absorbing with ``scale_by_sigma`` only): the network does not read
    σ; the adaLN conditioning is one learned vector ``cond_embed`` [C] in place of ``sigma_map``, so
    z depends on x_t alone and σ enters through :meth:`score_shift` only
    (docs/math.md, "Fewer network evaluations"). ``sample(..., cache=True)`` then reuses z exactly.
    The loss, the fused head and the samplers are unchanged.
    """

    objective = "sedd"  # the config's "objective" this class loads (a subclass names its own)
    forward_process = True

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
        cfg, m = self.config, self.config["model"]
        graph = cfg["graph"]
        self.graph_type: str = graph["type"] if isinstance(graph, dict) else graph
        self.tokens = int(cfg["tokens"])
        # the forward process: the vocabulary facts (score width, MASK id) and the score shift
        self.graph = get_graph(self.graph_type, self.tokens)
        self.absorb = self.graph.absorbing
        self.vocab_size, self.mask_id = self.graph.dim, self.graph.mask_id
        if self.vocab_size < 2:
            raise ValueError(f"config tokens = {self.tokens} gives graph {self.graph_type!r} score rows of width "
                             f"{self.vocab_size}; at least 2 are needed")
        self._check_graph()

        cond_dim, n_blocks, mlp_ratio, dropout = self._read_sizes(m)
        self.scale_by_sigma = bool(m.get("scale_by_sigma", True))
        self.time_conditioning = _flag(m.get("time_conditioning", True), "model.time_conditioning")
        if not self.time_conditioning and not (self.absorb and self.scale_by_sigma):
            # Only the absorbing shift −log E(σ) carries the whole σ-dependence of the exact score;
            # a uniform (or unscaled) model without σ could not represent it.
            raise ValueError("model.time_conditioning: false needs the absorbing graph with scale_by_sigma "
                             f"(got graph {self.graph_type!r}, scale_by_sigma={self.scale_by_sigma})")

        self.vocab_embed = EmbeddingLayer(self.hidden_size, self.vocab_size)
        if self.time_conditioning:
            self.sigma_map = SigmaEmbedder(cond_dim)
        else:
            # random, at the spread sigma_map's output starts with (std ≈ 0.12): a zero vector would
            # leave the adaLN weights without a gradient, a larger one would speed their updates up
            self.cond_embed = nn.Parameter(0.125 * torch.randn(cond_dim))
        self._build_trunk(cond_dim, n_blocks, mlp_ratio, dropout, self.vocab_size, attn_backend=attn_backend,
                          autocast_dtype=autocast_dtype, pad_head_to=pad_head_to)

    def _check_graph(self) -> None:
        """ValueError for a forward process this network cannot model (a subclass's; SEDD takes
        both), before the checks of its other settings."""

    # -- presets --------------------------------------------------------------------------------

    @staticmethod
    def config_for(
        preset: str,
        *,
        graph: str = "absorb",
        tokens: int = 50257,
        noise: str | Mapping[str, Any] | None = None,
        **model_overrides: Any,
    ) -> dict[str, Any]:
        """A whole config (public layout) for a preset in :data:`PRESETS` ("cpu", the model of
        ``python train/run.py``; "small"; "medium"), e.g.
        ``SEDD(SEDD.config_for("small"))`` or ``SEDD.config_for("cpu", tokens=11, graph="uniform", n_blocks=1)``.

        ``noise`` is the noise section: a type name, a whole section ({"type": ..., "eps": ...}),
        or None for the paper's pairing (log-linear for absorbing, geometric for uniform).
        """
        preset = resolve_preset(preset)
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {tuple(GRAPHS)}, got {graph!r}")
        cls = GRAPHS[graph]
        if noise is None:
            noise = cls.default_noise
        # the public code scales the output by σ for the absorbing graph only
        model = {"name": preset, "type": "ddit", "scale_by_sigma": cls.absorbing, **PRESETS[preset]}
        model.update(model_overrides)
        return {
            "tokens": int(tokens),
            "graph": {"type": graph},
            "noise": {"type": noise} if isinstance(noise, str) else dict(noise),
            "model": model,
        }

    # -- input checks ---------------------------------------------------------------------------

    def _check_sigma(self, sigma: Any, batch: int | None, device: torch.device | None) -> torch.Tensor:
        if not isinstance(sigma, torch.Tensor):
            raise TypeError(f"sigma must be a tensor of shape [B] or [B, 1], got {type(sigma).__name__}")
        if not sigma.is_floating_point():
            raise TypeError(f"sigma must be a floating-point tensor, got {sigma.dtype}")
        if sigma.dim() == 2 and sigma.shape[1] == 1:
            sigma = sigma[:, 0]
        if sigma.dim() != 1 or (batch is not None and sigma.shape[0] != batch):
            want = f"[{batch}] or [{batch}, 1]" if batch is not None else "[B] or [B, 1]"
            raise ValueError(f"sigma must have shape {want}, got {list(sigma.shape)}")
        if device is not None and sigma.device != device:
            raise ValueError(f"sigma is on {sigma.device} but x_t is on {device}")
        if self._checking() and sigma.numel() and not bool(((sigma > 0) & (sigma < math.inf)).all()):
            raise ValueError(f"sigma must be finite and > 0, got values {sigma[:8].tolist()}")
        return sigma

    def _check_tokens(self, x_t: Any) -> None:
        self._check_ids("x_t", x_t, self.vocab_size,
                        f"V = {self.vocab_size} for graph {self.graph_type!r} with tokens={self.tokens}")

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        *,
        raw: bool = False,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> torch.Tensor:
        """Log concrete scores of every one-token change of ``x_t``.

        Arguments:
            x_t: [B, L] integer token ids in [0, V).
            sigma: [B] or [B, 1] float, total noise σ̄(t) of each row; finite and > 0.
            raw: return the network output z instead of the scores, for fused kernels that fold
                the post-processing (``ŝ = z + score_shift(σ)``, then ``ŝ[x_t] = 0``) into their pass.
            attention_mask: [B, L] bool (or 0/1 integers), True for real tokens. Padding never
                influences real tokens; its own outputs are unspecified. Padding may sit anywhere
                (left or right) but must still hold valid ids.
            segment_ids: [B, L] integer document ids of a packed batch: tokens attend only within
                their document, a maximal run of equal ids (an id that recurs later in the row
                starts a new document). Positions keep counting across documents, which rotary
                attention cannot see (it depends on relative positions only).
            head: replaces the output linear: ``head(hidden [B, L, D], weight [V_pad, D], bias [V_pad])``
                is called inside the output layer's forward (so DDP/FSDP2 see its parameters in
                use; under autocast all three come cast to the autocast dtype) and ``forward``
                returns its result as is: e.g. :func:`sedd.ops.linear_score_entropy` for the loss
                without the [B, L, V] logits (``width=V``), or the head at a few rows only. The
                weight and bias are the padded ones (``V_pad`` ≥ V rows, see ``pad_head_to``):
                the scores are the first V columns of ``hidden @ weightᵀ + bias``.
        Returns:
            raw=False: ŝ [B, L, V] float32, with ŝ[b, i, x_t[b, i]] = 0.
            raw=True: z [B, L, V] in the compute dtype (:meth:`compute_dtype`: bf16 on CUDA with
            the default autocast, the parameter dtype elsewhere); with a padded head a view of
            the [B, L, V_pad] output (last stride 1, row stride V_pad).
        """
        self._check_tokens(x_t)
        sigma = self._check_sigma(sigma, x_t.shape[0], x_t.device)
        attention_mask, segment_ids = self._check_layouts(x_t, attention_mask, segment_ids)

        x = self.vocab_embed(x_t if x_t.dtype in (torch.int32, torch.int64) else x_t.long())  # [B, L, D]
        # The conditioning stays outside autocast, as in training: σ spans 1e-4 .. 20 and its
        # features feed every block's scale and gate.
        if self.time_conditioning:
            c = F.silu(self.sigma_map(sigma))  # [B, C]
        else:
            # one row for the whole batch (broadcast): a row's output then does not depend on which
            # rows share its batch, which the sampler's cache relies on for identical tokens
            c = F.silu(self.cond_embed)[None]  # [1, C]
        z = self._run_blocks(x, c, attention_mask, segment_ids, head)  # [B, L, V]
        if raw or head is not None:
            return z
        return self._postprocess(z, x_t, sigma)

    def score_shift(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-row additive shift of the scores: ``ŝ = z + shift[:, None, None]`` (then ŝ[x_t] = 0).

        Arguments:
            sigma: [B] or [B, 1] float, finite and > 0.
        Returns:
            [B] float32: ``−log E(σ) − log(V − 1)`` for the absorbing graph with ``scale_by_sigma``
            (E(σ) = expm1(σ) for σ < 0.5, exp(σ) − 1 otherwise), zeros otherwise.
        """
        return self._score_shift(self._check_sigma(sigma, None, None))

    def postprocess(self, raw: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The post-processing ``forward`` applies: raw z [B, L, V] (any float dtype), x_t [B, L],
        sigma [B] or [B, 1] -> ŝ [B, L, V] float32. The reference for kernels that fuse it."""
        self._check_tokens(x_t)
        if raw.dim() != 3 or raw.shape[:2] != x_t.shape or raw.shape[2] != self.vocab_size:
            raise ValueError(f"raw must have shape {[*x_t.shape, self.vocab_size]}, got {list(raw.shape)}")
        return self._postprocess(raw, x_t, self._check_sigma(sigma, x_t.shape[0], x_t.device))

    def _score_shift(self, sigma: torch.Tensor) -> torch.Tensor:
        # the public code only ever scaled absorbing models; a uniform graph's shift is 0 anyway
        if not self.scale_by_sigma:
            return torch.zeros(sigma.shape[0], dtype=torch.float32, device=sigma.device)
        return self.graph.score_shift(sigma)

    def _postprocess(self, z: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = z.float() + self._score_shift(sigma)[:, None, None]  # a fresh tensor: safe to scatter into
        # The ratio of x_t to itself is 1 by definition, whatever the network says.
        return out.scatter_(-1, x_t.long().unsqueeze(-1), 0.0)

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_label(self) -> str:
        return f"V={self.vocab_size}, graph={self.graph_type!r}, hidden={self.hidden_size}, blocks={len(self.blocks)}"
