"""Every kernel launch runs under :func:`on_device` of its tensors.

Triton's launcher takes the *current* CUDA device and its current stream, not the device of the
tensors it is given. With the tensors on cuda:1 while cuda:0 is current, a launch either fails
("Pointer argument cannot be accessed from Triton") or runs on GPU 0's stream, unordered with the
work queued on GPU 1. Making the tensors' device current for the launch (and restoring the
previous one after) fixes both: the stream Triton then picks is that device's current stream.
"""

from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current for a launch; a null context elsewhere (CPU
    tensors under Triton's interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
