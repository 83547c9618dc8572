"""Block-diffusion generation (:class:`sedd.model.BlockSEDD`): block after block, each block sampled
by a diffusion sampler given the clean blocks before it, whose keys and values are kept in a KV
cache; no window is ever re-run.

For block k of b tokens: :func:`sedd.sampling.sample` runs on a [B, b] batch with any predictor
("analytic", "euler", "first_hitting", any registered one), truncation and its output cache (exact,
``cache=True``, for a network that does not read σ), with the model's scores of that block, at the
sampler's σ, read against
the cache (:meth:`sedd.model.BlockSEDD.block_scores`); then the finished block is appended to the
cache in one pass over its b clean tokens (:meth:`~sedd.model.BlockSEDD.extend`). The spec's
``kv_cache=False`` re-runs the clean prefix at every network call instead (``forward(..., only_last_block=True)``),
at a cost that grows with the prefix: the same scores up to float rounding (a few 1e-7 in fp32,
none in fp64), so the same tokens from the same generator unless two candidates tie to rounding.

Per block this samples p_θ(block k | blocks < k) exactly as ``sample`` samples a SEDD model, so the
sequence follows the block-causal factorisation (docs/math.md, "Block diffusion").

Fixed tokens (prompts): a fixed position of a block is clamped as in ``sample`` (exact on the
absorbing graph: a visible token is clean), so a prompt may end anywhere in a block; leading blocks
fixed in every row go to the cache in one pass. A fixed token after a generated block is placed,
but a block sees only the blocks before it: it does not steer them (a warning, once per process).

Stop at EOS (the spec's ``stop_at_eos``, with the caller's ``eos_id``): a row whose block holds a
generated EOS stops there: its later blocks are not generated (no network call serves it again),
and every position after its first generated EOS, in that block and after, holds ``pad_id``
(default: ``eos_id``). The block the EOS is in is sampled whole (its tokens are drawn jointly) and
its tokens after the EOS are dropped. An EOS that was fixed (in the prompt) does not stop a row.

Length: any ``length``, in one call, with no window re-run; the last block is sampled whole and cut
(the first positions of a block are a marginal of its joint). A block reads itself and the clean
blocks of the last ``window − b`` tokens before it (the spec's ``window``, default the training
length L: what the last block of a training sequence reads). Up to L nothing is cut; past L each
block still reads L − b tokens of context at the relative positions it was trained on (rotary
positions are relative), and the cache keeps the keys and values computed when each block was
appended (a sliding window over a cache, not a re-run of the window: each clean block's deeper
layers carry what it read in turn, as in training, where block k's clean stream reads blocks ≤ k).
A ``window`` above L shows a block relative distances it was never trained on (a warning).
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sedd.graph import Graph
from sedd.model.scoring import unwrap
from sedd.noise import Noise
from sedd.sampling.cache import SamplingStats
from sedd.sampling.sampler import sample
from sedd.sampling.spans import check_fixed
from sedd.sampling.spec import SamplingSpec, target_for

__all__ = ["BlockSamplingStats", "sample_block_diffusion"]

_warned_later_fixed = False


@dataclass
class BlockSamplingStats(SamplingStats):
    """:class:`~sedd.sampling.SamplingStats` of a block-diffusion call: ``nfe`` counts, per
    sequence, the network calls that denoised its blocks and the passes that appended its finished
    blocks to the cache (a call over a sub-batch counts for its rows only).

    Attributes (besides those of ``SamplingStats``):
        blocks: [B] int64, blocks each sequence had denoised (blocks fixed in every row are not).
        lengths: [B] int64, tokens of each sequence up to and including its first generated EOS
            (the requested length without one).
    """

    blocks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    lengths: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def as_dict(self) -> dict:
        out = super().as_dict()
        out.update(blocks_mean=float(self.blocks.double().mean()) if self.blocks.numel() else 0.0,
                   length_mean=float(self.lengths.double().mean()) if self.lengths.numel() else 0.0)
        return out


class _BlockScores:
    """The block at ``start`` as :func:`sedd.sampling.sample` sees a model: ``forward(x_t [r, b],
    sigma [r], raw=, head=, rows=)`` scores it given the clean blocks before it, read from the KV
    cache or (``prefix``: their tokens [B, start]) recomputed. ``time_conditioning`` is the
    network's: without it σ enters through the score shift only, and the sampler's own output
    cache is exact."""

    takes_rows = True  # sedd.sampling.cache.NetworkCalls passes the rows of a sub-batch

    def __init__(self, model, cache=None, prefix: torch.Tensor | None = None, context: int | None = None):
        self.model, self.cache, self.prefix, self.context = model, cache, prefix, context
        self.length = unwrap(model).block_size
        self.time_conditioning = getattr(unwrap(model), "time_conditioning", False)

    def score_shift(self, sigma: torch.Tensor) -> torch.Tensor:
        return unwrap(self.model).score_shift(sigma)

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, *, raw: bool = False, head=None,
                rows: torch.Tensor | None = None):
        window = {} if self.context is None else {"context": self.context}
        if self.cache is not None:
            z = unwrap(self.model).block_scores(x_t, self.cache, sigma=sigma, rows=rows, head=head, **window)
        else:
            prefix = self.prefix if rows is None else self.prefix[rows.to(self.prefix.device)]
            # the block's tokens stand in for x0's last block, which the forward does not read; the
            # forward reads the last block's σ of the [r, K] it takes
            blocks = prefix.shape[1] // self.length + 1
            z = self.model(torch.cat([prefix, x_t], 1), torch.cat([prefix, prefix.new_zeros(x_t.shape)], 1),
                           sigma[:, None].expand(-1, blocks), raw=True, head=head, only_last_block=True, **window)
        if raw or head is not None:
            return z
        out = z.float() + self.score_shift(sigma)[:, None, None]
        return out.scatter_(-1, x_t.long().unsqueeze(-1), 0.0)

    __call__ = forward


def _warn_later_fixed() -> None:
    global _warned_later_fixed
    if not _warned_later_fixed:
        _warned_later_fixed = True
        warnings.warn("a block model reads only the blocks before a block: fixed tokens in a block after a generated "
                      "one are placed but do not steer the blocks before it (a prompt, and fixed tokens within a "
                      "block, condition exactly)", UserWarning, stacklevel=3)


def _check(model, graph, batch_size, length, spec: SamplingSpec, eos_id, pad_id) -> int:
    """The errors :func:`sedd.sampling.sample` would raise at the first block, before any work; the
    clean tokens a block reads before it (the spec's window less one block)."""
    net = unwrap(model)
    if not isinstance(getattr(net, "block_size", None), int):  # BlockSEDD, or a model that reads its blocks so
        raise TypeError(f"sample_block_diffusion needs a block model (sedd.model.BlockSEDD), got {type(net).__name__}")
    if not graph.absorbing:
        raise ValueError(f"a block model samples the absorbing graph, got {graph}")
    for name, value in (("batch_size", batch_size), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    # without time conditioning σ enters through the score shift only: the output cache is exact
    spec.validate(target_for("block", graph=graph, time_conditioning=getattr(net, "time_conditioning", False),
                             min_window=net.block_size))
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                  or not 0 <= value < graph.N):
            raise ValueError(f"{name} must be a real token id in [0, {graph.N}), got {value!r}")
    if spec.stop_at_eos and eos_id is None:
        raise ValueError("stop_at_eos needs the EOS token's id: pass eos_id (the tokenizer's eos_id)")
    b = net.block_size
    window = net.length if spec.window is None else spec.window
    return (window - b) // b * b


@torch.no_grad()
def sample_block_diffusion(
    model,
    graph: Graph,
    noise: Noise,
    *,
    batch_size: int,
    length: int | None = None,
    spec: SamplingSpec | None = None,
    fixed_tokens: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    eos_id: int | None = None,
    pad_id: int | None = None,
    return_stats: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, BlockSamplingStats]:
    """Draw ``batch_size`` sequences of ``length`` tokens from a block model, block by block
    (module docstring).

    Args:
        model: a :class:`sedd.model.BlockSEDD` in eval mode.
        graph, noise: the forward process (absorbing) and schedule it was trained with.
        length: tokens per sequence (default: the model's training length).
        spec, options: how each block is sampled: a :class:`~sedd.sampling.SamplingSpec` and/or its
            fields, as for :func:`sedd.sampling.sample` within every block (``steps``: reverse steps
            per block, default the block size b, so one per token, plus the denoiser; ``cache=True``
            is exact); ``kv_cache``: keep the clean blocks' keys and values (default) or re-run
            them at every network call (the same tokens up to rounding ties; for a model sharded
            with FSDP2, whose weights the cached steps, outside ``forward``, would not see
            gathered); ``stop_at_eos`` (needs ``eos_id``); ``window`` (module docstring).
            Checked before any work.
        fixed_tokens, fixed_mask: [length] or [B, length]: positions held fixed (prompts).
        generator: a torch.Generator on ``device``, consumed block by block.
        eos_id: the EOS id ``stop_at_eos`` stops at (module docstring).
        pad_id: what the positions after a generated EOS hold (default: ``eos_id``).
        return_stats: also return a :class:`BlockSamplingStats`.
    Returns:
        [B, length] int64 tokens (and the stats).
    """
    net = unwrap(model)
    if device is None:
        param = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    length = getattr(net, "length", None) if length is None else length
    spec = SamplingSpec.build(spec, **options)
    context = _check(model, graph, batch_size, length, spec, eos_id, pad_id)
    if net.training:
        raise RuntimeError("sample_block_diffusion runs in eval mode only (no dropout): call model.eval() first")
    if spec.window is not None and spec.window > net.length and length > net.length:
        warnings.warn(f"window {spec.window} is longer than the block model's training length {net.length}: its "
                      "blocks read context at distances never trained", UserWarning, stacklevel=2)
    stop = eos_id if spec.stop_at_eos else None
    B, b = batch_size, net.block_size
    K = -(-length // b)  # blocks, the last one cut to the length
    if (K - 1) * b <= context:  # the window holds every block: nothing to cut (nor to ask of the model)
        context = None
    fixed = check_fixed(fixed_tokens, fixed_mask, B, length, graph.N, device)
    tokens = torch.zeros(B, K * b, dtype=torch.long, device=device)
    mask = torch.zeros(B, K * b, dtype=torch.bool, device=device)
    if fixed is not None:
        tokens[:, :length], mask[:, :length] = torch.where(fixed[1], fixed[0], 0), fixed[1]
    block_fixed = mask.view(B, K, b)
    has_free = (~block_fixed).any(-1)  # [B, K]
    if bool((block_fixed.any(-1) & ((has_free.long().cumsum(1) - has_free.long()) > 0)).any()):
        _warn_later_fixed()
    x = torch.where(mask, tokens, graph.mask_id)
    stopped_at = torch.full((B,), K * b, dtype=torch.long, device=device)  # first position after a stop
    counts = BlockSamplingStats(nfe=torch.zeros(B, dtype=torch.long), blocks=torch.zeros(B, dtype=torch.long),
                                lengths=torch.full((B,), length, dtype=torch.long))
    # what each block's sampler reads; the rest is this function's
    each = dataclasses.replace(spec, kv_cache=True, stop_at_eos=False, window=None)
    options = dict(spec=each, generator=generator, device=device, return_stats=True)

    active = torch.arange(B, device=device)  # rows still generating, in the order of the cache's rows
    kv = net.new_cache(B, K * b, device) if spec.kv_cache else None
    first = int(has_free.any(0).long().argmax()) if bool(has_free.any()) else K  # leading blocks fixed in every row
    if kv is not None and 0 < first < K:
        net.extend(x[:, : first * b], kv, context=context)
        _count(counts, active)
    for k in tqdm(range(first, K), desc="block diffusion", disable=not progress, leave=False, unit="block"):
        span = slice(k * b, (k + 1) * b)
        block = x[active, span]
        if bool(has_free[active, k].any()):
            scorer = _BlockScores(model, cache=kv, prefix=None if kv is not None else x[active, : k * b],
                                  context=context)
            block, stats = sample(scorer, graph, noise, batch_size=len(active), length=b, fixed_tokens=tokens[active, span],
                                  fixed_mask=mask[active, span], **options)
            _count(counts, active, stats)
            counts.blocks[active[has_free[active, k]].cpu()] += 1
            x[active, span] = block
        if stop is not None:
            position = torch.arange(k * b, (k + 1) * b, device=device)
            hit = (block == stop) & ~mask[active, span] & (position < length)
            stops = hit.any(1)
            if bool(stops.any()):
                stopped_at[active[stops]] = k * b + hit[stops].long().argmax(1) + 1
                going = (~stops).nonzero().squeeze(1)
                active, block = active[going], block[going]
                if kv is not None:
                    kv.keep(going)
        if kv is not None and k + 1 < K and active.numel():
            net.extend(block, kv, context=context)
            _count(counts, active)
        if not active.numel():
            break
    if stop is not None:
        after = torch.arange(K * b, device=device)[None, :] >= stopped_at[:, None]
        x = torch.where(after, stop if pad_id is None else pad_id, x)
        counts.lengths = stopped_at.clamp_max(length).cpu()
    return (x[:, :length], counts) if return_stats else x[:, :length]


def _count(counts: BlockSamplingStats, rows: torch.Tensor, stats: SamplingStats | None = None) -> None:
    """Add to ``counts`` the network calls of the sequences ``rows``: a block's sampler ``stats``,
    or (None) one pass over all of them (a cache append)."""
    rows = rows.cpu()
    if stats is None:
        stats = SamplingStats(nfe=torch.ones(rows.numel(), dtype=torch.long), forward_rows=rows.numel(),
                              forward_calls=1)
    counts.nfe[rows] += stats.nfe
    counts.forward_rows += stats.forward_rows
    counts.forward_calls += stats.forward_calls
    counts.reused_rows += stats.reused_rows
