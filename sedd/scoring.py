"""How a sampler or a loss reads scores from a model: the raw output plus its σ shift, so the fused
kernels fold the post-processing in, and the module under training/compile wrappers."""

from __future__ import annotations

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def model_scores(model, x_t: torch.Tensor, sigma: torch.Tensor, **model_kwargs):
    """(log_score, shift) for the ``sedd.ops`` calls.

    A model with ``score_shift`` (like :class:`sedd.model.SEDD`) returns its raw output and the
    per-row shift so the kernels fold the post-processing in; any other callable
    ``model(x_t, sigma) -> log_score`` is used as is, with shift None.
    """
    net = unwrap(model)
    if hasattr(net, "score_shift"):
        return model(x_t, sigma, raw=True, **model_kwargs), net.score_shift(sigma)
    return model(x_t, sigma, **model_kwargs), None
