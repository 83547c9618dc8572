"""The passes of the reverse-step kernel (``sampling.py``, whose docstring tells the story):
pass A (every tile's mass in one streaming pass of 16-byte windows, and with ``STATS`` the
row's confidence and entropy from the same values), the race among tiles, and passes B and C
(the sub-tile race inside the winning tile, the column race inside the winner)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._math import LOG2E
from ._math import exp2 as _exp2
from ._noise import _lane_log_noise, _row_log_noise

_NEG_BIG = tl.constexpr(-1.0e30)  # finite "−∞" for running maxima (keeps exp(m − m_new) free of nan)


@triton.jit
def _logsumexp_tiles(logw):
    """log Σ_τ e^{logw_τ} per row of [BLOCK_R, N_TILES] (−∞ entries are empty; all empty: −∞)."""
    m = tl.maximum(tl.max(logw, axis=1), _NEG_BIG)
    return m + tl.log(tl.sum(tl.exp(logw - m[:, None]), axis=1))


# ---------------------------------------------------------------------------------------------
# Pass A: one streaming pass, the mass of every tile
# ---------------------------------------------------------------------------------------------


@triton.jit
def _window(win_ptr, w, lanes, tiles, active, mis, n_cand, x, shift, log_c, thr, lam_m, lam_s, acc_m, acc_s,
            acc_t, ABSORB: tl.constexpr, GEN: tl.constexpr, TRUNC: tl.constexpr, MISALIGNED: tl.constexpr,
            WHOLE: tl.constexpr, STATS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Tile w of pass A: the (max, exp-sum) of its candidates into (lam_m, lam_s). The window's
    lanes sit at columns w·BLOCK_V − mis + lane: lanes ≥ mis are tile w's columns up to
    (w + 1)·BLOCK_V − mis − 1, lanes < mis belong to tile w − 1 and are left out (the tiles' last
    ``mis`` columns are added after the loop, :func:`_pass_a`). ``WHOLE``: the window lies inside
    the candidate columns of every row, so its load needs the per-row predicate only (16-byte
    vectors).

    Weights: exp family (``GEN`` False) e^{z_y}; general uniform Tweedie (``GEN``) (e^{ŝ_y} − C)_+
    with log C = ``log_c``, C > 0. The current token is never a candidate (absorbing: it is MASK,
    the column after the last candidate). ``STATS``: the window's (max, Σe, Σe·(v − max)) also
    merge into the row's running ``acc_*`` (:func:`_merge_tilt`)."""
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
    v = _candidates(zt, cand, shift[:, None], log_c[:, None], thr[:, None], GEN, TRUNC)
    if STATS:
        m, s, t = _mass_tilt(v, 1)
        acc_m, acc_s, acc_t = _merge_tilt(acc_m, acc_s, acc_t, m, s, t)
    else:
        m, s = _mass(v, log_c, 1, GEN)
    this = tiles[None, :] == w
    return tl.where(this, m[:, None], lam_m), tl.where(this, s[:, None], lam_s), acc_m, acc_s, acc_t


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
def _mass_tilt(v, AXIS: tl.constexpr):
    """:func:`_mass` of the exp family (the same m and Σ e^{v − m}, bit for bit, so the race draws
    what it draws without stats) and Σ e^{v − m}·(v − m), the tilt the entropy needs."""
    m = tl.maximum(tl.max(v, axis=AXIS), _NEG_BIG)
    e = _exp2(v * LOG2E - tl.expand_dims(m * LOG2E, AXIS))
    # −∞ off the candidates, where e = 0: clamped to −1e30 so that 0·(v − m) is 0, not NaN
    t = e * tl.maximum(v - tl.expand_dims(m, AXIS), _NEG_BIG)
    return m, tl.sum(e, axis=AXIS), tl.sum(t, axis=AXIS)


@triton.jit
def _merge_tilt(acc_m, acc_s, acc_t, m, s, t):
    """The running (M, S = Σ e^{v − M}, T = Σ e^{v − M}·(v − M)) of a row merged with a group's
    (m, s, t): both rescaled to the larger maximum, e^{v − M'}(v − M') = a·e^{v − M}((v − M) + (M − M'))
    with a = e^{M − M'}. An empty side (max −1e30, s = t = 0) adds nothing."""
    new = tl.maximum(acc_m, m)
    a = tl.exp(acc_m - new)
    b = tl.exp(m - new)
    return (new, a * acc_s + b * s,
            a * (acc_t + (acc_m - new) * acc_s) + b * (t + (m - new) * s))


@triton.jit
def _pass_a(win_ptr, row_ptr, active, mis, n_cand, x, shift, log_c, thr,
            ABSORB: tl.constexpr, GEN: tl.constexpr, TRUNC: tl.constexpr, MISALIGNED: tl.constexpr,
            ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, N_TILES: tl.constexpr,
            STATS: tl.constexpr = False):
    """log W_τ [BLOCK_R, N_TILES] of the rows in ``active`` (−∞: an empty or missing tile); the
    exp family's masses leave out the shift and the common factor, the general ones e^{Δσ}·T_off.

    Also (confidence, entropy) [BLOCK_R] of the categorical ∝ e^{v} over the candidates, from the
    values the masses are made of (``STATS``, exp family only; else (1, 0)): with M the row's
    maximum, S = Σ e^{v − M} and T = Σ e^{v − M}(v − M), max_y p_y = 1/S and
    H = −Σ p log p = log S − T/S. A row with no candidate gets (1, 0)."""
    lanes = tl.arange(0, BLOCK_V)
    tiles = tl.arange(0, N_TILES)
    lam_m = tl.full([BLOCK_R, N_TILES], _NEG_BIG, dtype=tl.float32)
    lam_s = tl.zeros([BLOCK_R, N_TILES], dtype=tl.float32)
    zero = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_m, acc_s, acc_t = zero + _NEG_BIG, zero, zero
    # early exit: a block with no row to read runs no window. Window 0 and the tail are masked per
    # element; the windows between are whole: w ≥ 1 puts the first lane at column ≥ BLOCK_V − mis
    # ≥ 0, and (w + 1)·BLOCK_V ≤ n_cand the last one below n_cand, whatever mis < ALIGN ≤ BLOCK_V.
    any_row = tl.max(active.to(tl.int32), axis=0) > 0
    n_win = tl.where(any_row, tl.cdiv(n_cand, BLOCK_V), 0)
    n_whole = tl.where(any_row, tl.maximum(n_cand // BLOCK_V, 1), 1)
    for w in range(0, tl.minimum(n_win, 1)):
        lam_m, lam_s, acc_m, acc_s, acc_t = _window(
            win_ptr, w, lanes, tiles, active, mis, n_cand, x, shift, log_c, thr, lam_m, lam_s, acc_m, acc_s, acc_t,
            ABSORB, GEN, TRUNC, MISALIGNED, False, STATS, BLOCK_V)
    for w in range(1, n_whole):
        lam_m, lam_s, acc_m, acc_s, acc_t = _window(
            win_ptr, w, lanes, tiles, active, mis, n_cand, x, shift, log_c, thr, lam_m, lam_s, acc_m, acc_s, acc_t,
            ABSORB, GEN, TRUNC, MISALIGNED, True, STATS, BLOCK_V)
    for w in range(n_whole, n_win):
        lam_m, lam_s, acc_m, acc_s, acc_t = _window(
            win_ptr, w, lanes, tiles, active, mis, n_cand, x, shift, log_c, thr, lam_m, lam_s, acc_m, acc_s, acc_t,
            ABSORB, GEN, TRUNC, MISALIGNED, False, STATS, BLOCK_V)
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
            if STATS:  # this column of every tile, as one group
                c_m, c_s, c_t = _mass_tilt(v, 1)
                acc_m, acc_s, acc_t = _merge_tilt(acc_m, acc_s, acc_t, c_m, c_s, c_t)
    logw = tl.where(lam_s > 0.0, lam_m + tl.log(lam_s), float("-inf"))
    confidence, entropy = zero + 1.0, zero
    if STATS:
        some = acc_s > 0.0
        safe = tl.where(some, acc_s, 1.0)
        confidence = tl.where(some, 1.0 / safe, 1.0)
        entropy = tl.where(some, tl.log(safe) - acc_t / safe, 0.0)
    return logw, confidence, entropy


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
