"""The Triton backend of :mod:`sedd.ops`: every kernel launch as a ``torch.library`` custom op.

The kernels (``sedd/kernels/score_entropy.py``, ``sedd/kernels/transitions.py``, ``sedd/kernels/sampling.py``) are
imported lazily inside the op bodies, so importing ``sedd`` never needs Triton. Each launch is a
``torch.library.custom_op`` with its fake (meta) implementation right under it, so ``torch.compile``
traces the training loss and a sampler step as opaque nodes without graph breaks; autograd is an
``autograd.Function`` over the score-entropy ops. :mod:`sedd.ops` validates every argument first.

Score entropy, with g = weight · (1/B for "batchmean") the per-row gradient scale:
  * no gradient needed: ``sedd::score_entropy_fwd`` (one read of the row, loss only);
  * "sum"/"batchmean" with a gradient: ``sedd::score_entropy_fwd_grad`` computes the loss and
    writes ∂loss/∂log_score in the same single pass (into a new buffer, or, with
    ``inplace_backward``, ``sedd::score_entropy_fwd_grad_`` into log_score's own storage);
    backward only multiplies by the incoming scalar (skipped when it is 1, the usual case);
  * "none" with a gradient: the forward computes the loss only and the backward
    (``sedd::score_entropy_bwd`` / ``sedd::score_entropy_bwd_`` in place) makes one pass reading
    log_score and writing the gradient scaled by the per-token incoming gradient.
With ``inplace_backward=True`` log_score's storage holds the gradient after the forward
("sum"/"batchmean") or after the backward ("none"): the caller must not read log_score
afterwards. The fused reductions' backward may run once (retain_graph then a second backward
raises). Rows may have any batch and position strides (a view of padded rows is read in place, and
its gradient buffer is padded alike); a log_score whose columns are not contiguous is copied first
(the storage reuse then is the copy's).
Gradients w.r.t. sigma, shift and weight are not computed (None): they depend on σ, not on
trained parameters.

The arguments fixed for one loss call (σ, the tokens, shift, weight, the graph's kernel tag, the
tile width) travel as one :class:`ScoreEntropySpec` from :func:`score_entropy` to the launcher;
only the op boundary spells them out, because a custom op's schema needs each one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sedd.graph import Graph
from sedd.ops.backend import current_launch_options


@dataclass(frozen=True)
class ScoreEntropySpec:
    """What every score-entropy launch of one loss call shares, besides the scores themselves."""

    sigma: torch.Tensor  # [B] fp32, σ̄(t) > 0
    x_t: torch.Tensor  # [B, L] int, contiguous
    x0: torch.Tensor  # [B, L] int, contiguous
    shift: torch.Tensor | None  # [B] fp32: ŝ = log_score + shift
    weight: torch.Tensor | None  # [B] fp32 per-sequence loss weight
    absorbing: bool  # the graph's kernel tag is "absorb" (else "uniform")
    block_v: int = 0  # the column tile of the kernel; 0 lets the launcher choose

    def tensors(self) -> tuple:
        return (self.sigma, self.x_t, self.x0, self.shift, self.weight)

    def flat(self) -> tuple:
        """The fields in order, as the ops (and ``ScoreEntropySpec(*flat)``) take them."""
        return (*self.tensors(), self.absorbing, self.block_v)

    def launch(self, log_score: torch.Tensor, options: dict | None = None, **outputs) -> torch.Tensor:
        """Run the kernel on ``log_score`` [B, L, V]; ``outputs`` say what it writes (see the launcher);
        ``options``: launch choices (default: the current :func:`sedd.ops.launch_options`)."""
        from sedd.kernels.score_entropy import score_entropy as launch

        options = current_launch_options() if options is None else dict(options)
        block_v = self.block_v or options.pop("block_v", None)  # a call's own tile wins
        options.pop("block_v", None)
        return launch(
            log_score, self.sigma, self.x_t, self.x0, absorbing=self.absorbing, shift=self.shift,
            weight=self.weight, block_v=block_v, **options, **outputs,
        )


def _loss_like(log_score: torch.Tensor) -> torch.Tensor:
    return log_score.new_empty(log_score.shape[:2], dtype=torch.float32)


def _like_rows(log_score: torch.Tensor) -> torch.Tensor:
    """A gradient buffer laid out as ``log_score``: for a view of padded rows (the model's padded
    head, row stride > V) a padded buffer, so the kernel's 16-byte windows fit its rows too."""
    B, L, V = log_score.shape
    st = log_score.stride()
    if st[2] != 1 or st[1] < V or st[0] < L * st[1]:  # overlapping or permuted: a contiguous buffer
        return torch.empty_like(log_score, memory_format=torch.contiguous_format)
    return torch.empty_strided(log_score.shape, st, dtype=log_score.dtype, device=log_score.device)


# The arguments of one score-entropy call after the scores (ScoreEntropySpec.flat()), as a schema.
_SPEC = "Tensor sigma, Tensor x_t, Tensor x0, Tensor? shift, Tensor? weight, bool absorbing, int block_v"


def _op(name: str, schema: str, fake):
    """Register the decorated function as the custom op ``sedd::name`` with ``schema`` (the
    arguments it writes marked ``Tensor(a!)``) and ``fake``, its shape-only (meta) implementation."""
    mutates = tuple(re.findall(r"Tensor\(\w!\) (\w+)", schema))

    def register(fn):
        op = torch.library.custom_op(f"sedd::{name}", fn, mutates_args=mutates, schema=schema)
        op.register_fake(fake)
        return op

    return register


@_op("score_entropy_fwd", f"(Tensor log_score, {_SPEC}) -> Tensor", fake=lambda log_score, *_: _loss_like(log_score))
def _se_fwd(log_score, *spec):
    """Weighted per-token loss [B, L] fp32, no gradient."""
    return ScoreEntropySpec(*spec).launch(log_score)


@_op("score_entropy_fwd_grad", f"(Tensor log_score, {_SPEC}, float grad_scale) -> (Tensor, Tensor)",
     fake=lambda log_score, *_: (_loss_like(log_score), _like_rows(log_score)))
def _se_fwd_grad(log_score, *spec_and_scale):
    """(loss [B, L] fp32, grad_scale · ∂Σloss/∂log_score [B, L, V] in log_score's dtype), one pass."""
    *spec, grad_scale = spec_and_scale
    grad = _like_rows(log_score)
    return ScoreEntropySpec(*spec).launch(log_score, grad=grad, grad_scale=grad_scale), grad


@_op("score_entropy_fwd_grad_", f"(Tensor(a!) log_score, {_SPEC}, float grad_scale) -> Tensor",
     fake=lambda log_score, *_: _loss_like(log_score))
def _se_fwd_grad_inplace(log_score, *spec_and_scale):
    """As ``score_entropy_fwd_grad`` with the gradient written over log_score; returns the loss."""
    *spec, grad_scale = spec_and_scale
    return ScoreEntropySpec(*spec).launch(log_score, grad=log_score, grad_scale=grad_scale)


@_op("score_entropy_bwd", f"(Tensor grad_loss, Tensor log_score, {_SPEC}) -> Tensor",
     fake=lambda grad_loss, log_score, *_: _like_rows(log_score))
def _se_bwd(grad_loss, log_score, *spec):
    """∂/∂log_score of Σ grad_loss·loss for a per-token grad_loss [B, L]; a new [B, L, V] buffer."""
    grad = _like_rows(log_score)
    ScoreEntropySpec(*spec).launch(log_score, grad=grad, grad_output=grad_loss.float().contiguous(), compute_loss=False)
    return grad


@_op("score_entropy_bwd_", f"(Tensor grad_loss, Tensor(a!) log_score, {_SPEC}) -> ()", fake=lambda *_: None)
def _se_bwd_inplace(grad_loss, log_score, *spec):
    """As ``score_entropy_bwd`` with the gradient written over log_score."""
    spec = ScoreEntropySpec(*spec)
    spec.launch(log_score, grad=log_score, grad_output=grad_loss.float().contiguous(), compute_loss=False)


@_op("scale_grad_", "(Tensor(a!) grad, Tensor grad_output) -> ()", fake=lambda *_: None)
def _scale_grad(grad, grad_output):
    """grad *= grad_output (a scalar), skipped on the device when it is exactly 1 (the usual
    ``loss.backward()``): no host sync, so a backward never waits on the GPU."""
    from sedd.kernels.scale import scale_unless_one_

    scale_unless_one_(grad, grad_output.detach().float())


class _ScoreEntropy(torch.autograd.Function):
    """Autograd over the score-entropy ops; only ``log_score`` receives a gradient."""

    @staticmethod
    def forward(ctx, log_score, reduction: str, inplace: bool, *fixed):
        # the spec arrives flat: autograd (and dynamo's tracing of it) sees each tensor argument
        spec = ScoreEntropySpec(*fixed)
        B = log_score.shape[0]
        ctx.reduction, ctx.inplace = reduction, inplace
        ctx.backward_ran = False
        if reduction == "none":
            loss = _fwd(log_score, spec)
            ctx.save_for_backward(log_score, *spec.tensors())
            ctx.absorbing, ctx.block_v = spec.absorbing, spec.block_v
            return loss
        scale = 1.0 / B if reduction == "batchmean" else 1.0
        fwd_grad = torch.ops.sedd.score_entropy_fwd_grad_ if inplace else torch.ops.sedd.score_entropy_fwd_grad
        out = fwd_grad(log_score, *spec.flat(), scale)
        loss, grad = (out, log_score) if inplace else out
        ctx.save_for_backward(grad)
        return loss.sum() / B if reduction == "batchmean" else loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.backward_ran and ctx.reduction != "none":
            raise RuntimeError(
                "sedd.ops.score_entropy (triton, reduction 'sum'/'batchmean'): the gradient was computed in "
                "the forward pass and its backward can run only once"
            )
        if torch.is_grad_enabled():
            # the gradient is made by a kernel with no derivative of its own: a graph through it
            # would silently be missing, so a gradient penalty would drop out
            raise RuntimeError(
                "sedd.ops.score_entropy (triton backend) does not support create_graph=True (double "
                "backward); use the eager backend (sedd.ops.use_backend('torch')) for higher-order gradients"
            )
        ctx.backward_ran = True
        nones = (None,) * 9  # reduction, inplace and the seven fields of the spec
        if ctx.reduction != "none":
            (grad,) = ctx.saved_tensors
            torch.ops.sedd.scale_grad_(grad, grad_output)
            return (grad, *nones)
        log_score, *tensors = ctx.saved_tensors
        fixed = ScoreEntropySpec(*tensors, ctx.absorbing, ctx.block_v).flat()
        if ctx.inplace:
            torch.ops.sedd.score_entropy_bwd_(grad_output, log_score, *fixed)
            return (log_score, *nones)
        return (torch.ops.sedd.score_entropy_bwd(grad_output, log_score, *fixed), *nones)


def _fwd(log_score: torch.Tensor, spec: ScoreEntropySpec) -> torch.Tensor:
    return torch.ops.sedd.score_entropy_fwd(log_score, *spec.flat())


def score_entropy(log_score: torch.Tensor, spec: ScoreEntropySpec, reduction: str, inplace_backward: bool):
    """Validated arguments -> the loss ([B, L] fp32, or a scalar for "sum"/"batchmean"). Rows may be
    a view of padded rows (row stride > V): the kernel reads them in place, no copy."""
    if log_score.stride(2) != 1:
        log_score = log_score.contiguous()
    if log_score.requires_grad and torch.is_grad_enabled():
        return _ScoreEntropy.apply(log_score, reduction, bool(inplace_backward), *spec.flat())
    loss = _fwd(log_score, spec)
    if reduction == "sum":
        return loss.sum()
    if reduction == "batchmean":
        return loss.sum() / log_score.shape[0]
    return loss


# ---------------------------------------------------------------------------------------------
# Forward noising and the reverse steps: no gradient, one launch each
# ---------------------------------------------------------------------------------------------


@_op("sample_transition", "(Tensor x0, Tensor sigma, Tensor seed, bool absorbing, int N, int block) -> Tensor",
     fake=lambda x0, *_: torch.empty_like(x0))
def _sample_transition(x0, sigma, seed, absorbing, N, block):
    """x_t [B, L] (x0's dtype) ~ p_{t|0}(· | x0); Philox keyed by ``seed`` [1] int64 and the element index."""
    from sedd.kernels.transitions import sample_transition as launch

    return launch(x0, sigma, seed, absorbing=absorbing, N=N, block=block or None)


@_op("reverse_step", "(str kind, Tensor log_score, Tensor x_t, Tensor scalar, Tensor? shift, Tensor seed, "
     "bool absorbing, int N, int block_v, Tensor? truncation=None) -> Tensor", fake=lambda kind, log_score, x_t, *_: torch.empty_like(x_t))
def _reverse_step(kind, log_score, x_t, scalar, shift, seed, absorbing, N, block_v, truncation=None):
    """The next tokens [B, L] (x_t's dtype) of one reverse step ``kind`` ("euler": scalar = dσ·Δt,
    "analytic": Δσ, "denoise": σ; [B] fp32), drawn in-kernel with Philox keyed by ``seed`` [1]."""
    from sedd.kernels.sampling import reverse_step as launch

    options = current_launch_options()
    block_v = block_v or options.pop("block_v", None)  # a call's own tile wins
    options.pop("block_v", None)
    return launch(kind, log_score, x_t, scalar, absorbing, N, shift=shift, seed=seed, block_v=block_v,
                  truncation=truncation, **options)


@_op("denoise_stats", "(Tensor log_score, Tensor x_t, Tensor sigma, Tensor? shift, Tensor seed, int N, int block_v, "
     "Tensor? truncation=None) -> (Tensor, Tensor)",
     fake=lambda log_score, x_t, *_: (torch.empty_like(x_t), x_t.new_empty((*x_t.shape, 2), dtype=torch.float32)))
def _denoise_stats(log_score, x_t, sigma, shift, seed, N, block_v, truncation=None):
    """The absorbing denoise step's tokens [B, L] (x_t's dtype) and, from the same pass, [B, L, 2]
    fp32: each position's max_y p_y and entropy (nats) of the categorical it draws from."""
    from sedd.kernels.sampling import reverse_step as launch

    options = current_launch_options()
    block_v = block_v or options.pop("block_v", None)  # a call's own tile wins
    options.pop("block_v", None)
    stats = x_t.new_empty((*x_t.shape, 2), dtype=torch.float32)
    tokens = launch("denoise", log_score, x_t, sigma, True, N, shift=shift, seed=seed, block_v=block_v,
                    truncation=truncation, stats=stats, **options)
    return tokens, stats


def absorbing_tag(graph: Graph) -> bool:
    """The kernels' graph switch, from the graph's kernel tag (dispatch has checked it is set)."""
    if graph.kernel not in ("absorb", "uniform"):
        raise ValueError(f"graph {graph!r} has kernel tag {graph.kernel!r}; the Triton kernels know 'absorb' and 'uniform'")
    return graph.kernel == "absorb"


def philox_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """A [1] int64 Philox key drawn from ``generator`` (or the device's default generator), left
    on the device so the kernel reads it without a host sync; same generator state, same draws."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def sample_transition(x0: torch.Tensor, sigma: torch.Tensor, graph: Graph, generator) -> torch.Tensor:
    """Validated arguments -> x_t [B, L] from the noising kernel."""
    seed = philox_seed(x0.device, generator)
    return torch.ops.sedd.sample_transition(x0.contiguous(), sigma, seed, absorbing_tag(graph), graph.N, 0)


def reverse_step(kind: str, log_score, x_t, scalar, graph: Graph, shift, generator, block_v: int, truncation=None):
    """Validated arguments -> the next tokens [B, L] from the reverse-step kernel."""
    seed = philox_seed(log_score.device, generator)
    return torch.ops.sedd.reverse_step(
        kind, log_score, x_t, scalar, shift, seed, absorbing_tag(graph), graph.N, block_v, truncation
    )


def denoise_stats(log_score, x_t, sigma, graph: Graph, shift, generator, block_v: int, truncation=None):
    """Validated arguments (absorbing graph) -> (tokens [B, L], stats [B, L, 2]) from the reverse-step
    kernel with its statistics; the tokens are those :func:`reverse_step` draws for "denoise"."""
    seed = philox_seed(log_score.device, generator)
    return torch.ops.sedd.denoise_stats(log_score, x_t, sigma, shift, seed, graph.N, block_v, truncation)


# ---------------------------------------------------------------------------------------------
# One call's host work done once, its kernel launched alone (sedd.ops.kernel_launch)
# ---------------------------------------------------------------------------------------------


def score_entropy_launch(log_score, spec: ScoreEntropySpec, grad: bool, grad_scale: float):
    """A function launching the score-entropy kernel alone on validated arguments: the loss, and with
    ``grad`` the gradient into one buffer allocated here (the launch options read now)."""
    if log_score.stride(2) != 1:
        log_score = log_score.contiguous()
    out = _like_rows(log_score) if grad else None
    options = current_launch_options()
    if grad:
        return lambda: spec.launch(log_score, options, grad=out, grad_scale=grad_scale)
    return lambda: spec.launch(log_score, options)


def reverse_step_launch(kind: str, log_score, x_t, scalar, graph: Graph, shift, generator, block_v: int):
    """A function launching the reverse-step kernel alone on validated arguments (one Philox seed
    drawn here: every launch draws the same tokens; the launch options read now)."""
    from sedd.kernels.sampling import reverse_step as launch

    seed = philox_seed(log_score.device, generator)
    absorbing = absorbing_tag(graph)
    options = current_launch_options()
    block_v = block_v or options.pop("block_v", None)  # a call's own tile wins
    options.pop("block_v", None)
    return lambda: launch(kind, log_score, x_t, scalar, absorbing, graph.N, shift=shift, seed=seed, block_v=block_v,
                          **options)
