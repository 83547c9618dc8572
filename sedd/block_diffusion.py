"""Block diffusion's training loss and likelihood bound: score entropy within blocks of b tokens,
each block at its own noise level, all blocks of a sequence in one forward
(:class:`sedd.model.BlockSEDD`).

Per sequence of K = L / b blocks: t_k ~ U[ε_s, 1] for every block k, (σ_k, dσ_k) = noise(t_k),
x_t's block k ~ p_{t_k|0}(· | x0's block k), ŝ = model(x_t, x0) (block k given x0's blocks < k), and

    loss = Σ_k Σ_{i in block k} dσ_k·ℓ(ŝ_i, σ_k, x_t,i, x0_i)       (nats per sequence; batch: the mean)

In expectation over the t_k this is Σ_k of block k's SEDD bound on −log p(x0's block k | blocks < k)
less its prior term, so the loss of one forward is an unbiased estimate of the bound on −log p(x0)
(docs/math.md, "Block diffusion"). BD3-LM's clipped schedule (``mask_rate_range`` = (β, ω)) draws
the t_k instead among the times whose masking rate 1 − e^{−σ̄(t)} lies in [β, ω]: a lower-variance
training loss that estimates the integrand's mean over those times, not the bound; the validation
losses and the bound keep the whole range. The blocks are handed to the score-entropy ops as rows: the
scores [B, L, V] viewed as [B·K, b, V] with one σ, shift and weight per row, so the fused head and
the fused kernels run unchanged.

The bound (:func:`block_diffusion_sequence_bounds`) is the sum of the blocks' SEDD bounds, prior
terms included, estimated with K_t draws per sequence, each draw a time per block: the terms and
the layout of :func:`sedd.likelihood.sequence_bounds`, for :func:`sedd.likelihood.summarize`.

The model: :class:`sedd.model.BlockSEDD`, or any ``model(x_t, x0, sigma) -> log_score [B, L, V]``
(σ [B, K]) with a ``block_size`` attribute, such as an exact score in the tests.
"""

from __future__ import annotations

import math

import torch

from sedd import ops
from sedd.graph import Graph
from sedd.likelihood import block_bounds, bound_terms, draw_times, integrand_draws
from sedd.losses import sample_times
from sedd.model.scoring import accepts_head, unwrap
from sedd.noise import Noise
from sedd.ops.checks import check_tokens

__all__ = [
    "block_diffusion_bounds",
    "block_diffusion_loss",
    "block_diffusion_sequence_bounds",
    "block_diffusion_validation_losses",
    "block_times",
    "clipped_times",
    "mask_rate_range",
    "noise_blocks",
]


def _blocks_of(model, x0: torch.Tensor) -> tuple[int, int]:
    """(K, b): the blocks of ``x0`` [B, L] under ``model``'s block size; ValueError unless b | L."""
    b = getattr(unwrap(model), "block_size", None)
    if not isinstance(b, int) or b < 1:
        raise TypeError(f"a block-diffusion loss needs a block model (sedd.model.BlockSEDD), got {type(unwrap(model)).__name__}")
    if x0.dim() != 2 or x0.shape[1] % b:
        raise ValueError(f"x0 must be [B, L] with L a multiple of the block size {b}, got {list(x0.shape)}")
    return x0.shape[1] // b, b


def block_times(batch: int, n_blocks: int, sampling_eps: float = 1e-3, *, device=None, generator=None,
                span: tuple[float, float] | None = None) -> torch.Tensor:
    """t for every block of every sequence, [B, K] fp32 (row-major draws): U[ε_s, 1], or U[lo, hi]
    for ``span`` = (lo, hi), the times of a clipped range of masking rates (:func:`clipped_times`)."""
    if span is None:
        return sample_times(batch * n_blocks, sampling_eps, device=device, generator=generator).view(batch, n_blocks)
    lo, hi = span
    u = torch.rand(batch * n_blocks, device=device, generator=generator)
    return ((hi - lo) * u + lo).view(batch, n_blocks)


def mask_rate_range(value) -> tuple[float, float]:
    """(β, ω) from ``value``, a pair of numbers or the string "β,ω" (``--mask-rate-range``);
    ValueError, one line, unless 0 ≤ β < ω ≤ 1."""
    pair = value.split(",") if isinstance(value, str) else value
    try:
        beta, omega = (float(v) for v in pair)
    except (TypeError, ValueError):
        beta = omega = math.nan
    if not 0 <= beta < omega <= 1:  # NaN fails too
        raise ValueError(f"the mask rate range must be two numbers BETA,OMEGA with 0 <= BETA < OMEGA <= 1 (the "
                         f"masking rates a block's training times are drawn within; 0,1: all of them), got {value!r}")
    return beta, omega


def clipped_times(noise: Noise, rates, sampling_eps: float = 1e-3) -> tuple[float, float]:
    """(lo, hi): the times t ∈ [ε_s, 1] at which the masking rate 1 − e^{−σ̄(t)} lies in the range
    ``rates`` (:func:`mask_rate_range`'s argument); (ε_s, 1) for 0,1. ValueError for a range that
    leaves no time above ε_s."""
    beta, omega = mask_rate_range(rates)

    def time(rate: float) -> float:  # σ̄ = −log(1 − rate), then the schedule's inverse
        if rate >= 1:
            return 1.0
        return float(noise.time_at(-torch.log1p(torch.tensor(-rate, dtype=torch.float64))))

    lo, hi = max(sampling_eps, time(beta)), min(1.0, time(omega))
    if not lo < hi:
        raise ValueError(f"the mask rate range {beta:g},{omega:g} holds no training time above sampling_eps = "
                         f"{sampling_eps:g} under {noise}")
    return lo, hi


def noise_blocks(x0: torch.Tensor, sigma: torch.Tensor, graph: Graph, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t [B, L]: each block of ``x0`` [B, L] drawn from the forward process at its own noise
    ``sigma`` [B, K] (:func:`sedd.ops.sample_transition` on the blocks as rows)."""
    B, L = x0.shape
    K = sigma.shape[1]
    return ops.sample_transition(x0.reshape(B * K, L // K), sigma.reshape(-1), graph, generator).view(B, L)


def block_diffusion_loss(
    model,
    x0: torch.Tensor,
    graph: Graph,
    noise: Noise,
    *,
    t: torch.Tensor | None = None,
    x_t: torch.Tensor | None = None,
    sampling_eps: float = 1e-3,
    mask_rate_range=None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale: float = 1.0,
    fused: bool = True,
    **model_kwargs,
) -> torch.Tensor:
    """The block-diffusion training loss of a batch of clean sequences (module docstring), with the
    conventions of :func:`sedd.losses.score_entropy_loss`.

    Args:
        model: a :class:`sedd.model.BlockSEDD` (or any block model, module docstring).
        x0: [B, L] int clean tokens, L a multiple of the block size b.
        graph, noise: the forward process (absorbing, for a BlockSEDD) and its schedule.
        t: optional [B, K] times, one per block; drawn from U[sampling_eps, 1] when None.
        mask_rate_range: (β, ω) or "β,ω", 0 ≤ β < ω ≤ 1: draw each block's time among those
            whose masking rate lies in [β, ω] (BD3-LM's clipped schedule: module docstring); None
            (or 0,1): all of them. Refused with ``t``.
        x_t: optional [B, L] noisy tokens, each block a draw at its time (``t`` must be given
            too), e.g. from :func:`noise_blocks`; drawn here when None.
        generator: optional generator for t and the forward noise.
        attention_mask: optional [B, L] bool, True on real tokens: padding adds no loss and is
            not attended to.
        reduction: "mean" (over sequences: nats per sequence) or "none" ([B]).
        scale: a constant factor on the loss, folded into the per-block weight (gradient
            accumulation passes 1/steps).
        fused: for a model that takes a ``head``: the loss inside the output layer
            (:func:`sedd.ops.linear_score_entropy` on the blocks as rows; on the absorbing graph
            only the MASK rows are multiplied). False, or under ``torch.compile``: the scores,
            then :func:`sedd.ops.score_entropy` (the same loss up to rounding).
        model_kwargs: passed to the model (``segment_ids``).

    Returns:
        fp32 scalar, or [B] for reduction="none".
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    K, b = _blocks_of(model, x0)
    B = x0.shape[0]
    if x_t is not None and t is None:
        raise ValueError("x_t was drawn at some times t: pass those t too")
    if t is None:
        span = None if mask_rate_range is None else clipped_times(noise, mask_rate_range, sampling_eps)
        t = block_times(B, K, sampling_eps, device=x0.device, generator=generator, span=span)
    elif mask_rate_range is not None:
        raise ValueError("mask_rate_range clips the drawn times: pass it or t, not both")
    elif t.shape != (B, K):
        raise ValueError(f"t must be [B, K] = [{B}, {K}] (one time per block), got {list(t.shape)}")
    sigma, dsigma = noise(t)
    weight = dsigma * scale if scale != 1.0 else dsigma
    if x_t is None:
        x_t = noise_blocks(x0, sigma, graph, generator)
    elif ops.checking_values():  # what the noising would have checked
        check_tokens("x0", x0, tuple(x0.shape), x0.device, graph.N, "clean tokens are real tokens")
        check_tokens("x_t", x_t, tuple(x0.shape), x0.device, graph.dim, "the noisy tokens")
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    per_token = attention_mask is not None or reduction == "none"
    # the blocks as rows of the score-entropy ops: one σ, shift and weight per block; for the
    # batch mean, the sum over rows with 1/B in the weight (the fused head's own batchmean rule)
    rows = dict(sigma=sigma.reshape(-1), x_t=x_t.reshape(B * K, b), x0=x0.reshape(B * K, b))
    row_weight = (weight if per_token else weight / B).reshape(-1)
    net = unwrap(model)
    # no value checks below: x0 and σ were checked by the noising, and x_t was made by it
    with ops.value_checks(False):
        shift = net.score_shift(rows["sigma"]) if hasattr(net, "score_shift") else None
        if fused and accepts_head(net) and not torch.compiler.is_compiling():
            def head(hidden, head_weight, head_bias):
                return ops.linear_score_entropy(
                    hidden.reshape(B * K, b, -1), head_weight, head_bias, rows["sigma"], rows["x_t"], rows["x0"],
                    graph, shift=shift, loss_weight=row_weight, reduction="none" if per_token else "sum",
                    width=graph.dim)  # the aligned head's padding rows are no scores

            loss = model(x_t, x0, sigma, head=head, **model_kwargs)
        else:
            # σ [B, K]: what a time-conditioned network reads, and the scores' shift
            log_score = model(x_t, x0, sigma, raw=shift is not None, **model_kwargs)
            V = log_score.shape[-1]
            # a view, also of scores whose rows are padded in memory (row stride > V)
            loss = ops.score_entropy(
                log_score.view(B * K, b, V), rows["sigma"], rows["x_t"], rows["x0"], graph, shift=shift,
                weight=row_weight, reduction="none" if per_token else "sum",
                inplace_backward=shift is not None and not per_token)
    if not per_token:
        return loss
    loss = loss.reshape(B, -1)
    if attention_mask is not None:
        loss = loss * attention_mask
    per_sequence = loss.sum(-1)
    return per_sequence.mean() if reduction == "mean" else per_sequence


def block_diffusion_validation_losses(model, x0: torch.Tensor, graph: Graph, noise: Noise,
                                      generators: list[torch.Generator], *, sampling_eps: float = 1e-3,
                                      **model_kwargs) -> torch.Tensor:
    """[B] losses of fixed validation sequences ``x0`` [B, L]: sequence r's times (one per block)
    and forward noise drawn from its own ``generators[r]``, so a sequence's loss does not depend on
    the batch it is evaluated in."""
    if len(generators) != x0.shape[0]:
        raise ValueError(f"one generator per sequence: got {len(generators)} for {x0.shape[0]} sequences")
    K, _ = _blocks_of(model, x0)
    ts, xts = [], []
    for row, g in enumerate(generators):
        t = block_times(1, K, sampling_eps, device=x0.device, generator=g)
        ts.append(t)
        xts.append(noise_blocks(x0[row : row + 1], noise(t)[0], graph, g))
    return block_diffusion_loss(model, x0, graph, noise, t=torch.cat(ts), x_t=torch.cat(xts), reduction="none",
                                **model_kwargs)


@torch.no_grad()
def block_diffusion_sequence_bounds(
    model,
    x0: torch.Tensor,
    graph: Graph,
    noise: Noise,
    *,
    num_samples: int = 1000,
    time_sampler: str = "stratified",
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_draws=None,
    maskable: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sequence terms of the block-diffusion bound on −log p(x0) for clean sequences ``x0``
    [B, L]: the dict of :func:`sedd.likelihood.sequence_bounds` (``integral``, ``variance``,
    ``prior``, ``tokens``, [B] float64), the integral being the sum of the blocks' time integrals.

    Each of the ``num_samples`` draws of a sequence takes one time per block, every block's times
    drawn by ``time_sampler`` over its K draws as for a SEDD sequence (stratified: one per stratum).
    The strata are shuffled independently per block, so that one draw does not put every block in
    the same stratum (which would add the blocks' stratum means coherently and inflate the
    variance estimate; it stays conservative, as for SEDD). With one block (b = L) the draws and
    the numbers are those of ``sequence_bounds`` on the same generator.

    ``maskable``: optional [B, L] bool, as for ``sequence_bounds``: the other positions stay clean
    in every draw (the context of a conditional bound, within a block and in the blocks before
    it), so the terms bound −log p(x0[maskable] | x0[~maskable]) for a context that ends anywhere;
    a block with nothing maskable adds nothing. All True gives the numbers of None."""
    K, _ = _blocks_of(model, x0)
    B = x0.shape[0]
    times = draw_times(B * K, num_samples, time_sampler, generator=generator, device=x0.device)
    times = times.view(B, K, num_samples)
    if K > 1 and time_sampler != "iid":
        order = torch.rand(times.shape, generator=generator, device=x0.device).argsort(-1)
        times = times.gather(-1, order)

    if maskable is not None and (maskable.shape != x0.shape or maskable.dtype != torch.bool):
        raise ValueError(f"maskable must be a bool tensor of shape {tuple(x0.shape)}, got {maskable.dtype} "
                         f"{tuple(maskable.shape)}")

    def integrand(x, t, mask, index):
        x_t = None
        if maskable is not None:  # the draw the loss would make, then the context put back (it adds no loss)
            x_t = torch.where(maskable[index], noise_blocks(x, noise(t.float())[0], graph, generator), x)
        return block_diffusion_loss(model, x, graph, noise, t=t.float(), x_t=x_t, generator=generator,
                                    attention_mask=mask, reduction="none")

    values = integrand_draws(x0, times.transpose(1, 2), integrand, attention_mask=attention_mask,
                             batch_size=batch_size, progress=progress, on_draws=on_draws)
    scored = attention_mask
    if maskable is not None:
        scored = maskable if scored is None else scored & maskable
    return bound_terms(values, x0, scored, graph, noise)


def block_diffusion_bounds(model, blocks: torch.Tensor, mask: torch.Tensor, graph: Graph, noise: Noise,
                           **kwargs) -> list[dict[str, torch.Tensor]]:
    """:func:`sedd.likelihood.block_bounds` (the evaluation's data blocks [n, L] with their mask, in
    batches, for :func:`sedd.likelihood.summarize`) with :func:`block_diffusion_sequence_bounds`
    as the per-batch estimator; ``kwargs`` are ``block_bounds``' (``num_samples``, ...)."""
    return block_bounds(model, blocks, mask, graph, noise, estimator=block_diffusion_sequence_bounds, **kwargs)
