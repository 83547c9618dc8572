"""SEDD, the default objective (:mod:`sedd.objectives`)."""

from __future__ import annotations

import math

import torch

from sedd import ops
from sedd.graph import graph_from_config
from sedd.likelihood import BoundReport, block_bounds, prior_kl, sequence_bounds, summarize
from sedd.losses import sample_times, score_entropy_loss
from sedd.model import SEDD
from sedd.noise import noise_from_config
from sedd.objectives.base import ContinuationScore, Objective, register_objective
from sedd.sampling import SamplingSpec, sample

__all__ = ["Diffusion"]


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

    @staticmethod
    def process_keys(run: dict) -> dict:
        """The forward-process keywords of ``config_for`` from a train/run.py configuration: the
        noise schedule and whether the network reads σ."""
        return {"noise": {"type": run["noise"], "sigma_min": run["sigma_min"], "sigma_max": run["sigma_max"],
                          "eps": run["noise_eps"]},
                "time_conditioning": run["time_conditioning"] == "on"}

    @classmethod
    def model_config(cls, run: dict, tokens: int, model_keys: dict) -> dict:
        return SEDD.config_for(run["preset"], graph=run["graph"], tokens=tokens, **cls.process_keys(run),
                               **model_keys)

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
                             on_draws=on_progress, estimator=self._bound_estimator)
        return summarize(parts, num_samples, time_sampler)

    def _bound_estimator(self, model, x0, graph, noise, **estimator):
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
