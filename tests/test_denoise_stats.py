"""``sedd.ops.denoise_with_stats``: the absorbing denoise step that also returns each position's
confidence max_y p_y and entropy H(p) (what first hitting's adaptive rules read), on both backends
against the fp64 reference, on awkward rows: random, heavy ties, log-scores at fp32's exp range
(±88.7), truncated, padded and misaligned views, bf16. Its tokens are the plain denoise step's."""

import math

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing, Uniform
from sedd.ops import reference

# the interpreter evaluates masked-off lanes too (log of non-positive weights there is discarded)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

N = 300  # a row of 301 columns: two 256-column tiles under the interpreter, the second ragged
GRAPH = Absorbing(N)


def _rows(kind: str, B: int = 2, L: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return 3 * torch.randn(B, L, N + 1, generator=g)
    if kind == "ties":  # few distinct values: ties at every top-p / top-k boundary, and one flat row
        z = torch.randint(0, 3, (B, L, N + 1), generator=g).float()
        z[0, 0] = 1.5
        return z
    if kind == "extreme":  # fp32's exp range at both ends, one row nearly one-hot, one split between two
        z = torch.where(torch.rand(B, L, N + 1, generator=g) < 0.5, -88.7, 88.7)
        z[0, 1] = -88.7
        z[0, 1, 5] = 88.7
        z[0, 2] = -88.7
        z[0, 2, [7, 200]] = 88.7
        return z
    raise ValueError(kind)


def _inputs(z: torch.Tensor):
    B, L = z.shape[:2]
    x = torch.full((B, L), GRAPH.mask_id)
    x[1, 0] = 4  # a position that is not MASK keeps its token: (1, 0)
    sigma = torch.linspace(0.2, 3.0, B)
    shift = torch.linspace(-0.5, 0.25, B)
    return x, sigma, shift


TRUNCATIONS = [{}, {"top_p": 0.9}, {"top_p": 0.3}, {"top_k": 1}, {"top_k": 7}, {"top_p": 0.5, "top_k": 20}]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["random", "ties", "extreme"])
@pytest.mark.parametrize("trunc", TRUNCATIONS, ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()) or "full")
def test_stats_match_the_reference_and_the_tokens_are_the_denoise_steps(one_thread, backend, kind, trunc):
    z = _rows(kind)
    x, sigma, shift = _inputs(z)
    # the oracle in fp64: no overflow of e^{ŝ} at ±88.7, exact ties
    want_c, want_h = reference.denoise_stats(z.double(), x, sigma, GRAPH, shift.double(), **trunc)
    with ops.use_backend(backend):
        tokens, conf, ent = ops.denoise_with_stats(z, x, sigma, GRAPH, torch.Generator().manual_seed(3), shift=shift,
                                                   **trunc)
        plain = ops.denoise_step(z, x, sigma, GRAPH, torch.Generator().manual_seed(3), shift=shift, **trunc)
    assert ops.last_backend() == backend
    assert torch.equal(tokens, plain)
    assert conf.dtype == ent.dtype == torch.float32 and conf.shape == ent.shape == x.shape
    torch.testing.assert_close(conf, want_c, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ent, want_h, atol=1e-5, rtol=1e-5)
    assert conf[1, 0] == 1 and ent[1, 0] == 0 and tokens[1, 0] == 4
    assert bool(((conf > 0) & (conf <= 1) & (ent >= 0) & (ent <= math.log(N) + 1e-5)).all())
    if kind == "extreme" and not trunc:
        torch.testing.assert_close(conf[0, 1:3], torch.tensor([1.0, 0.5]))
        torch.testing.assert_close(ent[0, 1:3], torch.tensor([0.0, math.log(2)]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_row_without_weight_takes_token_0_with_certainty(backend):
    z = _rows("random")
    z[0, 2, :N] = -torch.inf  # every real token impossible
    x, sigma, shift = _inputs(z)
    with ops.use_backend(backend):
        tokens, conf, ent = ops.denoise_with_stats(z, x, sigma, GRAPH, torch.Generator().manual_seed(0), shift=shift)
    assert tokens[0, 2] == 0 and conf[0, 2] == 1 and ent[0, 2] == 0
    want_c, want_h = reference.denoise_stats(z.double(), x, sigma, GRAPH, shift.double())
    torch.testing.assert_close(conf, want_c, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ent, want_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["padded", "misaligned", "bf16"])
def test_views_and_bf16_give_the_contiguous_rows_statistics(one_thread, backend, layout):
    """A view of rows padded to 320 columns (the aligned head's), rows at an odd storage offset (the
    kernel's misaligned windows), and bf16 scores (against the reference on the same bf16 values)."""
    z = _rows("random", B=2, L=3, seed=4)
    x, sigma, shift = _inputs(z)
    if layout == "padded":
        held = torch.full((2, 3, 320), float("nan"))
        held[..., : N + 1] = z
        view = held[..., : N + 1]
    elif layout == "misaligned":
        flat = torch.empty(z.numel() + 1)
        view = flat[1:].view(z.shape)
        view.copy_(z)
    else:
        view = z.bfloat16()
        z = view.float()
    with ops.use_backend(backend):
        got = ops.denoise_with_stats(view, x, sigma, GRAPH, torch.Generator().manual_seed(1), shift=shift, top_p=0.8)
        want = ops.denoise_with_stats(z.contiguous(), x, sigma, GRAPH, torch.Generator().manual_seed(1), shift=shift,
                                      top_p=0.8)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-6)


def test_one_real_token():
    """V = 2 (N = 1): the only token, with certainty, on both backends."""
    z = torch.randn(2, 3, 2)
    x = torch.full((2, 3), 1)
    for backend in ("torch", "triton"):
        with ops.use_backend(backend):
            tokens, conf, ent = ops.denoise_with_stats(z, x, torch.ones(2), Absorbing(1))
        assert bool((tokens == 0).all() & (conf == 1).all() & (ent == 0).all())


def test_the_uniform_graph_is_a_one_line_error():
    z = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="denoise_with_stats samples the absorbing graph only .*got the uniform"):
        ops.denoise_with_stats(z, torch.zeros(1, 2, dtype=torch.long), torch.ones(1), Uniform(5))


def test_opcheck_denoise_stats():
    z = torch.randn(2, 3, 13)
    x = torch.full((2, 3), 12)
    seed = torch.zeros(1, dtype=torch.long)
    for shift, trunc in ((None, None), (torch.zeros(2), torch.zeros(2, 3, 2))):
        args = (z, x, torch.full((2,), 0.4), shift, seed, 12, 0, trunc)
        torch.library.opcheck(torch.ops.sedd.denoise_stats, args, test_utils=("test_schema", "test_faketensor"))
