"""sedd.likelihood's conditional bound (``maskable``) and the block helpers shared with train/eval.py."""

from __future__ import annotations

import pytest
import torch

from sedd.graph import Absorbing, Uniform
from sedd.likelihood import block_bounds, make_blocks, prior_kl, sequence_bounds
from sedd.noise import Geometric, LogLinear
from tests.helpers import FactorizedScore


class Spy(torch.nn.Module):
    """A factorised exact score that records every noisy batch it is shown (and takes an
    attention mask, which a factorised score has no use for)."""

    def __init__(self, graph, pi=None):
        super().__init__()
        self.inner = FactorizedScore(torch.arange(1.0, graph.N + 1) if pi is None else pi, graph)
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t, sigma, attention_mask=None):
        self.seen.append(x_t.clone())
        return self.inner(x_t, sigma)


def test_held_positions_are_never_masked_and_the_prior_counts_the_rest():
    graph, noise = Absorbing(5), LogLinear()
    spy = Spy(graph)
    x0 = torch.tensor([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 1]])
    maskable = torch.tensor([[False, False, True, True, True, True], [False, True, False, True, False, True]])
    out = sequence_bounds(spy, x0, graph, noise, num_samples=64, generator=torch.Generator().manual_seed(0),
                          maskable=maskable)
    seen = torch.cat(spy.seen)  # [64 * 2, 6], draw-major
    held = ~maskable.repeat(64, 1)
    assert torch.equal(seen[held], x0.repeat(64, 1)[held])  # the context stays clean in every draw
    assert (seen[~held] == graph.mask_id).float().mean() > 0.3  # the rest is masked (t is uniform)
    assert out["tokens"].tolist() == [4.0, 3.0]
    torch.testing.assert_close(out["prior"], out["tokens"] * prior_kl(graph, noise))


def test_all_maskable_is_the_unconditional_bound_draw_for_draw():
    graph, noise = Absorbing(5), LogLinear()
    model = FactorizedScore(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), graph)
    x0 = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1], [2, 2, 2, 2]])
    kwargs = dict(num_samples=8, batch_size=6, time_sampler="antithetic")
    plain = sequence_bounds(model, x0, graph, noise, generator=torch.Generator().manual_seed(3), **kwargs)
    every = sequence_bounds(model, x0, graph, noise, generator=torch.Generator().manual_seed(3),
                            maskable=torch.ones_like(x0, dtype=torch.bool), **kwargs)
    for key in plain:
        assert torch.equal(plain[key], every[key]), key


def test_conditional_bound_refuses_the_uniform_graph_and_bad_masks():
    graph = Uniform(5)
    model = FactorizedScore(torch.ones(5), graph)
    x0 = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="absorbing graph"):
        sequence_bounds(model, x0, graph, Geometric(), num_samples=2, maskable=torch.ones(1, 3, dtype=torch.bool))
    graph = Absorbing(5)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        sequence_bounds(FactorizedScore(torch.ones(5), graph), x0, graph, LogLinear(), num_samples=2,
                        maskable=torch.ones(1, 2, dtype=torch.bool))


def test_block_bounds_is_sequence_bounds_per_batch_of_blocks():
    graph, noise = Absorbing(5), LogLinear()
    model = Spy(graph, torch.tensor([5.0, 1.0, 1.0, 2.0, 1.0]))
    blocks, mask = make_blocks(list(range(5)) * 3, 4, "pad", None, pad_id=0)  # 15 tokens: 4 blocks, last padded
    assert blocks.shape == (4, 4) and mask.sum().item() == 15 and mask[3].tolist() == [True, True, True, False]
    parts = block_bounds(model, blocks, mask, graph, noise, num_samples=4, batch_size=3,
                         generator=torch.Generator().manual_seed(1))
    assert [len(p["tokens"]) for p in parts] == [3, 1]
    g = torch.Generator().manual_seed(1)
    first = sequence_bounds(model, blocks[:3], graph, noise, num_samples=4, batch_size=3, generator=g)
    last = sequence_bounds(model, blocks[3:], graph, noise, num_samples=4, batch_size=3, generator=g,
                           attention_mask=mask[3:])
    for got, want in zip(parts, (first, last)):
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert parts[1]["tokens"].item() == 3  # padding is not counted
