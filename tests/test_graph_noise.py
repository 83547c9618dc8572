"""Closed forms of the graphs and the noise schedules against brute force (N ≤ 6)."""

import math

import pytest
import torch

from sedd.graph import Absorbing, Uniform, get_graph
from sedd.noise import Geometric, LogLinear, get_noise
from sedd.ops import reference
from tests.helpers import chi2_pvalue, expm, full_Q

GRAPHS = [Absorbing(5), Uniform(6), Absorbing(1), Uniform(2)]


@pytest.mark.parametrize("graph", GRAPHS, ids=repr)
@pytest.mark.parametrize("sigma", [1e-5, 0.3, 0.7, 5.0, 20.0])
def test_transition_probs_match_matrix_exp(graph, sigma):
    P = expm(graph, sigma)  # P[to, from]
    x = torch.arange(graph.N).unsqueeze(0)  # clean tokens are real tokens
    s = torch.tensor([sigma])
    torch.testing.assert_close(graph.transition_probs(x, s)[0].double(), P[:, : graph.N].T, atol=1e-6, rtol=1e-5)
    x_all = torch.arange(graph.dim).unsqueeze(0)
    torch.testing.assert_close(graph.transp_transition(x_all, s)[0].double(), P, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("graph", GRAPHS, ids=repr)
@pytest.mark.parametrize("dsigma", [1e-4, 0.05, 1.3])
def test_staggered_score_matches_matrix_exp(graph, dsigma):
    scores = torch.rand(3, graph.dim, dtype=torch.float64) * 3
    want = (expm(graph, -dsigma) @ scores.T).T
    got = graph.staggered_score(scores.unsqueeze(0), torch.tensor([dsigma], dtype=torch.float64))[0]
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def _brute_probs(graph, log_score, x_t, kind, scalar, dt=None):
    """Step probabilities for one row from the dense matrices."""
    s = log_score.double().clone()
    s[x_t] = 0.0
    s = s.exp()
    if kind == "euler":
        w = dt * scalar * full_Q(graph)[x_t] * s
        w[x_t] = 0.0
        w[x_t] = 1 - w.sum()
    else:
        w = (expm(graph, -scalar) @ s) * expm(graph, scalar)[x_t]
        if kind == "denoise" and graph.absorbing:
            w[graph.mask_id] = 0.0
    w = w.clamp_min(0)
    return w / w.sum()


@pytest.mark.parametrize("graph", [Absorbing(5), Uniform(6), Uniform(2)], ids=repr)
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
@pytest.mark.parametrize("scalar", [1e-3, 0.2, 2.0])
def test_step_probs_match_brute_force(graph, kind, scalar):
    V = graph.dim
    log_score = torch.randn(1, V, V) * 1.5
    x_t = torch.arange(V).unsqueeze(0)
    shape = log_score.shape
    if kind == "euler":
        got = reference.euler_probs(log_score, x_t, torch.tensor([scalar]), 0.1, graph)
    elif kind == "analytic":
        got = reference.analytic_probs(log_score, x_t, torch.tensor([scalar]), graph)
    else:
        got = reference.denoise_probs(log_score, x_t, torch.tensor([scalar]), graph)
    assert got.shape == shape
    for i in range(V):
        want = _brute_probs(graph, log_score[0, i], i, kind, scalar, dt=0.1)
        torch.testing.assert_close(got[0, i].double(), want, atol=1e-5, rtol=1e-4)
    if kind == "denoise" and graph.absorbing:
        assert (got[..., graph.mask_id] == 0).all()


@pytest.mark.parametrize("graph", [Absorbing(5), Uniform(4)], ids=repr)
@pytest.mark.parametrize("sigma", [0.1, 1.5])
def test_sample_transition_matches_transition_probs(graph, sigma):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.full((8, 4000), 2)
    x_t = graph.sample_transition(x0, torch.full((8,), sigma), generator=gen)
    probs = graph.transition_probs(torch.tensor([[2]]), torch.tensor([sigma]))[0, 0]
    assert chi2_pvalue(x_t, probs) > 1e-3
    again = graph.sample_transition(x0, torch.full((8,), sigma), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x_t, again)


def test_limit_distributions():
    gen = torch.Generator().manual_seed(0)
    assert (Absorbing(7).sample_limit((2, 5)) == 7).all()
    draws = Uniform(5).sample_limit((20, 1000), generator=gen)
    assert chi2_pvalue(draws, torch.full((5,), 0.2)) > 1e-3


def test_graph_names():
    assert get_graph("absorb", 10) == Absorbing(10)
    assert get_graph("uniform", 10).dim == 10
    assert Absorbing(10).dim == 11 and Absorbing(10).mask_id == 10
    with pytest.raises(ValueError, match="unknown graph"):
        get_graph("nope", 3)
    with pytest.raises(ValueError):
        Absorbing(0)


# ---------------------------------------------------------------------------------------------
# Noise schedules
# ---------------------------------------------------------------------------------------------


def test_loglinear_identity_dsigma_over_esigm1_is_one_over_t():
    t = torch.linspace(1e-3, 1, 1001, dtype=torch.float64)
    sigma, dsigma = LogLinear()(t)
    torch.testing.assert_close(dsigma / reference.esigm1(sigma), 1 / t, rtol=1e-9, atol=0)
    # the mask probability is linear in t
    torch.testing.assert_close(-torch.expm1(-sigma), (1 - 1e-3) * t)


@pytest.mark.parametrize("noise", [LogLinear(), Geometric(), Geometric(1e-3, 5.0)], ids=repr)
def test_rate_is_the_derivative_of_total(noise):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    sigma, dsigma = noise(t)
    (grad,) = torch.autograd.grad(sigma.sum(), t)
    torch.testing.assert_close(dsigma, grad)


def test_geometric_endpoints():
    g = Geometric(1e-4, 20.0)
    sigma, dsigma = g(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sigma, torch.tensor([1e-4, 20.0], dtype=torch.float64))
    torch.testing.assert_close(dsigma, sigma * math.log(20.0 / 1e-4))


def test_noise_names_and_validation():
    assert isinstance(get_noise("loglinear"), LogLinear)
    assert isinstance(get_noise("geometric"), Geometric)
    with pytest.raises(ValueError, match="unknown noise"):
        get_noise("cosine")
    with pytest.raises(ValueError):
        Geometric(1.0, 0.5)
    with pytest.raises(ValueError):
        LogLinear(eps=1.0)


def test_from_public_config():
    from sedd.graph import graph_from_config
    from sedd.noise import noise_from_config

    config = {"tokens": 50257, "graph": {"type": "absorb"}, "noise": {"type": "loglinear", "sigma_min": 1e-4}}
    assert graph_from_config(config) == Absorbing(50257)
    assert isinstance(noise_from_config(config), LogLinear)
    config = {"tokens": 7, "graph": {"type": "uniform"}, "noise": {"type": "geometric", "sigma_min": 1e-3, "sigma_max": 5}}
    assert graph_from_config(config).dim == 7
    g = noise_from_config(config)
    assert (g.sigma_min, g.sigma_max) == (1e-3, 5)
