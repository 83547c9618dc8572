"""Fused reverse steps of SEDD: Euler, analytic (Tweedie) and denoise, absorbing and uniform.

Why fuse. The eager step (``sedd/ops/reference.py``) reads the [B, L, V] scores and then builds the
weights, the rates, the transition row, their product, the normalised probabilities, fp64
exponential noise and its log: about ten [B, L, V] tensors written and read again, i.e. ~20 bytes
of traffic per score byte for bf16 input, plus as many allocations. A step needs none of it: the
output is one token id per position. This kernel reads each row of the raw network output z once
(plus the one tile its draw falls in; twice for the uniform analytic/denoise steps, see below), keeps a handful of per-row running
values in registers and writes one id. Absorbing positions that are not MASK cannot move: their
row is never read (the loads are masked off and the tile loop does not run for a block whose
rows are all fixed).

The draw. A categorical draw from unnormalised weights w is argmax_y (log w_y − log E_y) with
E_y ~ Exp(1) i.i.d. (the exponential race; Gumbel-max with G = −log E). Drawing it per element
costs a Philox-10 call and two precise logs per score: compiled for sm_90 that loop was ~140 SASS
instructions per element, ~10× what a memory-bound step affords (≲ 15 per bf16 element on
H100/H200). So the draw is two-level and exact: P(y) = P(tile(y) wins)·P(y wins inside its tile)
= (W_τ/W)·(w_y/W_τ).
- Pass A streams the row once; per element only load, convert, select, max, one exp2, add: per
  (row, tile τ of BLOCK_V columns) it keeps the tile mass W_τ = Σ_{y∈τ} w_y over the candidates as
  (tile max, exp-sum) in two small per-row arrays. After the loop the tiles race with one Exp(1)
  per (row, tile): key_τ = log W_τ − log E_τ; the total W = Σ_τ W_τ gives the stay option.
- Options whose weight needs the whole row (the Euler stay weight 1 − Σw, the absorbing analytic
  MASK weight 1 − (e^{Δσ} − 1)Σ e^{ŝ}) race the best tile key with their own noise E_stay;
  non-positive weights are never chosen.
- Pass B re-reads only the winning tile of each row that still draws and races its columns with
  per-element noise on the same log w_y (≈ 1/12 of a row at V = 50258, BLOCK_V = 4096).
Each noise is drawn once from its own Philox stream, so the two stages are independent. The
tokens drawn for a seed depend on BLOCK_V (the tile partition), their distribution does not.

Noise accuracy (arXiv 2409.02908). A token of relative weight p wins only when its E_y < p·E_best,
so tokens of tiny weight are decided entirely by the lower tail of E. The usual fp32 recipe
E = −log(u) with u ~ U[0, 1) in fp32 quantises u near 1 in steps of 2^-24: E takes no values in
(0, 6e-8), tokens with p ≲ 1e-7 are (almost) never drawn, and the temperature drops. Here every
E is built from 64 random bits (two Philox words hi, lo): v = (hi·2^32 + lo + 1/2)·2^-64 and its
complement u = 1 − v = (~hi·2^32 + ~lo + 1/2)·2^-64 are both formed in fp32 *as floating-point
numbers*, so each keeps 24-bit relative precision all the way down to 2^-65 (no fixed absolute
grid). Then E = −log1p(−v) by its series v(1 + v/2 + … + v⁶/7) for v < 1/16 (relative error
< 1e-8) and E = −log(u) otherwise (u ≤ 15/16 is well conditioned). Both tails of E are therefore
those of a 64-bit uniform (E ∈ [2.7e-20, 45]) with ~1e-7 relative rounding, no systematic bias;
only log E enters the key, in fp32, where it is exact to ~1e-7 absolute.

RNG. Philox-4x32-10 (``tl.philox``) keyed by a 64-bit seed read from device memory (the launcher
draws it from the caller's torch.Generator, so no host sync), with counter (c, row_lo, row_hi,
stream): stream 0 is the within-tile draw (c = column pair: columns 2k and 2k + 1 share one call,
words 0,1 and 2,3), stream 1 the stay option (c = 0), stream 2 the tile race (c = tile index).

Uniform analytic / denoise. The staggered score s'_y = e^{Δσ}s_y − (E(Δσ)/N)·Σ_k s_k needs the row
sum before any candidate can be scored, so these two steps make two passes over the row: pass 1
computes log Σ_k e^{ŝ_k} (online max, overflow safe), then pass A and pass B run with
p_y = s'_y·T(x_t, y) (the current token competing as an ordinary column); in pass A the tile mass
is Σ T'_y(e^{ŝ_y − m} − C e^{−m}), C = (E/N)S e^{−Δσ}, which has the same absolute rounding as the
per-element e^{ŝ}(1 − q) of pass B. Every other step streams the row once (plus one tile).

Layout. One program handles BLOCK_R rows × the whole row width in tiles of BLOCK_V columns. On a
GPU BLOCK_R = 1 and BLOCK_V is a few thousand; under the interpreter (~1 ms per program) a program
takes many rows at once.

Instruction counts (sm_90, SASS of each loop body per warp ÷ 16 elements per thread; BLOCK_V =
4096, 8 warps; Triton 3.9 / 3.6): pass A over whole tiles 12.9 / 12.2 per element for the absorbing
steps, 15.0 / 14.1 for uniform Euler (the current-token test), 22.1 / 22.1 for uniform analytic /
denoise (plus 18.2 / 19.4 for their statistics pass); before the two-level draw the single loop
was 127–170. Registers (``python -m tests.test_kernels_gpu_build sm90 --table``): 92 / 64
absorbing, 94 / 48 uniform Euler, 124 / 116 uniform analytic / denoise, no stack frame; pass B
over the whole tile at once had needed 163 registers (uniform analytic) and a 24-byte stack frame
(absorbing Euler / analytic) under Triton 3.6.

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


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def log_exp1_from_bits(hi, lo):
    """log E for E ~ Exp(1), from two uint32 random words (see the module docstring).

    v = (hi·2^32 + lo + ½)·2^-64 and u = 1 − v from the complemented words, both in fp32 with
    full relative precision down to 2^-65; E = −log1p(−v) by its series for small v, −log(u) else.
    """
    v = hi.to(tl.float32) * 2.3283064365386963e-10 + (lo.to(tl.float32) + 0.5) * 5.421010862427522e-20
    hi_c = hi ^ 0xFFFFFFFF
    lo_c = lo ^ 0xFFFFFFFF
    u = hi_c.to(tl.float32) * 2.3283064365386963e-10 + (lo_c.to(tl.float32) + 0.5) * 5.421010862427522e-20
    # −log1p(−v) = v + v²/2 + v³/3 + …; seven terms are exact to 1e-8 relative for v < 1/16
    series = v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * (0.25 + v * (0.2 + v * (0.16666666666666666
                                                                                        + v * 0.14285714285714285))))))
    e = tl.where(v < 0.0625, series, -tl.log(u))
    return tl.log(e)


@triton.jit
def _tile_log_noise(seed, rows, start, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, N_ROUNDS: tl.constexpr):
    """log E [BLOCK_R, BLOCK_V] for columns start_r … start_r + BLOCK_V − 1 of each row r (``start``
    [BLOCK_R] int32, even): the within-tile draw of pass B.

    One Philox call per column pair: column 2k uses words (0, 1) of counter (k, row, 0), column
    2k + 1 uses words (2, 3).
    """
    pairs = ((start // 2)[:, None] + tl.arange(0, BLOCK_V // 2)[None, :]).to(tl.uint32)
    r = rows.to(tl.uint64)
    row_lo = (r & 0xFFFFFFFF).to(tl.uint32)
    row_hi = (r >> 32).to(tl.uint32)
    c0 = tl.broadcast_to(pairs, (BLOCK_R, BLOCK_V // 2))
    c1 = tl.broadcast_to(row_lo[:, None], (BLOCK_R, BLOCK_V // 2))
    c2 = tl.broadcast_to(row_hi[:, None], (BLOCK_R, BLOCK_V // 2))
    c3 = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3, N_ROUNDS)
    hi = tl.reshape(tl.join(w0, w2), (BLOCK_R, BLOCK_V))
    lo = tl.reshape(tl.join(w1, w3), (BLOCK_R, BLOCK_V))
    return log_exp1_from_bits(hi, lo)


@triton.jit
def _row_log_noise(seed, rows, counter, STREAM: tl.constexpr, N_ROUNDS: tl.constexpr):
    """log E, one per (row, counter) (``rows`` and ``counter`` broadcast against each other):
    words 0, 1 of Philox counter (counter, row_lo, row_hi, STREAM).

    Stream 1 is the stay / MASK option (counter 0), stream 2 the race of tile ``counter``.
    """
    r = rows.to(tl.uint64)
    zero = (r * 0 + counter * 0).to(tl.uint32)
    row_lo = zero + (r & 0xFFFFFFFF).to(tl.uint32)
    row_hi = zero + (r >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, zero + counter, row_lo, row_hi, zero + STREAM, N_ROUNDS)
    return log_exp1_from_bits(w0, w1)


@triton.jit
def _pass_a_tile(row_ptr, start, lanes, active, n_cand, x, shift, log_q0, t_ratio, thr,
                 ABSORB: tl.constexpr, TWO_PASS: tl.constexpr, WHOLE: tl.constexpr, TRUNCATE: tl.constexpr):
    """Pass A on one tile (columns start … start + BLOCK_V − 1): (tile max, Σ e^{· − max}) of the
    candidates' log-weights, per row (see the kernel). ``WHOLE``: every column is < n_cand."""
    # lanes (int32) against per-row scalars: the load mask is the bound check only (constant
    # along columns otherwise), the current token is dropped after the load
    tile_ptr = row_ptr + start
    if WHOLE:
        ld = active[:, None]
    else:
        ld = active[:, None] & (lanes < n_cand - start)[None, :]
    zt = tl.load(tile_ptr[:, None] + lanes[None, :], mask=ld).to(tl.float32)
    if TWO_PASS:
        # w_y ∝ T'_y·(e^{ŝ_y} − C), candidates ŝ_y > log C (s'_y > 0), T' = t_ratio at x_t, else 1
        is_cur = lanes[None, :] == (x - start)[:, None]
        sh = tl.where(is_cur, 0.0, zt + shift[:, None])
        cand = ld & (sh > log_q0[:, None])
        if TRUNCATE:  # the kept candidates only: ŝ ≥ thr, never the current token
            cand = cand & (sh >= thr[:, None]) & ~is_cur
        shc = tl.where(cand, sh, float("-inf"))
        tile_m = tl.maximum(tl.max(shc, axis=1), _NEG_BIG)
        c_t = tl.exp(tl.minimum(log_q0 - tile_m, 0.0))  # log C ≥ tile max: empty tile anyway
        d = tl.maximum(_exp2(shc * LOG2E - (tile_m * LOG2E)[:, None]) - c_t[:, None], 0.0)
        tile_s = tl.sum(tl.where(is_cur, d * t_ratio[:, None], d), axis=1)
    else:
        # candidates y ≠ x_t: log w_y = log(coef) + z_y + shift; per element only the raw z
        # (max, one exp2, add); the shift and the row constant are added per tile / per row
        if ABSORB:
            cand = ld
        else:
            cand = ld & (lanes[None, :] != (x - start)[:, None])
        if TRUNCATE:
            cand = cand & (zt + shift[:, None] >= thr[:, None])
        zc = tl.where(cand, zt, float("-inf"))
        tile_mz = tl.maximum(tl.max(zc, axis=1), _NEG_BIG)
        tile_s = tl.sum(_exp2(zc * LOG2E - (tile_mz * LOG2E)[:, None]), axis=1)
        tile_m = tile_mz + shift
    return tile_m, tile_s


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def reverse_step_kernel(
    z_ptr,  # [B, L, V] fp32/bf16/fp16 raw scores (ŝ = z + shift, ŝ[x_t] read as 0); column stride 1
    stride_zb,  # elements between batches of z
    stride_zl,  # elements between positions of z
    shift_ptr,  # [B] fp32 per-row shift (read only when HAS_SHIFT)
    x_ptr,  # [B·L] int current tokens x_t (contiguous)
    const_ptr,  # [B, 4] fp32 per-row constants from ``_row_constants``
    seed_ptr,  # [1] int64 Philox seed
    trunc_ptr,  # [B·L, 2] fp32 (ŝ threshold of the kept candidates, 1 to move / 0 to stay); TRUNCATE
    out_ptr,  # [B·L] int next tokens (x's dtype)
    n_rows,  # B·L
    L,  # positions per sequence
    V,  # row width
    KIND: tl.constexpr,  # 0 Euler, 1 analytic, 2 denoise
    ABSORB: tl.constexpr,  # absorbing graph (MASK = V − 1) or uniform
    HAS_SHIFT: tl.constexpr,
    TWO_PASS: tl.constexpr,  # uniform analytic / denoise: row statistics first, then the race
    TRUNCATE: tl.constexpr,  # top-p / top-k: stay decided by the caller, draw among ŝ ≥ thr
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # columns per tile (even)
    N_ROUNDS: tl.constexpr,  # Philox rounds
    N_TILES: tl.constexpr,  # ≥ cdiv(V, BLOCK_V), a power of two: the per-row tile arrays
    B_SPLIT: tl.constexpr,  # chunks of pass B's tile
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
    seed = tl.load(seed_ptr)
    # early exit: a block with no moving row reads nothing (loop bound 0)
    n_cols = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, V, 0)
    lanes = tl.arange(0, BLOCK_V)

    # per-row constants, computed by the launcher in fp64 (see ``_row_constants``)
    k0 = tl.load(const_ptr + b * 4 + 0, mask=row_ok, other=0.0)
    k1 = tl.load(const_ptr + b * 4 + 1, mask=row_ok, other=0.0)
    k2 = tl.load(const_ptr + b * 4 + 2, mask=row_ok, other=0.0)
    k3 = tl.load(const_ptr + b * 4 + 3, mask=row_ok, other=0.0)
    if TRUNCATE:
        thr = tl.load(trunc_ptr + rows * 2, mask=row_ok, other=0.0)
        move = tl.load(trunc_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
    else:
        thr = k0
        move = k0

    # ---- stats pass (uniform analytic / denoise only): log S, S = Σ_k e^{ŝ_k} over the whole row
    log_q0 = k1
    t_ratio = k2  # (two-pass steps only)
    if TWO_PASS:
        m1 = tl.full([BLOCK_R], _NEG_BIG, dtype=tl.float32)
        s1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + lanes
            ld = active[:, None] & (cols < V)[None, :]
            zt = tl.load(row_ptr[:, None] + cols[None, :], mask=ld, other=0.0).to(tl.float32)
            sh = tl.where(cols[None, :] == x[:, None], 0.0, zt + shift[:, None])
            sh = tl.where(ld, sh, float("-inf"))
            m_new = tl.maximum(m1, tl.max(sh, axis=1))
            s1 = s1 * tl.exp(m1 - m_new) + tl.sum(_exp2(sh * LOG2E - (m_new * LOG2E)[:, None]), axis=1)
            m1 = m_new
        # s'_y = e^{Δσ}s_y − (E/N)S = e^{Δσ}(e^{ŝ_y} − C), log C = [log(E/N) − Δσ] + log S =: log_q0
        log_q0 = k1 + m1 + tl.log(s1)
        t_ratio = tl.exp(k3 - k2)  # T(x_t, x_t) / T(x_t, y ≠ x_t)

    # ---- pass A: the race among tiles. Per (row, tile τ): W_τ = Σ_{y∈τ} w_y over the candidates,
    # kept as (tile max, exp-sum) in two small [BLOCK_R, N_TILES] arrays; the race itself (one Exp(1)
    # per row and tile, Philox stream 2: key_τ = log W_τ − log E_τ) and the total for the stay /
    # MASK option run once after the loop, all tiles at once. One-pass steps: W_τ omits the common
    # factor e^{k0}; two-pass steps: W_τ omits e^{Δσ}·T_off.
    # Absorbing: the moving rows are MASK rows and MASK = V − 1 is the last column, so the candidates
    # are exactly the columns < V − 1 (no per-element test for the current token).
    tiles = tl.arange(0, N_TILES)
    lam_m = tl.full([BLOCK_R, N_TILES], _NEG_BIG, dtype=tl.float32)
    lam_s = tl.zeros([BLOCK_R, N_TILES], dtype=tl.float32)
    n_cand = V - 1 if ABSORB else V
    # Tiles wholly inside the candidate columns need only the per-row mask (one predicate for all
    # of a thread's loads); the last tile checks the bound per element.
    n_whole = tl.where(n_cols > 0, (n_cand // BLOCK_V) * BLOCK_V, 0)
    for start in range(0, n_whole, BLOCK_V):
        tile_m, tile_s = _pass_a_tile(row_ptr, start, lanes, active, n_cand, x, shift, log_q0, t_ratio,
                                      thr, ABSORB, TWO_PASS, True, TRUNCATE)
        this = tiles[None, :] == start // BLOCK_V
        lam_m = tl.where(this, tile_m[:, None], lam_m)
        lam_s = tl.where(this, tile_s[:, None], lam_s)
    for start in range(n_whole, n_cols, BLOCK_V):
        tile_m, tile_s = _pass_a_tile(row_ptr, start, lanes, active, n_cand, x, shift, log_q0, t_ratio,
                                      thr, ABSORB, TWO_PASS, False, TRUNCATE)
        this = tiles[None, :] == start // BLOCK_V
        lam_m = tl.where(this, tile_m[:, None], lam_m)
        lam_s = tl.where(this, tile_s[:, None], lam_s)

    # the tile race, per row over its N_TILES tiles (an empty or missing tile never wins)
    keys = lam_m + tl.log(lam_s) - _row_log_noise(seed, rows[:, None], tiles[None, :], 2, N_ROUNDS)
    keys = tl.where(lam_s > 0.0, keys, float("-inf"))
    best, best_tile = tl.max(keys, axis=1, return_indices=True)
    best_tile = tl.where(best > float("-inf"), best_tile.to(tl.int32), -1)

    # ---- the stay / MASK option (one-pass steps), with its own noise (stream 1)
    draw = active & (best_tile >= 0)
    if TRUNCATE:
        # the caller drew stay-or-move with the untruncated probabilities; moving rows draw among
        # the kept candidates (the current token is never one)
        draw = draw & (move > 0.0)
    elif not TWO_PASS:
        if KIND != 2:  # denoise never keeps MASK
            # stay weight 1 − coef·Σ e^{ŝ} (Euler stay, absorbing analytic MASK); ≤ 0: impossible
            m = tl.max(lam_m, axis=1)
            s = tl.sum(lam_s * tl.exp(lam_m - m[:, None]), axis=1)
            total = tl.exp(k0 + m + tl.log(s))
            stay_key = tl.log(1.0 - total) - _row_log_noise(seed, rows, 0, 1, N_ROUNDS)
            stay_key = tl.where(total < 1.0, stay_key, float("-inf"))
            draw = draw & ~(stay_key > best + k0)

    # ---- pass B: re-read only the winning tile of each row that still draws, and race its columns
    # with per-element 64-bit noise (stream 0) on the same log w_y. P(y) = (W_τ/W)·(w_y/W_τ).
    # Pass B runs over the winning tile in chunks of BLOCK_V / B_SPLIT columns with a running
    # (best key, column): the per-element Philox and logs of a whole tile at once kept ~150 values
    # live per thread under ptxas 12.8 (Triton 3.6). Each column's noise is keyed by its column,
    # not by the chunk, so the draw is the same token for the same seed whatever B_SPLIT is;
    # ties go to the lower column, as one argmax over the tile would.
    choice = x
    n_b = tl.max(draw.to(tl.int32), axis=0)  # 0 or 1: skip when no row of the block draws
    chunk = tl.arange(0, BLOCK_V // B_SPLIT)
    for _ in range(0, n_b):
        base = best_tile * BLOCK_V
        best_b = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        arg_b = base
        for part in tl.static_range(B_SPLIT):
            first = base + part * (BLOCK_V // B_SPLIT)
            cols = first[:, None] + chunk[None, :]
            ld = draw[:, None] & (cols < n_cand)
            zt = tl.load(row_ptr[:, None] + cols, mask=ld, other=0.0).to(tl.float32)
            is_cur = cols == x[:, None]
            sh = tl.where(is_cur, 0.0, zt + shift[:, None])
            if TWO_PASS:
                # log w_y = ŝ_y + log(1 − q_y) + log T(x_t, y) (+ Δσ, common); non-positive s'_y never chosen
                q = tl.exp(log_q0[:, None] - sh)
                log_w = sh + tl.log(1.0 - q) + tl.where(is_cur, k3[:, None], k2[:, None])
                cand = ld & (sh > log_q0[:, None]) & (q < 1.0)
                if TRUNCATE:
                    cand = cand & (sh >= thr[:, None]) & ~is_cur
            else:
                log_w = sh
                cand = ld & (~is_cur)
                if TRUNCATE:
                    cand = cand & (sh >= thr[:, None])
            noise = _tile_log_noise(seed, rows, first, BLOCK_R, BLOCK_V // B_SPLIT, N_ROUNDS)
            key_b = tl.where(cand, log_w - noise, float("-inf"))
            part_best, part_arg = tl.max(key_b, axis=1, return_indices=True)
            better = part_best > best_b
            arg_b = tl.where(better, first + part_arg.to(tl.int32), arg_b)
            best_b = tl.where(better, part_best, best_b)
        # a row whose winning tile holds no pass-B candidate (pass A's FMA and pass B's exp can
        # disagree by an ulp on a borderline one) keeps x, never the tile's first column: a real
        # token possibly of weight 0; absorbing denoise, which never keeps MASK, takes token 0 as
        # for a row with no candidate at all (below)
        found = best_b > float("-inf")
        if ABSORB and KIND == 2:
            fallback = x * 0
        else:
            fallback = x
        choice = tl.where(draw, tl.where(found, arg_b, fallback), x)
    choice = tl.where(active, choice, x)
    if ABSORB and KIND == 2:
        # denoise never keeps MASK: a row whose real tokens all have weight 0 (every score −∞)
        # takes token 0, the lowest id, as the eager backend does (sedd.ops.reference.denoise_step)
        choice = tl.where(active & (best_tile < 0), 0, choice)
    tl.store(out_ptr + rows, choice.to(out_ptr.dtype.element_ty), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


B_SPLIT = 4  # chunks of pass B's tile (see the kernel)


def _row_constants(kind: int, scalar: torch.Tensor, absorbing: bool, N: int) -> torch.Tensor:
    """[B, 4] fp32 per-row constants, computed in fp64 (expm1 without cancellation).

    One-pass steps: column 0 is log of the candidates' common factor (Euler dσΔt, over N for
    uniform; absorbing analytic/denoise E(c) = e^c − 1). Two-pass steps (uniform analytic and
    denoise, c = Δσ): Δσ, log(E/N) − Δσ, log T_off = log((1 − e^{−Δσ})/N), log T_on =
    log(e^{−Δσ} + (1 − e^{−Δσ})/N).
    """
    c = scalar.double()
    out = torch.zeros(c.shape[0], 4, dtype=torch.float64, device=c.device)
    if kind == EULER:
        out[:, 0] = c.log() - (0.0 if absorbing else math.log(N))
    elif absorbing:
        out[:, 0] = torch.expm1(c).log()
    else:
        t_off = -torch.expm1(-c) / N
        out[:, 0] = c
        out[:, 1] = torch.expm1(c).log() - math.log(N) - c
        out[:, 2] = t_off.log()
        out[:, 3] = (torch.exp(-c) + t_off).log()
    return out.float().contiguous()


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
) -> torch.Tensor:
    """One fused reverse step; returns the next tokens [B, L] in x_t's dtype.

    Args:
        kind: "euler" (scalar = dσ·Δt), "analytic" (scalar = Δσ) or "denoise" (scalar = σ).
        z: [B, L, V] fp32/bf16/fp16 scores, or raw output when ``shift`` is given.
        x_t: [B, L] int current tokens in [0, V).
        scalar: [B] fp32 per-sequence scalar (see ``kind``).
        absorbing: absorbing graph (MASK = V − 1, N = V − 1) or uniform (N = V).
        shift: optional [B] fp32, ŝ = z + shift.
        seed: [1] int64 tensor on z's device, the Philox key.
        truncation: optional [B, L, 2] fp32 for a top-p / top-k step: per position the ŝ threshold
            of the kept candidates (y ≠ x_t with ŝ_y ≥ it) and 1.0 to move / 0.0 to stay, decided
            by the caller with the untruncated stay probability. Moving positions draw among the
            kept candidates with the step's weights; without it the kernel compiles as before.
        block_v, block_r: force the tile width (even) / rows per program (powers of two).
        num_warps: force the warps per program (``benchmarks/sweep_launch.py`` times the choices).

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
    consts = _row_constants(KINDS[kind], scalar.reshape(B), absorbing, N)
    shift_arg = shift.reshape(B).float().contiguous() if shift is not None else consts
    two_pass = (not absorbing) and kind != "euler"
    if block_v is None:
        # GPU: the fastest tile of the launch sweep on an H200 (benchmarks/results/h200-2026-12-04-21e83ed.md,
        # 16 x 1024 rows at GPT-2 width): 2048 columns x 4 warps for the one-pass steps (absorbing
        # 36 % of the copy bandwidth against 23 % at 4096 x 8), 4096 x 16 for the two-pass uniform
        # analytic / denoise (12 % against 8 %)
        block_v = min(256 if interpreted() else 4096 if two_pass else 2048, triton.next_power_of_2(V))
    block_v = max(2, int(block_v))
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if block_r is None:
        # interpreter: wide programs (~1 ms each); GPU: one row per program
        block_r = max(1, min(triton.next_power_of_2(n_rows), 4096 // block_v, 256)) if interpreted() else 1
    if num_warps is None:
        # at least 8 columns per thread: a narrow tile spread over 4 warps replicated its values
        # (V = 64: 167 registers under Triton 3.6); 16 at 2048 x 4
        num_warps = 16 if two_pass and block_v >= 4096 and not interpreted() else min(4, max(1, block_v // 256))
    grid = (triton.cdiv(n_rows, block_r),)
    trunc_arg = truncation.reshape(n_rows, 2).float().contiguous() if truncation is not None else consts
    with on_device(z):
        reverse_step_kernel[grid](
            z, z.stride(0), z.stride(1), shift_arg, x, consts, seed, trunc_arg, out,
            n_rows, L, V,
            KIND=KINDS[kind], ABSORB=bool(absorbing), HAS_SHIFT=shift is not None,
            TWO_PASS=two_pass, TRUNCATE=truncation is not None,
            BLOCK_R=block_r, BLOCK_V=block_v, N_ROUNDS=10, N_TILES=triton.next_power_of_2(triton.cdiv(V, block_v)),
            B_SPLIT=min(B_SPLIT, block_v // 2), num_warps=num_warps,
        )
    return out
