"""The output head fused with the next-token cross entropy of the autoregressive baseline: the loss
of ``hidden @ weightᵀ + bias`` against target ids without the [B·L, V] logits.

The design of :func:`sedd.ops.linear_score_entropy` (:mod:`sedd.ops.linear`): the rows in chunks of
at most ``chunk_bytes`` of fp32 logits; per chunk one matmul gives the logits, the loss is
``logsumexp(z) − z[target]`` and its gradient ``softmax(z) − onehot(target)``, written over the
chunk's fp32 copy of the logits, and two more matmuls fold it into ∂/∂hidden = g·W and
∂/∂W += gᵀ·h (fp32 accumulators, as is ∂/∂b += Σ g). Rows outside ``mask`` (padding) carry no
loss: they are not gathered at all (one row count read on the host), or, under
:func:`sedd.ops.sync_free`, computed with weight 0. The gradient is computed in the forward pass
when the loss is a scalar; reduction "none" recomputes the chunks in the backward.

The math: docs/math.md, "Autoregressive baseline".
"""

from __future__ import annotations

import torch

from sedd.ops.checks import REDUCTIONS, check_per_row, check_tokens, host_sync_allowed
from sedd.ops.linear import (
    DEFAULT_CHUNK_BYTES,
    RowIndex,
    _check_chunk_bytes,
    _check_head,
    _Grads,
    fused_head_backward,
    fused_head_forward,
)

# On the CPU a chunk holds the logits and their fp32 copy: a smaller bound, as the eager loss's
_CPU_CHUNK_BYTES = 32 * 2**20


# a data-dependent row count and a Python loop over chunks: dynamo runs it eagerly (a clean graph
# break) rather than tracing it
@torch.compiler.disable
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    loss_weight: torch.Tensor | float | None = None,
    reduction: str = "batchmean",
    chunk_bytes: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Cross entropy ``−log softmax(hidden @ weightᵀ + bias)[targets]`` per position, differentiable
    in ``hidden``, ``weight`` and ``bias``, without the [B·L, V] logits.

    Args:
        hidden: [B, L, D] fp32/bf16/fp16/fp64 hidden states going into the head.
        weight: [V, D] head weight, hidden's dtype and device.  bias: [V] or None.
        targets: [B, L] integer ids in [0, V).
        mask: optional [B, L] bool, True where the position is scored (False: padding, no loss
            and no gradient).
        loss_weight: optional per-sequence weight, [B] or a number (e.g. 1 / accumulation steps).
        reduction: "batchmean" (Σ / B: nats per sequence, averaged over sequences), "sum" or
            "none" ([B, L], 0 outside ``mask``).
        chunk_bytes: bound on one chunk's fp32 logits (default 256 MiB on CUDA, 32 MiB elsewhere).
        width: the number of classes V when ``weight`` [V_pad, D] and ``bias`` [V_pad] carry
            padding rows beyond it (an aligned head); those logits are never read and get no
            gradient. Default: every row is a class.

    Returns:
        float32 loss (float64 for float64 input), a scalar or [B, L].
    """
    B, L, D, V = _check_head(hidden, weight, bias, width)
    device = hidden.device
    check_tokens("targets", targets, (B, L), device, V, "the next tokens")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, L):
            raise ValueError(f"mask must be a bool tensor of shape {[B, L]}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device}, expected {device}")
    if loss_weight is not None:
        loss_weight = check_per_row("loss_weight", loss_weight, B, device, positive=False,
                                    keep_fp64=hidden.dtype == torch.float64)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_chunk_bytes(chunk_bytes)
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    rows_per_chunk = max(1, chunk_bytes // (weight.shape[0] * 4))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, mask, loss_weight, reduction, rows_per_chunk, V)


class _Rows(RowIndex):
    """The scored rows, flattened: all B·L, or the rows of ``mask`` when a host read is allowed."""

    def __init__(self, hidden, targets, mask, loss_weight, width: int):
        B, L, D = hidden.shape
        self.width = width  # the classes: the first `width` logits of the (possibly padded) head
        self.hidden = hidden.reshape(B * L, D)
        fp64 = hidden.dtype == torch.float64
        self.dtype = torch.float64 if fp64 else torch.float32
        weight = torch.ones(B * L, dtype=self.dtype, device=hidden.device)
        if loss_weight is not None:
            weight = weight * loss_weight.to(self.dtype).repeat_interleave(L)
        targets = targets.reshape(-1)
        self.index = None
        if mask is not None and host_sync_allowed(hidden.device):
            self.index = mask.reshape(-1).nonzero().squeeze(1)
            targets, weight = targets[self.index], weight[self.index]
        elif mask is not None:  # every row, the unscored ones with weight 0 (no host read)
            weight = weight * mask.reshape(-1)
        self.n = targets.numel()
        self.targets, self.weight = targets.long(), weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, loss_weight, reduction, rows_per_chunk, width):
        rows = _Rows(hidden, targets, mask, loss_weight, width)
        ctx.rows_per_chunk = rows_per_chunk

        def run(row_weight, grads):
            return _chunks(rows, weight, bias, rows_per_chunk, row_weight, grads=grads)

        return fused_head_forward(ctx, rows, hidden, weight, bias, reduction, run)

    @staticmethod
    def backward(ctx, grad_output):
        def rerun(rows, weight, bias, row_weight, grads):
            _chunks(rows, weight, bias, ctx.rows_per_chunk, row_weight, grads=grads)

        return fused_head_backward(ctx, grad_output, rerun, "linear_cross_entropy", 6)


def _chunks(rows: _Rows, weight, bias, rows_per_chunk: int, row_weight, *, grads: _Grads | None) -> torch.Tensor:
    """One pass over the rows in chunks: the weighted per-row loss [n], and with ``grads`` the
    gradients of Σ row_weight·loss accumulated into it."""
    out = torch.empty(rows.n, dtype=rows.dtype, device=rows.hidden.device)
    with torch.autocast(rows.hidden.device.type, enabled=False):
        for start in range(0, rows.n, rows_per_chunk):
            stop = min(start + rows_per_chunk, rows.n)
            h = rows.take(start, stop, rows.hidden)
            z = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())  # [c, V_pad]
            # the loss in fp32 whatever the compute dtype: a bf16 logsumexp over 50k ids is off by
            # percents. The first V columns: the aligned head's padding is never read
            zf = z[:, : rows.width].to(rows.dtype)
            target = rows.targets[start:stop, None]
            lse = torch.logsumexp(zf, dim=1)
            w = row_weight[start:stop]
            out[start:stop] = (lse - zf.gather(1, target)[:, 0]) * w
            if grads is not None:
                # softmax − onehot, scaled by the row weight, over the fp32 copy (no further temporaries)
                g = zf.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, target, torch.full_like(target, -1, dtype=g.dtype))
                g.mul_(w[:, None])
                grads.add(rows, start, stop, h, g.to(weight.dtype), weight)
            del z, zf
    return out


def reference_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused per-token loss [B, L] of [B, L, V] logits, 0 outside ``mask``: the readable
    form (``F.cross_entropy`` in fp32) the fused head is tested against."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.nn.functional.cross_entropy(logits.to(dtype).transpose(1, 2), targets.long(), reduction="none")
    return loss if mask is None else loss * mask
