"""The SEDD likelihood bound (the paper's perplexity bound), estimated by Monte Carlo over time.

    −log p_θ(x0) ≤ ∫_0^1 E_{x_t ~ p_{t|0}(·|x0)} [Σ_positions σ̄'(t)·ℓ(ŝ_θ(x_t, σ̄(t)), x_t, x0)] dt
                   + KL(p_{1|0}(·|x0) ‖ p_base)

The integrand for one draw of t is exactly the training loss of that sequence at that t, so the
estimator reuses :func:`sedd.losses.score_entropy_loss`. Times are drawn per sequence:
"stratified" (one uniform draw in each of K equal strata, the default), "antithetic" (pairs t and
1 − t) or "iid". The variance of the K-draw mean is estimated from the spread of the draws
(conservative for stratified draws), giving a standard error for every sequence and the total.

Conditional bounds (``maskable``): positions outside the mask are held clean, never noised, so
the estimator bounds −log p(x0[maskable] | x0[~maskable]) (absorbing graph only: there a visible
token is certainly clean and the model's ratios given the held tokens are the conditional ones,
docs/math.md, "Conditioning"). The integrand is the same training loss at the same draws of t; the
prior term counts the maskable tokens only.

Prior term, per token (closed form, reported separately):
  * uniform: KL(p_{1|0}(·|x0) ‖ Uniform(N)), the sampler's true starting distribution.
  * absorbing: the sampler starts from all-MASK, against which the KL is infinite while
    e^{−σ̄(1)} > 0. Convention used here: the base is the forward marginal at t = 1 of a
    uniformly random clean token (MASK with probability 1 − e^{−σ̄(1)}, each real token with
    e^{−σ̄(1)}/N), for which the KL is exactly e^{−σ̄(1)}·log N per token: 0.0108 nats for GPT-2
    with the log-linear ε = 1e-3.

Autoregressive checkpoints (:class:`sedd.model.ARModel`) have an exact likelihood:
:func:`exact_block_nll` gives −log p(block) in the layout of :func:`block_bounds` (no variance, no
prior term), so :func:`summarize` reports the two objectives on the same blocks and tokens, the
one as "=" and the other as "≤".

Block-diffusion models (:class:`sedd.model.BlockSEDD`) bound −log p(block) as the sum of their
blocks' bounds, with the draws and terms of this module (:func:`integrand_draws`,
:func:`bound_terms`): :func:`sedd.block_diffusion.block_diffusion_sequence_bounds`, which
:func:`block_bounds` takes as its ``estimator``.

The math: docs/math.md, "Likelihood bound", "Autoregressive baseline", "Block diffusion".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from sedd import ops
from sedd.graph import Graph
from sedd.losses import ar_loss, score_entropy_loss
from sedd.noise import Noise

TIME_SAMPLERS = ("stratified", "antithetic", "iid")


def prior_kl(graph: Graph, noise: Noise) -> float:
    """The per-token prior term KL(p_{1|0}(·|x0) ‖ p_base) in nats (independent of x0): the
    graph's :meth:`~sedd.graph.Graph.prior_kl` at the schedule's total noise σ̄(1)."""
    return graph.prior_kl(float(noise.total(torch.tensor(1.0, dtype=torch.float64))))


def draw_times(batch: int, num_samples: int, kind: str = "stratified", *, generator=None, device=None) -> torch.Tensor:
    """[batch, K] float64 times in (0, 1) for the Monte-Carlo integral over t."""
    if kind not in TIME_SAMPLERS:
        raise ValueError(f"time sampler must be one of {TIME_SAMPLERS}, got {kind!r}")
    if num_samples < 1 or (kind == "antithetic" and num_samples % 2):
        raise ValueError(f"num_samples must be >= 1 (and even for antithetic draws), got {num_samples}")
    if kind == "antithetic":
        half = torch.rand(batch, num_samples // 2, generator=generator, device=device, dtype=torch.float64)
        t = torch.cat([half, 1 - half], dim=1)
    else:
        t = torch.rand(batch, num_samples, generator=generator, device=device, dtype=torch.float64)
        if kind == "stratified":
            t = (torch.arange(num_samples, device=device, dtype=torch.float64) + t) / num_samples
    # keep t away from 0 exactly, where σ̄ = 0 and the weight has no meaning
    return t.clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def sequence_bounds(
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
    """Per-sequence bound terms for clean sequences ``x0`` [B, L].

    Returns a dict of [B] float64 tensors: ``integral`` (the K-draw estimate of the time
    integral, nats), ``variance`` (the estimated variance of that estimate), ``prior`` (the
    prior term, nats) and ``tokens`` (the number of real tokens, or of maskable ones).
    ``batch_size`` caps the number of sequences per model call (draws are batched together).
    ``on_draws(n)`` is called after every model call with the n draws it evaluated (for a
    caller's own progress bar over many calls of this function).
    ``maskable``: optional [B, L] bool, True where the forward process may mask; the other
    positions stay clean in every draw and are visible to the model (the context of a
    conditional bound, module docstring). Absorbing graph only (ValueError otherwise). All True
    gives exactly the numbers of ``maskable=None`` (same draws from ``generator``).
    """
    B, L = x0.shape
    if maskable is not None:
        if not graph.absorbing:
            raise ValueError("maskable positions (a conditional bound) need the absorbing graph: on the "
                             f"{graph.name} graph the model cannot tell a clean context token from a noisy one")
        if maskable.shape != x0.shape or maskable.dtype != torch.bool:
            raise ValueError(f"maskable must be a bool tensor of shape {tuple(x0.shape)}, got "
                             f"{maskable.dtype} {tuple(maskable.shape)}")
    times = draw_times(B, num_samples, time_sampler, generator=generator, device=x0.device)

    def integrand(x, t, mask, index):
        x_t = None
        if maskable is not None:
            # the same draw score_entropy_loss would make, then the context put back: on the
            # absorbing graph a clean position adds no loss, so nothing else changes
            x_t = ops.sample_transition(x, noise(t.float())[0], graph, generator)
            x_t = torch.where(maskable[index], x_t, x)
        return score_entropy_loss(model, x, graph, noise, t=t.float(), x_t=x_t, generator=generator,
                                  attention_mask=mask, reduction="none")

    values = integrand_draws(x0, times, integrand, attention_mask=attention_mask, batch_size=batch_size,
                             progress=progress, on_draws=on_draws)
    scored = attention_mask
    if maskable is not None:
        scored = maskable if scored is None else scored & maskable
    return bound_terms(values, x0, scored, graph, noise)


def integrand_draws(x0: torch.Tensor, times: torch.Tensor, integrand, *, attention_mask: torch.Tensor | None = None,
                    batch_size: int | None = None, progress: bool = False, on_draws=None) -> torch.Tensor:
    """[B, K] float64: the integrand of every sequence of ``x0`` [B, L] at each of its K draws of
    ``times`` [B, K, ...] (float64; a time per sequence, or per block of it).

    ``integrand(x, t, mask, index)`` returns the [R] losses of the sequences ``x`` [R, L] at times
    ``t`` [R, ...] (``mask``: their attention mask or None; ``index``: the row of ``x0`` each
    comes from), R = n sequences × m draws, draw-major: at most ``batch_size`` sequences per
    call, and when ``batch_size`` exceeds B, several draws of every sequence in one call.
    ``on_draws(n)`` is called after every call with its n draws; ``progress`` shows a bar."""
    B, K = times.shape[:2]
    rows_per_call = min(B, batch_size or B)
    draws_per_call = max(1, (batch_size or B) // B)  # a large batch_size packs several draws per call
    values = torch.empty(B, K, dtype=torch.float64, device=x0.device)
    bar = tqdm(total=B * K, desc="likelihood bound", disable=not progress, leave=False, unit="draw")
    for start in range(0, B, rows_per_call):
        rows = slice(start, min(B, start + rows_per_call))
        n = rows.stop - rows.start
        for k in range(0, K, draws_per_call):
            ks = slice(k, min(K, k + draws_per_call))
            m = ks.stop - ks.start
            t = times[rows, ks].transpose(0, 1).reshape(m * n, *times.shape[2:])  # draw-major
            index = torch.arange(rows.start, rows.stop, device=x0.device).repeat(m)
            mask = attention_mask[index] if attention_mask is not None else None
            values[rows, ks] = integrand(x0[index], t, mask, index).double().reshape(m, n).T
            bar.update(n * m)
            if on_draws is not None:
                on_draws(n * m)
    bar.close()
    return values


def bound_terms(values: torch.Tensor, x0: torch.Tensor, scored: torch.Tensor | None, graph: Graph,
                noise: Noise) -> dict[str, torch.Tensor]:
    """The per-sequence terms of :func:`sequence_bounds` from the integrand's draws ``values``
    [B, K] of the sequences ``x0`` [B, L] whose positions ``scored`` [B, L] (None: all) count."""
    B, K = values.shape
    tokens = (scored.sum(-1) if scored is not None else torch.full((B,), x0.shape[1], device=x0.device)).double()
    variance = values.var(dim=1, unbiased=True) / K if K > 1 else torch.full((B,), float("nan"), device=x0.device)
    return {
        "integral": values.mean(dim=1),
        "variance": variance.double(),
        "prior": tokens * prior_kl(graph, noise),
        "tokens": tokens,
    }


def make_blocks(tokens, block_size: int, last_block: str = "pad", max_blocks: int | None = None, pad_id: int = 0):
    """A token stream [N] (array-like of ints) cut into [n, block_size] int64 blocks and their
    [n, block_size] bool mask (False on padding). ``last_block``: "pad" keeps the final partial
    block, padded with ``pad_id`` under the mask; "drop" drops it. ``max_blocks`` keeps the first
    blocks only. The blocks of ``train/eval.py`` and of the harness's rolling likelihood."""
    tokens = np.asarray(tokens)
    n_full, rest = divmod(len(tokens), block_size)
    n = n_full + (1 if rest and last_block == "pad" else 0)
    if max_blocks is not None:
        n = min(n, max_blocks)
    blocks = np.full((n, block_size), pad_id, dtype=np.int64)
    mask = np.zeros((n, block_size), dtype=bool)
    used = min(len(tokens), n * block_size)
    blocks.reshape(-1)[:used] = tokens[:used]
    mask.reshape(-1)[:used] = True
    return torch.from_numpy(blocks), torch.from_numpy(mask)


def block_bounds(
    model,
    blocks: torch.Tensor,
    mask: torch.Tensor,
    graph: Graph,
    noise: Noise,
    *,
    num_samples: int,
    time_sampler: str = "stratified",
    batch_size: int = 8,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    on_draws=None,
    estimator=None,
) -> list[dict[str, torch.Tensor]]:
    """:func:`sequence_bounds` of every block [n, L] (from :func:`make_blocks`, with its [n, L]
    mask), ``batch_size`` blocks per call, in order, from one ``generator``: the per-batch terms
    for :func:`summarize`. A batch without padding runs without an attention mask. Each batch is
    moved to ``device`` (the model's; default: where the blocks are). ``estimator``: the
    per-batch function in place of :func:`sequence_bounds`, with its arguments (a block-diffusion
    model's: :func:`sedd.block_diffusion.block_diffusion_sequence_bounds`)."""
    device = blocks.device if device is None else device
    estimator = sequence_bounds if estimator is None else estimator
    parts = []
    for start in range(0, len(blocks), batch_size):
        x0 = blocks[start : start + batch_size].to(device)
        m = mask[start : start + batch_size].to(device)
        parts.append(estimator(
            model, x0, graph, noise, num_samples=num_samples, time_sampler=time_sampler,
            attention_mask=None if bool(m.all()) else m, batch_size=batch_size, generator=generator,
            on_draws=on_draws,
        ))
    return parts


@torch.no_grad()
def exact_block_nll(
    model,
    blocks: torch.Tensor,
    mask: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    on_blocks=None,
) -> list[dict[str, torch.Tensor]]:
    """The exact −log p(block) of every block [n, L] (with its [n, L] mask, from
    :func:`make_blocks`) under an autoregressive model (:func:`sedd.losses.ar_loss`: every real
    token predicted, the first from BOS), ``batch_size`` blocks per call: per-batch terms for
    :func:`summarize` in the layout of :func:`block_bounds` (``integral`` the NLL, ``variance`` and
    ``prior`` zero). ``on_blocks(n)`` is called after every call with the blocks it scored."""
    device = blocks.device if device is None else device
    parts = []
    for start in range(0, len(blocks), batch_size):
        x0 = blocks[start : start + batch_size].to(device)
        m = mask[start : start + batch_size].to(device)
        nll = ar_loss(model, x0, attention_mask=None if bool(m.all()) else m, reduction="none").double()
        zeros = torch.zeros_like(nll)
        parts.append({"integral": nll, "variance": zeros, "prior": zeros, "tokens": m.sum(-1).double()})
        if on_blocks is not None:
            on_blocks(len(x0))
    return parts


@dataclass
class BoundReport:
    """Aggregate bound over a corpus (``exact``: the exact likelihood of an autoregressive model,
    no standard error)."""

    nats_per_token: float
    stderr_nats_per_token: float
    bits_per_token: float
    perplexity_bound: float
    perplexity_ci95: tuple[float, float]
    prior_nats_per_token: float
    tokens: int
    sequences: int
    num_samples: int
    time_sampler: str
    exact: bool = False

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lo, hi = self.perplexity_ci95
        rows = [("sequences", f"{self.sequences}"), ("tokens", f"{self.tokens}")]
        if self.exact:
            rows += [
                ("nats / token", f"{self.nats_per_token:.4f}  (exact)"),
                ("bits / token", f"{self.bits_per_token:.4f}  (exact)"),
                ("perplexity =", f"{self.perplexity_bound:.3f}  (exact: an autoregressive model)"),
            ]
        else:
            rows += [
                ("t draws per sequence", f"{self.num_samples} ({self.time_sampler})"),
                ("nats / token", f"{self.nats_per_token:.4f} ± {self.stderr_nats_per_token:.4f}"),
                ("bits / token", f"{self.bits_per_token:.4f} ± {self.stderr_nats_per_token / math.log(2):.4f}"),
                ("  of which prior", f"{self.prior_nats_per_token:.5f} nats"),
                ("perplexity ≤", f"{self.perplexity_bound:.3f}  (95% CI {lo:.3f} – {hi:.3f})"),
            ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def summarize(parts: list[dict[str, torch.Tensor]], num_samples: int, time_sampler: str, *,
              exact: bool = False) -> BoundReport:
    """Combine per-sequence terms (from :func:`sequence_bounds`, or :func:`exact_block_nll` with
    ``exact``) into the corpus-level bound (the exact likelihood)."""
    if not parts:
        raise ValueError("no sequences were evaluated")
    cat = {k: torch.cat([p[k].double().cpu() for p in parts]) for k in parts[0]}
    return _report((cat["integral"] + cat["prior"]).sum().item(), cat["variance"].sum().item(),
                   cat["prior"].sum().item(), cat["tokens"].sum().item(), len(cat["tokens"]), num_samples,
                   time_sampler, exact)


def combine(reports: list[BoundReport]) -> BoundReport:
    """One report of the sequences of ``reports`` (disjoint sequences, one estimator): the totals
    add, and so do the variances (the draws are independent). What ``train/eval.py`` reports of
    the blocks its processes scored."""
    if not reports:
        raise ValueError("no reports to combine")
    return _report(sum(r.nats_per_token * r.tokens for r in reports),
                   sum((r.stderr_nats_per_token * r.tokens) ** 2 for r in reports),
                   sum(r.prior_nats_per_token * r.tokens for r in reports), sum(r.tokens for r in reports),
                   sum(r.sequences for r in reports), reports[0].num_samples, reports[0].time_sampler,
                   reports[0].exact)


def _report(total: float, variance: float, prior: float, tokens: float, sequences: int, num_samples: int,
            time_sampler: str, exact: bool) -> BoundReport:
    """The report of a total bound (nats), its variance and its prior term over ``tokens``."""
    nats = total / tokens
    se = math.sqrt(max(variance, 0.0)) / tokens
    return BoundReport(
        nats_per_token=nats,
        stderr_nats_per_token=se,
        bits_per_token=nats / math.log(2),
        perplexity_bound=math.exp(nats),
        perplexity_ci95=(math.exp(nats - 1.96 * se), math.exp(nats + 1.96 * se)),
        prior_nats_per_token=prior / tokens,
        tokens=int(tokens),
        sequences=sequences,
        num_samples=num_samples,
        time_sampler=time_sampler,
        exact=exact,
    )
