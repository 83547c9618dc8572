"""Attention for the DDiT blocks: the backends (SDPA, flash-attn's varlen kernel) and the plan that
lets padded batches and packed documents run on either without attending across a boundary.

Shapes: B batch, L length, H heads, d head size, T real (non-padding) tokens of the batch.

A forward builds one :class:`AttentionPlan` (:func:`plan_attention`) and every block calls
:func:`attention` with it:

- "sdpa" (``torch.nn.functional.scaled_dot_product_attention``, everywhere): a boolean mask
  [B, 1, 1, L] (padding) or [B, 1, L, L] (documents, or any mask of a causal plan), or none for
  full attention (``is_causal`` for a causal plan without padding or documents);
- "flash" (flash-attn, CUDA fp16/bf16): the real tokens gathered into one flat list with the
  document boundaries as ``cu_seqlens``, so no work is spent on padding.

A causal plan (the autoregressive baseline, :mod:`sedd.model.ar`) lets position i attend to
positions j ≤ i of its own document only: SDPA's ``is_causal`` or the mask above intersected with
the lower triangle, flash-attn's ``causal=True`` within each ``cu_seqlens`` document.

To add a backend: a branch in :func:`attention` that reads the plan, its case in
:func:`plan_attention`, and its name in :data:`ATTN_BACKENDS` / :func:`resolve_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_varlen_qkvpacked_func
except (ImportError, OSError):  # OSError: a wheel built against another CUDA or torch
    flash_attn_varlen_qkvpacked_func = None

FLASH_ATTN_AVAILABLE = flash_attn_varlen_qkvpacked_func is not None
ATTN_BACKENDS = ("auto", "sdpa", "flash")

__all__ = [
    "ATTN_BACKENDS",
    "FLASH_ATTN_AVAILABLE",
    "AttentionPlan",
    "attention",
    "check_backend",
    "document_ids",
    "plan_attention",
    "resolve_backend",
]


def check_backend(name: str) -> str:
    """``name`` if it is a backend that can be asked for here; ValueError / RuntimeError if not."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {name!r}")
    if name == "flash" and not FLASH_ATTN_AVAILABLE:
        raise RuntimeError("attn_backend='flash' needs the flash-attn package (pip install flash-attn), which is not importable here")
    return name


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """"sdpa" or "flash": what ``requested`` ("auto", "sdpa", "flash") runs as for a forward on
    ``device`` computing in ``dtype``. Raises ValueError where "flash" was asked for and cannot run."""
    device = torch.device(device)
    flash_ok = FLASH_ATTN_AVAILABLE and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if requested == "flash" and not flash_ok:
        raise ValueError(
            f"attn_backend='flash' needs CUDA tensors in fp16/bf16; this forward runs on {device} in {dtype}"
        )
    if requested == "sdpa":
        return "sdpa"
    return "flash" if flash_ok else "sdpa"


def backend_for_layout(resolved: str, requested: str, *, varlen: bool, host_sync: bool) -> str:
    """The backend a forward runs on, given the :func:`resolve_backend` answer ``resolved`` for
    the model's ``requested`` backend: flash-attn's varlen call (``varlen``: a padded or packed
    batch) reads the document lengths on the host, so where no host sync is allowed (under
    :func:`sedd.ops.sync_free`, CUDA graph capture, ``torch.compile``) "auto" takes SDPA, whose
    masks stay on the device. An explicit "flash" keeps flash, and its sync."""
    if resolved == "flash" and requested == "auto" and varlen and not host_sync:
        return "sdpa"
    return resolved


def document_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] segment ids -> [B, L] int64 ids of maximal runs of equal ids (0, 1, 2, ... per row).

    Documents are runs, so an id that comes back later in the row starts a new document: the SDPA
    mask and flash-attn's cu_seqlens (which can only describe runs) then agree.
    """
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).long()
    return F.pad(change.cumsum(dim=1), (1, 0))


@dataclass
class AttentionPlan:
    """What every block's attention needs, built once per forward.

    backend: "sdpa" or "flash".
    sdpa_mask: bool [B, 1, 1, L] or [B, 1, L, L] (True = may attend), or None for full attention.
    flash_index: int64 [T]: flat positions (into B·L) of the real tokens, or None when all are real.
    cu_seqlens: int32 [n_docs + 1]: document boundaries in the (unpadded) flat token list.
    max_seqlen: the longest document.
    causal: position i attends to j ≤ i only (on SDPA without a mask: ``is_causal``; with one,
        the mask holds it already).
    """

    backend: str
    sdpa_mask: torch.Tensor | None = None
    flash_index: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    causal: bool = False


def plan_attention(
    backend: str,
    B: int,
    L: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    *,
    causal: bool = False,
) -> AttentionPlan:
    """The plan for a [B, L] batch on ``backend`` ("sdpa" or "flash", see :func:`resolve_backend`).

    Arguments:
        attention_mask: [B, L] bool, True for real tokens, or None (all real).
        segment_ids: [B, L] integer document ids (documents are maximal runs), or None (one per row).
        causal: position i attends to positions j ≤ i only (within its document).
    """
    docs = document_ids(segment_ids) if segment_ids is not None else None
    if backend == "sdpa":
        allowed = None
        if docs is not None:
            allowed = docs[:, :, None] == docs[:, None, :]  # [B, L, L]
        if attention_mask is not None:
            # A row of pure padding would leave its queries nothing to attend to (NaN); let it
            # see itself, its output is unspecified anyway.
            keys = (attention_mask | ~attention_mask.any(dim=1, keepdim=True))[:, None, :]  # [B, 1, L]
            allowed = keys if allowed is None else allowed & keys
        if causal and allowed is not None:
            allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=device).tril()
        if allowed is not None and (docs is not None or causal) and attention_mask is not None:
            # Same for a padding query whose document (or, causal, whose past) holds no real
            # token. NaN rows must not exist at all: 0 · NaN in the next layer's P·V would reach
            # the real tokens.
            allowed = allowed | torch.eye(L, dtype=torch.bool, device=device)
        return AttentionPlan("sdpa", sdpa_mask=None if allowed is None else allowed[:, None], causal=causal)

    if attention_mask is None and docs is None:
        cu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=device)
        return AttentionPlan("flash", cu_seqlens=cu, max_seqlen=L, causal=causal)
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
    return AttentionPlan("flash", flash_index=index, cu_seqlens=bounds.to(torch.int32), max_seqlen=max_seqlen,
                         causal=causal)


def attention(qkv: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Attention as the plan says (non-causal for SEDD, causal for the autoregressive baseline),
    softmax scale 1/√d, no dropout.

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
            flat.contiguous(), plan.cu_seqlens, plan.max_seqlen, 0.0, softmax_scale=d**-0.5, causal=plan.causal
        )
        if plan.flash_index is not None:
            out = out.new_zeros(B * L, H, d).index_copy_(0, plan.flash_index, out)
        return out.view(B, L, H, d)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # [B, H, L, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.sdpa_mask, dropout_p=0.0, scale=d**-0.5,
                                         is_causal=plan.causal and plan.sdpa_mask is None)
    return out.transpose(1, 2)
