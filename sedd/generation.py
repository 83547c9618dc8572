"""Text in, text out: prompts, suffixes and infill templates as strings, samples as strings.

    from sedd import generate, load_pretrained

    p = load_pretrained("out")                       # a checkpoint directory, or a Hub id
    generate(p, ["Once upon a time", "def main("], length=64, steps=64)
    generate(p, templates=["The [MASK:5] sat on the [MASK:3]."])
    generate(p, num_samples=2, length=3 * p.model.length)      # longer than the training length

Every row of a batch has its own fixed positions ([B, L] masks), so prompts of different lengths,
suffixes and templates mix in one batch. Each fixed text is tokenized on its own and placed token
by token (:mod:`sedd.sampling.spans`); the sampler holds those tokens at their positions and
generates the rest (exact conditioning, docs/math.md, "Conditioning").

Longer than the training length (``length > window``, the window defaulting to the model's
``length``): generation runs block by block, semi-autoregressively as in MDLM. The first window
is sampled as usual; each later window of the same size keeps its first ``window - stride``
positions fixed to the tokens already generated (the context) and generates the next ``stride``.
A window sees only fixed text inside it: a suffix or an infill span further on does not steer
earlier windows.

An autoregressive checkpoint (``load_pretrained`` of a ``train/run.py --objective ar`` run) goes
through the same functions: each window is sampled ancestrally (:func:`sedd.sampling.sample_ancestral`,
one network evaluation per generated token; ``temperature`` applies, and ``steps``, ``predictor``
and the other options of the diffusion samplers are refused, by the spec's check). A prompt conditions it exactly; fixed text after generated text is placed but does not steer
what comes before it.

A block-diffusion checkpoint (``train/run.py --objective block``) is never windowed: its sampler
(:func:`sedd.sampling.sample_block_diffusion`) takes any length in one call, block by block over a
KV cache of the finished blocks, ``window`` capping the context a block reads; ``stop_at_eos=True``
ends each sample at its first generated EOS (its text and tokens end there, EOS included).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from sedd.objectives import objective_of
from sedd.sampling import SamplingSpec, SamplingStats, check_eps
from sedd.sampling.spans import Span, fixed_spans, spans_to_mask
from sedd.sampling.spec import FAMILIES, SamplingOptionError

__all__ = ["Sample", "continuation_layout", "sample_blockwise", "generate", "generate_samples", "plan_windows",
           "stopped_lengths"]


@dataclass
class Sample:
    """One generated sequence: its text, its token ids, the spans that were held fixed and its
    NFE (forward rows computed for it, over all windows)."""

    text: str
    tokens: list[int]
    fixed: list[Span] = field(default_factory=list)
    nfe: int | None = None


def plan_windows(spec: SamplingSpec, length: int, model_length: int | None, *,
                 windows: bool = True) -> tuple[int, int | None]:
    """(window, stride) of ``length`` tokens as ``spec`` asks (its ``window`` defaults to
    ``model_length``): stride None when one window holds them all (or, ``windows=False``, when the
    model's sampler takes any length itself: its family's ``windows``), else the new tokens per
    later window (default: half the window). :class:`~sedd.sampling.SamplingOptionError` for what
    cannot run."""
    window = spec.window if spec.window is not None else model_length if model_length is not None else length
    if length <= window or not windows:
        return window, None
    if window < 2:
        raise SamplingOptionError(("window",), lambda n: (
            f"{n('window')} {window} cannot generate {n('length')} {length} window by window: every later window holds "
            "context and at least one new token, so it needs at least 2 positions"))
    stride = spec.stride if spec.stride is not None else window // 2
    if stride >= window:
        raise SamplingOptionError(("stride",), lambda n: (
            f"{n('stride')} must be smaller than the window ({window}), got {stride}"))
    return window, stride


def stopped_lengths(tokens: torch.Tensor, eos_id: int, fixed_mask: torch.Tensor | None = None) -> list[int]:
    """Per row of ``tokens`` [B, L], the tokens up to and including its first generated EOS (an EOS
    at a position of ``fixed_mask`` [B, L] or [L], a prompt's, does not count), or L without one:
    where a ``stop_at_eos`` sample ends."""
    hit = tokens == eos_id
    if fixed_mask is not None:
        hit &= ~fixed_mask.to(hit.device).bool()
    first = hit.long().argmax(1)
    return torch.where(hit.any(1), first + 1, tokens.shape[1]).tolist()


def continuation_layout(context: int, new: int, window: int, stride: int, *,
                        windows: bool = True) -> tuple[int, int, int | None]:
    """(context tokens kept, windows, stride or None) of ``new`` tokens generated after
    ``context`` tokens by a model that sees ``window`` at once: one window holding the last
    ``window - new`` context tokens when ``new < window`` (lm_eval's own models cut the context so),
    else windows of ``stride`` new tokens after the first, which holds the last
    ``window - stride`` context tokens. ``windows=False`` (a sampler that takes any length, its
    family's ``windows``): one call holding the last ``window`` context tokens."""
    if not windows:
        return min(context, window), 1, None
    if new < window:
        return min(context, window - new), 1, None
    keep = min(context, window - stride)
    return keep, 1 + -(-(keep + new - window) // stride), stride


@torch.no_grad()
def sample_blockwise(
    model,
    graph,
    noise,
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
    eos_id: int | None = None,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, SamplingStats]:
    """Semi-autoregressive sampling of sequences longer than the model's window.

    The first ``window`` positions are sampled as by the model's sampler (its objective's,
    :mod:`sedd.objectives`: :func:`sedd.sampling.sample` for a diffusion model); then each window
    [end − window, end) with end advancing by ``stride`` keeps the tokens before the new
    ``stride`` positions fixed (the context) and samples the new ones. Positions fixed by
    ``fixed_mask`` stay fixed in every window that holds them.

    Args:
        model, graph, noise: the model, and for a diffusion model its forward process and schedule
            (an autoregressive model has none: None).
        length: total tokens per sequence; ``length <= window`` is one ordinary call of the sampler.
        spec, options: how to sample (:class:`~sedd.sampling.SamplingSpec` and/or its fields),
            checked against the model's objective before anything runs: an option its sampler does
            not read is a ValueError. ``window``: tokens the model sees at once (default: its
            training length); ``stride``: new tokens per later window, in [1, window) (default
            ``window // 2``); the other options apply within each window (``steps`` per window).
        fixed_tokens, fixed_mask: [length] or [B, length], as for :func:`sedd.sampling.sample`.
        eos_id: the tokenizer's EOS id, for ``stop_at_eos`` (read only then).
    A model whose sampler takes any length (block diffusion: its family's ``windows`` is False)
    is sampled in one call with the spec as given.
    Returns:
        [B, length] int64 tokens; with ``return_stats`` also the network calls of all windows
        (:class:`~sedd.sampling.SamplingStats`, ``nfe`` per sequence summed over the windows).
    """
    spec = SamplingSpec.build(spec, **options)
    objective = objective_of(model, graph=graph, noise=noise)
    spec.validate(objective)
    for name, value in (("batch_size", batch_size), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    windowed = FAMILIES[objective.sampler].windows
    window, stride = plan_windows(spec, length, getattr(model, "length", None), windows=windowed)
    if (fixed_tokens is None) != (fixed_mask is None):
        raise ValueError("fixed_tokens and fixed_mask must be given together")
    if device is None:
        param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    # what every window's sampler reads; a sampler that takes any length reads the window itself
    each = dataclasses.replace(spec, window=None, stride=None) if windowed else spec
    eos = {"eos_id": eos_id} if spec.stop_at_eos else {}  # only the samplers that read stop_at_eos take it

    def run(**kw):
        return objective.sample(model, spec=each, generator=generator, device=device, **eos, **kw)

    if stride is None:  # one window holds it all, or the sampler takes any length
        x, stats = run(batch_size=batch_size, length=length, fixed_tokens=fixed_tokens, fixed_mask=fixed_mask,
                       progress=progress)
        return (x, stats) if return_stats else x

    B = batch_size
    if fixed_tokens is None:
        tokens = torch.zeros(B, length, dtype=torch.long, device=device)
        mask = torch.zeros(B, length, dtype=torch.bool, device=device)
    else:
        tokens = torch.as_tensor(fixed_tokens, device=device).long()
        mask = torch.as_tensor(fixed_mask, device=device).bool()
        if tokens.shape != mask.shape or tokens.dim() not in (1, 2) or tokens.shape[-1] != length:
            raise ValueError(f"fixed_tokens and fixed_mask must both be [length] or [B, length] with length = {length}")
        if tokens.dim() == 2 and tokens.shape[0] not in (1, B):
            raise ValueError(f"fixed_tokens has batch {tokens.shape[0]}, expected 1 or {B}")
        tokens, mask = tokens.expand(B, length).clone(), mask.expand(B, length).clone()

    ends = [window, *range(window + stride, length, stride), length]
    ends = sorted(set(ends))
    x = tokens.clone()
    stats = SamplingStats(nfe=torch.zeros(B, dtype=torch.long))
    done = 0
    for end in tqdm(ends, desc="blocks", disable=not progress, leave=False):
        start = max(end - window, 0)
        new = slice(done, end)
        if bool(mask[:, new].all()):  # every new position is fixed text: nothing to sample
            done = end
            continue
        win_mask = mask[:, start:end].clone()
        win_mask[:, : done - start] = True  # the context: tokens already generated or fixed
        y, window_stats = run(batch_size=B, length=end - start, fixed_tokens=x[:, start:end], fixed_mask=win_mask,
                              progress=False)
        stats.add(window_stats)
        x[:, new] = y[:, done - start :]
        done = end
    return (x, stats) if return_stats else x


# ----------------------------------------------------------------------------------------------
# Text in, text out
# ----------------------------------------------------------------------------------------------


def _as_rows(name: str, value) -> list | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(v is None or isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string or a sequence of strings (None for no {name[:-1]}), "
                        f"got {type(value).__name__}")
    return list(value)


def _resolve(model, tokenizer, device):
    """(model, graph, noise, tokenizer) from a Pretrained, a checkpoint name or a model."""
    from sedd.pretrained import Pretrained, load_pretrained

    if isinstance(model, (str, os.PathLike)):
        model = load_pretrained(model, tokenizer=tokenizer, device="auto" if device is None else device)
        tokenizer = None
    if isinstance(tokenizer, str):
        from sedd.data import get_tokenizer

        tokenizer = get_tokenizer(tokenizer)
    if isinstance(model, Pretrained):
        tok = model.tokenizer
        net, graph, noise = model.model, model.graph, model.noise
    elif isinstance(model, torch.nn.Module) and isinstance(getattr(model, "config", None), dict):
        if tokenizer is None:
            raise ValueError("a bare model needs tokenizer=... (or pass load_pretrained(...) instead)")
        tok, net = None, model
        objective = objective_of(model)
        graph, noise = objective.graph, objective.noise
    else:
        raise TypeError("model must be a Pretrained (sedd.load_pretrained), a checkpoint directory or Hub id, "
                        f"or a SEDD (or ARModel) model, got {type(model).__name__}")
    if tokenizer is not None:
        from sedd.pretrained import check_tokenizer_fits, check_tokenizer_matches

        check_tokenizer_fits(tokenizer, net.config)
        if tok is not None:  # a loaded checkpoint's own tokenizer is what the override must match
            check_tokenizer_matches(tokenizer, net.config, own=tok, own_source=model.tokenizer_source)
        tok = tokenizer
    return net, graph, noise, tok


def generate_samples(
    model,
    prompts: str | Sequence[str | None] | None = None,
    *,
    suffixes: str | Sequence[str | None] | None = None,
    templates: str | Sequence[str | None] | None = None,
    infills: Sequence[Sequence[tuple[int, str]] | None] | None = None,
    num_samples: int = 1,
    length: int | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    spec: SamplingSpec | None = None,
    **options: Any,
) -> list[Sample]:
    """Like :func:`generate`, returning :class:`Sample` objects (text, token ids, fixed spans,
    NFE); ``infills`` adds per-row lists of (position, text) spans (see :func:`fixed_spans`)."""
    spec = SamplingSpec.build(spec, **options)
    net, graph, noise, tok = _resolve(model, tokenizer, device)
    objective = objective_of(net, graph=graph, noise=noise)
    spec.validate(objective)
    lists = {name: _as_rows(name, value) for name, value in
             (("prompts", prompts), ("suffixes", suffixes), ("templates", templates))}
    if infills is not None:
        lists["infills"] = [None if spans is None else list(spans) for spans in infills]
    given = {name: rows for name, rows in lists.items() if rows is not None}
    sizes = {len(rows) for rows in given.values()}
    if len(sizes) > 1:
        raise ValueError("prompts, suffixes, templates and infills must have the same number of rows, got "
                         + ", ".join(f"{name}: {len(rows)}" for name, rows in given.items()))
    rows = sizes.pop() if sizes else 1
    if rows == 0:
        raise ValueError("no prompts were given (an empty list); pass None for unconditional samples")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    # None is the default; 0 is not, and would silently have meant it
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise ValueError(f"length must be a positive integer, got {length!r}")
    model_length = getattr(net, "length", None)
    # a windowing sampler's default sample is one window; a sampler that takes any length in one call
    # (block diffusion, where window only bounds the context a block reads) samples the model's length
    windowed = FAMILIES[objective.sampler].windows and spec.window is not None
    length = length if length is not None else spec.window if windowed else model_length
    if length is None:
        raise ValueError("length is needed for a model without a training length")
    if noise is not None:
        check_eps(noise, spec.eps)

    def pick(name, i):
        rows_ = lists.get(name)
        return None if rows_ is None else rows_[i]

    spans = []
    for i in range(rows):
        try:
            row = fixed_spans(tok, length, prefix=pick("prompts", i), suffix=pick("suffixes", i),
                              infill=pick("infills", i) or (), template=pick("templates", i))
        except ValueError as err:
            raise ValueError(f"row {i}: {err}" if rows > 1 else str(err)) from None
        spans += [row] * num_samples

    # Sampling runs where the model is (``device`` only says where a checkpoint name is loaded).
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device(device or "cpu")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    fixed_tokens = fixed_mask = None
    if any(spans):
        fixed_tokens, fixed_mask = spans_to_mask(spans, length, device=device)
    was_training = net.training
    net.eval()  # no dropout while sampling, whatever mode the caller left the model in
    try:
        x, stats = sample_blockwise(net, graph, noise, batch_size=len(spans), length=length, spec=spec,
                                    fixed_tokens=fixed_tokens, fixed_mask=fixed_mask, generator=generator,
                                    device=device, progress=progress, return_stats=True, eos_id=tok.eos_id)
    finally:
        net.train(was_training)
    ids = x.cpu().tolist()
    if spec.stop_at_eos:  # each sample ends at its first generated EOS
        ids = [row[:n] for row, n in zip(ids, stopped_lengths(x, tok.eos_id, fixed_mask))]
    return [Sample(tok.decode(row), row, list(fixed), int(n)) for row, fixed, n in zip(ids, spans, stats.nfe)]


def generate(
    model,
    prompts: str | Sequence[str | None] | None = None,
    *,
    suffixes: str | Sequence[str | None] | None = None,
    templates: str | Sequence[str | None] | None = None,
    num_samples: int = 1,
    length: int | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> list[str]:
    """Generate text: continuations of prompts, text before suffixes, filled templates.

    Args:
        model: what :func:`sedd.load_pretrained` returns, a checkpoint directory or Hub id
            (loaded with it), or a SEDD (or ARModel) model together with ``tokenizer``.
        prompts: a string or one per row (None: no prompt in that row); row i starts with
            prompts[i]. Rows may have prompts of any lengths.
        suffixes: a string or one per row; the row ends with it.
        templates: a string or one per row: literal text with ``[MASK:n]`` holes of n tokens,
            laid out from position 0 (positions after it are generated too).
        num_samples: samples per row (per prompt), or the number of unconditional samples.
        length: tokens per sample, fixed text included (default: the window, the model's training
            length). Longer than the window: block by block (module docstring).
        tokenizer: a tokenizer or :func:`sedd.data.get_tokenizer` spec (default: the checkpoint's).
        seed: for reproducible samples (or pass ``generator=``).
        device: for a checkpoint name: where to load it ("auto" by default).
        kwargs: ``infills`` and ``generator`` (see :func:`generate_samples`), and how to sample:
            ``spec=`` (a :class:`~sedd.sampling.SamplingSpec`) and/or its fields: ``steps``
            (reverse steps per window, default the window length, as in the paper: fewer is
            faster at some cost in quality), ``predictor`` ("analytic", "euler", "first_hitting":
            one evaluation per unmasked token, ``tokens_per_step`` per evaluation, or as many as the
            model is sure of with ``threshold`` / ``entropy_bound``), ``window``,
            ``stride``, ``top_p``, ``top_k``, ``cache`` (True: reuse the outputs of unchanged rows,
            exact for a model without time conditioning), ``eps``; for an autoregressive model
            ``temperature`` and ``kv_cache``; for a block-diffusion model ``kv_cache`` and
            ``stop_at_eos`` (each sample ends at its first generated EOS, included). An option
            the model's sampler does not read is a ValueError.
    Returns:
        ``len(rows) * num_samples`` strings, each a whole sequence (its fixed text included),
        row by row: the samples of row 0 first.
    Raises:
        ValueError: rows of different counts, text that does not fit ``length``, bad sizes or
            sampler options.
        TypeError: prompts that are not strings, a model of another kind.
    """
    samples = generate_samples(
        model, prompts, suffixes=suffixes, templates=templates, num_samples=num_samples, length=length,
        tokenizer=tokenizer, seed=seed, device=device, progress=progress, **kwargs,
    )
    return [s.text for s in samples]
