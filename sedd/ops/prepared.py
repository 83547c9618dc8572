"""One op call prepared once and its kernel launched alone: kernel time apart from op time.

:func:`kernel_launch` validates its arguments exactly as the ``sedd.ops`` function of the same name
and does that call's host work once (the checks, the per-row tensors, the Philox seed, the gradient
buffer); the function it returns makes only the kernel launch, each time it is called (the same
seed: the same tokens). Timing it back to back against the op as users call it tells the kernel's
device time from the op's per-call host work (``benchmarks/kernel_vs_op.py``, the device check's
kernel stage). Together with :func:`sedd.ops.launch_options` it is also how the launch sweep runs a
kernel with a given tile and warp count: code outside ``sedd.ops`` never imports ``sedd.kernels``.
Triton backend only (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` with
``use_backend("triton")``).
"""

from __future__ import annotations

from typing import Callable

import torch

from sedd.graph import Graph
from sedd.ops import custom_ops
from sedd.ops.backend import resolve_backend
from sedd.ops.checks import (
    check_block_v,
    check_generator,
    check_graph,
    check_log_score,
    check_loss_args,
    check_per_row,
    check_step_args,
    check_triton_dtype,
)

KERNEL_OPS = ("score_entropy", "euler_step", "analytic_step", "denoise_step")


def kernel_launch(op: str, *args, **kwargs) -> Callable[[], torch.Tensor]:
    """A zero-argument function that launches the fused kernel of one ``sedd.ops`` call.

    Args:
        op: "score_entropy", "euler_step", "analytic_step" or "denoise_step".
        args, kwargs: the op's own arguments: ``score_entropy(log_score, sigma, x_t, x0, graph, *,
            shift=None, weight=None, block_v=None, grad=False)`` (``grad``: the kernel also writes
            ∂(Σ weight·ℓ)/∂log_score into a buffer made here, as the training loss does);
            ``euler_step(log_score, x_t, dsigma, dt, graph, generator=None, *, shift=None,
            block_v=None)``, ``analytic_step(log_score, x_t, dsigma, graph, …)``,
            ``denoise_step(log_score, x_t, sigma, graph, …)`` (untruncated).

    Returns:
        The launch: the score entropy's per-token loss [B, L] fp32, a step's next tokens [B, L].
    """
    if op == "score_entropy":
        return _score_entropy(*args, **kwargs)
    if op in KERNEL_OPS:
        return _step(op[: -len("_step")], *args, **kwargs)
    raise ValueError(f"op must be one of {KERNEL_OPS}, got {op!r}")


def _on_triton(device: torch.device, graph: Graph, op: str) -> None:
    if resolve_backend(device, graph) != "triton":
        raise RuntimeError(
            f"kernel_launch({op!r}) launches the Triton kernel, but the backend for {device} tensors is 'torch': "
            "use CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 with sedd.ops.use_backend('triton')"
        )


def _score_entropy(log_score, sigma, x_t, x0, graph: str | Graph, *, shift=None, weight=None, block_v=None,
                   grad: bool = False):
    B, L, V = check_log_score(log_score)
    g = check_graph(graph, V)
    sigma, shift, weight = check_loss_args(B, L, V, g, log_score.device, sigma, x_t, x0, shift, weight, "none", False)
    _on_triton(log_score.device, g, "score_entropy")
    check_triton_dtype("log_score", log_score)
    spec = custom_ops.ScoreEntropySpec(sigma, x_t.contiguous(), x0.contiguous(), shift, weight,
                                       custom_ops.absorbing_tag(g), check_block_v(block_v))
    return custom_ops.score_entropy_launch(log_score, spec, bool(grad), 1.0)


def _step(kind: str, log_score, x_t, *rest, generator=None, shift=None, block_v=None):
    if kind == "euler":
        if len(rest) not in (3, 4):
            raise TypeError("euler_step takes (log_score, x_t, dsigma, dt, graph, generator=None)")
        dsigma, dt, graph, *gen = rest
    else:
        if len(rest) not in (2, 3):
            raise TypeError(f"{kind}_step takes (log_score, x_t, {'dsigma' if kind == 'analytic' else 'sigma'}, "
                            "graph, generator=None)")
        scalar, graph, *gen = rest
    generator = gen[0] if gen else generator
    B, g, shift = check_step_args(log_score, x_t, graph, shift)
    device = log_score.device
    if kind == "euler":
        scalar = check_per_row("dsigma", dsigma, B, device) * check_per_row("dt", dt, B, device)
    else:
        scalar = check_per_row("dsigma" if kind == "analytic" else "sigma", scalar, B, device)
    check_generator(generator, device)
    _on_triton(device, g, f"{kind}_step")
    check_triton_dtype("log_score", log_score)
    return custom_ops.reverse_step_launch(kind, log_score, x_t, scalar, g, shift, generator, check_block_v(block_v))
