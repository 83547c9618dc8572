"""The training loss: the diffusion-weighted score entropy through the raw-output path."""

import math

import pytest
import torch

from sedd.graph import Absorbing, Uniform
from sedd.losses import model_scores, score_entropy_loss, unwrap
from sedd.noise import Geometric, LogLinear
from sedd.ops.reference import esigm1


class TableModel(torch.nn.Module):
    """Raw output z = table[x_t] (a lookup), post-processed like SEDD (absorbing, scale_by_sigma)."""

    def __init__(self, V, absorbing=True):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V))
        self.absorbing = absorbing

    def score_shift(self, sigma):
        if not self.absorbing:
            return torch.zeros_like(sigma)
        return -torch.log(esigm1(sigma)) - math.log(self.table.shape[0] - 1)

    def forward(self, x_t, sigma, raw=False, attention_mask=None):
        z = self.table[x_t]
        if raw:
            return z
        return (z + self.score_shift(sigma)[:, None, None]).scatter(-1, x_t.unsqueeze(-1), 0.0)


def test_absorbing_loglinear_reduces_to_one_over_t_form():
    V = 9
    graph, noise = Absorbing(V - 1), LogLinear()
    model = TableModel(V)
    x0 = torch.randint(0, V - 1, (4, 12))
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    gen = torch.Generator().manual_seed(0)
    per_seq = score_entropy_loss(model, x0, graph, noise, t=t, generator=gen, reduction="none")
    # redo the noising with the same generator to know which positions were masked
    gen = torch.Generator().manual_seed(0)
    from sedd import ops
    x_t = ops.sample_transition(x0, noise(t)[0], graph, gen)
    u = model.table[x_t].detach() - math.log(V - 1)
    per_token = u[..., : V - 1].exp().sum(-1) - u.gather(-1, x0.unsqueeze(-1)).squeeze(-1) - 1
    want = ((x_t == graph.mask_id) * per_token).sum(-1) / t
    torch.testing.assert_close(per_seq, want, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("graph, noise", [(Absorbing(6), LogLinear()), (Uniform(7), Geometric())], ids=["absorb", "uniform"])
def test_loss_is_seeded_differentiable_and_raw_equals_processed(graph, noise):
    model = TableModel(graph.dim, absorbing=graph.absorbing)
    x0 = torch.randint(0, graph.N, (3, 10))
    a = score_entropy_loss(model, x0, graph, noise, generator=torch.Generator().manual_seed(1))
    b = score_entropy_loss(model, x0, graph, noise, generator=torch.Generator().manual_seed(1))
    assert a.shape == () and torch.equal(a, b)
    a.backward()
    assert model.table.grad is not None and model.table.grad.abs().sum() > 0

    class Processed(torch.nn.Module):  # no score_shift: the post-processed output is used
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x_t, sigma):
            return model(x_t, sigma)

    c = score_entropy_loss(Processed(), x0, graph, noise, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, c)


def test_padding_adds_no_loss():
    graph, noise = Absorbing(6), LogLinear()
    model = TableModel(7)
    x0 = torch.randint(0, 6, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    other = x0.clone()
    other[1, 5:] = (x0[1, 5:] + 1) % 6  # different tokens at the padded positions only
    t = torch.tensor([0.9, 0.9])

    def loss(x, m):
        gen = torch.Generator().manual_seed(2)
        return score_entropy_loss(model, x, graph, noise, t=t, generator=gen, attention_mask=m, reduction="none")

    torch.testing.assert_close(loss(x0, mask), loss(other, mask))
    assert not torch.allclose(loss(x0, None), loss(other, None))
    with pytest.raises(ValueError, match="reduction"):
        score_entropy_loss(model, x0, graph, noise, reduction="sum")


def test_model_scores_unwraps_wrappers():
    model = TableModel(5)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    wrapped = Wrapper(model)
    assert unwrap(wrapped) is model
    x_t = torch.randint(0, 5, (2, 3))
    log_score, shift = model_scores(wrapped, x_t, torch.ones(2))
    torch.testing.assert_close(log_score, model.table[x_t])
    torch.testing.assert_close(shift, model.score_shift(torch.ones(2)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scale_is_folded_into_the_loss_and_its_gradient(monkeypatch, backend):
    """scale=1/k gives the loss and the gradients of loss/k; on the fused path the backward then
    skips its pass over [B, L, V] (the incoming gradient is exactly 1)."""
    from sedd import ops

    graph, noise = Absorbing(10), LogLinear()
    model = TableModel(graph.dim)
    x0 = torch.randint(0, graph.N, (4, 16))
    scaled_passes = []
    monkeypatch.setattr(torch.Tensor, "mul_", lambda self, other, _mul=torch.Tensor.mul_: (
        scaled_passes.append(self.shape), _mul(self, other))[1])

    def run(**kw):
        model.zero_grad()
        with ops.use_backend(backend):
            loss = score_entropy_loss(model, x0, graph, noise, generator=torch.Generator().manual_seed(3), **kw)
        return loss, loss.backward(), model.table.grad.clone()

    full, _, full_grad = run()
    quarter, _, quarter_grad = run(scale=0.25)
    torch.testing.assert_close(quarter, full * 0.25)
    torch.testing.assert_close(quarter_grad, full_grad * 0.25)
    if backend == "triton":
        assert not [s for s in scaled_passes if len(s) == 3], "the backward rescaled a [B, L, V] gradient"


def test_given_x_t_is_the_draw_the_loss_would_make():
    """x_t= (with its t) replaces the loss's own forward noising: per-sequence generators can then
    make each sequence's draw independent of the batch it sits in (the validation loss does)."""
    V = 9
    graph, noise = Absorbing(V - 1), LogLinear()
    model = TableModel(V)
    x0 = torch.randint(0, V - 1, (3, 10))
    t = torch.tensor([0.2, 0.5, 0.9])
    drawn = score_entropy_loss(model, x0, graph, noise, t=t, generator=torch.Generator().manual_seed(4),
                               reduction="none")
    from sedd import ops

    x_t = ops.sample_transition(x0, noise(t)[0], graph, torch.Generator().manual_seed(4))
    given = score_entropy_loss(model, x0, graph, noise, t=t, x_t=x_t, reduction="none")
    torch.testing.assert_close(given, drawn)
    with pytest.raises(ValueError, match="pass that t"):
        score_entropy_loss(model, x0, graph, noise, x_t=x_t)
    with pytest.raises(ValueError, match="x_t"):
        score_entropy_loss(model, x0, graph, noise, t=t, x_t=torch.full_like(x0, V))
