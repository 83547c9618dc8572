"""The reverse steps behind one interface: checks, then the fused sampling kernel
(:mod:`sedd.ops.custom_ops`), the chunked log-space eager steps (:mod:`sedd.ops.eager`, the built-in
graphs, truncated or not) or the reference (:mod:`sedd.ops.reference`: any other graph).

Each step reads the scores at x_t and writes one token id per position; on the Triton backend no
[B, L, V] tensor is allocated besides the caller's scores. :func:`denoise_with_stats` also writes
each position's confidence and entropy, from the same pass.

The math: docs/math.md, "Reverse steps", "Truncation".
"""

from __future__ import annotations

import torch

from sedd.graph import Graph
from sedd.ops import custom_ops, eager, reference
from sedd.ops.backend import dispatch
from sedd.ops.checks import (
    check_block_v,
    check_generator,
    check_per_row,
    check_step_args,
    check_triton_dtype,
    check_truncation,
)

TRUNCATION = """Nucleus (top-p) and top-k truncation of a reverse step, as MDLM's ``p_nucleus``.

The step's categorical distribution over the next token is split into staying (keeping x_t) and
jumping to a candidate y ≠ x_t. Staying keeps its probability; the probability of jumping is
spread over the kept candidates in proportion to their step probability. ``top_k`` keeps the
candidates whose probability is at least the k-th largest; ``top_p`` (0 < p ≤ 1) then keeps,
among those, the smallest prefix in decreasing probability whose share of their total reaches p
(the token crossing it included); ties at either boundary are all kept. Both backends draw from
exactly this distribution (``sedd.ops.reference.truncate``). ``top_p`` = 1 keeps every candidate:
the untruncated step. The kept set is a threshold on the scores, found in log space (the weights
relative to each row's maximum, the top-p running sum in fp64), so scores beyond fp32's exp range
truncate correctly, and without sorting the rows (``sedd.ops.truncation``: a bucket histogram of the
weights, then a sort of the one bucket holding the crossing); rows go in chunks, so a truncated
step's temporaries stay bounded. The Triton backend finds the threshold and the stay-or-move
decision with torch (``sedd.ops.eager.truncation``) and draws with the fused kernel; without
``top_p``/``top_k`` the kernel launch is the untruncated one, unchanged."""


def euler_step(log_score: torch.Tensor, x_t: torch.Tensor, dsigma: torch.Tensor, dt: float | torch.Tensor,
               graph: str | Graph, generator: torch.Generator | None = None, *, shift: torch.Tensor | None = None,
               block_v: int | None = None, top_p: float | None = None, top_k: int | None = None) -> torch.Tensor:
    """One Euler (τ-leaping) reverse step; returns the next tokens [B, L] (x_t's dtype).

    Args:
        log_score: [B, L, V] log-scores at x_t (raw output when ``shift`` is given).
        x_t: [B, L] int current tokens.
        dsigma: [B] or [B, 1] noise rate σ̄'(t) > 0.
        dt: step size Δt > 0 (a number or [B]).
        graph, generator, shift: as in :func:`sedd.ops.score_entropy` / :func:`sedd.ops.sample_transition`.
        block_v: the Triton kernel's column tile (a power of two; None: the launcher's choice).
        top_p, top_k: nucleus / top-k truncation of where a position jumps to (see
            :data:`TRUNCATION`); None: the untruncated step.

    Candidate y ≠ x_t has weight Δt·dσ·Q(x_t, y)·e^{ŝ_y}; staying has weight 1 − Σ (never chosen
    when negative). For absorbing only MASK positions move.
    """
    B, g, shift = check_step_args(log_score, x_t, graph, shift)
    dsigma = check_per_row("dsigma", dsigma, B, log_score.device)
    dt = check_per_row("dt", dt, B, log_score.device)
    return _reverse_step("euler", log_score, x_t, (dsigma, dt), g, shift, generator, block_v, top_p, top_k)


def analytic_step(log_score: torch.Tensor, x_t: torch.Tensor, dsigma: torch.Tensor, graph: str | Graph,
                  generator: torch.Generator | None = None, *, shift: torch.Tensor | None = None,
                  block_v: int | None = None, top_p: float | None = None, top_k: int | None = None) -> torch.Tensor:
    """One analytic (Tweedie τ-leaping) reverse step; returns the next tokens [B, L].

    ``dsigma`` [B] or [B, 1] is the noise removed by the step, σ̄(t) − σ̄(t − Δt) > 0.
    p_y ∝ (exp(−Δσ Q) s)_y · exp(Δσ Q)(x_t, y). ``top_p``, ``top_k``: see :data:`TRUNCATION`.
    """
    B, g, shift = check_step_args(log_score, x_t, graph, shift)
    dsigma = check_per_row("dsigma", dsigma, B, log_score.device)
    return _reverse_step("analytic", log_score, x_t, (dsigma,), g, shift, generator, block_v, top_p, top_k)


def denoise_step(log_score: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, graph: str | Graph,
                 generator: torch.Generator | None = None, *, shift: torch.Tensor | None = None,
                 block_v: int | None = None, top_p: float | None = None, top_k: int | None = None) -> torch.Tensor:
    """The final denoising step from total noise ``sigma`` [B] to σ = 0; never returns MASK.
    ``top_p``, ``top_k``: see :data:`TRUNCATION`.

    A position whose real tokens all have weight 0 (every real-token score −∞) gets token 0, the
    lowest id, on both backends."""
    B, g, shift = check_step_args(log_score, x_t, graph, shift)
    sigma = check_per_row("sigma", sigma, B, log_score.device)
    return _reverse_step("denoise", log_score, x_t, (sigma,), g, shift, generator, block_v, top_p, top_k)


def denoise_with_stats(log_score: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, graph: str | Graph,
                       generator: torch.Generator | None = None, *, shift: torch.Tensor | None = None,
                       block_v: int | None = None, top_p: float | None = None,
                       top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`denoise_step` on the absorbing graph that also says how sure each draw was: the
    per-position statistics of the categorical p it draws from (p_y ∝ e^{ŝ_y} over the real tokens,
    after ``top_p`` / ``top_k``), computed from the values the draw reads, in the same pass on the
    Triton backend. What first hitting's adaptive rules select positions by
    (:mod:`sedd.sampling.first_hitting`; docs/math.md, "Adaptive parallel decoding").

    Args: as :func:`denoise_step`; ``graph`` must be absorbing.

    Returns:
        tokens: [B, L] in x_t's dtype: the tokens :func:`denoise_step` draws from the same
            generator state on the same backend.
        confidence: [B, L] fp32, max_y p_y.
        entropy: [B, L] fp32, −Σ_y p_y log p_y in nats.
        A position that is not MASK (its token stays) or whose real tokens all have weight 0 (it
        takes token 0) has confidence 1 and entropy 0: its next token is certain.
    """
    B, g, shift = check_step_args(log_score, x_t, graph, shift)
    if not g.absorbing:
        raise ValueError(f"denoise_with_stats samples the absorbing graph only (a MASK position's denoising "
                         f"distribution); got the {g.name} graph")
    sigma = check_per_row("sigma", sigma, B, log_score.device)
    check_generator(generator, log_score.device)
    check_truncation(top_p, top_k)
    block_v = check_block_v(block_v)
    if not eager.truncating(top_p, top_k):
        top_p = top_k = None
    backend = dispatch(log_score.device, g)
    if backend == "triton":
        check_triton_dtype("log_score", log_score)
        trunc = None
        if top_p is not None or top_k is not None:
            trunc = eager.truncation("denoise", log_score, x_t.long(), sigma, g, shift, top_p, top_k, generator)
        tokens, stats = custom_ops.denoise_stats(log_score, x_t, sigma, g, shift, generator, block_v, trunc)
        return tokens, stats[..., 0], stats[..., 1]
    if g.kernel is not None:
        stats = torch.empty(B * x_t.shape[1], 2, dtype=torch.float32, device=log_score.device)
        tokens = eager.reverse_step("denoise", log_score, x_t.long(), sigma, g, shift, generator, top_p, top_k,
                                    stats=stats).to(x_t.dtype)
        stats = stats.view(*x_t.shape, 2)
        return tokens, stats[..., 0], stats[..., 1]
    tokens = reference.denoise_step(log_score, x_t.long(), sigma, g, shift, generator, top_p, top_k).to(x_t.dtype)
    return (tokens, *reference.denoise_stats(log_score, x_t.long(), sigma, g, shift, top_p, top_k))


_REFERENCE_STEPS = {"euler": reference.euler_step, "analytic": reference.analytic_step,
                    "denoise": reference.denoise_step}


def _reverse_step(kind, log_score, x_t, scalars, graph, shift, generator, block_v, top_p, top_k):
    """The dispatch every reverse step shares. ``scalars``: the per-row arguments of the reference
    step (checked); the kernels and the eager path take their product (Δt·dσ for Euler)."""
    check_generator(generator, log_score.device)
    check_truncation(top_p, top_k)
    block_v = check_block_v(block_v)
    scalar = scalars[0] if len(scalars) == 1 else scalars[0] * scalars[1]
    if not eager.truncating(top_p, top_k):  # top_p = 1 keeps every candidate: the untruncated step
        top_p = top_k = None
    if dispatch(log_score.device, graph) == "triton":
        check_triton_dtype("log_score", log_score)
        trunc = None
        if top_p is not None or top_k is not None:
            # the kept set and stay-or-move in log space, rows in chunks (sedd/ops/eager.py)
            trunc = eager.truncation(kind, log_score, x_t.long(), scalar, graph, shift, top_p, top_k, generator)
        return custom_ops.reverse_step(kind, log_score, x_t, scalar, graph, shift, generator, block_v, trunc)
    if graph.kernel is not None:
        # the built-in graphs' eager steps: log space, chunked, a two-level fp64 race (sedd/ops/eager.py)
        return eager.reverse_step(kind, log_score, x_t.long(), scalar, graph, shift, generator, top_p,
                                  top_k).to(x_t.dtype)
    step = _REFERENCE_STEPS[kind]
    return step(log_score, x_t.long(), *scalars, graph, shift, generator, top_p, top_k).to(x_t.dtype)
