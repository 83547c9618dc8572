"""Reverse-step predictors: one object per way of moving the tokens from time t to t − Δt.

A predictor calls the model once per step (through :func:`sedd.model.scoring.step_on_scores`, so the
fused kernels fold the σ shift in) and hands the scores to a :mod:`sedd.ops` step. The sampler
looks predictors up by name in a registry and makes a fresh instance for every ``sample`` call,
so a predictor may keep state across the steps of one call (a cache, for instance).

Adding one::

    @register_predictor
    class MyPredictor(Predictor):
        name = "mine"

        def update(self, model, x, t, dt, graph, noise, generator=None):
            ...  # return the next tokens [B, L]

    sample(model, graph, noise, batch_size=4, length=128, predictor="mine")

``final = True`` marks a denoiser: the last step, from σ̄(t) at the end of the grid to σ = 0
(``"denoise"``), chosen with ``sample(..., denoiser=...)`` and not offered as a per-step predictor.

``owns_grid = True`` marks a predictor that keeps its own time grid (``"first_hitting"``,
:mod:`sedd.sampling.first_hitting`): the sampler calls its ``run(model, x, graph=, noise=, eps=,
generator=, project=, progress=, top_p=, top_k=)`` once instead of the step loop and the denoiser.

What a predictor reads of the :class:`~sedd.sampling.SamplingSpec`: ``options`` names the spec
fields that are its own (its constructor takes them; ``tokens_per_step``): the sampler passes them
on, and every other predictor refuses them; ``exclusive`` names those of them of which at most one
may differ from its default at a time (``exclusive_why`` says why). ``refuses`` maps the general
options it does not read (``steps`` for a predictor with its own grid) to the message that refuses
them, with each option written ``{name}`` (the caller's name for it). ``absorbing_only`` refuses
the uniform graph.

The sampler hands ``update`` the model wrapped in a :class:`sedd.sampling.cache.NetworkCalls`,
which counts the forward rows per sequence and, with ``sample(..., cache=...)``, serves
:func:`sedd.model.scoring.step_on_scores` from its cache: a predictor that reads its scores there is
cached for free.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from sedd import ops
from sedd.graph import Graph
from sedd.model.scoring import step_on_scores
from sedd.noise import Noise


class Predictor:
    """The interface: ``update(model, x, t, dt, graph, noise, generator, top_p, top_k) -> next tokens``.

    Arguments of ``update``: ``x`` [B, L] int64 current tokens; ``t`` [B] float64 current times;
    ``dt`` the step Δt > 0 (a float; the final step gets the same Δt and may ignore it); ``graph``
    and ``noise`` the forward process and schedule; ``generator`` for reproducible draws;
    ``top_p``/``top_k`` the truncation of the step (:data:`sedd.ops.TRUNCATION`). The sampler passes
    ``top_p``/``top_k`` only when the caller truncates, so a predictor without truncation may
    leave them out of its ``update``.

    ``masked_only`` (absorbing graph): run the model's head only at the MASK rows
    (``sample(masked_only=...)`` chooses it for the predictors it makes).
    """

    name: str = ""
    final: bool = False
    owns_grid: bool = False
    options: tuple[str, ...] = ()
    exclusive: tuple[str, ...] = ()  # of its options, at most one set away from its default at a time
    exclusive_why: str = ""  # why (``{name}`` placeholders, as in ``refuses``)
    refuses: dict[str, str] = {}
    absorbing_only: bool = False

    def __init__(self, *, masked_only: bool = True):
        self.masked_only = bool(masked_only)

    def update(
        self,
        model,
        x: torch.Tensor,
        t: torch.Tensor,
        dt: float,
        graph: Graph,
        noise: Noise,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


REGISTRY: dict[str, type[Predictor]] = {}


def register_predictor(cls: type[Predictor], *, name: str | None = None, replace: bool = False) -> type[Predictor]:
    """Register a :class:`Predictor` subclass under ``name`` (default: its ``name``); usable as a
    class decorator. A name already taken is a ``ValueError`` unless ``replace=True``."""
    if not (isinstance(cls, type) and issubclass(cls, Predictor)):
        raise TypeError(f"register_predictor takes a Predictor subclass, got {cls!r}")
    name = name or cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"predictor {cls.__name__} needs a name (set its `name` or pass name=...)")
    if name in REGISTRY and not replace:
        raise ValueError(f"a predictor named {name!r} is already registered ({REGISTRY[name].__name__}); pass replace=True")
    REGISTRY[name] = cls
    return cls


def get_predictor(predictor: str | Predictor, *, final: bool = False, masked_only: bool = True,
                  **options) -> Predictor:
    """A fresh instance of the registered predictor ``predictor`` with ``masked_only`` and
    ``options`` (names in its ``options``), or the given instance (a shallow copy of it when its
    ``masked_only`` differs or options are given: the caller's object is never changed), checked
    to be a per-step predictor (``final=False``) or a denoiser (``final=True``)."""
    kind = "denoiser" if final else "predictor"
    if isinstance(predictor, str) and predictor not in REGISTRY:
        names = tuple(n for n, c in REGISTRY.items() if c.final == final)
        raise ValueError(f"{kind} must be one of {names}, got {predictor!r}")
    cls = REGISTRY[predictor] if isinstance(predictor, str) else type(predictor)
    unknown = [name for name in options if name not in getattr(cls, "options", ())]
    if unknown:
        takers = tuple(n for n, c in REGISTRY.items() if set(unknown) <= set(c.options))
        raise ValueError(f"{kind} {getattr(cls, 'name', cls.__name__)!r} takes no {', '.join(unknown)}"
                         + (f" (predictors that do: {takers})" if takers else ""))
    if isinstance(predictor, Predictor):
        instance = predictor
        if getattr(instance, "masked_only", None) != bool(masked_only) or options:
            instance = copy.copy(instance)
            instance.masked_only = bool(masked_only)
            for name, value in options.items():
                setattr(instance, name, value)
    elif isinstance(predictor, str):
        instance = cls(masked_only=masked_only, **options)
    else:
        raise TypeError(f"{kind} must be a name or a Predictor, got {type(predictor).__name__}")
    if instance.final != final:
        what = "the final denoising step" if instance.final else "a per-step predictor"
        raise ValueError(f"{kind} {predictor!r} is {what}")
    return instance


class _Names(Sequence):
    """The names of the registered per-step predictors (or denoisers), read live from the registry."""

    def __init__(self, final: bool):
        self._final = final

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, c in REGISTRY.items() if c.final == self._final)

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


PREDICTORS: Sequence[str] = _Names(final=False)  # ("euler", "analytic", and any registered since)
DENOISERS: Sequence[str] = _Names(final=True)  # ("denoise", ...)


@register_predictor
class EulerPredictor(Predictor):
    """τ-leaping with the rate at t: candidate y ≠ x_t has weight Δt·σ̄'(t)·Q(x_t, y)·e^{ŝ_y}."""

    name = "euler"

    def update(self, model, x, t, dt, graph, noise, generator=None, top_p=None, top_k=None):
        sigma, dsigma = (v.float() for v in noise(t))
        return step_on_scores(model, x, sigma, graph, lambda s, xt, shift, rows: ops.euler_step(
            s, xt, dsigma[rows], dt, graph, generator, shift=shift, top_p=top_p, top_k=top_k), masked_only=self.masked_only)


@register_predictor
class AnalyticPredictor(Predictor):
    """Tweedie τ-leaping over the noise the step removes, Δσ = σ̄(t) − σ̄(t − Δt)."""

    name = "analytic"

    def update(self, model, x, t, dt, graph, noise, generator=None, top_p=None, top_k=None):
        sigma = noise.total(t)
        dsigma = (sigma - noise.total(t - dt)).float()  # the difference in t's precision (fp64)
        return step_on_scores(model, x, sigma.float(), graph, lambda s, xt, shift, rows: ops.analytic_step(
            s, xt, dsigma[rows], graph, generator, shift=shift, top_p=top_p, top_k=top_k), masked_only=self.masked_only)


@register_predictor
class Denoiser(Predictor):
    """The last step: from σ̄(t) straight to σ = 0 (absorbing: every MASK left is filled)."""

    name = "denoise"
    final = True

    def update(self, model, x, t, dt, graph, noise, generator=None, top_p=None, top_k=None):
        sigma = noise.total(t).float()
        return step_on_scores(model, x, sigma, graph, lambda s, xt, shift, rows: ops.denoise_step(
            s, xt, sigma[rows], graph, generator, shift=shift, top_p=top_p, top_k=top_k), masked_only=self.masked_only)
