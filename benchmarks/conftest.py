"""Shared benchmark fixtures: the rooflines every kernel is judged against (copy bandwidth and
bf16 matmul rate, measured once per session in the same run), peak-memory measurement, and the
device name recorded with every result.

Every benchmark is timed by :func:`benchmarks.common.device_clock` (CUDA events on a GPU; set
here as pytest-benchmark's timer unless ``--benchmark-timer`` says otherwise) and reported by its
median. With ``SEDD_BENCH_RECORDS=FILE`` each finished benchmark is appended to FILE as one JSON
line as soon as it ends (the device check reads those, so a stage killed by its timeout keeps
what it measured).

Run a file by path (the top-level ``testpaths`` is ``tests``):

    python -m pytest benchmarks/bench_score_entropy.py --benchmark-only
    python -m pytest benchmarks/bench_score_entropy.py --benchmark-disable -q   # smoke run
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import common

_DEFAULT_TIMER_NAMES = ("time.perf_counter", "pep418.perf_counter")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # before pytest-benchmark builds its session from the options (its hook runs last)
    if getattr(config.option, "benchmark_timer", None) in _DEFAULT_TIMER_NAMES:
        config.option.benchmark_timer = "benchmarks.common.device_clock"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["device"] = common.device_name()
    machine_info["commit"] = common.commit_id()
    machine_info.update(common.versions())


@pytest.fixture(autouse=True)
def _record_benchmark(request):
    """Append the finished benchmark (name, median, extra_info) to $SEDD_BENCH_RECORDS."""
    path = os.environ.get("SEDD_BENCH_RECORDS")
    bench = request.getfixturevalue("benchmark") if path and "benchmark" in request.fixturenames else None
    yield
    stats = getattr(bench, "stats", None) if bench is not None else None
    if stats is None:
        return
    record = {
        "name": request.node.nodeid,
        "median_s": stats.stats.median,
        "rounds": stats.stats.rounds,
        "extra_info": bench.extra_info,
    }
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write counted), timed as the kernels are."""
    return common.copy_bandwidth()


@pytest.fixture(scope="session")
def bf16_peak() -> float:
    """FLOP/s of a dense bf16 matmul on this device, measured in this run (the MFU denominator)."""
    return common.matmul_peak(torch.bfloat16)


def peak_extra_memory(fn) -> int | None:
    """Peak bytes allocated above what was allocated before ``fn`` ran (CUDA only; None on CPU)."""
    if not common.CUDA:
        return None
    common.sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    common.sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


@pytest.fixture(scope="session")
def measure_peak():
    """``measure_peak(fn)``: the peak bytes ``fn`` allocates above the baseline (None on CPU)."""
    return peak_extra_memory


@pytest.fixture(scope="session")
def device_label() -> str:
    return common.device_name()
