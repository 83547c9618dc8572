"""Random numbers of the reverse-step kernel (``sampling.py``): Philox-4x32-10 keyed by a 64-bit
seed, counter (c, row_lo, row_hi, stream), and Exp(1) noise built from 64 random bits with full
relative precision in both tails (see ``sampling.py``'s docstring, "Noise accuracy" and "RNG")."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _from_bits(hi, lo):
    """(hi·2^32 + lo + ½)·2^-64 in fp32 with full relative precision down to 2^-65."""
    return hi.to(tl.float32) * 2.3283064365386963e-10 + (lo.to(tl.float32) + 0.5) * 5.421010862427522e-20


@triton.jit
def log_exp1_from_bits(hi, lo):
    """log E for E ~ Exp(1), from two uint32 random words (see the module docstring).

    v = (hi·2^32 + lo + ½)·2^-64 and u = 1 − v from the complemented words, both in fp32 with
    full relative precision down to 2^-65; E = −log1p(−v) by its series for small v, −log(u) else.
    """
    v = _from_bits(hi, lo)
    u = _from_bits(hi ^ 0xFFFFFFFF, lo ^ 0xFFFFFFFF)
    # −log1p(−v) = v + v²/2 + v³/3 + …; seven terms are exact to 1e-8 relative for v < 1/16
    series = v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * (0.25 + v * (0.2 + v * (0.16666666666666666
                                                                                        + v * 0.14285714285714285))))))
    e = tl.where(v < 0.0625, series, -tl.log(u))
    return tl.log(e)


@triton.jit
def _philox(seed, counter, rows, stream, N_ROUNDS: tl.constexpr):
    """The four words of Philox counter (counter, row_lo, row_hi, stream); ``counter`` and ``rows``
    broadcast against each other, ``stream`` is a scalar."""
    r = rows.to(tl.uint64)
    c0 = ((r * 0).to(tl.int32) + counter).to(tl.uint32)
    zero = c0 * 0
    row_lo = zero + (r & 0xFFFFFFFF).to(tl.uint32)
    row_hi = zero + (r >> 32).to(tl.uint32)
    return tl.philox(seed, c0, row_lo, row_hi, ((zero * 0).to(tl.int32) + stream).to(tl.uint32), N_ROUNDS)


@triton.jit
def _row_log_noise(seed, rows, counter, stream, N_ROUNDS: tl.constexpr):
    """log E, one per (row, counter): words 0, 1 of Philox counter (counter, row, stream)."""
    w0, w1, _, _ = _philox(seed, counter, rows, stream, N_ROUNDS)
    return log_exp1_from_bits(w0, w1)


@triton.jit
def _row_uniform(seed, rows, stream, N_ROUNDS: tl.constexpr):
    """U(0, 1) per row (64 random bits, full relative precision near 0): counter 0 of ``stream``."""
    w0, w1, _, _ = _philox(seed, rows.to(tl.int32) * 0, rows, stream, N_ROUNDS)
    return _from_bits(w0, w1)


@triton.jit
def _lane_log_noise(seed, rows, stream, BLOCK_R: tl.constexpr, SUB: tl.constexpr, N_ROUNDS: tl.constexpr):
    """log E [BLOCK_R, SUB] for the columns of the winning sub-tile, Philox counter (lane, row,
    stream): a row races one sub-tile per round, so its lane is a unique counter. (Keyed by the
    column instead, or one call shared by two columns, the noise took 50-90 more registers on a
    misaligned row: it then depends on pass B's choice and lands in the loads' layout.)"""
    return _row_log_noise(seed, rows[:, None], tl.arange(0, SUB)[None, :], stream, N_ROUNDS)
