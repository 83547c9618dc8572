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
from tests.helpers import chi2_pvalue


class JointExactScore(torch.nn.Module):
    """Exact concrete score of ``p_data`` (a tensor with L axes of size N), vectorised over the batch."""

    def __init__(self, p_data: torch.Tensor, graph):
        super().__init__()
        self.graph, self.L = graph, p_data.dim()
        self.p_data = (p_data / p_data.sum()).double()
        V = graph.dim
        self.strides = torch.tensor([V ** (self.L - 1 - i) for i in range(self.L)])

    def kernel(self, sigma: torch.Tensor) -> torch.Tensor:
        """[B, V, N]: p_{t|0}(y | x0) for one position, per row's σ."""
        N = self.graph.N
        x0 = torch.arange(N).expand(sigma.shape[0], N)
        return self.graph.transition_probs(x0, sigma.double()).double().transpose(1, 2)

    def marginal(self, sigma: torch.Tensor) -> torch.Tensor:
        """p_t over all V^L noisy sequences, [B, V^L] float64."""
        P = self.kernel(sigma)
        letters = "abc"[: self.L]
        noisy = "".join(ch.upper() for ch in letters)
        spec = ",".join(f"z{u}{c}" for u, c in zip(noisy, letters)) + f",{letters}->z{noisy}"
        return torch.einsum(spec, *([P] * self.L), self.p_data).reshape(sigma.shape[0], -1)

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1)
        logp = self.marginal(sigma).clamp_min(1e-300).log()  # [B, V^L]
        code = (x_t.long() * self.strides).sum(-1)  # [B]
        y = torch.arange(self.graph.dim)
        neighbours = code[:, None, None] + (y[None, None, :] - x_t.long()[:, :, None]) * self.strides[None, :, None]
        rows = logp.gather(1, neighbours.reshape(len(code), -1)).reshape(neighbours.shape)
        return (rows - logp.gather(1, code[:, None])[:, :, None]).float()


def _codes(x: torch.Tensor, N: int) -> torch.Tensor:
    strides = torch.tensor([N ** (x.shape[1] - 1 - i) for i in range(x.shape[1])])
    return (x * strides).sum(-1)


def _p_data(N: int, L: int, seed: int) -> torch.Tensor:
    """Correlated, full-support: a random table plus a large bonus on the 'all equal' sequences."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(*([N] * L), generator=g, dtype=torch.float64) + 0.1
    for k in range(N):
        p[(k,) * L] += 1.5
    return p / p.sum()


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
