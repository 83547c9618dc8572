"""The fused reverse-step kernels (sedd/kernels/sampling.py) under Triton's interpreter.

Samplers are tested by distribution: one small row is replicated into a [B, L, V] batch so a
single launch gives thousands of independent draws, which must fit the reference ``*_probs``
(χ² goodness of fit, fixed seeds). The two-level draw (a race among tiles, then a draw inside the winner) is tested by distribution
for several tile sizes and on rows whose tiles hold very unequal mass. Everything else (seeding,
rows that must not be read, raw output + shift) is tested by exact equality of draws.
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import sedd.kernels._draw as kdraw
import sedd.kernels._noise as knoise
import sedd.kernels.sampling as ks
from sedd import ops
from sedd.graph import Absorbing, Uniform
from sedd.noise import Geometric, LogLinear
from sedd.ops import reference
from sedd.sampling import conditioning, sample
from tests.helpers import FactorizedScore, chi2_pvalue, small_model_config

# the interpreter evaluates masked-off lanes too (log of non-positive weights there is discarded)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

V_ODD = 37  # three tiles at block_v = 16, the last one partial
DRAWS = 4000


def _graph(name, V):
    return Absorbing(V - 1) if name == "absorb" else Uniform(V)


def _batch(graph, V, n=DRAWS, B=4, spread=2.0, seed=0, dtype=torch.float32):
    """n draws of one row: log_score [B, n/B, V] (identical rows), x_t MASK (absorbing) or V − 1."""
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(V, generator=g) * spread
    log_score = row.to(dtype).expand(B, n // B, V).contiguous()
    x_t = torch.full((B, n // B), graph.mask_id if graph.absorbing else V - 1)
    return log_score, x_t


def _step(kind, log_score, x_t, scalar, graph, generator=None, shift=None, dt=None, block_v=None, **trunc):
    B = log_score.shape[0]
    scalar = torch.full((B,), float(scalar))
    if kind == "euler":
        return ops.euler_step(log_score, x_t, scalar, dt, graph, generator, shift=shift, block_v=block_v, **trunc)
    fn = ops.analytic_step if kind == "analytic" else ops.denoise_step
    return fn(log_score, x_t, scalar, graph, generator, shift=shift, block_v=block_v, **trunc)


def _probs(kind, log_score, x_t, scalar, graph, shift=None, dt=None):
    B = log_score.shape[0]
    scalar = torch.full((B,), float(scalar))
    one, x1 = log_score[:1, :1], x_t[:1, :1]
    shift = shift[:1] if shift is not None else None
    if kind == "euler":
        return reference.euler_probs(one, x1, scalar[:1], dt, graph, shift)[0, 0]
    if kind == "analytic":
        return reference.analytic_probs(one, x1, scalar[:1], graph, shift)[0, 0]
    return reference.denoise_probs(one, x1, scalar[:1], graph, shift)[0, 0]


# (kind, scalar, dt, target): Euler's scalar is dσ with Δt = dt; analytic Δσ and denoise σ cover
# tiny (1e-4), moderate and large (5+) noise. The row is offset so that the candidates' total
# weight (coefficient · Σ_{y≠x_t} e^{ŝ_y}) equals ``target``: 0.5 leaves the stay / MASK option a
# weight of one half, a target above 1 makes it impossible (a negative weight, never chosen).
CASES = [
    ("euler", 1.0, 0.01, 0.5),
    ("euler", 50.0, 1.0, 3.0),
    ("analytic", 1e-4, None, 0.5),
    ("analytic", 0.3, None, 0.5),
    ("analytic", 0.3, None, 2.0),
    ("analytic", 6.0, None, 0.5),
    ("denoise", 1e-4, None, 0.5),
    ("denoise", 0.5, None, 0.5),
    ("denoise", 8.0, None, 0.5),
]


def _offset_to_target(log_score, x_t, graph, kind, scalar, dt, target):
    """Shift every row so that coef · Σ_{y≠x_t} e^{ŝ_y} = target."""
    if kind == "euler":
        coef = scalar * dt / (1 if graph.absorbing else graph.N)
    else:
        coef = math.expm1(scalar) / (1 if graph.absorbing else graph.N)
    row = log_score[0, 0].float().clone()
    row[x_t[0, 0]] = -math.inf
    offset = math.log(target / coef) - torch.logsumexp(row, 0).item()
    return log_score + offset


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_draws_match_reference_probabilities(graph_name, case):
    kind, scalar, dt, target = CASES[case]
    graph = _graph(graph_name, V_ODD)
    log_score, x_t = _batch(graph, V_ODD, spread=1.5, seed=case)
    log_score = _offset_to_target(log_score, x_t, graph, kind, scalar, dt, target)
    with ops.use_backend("triton"):  # tiles of 16: several per row
        draws = _step(kind, log_score, x_t, scalar, graph, torch.Generator().manual_seed(7), dt=dt, block_v=16)
        assert ops.last_backend() == "triton"
    probs = _probs(kind, log_score, x_t, scalar, graph, dt=dt)
    if kind == "denoise" and graph.absorbing:
        assert (draws != graph.mask_id).all()
    if target > 1 and (kind == "euler" or graph.absorbing):
        assert (draws != x_t).all()  # the stay / MASK weight is negative: never chosen
    assert chi2_pvalue(draws, probs) > 1e-3
    # the stay / MASK cell on its own (χ² over 37 cells dilutes a bias in one cell)
    p_stay, n = probs[x_t[0, 0]].item(), draws.numel()
    stays = int((draws == x_t).sum())
    assert abs(stays - n * p_stay) <= 4.5 * math.sqrt(n * p_stay * (1 - p_stay)) + 1e-9, (stays, n * p_stay)


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_width_two(graph_name, kind):
    graph = _graph(graph_name, 2)
    log_score, x_t = _batch(graph, 2, n=2000, spread=0.5)
    with ops.use_backend("triton"):
        draws = _step(kind, log_score, x_t, 0.7, graph, torch.Generator().manual_seed(1), dt=0.5)
    assert chi2_pvalue(draws, _probs(kind, log_score, x_t, 0.7, graph, dt=0.5)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input(dtype):
    graph = Absorbing(V_ODD - 1)
    log_score, x_t = _batch(graph, V_ODD, dtype=dtype)
    with ops.use_backend("triton"):
        draws = _step("analytic", log_score, x_t, 0.5, graph, torch.Generator().manual_seed(2))
    assert chi2_pvalue(draws, _probs("analytic", log_score, x_t, 0.5, graph)) > 1e-3


def test_seeding():
    graph = Uniform(V_ODD)
    log_score, x_t = _batch(graph, V_ODD, n=400)
    with ops.use_backend("triton"):
        a = _step("analytic", log_score, x_t, 1.0, graph, torch.Generator().manual_seed(3))
        b = _step("analytic", log_score, x_t, 1.0, graph, torch.Generator().manual_seed(3))
        c = _step("analytic", log_score, x_t, 1.0, graph, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == x_t.dtype and a.shape == x_t.shape


@pytest.mark.slow
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_every_block_size_draws_from_the_reference_distribution(graph_name, kind):
    """The tile partition changes which noise a draw uses (the tile race has one Exp(1) per tile),
    not the distribution: several (block_v, block_r), one tile per column pair up to one per row,
    each over several programs (2, 4, 8: under the interpreter each program costs its Python, and
    which rows share one changes no draw)."""
    graph = _graph(graph_name, V_ODD)
    scalar, dt = 0.4, 0.5
    log_score, x_t = _batch(graph, V_ODD, n=2048, B=2, spread=1.5, seed=5)
    log_score = _offset_to_target(log_score, x_t, graph, kind, scalar, dt, 0.6)
    probs = _probs(kind, log_score, x_t, scalar, graph, dt=dt)
    s = torch.full((2,), scalar * (dt if kind == "euler" else 1.0))
    for i, (bv, br) in enumerate([(4, 1024), (16, 512), (64, 256)]):
        draws = ks.reverse_step(kind, log_score, x_t, s, graph.absorbing, graph.N, seed=torch.tensor([99 + i]),
                                block_v=bv, block_r=br)
        assert chi2_pvalue(draws, probs) > 1e-3, (bv, br)


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic"])
def test_tile_race_with_very_unequal_tiles(graph_name, kind):
    """The two-level draw: four tiles of 16 columns holding ~90 %, ~9 %, ~1 % and ~0.1 % of the
    candidates' mass (uneven inside each tile too), plus a stay / MASK option of weight ~0.4. A
    tile race with the wrong odds (e.g. without its noise) or a wrong draw inside the winning
    tile moves whole tiles' worth of probability."""
    V = 64
    graph = _graph(graph_name, V)
    g = torch.Generator().manual_seed(21)
    row = torch.randn(V, generator=g) * 0.7
    for t, mass in enumerate([0.9, 0.09, 0.009, 0.0009]):
        part = slice(16 * t, 16 * t + 16)
        row[part] += math.log(mass) - torch.logsumexp(row[part], 0)
    order = [1, 3, 0, 2]  # the heavy tile is not the first one
    row = torch.cat([row[16 * t:16 * t + 16] for t in order])
    n = 6000
    log_score = row.expand(2, n // 2, V).contiguous()
    x_t = torch.full((2, n // 2), graph.mask_id if graph.absorbing else 5)
    scalar, dt = 0.3, 0.5
    log_score = _offset_to_target(log_score, x_t, graph, kind, scalar, dt, 0.6)
    probs = _probs(kind, log_score, x_t, scalar, graph, dt=dt)
    s = torch.full((2,), scalar * (dt if kind == "euler" else 1.0))
    draws = ks.reverse_step(kind, log_score, x_t, s, graph.absorbing, graph.N, seed=torch.tensor([5]),
                            block_v=16, block_r=2048)  # three programs
    assert chi2_pvalue(draws, probs) > 1e-3
    # the tiles' and the stay option's frequencies on their own
    tile_of = torch.arange(V) // 16
    stay = x_t[0, 0].item()
    for t in range(4):
        cells = (tile_of == t) & (torch.arange(V) != stay)
        p = probs[cells].sum().item()
        hits = int(cells[draws].sum())
        assert abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1, (t, hits, n * p)
    p = probs[stay].item()
    hits = int((draws == stay).sum())
    assert abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1, (hits, n * p)


@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_absorbing_fixed_rows_are_not_read_and_never_change(kind):
    graph = Absorbing(V_ODD - 1)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 40, V_ODD, generator=g)
    x_t = torch.randint(0, V_ODD - 1, (3, 40), generator=g)
    x_t[:, ::3] = graph.mask_id
    x_t[1] = 4  # a whole sequence of fixed positions
    poisoned = z.clone()
    poisoned[x_t != graph.mask_id] = float("nan")
    with ops.use_backend("triton"):
        clean = _step(kind, z, x_t, 0.5, graph, torch.Generator().manual_seed(8), dt=0.1)
        dirty = _step(kind, poisoned, x_t, 0.5, graph, torch.Generator().manual_seed(8), dt=0.1)
    fixed = x_t != graph.mask_id
    assert torch.equal(clean[fixed], x_t[fixed])
    assert torch.equal(clean, dirty)


def test_denoise_never_returns_mask_even_when_mask_dominates():
    graph = Absorbing(V_ODD - 1)
    log_score, x_t = _batch(graph, V_ODD, n=800)
    log_score = log_score - 30.0  # e^{ŝ} ≈ 1e-13: every other step would keep MASK
    with ops.use_backend("triton"):
        draws = _step("denoise", log_score, x_t, 1e-4, graph, torch.Generator().manual_seed(9))
        kept = _step("analytic", log_score, x_t, 1e-4, graph, torch.Generator().manual_seed(9))
    assert (draws != graph.mask_id).all() and (draws < graph.N).all()
    assert (kept == graph.mask_id).all()


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_raw_output_plus_shift_equals_postprocessed_scores(graph_name, kind):
    graph = _graph(graph_name, V_ODD)
    g = torch.Generator().manual_seed(10)
    z = (torch.randn(2, 30, V_ODD, generator=g) * 2).to(torch.bfloat16)
    x_t = torch.randint(0, V_ODD, (2, 30), generator=g)
    shift = torch.tensor([-2.5, 1.5])
    s_hat = reference.log_scores(z, x_t, shift)  # fp32, ŝ[x_t] = 0
    garbage = z.clone()
    garbage.scatter_(-1, x_t.unsqueeze(-1), 1e4)  # the current token's entry is read as 0 whatever it holds
    with ops.use_backend("triton"):
        raw = _step(kind, garbage, x_t, 0.3, graph, torch.Generator().manual_seed(11), shift=shift, dt=0.2)
        post = _step(kind, s_hat, x_t, 0.3, graph, torch.Generator().manual_seed(11), dt=0.2)
    assert torch.equal(raw, post)


# ---------------------------------------------------------------------------------------------
# Noise accuracy
# ---------------------------------------------------------------------------------------------


@triton.jit
def _noise_probe(hi_ptr, lo_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < n
    hi = tl.load(hi_ptr + i, mask=ok, other=0).to(tl.uint32, bitcast=True)
    lo = tl.load(lo_ptr + i, mask=ok, other=0).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + i, knoise.log_exp1_from_bits(hi, lo), mask=ok)


def test_exponential_noise_is_accurate_in_both_tails():
    """log E from 64 random bits against the exact value, from E ≈ 2^-65 to E ≈ 44.

    A fp32 uniform (2^-24 steps near 1) cannot produce E below 6e-8 at all, nor distinguish
    the patterns with hi = 0 below: tokens whose odds are under ~1e-7 would never be drawn.
    """
    M = 0xFFFFFFFF
    pairs = [(0, 0), (0, 1), (0, 12345), (0, 2**31), (1, 0), (7, M), (2**20, 5), (2**28, 0),
             (2**31, 0), (2**31 + 2**30, 77), (M - 5, 0), (M, 2**31), (M, M - 3), (M, M)]
    hi = torch.tensor([np.int32(np.uint32(p[0])) for p in pairs], dtype=torch.int32)
    lo = torch.tensor([np.int32(np.uint32(p[1])) for p in pairs], dtype=torch.int32)
    out = torch.empty(len(pairs))
    _noise_probe[(1,)](hi, lo, out, len(pairs), BLOCK=16)
    for (hi_word, lo_word), got in zip(pairs, out.tolist()):
        k = hi_word * 2**32 + lo_word
        if k < 2**63:  # −log1p(−v), v = (k + ½)/2^64, exact in fp64 here
            exact = math.log(-math.log1p(-(k + 0.5) / 2**64))
        else:  # −log(u), u = (2^64 − k − ½)/2^64
            exact = math.log(-math.log((2**64 - k - 0.5) / 2**64))
        assert abs(got - exact) < 2e-6 * max(1.0, abs(exact)), (hi_word, lo_word, got, exact)
    assert out[0] < -44  # E ≈ 2.7e-20: the lower tail reaches 2^-65


def test_tiny_weight_group_is_drawn_at_its_rate():
    """One dominant token against many tiny ones (odds 8e-5 each): the tiny group's frequency
    matches its probability within binomial error (too-cold noise under-samples it)."""
    V, n = 129, 2500
    graph = Absorbing(V - 1)
    row = torch.full((V,), math.log(8e-5))
    row[0] = 0.0
    log_score = row.expand(1, n, V).contiguous()
    x_t = torch.full((1, n), graph.mask_id)
    with ops.use_backend("triton"):
        draws = ops.denoise_step(log_score, x_t, torch.tensor([1.0]), graph, torch.Generator().manual_seed(12))
    p_tiny = (V - 2) * 8e-5 / (1 + (V - 2) * 8e-5)
    hits = int(((draws != 0) & (draws != graph.mask_id)).sum())
    sd = math.sqrt(n * p_tiny * (1 - p_tiny))
    assert abs(hits - n * p_tiny) < 4 * sd, (hits, n * p_tiny)


# ---------------------------------------------------------------------------------------------
# Argument checks and the full sampler
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises_before_launch(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the kernel launched")

    monkeypatch.setattr(ks, "reverse_step", boom)
    log_score = torch.randn(2, 3, 5)
    x_t = torch.full((2, 3), 4)
    gen = torch.Generator().manual_seed(0)
    with ops.use_backend("triton"):
        with pytest.raises(TypeError, match="log_score"):
            ops.analytic_step(log_score.double(), x_t, torch.ones(2), "absorb", gen)
        with pytest.raises(ValueError, match="x_t"):
            ops.analytic_step(log_score, torch.full((2, 3), 5), torch.ones(2), "absorb", gen)
        with pytest.raises(ValueError, match="x_t"):
            ops.denoise_step(log_score, x_t[:, :2], torch.ones(2), "absorb", gen)
        with pytest.raises(ValueError, match="dsigma"):
            ops.euler_step(log_score, x_t, torch.tensor([1.0, -1.0]), 0.1, "absorb", gen)
        with pytest.raises(ValueError, match="sigma"):
            ops.denoise_step(log_score, x_t, torch.tensor([1.0, float("nan")]), "uniform", gen)
        with pytest.raises(ValueError, match="shift"):
            ops.analytic_step(log_score, x_t, torch.ones(2), "absorb", gen, shift=torch.zeros(3))
        with pytest.raises(TypeError, match="generator"):
            ops.analytic_step(log_score, x_t, torch.ones(2), "absorb", generator=0)


def test_full_sampler_on_the_triton_backend_respects_conditioning(monkeypatch):
    from sedd.model import SEDD

    torch.manual_seed(0)
    net = SEDD(small_model_config(20)).eval()
    with torch.no_grad():
        net.output_layer.linear.weight.normal_(0, 0.05)
    graph, noise = Absorbing(20), LogLinear()
    L = 12
    tokens, mask = conditioning(L, {0: [3, 4], 9: [7, 7, 1]})
    seen = []
    real = ks.reverse_step

    def spy(kind, z, *args, **kwargs):
        seen.append((kind, z.shape, kwargs.get("shift") is not None))
        return real(kind, z, *args, **kwargs)

    monkeypatch.setattr(ks, "reverse_step", spy)
    with ops.use_backend("triton"):
        x = sample(net, graph, noise, batch_size=2, length=L, steps=3, fixed_tokens=tokens, fixed_mask=mask,
                   generator=torch.Generator().manual_seed(0), masked_only=False)
        y = sample(net, graph, noise, batch_size=2, length=L, steps=3, fixed_tokens=tokens, fixed_mask=mask,
                   generator=torch.Generator().manual_seed(0), masked_only=False)
        full_head_calls = seen[:]
        seen.clear()
        # the default absorbing sampler: the head and the kernel see only the rows still MASK
        z = sample(net, graph, noise, batch_size=2, length=L, steps=3, fixed_tokens=tokens, fixed_mask=mask,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)
    for out in (x, z):
        assert torch.equal(out[:, mask], tokens[mask].expand(2, -1))
        assert (out < graph.N).all()
    # every step ran the fused kernel on the raw output with the σ shift folded in
    # two runs of 3 steps: 3 analytic steps and the final denoiser each
    assert Counter(kind for kind, _, _ in full_head_calls) == {"analytic": 6, "denoise": 2}
    assert all(has_shift and shape == (2, L, 21) for _, shape, has_shift in full_head_calls)
    # masked rows only: step 1 sees every free position (all MASK), later calls no more rows than
    # the step before, at most one call per step (none once no MASK is left)
    free = 2 * int((~mask).sum())
    assert seen[0] == ("analytic", (free, 1, 21), True)
    rows = [shape[0] for _, shape, _ in seen]
    assert rows == sorted(rows, reverse=True) and all(h and s[1:] == (1, 21) for _, s, h in seen)
    counts = Counter(kind for kind, _, _ in seen)
    assert counts["analytic"] <= 3 and counts["denoise"] <= 1 and set(counts) <= {"analytic", "denoise"}


@pytest.mark.slow
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_full_sampler_reproduces_a_product_distribution_on_triton(graph_name):
    pi = torch.tensor([0.05, 0.3, 0.1, 0.35, 0.2])
    graph = _graph(graph_name, 6 if graph_name == "absorb" else 5)
    noise = LogLinear() if graph.absorbing else Geometric()
    with ops.use_backend("triton"):
        x = sample(FactorizedScore(pi, graph), graph, noise, batch_size=20, length=100, steps=6,
                   generator=torch.Generator().manual_seed(0))
    assert chi2_pvalue(x, pi) > 1e-3


def test_strided_scores_and_narrow_token_dtypes():
    """A view with padded rows (stride(1) > V) and int32 ids give the same draws as contiguous int64."""
    graph = Absorbing(V_ODD - 1)
    g = torch.Generator().manual_seed(13)
    wide = torch.randn(2, 20, V_ODD + 5, generator=g)
    z = wide[..., :V_ODD]
    x_t = torch.full((2, 20), graph.mask_id)
    x_t[:, ::4] = 3
    with ops.use_backend("triton"):
        a = ops.analytic_step(z, x_t, torch.ones(2), graph, torch.Generator().manual_seed(14))
        b = ops.analytic_step(z.contiguous(), x_t.int(), torch.ones(2), graph, torch.Generator().manual_seed(14))
    assert b.dtype == torch.int32
    assert torch.equal(a, b.long())


@pytest.mark.parametrize("block_v", [16, 64])
def test_denoise_with_no_real_token_of_positive_weight_gives_token_zero_on_both_backends(block_v):
    # Every real-token score −∞ in some rows: no real token can be drawn, and denoise must still
    # not return MASK. Both backends define the answer as token 0 (the lowest id).
    graph = Absorbing(V_ODD - 1)
    log_score, x_t = _batch(graph, V_ODD, n=64)
    dead = torch.zeros(x_t.shape, dtype=torch.bool)
    dead[:, ::3] = True
    log_score[dead] = -math.inf
    log_score[..., graph.mask_id] = 5.0  # the MASK column is never a candidate, whatever it holds
    draws = {}
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            # 3 tiles per row, or one (the eager backend has no tiles)
            draws[backend] = _step("denoise", log_score, x_t, 0.5, graph, torch.Generator().manual_seed(4),
                                   block_v=block_v if backend == "triton" else None)
    for backend, out in draws.items():
        assert (out[dead] == 0).all(), backend
        assert (out != graph.mask_id).all(), backend
        assert (out[~dead] < graph.N).all(), backend


@triton.jit
def _no_candidate_noise(seed, rows, stream, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, N_ROUNDS: tl.constexpr):
    # log E = +∞ for every column: pass C's keys are all −∞, as when pass A counted a borderline
    # candidate that the later passes' own arithmetic rejects
    return tl.full([BLOCK_R, BLOCK_V], float("inf"), dtype=tl.float32)


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_a_winning_tile_without_a_candidate_in_the_later_passes_keeps_x(monkeypatch, graph_name, kind):
    """The sub-tile and column races finding no candidate in the tile pass A chose must not fall
    back to a column of the tile (a real token, possibly of weight 0): the row keeps x_t (absorbing
    denoise, which never keeps MASK: token 0, the rule for a row with no candidate; uniform
    analytic / denoise: every proposal is rejected, and the general path keeps x_t too)."""
    graph = _graph(graph_name, V_ODD)
    log_score, x_t = _batch(graph, V_ODD, n=64)
    x_t[:, 1::2] = 5  # absorbing: fixed rows; uniform: a current token inside the first tile
    monkeypatch.setattr(kdraw, "_lane_log_noise", _no_candidate_noise)
    with ops.use_backend("triton"):  # three tiles per row: the first column of the winner is 0, 16 or 32
        out = _step(kind, log_score, x_t, 50.0 if kind == "euler" else 2.0, graph, torch.Generator().manual_seed(0),
                    dt=1.0, block_v=16)
    want = x_t.clone()
    if graph.absorbing and kind == "denoise":
        want[x_t == graph.mask_id] = 0
    assert torch.equal(out, want)


# ---------------------------------------------------------------------------------------------
# Where the rows sit in memory, the sub-tiles, the uniform Tweedie rejection
# ---------------------------------------------------------------------------------------------


def _layouts(z: torch.Tensor, pad: int):
    """z [B, L, V] four ways: contiguous; a view of rows padded to a multiple of ``pad`` (each row
    16-byte aligned); a view of rows padded by 3 (misaligned, row stride > V); a copy one element
    into its storage (the base misaligned)."""
    B, L, V = z.shape
    padded = torch.full((B, L, -(-V // pad) * pad), float("nan"), dtype=z.dtype)
    padded[..., :V] = z
    odd_rows = torch.full((B, L, V + 3), float("nan"), dtype=z.dtype)
    odd_rows[..., :V] = z
    shifted = torch.empty(z.numel() + 1, dtype=z.dtype)[1:].view(B, L, V)
    shifted.copy_(z)
    return {"contiguous": z.contiguous(), "padded": padded[..., :V], "odd rows": odd_rows[..., :V],
            "odd offset": shifted}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_draws_do_not_depend_on_where_the_rows_sit_in_memory(graph_name, dtype):
    """The same tokens for the same seed from a contiguous tensor, a view of padded rows (aligned
    or not), and a copy at an odd storage offset: the kernel aligns its windows to 16 bytes itself,
    and the race's tiles stay in column space. Every kind, truncated or not; V = 45 is not a
    multiple of the 16-column tile, so the last window is partial. The padding holds NaN: a read
    of it would show."""
    V = 45
    graph = _graph(graph_name, V)
    g = torch.Generator().manual_seed(31)
    z = (torch.randn(2, 24, V, generator=g) * 2).to(dtype)
    x_t = torch.randint(0, V, (2, 24), generator=g)
    if graph.absorbing:
        x_t[:, ::2] = graph.mask_id
    layouts = _layouts(z, 64)
    for kind in ("euler", "analytic", "denoise"):
        for trunc in ({}, {"top_p": 0.7}):
            draws = {}
            for name, t in layouts.items():
                with ops.use_backend("triton"):
                    draws[name] = _step(kind, t, x_t, 0.4, graph, torch.Generator().manual_seed(5), dt=0.3,
                                        block_v=16, **trunc)
            assert all(torch.equal(d, draws["contiguous"]) for d in draws.values()), (kind, trunc, draws)


@pytest.mark.slow
@pytest.mark.parametrize("graph_name, kind", [("absorb", "euler"), ("absorb", "denoise"), ("uniform", "euler")])
def test_every_sub_tile_width_draws_from_the_reference_distribution(graph_name, kind):
    """Pass B races the winning tile's sub-tiles, pass C the winner's columns: sub-tiles of 2
    columns and of the whole tile, on misaligned bf16 rows (the aligned windows' last columns come
    from the next 16 bytes)."""
    graph = _graph(graph_name, V_ODD)
    scalar, dt = 0.4, 0.5
    log_score, x_t = _batch(graph, V_ODD, n=2048, B=2, spread=1.5, seed=8, dtype=torch.bfloat16)
    log_score = _offset_to_target(log_score.float(), x_t, graph, kind, scalar, dt, 0.6).to(torch.bfloat16)
    probs = _probs(kind, log_score, x_t, scalar, graph, dt=dt)
    s = torch.full((2,), scalar * (dt if kind == "euler" else 1.0))
    for i, sub in enumerate([2, 16]):
        draws = ks.reverse_step(kind, log_score, x_t, s, graph.absorbing, graph.N, seed=torch.tensor([70 + i]),
                                block_v=16, block_r=1024, sub=sub)  # two programs
        assert chi2_pvalue(draws, probs) > 1e-3, sub


@pytest.mark.slow
@pytest.mark.parametrize("proposals", [0, 4])
@pytest.mark.parametrize("dsigma", [0.05, 3.0])
def test_uniform_tweedie_rejection_and_general_path_draw_the_same_distribution(dsigma, proposals):
    """Uniform analytic (and denoise, the same code with Δσ = σ) accepts a proposal
    y ~ s_y·T(x_t, y) with probability (1 − C/s_y)_+, and rows left without one after ``proposals``
    take the general path. Δσ = 0.05 accepts most proposals, Δσ = 3 (e^{−Δσ} = 0.05) rejects most,
    so both paths carry weight; ``proposals`` = 0 is the general path alone. Each must fit the
    reference weights, the current token's cell on its own too."""
    graph = Uniform(V_ODD)
    log_score, x_t = _batch(graph, V_ODD, n=4000, B=2, spread=1.5, seed=12)
    x_t[:, ::2] = 4  # a current token inside the first tile as well as in the last
    draws = ks.reverse_step("analytic", log_score, x_t, torch.full((2,), dsigma), False, graph.N,
                            seed=torch.tensor([40 + proposals]), block_v=16, block_r=1024,
                            proposals=proposals)  # four programs
    for x in (V_ODD - 1, 4):
        mine = draws[x_t == x]
        probs = _probs("analytic", log_score, torch.full_like(x_t, x), dsigma, graph)
        assert chi2_pvalue(mine, probs) > 1e-3, x
        n, p_stay = mine.numel(), probs[x].item()
        stays = int((mine == x).sum())
        assert abs(stays - n * p_stay) <= 4.5 * math.sqrt(n * p_stay * (1 - p_stay)) + 1e-9, (x, stays, n * p_stay)
