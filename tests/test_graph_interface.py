"""The graph interface: a graph defined in a few lines trains and samples on the eager path, and
the generic score entropy of :class:`sedd.graph.Graph` agrees with the closed forms."""

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing, Graph, Uniform
from sedd.losses import score_entropy_loss
from sedd.model import SEDD
from sedd.noise import Geometric
from sedd.ops.reference import log_scores
from sedd.sampling import sample


class PlainUniform(Uniform):
    """Uniform's forward process and nothing else: no fused kernel, the generic score entropy."""

    kernel = None
    score_entropy = Graph.score_entropy


@pytest.mark.parametrize("graph", [Absorbing(6), Uniform(7), Uniform(2)], ids=repr)
def test_generic_score_entropy_matches_the_closed_forms(graph):
    gen = torch.Generator().manual_seed(0)
    B, L, V = 3, 16, graph.dim
    x0 = torch.randint(0, graph.N, (B, L), generator=gen)
    sigma = torch.tensor([1e-3, 0.7, 6.0], dtype=torch.float64)
    x_t = graph.sample_transition(x0, sigma, generator=gen)
    s = log_scores(torch.randn(B, L, V, generator=gen, dtype=torch.float64), x_t).requires_grad_()
    want = graph.score_entropy(s, sigma, x_t, x0)
    got = Graph.score_entropy(graph, s, sigma, x_t, x0)
    # transition_probs is fp32, so a_y carries fp32 rounding; the closed forms use E(σ) in fp64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the entry at x_t is the constant 0 (log_scores puts it there), so its gradient is not compared
    off_current = torch.ones_like(s, dtype=torch.bool).scatter(-1, x_t.unsqueeze(-1), False)
    g_want, g_got = (torch.autograd.grad(v.sum(), s)[0][off_current] for v in (want, got))
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_a_graph_without_a_kernel_trains_and_samples_eagerly(monkeypatch):
    N = 9
    graph, noise = PlainUniform(N), Geometric()
    torch.manual_seed(0)
    model = SEDD(SEDD.config_for("cpu", tokens=N, graph="uniform", n_blocks=1, length=16))
    x0 = torch.randint(0, N, (4, 16), generator=torch.Generator().manual_seed(1))

    # the same draws give the same loss as the uniform graph's closed form (fused on CUDA)
    losses = [score_entropy_loss(model, x0, g, noise, generator=torch.Generator().manual_seed(2)) for g in (graph, Uniform(N))]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert ops.last_backend() == "torch"

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model.output_layer.linear.weight.detach().clone()
    for step in range(3):
        loss = score_entropy_loss(model, x0, graph, noise, generator=torch.Generator().manual_seed(10 + step))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(model.output_layer.linear.weight, before)

    model.eval()
    # the built-in graphs draw through sedd/ops/eager.py (a different use of the random stream); with
    # Uniform's kernel tag cleared both run the reference steps, so the draws must be identical
    monkeypatch.setattr(Uniform, "kernel", None)
    for predictor in ("euler", "analytic"):
        x = sample(model, graph, noise, batch_size=2, length=16, steps=3, predictor=predictor,
                   generator=torch.Generator().manual_seed(3))
        same = sample(model, Uniform(N), noise, batch_size=2, length=16, steps=3, predictor=predictor,
                      generator=torch.Generator().manual_seed(3))
        assert x.shape == (2, 16) and 0 <= int(x.min()) and int(x.max()) < N
        assert torch.equal(x, same)  # the eager reverse weights are the graph's, shared with Uniform


def test_triton_backend_refuses_a_graph_without_a_kernel():
    graph = PlainUniform(5)
    log_score = torch.randn(2, 3, 5)
    x = torch.randint(0, 5, (2, 3))
    sigma = torch.full((2,), 0.5)
    calls = {
        "score_entropy": lambda: ops.score_entropy(log_score, sigma, x, x, graph),
        "sample_transition": lambda: ops.sample_transition(x, sigma, graph),
        "euler_step": lambda: ops.euler_step(log_score, x, sigma, 0.1, graph),
        "analytic_step": lambda: ops.analytic_step(log_score, x, sigma, graph),
        "denoise_step": lambda: ops.denoise_step(log_score, x, sigma, graph),
    }
    with ops.use_backend("triton"):
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match=r"PlainUniform\(N=5\) has no Triton kernel"):
                call()
        assert ops.resolve_backend("cpu") == "triton"  # a graph with a kernel would run on Triton
    with ops.use_backend("auto"):
        assert ops.resolve_backend("cuda", graph) == "torch"  # auto falls back to the eager math
        assert ops.resolve_backend("cuda", Uniform(5)) == "triton"
