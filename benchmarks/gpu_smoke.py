"""Device check, stage 2: every kernel against ``sedd/ops/reference.py`` at the width it runs at.

    PYTHONPATH=. python3 -m benchmarks.gpu_smoke --out benchmarks/results/smoke.json

On CUDA: GPT-2 widths (V = 50258 absorbing, 50257 uniform), 4096 rows (4 × 1024) of bf16 raw
scores with the model's score shift. On CPU (``--dry-run`` of the device check) the same checks
at V ≈ 130 through Triton's interpreter, so this file cannot rot.

Checks, each recorded as it finishes (one failing check does not stop the others):
- score entropy, per graph: the loss (batchmean, fused loss + gradient), the gradient, the
  in-place gradient, reduction "none" (its separate backward kernel), and ``(loss * 0.37)
  .backward()`` (the scale kernel's multiply), against the reference in fp64 through ``ops``'
  torch backend;
- the fused head (``linear_score_entropy``, the training loss's default): loss and the
  gradients of hidden, weight and bias against the logits path in fp64; absorbing, also the
  sync-free head (every row, ``ops.sync_free``) against the same;
- the autoregressive baseline: its fused head (``linear_cross_entropy``: loss and gradients,
  padding rows gathered and sync-free) against the logits path in fp64, and a two-block
  ``ARModel``'s causal attention on the "auto" backend (flash-attn on CUDA) against SDPA with
  packed documents and padding, and its KV-cached steps against the forward;
- forward noising: the move rate per row within 5 standard deviations;
- reverse steps (Euler, analytic, denoise) per graph: one peaked row repeated ``draws`` times,
  the draws against the reference probabilities (χ², p > 1e-4; computed here without scipy,
  which the GPU image lacks), and at scale: absorbing steps keep unmasked positions, denoise
  leaves no MASK;
- truncated steps (all six), ``top_k = 40`` and ``top_p = 0.9``: the draws against the reference
  truncation of the same probabilities; ``truncation_keep(top_p=1.0)`` (and 0.9) on the device
  against the CPU, and top_p = 1 keeping every candidate;
- 65536 rows (64 × 1024, element offsets past 2^31): the last rows of the fused loss + gradient
  against the reference on those rows, and an Euler + denoise step keeping the fixed positions.
Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from benchmarks import common
from sedd import ops
from sedd.graph import get_graph
from sedd.ops import reference

if common.CUDA:
    N, B, L, DRAWS = 50257, 4, 1024, 1 << 14
    BIG = (64, 1024)  # 65536 rows: element offsets pass 2^31 after row 42732
else:
    N, B, L, DRAWS = 64, 2, 16, 1 << 8
    BIG = (4, 16)
DEVICE = common.DEVICE
SIGMAS = [1e-3, 0.3, 2.0, 10.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(seed)


def chi2_pvalue(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of integer draws against categorical probabilities; cells expecting fewer
    than 5 draws are pooled. A draw of a zero-probability outcome fails outright."""
    probs = probs.double().flatten().cpu()
    counts = torch.bincount(draws.flatten().cpu(), minlength=probs.numel()).double()
    zero = probs <= 0
    if counts[zero].sum() > 0:
        raise AssertionError(f"drew zero-probability outcomes {torch.nonzero(counts * zero).flatten()[:5].tolist()}")
    expected = probs / probs.sum() * counts.sum()
    big, small = expected >= 5, (expected < 5) & ~zero
    obs, exp = [counts[big]], [expected[big]]
    if small.any():
        obs.append(counts[small].sum()[None])
        exp.append(expected[small].sum()[None])
    obs, exp = torch.cat(obs), torch.cat(exp)
    if obs.numel() < 2:
        return 1.0
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((obs.numel() - 1) / 2, dtype=torch.float64), stat / 2))


def _loss_inputs(graph):
    g = _gen(0)
    z = (torch.randn(B, L, graph.dim, device=DEVICE, generator=g) * 2).to(torch.bfloat16)
    sigma = torch.tensor((SIGMAS * B)[:B], device=DEVICE)
    x0 = torch.randint(0, graph.N, (B, L), device=DEVICE, generator=g)
    x_t = reference.sample_transition(x0, sigma, graph, g)
    shift = graph.score_shift(sigma)
    weight = torch.rand(B, device=DEVICE, generator=g) + 0.5
    return z, sigma, x_t, x0, shift, weight


def _loss_and_grad(backend, graph, inputs, reduction, inplace=False, grad_out=None):
    z, sigma, x_t, x0, shift, weight = inputs
    w = z.clone().requires_grad_()
    with ops.use_backend(backend):
        scores = w * 1 if backend == "triton" else w.double()  # a non-leaf, as a model's output is
        loss = ops.score_entropy(scores, sigma, x_t, x0, graph, shift=shift, weight=weight,
                                 reduction=reduction, inplace_backward=inplace)
        used = ops.last_backend()
    if used != backend:
        raise AssertionError(f"ran on backend {used!r}, not {backend!r}")
    (loss * grad_out if grad_out is not None else loss).sum().backward()
    return loss.detach().double(), w.grad.double()


def _close(name, got, want, rtol, atol_scale) -> str:
    scale = float(want[want.isfinite()].abs().max()) if want.numel() else 1.0
    atol = atol_scale * max(scale, 1e-30)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")
    err = float(((got - want).abs() / (atol + rtol * want.abs())).nan_to_num(0).max())
    return f"{name} max err {err:.2g} of tolerance"


def score_entropy_checks(graph_name):
    graph = get_graph(graph_name, N)
    inputs = _loss_inputs(graph)
    want_loss, want_grad = _loss_and_grad("torch", graph, inputs, "batchmean")

    def batchmean(inplace):
        def check():
            loss, grad = _loss_and_grad("triton", graph, inputs, "batchmean", inplace)
            return "; ".join([_close("loss", loss, want_loss, 1e-4, 1e-5),
                              _close("gradient", grad, want_grad, 1.6e-2, 1.6e-2)])

        return check

    def per_token():
        grad_out = torch.rand(B, L, device=DEVICE, generator=_gen(5))
        want = _loss_and_grad("torch", graph, inputs, "none", grad_out=grad_out)
        loss, grad = _loss_and_grad("triton", graph, inputs, "none", grad_out=grad_out)
        return "; ".join([_close("loss", loss, want[0], 1e-4, 1e-5), _close("gradient", grad, want[1], 1.6e-2, 1.6e-2)])

    def scaled():
        c = torch.tensor(0.37, device=DEVICE)  # a non-unit incoming gradient: the scale kernel multiplies
        want = _loss_and_grad("torch", graph, inputs, "batchmean", grad_out=c)
        loss, grad = _loss_and_grad("triton", graph, inputs, "batchmean", grad_out=c)
        return "; ".join([_close("loss", loss, want[0], 1e-4, 1e-5), _close("gradient", grad, want[1], 1.6e-2, 1.6e-2)])

    shape = [B, L, graph.dim]
    yield f"score entropy {graph_name} loss + gradient (batchmean)", shape, batchmean(False)
    yield f"score entropy {graph_name} loss + in-place gradient (batchmean)", shape, batchmean(True)
    yield f"score entropy {graph_name} per token + backward (none)", shape, per_token
    yield f"score entropy {graph_name} (loss * 0.37).backward(): scale kernel", shape, scaled


def fused_head_check(graph_name):
    """``ops_linear.linear_score_entropy`` (the training loss's default head: the output matmul
    fused with the loss, chunked over rows) against the logits path in fp64 on the same bf16
    values. Tolerances allow for the bf16 logits the fused path works from."""
    from sedd.ops.linear import linear_score_entropy

    graph = get_graph(graph_name, N)
    D = 768 if common.CUDA else 32

    def check():
        g = _gen(9)
        hidden = torch.randn(2, L, D, device=DEVICE, generator=g).to(torch.bfloat16)
        weight = (torch.randn(graph.dim, D, device=DEVICE, generator=g) * D**-0.5).to(torch.bfloat16)
        bias = (torch.randn(graph.dim, device=DEVICE, generator=g) * 0.1).to(torch.bfloat16)
        sigma = torch.tensor([0.05, 1.5], device=DEVICE)
        x0 = torch.randint(0, graph.N, (2, L), device=DEVICE, generator=g)
        x_t = reference.sample_transition(x0, sigma, graph, g)
        shift, dsigma = graph.score_shift(sigma), torch.tensor([2.0, 0.7], device=DEVICE)

        def run(backend, sync_free=False):
            leaves = [t.clone().double() if backend == "torch" else t.clone() for t in (hidden, weight, bias)]
            for t in leaves:
                t.requires_grad_()
            with ops.use_backend(backend), ops.sync_free(sync_free):
                if backend == "torch":  # the unfused logits path
                    logits = leaves[0] @ leaves[1].T + leaves[2]
                    loss = ops.score_entropy(logits, sigma, x_t, x0, graph, shift=shift, weight=dsigma, reduction="batchmean")
                else:
                    loss = linear_score_entropy(*leaves, sigma, x_t, x0, graph, shift=shift, loss_weight=dsigma,
                                                reduction="batchmean")
            loss.backward()
            return loss.detach().double(), [t.grad.double() for t in leaves]

        want_loss, want_grads = run("torch")
        parts = []
        # absorbing: the MASK rows gathered (a host sync), and every row under sync_free
        for sync_free in (False, True) if graph.absorbing else (False,):
            loss, grads = run("triton", sync_free)
            tag = " (sync-free, every row)" if sync_free else ""
            parts.append(_close("loss" + tag, loss, want_loss, 2e-2, 1e-6))
            for name, got, want in zip(("∂hidden", "∂weight", "∂bias"), grads, want_grads):
                parts.append(_close(name + tag, got, want, 5e-2, 5e-2))
        return "; ".join(parts)

    yield f"fused head (linear score entropy) {graph_name}", [2, L, D, graph.dim], check


def ar_checks():
    """The autoregressive baseline: ``linear_cross_entropy`` (its training loss's head) against
    the logits path in fp64 on the same bf16 values, every row and with padding rows (gathered,
    and sync-free); and a two-block ``ARModel`` with packed documents and padding, its causal
    attention on the "auto" backend (flash-attn's varlen kernel on CUDA when installed) against
    SDPA's mask, and its KV-cached steps against the forward."""
    from sedd.model import ARModel

    D = 768 if common.CUDA else 32

    def head():
        g = _gen(11)
        hidden = torch.randn(2, L, D, device=DEVICE, generator=g).to(torch.bfloat16)
        weight = (torch.randn(N, D, device=DEVICE, generator=g) * D**-0.5).to(torch.bfloat16)
        bias = (torch.randn(N, device=DEVICE, generator=g) * 0.1).to(torch.bfloat16)
        targets = torch.randint(0, N, (2, L), device=DEVICE, generator=g)
        mask = torch.ones(2, L, dtype=torch.bool, device=DEVICE)
        mask[1, L // 3 :] = False
        parts = []
        for tag, m, sync_free in (("", None, False), (" (padding gathered)", mask, False),
                                  (" (padding, sync-free)", mask, True)):
            leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            with ops.sync_free(sync_free):
                loss = ops.linear_cross_entropy(*leaves, targets, mask=m)
            loss.backward()
            ref = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
            logits = ref[0] @ ref[1].T + ref[2]
            want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            want = (want if m is None else want * m).sum() / 2
            want.backward()
            parts.append(_close("loss" + tag, loss.detach().double(), want.detach(), 2e-2, 1e-6))
            for name, a, b in zip(("∂hidden", "∂weight", "∂bias"), leaves, ref):
                parts.append(_close(name + tag, a.grad.double(), b.grad, 5e-2, 5e-2))
        return "; ".join(parts)

    def model():
        torch.manual_seed(12)
        net = ARModel(ARModel.config_for("small" if common.CUDA else "cpu", tokens=N, n_blocks=2, hidden_size=D,
                                         n_heads=12 if common.CUDA else 4))
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.02)
        net = net.to(DEVICE).eval()
        x = torch.randint(0, N, (2, L), device=DEVICE, generator=_gen(13))
        segments = (torch.arange(L, device=DEVICE) >= L // 2).long().expand(2, L)
        mask = torch.ones(2, L, dtype=torch.bool, device=DEVICE)
        mask[0, : L // 4] = False  # padding on the left of one row
        parts = []
        with torch.no_grad():
            for tag, kw in (("", {}), (" documents", {"segment_ids": segments}), (" padding", {"attention_mask": mask})):
                net.attn_backend = "sdpa"
                want = net(x, **kw).double()
                net.attn_backend = "auto"
                got = net(x, **kw).double()
                rows = mask if tag == " padding" else torch.ones_like(mask)
                parts.append(_close(f"auto vs sdpa{tag}", got[rows], want[rows], 2e-2, 2e-2))
            inputs = torch.cat([torch.full((2, 1), net.bos_id, device=DEVICE), x[:, :-1]], dim=1)
            cache = net.new_cache(2, L, DEVICE)
            steps = [net.step(inputs[:, : L // 2], cache)] + [net.step(inputs[:, i : i + 1], cache)
                                                              for i in range(L // 2, L)]
            parts.append(_close("cached steps vs forward", torch.cat(steps, 1).double(), net(x).double(), 2e-2, 2e-2))
        return f"backend {net.resolved_attn_backend(torch.device(DEVICE))}: " + "; ".join(parts)

    yield "autoregressive fused head (linear cross entropy)", [2, L, D, N], head
    yield "autoregressive model: causal attention backends, KV cache", [2, L, D, N], model


def noising_check(graph_name):
    graph = get_graph(graph_name, N)
    length = 1 << (16 if common.CUDA else 12)
    sigma = torch.tensor([1e-4, 0.01, 0.3, 1.0, 3.0, 20.0], device=DEVICE)

    def check():
        x0 = torch.randint(0, N, (len(sigma), length), device=DEVICE, generator=_gen(1))
        with ops.use_backend("triton"):
            x_t = ops.sample_transition(x0, sigma, graph, _gen(1))
        changed = (x_t != x0).double().mean(1)
        p_move = -torch.expm1(-sigma.double())
        p_change = p_move if graph.absorbing else p_move * (N - 1) / N
        sd = (p_change * (1 - p_change) / length).sqrt()
        worst = float(((changed - p_change).abs() / (sd + 1e-12)).max())
        if worst > 5:
            raise AssertionError(f"move rate off by {worst:.1f} sd: {changed.tolist()} vs {p_change.tolist()}")
        if graph.absorbing and not ((x_t == x0) | (x_t == graph.mask_id)).all():
            raise AssertionError("absorbing noising produced a token other than x0 or MASK")
        return f"worst rate deviation {worst:.2f} sd"

    yield f"forward noising {graph_name}", [len(sigma), length], check


def _step(kind, z, x_t, scalar, graph, gen, **trunc):
    if kind == "euler":
        return ops.euler_step(z, x_t, scalar, 0.5, graph, gen, **trunc)
    if kind == "analytic":
        return ops.analytic_step(z, x_t, scalar, graph, gen, **trunc)
    return ops.denoise_step(z, x_t, scalar, graph, gen, **trunc)


def _peaked_row(graph, g):
    row = torch.randn(graph.dim, device=DEVICE, generator=g) * 3 - 4  # a peaked row with a long tail
    row[torch.randint(0, N, (40,), device=DEVICE, generator=g)] += 6
    return row


def reverse_step_checks(graph_name):
    graph = get_graph(graph_name, N)
    V = graph.dim
    for kind in ("euler", "analytic", "denoise"):

        def draws(kind=kind):
            g = _gen(2)
            row = _peaked_row(graph, g)
            x_cur = graph.mask_id if graph.absorbing else 17
            z = row.expand(1, DRAWS, V).to(torch.bfloat16)
            x_t = torch.full((1, DRAWS), x_cur, device=DEVICE)
            scalar = torch.tensor([1e-3 if kind == "denoise" else 0.05], device=DEVICE)
            with ops.use_backend("triton"):
                out = _step(kind, z, x_t, scalar, graph, g)
            probs_fn = {"euler": reference.euler_probs, "analytic": reference.analytic_probs,
                        "denoise": reference.denoise_probs}[kind]
            args = (scalar, 0.5) if kind == "euler" else (scalar,)
            probs = probs_fn(z[:, :1], x_t[:, :1], *args, graph).reshape(V)
            p = chi2_pvalue(out, probs)
            if p <= 1e-4:
                raise AssertionError(f"χ² p-value {p:.2g} ≤ 1e-4")
            if kind == "denoise" and graph.absorbing and (out == graph.mask_id).any():
                raise AssertionError("denoise returned MASK")
            return f"χ² p = {p:.3g} over {DRAWS} draws"

        yield f"reverse step {graph_name} {kind}: draws vs reference", [DRAWS, V], draws

    def at_scale():
        g = _gen(3)
        z = torch.randn(B, L, V, device=DEVICE, generator=g).to(torch.bfloat16)
        shift = graph.score_shift(torch.full((B,), 1.0, device=DEVICE))
        x_t = torch.randint(0, graph.N, (B, L), device=DEVICE, generator=g)
        if graph.absorbing:
            x_t[torch.rand(B, L, device=DEVICE, generator=g) < 0.5] = graph.mask_id
        fixed = x_t != graph.mask_id if graph.absorbing else torch.zeros_like(x_t, dtype=torch.bool)
        with ops.use_backend("triton"):
            out = ops.analytic_step(z, x_t, torch.full((B,), 0.05, device=DEVICE), graph, g, shift=shift)
            final = ops.denoise_step(z, out, torch.full((B,), 1e-3, device=DEVICE), graph, g, shift=shift)
        for name, ids in (("analytic", out), ("denoise", final)):
            if not ((ids >= 0) & (ids < V)).all():
                raise AssertionError(f"{name} step produced ids outside [0, {V})")
            if not torch.equal(ids[fixed], x_t[fixed]):
                raise AssertionError(f"{name} step moved an unmasked position")
        if graph.absorbing and (final == graph.mask_id).any():
            raise AssertionError("denoise left a MASK")
        return f"{int((~fixed).sum())} of {B * L} positions free to move"

    yield f"reverse step {graph_name} analytic + denoise at scale", [B, L, V], at_scale


def truncated_step_checks(graph_name):
    """Each truncated step, top_k = 40 then top_p = 0.9, on one peaked row repeated ``DRAWS``
    times: the draws against ``reference.truncate`` of the reference probabilities (a token
    outside the kept set fails outright)."""
    graph = get_graph(graph_name, N)
    V = graph.dim
    for kind in ("euler", "analytic", "denoise"):

        def draws(kind=kind):
            g = _gen(12)
            z = _peaked_row(graph, g).expand(1, DRAWS, V).to(torch.bfloat16)
            x_t = torch.full((1, DRAWS), graph.mask_id if graph.absorbing else 17, device=DEVICE)
            scalar = torch.tensor([1e-3 if kind == "denoise" else 0.05], device=DEVICE)
            probs_fn = {"euler": reference.euler_probs, "analytic": reference.analytic_probs,
                        "denoise": reference.denoise_probs}[kind]
            args = (scalar, 0.5) if kind == "euler" else (scalar,)
            probs = probs_fn(z[:, :1], x_t[:, :1], *args, graph)
            parts = []
            for trunc in (dict(top_k=40), dict(top_p=0.9)):
                with ops.use_backend("triton"):
                    out = _step(kind, z, x_t, scalar, graph, g, **trunc)
                want = reference.truncate(probs, x_t[:, :1], **trunc).reshape(V)
                kept = int((want > 0).sum())
                if kept >= V - 1:
                    raise AssertionError(f"{trunc} kept every candidate: nothing truncated")
                p = chi2_pvalue(out, want)
                if p <= 1e-4:
                    raise AssertionError(f"{trunc}: χ² p-value {p:.2g} ≤ 1e-4")
                if kind == "denoise" and graph.absorbing and (out == graph.mask_id).any():
                    raise AssertionError("denoise returned MASK")
                parts.append(f"{trunc}: {kept} kept, χ² p = {p:.3g}")
            return "; ".join(parts) + f" over {DRAWS} draws"

        yield f"truncated step {graph_name} {kind}: top-k / top-p draws vs reference truncation", [DRAWS, V], draws


def truncation_keep_check():
    """The reference kept set on the device against the CPU: top_p = 1 keeps every candidate
    (an fp32 running sum had dropped the tail), top_p = 0.9 cuts at the same token."""
    V = N if common.CUDA else 4096  # a GPT-2-wide row; on CPU wide enough that fp32 would drop tail tokens

    def check():
        p = torch.softmax(3 * torch.randn(2, V, generator=torch.Generator().manual_seed(0)), -1)
        x = torch.tensor([0, 9])
        counts = []
        for top_p in (1.0, 0.9):
            cpu = reference.truncation_keep(p, x, top_p=top_p)
            dev = reference.truncation_keep(p.to(DEVICE), x.to(DEVICE), top_p=top_p).cpu()
            if not torch.equal(dev, cpu):
                raise AssertionError(f"top_p={top_p}: {int(dev.sum())} kept on {DEVICE}, {int(cpu.sum())} on CPU")
            counts.append(int(cpu.sum()))
        if counts[0] != 2 * (V - 1):
            raise AssertionError(f"top_p=1.0 kept {counts[0]} of {2 * (V - 1)} candidates")
        return f"top_p 1.0 / 0.9: {counts[0]} / {counts[1]} kept of {2 * (V - 1)}, same on {DEVICE} and CPU"

    yield "truncation_keep top_p = 1.0 and 0.9 on the device vs CPU", [2, V], check


def large_offset_checks():
    """The paper's per-GPU batch, 64 × 1024 rows: the last rows (offsets past 2^31 elements) of
    the fused loss + gradient against the reference on those rows, and the reverse steps."""
    graph = get_graph("absorb", N)
    Bb, Lb = BIG
    tail = 64

    def loss_and_gradient():
        g = _gen(7)
        z = (torch.randn(Bb, Lb, graph.dim, device=DEVICE, generator=g, dtype=torch.bfloat16) * 2).requires_grad_()
        sigma = torch.rand(Bb, device=DEVICE, generator=g) * 2 + 0.05
        sigma[-1] = 2.0  # most of the checked rows masked
        x0 = torch.randint(0, graph.N, (Bb, Lb), device=DEVICE, generator=g)
        x_t = reference.sample_transition(x0, sigma, graph, g)
        shift, weight = graph.score_shift(sigma), torch.rand(Bb, device=DEVICE, generator=g) + 0.5
        with ops.use_backend("triton"):
            with torch.no_grad():
                per_token = ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="none")
            loss = ops.score_entropy(z * 1, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="batchmean")
        (grad,) = torch.autograd.grad(loss, z)
        rows = slice(Lb - tail, Lb)  # the last sequence's last positions
        zs = z.detach()[-1:, rows].double().requires_grad_()
        want = reference.score_entropy(zs, sigma[-1:], x_t[-1:, rows], x0[-1:, rows], graph, shift[-1:]) * weight[-1]
        (want / Bb).sum().backward()
        return "; ".join([_close("loss (last rows)", per_token.detach()[-1:, rows].double(), want.detach(), 1e-4, 1e-5),
                          _close("gradient (last rows)", grad[-1:, rows].double(), zs.grad, 1.6e-2, 1.6e-2)])

    def steps():
        g = _gen(8)
        z = torch.randn(Bb, Lb, graph.dim, device=DEVICE, generator=g, dtype=torch.bfloat16)
        x_t = torch.randint(0, graph.N, (Bb, Lb), device=DEVICE, generator=g)
        x_t[torch.rand(Bb, Lb, device=DEVICE, generator=g) < 0.5] = graph.mask_id
        fixed = x_t != graph.mask_id
        with ops.use_backend("triton"):
            out = ops.euler_step(z, x_t, torch.full((Bb,), 0.05, device=DEVICE), 0.5, graph, g)
            final = ops.denoise_step(z, out, torch.full((Bb,), 1e-3, device=DEVICE), graph, g)
        if not torch.equal(final[fixed], x_t[fixed]) or (final == graph.mask_id).any():
            raise AssertionError("a fixed position moved or a MASK survived the denoise step")
        moved = (out[-1] != x_t[-1]).float().mean()
        return f"last sequence: {float(moved):.0%} of positions moved in the Euler step"

    yield f"score entropy absorb at {Bb * Lb} rows: last rows vs reference", [Bb, Lb, graph.dim], loss_and_gradient
    yield f"reverse step absorb Euler + denoise at {Bb * Lb} rows", [Bb, Lb, graph.dim], steps


def all_checks():
    for graph_name in ("absorb", "uniform"):
        yield from score_entropy_checks(graph_name)
    for graph_name in ("absorb", "uniform"):
        yield from fused_head_check(graph_name)
    yield from ar_checks()
    for graph_name in ("absorb", "uniform"):
        yield from noising_check(graph_name)
    for graph_name in ("absorb", "uniform"):
        yield from reverse_step_checks(graph_name)
    for graph_name in ("absorb", "uniform"):
        yield from truncated_step_checks(graph_name)
    yield from truncation_keep_check()
    yield from large_offset_checks()


def run(out: Path) -> bool:
    report = {"device": common.device_name(), "commit": common.commit_id(), **common.versions(), "checks": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    ok = True
    with ops.value_checks(True):  # a correctness run: keep the input checks on
        for name, shape, check in all_checks():
            start = time.perf_counter()
            try:
                detail = check()
                common.sync()  # a kernel fault surfaces here, inside its own check
                passed = True
            except Exception as err:
                detail, passed = f"{type(err).__name__}: {err}"[-2000:], False
                traceback.print_exc()
            seconds = time.perf_counter() - start
            ok &= passed
            report["checks"].append({"check": name, "shape": shape, "ok": passed, "detail": detail, "seconds": round(seconds, 2)})
            print(f"{'ok  ' if passed else 'FAIL'} {name} {shape} ({seconds:.1f} s): {detail}", flush=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            if common.CUDA:
                torch.cuda.empty_cache()
    return ok


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    raise SystemExit(0 if run(args.out) else 1)


if __name__ == "__main__":
    main()
