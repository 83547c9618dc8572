"""The denoising score-entropy training loss (diffusion weighted), on top of :mod:`sedd.ops`, and
the next-token cross entropy of the autoregressive baseline (:func:`ar_loss`).

Per sequence: t ~ U[ε_s, 1], (σ, dσ) = noise(t), x_t ~ p_{t|0}(· | x0), ŝ = model(x_t, σ) and
loss = Σ_positions dσ·ℓ(ŝ, σ, x_t, x0). The batch loss is the mean over sequences, in nats per
sequence. The model's raw output goes straight into the fused loss together with its per-row
σ shift, so no post-processing pass over [B, L, V] runs between the output layer and the loss.

The math: docs/math.md, "Training loss", "Autoregressive baseline".
"""

from __future__ import annotations

import inspect

import torch

from sedd import ops
from sedd.graph import Graph
from sedd.model.scoring import accepts_head, model_scores, unwrap
from sedd.noise import Noise
from sedd.ops.checks import check_tokens
from sedd.ops.cross_entropy import reference_cross_entropy


def sample_times(batch_size: int, sampling_eps: float = 1e-3, *, device=None, generator=None) -> torch.Tensor:
    """t ~ U[ε_s, 1] for each sequence, [B] fp32."""
    u = torch.rand(batch_size, device=device, generator=generator)
    return (1 - sampling_eps) * u + sampling_eps


def score_entropy_loss(
    model,
    x0: torch.Tensor,
    graph: Graph,
    noise: Noise,
    *,
    t: torch.Tensor | None = None,
    x_t: torch.Tensor | None = None,
    sampling_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale: float = 1.0,
    fused: bool = True,
    **model_kwargs,
) -> torch.Tensor:
    """The SEDD training loss of a batch of clean sequences.

    Args:
        model: ``SEDD`` (or any ``model(x_t, sigma) -> log_score [B, L, V]``).
        x0: [B, L] int clean tokens.
        graph, noise: the forward process and its schedule.
        t: optional [B] times; drawn from U[sampling_eps, 1] when None.
        x_t: optional [B, L] noisy tokens, a draw of p_{t|0}(·|x0) at ``t`` (which must then be
            given too), e.g. from :func:`sedd.ops.sample_transition` with a generator per sequence;
            drawn here when None.
        generator: optional generator for t and the forward noise (reproducible losses).
        attention_mask: optional [B, L] bool, True on real tokens; padding adds no loss and is
            passed to the model so it is not attended to.
        reduction: "mean" (over sequences: nats per sequence) or "none" ([B] per sequence).
        scale: a constant factor on the loss, folded into the per-sequence weight of the fused
            kernel so the backward needs no extra pass over [B, L, V] (gradient accumulation
            passes 1/steps instead of dividing the loss).
        fused: for a model that takes a ``head`` (like :class:`sedd.model.SEDD`), compute the loss
            with :func:`sedd.ops.linear_score_entropy` inside the model's output layer: no
            [B, L, V] logits, and on the absorbing graph only the MASK rows are multiplied. False:
            the logits, then :func:`sedd.ops.score_entropy` (the same loss up to float rounding).
            Inside a ``torch.compile``d function the loss is always the unfused one, so
            ``fullgraph=True`` works with the defaults.

    Returns:
        fp32 scalar, or [B] for reduction="none".
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    B = x0.shape[0]
    if x_t is not None and t is None:
        raise ValueError("x_t was drawn at some time t: pass that t too")
    if t is None:
        t = sample_times(B, sampling_eps, device=x0.device, generator=generator)
    sigma, dsigma = noise(t)
    weight = dsigma * scale if scale != 1.0 else dsigma
    if x_t is None:
        x_t = ops.sample_transition(x0, sigma, graph, generator)
    elif ops.checking_values():  # what the noising would have checked
        check_tokens("x0", x0, tuple(x0.shape), x0.device, graph.N, "clean tokens are real tokens")
        check_tokens("x_t", x_t, tuple(x0.shape), x0.device, graph.dim, "the noisy tokens")
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    # x0 and σ were checked by the noising above and x_t was made by it: neither the model nor the
    # loss repeats a value check, so a CUDA step makes no host sync after the noising (none at all
    # with the checks off).
    # under torch.compile the unfused path is traced: the fused head loops over chunks and runs a
    # backward inside its forward, which dynamo cannot trace (fullgraph=True would fail)
    if fused and accepts_head(unwrap(model)) and not torch.compiler.is_compiling():
        with ops.value_checks(False):
            return _fused_loss(model, x_t, sigma, x0, graph, weight, attention_mask, reduction, model_kwargs)
    with ops.value_checks(False):
        log_score, shift = model_scores(model, x_t, sigma, **model_kwargs)
        if attention_mask is None and reduction == "mean":
            # A raw output (shift given) is a fresh tensor only the loss reads: the fused kernel may
            # write the gradient over it (the Triton backend; the eager one ignores the flag). An
            # arbitrary model's output might be held elsewhere, so it is never overwritten.
            return ops.score_entropy(
                log_score, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="batchmean",
                inplace_backward=shift is not None,
            )
        per_token = ops.score_entropy(log_score, sigma, x_t, x0, graph, shift=shift, weight=weight)
    if attention_mask is not None:
        per_token = per_token * attention_mask
    per_sequence = per_token.sum(-1)
    return per_sequence.mean() if reduction == "mean" else per_sequence


def _fused_loss(model, x_t, sigma, x0, graph, weight, attention_mask, reduction, model_kwargs):
    shift = unwrap(model).score_shift(sigma)
    per_token = attention_mask is not None or reduction == "none"

    def head(hidden, head_weight, head_bias):
        return ops.linear_score_entropy(
            hidden, head_weight, head_bias, sigma, x_t, x0, graph, shift=shift, loss_weight=weight,
            reduction="none" if per_token else "batchmean", width=graph.dim,
        )

    # the loss runs inside the model's forward (see SEDD.forward's ``head``): under FSDP2 the head's
    # parameters are gathered only there. No value checks: x0 and σ were checked by the noising.
    with ops.value_checks(False):
        loss = model(x_t, sigma, head=head, **model_kwargs)
    if not per_token:
        return loss
    if attention_mask is not None:
        loss = loss * attention_mask
    per_sequence = loss.sum(-1)
    return per_sequence.mean() if reduction == "mean" else per_sequence


def ar_loss(
    model,
    x0: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    scale: float = 1.0,
    fused: bool = True,
    **model_kwargs,
) -> torch.Tensor:
    """The training loss of the autoregressive baseline (:class:`sedd.model.ARModel`): the exact
    −log p(x0) = −Σ_i log p(x0_i | x0_<i) of each sequence, every position predicted (the first
    from the model's BOS), in nats per sequence like :func:`score_entropy_loss`.

    Args:
        model: an :class:`~sedd.model.ARModel` (or any ``model(x, **kwargs) -> logits [B, L, N]``
            where logits[:, i] scores x[:, i] given x[:, :i]).
        x0: [B, L] int clean tokens.
        attention_mask: optional [B, L] bool, True on real tokens; padding adds no loss and is not
            attended to.
        reduction: "mean" (over sequences) or "none" ([B] per sequence).
        scale: a constant factor on the loss (gradient accumulation passes 1/steps), folded into
            the fused head's row weight.
        fused: for a model that takes a ``head``, the loss with :func:`sedd.ops.linear_cross_entropy`
            inside the output layer (no [B, L, N] logits); False, or inside a ``torch.compile``d
            function: the logits, then ``F.cross_entropy`` in fp32 (the same loss up to rounding).
        model_kwargs: passed to the model (``segment_ids``).

    Returns:
        fp32 scalar, or [B] for reduction="none" (fp64 for an fp64 model).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
        attention_mask = attention_mask.bool()
    B = x0.shape[0]
    net = unwrap(model)
    if fused and "head" in inspect.signature(net.forward).parameters and not torch.compiler.is_compiling():
        def head(hidden, weight, bias):
            return ops.linear_cross_entropy(
                hidden, weight, bias, x0, mask=attention_mask, loss_weight=scale if scale != 1.0 else None,
                reduction="none" if reduction == "none" else "batchmean", width=getattr(net, "vocab_size", None),
            )

        loss = model(x0, head=head, **model_kwargs)
        return loss.sum(-1) if reduction == "none" else loss
    per_token = reference_cross_entropy(model(x0, **model_kwargs), x0, attention_mask)
    per_sequence = per_token.sum(-1) * scale
    return per_sequence.sum() / B if reduction == "mean" else per_sequence
