"""The per-token score entropy: the closed forms against the defining sum, its minimum, its
gradients, and the public ``sedd.ops.score_entropy`` on the eager backend."""

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing, Uniform
from sedd.ops import reference
from tests.helpers import expm, full_Q

SIGMAS = [1e-5, 0.3, 0.7, 5.0, 20.0]


def _defining_sum(graph, log_score_row, sigma, x_t, x0):
    """Σ_{y≠x_t} Q(x_t, y)·[s_y − a_y log s_y + a_y(log a_y − 1)] with a_y = p(y|x0)/p(x_t|x0)."""
    P = expm(graph, sigma)
    a = P[:, x0] / P[x_t, x0]
    w = full_Q(graph)[x_t]
    total = torch.zeros((), dtype=torch.float64)
    for y in range(graph.dim):
        if y == x_t or w[y] == 0:
            continue
        K = a[y] * (torch.log(a[y]) - 1) if a[y] > 0 else 0.0
        total = total + w[y] * (log_score_row[y].exp() - a[y] * log_score_row[y] + K)
    return total


def _reachable_pairs(graph):
    pairs = []
    for x0 in range(graph.N):
        for x_t in range(graph.dim):
            if graph.absorbing and x_t not in (x0, graph.mask_id):
                continue
            pairs.append((x_t, x0))
    return pairs


@pytest.mark.parametrize("graph", [Absorbing(5), Uniform(6), Uniform(2), Absorbing(1)], ids=repr)
@pytest.mark.parametrize("sigma", [1e-3, 0.3, 0.7, 5.0])
def test_closed_form_equals_defining_sum(graph, sigma):
    pairs = _reachable_pairs(graph)
    x_t = torch.tensor([[p[0] for p in pairs]])
    x0 = torch.tensor([[p[1] for p in pairs]])
    log_score = torch.randn(1, len(pairs), graph.dim, dtype=torch.float64)
    got = reference.score_entropy(log_score, torch.tensor([sigma], dtype=torch.float64), x_t, x0, graph)
    for i, (xt, x) in enumerate(pairs):
        row = log_score[0, i].clone()
        row[xt] = 0.0
        want = _defining_sum(graph, row, sigma, xt, x)
        torch.testing.assert_close(got[0, i], want, rtol=1e-7, atol=1e-9)
        assert got[0, i] >= 0


@pytest.mark.parametrize("graph", [Absorbing(5), Uniform(6)], ids=repr)
@pytest.mark.parametrize("sigma", [1e-3, 0.7, 5.0])
def test_zero_at_true_ratios_and_positive_elsewhere(graph, sigma):
    P = expm(graph, sigma)
    for x_t, x0 in _reachable_pairs(graph):
        ratio = P[:, x0] / P[x_t, x0]
        # a zero ratio is approached by a very negative log-score
        true = torch.where(ratio > 0, ratio.clamp_min(1e-300).log(), torch.full_like(ratio, -200.0))
        args = (torch.tensor([sigma], dtype=torch.float64), torch.tensor([[x_t]]), torch.tensor([[x0]]), graph)
        at_truth = reference.score_entropy(true.view(1, 1, -1), *args)
        assert abs(at_truth.item()) < 1e-9 * max(1.0, ratio.max().item())
        if graph.absorbing and x_t != graph.mask_id:
            continue
        perturbed = reference.score_entropy((true + 0.3 * torch.randn_like(true)).view(1, 1, -1), *args)
        assert perturbed.item() > 0


@pytest.mark.parametrize("graph", [Absorbing(4), Uniform(5)], ids=repr)
@pytest.mark.parametrize("with_shift", [False, True])
def test_gradcheck_float64(graph, with_shift):
    B, L, V = 2, 4, graph.dim
    log_score = torch.randn(B, L, V, dtype=torch.float64, requires_grad=True)
    x0 = torch.randint(0, graph.N, (B, L))
    x_t = graph.sample_transition(x0, torch.tensor([0.8, 2.0]))
    if graph.absorbing:
        x_t[0, 0] = graph.mask_id
    sigma = torch.tensor([0.4, 1.7], dtype=torch.float64)
    shift = torch.tensor([-0.5, 0.25]) if with_shift else None
    with ops.use_backend("torch"):
        fn = lambda s: ops.score_entropy(s, sigma, x_t, x0, graph, shift=shift)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (log_score,))


@pytest.mark.parametrize("graph", [Absorbing(6), Uniform(7)], ids=repr)
def test_float64_loss_keeps_float64_sigma_shift_and_weight(graph):
    """fp64 input gives the fp64 loss: σ, shift and weight are not rounded to fp32 on the way
    (at σ = 1e-3 that rounding alone moved the absorbing ℓ ≈ 7e3 by ~4e-4)."""
    B, L, V = 2, 5, graph.dim
    log_score = torch.randn(B, L, V, dtype=torch.float64)
    x0 = torch.randint(0, graph.N, (B, L))
    x_t = graph.sample_transition(x0, torch.tensor([2.0, 2.0]), generator=torch.Generator().manual_seed(0))
    if graph.absorbing:
        x_t[:, 0] = graph.mask_id
    sigma = torch.tensor([1e-3 + 1e-12, 0.3 + 1e-10], dtype=torch.float64)  # not fp32-representable
    shift = torch.tensor([-0.1 + 1e-11, 0.2], dtype=torch.float64)
    weight = torch.tensor([1.0 / 3, 2.0 / 7], dtype=torch.float64)
    want = reference.score_entropy(log_score, sigma, x_t, x0, graph, shift) * weight[:, None]
    with ops.use_backend("torch"):
        got = ops.score_entropy(log_score, sigma, x_t, x0, graph, shift=shift, weight=weight)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_absorbing_gradient_formula():
    graph = Absorbing(6)
    log_score = torch.randn(1, 3, 7, requires_grad=True)
    x0 = torch.tensor([[1, 2, 3]])
    x_t = torch.tensor([[6, 2, 6]])
    sigma = torch.tensor([0.9])
    reference.score_entropy(log_score, sigma, x_t, x0, graph).sum().backward()
    r = 1 / torch.expm1(sigma)
    want = log_score.detach().exp()
    want[..., 6] = 0
    want[0, 0, 1] -= r[0]
    want[0, 2, 3] -= r[0]
    want[0, 1] = 0  # not masked: no loss, no gradient
    torch.testing.assert_close(log_score.grad, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_computed_in_fp32(dtype):
    graph = Uniform(9)
    log_score = torch.randn(2, 5, 9).to(dtype)
    x0 = torch.randint(0, 9, (2, 5))
    x_t = torch.randint(0, 9, (2, 5))
    sigma = torch.tensor([0.2, 3.0])
    got = ops.score_entropy(log_score, sigma, x_t, x0, "uniform")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference.score_entropy(log_score.float(), sigma, x_t, x0, graph))


def test_shift_weight_and_reductions():
    graph = Absorbing(8)
    z = torch.randn(3, 4, 9)
    x0 = torch.randint(0, 8, (3, 4))
    x_t = graph.sample_transition(x0, torch.full((3,), 1.0))
    sigma = torch.tensor([0.1, 1.0, 4.0])
    shift = -torch.log(reference.esigm1(sigma)) - torch.log(torch.tensor(8.0))
    weight = torch.tensor([2.0, 0.5, 1.5])
    processed = (z + shift[:, None, None]).scatter(-1, x_t.unsqueeze(-1), 0.0)
    per_token = ops.score_entropy(processed, sigma, x_t, x0, graph)
    torch.testing.assert_close(ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift), per_token)
    weighted = ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift, weight=weight)
    torch.testing.assert_close(weighted, per_token * weight[:, None])
    total = ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="sum")
    torch.testing.assert_close(total, weighted.sum())
    mean = ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="batchmean")
    torch.testing.assert_close(mean, weighted.sum() / 3)


def test_extreme_sigma_is_finite():
    for graph in (Absorbing(10), Uniform(10)):
        log_score = torch.randn(2, 6, graph.dim)
        x0 = torch.randint(0, 10, (2, 6))
        x_t = torch.full_like(x0, graph.dim - 1)
        loss = ops.score_entropy(log_score, torch.tensor([1e-5, 20.0]), x_t, x0, graph)
        assert torch.isfinite(loss).all()
