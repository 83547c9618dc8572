"""Fused reverse steps of SEDD: Euler, analytic (Tweedie) and denoise, absorbing and uniform.

Why fuse. The eager step (``sedd/ops/reference.py``) reads the [B, L, V] scores and then builds the
weights, the rates, the transition row, their product, the normalised probabilities, fp64
exponential noise and its log: about ten [B, L, V] tensors written and read again, i.e. ~20 bytes
of traffic per score byte for bf16 input, plus as many allocations. A step needs none of it: the
output is one token id per position. This kernel reads each row of the raw network output z once
(plus the one tile its draw falls in), keeps a handful of per-row running values in registers and
writes one id. Absorbing positions that are not MASK cannot move: their row is never read (the
loads are masked off and the loops do not run for a block whose rows are all fixed).

The draw: a three-level exponential race. A categorical draw from unnormalised weights w is
argmax_y (log w_y − log E_y) with E_y ~ Exp(1) i.i.d. Per element that costs a Philox call and two
precise logs (~100 instructions against a budget of ~15 per bf16 element at full bandwidth), so
the race runs on group masses instead, which is exact: P(y) = P(τ)·P(j | τ)·P(y | j) with
P(τ) = W_τ/W, P(j | τ) = W_j/W_τ, P(y | j) = w_y/W_j.
- Pass A streams the row once; per element only load, convert, select, max, one exp2, add: it
  keeps the mass W_τ of each tile τ of BLOCK_V columns as (tile max, exp-sum) in two small
  per-row arrays. Then the tiles race, one Exp(1) each; options whose weight needs the whole row
  (the Euler stay weight 1 − Σw, the absorbing analytic MASK weight 1 − (e^{Δσ} − 1)Σe^{ŝ}) race
  the best tile with their own noise; non-positive weights are never chosen.
- Pass B re-reads the winning tile (from L2) as SUB-column sub-tiles and races their masses.
- Pass C races the SUB columns of the winning sub-tile, one Exp(1) per column.
So a row draws N_TILES + BLOCK_V/SUB + SUB exponentials (≈ 130 at V = 50258, BLOCK_V = 2048,
SUB = 64), where a two-level race over the same tiles drew BLOCK_V + N_TILES (≈ 2100) and a flat
race V. Each exponential comes from its own Philox counter, so the levels are independent. The
tokens drawn for a seed depend on BLOCK_V and SUB (the partition), their distribution does not;
they do not depend on where the row sits in memory (below).

16-byte windows. A row of V = 50258 bf16 values starts only 4-byte aligned, and a view of a padded
head has a row stride other than V; per-element bound checks and misaligned bases make every load
a 2-byte scalar, and Triton pipelines no load narrower than 32 bits. So pass A walks each row in
windows aligned to 16 bytes (the row's base moved back by its misalignment ``mis`` < ALIGN
elements), and every window wholly inside the candidate columns is loaded with one per-row
predicate: 16-byte vector loads. The tiles of the race stay in column space (tile τ = columns
τ·BLOCK_V …), so a misaligned window's first ``mis`` lanes add to tile τ − 1 and the rest to tile
τ: two sums per window, compiled in only when some row is misaligned (``MISALIGNED``; rows of a
64-padded head are all aligned). The draw for a seed is therefore the same for a padded view, a
contiguous copy or a tensor at an odd storage offset.

Noise accuracy (arXiv 2409.02908). A token of relative weight p wins only when its E_y < p·E_best,
so tokens of tiny weight are decided entirely by the lower tail of E. The usual fp32 recipe
E = −log(u) with u ~ U[0, 1) in fp32 quantises u near 1 in steps of 2^-24: E takes no values in
(0, 6e-8), tokens with p ≲ 1e-7 are (almost) never drawn, and the temperature drops. Here every
E is built from 64 random bits (two Philox words hi, lo): v = (hi·2^32 + lo + 1/2)·2^-64 and its
complement u = 1 − v = (~hi·2^32 + ~lo + 1/2)·2^-64 are both formed in fp32 *as floating-point
numbers*, so each keeps 24-bit relative precision all the way down to 2^-65 (no fixed absolute
grid). Then E = −log1p(−v) by its series v(1 + v/2 + … + v⁶/7) for v < 1/16 (relative error
< 1e-8) and E = −log(u) otherwise (u ≤ 15/16 is well conditioned). Both tails of E are therefore
those of a 64-bit uniform (E ∈ [2.7e-20, 45]) with ~1e-7 relative rounding, no systematic bias.

RNG. Philox-4x32-10 (``tl.philox``) keyed by a 64-bit seed read from device memory (the launcher
draws it from the caller's torch.Generator, so no host sync), with counter (c, row_lo, row_hi,
stream); stream = 8·round + {0: columns of the winning sub-tile (c = column within it), 1: the stay option, 2: the tiles (c = tile), 3: the sub-tiles of
the winning tile (c = sub-tile), 4: an acceptance uniform}. Every step but uniform
analytic / denoise draws in round 0.

Uniform analytic / denoise. The staggered score s'_y ∝ (s_y − C)_+ with C = ((1 − e^{−Δσ})/N)·S and
S = Σ_k s_k needs the row sum before any weight is known, which took a statistics pass before the
race (three passes in all, twice Euler's instructions at half its occupancy). Now the kernel draws
by rejection: the proposal q_y ∝ s_y·T(x_t, y) is Euler-shaped (one pass A gives its tile masses
and, from the same masses, S), and a proposal y is accepted with probability (1 − C/s_y)_+ (the
current token, s = 1: (1 − C)_+). Accepted draws have exactly the target law p_y ∝ (s_y − C)_+·T.
Since Σ_y T(x_t, y) = 1, the acceptance rate is at least e^{−Δσ}/(e^{−Δσ} + C): about e^{−Δσ} for a
row with S ≈ N, so ≥ ½ once Δσ ≤ ln 2. Each row makes up to PROPOSALS proposals (the tile masses
are reused, each proposal re-reads only its tile); a row with none accepted (probability
(1 − rate)^PROPOSALS) draws on the general path: a second pass with C known and the race on
(s_y − C)_+ directly. That fallback is independent of the rejected proposals, so the mixture is
exact. A truncated uniform analytic / denoise step takes the general path (a pass for S first).

Layout. One program handles BLOCK_R rows × the whole row width in windows of BLOCK_V columns. On a
GPU BLOCK_R = 1 and BLOCK_V is a few thousand; under the interpreter (~1 ms per program) a program
takes many rows at once.

Instruction counts and registers: ``python -m tests.test_kernels_gpu_build sm90 --loops --table``
(each launch, both Triton versions, is held to its register budget by that test).

The math: docs/math.md, "Reverse steps", "Categorical draws", "Truncation".
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import on_device
from ._math import LOG2E, interpreted
from ._math import exp2 as _exp2

EULER, ANALYTIC, DENOISE = 0, 1, 2
KINDS = {"euler": EULER, "analytic": ANALYTIC, "denoise": DENOISE}

_NEG_BIG = tl.constexpr(-1.0e30)  # finite "−∞" for running maxima (keeps exp(m − m_new) free of nan)
_STREAMS = tl.constexpr(8)  # Philox streams per round of the draw (module docstring)


# ---------------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Per-row constants (fp64, once per row) and log-sum-exp over a row's tiles
# ---------------------------------------------------------------------------------------------


@triton.jit
def _expm1(x):
    """e^x − 1 in fp64 without cancellation (a 6-term series below |x| = 1e-2, error < 1e-14)."""
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0))))))
    return tl.where(tl.abs(x) < 1e-2, series, tl.exp(x) - 1.0)


@triton.jit
def _row_constants(c, log_n, KIND: tl.constexpr, ABSORB: tl.constexpr, TWEEDIE: tl.constexpr):
    """(log_coef, log_c2, log_t) fp32 from the step's per-row scalar c (fp64): the candidates'
    common factor of the exp family (Euler dσΔt, over N for uniform; absorbing analytic/denoise
    E(c) = e^c − 1); for uniform analytic/denoise (c = Δσ) log c₂ = log((1 − e^{−Δσ})/N) = log T_off
    and log t = log(T_on/T_off), T_on = e^{−Δσ} + T_off. Computed here, not by the launcher: a few
    flops per row instead of a handful of tiny tensor ops per call on the host."""
    zero = tl.zeros_like(c).to(tl.float32)
    if TWEEDIE:
        log_c2 = tl.log(-_expm1(-c)) - log_n
        log_t = tl.log(tl.exp(-c) + tl.exp(log_c2)) - log_c2
        return zero, log_c2.to(tl.float32), log_t.to(tl.float32)
    if KIND == 0:
        if ABSORB:
            log_coef = tl.log(c)
        else:
            log_coef = tl.log(c) - log_n
    else:
        log_coef = tl.log(_expm1(c))
    return log_coef.to(tl.float32), zero, zero


@triton.jit
def _logsumexp_tiles(logw):
    """log Σ_τ e^{logw_τ} per row of [BLOCK_R, N_TILES] (−∞ entries are empty; all empty: −∞)."""
    m = tl.maximum(tl.max(logw, axis=1), _NEG_BIG)
    return m + tl.log(tl.sum(tl.exp(logw - m[:, None]), axis=1))


# ---------------------------------------------------------------------------------------------
# Pass A: one streaming pass, the mass of every tile
# ---------------------------------------------------------------------------------------------


@triton.jit
def _window(win_ptr, w, lanes, tiles, active, mis, n_cand, x, shift, log_c, thr, lam_m, lam_s,
            ABSORB: tl.constexpr, GEN: tl.constexpr, TRUNC: tl.constexpr, MISALIGNED: tl.constexpr,
            WHOLE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Tile w of pass A: the (max, exp-sum) of its candidates into (lam_m, lam_s). The window's
    lanes sit at columns w·BLOCK_V − mis + lane: lanes ≥ mis are tile w's columns up to
    (w + 1)·BLOCK_V − mis − 1, lanes < mis belong to tile w − 1 and are left out (the tiles' last
    ``mis`` columns are added after the loop, :func:`_pass_a`). ``WHOLE``: the window lies inside
    the candidate columns of every row, so its load needs the per-row predicate only (16-byte
    vectors).

    Weights: exp family (``GEN`` False) e^{z_y}; general uniform Tweedie (``GEN``) (e^{ŝ_y} − C)_+
    with log C = ``log_c``, C > 0. The current token is never a candidate (absorbing: it is MASK,
    the column after the last candidate)."""
    start = w * BLOCK_V
    if WHOLE:
        ld = active[:, None]
    else:
        col = start + lanes[None, :] - mis[:, None]
        ld = active[:, None] & (col >= start) & (col < n_cand)
    zt = tl.load(win_ptr[:, None] + (start + lanes)[None, :], mask=ld, other=0.0).to(tl.float32)
    cand = ld
    if MISALIGNED and WHOLE:
        cand = cand & (lanes[None, :] >= mis[:, None])
    if not ABSORB:
        cand = cand & (lanes[None, :] != (x + mis - start)[:, None])
    m, s = _mass(_candidates(zt, cand, shift[:, None], log_c[:, None], thr[:, None], GEN, TRUNC), log_c, 1, GEN)
    this = tiles[None, :] == w
    return tl.where(this, m[:, None], lam_m), tl.where(this, s[:, None], lam_s)


@triton.jit
def _candidates(zt, cand, shift, log_c, thr, GEN: tl.constexpr, TRUNC: tl.constexpr):
    """The value pass A reduces, −∞ off the candidates: z (exp family: the row's shift and common
    factor left out) or ŝ = z + shift (``GEN``; the columns with ŝ ≤ log C stay in, :func:`_mass`
    gives them weight 0); ``TRUNC``: only ŝ ≥ thr.
    ``shift``, ``log_c``, ``thr`` broadcast against ``zt``."""
    if GEN or TRUNC:
        sh = zt + shift
        if TRUNC:
            cand = cand & (sh >= thr)
        if GEN:
            zt = sh
    return tl.where(cand, zt, float("-inf"))


@triton.jit
def _mass(v, log_c, AXIS: tl.constexpr, GEN: tl.constexpr):
    """(max m, Σ e^{v − m}) along AXIS of candidate values v (−∞ elsewhere); ``GEN``:
    Σ (e^{v − m} − C e^{−m})_+, C ≥ e^{m} leaving nothing. An empty group gives (−1e30, 0)."""
    m = tl.maximum(tl.max(v, axis=AXIS), _NEG_BIG)
    e = _exp2(v * LOG2E - tl.expand_dims(m * LOG2E, AXIS))
    if GEN:
        e = tl.maximum(e - tl.expand_dims(tl.exp(tl.minimum(log_c - m, 0.0)), AXIS), 0.0)
    return m, tl.sum(e, axis=AXIS)


@triton.jit
def _pass_a(win_ptr, row_ptr, active, mis, n_cand, x, shift, log_c, thr,
            ABSORB: tl.constexpr, GEN: tl.constexpr, TRUNC: tl.constexpr, MISALIGNED: tl.constexpr,
            ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, N_TILES: tl.constexpr):
    """log W_τ [BLOCK_R, N_TILES] of the rows in ``active`` (−∞: an empty or missing tile); the
    exp family's masses leave out the shift and the common factor, the general ones e^{Δσ}·T_off."""
    lanes = tl.arange(0, BLOCK_V)
    tiles = tl.arange(0, N_TILES)
    lam_m = tl.full([BLOCK_R, N_TILES], _NEG_BIG, dtype=tl.float32)
    lam_s = tl.zeros([BLOCK_R, N_TILES], dtype=tl.float32)
    # early exit: a block with no row to read runs no window. Window 0 and the tail are masked per
    # element; the windows between are whole: w ≥ 1 puts the first lane at column ≥ BLOCK_V − mis
    # ≥ 0, and (w + 1)·BLOCK_V ≤ n_cand the last one below n_cand, whatever mis < ALIGN ≤ BLOCK_V.
    any_row = tl.max(active.to(tl.int32), axis=0) > 0
    n_win = tl.where(any_row, tl.cdiv(n_cand, BLOCK_V), 0)
    n_whole = tl.where(any_row, tl.maximum(n_cand // BLOCK_V, 1), 1)
    for w in range(0, tl.minimum(n_win, 1)):
        lam_m, lam_s = _window(win_ptr, w, lanes, tiles, active, mis, n_cand, x, shift, log_c, thr, lam_m, lam_s,
                               ABSORB, GEN, TRUNC, MISALIGNED, False, BLOCK_V)
    for w in range(1, n_whole):
        lam_m, lam_s = _window(win_ptr, w, lanes, tiles, active, mis, n_cand, x, shift, log_c, thr, lam_m, lam_s,
                               ABSORB, GEN, TRUNC, MISALIGNED, True, BLOCK_V)
    for w in range(n_whole, n_win):
        lam_m, lam_s = _window(win_ptr, w, lanes, tiles, active, mis, n_cand, x, shift, log_c, thr, lam_m, lam_s,
                               ABSORB, GEN, TRUNC, MISALIGNED, False, BLOCK_V)
    if MISALIGNED:
        # every tile's last mis columns, one column of all tiles at a time ([BLOCK_R, N_TILES] each;
        # as one [BLOCK_R, N_TILES, ALIGN] block this took 40 more registers under Triton 3.6)
        for j in range(0, tl.where(any_row, tl.max(mis, axis=0), 0)):
            sp_col = (tiles + 1)[None, :] * BLOCK_V - mis[:, None] + j
            sp_ld = active[:, None] & (j < mis)[:, None] & (sp_col < n_cand)
            sp = tl.load(row_ptr[:, None] + sp_col, mask=sp_ld, other=0.0).to(tl.float32)
            if not ABSORB:
                sp_ld = sp_ld & (sp_col != x[:, None])
            v = _candidates(sp, sp_ld, shift[:, None], log_c[:, None], thr[:, None], GEN, TRUNC)
            m_new = tl.maximum(lam_m, v)
            e = tl.exp(v - m_new)
            if GEN:
                e = tl.maximum(e - tl.exp(tl.minimum(log_c[:, None] - m_new, 0.0)), 0.0)
            lam_s = lam_s * tl.exp(lam_m - m_new) + e
            lam_m = m_new
    return tl.where(lam_s > 0.0, lam_m + tl.log(lam_s), float("-inf"))


@triton.jit
def _race(logw, seed, rows, stream, N_ROUNDS: tl.constexpr, N: tl.constexpr):
    """argmax over [BLOCK_R, N] of logw − log E (−∞ entries never win): (best key, index or −1)."""
    idx = tl.arange(0, N)
    keys = logw - _row_log_noise(seed, rows[:, None], idx[None, :], stream, N_ROUNDS)
    keys = tl.where(logw > float("-inf"), keys, float("-inf"))
    best, arg = tl.max(keys, axis=1, return_indices=True)
    return best, tl.where(best > float("-inf"), arg.to(tl.int32), -1)


# ---------------------------------------------------------------------------------------------
# Passes B and C: the sub-tile race inside the winning tile, the column race inside the winner
# ---------------------------------------------------------------------------------------------


@triton.jit
def _weights(zt, cols, ld, x, shift, log_c, thr,
             ABSORB: tl.constexpr, GEN: tl.constexpr, TRUNC: tl.constexpr):
    """(candidate mask, ŝ) of loaded raw scores, as pass A selects them."""
    sh = zt + shift
    if ABSORB:
        cand = ld
    else:
        cand = ld & (cols != x)
    if TRUNC:
        cand = cand & (sh >= thr)
    if GEN:
        cand = cand & (sh > log_c)
    return cand, sh


@triton.jit
def _draw_in_tile(row_ptr, tile, draw, n_cand, x, shift, log_c, thr, seed, rows, stream, n_sub,
                  ABSORB: tl.constexpr, GEN: tl.constexpr, TRUNC: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_V: tl.constexpr, SUB: tl.constexpr, N_ROUNDS: tl.constexpr):
    """The draw inside tile ``tile`` [BLOCK_R] of the rows in ``draw``: (found, column, ŝ there).

    Pass B races the tile's sub-tiles of SUB columns by their masses (stream + 3, counter: the
    sub-tile); pass C races the SUB columns of the winner with one Exp(1) each (``stream``, counter:
    the column within the sub-tile). ``found`` is False where the tile holds no candidate after all
    (pass A's and these passes' rounding can disagree on a borderline one)."""
    base = tile * BLOCK_V
    lane = tl.arange(0, SUB)
    # sub-tile by sub-tile with a running (best key, sub-tile): each sub-tile's noise is keyed by its
    # index, so the race is the one over the whole tile at once, with one sub-tile's values live at a
    # time; a run-time trip count, which the compiler does not unroll (unrolled, or as one [tile]
    # block, a misaligned row's scalar loads took up to 255 registers under Triton 3.6)
    best_key = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    best_sub = tl.full([BLOCK_R], -1, dtype=tl.int32)
    for j in range(0, n_sub):
        cols = (base + j * SUB)[:, None] + lane[None, :]
        ld = draw[:, None] & (cols < n_cand)
        zt = tl.load(row_ptr[:, None] + cols, mask=ld, other=0.0).to(tl.float32)
        cand, sh = _weights(zt, cols, ld, x[:, None], shift[:, None], log_c[:, None], thr[:, None], ABSORB, GEN, TRUNC)
        m, s = _mass(tl.where(cand, sh, float("-inf")), log_c, 1, GEN)
        # one tile per row and round races: the sub-tile's index within the tile is a unique counter
        key = m + tl.log(s) - _row_log_noise(seed, rows, j, stream + 3, N_ROUNDS)
        better = (s > 0.0) & (key > best_key)
        best_sub = tl.where(better, j, best_sub)
        best_key = tl.where(better, key, best_key)
    first = base + tl.maximum(best_sub, 0) * SUB
    ccols = first[:, None] + lane[None, :]
    cld = (draw & (best_sub >= 0))[:, None] & (ccols < n_cand)
    zc = tl.load(row_ptr[:, None] + ccols, mask=cld, other=0.0).to(tl.float32)
    ccand, csh = _weights(zc, ccols, cld, x[:, None], shift[:, None], log_c[:, None], thr[:, None],
                          ABSORB, GEN, TRUNC)
    if GEN:  # log((s_y − C)_+) = ŝ_y + log(1 − C/s_y)
        q = tl.exp(log_c[:, None] - csh)
        log_w = csh + tl.log(1.0 - q)
        ccand = ccand & (q < 1.0)
    else:
        log_w = csh
    noise = _lane_log_noise(seed, rows, stream, BLOCK_R, SUB, N_ROUNDS)
    keys = tl.where(ccand, log_w - noise, float("-inf"))
    best, arg = tl.max(keys, axis=1, return_indices=True)
    pick = first + arg.to(tl.int32)
    sh_pick = tl.sum(tl.where(lane[None, :] == arg[:, None], csh, 0.0), axis=1)
    return best > float("-inf"), pick, sh_pick


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def reverse_step_kernel(
    z_ptr,  # [B, L, V] fp32/bf16/fp16 raw scores (ŝ = z + shift, ŝ[x_t] read as 0); column stride 1
    stride_zb,  # elements between batches of z
    stride_zl,  # elements between positions of z (V, or more for a view of padded rows)
    shift_ptr,  # [B] fp32 per-row shift (read only when HAS_SHIFT)
    x_ptr,  # [B·L] int current tokens x_t (contiguous)
    scalar_ptr,  # [B] fp32 the step's scalar: Euler dσ·Δt, analytic Δσ, denoise σ
    seed_ptr,  # [1] int64 Philox seed
    trunc_ptr,  # [B·L, 2] fp32 (ŝ threshold of the kept candidates, 1 to move / 0 to stay); TRUNCATE
    out_ptr,  # [B·L] int next tokens (x's dtype)
    n_rows,  # B·L
    L,  # positions per sequence
    V,  # row width
    log_n,  # log N (fp32), N real tokens
    proposals,  # uniform analytic / denoise: proposals per row before the general path (a run-time
    # value: as a constant the compiler unrolled their loop, 114 -> 162 registers)
    n_sub,  # BLOCK_V // SUB, the sub-tiles of a tile (a run-time value for the same reason)
    KIND: tl.constexpr,  # 0 Euler, 1 analytic, 2 denoise
    ABSORB: tl.constexpr,  # absorbing graph (MASK = V − 1) or uniform
    HAS_SHIFT: tl.constexpr,
    TWEEDIE: tl.constexpr,  # uniform analytic / denoise: rejection, then the general path
    TRUNCATE: tl.constexpr,  # top-p / top-k: stay decided by the caller, draw among ŝ ≥ thr
    MISALIGNED: tl.constexpr,  # some row does not start on a 16-byte boundary
    ALIGN: tl.constexpr,  # elements per 16 bytes (1: no aligned windows)
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # columns per tile / window (power of two)
    SUB: tl.constexpr,  # columns per sub-tile (power of two, divides BLOCK_V)
    N_ROUNDS: tl.constexpr,  # Philox rounds
    N_TILES: tl.constexpr,  # ≥ cdiv(candidate columns, BLOCK_V), a power of two
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < n_rows
    b = rows // L
    x = tl.load(x_ptr + rows, mask=row_ok, other=0).to(tl.int32)  # columns compare in int32
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + b, mask=row_ok, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros([BLOCK_R], dtype=tl.float32)
    if ABSORB:
        active = row_ok & (x == V - 1)  # only MASK positions move
    else:
        active = row_ok
    row_ptr = z_ptr + (b * stride_zb + (rows - b * L) * stride_zl)  # int64 element offsets
    if MISALIGNED:  # elements between each row's start and the 16-byte boundary below it
        mis = ((row_ptr.to(tl.int64, bitcast=True) % 16) // (16 // ALIGN)).to(tl.int32)
        win_ptr = tl.multiple_of(row_ptr - mis, 16)  # pointer divisibility is in bytes
    else:
        mis = tl.zeros([BLOCK_R], dtype=tl.int32)
        if ALIGN > 1:
            row_ptr = tl.multiple_of(row_ptr, 16)
        win_ptr = row_ptr
    seed = tl.load(seed_ptr)
    c = tl.load(scalar_ptr + b, mask=row_ok, other=1.0).to(tl.float64)
    log_coef, log_c2, log_t = _row_constants(c, c * 0.0 + log_n, KIND, ABSORB, TWEEDIE)  # log N in fp64
    if TRUNCATE:
        thr = tl.load(trunc_ptr + rows * 2, mask=row_ok, other=0.0)
        move = tl.load(trunc_ptr + rows * 2 + 1, mask=row_ok, other=0.0) > 0.0
    else:
        thr = shift
        move = active
    n_cand = V - 1 if ABSORB else V
    choice = x

    if TWEEDIE:
        if TRUNCATE:
            # S over every candidate first (the truncation acts on where a row moves, not on S)
            log_s = _logsumexp_tiles(_pass_a(win_ptr, row_ptr, active & move, mis, n_cand, x, shift, shift, thr,
                                             ABSORB, False, False, MISALIGNED, ALIGN, BLOCK_R, BLOCK_V, N_TILES)
                                     + shift[:, None])
            pending = active & move
        else:
            # the proposal's tile masses, Σ_{y≠x_t} s_y among them
            logw = _pass_a(win_ptr, row_ptr, active, mis, n_cand, x, shift, shift, thr,
                           ABSORB, False, False, MISALIGNED, ALIGN, BLOCK_R, BLOCK_V, N_TILES) + shift[:, None]
            log_s = _logsumexp_tiles(logw)
            pending = active
        log_c = log_c2 + tl.maximum(log_s, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(log_s)))  # C = c₂·S, s_{x_t} = 1
        if not TRUNCATE:
            # ---- proposals q_y ∝ s_y·T(x_t, y), accepted with probability (1 − C/s_y)_+
            for r in range(0, proposals):
                for _ in range(0, tl.max(pending.to(tl.int32), axis=0)):  # skip when no row proposes
                    best, tile = _race(logw, seed, rows, r * _STREAMS + 2, N_ROUNDS, N_TILES)
                    stay_key = log_t - _row_log_noise(seed, rows, 0, r * _STREAMS + 1, N_ROUNDS)
                    stay = stay_key > best
                    found, col, sh = _draw_in_tile(row_ptr, tile, pending & ~stay, n_cand, x, shift, shift, thr, seed,
                                                   rows, r * _STREAMS, n_sub, ABSORB, False, False, BLOCK_R, BLOCK_V, SUB,
                                                   N_ROUNDS)
                    accept = 1.0 - tl.exp(tl.where(stay, log_c, log_c - sh))  # 1 − C/s_y (s_{x_t} = 1)
                    u = _row_uniform(seed, rows, r * _STREAMS + 4, N_ROUNDS)
                    ok = pending & (stay | found) & (u < accept)
                    choice = tl.where(ok & ~stay, col, choice)
                    pending = pending & ~ok
        # ---- the general path: the race on (s_y − C)_+ itself, for the rows left
        for _ in range(0, tl.max(pending.to(tl.int32), axis=0)):
            r = proposals
            logw = _pass_a(win_ptr, row_ptr, pending, mis, n_cand, x, shift, log_c, thr,
                           ABSORB, True, TRUNCATE, MISALIGNED, ALIGN, BLOCK_R, BLOCK_V, N_TILES)
            best, tile = _race(logw, seed, rows, r * _STREAMS + 2, N_ROUNDS, N_TILES)
            draw = pending & (tile >= 0)
            if not TRUNCATE:  # staying weighs (1 − C)_+·T_on against the candidates' (s_y − C)_+·T_off
                stay_key = tl.log(1.0 - tl.exp(tl.minimum(log_c, 0.0))) + log_t - _row_log_noise(
                    seed, rows, 0, r * _STREAMS + 1, N_ROUNDS)
                draw = draw & ~((log_c < 0.0) & (stay_key > best))
            found, col, _ = _draw_in_tile(row_ptr, tile, draw, n_cand, x, shift, log_c, thr, seed, rows,
                                          r * _STREAMS, n_sub, ABSORB, True, TRUNCATE, BLOCK_R, BLOCK_V, SUB, N_ROUNDS)
            # a winning tile without a candidate in pass B/C (rounding) keeps x
            choice = tl.where(draw & found, col, choice)
    else:
        # ---- the exp family: candidates e^{log_coef + ŝ_y}, one pass
        logw = _pass_a(win_ptr, row_ptr, active, mis, n_cand, x, shift, shift, thr,
                       ABSORB, False, TRUNCATE, MISALIGNED, ALIGN, BLOCK_R, BLOCK_V, N_TILES) + shift[:, None]
        best, tile = _race(logw, seed, rows, 2, N_ROUNDS, N_TILES)
        draw = active & (tile >= 0)
        if TRUNCATE:
            # the caller drew stay-or-move with the untruncated probabilities; moving rows draw among
            # the kept candidates (the current token is never one)
            draw = draw & move
        elif KIND != 2:  # denoise never keeps MASK
            # stay weight 1 − coef·Σ e^{ŝ} (Euler stay, absorbing analytic MASK); ≤ 0: impossible
            total = tl.exp(log_coef + _logsumexp_tiles(logw))
            stay_key = tl.log(1.0 - total) - log_coef - _row_log_noise(seed, rows, 0, 1, N_ROUNDS)
            draw = draw & ~((total < 1.0) & (stay_key > best))
        for _ in range(0, tl.max(draw.to(tl.int32), axis=0)):  # skip when no row of the block draws
            found, col, _ = _draw_in_tile(row_ptr, tile, draw, n_cand, x, shift, shift, thr, seed, rows, 0, n_sub,
                                          ABSORB, False, TRUNCATE, BLOCK_R, BLOCK_V, SUB, N_ROUNDS)
            # a winning tile without a candidate in pass B/C keeps x, never a column of weight 0;
            # absorbing denoise, which never keeps MASK, takes token 0 as for a row with no candidate
            if ABSORB and KIND == 2:
                fallback = x * 0
            else:
                fallback = x
            choice = tl.where(draw, tl.where(found, col, fallback), choice)
        if ABSORB and KIND == 2:
            # denoise never keeps MASK: a row whose real tokens all have weight 0 (every score −∞)
            # takes token 0, the lowest id, as the eager backend does (sedd.ops.reference.denoise_step)
            choice = tl.where(active & (tile < 0), 0, choice)
    choice = tl.where(active, choice, x)
    tl.store(out_ptr + rows, choice.to(out_ptr.dtype.element_ty), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


PROPOSALS = 4  # uniform analytic / denoise: rejection proposals per row before the general path


def _sub_tile(block_v: int) -> int:
    """Columns per sub-tile: about √BLOCK_V, so that passes B and C draw about as many
    exponentials each (2048 → 64). Under the interpreter, where every loop trip costs its ops'
    Python overhead, a quarter of the tile (four sub-tiles)."""
    if interpreted():
        return max(2, block_v // 4)
    return min(block_v, max(2, 1 << math.ceil(math.log2(block_v) / 2)))


def _rows_aligned(z: torch.Tensor) -> bool:
    """Every row of z starts on a 16-byte boundary (base and both row strides)."""
    es = z.element_size()
    B, L, _ = z.shape
    return (z.data_ptr() % 16 == 0 and (B == 1 or z.stride(0) * es % 16 == 0)
            and (L == 1 or z.stride(1) * es % 16 == 0))


def reverse_step(
    kind: str,
    z: torch.Tensor,
    x_t: torch.Tensor,
    scalar: torch.Tensor,
    absorbing: bool,
    N: int,
    *,
    shift: torch.Tensor | None = None,
    seed: torch.Tensor,
    truncation: torch.Tensor | None = None,
    block_v: int | None = None,
    block_r: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    sub: int | None = None,
    proposals: int = PROPOSALS,
) -> torch.Tensor:
    """One fused reverse step; returns the next tokens [B, L] in x_t's dtype.

    Args:
        kind: "euler" (scalar = dσ·Δt), "analytic" (scalar = Δσ) or "denoise" (scalar = σ).
        z: [B, L, V] fp32/bf16/fp16 scores, or raw output when ``shift`` is given; any batch and
            position strides (a view of padded rows reads no padding and is not copied), column
            stride 1 (else it is copied).
        x_t: [B, L] int current tokens in [0, V).
        scalar: [B] fp32 per-sequence scalar (see ``kind``).
        absorbing: absorbing graph (MASK = V − 1, N = V − 1) or uniform (N = V).
        shift: optional [B] fp32, ŝ = z + shift.
        seed: [1] int64 tensor on z's device, the Philox key.
        truncation: optional [B, L, 2] fp32 for a top-p / top-k step: per position the ŝ threshold
            of the kept candidates (y ≠ x_t with ŝ_y ≥ it) and 1.0 to move / 0.0 to stay, decided
            by the caller with the untruncated stay probability. Moving positions draw among the
            kept candidates with the step's weights; without it the kernel compiles as before.
        block_v, block_r: force the tile width / rows per program (powers of two).
        num_warps, num_stages: force the warps per program and the software-pipelining depth
            (``benchmarks/sweep_launch.py`` times the choices, through ``sedd.ops.launch_options``).
        sub: force the sub-tile width (a power of two dividing the tile); for tests.
        proposals: uniform analytic / denoise, proposals per row before the general path (0: the
            general path only); for tests.

    The caller (``sedd.ops``) validates values; this checks only what the kernel relies on.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    B, L, V = z.shape
    if z.stride(2) != 1:
        z = z.contiguous()
    x = x_t.contiguous()
    out = torch.empty_like(x)
    n_rows = B * L
    if n_rows == 0:
        return out
    n_cand = V - 1 if absorbing else V
    if block_v is None:
        # GPU: 2048 columns × 4 warps, the fastest tile of the launch sweep on an H200 for the
        # one-pass steps (benchmarks/results/h200-2026-12-04-21e83ed.md); uniform analytic /
        # denoise is one pass too now
        block_v = min(256 if interpreted() else 2048, triton.next_power_of_2(max(n_cand, 2)))
    block_v = max(2, int(block_v))
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    sub = _sub_tile(block_v) if sub is None else int(sub)
    if sub < 2 or sub & (sub - 1) or block_v % sub:
        raise ValueError(f"sub must be a power of two >= 2 dividing block_v = {block_v}, got {sub}")
    if block_r is None:
        # interpreter: wide programs (~1 ms each); GPU: one row per program
        block_r = max(1, min(triton.next_power_of_2(n_rows), 4096 // block_v, 256)) if interpreted() else 1
    if num_warps is None:
        # at least 8 columns per thread: a narrow tile spread over 4 warps replicated its values
        num_warps = min(4, max(1, block_v // 256))
    # 16-byte windows need tiles of at least 16 bytes
    tweedie = (not absorbing) and kind != "euler"
    align = 16 // z.element_size()
    if block_v < align or ((tweedie or truncation is not None) and not _rows_aligned(z)):
        # a truncated or uniform analytic / denoise step on misaligned rows: per-element loads
        # (with the windows' spill columns on top, their extra pass-A instance went over 128
        # registers, or spilled, under one Triton or the other); a 64-padded head's rows are aligned
        align = 1
    if shift is not None:
        shift = shift.reshape(B).to(torch.float32).contiguous()
    scalar = scalar.reshape(B).to(torch.float32).contiguous()
    trunc = truncation.reshape(n_rows, 2).to(torch.float32).contiguous() if truncation is not None else scalar
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    with on_device(z):
        reverse_step_kernel[(triton.cdiv(n_rows, block_r),)](
            z, z.stride(0), z.stride(1), shift if shift is not None else scalar, x, scalar, seed, trunc, out,
            n_rows, L, V, math.log(N), int(proposals), block_v // sub,
            KIND=KINDS[kind], ABSORB=bool(absorbing), HAS_SHIFT=shift is not None, TWEEDIE=tweedie,
            TRUNCATE=truncation is not None, MISALIGNED=align > 1 and not _rows_aligned(z), ALIGN=align,
            BLOCK_R=block_r, BLOCK_V=block_v, SUB=sub, N_ROUNDS=10,
            N_TILES=triton.next_power_of_2(triton.cdiv(n_cand, block_v)), **options,
        )
    return out
