"""Forward noising x_t ~ p_{t|0}(· | x0) with in-kernel Philox randomness.

The eager version draws a [B, L] uniform tensor (and for the uniform graph a second [B, L] integer
tensor) from a torch generator, then compares and selects: four or five passes over [B, L]. Here
one program per block of positions reads x0 and σ, draws its random numbers from Philox keyed by
(seed, global element index), and writes x_t: one read, one write. Because the Philox counter is
the element's global index, the result depends only on the seed, never on the block size or the
number of programs.

    absorbing: x_t = MASK with probability 1 − e^{−σ}, else x0
    uniform:   x_t = U{0, …, N−1} with probability 1 − e^{−σ}, else x0

The four 32-bit words of one Philox call are independent: the first decides whether the token
moves, the other two (combined to 64 bits, so the modulo bias is ~N/2^64) give the uniform draw.

The math: docs/math.md, "Graphs".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import on_device
from ._math import interpreted


@triton.jit
def _neg_expm1_neg(sigma):
    """1 − e^{−σ} for fp32 σ > 0 without cancellation: a series below 1e-2 (rel. error < 1e-11)."""
    series = sigma * (1.0 - sigma * (0.5 - sigma * (1.0 / 6.0 - sigma * (1.0 / 24.0))))
    return tl.where(sigma < 1e-2, series, 1.0 - tl.exp(-sigma))


@triton.jit
def _sample_transition_kernel(
    x0_ptr,  # [n] int clean tokens
    out_ptr,  # [n] int noisy tokens (x0's dtype)
    sigma_ptr,  # [B] fp32 σ
    seed_ptr,  # [1] int64 Philox seed (a tensor, so no host sync is needed to launch)
    n,  # B·L
    L,  # sequence length
    N,  # real tokens; MASK = N for absorbing
    ABSORB: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < n
    x0 = tl.load(x0_ptr + offs, mask=ok, other=0)
    sigma = tl.load(sigma_ptr + offs // L, mask=ok, other=1.0).to(tl.float32)
    p_move = _neg_expm1_neg(sigma)
    seed = tl.load(seed_ptr)
    r0, r1, r2, _ = tl.randint4x(seed, offs)
    move = tl.random.uint_to_uniform_float(r0) < p_move
    if ABSORB:
        fresh = tl.full([BLOCK], 0, dtype=tl.int64) + N
    else:
        bits = (r1.to(tl.uint64) << 32) | r2.to(tl.uint64)
        fresh = (bits % tl.full([BLOCK], N, dtype=tl.uint64)).to(tl.int64)
    out = tl.where(move, fresh, x0.to(tl.int64))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def sample_transition(
    x0: torch.Tensor, sigma: torch.Tensor, seed: torch.Tensor, *, absorbing: bool, N: int, block: int | None = None
) -> torch.Tensor:
    """x_t [B, L] (x0's dtype) from x0 [B, L] contiguous int, σ [B] fp32 and a [1] int64 seed tensor.

    ``block`` (a power of two) forces the positions per program; the result does not depend on it.
    """
    B, L = x0.shape
    out = torch.empty_like(x0)
    n = B * L
    if n == 0:
        return out
    if block is None:
        block = 4096 if interpreted() else 1024
        block = min(block, triton.next_power_of_2(n))
    with on_device(x0):
        _sample_transition_kernel[(triton.cdiv(n, block),)](
            x0, out, sigma, seed, n, L, N, ABSORB=absorbing, BLOCK=block, num_warps=4
        )
    return out
