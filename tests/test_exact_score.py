"""The method itself, checked with the exact concrete score of a tiny joint distribution.

A "model" here returns the true log-ratios log p_t(x with x_i = y) − log p_t(x) of a distribution
p_data over all N^L sequences (L ≤ 3, N ≤ 4), found by enumerating the forward process. With it:

* the samplers (both graphs, both predictors) must reproduce p_data within sampling noise;
* clamping positions on the absorbing graph must sample the true conditional;
* the likelihood bound's time integral must equal −log p_data(x0) − KL(p_{1|0}(·|x0) ‖ p_1),
  so the bound (integral + the library's prior term) equals −log p_data(x0) plus the gap between
  the library's prior term and that exact KL, within Monte Carlo error.

p_data is strongly correlated across positions: a product distribution would not notice a
sampler that mixes up positions or a score that ignored the other positions.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sedd.graph import Absorbing, Uniform
from sedd.likelihood import prior_kl, sequence_bounds
from sedd.noise import Geometric, LogLinear
from sedd.sampling import sample
from tests.helpers import JointExactScore, chi2_pvalue
from tests.helpers import correlated_p_data as _p_data
from tests.helpers import sequence_codes as _codes


def _setup(graph_name: str, N: int):
    return (Absorbing(N), LogLinear()) if graph_name == "absorb" else (Uniform(N), Geometric())


CASES = [  # (graph, predictor, N, L, steps)
    ("absorb", "analytic", 3, 2, 16),
    ("absorb", "euler", 2, 3, 64),
    ("uniform", "analytic", 3, 2, 128),  # the geometric grid takes big Δσ steps early
    ("uniform", "euler", 2, 3, 128),
]


@pytest.mark.parametrize("graph_name,predictor,N,L,steps", CASES)
def test_sampler_with_the_exact_score_reproduces_p_data(graph_name, predictor, N, L, steps):
    graph, noise = _setup(graph_name, N)
    p = _p_data(N, L, seed=N * 10 + L)
    model = JointExactScore(p, graph)
    x = sample(model, graph, noise, batch_size=6000, length=L, steps=steps, predictor=predictor,
               generator=torch.Generator().manual_seed(1))
    assert int(x.max()) < N  # no MASK left
    assert chi2_pvalue(_codes(x, N), p.flatten()) > 1e-3


def test_the_check_has_power_against_the_product_of_marginals():
    """The same sampler fed the score of the product of p_data's marginals fails the χ² check,
    so the test above would notice a score or sampler that loses the dependence between positions."""
    N, L = 3, 2
    graph, noise = _setup("absorb", N)
    p = _p_data(N, L, seed=N * 10 + L)
    product = p.sum(1)[:, None] * p.sum(0)[None, :]
    x = sample(JointExactScore(product, graph), graph, noise, batch_size=6000, length=L, steps=16,
               generator=torch.Generator().manual_seed(1))
    assert chi2_pvalue(_codes(x, N), p.flatten()) < 1e-6


def test_first_hitting_is_exact_in_n_evaluations_where_analytic_is_biased():
    """The first-hitting sampler with the exact score (σ enters it through one factor per row, as
    for a model without time conditioning) draws p_data itself in exactly L evaluations per
    sequence. The analytic sampler at the same budget (L − 1 steps and the denoiser) shows its
    discretisation bias in the same check; given far more steps it would pass."""
    N, L = 3, 3
    graph, noise = _setup("absorb", N)
    p = _p_data(N, L, seed=5)
    model = JointExactScore(p, graph)
    kwargs = dict(batch_size=6000, length=L, generator=torch.Generator().manual_seed(1), return_stats=True)
    x, stats = sample(model, graph, noise, predictor="first_hitting", **kwargs)
    assert int(x.max()) < N
    assert stats.nfe.tolist() == [L] * 6000
    assert chi2_pvalue(_codes(x, N), p.flatten()) > 1e-3
    y, analytic = sample(model, graph, noise, predictor="analytic", steps=L - 1, **kwargs)
    assert analytic.nfe.tolist() == [L] * 6000
    assert chi2_pvalue(_codes(y, N), p.flatten()) < 1e-6


@pytest.mark.parametrize("predictor", ["analytic", "euler", "first_hitting"])
def test_absorbing_conditioning_samples_the_true_conditional(predictor):
    """The issue's toy: two positions over {0, 1} with P(equal) = 0.9; fixing x[0] = 0 must give
    P(x[1] = 0) = 0.9. Also a middle position of L = 3 fixed (infilling-like)."""
    graph, noise = _setup("absorb", 2)
    p = torch.tensor([[0.45, 0.05], [0.05, 0.45]], dtype=torch.float64)
    grid = {} if predictor == "first_hitting" else {"steps": 16}  # first hitting owns its grid (refuses steps)
    x = sample(JointExactScore(p, graph), graph, noise, batch_size=6000, length=2, **grid, predictor=predictor,
               fixed_tokens=torch.tensor([0, 0]), fixed_mask=torch.tensor([True, False]),
               generator=torch.Generator().manual_seed(2))
    assert bool((x[:, 0] == 0).all())
    assert chi2_pvalue(x[:, 1], p[0] / p[0].sum()) > 1e-3

    p3 = _p_data(2, 3, seed=7)
    grid = {} if predictor == "first_hitting" else {"steps": 32}
    x = sample(JointExactScore(p3, graph), graph, noise, batch_size=6000, length=3, **grid, predictor=predictor,
               fixed_tokens=torch.tensor([0, 1, 0]), fixed_mask=torch.tensor([False, True, False]),
               generator=torch.Generator().manual_seed(3))
    assert bool((x[:, 1] == 1).all())
    conditional = p3[:, 1, :].flatten() / p3[:, 1, :].sum()
    assert chi2_pvalue(x[:, 0] * 2 + x[:, 2], conditional) > 1e-3


def test_uniform_conditioning_is_biased_and_warns_once():
    """Clamping on the uniform graph is not exact (the model reads a clamped token as noisy):
    the same toy gives P(x[1] = 0 | x[0] = 0) well below 0.9. The sampler says so, once."""
    import sedd.sampling.sampler as sampling

    graph, noise = _setup("uniform", 2)
    p = torch.tensor([[0.45, 0.05], [0.05, 0.45]], dtype=torch.float64)
    model = JointExactScore(p, graph)
    kwargs = dict(batch_size=4000, length=2, steps=32, fixed_tokens=torch.tensor([0, 0]),
                  fixed_mask=torch.tensor([True, False]))
    sampling._warned_uniform_conditioning = False
    with pytest.warns(UserWarning, match="uniform graph is not exact"):
        x = sample(model, graph, noise, generator=torch.Generator().manual_seed(4), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second conditioned call does not warn again
        sample(model, graph, noise, generator=torch.Generator().manual_seed(5), **kwargs)
    p_equal = (x[:, 1] == 0).double().mean().item()
    assert p_equal < 0.86  # the true conditional is 0.9; the clamped sampler gives about 0.80


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_likelihood_bound_with_the_exact_score_is_minus_log_p_data(graph_name):
    N, L = 2, 3
    graph, noise = _setup(graph_name, N)
    p = _p_data(N, L, seed=11)
    model = JointExactScore(p, graph)
    x0 = torch.tensor([[0, 0, 0], [0, 1, 1], [1, 0, 1]])
    out = sequence_bounds(model, x0, graph, noise, num_samples=2000, batch_size=6000,
                          generator=torch.Generator().manual_seed(6))

    sigma1 = noise.total(torch.tensor([1.0], dtype=torch.float64))
    p1 = model.marginal(sigma1)[0]  # the true law at t = 1, [V^L]
    kernel = model.kernel(sigma1)[0]  # [V, N]
    for b in range(len(x0)):
        q = kernel[:, x0[b, 0]]
        for i in range(1, L):
            q = (q[:, None] * kernel[:, x0[b, i]][None, :]).flatten()  # p_{1|0}(· | x0) over V^L
        keep = q > 0
        kl_true = (q[keep] * (q[keep].log() - p1[keep].log())).sum().item()
        nll = -math.log(p[tuple(x0[b].tolist())].item())
        se = out["variance"][b].sqrt().item()
        assert abs(out["integral"][b].item() - (nll - kl_true)) < 4 * se + 1e-3, (out["integral"][b], nll, kl_true, se)
        assert se < 0.1 * nll
        # the reported bound: −log p_data plus the library's prior term less the exact KL (≥ 0 here)
        bound = out["integral"][b].item() + out["prior"][b].item()
        assert out["prior"][b].item() == pytest.approx(L * prior_kl(graph, noise))
        assert abs(bound - (nll + out["prior"][b].item() - kl_true)) < 4 * se + 1e-3
