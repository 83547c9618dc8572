"""No device→host sync in a training step or a sampling step once the value checks are off.

On CPU a sync cannot be observed directly, so every way Python reads a tensor's value
(``.item()``, ``bool()``, ``int()``, ``float()``, ``.tolist()``, ``.numpy()``) is made to raise
inside the step. On a GPU the same steps run under ``torch.cuda.set_sync_debug_mode("error")``
(tests/test_kernels_cuda.py style; skipped without CUDA).
"""

import contextlib

import pytest
import torch

from sedd import ops
from sedd.graph import get_graph
from sedd.losses import score_entropy_loss
from sedd.model import SEDD
from sedd.noise import get_noise
from sedd.sampling import sample

READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    with monkeypatch.context() as m:
        for name in READS:
            def refuse(self, *args, _name=name, **kwargs):
                raise HostRead(f"Tensor.{_name} read a tensor value on the host (a device sync)")
            m.setattr(torch.Tensor, name, refuse)
        yield


def _model(graph):
    config = SEDD.config_for("cpu", graph=graph, tokens=11, hidden_size=32, cond_dim=16, n_heads=4, n_blocks=1,
                             length=8, dropout=0.0)
    return SEDD(config), get_graph(graph, 11), get_noise(config["noise"]["type"])


def test_the_patch_catches_every_kind_of_read(monkeypatch):
    x = torch.ones(2)
    with no_host_reads(monkeypatch):
        for read in (lambda: x.sum().item(), lambda: bool(x.all()), lambda: int(x[0]), lambda: x.tolist(),
                     lambda: float(x[0]), lambda: [0, 1][x.long()[0]]):
            with pytest.raises(HostRead):
                read()
    assert x.sum().item() == 2.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_training_step_makes_no_host_read_with_checks_off(monkeypatch, backend, graph_name):
    model, graph, noise = _model(graph_name)
    x0 = torch.randint(0, 11, (2, 8))
    t = torch.rand(2) * 0.9 + 0.05
    monkeypatch.setenv("SEDD_CHECK_VALUES", "0")
    with ops.use_backend(backend), no_host_reads(monkeypatch):
        loss = score_entropy_loss(model, x0, graph, noise, t=t, generator=torch.Generator().manual_seed(0))
        loss.backward()
        loss2 = score_entropy_loss(model, x0, graph, noise, t=t, scale=0.5)  # a non-unit incoming gradient
        (2 * loss2).backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_with_checks_on_only_the_noising_reads_values(monkeypatch, graph_name):
    """By default the loss checks x0 and σ once, in the noising; the model forward inside the loss
    repeats no check (it used to run aminmax on the tokens and a σ check: two more syncs)."""
    model, graph, noise = _model(graph_name)
    reads = []
    real = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or real(self))
    with ops.use_backend("torch"):
        score_entropy_loss(model, torch.randint(0, 11, (2, 8)), graph, noise).backward()
    assert len(reads) == 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("predictor", ["euler", "analytic"])
def test_sampling_makes_no_host_read_after_its_inputs(monkeypatch, backend, predictor):
    """The sampler turns the value checks off itself: the default settings suffice."""
    model, graph, noise = _model("absorb")
    model.eval()
    with ops.use_backend(backend), no_host_reads(monkeypatch):
        x = sample(model, graph, noise, batch_size=2, length=8, steps=3, predictor=predictor,
                   generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 8)


@pytest.mark.parametrize("predictor", ["euler", "analytic"])
def test_sync_free_steps_find_no_rows_by_value(monkeypatch, predictor):
    """Gathering the MASK rows (the fused head's saving, the sampler's masked-rows head) reads a row
    count on the host. Under ops.sync_free() neither the training step nor the sampling step does;
    the Triton backend here, because the eager CPU loss gathers rows itself (free on a CPU)."""
    model, graph, noise = _model("absorb")
    x0 = torch.randint(0, 11, (2, 8))
    t = torch.tensor([0.3, 0.8])

    def refuse(*args, **kwargs):
        raise HostRead("nonzero: a data-dependent row count")

    monkeypatch.setenv("SEDD_CHECK_VALUES", "0")
    with ops.use_backend("triton"), monkeypatch.context() as m:
        m.setattr(torch.Tensor, "nonzero", refuse)
        with pytest.raises(HostRead):  # the default steps gather
            score_entropy_loss(model, x0, graph, noise, t=t)
        with ops.sync_free(), no_host_reads(monkeypatch):
            score_entropy_loss(model, x0, graph, noise, t=t).backward()
            model.eval()
            x = sample(model, graph, noise, batch_size=2, length=8, steps=3, predictor=predictor,
                       generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 8) and int(x.max()) < graph.mask_id  # no MASK left


def test_model_checks_still_run_outside_the_loss_and_sampler():
    model, _, _ = _model("absorb")
    with pytest.raises(ValueError, match="outside"):
        model(torch.full((1, 8), 99), torch.ones(1))
    with ops.value_checks(False):
        model(torch.full((1, 8), 3), torch.ones(1))  # off: no check, no sync
    with pytest.raises(ValueError, match="sigma must be finite"):
        model(torch.full((1, 8), 3), torch.tensor([-1.0]))


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_compiled_loss_fullgraph_with_default_settings(monkeypatch, graph_name):
    """torch.compile(fullgraph=True) of the training loss with every default (fused head, value
    checks on): under compile the value checks (data-dependent branches) are off unless
    SEDD_CHECK_VALUES=1 is set, and the loss is the unfused one, which dynamo can trace. Same
    loss and gradient as the eager (fused) call."""
    monkeypatch.delenv("SEDD_CHECK_VALUES", raising=False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, graph, noise = _model(graph_name)
    with torch.no_grad():  # the output layer starts at zero: give the scores some spread
        model.output_layer.linear.weight.normal_(0, 0.5)
    x0 = torch.randint(0, 10, (2, 8))
    t = torch.tensor([0.3, 0.8])
    x_t = graph.sample_transition(x0, noise(t)[0], generator=torch.Generator().manual_seed(1))

    def step(x0, x_t, t):
        return score_entropy_loss(model, x0, graph, noise, t=t, x_t=x_t)

    with ops.use_backend("torch"):
        want = step(x0, x_t, t)
        (want_grad,) = torch.autograd.grad(want, model.output_layer.linear.weight)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x0, x_t, t)
        (got_grad,) = torch.autograd.grad(got, model.output_layer.linear.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_value_checks_are_off_while_a_cuda_graph_is_captured(monkeypatch):
    """A host read is not allowed during CUDA graph capture (torch.compile mode="reduce-overhead"
    captures the step): the default value checks step aside there, as the sync-free paths do."""
    monkeypatch.delenv("SEDD_CHECK_VALUES", raising=False)
    assert ops.checking_values()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not ops.checking_values()
    assert not ops.host_sync_allowed(torch.device("cuda"))
    with ops.value_checks(True):
        assert not ops.checking_values()
    with no_host_reads(monkeypatch):  # the noising's id and σ checks read nothing now
        ops.sample_transition(torch.randint(0, 10, (2, 8)), torch.ones(2), get_graph("absorb", 10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_and_sampling_steps_do_not_sync(monkeypatch):
    model, graph, noise = _model("absorb")
    model = model.cuda()
    x0 = torch.randint(0, 11, (2, 8), device="cuda")
    t = torch.tensor([0.3, 0.8], device="cuda")
    monkeypatch.setenv("SEDD_CHECK_VALUES", "0")
    score_entropy_loss(model, x0, graph, noise, t=t).backward()  # warm-up: lazy imports, autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with ops.sync_free():  # the default fused head and sampler read a MASK row count per step
            score_entropy_loss(model, x0, graph, noise, t=t).backward()
            model.eval()
            sample(model, graph, noise, batch_size=2, length=8, steps=2, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
