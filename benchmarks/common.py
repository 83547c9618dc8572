"""What every benchmark and device-check stage shares: the device, one clock and one statistic,
the copy-bandwidth and bf16-matmul rooflines, and the commit id.

Timing. Every figure (kernels, baselines, the copy, the matmul) is the **median** of several
rounds after a warm-up, read from :func:`device_clock`: on CUDA a clock made of CUDA events (an
event recorded and waited for at each reading, so the interval between two readings is GPU time
from the first event to the last one); on CPU ``time.perf_counter``. ``benchmarks/conftest.py``
makes it pytest-benchmark's timer, so the pytest suites and the device check time alike.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton kernels run on CPU tensors
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parent.parent
COMMIT_FILE = ROOT / "benchmarks" / "COMMIT"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class _EventClock:
    """Seconds of GPU time since the first reading. Each reading records an event and waits for
    it; the differences between consecutive events are summed in Python floats (one event pair's
    ``elapsed_time`` is fp32 milliseconds: fine for an interval, not for an absolute time)."""

    def __init__(self):
        self._last = None
        self._seconds = 0.0

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        if self._last is not None:
            self._seconds += self._last.elapsed_time(event) / 1e3
        self._last = event
        return self._seconds


_event_clock = _EventClock() if CUDA else None


def device_clock() -> float:
    """The one clock of every benchmark: CUDA events on a GPU, ``perf_counter`` on CPU."""
    return _event_clock() if _event_clock is not None else time.perf_counter()


def time_median(fn, *, setup=None, warmup: int = 3, rounds: int = 20) -> float:
    """Median seconds of ``fn()`` over ``rounds`` after ``warmup`` calls; ``setup()`` (untimed)
    runs before each call. The same rule pytest-benchmark applies with :func:`device_clock`."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        sync()
        start = device_clock()
        fn()
        times.append(device_clock() - start)
    return statistics.median(times)


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy, read + write counted: 1 GiB on CUDA, 16 MiB on CPU."""
    n = (1 << 30) if CUDA else (16 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    seconds = time_median(functools.partial(dst.copy_, src), warmup=3, rounds=20 if CUDA else 5)
    del src, dst
    if CUDA:
        torch.cuda.empty_cache()
    return 2 * n / seconds


def matmul_peak(dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of a dense square matmul (8192³ on CUDA, 256³ on CPU): the practical dense peak
    that MFU is measured against."""
    n = 8192 if CUDA else 256
    a = torch.randn(n, n, device=DEVICE).to(dtype)
    b = torch.randn(n, n, device=DEVICE).to(dtype)
    seconds = time_median(functools.partial(torch.matmul, a, b), warmup=3, rounds=20 if CUDA else 3)
    del a, b
    return 2 * n**3 / seconds


def commit_id() -> str:
    """``SEDD_COMMIT`` (the device check sets it), else ``git rev-parse HEAD`` (+ "-dirty"), else
    the file ``benchmarks/COMMIT`` (``bash benchmarks/device_check.sh --write-commit``, for a copy
    without ``.git``), else "unknown"."""
    if os.environ.get("SEDD_COMMIT"):
        return os.environ["SEDD_COMMIT"].strip()
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--"], timeout=10).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if COMMIT_FILE.is_file() and COMMIT_FILE.read_text().strip():
        return COMMIT_FILE.read_text().strip().splitlines()[0]
    return "unknown"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}



# ---------------------------------------------------------------------------------------------
# The kernels' inputs and the bytes they must move: one definition for the benchmarks, the
# kernel-vs-op stage and the launch sweep, so their figures describe the same work
# ---------------------------------------------------------------------------------------------

STEP_DT = 0.01  # Δt of the Euler step (its scalar is dσ·Δt)


def loss_inputs(graph, B: int, L: int, dtype=torch.bfloat16, seed: int = 0):
    """(z, σ, x_t, x0, shift, weight) of a training call: raw scores, σ ~ U(0.05, 2.05) per
    sequence, x_t drawn from the forward process, the model's score shift, a dσ-like weight."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    z = torch.randn(B, L, graph.dim, device=DEVICE, generator=gen, dtype=dtype)
    sigma = torch.rand(B, device=DEVICE, generator=gen) * 2 + 0.05
    x0 = torch.randint(0, graph.N, (B, L), device=DEVICE, generator=gen)
    x_t = graph.sample_transition(x0, sigma, generator=gen)
    weight = torch.rand(B, device=DEVICE, generator=gen) + 0.5  # stands in for dσ
    return z, sigma, x_t, x0, graph.score_shift(sigma), weight


def step_inputs(graph, B: int, L: int, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """A sampling step's arguments: raw scores at σ = 2 with the model's shift, Δσ = 0.05 (Euler:
    dσ = 0.05, Δt = ``STEP_DT``); absorbing with half the positions MASK, uniform random tokens."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    z = torch.randn(B, L, graph.dim, device=DEVICE, generator=g, dtype=dtype)
    x_t = torch.randint(0, graph.N, (B, L), device=DEVICE, generator=g)
    if graph.absorbing:
        x_t[torch.rand(B, L, device=DEVICE, generator=g) < 0.5] = graph.mask_id
    sigma = torch.full((B,), 2.0, device=DEVICE)
    return dict(z=z, x_t=x_t, sigma=sigma, dsigma=torch.full((B,), 0.05, device=DEVICE),
                shift=graph.score_shift(sigma))


def loss_bytes(graph, x_t, V: int, mode: str, element_size: int) -> int:
    """What the loss cannot avoid moving: the rows with a loss read once (absorbing: the MASK rows),
    the ids, and for "fwd_bwd" the whole [B, L, V] gradient written once."""
    rows = x_t.numel()
    read_rows = int((x_t == graph.mask_id).sum()) if graph.absorbing else rows
    ids = rows * x_t.element_size() + read_rows * x_t.element_size()  # x_t of every row, x0 of the rows read
    gradient = rows * V * element_size if mode == "fwd_bwd" else 0
    return read_rows * V * element_size + gradient + ids


def step_bytes(graph, x_t, V: int, element_size: int) -> int:
    """What a step cannot avoid moving: the rows that can change (absorbing: the MASK ones) once,
    plus the ids read and written."""
    rows = int((x_t == graph.mask_id).sum()) if graph.absorbing else x_t.numel()
    return rows * V * element_size + 2 * x_t.numel() * x_t.element_size()
