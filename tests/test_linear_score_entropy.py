"""sedd.ops.linear_score_entropy equals the unfused head + score entropy, loss and gradients."""

import pytest
import torch

from sedd import ops


def _close(a, b, rel):
    """Max-norm relative closeness (the gradients have entries near zero, so elementwise rtol
    would test nothing there)."""
    scale = b.abs().max().item()
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"max error {err:.3g} vs scale {scale:.3g}"


def _problem(graph, B=3, L=5, D=7, V=11, mask_frac=0.5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, D, generator=gen).to(dtype)
    weight = (0.3 * torch.randn(V, D, generator=gen)).to(dtype)
    bias = (0.3 * torch.randn(V, generator=gen)).to(dtype)
    N = V - 1 if graph == "absorb" else V
    x0 = torch.randint(0, N, (B, L), generator=gen)
    if graph == "absorb":
        x_t = torch.where(torch.rand(B, L, generator=gen) < mask_frac, N, x0)
    else:
        x_t = torch.where(torch.rand(B, L, generator=gen) < 0.5, torch.randint(0, N, (B, L), generator=gen), x0)
    sigma = torch.rand(B, generator=gen) * 2 + 0.05
    shift = torch.randn(B, generator=gen)
    loss_weight = torch.rand(B, generator=gen) + 0.5
    return hidden, weight, bias, sigma, x_t, x0, shift, loss_weight


def _both(graph, *args, reduction="batchmean", chunk_rows=4, grad_output=None, backend="torch", **kw):
    hidden, weight, bias, sigma, x_t, x0, shift, loss_weight = (a.clone() for a in args)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    V = weight.shape[0]
    with ops.use_backend(backend):
        fused = ops.linear_score_entropy(
            hidden, weight, bias, sigma, x_t, x0, graph, shift=shift, loss_weight=loss_weight,
            reduction=reduction, chunk_bytes=chunk_rows * V * hidden.element_size(), **kw,
        )
        assert ops.last_backend() == backend
    logits = hidden @ weight.t() + bias
    unfused = ops.score_entropy(logits, sigma, x_t, x0, graph, shift=shift, weight=loss_weight, reduction=reduction)
    if grad_output is None:
        grad_output = torch.ones_like(fused) if reduction != "none" else torch.rand(fused.shape)
    g_fused = torch.autograd.grad(fused, leaves, grad_output)
    g_unfused = torch.autograd.grad(unfused, leaves, grad_output)
    return fused, unfused, g_fused, g_unfused


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("chunk_rows", [1, 4, 5, 1000])  # 15 rows: 4 does not divide, 5 does
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_unfused_fp32(graph, chunk_rows, reduction):
    fused, unfused, gf, gu = _both(graph, *_problem(graph), reduction=reduction, chunk_rows=chunk_rows)
    _close(fused, unfused, 1e-5)
    for a, b in zip(gf, gu):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_matches_unfused_triton_interpreted(graph):
    fused, unfused, gf, gu = _both(graph, *_problem(graph, B=2, L=3, D=5, V=9), chunk_rows=2, backend="triton")
    _close(fused, unfused, 1e-5)
    for a, b in zip(gf, gu):
        _close(a, b, 1e-5)


def test_triton_reduction_none_interpreted():
    fused, unfused, gf, gu = _both("uniform", *_problem("uniform", B=2, L=2, D=3, V=5), reduction="none",
                                   chunk_rows=3, backend="triton")
    _close(fused, unfused, 1e-5)
    for a, b in zip(gf, gu):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_bf16_within_rounding(graph):
    # Both paths round the logits and the gradient to bf16 (8 bits of mantissa); the fused one
    # also rounds each chunk's gᵀh before the fp32 accumulation. 2e-2 of the largest entry.
    fused, unfused, gf, gu = _both(graph, *_problem(graph, B=2, L=16, D=24, V=33, dtype=torch.bfloat16), chunk_rows=7)
    _close(fused, unfused, 2e-2)
    for a, b in zip(gf, gu):
        assert a.dtype == torch.bfloat16
        _close(a, b, 2e-2)


def test_grad_output_scales_the_gradients():
    fused, unfused, gf, gu = _both("uniform", *_problem("uniform"), grad_output=torch.tensor(-2.5))
    for a, b in zip(gf, gu):
        _close(a, b, 1e-5)


def test_absorbing_rows_that_are_not_mask_get_exactly_zero():
    args = _problem("absorb", B=2, L=6)
    x_t = args[4]
    _, _, (g_hidden, _, _), _ = _both("absorb", *args)
    real = x_t != 10
    assert real.any() and (~real).any()
    assert torch.equal(g_hidden[real], torch.zeros_like(g_hidden[real]))
    assert (g_hidden[~real].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("mask_frac", [0.0, 1.0])
def test_no_mask_and_all_mask_batches(mask_frac):
    fused, unfused, gf, gu = _both("absorb", *_problem("absorb", mask_frac=mask_frac))
    _close(fused, unfused, 1e-5)
    for a, b in zip(gf, gu):
        _close(a, b, 1e-5)
    if mask_frac == 0.0:
        assert fused.item() == 0.0 and all(not g.any() for g in gf)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_single_row(graph):
    args = _problem(graph, B=1, L=1, mask_frac=1.0)
    fused, unfused, gf, gu = _both(graph, *args)
    _close(fused, unfused, 1e-5)
    for a, b in zip(gf, gu):
        _close(a, b, 1e-5)


def test_without_bias_and_without_gradients():
    hidden, weight, _, sigma, x_t, x0, shift, lw = _problem("uniform")
    fused = ops.linear_score_entropy(hidden, weight, None, sigma, x_t, x0, "uniform", shift=shift, loss_weight=lw)
    unfused = ops.score_entropy(hidden @ weight.t(), sigma, x_t, x0, "uniform", shift=shift, weight=lw,
                                reduction="batchmean")
    assert not fused.requires_grad
    _close(fused, unfused, 1e-5)


def test_backward_runs_once():
    hidden, weight, bias, sigma, x_t, x0, _, _ = _problem("uniform")
    weight.requires_grad_()
    loss = ops.linear_score_entropy(hidden, weight, bias, sigma, x_t, x0, "uniform")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_default_chunk_is_bounded_by_bytes(monkeypatch):
    # the rows per chunk follow chunk_bytes: count the matmuls
    hidden, weight, bias, sigma, x_t, x0, _, _ = _problem("uniform", B=4, L=8, V=16)
    calls = []
    real_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(a[1].shape[0]) or real_addmm(*a, **k))
    ops.linear_score_entropy(hidden, weight, bias, sigma, x_t, x0, "uniform", chunk_bytes=10 * 16 * 4)
    assert calls == [10, 10, 10, 2]


_BAD = [
    (lambda a: a.update(hidden=a["hidden"][0]), ValueError, "hidden must have shape"),
    (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden must be"),
    (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "weight must have shape"),
    (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight has dtype"),
    (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias must have shape"),
    (lambda a: a.update(bias=a["bias"].half()), TypeError, "bias has dtype"),
    (lambda a: a.update(bias=[1.0]), TypeError, "bias must be a torch.Tensor"),
    (lambda a: a.update(x0=a["x_t"]), ValueError, "x0 holds id 10"),
    (lambda a: a.update(weight=torch.zeros(10, 7), bias=torch.zeros(10)), ValueError, "x_t holds id 10"),
    (lambda a: a.update(graph=3), TypeError, "graph must be"),
    (lambda a: a.update(x_t=a["x_t"][:, :-1]), ValueError, "x_t must have shape"),
    (lambda a: a.update(sigma=-a["sigma"]), ValueError, "sigma must be > 0"),
    (lambda a: a.update(reduction="mean"), ValueError, "reduction must be"),
    (lambda a: a.update(chunk_bytes=0), ValueError, "chunk_bytes must be"),
]


@pytest.mark.parametrize("change, error, match", _BAD)
def test_bad_input(change, error, match):
    hidden, weight, bias, sigma, x_t, x0, _, _ = _problem("absorb")
    a = dict(hidden=hidden, weight=weight, bias=bias, sigma=sigma, x_t=x_t, x0=x0, graph="absorb")
    change(a)
    kwargs = {k: a.pop(k) for k in ("reduction", "chunk_bytes") if k in a}
    with pytest.raises(error, match=match):
        ops.linear_score_entropy(a["hidden"], a["weight"], a["bias"], a["sigma"], a["x_t"], a["x0"], a["graph"], **kwargs)


def test_graph_width_must_match_weight():
    hidden, weight, bias, sigma, x_t, x0, _, _ = _problem("absorb")
    from sedd.graph import Absorbing

    with pytest.raises(ValueError, match="weight has V = 11"):
        ops.linear_score_entropy(hidden, weight, bias, sigma, x_t, x0, Absorbing(20))



@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_sync_free_absorbing_runs_every_row_with_the_same_result(monkeypatch, backend, reduction):
    """Under ops.sync_free() the MASK rows are not gathered (no row count read on the host): every
    row goes through the head, and the non-MASK rows contribute exactly nothing."""
    import sedd.ops.linear as ops_linear

    gathered_rows = []
    real_init = ops_linear._Rows.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        gathered_rows.append(self.index is not None)

    monkeypatch.setattr(ops_linear._Rows, "__init__", spy)
    problem = _problem("absorb", mask_frac=0.4)
    grad_output = torch.rand(3, 5) if reduction == "none" else None
    kw = dict(reduction=reduction, backend=backend, grad_output=grad_output)
    gathered, unfused, g_gathered, g_unfused = _both("absorb", *problem, **kw)
    with ops.sync_free():
        fused, _, g_fused, _ = _both("absorb", *problem, **kw)
    assert gathered_rows[0] and not gathered_rows[-1]
    _close(fused, gathered, 1e-6)
    _close(fused, unfused, 1e-5)
    for a, b, c in zip(g_fused, g_gathered, g_unfused):
        _close(a, b, 1e-6)
        _close(a, c, 1e-5)
