"""The compiled kernels on a real GPU, at the widths they run at (GPT-2: V = 50258 / 50257).

Skipped on CPU, and skipped under Triton's interpreter (which the test session turns on by
default): run them on a GPU machine with the interpreter off,

    TRITON_INTERPRET=0 python -m pytest -q -m gpu

(``benchmarks/run_gpu.sh`` does). Each check is the CPU suite's, on CUDA tensors through the
compiled kernels: values and gradients against the eager reference, forward-noising rates,
reverse-step draws against the reference probabilities (χ²), truncated (top-k / top-p) steps
against the reference truncation, and ``torch.compile`` with inductor. With two GPUs, every op on
cuda:1 while cuda:0 is current against the same calls on cuda:0.
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


def _peaked_row_steps(graph, kind, draws, **trunc):
    """(draws, probabilities): one peaked bf16 row repeated ``draws`` times through the fused
    step, and the reference probabilities of that row (truncated by ``trunc`` when given)."""
    V = graph.dim
    g = _gen(2)
    row = torch.randn(V, device=CUDA, generator=g) * 3 - 4  # a few dozen tokens carry most of the mass
    row[torch.randint(0, N, (40,), device=CUDA, generator=g)] += 6
    x_cur = graph.mask_id if graph.absorbing else 17
    z = row.expand(1, draws, V).to(torch.bfloat16)
    x_t = torch.full((1, draws), x_cur, device=CUDA)
    scalar = torch.tensor([0.05 if kind != "denoise" else 1e-3], device=CUDA)
    step = {"euler": lambda: ops.euler_step(z, x_t, scalar, 0.5, graph, g, **trunc),
            "analytic": lambda: ops.analytic_step(z, x_t, scalar, graph, g, **trunc),
            "denoise": lambda: ops.denoise_step(z, x_t, scalar, graph, g, **trunc)}[kind]
    with ops.use_backend("triton"):
        out = step()
    one, x1 = z[:, :1], x_t[:, :1]
    probs = {"euler": lambda: reference.euler_probs(one, x1, scalar, 0.5, graph),
             "analytic": lambda: reference.analytic_probs(one, x1, scalar, graph),
             "denoise": lambda: reference.denoise_probs(one, x1, scalar, graph)}[kind]()
    return out, reference.truncate(probs, x1, **trunc).reshape(V)


@pytest.mark.parametrize("trunc", [dict(top_k=40), dict(top_p=0.9)], ids=["top_k=40", "top_p=0.9"])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_truncated_step_draws_match_reference_truncation(kind, graph_name, trunc):
    graph = get_graph(graph_name, N)
    out, probs = _peaked_row_steps(graph, kind, 1 << 14, **trunc)
    assert (probs > 0).sum() < graph.dim - 1  # it truncates
    assert chi2_pvalue(out, probs) > 1e-4  # and a token outside the kept set fails outright
    if kind == "denoise" and graph.absorbing:
        assert not (out == graph.mask_id).any()


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_scaled_loss_backward_multiplies_the_fused_gradient(graph_name):
    """(loss * 0.37).backward() of the fused batchmean loss: the scale kernel's multiply branch."""
    graph = get_graph(graph_name, N)
    g = _gen(5)
    z = (torch.randn(2, 64, graph.dim, device=CUDA, generator=g) * 2).to(torch.bfloat16)
    sigma = torch.tensor([0.3, 2.0], device=CUDA)
    x0 = torch.randint(0, N, (2, 64), device=CUDA, generator=g)
    x_t = reference.sample_transition(x0, sigma, graph, g)
    grads = {}
    for backend in ("torch", "triton"):
        w = z.clone().requires_grad_()
        with ops.use_backend(backend):
            loss = ops.score_entropy(w * 1 if backend == "triton" else w.double(), sigma, x_t, x0, graph,
                                     reduction="batchmean")
        (loss * 0.37).backward()
        grads[backend] = w.grad.double()
    scale = float(grads["torch"].abs().max())
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1.6e-2, atol=1.6e-2 * scale)


def test_truncation_keep_top_p_one_is_the_same_on_cuda_and_cpu():
    p = torch.softmax(3 * torch.randn(2, 50257, generator=torch.Generator().manual_seed(0)), -1)
    x = torch.tensor([0, 9])
    for top_p in (1.0, 0.9):
        cpu = reference.truncation_keep(p, x, top_p=top_p)
        assert torch.equal(reference.truncation_keep(p.to(CUDA), x.to(CUDA), top_p=top_p).cpu(), cpu), top_p
    assert int(reference.truncation_keep(p, x, top_p=1.0).sum()) == 2 * 50256


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_ops_on_the_second_gpu_match_the_first_while_device_0_is_current(graph_name):
    """Triton launches on the current device: every launch runs under its tensors' device
    (sedd/kernels/_launch.py), so cuda:1 tensors with cuda:0 current give cuda:0's results."""
    graph = get_graph(graph_name, N)

    def run(device):
        g = torch.Generator(device).manual_seed(0)
        B, L = 2, 64
        z = (torch.randn(B, L, graph.dim, device=device, generator=g) * 2).to(torch.bfloat16)
        sigma = torch.tensor([0.3, 2.0], device=device)
        x0 = torch.randint(0, N, (B, L), device=device, generator=g)
        w = z.clone().requires_grad_()
        with ops.use_backend("triton"):
            x_t = ops.sample_transition(x0, sigma, graph, g)
            loss = ops.score_entropy(w * 1, sigma, x_t, x0, graph, reduction="batchmean")
            (loss * 0.37).backward()  # the fused gradient, then the scale kernel
            per_token = ops.score_entropy(z, sigma, x_t, x0, graph)
            steps = [ops.euler_step(z, x_t, sigma, 0.5, graph, g), ops.analytic_step(z, x_t, sigma, graph, g),
                     ops.denoise_step(z, x_t, sigma, graph, g), ops.analytic_step(z, x_t, sigma, graph, g, top_k=40)]
        torch.cuda.synchronize(device)
        return [t.detach().cpu() for t in (x_t, loss, w.grad, per_token, *steps)]

    torch.cuda.set_device(0)
    want = run(torch.device("cuda", 0))
    got = run(torch.device("cuda", 1))
    assert torch.cuda.current_device() == 0
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trunc", [{}, {"top_p": 0.9}, {"top_k": 50}])
def test_denoise_with_stats_at_gpt2_width(dtype, trunc):
    """The compiled kernel's confidence and entropy (first hitting's adaptive rules) against the fp64
    reference on GPT-2-wide rows, misaligned and as a view of the padded head's rows; its tokens are
    the plain denoise step's."""
    graph = Absorbing(N)
    g = _gen(5)
    B, L = 2, 16
    held = (torch.randn(B, L, 50304, device=CUDA, generator=g) * 3).to(dtype)
    for z in (held[..., : graph.dim].contiguous(), held[..., : graph.dim]):
        x = torch.full((B, L), graph.mask_id, device=CUDA)
        x[0, :3] = 7
        sigma, shift = torch.tensor([0.3, 2.0], device=CUDA), torch.tensor([-1.0, 0.5], device=CUDA)
        with ops.use_backend("triton"):
            tokens, conf, ent = ops.denoise_with_stats(z, x, sigma, graph, _gen(1), shift=shift, **trunc)
            plain = ops.denoise_step(z, x, sigma, graph, _gen(1), shift=shift, **trunc)
        want_c, want_h = reference.denoise_stats(z.double(), x, sigma, graph, shift.double(), **trunc)
        assert torch.equal(tokens, plain)
        torch.testing.assert_close(conf, want_c, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(ent, want_h, atol=1e-4, rtol=1e-4)


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

