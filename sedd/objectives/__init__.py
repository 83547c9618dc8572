"""What a model is trained for, behind one interface: the objectives and their registry.

A checkpoint's ``config.json`` names its objective (``"objective"``, absent and so ``"sedd"`` in the
public checkpoints); :data:`OBJECTIVES` maps the name to the class that knows everything that
differs between objectives, so no other module compares the name:

* the model: ``model_class`` (which also names the objective, ``model_class.objective``),
  :meth:`Objective.model_config` (a run's config.json) and :meth:`Objective.build`;
* training: :meth:`Objective.loss`, :meth:`Objective.validation_losses`, ``loss_label``, the
  training flags it does not read (``refused_flags``, refused by ``train/config.py``), those it
  fixes (``implied_flags``), those whose default it changes (``default_flags``), its own (``flags``: every other objective refuses them) and the check
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

The package: ``base.py`` (the interface, the registry, :func:`objective_of`), and one module per
objective: ``diffusion.py`` (SEDD), ``autoregressive.py`` (the baseline), ``block.py`` (block
diffusion); this face imports them, which registers them, and re-exports every public name.

Adding an objective: a model class in :mod:`sedd.model` that sets ``objective = "name"`` (a
:class:`~sedd.model.checkpoint.Checkpointed`), and a subclass of :class:`Objective` in a module of
this package decorated with :func:`register_objective`, imported below; ``train/run.py --objective
name``, ``load_pretrained``, the samplers, ``train/eval.py``, the CLIs and the harness then take it.
"""

# the registry's order (sedd, ar, block) is the order of these imports: the command line's choices
from sedd.objectives.base import (  # noqa: I001
    OBJECTIVES,
    TRAINING_DEFAULTS,
    ContinuationScore,
    Objective,
    get_objective,
    objective_of,
    register_objective,
)
from sedd.objectives.diffusion import Diffusion
from sedd.objectives.autoregressive import Autoregressive
from sedd.objectives.block import BlockDiffusion

__all__ = ["OBJECTIVES", "TRAINING_DEFAULTS", "Autoregressive", "BlockDiffusion", "ContinuationScore", "Diffusion",
           "Objective", "get_objective", "objective_of", "register_objective"]
