"""The compiled kernels on a real GPU, at the widths they run at (GPT-2: V = 50258 / 50257).

Skipped on CPU, and skipped under Triton's interpreter (which the test session turns on by
default): run them on a GPU machine with the interpreter off,

    TRITON_INTERPRET=0 python -m pytest -q -m gpu

(``benchmarks/run_gpu.sh`` does). Each check is the CPU suite's, on CUDA tensors through the
compiled kernels: values and gradients against the eager reference, forward-noising rates,
reverse-step draws against the reference probabilities (χ²), and ``torch.compile`` with inductor.
"""

from __future__ import annotations

import os

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing, get_graph
from sedd.ops import reference
from tests.helpers import chi2_pvalue, compiled_score_entropy_matches_eager

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs the compiled kernels: TRITON_INTERPRET=0"),
]
CUDA = torch.device("cuda")
N = 50257


def _gen(seed):
    return torch.Generator(CUDA).manual_seed(seed)


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_score_entropy_matches_reference_at_gpt2_width(graph_name, dtype, reduction):
    graph = get_graph(graph_name, N)
    B, L, V = 4, 32, graph.dim
    g = _gen(0)
    z = (torch.randn(B, L, V, device=CUDA, generator=g) * 2).to(dtype)
    sigma = torch.tensor([1e-5, 0.3, 5.0, 20.0], device=CUDA)
    x0 = torch.randint(0, N, (B, L), device=CUDA, generator=g)
    x_t = reference.sample_transition(x0, sigma, graph, g)
    shift = torch.randn(B, device=CUDA, generator=g)
    weight = torch.rand(B, device=CUDA, generator=g) + 0.5
    grad_out = torch.rand(B, L, device=CUDA, generator=g) if reduction == "none" else None

    def run(backend, inplace=False):
        w = z.clone().requires_grad_()
        with ops.use_backend(backend):
            # a non-leaf, as a model's output is (the in-place gradient overwrites it)
            scores = w * 1 if backend == "triton" else w.double()
            loss = ops.score_entropy(scores, sigma, x_t, x0, graph, shift=shift, weight=weight,
                                     reduction=reduction, inplace_backward=inplace)
        assert ops.last_backend() == backend
        (loss * grad_out if grad_out is not None else loss).sum().backward()
        return loss.detach().double(), w.grad.double()

    want_loss, want_grad = run("torch")
    for inplace in (False, True):
        loss, grad = run("triton", inplace)
        torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-4)
        tol = 2e-5 if dtype == torch.float32 else 1.6e-2
        scale = float(want_grad[want_grad.isfinite()].abs().max())
        torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol * scale, equal_nan=True)


def test_fused_training_step_peak_memory_is_one_buffer():
    """forward+backward of the batchmean loss in place needs no [B, L, V] buffer beyond the input."""
    graph = Absorbing(N)
    B, L = 8, 256
    z = torch.randn(B, L, graph.dim, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    sigma = torch.rand(B, device=CUDA) + 0.1
    x0 = torch.randint(0, N, (B, L), device=CUDA)
    x_t = ops.sample_transition(x0, sigma, graph)
    buffer = z.numel() * z.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with ops.use_backend("triton"):
        loss = ops.score_entropy(z * 1, sigma, x_t, x0, graph, reduction="batchmean", inplace_backward=True)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # z * 1 (the stand-in for the model's output) and z.grad: two buffers, nothing for the loss itself
    assert extra <= 2.1 * buffer, extra / buffer


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_forward_noising_rates(graph_name):
    graph = get_graph(graph_name, N)
    B, L = 6, 1 << 16
    sigma = torch.tensor([1e-4, 0.01, 0.3, 1.0, 3.0, 20.0], device=CUDA)
    x0 = torch.randint(0, N, (B, L), device=CUDA)
    with ops.use_backend("triton"):
        x_t = ops.sample_transition(x0, sigma, graph, _gen(1))
        assert torch.equal(x_t, ops.sample_transition(x0, sigma, graph, _gen(1)))
    changed = (x_t != x0).double().mean(1)
    p_move = -torch.expm1(-sigma.double())
    p_change = p_move if graph.absorbing else p_move * (N - 1) / N
    sd = (p_change * (1 - p_change) / L).sqrt()
    assert ((changed - p_change).abs() <= 5 * sd + 1e-12).all(), (changed, p_change)
    if graph.absorbing:
        assert ((x_t == x0) | (x_t == graph.mask_id)).all()


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_reverse_step_draws_match_reference(graph_name, kind):
    """One row at the GPT-2 width, repeated 2^16 times: the draws against the reference weights."""
    graph = get_graph(graph_name, N)
    V, draws = graph.dim, 1 << 16
    g = _gen(2)
    # a peaked row: a few dozen tokens carry most of the mass, the long tail the rest
    row = torch.randn(V, device=CUDA, generator=g) * 3 - 4
    row[torch.randint(0, N, (40,), device=CUDA, generator=g)] += 6
    x_cur = graph.mask_id if graph.absorbing else 17
    z = row.expand(1, draws, V).to(torch.bfloat16)
    x_t = torch.full((1, draws), x_cur, device=CUDA)
    scalar = torch.tensor([0.05 if kind != "denoise" else 1e-3], device=CUDA)
    with ops.use_backend("triton"):
        if kind == "euler":
            out = ops.euler_step(z, x_t, scalar, 0.5, graph, g)
        elif kind == "analytic":
            out = ops.analytic_step(z, x_t, scalar, graph, g)
        else:
            out = ops.denoise_step(z, x_t, scalar, graph, g)
    probs_fn = {"euler": lambda: reference.euler_probs(z[:, :1], x_t[:, :1], scalar, 0.5, graph),
                "analytic": lambda: reference.analytic_probs(z[:, :1], x_t[:, :1], scalar, graph),
                "denoise": lambda: reference.denoise_probs(z[:, :1], x_t[:, :1], scalar, graph)}[kind]
    probs = probs_fn().reshape(V)
    assert chi2_pvalue(out, probs) > 1e-4
    if kind == "denoise" and graph.absorbing:
        assert not (out == graph.mask_id).any()


def test_absorbing_step_keeps_unmasked_positions_at_scale():
    graph = Absorbing(N)
    B, L = 16, 1024
    z = torch.randn(B, L, graph.dim, device=CUDA, dtype=torch.bfloat16)
    x_t = torch.randint(0, N, (B, L), device=CUDA)
    x_t[torch.rand(B, L, device=CUDA) < 0.5] = graph.mask_id
    fixed = x_t != graph.mask_id
    with ops.use_backend("triton"):
        out = ops.analytic_step(z, x_t, torch.full((B,), 0.05, device=CUDA), graph, _gen(3))
        final = ops.denoise_step(z, out, torch.full((B,), 1e-3, device=CUDA), graph, _gen(4))
    assert torch.equal(out[fixed], x_t[fixed])
    assert not (final == graph.mask_id).any() and torch.equal(final[fixed], x_t[fixed])


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph_inductor(monkeypatch, inplace):
    monkeypatch.setenv("SEDD_CHECK_VALUES", "0")
    torch._dynamo.reset()
    compiled_score_entropy_matches_eager("cuda", "inductor", inplace)

