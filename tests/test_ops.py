"""sedd.ops: backend selection, argument checks, and the eager steps drawing from *_probs."""

import os

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing, Uniform
from sedd.ops import reference
from tests.helpers import chi2_pvalue


def _args(B=2, L=3, V=6):
    log_score = torch.randn(B, L, V)
    x0 = torch.randint(0, V - 1, (B, L))
    x_t = x0.clone()
    x_t[:, 0] = V - 1
    return log_score, torch.full((B,), 0.5), x_t, x0


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def test_auto_runs_eager_on_cpu_and_reports_it():
    log_score, sigma, x_t, x0 = _args()
    with ops.use_backend("auto"):
        ops.score_entropy(log_score, sigma, x_t, x0, "absorb")
    assert ops.last_backend() == "torch"
    assert ops.resolve_backend("cpu") == "torch"


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv("SEDD_BACKEND", "torch")
    assert ops.get_backend() == "torch"
    with ops.use_backend("triton"):
        assert ops.get_backend() == "triton"
        with ops.use_backend("auto"):
            assert ops.get_backend() == "auto"
    assert ops.get_backend() == "torch"
    monkeypatch.setenv("SEDD_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="SEDD_BACKEND"):
        ops.get_backend()
    with pytest.raises(ValueError, match="backend"):
        with ops.use_backend("jax"):
            pass


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    log_score, sigma, x_t, x0 = _args()
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.score_entropy(log_score, sigma, x_t, x0, "absorb")
    assert os.environ["TRITON_INTERPRET"] == "0"


# ---------------------------------------------------------------------------------------------
# Bad input raises, naming the argument
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(log_score=a["log_score"].numpy()), TypeError, "log_score"),
        (lambda a: a.update(log_score=a["log_score"].long()), TypeError, "log_score"),
        (lambda a: a.update(log_score=a["log_score"][0]), ValueError, "log_score"),
        (lambda a: a.update(log_score=torch.randn(2, 3, 1)), ValueError, "V >= 2"),
        (lambda a: a.update(x_t=a["x_t"].float()), TypeError, "x_t"),
        (lambda a: a.update(x_t=a["x_t"][:, :2]), ValueError, "x_t"),
        (lambda a: a["x_t"].__setitem__((0, 1), 6), ValueError, "x_t holds id 6"),
        (lambda a: a["x_t"].__setitem__((0, 1), -1), ValueError, "x_t holds id -1"),
        (lambda a: a["x0"].__setitem__((1, 1), 5), ValueError, "x0 holds id 5"),
        (lambda a: a.update(sigma=torch.tensor([0.5, 0.0])), ValueError, "sigma must be > 0"),
        (lambda a: a.update(sigma=torch.tensor([0.5, float("nan")])), ValueError, "sigma must be finite"),
        (lambda a: a.update(sigma=torch.tensor([0.5, float("inf")])), ValueError, "sigma must be finite"),
        (lambda a: a.update(sigma=torch.ones(3)), ValueError, "sigma must have shape"),
        (lambda a: a.update(sigma=torch.ones(2, dtype=torch.long)), TypeError, "sigma"),
        (lambda a: a.update(graph=Absorbing(7)), ValueError, "graph"),
        (lambda a: a.update(graph=3), TypeError, "graph"),
        (lambda a: a.update(graph="ising"), ValueError, "graph"),
        (lambda a: a.update(reduction="mean"), ValueError, "reduction"),
        (lambda a: a.update(weight=torch.ones(3)), ValueError, "weight"),
        (lambda a: a.update(shift=torch.ones(2, 2)), ValueError, "shift"),
    ],
)
def test_score_entropy_bad_input(change, error, match):
    log_score, sigma, x_t, x0 = _args()
    x0[1, 1] = 4
    a = dict(log_score=log_score, sigma=sigma, x_t=x_t, x0=x0, graph="absorb")
    change(a)
    kwargs = {k: a.pop(k) for k in ("reduction", "weight", "shift") if k in a}
    with pytest.raises(error, match=match):
        ops.score_entropy(a["log_score"], a["sigma"], a["x_t"], a["x0"], a["graph"], **kwargs)


def test_uniform_x0_may_be_any_token_but_absorbing_x0_may_not_be_mask():
    log_score, sigma, x_t, x0 = _args()
    x0[0, 0] = 5
    ops.score_entropy(log_score, sigma, x_t, x0, "uniform")
    with pytest.raises(ValueError, match="x0 holds id 5"):
        ops.score_entropy(log_score, sigma, x_t, x0, "absorb")


@pytest.mark.parametrize("step", ["euler", "analytic", "denoise"])
def test_step_bad_input(step):
    log_score, sigma, x_t, _ = _args()

    def call(log_score=log_score, x_t=x_t, scalar=sigma, graph="absorb", generator=None, **kw):
        if step == "euler":
            return ops.euler_step(log_score, x_t, scalar, kw.get("dt", 0.1), graph, generator)
        fn = ops.analytic_step if step == "analytic" else ops.denoise_step
        return fn(log_score, x_t, scalar, graph, generator)

    call()
    with pytest.raises(ValueError, match="x_t holds id 9"):
        call(x_t=torch.full_like(x_t, 9))
    with pytest.raises(ValueError, match="must be > 0"):
        call(scalar=torch.zeros(2))
    with pytest.raises(ValueError, match="must be finite"):
        call(scalar=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="shape"):
        call(log_score=torch.randn(3, 3, 6))
    with pytest.raises(TypeError, match="generator"):
        call(generator=123)
    if step == "euler":
        with pytest.raises(ValueError, match="dt must be > 0"):
            call(dt=-0.1)


def test_sample_transition_bad_input():
    x0 = torch.randint(0, 5, (2, 4))
    sigma = torch.ones(2)
    with pytest.raises(ValueError, match="dim"):
        ops.sample_transition(x0, sigma, "absorb")
    with pytest.raises(ValueError, match="x0 holds id 5"):
        ops.sample_transition(torch.full((2, 4), 5), sigma, Absorbing(5))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        ops.sample_transition(x0, -sigma, Absorbing(5))
    with pytest.raises(ValueError, match="x0 must be a"):
        ops.sample_transition(x0[0], sigma, Absorbing(5))
    assert ops.sample_transition(x0, sigma, "uniform", dim=5).shape == x0.shape


# ---------------------------------------------------------------------------------------------
# The eager steps draw from the probabilities they claim
# ---------------------------------------------------------------------------------------------

ROWS = 6000


def _draw_and_probs(step, graph, scalar, dtype=torch.float32):
    V = graph.dim
    row = torch.randn(V) * 1.5
    log_score = row.expand(1, ROWS, V).to(dtype)
    x_t = torch.full((1, ROWS), V - 1 if graph.absorbing else 1)
    s = torch.tensor([scalar])
    gen = torch.Generator().manual_seed(7)
    if step == "euler":
        draws = ops.euler_step(log_score, x_t, s, 0.05, graph, gen)
        probs = reference.euler_probs(log_score[:, :1], x_t[:, :1], s, 0.05, graph)
    elif step == "analytic":
        draws = ops.analytic_step(log_score, x_t, s, graph, gen)
        probs = reference.analytic_probs(log_score[:, :1], x_t[:, :1], s, graph)
    else:
        draws = ops.denoise_step(log_score, x_t, s, graph, gen)
        probs = reference.denoise_probs(log_score[:, :1], x_t[:, :1], s, graph)
    return draws, probs[0, 0]


@pytest.mark.parametrize("graph", [Absorbing(6), Uniform(5), Uniform(2)], ids=repr)
@pytest.mark.parametrize("step", ["euler", "analytic", "denoise"])
@pytest.mark.parametrize("scalar", [1e-4, 0.5, 8.0])
def test_eager_steps_match_their_probabilities(graph, step, scalar):
    with ops.use_backend("torch"):
        draws, probs = _draw_and_probs(step, graph, scalar)
    assert chi2_pvalue(draws, probs) > 1e-3
    if step == "denoise" and graph.absorbing:
        assert (draws != graph.mask_id).all()


def test_goodness_of_fit_has_power():
    with ops.use_backend("torch"):
        draws, probs = _draw_and_probs("analytic", Absorbing(6), 0.5)
    wrong = probs.roll(1)
    assert chi2_pvalue(draws, wrong + 1e-3) < 1e-6


def test_absorbing_steps_leave_real_tokens_alone():
    graph = Absorbing(9)
    log_score = torch.randn(2, 50, 10) * 3
    x_t = torch.randint(0, 10, (2, 50))
    for out in (
        ops.euler_step(log_score, x_t, torch.ones(2), 0.5, graph),
        ops.analytic_step(log_score, x_t, torch.ones(2), graph),
        ops.denoise_step(log_score, x_t, torch.ones(2), graph),
    ):
        real = x_t != graph.mask_id
        assert torch.equal(out[real], x_t[real])


def test_steps_are_seeded():
    log_score = torch.randn(2, 40, 8)
    x_t = torch.full((2, 40), 7)
    one = ops.analytic_step(log_score, x_t, torch.ones(2), "absorb", torch.Generator().manual_seed(3))
    two = ops.analytic_step(log_score, x_t, torch.ones(2), "absorb", torch.Generator().manual_seed(3))
    three = ops.analytic_step(log_score, x_t, torch.ones(2), "absorb", torch.Generator().manual_seed(4))
    assert torch.equal(one, two) and not torch.equal(one, three)


def test_value_checks_context_manager(monkeypatch):
    log_score, sigma, x_t, x0 = _args()
    bad_sigma = torch.tensor([0.5, -1.0])
    with pytest.raises(ValueError, match="sigma must be > 0"):
        ops.score_entropy(log_score, bad_sigma, x_t, x0, "absorb")
    with ops.value_checks(False):
        ops.score_entropy(log_score, bad_sigma, x_t, x0, "absorb")  # not checked: no device sync
        with ops.value_checks(True), pytest.raises(ValueError, match="sigma"):
            ops.score_entropy(log_score, bad_sigma, x_t, x0, "absorb")
    monkeypatch.setenv("SEDD_CHECK_VALUES", "0")
    ops.score_entropy(log_score, bad_sigma, x_t, x0, "absorb")
    with ops.value_checks(True), pytest.raises(ValueError, match="sigma"):
        ops.score_entropy(log_score, bad_sigma, x_t, x0, "absorb")
    # the shape, dtype and device checks never switch off
    with ops.value_checks(False), pytest.raises(ValueError, match="x0 must have shape"):
        ops.score_entropy(log_score, sigma, x_t, x0[:, :2], "absorb")


def test_sampler_and_loss_make_no_value_checks_after_their_inputs(monkeypatch):
    """The per-step ops run without device syncs: value checks only where user data comes in."""
    from sedd.graph import Absorbing
    from sedd.losses import score_entropy_loss
    from sedd.noise import LogLinear
    from sedd.sampling import conditioning, sample

    graph, noise = Absorbing(6), LogLinear()
    table = torch.randn(7, 7)
    def model(x, s):
        return (table[x] - torch.log(torch.expm1(s))[:, None, None]).scatter(-1, x.unsqueeze(-1), 0.0)

    checked = []
    from sedd.ops import checks

    real = checks.checking_values
    monkeypatch.setattr(checks, "checking_values", lambda: checked.append(real()) or checked[-1])
    tokens, mask = conditioning(8, {0: [1, 2]})
    sample(model, graph, noise, batch_size=2, length=8, steps=5, fixed_tokens=tokens, fixed_mask=mask)
    assert checked and not any(checked)
    checked.clear()
    score_entropy_loss(model, torch.randint(0, 6, (2, 8)), graph, noise)
    # sample_transition checks x0 and σ (two syncs); score_entropy checks nothing again
    assert checked.count(True) == 2 and checked.count(False) == 4
