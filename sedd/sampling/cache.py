"""What a sampler knows about its network calls: how many rows each sequence's forward passes
computed (its NFE), and, with ``sample(..., cache=...)``, which outputs it may reuse.

The sampler hands its predictors the model wrapped in a :class:`NetworkCalls`. Every call through
it is counted per sequence. With a cache, :func:`sedd.model.scoring.step_on_scores` hands the step
over to :meth:`NetworkCalls.cached_step`: a row whose tokens are those its stored output was
computed at skips the network, the rows that changed run as one sub-batch, and the step runs through
the uncached path's own loop (:func:`sedd.model.scoring.step_on_rows`) with the stored scores in
place of the head's: the same chunks in the same order, so it consumes the generator identically.

Exactness. For a network that does not read σ (``model.time_conditioning: false``) the raw output z
is a function of the tokens alone and only the shift (recomputed from the new σ) changes: the
reused z is the z the network would return, bit for bit, provided the network computes a row the
same whatever rows share its batch. The model makes its conditioning one row for the whole batch
and the masked-rows head pads small chunks (:data:`sedd.model.scoring.HEAD_MIN_ROWS`); what is left
is the BLAS: CPU builds (MKL, ≥ 12 rows) compute a row of a GEMM independently of the others; a GPU
library may pick another kernel for another row count (the device check measures it), and then a
token may differ where two candidates are within rounding of each other. For a σ-conditioned
network, ``cache="approximate"`` reuses z computed at an earlier σ: an approximation, measured in
``benchmarks/results/nfe-*``.

Memory: the masked-rows cache holds the head output at every MASK row of the batch (at most
B·L·V values in the compute dtype); the full-head cache one [B, L, V] output.

The math: docs/math.md, "Fewer network evaluations".
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from sedd import ops
from sedd.model.scoring import head_at_rows, model_scores, row_chunks, step_on_rows, unwrap, uses_masked_rows
from sedd.sampling.spec import exact_cache_error

__all__ = ["NetworkCalls", "SamplingStats", "cache_mode", "on_rows"]

_warned_approximate = False


@dataclass
class SamplingStats:
    """The network calls of one ``sample`` call (or of the windows of a blockwise one).

    Attributes:
        nfe: [B] int64 (CPU): forward rows computed for each sequence, its number of function
            evaluations. A row served from the cache is not counted.
        forward_rows: rows over all network calls (their batch sizes summed).
        forward_calls: network calls.
        reused_rows: rows whose stored output a step used instead of a forward.
    """

    nfe: torch.Tensor
    forward_rows: int = 0
    forward_calls: int = 0
    reused_rows: int = 0

    @property
    def mean_nfe(self) -> float:
        return float(self.nfe.double().mean()) if self.nfe.numel() else 0.0

    def add(self, other: "SamplingStats") -> None:
        """Add the calls of ``other`` (the same sequences: another window)."""
        self.nfe += other.nfe
        self.forward_rows += other.forward_rows
        self.forward_calls += other.forward_calls
        self.reused_rows += other.reused_rows

    def as_dict(self) -> dict:
        return {"nfe_mean": self.mean_nfe, "nfe_min": int(self.nfe.min()) if self.nfe.numel() else 0,
                "nfe_max": int(self.nfe.max()) if self.nfe.numel() else 0, "forward_rows": self.forward_rows,
                "forward_calls": self.forward_calls, "reused_rows": self.reused_rows}


def cache_mode(cache, model, device: torch.device) -> str | None:
    """The cache a ``sample`` call runs with for the spec's ``cache`` (False, True or
    "approximate"): None, "exact" or "approximate". Raises ValueError for ``cache=True`` on a model
    that does not say it ignores σ; warns once per process for "approximate" on such a model. Under
    :func:`sedd.ops.sync_free` (and CUDA graph capture) there is no cache: finding the rows that
    changed reads a count on the host."""
    global _warned_approximate
    if cache is False:
        return None
    time_free = getattr(unwrap(model), "time_conditioning", True) is False
    if cache is True and not time_free:
        raise exact_cache_error()
    if not ops.host_sync_allowed(device):
        return None
    if time_free:
        return "exact"
    if not _warned_approximate:
        _warned_approximate = True
        warnings.warn(
            "cache='approximate': the model reads sigma, so an output reused at a later step was computed "
            "at an earlier sigma; the samples are approximate (exact only for model.time_conditioning: false)",
            UserWarning, stacklevel=3)
    return "approximate"


@contextlib.contextmanager
def on_rows(model, rows: torch.Tensor):
    """Attribute the network calls inside the block to the batch rows ``rows`` (a sub-batch), when
    ``model`` is a :class:`NetworkCalls`."""
    if not isinstance(model, NetworkCalls):
        yield
        return
    previous, model._rows = model._rows, rows.cpu()
    try:
        yield
    finally:
        model._rows = previous


class NetworkCalls:
    """The model as the predictors of one ``sample`` call see it: calls are counted in
    :attr:`stats`; with ``mode`` ("exact" | "approximate") :meth:`cached_step` serves the steps.

    ``module`` is the model (so :func:`sedd.model.scoring.unwrap` finds it); other attributes are
    the model's. A model whose ``takes_rows`` is True gets ``rows=`` (the batch rows, a CPU int64
    tensor) with every call on a sub-batch (:func:`on_rows`)."""

    def __init__(self, model, batch: int, mode: str | None = None):
        self.module = model
        self.mode = mode
        self.stats = SamplingStats(nfe=torch.zeros(batch, dtype=torch.long))
        self._rows: torch.Tensor | None = None  # the batch rows of the sub-batch being run
        # read by step_on_scores: None runs the ordinary path
        self.cached_step = self._cached_step if mode else None
        self._x_at: torch.Tensor | None = None  # [B, L] tokens each row's stored output was computed at
        self._valid: torch.Tensor | None = None  # [B] bool: a stored output exists
        self._store: torch.Tensor | None = None  # masked rows: [slots, V_pad]; full head: [B, L, V]
        self._slot: torch.Tensor | None = None  # masked rows: [B·L] row of _store, −1 for none
        self._full = False

    def __getattr__(self, name):
        if name == "module":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def __call__(self, x_t, sigma, **kwargs):
        rows = x_t.shape[0]
        self.stats.forward_calls += 1
        self.stats.forward_rows += rows
        if self._rows is not None:
            self.stats.nfe[self._rows] += 1
        elif rows == self.stats.nfe.shape[0]:
            self.stats.nfe += 1
        if self._rows is not None and getattr(self.module, "takes_rows", False):
            # a model with per-row state (the block sampler's KV cache) is told which rows a
            # sub-batch holds
            kwargs["rows"] = self._rows
        return self.module(x_t, sigma, **kwargs)

    # -- the cache ------------------------------------------------------------------------------

    def _reset(self, x: torch.Tensor, full: bool) -> None:
        self._x_at = torch.empty_like(x)
        self._valid = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self._store, self._slot, self._full = None, None, full

    def _stale_rows(self, x: torch.Tensor, full: bool) -> torch.Tensor:
        """[B] bool: rows whose stored output is missing or was computed at other tokens."""
        if self._x_at is None or self._x_at.shape != x.shape or self._full != full:
            self._reset(x, full)
        return ~self._valid | (x != self._x_at).any(1)

    def _mark(self, x: torch.Tensor, rows: torch.Tensor) -> None:
        self._x_at[rows] = x[rows]
        self._valid[rows] = True

    def _cached_step(self, x: torch.Tensor, sigma: torch.Tensor, graph, step, *, masked_only: bool = True):
        if not uses_masked_rows(self.module, x, graph, masked_only):
            return self._full_step(x, sigma, step)
        return self._masked_rows_step(x, sigma, graph, step)

    def _full_step(self, x, sigma, step):
        stale = self._stale_rows(x, full=True)
        rows = stale.nonzero().squeeze(1)
        if rows.numel():
            with on_rows(self, rows):
                z, _ = model_scores(self, x[rows], sigma[rows])
            if self._store is None:
                self._store = z.new_empty(x.shape + z.shape[2:])
            self._store[rows] = z
            self._mark(x, rows)
        self.stats.reused_rows += x.shape[0] - rows.numel()
        net = unwrap(self.module)
        shift = net.score_shift(sigma) if hasattr(net, "score_shift") else None
        return step(self._store, x, shift, slice(None))

    def _masked_rows_step(self, x, sigma, graph, step):
        B, L = x.shape
        flat = x.reshape(-1)
        masked = (flat == graph.mask_id).nonzero().squeeze(1)
        if masked.numel() == 0:
            return x
        stale = self._stale_rows(x, full=False)
        if self._slot is None or bool((self._slot[masked] < 0).any()):
            # a MASK where none was stored (the first step, or a predictor that masks again):
            # one slot per MASK position from here on; the sampler's MASKs only ever disappear
            self._slot = torch.full((B * L,), -1, dtype=torch.long, device=x.device)
            self._slot[masked] = torch.arange(masked.numel(), device=x.device)
            self._store = None
            self._valid.zero_()
            stale = torch.ones_like(stale)
        has_mask = (x == graph.mask_id).any(1)
        rows = (stale & has_mask).nonzero().squeeze(1)
        if rows.numel():
            self._compute_masked_rows(x, sigma, rows, graph.mask_id)
        self.stats.reused_rows += int(has_mask.sum()) - rows.numel()

        # the step the uncached path takes (sedd.model.scoring.step_on_rows), on the stored scores
        store, slot = self._store, self._slot
        shift = unwrap(self.module).score_shift(sigma)
        # the store holds a padded head's V_pad columns (the rows of the uncached path's chunks): its
        # scores are the first V
        return step_on_rows(x, masked, shift, step, lambda idx: store[slot[idx]][:, None, : graph.dim],
                            store.shape[1], store.element_size())

    def _compute_masked_rows(self, x, sigma, rows, mask_id) -> None:
        """Run the network on the batch rows ``rows`` and store the head output at their MASKs."""
        L = x.shape[1]
        sub = x[rows]
        local = (sub.reshape(-1) == mask_id).nonzero().squeeze(1)  # MASK positions in the sub-batch
        slots = self._slot[rows[torch.div(local, L, rounding_mode="floor")] * L + local % L]

        def head(hidden, weight, bias):
            if self._store is None:
                self._store = torch.empty(int(self._slot.max()) + 1, weight.shape[0], dtype=hidden.dtype,
                                          device=hidden.device)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            for part in row_chunks(local.numel(), weight.shape[0], hidden.element_size()):
                self._store[slots[part]] = head_at_rows(hidden[local[part]], weight, bias)

        with on_rows(self, rows):
            self(sub, sigma[rows], head=head)
        self._mark(x, rows)
