"""The fast eager (torch) reverse steps for the two built-in graphs: the CPU path behind sedd.ops.

:mod:`sedd.ops.reference` spells the math out (weights over [B, L, V], normalised, then an fp64
exponential race over every column) and stays the oracle. This module draws from the same
distributions with less work and memory:

* Log space. Every weight is kept relative to a per-tile maximum and the row's log-sum-exp, so
  log-scores far beyond fp32's exp range (e^88.7) neither overflow nor turn into NaN.
* A two-level exponential race. The columns are cut into tiles; the race first runs over the tiles
  (each with its total weight) and the stay/MASK option, then inside the winning tile only. The
  draw is exact: P(y) = P(tile of y)·P(y | tile). The Exp(1) noise is fp64 (64-bit accurate, as
  low-precision noise lowers the effective temperature, arXiv 2409.02908), but only
  (tiles + 1) + tile draws per row are needed instead of V.
* Rows in chunks. A bf16/fp16 input is converted to fp32 one chunk of rows at a time, so the
  temporaries are bounded (about ``_CHUNK_ELEMENTS`` fp32 values), never [B, L, V].
* Truncation (top-p / top-k, ``sedd.ops.steps.TRUNCATION``) in log space too: the kept set is a
  threshold on ŝ (a step's candidate weights increase with ŝ), found per row without sorting it
  (:mod:`sedd.ops.truncation`); the stay option keeps its untruncated probability.
  :func:`truncation` gives the fused kernel the same threshold and stay-or-move decision, chunk
  by chunk.

Weights (ŝ = z + shift, ŝ[x_t] = 0; docs/math.md, "Reverse steps"):
  exp family (absorbing euler/analytic/denoise, uniform euler): candidate y has log-weight
  log c + ŝ_y; the stay/MASK option 1 − c·Σ_y e^{ŝ_y}, never chosen when ≤ 0.
  uniform analytic/denoise: candidate y ≠ x_t has weight ((e^{Δσ} − 1)/N)·(s_y − c₂S), c₂ = (1 − e^{−Δσ})/N,
  S = Σ_k s_k, clamped at 0; staying has e^{Δσ}(1 − c₂S)(e^{−Δσ} + c₂).
"""

from __future__ import annotations

import math

import torch

from sedd.graph import Graph
from sedd.ops.truncation import threshold

_TILE = 256  # columns per tile of the race; rows of at most _SINGLE_TILE columns are one tile
_SINGLE_TILE = 1024
# fp32 values per temporary in one chunk of rows: 8 MiB, cache-sized, on a CPU. On a GPU a chunk
# that small is a few dozen rows at V = 50257, hundreds of chunks of ~30 small launches per step,
# so launch overhead dominates: 128 MiB there.
_CHUNK_ELEMENTS = 1 << 21
_CUDA_CHUNK_ELEMENTS = 1 << 25
# A truncated step also keeps the threshold search's weights, bucket codes and an fp64 copy of the
# weights (sedd/ops/truncation.py) and a mask: ~30 bytes per score in all, so its chunks are
# smaller on CPU (cache-sized) and larger on a GPU (fewer launches).
_TRUNC_CHUNK_ELEMENTS = {"cpu": 1 << 19}
_TRUNC_CHUNK_ELEMENTS_DEVICE = 1 << 23


def _chunk_elements(device: torch.device) -> int:
    return _CHUNK_ELEMENTS if device.type == "cpu" else _CUDA_CHUNK_ELEMENTS


def truncating(top_p, top_k) -> bool:
    """Whether ``top_p``/``top_k`` truncate at all: ``top_p`` ≥ 1 keeps every candidate."""
    return top_k is not None or (top_p is not None and float(top_p) < 1.0)


def _trunc_rows(V: int, device: torch.device) -> int:
    return max(1, _TRUNC_CHUNK_ELEMENTS.get(device.type, _TRUNC_CHUNK_ELEMENTS_DEVICE) // V)


def reverse_step(kind: str, log_score, x_t, scalar, graph: Graph, shift=None, generator=None, top_p=None,
                 top_k=None, stats: torch.Tensor | None = None) -> torch.Tensor:
    """The next tokens [B, L] (int64) of an ``euler`` (scalar = Δt·dσ), ``analytic`` (Δσ) or
    ``denoise`` (σ) step, truncated by ``top_p``/``top_k`` when given. ``scalar``/``shift``: fp32
    [B]; ``x_t``: int64 [B, L]. ``stats`` (absorbing denoise): a [B·L, 2] fp32 buffer that
    receives each position's max_y p_y and entropy (nats) from the tiles the race reads
    (:func:`_stats`); the draws do not change."""
    B, L, V = log_score.shape
    absorbing = graph.kernel == "absorb"
    z = log_score.reshape(B * L, V)
    x = x_t.reshape(B * L)
    # per-row scalars in fp64: the log-constants of the weights
    c = scalar.double().repeat_interleave(L)
    sh = shift.repeat_interleave(L) if shift is not None else None
    tile = V if V <= _SINGLE_TILE else _TILE
    n_tiles = -(-V // tile)
    width = n_tiles * tile
    trunc = (top_p, top_k) if truncating(top_p, top_k) else None
    rows = _trunc_rows(width, z.device) if trunc else max(1, _chunk_elements(z.device) // width)
    out = torch.empty_like(x)
    for r0 in range(0, B * L, rows):
        r1 = min(B * L, r0 + rows)
        sh_c = sh[r0:r1] if sh is not None else None
        out[r0:r1] = _chunk(kind, z[r0:r1], x[r0:r1], c[r0:r1], sh_c, graph, absorbing, tile, n_tiles, generator,
                            trunc, None if stats is None else stats[r0:r1])
    return out.reshape(B, L)


def _chunk(kind, z, x, c, shift, graph, absorbing, tile, n_tiles, generator, trunc=None, stats=None):
    n, V = z.shape
    buf = torch.full((n, n_tiles * tile), -torch.inf, dtype=torch.float32, device=z.device)
    s = buf[:, :V]
    if shift is not None:
        torch.add(z, shift.unsqueeze(1), out=s)
    else:
        s.copy_(z)
    col = x.unsqueeze(1)
    uniform_tweedie = not absorbing and kind != "euler"
    if absorbing:
        s.scatter_(1, col, 0.0)  # ŝ[x_t] = 0; only MASK rows move, and MASK is never a candidate there
        s[:, graph.mask_id] = -torch.inf
    else:
        s.scatter_(1, col, -torch.inf)  # the candidates y ≠ x_t (uniform Tweedie: s_{x_t} = 1 joins S below)
    keep = None
    if trunc is not None:
        # the kept candidates, {ŝ_y ≥ thr}, before the scores are exponentiated in place
        thr = threshold(s, *trunc, _log_c2(kind, c, graph, absorbing))
        keep = buf >= thr.unsqueeze(1)
    if uniform_tweedie:
        s.scatter_(1, col, 0.0)  # s_{x_t} = 1 enters S = Σ_k s_k
    tiles = buf.view(n, n_tiles, tile)
    tmax = tiles.amax(-1)
    tmax = torch.where(torch.isfinite(tmax), tmax, 0.0)
    gap = tiles.sub_(tmax.unsqueeze(-1))  # ŝ − tile max
    if stats is None:
        tiles = gap.exp_()  # in place: weights relative to the tile maximum
    else:
        tiles = gap.exp()  # the same weights; the statistics read the gaps too (:func:`_stats`)
    tile_lse = tmax.double() + tiles.sum(-1).double().log()  # [n, T] fp64
    lse = torch.logsumexp(tile_lse, -1)  # log Σ_y s_y over the candidates (uniform tweedie: all y)

    if uniform_tweedie:
        dsig = c
        log_c1, c2 = _tweedie_constants(dsig, graph.N)
        # candidate weight ∝ e^{u_y} − c₂ with u = ŝ − lse ≤ 0, clamped at 0, x_t excluded
        scale = torch.exp(tmax.double() - lse.unsqueeze(1)).float()
        tiles.mul_(scale.unsqueeze(-1)).sub_(c2.float()[:, None, None]).clamp_min_(0)
        buf.scatter_(1, col, 0.0)
        offset = log_c1 + lse
        cand = offset.unsqueeze(1) + tiles.sum(-1).double().log()
        lc = torch.log(c2) + lse
        stay = dsig + _log1mexp(lc) + torch.log(torch.exp(-dsig) + c2)
    else:
        log_c = _log_coef(kind, c, absorbing, graph.N)
        cand = log_c.unsqueeze(1) + tile_lse
        if kind == "denoise":
            stay = torch.full_like(lse, -torch.inf)  # absorbing: every MASK is filled
        else:
            stay = _log1mexp(log_c + lse)
    if keep is not None:
        # moving keeps its untruncated probability and goes to the kept candidates only: their
        # tiles, rescaled to the whole candidate mass, race the stay option
        total = torch.logsumexp(cand, -1)
        tiles.mul_(keep.view(n, n_tiles, tile))  # (a boolean-mask fill costs ~10× this on a CPU)
        sums = tiles.sum(-1).double().log()
        kept = offset.unsqueeze(1) + sums if uniform_tweedie else log_c.unsqueeze(1) + tmax.double() + sums
        kept_total = torch.logsumexp(kept, -1)
        cand = kept + torch.where(kept_total > -torch.inf, total - kept_total, 0.0).unsqueeze(1)
    if stats is not None:
        stats.copy_(_stats(tiles, gap, tmax, x != graph.mask_id))

    options = torch.cat([cand, stay.unsqueeze(1)], dim=1)  # [n, T + 1] fp64 log-weights
    k = _race(options, generator)
    t = k.clamp_max(n_tiles - 1)
    inside = tiles[torch.arange(n, device=z.device), t]  # [n, tile] weights of the winning tile
    j = _race(torch.where(inside > 0, inside.double().log(), -torch.inf), generator)
    token = t * tile + j
    token = torch.where(k == n_tiles, x, token)
    if absorbing:
        token = torch.where(x == graph.mask_id, token, x)
    return token


def _stats(tiles: torch.Tensor, gap: torch.Tensor, tmax: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """[n, 2] fp32: max_y p_y and −Σ p log p (nats) of p ∝ the candidates' weights, from the race's
    tiles (e = e^{ŝ − tile max}, the kept ones after truncation), the gaps ŝ − tile max (consumed)
    and the tile maxima ``tmax`` [n, T]. Per tile s = Σ e and t = Σ e·gap (fp32: at most a tile of
    values in [0, 1]); relative to the row maximum M: S = Σ e^{tmax − M}s, T = Σ e^{tmax − M}(t +
    (tmax − M)s), so max p = 1/S and H = log S − T/S, in fp64 over the tiles (no cancellation: the
    leading tile has tmax = M). Rows in ``fixed`` (not MASK) and rows without a candidate: (1, 0),
    a certain token. (Summing the [n, T, tile] values in fp64, or e·log e by xlogy, cost 2× the draw
    on a CPU at [2048, 4097]: a conversion pass, and a log per element.)"""
    s_t = tiles.sum(-1).double()
    # −∞ gaps off the candidates, where e = 0: clamped so that 0·gap is 0, not NaN
    t_t = gap.clamp_min_(-1e30).mul_(tiles).sum(-1).double()
    tm = torch.where(s_t > 0, tmax.double(), -torch.inf)
    M = tm.amax(-1, keepdim=True)
    M = torch.where(torch.isfinite(M), M, 0.0)
    a = (tm - M).exp()  # 0 for an empty tile
    S = (a * s_t).sum(-1)
    T = (a * (t_t + torch.where(s_t > 0, tm - M, 0.0) * s_t)).sum(-1)
    some = (S > 0) & ~fixed
    safe = torch.where(some, S, 1.0)
    return torch.stack([torch.where(some, 1.0 / safe, 1.0), torch.where(some, safe.log() - T / safe, 0.0)], 1).float()


def _log_coef(kind, c, absorbing: bool, N: int) -> torch.Tensor:
    """log of the candidates' common factor in the exp family (fp64 [n]): Euler Δt·dσ (/N uniform),
    absorbing analytic e^{Δσ} − 1, absorbing denoise 1."""
    if kind == "euler":
        return torch.log(c) - (0.0 if absorbing else math.log(N))
    if kind == "analytic":
        return torch.log(torch.expm1(c))
    return torch.zeros_like(c)


def _log_c2(kind, c, graph: Graph, absorbing: bool):
    """Uniform analytic / denoise: log c₂ (fp64 [n]) for the truncation's weights; else None."""
    if absorbing or kind == "euler":
        return None
    return torch.log(_tweedie_constants(c, graph.N)[1])


def _tweedie_constants(dsig, N: int):
    """Uniform analytic / denoise, Δσ fp64 [n]: log((e^{Δσ} − 1)/N) and c₂ = (1 − e^{−Δσ})/N."""
    return torch.log(torch.expm1(dsig) / N), -torch.expm1(-dsig) / N


def truncation(kind: str, log_score, x_t, scalar, graph: Graph, shift, top_p, top_k, generator) -> torch.Tensor:
    """What the fused kernel needs for a truncated step: [B, L, 2] fp32, per position the ŝ
    threshold of the kept candidates and 1 to move / 0 to stay, drawn with the untruncated stay
    probability (a U[0, 1) fp64 per position from ``generator``). Arguments as
    :func:`reverse_step`; rows in chunks, so the threshold search's temporaries stay bounded."""
    B, L, V = log_score.shape
    absorbing = graph.kernel == "absorb"
    z = log_score.reshape(B * L, V)
    x = x_t.reshape(B * L)
    c = scalar.double().repeat_interleave(L)
    sh = shift.repeat_interleave(L) if shift is not None else None
    u = torch.rand(B * L, generator=generator, device=z.device, dtype=torch.float64)
    out = torch.empty(B * L, 2, dtype=torch.float32, device=z.device)
    rows = _trunc_rows(V, z.device)
    for r0 in range(0, B * L, rows):
        r1 = min(B * L, r0 + rows)
        s = _shifted(z[r0:r1], None if sh is None else sh[r0:r1], torch.float32)
        s.scatter_(1, x[r0:r1].unsqueeze(1), -torch.inf)  # absorbing: x_t is MASK on every row that moves
        if absorbing:
            s[:, graph.mask_id] = -torch.inf
        out[r0:r1, 0] = threshold(s, top_p, top_k, _log_c2(kind, c[r0:r1], graph, absorbing))
        log_stay = _stay_share(kind, s, c[r0:r1], graph, absorbing)
        out[r0:r1, 1] = (u[r0:r1] >= log_stay.exp()).float()
        del s
    return out.reshape(B, L, 2)


def _stay_share(kind, s, c, graph: Graph, absorbing: bool) -> torch.Tensor:
    """log P(stay) of the untruncated step (fp64 [n]) from the candidates' scores ``s`` (−∞ off
    them; consumed), with the eager step's weights: stay vs the candidates' total, in log space."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = s.sub_(m).exp_()  # in [0, 1]
    lse = m.squeeze(1).double() + e.sum(-1, dtype=torch.float64).log()  # log Σ_{candidates} e^{ŝ}
    if not absorbing and kind != "euler":
        log_c1, c2 = _tweedie_constants(c, graph.N)
        lse = torch.logaddexp(lse, torch.zeros_like(lse))  # S includes s_{x_t} = 1
        scale = torch.exp(m.squeeze(1).double() - lse).float()
        mass = e.mul_(scale.unsqueeze(1)).sub_(c2.float().unsqueeze(1)).clamp_min_(0).sum(-1, dtype=torch.float64)
        cand = log_c1 + lse + mass.log()
        stay = c + _log1mexp(torch.log(c2) + lse) + torch.log(torch.exp(-c) + c2)
    else:
        cand = _log_coef(kind, c, absorbing, graph.N) + lse
        stay = torch.full_like(lse, -torch.inf) if kind == "denoise" else _log1mexp(cand)
    return stay - torch.logaddexp(stay, cand)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − e^a) for a < 0, −inf for a ≥ 0 (a weight ≤ 0 is never chosen)."""
    safe = a.clamp_max(-1e-300)
    return torch.where(a < 0, torch.where(safe > -0.6931, torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe))), -torch.inf)


def _race(log_weights: torch.Tensor, generator) -> torch.Tensor:
    """argmax_y (log w_y − log E_y), E ~ Exp(1) in fp64: one categorical draw per row."""
    noise = torch.empty(log_weights.shape, dtype=torch.float64, device=log_weights.device)
    noise.exponential_(generator=generator)
    return (log_weights.double() - noise.log_()).argmax(-1)


# ---------------------------------------------------------------------------------------------
# Score entropy: chunked forward, gradient recomputed chunk by chunk in the backward
# ---------------------------------------------------------------------------------------------
#
# Autograd through sedd.ops.reference keeps several [B, L, V] fp32 tensors alive until the backward
# (the fp32 copy of a bf16 input, e^ŝ, masks). Here the forward keeps nothing but its inputs and
# the backward writes ∂ℓ/∂log_score straight into one buffer of the input's dtype, working on
# chunks of rows in fp32 (fp64 for fp64 input); the row sums of the uniform loss accumulate in
# fp64. Only log_score gets a gradient (σ, shift and weight depend on the noise, not on trained
# parameters), as on the Triton backend. Higher-order gradients (create_graph=True) recompute the
# loss through the differentiable reference formulas.


def score_entropy(log_score, sigma, x_t, x0, graph: Graph, shift=None, weight=None, reduction="none"):
    """ℓ [B, L] (reduction "none"), or its sum / sum over B; weighted by ``weight`` [B] when given.
    fp32 (fp64 for fp64 input); ``sigma``/``shift``/``weight``: fp32 [B]; ids int64."""
    return _ScoreEntropy.apply(log_score, sigma, x_t, x0, graph, shift, weight, reduction)


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _active_rows(graph, x):
    """Absorbing on CPU: the indices of the MASK rows, the only ones with a loss (others are 0).
    Elsewhere None (every row): finding them is a host sync on a GPU, and a data-dependent shape
    under torch.compile."""
    if graph.kernel == "absorb" and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return (x == graph.mask_id).nonzero().squeeze(1)
    return None


def _index_chunks(rows, n_rows: int, V: int, device: torch.device):
    """Row selectors (slices, or index tensors into ``rows``) of at most :func:`_chunk_elements` values."""
    step = max(1, _chunk_elements(device) // V)
    if rows is None:
        for r0 in range(0, n_rows, step):
            yield slice(r0, min(n_rows, r0 + step))
    else:
        for r0 in range(0, rows.numel(), step):
            yield rows[r0 : r0 + step]


def _shifted(z, shift, dtype, out=None):
    """z + shift for a chunk of rows [n, V] in ``dtype``, in ``out`` or a fresh buffer."""
    s = torch.empty(z.shape, dtype=dtype, device=z.device) if out is None else out
    if shift is not None:
        return torch.add(z, shift.unsqueeze(1), out=s)
    return s.copy_(z)


def _scores(z, x, shift, dtype):
    """ŝ for a chunk of rows [n, V] in ``dtype``: z + shift with ŝ[x_t] = 0 (a fresh buffer)."""
    return _shifted(z, shift, dtype).scatter_(1, x.unsqueeze(1), 0.0)


def _constants(graph, sigma, x, x0, dtype):
    """Per-row constants of the loss, in fp64: absorbing r = 1/E; uniform E, ρ and the constant term."""
    sig = sigma.double()
    E = torch.where(sig < 0.5, torch.expm1(sig), torch.exp(sig) - 1)
    if graph.kernel == "absorb":
        r = 1.0 / E
        return {"r": r, "const": r * (torch.log(r) - 1)}
    N = graph.N
    rho = E / (E + N)
    stay = x == x0
    const = torch.where(stay, (N - 1) / N * rho * (torch.log(rho) - 1), ((-torch.log(rho) - 1) / rho - (N - 2)) / N)
    return {"E": E, "rho": rho, "stay": stay, "const": const}


def _loss_rows(graph, s, x, x0, k):
    """Per-row ℓ [n] (fp64) of a chunk of scores s (consumed: exponentiated in place)."""
    s_x0 = s.gather(1, x0.unsqueeze(1)).squeeze(1).double()
    if graph.kernel == "absorb":
        M = graph.mask_id
        pos = s[:, :M].exp_().sum(-1).double()
        loss = pos - k["r"] * s_x0 + k["const"]
        return torch.where(x == M, loss, torch.zeros_like(loss))
    N = graph.N
    neg0 = s.sum(-1).double() / N  # ŝ[x_t] = 0: the sum over y ≠ x_t
    e = s.exp_().scatter_(1, x.unsqueeze(1), 0.0)
    pos = e.sum(-1).double() / N
    neg = torch.where(k["stay"], k["rho"] * neg0, neg0 + s_x0 / k["E"])
    return pos - neg + k["const"]


def _grad_rows(graph, s, x, x0, k, scale, out=None, mask_rows_only=False):
    """∂(Σ scale·ℓ)/∂ŝ for a chunk from s = z + shift [n, V] (consumed; ŝ[x_t] need not be 0 yet).
    Uniform writes it into ``out`` when given (any float dtype, cast in the last pass); returns
    the tensor that holds it. ``mask_rows_only``: absorbing, every row of the chunk is MASK."""
    scale = scale.to(s.dtype).unsqueeze(1)
    e = s.exp_()
    if graph.kernel == "absorb":
        M = graph.mask_id
        e[:, M] = 0
        # e^{ŝ_{x0}} − r from the fp32 value itself (the two nearly cancel at the optimum)
        # (x_t = M on the rows with a loss, so ŝ[x_t] = 0 plays no part)
        e.scatter_add_(1, x0.unsqueeze(1), (-k["r"]).to(s.dtype).unsqueeze(1))
        e.mul_(scale)
        # rows that are not MASK have no loss: exactly 0 there, even where e^ŝ overflowed
        return e if mask_rows_only else e.masked_fill_((x != M).unsqueeze(1), 0.0)
    N = graph.N
    c = torch.where(k["stay"], k["rho"], torch.ones_like(k["rho"])).to(s.dtype).unsqueeze(1)
    # a moved token's extra −1/E at x0, on the e^ŝ scale (× N) so one pass below does the rest
    moved = torch.where(k["stay"], torch.zeros_like(k["E"]), -N / k["E"]).to(s.dtype).unsqueeze(1)
    e.scatter_add_(1, x0.unsqueeze(1), moved)
    dest = e if out is None else out
    torch.addcmul(-(c * scale / N), e, scale / N, out=dest)  # (e^ŝ − c)·scale/N, cast to dest's dtype
    return dest.scatter_(1, x.unsqueeze(1), 0.0)


class _ScoreEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_score, sigma, x_t, x0, graph, shift, weight, reduction):
        B, L, V = log_score.shape
        dtype = _compute_dtype(log_score)
        z, x, y = log_score.reshape(B * L, V), x_t.reshape(-1), x0.reshape(-1)
        sig = sigma.repeat_interleave(L)
        sh = shift.repeat_interleave(L) if shift is not None else None
        k = _constants(graph, sig, x, y, dtype)
        rows = _active_rows(graph, x)
        loss = torch.zeros(B * L, dtype=torch.float64, device=log_score.device)
        for idx in _index_chunks(rows, B * L, V, log_score.device):
            kc = {name: v[idx] for name, v in k.items()}
            s = _scores(z[idx], x[idx], None if sh is None else sh[idx], dtype)
            loss[idx] = _loss_rows(graph, s, x[idx], y[idx], kc)
        loss = loss.reshape(B, L)
        if weight is not None:
            loss = loss * weight.double().unsqueeze(1)
        ctx.graph, ctx.reduction = graph, reduction
        ctx.save_for_backward(log_score, sigma, x_t, x0, shift, weight)
        loss = loss.to(dtype)
        if reduction == "sum":
            return loss.sum()
        if reduction == "batchmean":
            return loss.sum() / B
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        log_score, sigma, x_t, x0, shift, weight = ctx.saved_tensors
        graph, reduction = ctx.graph, ctx.reduction
        B, L, V = log_score.shape
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference formulas
            from sedd.ops import reference

            loss = reference.score_entropy(log_score, sigma, x_t, x0, graph, shift)
            if weight is not None:
                loss = loss * weight.to(loss.dtype).unsqueeze(-1)
            loss = loss.sum() if reduction == "sum" else loss.sum() / B if reduction == "batchmean" else loss
            (grad,) = torch.autograd.grad(loss, log_score, grad_output, create_graph=True)
            return grad, None, None, None, None, None, None, None
        dtype = _compute_dtype(log_score)
        if reduction == "none":
            per_token = grad_output.reshape(B * L).to(torch.float64)
        else:
            g = grad_output.to(torch.float64) / (B if reduction == "batchmean" else 1)
            per_token = g.expand(B * L)
        if weight is not None:
            per_token = per_token * weight.double().repeat_interleave(L)
        z, x, y = log_score.reshape(B * L, V), x_t.reshape(-1), x0.reshape(-1)
        sig = sigma.repeat_interleave(L)
        sh = shift.repeat_interleave(L) if shift is not None else None
        k = _constants(graph, sig, x, y, dtype)
        rows = _active_rows(graph, x)
        alloc = torch.empty_like if rows is None else torch.zeros_like
        grad = alloc(log_score, memory_format=torch.contiguous_format)
        flat = grad.view(B * L, V)
        for idx in _index_chunks(rows, B * L, V, log_score.device):
            kc = {name: v[idx] for name, v in k.items()}
            # where the rows are a slice of the gradient, it is written there directly: computed in
            # place (same dtype), or by the last pass (uniform, bf16/fp16)
            in_place = isinstance(idx, slice) and flat.dtype == dtype
            last_pass = isinstance(idx, slice) and not in_place and graph.kernel == "uniform"
            s = _shifted(z[idx], None if sh is None else sh[idx], dtype, out=flat[idx] if in_place else None)
            g = _grad_rows(graph, s, x[idx], y[idx], kc, per_token[idx], out=flat[idx] if last_pass else None,
                           mask_rows_only=rows is not None)
            if not (in_place or last_pass):
                flat[idx] = g.to(flat.dtype)
        return grad, None, None, None, None, None, None, None
