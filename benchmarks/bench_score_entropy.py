"""Score entropy in the training call: the fused Triton kernel against the public SEDD op sequence,
the eager reference and torch.compile(reference).

The call: raw bf16 output z + the model's per-row score shift, weight dσ, ``batchmean``.
Cases: {absorb, uniform} × {fwd, fwd_bwd} × rows {16384 (16 × 1024), 65536 (64 × 1024, the
paper's per-GPU batch; its offsets pass 2^31 elements)} × impl:
- ``triton``, ``triton_inplace`` (``inplace_backward=True``, fwd_bwd only): the fused kernel;
- ``public``: the public code's op sequence on the same bf16 input (``public_sedd.py``);
- ``eager``: ``sedd/ops/reference.py`` (fp32 math; 16384 rows only: at 65536 rows its fp32
  temporaries alone are several 13 GB buffers);
- ``compiled``: ``torch.compile(reference)`` (the device check runs these last).
On CUDA V = 50258 (absorbing, GPT-2 + MASK) / 50257 (uniform). On CPU a tiny shape, public and
eager, plus the fused kernel under Triton's interpreter when TRITON_INTERPRET=1 (the device
check's dry run: it checks the code path, it measures nothing).

What the operation must move (``bytes_moved``). Absorbing: only masked positions have a loss, so
the forward must read the masked rows of z (and the ids); the gradient is zero on the other rows
but is still a full [B, L, V] tensor, so forward + backward adds one write of the whole buffer.
Uniform: every row is read (and, with the gradient, written). ``gb_per_s`` = bytes_moved / median
time; ``fraction_of_copy`` divides it by the copy bandwidth measured in the same run.

    python -m pytest benchmarks/bench_score_entropy.py --benchmark-only -k "not compiled"
    python -m pytest benchmarks/bench_score_entropy.py --benchmark-disable -q   # smoke run
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks import common, public_sedd
from sedd import ops
from sedd.graph import get_graph
from sedd.ops import reference

CUDA, DEVICE = common.CUDA, common.DEVICE
if CUDA:
    N, SHAPES = 50257, [(16, 1024), (64, 1024)]
    IMPLS = ["triton", "triton_inplace", "public", "eager", "compiled"]
else:
    N, SHAPES = 255, [(2, 32)]
    # the fused kernel too where Triton's interpreter is on (the device check's dry run)
    IMPLS = (["triton", "triton_inplace"] if common.INTERPRETED else []) + ["public", "eager"]
DTYPE = torch.bfloat16
ROUNDS, WARMUP = (10, 1) if CUDA else (1, 0)  # on CPU a code-path check: one round
EAGER_MAX_ROWS = 16384

_cached = {}


def _inputs(graph, B, L):
    """z, sigma, x_t, x0, shift, weight for one case (``common.loss_inputs``); one case is kept at a
    time (65536 rows of bf16 z are 6.6 GB)."""
    key = (graph.name, B, L)
    if key not in _cached:
        _cached.clear()
        if CUDA:
            torch.cuda.empty_cache()
        _cached[key] = common.loss_inputs(graph, B, L, DTYPE)
    return _cached[key]


def bytes_moved(graph, x_t, V: int, mode: str, element_size: int) -> int:
    """The traffic the operation cannot avoid (see the module docstring, ``common.loss_bytes``)."""
    return common.loss_bytes(graph, x_t, V, mode, element_size)


def _reference_loss(graph):
    def loss(z, sigma, x_t, x0, shift, weight):
        per_token = reference.score_entropy(z, sigma, x_t, x0, graph, shift) * weight[:, None]
        return per_token.sum() / z.shape[0]

    return loss


_COMPILED = {}


def _loss_fn(impl, graph):
    if impl in ("triton", "triton_inplace"):
        inplace = impl == "triton_inplace"

        def fused(z, sigma, x_t, x0, shift, weight):
            with ops.use_backend("triton"):
                return ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift, weight=weight,
                                         reduction="batchmean", inplace_backward=inplace)

        return fused
    if impl == "public":
        return lambda *args: public_sedd.score_entropy_loss(*args[:4], graph, *args[4:])
    if impl == "eager":
        return _reference_loss(graph)
    if graph.name not in _COMPILED:
        _COMPILED[graph.name] = torch.compile(_reference_loss(graph))
    return _COMPILED[graph.name]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [f"{B}x{L}" for B, L in SHAPES])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_score_entropy(benchmark, copy_bandwidth, measure_peak, device_label, graph_name, rows, impl, mode):
    if impl == "triton_inplace" and mode == "fwd":
        pytest.skip("in-place only changes the gradient path")
    B, L = map(int, rows.split("x"))
    if impl == "eager" and B * L > EAGER_MAX_ROWS:
        pytest.skip(f"the fp32 reference's temporaries at {B * L} rows do not fit beside the inputs")
    graph = get_graph(graph_name, N)
    z0, *rest = _inputs(graph, B, L)
    fn = _loss_fn(impl, graph)

    def setup():
        # a fresh non-leaf z each round (the in-place variant overwrites it); not timed
        leaf = z0.clone().requires_grad_(mode == "fwd_bwd")
        z = leaf * 1 if mode == "fwd_bwd" else leaf
        common.sync()
        return (z,), {}

    def run(z):
        with ops.value_checks(False):
            if mode == "fwd":
                with torch.no_grad():
                    return fn(z, *rest)
            loss = fn(z, *rest)
            (grad,) = torch.autograd.grad(loss, z)
            return grad

    run(*setup()[0])  # warm-up: compile kernels / graphs
    (z,), _ = setup()
    peak = measure_peak(functools.partial(run, z))
    del z
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)

    buffer_bytes = z0.numel() * z0.element_size()
    nbytes = bytes_moved(graph, rest[1], graph.dim, mode, z0.element_size())
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None  # None under --benchmark-disable
    benchmark.extra_info.update(
        bench="score_entropy",
        device=device_label,
        graph=graph_name,
        impl=impl,
        mode=mode,
        shape=[B, L, graph.dim],
        dtype="bf16",
        bytes_moved=nbytes,
        buffer_bytes=buffer_bytes,
        copy_gb_per_s=copy_bandwidth / 1e9,
        gb_per_s=nbytes / seconds / 1e9 if seconds else None,
        fraction_of_copy=nbytes / seconds / copy_bandwidth if seconds else None,
        peak_extra_bytes=peak,
        peak_over_buffer=peak / buffer_bytes if peak is not None else None,
    )
