"""Nucleus (top-p) and top-k truncation of the reverse steps, both backends.

The truncated distribution is defined once (``sedd.ops.reference.truncate``: the stay option keeps its
probability, the jump probability goes to the kept candidates in proportion); it is checked here
on hand-made rows, and both backends' draws are tested against it by χ² goodness of fit at a tiny
width under the interpreter (several tiles per row on the Triton side).
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sedd import ops
from sedd.graph import Absorbing, Uniform
from sedd.ops import reference
from tests.helpers import chi2_pvalue

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

V = 21
DRAWS = 3000


def test_truncate_keeps_the_stay_probability_and_the_defined_candidates():
    # x_t = 0 (stay 0.4); candidates 0.2, 0.15, 0.15, 0.05, 0.05 (mass 0.6)
    p = torch.tensor([[0.4, 0.2, 0.15, 0.15, 0.05, 0.05]])
    x = torch.tensor([0])
    keep = reference.truncation_keep(p, x, top_k=2)  # the 2nd largest is 0.15: the tie is kept
    assert keep.tolist() == [[False, True, True, True, False, False]]
    # top-p 0.5 of 0.6 = 0.3: 0.2 < 0.3, 0.2 + 0.15 ≥ 0.3 at a 0.15, so both 0.15 are kept
    assert reference.truncation_keep(p, x, top_p=0.5).tolist() == [[False, True, True, True, False, False]]
    assert reference.truncation_keep(p, x, top_p=0.3).tolist() == [[False, True, False, False, False, False]]
    # top-k first, then top-p on what it kept: 0.55 · 0.5 = 0.275 is crossed at the first 0.15
    assert reference.truncation_keep(p, x, top_k=2, top_p=0.55).tolist() == [[False, True, True, True, False, False]]
    q = reference.truncate(p, x, top_p=0.3)
    torch.testing.assert_close(q, torch.tensor([[0.4, 0.6, 0, 0, 0, 0]]))
    q = reference.truncate(p, x, top_k=2)
    torch.testing.assert_close(q, torch.tensor([[0.4, 0.6 * 0.2 / 0.5, 0.6 * 0.15 / 0.5, 0.6 * 0.15 / 0.5, 0, 0]]))
    assert reference.truncate(p, x) is p
    # a row that cannot move (absorbing, not MASK) is left alone
    fixed = torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.equal(reference.truncate(fixed, torch.tensor([1]), top_p=0.1, top_k=1), fixed)


def _graph(name):
    return Absorbing(V - 1) if name == "absorb" else Uniform(V)


def _batch(graph, seed):
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(V, generator=g) * 1.5
    log_score = row.expand(4, DRAWS // 4, V).contiguous()
    x_t = torch.full((4, DRAWS // 4), graph.mask_id if graph.absorbing else 3)
    return log_score, x_t


def _step(kind, log_score, x_t, graph, seed, block_v=None, **trunc):
    B = log_score.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if kind == "euler":  # the candidates' total weight ≈ 0.6: the stay option matters
        row = log_score[0, 0].clone()
        row[x_t[0, 0]] = -math.inf
        coef = 0.6 / (math.exp(torch.logsumexp(row, 0).item()) / (1 if graph.absorbing else graph.N))
        return ops.euler_step(log_score, x_t, torch.full((B,), coef), 1.0, graph, gen, block_v=block_v, **trunc)
    fn = ops.analytic_step if kind == "analytic" else ops.denoise_step
    return fn(log_score, x_t, torch.full((B,), 0.7), graph, gen, block_v=block_v, **trunc)


def _truncated_probs(kind, log_score, x_t, graph, **trunc):
    one, x1 = log_score[:1, :1], x_t[:1, :1]
    B = 1
    if kind == "euler":
        row = one[0, 0].clone()
        row[x1[0, 0]] = -math.inf
        coef = 0.6 / (math.exp(torch.logsumexp(row, 0).item()) / (1 if graph.absorbing else graph.N))
        probs = reference.euler_probs(one, x1, torch.full((B,), coef), torch.ones(B), graph)
    elif kind == "analytic":
        probs = reference.analytic_probs(one, x1, torch.full((B,), 0.7), graph)
    else:
        probs = reference.denoise_probs(one, x1, torch.full((B,), 0.7), graph)
    return reference.truncate(probs, x1, **trunc)[0, 0]


TRUNCS = [dict(top_p=0.6), dict(top_k=3), dict(top_k=6, top_p=0.8)]


@pytest.mark.parametrize("trunc", range(len(TRUNCS)))
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_truncated_draws_fit_the_truncated_distribution(backend, graph_name, kind, trunc):
    trunc = TRUNCS[trunc]
    graph = _graph(graph_name)
    log_score, x_t = _batch(graph, seed=len(kind))
    with ops.use_backend(backend):  # three tiles per row on the Triton side
        draws = _step(kind, log_score, x_t, graph, 5, block_v=8 if backend == "triton" else None, **trunc)
        assert ops.last_backend() == backend
    probs = _truncated_probs(kind, log_score, x_t, graph, **trunc)
    assert (probs > 0).sum() < (_truncated_probs(kind, log_score, x_t, graph) > 0).sum()  # it truncates
    assert chi2_pvalue(draws, probs) > 1e-3  # cells of probability 0 must never be drawn
    if kind == "denoise" and graph.absorbing:
        assert (draws != graph.mask_id).all()


def test_bad_truncation_arguments_raise():
    graph = _graph("absorb")
    log_score, x_t = _batch(graph, 0)
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(top_p=True), dict(top_k=0), dict(top_k=2.0)):
        for backend in ("torch", "triton"):
            with ops.use_backend(backend), pytest.raises(ValueError, match="top_[pk]"):
                _step("analytic", log_score[:1, :2], x_t[:1, :2], graph, 0, **bad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampler_takes_top_p_and_top_k(backend):
    from sedd.noise import LogLinear
    from sedd.sampling import sample
    from tests.helpers import FactorizedScore

    graph = Absorbing(V - 1)
    pi = torch.softmax(torch.randn(V - 1, generator=torch.Generator().manual_seed(1)) * 2, 0)
    model = FactorizedScore(pi, graph)
    with ops.use_backend(backend):
        x = sample(model, graph, LogLinear(), batch_size=2, length=8, steps=4, top_p=0.5, top_k=3,
                   generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 8) and (x < graph.N).all()
    keep = reference.truncation_keep(torch.cat([pi, torch.zeros(1)])[None], torch.tensor([graph.mask_id]), 0.5, 3)[0]
    # the final denoising step of a factorised score draws from π truncated: only kept tokens appear
    assert keep[x].all()
    with pytest.raises(ValueError, match="top_p"):
        sample(model, graph, LogLinear(), batch_size=1, length=2, steps=1, top_p=2.0)


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_score_beyond_the_fp32_exp_range_truncates_to_its_token(backend, graph_name):
    """e^100 overflows fp32: the kept set and the stay share must come from log space, or the
    step keeps MASK / returns token 0 instead of the one token that carries all the weight."""
    W = 50
    graph = Absorbing(W - 1) if graph_name == "absorb" else Uniform(W)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 16, W, generator=g)
    x_t = torch.full((2, 16), graph.mask_id if graph.absorbing else 3)
    fixed = torch.zeros_like(x_t, dtype=torch.bool)
    if graph.absorbing:
        fixed[:, ::4] = True
        x_t[fixed] = 11  # real tokens never move
    z[..., 7] = 100.0
    with ops.use_backend(backend):
        denoised = ops.denoise_step(z, x_t, torch.full((2,), 0.5), graph, torch.Generator().manual_seed(1), top_k=5,
                                    block_v=16 if backend == "triton" else None)
        stepped = ops.euler_step(z, x_t, torch.full((2,), 0.5), 0.01, graph, torch.Generator().manual_seed(2),
                                 top_p=0.9, block_v=16 if backend == "triton" else None)
        assert ops.last_backend() == backend
    for out in (denoised, stepped):
        assert (out[~fixed] == 7).all(), out
        assert torch.equal(out[fixed], x_t[fixed])


def test_top_p_one_keeps_every_candidate_of_a_gpt2_wide_row():
    # a 50257-wide softmax(3·randn) row: fp32's running sum stalls below the tail (49654 kept)
    p = torch.softmax(3 * torch.randn(50257, generator=torch.Generator().manual_seed(0)), 0)[None]
    x = torch.tensor([0])
    assert torch.equal(reference.truncation_keep(p, x, top_p=1.0), reference.truncation_keep(p, x))
    assert int(reference.truncation_keep(p, x, top_p=1.0).sum()) == 50256


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_top_p_one_is_the_untruncated_step(backend):
    graph = _graph("uniform")
    log_score, x_t = _batch(graph, seed=2)
    log_score, x_t = log_score[:, :50], x_t[:, :50]
    with ops.use_backend(backend):
        for kind in ("euler", "analytic", "denoise"):
            plain = _step(kind, log_score, x_t, graph, 9)
            assert torch.equal(_step(kind, log_score, x_t, graph, 9, top_p=1.0), plain), kind


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_eager_truncated_draws_fit_over_many_tiles(graph_name, kind):
    """The eager step races tiles of 256 columns above 1024: kept candidates spread over several
    tiles (one of them partial), drawn at the truncated distribution's rates."""
    W = 1300
    graph = Absorbing(W - 1) if graph_name == "absorb" else Uniform(W)
    g = torch.Generator().manual_seed(4)
    row = torch.randn(W, generator=g) - 3.0
    row[torch.randperm(W - 1, generator=g)[:30]] += 4.0  # the head, in every tile
    log_score = row.expand(4, DRAWS // 4, W).contiguous()
    x_t = torch.full((4, DRAWS // 4), graph.mask_id if graph.absorbing else 3)
    trunc = dict(top_k=25, top_p=0.8)
    with ops.use_backend("torch"):
        draws = _step(kind, log_score, x_t, graph, 6, **trunc)
    probs = _truncated_probs(kind, log_score, x_t, graph, **trunc)
    kept = probs > 0
    assert kept.sum() > 5 and len({int(i) // 256 for i in kept.nonzero()}) >= 3
    assert chi2_pvalue(draws, probs) > 1e-3


@pytest.mark.parametrize("trunc", range(len(TRUNCS)))
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_log_space_threshold_keeps_the_reference_set(graph_name, kind, trunc):
    """The kernel's kept set {y ≠ x_t : ŝ_y ≥ thr} (``sedd.ops.eager.truncation``) is exactly
    ``reference.truncation_keep`` of the step's probabilities, row by row, ties included."""
    from sedd.ops import eager

    trunc = TRUNCS[trunc]
    W = 60
    graph = Absorbing(W - 1) if graph_name == "absorb" else Uniform(W)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(3, 8, W, generator=g) * 2
    z[0, :4, 20:26] = 1.5  # tied scores around the cut
    x_t = torch.full((3, 8), graph.mask_id) if graph.absorbing else torch.randint(0, W, (3, 8), generator=g)
    scalar = torch.tensor([0.02, 0.4, 3.0])
    shift = torch.tensor([0.3, -1.0, 0.0])
    probs = {"euler": lambda: reference.euler_probs(z, x_t, scalar, 1.0, graph, shift),
             "analytic": lambda: reference.analytic_probs(z, x_t, scalar, graph, shift),
             "denoise": lambda: reference.denoise_probs(z, x_t, scalar, graph, shift)}[kind]()
    want = reference.truncation_keep(probs, x_t, **trunc)
    thr = eager.truncation(kind, z, x_t, scalar, graph, shift, trunc.get("top_p"), trunc.get("top_k"), None)[..., 0]
    s_hat = reference.log_scores(z, x_t, shift)
    got = (s_hat >= thr.unsqueeze(-1)) & (probs > 0) & ~torch.nn.functional.one_hot(x_t, W).bool()
    assert torch.equal(got, want)


class _LargestAllocation(TorchDispatchMode):
    """The largest storage (bytes) any op creates, views of the watched inputs aside."""

    def __init__(self, *inputs):
        super().__init__()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_truncated_step_holds_one_chunk_of_rows_at_a_time(monkeypatch, backend):
    """Sorting a row and its fp64 running sum cost ~30 bytes per score: a truncated step works
    through the rows in chunks, so no temporary grows with B·L (here 64 rows, chunks of 4)."""
    from sedd.ops import eager

    W = 300  # the eager step's rows are a single tile
    graph = Uniform(W)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 16, W, generator=g).to(torch.bfloat16)
    x_t = torch.randint(0, W, (4, 16), generator=g)
    shift = torch.zeros(4)
    monkeypatch.setitem(eager._TRUNC_CHUNK_ELEMENTS, "cpu", 4 * W)
    with ops.use_backend(backend), _LargestAllocation(z, x_t, shift) as spy:
        out = ops.analytic_step(z, x_t, torch.full((4,), 0.3), graph, torch.Generator().manual_seed(1),
                                shift=shift, top_p=0.7, top_k=50)
    assert out.shape == (4, 16)
    # an fp64 or int64 value per score of one chunk; the whole batch in fp32 would be 64 × W × 4
    assert spy.largest <= 4 * W * 8, spy.largest
