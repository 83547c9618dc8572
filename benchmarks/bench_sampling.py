"""One reverse step (analytic, Euler, denoise), absorbing and uniform: the fused Triton kernel
against the public SEDD op sequence, the eager reference and ``torch.compile(reference)``.

Inputs: bf16 raw scores [B, L, V] with the model's per-row score shift; absorbing with half of
the positions masked, uniform with random tokens. Rows: 16384 (16 × 1024) for every impl, and
65536 (64 × 1024) for the kernel only (the eager reference's fp64 noise alone would be 26 GB).

What a step must move (``bytes_moved``): the rows that can change (absorbing: the masked ones;
uniform: all) once, V × 2 bytes each, plus the current ids read and the new ids written. The
uniform analytic / denoise kernel reads its rows twice (the staggered score needs the row sum
first); the count stays the minimum, so its fraction of copy shows that cost. Time: the median
of the rounds (``benchmarks/common.py``); ``fraction_of_copy`` against the copy bandwidth of the
same run.

On CPU a tiny shape runs the public and eager steps, plus the fused kernel under Triton's
interpreter when TRITON_INTERPRET=1 (the device check's dry run: a code-path check, not a
measurement).

    python -m pytest benchmarks/bench_sampling.py --benchmark-only -k "not compiled"
    python -m pytest benchmarks/bench_sampling.py --benchmark-disable -q   # smoke run
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import common, public_sedd
from sedd import ops
from sedd.graph import get_graph
from sedd.ops import reference

CUDA, DEVICE = common.CUDA, common.DEVICE
if CUDA:
    N, SHAPES = 50257, [(16, 1024), (64, 1024)]
    IMPLS = ["triton", "public", "eager", "compiled"]
else:
    N, SHAPES = 255, [(2, 32)]
    # the fused kernel too where Triton's interpreter is on (the device check's dry run)
    IMPLS = (["triton"] if common.INTERPRETED else []) + ["public", "eager"]
KINDS = ["analytic", "euler", "denoise"]
ROUNDS, WARMUP = (10, 1) if CUDA else (1, 0)  # on CPU a code-path check: one round
BASELINE_MAX_ROWS = 16384
DT = common.STEP_DT

_cached = {}


def _inputs(graph, B, L):
    key = (graph.name, B, L)
    if key not in _cached:
        _cached.clear()
        if CUDA:
            torch.cuda.empty_cache()
        _cached[key] = common.step_inputs(graph, B, L)  # the kernel-vs-op stage and the sweep use these too
    return _cached[key]


def bytes_moved(graph, x_t, V: int, element_size: int) -> int:
    """Scores of the rows that can move, plus the ids read and written (``common.step_bytes``)."""
    return common.step_bytes(graph, x_t, V, element_size)


def _make_step(kind, impl, graph, inp):
    z, x_t, shift = inp["z"], inp["x_t"], inp["shift"]
    scalar = inp["sigma"] if kind == "denoise" else inp["dsigma"]
    if impl in ("eager", "compiled"):
        eager = {"analytic": reference.analytic_step, "euler": reference.euler_step,
                 "denoise": reference.denoise_step}[kind]
        fn = torch.compile(eager) if impl == "compiled" else eager
        if kind == "euler":
            return lambda: fn(z, x_t, scalar, DT, graph, shift)
        return lambda: fn(z, x_t, scalar, graph, shift)
    if impl == "public":
        if kind == "euler":
            return lambda: public_sedd.euler_step(z, x_t, scalar, DT, graph, shift)
        return lambda: getattr(public_sedd, f"{kind}_step")(z, x_t, scalar, graph, shift)
    gen = torch.Generator(DEVICE).manual_seed(1)

    def run():
        with ops.use_backend("triton"):
            if kind == "euler":
                return ops.euler_step(z, x_t, scalar, DT, graph, gen, shift=shift)
            if kind == "analytic":
                return ops.analytic_step(z, x_t, scalar, graph, gen, shift=shift)
            return ops.denoise_step(z, x_t, scalar, graph, gen, shift=shift)

    return run


def _check_step(out: torch.Tensor, inp: dict, graph, B: int, L: int) -> None:
    """A step's tokens have the batch's shape and, on the absorbing graph, leave real tokens alone."""
    assert out.shape == (B, L)
    if graph.absorbing:
        fixed = inp["x_t"] != graph.mask_id
        assert torch.equal(out[fixed], inp["x_t"][fixed].to(out.dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [f"{B}x{L}" for B, L in SHAPES])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_reverse_step(benchmark, copy_bandwidth, measure_peak, device_label, graph_name, rows, kind, impl):
    B, L = map(int, rows.split("x"))
    if impl != "triton" and B * L > BASELINE_MAX_ROWS:
        pytest.skip(f"baselines run at {BASELINE_MAX_ROWS} rows (their [B, L, V] fp32/fp64 temporaries)")
    graph = get_graph(graph_name, N)
    inp = _inputs(graph, B, L)
    fn = _make_step(kind, impl, graph, inp)

    def step():
        with ops.value_checks(False):
            return fn()

    try:
        out = step()  # warm-up: compile, allocator
    except Exception as err:  # torch.compile of the reference is optional
        if impl == "compiled":
            pytest.skip(f"torch.compile(reference) failed: {type(err).__name__}: {err}")
        raise
    _check_step(out, inp, graph, B, L)
    peak = measure_peak(step)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else None  # None under --benchmark-disable
    nbytes = bytes_moved(graph, inp["x_t"], graph.dim, inp["z"].element_size())
    benchmark.extra_info.update(
        bench="reverse_step",
        device=device_label,
        graph=graph_name,
        mode=kind,
        impl=impl,
        dtype="bf16",
        shape=[B, L, graph.dim],
        bytes_moved=nbytes,
        gb_per_s=nbytes / seconds / 1e9 if seconds else None,
        copy_gb_per_s=copy_bandwidth / 1e9,
        fraction_of_copy=nbytes / seconds / copy_bandwidth if seconds else None,
        peak_memory_bytes=peak,
    )


# A truncated step (top-p / top-k) at SEDD-small's sampling shape: the kept set and the stay-or-move
# decision come from a sorted row with fp64 weights (~30 bytes per score), in chunks of rows, then
# the fused kernel draws; peak_memory_bytes records that the chunks bound the temporaries (a
# [B, L, V] pass would take ~25 GB here with the full head). On CPU the eager chunked step (and
# the interpreted kernel in the dry run) at the tiny shape: a code-path check.
TRUNC_IMPLS = ["triton"] if CUDA else (["triton"] if common.INTERPRETED else []) + ["eager"]
TRUNC_ROUNDS = 3 if CUDA else 1


@pytest.mark.parametrize("impl", TRUNC_IMPLS)
@pytest.mark.parametrize("trunc", ["top_p=0.9", "top_k=40"])
@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_truncated_reverse_step(benchmark, measure_peak, device_label, graph_name, trunc, impl):
    B, L = SHAPES[0]
    graph = get_graph(graph_name, N)
    inp = _inputs(graph, B, L)
    name, value = trunc.split("=")
    kw = {name: float(value) if name == "top_p" else int(value)}
    gen = torch.Generator(DEVICE).manual_seed(1)
    backend = "triton" if impl == "triton" else "torch"

    def step():
        with ops.value_checks(False), ops.use_backend(backend):
            return ops.analytic_step(inp["z"], inp["x_t"], inp["dsigma"], graph, gen, shift=inp["shift"], **kw)

    out = step()
    _check_step(out, inp, graph, B, L)
    peak = measure_peak(step)
    benchmark.pedantic(step, rounds=TRUNC_ROUNDS, warmup_rounds=WARMUP)
    buffer = inp["z"].numel() * inp["z"].element_size()
    benchmark.extra_info.update(
        bench="truncated_step", device=device_label, graph=graph_name, mode=f"analytic {trunc}", impl=impl,
        dtype="bf16", shape=[B, L, graph.dim], peak_memory_bytes=peak,
        peak_over_buffer=peak / buffer if peak is not None else None,
    )
