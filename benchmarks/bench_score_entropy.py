"""Score entropy: the fused Triton kernel against the eager reference and torch.compile(reference).

What each must move. One [B, L, V] row block of the raw output z in bf16 is 2·B·L·V bytes
(B·L = 16384, V = 50258: 1.65 GB). The loss needs at least one read of z (forward); the loss with
its gradient needs one read of z and one write of the gradient (forward + backward). The figures
below count only those minimum bytes, so "GB/s" is the *useful* bandwidth and "fraction of copy"
compares it with a device-to-device copy measured in the same run (the practical roofline).
The eager reference moves many fp32 [B, L, V] temporaries, so its useful bandwidth is low.

Cases: {absorb, uniform} × {fwd, fwd_bwd} × {triton, triton_inplace (fwd_bwd only), eager,
compiled}. All use the training call: raw output + per-row shift + weight (dσ) + batchmean.
On CUDA: bf16, B·L = 16384 rows (16 × 1024), V = 50258 (absorbing, GPT-2 + MASK) / 50257 (uniform).
On CPU: eager only at a small shape (the Triton interpreter is a correctness tool, not a fast path).

    python -m pytest benchmarks/bench_score_entropy.py --benchmark-only --benchmark-json out.json
    python benchmarks/summarize.py out.json        # -> benchmarks/results/<device>-<date>-<commit>.md

``benchmark.extra_info`` per case: bytes_moved, gb_per_s, copy_gb_per_s, fraction_of_copy,
peak_extra_bytes (CUDA), buffer_bytes (one [B, L, V] buffer of z's dtype), peak_over_buffer.
"""

from __future__ import annotations

import pytest
import torch

from sedd import ops, reference
from sedd.graph import Absorbing, Uniform

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    B, L, N, DTYPE = 16, 1024, 50257, torch.bfloat16
    IMPLS = ["triton", "triton_inplace", "eager", "compiled"]
else:
    B, L, N, DTYPE = 2, 64, 1023, torch.bfloat16
    IMPLS = ["eager"]
GRAPHS = {"absorb": Absorbing(N), "uniform": Uniform(N)}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _inputs(graph):
    gen = torch.Generator(DEVICE).manual_seed(0)
    V = graph.dim
    z = torch.randn(B, L, V, device=DEVICE, generator=gen).to(DTYPE)
    sigma = torch.rand(B, device=DEVICE, generator=gen) * 2 + 0.05
    x0 = torch.randint(0, graph.N, (B, L), device=DEVICE, generator=gen)
    x_t = ops.sample_transition(x0, sigma, graph, gen) if CUDA else reference.sample_transition(x0, sigma, graph, gen)
    shift = -torch.log(torch.expm1(sigma)) - torch.log(torch.tensor(float(V - 1), device=DEVICE))
    weight = torch.rand(B, device=DEVICE, generator=gen) + 0.5
    return z, sigma, x_t, x0, shift, weight


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
                                         reduction="batchmean", inplace_backward=inplace)  # fmt: skip

        return fused
    if impl == "eager":
        return _reference_loss(graph)
    if graph.name not in _COMPILED:
        _COMPILED[graph.name] = torch.compile(_reference_loss(graph))
    return _COMPILED[graph.name]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("graph_name", list(GRAPHS))
def test_score_entropy(benchmark, copy_bandwidth, measure_peak, device_label, graph_name, impl, mode):
    if impl == "triton_inplace" and mode == "fwd":
        pytest.skip("in-place only changes the gradient path")
    graph = GRAPHS[graph_name]
    z0, *rest = _inputs(graph)
    fn = _loss_fn(impl, graph)

    def setup():
        # a fresh non-leaf z each round (the in-place variant overwrites it); not timed
        leaf = z0.clone().requires_grad_(mode == "fwd_bwd")
        z = leaf * 1 if mode == "fwd_bwd" else leaf
        _sync()
        return (z,), {}

    def run(z):
        if mode == "fwd":
            with torch.no_grad():
                out = fn(z, *rest)
        else:
            loss = fn(z, *rest)
            (out,) = torch.autograd.grad(loss, z)
        _sync()
        return out

    run(*setup()[0])  # warm-up: compile kernels / graphs
    (z,), _ = setup()
    peak = measure_peak(lambda: run(z))
    del z
    benchmark.pedantic(run, setup=setup, rounds=10 if CUDA else 3, warmup_rounds=1)

    buffer_bytes = z0.numel() * z0.element_size()
    bytes_moved = buffer_bytes * (1 if mode == "fwd" else 2)  # read z (+ write the gradient)
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None  # None under --benchmark-disable
    benchmark.extra_info.update(
        device=device_label,
        graph=graph_name,
        impl=impl,
        mode=mode,
        shape=[B, L, graph.dim],
        dtype=str(DTYPE),
        bytes_moved=bytes_moved,
        buffer_bytes=buffer_bytes,
        copy_gb_per_s=copy_bandwidth / 1e9,
        gb_per_s=bytes_moved / seconds / 1e9 if seconds else None,
        fraction_of_copy=bytes_moved / seconds / copy_bandwidth if seconds else None,
        peak_extra_bytes=peak,
        peak_over_buffer=peak / buffer_bytes if peak is not None else None,
    )
