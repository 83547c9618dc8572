"""Small ``@triton.jit`` helpers shared by the kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
LOG2E = tl.constexpr(1.4426950408889634)


def interpreted() -> bool:
    """Whether launches run under Triton's interpreter (read at call time: the launchers pick
    small tiles and wide programs there, GPU-sized ones otherwise)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def exp2(x):
    """2^x by libdevice: Triton compiles libdevice with flush-to-zero, so this is a bare
    ex2.approx.ftz, where tl.exp/tl.exp2 add a denormal-range fix-up of three instructions around
    it (results below 2^-126 flush to 0: irrelevant for sums and gradients of e^{ŝ}). The
    interpreter has no libdevice: tl.exp2 there, the same function."""
    if _INTERPRET:
        return tl.exp2(x)
    else:
        return libdevice.exp2(x)
