"""Argument checks of :mod:`sedd.ops` and the switches for the checks that need the device.

Shape, dtype and device checks always run; value checks (ids in range, σ finite and positive)
read tensors on the host, so they follow :func:`value_checks` / ``SEDD_CHECK_VALUES``;
:func:`sync_free` picks the paths that read no row count. The model, the losses and the samplers
import these checks from here; :mod:`sedd.ops` re-exports the switches.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from sedd.graph import GRAPHS, Graph, graph_for_width

SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
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


def check_log_score(log_score) -> tuple[int, int, int]:
    if not isinstance(log_score, torch.Tensor):
        raise TypeError(f"log_score must be a torch.Tensor, got {type(log_score).__name__}")
    if log_score.dtype not in SCORE_DTYPES:
        raise TypeError(f"log_score must be float32, bfloat16, float16 or float64, got {log_score.dtype}")
    if log_score.dim() != 3:
        raise ValueError(f"log_score must have shape [B, L, V], got {tuple(log_score.shape)}")
    B, L, V = log_score.shape
    if V < 2:
        raise ValueError(f"log_score must have V >= 2 scores per row, got V = {V}")
    return B, L, V


def check_graph(graph, V: int, source: str = "log_score") -> Graph:
    """The Graph of a name or object, checked to have rows of width V (read off ``source``)."""
    if not isinstance(graph, (str, Graph)):
        raise TypeError(f"graph must be a name in {tuple(GRAPHS)} or a Graph, got {type(graph).__name__}")
    g = graph_for_width(graph, V)
    if g.dim != V:
        raise ValueError(f"graph {g} has rows of width {g.dim}, but {source} has V = {V}")
    return g


def check_tokens(name: str, x, shape: tuple[int, int], device: torch.device, high: int, what: str) -> None:
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
    if checking_values() and x.numel() and bool(((x < 0) | (x > high - 1)).any()):  # one device sync
        bad = x[(x < 0) | (x > high - 1)][0].item()
        raise ValueError(f"{name} holds id {bad} outside [0, {high}) ({what})")


def check_per_row(name: str, v, B: int, device: torch.device, positive: bool = True, keep_fp64: bool = False) -> torch.Tensor:
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
    if checking_values() and not bool((torch.isfinite(v) & (v > 0 if positive else True)).all()):  # one sync
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite, got {v.tolist() if B <= 8 else 'non-finite entries'}")
        raise ValueError(f"{name} must be > 0, got min {v.min().item()}")
    return v


def check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if torch.device(generator.device).type != device.type:
        raise ValueError(f"generator is on {generator.device}, but the tensors are on {device}")


def check_step_args(log_score, x_t, graph, shift):
    B, L, V = check_log_score(log_score)
    g = check_graph(graph, V)
    check_tokens("x_t", x_t, (B, L), log_score.device, V, "the current tokens")
    if shift is not None:
        shift = check_per_row("shift", shift, B, log_score.device, positive=False)
    return B, g, shift


REDUCTIONS = ("none", "sum", "batchmean")


def check_loss_args(B: int, L: int, V: int, g: Graph, device, sigma, x_t, x0, shift, weight, reduction: str,
                    fp64: bool, weight_name: str = "weight"):
    """The arguments a score-entropy loss shares (the plain and the fused-head one): returns σ,
    shift and weight as [B] rows (fp64 kept for the fp64 loss)."""
    sigma = check_per_row("sigma", sigma, B, device, keep_fp64=fp64)
    check_tokens("x_t", x_t, (B, L), device, V, "the noisy tokens")
    check_tokens("x0", x0, (B, L), device, g.N, "clean tokens are real tokens, never MASK")
    if shift is not None:
        shift = check_per_row("shift", shift, B, device, positive=False, keep_fp64=fp64)
    if weight is not None:
        weight = check_per_row(weight_name, weight, B, device, positive=False, keep_fp64=fp64)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return sigma, shift, weight


def check_truncation(top_p, top_k) -> None:
    """``top_p`` in (0, 1] and ``top_k`` ≥ 1, each or both None (see :data:`sedd.ops.TRUNCATION`)."""
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")


def check_block_v(block_v: int | None) -> int:
    """A forced tile width as the kernels take it (0: the launcher chooses)."""
    if block_v is None:
        return 0
    if isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 2 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be None or a power of two >= 2, got {block_v!r}")
    return block_v


def check_triton_dtype(name: str, t: torch.Tensor) -> None:
    """The kernels read fp32, bf16 and fp16; fp64 runs on the eager backend only."""
    if t.dtype == torch.float64:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 on the triton backend, got torch.float64")
