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

Statistics (``STATS``, absorbing denoise). First hitting's adaptive rules choose positions by the
confidence max_y p_y and the entropy H(p) of each MASK position's denoising distribution p ∝ e^{ŝ}
(after truncation). Computed apart, they would cost a
second read of every row (two more bytes of traffic per score byte in bf16) or a [B, L, V]
softmax. Pass A already holds each window's values and maximum m: with e = e^{v − m} it also sums
e·(v − m) and merges (m, Σe, Σe(v − m)) into the row's running (M, S, T) (rescaled to the larger
maximum, as an online softmax), so max p = 1/S and H = log S − T/S come out of the same read. The
masses the race reads are computed exactly as without it: the tokens for a seed do not change.
Cost on sm_90 (``tests/test_kernels_gpu_build.py``): pass A's loop grows from ~190 to ~290
instructions per 2048-column window (per warp), registers 72 under both Tritons.

Layout. One program handles BLOCK_R rows × the whole row width in windows of BLOCK_V columns. On a
GPU BLOCK_R = 1 and BLOCK_V is a few thousand; under the interpreter (~1 ms per program) a program
takes many rows at once. Pass A's loads carry no eviction hint (unlike the loss kernel's, which
reads each byte once): pass B re-reads the winning tile, which should still be in L2.

Instruction counts and registers: ``python -m tests.test_kernels_gpu_build sm90 --loops --table``
(each launch, both Triton versions, is held to its register budget by that test).

The math: docs/math.md, "Reverse steps", "Categorical draws", "Truncation", "Adaptive parallel decoding".
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._draw import _draw_in_tile, _logsumexp_tiles, _pass_a, _race
from ._launch import on_device
from ._math import interpreted
from ._noise import _row_log_noise, _row_uniform

EULER, ANALYTIC, DENOISE = 0, 1, 2
KINDS = {"euler": EULER, "analytic": ANALYTIC, "denoise": DENOISE}

_STREAMS = tl.constexpr(8)  # Philox streams per round of the draw (module docstring)


# ---------------------------------------------------------------------------------------------
# Per-row constants (fp64, once per row)
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
    stats_ptr,  # [B·L, 2] fp32 out: max_y p_y and the entropy (nats) of each row's draw; STATS
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
    STATS: tl.constexpr,  # absorbing denoise: also write stats_ptr, from pass A's values
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
            logw_all, _conf, _ent = _pass_a(win_ptr, row_ptr, active & move, mis, n_cand, x, shift, shift, thr,
                                     ABSORB, False, False, MISALIGNED, ALIGN, BLOCK_R, BLOCK_V, N_TILES)
            log_s = _logsumexp_tiles(logw_all + shift[:, None])
            pending = active & move
        else:
            # the proposal's tile masses, Σ_{y≠x_t} s_y among them
            logw, _conf, _ent = _pass_a(win_ptr, row_ptr, active, mis, n_cand, x, shift, shift, thr,
                                 ABSORB, False, False, MISALIGNED, ALIGN, BLOCK_R, BLOCK_V, N_TILES)
            logw = logw + shift[:, None]
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
            logw, _conf, _ent = _pass_a(win_ptr, row_ptr, pending, mis, n_cand, x, shift, log_c, thr,
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
        # ---- the exp family: candidates e^{log_coef + ŝ_y}, one pass (with STATS, the row's
        # confidence and entropy from the same values)
        logw, confidence, entropy = _pass_a(win_ptr, row_ptr, active, mis, n_cand, x, shift, shift, thr, ABSORB,
                                            False, TRUNCATE, MISALIGNED, ALIGN, BLOCK_R, BLOCK_V, N_TILES, STATS)
        logw = logw + shift[:, None]
        if STATS:
            # a position that does not move keeps its token with certainty: (1, 0)
            tl.store(stats_ptr + rows * 2, tl.where(active, confidence, 1.0), mask=row_ok)
            tl.store(stats_ptr + rows * 2 + 1, tl.where(active, entropy, 0.0), mask=row_ok)
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
    proposals: int | None = None,
    stats: torch.Tensor | None = None,
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
        stats: absorbing denoise only: a [B, L, 2] fp32 contiguous buffer the kernel fills with each
            position's max_y p_y and entropy −Σ p log p (nats) of the categorical it draws from
            (after truncation), computed in pass A from the values the draw reads, so the tokens
            are those drawn without it; a position that is not MASK (or has no candidate) (1, 0).
        proposals: uniform analytic / denoise, proposals per row before the general path (0: the
            general path only; default ``PROPOSALS``, one under the interpreter, where each round
            costs its Python, so the small tests run the general path too); for tests.

    The caller (``sedd.ops``) validates values; this checks only what the kernel relies on.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    if stats is not None and (kind != "denoise" or not absorbing):
        raise ValueError(f"stats are written by the absorbing denoise step only, not {kind} on the "
                         f"{'absorbing' if absorbing else 'uniform'} graph")
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
        # GPU: one row per program. Interpreter: as few programs as 2^16 elements a tile allow, since
        # each costs the Python of its ops whatever its size (4000 rows of 37 columns: 16 programs
        # of 256 rows took 1.0 s, one of 4096 rows 0.09 s); which rows share a program changes no
        # draw (the noise is keyed by row and column), and the tests that force block_r cover
        # several programs.
        block_r = max(1, min(triton.next_power_of_2(n_rows), (1 << 16) // block_v)) if interpreted() else 1
    if num_warps is None:
        # at least 8 columns per thread: a narrow tile spread over 4 warps replicated its values
        num_warps = min(4, max(1, block_v // 256))
    # 16-byte windows need tiles of at least 16 bytes
    tweedie = (not absorbing) and kind != "euler"
    if proposals is None:
        proposals = 1 if interpreted() else PROPOSALS
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
            stats if stats is not None else scalar,
            n_rows, L, V, math.log(N), int(proposals), block_v // sub,
            KIND=KINDS[kind], ABSORB=bool(absorbing), HAS_SHIFT=shift is not None, TWEEDIE=tweedie,
            TRUNCATE=truncation is not None, STATS=stats is not None, MISALIGNED=align > 1 and not _rows_aligned(z), ALIGN=align,
            BLOCK_R=block_r, BLOCK_V=block_v, SUB=sub, N_ROUNDS=10,
            N_TILES=triton.next_power_of_2(triton.cdiv(n_cand, block_v)), **options,
        )
    return out
