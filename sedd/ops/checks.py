"""Argument checks of :mod:`sedd.ops` and the switches for the checks that need the device.

Shape, dtype and device checks always run; value checks (ids in range, σ finite and positive)
read tensors on the host, so they follow :func:`value_checks` / ``SEDD_CHECK_VALUES``;
:func:`sync_free` picks the paths that read no row count. Everything here is re-exported by
:mod:`sedd.ops`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from sedd.graph import Graph, graph_for_width


_SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Token ids may come in any of these on both backends, provided the dtype holds every id the op
# reads or writes (checked from the dtype alone, no device sync); steps return x_t's dtype.
TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


_value_checks: contextvars.ContextVar[bool | None] = contextvars.ContextVar("sedd_value_checks", default=None)


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the value checks that need a device sync (ids in range, σ finite and positive) on or
    off inside the block, whatever ``SEDD_CHECK_VALUES`` says. The sampler and the training loss
    turn them off for tensors they made themselves, so a CUDA step does not wait on the GPU; the
    model's input checks (:class:`sedd.model.SEDD`) follow the same switch.
    Inside a ``torch.compile``d function only ``SEDD_CHECK_VALUES`` counts (see :func:`checking_values`)."""
    if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.set; see checking_values
        yield
        return
    token = _value_checks.set(bool(enabled))
    try:
        yield
    finally:
        _value_checks.reset(token)


def checking_values() -> bool:
    """Whether the value checks that need a device sync run now: the innermost
    :func:`value_checks`, else ``SEDD_CHECK_VALUES`` (default on). Inside a ``torch.compile``d
    function they are off unless ``SEDD_CHECK_VALUES=1`` is set explicitly: reading a value is a
    data-dependent branch that would break the graph (and ``fullgraph=True``). While a CUDA graph
    is being captured they are always off: a host read is not allowed during capture."""
    # dynamo cannot trace ContextVar.get: under torch.compile only the environment variable counts
    if torch.compiler.is_compiling():
        return os.environ.get("SEDD_CHECK_VALUES") == "1"
    if _capturing_cuda_graph():
        return False
    enabled = _value_checks.get()
    if enabled is not None:
        return enabled
    return os.environ.get("SEDD_CHECK_VALUES", "1") != "0"


def _capturing_cuda_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_values() -> bool:
    return checking_values()


_sync_free: contextvars.ContextVar[bool | None] = contextvars.ContextVar("sedd_sync_free", default=None)


@contextlib.contextmanager
def sync_free(enabled: bool = True):
    """Inside the block the library takes its sync-free paths: the fused head of the training loss
    runs on every row instead of gathering the MASK rows, and the absorbing sampler runs the full
    head instead of the MASK rows only. Both gather steps read a row count on the host (one device
    sync per step); the sync-free paths compute the same loss and draw from the same distribution,
    at the cost of the head on rows that carry no loss. On while a CUDA graph is being captured or
    a ``torch.compile``d function traces, and with ``SEDD_SYNC_FREE=1``. Pair it with
    ``value_checks(False)`` (or ``SEDD_CHECK_VALUES=0``) for a step that never waits on the GPU."""
    if torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.set; compiling is sync-free anyway
        yield
        return
    token = _sync_free.set(bool(enabled))
    try:
        yield
    finally:
        _sync_free.reset(token)


def host_sync_allowed(device: torch.device) -> bool:
    """Whether a step on ``device`` may read a data-dependent count on the host now (see :func:`sync_free`)."""
    if torch.compiler.is_compiling():
        return False
    if torch.device(device).type == "cuda" and _capturing_cuda_graph():
        return False
    enabled = _sync_free.get()
    if enabled is None:
        enabled = os.environ.get("SEDD_SYNC_FREE") == "1"
    return not enabled


def _check_log_score(log_score) -> tuple[int, int, int]:
    if not isinstance(log_score, torch.Tensor):
        raise TypeError(f"log_score must be a torch.Tensor, got {type(log_score).__name__}")
    if log_score.dtype not in _SCORE_DTYPES:
        raise TypeError(f"log_score must be float32, bfloat16, float16 or float64, got {log_score.dtype}")
    if log_score.dim() != 3:
        raise ValueError(f"log_score must have shape [B, L, V], got {tuple(log_score.shape)}")
    B, L, V = log_score.shape
    if V < 2:
        raise ValueError(f"log_score must have V >= 2 scores per row, got V = {V}")
    return B, L, V


def _check_graph(graph, V: int) -> Graph:
    if not isinstance(graph, (str, Graph)):
        raise TypeError(f"graph must be 'absorb', 'uniform' or a Graph, got {type(graph).__name__}")
    g = graph_for_width(graph, V)
    if g.dim != V:
        raise ValueError(f"graph {g} has rows of width {g.dim}, but log_score has V = {V}")
    return g


def _check_tokens(name: str, x, shape: tuple[int, int], device: torch.device, high: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in TOKEN_DTYPES:
        raise TypeError(f"{name} must hold integer token ids (int64, int32, int16 or uint8), got {x.dtype}")
    if torch.iinfo(x.dtype).max < high - 1:
        # the steps write ids up to V − 1 in the tokens' own dtype: a narrower one would wrap
        raise TypeError(
            f"{name} has dtype {x.dtype}, which cannot hold every id in [0, {high}) ({what}); use int32 or int64"
        )
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    # high − 1 fits x's dtype (checked above), so the compare cannot wrap as `x >= high` would
    if _check_values() and x.numel() and bool(((x < 0) | (x > high - 1)).any()):  # one device sync
        bad = x[(x < 0) | (x > high - 1)][0].item()
        raise ValueError(f"{name} holds id {bad} outside [0, {high}) ({what})")


def _check_per_row(name: str, v, B: int, device: torch.device, positive: bool = True, keep_fp64: bool = False) -> torch.Tensor:
    """σ-like per-row scalars: a number, [B] or [B, 1] -> contiguous fp32 [B] (fp64 stays fp64
    with ``keep_fp64``: the fp64 loss)."""
    if isinstance(v, (int, float)):
        v = torch.full((B,), float(v), device=device)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a number, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {v.dtype}")
    if v.dim() == 0:
        v = v.expand(B)
    if tuple(v.shape) not in ((B,), (B, 1)):
        raise ValueError(f"{name} must have shape [B] or [B, 1] with B = {B}, got {list(v.shape)}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device}, expected {device}")
    v = v.reshape(B).to(torch.float64 if keep_fp64 and v.dtype == torch.float64 else torch.float32).contiguous()
    if _check_values() and not bool((torch.isfinite(v) & (v > 0 if positive else True)).all()):  # one sync
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite, got {v.tolist() if B <= 8 else 'non-finite entries'}")
        raise ValueError(f"{name} must be > 0, got min {v.min().item()}")
    return v


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if torch.device(generator.device).type != device.type:
        raise ValueError(f"generator is on {generator.device}, but the tensors are on {device}")


def _check_step_args(log_score, x_t, graph, shift):
    B, L, V = _check_log_score(log_score)
    g = _check_graph(graph, V)
    _check_tokens("x_t", x_t, (B, L), log_score.device, V, "the current tokens")
    if shift is not None:
        shift = _check_per_row("shift", shift, B, log_score.device, positive=False)
    return B, g, shift
