"""The output head + score entropy, forward and backward: fused (``ops.linear_score_entropy``,
chunked, MASK rows only on the absorbing graph) against the logits path (``hidden @ Wᵀ + b``, then
``ops.score_entropy`` with the in-place gradient), gradients for hidden, weight and bias.

What the logits path must hold. One [B·L, V] bf16 buffer of logits (written by the matmul, then
overwritten by their gradient in place): 16 × 1024 × 50258 × 2 bytes = 1.65 GB at 16 × 1024 tokens
and 6.6 GB at 64 × 1024. The fused path holds one chunk (256 MiB by default) plus ∂/∂hidden
(B·L·D) and the fp32 ∂/∂W accumulator (V·D·4 = 154 MB at SEDD-small). On the absorbing graph with
half of the positions masked it also does half of the three matmuls.

On CUDA: SEDD-small's head, D = 768, V = 50258 (absorbing) / 50257 (uniform), bf16, B·L = 16 × 1024
and 64 × 1024. On CPU: a small shape in fp32, torch backend, in the normal smoke run.

    python -m pytest benchmarks/bench_linear_score_entropy.py --benchmark-only --benchmark-json out.json
    python -m pytest benchmarks/bench_linear_score_entropy.py --benchmark-disable -q   # smoke run

``benchmark.extra_info`` per case: peak_extra_bytes (CUDA: the allocator's peak above the inputs;
CPU: the rise of the process's peak resident set, with glibc's large allocations going straight to
mmap so freed chunks leave the resident set), logits_bytes (one [B·L, V] buffer of the compute
dtype), peak_over_logits, masked_fraction, and on the fused rows ×_time / ×_memory against the
logits path of the same case.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys

import pytest
import torch

from benchmarks import common
from sedd import ops
from sedd.graph import Absorbing, Uniform

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    D, N, DTYPE, SHAPES, ROUNDS = 768, 50257, torch.bfloat16, [(16, 1024), (64, 1024)], 5
else:
    D, N, DTYPE, SHAPES, ROUNDS = 128, 8191, torch.float32, [(4, 512)], 3
GRAPHS = {"absorb": Absorbing(N), "uniform": Uniform(N)}
_RESULTS: dict[tuple, tuple[float | None, int | None]] = {}


def _mmap_large_allocations() -> None:
    """Make glibc serve allocations ≥ 1 MiB by mmap and unmap them on free (a fixed threshold also
    stops glibc raising it after each free), so a freed buffer leaves the resident set and the
    peak resident set measures the peak of live buffers."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except OSError:  # pragma: no cover (not glibc)
            pass


def _rss_peak_extra(fn) -> int | None:
    """Rise of the peak resident set while ``fn`` runs (Linux; None where the peak cannot be reset)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return None

    base = status("VmRSS:")
    out = fn()
    peak = status("VmHWM:")
    del out
    return None if base is None or peak is None else peak - base


def _inputs(graph, B, L):
    gen = torch.Generator(DEVICE).manual_seed(0)
    V = graph.dim
    hidden = torch.randn(B, L, D, device=DEVICE, generator=gen).to(DTYPE)
    weight = (torch.randn(V, D, device=DEVICE, generator=gen) / math.sqrt(D)).to(DTYPE)
    bias = torch.zeros(V, device=DEVICE, dtype=DTYPE)
    # σ = ln 2: half of the positions are masked on the absorbing graph
    sigma = torch.full((B,), math.log(2.0), device=DEVICE)
    x0 = torch.randint(0, graph.N, (B, L), device=DEVICE, generator=gen)
    x_t = ops.sample_transition(x0, sigma, graph, gen)
    shift = torch.zeros(B, device=DEVICE)
    loss_weight = torch.rand(B, device=DEVICE, generator=gen) + 0.5
    return hidden, weight, bias, sigma, x_t, x0, shift, loss_weight


def _loss(impl, graph, hidden, weight, bias, sigma, x_t, x0, shift, loss_weight):
    if impl == "fused":
        return ops.linear_score_entropy(hidden, weight, bias, sigma, x_t, x0, graph, shift=shift,
                                        loss_weight=loss_weight)
    logits = torch.addmm(bias, hidden.reshape(-1, D), weight.t()).view(*x_t.shape, -1)
    return ops.score_entropy(logits, sigma, x_t, x0, graph, shift=shift, weight=loss_weight, reduction="batchmean",
                             inplace_backward=True)


@pytest.mark.parametrize("impl", ["unfused", "fused"])  # unfused first: the fused row reports the ratios
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("graph_name", list(GRAPHS))
def test_linear_score_entropy(benchmark, measure_peak, device_label, graph_name, shape, impl):
    _mmap_large_allocations()
    graph = GRAPHS[graph_name]
    B, L = shape
    hidden0, weight0, bias0, *rest = _inputs(graph, B, L)

    def setup():
        leaves = [t.clone().requires_grad_() for t in (hidden0, weight0, bias0)]
        common.sync()
        return (leaves,), {}

    def run(leaves):
        loss = _loss(impl, graph, *leaves, *rest)
        grads = torch.autograd.grad(loss, leaves)
        common.sync()
        return grads

    run(*setup()[0])  # warm-up
    (leaves,), _ = setup()
    peak = (measure_peak if CUDA else _rss_peak_extra)(functools.partial(run, leaves))
    del leaves
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=0)

    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None  # None under --benchmark-disable
    logits_bytes = B * L * graph.dim * torch.finfo(DTYPE).bits // 8
    info = dict(
        device=device_label, graph=graph_name, impl=impl, shape=[B, L, D, graph.dim], dtype=str(DTYPE),
        backend=ops.last_backend(), threads=torch.get_num_threads(),
        masked_fraction=float((rest[1] == graph.N).float().mean()) if graph.absorbing else None,
        median_s=seconds, peak_extra_bytes=peak, logits_bytes=logits_bytes,
        peak_over_logits=peak / logits_bytes if peak is not None else None,
    )
    key = (graph_name, shape)
    if impl == "unfused":
        _RESULTS[key] = (seconds, peak)
    elif key in _RESULTS:
        base_s, base_peak = _RESULTS[key]
        info["x_time"] = seconds / base_s if seconds and base_s else None
        info["x_memory"] = peak / base_peak if peak and base_peak else None
    benchmark.extra_info.update(info)
    if os.environ.get("SEDD_BENCH_PRINT"):
        print(f"\n{info}")
