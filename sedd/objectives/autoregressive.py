"""The autoregressive baseline on SEDD's trunk (:mod:`sedd.objectives`)."""

from __future__ import annotations

import math

import torch

from sedd.likelihood import BoundReport, exact_block_nll, summarize
from sedd.losses import ar_loss
from sedd.model import ARModel
from sedd.objectives.base import ContinuationScore, Objective, register_objective
from sedd.sampling import SamplingSpec, sample_ancestral

__all__ = ["Autoregressive"]


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
