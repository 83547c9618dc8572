"""The aligned head (sedd.model.layers.DDiTFinalLayer): the output layer's rows padded in memory to a
multiple of 64 give the same scores, losses, gradients, bounds and samples as the unpadded layer,
and checkpoints keep the public [V, D] layout. The padding is never read as a score: a huge value
planted in it changes nothing."""

from __future__ import annotations

import pytest
import torch

from sedd import ops
from sedd.graph import get_graph
from sedd.likelihood import sequence_bounds
from sedd.losses import ar_loss, score_entropy_loss
from sedd.model import SEDD, ARModel
from sedd.noise import noise_from_config
from sedd.sampling import sample

TOKENS, L = 21, 8


def _pair(graph_name="absorb"):
    """(padded, unpadded) copies of one model with random output weights; the padded one's padding
    rows hold a huge value, which must never reach a score."""
    torch.manual_seed(0)
    config = SEDD.config_for("cpu", graph=graph_name, tokens=TOKENS, hidden_size=32, cond_dim=16, n_heads=2,
                             n_blocks=1, length=L, dropout=0.0)
    plain = SEDD(config, pad_head_to=1)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "adaLN" in name or "output_layer.linear" in name:
                p.normal_(0, 0.3)
    padded = SEDD(config)
    padded.load_checkpoint_state(plain.state_dict())
    V = plain.vocab_size
    with torch.no_grad():
        padded.output_layer.linear.bias[V:] = 1e4
    return padded, plain


def test_padding_shapes_and_public_checkpoint_layout(tmp_path):
    padded, plain = _pair()
    V = plain.vocab_size
    assert padded.output_layer.linear.weight.shape == (64, 32) and plain.output_layer.linear.weight.shape == (V, 32)
    state = padded.state_dict()
    assert state["output_layer.linear.weight"].shape == (V, 32) and state["output_layer.linear.bias"].shape == (V,)
    padded.save_pretrained(tmp_path)
    for pad in (1, 64):  # the file loads into either layout, the same weights
        loaded = SEDD.from_pretrained(tmp_path, pad_head_to=pad)
        for k, v in plain.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    z = padded(torch.randint(0, V, (2, L)), torch.ones(2), raw=True)
    assert z.shape == (2, L, V) and z.stride() == (L * 64, 64, 1)  # a view of aligned rows
    with pytest.raises(ValueError, match="pad_head_to must be a positive integer"):
        SEDD(SEDD.config_for("cpu", tokens=5, n_blocks=1), pad_head_to=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
@pytest.mark.parametrize("fused", [True, False])
def test_same_loss_and_gradients(backend, graph_name, fused):
    padded, plain = _pair(graph_name)
    graph, noise = get_graph(graph_name, TOKENS), noise_from_config(plain.config)
    x0 = torch.randint(0, TOKENS, (3, L), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (padded, plain):
        model.zero_grad(set_to_none=True)
        with ops.use_backend(backend):
            loss = score_entropy_loss(model, x0, graph, noise, generator=torch.Generator().manual_seed(2), fused=fused)
        loss.backward()
        grads = {n: p.grad[: p.grad.shape[0] if "output_layer.linear" not in n else plain.vocab_size].clone()
                 for n, p in model.named_parameters()}
        results.append((loss.detach(), grads))
    (loss_p, grads_p), (loss_u, grads_u) = results
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-5)
    for name, g in grads_u.items():
        torch.testing.assert_close(grads_p[name], g, rtol=1e-4, atol=1e-6, msg=name)
    V = plain.vocab_size
    for name in ("output_layer.linear.weight", "output_layer.linear.bias"):
        assert not dict(padded.named_parameters())[name].grad[V:].any(), name  # padding: no gradient


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_same_tokens_from_the_same_generator(backend, graph_name):
    tokens = []
    for model in _pair(graph_name):
        graph, noise = get_graph(graph_name, TOKENS), noise_from_config(model.config)
        with ops.use_backend(backend):
            tokens.append(sample(model.eval(), graph, noise, batch_size=3, length=L, steps=4, top_k=5,
                                 generator=torch.Generator().manual_seed(3)))
    assert torch.equal(tokens[0], tokens[1])
    assert int(tokens[0].max()) < TOKENS  # the padding (where the huge bias sits) is never drawn


def test_same_bound():
    padded, plain = _pair()
    graph, noise = get_graph("absorb", TOKENS), noise_from_config(plain.config)
    x0 = torch.randint(0, TOKENS, (2, L), generator=torch.Generator().manual_seed(4))
    bounds = [sequence_bounds(m.eval(), x0, graph, noise, num_samples=4, generator=torch.Generator().manual_seed(5))
              for m in (padded, plain)]
    torch.testing.assert_close(bounds[0]["integral"], bounds[1]["integral"], rtol=1e-5, atol=1e-6)


def test_autoregressive_head():
    torch.manual_seed(0)
    config = ARModel.config_for("cpu", tokens=TOKENS, hidden_size=32, cond_dim=16, n_heads=2, n_blocks=1, length=L)
    plain = ARModel(config, pad_head_to=1)
    with torch.no_grad():
        plain.output_layer.linear.weight.normal_(0, 0.3)
    padded = ARModel(config)
    padded.load_checkpoint_state(plain.state_dict())
    with torch.no_grad():
        padded.output_layer.linear.bias[TOKENS:] = 1e4
    x0 = torch.randint(0, TOKENS, (3, L), generator=torch.Generator().manual_seed(6))
    for fused in (True, False):
        losses = [ar_loss(m, x0, fused=fused) for m in (padded, plain)]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
        for loss in losses:
            loss.backward()
    assert not padded.output_layer.linear.weight.grad[TOKENS:].any()
    torch.testing.assert_close(padded.output_layer.linear.weight.grad[:TOKENS], plain.output_layer.linear.weight.grad,
                               rtol=1e-4, atol=1e-6)
    assert padded(x0).shape == (3, L, TOKENS)
