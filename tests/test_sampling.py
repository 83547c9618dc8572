"""The samplers end to end, driven by the exact score of a product distribution."""

import pytest
import torch

from sedd.graph import Absorbing, Uniform
from sedd.noise import Geometric, LogLinear
from sedd.sampling import conditioning, sample
from tests.helpers import FactorizedScore, chi2_pvalue

PI = torch.tensor([0.05, 0.3, 0.1, 0.35, 0.2])


def _setup(graph_name):
    if graph_name == "absorb":
        return Absorbing(5), LogLinear()
    return Uniform(5), Geometric()


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_analytic_sampler_reproduces_a_product_distribution(graph_name):
    graph, noise = _setup(graph_name)
    model = FactorizedScore(PI, graph)
    gen = torch.Generator().manual_seed(0)
    x = sample(model, graph, noise, batch_size=40, length=100, steps=8, predictor="analytic", generator=gen)
    assert x.shape == (40, 100) and x.dtype == torch.long
    assert chi2_pvalue(x, PI) > 1e-3


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_euler_sampler_is_close_with_enough_steps(graph_name):
    graph, noise = _setup(graph_name)
    model = FactorizedScore(PI, graph)
    gen = torch.Generator().manual_seed(1)
    x = sample(model, graph, noise, batch_size=40, length=100, steps=64, predictor="euler", generator=gen)
    freq = torch.bincount(x.flatten(), minlength=5).double() / x.numel()
    assert (freq - PI.double()).abs().sum() < 0.05


def test_denoise_leaves_no_mask_and_without_it_masks_remain():
    graph, noise = _setup("absorb")
    model = FactorizedScore(PI, graph)
    gen = torch.Generator().manual_seed(2)
    # stopping at ε = 0.3 leaves about 30 % of the positions masked before the denoising step
    x = sample(model, graph, noise, batch_size=8, length=64, steps=2, eps=0.3, generator=gen)
    assert (x != graph.mask_id).all()
    x = sample(model, graph, noise, batch_size=8, length=64, steps=2, eps=0.3, denoise=False, generator=gen)
    assert (x == graph.mask_id).any()


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("predictor", ["euler", "analytic"])
def test_fixed_positions_never_change(graph_name, predictor):
    graph, noise = _setup(graph_name)
    model = FactorizedScore(PI, graph)
    L = 32
    tokens, mask = conditioning(L, {0: [4, 4, 4], 14: [0, 0], 29: [2, 2, 2]})
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x_t, sigma):
            seen.append(x_t.clone())
            return model(x_t, sigma)

    x = sample(Spy(), graph, noise, batch_size=6, length=L, steps=5, predictor=predictor,
               fixed_tokens=tokens, fixed_mask=mask, generator=torch.Generator().manual_seed(3))
    for state in seen + [x]:
        assert torch.equal(state[:, mask], tokens[mask].expand(6, -1))
    assert len(seen) == 6  # five steps and the denoising step


def test_per_sequence_conditioning_and_seeding():
    graph, noise = _setup("absorb")
    model = FactorizedScore(PI, graph)
    tokens = torch.tensor([[1, 2, 0, 0], [3, 3, 0, 0]])
    mask = torch.tensor([[True, True, False, False], [True, True, False, False]])
    a = sample(model, graph, noise, batch_size=2, length=4, steps=3, fixed_tokens=tokens, fixed_mask=mask,
               generator=torch.Generator().manual_seed(5))
    b = sample(model, graph, noise, batch_size=2, length=4, steps=3, fixed_tokens=tokens, fixed_mask=mask,
               generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(a[:, :2], tokens[:, :2])


def test_sampler_bad_arguments():
    graph, noise = _setup("absorb")
    model = FactorizedScore(PI, graph)
    with pytest.raises(ValueError, match="predictor"):
        sample(model, graph, noise, batch_size=1, length=4, predictor="ddpm")
    with pytest.raises(ValueError, match="steps"):
        sample(model, graph, noise, batch_size=1, length=4, steps=0)
    with pytest.raises(ValueError, match="together"):
        sample(model, graph, noise, batch_size=1, length=4, fixed_tokens=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="real tokens"):
        sample(model, graph, noise, batch_size=1, length=4, fixed_tokens=torch.full((4,), 5),
               fixed_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not fit"):
        conditioning(4, {3: [1, 2]})
    with pytest.raises(ValueError, match="overlaps"):
        conditioning(8, {0: [1, 2], 1: [3]})
