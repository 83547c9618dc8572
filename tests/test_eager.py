"""The fast eager path (sedd/ops/eager.py): reverse steps in log space with the two-level race, and
the chunked score entropy; against sedd.ops.reference and, where the contract is shared, Triton."""

import pytest
import torch

from sedd import ops
from tests.helpers import reverse_step

BACKENDS = ["torch", "triton"]


# ---------------------------------------------------------------------------------------------
# Reverse steps with log-scores beyond fp32's exp range (e^88.7 overflows)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_steps_follow_a_dominant_log_score_above_the_exp_range(backend, graph, kind):
    """One candidate's log-score is 100 (+ up to 20 per row), the rest are O(1): its weight
    dominates every other option by e^90, so every row must move to it. Working outside log space
    gives inf/inf = NaN weights and the eager step used to return token 0 for every row."""
    B, L, V = 3, 4, 7
    target = 4
    log_score = torch.randn(B, L, V)
    log_score[:, :, target] = 100.0 + 20 * torch.rand(B, L)
    x_t = torch.full((B, L), V - 1 if graph == "absorb" else 1)
    with ops.use_backend(backend):
        out = reverse_step(kind, log_score, x_t, graph, torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.full_like(x_t, target)), out


@pytest.mark.parametrize("backend", BACKENDS)
def test_analytic_uniform_step_with_huge_scores_everywhere_stays_finite(backend):
    """All log-scores near 95: the stay/MASK bookkeeping must not turn into inf − inf."""
    B, L, V = 2, 3, 5
    log_score = 95 + torch.randn(B, L, V)
    log_score[..., 2] = 99.0
    x_t = torch.zeros(B, L, dtype=torch.long)
    with ops.use_backend(backend):
        out = ops.analytic_step(log_score, x_t, torch.full((B,), 0.3), "uniform", torch.Generator().manual_seed(1))
    assert ((out >= 0) & (out < V)).all()
    assert (out == 2).float().mean() > 0.5  # e^99 against e^95·4: the big entry wins most rows


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("kind", ["euler", "analytic", "denoise"])
def test_tiled_race_draws_from_the_reference_probabilities(monkeypatch, graph, kind):
    """The two-level race (tiles, then inside the winning tile) against reference.*_probs, with
    tiles of 4 columns over V = 11 (the last tile padded) so every part of it runs."""
    from sedd.graph import graph_for_width
    from sedd.ops import eager, reference
    from tests.helpers import chi2_pvalue

    monkeypatch.setattr(eager, "_SINGLE_TILE", 2)
    monkeypatch.setattr(eager, "_TILE", 4)
    V, n = 11, 6000
    g = graph_for_width(graph, V)
    row = torch.randn(1, 1, V, generator=torch.Generator().manual_seed(5)) * 1.5
    x = torch.tensor([[V - 1 if graph == "absorb" else 6]])
    scalar = torch.tensor([0.04 if kind != "denoise" else 0.3])
    shift = torch.tensor([0.2])
    if kind == "euler":
        probs = reference.euler_probs(row, x, scalar, 1.0, g, shift)
    elif kind == "analytic":
        probs = reference.analytic_probs(row, x, scalar, g, shift)
    else:
        probs = reference.denoise_probs(row, x, scalar, g, shift)
    rows, xs, gen = row.expand(n, 1, V).contiguous(), x.expand(n, 1).contiguous(), torch.Generator().manual_seed(6)
    if kind == "euler":
        out = ops.euler_step(rows, xs, scalar.expand(n), 1.0, graph, gen, shift=shift.expand(n))
    else:
        step = ops.analytic_step if kind == "analytic" else ops.denoise_step
        out = step(rows, xs, scalar.expand(n), graph, gen, shift=shift.expand(n))
    assert chi2_pvalue(out, probs[0, 0]) > 1e-3


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_loss_saves_only_its_inputs_for_backward(monkeypatch, graph, dtype):
    """Autograd through the reference kept fp32 copies and e^ŝ ([B, L, V] each) alive until the
    backward; the eager loss saves its inputs only and recomputes the gradient in row chunks."""
    from sedd.graph import graph_for_width
    from sedd.ops import eager, reference

    monkeypatch.setattr(eager, "_CHUNK_ELEMENTS", 40)  # several chunks of rows
    B, L, V = 2, 6, 9
    g = graph_for_width(graph, V)
    z = torch.randn(B, L, V).to(dtype)
    x0 = torch.randint(0, g.N, (B, L))
    x_t = g.sample_transition(x0, torch.ones(B))
    sigma, shift, weight = torch.rand(B) + 0.2, torch.randn(B), torch.rand(B) + 0.5
    saved = []
    a = z.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = ops.score_entropy(a * 1, sigma, x_t, x0, g, shift=shift, weight=weight, reduction="batchmean")
    big = [t for t in saved if t.numel() >= B * L * V]
    assert len(big) == 1 and big[0].dtype == dtype  # the input itself
    loss.backward()
    b = z.clone().requires_grad_()
    want = (reference.score_entropy(b, sigma, x_t, x0, g, shift) * weight[:, None]).sum() / B
    want.backward()
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(loss, want, **tol)
    torch.testing.assert_close(a.grad, b.grad, **tol)
