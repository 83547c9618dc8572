"""Small scalar helpers shared by the graphs, the eager reference and the model (no oracle here).

``esigm1`` is E(σ) = e^σ − 1 as the math doc defines it; ``per_row`` reshapes per-sequence scalars
(σ, Δσ, a shift, a step size) so they broadcast against per-token or per-row tensors.
"""

from __future__ import annotations

import torch


def esigm1(sigma: torch.Tensor) -> torch.Tensor:
    """E(σ) = e^σ − 1, through expm1 where σ is small enough for e^σ − 1 to cancel."""
    return torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)


def per_row(v: torch.Tensor | float, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sequence scalars ([B], [B, 1] or a scalar) shaped [B, 1, …, 1] to broadcast against
    ``like`` [B, ...], on like's device (and in ``dtype`` when given; a scalar stays 0-d)."""
    v = torch.as_tensor(v, device=like.device, dtype=dtype)
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))
