"""Reverse-time samplers: a predictor (:mod:`sedd.sampling.predictors`: Euler, analytic (Tweedie), or any
registered one) over the time grid, a final denoising step, and conditioning on fixed positions.

Time grid t_k = linspace(1, ε, steps + 1), Δt = (1 − ε)/steps. Every step calls the model once
and hands its raw output with the per-row σ shift to :mod:`sedd.ops`, which on CUDA samples the
next tokens in a fused kernel: no [B, L, V] tensor is allocated besides the model's output, and on
the absorbing graph the output itself is computed only at the MASK rows, in bounded chunks
(:func:`sedd.model.scoring.step_on_scores`).

Conditioning: the fixed positions are clamped to their tokens before every step and at the end.
Any positions may be fixed: a prefix (prompting), a suffix, middle spans (infilling). On the
absorbing graph this samples the conditional exactly (a visible token is certainly clean, so the
joint ratios equal the conditional ones). On the uniform graph it is biased: the model reads a
clamped token as a noisy one that may have come from another clean token (with the exact score of
a two-token toy, P = 0.80 where the conditional is 0.90, not shrinking with more steps); the
sampler warns once per process.

Fewer network evaluations: ``cache=True`` reuses the output of a row that the last step left
unchanged (exact for a model without time conditioning, :mod:`sedd.sampling.cache`);
``predictor="first_hitting"`` unmasks one position per evaluation at the exact event times, or
as many as the model is sure of with ``threshold`` / ``entropy_bound``
(:mod:`sedd.sampling.first_hitting`). ``return_stats=True`` reports the forward rows per sequence.

The math: docs/math.md, "Reverse steps", "Conditioning", "Fewer network evaluations".
"""

from __future__ import annotations

import contextlib
import numbers
import warnings

import torch
from tqdm.auto import tqdm

from sedd import ops
from sedd.graph import Graph
from sedd.model.scoring import unwrap
from sedd.noise import Noise
from sedd.sampling import first_hitting  # noqa: F401  (registers "first_hitting")
from sedd.sampling.cache import NetworkCalls, SamplingStats, cache_mode
from sedd.sampling.graphs import GraphedForward
from sedd.sampling.predictors import DENOISERS, PREDICTORS, Predictor, get_predictor, register_predictor
from sedd.sampling.spans import check_fixed
from sedd.sampling.spec import SamplingSpec, target_for

__all__ = ["DENOISERS", "PREDICTORS", "Predictor", "SamplingStats", "check_eps", "conditioning", "register_predictor",
           "sample"]

_warned_uniform_conditioning = False


def conditioning(length: int, spans: dict[int, list[int]] | None = None, *, device=None):
    """Fixed tokens and mask [L] from {start position: token ids}; spans may not overlap.

    Example: ``conditioning(128, {0: prompt_ids, 100: suffix_ids})`` fixes a prefix and a span.
    """
    tokens = torch.zeros(length, dtype=torch.long, device=device)
    mask = torch.zeros(length, dtype=torch.bool, device=device)
    for start, ids in (spans or {}).items():
        ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
        if start < 0 or start + len(ids) > length:
            raise ValueError(f"span at position {start} with {len(ids)} tokens does not fit in length {length}")
        if mask[start : start + len(ids)].any():
            raise ValueError(f"span at position {start} overlaps another fixed span")
        tokens[start : start + len(ids)] = ids
        mask[start : start + len(ids)] = True
    return tokens, mask


@torch.no_grad()
def sample(
    model,
    graph: Graph,
    noise: Noise,
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
    """Draw ``batch_size`` sequences of ``length`` tokens from the reverse process.

    Args:
        model: ``SEDD`` (or any ``model(x_t, sigma) -> log_score``), in eval mode.
        graph, noise: the forward process and schedule the model was trained with.
        spec, options: how to sample: a :class:`~sedd.sampling.SamplingSpec` and/or its fields as
            keyword arguments (``predictor``, ``steps``, ``eps``, ``denoise``, ``denoiser``,
            ``masked_only``, ``top_p``, ``top_k``, ``cache``, ``tokens_per_step``, ``threshold``,
            ``entropy_bound``, ``cuda_graph``; the fields say
            what each does), checked against this graph and model before anything runs. ``steps``
            defaults to ``length``; a ``window`` shorter than ``length`` is for
            :func:`sedd.generation.sample_blockwise`; the autoregressive options are refused.
            With ``cache``, the model's ``time_conditioning: false`` makes the reuse exact.
        fixed_tokens, fixed_mask: [L] or [B, L]; positions where the mask is True are held at
            ``fixed_tokens`` throughout (prompt, suffix, infilling). See :func:`conditioning`.
            Exact for the absorbing graph; biased for the uniform graph (warns once).
        generator: a torch.Generator on ``device`` for reproducible samples.
        progress: show a progress bar over the steps.
        return_stats: also return a :class:`~sedd.sampling.cache.SamplingStats` (forward rows per
            sequence: ``stats.nfe``).

    Returns:
        [B, L] int64 tokens (absorbing: no MASK left when ``denoise``), and the stats with
        ``return_stats``.
    """
    net = unwrap(model)
    spec = SamplingSpec.build(spec, **options).validate(
        target_for("reverse", graph=graph, time_conditioning=getattr(net, "time_conditioning", None)))
    spec.check_one_window(length)
    step_class = spec.predictor_class
    own = {name: getattr(spec, name) for name in step_class.options if getattr(spec, name) is not None}
    step = get_predictor(spec.predictor, masked_only=spec.masked_only, **own)
    final = None
    if spec.denoise and not step.owns_grid:
        final = get_predictor(spec.denoiser, final=True, masked_only=spec.masked_only)
    steps = spec.steps or length
    # a predictor without truncation may leave top_p / top_k out of its update (see Predictor)
    trunc = {} if spec.top_p is None and spec.top_k is None else {"top_p": spec.top_p, "top_k": spec.top_k}
    # check_eps (the schedule at eps) reads a tensor on the host, which the sampler itself never
    # does after its inputs; the text API and the command lines call it before sampling.
    eps = spec.eps
    if device is None:
        param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    B = batch_size
    trained = getattr(model, "length", None)
    if isinstance(trained, int) and length > trained:
        warnings.warn(
            f"sampling {length} tokens at once from a model with training length {trained}: quality "
            "drops past it; sedd.generation.sample_blockwise (sedd.generate) samples longer sequences "
            "window by window", UserWarning, stacklevel=3)

    cuda_graph = spec.cuda_graph
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device; this sampler runs on {device}")
    calls = NetworkCalls(GraphedForward(model) if cuda_graph else model, B, cache_mode(spec.cache, model, device))
    project = _projector(fixed_tokens, fixed_mask, B, length, graph, device)
    x = project(graph.sample_limit((B, length), device=device, generator=generator))

    # Every tensor the steps see from here on is made here (the fixed tokens were checked above):
    # no value checks, so no device sync per step.
    weights = getattr(net, "inference_weights", None)
    with ops.value_checks(False), weights() if weights else contextlib.nullcontext(), \
            ops.sync_free() if cuda_graph else contextlib.nullcontext():
        if step.owns_grid:
            x = project(step.run(calls, x, graph=graph, noise=noise, eps=eps, generator=generator, project=project,
                                 progress=progress, **trunc))
        else:
            times = torch.linspace(1, eps, steps + 1, device=device, dtype=torch.float64)
            dt = (1 - eps) / steps
            for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
                x = project(step.update(calls, x, times[i].expand(B), dt, graph, noise, generator, **trunc))
            if final is not None:
                x = project(final.update(calls, x, times[-1].expand(B), dt, graph, noise, generator, **trunc))
    return (x, calls.stats) if return_stats else x


def check_eps(noise: Noise, eps: float) -> None:
    """ValueError unless ``eps`` is a usable final time for ``noise``: in (0, 1), with σ̄(ε) a
    normal float32 number. The steps read σ in float32, where a smaller σ̄(ε) rounds to 0 (or
    loses its precision), and the final step then fills every masked position as if from no noise
    at all (with token id 0)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    sigma = float(noise.total(torch.tensor([float(eps)], dtype=torch.float64))[0])
    if not sigma >= torch.finfo(torch.float32).tiny:
        raise ValueError(f"eps {eps} is too small for {noise!r}: sigma(eps) = {sigma:.3g} is below float32's smallest "
                         f"normal number {torch.finfo(torch.float32).tiny:.3g}, which the steps compute in")


def _warn_uniform_conditioning() -> None:
    global _warned_uniform_conditioning
    if not _warned_uniform_conditioning:
        _warned_uniform_conditioning = True
        warnings.warn(
            "conditioning on the uniform graph is not exact: the fixed tokens are clamped, but the model "
            "reads them as noisy tokens, so the samples are biased away from the true conditional "
            "(absorbing-graph models condition exactly)",
            UserWarning,
            stacklevel=3,
        )


def _projector(fixed_tokens, fixed_mask, B: int, L: int, graph: Graph, device):
    fixed = check_fixed(fixed_tokens, fixed_mask, B, L, graph.N, device)
    if fixed is None:
        return lambda x: x
    if not graph.absorbing:
        _warn_uniform_conditioning()
    tokens, mask = fixed
    return lambda x: torch.where(mask, tokens, x)
