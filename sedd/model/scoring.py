"""How a sampler or a loss reads scores from a model: the raw output plus its σ shift, so the fused
kernels fold the post-processing in, and the module under training/compile wrappers.

On the absorbing graph a reverse step moves only the positions that are MASK, so
:func:`step_on_scores` runs the model's output layer only at those rows (for a model that takes a
``head``, like :class:`sedd.model.SEDD`), in chunks of at most :data:`HEAD_CHUNK_BYTES` of scores:
no [B, L, V] tensor is allocated.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch

from sedd import ops

HEAD_CHUNK_BYTES = 256 * 2**20  # bound on one chunk of scores in the masked-rows steps
# BLAS libraries send GEMMs of very few rows to other kernels that round differently (MKL: fewer
# than 12 rows, except 4 and 8), so a row's scores would depend on how many rows share its chunk.
# Padding a small chunk keeps them independent of it: the sampler's cache reuses a row's scores
# computed in another chunk and must draw the same tokens.
HEAD_MIN_ROWS = 16


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def model_scores(model, x_t: torch.Tensor, sigma: torch.Tensor, **model_kwargs):
    """(log_score, shift) for the ``sedd.ops`` calls.

    A model with ``score_shift`` (like :class:`sedd.model.SEDD`) returns its raw output and the
    per-row shift so the kernels fold the post-processing in; any other callable
    ``model(x_t, sigma) -> log_score`` is used as is, with shift None.
    """
    net = unwrap(model)
    if hasattr(net, "score_shift"):
        return model(x_t, sigma, raw=True, **model_kwargs), net.score_shift(sigma)
    return model(x_t, sigma, **model_kwargs), None


def accepts_head(net) -> bool:
    """Whether the (unwrapped) model takes ``head=`` in its forward, as :class:`sedd.model.SEDD` does."""
    return hasattr(net, "score_shift") and "head" in inspect.signature(net.forward).parameters


def head_chunk_rows(width: int, element_size: int) -> int:
    """Rows per chunk of the masked-rows head: at most :data:`HEAD_CHUNK_BYTES` of scores."""
    return max(1, HEAD_CHUNK_BYTES // (width * element_size))


def row_chunks(count: int, width: int, element_size: int) -> Iterator[slice]:
    """The chunks, in order, in which every masked-rows path computes and reads ``count`` rows of
    scores of ``width`` values: the steps (:func:`step_on_rows`), the sampler's cache and first
    hitting. One iterator for all of them, so the cache hands a step the same chunks as the
    uncached path does and the step draws from the generator in the same order."""
    per_chunk = head_chunk_rows(width, element_size)
    for start in range(0, count, per_chunk):
        yield slice(start, min(start + per_chunk, count))


def head_at_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """The output linear at gathered rows, hidden [R, D] -> scores [R, V], R at most one chunk
    (:func:`row_chunks`); small R padded to :data:`HEAD_MIN_ROWS` (or to the chunk size, the
    memory bound, if smaller), so a row's result does not depend on R. ``weight`` [V_pad, D] and
    ``bias`` may carry an aligned head's padding rows: the scores are the first ``width`` columns
    (default all), a view of the aligned [R, V_pad] output."""
    rows = hidden.shape[0]
    least = min(HEAD_MIN_ROWS, head_chunk_rows(weight.shape[0], hidden.element_size()))
    if rows >= least:
        out = torch.nn.functional.linear(hidden, weight, bias)
    else:
        padded = hidden.new_zeros(least, hidden.shape[1])
        padded[:rows] = hidden
        out = torch.nn.functional.linear(padded, weight, bias)[:rows]
    return out if width is None or width == out.shape[1] else out[:, :width]


def step_on_rows(x: torch.Tensor, rows: torch.Tensor, shift: torch.Tensor, step, scores, width: int,
                 element_size: int) -> torch.Tensor:
    """The next tokens [B, L]: ``x`` with the flat positions ``rows`` [R] moved by
    ``step(z, x_t, shift, seq)`` chunk by chunk (:func:`row_chunks`), ``z = scores(idx)`` [r, 1, V]
    the scores at the chunk's positions ``idx``. The masked-rows step of the sampler, with or
    without its cache: the two differ only in ``scores``."""
    B, L = x.shape
    flat = x.reshape(-1)
    out = flat.clone()
    for part in row_chunks(rows.numel(), width, element_size):
        idx = rows[part]
        seq = torch.div(idx, L, rounding_mode="floor")
        z = scores(idx)
        out[idx] = step(z, flat[idx, None], shift[seq], seq).reshape(-1)
        del z
    return out.reshape(B, L)


def uses_masked_rows(model, x: torch.Tensor, graph, masked_only: bool) -> bool:
    """Whether :func:`step_on_scores` takes the masked-rows head for this model and step."""
    return masked_only and graph.absorbing and accepts_head(unwrap(model)) and ops.host_sync_allowed(x.device)


def step_on_scores(model, x: torch.Tensor, sigma: torch.Tensor, graph, step, *, masked_only: bool = True):
    """The next tokens [B, L] from ``step(log_score, x_t, shift, rows)``, a ``sedd.ops`` step on
    the model's scores at ``x`` (σ ``sigma`` [B]); ``rows`` indexes the per-sequence scalars [B]
    of the rows handed over.

    Absorbing graph, ``masked_only`` and a model that takes a ``head``: the head runs only at the
    MASK positions (real tokens never move, so skipping them changes nothing), in row chunks
    handed to ``step`` as [rows, 1, V], inside the model's forward; a step with no MASK left runs
    no model. Otherwise the whole output [B, L, V] goes to ``step`` with ``rows`` = all of them.

    A model wrapper with a ``cached_step`` method (the sampler's cache, :mod:`sedd.sampling.cache`)
    takes the call over: the same steps on the same row chunks, the network run only where needed.
    """
    cached_step = getattr(model, "cached_step", None)
    if cached_step is not None:
        return cached_step(x, sigma, graph, step, masked_only=masked_only)
    if not uses_masked_rows(model, x, graph, masked_only):
        log_score, shift = model_scores(model, x, sigma)
        return step(log_score, x, shift, slice(None))
    masked = (x.reshape(-1) == graph.mask_id).nonzero().squeeze(1)  # one host sync per step: the row count
    if masked.numel() == 0:
        return x
    shift = unwrap(model).score_shift(sigma)

    def head(hidden, weight, bias):
        hidden = hidden.reshape(-1, hidden.shape[-1])
        return step_on_rows(x, masked, shift, step,
                            lambda idx: head_at_rows(hidden[idx], weight, bias, graph.dim)[:, None],
                            weight.shape[0], hidden.element_size())

    return model(x, sigma, head=head)
