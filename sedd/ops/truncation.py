"""The kept set of a truncated (top-p / top-k) reverse step, found without sorting the row.

A step's candidate weights increase with the score ŝ, so the kept set of
:data:`sedd.ops.steps.TRUNCATION` is a threshold, {y : ŝ_y ≥ thr}. Sorting every row to find it
(what :func:`sedd.ops.reference.truncation_keep` spells out) made a top-p step on the eager path
about 50× an untruncated one at [8, 128, 50258] on a CPU. Here:

* top-k: ``torch.topk`` (a selection, not a sort) gives the k-th largest score; if fewer than k
  candidates have positive weight, all of those are kept.
* top-p: the threshold is thr = max{v : M(v) ≥ p·T}, where M(v) is the weight of the candidates
  with ŝ ≥ v and T their total: the score at which the running sum of the weights, in decreasing
  order, first reaches p·T (the crossing token kept, with all its ties). One pass puts every
  score in one of ``BUCKETS`` buckets by its distance below the row's maximum (``SPAN`` nats in
  all) and sums the weights per bucket in fp64; the running sum over the buckets finds the bucket
  holding the crossing, and only that bucket's scores are sorted (tens per row at GPT-2 width), which
  places the crossing exactly. With top-k as well, top-p runs on the weights of the top-k set
  (from the ``topk`` values themselves when k ≤ ``TOPK_DIRECT``).

Ties: tokens of equal score are kept or cut together (at either rule's boundary, all are kept).
Exactness: the same set as the sorted running sum, up to the order of fp64 additions: the weights
are fp32 (e^{ŝ − max}, the precision of the reference's probabilities) summed in fp64, so the sets
can differ only where p·T lies within ~1e-15 relative of a running sum. Scores more than ``SPAN``
nats below their row's maximum share the last bucket, which is sorted like any other when the
crossing falls in it (weights under e^-40: top_p within ~1e-12 of 1), so the set stays exact; the
rare row whose bucket sums and sorted sum round apart at a boundary, and every row where a host
read is not allowed (:func:`sedd.ops.checks.host_sync_allowed`: the crossing bucket's size is
data-dependent), take the sorted route.
"""

from __future__ import annotations

import torch

from sedd.ops.checks import host_sync_allowed

BUCKETS = 4096
SPAN = 40.0  # nats below the row maximum that the buckets cover; lower scores share the last one
TOPK_DIRECT = 1024


def threshold(s: torch.Tensor, top_p, top_k, log_c2: torch.Tensor | None = None) -> torch.Tensor:
    """The ŝ threshold of the kept candidates per row, fp32 [n] (+∞ where none is kept).

    Args:
        s: [n, V] fp32 candidate scores, −∞ off the candidates (not modified).
        top_p: a float in (0, 1] or None.   top_k: an int ≥ 1 or None (not both None, and not
            top_p = 1 alone).
        log_c2: uniform analytic / denoise: fp64 [n] log c₂; the weights are then
            (e^{ŝ − log S} − c₂)_+ with S = Σ e^{ŝ} + 1 (the current token's s = 1). Otherwise e^{ŝ}.
    """
    n, V = s.shape
    by_p = top_p is not None and float(top_p) < 1.0
    w = _Weights(s, log_c2)
    if top_k is not None:
        k = min(int(top_k), V)
        vals = s.topk(k, dim=-1).values  # sorted, descending
        w_k = w(vals)
        n_pos = (w_k > 0).sum(-1)
        thr_k = vals.gather(1, (n_pos - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
        thr_k = torch.where(n_pos > 0, thr_k, torch.inf)
        if not by_p:
            return thr_k
        if k <= TOPK_DIRECT:
            return _top_p_of_top_k(s, vals, w_k, thr_k, w, float(top_p))
        s = torch.where(s >= thr_k.unsqueeze(1), s, -torch.inf)
    if not host_sync_allowed(s.device):
        return _sorted(s, w, float(top_p))
    return _top_p(s, w, float(top_p))


class _Weights:
    """The weights of a chunk's scores, a monotone function of ŝ with per-row constants: e^{ŝ − m}
    (m the row's maximum), or for uniform Tweedie (e^{ŝ − m}·e^{m − log S} − c₂)_+. fp32, in [0, 1]
    for the row's own scores."""

    def __init__(self, s, log_c2, rows=None):
        if rows is not None:  # a subset of another chunk's rows (s, log_c2 are then that chunk's)
            self.m, self.scale, self.c2 = s.m[rows], None if s.scale is None else s.scale[rows], \
                None if s.c2 is None else s.c2[rows]
            return
        m = s.amax(-1, keepdim=True)
        self.m = torch.where(torch.isfinite(m), m, 0.0)
        self.scale = self.c2 = None
        if log_c2 is not None:
            log_s = torch.logaddexp(self.m.double() + (s - self.m).exp().sum(-1, keepdim=True, dtype=torch.float64).log(),
                                    torch.zeros_like(self.m, dtype=torch.float64))
            self.scale = (self.m.double() - log_s).exp().float()
            self.c2 = log_c2.exp().float().unsqueeze(1)

    def __call__(self, v):
        e = (v - self.m).exp()
        if self.c2 is None:
            return e
        return e.mul_(self.scale).sub_(self.c2).clamp_min_(0)


def _top_p_of_top_k(s, vals, w_k, thr_k, w, p: float):
    """top-p within the top-k set from its ``topk`` values [n, k]: the running sum over them, plus
    the weight of the ties of the k-th score that ``topk`` left out."""
    wk = w_k.double()
    ties = (s == thr_k.unsqueeze(1)).sum(-1) - (vals == thr_k.unsqueeze(1)).sum(-1)
    total = wk.sum(-1) + ties * w(thr_k.unsqueeze(1)).squeeze(1).double()
    cum = wk.cumsum(-1)
    last = (cum < p * total.unsqueeze(1)).sum(-1)  # past the k values: the crossing is among the ties
    thr = vals.gather(1, last.clamp_max(vals.shape[1] - 1).unsqueeze(1)).squeeze(1)
    thr = torch.where(last < vals.shape[1], thr, thr_k)
    return torch.where(total > 0, thr, torch.inf)


def _top_p(s, w, p: float):
    """top-p by the bucket histogram (module docstring). Every pass over [n, V] is an in-place or
    `out=` elementwise op, an index_add or one compare; boolean-mask fills cost ~10× a multiply on
    a CPU and are avoided."""
    n, V = s.shape
    dev = s.device
    nb = min(BUCKETS, V)  # a narrow row needs no more buckets than scores (the histogram stays ≤ a row)
    weights = w(s)
    # each score's bucket code: row·BUCKETS + its distance below the row maximum in steps of
    # SPAN / BUCKETS (−∞ and anything further in the row's last bucket; truncation toward 0 is
    # floor for distances ≥ 0), in fp32 (exact: integers below 2^24) then int32
    scale = nb / SPAN
    row_base = torch.arange(n, device=dev, dtype=torch.float32).mul_(nb).unsqueeze(1)
    code = torch.add(w.m * scale, s, alpha=-scale).clamp_(max=nb - 1).add_(row_base).to(torch.int32)
    hist = torch.zeros(n * nb, dtype=torch.float64, device=dev)
    hist.index_add_(0, code.view(-1), weights.view(-1).double())
    cum = hist.view(n, nb).cumsum_(-1)
    total = cum[:, -1]
    target = p * total
    crossing = (cum < target.unsqueeze(1)).sum(-1).clamp_max_(nb - 1)
    above = torch.where(crossing > 0, cum.gather(1, (crossing - 1).clamp_min(0).unsqueeze(1)).squeeze(1), 0.0)
    # the crossing bucket's scores in (row, decreasing score) order; the running sum from `above`
    # reaches the target at the threshold
    flat = (code == (crossing.to(torch.int32) + row_base.squeeze(1).to(torch.int32)).unsqueeze(1)).view(-1)
    idx = flat.nonzero().squeeze(1)
    rows, cols = idx // V, idx % V
    wv = weights[rows, cols]
    positive = wv > 0
    rows, cols, wv = rows[positive], cols[positive], wv[positive].double()
    vals = s[rows, cols]
    # one sort on (row, distance below the row maximum): distances are < SPAN + the bucket, so the
    # row term orders rows and the distance the scores within them, exactly in fp64
    order = torch.argsort(rows.double() * (4 * SPAN) + (w.m.squeeze(1)[rows] - vals).double(), stable=True)
    rows, vals, wv = rows[order], vals[order], wv[order]
    run = wv.cumsum(0)
    counts = torch.bincount(rows, minlength=n)
    start = (torch.cumsum(counts, 0) - counts).clamp_max(max(run.numel() - 1, 0))
    before = torch.where(counts > 0, run[start] - wv[start], 0.0) if run.numel() else torch.zeros_like(total)
    run = run - before[rows] + above[rows]
    hit = run >= target[rows]
    first = torch.full((n,), run.numel(), dtype=torch.long, device=dev)
    first.scatter_reduce_(0, rows[hit], torch.arange(run.numel(), device=dev)[hit], "amin")
    found = first < run.numel()
    thr = vals[first.clamp_max(max(vals.numel() - 1, 0))] if vals.numel() else torch.zeros_like(total).float()
    thr = torch.where(total > 0, thr, torch.inf)
    # no crossing inside the bucket (the bucket sums and the sorted sum rounded apart by an ulp at
    # a boundary): those rows take the sort
    redo = (total > 0) & ~found
    if bool(redo.any()):
        idx = redo.nonzero().squeeze(1)
        thr[idx] = _sorted(s[idx], _Weights(w, None, rows=idx), p)
    return thr


def _sorted(s, w, p: float):
    """The reference route: each row sorted, the running sum of its weights in fp64."""
    vals = s.sort(-1, descending=True).values
    cum = w(vals).double().cumsum(-1)
    total = cum[:, -1]
    last = (cum < p * total.unsqueeze(1)).sum(-1).clamp_max(vals.shape[1] - 1)
    thr = vals.gather(1, last.unsqueeze(1)).squeeze(1)
    return torch.where(total > 0, thr, torch.inf)
