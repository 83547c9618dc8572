"""The first-hitting sampler (``predictor="first_hitting"``) beyond its exactness (that is
tests/test_exact_score.py): its evaluation count, its event times, truncation, and its arguments."""

import math

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing, Uniform, get_graph
from sedd.noise import Geometric, LogLinear, get_noise
from sedd.sampling import FirstHittingPredictor, sample
from tests.helpers import FactorizedScore, chi2_pvalue, random_sedd

N, L, B = 20, 12, 6
PI = torch.tensor([0.05, 0.3, 0.1, 0.35, 0.2])


def _model(time_conditioning):
    return random_sedd(N, L, time_conditioning)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("time_conditioning", [False, True])
@pytest.mark.parametrize("k", [1, 5])
def test_one_evaluation_per_k_events_per_row(one_thread, backend, time_conditioning, k):
    """Rows with different numbers of fixed positions take ⌈n/k⌉ evaluations each, n their
    masked positions, and end with no MASK and their fixed tokens in place."""
    g = torch.Generator().manual_seed(5)
    fixed_mask = torch.rand(B, L, generator=g) < torch.linspace(0, 0.9, B)[:, None]
    fixed_tokens = torch.randint(0, N, (B, L), generator=g)
    with ops.use_backend(backend):
        x, stats = sample(_model(time_conditioning), get_graph("absorb", N), get_noise("loglinear"), batch_size=B,
                          length=L, predictor="first_hitting", tokens_per_step=k, fixed_tokens=fixed_tokens,
                          fixed_mask=fixed_mask, generator=torch.Generator().manual_seed(0), return_stats=True)
    free = (~fixed_mask).sum(1)
    assert stats.nfe.tolist() == [math.ceil(n / k) for n in free.tolist()]
    assert stats.forward_rows == int(stats.nfe.sum())
    assert int(x.max()) < N and torch.equal(x[fixed_mask], fixed_tokens[fixed_mask])


class _Recording(FactorizedScore):
    """The exact score of a product distribution, recording the σ of every row it is called at."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def forward(self, x_t, sigma):
        self.calls.append((x_t.clone(), sigma.clone()))
        return super().forward(x_t, sigma)


@pytest.mark.parametrize("noise", [LogLinear(), Geometric()])
def test_the_first_event_is_the_latest_of_n_unmasking_times(noise):
    """With n masked positions at t = 1, the first event has m(s) = m(1)·u^{1/n} (m = 1 − e^{−σ̄}),
    so (m(s)/m(1))^n is uniform; the exponent n − 1 is told apart (the check has power). Any
    schedule: the sampler works in m, not in t."""
    graph, rows, n = Absorbing(5), 4000, 4
    model = _Recording(PI, graph)
    sample(model, graph, noise, batch_size=rows, length=n, predictor="first_hitting",
           generator=torch.Generator().manual_seed(1))
    x_t, sigma = model.calls[0]
    assert bool((x_t == graph.mask_id).all()) and len(model.calls) == n
    m1 = -math.expm1(-float(noise.total(torch.tensor(1.0, dtype=torch.float64))))
    ratio = -torch.expm1(-sigma.double()) / m1
    bins = torch.full((10,), 0.1, dtype=torch.float64)
    assert chi2_pvalue((ratio**n * 10).long().clamp_max(9), bins) > 1e-3
    assert chi2_pvalue((ratio ** (n - 1) * 10).long().clamp_max(9), bins) < 1e-6
    later = torch.stack([s for _, s in model.calls])  # every row's σ decreases event by event
    assert bool((later[1:] <= later[:-1]).all())


@pytest.mark.parametrize("trunc,kept", [(dict(top_k=2), [1, 3]), (dict(top_p=0.5), [1, 3]), (dict(top_p=0.3), [3])])
def test_truncation(trunc, kept):
    """Each position of a product distribution takes y ∝ π_y over the kept tokens only (top_p=0.5
    keeps 0.35 and 0.3, the token crossing the share included)."""
    graph = Absorbing(5)
    x = sample(FactorizedScore(PI, graph), graph, LogLinear(), batch_size=1500, length=4, predictor="first_hitting",
               generator=torch.Generator().manual_seed(2), **trunc)
    want = torch.zeros(5, dtype=torch.float64)
    want[kept] = PI[kept].double()
    assert chi2_pvalue(x.flatten(), want / want.sum()) > 1e-3


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, True, "2", None])
def test_bad_tokens_per_step(bad):
    graph = Absorbing(5)
    model = FactorizedScore(PI, graph)
    with pytest.raises(ValueError, match="tokens_per_step must be a positive integer"):
        FirstHittingPredictor(tokens_per_step=bad)
    if bad is not None:  # None is the default of sample()
        with pytest.raises(ValueError, match="tokens_per_step must be a positive integer"):
            sample(model, graph, LogLinear(), batch_size=1, length=4, predictor="first_hitting", tokens_per_step=bad)
    with pytest.raises(ValueError, match="takes no tokens_per_step"):
        sample(model, graph, LogLinear(), batch_size=1, length=4, predictor="analytic", tokens_per_step=2)
    # an instance passed in keeps its own value when sample() sets another
    mine = FirstHittingPredictor(tokens_per_step=3)
    sample(model, graph, LogLinear(), batch_size=1, length=4, predictor=mine, tokens_per_step=2)
    assert mine.tokens_per_step == 3


def test_absorbing_only():
    graph = Uniform(5)
    with pytest.raises(ValueError, match="absorbing graph only"):
        sample(FactorizedScore(PI, graph), graph, Geometric(), batch_size=1, length=4, predictor="first_hitting")
