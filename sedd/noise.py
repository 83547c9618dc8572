"""Noise schedules: total noise σ̄(t) and its rate σ̄'(t) for t ∈ [0, 1].

Both schedules are closed-form and elementwise, so they take a tensor of times of any shape
and return two tensors of that shape (in the dtype of ``t``, float32 for integer input).

The math: docs/math.md, "Noise schedules".
"""

from __future__ import annotations

import math

import torch


class Noise:
    """Base class: ``noise(t) -> (sigma, dsigma)`` with sigma = σ̄(t) and dsigma = σ̄'(t)."""

    name: str = ""

    def total(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def time_at(self, total: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`total`: the time t with σ̄(t) = ``total`` (σ̄ increases with t),
        outside [0, 1] where ``total`` is outside σ̄'s range on it."""
        raise NotImplementedError

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_float(t)
        return self.total(t), self.rate(t)


class LogLinear(Noise):
    """σ̄(t) = −log(1 − (1 − ε)t): the mask probability 1 − e^{−σ̄} = (1 − ε)t grows linearly.

    The rate is σ̄'(t) = (1 − ε)/(1 − (1 − ε)t), and σ̄'(t)/(e^{σ̄(t)} − 1) = 1/t exactly, which
    is why the absorbing training loss weights each masked token by 1/t.
    """

    name = "loglinear"

    def __init__(self, eps: float = 1e-3):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = float(eps)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def time_at(self, total: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-total) / (1 - self.eps)

    def __repr__(self) -> str:
        return f"LogLinear(eps={self.eps})"


class Geometric(Noise):
    """σ̄(t) = σ_min^{1−t} σ_max^t, σ̄'(t) = σ̄(t)·ln(σ_max/σ_min)."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min ** (1 - t) * self.sigma_max**t

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return self.total(t) * math.log(self.sigma_max / self.sigma_min)

    def time_at(self, total: torch.Tensor) -> torch.Tensor:
        return torch.log(total / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def __repr__(self) -> str:
        return f"Geometric(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


# The schedules by name (the names of the public SEDD configs); a new one is a class and an entry.
NOISES: dict[str, type[Noise]] = {"loglinear": LogLinear, "geometric": Geometric}


def get_noise(name: str | Noise, **kwargs) -> Noise:
    """``"loglinear"`` or ``"geometric"`` (the names of the public SEDD config), or a Noise object."""
    if isinstance(name, Noise):
        return name
    if name not in NOISES:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(NOISES)}")
    return NOISES[name](**kwargs)


def _as_float(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.float()


def noise_from_config(config: dict) -> Noise:
    """The schedule of a public-format training config (``noise.type``, ``sigma_min``, ``sigma_max``;
    the log-linear ε, absent from the public config, defaults to 1e-3 as in the paper)."""
    cfg = config.get("noise", {})
    kind = cfg.get("type", "loglinear")
    if kind == "geometric":
        return Geometric(cfg.get("sigma_min", 1e-4), cfg.get("sigma_max", 20.0))
    if kind == "loglinear":
        return LogLinear(cfg.get("eps", 1e-3))
    return get_noise(kind)
