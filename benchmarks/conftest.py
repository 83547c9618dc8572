"""Shared benchmark fixtures: the device's copy bandwidth (the roofline every kernel is judged
against, measured once per session in the same run), peak-memory measurement, and the device
name/commit recorded with every results file.

Run a file by path (the top-level ``testpaths`` is ``tests``):

    python -m pytest benchmarks/bench_score_entropy.py --benchmark-only --benchmark-json out.json
    python benchmarks/summarize.py out.json
"""

from __future__ import annotations

import time

import pytest
import torch

CUDA = torch.cuda.is_available()


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["device"] = device_name()
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        machine_info["triton"] = None


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of several: 1 GiB on CUDA,
    64 MiB on CPU."""
    n = (1 << 30) if CUDA else (64 << 20)
    device = "cuda" if CUDA else "cpu"
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    sync()
    best = float("inf")
    for _ in range(10 if CUDA else 3):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    del src, dst
    if CUDA:
        torch.cuda.empty_cache()
    return 2 * n / best


def peak_extra_memory(fn) -> int | None:
    """Peak bytes allocated above what was allocated before ``fn`` ran (CUDA only; None on CPU)."""
    if not CUDA:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


@pytest.fixture(scope="session")
def measure_peak():
    """``measure_peak(fn)``: the peak bytes ``fn`` allocates above the baseline (None on CPU)."""
    return peak_extra_memory


@pytest.fixture(scope="session")
def device_label() -> str:
    return device_name()
