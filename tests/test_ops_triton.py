"""The Triton backend's op layer (sedd/ops_triton.py): the reverse steps are custom ops with fake
implementations, so a ``torch.compile``d sampler step traces them without a graph break."""

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing, Uniform

# the interpreter evaluates masked-off lanes too (log of non-positive weights there is discarded)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")


def _row(graph, B=2, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, L, graph.dim, generator=g)
    x_t = torch.full((B, L), graph.dim - 1)
    return z, x_t


@pytest.mark.parametrize("graph", [Absorbing(12), Uniform(13)], ids=repr)
def test_compiled_sampler_step_traces_the_reverse_step_op(monkeypatch, graph):
    monkeypatch.setenv("SEDD_CHECK_VALUES", "0")  # the value checks need data (a graph break)
    torch._dynamo.reset()
    z, x_t = _row(graph)
    dsigma, shift = torch.full((2,), 0.5), torch.full((2,), -0.3)
    traced = []

    def record(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def step(z, x):
        x = ops.analytic_step(z, x, dsigma, graph, shift=shift)
        return ops.euler_step(z, x, dsigma, 0.1, graph, shift=shift)

    with ops.use_backend("triton"):
        torch.manual_seed(0)
        want = step(z, x_t)
        torch.manual_seed(0)  # the Philox keys come from the default generator: the same draws
        got = torch.compile(step, fullgraph=True, backend=record)(z, x_t)
    assert torch.equal(got, want)
    assert sum("sedd.reverse_step" in t for t in traced) == 2, traced


def test_opcheck_reverse_step():
    graph = Uniform(13)
    z, x_t = _row(graph, L=3)
    seed = torch.zeros(1, dtype=torch.long)
    for kind, shift in (("euler", None), ("analytic", torch.zeros(2)), ("denoise", None)):
        args = (kind, z, x_t, torch.full((2,), 0.4), shift, seed, False, graph.N, 0)
        torch.library.opcheck(torch.ops.sedd.reverse_step, args, test_utils=("test_schema", "test_faketensor"))


def test_block_v_must_be_a_power_of_two():
    z, x_t = _row(Absorbing(12))
    with ops.use_backend("triton"), pytest.raises(ValueError, match="block_v"):
        ops.analytic_step(z, x_t, torch.ones(2), "absorb", block_v=12)
