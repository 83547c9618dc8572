"""The public functional API: fused SEDD operations behind one interface.

Every function here validates its arguments (raising ``TypeError``/``ValueError`` that name the
argument, before any kernel launches), then dispatches to a backend:

* ``"triton"``: the fused kernels of the ``kernels`` package, launched as ``torch.library`` custom
  ops (:mod:`sedd.ops.custom_ops`). On CPU tensors this needs Triton's interpreter
  (``TRITON_INTERPRET=1`` set before the kernels are imported); anything else is an error, never a
  silent fallback. A graph whose ``kernel`` tag is None has no kernel: "triton" is then an error.
* ``"torch"``: the eager reference of :mod:`sedd.ops.reference` (the graph's own math).
* ``"auto"`` (default): Triton for CUDA tensors of a graph with a kernel, eager otherwise.

The backend is chosen by the environment variable ``SEDD_BACKEND`` or, taking precedence, the
context manager :func:`use_backend`; :func:`last_backend` says which one ran the latest call in
this thread. Setting ``SEDD_CHECK_VALUES=0`` (or the context manager :func:`value_checks`) skips
the value checks that need a device sync (token ids in range, σ finite and positive); shape,
dtype and device checks always run.

Shapes: B batch, L length, V score width (N + 1 for the absorbing graph, N for uniform).
``log_score`` is [B, L, V] in fp32, bf16, fp16 (or fp64 on the eager backend) and is read in
fp32. Optional ``shift`` [B]: ``log_score`` is then the raw network output z and the scores are
ŝ = z + shift (the σ-dependent post-processing of the model, folded in so no extra [B, L, V]
pass runs). In every case the entry at the current token is read as ŝ[x_t] = 0.

Token ids (``x_t``, ``x0``) may be int64, int32, int16 or uint8 on both backends, provided the
dtype holds every id the op reads or writes ([0, V) for x_t, [0, N) for x0); a narrower dtype is
a ``TypeError`` up front. The steps return x_t's dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading

import torch

from sedd.ops import custom_ops as ops_triton, eager, reference
from sedd.graph import Graph, graph_for_width
from sedd.ops.checks import (  # noqa: F401 - re-exported: value_checks, sync_free, the checks
    value_checks,
    checking_values,
    _check_values,
    sync_free,
    host_sync_allowed,
    _check_log_score,
    _check_graph,
    _check_tokens,
    _check_per_row,
    _check_generator,
    _check_step_args,
    _SCORE_DTYPES,
    TOKEN_DTYPES,
)

BACKENDS = ("auto", "torch", "triton")

_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("sedd_backend", default=None)
_last = threading.local()


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------


def get_backend() -> str:
    """The requested backend: the innermost :func:`use_backend`, else ``$SEDD_BACKEND``, else ``"auto"``."""
    name = _backend_override.get() or os.environ.get("SEDD_BACKEND", "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"SEDD_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ``sedd.ops`` calls inside the block on backend ``name`` ("auto", "torch" or "triton")."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _backend_override.set(name)
    try:
        yield
    finally:
        _backend_override.reset(token)


def resolve_backend(device: torch.device | str, graph: Graph | None = None) -> str:
    """The backend ("torch" or "triton") a call on tensors of ``device`` (with ``graph``) runs on now.

    A graph whose ``kernel`` tag is None has no Triton kernel: "auto" runs its eager math, and an
    explicit "triton" is a ``RuntimeError``, as is Triton requested where it cannot run.
    """
    backend = _resolve(torch.device(device).type, graph is None or graph.kernel is not None)
    if backend == _NO_KERNEL:
        raise RuntimeError(
            f"SEDD backend 'triton' requested, but graph {graph!r} has no Triton kernel (its kernel tag is None); "
            "use the 'auto' or 'torch' backend, which run the graph's eager math"
        )
    return backend


_NO_KERNEL = "no-kernel"  # "triton" was asked for explicitly, for a graph without a kernel


def _resolve(device_type: str, has_kernel: bool) -> str:
    name = get_backend()
    if name == "auto":
        return "triton" if device_type == "cuda" and has_kernel and _triton_available() else "torch"
    if name == "triton":
        if not _triton_available():
            raise RuntimeError("SEDD backend 'triton' requested but triton is not importable")
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "SEDD backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing sedd (or use the 'torch' backend on CPU)"
            )
        if device_type not in ("cpu", "cuda"):
            raise RuntimeError(f"SEDD backend 'triton' does not support device {device_type}")
        if not has_kernel:
            return _NO_KERNEL
    return name


def last_backend() -> str | None:
    """The backend ("torch" or "triton") that ran the most recent ``sedd.ops`` call in this thread."""
    return getattr(_last, "backend", None)


def _dispatch(device: torch.device, graph: Graph) -> str:
    backend = _resolve_and_record(device.type, graph.kernel is not None)
    if backend == _NO_KERNEL:
        return resolve_backend(device, graph)  # raises, naming the graph
    return backend


# dynamo cannot trace the ContextVar / threading.local: under torch.compile the backend is resolved
# once at trace time and baked into the graph (last_backend() then reports that trace-time choice)
@torch.compiler.assume_constant_result
def _resolve_and_record(device_type: str, has_kernel: bool) -> str:
    backend = _resolve(device_type, has_kernel)
    if backend != _NO_KERNEL:
        _last.backend = backend
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Score entropy
# ---------------------------------------------------------------------------------------------

_REDUCTIONS = ("none", "sum", "batchmean")


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
    B, L, V = _check_log_score(log_score)
    g = _check_graph(graph, V)
    device = log_score.device
    fp64 = log_score.dtype == torch.float64  # the fp64 loss keeps fp64 σ, shift and weight
    sigma = _check_per_row("sigma", sigma, B, device, keep_fp64=fp64)
    _check_tokens("x_t", x_t, (B, L), device, V, "the noisy tokens")
    _check_tokens("x0", x0, (B, L), device, g.N, "clean tokens are real tokens, never MASK")
    if shift is not None:
        shift = _check_per_row("shift", shift, B, device, positive=False, keep_fp64=fp64)
    if weight is not None:
        weight = _check_per_row("weight", weight, B, device, positive=False, keep_fp64=fp64)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if inplace_backward and log_score.requires_grad and log_score.is_leaf:
        raise ValueError(
            "inplace_backward=True would overwrite log_score with its gradient, but log_score is a leaf "
            "tensor that requires grad: pass a non-leaf tensor (e.g. the model output; a view of a scratch "
            "leaf counts as one) or inplace_backward=False"
        )

    if _dispatch(device, g) == "triton":
        _check_triton_dtype(log_score)
        spec = ops_triton.ScoreEntropySpec(
            sigma, x_t.contiguous(), x0.contiguous(), shift, weight, _absorb(g), _block(block_v)
        )
        return ops_triton.score_entropy(log_score, spec, reduction, inplace_backward)

    if g.kernel is not None:  # the built-in graphs: chunked, one gradient buffer (sedd/ops/eager.py)
        return eager.score_entropy(log_score, sigma, _index(x_t), _index(x0), g, shift, weight, reduction)
    loss = reference.score_entropy(log_score, sigma, _index(x_t), _index(x0), g, shift)
    if weight is not None:
        loss = loss * weight.to(loss.dtype).unsqueeze(-1)
    if reduction == "sum":
        return loss.sum()
    if reduction == "batchmean":
        return loss.sum() / B
    return loss


def _index(x: torch.Tensor) -> torch.Tensor:
    """Token ids as the eager backend's gather/scatter/one_hot need them (int64)."""
    return x if x.dtype == torch.int64 else x.long()


def _check_triton_dtype(log_score: torch.Tensor) -> None:
    if log_score.dtype == torch.float64:
        raise TypeError("log_score must be float32, bfloat16 or float16 on the triton backend, got torch.float64")


# ---------------------------------------------------------------------------------------------
# Forward noising
# ---------------------------------------------------------------------------------------------


def sample_transition(
    x0: torch.Tensor,
    sigma: torch.Tensor,
    graph: str | Graph,
    generator: torch.Generator | None = None,
    *,
    dim: int | None = None,
) -> torch.Tensor:
    """Forward noising x_t ~ p_{t|0}(· | x0), independently per position.

    Args:
        x0: [B, L] int clean tokens in [0, N).
        sigma: [B] or [B, 1] total noise σ̄(t) > 0.
        graph: a Graph, or "absorb"/"uniform" together with ``dim`` (the score width V).
        generator: optional torch.Generator on x0's device; the same seed gives the same noise.

    Returns:
        [B, L] tokens of x0's dtype: absorbing masks each token with probability 1 − e^{−σ};
        uniform replaces it by a uniform draw over [0, N) with that probability.
    """
    if isinstance(graph, str):
        if dim is None:
            raise ValueError("graph given by name: pass dim=V (the score width) or a Graph object")
        graph = graph_for_width(graph, dim)
    elif not isinstance(graph, Graph):
        raise TypeError(f"graph must be 'absorb', 'uniform' or a Graph, got {type(graph).__name__}")
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"x0 must be a [B, L] tensor of token ids, got {getattr(x0, 'shape', type(x0))}")
    _check_tokens("x0", x0, tuple(x0.shape), x0.device, graph.N, "clean tokens are real tokens")
    sigma = _check_per_row("sigma", sigma, x0.shape[0], x0.device)
    _check_generator(generator, x0.device)
    if _dispatch(x0.device, graph) == "triton":
        return _sample_transition_triton(x0, sigma, graph, generator)
    return reference.sample_transition(x0, sigma, graph, generator)


def _absorb(graph: Graph) -> bool:
    """The kernels' graph switch, from the graph's kernel tag (dispatch has checked it is set)."""
    if graph.kernel not in ("absorb", "uniform"):
        raise ValueError(f"graph {graph!r} has kernel tag {graph.kernel!r}; the Triton kernels know 'absorb' and 'uniform'")
    return graph.kernel == "absorb"


def _philox_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """A [1] int64 Philox key drawn from ``generator`` (or the device's default generator), left
    on the device so the kernel reads it without a host sync; same generator state, same draws."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def _block(block_v: int | None) -> int:
    """A forced tile width as the ops take it (0: the launcher chooses)."""
    if block_v is None:
        return 0
    if isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 2 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be None or a power of two >= 2, got {block_v!r}")
    return block_v


def _sample_transition_triton(x0, sigma, graph, generator):
    seed = _philox_seed(x0.device, generator)
    return torch.ops.sedd.sample_transition(x0.contiguous(), sigma, seed, _absorb(graph), graph.N, 0)


# ---------------------------------------------------------------------------------------------
# Reverse steps
# ---------------------------------------------------------------------------------------------


def euler_step(
    log_score: torch.Tensor,
    x_t: torch.Tensor,
    dsigma: torch.Tensor,
    dt: float | torch.Tensor,
    graph: str | Graph,
    generator: torch.Generator | None = None,
    *,
    shift: torch.Tensor | None = None,
    block_v: int | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """One Euler (τ-leaping) reverse step; returns the next tokens [B, L] (x_t's dtype).

    Args:
        log_score: [B, L, V] log-scores at x_t (raw output when ``shift`` is given).
        x_t: [B, L] int current tokens.
        dsigma: [B] or [B, 1] noise rate σ̄'(t) > 0.
        dt: step size Δt > 0 (a number or [B]).
        graph, generator, shift: as in :func:`score_entropy` / :func:`sample_transition`.
        block_v: the Triton kernel's column tile (a power of two; None: the launcher's choice).
        top_p, top_k: nucleus / top-k truncation of where a position jumps to (see
            :data:`TRUNCATION`); None: the untruncated step.

    Candidate y ≠ x_t has weight Δt·dσ·Q(x_t, y)·e^{ŝ_y}; staying has weight 1 − Σ (never chosen
    when negative). For absorbing only MASK positions move.
    """
    B, g, shift = _check_step_args(log_score, x_t, graph, shift)
    dsigma = _check_per_row("dsigma", dsigma, B, log_score.device)
    dt = _check_per_row("dt", dt, B, log_score.device)
    return _reverse_step("euler", log_score, x_t, (dsigma, dt), g, shift, generator, block_v, top_p, top_k)


def analytic_step(
    log_score: torch.Tensor,
    x_t: torch.Tensor,
    dsigma: torch.Tensor,
    graph: str | Graph,
    generator: torch.Generator | None = None,
    *,
    shift: torch.Tensor | None = None,
    block_v: int | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """One analytic (Tweedie τ-leaping) reverse step; returns the next tokens [B, L].

    ``dsigma`` [B] or [B, 1] is the noise removed by the step, σ̄(t) − σ̄(t − Δt) > 0.
    p_y ∝ (exp(−Δσ Q) s)_y · exp(Δσ Q)(x_t, y). ``top_p``, ``top_k``: see :data:`TRUNCATION`.
    """
    B, g, shift = _check_step_args(log_score, x_t, graph, shift)
    dsigma = _check_per_row("dsigma", dsigma, B, log_score.device)
    return _reverse_step("analytic", log_score, x_t, (dsigma,), g, shift, generator, block_v, top_p, top_k)


def denoise_step(
    log_score: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    graph: str | Graph,
    generator: torch.Generator | None = None,
    *,
    shift: torch.Tensor | None = None,
    block_v: int | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """The final denoising step from total noise ``sigma`` [B] to σ = 0; never returns MASK.
    ``top_p``, ``top_k``: see :data:`TRUNCATION`.

    A position whose real tokens all have weight 0 (every real-token score −∞) gets token 0, the
    lowest id, on both backends."""
    B, g, shift = _check_step_args(log_score, x_t, graph, shift)
    sigma = _check_per_row("sigma", sigma, B, log_score.device)
    return _reverse_step("denoise", log_score, x_t, (sigma,), g, shift, generator, block_v, top_p, top_k)


_REFERENCE_STEPS = {"euler": reference.euler_step, "analytic": reference.analytic_step,
                    "denoise": reference.denoise_step}
_STEP_PROBS = {"euler": reference.euler_probs, "analytic": reference.analytic_probs,
               "denoise": reference.denoise_probs}


def _reverse_step(kind, log_score, x_t, scalars, graph, shift, generator, block_v, top_p, top_k):
    """The dispatch every reverse step shares. ``scalars``: the per-row arguments of the reference
    step (checked); the kernels and the eager path take their product (Δt·dσ for Euler)."""
    _check_generator(generator, log_score.device)
    _check_truncation(top_p, top_k)
    scalar = scalars[0] if len(scalars) == 1 else scalars[0] * scalars[1]
    truncated = top_p is not None or top_k is not None
    if _dispatch(log_score.device, graph) == "triton":
        trunc = _truncation(kind, log_score, x_t, scalars, graph, shift, generator, top_p, top_k) if truncated else None
        return _step_triton(kind, log_score, x_t, scalar, graph, shift, generator, block_v, trunc)
    if graph.kernel is not None and not truncated:
        # the built-in graphs' eager steps: log space, chunked, a two-level fp64 race (sedd/ops/eager.py)
        return eager.reverse_step(kind, log_score, _index(x_t), scalar, graph, shift, generator).to(x_t.dtype)
    step = _REFERENCE_STEPS[kind]
    return step(log_score, _index(x_t), *scalars, graph, shift, generator, top_p, top_k).to(x_t.dtype)


TRUNCATION = """Nucleus (top-p) and top-k truncation of a reverse step, as MDLM's ``p_nucleus``.

The step's categorical distribution over the next token is split into staying (keeping x_t) and
jumping to a candidate y ≠ x_t. Staying keeps its probability; the probability of jumping is
spread over the kept candidates in proportion to their step probability. ``top_k`` keeps the
candidates whose probability is at least the k-th largest; ``top_p`` (0 < p ≤ 1) then keeps,
among those, the smallest prefix in decreasing probability whose share of their total reaches p
(the token crossing it included); ties at either boundary are all kept. Both backends draw from
exactly this distribution (``sedd.ops.reference.truncate``). The Triton backend finds the kept set
with torch (one sort of the step's probabilities) and draws with the fused kernel; without
``top_p``/``top_k`` the kernel launch is the untruncated one, unchanged."""


def _check_truncation(top_p, top_k):
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")


def _truncation(kind, log_score, x_t, scalars, graph, shift, generator, top_p, top_k):
    """[B, L, 2] (ŝ threshold of the kept candidates, move flag) for the kernel."""
    x_t = _index(x_t)
    probs = _STEP_PROBS[kind](log_score, x_t, *scalars, graph, shift)
    keep = reference.truncation_keep(probs, x_t, top_p, top_k)
    # the step's candidate weights increase with ŝ, so the kept set is {y ≠ x_t : ŝ_y ≥ thr}
    thr = torch.where(keep, reference.log_scores(log_score, x_t, shift), torch.inf).amin(-1)
    stay = probs.gather(-1, x_t.unsqueeze(-1).long()).squeeze(-1)
    u = torch.rand(stay.shape, generator=generator, device=stay.device, dtype=torch.float64)
    move = (u >= stay.double()).float()
    return torch.stack([thr.float(), move], -1)


def _step_triton(kind, log_score, x_t, scalar, graph, shift, generator, block_v, truncation=None):
    _check_triton_dtype(log_score)
    seed = _philox_seed(log_score.device, generator)
    return torch.ops.sedd.reverse_step(
        kind, log_score, x_t, scalar, shift, seed, _absorb(graph), graph.N, _block(block_v), truncation
    )


# ---------------------------------------------------------------------------------------------
# The output head fused with the score entropy (its own module; re-exported here)
# ---------------------------------------------------------------------------------------------

from sedd.ops.linear import linear_score_entropy  # noqa: E402
