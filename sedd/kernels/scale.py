"""grad *= g for a device scalar g, skipped on the device when g == 1.

The fused score-entropy reductions compute their gradient in the forward pass; the backward only
multiplies it by the incoming scalar, which is exactly 1 for the usual ``loss.backward()``. Deciding
"is it 1?" on the host would wait for the GPU on every backward (and break CUDA-graph capture), and
multiplying unconditionally costs a read and a write of the whole [B, L, V] gradient. Here every
program reads g and returns at once when it is 1: the skip costs one scalar load per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import on_device
from ._math import interpreted


@triton.jit
def _scale_unless_one_kernel(grad_ptr, g_ptr, n, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        lanes = tl.arange(0, BLOCK)
        ptrs = grad_ptr + start + lanes
        if start + BLOCK <= n:
            # a whole block needs no mask, so its accesses are 16-byte vectors whatever n is (a
            # per-element bound on an n not divisible by 16 made every access scalar: 132
            # registers for fp32 under Triton 3.6)
            x = tl.load(ptrs)
            tl.store(ptrs, (x.to(tl.float32) * g).to(x.dtype))
        else:
            ok = lanes < n - start
            x = tl.load(ptrs, mask=ok, other=0.0)
            tl.store(ptrs, (x.to(tl.float32) * g).to(x.dtype), mask=ok)


def scale_unless_one_(grad: torch.Tensor, g: torch.Tensor) -> None:
    """In place, ``grad`` contiguous: grad *= g (a one-element tensor on grad's device)."""
    n = grad.numel()
    if n == 0:
        return
    block = 1 << 16 if interpreted() else 4096  # the interpreter is fastest with few wide programs
    with on_device(grad):
        _scale_unless_one_kernel[(triton.cdiv(n, block),)](grad, g.reshape(1), n, BLOCK=block, num_warps=8)
