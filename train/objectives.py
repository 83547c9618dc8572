"""What train/run.py trains, behind one interface: SEDD (score entropy on a forward process) or
the autoregressive baseline on the same trunk (``--objective ar``: causal attention, next-token
cross entropy, no σ). The loop, the data, the optimizer, EMA, checkpoints, resume, DDP/FSDP2 and
``--compile`` are the same for both; only the model, its loss, its validation loss and its
samples differ, and they are here.

Both losses are in nats per sequence (summed over the tokens of a block, averaged over blocks):
the autoregressive one is the exact −log p(block), SEDD's an upper bound on it in expectation
(docs/math.md, "Training loss", "Autoregressive baseline"). The run's log divides them by the
block's length (nats per token); ``bound`` and :meth:`prior_nats_per_token` say how a perplexity
follows from that.
"""

from __future__ import annotations

import torch

from sedd import ops
from sedd.graph import graph_from_config
from sedd.likelihood import prior_kl
from sedd.losses import ar_loss, sample_times, score_entropy_loss
from sedd.model import SEDD, ARModel
from sedd.noise import noise_from_config
from sedd.sampling import sample, sample_ancestral

__all__ = ["Autoregressive", "Diffusion", "OBJECTIVES", "make_objective"]


class Diffusion:
    """SEDD: the score-entropy loss at a random time, the analytic sampler."""

    name = "sedd"
    loss_label = "score entropy (nats per token)"
    bound = True  # the validation loss estimates an upper bound on −log p (with the prior term)

    def __init__(self, config: dict, cfg: dict):
        self.cfg = cfg
        self.graph, self.noise = graph_from_config(config), noise_from_config(config)

    def describe(self) -> str:
        return f"graph {self.cfg['graph']}, noise {self.cfg['noise']}"

    def prior_nats_per_token(self) -> float:
        """The bound's prior term, which the training loss leaves out (docs/math.md, "Likelihood bound")."""
        return prior_kl(self.graph, self.noise)

    def build(self, config: dict, autocast_dtype) -> SEDD:
        return SEDD(config, autocast_dtype=autocast_dtype)

    def loss(self, model, x0, generator, scale: float, **model_kwargs) -> torch.Tensor:
        # scale (1/grad_accum) rides in the fused loss's per-row weight: no extra pass over the gradient
        return score_entropy_loss(model, x0, self.graph, self.noise, generator=generator,
                                  sampling_eps=self.cfg["sampling_eps"], scale=scale, **model_kwargs)

    def validation_losses(self, net, x0, generators: list[torch.Generator], **model_kwargs) -> torch.Tensor:
        """[B] losses of fixed validation blocks, each block's t and noise from its own generator."""
        ts, xts = [], []
        for row, g in enumerate(generators):
            t = sample_times(1, self.cfg["sampling_eps"], device=x0.device, generator=g)
            ts.append(t)
            xts.append(ops.sample_transition(x0[row : row + 1], self.noise(t)[0], self.graph, g))
        return score_entropy_loss(net, x0, self.graph, self.noise, t=torch.cat(ts), x_t=torch.cat(xts),
                                  reduction="none", **model_kwargs)

    def sample(self, net, n: int, generator, device, *, progress: bool, fsdp: bool) -> torch.Tensor:
        return sample(net, self.graph, self.noise, batch_size=n, length=self.cfg["sample_length"],
                      steps=self.cfg["sample_steps"], predictor="analytic", generator=generator, device=device,
                      progress=progress)

    def sample_note(self) -> str:
        return f"{self.cfg['sample_steps']} analytic steps"


class Autoregressive:
    """The autoregressive baseline: the exact next-token cross entropy, ancestral samples."""

    name = "ar"
    loss_label = "cross entropy (nats per token)"
    bound = False  # the exact −log p

    def __init__(self, config: dict, cfg: dict):
        self.cfg = cfg

    def describe(self) -> str:
        return "autoregressive (causal attention, no sigma)"

    def prior_nats_per_token(self) -> float:
        return 0.0

    def build(self, config: dict, autocast_dtype) -> ARModel:
        return ARModel(config, autocast_dtype=autocast_dtype)

    def loss(self, model, x0, generator, scale: float, **model_kwargs) -> torch.Tensor:
        return ar_loss(model, x0, scale=scale, **model_kwargs)  # no randomness beyond dropout

    def validation_losses(self, net, x0, generators, **model_kwargs) -> torch.Tensor:
        return ar_loss(net, x0, reduction="none", **model_kwargs)

    def sample(self, net, n: int, generator, device, *, progress: bool, fsdp: bool) -> torch.Tensor:
        # the KV cache reads the weights outside forward(), where FSDP2 has not gathered them:
        # under FSDP every position re-runs the forward instead (the same tokens)
        return sample_ancestral(net, batch_size=n, length=self.cfg["sample_length"], generator=generator,
                                device=device, progress=progress, kv_cache=not fsdp)

    def sample_note(self) -> str:
        return "ancestral, one network evaluation per token"


OBJECTIVES = {"sedd": Diffusion, "ar": Autoregressive}


def make_objective(config: dict, cfg: dict) -> Diffusion | Autoregressive:
    """The objective of the run ``cfg`` (``cfg["objective"]``) for its model ``config``."""
    return OBJECTIVES[cfg["objective"]](config, cfg)
