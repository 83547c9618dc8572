"""The objective interface and its registry (:mod:`sedd.objectives` says what an objective is)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sedd.graph import Graph
from sedd.likelihood import BoundReport
from sedd.model.checkpoint import DEFAULT_OBJECTIVE, config_objective
from sedd.model.scoring import unwrap
from sedd.noise import Noise
from sedd.sampling import SamplingSpec, SamplingStats
from sedd.sampling.spec import FAMILIES

__all__ = ["OBJECTIVES", "TRAINING_DEFAULTS", "ContinuationScore", "Objective", "get_objective", "objective_of",
           "register_objective"]

# The hyper-parameters of a run an objective reads, where a config does not record them (a public
# checkpoint, a model made by hand): train/run.py's defaults.
TRAINING_DEFAULTS = {"sampling_eps": 1e-3, "sample_steps": 128}


@dataclass(frozen=True)
class ContinuationScore:
    """−log p(continuation | context) of one window: ``nll`` (nats; the bound, prior term
    included, for a diffusion model), ``variance`` of that estimate (0 when exact) and ``greedy``
    (whether the model's most likely token at every continuation position is the continuation's)."""

    nll: float
    variance: float
    greedy: bool


class Objective:
    """The interface (module docstring). ``Objective(config, training=...)`` binds it to a model
    config (``training``: the run's hyper-parameters, default ``config["training"]``)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # in messages: "a diffusion checkpoint"
    model_class: ClassVar[type]
    sampler: ClassVar[str] = ""  # a key of sedd.sampling.spec.FAMILIES
    exact: ClassVar[bool] = False  # the likelihood is exact (an NLL), not a bound
    loss_label: ClassVar[str] = ""
    # train/run.py flags (run-config keys) this objective does not read, and why, for the message
    refused_flags: ClassVar[tuple[str, ...]] = ()
    refused_because: ClassVar[str] = ""
    # run-config keys this objective fixes, {key: (value, why)}: the flag given with another value
    # is refused, and the run takes that value
    implied_flags: ClassVar[dict[str, tuple[Any, str]]] = {}
    # run-config keys whose default this objective changes, {key: (value, why)}: the flag given
    # on the command line wins
    default_flags: ClassVar[dict[str, tuple[Any, str]]] = {}
    # train/run.py flags of this objective alone, {key: (default, help)}: every other objective refuses them
    flags: ClassVar[dict[str, tuple[Any, str]]] = {}
    # those of its flags that are training hyper-parameters (config.json's training section, may
    # change on --resume); the others shape the model (its model config records them; frozen)
    training_flags: ClassVar[tuple[str, ...]] = ()

    graph: Graph | None = None
    noise: Noise | None = None
    time_conditioning: bool | None = None

    def __init__(self, config: dict | None = None, *, training: dict | None = None):
        self.config = config or {}
        self.training = {**TRAINING_DEFAULTS, **(self.config.get("training") or {}), **(training or {})}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    @classmethod
    def a_label(cls) -> str:
        """The label with its article, for messages: "an autoregressive"."""
        return f"{'an' if cls.label[:1] in tuple('aeiou') else 'a'} {cls.label}"

    # -- the model -------------------------------------------------------------------------------

    @classmethod
    def model_config(cls, run: dict, tokens: int, model_keys: dict) -> dict:
        """The model config of a train/run.py run (``run``: its flags; ``model_keys``: its model
        section's overrides) over ``tokens`` real tokens."""
        raise NotImplementedError

    @classmethod
    def check_run(cls, run: dict) -> None:
        """ValueError (one line, naming the flags) for a train/run.py configuration ``run`` this
        objective cannot train, before any work."""

    @classmethod
    def settle_run(cls, run: dict) -> None:
        """Replace, in ``run`` (checked by :meth:`check_run`), the "auto" values of this objective's
        flags by what they choose, so that config.json records what trained."""

    def build(self, config: dict, autocast_dtype=None) -> torch.nn.Module:
        return self.model_class(config, autocast_dtype=autocast_dtype)

    def describe(self) -> str:
        raise NotImplementedError

    # -- training --------------------------------------------------------------------------------

    def loss(self, model, x0, generator, scale: float, **model_kwargs) -> torch.Tensor:
        """The training loss of the batch ``x0`` (mean over blocks, times ``scale``)."""
        raise NotImplementedError

    def validation_losses(self, net, x0, generators: list[torch.Generator], **model_kwargs) -> torch.Tensor:
        """[B] losses of fixed validation blocks, block i's randomness from ``generators[i]``."""
        raise NotImplementedError

    # -- the likelihood --------------------------------------------------------------------------

    def likelihood(self, model, blocks: torch.Tensor, mask: torch.Tensor, *, num_samples: int,
                   time_sampler: str, batch_size: int, generator=None, device=None, on_progress=None) -> BoundReport:
        """The corpus-level likelihood of ``blocks`` [n, L] (with their [n, L] mask): the bound
        from ``num_samples`` draws of t per block, or the exact NLL. ``on_progress(k)`` after every
        call with the units of :meth:`likelihood_work` it did."""
        raise NotImplementedError

    def likelihood_work(self, blocks: int, num_samples: int) -> tuple[int, str]:
        """(units, unit name) of :meth:`likelihood`'s progress over ``blocks`` blocks."""
        raise NotImplementedError

    def likelihood_calls(self, blocks: int, num_samples: int, batch_size: int) -> tuple[int, int]:
        """(model calls, rows of the widest call) :meth:`likelihood` makes."""
        raise NotImplementedError

    def likelihood_probe(self, model, x: torch.Tensor, generator=None) -> None:
        """One model call of :meth:`likelihood` on the rows ``x`` (to time it)."""
        raise NotImplementedError

    def sequence_bounds(self, model, x0: torch.Tensor, **estimator) -> dict[str, torch.Tensor]:
        """The per-sequence terms of the bound on −log p(x0) of the sequences ``x0`` [B, n]
        (:func:`sedd.likelihood.sequence_bounds`' dict and keyword arguments: ``num_samples``,
        ``time_sampler``, ``attention_mask``, ``batch_size``, ``generator``, ``on_draws``, and
        ``maskable`` for the conditional bound with the other positions held clean): what
        :meth:`likelihood` and :meth:`continuation` sum, for the objectives that bound."""
        raise NotImplementedError

    def prior_nats_per_token(self) -> float:
        """What the likelihood adds per token to the training loss per token: the bound's prior
        term, which the loss leaves out (docs/math.md, "Likelihood bound"); 0 for an exact NLL."""
        return 0.0

    def continuation_refusal(self) -> str | None:
        """Why :meth:`continuation` cannot score this model, as the rest of a one-line sentence whose
        subject is what asked ("loglikelihood needs ..."); None when it can."""
        return f"is not available for {self.a_label()} checkpoint in this library"

    def continuation(self, model, tokens: torch.Tensor, context: int, *, num_samples: int, time_sampler: str,
                     batch_size: int, generator=None) -> ContinuationScore:
        """−log p(tokens[0, context:] | tokens[0, :context]) for one window ``tokens`` [1, L] on the
        model's device: the bound from ``num_samples`` draws of t (``batch_size`` rows per call), or
        the exact NLL."""
        raise NotImplementedError

    # -- sampling --------------------------------------------------------------------------------

    def sample(self, model, **request) -> tuple[torch.Tensor, SamplingStats]:
        """Samples from ``model`` by this objective's sampler, and the network calls: ``request``
        holds :func:`sedd.sampling.sample`'s keyword arguments (``batch_size``, ``length``,
        ``spec`` and/or its fields, ``fixed_tokens``, ``fixed_mask``, ``generator``, ``device``,
        ``progress``); the spec is checked against the sampler."""
        raise NotImplementedError

    def training_spec(self, *, fsdp: bool = False) -> SamplingSpec:
        """How train/run.py samples at the end of a run (``fsdp``: the model is sharded)."""
        raise NotImplementedError

    def sample_note(self) -> str:
        """:meth:`training_spec` in words."""
        raise NotImplementedError

    def default_steps(self, window: int) -> int | None:
        """The reverse steps per sampler call when the spec gives none, for a window of ``window``
        tokens (the records say what ran): the window (the paper's one step per token)."""
        return window

    def steps_sweep(self, window: int) -> list[int]:
        """The step counts ``quality.py`` sweeps when ``--steps`` gives none: 16, 32 and 64 per
        window, the paper's low-NFE end of its generative-perplexity curve."""
        return [16, 32, 64]


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Register an :class:`Objective` subclass under its ``name`` (a class decorator). Its model
    class must load configs of that name (``model_class.objective``), its sampler be a family
    of :data:`sedd.sampling.spec.FAMILIES`."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)) or not cls.name:
        raise TypeError(f"register_objective takes an Objective subclass with a name, got {cls!r}")
    if cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"an objective named {cls.name!r} is already registered ({OBJECTIVES[cls.name].__name__})")
    if getattr(cls.model_class, "objective", None) != cls.name:
        raise ValueError(f"objective {cls.name!r}: its model class {cls.model_class.__name__} loads configs of "
                         f"objective {getattr(cls.model_class, 'objective', None)!r}")
    if cls.sampler not in FAMILIES:
        raise ValueError(f"objective {cls.name!r}: sampler must be one of {tuple(FAMILIES)}, got {cls.sampler!r}")
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> type[Objective]:
    """The registered objective class ``name``; ValueError naming the choices."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {tuple(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


def objective_of(model_or_config, *, graph: Graph | None = None, noise: Noise | None = None) -> Objective:
    """The objective of a model (under DDP/compile wrappers) or of a config, bound to the config.
    A model without a config (a test double, any ``model(x_t, sigma)``) is a diffusion model;
    ``graph`` and ``noise``, where given, are its forward process and schedule."""
    is_config = isinstance(model_or_config, dict)
    config = model_or_config if is_config else getattr(unwrap(model_or_config), "config", None)
    if not isinstance(config, dict):
        config = None
    objective = get_objective(config_objective(config) if config is not None else DEFAULT_OBJECTIVE)(config)
    if graph is not None or noise is not None:
        objective.graph, objective.noise = graph or objective.graph, noise or objective.noise
    if config is None and not is_config:
        objective.time_conditioning = getattr(unwrap(model_or_config), "time_conditioning", None)
    return objective
