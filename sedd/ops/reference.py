"""Eager PyTorch reference for every per-token formula of SEDD (docs/math.md, section by section).

This is the readable math, the oracle the kernels are tested against, the baseline they are
benchmarked against, and the CPU fallback behind :mod:`sedd.ops`. It materialises [B, L, V]
temporaries freely; the fused kernels exist so that training and sampling do not have to.

Shapes: ``log_score`` [B, L, V] (any float dtype; computed in fp32, or fp64 for fp64 input),
``x_t``/``x0`` [B, L] integer ids, ``sigma``/``dsigma`` [B] or [B, 1]. ``shift`` (optional, [B])
marks ``log_score`` as the raw network output z: the scores used are ŝ = z + shift. In every case
the entry at the current token is read as ŝ[x_t] = 0 (the token's own ratio is 1).
"""

from __future__ import annotations

import torch

from sedd.graph import Graph, esigm1, per_row

__all__ = [
    "esigm1", "log_scores", "score_entropy", "reverse_rates", "euler_probs", "analytic_probs", "denoise_probs",
    "truncate", "truncation_keep",
    "sample_categorical", "euler_step", "analytic_step", "denoise_step", "denoise_stats", "sample_transition",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def log_scores(log_score: torch.Tensor, x_t: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """The post-processed scores ŝ [B, L, V]: (z + shift) with ŝ[x_t] = 0, in fp32 (fp64 stays)."""
    s = log_score.to(_compute_dtype(log_score))
    if shift is not None:
        s = s + per_row(shift, s, s.dtype)
    return s.scatter(-1, x_t.unsqueeze(-1), 0.0)


# ---------------------------------------------------------------------------------------------
# Score entropy
# ---------------------------------------------------------------------------------------------


def score_entropy(
    log_score: torch.Tensor,
    sigma: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    graph: Graph,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token score entropy ℓ(ŝ, σ, x_t, x0), [B, L] in fp32 (fp64 for fp64 input).

    The graph's :meth:`~sedd.graph.Graph.score_entropy` on the post-processed scores. Every form
    equals Σ_{y≠x_t} Q(x_t, y)[s_y − a_y log s_y + a_y(log a_y − 1)], a_y = p_{t|0}(y|x0)/p_{t|0}(x_t|x0).
    Absorbing (zero unless x_t = MASK), with r = 1/E(σ):
        ℓ = Σ_{j≠M} e^{ŝ_j} − r·ŝ_{x0} + r(log r − 1)
    Uniform, with ρ = E/(E + N):
        pos  = (1/N) Σ_{y≠x_t} e^{ŝ_y},   neg₀ = (1/N) Σ_{y≠x_t} ŝ_y
        x_t = x0:  ℓ = pos − ρ·neg₀ + ((N−1)/N)·ρ(log ρ − 1)
        x_t ≠ x0:  ℓ = pos − neg₀ − ŝ_{x0}/E + ((−log ρ − 1)/ρ − (N − 2))/N
    """
    return graph.score_entropy(log_scores(log_score, x_t, shift), sigma, x_t, x0)


# ---------------------------------------------------------------------------------------------
# Reverse steps: the categorical weights each step samples from
# ---------------------------------------------------------------------------------------------


def _normalise(weights: torch.Tensor) -> torch.Tensor:
    """Clamp to ≥ 0 (a negative stay/MASK weight is never chosen) and normalise each row."""
    weights = weights.clamp_min(0)
    return weights / weights.sum(-1, keepdim=True)


def reverse_rates(x_t: torch.Tensor, graph: Graph, V: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """Q(x_t, y): the rate of the forward jump y → x_t, for y ≠ x_t, [B, L, V] (0 at y = x_t).

    Absorbing: 1 for every real token when x_t = MASK, otherwise 0. Uniform: 1/N.
    ``V`` is the graph's width (kept for old callers; it must equal ``graph.dim``).
    """
    if V is not None and V != graph.dim:
        raise ValueError(f"V = {V} does not match the width {graph.dim} of graph {graph}")
    return graph.reverse_rates(x_t, dtype)


def euler_probs(log_score, x_t, dsigma, dt, graph: Graph, shift=None) -> torch.Tensor:
    """Euler (τ-leaping) step: w_y = Δt·dσ·Q(x_t, y)·e^{ŝ_y} for y ≠ x_t, stay weight 1 − Σ w."""
    s = log_scores(log_score, x_t, shift)
    step = per_row(dsigma, x_t, s.dtype) * per_row(dt, x_t, s.dtype)
    return _normalise(graph.euler_weights(s, x_t, step))


def analytic_probs(log_score, x_t, dsigma, graph: Graph, shift=None) -> torch.Tensor:
    """Tweedie τ-leaping step: p_y ∝ (exp(−Δσ Q) s)_y · exp(Δσ Q)(x_t, y), Δσ = σ̄(t) − σ̄(t − Δt)."""
    s = log_scores(log_score, x_t, shift)
    return _normalise(graph.analytic_weights(s, x_t, dsigma))


def denoise_probs(log_score, x_t, sigma, graph: Graph, shift=None) -> torch.Tensor:
    """Final step: the analytic step with Δσ = σ (jump to σ = 0); absorbing never returns MASK."""
    s = log_scores(log_score, x_t, shift)
    return _normalise(graph.denoise_weights(s, x_t, sigma))


def truncation_keep(probs: torch.Tensor, x_t: torch.Tensor, top_p: float | None = None,
                    top_k: int | None = None) -> torch.Tensor:
    """The candidates a truncated step keeps: bool [..., V], never the stay option ``x_t``.

    Over the candidates y ≠ x_t of positive probability: ``top_k`` keeps those with p_y ≥ the
    k-th largest p; ``top_p`` then keeps, among those, the tokens with p_y ≥ p_(i*), where the
    kept candidates sorted by decreasing p first reach a share ``top_p`` of their total mass at
    the i*-th (the token that crosses the threshold is kept). Ties at a boundary are all kept.
    ``top_p`` ≥ 1 keeps every candidate; the running sum is fp64, so tail tokens below fp32's
    resolution of it are not cut off.
    """
    V = probs.shape[-1]
    stay_col = x_t.unsqueeze(-1)
    cand = probs.scatter(-1, stay_col, 0.0)
    keep = cand > 0
    if top_k is not None:
        kth = cand.topk(min(int(top_k), V), dim=-1).values[..., -1:]
        keep &= cand >= kth
    if top_p is not None and top_p < 1:
        kept = torch.where(keep, cand, 0.0)
        desc = kept.sort(-1, descending=True).values
        cum = desc.double().cumsum(-1)
        first = (cum < top_p * cum[..., -1:]).sum(-1, keepdim=True).clamp_max(V - 1)
        keep &= cand >= desc.gather(-1, first)
    return keep


def truncate(probs: torch.Tensor, x_t: torch.Tensor, top_p: float | None = None,
             top_k: int | None = None) -> torch.Tensor:
    """Nucleus / top-k truncation of a step's distribution ``probs`` [..., V] (rows sum to 1).

    The stay option (keeping x_t) keeps its probability; the probability of moving, 1 − p(x_t), is
    spread over the candidates :func:`truncation_keep` keeps, in proportion to their p. So the
    truncation acts on where a position jumps to, not on whether it jumps (as MDLM's p_nucleus
    acts on the clean-token distribution): an absorbing step keeps its chance to unmask.
    """
    if top_k is None and (top_p is None or top_p >= 1):
        return probs
    stay_col = x_t.unsqueeze(-1)
    stay = probs.gather(-1, stay_col)
    cand = probs.scatter(-1, stay_col, 0.0)
    kept = torch.where(truncation_keep(probs, x_t, top_p, top_k), cand, 0.0)
    mass = kept.sum(-1, keepdim=True)
    scale = torch.where(mass > 0, cand.sum(-1, keepdim=True) / mass, 0.0)
    return (kept * scale).scatter(-1, stay_col, stay)


def sample_categorical(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from unnormalised weights [..., V] ≥ 0: argmax_y (log w_y − log E_y), E ~ Exp(1).

    The exponential noise is drawn and kept in fp64: fp32 noise truncates the tail of the draw
    and lowers the effective temperature (arXiv 2409.02908).
    """
    noise = torch.empty(weights.shape, dtype=torch.float64, device=weights.device)
    noise.exponential_(generator=generator)
    logw = torch.where(weights > 0, weights.double().log(), -torch.inf)
    return (logw - noise.log()).argmax(-1)


def euler_step(log_score, x_t, dsigma, dt, graph: Graph, shift=None, generator=None, top_p=None,
               top_k=None) -> torch.Tensor:
    probs = truncate(euler_probs(log_score, x_t, dsigma, dt, graph, shift), x_t, top_p, top_k)
    return sample_categorical(probs, generator).to(x_t.dtype)


def analytic_step(log_score, x_t, dsigma, graph: Graph, shift=None, generator=None, top_p=None,
                  top_k=None) -> torch.Tensor:
    probs = truncate(analytic_probs(log_score, x_t, dsigma, graph, shift), x_t, top_p, top_k)
    return sample_categorical(probs, generator).to(x_t.dtype)


def denoise_step(log_score, x_t, sigma, graph: Graph, shift=None, generator=None, top_p=None,
                 top_k=None) -> torch.Tensor:
    # a row of all-zero weights (every real-token score −∞) draws token 0: the argmax of an
    # all −∞ key row; the fused kernel returns the same (sedd/kernels/sampling.py)
    probs = truncate(denoise_probs(log_score, x_t, sigma, graph, shift), x_t, top_p, top_k)
    return sample_categorical(probs, generator).to(x_t.dtype)


def denoise_stats(log_score, x_t, sigma, graph: Graph, shift=None, top_p=None, top_k=None):
    """(confidence, entropy), each [B, L] fp32: max_y p_y and −Σ_y p_y log p_y (nats) of the
    categorical p that :func:`denoise_step` draws from (after truncation). A row with no positive
    weight (every real-token score −∞) draws token 0 with certainty: (1, 0), as a position that is
    not MASK (its token stays)."""
    probs = truncate(denoise_probs(log_score, x_t, sigma, graph, shift), x_t, top_p, top_k).double()
    probs = torch.nan_to_num(probs, nan=0.0)  # 0/0 where no weight is positive
    some = probs.sum(-1) > 0
    confidence = torch.where(some, probs.amax(-1), 1.0)
    entropy = torch.where(some, -torch.xlogy(probs, probs).sum(-1), 0.0)
    return confidence.float(), entropy.float()


def sample_transition(x0, sigma, graph: Graph, generator=None) -> torch.Tensor:
    """Forward noising x_t ~ p_{t|0}(· | x0), independently per position."""
    return graph.sample_transition(x0, sigma, generator=generator)
