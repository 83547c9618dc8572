"""The fused head in the model and the training loss: the same loss and gradients as the logits
path, in one process and under DDP and FSDP2 (gloo, two processes)."""


import pytest
import torch

from sedd import ops
from sedd.graph import get_graph
from sedd.losses import score_entropy_loss, unwrap
from sedd.model import SEDD
from sedd.noise import noise_from_config
from tests.helpers import run_on_two_processes


def _model(graph, seed=0, tokens=11):
    torch.manual_seed(seed)
    model = SEDD(SEDD.config_for("cpu", tokens=tokens, graph=graph, n_blocks=1, hidden_size=32, n_heads=2))
    # the output layer starts at zero: give it weights so its gradients mean something
    with torch.no_grad():
        for p in model.output_layer.parameters():
            p.normal_(0, 0.2)
    return model


def _setup(graph, B=3, L=8, tokens=11):
    model = _model(graph, tokens=tokens)
    g = get_graph(graph, tokens)
    noise = noise_from_config(model.config)
    x0 = torch.randint(0, tokens, (B, L), generator=torch.Generator().manual_seed(1))
    return model, g, noise, x0


def _loss_and_grads(model, x0, graph, noise, fused, **kw):
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(5)
    loss = score_entropy_loss(model, x0, graph, noise, generator=gen, fused=fused, **kw)
    loss.sum().backward() if loss.dim() else loss.backward()
    named = unwrap(model).named_parameters()
    return loss.detach(), {n: p.grad.clone() for n, p in named if p.grad is not None}


def _assert_same(a, b, rel=1e-5):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * max(scale, 1e-12), ((a - b).abs().max().item(), scale)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"attention_mask": "tail"}, {"scale": 0.25}])
def test_fused_loss_matches_logits_path(graph, kw):
    model, g, noise, x0 = _setup(graph)
    if kw.get("attention_mask") == "tail":
        mask = torch.ones_like(x0, dtype=torch.bool)
        mask[0, -3:] = False
        kw = {"attention_mask": mask}
    loss_f, grads_f = _loss_and_grads(model, x0, g, noise, True, **kw)
    loss_u, grads_u = _loss_and_grads(model, x0, g, noise, False, **kw)
    _assert_same(loss_f, loss_u)
    assert grads_f.keys() == grads_u.keys() and "output_layer.linear.weight" in grads_f
    for name in grads_u:
        _assert_same(grads_f[name], grads_u[name])


def test_fused_path_runs_the_linear_head_op(monkeypatch):
    model, g, noise, x0 = _setup("absorb")
    calls = []
    real = ops.linear_score_entropy
    monkeypatch.setattr(ops, "linear_score_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    score_entropy_loss(model, x0, g, noise)
    assert calls == [1]
    score_entropy_loss(model, x0, g, noise, fused=False)
    assert calls == [1]


def test_head_hook_sees_autocast_dtypes():
    model, _, _, x0 = _setup("absorb")
    seen = {}

    def head(h, w, b):
        seen.update(h=h.dtype, w=w.dtype, b=b.dtype)
        return h

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x0, torch.ones(3), head=head)
    assert seen == dict(h=torch.bfloat16, w=torch.bfloat16, b=torch.bfloat16) and out.shape == (3, 8, 32)
    model(x0, torch.ones(3), head=head)
    assert seen["w"] == torch.float32


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_training_reproduces_the_logits_path(graph):
    curves = []
    for fused in (True, False):
        model, g, noise, _ = _setup(graph)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        data = torch.Generator().manual_seed(3)
        curve = []
        for step in range(4):
            x0 = torch.randint(0, 11, (4, 8), generator=data)
            loss = score_entropy_loss(model, x0, g, noise, generator=torch.Generator().manual_seed(step), fused=fused)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    assert curves[0][0] != curves[0][-1]  # the model did train
    _assert_same(curves[0], curves[1], rel=1e-4)


# -- DDP and FSDP2 on CPU: gloo, two processes --------------------------------------------------


def _distributed_worker(rank, world):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    for wrap in ("ddp", "fsdp"):
        model, g, noise, _ = _setup("absorb")
        x0 = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(10 + rank))
        if wrap == "ddp":
            wrapped = DDP(model)
        else:
            fully_shard(model.blocks[0])
            fully_shard(model)
            wrapped = model
        _, grads_u = _loss_and_grads(wrapped, x0, g, noise, False)
        _, grads_f = _loss_and_grads(wrapped, x0, g, noise, True)
        assert grads_f.keys() == grads_u.keys() and "output_layer.linear.weight" in grads_u, wrap
        for name, gu in grads_u.items():
            gf = grads_f[name]
            if wrap == "fsdp":  # DTensor shards, gathered (a rank's shard of the head may be all padding)
                gu, gf = gu.full_tensor(), gf.full_tensor()
            if name.startswith("output_layer.linear"):
                V = model.vocab_size  # the aligned head's padding rows get no gradient on either path
                assert gf[:V].abs().max() > 0 and not gf[V:].any() and not gu[V:].any(), f"{wrap}: {name}"
            _assert_same(gf, gu)


@pytest.mark.slow
def test_ddp_and_fsdp2_gradients_match_the_logits_path():
    run_on_two_processes(_distributed_worker)
