"""Predictors as objects: a predictor registered in a few lines drives the sampler."""

import pytest
import torch

from sedd.graph import Absorbing
from sedd.noise import LogLinear
from sedd.sampling import DENOISERS, PREDICTORS, predictors, sample
from sedd.sampling.predictors import AnalyticPredictor, Predictor, register_predictor
from tests.helpers import FactorizedScore

PI = torch.tensor([0.05, 0.3, 0.1, 0.35, 0.2])


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test, so its registrations do not leak into other tests."""
    monkeypatch.setattr(predictors, "REGISTRY", dict(predictors.REGISTRY))


def test_a_registered_predictor_drives_the_sampler(registry):
    seen = []

    @register_predictor
    class CountingAnalytic(AnalyticPredictor):
        """The analytic step, recording the times it is called at."""

        name = "counting"

        def update(self, model, x, t, dt, graph, noise, generator=None):
            seen.append(float(t[0]))
            return super().update(model, x, t, dt, graph, noise, generator)

    assert "counting" in PREDICTORS and "counting" not in DENOISERS
    graph, noise = Absorbing(5), LogLinear()
    model = FactorizedScore(PI, graph)
    kw = dict(batch_size=4, length=32, steps=5)
    x = sample(model, graph, noise, predictor="counting", generator=torch.Generator().manual_seed(0), **kw)
    want = sample(model, graph, noise, predictor="analytic", generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(x, want)
    assert seen == pytest.approx(torch.linspace(1, 1e-5, 6, dtype=torch.float64)[:-1].tolist())


def test_a_new_predictor_and_denoiser_from_scratch(registry):
    @register_predictor
    class Stay(Predictor):
        name = "stay"

        def update(self, model, x, t, dt, graph, noise, generator=None):
            return x

    @register_predictor
    class FillWithZero(Predictor):
        name = "zero-fill"
        final = True

        def update(self, model, x, t, dt, graph, noise, generator=None):
            return torch.where(x == graph.mask_id, 0, x)

    graph = Absorbing(5)
    x = sample(FactorizedScore(PI, graph), graph, LogLinear(), batch_size=2, length=8, steps=2,
               predictor="stay", denoiser="zero-fill")
    assert torch.equal(x, torch.zeros(2, 8, dtype=torch.long))  # all-MASK start, kept, then filled


def test_registry_errors(registry):
    graph = Absorbing(5)
    model = FactorizedScore(PI, graph)
    with pytest.raises(ValueError, match="predictor must be one of"):
        sample(model, graph, LogLinear(), batch_size=1, length=4, predictor="leapfrog")
    with pytest.raises(ValueError, match="final denoising step"):
        sample(model, graph, LogLinear(), batch_size=1, length=4, predictor="denoise")
    with pytest.raises(ValueError, match="already registered"):
        register_predictor(AnalyticPredictor)
    with pytest.raises(TypeError, match="Predictor subclass"):
        register_predictor(lambda: None)
    assert tuple(PREDICTORS) == ("euler", "analytic", "first_hitting") and tuple(DENOISERS) == ("denoise",)


def test_the_sampler_never_changes_a_predictor_it_is_given():
    graph, noise = Absorbing(5), LogLinear()
    model = FactorizedScore(PI, graph)
    mine = AnalyticPredictor(masked_only=True)
    kw = dict(batch_size=3, length=8, steps=3)
    x = sample(model, graph, noise, predictor=mine, masked_only=False, generator=torch.Generator().manual_seed(1), **kw)
    assert mine.masked_only is True
    want = sample(model, graph, noise, predictor="analytic", masked_only=False,
                  generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(x, want)


def test_the_interface_declares_truncation():
    import inspect

    assert {"top_p", "top_k"} <= set(inspect.signature(Predictor.update).parameters)
    for name in (*PREDICTORS, *DENOISERS):
        assert {"top_p", "top_k"} <= set(inspect.signature(predictors.REGISTRY[name].update).parameters), name
