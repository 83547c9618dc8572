"""Brute-force oracles and statistics shared by the tests (never used by the library)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from sedd.graph import Graph


def full_Q(graph: Graph) -> torch.Tensor:
    """The dense rate matrix Q[to, from] (columns sum to zero), float64. Tests only: V×V."""
    V = graph.dim
    if graph.absorbing:
        Q = -torch.eye(V, dtype=torch.float64)
        Q[graph.mask_id, :] += 1.0
        Q[graph.mask_id, graph.mask_id] = 0.0
    else:
        Q = torch.full((V, V), 1.0 / graph.N, dtype=torch.float64) - torch.eye(V, dtype=torch.float64)
    return Q


def expm(graph: Graph, sigma: float) -> torch.Tensor:
    return torch.linalg.matrix_exp(sigma * full_Q(graph))


def chi2_pvalue(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of integer draws against a categorical distribution (cells with p = 0
    must never be drawn; tiny cells are pooled so the χ² approximation holds)."""
    probs = probs.double().cpu().numpy()
    counts = np.bincount(draws.cpu().numpy().ravel(), minlength=len(probs)).astype(np.float64)
    n = counts.sum()
    zero = probs <= 0
    assert counts[zero].sum() == 0, f"drew a zero-probability outcome: {np.nonzero(counts * zero)[0]}"
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big & ~zero].sum()] if (~big & ~zero).any() else [])
    exp = list(expected[big]) + ([expected[~big & ~zero].sum()] if (~big & ~zero).any() else [])
    if len(obs) < 2:
        return 1.0
    exp = np.array(exp) * (np.sum(obs) / np.sum(exp))
    return float(stats.chisquare(obs, exp).pvalue)
