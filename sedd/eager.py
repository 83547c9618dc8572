"""The fast eager (torch) reverse steps for the two built-in graphs: the CPU path behind sedd.ops.

:mod:`sedd.reference` spells the math out (weights over [B, L, V], normalised, then an fp64
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

Weights (ŝ = z + shift, ŝ[x_t] = 0; see sedd-math.md, "Samplers"):
  exp family (absorbing euler/analytic/denoise, uniform euler): candidate y has log-weight
  log c + ŝ_y; the stay/MASK option 1 − c·Σ_y e^{ŝ_y}, never chosen when ≤ 0.
  uniform analytic/denoise: candidate y ≠ x_t has weight ((e^{Δσ} − 1)/N)·(s_y − c₂S), c₂ = (1 − e^{−Δσ})/N,
  S = Σ_k s_k, clamped at 0; staying has e^{Δσ}(1 − c₂S)(e^{−Δσ} + c₂).
"""

from __future__ import annotations

import math

import torch

from sedd.graph import Graph

_CHUNK_ELEMENTS = 1 << 21  # fp32 values in one chunk of rows (8 MiB), per temporary
_TILE = 256  # columns per tile of the race; rows of at most _SINGLE_TILE columns are one tile
_SINGLE_TILE = 1024


def reverse_step(kind: str, log_score, x_t, scalar, graph: Graph, shift=None, generator=None) -> torch.Tensor:
    """The next tokens [B, L] (int64) of an ``euler`` (scalar = Δt·dσ), ``analytic`` (Δσ) or
    ``denoise`` (σ) step. ``scalar``/``shift``: fp32 [B]; ``x_t``: int64 [B, L]."""
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
    rows = max(1, _CHUNK_ELEMENTS // width)
    out = torch.empty_like(x)
    for r0 in range(0, B * L, rows):
        r1 = min(B * L, r0 + rows)
        sh_c = sh[r0:r1] if sh is not None else None
        out[r0:r1] = _chunk(kind, z[r0:r1], x[r0:r1], c[r0:r1], sh_c, graph, absorbing, tile, n_tiles, generator)
    return out.reshape(B, L)


def _chunk(kind, z, x, c, shift, graph, absorbing, tile, n_tiles, generator):
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
    elif uniform_tweedie:
        s.scatter_(1, col, 0.0)  # s_{x_t} = 1 enters S = Σ_k s_k
    else:
        s.scatter_(1, col, -torch.inf)  # euler: Σ over y ≠ x_t only
    tiles = buf.view(n, n_tiles, tile)
    tmax = tiles.amax(-1)
    tmax = torch.where(torch.isfinite(tmax), tmax, 0.0)
    tiles.sub_(tmax.unsqueeze(-1)).exp_()  # in place: weights relative to the tile maximum
    tile_lse = tmax.double() + tiles.sum(-1).double().log()  # [n, T] fp64
    lse = torch.logsumexp(tile_lse, -1)  # log Σ_y s_y over the candidates (uniform tweedie: all y)

    if uniform_tweedie:
        N = graph.N
        dsig = c
        log_c1 = torch.log(torch.expm1(dsig) / N)
        c2 = -torch.expm1(-dsig) / N
        # candidate weight ∝ e^{u_y} − c₂ with u = ŝ − lse ≤ 0, clamped at 0, x_t excluded
        scale = torch.exp(tmax.double() - lse.unsqueeze(1)).float()
        tiles.mul_(scale.unsqueeze(-1)).sub_(c2.float()[:, None, None]).clamp_min_(0)
        buf.scatter_(1, col, 0.0)
        cand = log_c1.unsqueeze(1) + lse.unsqueeze(1) + tiles.sum(-1).double().log()
        lc = torch.log(c2) + lse
        stay = dsig + _log1mexp(lc) + torch.log(torch.exp(-dsig) + c2)
    else:
        if kind == "euler":
            log_c = torch.log(c) - (0.0 if absorbing else math.log(graph.N))
        elif kind == "analytic":
            log_c = torch.log(torch.expm1(c))
        else:
            log_c = torch.zeros_like(c)
        cand = log_c.unsqueeze(1) + tile_lse
        if kind == "denoise":
            stay = torch.full_like(lse, -torch.inf)  # absorbing: every MASK is filled
        else:
            stay = _log1mexp(log_c + lse)

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


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − e^a) for a < 0, −inf for a ≥ 0 (a weight ≤ 0 is never chosen)."""
    safe = a.clamp_max(-1e-300)
    return torch.where(a < 0, torch.where(safe > -0.6931, torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe))), -torch.inf)


def _race(log_weights: torch.Tensor, generator) -> torch.Tensor:
    """argmax_y (log w_y − log E_y), E ~ Exp(1) in fp64: one categorical draw per row."""
    noise = torch.empty(log_weights.shape, dtype=torch.float64, device=log_weights.device)
    noise.exponential_(generator=generator)
    return (log_weights.double() - noise.log_()).argmax(-1)
