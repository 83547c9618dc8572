"""Block diffusion on SEDD's trunk (:mod:`sedd.objectives`; the model :class:`sedd.model.BlockSEDD`,
the loss and bound :mod:`sedd.block_diffusion`, the sampler :mod:`sedd.sampling.block`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sedd.block_diffusion import (
    block_diffusion_loss,
    block_diffusion_sequence_bounds,
    block_diffusion_validation_losses,
)
from sedd.model import BlockSEDD
from sedd.objectives.base import register_objective
from sedd.objectives.diffusion import Diffusion
from sedd.sampling import SamplingSpec, sample_block_diffusion

__all__ = ["BlockDiffusion"]


@register_objective
class BlockDiffusion(Diffusion):
    """Block diffusion (BD3-LM with SEDD's score entropy, :mod:`sedd.block_diffusion`): blocks of b
    tokens, each an absorbing SEDD model of its tokens given the clean blocks before it; the sum of
    the blocks' bounds; generation block by block over a KV cache (docs/math.md, "Block diffusion")."""

    name = "block"
    label = "block-diffusion"
    model_class = BlockSEDD
    sampler = "block"
    loss_label = "score entropy over blocks (nats per token)"  # train/run.py's loss.png
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

    def steps_sweep(self, window: int) -> list[int]:
        # per block: a quarter, half and one network evaluation per token (16, 32, 64 steps per
        # block would cost up to 16 evaluations per token at b = 4)
        b = self.block_size
        return sorted({max(1, b // 4), max(1, b // 2), b})
