"""Ancestral sampling of the autoregressive baseline (:class:`sedd.model.ARModel`): one position
per network evaluation, left to right, so NFE = L for a sequence of L tokens. Only the positions
free in some row are evaluated: positions every row holds fixed are read with the next evaluation
(a prefix of p tokens by the first: NFE = L − p), and fixed positions after the last free one (a
suffix) are never evaluated.

Each evaluation reads only the new position, with the keys and values of the earlier ones kept in
a cache (:meth:`sedd.model.ARModel.step`); ``kv_cache=False`` re-runs the whole prefix instead (the
same numbers, for testing and for models without ``step``).

The draw: logits / temperature, softmax in fp64, optional top-k / top-p truncation, then one fp64
uniform through the inverse CDF (a token of probability p is drawn with probability p to fp64
precision, rare tokens included; docs/math.md, "Categorical draws" says why fp32 noise would not
do). Temperature 0 is greedy (argmax, ties to the lowest id).

Fixed positions (``fixed_tokens``, ``fixed_mask``, as for :func:`sedd.sampling.sample`) are held:
a prefix conditions the rest exactly. A fixed token after a generated one is placed, but the
model sees only what is before a position, so it does not steer the tokens before it (a warning,
once per process).

The math: docs/math.md, "Autoregressive baseline".
"""

from __future__ import annotations

import numbers
import warnings

import torch
from tqdm.auto import tqdm

from sedd.model import ARModel
from sedd.model.scoring import unwrap
from sedd.sampling.cache import SamplingStats
from sedd.sampling.spans import check_fixed
from sedd.sampling.spec import SamplingSpec, target_for

__all__ = ["sample_ancestral", "truncate_probs"]

_warned_infill = False


def truncate_probs(probs: torch.Tensor, top_p: float | None = None, top_k: int | None = None) -> torch.Tensor:
    """Top-k, then top-p truncation of normalised rows [B, N] (unnormalised result, zeros outside).

    top_k keeps p ≥ the k-th largest (ties at the boundary kept); top_p keeps, of those, the
    largest ones until their sum reaches top_p of the kept mass (the crossing token and its ties
    kept): the conventions of the SEDD steps (docs/math.md, "Truncation"), without their stay
    option."""
    if top_k is not None and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p is not None and top_p < 1:
        ordered = probs.sort(dim=-1, descending=True).values
        cum = ordered.cumsum(-1)
        crossing = (cum < top_p * cum[:, -1:]).sum(-1, keepdim=True).clamp_max(probs.shape[-1] - 1)
        probs = torch.where(probs >= ordered.gather(-1, crossing), probs, 0.0)
    return probs


def _draw(logits: torch.Tensor, temperature: float, top_p, top_k, generator) -> torch.Tensor:
    """One token per row of [B, N] logits (module docstring)."""
    z = logits.double()
    if temperature == 0:
        return z.argmax(-1)
    probs = truncate_probs(torch.softmax(z / temperature, dim=-1), top_p, top_k)
    cdf = probs.cumsum(-1)
    u = torch.rand(len(z), 1, dtype=torch.float64, device=z.device, generator=generator) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True)[:, 0]
    # u·total may round up to the total: the last token of positive probability, never a zero one
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(token, last)


def _fixed(fixed_tokens, fixed_mask, B: int, L: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    fixed = check_fixed(fixed_tokens, fixed_mask, B, L, N, device)
    if fixed is None:
        return (torch.zeros(B, L, dtype=torch.long, device=device), torch.zeros(B, L, dtype=torch.bool, device=device))
    tokens, mask = fixed
    return torch.where(mask, tokens, 0), mask


def _warn_infill() -> None:
    global _warned_infill
    if not _warned_infill:
        _warned_infill = True
        warnings.warn("an autoregressive model reads only the tokens before a position: fixed tokens after a "
                      "generated one are placed but do not steer the tokens before them (a prefix conditions "
                      "exactly; SEDD absorbing models condition on text anywhere)", UserWarning, stacklevel=3)


@torch.no_grad()
def sample_ancestral(
    model,
    *,
    batch_size: int,
    length: int,
    spec: SamplingSpec | None = None,
    fixed_tokens: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    return_stats: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, SamplingStats]:
    """Draw ``batch_size`` sequences of ``length`` tokens from an autoregressive model.

    Args:
        model: an :class:`~sedd.model.ARModel` in eval mode.
        spec, options: how to sample: a :class:`~sedd.sampling.SamplingSpec` and/or its fields as
            keyword arguments: ``temperature`` (>= 0; 0 is greedy), ``top_p``, ``top_k`` (the
            truncation of every draw) and ``kv_cache`` (read one new position per evaluation, or
            re-run the prefix); the diffusion samplers' options are refused.
        fixed_tokens, fixed_mask: [L] or [B, L]; positions where the mask is True hold
            ``fixed_tokens`` (a prompt; module docstring for fixed text after generated text).
        generator: a torch.Generator on ``device`` for reproducible samples.
        return_stats: also return the network calls (:class:`~sedd.sampling.SamplingStats`):
            ``nfe`` is the number of positions free in some row (L − p after a prefix of p tokens
            fixed in every row; all rows share every evaluation).
    Returns:
        [B, L] int64 tokens (and the stats).
    """
    for name, value in (("batch_size", batch_size), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    spec = SamplingSpec.build(spec, **options).validate(target_for("ancestral"))
    spec.check_one_window(length)
    temperature, top_p, top_k, kv_cache = spec.temperature, spec.top_p, spec.top_k, spec.kv_cache
    net = unwrap(model)
    if not isinstance(net, ARModel):
        raise TypeError(f"sample_ancestral needs an autoregressive model (sedd.model.ARModel), got {type(net).__name__}")
    if device is None:
        device = next(net.parameters()).device
    device = torch.device(device)
    B, L, N = batch_size, length, net.tokens
    if L > net.length:
        warnings.warn(f"sampling {L} tokens at once from a model with training length {net.length}: quality drops "
                      "past it; sedd.generation.sample_blockwise (sedd.generate) samples longer sequences window by "
                      "window", UserWarning, stacklevel=2)
    x, mask = _fixed(fixed_tokens, fixed_mask, B, L, N, device)
    free = ~mask
    # one evaluation per position free in some row: the fixed positions before it are read with it
    # (the prefix by the first), and those after the last free one are never evaluated
    positions = free.any(0).nonzero()[:, 0].tolist()
    evaluations = len(positions)
    stats = SamplingStats(nfe=torch.full((B,), evaluations, dtype=torch.long), forward_rows=B * evaluations,
                          forward_calls=evaluations)
    if not positions:
        return (x, stats) if return_stats else x
    if bool((mask & free.cumsum(1).bool()).any()):
        _warn_infill()
    bos = torch.full((B, 1), net.bos_id, dtype=torch.long, device=device)
    cache = net.new_cache(B, L, device) if kv_cache else None
    read = 0  # inputs in the cache: BOS at input 0, then x_{j−1} at input j
    for i in tqdm(positions, desc="sampling", disable=not progress, leave=False):
        if cache is not None:
            inputs = torch.cat([bos, x[:, :i]], dim=1) if read == 0 else x[:, read - 1 : i]
            logits = net.step(inputs, cache)[:, -1]
            read = i + 1
        else:
            logits = model(x[:, : i + 1])[:, i]
        x[:, i] = torch.where(mask[:, i], x[:, i], _draw(logits, temperature, top_p, top_k, generator))
    return (x, stats) if return_stats else x
