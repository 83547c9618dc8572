"""What a model is trained for, behind one interface: the objectives and their registry.

A checkpoint's ``config.json`` names its objective (``"objective"``, absent and so ``"sedd"`` in the
public checkpoints); :data:`OBJECTIVES` maps the name to the class that knows everything that
differs between objectives, so no other module compares the name:

* the model: ``model_class`` (which also names the objective, ``model_class.objective``),
  :meth:`Objective.model_config` (a run's config.json) and :meth:`Objective.build`;
* training: :meth:`Objective.loss`, :meth:`Objective.validation_losses`, ``loss_label``, the
  training flags it does not read (``refused_flags``, refused by ``train/config.py``), those it
  fixes (``implied_flags``), its own (``flags``: every other objective refuses them) and the check
  of a run's configuration before any work (:meth:`Objective.check_run`);
* the likelihood: :meth:`Objective.likelihood` (the SEDD bound, or an exact NLL: ``exact``), and
  of a continuation given its context, :meth:`Objective.continuation` (where
  :meth:`Objective.continuation_refusal` says none);
* sampling: ``sampler``, the family of its sampler (which :class:`~sedd.sampling.SamplingSpec`
  options it reads: :meth:`~sedd.sampling.SamplingSpec.validate` refuses the others),
  :meth:`Objective.sample`, the sampler run on a spec, and :meth:`Objective.default_steps`, the
  steps it runs per call when the spec gives none (for the records).

An instance is bound to one model config (:func:`objective_of`): the diffusion objectives hold their
graph and noise schedule. Every loss is in nats per sequence (summed over the tokens of a block,
averaged over blocks): the autoregressive one is the exact −log p(block), SEDD's and block
diffusion's upper bounds on it in expectation
(docs/math.md, "Training loss", "Autoregressive baseline", "Block diffusion"). train/run.py's log
divides them by the block's length (nats per token) and, with :meth:`Objective.prior_nats_per_token`,
gives the perplexity (a bound unless ``exact``).

Adding an objective: a model class in :mod:`sedd.model` that sets ``objective = "name"`` (a
:class:`~sedd.model.checkpoint.Checkpointed`), and a subclass of :class:`Objective` here (or in a
module of its own) decorated with :func:`register_objective`; ``train/run.py --objective name``,
``load_pretrained``, the samplers, ``train/eval.py`` and the CLIs then take it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from sedd import ops
from sedd.block_diffusion import (
    block_diffusion_loss,
    block_diffusion_sequence_bounds,
    block_diffusion_validation_losses,
)
from sedd.graph import Graph, graph_from_config
from sedd.likelihood import BoundReport, block_bounds, exact_block_nll, prior_kl, sequence_bounds, summarize
from sedd.losses import ar_loss, sample_times, score_entropy_loss
from sedd.model import SEDD, ARModel, BlockSEDD
from sedd.model.checkpoint import DEFAULT_OBJECTIVE, config_objective
from sedd.model.scoring import unwrap
from sedd.noise import Noise, noise_from_config
from sedd.sampling import SamplingSpec, SamplingStats, sample, sample_ancestral, sample_block_diffusion
from sedd.sampling.spec import FAMILIES

__all__ = ["OBJECTIVES", "Autoregressive", "BlockDiffusion", "ContinuationScore", "Diffusion", "Objective",
           "get_objective",
           "objective_of", "register_objective"]

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
    # train/run.py flags of this objective alone, {key: (default, help)}: every other objective refuses them
    flags: ClassVar[dict[str, tuple[Any, str]]] = {}

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


@register_objective
class Diffusion(Objective):
    """SEDD: the score-entropy loss at a random time on a forward process, the reverse-process
    samplers, the likelihood bound."""

    name = "sedd"
    label = "diffusion"
    model_class = SEDD
    sampler = "reverse"
    loss_label = "score entropy (nats per token)"  # train/run.py's loss.png

    def __init__(self, config: dict | None = None, *, training: dict | None = None):
        super().__init__(config, training=training)
        if config:
            self.graph, self.noise = graph_from_config(config), noise_from_config(config)
            self.time_conditioning = config.get("model", {}).get("time_conditioning", True) is not False

    @classmethod
    def model_config(cls, run: dict, tokens: int, model_keys: dict) -> dict:
        return SEDD.config_for(run["preset"], graph=run["graph"], tokens=tokens,
                               noise={"type": run["noise"], "sigma_min": run["sigma_min"],
                                      "sigma_max": run["sigma_max"], "eps": run["noise_eps"]},
                               time_conditioning=run["time_conditioning"] == "on", **model_keys)

    def describe(self) -> str:
        noise = self.config.get("noise", {}).get("type") if self.config else self.noise
        return f"graph {self.graph.name if self.graph else None}, noise {noise}"

    def loss(self, model, x0, generator, scale: float, **model_kwargs) -> torch.Tensor:
        # scale (1/grad_accum) rides in the fused loss's per-row weight: no extra pass over the gradient
        return score_entropy_loss(model, x0, self.graph, self.noise, generator=generator,
                                  sampling_eps=self.training["sampling_eps"], scale=scale, **model_kwargs)

    def validation_losses(self, net, x0, generators, **model_kwargs) -> torch.Tensor:
        ts, xts = [], []
        for row, g in enumerate(generators):
            t = sample_times(1, self.training["sampling_eps"], device=x0.device, generator=g)
            ts.append(t)
            xts.append(ops.sample_transition(x0[row : row + 1], self.noise(t)[0], self.graph, g))
        return score_entropy_loss(net, x0, self.graph, self.noise, t=torch.cat(ts), x_t=torch.cat(xts),
                                  reduction="none", **model_kwargs)

    def likelihood(self, model, blocks, mask, *, num_samples, time_sampler, batch_size, generator=None,
                   device=None, on_progress=None) -> BoundReport:
        parts = block_bounds(model, blocks, mask, self.graph, self.noise, num_samples=num_samples,
                             time_sampler=time_sampler, batch_size=batch_size, generator=generator, device=device,
                             on_draws=on_progress, estimator=self.bound_estimator)
        return summarize(parts, num_samples, time_sampler)

    def bound_estimator(self, model, x0, graph, noise, **estimator):
        """:meth:`sequence_bounds` as :func:`sedd.likelihood.block_bounds` calls its ``estimator``."""
        return self.sequence_bounds(model, x0, **estimator)

    def sequence_bounds(self, model, x0, **estimator):
        return sequence_bounds(model, x0, self.graph, self.noise, **estimator)

    def likelihood_work(self, blocks: int, num_samples: int) -> tuple[int, str]:
        return blocks * num_samples, "draw"

    def prior_nats_per_token(self) -> float:
        return prior_kl(self.graph, self.noise)

    def likelihood_calls(self, blocks: int, num_samples: int, batch_size: int) -> tuple[int, int]:
        calls = widest = 0
        for start in range(0, blocks, batch_size):
            rows = min(batch_size, blocks - start)
            per_call = max(1, batch_size // rows)  # draws of the same block share a call (sequence_bounds)
            calls += -(-num_samples // per_call)
            widest = max(widest, rows * min(per_call, num_samples))
        return calls, widest

    def likelihood_probe(self, model, x, generator=None) -> None:
        with torch.no_grad():
            score_entropy_loss(model, x, self.graph, self.noise, generator=generator, reduction="none")

    def continuation_refusal(self) -> str | None:
        if self.graph is None or self.graph.absorbing:
            return None
        return (f"needs a model on the absorbing graph; this one uses the {self.graph.name} graph, on which holding "
                "the context fixed does not give the exact conditional (the model cannot tell a clean context token "
                "from a noisy one)")

    def continuation(self, model, tokens, context, *, num_samples, time_sampler, batch_size, generator=None):
        # the context stays clean in every draw and only the continuation is noised (docs/math.md,
        # "Likelihood bound", in lm-evaluation-harness)
        maskable = torch.zeros_like(tokens, dtype=torch.bool)
        maskable[:, context:] = True
        out = self.sequence_bounds(model, tokens, num_samples=num_samples, time_sampler=time_sampler,
                                   batch_size=batch_size, generator=generator, maskable=maskable)
        return ContinuationScore(float(out["integral"][0] + out["prior"][0]), float(out["variance"][0]),
                                 self._greedy(model, tokens, context))

    @torch.no_grad()
    def _greedy(self, model, tokens: torch.Tensor, context: int) -> bool:
        # every continuation position masked, at the σ where that fraction is masked on average
        L = tokens.shape[1]
        x = tokens.clone()
        x[:, context:] = self.graph.mask_id
        top = float(self.noise.total(torch.tensor(1.0, dtype=torch.float64)))
        sigma = min(-math.log1p(-(L - context) / L) if context else top, top)
        out = model(x, torch.full((1,), sigma, device=tokens.device))  # [1, L, V] log-scores
        best = out[0, context:, : self.graph.N].argmax(-1)
        return bool(torch.equal(best, tokens[0, context:]))

    def sample(self, model, **request):
        return sample(model, self.graph, self.noise, return_stats=True, **request)

    def training_spec(self, *, fsdp: bool = False) -> SamplingSpec:
        return SamplingSpec(steps=self.training["sample_steps"])

    def sample_note(self) -> str:
        return f"{self.training['sample_steps']} analytic steps"


@register_objective
class Autoregressive(Objective):
    """The autoregressive baseline on the same trunk: causal attention, no σ, the exact next-token
    cross entropy, ancestral samples, the exact NLL."""

    name = "ar"
    label = "autoregressive"
    model_class = ARModel
    sampler = "ancestral"
    exact = True
    loss_label = "cross entropy (nats per token)"
    # it has no forward process, no time and no reverse steps
    refused_flags = ("graph", "noise", "noise_eps", "sigma_min", "sigma_max", "time_conditioning", "sampling_eps",
                     "sample_steps")
    refused_because = "an autoregressive model has no forward process, noise schedule or reverse steps"

    @classmethod
    def model_config(cls, run: dict, tokens: int, model_keys: dict) -> dict:
        return ARModel.config_for(run["preset"], tokens=tokens, **model_keys)

    def describe(self) -> str:
        return "autoregressive (causal attention, no sigma)"

    def loss(self, model, x0, generator, scale: float, **model_kwargs) -> torch.Tensor:
        return ar_loss(model, x0, scale=scale, **model_kwargs)  # no randomness beyond dropout

    def validation_losses(self, net, x0, generators, **model_kwargs) -> torch.Tensor:
        return ar_loss(net, x0, reduction="none", **model_kwargs)

    def likelihood(self, model, blocks, mask, *, num_samples, time_sampler, batch_size, generator=None,
                   device=None, on_progress=None) -> BoundReport:
        parts = exact_block_nll(model, blocks, mask, batch_size=batch_size, device=device, on_blocks=on_progress)
        return summarize(parts, 1, "exact", exact=True)

    def likelihood_work(self, blocks: int, num_samples: int) -> tuple[int, str]:
        return blocks, "block"

    def likelihood_calls(self, blocks: int, num_samples: int, batch_size: int) -> tuple[int, int]:
        return math.ceil(blocks / batch_size), min(blocks, batch_size)

    def likelihood_probe(self, model, x, generator=None) -> None:
        with torch.no_grad():
            ar_loss(model, x, reduction="none")

    def continuation_refusal(self) -> str | None:
        return None

    @torch.no_grad()
    def continuation(self, model, tokens, context, *, num_samples, time_sampler, batch_size, generator=None):
        # one forward: logits[i] scores tokens[i] given tokens[:i], exactly (no draws)
        logits = model(tokens)[0, context:].double()
        target = tokens[0, context:]
        nll = -logits.log_softmax(-1).gather(-1, target[:, None]).sum()
        return ContinuationScore(float(nll), 0.0, bool(torch.equal(logits.argmax(-1), target)))

    def sample(self, model, **request):
        return sample_ancestral(model, return_stats=True, **request)

    def training_spec(self, *, fsdp: bool = False) -> SamplingSpec:
        # the KV cache reads the weights outside forward(), where FSDP2 has not gathered them:
        # under FSDP every position re-runs the forward instead (the same tokens)
        return SamplingSpec(kv_cache=not fsdp)

    def sample_note(self) -> str:
        return "ancestral, one network evaluation per token"

    def default_steps(self, window: int) -> int | None:
        return None  # one evaluation per token, no steps



@register_objective
class BlockDiffusion(Diffusion):
    """Block diffusion (BD3-LM with SEDD's score entropy, :mod:`sedd.block_diffusion`): blocks of b
    tokens, each an absorbing SEDD model of its tokens given the clean blocks before it; the sum of
    the blocks' bounds; generation block by block over a KV cache (docs/math.md, "Block diffusion")."""

    name = "block"
    label = "block-diffusion"
    model_class = BlockSEDD
    sampler = "block"
    loss_label = "score entropy over blocks (nats per sequence)"
    flags = {"block_size": (16, "--objective block: tokens per diffusion block, a divisor of --length (1 is "
                                "autoregressive, --length is SEDD)")}
    implied_flags = {
        "graph": ("absorb", "a block's score given the clean blocks before it is the absorbing graph's"),
        "time_conditioning": ("off", "every block has its own sigma, which enters through its score shift alone"),
    }
    # the end-of-run samples take one reverse step per token of each block
    refused_flags = ("sample_steps",)
    refused_because = "a block model's samples at the end of the run take one reverse step per token of each block"

    @classmethod
    def check_run(cls, run: dict) -> None:
        b, L = run["block_size"], run["length"]
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"--block-size must be a positive integer, got {b!r}")
        if L % b:
            divisors = ", ".join(str(d) for d in range(1, L + 1) if L % d == 0)
            raise ValueError(f"--block-size {b} must divide --length {L}: the blocks tile every training sequence "
                             f"({divisors})")

    @classmethod
    def model_config(cls, run: dict, tokens: int, model_keys: dict) -> dict:
        return BlockSEDD.config_for(run["preset"], block_size=run["block_size"], tokens=tokens,
                                    noise={"type": run["noise"], "sigma_min": run["sigma_min"],
                                           "sigma_max": run["sigma_max"], "eps": run["noise_eps"]}, **model_keys)

    @property
    def block_size(self) -> int | None:
        return self.config.get("model", {}).get("block_size") if self.config else None

    @property
    def min_window(self) -> int | None:
        return self.block_size  # a block reads itself at least

    def describe(self) -> str:
        return f"block diffusion, blocks of {self.block_size} tokens, {super().describe()}, no sigma input"

    def loss(self, model, x0, generator, scale: float, **model_kwargs) -> torch.Tensor:
        return block_diffusion_loss(model, x0, self.graph, self.noise, generator=generator,
                                    sampling_eps=self.training["sampling_eps"], scale=scale, **model_kwargs)

    def validation_losses(self, net, x0, generators, **model_kwargs) -> torch.Tensor:
        return block_diffusion_validation_losses(net, x0, self.graph, self.noise, generators,
                                                 sampling_eps=self.training["sampling_eps"], **model_kwargs)

    def _whole_blocks(self, x0: torch.Tensor, *masks: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """``x0`` [B, n] padded to a multiple of b, and ``masks`` ([B, n] bool, None: all True) with
        False on the padding, which is never attended to nor scored: the bound is that of the
        unpadded tokens (any evaluation length works, e.g. ``train/eval.py --block-size``). Without
        padding the masks come back as given (None stays None)."""
        pad = -x0.shape[1] % self.block_size
        if not pad:
            return (x0, *masks)
        return (F.pad(x0, (0, pad)),
                *(F.pad(torch.ones_like(x0, dtype=torch.bool) if m is None else m, (0, pad), value=False)
                  for m in masks))

    def sequence_bounds(self, model, x0, *, attention_mask=None, maskable=None, **estimator):
        x0, attention_mask, *maskable = self._whole_blocks(x0, attention_mask, *([] if maskable is None else [maskable]))
        return block_diffusion_sequence_bounds(model, x0, self.graph, self.noise, attention_mask=attention_mask,
                                               maskable=maskable[0] if maskable else None, **estimator)

    @torch.no_grad()
    def _greedy(self, model, tokens, context):
        # every continuation position masked, each block read against the clean blocks before it
        # (its own context positions clean); no σ input and a block's σ shifts all its scores
        # alike, so the raw output has the scores' argmax
        n = tokens.shape[1]
        x0, mask = self._whole_blocks(tokens, None)
        x_t = x0.clone()
        x_t[:, context:] = self.graph.mask_id
        best = model(x_t, x0, raw=True, attention_mask=mask)[0, context:n, : self.graph.N].argmax(-1)
        return bool(torch.equal(best, tokens[0, context:]))

    def likelihood_probe(self, model, x, generator=None) -> None:
        x, mask = self._whole_blocks(x, None)
        with torch.no_grad():
            block_diffusion_loss(model, x, self.graph, self.noise, generator=generator, reduction="none",
                                 attention_mask=mask)

    def sample(self, model, **request):
        return sample_block_diffusion(model, self.graph, self.noise, return_stats=True, **request)

    def training_spec(self, *, fsdp: bool = False) -> SamplingSpec:
        # the KV cache reads the weights outside forward(), where FSDP2 has not gathered them:
        # under FSDP every network call re-runs the clean blocks instead (the same tokens)
        return SamplingSpec(kv_cache=not fsdp, cache=True)

    def sample_note(self) -> str:
        return f"blocks of {self.block_size}, one analytic step per token of each, exact cache"

    def default_steps(self, window: int) -> int | None:
        return self.block_size  # each block's sampler runs on its b tokens
