"""Validation in train/run.py: the fixed validation blocks, the EMA weights swapped in, the loss in
the log's units (nats per token and the perplexity, a bound for SEDD)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from sedd import data as sdata
from train.step import doc_mask_kwargs, step_seed


def validation_set(val_tokens, cfg: dict, rank: int, world: int):
    """(blocks, this rank's share of the fixed validation set, its size): blocks spread over the
    whole split, sharded across ranks."""
    blocks = sdata.PackedBlocks(val_tokens, cfg["length"])
    n = min(cfg["val_blocks"] or len(blocks), len(blocks))
    index = np.unique(np.linspace(0, len(blocks) - 1, n).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    return blocks, np.array_split(index, world)[rank], len(index)


@contextmanager
def ema_weights(net: torch.nn.Module, ema: dict):
    """Evaluate and sample with the EMA weights, then put the training weights back."""
    params = list(net.parameters())
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema.values()):
            p.copy_(e)
    net.eval()
    try:
        yield
    finally:
        net.train()
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


@torch.no_grad()
def validation_loss(net, ema, val_blocks, index, objective, cfg, eos_id, device) -> float:
    """The training loss (EMA weights, nats per block) on the fixed validation blocks, this rank's
    share ``index`` of them, averaged over all ranks. Every block draws its t and forward noise
    (SEDD) from a generator seeded by the block's index, so successive values measure the model
    and not the draws, and the number is the same for any number of processes (up to rounding)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    index = [int(i) for i in index]
    with ema_weights(net, ema):
        for start in range(0, len(index), cfg["batch_size"]):
            chunk = index[start : start + cfg["batch_size"]]
            x0 = val_blocks.get_batch(chunk).to(device)
            # each block's draws from its own generator, so they do not depend on the blocks beside it
            generators = [torch.Generator(device).manual_seed(step_seed(cfg["seed"], 1, 0, i)) for i in chunk]
            loss = objective.validation_losses(net, x0, generators, **doc_mask_kwargs(x0, cfg, eos_id))
            total += torch.stack([loss.double().sum(), torch.tensor(float(len(chunk)), dtype=torch.float64,
                                                                    device=device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def validation_entry(loss: float, L: int, objective) -> dict:
    """A validation loss in the log's units: nats per token and the perplexity (a bound for SEDD,
    its prior term included), with the loss per block under a name that says so."""
    per_token = loss / L
    key = "val_perplexity" if objective.exact else "val_perplexity_bound"
    ppl = math.exp(min(per_token + objective.prior_nats_per_token(), 700.0))
    return {"val_loss": per_token, key: ppl, "val_loss_per_sequence": loss}


def describe_validation(entry: dict) -> str:
    bound = "val_perplexity_bound" in entry
    ppl = entry["val_perplexity_bound" if bound else "val_perplexity"]
    return f"{entry['val_loss']:.4f} nats/token, perplexity {'<= ' if bound else ''}{ppl:.5g}"
