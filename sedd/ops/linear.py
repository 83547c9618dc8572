"""The output head fused with the score entropy: the loss of ``hidden @ weightᵀ + bias`` without
the [B·L, V] logits.

Why. At SEDD-small's per-GPU batch (64 × 1024 tokens, V = 50258) the head's output takes 6.6 GB
in bf16 and its gradient another 6.6 GB; on the absorbing graph every row whose token is not MASK
has zero loss and zero gradient, about half of them. Here the rows are processed in chunks of at
most ``chunk_bytes`` of logits (Liger-style): per chunk one matmul gives the logits, the fused
score-entropy pass of :func:`sedd.ops.score_entropy` turns them into their gradient (in place on
the Triton backend), and two more matmuls fold that gradient into ∂/∂hidden = g·W and
∂/∂W += gᵀ·h (fp32 accumulators, as is ∂/∂b += Σ g). So the largest transient is one chunk, and on
the absorbing graph only the MASK rows are gathered and multiplied; the others get exactly zero.

The gradient is computed in the forward pass (the loss is a scalar, so the incoming gradient only
scales it); reduction "none" keeps the per-token loss only and recomputes the chunks in the
backward with the per-token incoming gradient folded into the per-row weight.

The torch backend runs the same chunked algorithm with the eager per-chunk loss and its autograd
gradient, so CPU users get the memory and compute savings too.

The math: docs/math.md, "Training loss".
"""

from __future__ import annotations

import torch

from sedd.graph import Graph
from sedd.ops.backend import resolve_backend
from sedd.ops.checks import check_graph, check_loss_args, host_sync_allowed, value_checks
from sedd.ops.loss import score_entropy

DEFAULT_CHUNK_BYTES = 256 * 2**20
# The eager per-chunk loss holds several fp32 temporaries the size of the chunk (ŝ, e^ŝ, the
# gradient and autograd's buffers): its default chunk is this many times smaller.
_EAGER_CHUNK_DIVISOR = 8

_HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# a data-dependent row count and a Python loop over chunks: dynamo runs it eagerly (a clean graph
# break) rather than tracing it
@torch.compiler.disable
def linear_score_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sigma: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    graph: str | Graph,
    *,
    shift: torch.Tensor | None = None,
    loss_weight: torch.Tensor | None = None,
    reduction: str = "batchmean",
    chunk_bytes: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Score entropy of the head's output, ``score_entropy(hidden @ weightᵀ + bias, …)``,
    differentiable in ``hidden``, ``weight`` and ``bias``, without the [B·L, V] logits.

    Args:
        hidden: [B, L, D] fp32/bf16/fp16 (fp64 on the torch backend) hidden states going into the head.
        weight: [V, D] head weight, hidden's dtype and device.
        bias: [V] head bias (hidden's dtype and device), or None.
        sigma: [B] or [B, 1] total noise σ̄(t) > 0 of each sequence.
        x_t: [B, L] int noisy tokens;  x0: [B, L] int clean tokens (< N).
        graph: "absorb", "uniform" or a :class:`sedd.graph.Graph` of width V.
        shift: optional [B]; the scores are ŝ = logits + shift (the model's σ shift).
        loss_weight: optional [B] per-sequence weight (dσ) multiplied into the loss.
        reduction: "batchmean" (Σ / B, the training loss), "sum" or "none" ([B, L]).
        chunk_bytes: bound on one chunk's logits in bytes; default 256 MiB on the Triton backend
            and 32 MiB on the torch backend (whose eager loss holds several fp32 copies of it).
        width: the score width V when ``weight`` [V_pad, D] (and ``bias`` [V_pad]) carry padding
            rows beyond it (an aligned head, :class:`sedd.model.layers.DDiTFinalLayer`): each
            chunk's logits are [c, V_pad] rows of which the first V are scores; the padding is
            never read as a score and gets a zero gradient. Default: every row is a score.

    Returns:
        float32 loss, a scalar or [B, L] (float64 for float64 input on the torch backend).
    """
    B, L, D, V = _check_head(hidden, weight, bias, width)
    g = check_graph(graph, V, source="weight")
    device = hidden.device
    fp64 = hidden.dtype == torch.float64  # the fp64 loss keeps fp64 σ, shift and weight
    sigma, shift, loss_weight = check_loss_args(B, L, V, g, device, sigma, x_t, x0, shift, loss_weight, reduction,
                                                fp64, weight_name="loss_weight")
    _check_chunk_bytes(chunk_bytes)
    backend = resolve_backend(device, g)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden must be float32, bfloat16 or float16 on the triton backend, got torch.float64")
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES // (1 if backend == "triton" else _EAGER_CHUNK_DIVISOR)
    rows_per_chunk = max(1, chunk_bytes // (weight.shape[0] * hidden.element_size()))
    return _LinearScoreEntropy.apply(
        hidden, weight, bias, sigma, x_t, x0, g, shift, loss_weight, reduction, rows_per_chunk
    )


def _check_head(hidden, weight, bias, width: int | None = None) -> tuple[int, int, int, int]:
    """(B, L, D, V) of a fused head's arguments, V the score width (``width``, or weight's rows)."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in _HIDDEN_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, L, D], got {list(hidden.shape)}")
    B, L, D = hidden.shape
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must have shape [V, D] with D = {D} (hidden's last dim), got {list(weight.shape)}")
    V = weight.shape[0]
    if V < 2:
        raise ValueError(f"weight must have V >= 2 rows (scores per token), got V = {V}")
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int) or not 2 <= width <= V:
            raise ValueError(f"width must be an int in [2, {V}] (weight's rows, padding included), got {width!r}")
        V = width
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, but hidden has {hidden.dtype}: cast them alike")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, but hidden is on {hidden.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V] with V = {weight.shape[0]} (weight's rows), got {list(bias.shape)}")
    return B, L, D, V


def _check_chunk_bytes(chunk_bytes) -> None:
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1):
        raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")


# The autograd of a head fused with a per-row loss (this file's and sedd/ops/cross_entropy.py's):
# ``run(row_weight, grads)`` is one chunked pass giving the per-row loss times ``row_weight`` [n]
# and, with ``grads``, accumulating the gradient of their sum.


def fused_head_forward(ctx, rows, hidden, weight, bias, reduction: str, run) -> torch.Tensor:
    """The loss of a fused head; for a scalar loss with a gradient to compute, that gradient is
    computed here, in the same pass, and kept on ``ctx`` for :func:`fused_head_backward`."""
    B, L = hidden.shape[:2]
    need = ctx.needs_input_grad[:3]
    ctx.reduction = reduction
    if reduction == "none" or not any(need):
        per_row = run(rows.weight, None)
        if reduction == "none":  # the backward recomputes the chunks with the per-token gradient
            ctx.save_for_backward(hidden, weight, bias)
            ctx.rows = rows
            return rows.scatter(per_row, B, L)
        total = per_row.sum()
        return total / B if reduction == "batchmean" else total
    # 1/B rides in the per-row weight: the gradient needs no extra pass
    row_weight = rows.weight / B if reduction == "batchmean" else rows.weight
    ctx.grads = _Grads(hidden, weight, bias, *need)
    return run(row_weight, ctx.grads).sum()


def fused_head_backward(ctx, grad_output, rerun, op: str, n_other: int) -> tuple:
    """The gradients of :func:`fused_head_forward`'s inputs hidden, weight and bias (None for the
    ``n_other`` others); ``rerun(rows, weight, bias, row_weight, grads)`` is the chunked pass."""
    nones = (None,) * n_other
    if ctx.reduction == "none":
        hidden, weight, bias = ctx.saved_tensors
        rows = ctx.rows
        grads = _Grads(hidden, weight, bias, *ctx.needs_input_grad[:3])
        row_weight = rows.weight * rows.gather_token(grad_output.to(rows.weight.dtype))
        rerun(rows, weight, bias, row_weight, grads)
        del ctx.rows
        return (*grads.result(None), *nones)
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(f"sedd.ops.{op}: the gradient was computed in the forward pass and its backward can "
                           "run only once")
    ctx.grads = None
    return (*grads.result(grad_output), *nones)


class _LinearScoreEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, sigma, x_t, x0, graph, shift, loss_weight, reduction, rows_per_chunk):
        rows = _Rows(hidden, sigma, x_t, x0, graph, shift, loss_weight)
        ctx.graph, ctx.rows_per_chunk = graph, rows_per_chunk

        def run(row_weight, grads):
            return _chunks(rows, weight, bias, graph, rows_per_chunk, row_weight, grads=grads)[0]

        return fused_head_forward(ctx, rows, hidden, weight, bias, reduction, run)

    @staticmethod
    def backward(ctx, grad_output):
        def rerun(rows, weight, bias, row_weight, grads):
            _chunks(rows, weight, bias, ctx.graph, ctx.rows_per_chunk, row_weight, grads=grads)

        return fused_head_backward(ctx, grad_output, rerun, "linear_score_entropy", 8)


class RowIndex:
    """Rows of a flattened [B·L] batch that a fused head computes: all of them in order
    (``index`` None), or those at ``index``."""

    index: torch.Tensor | None

    def take(self, start: int, stop: int, what: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return what[start:stop]
        return what[self.index[start:stop]]

    def scatter(self, values: torch.Tensor, B: int, L: int) -> torch.Tensor:
        if self.index is None:
            return values.reshape(B, L)
        out = values.new_zeros(B * L)
        return out.index_copy_(0, self.index, values).reshape(B, L)

    def gather_token(self, per_token: torch.Tensor) -> torch.Tensor:
        flat = per_token.reshape(-1)
        return flat if self.index is None else flat[self.index]


class _Rows(RowIndex):
    """The rows that carry loss, flattened: all B·L for uniform, the MASK rows for absorbing."""

    def __init__(self, hidden, sigma, x_t, x0, graph, shift, loss_weight):
        B, L, D = hidden.shape
        self.hidden = hidden.reshape(B * L, D)
        xt, x0 = x_t.reshape(-1), x0.reshape(-1)
        # rows that are not MASK carry no loss and get a zero gradient from the loss itself, so
        # skipping them is only a saving; reading their count is a host sync
        if graph.absorbing and host_sync_allowed(hidden.device):
            self.index = (xt == graph.mask_id).nonzero().squeeze(1)
            self.n = self.index.numel()
            batch = torch.div(self.index, L, rounding_mode="floor")
            xt, x0 = xt[self.index], x0[self.index]
        else:
            self.index = None
            self.n = B * L
            batch = torch.arange(B, device=hidden.device).repeat_interleave(L)
        self.batch = batch
        self.x_t, self.x0 = xt, x0
        self.sigma = sigma[batch]
        self.shift = shift[batch] if shift is not None else None
        self.weight = loss_weight[batch] if loss_weight is not None else torch.ones_like(self.sigma)


class _Grads:
    """Gradient accumulators: ∂/∂hidden rows in hidden's dtype, ∂/∂W and ∂/∂b in fp32 (fp64 for
    fp64 weights, whose gradient fp32 sums would round)."""

    def __init__(self, hidden, weight, bias, need_h, need_w, need_b):
        self.shape = hidden.shape
        n, D = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.hidden = hidden.new_zeros(n, D) if need_h else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        self.bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b and bias is not None else None
        self.dtype = weight.dtype

    def add(self, rows: _Rows, start: int, stop: int, h: torch.Tensor, g: torch.Tensor, weight: torch.Tensor):
        """Fold the chunk's logit gradient ``g`` [c, V] into the accumulators; ``weight`` may hold
        padding rows beyond V (an aligned head), which get no gradient."""
        V = g.shape[1]
        weight = weight[:V]
        if self.hidden is not None:
            if rows.index is None:
                torch.mm(g, weight, out=self.hidden[start:stop])
            else:
                self.hidden.index_copy_(0, rows.index[start:stop], g @ weight)
        if self.weight is not None:
            acc = self.weight[:V]
            if g.dtype == acc.dtype:
                acc.addmm_(g.t(), h)
            else:  # the product in the compute dtype, accumulated over the chunks in fp32
                acc.add_(g.t() @ h)
        if self.bias is not None:
            self.bias[:V] += g.sum(0, dtype=self.bias.dtype)

    def result(self, grad_output):
        out = []
        for t, like in ((self.hidden, None), (self.weight, self.dtype), (self.bias, self.dtype)):
            if t is None:
                out.append(None)
                continue
            if grad_output is not None:
                t = t * grad_output.to(t.dtype)
            out.append(t.reshape(self.shape) if like is None else t.to(like))
        return out


def _chunks(rows: _Rows, weight, bias, graph, rows_per_chunk: int, row_weight, *, grads: _Grads | None):
    """One pass over the rows in chunks: the per-row weighted loss [n] fp32, and with ``grads``
    the gradients (of Σ row_weight·ℓ) accumulated into it."""
    losses, V = [], graph.dim
    # the arguments were checked once on the whole batch; each chunk needs no device sync
    with value_checks(False), torch.autocast(rows.hidden.device.type, enabled=False):
        for start in range(0, rows.n, rows_per_chunk):
            stop = min(start + rows_per_chunk, rows.n)
            c = stop - start
            h = rows.take(start, stop, rows.hidden)
            z = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())  # [c, V_pad]
            args = (
                rows.sigma[start:stop], rows.x_t[start:stop, None], rows.x0[start:stop, None], graph,
            )
            kwargs = dict(
                shift=None if rows.shift is None else rows.shift[start:stop], weight=row_weight[start:stop]
            )
            if grads is None:
                with torch.no_grad():
                    losses.append(score_entropy(z[:, None, :V], *args, **kwargs).reshape(c))
                continue
            with torch.enable_grad():
                # the scores are the first V columns (the rest is the aligned head's padding)
                leaf = z.detach()[:, :V].requires_grad_()
                # on the Triton backend the fused pass writes the gradient over the chunk's logits
                # (through a view: ops refuses inplace_backward on a leaf that requires grad), so
                # the gradient autograd hands back is z's own storage: no new buffer
                loss = score_entropy(leaf[:, None], *args, **kwargs, reduction="sum", inplace_backward=True)
                (g,) = torch.autograd.grad(loss, leaf)  # [c, V]
            losses.append(loss.detach().reshape(1))
            grads.add(rows, start, stop, h, g, weight)
            del z, g, leaf
    if not losses:
        return torch.zeros(0, dtype=torch.float64 if rows.hidden.dtype == torch.float64 else torch.float32,
                           device=rows.hidden.device), grads
    return torch.cat(losses), grads
