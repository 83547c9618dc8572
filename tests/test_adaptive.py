"""First hitting's adaptive rules (``threshold=τ``, ``entropy_bound=γ``; issue 33): the three
consequences of the rule on exact-score toys, then the paths it runs on (the masked-rows head,
fixed positions, windows, block diffusion's KV cache, bf16, the Triton backend), its one host read
per evaluation, and its errors.

The correlated toy's check compares the samples with the law of the rule itself, computed by
enumerating every state (:func:`rule_law`), and that law with p_data: so it checks both that the
sampler does what the rule says and that the rule's error grows as τ falls or γ rises."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing, Uniform
from sedd.model import SEDD
from sedd.noise import LogLinear
from sedd.sampling import FirstHittingPredictor, SamplingSpec, sample
from sedd.sampling.spec import target_for
from tests.helpers import JointExactScore, chi2_pvalue, correlated_p_data, random_sedd, sequence_codes

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

PI = torch.tensor([0.05, 0.3, 0.1, 0.35, 0.2], dtype=torch.float64)  # H(PI) = 1.431 nats
NOISE = LogLinear()


def _tiny(N=20, L=12, time_conditioning=False):
    return random_sedd(N, L, time_conditioning)


def _factorised_sedd(pi: torch.Tensor, L: int) -> SEDD:
    """A SEDD whose output layer ignores the trunk: every MASK position's denoising distribution is
    ``pi`` (the bias; the σ shift is one constant per row and cancels), through the masked-rows head."""
    model = _tiny(N=len(pi), L=L)
    with torch.no_grad():
        model.output_layer.linear.weight.zero_()
        model.output_layer.linear.bias.zero_()
        model.output_layer.linear.bias[: len(pi)] = pi.log().float()
    return model


# -- 1. nothing sure enough: today's first hitting --------------------------------------------


@pytest.mark.parametrize("backend,time_conditioning", [("torch", False), ("torch", True),
                                                       pytest.param("triton", False, marks=pytest.mark.slow)])
def test_with_no_position_sure_enough_it_is_todays_first_hitting(one_thread, backend, time_conditioning):
    """τ above every confidence, or γ = 0 (every entropy is positive), draws exactly the tokens of
    k = 1 from the same generator in the same evaluations, fixed positions and truncation included
    (the interpreter, slow, runs the untruncated case)."""
    B, L = 5, 12
    g = torch.Generator().manual_seed(5)
    fixed = dict(fixed_mask=torch.rand(B, L, generator=g) < torch.linspace(0, 0.8, B)[:, None],
                 fixed_tokens=torch.randint(0, 20, (B, L), generator=g))
    model = _tiny(time_conditioning=time_conditioning)

    def run(**rule):
        with ops.use_backend(backend):
            return sample(model, Absorbing(20), NOISE, batch_size=B, length=L, predictor="first_hitting",
                          generator=torch.Generator().manual_seed(0), return_stats=True, **fixed, **rule)

    for trunc in ({}, {"top_p": 0.8}) if backend == "torch" else ({},):
        x, stats = run(**trunc)
        for rule in ({"threshold": 1.0}, {"entropy_bound": 0.0}):
            y, other = run(**rule, **trunc)
            assert torch.equal(x, y) and torch.equal(stats.nfe, other.nfe), (rule, trunc)
    # and a rule that does act changes the tokens and saves evaluations, keeping the fixed ones
    y, other = run(threshold=0.2)
    free = (~fixed["fixed_mask"]).sum(1)
    assert bool((other.nfe < free).any()) and bool((other.nfe <= free).all()) and bool((other.nfe >= 1).all())
    assert torch.equal(y[fixed["fixed_mask"]], fixed["fixed_tokens"][fixed["fixed_mask"]]) and int(y.max()) < 20


# -- 2. a factorised distribution: exact whatever the rule --------------------------------------


@pytest.mark.parametrize("rule,nfe", [({"threshold": 0.3}, 1), ({"threshold": 0.5}, 8), ({"entropy_bound": 3.0}, 3),
                                      ({"entropy_bound": 1.0}, 8), ({"entropy_bound": 12.0}, 1)])
def test_a_factorised_distribution_is_sampled_exactly_whatever_the_rule(one_thread, rule, nfe):
    """Every position i.i.d. π, through the masked-rows head: any τ or γ draws π⊗…⊗π (pairs of
    positions against π⊗π, with power: the check fails for a sampler that copies a token). The NFE
    says the rule did what it says: τ = 0.3 ≤ max π unmasks all 8 positions in one evaluation, 0.5
    none besides the event; γ = 3 admits two more per evaluation (H(π) = 1.43), 1 none, 12 all."""
    L = 8
    x, stats = sample(_factorised_sedd(PI, L), Absorbing(5), NOISE, batch_size=1500, length=L,
                      predictor="first_hitting", generator=torch.Generator().manual_seed(1), return_stats=True, **rule)
    assert stats.nfe.tolist() == [nfe] * 1500
    pairs = (PI[:, None] * PI[None, :]).flatten()
    for a, b in ((0, 1), (2, 5), (6, 7)):
        assert chi2_pvalue(x[:, a] * 5 + x[:, b], pairs) > 1e-3, (a, b)
    copied = torch.cat([x[:, :1], x[:, :1]], 1)  # the power of the check: one token in both places
    assert chi2_pvalue(copied[:, 0] * 5 + copied[:, 1], pairs) < 1e-6


def test_a_factorised_distribution_through_the_full_scores():
    """The same through a model without a head (its [B, L, V] scores) and with top-k: the kept
    tokens of π, renormalised, in every position."""
    from tests.helpers import FactorizedScore

    graph = Absorbing(5)
    x, stats = sample(FactorizedScore(PI, graph), graph, NOISE, batch_size=1500, length=4, predictor="first_hitting",
                      entropy_bound=1.2, top_k=3, generator=torch.Generator().manual_seed(2), return_stats=True)
    kept = torch.zeros(5, dtype=torch.float64)
    kept[[1, 3, 4]] = PI[[1, 3, 4]]
    assert stats.nfe.tolist() == [2] * 1500  # H of the kept three: 1.07 ≤ 1.2, one extra per evaluation
    assert chi2_pvalue(x[:, 0] * 5 + x[:, 3], (kept[:, None] * kept[None, :]).flatten() / kept.sum() ** 2) > 1e-3


def test_time_moves_on_to_the_last_event_an_evaluation_stands_for():
    """With 8 masked positions and 3 unmasked per evaluation (γ = 3, H(π) = 1.43), the second
    evaluation runs at the 4th of the 8 unmasking times, as ``tokens_per_step=3`` would: m(s)/m(1)
    is the 4th largest of 8 uniforms, Beta(5, 4), mean 5/9 (at its event alone it would be the 2nd,
    mean 7/9)."""
    from tests.helpers import FactorizedScore

    graph, rows, calls = Absorbing(5), 4000, []

    class Recording(FactorizedScore):
        def forward(self, x_t, sigma):
            calls.append(sigma.double().clone())
            return super().forward(x_t, sigma)

    sample(Recording(PI, graph), graph, NOISE, batch_size=rows, length=8, predictor="first_hitting",
           entropy_bound=3.0, generator=torch.Generator().manual_seed(6))
    assert len(calls) == 3
    m1 = -math.expm1(-float(NOISE.total(torch.tensor(1.0, dtype=torch.float64))))
    ratio = -torch.expm1(-calls[1]) / m1
    assert abs(float(ratio.mean()) - 5 / 9) < 4 * math.sqrt(5 * 4 / (81 * 10) / rows)
    assert abs(float(ratio.var()) - 5 * 4 / (81 * 10)) < 0.003


# -- 3. dependence between positions: the rule's own law, and its error growing ---------------


def _conditional(p: torch.Tensor, state: tuple, i: int) -> torch.Tensor:
    """p(x0_i | the visible tokens of ``state``) [N] (None: masked)."""
    q = p
    for axis in reversed(range(p.dim())):
        if state[axis] is not None:
            q = q.select(axis, state[axis])
    masked = [a for a in range(p.dim()) if state[a] is None]
    k = masked.index(i)
    m = q.sum(dim=[d for d in range(len(masked)) if d != k]) if len(masked) > 1 else q
    return m / m.sum()


def rule_law(p: torch.Tensor, rule: str | None, value: float, start: tuple | None = None):
    """The law over N^L sequences of first hitting with ``rule`` on the exact conditionals of
    ``p``, from ``start`` (None: all masked), by enumeration: the event's position uniform among the
    masked ones, each position the rule adds chosen from the same state's conditionals, every
    unmasked token drawn from its conditional given that state. Also the smallest distance of a
    rule's decision from its boundary (the model's fp32 statistics must not fall the other way)."""
    N, L = p.shape[0], p.dim()
    law = torch.zeros([N] * L, dtype=torch.float64)
    margins = [math.inf]

    def visit(state, prob):
        masked = [i for i, v in enumerate(state) if v is None]
        if not masked:
            law[state] += prob
            return
        cond = {i: _conditional(p, state, i) for i in masked}
        for i in masked:
            others = [j for j in masked if j != i]
            extra = []
            if rule == "threshold":
                extra = [j for j in others if float(cond[j].max()) >= value]
                margins.extend(abs(float(cond[j].max()) - value) for j in others)
            elif rule == "entropy_bound":
                h = {j: float(-torch.xlogy(cond[j], cond[j]).sum()) for j in others}
                run = 0.0
                for j in sorted(others, key=lambda j: (h[j], j)):
                    run += h[j]
                    margins.append(abs(run - value))
                    if run > value:
                        break
                    extra.append(j)
            chosen = [i, *extra]
            for ys in itertools.product(range(N), repeat=len(chosen)):
                new, pr = list(state), prob / len(masked)
                for j, y in zip(chosen, ys):
                    new[j], pr = y, pr * float(cond[j][y])
                visit(tuple(new), pr)

    visit(start or (None,) * L, 1.0)
    return law.flatten(), min(margins)


@pytest.mark.parametrize("rule,values", [("threshold", [1.0, 0.8, 0.65, 0.45]),
                                         ("entropy_bound", [0.2, 0.6, 0.8, 2.5])])
def test_with_dependence_the_error_grows_as_more_is_unmasked_together(one_thread, rule, values):
    """N = 2, L = 3, strongly correlated. Each setting's samples follow the rule's law (χ²); that
    law's distance from p_data is 0 at the first value (nothing is sure enough) and grows strictly
    along the list (τ falling, γ rising); the last setting's samples fail the check against p_data."""
    N, L = 2, 3
    p = correlated_p_data(N, L, seed=5)
    graph = Absorbing(N)
    distances = []
    for i, value in enumerate(values):
        law, margin = rule_law(p, rule, value)
        assert margin > 1e-3  # no decision within rounding of its boundary
        distances.append(0.5 * float((law - p.flatten()).abs().sum()))
        x, stats = sample(JointExactScore(p, graph), graph, NOISE, batch_size=6000, length=L,
                          predictor="first_hitting", generator=torch.Generator().manual_seed(10 + i),
                          return_stats=True, **{rule: value})
        assert int(x.max()) < N and bool((stats.nfe <= L).all())
        assert chi2_pvalue(sequence_codes(x, N), law) > 1e-3, (rule, value)
    assert distances[0] < 1e-12 and all(b > a + 1e-3 for a, b in zip(distances, distances[1:])), distances
    assert chi2_pvalue(sequence_codes(x, N), p.flatten()) < 1e-6


def test_with_a_fixed_position_it_follows_the_rules_conditional_law():
    """Fixing x[1] = 1 (infilling): the other two positions follow the rule's law from that state."""
    N, L = 2, 3
    p = correlated_p_data(N, L, seed=5)
    graph = Absorbing(N)
    law, margin = rule_law(p, "threshold", 0.65, start=(None, 1, None))
    assert margin > 1e-3
    x = sample(JointExactScore(p, graph), graph, NOISE, batch_size=6000, length=L, predictor="first_hitting",
               threshold=0.65, fixed_tokens=torch.tensor([0, 1, 0]), fixed_mask=torch.tensor([False, True, False]),
               generator=torch.Generator().manual_seed(3))
    assert bool((x[:, 1] == 1).all())
    assert chi2_pvalue(sequence_codes(x, N), law) > 1e-3


# -- the paths it runs on ---------------------------------------------------------------------


def test_the_triton_backend_draws_the_same_law(one_thread):
    """The fused op (interpreter) in the sampler: a factorised π through the masked-rows head."""
    with ops.use_backend("triton"):
        x, stats = sample(_factorised_sedd(PI, 6), Absorbing(5), NOISE, batch_size=600, length=6,
                          predictor="first_hitting", entropy_bound=3.0, generator=torch.Generator().manual_seed(4),
                          return_stats=True)
    assert stats.nfe.tolist() == [2] * 600
    assert chi2_pvalue(x[:, 0] * 5 + x[:, 4], (PI[:, None] * PI[None, :]).flatten()) > 1e-3


def test_bf16_scores(one_thread):
    """A bf16 model (scores in bf16 through the head): τ above every confidence is still today's
    sampler, and a rule that acts runs to the end."""
    model = _tiny().to(torch.bfloat16)
    kw = dict(batch_size=3, length=12, predictor="first_hitting", return_stats=True)
    x, _ = sample(model, Absorbing(20), NOISE, generator=torch.Generator().manual_seed(0), **kw)
    y, _ = sample(model, Absorbing(20), NOISE, generator=torch.Generator().manual_seed(0), threshold=1.0, **kw)
    z, stats = sample(model, Absorbing(20), NOISE, generator=torch.Generator().manual_seed(0), entropy_bound=4.0, **kw)
    assert torch.equal(x, y) and int(z.max()) < 20 and bool((stats.nfe < 12).all())


def test_windows_and_block_diffusion(one_thread):
    """Semi-autoregressive windows (sample_blockwise) and block diffusion with and without its KV
    cache (the same tokens) take the rule too."""
    from sedd.generation import sample_blockwise
    from sedd.model import BlockSEDD
    from sedd.sampling.block import sample_block_diffusion

    model = _tiny(L=12)
    x, stats = sample_blockwise(model, Absorbing(20), NOISE, batch_size=2, length=30, predictor="first_hitting",
                                threshold=0.3, generator=torch.Generator().manual_seed(0), return_stats=True)
    assert x.shape == (2, 30) and int(x.max()) < 20 and bool((stats.nfe < 30).all())

    torch.manual_seed(0)
    block = BlockSEDD(BlockSEDD.config_for("cpu", tokens=20, hidden_size=32, cond_dim=16, n_heads=2, n_blocks=1,
                                           length=16, block_size=4)).eval()
    with torch.no_grad():
        block.output_layer.linear.weight.normal_(0, 0.3)
    runs = [sample_block_diffusion(block, Absorbing(20), NOISE, batch_size=3, predictor="first_hitting",
                                   entropy_bound=2.0, kv_cache=kv, return_stats=True,
                                   generator=torch.Generator().manual_seed(9)) for kv in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0]) and int(runs[0][0].max()) < 20


def test_one_host_read_per_evaluation(monkeypatch, one_thread):
    """On the Triton backend (what a GPU runs) the rule's loop reads one tensor per evaluation
    (the MASKs left per row) and one to end. Besides: the eps floor (``float``) and the generator's
    state (``numpy``: a CPU tensor on every device), once each."""
    model = _tiny(L=8)
    reads = []
    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy"):
            def counted(self, *a, _name=name, _real=getattr(torch.Tensor, name), **k):
                reads.append(_name)
                return _real(self, *a, **k)
            patch.setattr(torch.Tensor, name, counted)
        with ops.use_backend("triton"):
            _, stats = sample(model, Absorbing(20), NOISE, batch_size=3, length=8, predictor="first_hitting",
                              threshold=0.3, generator=torch.Generator().manual_seed(0), return_stats=True)
    evaluations = int(stats.nfe.max())
    assert evaluations < 8 and sorted(reads) == sorted(["tolist"] * (evaluations + 1) + ["__float__", "numpy"])


# -- what it refuses ---------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"threshold": 0}, "threshold must be a number in (0, 1], got 0"),
    ({"threshold": 1.5}, "threshold must be a number in (0, 1], got 1.5"),
    ({"threshold": -0.2}, "threshold must be a number in (0, 1], got -0.2"),
    ({"threshold": True}, "threshold must be a number in (0, 1], got True"),
    ({"entropy_bound": -1}, "entropy_bound must be a finite number >= 0, got -1"),
    ({"entropy_bound": math.inf}, "entropy_bound must be a finite number >= 0, got inf"),
    ({"threshold": 0.9, "entropy_bound": 1.0}, "threshold and entropy_bound cannot be combined: each sets how many"),
    ({"threshold": 0.9, "tokens_per_step": 2}, "tokens_per_step and threshold cannot be combined"),
    ({"entropy_bound": 0.5, "tokens_per_step": 4}, "tokens_per_step and entropy_bound cannot be combined"),
])
def test_bad_values_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        SamplingSpec(predictor="first_hitting", **options)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sample(JointExactScore(PI[:2, None] * PI[None, :2], Absorbing(2)), Absorbing(2), NOISE, batch_size=1,
               length=2, predictor="first_hitting", **options)


def test_what_is_refused_and_what_is_recorded():
    with pytest.raises(ValueError, match="threshold must be a number"):
        FirstHittingPredictor(threshold=2)
    with pytest.raises(ValueError, match="threshold and entropy_bound cannot be combined"):
        FirstHittingPredictor(threshold=0.5, entropy_bound=1.0)._rule()
    with pytest.raises(ValueError, match="predictor analytic takes no threshold: it applies to the first_hitting"):
        SamplingSpec(threshold=0.9)
    graph = Uniform(5)
    with pytest.raises(ValueError, match="first_hitting samples the absorbing graph only"):
        sample(JointExactScore(PI[:2, None] * PI[None, :2], graph), graph, NOISE, batch_size=1, length=2,
               predictor="first_hitting", threshold=0.9)
    spec = SamplingSpec(predictor="first_hitting", threshold=0.9, tokens_per_step=1)  # k = 1 is no rival
    target = target_for("reverse", graph=Absorbing(5))
    record = spec.record(target)
    assert (record["threshold"], record["entropy_bound"], record["tokens_per_step"]) == (0.9, None, 1)
    assert spec.describe(target) == "first_hitting sampler, threshold 0.9"
    assert SamplingSpec(steps=8).record(target)["threshold"] is None


def test_the_harness_takes_the_rules_as_model_args():
    harness = pytest.importorskip("sedd.harness")
    args = harness.check_model_args({"pretrained": "x", "predictor": "first_hitting", "entropy_bound": "0.5"})
    assert args["spec"].entropy_bound == 0.5 and args["entropy_bound"] == 0.5
    with pytest.raises(harness.HarnessError, match=r"model_args threshold must be a number in \(0, 1\], got 2"):
        harness.check_model_args({"pretrained": "x", "predictor": "first_hitting", "threshold": "2"})
