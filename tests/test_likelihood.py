"""The likelihood bound against exact log-probabilities of a tiny distribution."""

import math

import pytest
import torch

from sedd.graph import Absorbing, Uniform
from sedd.likelihood import draw_times, prior_kl, sequence_bounds, summarize
from sedd.noise import Geometric, LogLinear
from tests.helpers import ExactSequenceScore


def _problem(graph_name):
    g = torch.Generator().manual_seed(0)
    p0 = torch.rand(3, 3, generator=g, dtype=torch.float64) + 0.2  # L = 2, N = 3, full support
    if graph_name == "absorb":
        return p0, Absorbing(3), LogLinear()
    return p0, Uniform(3), Geometric(1e-4, 20.0)


def _kl_to_true_marginal(model, graph, noise, x0):
    """KL(p_{1|0}(·|x0) ‖ p_1): the exact prior term for the model started from the true p_1."""
    sigma1 = float(noise.total(torch.tensor(1.0, dtype=torch.float64)))
    q = graph.transition_probs(x0.unsqueeze(0), torch.tensor([sigma1]))[0].double()  # [L, V]
    q_joint = q[0][:, None] * q[1][None, :]
    p1 = model.marginal(sigma1)
    keep = q_joint > 0
    return (q_joint[keep] * (q_joint[keep].log() - p1[keep].log())).sum().item()


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_exact_score_recovers_log_likelihood(graph_name):
    p0, graph, noise = _problem(graph_name)
    model = ExactSequenceScore(p0, graph)
    x0 = torch.tensor([[0, 2], [1, 1]])
    out = sequence_bounds(model, x0, graph, noise, num_samples=2000, generator=torch.Generator().manual_seed(1))
    for b in range(2):
        want = -math.log(model.p0[tuple(x0[b].tolist())].item()) - _kl_to_true_marginal(model, graph, noise, x0[b])
        se = out["variance"][b].sqrt().item()
        assert abs(out["integral"][b].item() - want) < 3.5 * se, (out["integral"][b].item(), want, se)
        assert se < 0.1 * want


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_perturbed_model_bound_is_not_below_the_entropy(graph_name):
    p0, graph, noise = _problem(graph_name)
    model = ExactSequenceScore(p0, graph, perturb=0.8)
    exact = ExactSequenceScore(p0, graph)
    x0 = torch.cartesian_prod(torch.arange(3), torch.arange(3))
    weights = model.p0.flatten()
    kwargs = dict(num_samples=200, generator=torch.Generator().manual_seed(2))
    bad = sequence_bounds(model, x0, graph, noise, **kwargs)
    good = sequence_bounds(exact, x0, graph, noise, **kwargs)
    prior = torch.tensor([_kl_to_true_marginal(model, graph, noise, x) for x in x0], dtype=torch.float64)
    entropy = -(weights * weights.log()).sum().item()
    expected_bad = (weights * (bad["integral"] + prior)).sum().item()
    expected_good = (weights * (good["integral"] + prior)).sum().item()
    se_bad = (weights**2 * bad["variance"]).sum().sqrt().item()
    assert expected_bad > entropy + 3 * se_bad
    assert expected_bad > expected_good


def test_standard_error_shrinks_with_more_draws():
    p0, graph, noise = _problem("absorb")
    model = ExactSequenceScore(p0, graph)
    x0 = torch.tensor([[0, 2]])
    few = sequence_bounds(model, x0, graph, noise, num_samples=16, time_sampler="iid",
                          generator=torch.Generator().manual_seed(3))
    many = sequence_bounds(model, x0, graph, noise, num_samples=256, time_sampler="iid",
                           generator=torch.Generator().manual_seed(3))
    assert many["variance"].sqrt().item() < 0.5 * few["variance"].sqrt().item()


def test_time_samplers():
    t = draw_times(3, 8, "stratified", generator=torch.Generator().manual_seed(0))
    strata = torch.floor(t * 8)
    assert torch.equal(strata, torch.arange(8.0, dtype=torch.float64).expand(3, 8))
    a = draw_times(2, 6, "antithetic", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a[:, :3] + a[:, 3:], torch.ones(2, 3, dtype=torch.float64))
    assert ((t > 0) & (t < 1)).all()
    with pytest.raises(ValueError, match="even"):
        draw_times(1, 5, "antithetic")
    with pytest.raises(ValueError, match="time sampler"):
        draw_times(1, 5, "sobol")


def test_prior_terms():
    assert prior_kl(Absorbing(50257), LogLinear(1e-3)) == pytest.approx(1e-3 * math.log(50257))
    # uniform: at σ̄(1) = 20 the forward law is uniform to 2e-9: the KL vanishes
    assert prior_kl(Uniform(50257), Geometric()) < 1e-6
    # and is log N when nothing has moved
    assert prior_kl(Uniform(10), Geometric(1e-9, 1e-8)) == pytest.approx(math.log(10), rel=1e-6)


def test_summary_and_batching_agree():
    p0, graph, noise = _problem("uniform")
    model = ExactSequenceScore(p0, graph)
    x0 = torch.tensor([[0, 2], [1, 1], [2, 0]])
    one = sequence_bounds(model, x0, graph, noise, num_samples=8, generator=torch.Generator().manual_seed(4))
    two = sequence_bounds(model, x0, graph, noise, num_samples=8, batch_size=24,
                          generator=torch.Generator().manual_seed(4))
    # batching changes the order of the noise draws, not the times: same estimate in expectation
    torch.testing.assert_close(one["prior"], two["prior"])
    report = summarize([one], 8, "stratified")
    assert report.tokens == 6 and report.sequences == 3
    assert report.perplexity_bound == pytest.approx(math.exp(report.nats_per_token))
    assert report.bits_per_token == pytest.approx(report.nats_per_token / math.log(2))
    lo, hi = report.perplexity_ci95
    assert lo < report.perplexity_bound < hi
    assert "perplexity" in report.table()
