"""Batches: seeded, resumable, rank-sharded training batches and in-order evaluation batches."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from sedd.data.packing import PackedBlocks


class BatchIterator:
    """Endless training batches of blocks, deterministic given ``seed`` and resumable exactly.

    Every epoch visits the blocks in the order of a permutation drawn from (seed, epoch) (or in
    order when ``shuffle=False``), cut into global batches of ``batch_size * world_size`` blocks;
    an incomplete last global batch is dropped. Rank r takes the r-th slice of ``batch_size``
    blocks of each global batch, so ranks never overlap and together cover every global batch.
    ``position`` counts global batches served; ``state_dict()`` saves it and
    ``load_state_dict()`` makes the next batch the one that would have come next.

    Args:
        blocks: the :class:`PackedBlocks` to draw from.
        batch_size: B, blocks per rank per step.
        seed, shuffle, rank, world_size: as above.

    Yields:
        int64 tensors [B, L] (on CPU).
    """

    def __init__(self, blocks: PackedBlocks, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, int(seed)
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.global_batch_size = batch_size * world_size
        self.batches_per_epoch = len(blocks) // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(blocks)} blocks cannot fill one global batch of "
                             f"{self.global_batch_size} (batch_size * world_size)")
        self.position = 0
        self._order_epoch, self._order = -1, None

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (0-based)."""
        return self.position // self.batches_per_epoch

    def _indices(self, position: int) -> np.ndarray:
        epoch, step = divmod(position, self.batches_per_epoch)
        if epoch != self._order_epoch:
            n = len(self.blocks)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n)
                           if self.shuffle else np.arange(n))
            self._order_epoch = epoch
        start = step * self.global_batch_size + self.rank * self.batch_size
        return self._order[start: start + self.batch_size]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.blocks.get_batch(self._indices(self.position))
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        """Plain-int state: {"position", "seed", "shuffle", "global_batch_size", "num_blocks"}."""
        return {"position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch_size": self.global_batch_size, "num_blocks": len(self.blocks)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (the saved seed wins). The data must match.

        Elastic: the position is global (blocks served in the epoch's permutation), so another
        ``batch_size * world_size`` re-splits it: the next batch starts at the first block not yet
        served in the saved epoch (the next epoch when the new batches do not fit in this one).
        The saved position must then fall on a whole number of the new global batches (it does at
        every optimizer step when the batch per step is a multiple of the new global batch)."""
        if state["num_blocks"] != len(self.blocks):
            raise ValueError(f"cannot resume: saved num_blocks={state['num_blocks']}, this iterator has "
                             f"{len(self.blocks)} (the data changed)")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self._order_epoch = -1
        saved_gbs, position = int(state["global_batch_size"]), int(state["position"])
        if saved_gbs == self.global_batch_size:
            self.position = position
            return
        epoch, step = divmod(position, len(self.blocks) // saved_gbs)
        served = step * saved_gbs  # blocks of this epoch's permutation already used
        if served % self.global_batch_size:
            raise ValueError(
                f"cannot resume: the saved position ({served} blocks into epoch {epoch}) is not a whole "
                f"number of global batches of {self.global_batch_size} (batch_size x world_size)")
        new_step = served // self.global_batch_size
        if new_step >= self.batches_per_epoch:
            epoch, new_step = epoch + 1, 0
        self.position = epoch * self.batches_per_epoch + new_step


def eval_batches(blocks: PackedBlocks, batch_size: int, *, rank: int = 0,
                 world_size: int = 1) -> Iterator[torch.Tensor]:
    """Every block exactly once, in order, for evaluation: rank r gets the r-th of ``world_size``
    contiguous, near-equal shards of the block indices (together they cover all blocks).

    Yields:
        int64 tensors [b, L] with b = batch_size except possibly for the last batch of a shard.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    shard = np.array_split(np.arange(len(blocks)), world_size)[rank]
    for s in range(0, len(shard), batch_size):
        yield blocks.get_batch(shard[s: s + batch_size])

