"""Fused score entropy: the per-token SEDD loss and its gradient in one streaming pass.

Why fuse. The eager loss (``sedd/ops/reference.py``) on a [B, L, V] row block reads the raw output,
writes ŝ = z + shift in fp32, scatters the zero at x_t (another copy), takes exp (another), sums,
gathers; autograd then replays most of that backwards. At V = 50258 that is ~10 passes over
[B, L, V] fp32 temporaries. The kernel below reads each row of z once and, when a gradient is
wanted, writes the gradient row once (possibly into z's own storage): the minimum traffic.

The gradient does not depend on the row sum. For both graphs ∂ℓ/∂ŝ_y is elementwise given
per-row scalars (docs/math.md, "Score entropy"):

    absorbing (x_t = MASK):  ∂ℓ/∂ŝ_j = e^{ŝ_j} − r·[j = x0]                  (j ≠ MASK),  r = 1/E(σ)
    uniform:                 ∂ℓ/∂ŝ_y = (e^{ŝ_y} − c)/N − [x_t ≠ x0][y = x0]/E  (y ≠ x_t)

with c = ρ = E/(E + N) when x_t = x0 and c = 1 otherwise, and 0 on the excluded columns
(MASK, x_t). So one pass serves both the loss (an online log-sum-exp of the included ŝ, plus Σ ŝ
for uniform) and the gradient; a backward-only launch (reduction "none", where the incoming
gradient is per token) is the same pass with the loss statistics compiled out.

Per-row scalars (E(σ), r, ρ, log ρ and the constant terms) are computed in fp64: they are a few
flops per row, and at σ = 1e-5 the constant r(log r − 1) ~ 1e6 cancels against r·ŝ_{x0}, which fp32
would leave with an absolute error ~0.1. Everything of size V is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import on_device
from ._math import LOG2E, exp2, interpreted

M_CAP = tl.constexpr(64.0)  # cap of the running max (e^64 ≈ 6e27, finite in fp32)


@triton.jit
def _esigm1(sigma):
    """E(σ) = e^σ − 1 for fp64 σ > 0; a 4-term series below 1e-3 (relative error < 1e-14)."""
    series = sigma * (1.0 + sigma * (0.5 + sigma * (1.0 / 6.0 + sigma * (1.0 / 24.0))))
    return tl.where(sigma < 1e-3, series, tl.exp(sigma) - 1.0)


@triton.jit
def _tile(z_win, g_win, start, cols0, V, mis, active, row_ok, xt_col, shift, k, c, g, m, acc, ssum,
          ABSORB: tl.constexpr, WRITE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr, WHOLE: tl.constexpr):
    """One window of the pass: positions start … start + BLOCK_V − 1 after each row's aligned base
    (``z_win``/``g_win``: the row's first column minus ``mis`` [BLOCK_R] columns), i.e. columns
    j = start + i − mis. Updates the running max m, Σ e^{ŝ − m} and Σ ŝ, and writes the gradient
    of the included columns (0 on the others of the row)."""
    w = start + cols0  # position in the window (int32)
    if WHOLE:  # all columns of the window lie in [0, V − 1): the masks are per row only
        ld = active[:, None]
        st = row_ok[:, None]
        if ABSORB:  # active rows have x_t = MASK = V − 1, outside this window
            inc = ld
        else:
            inc = ld & (w[None, :] != (xt_col + mis)[:, None])
    else:
        j = w[None, :] - mis[:, None]
        col_ok = (j >= 0) & (j < V)
        ld = active[:, None] & col_ok
        st = row_ok[:, None] & col_ok
        # every y ≠ x_t (for absorbing, active rows have x_t = MASK, so this drops the MASK column);
        # the x_t entry is never used, whatever the buffer holds there
        inc = ld & (j != xt_col[:, None])
    # streamed once (the x0 entry was gathered before the pass): first out of the L2
    s = tl.load((z_win + start)[:, None] + cols0[None, :], mask=ld, other=0.0,
                eviction_policy="evict_first").to(tl.float32) + shift[:, None]
    if WRITE_LOSS:
        s_inc = tl.where(inc, s, float("-inf"))
        # the reference point of the running sum: the running max, capped at M_CAP so that the
        # gradient's e^{m} cannot overflow (Σ e^{ŝ − m} then overflows only for ŝ > M_CAP + 88.7,
        # where e^{ŝ} itself is long inf)
        m_new = tl.minimum(tl.maximum(m, tl.max(s_inc, axis=1)), M_CAP)
        e_rel = exp2(s_inc * LOG2E - (m_new * LOG2E)[:, None])  # e^{ŝ − m}: the one exponential per element
        acc = acc * tl.exp(m - m_new) + tl.sum(e_rel, axis=1)
        if not ABSORB:
            ssum += tl.sum(tl.where(inc, s, 0.0), axis=1)
    if WRITE_GRAD:
        if WRITE_LOSS:
            # e^{ŝ} = e^{ŝ − m}·e^{m}: no second exponential. m is capped (below), so e^{m} stays
            # finite and the product overflows exactly where e^{ŝ} does (ŝ > 88.7): only those
            # entries are inf, as in eager.
            es = e_rel * tl.exp(m_new)[:, None]
        else:
            es = exp2(s * LOG2E)
        gr = tl.where(inc, (k[:, None] * (es - c[:, None])) * g[:, None], 0.0)
        tl.store((g_win + start)[:, None] + cols0[None, :], gr.to(g_win.dtype.element_ty), mask=st,
                 eviction_policy="evict_first")
    if WRITE_LOSS:
        m = m_new
    return m, acc, ssum


@triton.jit
def _score_entropy_kernel(
    z_ptr,  # [B, L, V] raw output z (or ŝ), fp32/bf16/fp16, column stride 1
    stride_zb,  # elements between batches of z
    stride_zl,  # elements between positions of z (V, or more for a view of padded rows)
    grad_ptr,  # [B, L, V] gradient out, z's dtype (may be z_ptr itself); unused unless WRITE_GRAD
    stride_gb,  # elements between batches of grad
    stride_gl,  # elements between positions of grad
    loss_ptr,  # [n_rows] fp32 weighted per-token loss; unused unless WRITE_LOSS
    gout_ptr,  # [n_rows] fp32 incoming gradient per token; unused unless HAS_GOUT
    sigma_ptr,  # [B] fp32 σ
    shift_ptr,  # [B] fp32 shift (ŝ = z + shift); unused unless HAS_SHIFT
    weight_ptr,  # [B] fp32 per-sequence weight; unused unless HAS_WEIGHT
    xt_ptr,  # [n_rows] int32/int64 noisy tokens
    x0_ptr,  # [n_rows] int32/int64 clean tokens
    n_rows,  # B·L
    L,  # sequence length (row // L is the batch index)
    V,  # row width
    N,  # real tokens (V − 1 absorbing, V uniform)
    grad_scale,  # fp32 constant folded into the gradient (1, 1/B for batchmean)
    ABSORB: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_GOUT: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # columns per tile
    ALIGN: tl.constexpr,  # elements per 16 bytes when z and grad are misaligned alike, else 1
    MASKED_SPLIT: tl.constexpr,  # sub-windows per masked (first / tail) window
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # 64-bit: row offsets overflow int32
    row_ok = rows < n_rows
    b = rows // L
    pos = rows - b * L
    xt = tl.load(xt_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    x0 = tl.load(x0_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    if ABSORB:
        active = row_ok & (xt == V - 1)  # only MASK positions carry a loss
    else:
        active = row_ok

    # ---- per-row scalars, fp64 -------------------------------------------------------------
    sigma = tl.load(sigma_ptr + b, mask=row_ok, other=1.0).to(tl.float64)
    E = _esigm1(sigma)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + b, mask=row_ok, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros([BLOCK_R], dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + b, mask=row_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
    z_row = z_ptr + (b * stride_zb + pos * stride_zl)
    g_row = grad_ptr + (b * stride_gb + pos * stride_gl)
    if ABSORB:
        # ∂ℓ/∂ŝ_j = k·(e^{ŝ_j} − c) − d·[j = x0]
        k = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
        c = tl.zeros([BLOCK_R], dtype=tl.float32)
        d = (1.0 / E).to(tl.float32)
    else:
        stay = xt == x0
        rho = E / (E + N)
        k = tl.full([BLOCK_R], 1.0, dtype=tl.float32) / N
        c = tl.where(stay, rho, 1.0).to(tl.float32)
        d = tl.where(stay, 0.0, 1.0 / E).to(tl.float32)

    if WRITE_GRAD:
        g = w * grad_scale
        if HAS_GOUT:
            g = g * tl.load(gout_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        g = tl.where(active, g, 0.0)  # inactive rows get an all-zero gradient row
    else:
        g = tl.zeros([BLOCK_R], dtype=tl.float32)

    n_active = tl.sum(active.to(tl.int32), axis=0)
    if not WRITE_GRAD:
        if n_active == 0:  # e.g. absorbing rows without MASK: no loss, nothing to read
            tl.store(loss_ptr + rows, tl.zeros([BLOCK_R], dtype=tl.float32), mask=row_ok)
            return

    # ŝ_{x0} (0 when x0 = x_t: the current token reads as 0), gathered before the pass, which may
    # overwrite z with the gradient; the barrier keeps every warp's read ahead of any warp's write.
    z_x0 = tl.load(z_row + x0, mask=active & (x0 != xt), other=0.0).to(tl.float32)
    s_x0 = tl.where(x0 == xt, 0.0, z_x0 + shift)
    if WRITE_GRAD:
        tl.debug_barrier()

    # ---- one streaming pass over the row ---------------------------------------------------
    # A GPT-2 row (V = 50258) starts only 4-byte aligned, which alone forces 2-byte scalar accesses
    # and per-element 64-bit address arithmetic. So the pass walks each row in windows aligned to
    # 16 bytes: the row's base is moved back by its misalignment ``mis`` (< ALIGN elements) and
    # window w covers columns w·BLOCK_V − mis …. The windows that lie wholly inside [0, V − 1)
    # need no per-element mask (and, for absorbing, no current-token test: x_t = MASK is the last
    # column), so their loads and stores are 16-byte vectors. The first window and the tail are
    # masked per element (nothing outside the row is read or written). The x0 entry of the gradient
    # is written by the pass like any other and overwritten after it (below). Column ids compare
    # in int32 (V < 2^31).
    xt_col = xt.to(tl.int32)
    if ALIGN > 1:  # elements between each row's start and the 16-byte boundary below it
        mis = ((z_row.to(tl.int64, bitcast=True) % 16) // (16 // ALIGN)).to(tl.int32)
    else:
        mis = tl.zeros([BLOCK_R], dtype=tl.int32)
    z_win = z_row - mis
    g_win = g_row - mis
    if ALIGN > 1:  # pointer divisibility is in bytes
        z_win = tl.multiple_of(z_win, 16)
        g_win = tl.multiple_of(g_win, 16)
    m = tl.full([BLOCK_R], -1e30, dtype=tl.float32)  # running max of the included ŝ (capped at M_CAP)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)  # Σ e^{ŝ − m}
    ssum = tl.zeros([BLOCK_R], dtype=tl.float32)  # Σ ŝ (uniform)
    cols0 = tl.arange(0, BLOCK_V)
    # window w is whole iff w ≥ 1 (so w·BLOCK_V − mis ≥ 0) and (w + 1)·BLOCK_V ≤ V − 1 (so its last
    # column w·BLOCK_V + BLOCK_V − 1 − mis < V − 1 for every mis ≥ 0)
    whole_end = ((V - 1) // BLOCK_V) * BLOCK_V
    # The masked windows (the first and the tail, one to three per row) go in sub-windows of
    # BLOCK_V / MASKED_SPLIT columns: per-element masks make their loads scalar, and ptxas 12.8
    # (Triton 3.6) keeps all of a whole window's scalar loads, addresses and predicates live at once,
    # which set the kernel's register count (90 live in the absorbing tail against 67 in the
    # vector loop). The few extra reductions cost nothing measurable at 1–3 windows of ~13.
    sub = tl.arange(0, BLOCK_V // MASKED_SPLIT)
    for part in tl.static_range(MASKED_SPLIT):
        m, acc, ssum = _tile(z_win, g_win, part * (BLOCK_V // MASKED_SPLIT), sub, V, mis, active, row_ok, xt_col,
                             shift, k, c, g, m, acc, ssum, ABSORB, WRITE_LOSS, WRITE_GRAD, False)
    for start in range(BLOCK_V, whole_end, BLOCK_V):
        m, acc, ssum = _tile(z_win, g_win, start, cols0, V, mis, active, row_ok, xt_col, shift, k, c, g, m, acc,
                             ssum, ABSORB, WRITE_LOSS, WRITE_GRAD, True)
    for start in range(tl.maximum(whole_end, BLOCK_V), V + ALIGN - 1, BLOCK_V // MASKED_SPLIT):
        m, acc, ssum = _tile(z_win, g_win, start, sub, V, mis, active, row_ok, xt_col, shift, k, c, g, m, acc,
                             ssum, ABSORB, WRITE_LOSS, WRITE_GRAD, False)

    if WRITE_GRAD:
        # The x0 entry, ∂ℓ/∂ŝ_{x0} = k·(e^{ŝ_{x0}} − c) − d, from the fp32 value gathered above (no
        # difference of rounded numbers). The barrier orders it after the pass's write of that entry.
        tl.debug_barrier()
        fix = active & (x0 != xt)
        g_x0 = g * (k * (tl.exp(s_x0) - c) - d)
        tl.store(g_row + x0, g_x0.to(grad_ptr.dtype.element_ty), mask=fix)

    if WRITE_LOSS:
        acc = tl.where(active, acc, 1.0)  # inactive rows: no included column (masked below)
        pos = tl.exp((tl.log(acc) + m).to(tl.float64))  # e^{lse} over the included columns
        # the constant terms are fp64 (see the module docstring), ŝ_{x0} with them
        s_x0 = tl.where(x0 == xt, 0.0, z_x0.to(tl.float64) + shift.to(tl.float64))
        if ABSORB:
            # ℓ = Σ_{j≠M} e^{ŝ_j} − r ŝ_{x0} + r(log r − 1) = e^{lse} + r(−log E − 1 − ŝ_{x0})
            r = 1.0 / E
            loss = pos + r * (-tl.log(E) - 1.0 - s_x0)
        else:
            logrho = tl.log(E) - tl.log(E + N)
            neg0 = ssum.to(tl.float64) / N
            loss_stay = pos / N - rho * neg0 + (N - 1.0) / N * rho * (logrho - 1.0)
            loss_move = pos / N - neg0 - s_x0 / E + ((-logrho - 1.0) / rho - (N - 2.0)) / N
            loss = tl.where(stay, loss_stay, loss_move)
        loss = tl.where(active, loss.to(tl.float32) * w, 0.0)
        tl.store(loss_ptr + rows, loss, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


MASKED_SPLIT = 2  # sub-windows per masked window (see the kernel)


def _launch_config(n_rows: int, V: int, element_size: int, block_v: int | None):
    """(BLOCK_R, BLOCK_V, num_warps). GPU: one row per program, 4096-column windows and 4 warps, so
    32 elements per thread: of the tile widths and warp counts the launch sweep timed on an H200
    (benchmarks/results/h200-2026-12-04-21e83ed.md, 16 × 1024 rows at GPT-2 width), 4096 × 4 was
    the fastest for every case, loss and loss + gradient, absorbing and uniform (62 % / 56 % of the
    copy bandwidth for loss + gradient, against 55 % / 40 % at 4096 × 8; wider tiles and more warps
    were slower still). Interpreter: a small tile and several rows per program, since every program
    instance costs ~1 ms there."""
    if block_v is None:
        cap = 1024 if interpreted() else 4096
        block_v = min(triton.next_power_of_2(V), cap)
    elif block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    budget = 1 << 15 if interpreted() else 4096  # elements per [BLOCK_R, BLOCK_V] tile
    block_r = max(1, min(budget // block_v, triton.next_power_of_2(max(n_rows, 1)), 64))
    return block_r, block_v, 4


def _aligned_alike(z: torch.Tensor, grad: torch.Tensor) -> bool:
    """Every row of ``grad`` sits at the same offset from a 16-byte boundary as z's row: the
    windows aligned for z are then aligned for the gradient's stores too."""
    es = z.element_size()
    return ((grad.data_ptr() - z.data_ptr()) % 16 == 0 and (grad.stride(0) - z.stride(0)) * es % 16 == 0
            and (grad.stride(1) - z.stride(1)) * es % 16 == 0)


def score_entropy(
    z: torch.Tensor,
    sigma: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    *,
    absorbing: bool,
    shift: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    grad_scale: float = 1.0,
    grad_output: torch.Tensor | None = None,
    compute_loss: bool = True,
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor | None:
    """Launch the fused score entropy.

    Args:
        z: [B, L, V] fp32/bf16/fp16 log-scores (raw output when ``shift`` is given), column stride
            1, any batch and position strides (a view of padded rows reads no padding).
        sigma: [B] fp32 σ > 0.   x_t, x0: [B, L] contiguous int32/int64.
        absorbing: the graph (True: V = N + 1, MASK = V − 1; False: uniform, N = V).
        shift, weight: optional [B] fp32.
        grad: optional [B, L, V] tensor of z's dtype, column stride 1, to receive
            ∂(Σ weight·ℓ)/∂ŝ · grad_scale (· grad_output per token); may be ``z`` itself (each
            window is read before it is written, by the same program). Laid out as z (the same
            strides), its stores use z's aligned windows.
        grad_output: optional [B, L] fp32 per-token incoming gradient.
        compute_loss: return the weighted loss [B, L] fp32 (else None: a backward-only pass).
        block_v: force the column tile (a power of two); for tests.
        num_warps, num_stages: force the warps per program and the software-pipelining depth
            (``benchmarks/sweep_launch.py`` times the choices, through ``sedd.ops.launch_options``).
    """
    B, L, V = z.shape
    assert z.stride(2) == 1 and z.dtype in (torch.float32, torch.bfloat16, torch.float16)
    n_rows = B * L
    N = V - 1 if absorbing else V
    loss = torch.empty((B, L), dtype=torch.float32, device=z.device) if compute_loss else None
    if grad is not None:
        assert grad.shape == z.shape and grad.dtype == z.dtype and grad.stride(2) == 1
    if not compute_loss and grad is None:
        return None
    if n_rows == 0:
        return loss
    block_r, block_v, default_warps = _launch_config(n_rows, V, z.element_size(), block_v)
    # 16-byte windows need z and the gradient buffer to be misaligned alike (both laid out alike,
    # or the gradient written over z) and tiles of at least 16 bytes
    align = 16 // z.element_size()
    if block_v < align or (grad is not None and not _aligned_alike(z, grad)):
        align = 1
    masked_split = min(MASKED_SPLIT, block_v)
    if num_warps is None:
        # the unaligned fallback (per-element masks and 64-bit addresses) at 32 elements per thread
        # takes 254 registers and a stack frame (uniform, Triton 3.9); at 16 it fits
        num_warps = default_warps if align > 1 else 8
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    dummy = sigma
    g = grad if grad is not None else z
    with on_device(z):
        _score_entropy_kernel[(triton.cdiv(n_rows, block_r),)](
            z, z.stride(0), z.stride(1),
            g, g.stride(0), g.stride(1),
            loss if loss is not None else dummy,
            grad_output if grad_output is not None else dummy,
            sigma,
            shift if shift is not None else dummy,
            weight if weight is not None else dummy,
            x_t,
            x0,
            n_rows,
            L,
            V,
            N,
            float(grad_scale),
            ABSORB=absorbing,
            HAS_SHIFT=shift is not None,
            HAS_WEIGHT=weight is not None,
            HAS_GOUT=grad_output is not None,
            WRITE_LOSS=compute_loss,
            WRITE_GRAD=grad is not None,
            BLOCK_R=block_r,
            BLOCK_V=block_v,
            ALIGN=align,
            MASKED_SPLIT=masked_split,
            **options,
        )
    return loss
