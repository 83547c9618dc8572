"""Which backend runs a :mod:`sedd.ops` call: "triton" (the fused kernels, :mod:`sedd.ops.custom_ops`)
or "torch" (:mod:`sedd.ops.eager` for the built-in graphs, :mod:`sedd.ops.reference` for any other).

The request comes from the innermost :func:`use_backend`, else ``$SEDD_BACKEND``, else "auto"
(Triton for CUDA tensors of a graph with a kernel, eager otherwise); :func:`last_backend` says
which one ran the latest call in this thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading

import torch

from sedd.graph import Graph

BACKENDS = ("auto", "torch", "triton")

_backend_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("sedd_backend", default=None)
_last = threading.local()
_NO_KERNEL = "no-kernel"  # "triton" was asked for explicitly, for a graph without a kernel


def get_backend() -> str:
    """The requested backend: the innermost :func:`use_backend`, else ``$SEDD_BACKEND``, else ``"auto"``."""
    name = _backend_override.get() or os.environ.get("SEDD_BACKEND", "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"SEDD_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ``sedd.ops`` calls inside the block on backend ``name`` ("auto", "torch" or "triton")."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _backend_override.set(name)
    try:
        yield
    finally:
        _backend_override.reset(token)


def resolve_backend(device: torch.device | str, graph: Graph | None = None) -> str:
    """The backend ("torch" or "triton") a call on tensors of ``device`` (with ``graph``) runs on now.

    A graph whose ``kernel`` tag is None has no Triton kernel: "auto" runs its eager math, and an
    explicit "triton" is a ``RuntimeError``, as is Triton requested where it cannot run.
    """
    backend = _resolve(torch.device(device).type, graph is None or graph.kernel is not None)
    if backend == _NO_KERNEL:
        raise RuntimeError(
            f"SEDD backend 'triton' requested, but graph {graph!r} has no Triton kernel (its kernel tag is None); "
            "use the 'auto' or 'torch' backend, which run the graph's eager math"
        )
    return backend


def dispatch(device: torch.device, graph: Graph) -> str:
    """:func:`resolve_backend` for a call about to run, recorded for :func:`last_backend`."""
    backend = _resolve_and_record(device.type, graph.kernel is not None)
    if backend == _NO_KERNEL:
        return resolve_backend(device, graph)  # raises, naming the graph
    return backend


_launch: contextvars.ContextVar[dict | None] = contextvars.ContextVar("sedd_launch_options", default=None)


@contextlib.contextmanager
def launch_options(*, block_v: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """Inside the block, the fused kernels launch with these choices (None: the launcher's own):
    the columns per tile (a power of two; a call's own ``block_v`` argument takes precedence), the
    warps per program and the software-pipelining depth. Results do not change beyond rounding
    (the reverse steps' draws for a seed depend on the tile, not their distribution). The launch
    sweep (``benchmarks/sweep_launch.py``) times the choices through this."""
    for name, value in (("block_v", block_v), ("num_warps", num_warps), ("num_stages", num_stages)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    if block_v is not None and (block_v < 2 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be None or a power of two >= 2, got {block_v!r}")
    token = _launch.set({k: v for k, v in (("block_v", block_v), ("num_warps", num_warps),
                                           ("num_stages", num_stages)) if v is not None})
    try:
        yield
    finally:
        _launch.reset(token)


def current_launch_options() -> dict:
    """The innermost :func:`launch_options` as launcher keywords ({} outside one)."""
    return dict(_launch.get() or {})


def last_backend() -> str | None:
    """The backend ("torch" or "triton") that ran the most recent ``sedd.ops`` call in this thread."""
    return getattr(_last, "backend", None)


def _resolve(device_type: str, has_kernel: bool) -> str:
    name = get_backend()
    if name == "auto":
        return "triton" if device_type == "cuda" and has_kernel and _triton_available() else "torch"
    if name == "triton":
        if not _triton_available():
            raise RuntimeError("SEDD backend 'triton' requested but triton is not importable")
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "SEDD backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing sedd (or use the 'torch' backend on CPU)"
            )
        if device_type not in ("cpu", "cuda"):
            raise RuntimeError(f"SEDD backend 'triton' does not support device {device_type}")
        if not has_kernel:
            return _NO_KERNEL
    return name


# dynamo cannot trace the ContextVar / threading.local: under torch.compile the backend is resolved
# once at trace time and baked into the graph (last_backend() then reports that trace-time choice)
@torch.compiler.assume_constant_result
def _resolve_and_record(device_type: str, has_kernel: bool) -> str:
    backend = _resolve(device_type, has_kernel)
    if backend != _NO_KERNEL:
        _last.backend = backend
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
