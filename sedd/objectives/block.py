"""Block diffusion on SEDD's trunk (:mod:`sedd.objectives`; the model :class:`sedd.model.BlockSEDD`,
the loss and bound :mod:`sedd.block_diffusion`, the sampler :mod:`sedd.sampling.block`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sedd.block_diffusion import (
    block_diffusion_loss,
    block_diffusion_sequence_bounds,
    block_diffusion_validation_losses,
    mask_rate_range,
)
from sedd.model import BlockSEDD
from sedd.objectives.base import register_objective
from sedd.objectives.diffusion import Diffusion
from sedd.sampling import SamplingSpec, sample_block_diffusion

__all__ = ["BlockDiffusion"]

FULL_RANGE = "0,1"  # --mask-rate-range: every masking rate, the bound's own draws
# --mask-rate-range auto: BD3-LM's ranges by block size (their LM1B search), the largest b each
# applies to; larger blocks train on every rate (b = L is SEDD). b = 4, 8 and 16 measured here
# (benchmarks/results/block-cpu-2026-12-07.md, "The clipped ranges by block size").
CLIPPED_RANGES = ((4, "0.45,0.95"), (16, "0.3,0.8"))


def auto_mask_rates(block_size: int) -> str:
    """``--mask-rate-range auto`` for blocks of ``block_size`` tokens."""
    return next((rates for largest, rates in CLIPPED_RANGES if block_size <= largest), FULL_RANGE)


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
    flags = {
        "block_size": (16, "--objective block: tokens per diffusion block, a divisor of --length (1 is "
                           "autoregressive, --length is SEDD)"),
        "mask_rate_range": ("auto", "--objective block: BETA,OMEGA, 0 <= BETA < OMEGA <= 1: each block's training "
                                    "time is drawn among those whose masking rate lies in [BETA, OMEGA] (BD3-LM's "
                                    "clipped schedule: a training loss of lower variance; the validation loss and "
                                    "eval.py's bound keep the whole range); 0,1: every rate; auto: BD3-LM's range for "
                                    "the block size, 0.45,0.95 up to b = 4, 0.3,0.8 up to 16, else 0,1"),
    }
    training_flags = ("mask_rate_range",)
    implied_flags = {
        "graph": ("absorb", "a block's score given the clean blocks before it is the absorbing graph's"),
    }
    default_flags = {
        "time_conditioning": ("off", "at the cpu preset, per-block sigma conditioning gave b = 4 a worse bound "
                                     "(benchmarks/results/block-cpu-2026-12-07.md); BD3-LM's models read no sigma either"),
    }
    # the end-of-run samples take one reverse step per token of each block
    refused_flags = ("sample_steps",)
    refused_because = "a block model's samples at the end of the run take one reverse step per token of each block"

    @classmethod
    def check_run(cls, run: dict) -> None:
        rates = run.get("mask_rate_range", FULL_RANGE)  # a run saved before the flag: all of them
        try:
            if rates != "auto":
                mask_rate_range(rates)
        except ValueError:
            raise ValueError(f"--mask-rate-range must be auto or BETA,OMEGA with 0 <= BETA < OMEGA <= 1, got "
                             f"{rates!r}") from None
        b, L = run["block_size"], run["length"]
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"--block-size must be a positive integer, got {b!r}")
        if L % b:
            divisors = ", ".join(str(d) for d in range(1, L + 1) if L % d == 0)
            raise ValueError(f"--block-size {b} must divide --length {L}: the blocks tile every training sequence "
                             f"({divisors})")

    @classmethod
    def settle_run(cls, run: dict) -> None:
        if run.get("mask_rate_range") == "auto":
            run["mask_rate_range"] = auto_mask_rates(run["block_size"])

    @classmethod
    def model_config(cls, run: dict, tokens: int, model_keys: dict) -> dict:
        return BlockSEDD.config_for(run["preset"], block_size=run["block_size"], tokens=tokens,
                                    **cls.process_keys(run), **model_keys)

    @property
    def block_size(self) -> int | None:
        return self.config.get("model", {}).get("block_size") if self.config else None

    @property
    def min_window(self) -> int | None:
        return self.block_size  # a block reads itself at least

    @property
    def mask_rate_range(self) -> tuple[float, float]:
        """The masking rates the training draws within (a config that records none: all of them)."""
        return mask_rate_range(self.training.get("mask_rate_range", FULL_RANGE))

    def describe(self) -> str:
        sigma = "sigma per block" if self.time_conditioning else "no sigma input"
        words = f"block diffusion, blocks of {self.block_size} tokens, {super().describe()}, {sigma}"
        if self.mask_rate_range != (0.0, 1.0):
            words += ", trained on mask rates in [{:g}, {:g}]".format(*self.mask_rate_range)
        return words

    def loss(self, model, x0, generator, scale: float, **model_kwargs) -> torch.Tensor:
        clipped = self.mask_rate_range
        return block_diffusion_loss(model, x0, self.graph, self.noise, generator=generator,
                                    sampling_eps=self.training["sampling_eps"], scale=scale,
                                    mask_rate_range=None if clipped == (0.0, 1.0) else clipped, **model_kwargs)

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
        # (its own context positions clean), at the σ where its masked fraction is masked on
        # average (as SEDD's); a block's σ shifts all its scores alike, so the raw output has
        # the scores' argmax
        n = tokens.shape[1]
        x0, mask = self._whole_blocks(tokens, None)
        x_t = x0.clone()
        x_t[:, context:] = self.graph.mask_id
        b = self.block_size
        masked = (x_t == self.graph.mask_id).view(1, -1, b).double().mean(-1)  # [1, K]
        top = float(self.noise.total(torch.tensor(1.0, dtype=torch.float64)))
        floor = float(self.noise.total(torch.tensor(self.training["sampling_eps"], dtype=torch.float64)))
        sigma = (-torch.log1p(-masked.clamp_max(1 - math.exp(-top)))).clamp(floor, top).float().to(x0.device)
        best = model(x_t, x0, sigma, raw=True, attention_mask=mask)[0, context:n, : self.graph.N].argmax(-1)
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
        return SamplingSpec(kv_cache=not fsdp, cache=not self.time_conditioning)

    def sample_note(self) -> str:
        cache = "" if self.time_conditioning else ", exact cache"
        return f"blocks of {self.block_size}, one analytic step per token of each{cache}"

    def default_steps(self, window: int) -> int | None:
        return self.block_size  # each block's sampler runs on its b tokens

    def steps_sweep(self, window: int) -> list[int]:
        # per block: a quarter, half and one network evaluation per token (16, 32, 64 steps per
        # block would cost up to 16 evaluations per token at b = 4)
        b = self.block_size
        return sorted({max(1, b // 4), max(1, b // 2), b})
