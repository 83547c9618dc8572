"""The sort-free kept set of a truncated step (``sedd.ops.truncation.threshold``) against a sorted
reference: random rows, heavy ties, extreme and infinite log-scores, both weight families, top-p,
top-k and both, narrow rows (fewer buckets than scores) and wide ones (several scores per bucket).

The oracle is ``reference.truncation_keep`` on the step's probabilities computed in fp64 from the
log-scores (so scores beyond fp32's exp range are fine); the kept set under test is {ŝ ≥ thr}.
"""

import math

import pytest
import torch

from sedd import ops
from sedd.ops import reference, truncation


def _probs(s: torch.Tensor, log_c2: torch.Tensor | None) -> torch.Tensor:
    """The candidates' normalised weights in fp64 (0 off the candidates, where s = −∞)."""
    s64 = s.double()
    m = s64.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = (s64 - m).exp()
    if log_c2 is not None:
        log_s = torch.logaddexp(m + e.sum(-1, keepdim=True).log(), torch.zeros_like(m))
        e = ((s64 - log_s).exp() - log_c2.exp().unsqueeze(1)).clamp_min(0)
    return e / e.sum(-1, keepdim=True).clamp_min(1e-300)


def _check(s, top_p, top_k, log_c2=None):
    thr = truncation.threshold(s, top_p, top_k, log_c2)
    probs = _probs(s, log_c2)
    # a column that is never a candidate stands in for the current token (never kept)
    x = torch.full((s.shape[0],), s.shape[1])
    padded = torch.cat([probs, torch.zeros(s.shape[0], 1, dtype=probs.dtype)], 1)
    want = reference.truncation_keep(padded, x, top_p, top_k)[:, :-1]
    got = (s >= thr.unsqueeze(1)) & (probs > 0)
    bad = (got != want).any(-1).nonzero().squeeze(1).tolist()
    assert not bad, f"rows {bad[:5]}: kept {got[bad[0]].sum()} vs {want[bad[0]].sum()} (top_p={top_p}, top_k={top_k})"
    # nothing outside the candidates' positive weights is ever kept by a finite threshold
    assert torch.equal(got, (s >= thr.unsqueeze(1)) & (probs > 0))
    return thr


def _rows(kind: str, n: int, V: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        s = torch.randn(n, V, generator=g) * 2
    elif kind == "peaked":  # a few tokens carry most of the weight, as in a trained model
        s = torch.randn(n, V, generator=g) * 4
        s[:, :3] += 8
    elif kind == "ties":  # scores from a handful of values: every boundary is a tie
        s = torch.randint(-3, 3, (n, V), generator=g).float() * 0.75
    elif kind == "extreme":  # ±88.7 (fp32's exp range), a far outlier, −∞ (not a candidate)
        s = torch.randn(n, V, generator=g) - 88.7
        s[:, ::7] = 88.7 + torch.rand(n, len(range(0, V, 7)), generator=g)
        s[:, 1::11] = -1e30
        s[:, 2::13] = -math.inf
        s[0] = -math.inf  # a row without a candidate
        s[1, :] = -math.inf
        s[1, 5] = 3.0  # a row with one
    else:
        raise ValueError(kind)
    return s


TRUNCS = [dict(top_p=0.9), dict(top_p=0.3), dict(top_k=1), dict(top_k=7), dict(top_p=0.8, top_k=9),
          dict(top_p=0.99, top_k=2000)]


@pytest.mark.parametrize("rows", ["random", "peaked", "ties", "extreme"])
@pytest.mark.parametrize("V", [50, 5000])
@pytest.mark.parametrize("tweedie", [False, True])
def test_threshold_keeps_the_sorted_reference_set(rows, V, tweedie, one_thread):
    s = _rows(rows, 24, V, seed=V + len(rows))
    log_c2 = torch.full((24,), math.log(0.3 / V), dtype=torch.float64) if tweedie else None
    for trunc in TRUNCS:
        _check(s, trunc.get("top_p"), trunc.get("top_k"), log_c2)


def test_ties_at_the_threshold_are_all_kept(one_thread):
    """Ten scores tied at the top and ten below: top-k = 3 keeps all ten tied ones, and top-p
    crossing inside the tied group keeps the whole group."""
    s = torch.cat([torch.full((1, 10), 1.0), torch.full((1, 10), 0.0)], 1)
    for trunc in (dict(top_k=3), dict(top_p=0.2), dict(top_p=0.5, top_k=2)):
        thr = _check(s, trunc.get("top_p"), trunc.get("top_k"))
        assert int((s >= thr.unsqueeze(1)).sum()) == 10, trunc


def test_sync_free_rows_take_the_sort_and_agree(monkeypatch, one_thread):
    """Where a host read is not allowed (a CUDA graph, torch.compile, sync_free on a GPU), the
    crossing bucket's data-dependent size cannot be read: the sorted route runs, same answer."""
    s = _rows("random", 16, 3000, seed=3)
    fast = truncation.threshold(s, 0.9, None)
    calls = []
    real = truncation._sorted
    monkeypatch.setattr(truncation, "host_sync_allowed", lambda device: False)
    monkeypatch.setattr(truncation, "_sorted", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(truncation.threshold(s, 0.9, None), fast)
    assert calls


def test_the_histogram_route_sorts_only_the_crossing_bucket(monkeypatch, one_thread):
    """At V = 50000 a row is never sorted whole: the only sort is over the crossing buckets'
    scores (tens per row), not the row."""
    s = _rows("random", 4, 50000, seed=4)
    sizes = []
    real_argsort = torch.argsort

    def spy(t, *args, **kwargs):
        sizes.append(t.numel())
        return real_argsort(t, *args, **kwargs)

    monkeypatch.setattr(torch, "argsort", spy)
    monkeypatch.setattr(truncation, "_sorted", lambda *a: pytest.fail("the full sort ran"))
    _check(s, 0.9, None)
    assert sizes and max(sizes) < 4 * 50000 / 20, sizes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_truncated_step_on_both_backends_uses_the_sort_free_threshold(monkeypatch, backend, one_thread):
    """The eager step and the Triton backend's pre-pass both find the kept set here."""
    from sedd.graph import Absorbing

    graph = Absorbing(299)
    z = torch.randn(2, 8, 300, generator=torch.Generator().manual_seed(2))
    x_t = torch.full((2, 8), graph.mask_id)
    calls = []
    real = truncation.threshold
    monkeypatch.setattr("sedd.ops.eager.threshold", lambda *a: calls.append(1) or real(*a))
    with ops.use_backend(backend):
        out = ops.analytic_step(z, x_t, torch.full((2,), 0.5), graph, torch.Generator().manual_seed(0), top_p=0.5)
    assert calls and out.shape == (2, 8) and (out < graph.N).all()
