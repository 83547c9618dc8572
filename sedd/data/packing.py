"""Packing: a token stream cut into fixed blocks, and the document boundaries inside a block."""

from __future__ import annotations

import mmap
from typing import Sequence

import numpy as np
import torch


class PackedBlocks(torch.utils.data.Dataset):
    """A token stream cut into ``len(self) = N // block_size`` contiguous, non-overlapping blocks
    (block i = tokens[i * block_size : (i + 1) * block_size]); the last N % block_size tokens are
    dropped. Documents run across block boundaries; EOS tokens already separate them.

    Args:
        tokens: [N] integer array, typically the memmap from :func:`tokenize` (read lazily).
        block_size: L, tokens per block.
    """

    def __init__(self, tokens: np.ndarray, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.num_blocks = len(tokens) // block_size
        self._set_tokens(tokens)

    def _set_tokens(self, tokens: np.ndarray) -> None:
        self._tokens = tokens
        n = self.num_blocks * self.block_size
        self._blocks = tokens[:n].reshape(self.num_blocks, self.block_size)

    def __getstate__(self):
        # Pickled into DataLoader workers (spawn) as the file to map, not as a copy of the data.
        state = dict(self.__dict__, _blocks=None)
        t = self._tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap) and t.filename:
            state["_tokens"] = ("memmap", t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state):
        tokens = state.pop("_tokens")
        self.__dict__.update(state)
        if isinstance(tokens, tuple) and tokens[0] == "memmap":
            _, filename, dtype, offset, shape = tokens
            tokens = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset,
                               shape=shape)
        self._set_tokens(tokens)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        """Block i: int64 tensor [L]."""
        return torch.from_numpy(np.asarray(self._blocks[i], dtype=np.int64))

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Blocks ``indices`` stacked in the given order: int64 tensor [len(indices), L]."""
        return torch.from_numpy(self._blocks[np.asarray(indices, dtype=np.int64)].astype(np.int64))


def segment_ids(blocks: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the document each position belongs to, counted from 0 within each block.

    A document's EOS belongs to that document; the next document starts after it. Use for
    attention masks with no cross-document attention (attend where segment ids are equal).

    Args:
        blocks: integer tensor [..., L] of token ids.
    Returns:
        int64 tensor [..., L], non-decreasing along the last dimension.
    """
    is_eos = (blocks == eos_id).long()
    return is_eos.cumsum(-1) - is_eos
