"""Forward noising on the "triton" backend (``sedd/kernels/transitions.py``, interpreted on CPU): its law
against p_{t|0}(· | x0) by exact tests with fixed seeds, reproducibility from the generator, and
independence from the block size."""

import math

import pytest
import torch
from scipy import stats

from sedd import ops
from sedd.graph import Absorbing, Uniform
from tests.helpers import chi2_pvalue

P_MIN = 1e-3  # fixed seeds: these are deterministic, the threshold only guards against a wrong law


@pytest.fixture(autouse=True)
def _triton():
    with ops.use_backend("triton"):
        yield


def _noise(x0, sigma, graph, seed):
    out = ops.sample_transition(x0, sigma, graph, torch.Generator().manual_seed(seed))
    assert ops.last_backend() == "triton"
    return out


@pytest.mark.parametrize("sigma", [1e-5, 0.3, 0.7, 5.0, 20.0])
def test_absorbing_masks_with_probability_one_minus_exp_minus_sigma(sigma):
    graph = Absorbing(100)
    n = 40_000
    x0 = torch.randint(0, graph.N, (4, n // 4))
    x_t = _noise(x0, torch.full((4,), sigma), graph, seed=1)
    masked = x_t == graph.mask_id
    assert torch.equal(x_t[~masked], x0[~masked])  # a token either stays or becomes MASK
    p = -math.expm1(-sigma)
    k = int(masked.sum())
    assert stats.binomtest(k, n, p).pvalue > P_MIN, (k, n * p)


@pytest.mark.parametrize("sigma", [0.05, 0.7, 20.0])
def test_uniform_follows_the_transition_law(sigma):
    graph = Uniform(7)
    x0 = torch.full((2, 20_000), 3, dtype=torch.long)
    x_t = _noise(x0, torch.full((2,), sigma), graph, seed=2)
    probs = graph.transition_probs(torch.tensor([3]), torch.tensor([sigma]))[0]
    assert chi2_pvalue(x_t, probs) > P_MIN


def test_uniform_draw_is_uniform_over_a_large_vocabulary():
    graph = Uniform(50257)
    x0 = torch.zeros(1, 100_000, dtype=torch.long)
    x_t = _noise(x0, torch.tensor([30.0]), graph, seed=3)  # 1 − e^{−30}: essentially every token moves
    counts = torch.bincount(x_t.ravel(), minlength=graph.N).double()
    assert int(x_t.min()) >= 0 and int(x_t.max()) < graph.N
    # pooled into 64 equal cells of ids (tests the top bits of the draw) and by id mod 64 (the low bits)
    for cells in (counts[: 50240].reshape(64, -1).sum(1), counts[: 50240].reshape(-1, 64).sum(0)):
        assert stats.chisquare(cells.numpy()).pvalue > P_MIN


def test_per_row_sigma():
    graph = Absorbing(10)
    sigma = torch.tensor([1e-5, 20.0, 1e-5, 20.0])
    x_t = _noise(torch.randint(0, 10, (4, 500)), sigma, graph, seed=4)
    frac = (x_t == graph.mask_id).float().mean(1)
    assert frac[0] < 0.01 and frac[2] < 0.01 and frac[1] == 1 and frac[3] == 1


@pytest.mark.parametrize("graph", [Absorbing(50), Uniform(50)], ids=repr)
def test_same_seed_same_noise_other_seed_other_noise(graph):
    x0 = torch.randint(0, 50, (3, 700))
    sigma = torch.tensor([0.3, 1.0, 3.0])
    a = _noise(x0, sigma, graph, seed=7)
    b = _noise(x0, sigma, graph, seed=7)
    c = _noise(x0, sigma, graph, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = torch.Generator().manual_seed(7)
    first, second = (ops.sample_transition(x0, sigma, graph, g) for _ in range(2))
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances


@pytest.mark.parametrize("absorbing", [True, False])
def test_result_does_not_depend_on_block_size(absorbing):
    x0 = torch.randint(0, 30, (5, 333))
    sigma = torch.linspace(0.1, 3.0, 5)
    seed = torch.tensor([12345])
    outs = [torch.ops.sedd.sample_transition(x0, sigma, seed, absorbing, 30, block) for block in (0, 64, 256, 2048)]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8], ids=str)
def test_keeps_the_token_dtype(dtype):
    graph = Absorbing(20)
    x0 = torch.randint(0, 20, (2, 50)).to(dtype)
    x_t = _noise(x0, torch.tensor([0.5, 2.0]), graph, seed=0)
    assert x_t.dtype == dtype and x_t.shape == x0.shape
    moved = x_t != x0
    assert torch.all(x_t[moved] == graph.mask_id)


def test_non_contiguous_input():
    graph = Uniform(9)
    x0 = torch.randint(0, 9, (40, 3)).T  # [3, 40], not contiguous
    want = _noise(x0.contiguous(), torch.ones(3), graph, seed=5)
    assert torch.equal(_noise(x0, torch.ones(3), graph, seed=5), want)


def test_bad_input_raises_before_launch(monkeypatch):
    import sedd.kernels.transitions

    def boom(*a, **k):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(sedd.kernels.transitions, "sample_transition", boom)
    graph = Absorbing(10)
    x0 = torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match="x0 holds id 10"):
        ops.sample_transition(torch.full((2, 5), 10), torch.ones(2), graph)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        ops.sample_transition(x0, torch.tensor([1.0, 0.0]), graph)
    with pytest.raises(ValueError, match="sigma must be finite"):
        ops.sample_transition(x0, torch.tensor([1.0, float("nan")]), graph)
    with pytest.raises(ValueError, match="sigma must have shape"):
        ops.sample_transition(x0, torch.ones(3), graph)
    with pytest.raises(TypeError, match="generator"):
        ops.sample_transition(x0, torch.ones(2), graph, generator=0)
    with pytest.raises(TypeError, match="x0"):
        ops.sample_transition(x0.float(), torch.ones(2), graph)
    with pytest.raises(AssertionError, match="kernel launched"):
        ops.sample_transition(x0, torch.ones(2), graph)


def test_opcheck_sample_transition():
    x0 = torch.randint(0, 10, (2, 8))
    args = (x0, torch.tensor([0.5, 1.5]), torch.tensor([3]), True, 10, 0)
    torch.library.opcheck(torch.ops.sedd.sample_transition, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_cpu(monkeypatch):
    monkeypatch.setenv("SEDD_CHECK_VALUES", "0")
    graph = Uniform(40)
    x0 = torch.randint(0, 40, (2, 64))
    sigma = torch.tensor([0.5, 2.0])
    torch._dynamo.reset()
    fn = torch.compile(lambda x: ops.sample_transition(x, sigma, graph), fullgraph=True, backend="aot_eager")
    torch.manual_seed(11)
    got = fn(x0)
    torch.manual_seed(11)
    want = ops.sample_transition(x0, sigma, graph)
    assert torch.equal(got, want)
