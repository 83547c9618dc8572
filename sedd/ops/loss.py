"""The per-token score entropy behind one interface: checks, then the fused kernel
(:mod:`sedd.ops.custom_ops`), the chunked eager path (:mod:`sedd.ops.eager`, the built-in graphs)
or the graph's own math (:mod:`sedd.ops.reference`, any other graph)."""

from __future__ import annotations

import torch

from sedd.graph import Graph
from sedd.ops import custom_ops, eager, reference
from sedd.ops.backend import dispatch
from sedd.ops.checks import check_block_v, check_graph, check_log_score, check_loss_args, check_triton_dtype


def score_entropy(
    log_score: torch.Tensor,
    sigma: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    graph: str | Graph,
    *,
    shift: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "none",
    inplace_backward: bool = False,
    block_v: int | None = None,
) -> torch.Tensor:
    """Per-token score entropy ℓ(ŝ, σ, x_t, x0), differentiable in ``log_score``.

    Args:
        log_score: [B, L, V] fp32/bf16/fp16 log-scores ŝ (or the raw output z when ``shift`` is given).
        sigma: [B] or [B, 1] total noise σ̄(t) > 0 of each sequence.
        x_t: [B, L] int, the noisy tokens the scores were computed at.
        x0: [B, L] int, the clean tokens (real tokens: < N).
        graph: "absorb", "uniform" or a :class:`sedd.graph.Graph` whose width is V.
        shift: optional [B] fp32; ŝ = log_score + shift.
        weight: optional [B] per-sequence weight (e.g. dσ = σ̄'(t)) multiplied into the loss.
        reduction: "none" -> [B, L]; "sum" -> scalar Σ over all tokens; "batchmean" -> scalar
            Σ / B (nats per sequence, the SEDD training loss).
        inplace_backward: let the Triton backend write the gradient into ``log_score``'s storage
            (saves a [B, L, V] buffer in training; ``log_score`` must not be read after this call:
            for "sum"/"batchmean" it holds the gradient as soon as the forward returns). Refused
            (``ValueError``) for a leaf that requires grad, on both backends.
            The Triton backend does not support ``create_graph=True`` (a clear ``RuntimeError``);
            the eager one does.
        block_v: the Triton kernel's column tile (a power of two; None: the launcher's choice).
            Changes no result beyond rounding; the eager backend ignores it.

    Returns:
        float32 loss ([B, L] or a scalar; float64 for float64 input on the eager backend).
    """
    B, L, V = check_log_score(log_score)
    g = check_graph(graph, V)
    device = log_score.device
    fp64 = log_score.dtype == torch.float64  # the fp64 loss keeps fp64 σ, shift and weight
    sigma, shift, weight = check_loss_args(B, L, V, g, device, sigma, x_t, x0, shift, weight, reduction, fp64)
    if inplace_backward and log_score.requires_grad and log_score.is_leaf:
        raise ValueError(
            "inplace_backward=True would overwrite log_score with its gradient, but log_score is a leaf "
            "tensor that requires grad: pass a non-leaf tensor (e.g. the model output; a view of a scratch "
            "leaf counts as one) or inplace_backward=False"
        )

    if dispatch(device, g) == "triton":
        check_triton_dtype("log_score", log_score)
        spec = custom_ops.ScoreEntropySpec(
            sigma, x_t.contiguous(), x0.contiguous(), shift, weight, custom_ops.absorbing_tag(g), check_block_v(block_v)
        )
        return custom_ops.score_entropy(log_score, spec, reduction, inplace_backward)

    if g.kernel is not None:  # the built-in graphs: chunked, one gradient buffer (sedd/ops/eager.py)
        return eager.score_entropy(log_score, sigma, x_t.long(), x0.long(), g, shift, weight, reduction)
    loss = reference.score_entropy(log_score, sigma, x_t.long(), x0.long(), g, shift)
    if weight is not None:
        loss = loss * weight.to(loss.dtype).unsqueeze(-1)
    if reduction == "sum":
        return loss.sum()
    if reduction == "batchmean":
        return loss.sum() / B
    return loss
