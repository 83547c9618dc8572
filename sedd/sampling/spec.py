"""How to sample, in one value: :class:`SamplingSpec` holds every sampler option, checks each one
once, and says which apply to a model and which ran.

Every function that samples (``sample``, ``sample_ancestral``, ``sample_blockwise``,
``generate_samples``, ``generate``, an objective's ``sample``) takes ``spec=`` and, for convenience,
the spec's fields as keyword arguments (``sample(..., steps=16)`` is
``sample(..., spec=SamplingSpec(steps=16))``); the command lines and the harness build one from
their flags and model_args. So the list of options lives here, once.

Three layers of checks, each in one place:

* a value out of its range (``steps=0``, ``top_p=1.5``) or an option the chosen predictor does not
  read (``tokens_per_step`` with ``"analytic"``, ``steps`` with ``"first_hitting"``): a
  :class:`SamplingOptionError` when the spec is made, before any model is involved;
* an option the model's sampler does not read (``temperature`` for a diffusion model, ``steps`` for
  an autoregressive one), a predictor its graph cannot run (``"first_hitting"`` on the uniform
  graph), an exact cache on a model that reads σ: :meth:`SamplingSpec.validate`, given the model's
  objective (:mod:`sedd.objectives`, or anything with the same four attributes, see
  :class:`SamplerTarget`), before any work;
* :meth:`SamplingSpec.record`: what ran, for the JSON records: the options that applied, ``steps``
  as resolved, None for the rest.

Adding an option: one field below, with its rule and the families of samplers that read it
(``reads``, keys of :data:`FAMILIES`: ``"reverse"``, the diffusion samplers of
:mod:`sedd.sampling.sampler`; ``"ancestral"``, the autoregressive one; ``"block"``, block
diffusion's), and the code that reads it. An option of one predictor is also
named in that predictor's ``options`` (:mod:`sedd.sampling.predictors`), which then receives it;
the other predictors refuse it. The command lines and the harness take it by its name.

Errors name each option as the caller's user wrote it: :meth:`SamplingOptionError.render` with the
command line's flags (``--top-p``), the harness's ``model_args top_p``; ``str(err)`` uses the field
names.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from sedd.sampling import predictors
from sedd.sampling.predictors import Predictor

__all__ = ["FAMILIES", "SamplerTarget", "SamplingOptionError", "SamplingSpec", "target_for"]

Namer = Callable[[str], str]


class SamplingOptionError(ValueError):
    """A sampler option that cannot run: out of range, or not read by the predictor or the model.

    Attributes:
        fields: the options at fault (``SamplingSpec`` field names).
    """

    def __init__(self, fields: tuple[str, ...], text: Callable[[Namer], str]):
        self.fields = tuple(fields)
        self._text = text
        super().__init__(text(str))

    def render(self, name: Namer) -> str:
        """The message with every option named by ``name(field)`` (a flag, a model_args key)."""
        return self._text(name)


# -- rules ------------------------------------------------------------------------------------------


def _positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _optional(test):
    return lambda v: v is None or test(v)


def _step_kind(final: bool):
    """The rule of ``predictor`` (final=False) or ``denoiser`` (final=True): a registered name of
    that kind, or an instance of one."""
    kind = "denoiser" if final else "predictor"

    def check(name: str, value) -> SamplingOptionError | None:
        if isinstance(value, Predictor):
            final_ok = value.final == final
        elif isinstance(value, str) and value in predictors.REGISTRY:
            final_ok = predictors.REGISTRY[value].final == final
        else:
            names = tuple(n for n, c in predictors.REGISTRY.items() if c.final == final)
            return SamplingOptionError((name,), lambda n: f"{n(name)} must be one of {names}, got {value!r}")
        if final_ok:
            return None
        what = "the final denoising step" if not final else "a per-step predictor"
        return SamplingOptionError((name,), lambda n: f"{n(name)} {value!r} is {what}, not a {kind}")

    return check


def _rule(test: Callable[[Any], bool], must: str):
    def check(name: str, value) -> SamplingOptionError | None:
        if test(value):
            return None
        return SamplingOptionError((name,), lambda n: f"{n(name)} must be {must}, got {value!r}")

    return check


def _option(default, reads: str, check, help: str):
    return field(default=default, metadata={"reads": reads, "check": check, "help": help})


# Which sampler families (FAMILIES) read an option.
DIFFUSION = ("reverse", "block")  # the reverse process: its predictors, grid and cache
WINDOWED = ("reverse", "ancestral")  # window by window (sedd.generation.sample_blockwise)
ALL = ("reverse", "ancestral", "block")
_POSITIVE = _rule(_optional(_positive_int), "a positive integer")
_BOOL = _rule(lambda v: isinstance(v, bool), "True or False")


@dataclass(frozen=True)
class SamplingSpec:
    """Every sampler option (module docstring). Frozen: ``dataclasses.replace(spec, steps=64)`` makes
    a variant, checked again. Defaults are the paper's sampler.

    Attributes:
        predictor: "analytic" (Tweedie τ-leaping), "euler", "first_hitting" (absorbing graph: one
            unmasking event per evaluation), any name registered with
            :func:`sedd.sampling.register_predictor`, or a :class:`~sedd.sampling.Predictor` instance.
        steps: reverse steps per window, one network evaluation each; None: the window's length
            (as in the paper). Not read by a predictor with its own grid (first hitting).
        eps: the final time of the grid (:func:`sedd.sampling.check_eps` says whether the schedule
            can use it); first hitting reads it as a floor on σ.
        denoise, denoiser: the final step from σ̄(ε) to 0, and which registered denoiser makes it.
        masked_only: absorbing graph: run the output layer only at the MASK positions.
        cache: True: reuse the network output of a sequence the last step left unchanged (exact for
            a model without time conditioning); "approximate": the same for a σ-conditioned model.
        tokens_per_step: first hitting's unmasking events per evaluation (None: 1).
        threshold: first hitting, τ in (0, 1]: at each evaluation also unmask every MASK position
            whose denoising distribution p has max_y p(y) ≥ τ, each with a token drawn from p
            (Fast-dLLM's confidence rule; :mod:`sedd.sampling.first_hitting`).
        entropy_bound: first hitting, γ ≥ 0: at each evaluation also unmask MASK positions in
            increasing order of their entropy H(p) (nats) while the sum stays ≤ γ (the
            EB-sampler's rule). At most one of ``threshold``, ``entropy_bound`` and
            ``tokens_per_step`` > 1.
        top_p, top_k: nucleus / top-k truncation of every step (every draw for an AR model).
        temperature: autoregressive models: logits / T before each draw, 0 greedy.
        kv_cache: autoregressive models: keep the keys and values of earlier positions;
            block-diffusion models: of the finished blocks (False re-runs them at every call).
        stop_at_eos: block-diffusion models: a sequence ends at its first generated EOS (the
            sampler is told the EOS id by its caller, who knows the tokenizer).
        cuda_graph: capture the network call of the first step as a CUDA graph and replay it at
            every later step (:mod:`sedd.sampling.graphs`): one launch per forward instead of one
            per kernel; the steps then run sync-free (the full head at every position, the same
            distribution). CUDA only; not with ``cache`` (finding the changed rows is a host read)
            nor a predictor with its own grid (its sub-batches change size).
        window, stride: longer than ``window`` tokens (default: the model's length) is generated
            window by window, ``stride`` new tokens per later window (default: half the window);
            read by :func:`sedd.generation.sample_blockwise` and what calls it. A block-diffusion
            model takes any length in one call and no stride: ``window`` caps what a block sees
            (itself and the clean tokens before it).
    """

    predictor: str | Predictor = _option("analytic", DIFFUSION, _step_kind(False), "reverse-step predictor")
    steps: int | None = _option(None, DIFFUSION, _POSITIVE, "reverse steps per window (default: the window length)")
    eps: float = _option(1e-5, DIFFUSION, _rule(lambda v: _real(v) and 0 < v < 1, "a number in (0, 1)"),
                         "final time of the grid")
    denoise: bool = _option(True, DIFFUSION, _BOOL, "end with the denoising step")
    denoiser: str | Predictor = _option("denoise", DIFFUSION, _step_kind(True), "the final denoising step")
    masked_only: bool = _option(True, DIFFUSION, _BOOL, "absorbing graph: the output layer at MASK rows only")
    cache: bool | str = _option(False, DIFFUSION, _rule(lambda v: v is True or v is False or v == "approximate",
                                                        "False, True or 'approximate'"),
                                "reuse the outputs of unchanged sequences: True (exact), approximate")
    tokens_per_step: int | None = _option(None, DIFFUSION, _POSITIVE, "first_hitting: tokens per evaluation")
    threshold: float | None = _option(None, DIFFUSION, _rule(_optional(lambda v: _real(v) and 0 < v <= 1),
                                                             "a number in (0, 1]"),
                                      "first_hitting: also unmask every position whose max probability is >= this")
    entropy_bound: float | None = _option(None, DIFFUSION,
                                          _rule(_optional(lambda v: _real(v) and math.isfinite(v) and v >= 0),
                                                "a finite number >= 0"),
                                          "first_hitting: also unmask the surest positions while their entropies "
                                          "(nats) sum to at most this")
    top_p: float | None = _option(None, ALL, _rule(_optional(lambda v: _real(v) and 0 < v <= 1),
                                                     "a number in (0, 1]"), "nucleus truncation")
    top_k: int | None = _option(None, ALL, _POSITIVE, "top-k truncation")
    temperature: float = _option(1.0, ("ancestral",), _rule(lambda v: _real(v) and math.isfinite(v) and v >= 0,
                                                         "a finite number >= 0"),
                                 "autoregressive: logits / T, 0 greedy")
    kv_cache: bool = _option(True, ("ancestral", "block"), _BOOL,
                             "autoregressive, block diffusion: keep the keys and values of the tokens before")
    stop_at_eos: bool = _option(False, ("block",), _BOOL, "block diffusion: end a sequence at its first generated EOS")
    cuda_graph: bool = _option(False, ("reverse",), _BOOL,
                               "CUDA: capture the network call once and replay it (sync-free steps)")
    window: int | None = _option(None, ALL, _POSITIVE, "tokens the model sees at once (default: its length)")
    stride: int | None = _option(None, WINDOWED, _POSITIVE, "new tokens per later window (default: half the window)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            error = f.metadata["check"](f.name, getattr(self, f.name))
            if error is not None:
                raise error
        step = self.predictor_class
        name = step.name or step.__name__
        for option in _predictor_options():
            if getattr(self, option) is not None and option not in step.options:
                takers = " and ".join(n for n, c in predictors.REGISTRY.items() if option in c.options)
                raise SamplingOptionError((option,), lambda n, o=option, t=takers: (
                    f"{n('predictor')} {name} takes no {n(o)}: it applies to the {t} predictor"))
        for option, why in step.refuses.items():
            if self.given(option):
                raise SamplingOptionError((option,), lambda n, why=why: why.format_map(_Names(n)))
        defaults = inspect.signature(step.__init__).parameters
        rival = tuple(o for o in step.exclusive if getattr(self, o) is not None
                      and getattr(self, o) != defaults[o].default)
        if len(rival) > 1:
            raise SamplingOptionError(rival, lambda n: (
                f"{' and '.join(n(o) for o in rival)} cannot be combined: "
                + step.exclusive_why.format_map(_Names(n))))
        if self.cuda_graph and self.cache is not False:
            raise SamplingOptionError(("cuda_graph", "cache"), lambda n: (
                f"{n('cuda_graph')} cannot be combined with {n('cache')}: the cache finds the rows that changed "
                "by a host read, which a captured step cannot make"))

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def build(cls, spec: SamplingSpec | None = None, **options) -> SamplingSpec:
        """``spec`` with ``options`` (field names) replaced, or a new spec from them: what every
        sampling function does with its ``spec=`` and keyword arguments. TypeError for a name
        that is not a field."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown sampling option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                            f"the options are the fields of sedd.sampling.SamplingSpec: {', '.join(cls.names())}")
        if spec is None:
            return cls(**options)
        if not isinstance(spec, SamplingSpec):
            raise TypeError(f"spec must be a sedd.sampling.SamplingSpec, got {type(spec).__name__}")
        return dataclasses.replace(spec, **options) if options else spec

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        """One line on the option ``name`` (the harness lists them)."""
        return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)

    @classmethod
    def parse(cls, name: str, text: str) -> Any:
        """The value of option ``name`` written as text (``"16"``, ``"0.9"``, ``"true"``,
        ``"none"``), typed as its field's default or rule reads it; the spec checks it."""
        lowered = text.strip().lower()
        if lowered in ("none", "null", ""):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    # -- what applies ----------------------------------------------------------------------------

    @property
    def predictor_class(self) -> type[Predictor]:
        return type(self.predictor) if isinstance(self.predictor, Predictor) else predictors.REGISTRY[self.predictor]

    @property
    def predictor_name(self) -> str:
        step = self.predictor_class
        return step.name or step.__name__

    def given(self, name: str) -> bool:
        """Whether option ``name`` differs from its default."""
        default = next(f.default for f in dataclasses.fields(self) if f.name == name)
        value = getattr(self, name)
        if isinstance(value, bool) or isinstance(default, bool) or default is None:
            return value is not default
        return value != default

    def applies(self, name: str, target: SamplerTarget) -> bool:
        """Whether option ``name`` is read when ``target``'s sampler runs this spec."""
        reads = next(f.metadata["reads"] for f in dataclasses.fields(self) if f.name == name)
        if target.sampler not in reads:
            return False
        if not FAMILIES[target.sampler].predictors:
            return True
        step = self.predictor_class
        if name in step.refuses or (name == "denoiser" and not self.denoise):
            return False
        return name not in _predictor_options() or name in step.options

    def validate(self, objective: SamplerTarget) -> SamplingSpec:
        """Check the spec against the model ``objective`` samples (an objective of
        :mod:`sedd.objectives`, or a :class:`SamplerTarget`): every option given must be read by
        its sampler, the predictor must run on its graph, an exact cache needs a model that does
        not read σ. Raises :class:`SamplingOptionError`; returns the spec."""
        family = FAMILIES[objective.sampler]
        unread = [f.name for f in dataclasses.fields(self)
                  if objective.sampler not in f.metadata["reads"] and self.given(f.name)]
        if unread:
            # a block-diffusion model is a diffusion model: "diffusion" names both where both read it
            readers = " and ".join(dict.fromkeys(FAMILIES[r].models for f in dataclasses.fields(self)
                                                 if f.name in unread for r in f.metadata["reads"]
                                                 if not (r == "block" and "reverse" in f.metadata["reads"])))
            raise SamplingOptionError(tuple(unread), lambda n: (
                f"{', '.join(n(u) for u in unread)} {'applies' if len(unread) == 1 else 'apply'} to {readers} "
                f"models; " + family.refusal.format_map(_Names(n, it="it" if len(unread) == 1 else "them"))))
        floor = getattr(objective, "min_window", None)
        if self.window is not None and floor is not None and self.window < floor:
            raise SamplingOptionError(("window",), lambda n: (
                f"{n('window')} {self.window} is shorter than one block ({floor} tokens): a block reads itself and "
                "the clean blocks before it within the window"))
        if not family.predictors:
            return self
        graph = objective.graph
        step = self.predictor_class
        if step.absorbing_only and graph is not None and not graph.absorbing:
            raise SamplingOptionError(("predictor",), lambda n: (
                f"{n('predictor')} {self.predictor_name} samples the absorbing graph only; this model uses the "
                f"{graph.name} graph"))
        if self.cache is True and objective.time_conditioning:
            raise exact_cache_error()
        return self

    def check_one_window(self, length: int) -> None:
        """:class:`SamplingOptionError` unless ``length`` tokens fit the spec's ``window``: for the
        samplers that draw a whole sequence at once."""
        if self.window is not None and length > self.window:
            raise SamplingOptionError(("window",), lambda n: (
                f"{n('window')} {self.window} is shorter than the {length} tokens this sampler draws at once; "
                "sedd.generation.sample_blockwise (sedd.generate) samples window by window"))

    def record(self, objective: SamplerTarget, **ran: Any) -> dict[str, Any]:
        """What ran, for a JSON record: ``{"sampler": ..., **fields}`` with the options that
        applied to ``objective``'s sampler and None for the others; an option left None that the
        sampler resolves (``steps``, ``window``, ``stride``) as the caller resolved it (``ran``:
        ``steps=64``), a predictor's own option left None as the predictor's default, a predictor by
        its name."""
        family = FAMILIES[objective.sampler]
        out: dict[str, Any] = {"sampler": self.predictor_name if family.predictors else objective.sampler}
        step = self.predictor_class
        for name in self.names():
            if not self.applies(name, objective):
                out[name] = None
                continue
            value = getattr(self, name)
            if value is None:
                value = ran.get(name)
            if value is None and name in step.options:
                value = inspect.signature(step.__init__).parameters[name].default
            out[name] = value.name or type(value).__name__ if isinstance(value, Predictor) else value
        return out


    def describe(self, objective: SamplerTarget, **ran: Any) -> str:
        """What :meth:`record` says, in words: "analytic sampler, 64 steps"."""
        r = self.record(objective, **ran)
        words = [f"{r['sampler']} sampler"]
        if r["steps"] is not None:
            words.append(f"{r['steps']} steps")
        if r["threshold"] is not None:
            words.append(f"threshold {r['threshold']:g}")
        elif r["entropy_bound"] is not None:
            words.append(f"entropy bound {r['entropy_bound']:g}")
        elif r["tokens_per_step"] is not None:
            words.append(f"{r['tokens_per_step']} token(s) per network evaluation")
        if FAMILIES[objective.sampler].cost:
            words.append(FAMILIES[objective.sampler].cost)
        return ", ".join(words)


def exact_cache_error() -> SamplingOptionError:
    """cache=True on a model that reads σ (one message for the spec, the sampler and the command lines)."""
    return SamplingOptionError(("cache",), lambda n: (
        "the exact cache reuses network outputs only for a model that does not read sigma "
        "(model.time_conditioning: false, trained with train/run.py --time-conditioning off, absorbing graph); this "
        f"one is conditioned on sigma: {n('cache')}=\"approximate\" reuses its outputs anyway (an approximation), "
        "or leave the cache off"))


def _predictor_options() -> set[str]:
    """The options that belong to one predictor or another (named in their ``options``)."""
    return {o for c in predictors.REGISTRY.values() for o in c.options}


class _Names(dict):
    """``str.format_map`` over option names: ``"{steps}"`` becomes the caller's name for steps."""

    def __init__(self, name: Namer, **extra: str):
        super().__init__(extra)
        self._name = name

    def __missing__(self, key: str) -> str:
        return self._name(key)


# -- the model a spec samples ------------------------------------------------------------------------


class SamplerTarget(Protocol):
    """What :meth:`SamplingSpec.validate` reads of a model's objective (:mod:`sedd.objectives`
    provides these): ``sampler``, the family of its sampler ("reverse", "ancestral" or "block", a
    key of :data:`FAMILIES`); ``label``, its kind in messages ("diffusion"); ``graph``, the forward
    process (None: none, or not known); ``time_conditioning``, whether the network reads σ
    (None: not known); optionally ``min_window``, the fewest tokens its sampler takes as a window
    (a block-diffusion model's block size)."""

    sampler: str
    label: str
    graph: Any
    time_conditioning: bool | None


@dataclass(frozen=True)
class _Target:
    sampler: str
    label: str
    graph: Any = None
    time_conditioning: bool | None = None
    min_window: int | None = None


def target_for(sampler: str, *, graph=None, time_conditioning: bool | None = None,
               min_window: int | None = None) -> SamplerTarget:
    """A :class:`SamplerTarget` for a bare model sampled by the ``sampler`` family (what
    :func:`sedd.sampling.sample` and :func:`sedd.sampling.sample_ancestral` check their spec against)."""
    return _Target(sampler, FAMILIES[sampler].label, graph, time_conditioning, min_window)


@dataclass(frozen=True)
class Family:
    """A family of samplers: ``label`` a model it samples ("diffusion"), ``models`` the models it
    samples in messages, ``refusal`` the end of the message that refuses another family's options
    to it (``{name}`` placeholders: option names; ``{it}``: "it" or "them"), ``cost`` its network
    evaluations in words where no option sets them."""

    label: str
    models: str
    refusal: str
    cost: str = ""
    predictors: bool = True  # it runs the registered predictors (the options of sedd.sampling.predictors)
    # longer than its window is sampled window by window (sedd.generation.sample_blockwise); False:
    # its sampler takes any length in one call (and reads ``window`` itself)
    windows: bool = True


FAMILIES: dict[str, Family] = {
    "reverse": Family("diffusion", "diffusion",
                      "the diffusion samplers have no temperature and keep no keys and values ({top_p} and {top_k} "
                      "truncate their steps; {cache} reuses their outputs)"),
    "ancestral": Family("autoregressive", "autoregressive",
                        "this one is autoregressive (sampled ancestrally, one network evaluation per token): drop {it}",
                        "one network evaluation per token", predictors=False),
    "block": Family("block diffusion", "block-diffusion",
                    "a block-diffusion model is sampled block by block, each block by a diffusion sampler given the "
                    "blocks before it, over a cache of their keys and values: it has no temperature and takes any "
                    "length without a stride ({top_p} and {top_k} truncate its steps; {window} caps what a block "
                    "sees)", windows=False),
}
