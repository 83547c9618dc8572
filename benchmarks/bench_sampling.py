"""One reverse step (analytic, Euler, denoise): the fused Triton kernel against the eager reference
(and ``torch.compile(reference)``), reported as bandwidth over the bytes the step must read.

What a step must move: the scores of the positions that can change (for absorbing, the masked
ones: masked rows × V × 2 bytes in bf16), the current ids and the new ids. The eager reference
reads every row and materialises about ten [B, L, V] fp32/fp64 temporaries on top. The kernel's
bandwidth is compared with a device-to-device copy measured in the same run (``copy_bandwidth``
in ``conftest.py``: read + write bytes over time), so the fraction is meaningful on any GPU.

On CUDA the shape is the issue's: GPT-2 absorbing width V = 50258, B·L = 16 × 1024 = 16384 rows,
bf16 raw scores with a per-row shift, half of the positions masked. On CPU a small shape runs
the eager path only (the Triton interpreter is a correctness tool, not a fast path).

    python -m pytest benchmarks/bench_sampling.py --benchmark-only
    python -m pytest benchmarks/bench_sampling.py --benchmark-disable -q   # smoke run

Each case records time, GB/s over the required bytes, the fraction of copy bandwidth and the
peak memory allocated by the step in ``benchmark.extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from sedd import ops, reference
from sedd.graph import Absorbing

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    B, L, V = 16, 1024, 50258
    IMPLS = ["triton", "eager", "compiled"]
else:
    B, L, V = 2, 64, 1025
    IMPLS = ["eager"]
KINDS = ["analytic", "euler", "denoise"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def step_inputs():
    """bf16 raw scores [B, L, V], shift [B], x_t [B, L] with half the positions masked."""
    g = torch.Generator(DEVICE).manual_seed(0)
    graph = Absorbing(V - 1)
    z = torch.randn(B, L, V, device=DEVICE, generator=g).to(torch.bfloat16)
    x_t = torch.randint(0, graph.N, (B, L), device=DEVICE, generator=g)
    x_t[torch.rand(B, L, device=DEVICE, generator=g) < 0.5] = graph.mask_id
    sigma = torch.full((B,), 2.0, device=DEVICE)
    shift = -reference.esigm1(sigma).log() - torch.log(torch.tensor(V - 1.0, device=DEVICE))
    return dict(graph=graph, z=z, x_t=x_t, sigma=sigma, dsigma=torch.full((B,), 0.05, device=DEVICE), shift=shift)


def _required_bytes(inp) -> int:
    """Scores of the rows that can move (masked rows × V × 2 bytes), plus ids read and written."""
    masked = int((inp["x_t"] == inp["graph"].mask_id).sum())
    ids = inp["x_t"].numel() * inp["x_t"].element_size()
    return masked * V * inp["z"].element_size() + 2 * ids


def _make_step(kind, impl, inp):
    graph, z, x_t, shift = inp["graph"], inp["z"], inp["x_t"], inp["shift"]
    gen = torch.Generator(DEVICE).manual_seed(1)
    if impl == "compiled":
        eager = {"analytic": reference.analytic_step, "euler": reference.euler_step, "denoise": reference.denoise_step}[kind]
        compiled = torch.compile(eager)
        if kind == "euler":
            return lambda: compiled(z, x_t, inp["dsigma"], 0.01, graph, shift)
        scalar = inp["dsigma"] if kind == "analytic" else inp["sigma"]
        return lambda: compiled(z, x_t, scalar, graph, shift)
    backend = "torch" if impl == "eager" else impl

    def run():
        with ops.use_backend(backend):
            if kind == "euler":
                return ops.euler_step(z, x_t, inp["dsigma"], 0.01, graph, gen, shift=shift)
            if kind == "analytic":
                return ops.analytic_step(z, x_t, inp["dsigma"], graph, gen, shift=shift)
            return ops.denoise_step(z, x_t, inp["sigma"], graph, gen, shift=shift)

    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_reverse_step(benchmark, step_inputs, copy_bandwidth, measure_peak, kind, impl):
    fn = _make_step(kind, impl, step_inputs)

    def step():
        out = fn()
        _sync()
        return out

    try:
        out = step()  # warm-up: compile, allocator
    except Exception as err:  # torch.compile of the reference is optional
        if impl == "compiled":
            pytest.skip(f"torch.compile(reference) failed: {type(err).__name__}: {err}")
        raise
    assert out.shape == (B, L)
    fixed = step_inputs["x_t"] != step_inputs["graph"].mask_id
    assert torch.equal(out[fixed], step_inputs["x_t"][fixed])
    peak = measure_peak(step)
    benchmark.pedantic(step, rounds=10 if CUDA else 2, warmup_rounds=1)
    seconds = benchmark.stats.stats.mean if benchmark.stats else None
    nbytes = _required_bytes(step_inputs)
    gbps = nbytes / seconds / 1e9 if seconds else None
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        graph="absorb",
        mode=kind,
        impl=impl,
        dtype="bf16",
        shape=[B, L, V],
        required_bytes=nbytes,
        gb_per_s=gbps,
        copy_gb_per_s=copy_bandwidth / 1e9,
        fraction_of_copy=gbps * 1e9 / copy_bandwidth if gbps else None,
        peak_memory_bytes=peak,
    )
