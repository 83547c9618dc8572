"""The DDiT transformer of SEDD: a non-causal, σ-conditioned transformer that maps noisy tokens to
log concrete scores, state-dict compatible with the public checkpoints (``louaaron/sedd-small``,
``louaaron/sedd-medium``).

Shapes: B batch, L length, V score width (``tokens + 1`` for the absorbing graph, whose MASK id is
V − 1; ``tokens`` for uniform), D hidden size, C cond_dim, H heads, d = D / H head size.

    z      = network(x_t, σ)                                  [B, L, V]   (``raw=True``)
    ŝ      = z + score_shift(σ)[:, None, None];  ŝ[..., x_t] = 0          (default)
    shift  = −log E(σ) − log(V − 1)  for absorbing with ``scale_by_sigma``, 0 otherwise

The block, with c = SiLU(sigma_map(σ)) and (shift, scale, gate) from ``adaLN_modulation(c)``:

    x += gate₁ · Drop(W_o · Attn(rotary(W_qkv · (LN₁(x)(1 + scale₁) + shift₁))))
    x += gate₂ · Drop(MLP(LN₂(x)(1 + scale₂) + shift₂))

Attention runs on flash-attn's varlen kernel (CUDA, fp16/bf16) or on
``torch.nn.functional.scaled_dot_product_attention`` (everywhere else); padded batches
(``attention_mask``) and packed documents (``segment_ids``) never attend across a boundary.

Precision: the residual stream and the σ conditioning stay in the parameter dtype (fp32 for the
checkpoints); on CUDA the blocks and the output layer run under bf16 autocast, as the checkpoints
were trained; LayerNorm and rotary always compute in fp32. The post-processed scores are fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from sedd.graph import get_graph

try:
    from flash_attn import flash_attn_varlen_qkvpacked_func
except (ImportError, OSError):  # OSError: a wheel built against another CUDA or torch
    flash_attn_varlen_qkvpacked_func = None

FLASH_ATTN_AVAILABLE = flash_attn_varlen_qkvpacked_func is not None
ATTN_BACKENDS = ("auto", "sdpa", "flash")
SIGMA_EMBED_DIM = 256  # fixed by the checkpoints: sigma_map.mlp.0.weight is [C, 256]
ROTARY_BASE = 10_000.0

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

PRESET_ALIASES = {"tiny": "cpu"}  # the name config_for used before it matched train/run.py's --preset
_REQUIRED_MODEL_KEYS = ("hidden_size", "cond_dim", "n_blocks", "n_heads")


# ----------------------------------------------------------------------------------------------
# Functional pieces (also the formulas the tests check)
# ----------------------------------------------------------------------------------------------


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


def _document_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] segment ids -> [B, L] int64 ids of maximal runs of equal ids (0, 1, 2, ... per row).

    Documents are runs, so an id that comes back later in the row starts a new document: the SDPA
    mask and flash-attn's cu_seqlens (which can only describe runs) then agree.
    """
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).long()
    return F.pad(change.cumsum(dim=1), (1, 0))


# ----------------------------------------------------------------------------------------------
# Layers (attribute names are the checkpoint's key names)
# ----------------------------------------------------------------------------------------------


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


@dataclass
class _AttentionPlan:
    """What every block's attention needs, built once per forward.

    backend: "sdpa" or "flash".
    sdpa_mask: bool [B, 1, 1, L] or [B, 1, L, L] (True = may attend), or None for full attention.
    flash_index: int64 [T]: flat positions (into B·L) of the real tokens, or None when all are real.
    cu_seqlens: int32 [n_docs + 1]: document boundaries in the (unpadded) flat token list.
    max_seqlen: the longest document.
    """

    backend: str
    sdpa_mask: torch.Tensor | None = None
    flash_index: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


def _attention(qkv: torch.Tensor, plan: _AttentionPlan) -> torch.Tensor:
    """Non-causal attention, softmax scale 1/√d, no dropout.

    Arguments:
        qkv: [B, L, 3, H, d] (q and k already rotated).
    Returns:
        [B, L, H, d], dtype of ``qkv``. Rows of padding positions hold unspecified values.
    """
    B, L, _, H, d = qkv.shape
    if plan.backend == "flash":
        flat = qkv.reshape(B * L, 3, H, d)
        if plan.flash_index is not None:
            flat = flat[plan.flash_index]
        if flat.shape[0] == 0:  # every position is padding
            return qkv.new_zeros(B, L, H, d)
        out = flash_attn_varlen_qkvpacked_func(
            flat.contiguous(), plan.cu_seqlens, plan.max_seqlen, 0.0, softmax_scale=d**-0.5, causal=False
        )
        if plan.flash_index is not None:
            out = out.new_zeros(B * L, H, d).index_copy_(0, plan.flash_index, out)
        return out.view(B, L, H, d)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # [B, H, L, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.sdpa_mask, dropout_p=0.0, scale=d**-0.5)
    return out.transpose(1, 2)


class DDiTBlock(nn.Module):
    """One transformer block with adaLN-Zero conditioning. x: [B, L, D], c: [B, C] -> [B, L, D]."""

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

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: _AttentionPlan
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)

        h = _modulate(self.norm1(x), shift1, scale1)
        qkv = rearrange(self.attn_qkv(h), "b s (three h d) -> b s three h d", three=3, h=self.n_heads)
        qkv = torch.cat([apply_rotary(qkv[:, :, :2], cos, sin), qkv[:, :, 2:]], dim=2)
        a = rearrange(_attention(qkv, plan), "b s h d -> b s (h d)")
        x = x + gate1 * F.dropout(self.attn_out(a), self.dropout, self.training)

        h = _modulate(self.norm2(x), shift2, scale2)
        return x + gate2 * F.dropout(self.mlp(h), self.dropout, self.training)


class DDiTFinalLayer(nn.Module):
    """x: [B, L, D], c: [B, C] -> z [B, L, V]. Zero-initialised, so a fresh model outputs z = 0."""

    def __init__(self, hidden_size: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, head: Callable | None = None) -> Any:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        h = _modulate(self.norm_final(x), shift, scale)
        if head is None:
            return self.linear(h)
        weight, bias = self.linear.weight, self.linear.bias
        if torch.is_autocast_enabled(h.device.type):  # the casts nn.Linear would get from autocast
            dtype = torch.get_autocast_dtype(h.device.type)
            h, weight, bias = h.to(dtype), weight.to(dtype), bias.to(dtype)
        # Called here, inside this module's forward, so DDP and FSDP2 (whose hooks gather the
        # parameters around the forward) see the head's parameters in use.
        return head(h, weight, bias)


# ----------------------------------------------------------------------------------------------
# Config handling
# ----------------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    """Nested dict / list copy of a config (OmegaConf DictConfig, Mapping, dataclass-free)."""
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf  # only reachable when the caller already has omegaconf

        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _normalise_config(config: Any) -> dict[str, Any]:
    cfg = _to_plain(config)
    if not isinstance(cfg, dict):
        raise TypeError(f"config must be a dict (or an OmegaConf DictConfig), got {type(config).__name__}")
    # Tolerate the {"config": {...}} wrapping that newer PyTorchModelHubMixin versions write.
    if "tokens" not in cfg and isinstance(cfg.get("config"), dict):
        cfg = cfg["config"]
    if "tokens" not in cfg:
        raise ValueError("config has no 'tokens' key (the number of real tokens, e.g. 50257 for GPT-2)")
    graph = cfg.get("graph")
    graph_type = graph.get("type") if isinstance(graph, dict) else graph
    if graph_type not in ("absorb", "uniform"):
        raise ValueError(f"config graph.type must be 'absorb' or 'uniform', got {graph_type!r}")
    model = cfg.get("model")
    if not isinstance(model, dict):
        raise ValueError("config has no 'model' section with hidden_size, cond_dim, n_blocks, n_heads")
    missing = [k for k in _REQUIRED_MODEL_KEYS if k not in model]
    if missing:
        raise ValueError(f"config.model is missing {missing}")
    return cfg


# ----------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else can only mean a local path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def _checkpoint_dir(
    name: str, *, revision: str | None, cache_dir: str | os.PathLike | None, local_files_only: bool
) -> Path:
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(
            f"{name!r} is a file; pass the directory that holds config.json and model.safetensors"
        )
    if _looks_like_local_path(name):
        raise FileNotFoundError(f"no checkpoint directory at {name!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise OSError(
            f"{name!r} is not a local directory and huggingface_hub is not installed to fetch it "
            "from the Hub; pass a local directory holding config.json and model.safetensors"
        ) from err
    try:
        folder = snapshot_download(
            repo_id=name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=["config.json", *_WEIGHT_FILES],
        )
    except Exception as err:  # offline, unknown repo, invalid id, HTTP errors: all mean "not here"
        raise OSError(
            f"could not get the checkpoint {name!r} from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). If you are offline or the repository does not exist, "
            "pass a local directory holding config.json and model.safetensors (or pytorch_model.bin)."
        ) from err
    return Path(folder)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file, bin_file = (folder / f for f in _WEIGHT_FILES)
    if safetensors_file.is_file() or bin_file.is_file():
        path = safetensors_file if safetensors_file.is_file() else bin_file
        try:
            if path is safetensors_file:
                from safetensors.torch import load_file

                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # SafetensorError, pickle and zip errors: a damaged file
            raise ValueError(
                f"cannot read the weights {str(path)!r} ({path.stat().st_size:,} bytes): {err}. The file is "
                "damaged, most likely truncated by an interrupted copy or download; copy it again"
            ) from err
    else:
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {str(folder)!r} (found {present})")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"the weights in {str(folder)!r} are not a flat state dict of tensors")
    return dict(state)


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrap every key; the weights are the same.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class SEDD(nn.Module):
    """The DDiT score network of SEDD.

    Arguments:
        config: the whole training config as a nested dict (or OmegaConf DictConfig), as in the
            public ``config.json``: ``tokens``, ``graph.type`` ("absorb" | "uniform"),
            ``model.{hidden_size, cond_dim, n_blocks, n_heads}`` and optionally
            ``model.{length, scale_by_sigma (default True), dropout (default 0.1), mlp_ratio (default 4)}``.
            Extra keys are kept: ``self.config`` is a plain-dict copy of all of it, and
            :meth:`save_pretrained` writes it back.
        attn_backend: "auto" (flash-attn for CUDA fp16/bf16 when installed, else SDPA), "sdpa"
            or "flash" (an error where flash-attn cannot run). Settable later as an attribute.
        autocast_dtype: dtype of the CUDA autocast around the blocks and output layer
            (bf16, as the checkpoints were trained), or None to run in the parameter dtype.

    Attributes: ``vocab_size`` (V), ``tokens`` (N), ``graph_type``, ``absorb``, ``mask_id``
    (V − 1, or None for uniform), ``scale_by_sigma``, ``length`` (training length; rotary has no
    length limit), ``validate_inputs`` (set False to skip the checks that synchronise with the
    device; they are also skipped under ``torch.compile``).

    ``scale_by_sigma`` only applies to the absorbing graph (the public code never used it with
    uniform); a uniform model's shift is always 0.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        attn_backend: str = "auto",
        autocast_dtype: torch.dtype | None = torch.bfloat16,
    ):
        super().__init__()
        self.config = _normalise_config(config)
        cfg, m = self.config, self.config["model"]
        graph = cfg["graph"]
        self.graph_type: str = graph["type"] if isinstance(graph, dict) else graph
        self.absorb = self.graph_type == "absorb"
        self.tokens = int(cfg["tokens"])
        if self.tokens < (1 if self.absorb else 2):
            raise ValueError(f"config tokens must be >= {1 if self.absorb else 2} for graph {self.graph_type!r}, got {self.tokens}")
        self.vocab_size = self.tokens + (1 if self.absorb else 0)
        self.mask_id = self.vocab_size - 1 if self.absorb else None
        self.graph = get_graph(self.graph_type, self.tokens)  # the forward process; supplies the score shift

        hidden, n_heads = int(m["hidden_size"]), int(m["n_heads"])
        if hidden % n_heads:
            raise ValueError(f"model.hidden_size ({hidden}) must be divisible by model.n_heads ({n_heads})")
        cond_dim, n_blocks = int(m["cond_dim"]), int(m["n_blocks"])
        dropout, mlp_ratio = float(m.get("dropout", 0.1)), int(m.get("mlp_ratio", 4))
        self.hidden_size, self.n_heads, self.head_dim = hidden, n_heads, hidden // n_heads
        self.length = int(m.get("length", 1024))
        self.scale_by_sigma = bool(m.get("scale_by_sigma", True))

        self.vocab_embed = EmbeddingLayer(hidden, self.vocab_size)
        self.sigma_map = SigmaEmbedder(cond_dim)
        self.rotary_emb = Rotary(self.head_dim)
        self.blocks = nn.ModuleList(
            DDiTBlock(hidden, n_heads, cond_dim, mlp_ratio=mlp_ratio, dropout=dropout) for _ in range(n_blocks)
        )
        self.output_layer = DDiTFinalLayer(hidden, self.vocab_size, cond_dim)

        self.attn_backend = attn_backend
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
        self.autocast_dtype = autocast_dtype
        self.validate_inputs = True

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
        ``python train/run.py``, also accepted as "tiny"; "small"; "medium"), e.g.
        ``SEDD(SEDD.config_for("small"))`` or ``SEDD.config_for("cpu", tokens=11, graph="uniform", n_blocks=1)``.

        ``noise`` is the noise section: a type name, a whole section ({"type": ..., "eps": ...}),
        or None for the paper's pairing (log-linear for absorbing, geometric for uniform).
        """
        preset = PRESET_ALIASES.get(preset, preset)
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        if graph not in ("absorb", "uniform"):
            raise ValueError(f"graph must be 'absorb' or 'uniform', got {graph!r}")
        if noise is None:
            noise = "loglinear" if graph == "absorb" else "geometric"
        model = {"name": preset, "type": "ddit", "scale_by_sigma": graph == "absorb", **PRESETS[preset]}
        model.update(model_overrides)
        return {
            "tokens": int(tokens),
            "graph": {"type": graph},
            "noise": {"type": noise} if isinstance(noise, str) else dict(noise),
            "model": model,
        }

    # -- attention backend ----------------------------------------------------------------------

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value: str) -> None:
        if value not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {value!r}")
        if value == "flash" and not FLASH_ATTN_AVAILABLE:
            raise RuntimeError("attn_backend='flash' needs the flash-attn package (pip install flash-attn), which is not importable here")
        self._attn_backend = value

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
        device, dtype = torch.device(device), self.compute_dtype(device)
        flash_ok = FLASH_ATTN_AVAILABLE and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        if self.attn_backend == "flash" and not flash_ok:
            raise ValueError(
                f"attn_backend='flash' needs CUDA tensors in fp16/bf16; this forward runs on {device} in {dtype}"
            )
        if self.attn_backend == "sdpa":
            return "sdpa"
        return "flash" if flash_ok else "sdpa"

    def _plan_attention(
        self, B: int, L: int, device: torch.device, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None
    ) -> _AttentionPlan:
        backend = self.resolved_attn_backend(device)
        docs = _document_ids(segment_ids) if segment_ids is not None else None
        if backend == "sdpa":
            allowed = None
            if docs is not None:
                allowed = docs[:, :, None] == docs[:, None, :]  # [B, L, L]
            if attention_mask is not None:
                # A row of pure padding would leave its queries nothing to attend to (NaN); let it
                # see itself, its output is unspecified anyway.
                keys = (attention_mask | ~attention_mask.any(dim=1, keepdim=True))[:, None, :]  # [B, 1, L]
                allowed = keys if allowed is None else allowed & keys
                if docs is not None:
                    # Same for a padding query whose document holds no real token. NaN rows must not
                    # exist at all: 0 · NaN in the next layer's P·V would reach the real tokens.
                    allowed = allowed | torch.eye(L, dtype=torch.bool, device=device)
            return _AttentionPlan("sdpa", sdpa_mask=None if allowed is None else allowed[:, None])

        if attention_mask is None and docs is None:
            cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=device)
            return _AttentionPlan("flash", cu_seqlens=cu, max_seqlen=L)
        # One key per (row, document): rows never merge because a row's document ids are < L.
        key = (docs if docs is not None else torch.zeros(B, L, dtype=torch.long, device=device))
        key = (key + torch.arange(B, device=device)[:, None] * L).reshape(-1)
        index = None
        if attention_mask is not None:
            index = attention_mask.reshape(-1).nonzero().squeeze(1)  # host sync: flash needs lengths
            key = key[index]
        starts = torch.ones_like(key, dtype=torch.bool)
        starts[1:] = key[1:] != key[:-1]
        bounds = torch.cat([starts.nonzero().squeeze(1), key.new_tensor([key.numel()])])
        max_seqlen = int((bounds[1:] - bounds[:-1]).max()) if bounds.numel() > 1 else 0
        return _AttentionPlan(
            "flash", flash_index=index, cu_seqlens=bounds.to(torch.int32), max_seqlen=max_seqlen
        )

    # -- input checks ---------------------------------------------------------------------------

    def _checking(self) -> bool:
        return self.validate_inputs and not torch.compiler.is_compiling()

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
        if not isinstance(x_t, torch.Tensor):
            raise TypeError(f"x_t must be a tensor of token ids, got {type(x_t).__name__}")
        if x_t.dtype == torch.bool or x_t.is_floating_point() or x_t.is_complex():
            raise TypeError(f"x_t must be an integer tensor of token ids, got {x_t.dtype}")
        if x_t.dim() != 2 or x_t.numel() == 0:
            raise ValueError(f"x_t must have shape [B, L] with B, L > 0, got {list(x_t.shape)}")
        if self._checking():
            lo, hi = (int(v) for v in torch.aminmax(x_t))
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"x_t holds token ids outside [0, {self.vocab_size}) (V = {self.vocab_size} for graph "
                    f"{self.graph_type!r} with tokens={self.tokens}): min {lo}, max {hi}"
                )

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
            head: replaces the output linear: ``head(hidden [B, L, D], weight [V, D], bias [V])``
                is called inside the output layer's forward (so DDP/FSDP2 see its parameters in
                use; under autocast all three come cast to the autocast dtype) and ``forward``
                returns its result as is: e.g. :func:`sedd.ops.linear_score_entropy` for the loss
                without the [B, L, V] logits, or the head at a few rows only.
        Returns:
            raw=False: ŝ [B, L, V] float32, with ŝ[b, i, x_t[b, i]] = 0.
            raw=True: z [B, L, V] in the compute dtype (:meth:`compute_dtype`: bf16 on CUDA with
            the default autocast, the parameter dtype elsewhere).
        """
        self._check_tokens(x_t)
        B, L = x_t.shape
        sigma = self._check_sigma(sigma, B, x_t.device)
        if attention_mask is not None:
            attention_mask = self._check_layout("attention_mask", attention_mask, x_t, allow_bool=True) != 0
        if segment_ids is not None:
            segment_ids = self._check_layout("segment_ids", segment_ids, x_t, allow_bool=False)

        x = self.vocab_embed(x_t if x_t.dtype in (torch.int32, torch.int64) else x_t.long())  # [B, L, D]
        # The conditioning stays outside autocast, as in training: σ spans 1e-4 .. 20 and its
        # features feed every block's scale and gate.
        c = F.silu(self.sigma_map(sigma))  # [B, C]
        cos, sin = self.rotary_emb(L, x.device)
        plan = self._plan_attention(B, L, x.device, attention_mask, segment_ids)

        if x.device.type == "cuda" and self.autocast_dtype is not None:
            amp = torch.autocast("cuda", dtype=self.autocast_dtype)
        else:
            amp = contextlib.nullcontext()
        with amp:
            for block in self.blocks:
                x = block(x, c, cos, sin, plan)
            z = self.output_layer(x, c, head)  # [B, L, V]
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

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """``load_state_dict`` with the checks a checkpoint needs: every key present (except the
        deterministic ``rotary_emb.inv_freq``), no unexpected key, every shape equal. Raises
        ValueError naming the offending keys. Strips a ``module.`` / ``_orig_mod.`` prefix."""
        state = _strip_wrapper_prefix(dict(state))
        expected = self.state_dict()
        missing = sorted(k for k in expected if k not in state and k != "rotary_emb.inv_freq")
        unexpected = sorted(k for k in state if k not in expected)
        mismatched = [
            f"{k} (checkpoint {list(state[k].shape)}, model {list(v.shape)})"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {_listing(mismatched)}")
        if problems:
            raise ValueError(
                "checkpoint does not fit this model ("
                + f"V={self.vocab_size}, graph={self.graph_type!r}, hidden={self.hidden_size}, "
                + f"blocks={len(self.blocks)}): "
                + "; ".join(problems)
                + ". Is config.json the config these weights were trained with?"
            )
        self.load_state_dict(state, strict=False)

    @classmethod
    def from_pretrained(
        cls,
        dir_or_hub_id: str | os.PathLike,
        map_location: str | torch.device = "cpu",
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        attn_backend: str = "auto",
        autocast_dtype: torch.dtype | None = torch.bfloat16,
    ) -> "SEDD":
        """Load a checkpoint: a local directory, or a Hub id such as ``"louaaron/sedd-small"``.

        The directory holds ``config.json`` (the whole training config) and ``model.safetensors``
        (preferred) or ``pytorch_model.bin``. Hub ids go through ``huggingface_hub.snapshot_download``
        (``revision``, ``cache_dir``, ``local_files_only`` are passed on); failing that (offline, no
        such repository) raises OSError. A checkpoint that does not fit its config raises ValueError.
        Returns the model on ``map_location`` in eval mode.
        """
        folder = _checkpoint_dir(
            os.fspath(dir_or_hub_id), revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {str(folder)!r}")
        config = json.loads(config_file.read_text())
        model = cls(config, attn_backend=attn_backend, autocast_dtype=autocast_dtype)
        model.load_checkpoint_state(_read_weights(folder))
        return model.to(map_location).eval()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` (the whole config) and ``model.safetensors`` into the directory,
        the layout :meth:`from_pretrained` and the public checkpoints use."""
        from safetensors.torch import save_file

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        # No weights are tied, so every tensor is saved as its own contiguous copy on the CPU.
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
