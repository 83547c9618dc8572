"""Forward noising x_t ~ p_{t|0}(· | x0) behind one interface: the in-kernel Philox draw
(:mod:`sedd.ops.custom_ops`) or the graph's own sampler (:mod:`sedd.ops.reference`)."""

from __future__ import annotations

import torch

from sedd.graph import GRAPHS, Graph, graph_for_width
from sedd.ops import custom_ops, reference
from sedd.ops.backend import dispatch
from sedd.ops.checks import check_generator, check_per_row, check_tokens


def sample_transition(
    x0: torch.Tensor,
    sigma: torch.Tensor,
    graph: str | Graph,
    generator: torch.Generator | None = None,
    *,
    dim: int | None = None,
) -> torch.Tensor:
    """Forward noising x_t ~ p_{t|0}(· | x0), independently per position.

    Args:
        x0: [B, L] int clean tokens in [0, N).
        sigma: [B] or [B, 1] total noise σ̄(t) > 0.
        graph: a Graph, or "absorb"/"uniform" together with ``dim`` (the score width V).
        generator: optional torch.Generator on x0's device; the same seed gives the same noise.

    Returns:
        [B, L] tokens of x0's dtype: absorbing masks each token with probability 1 − e^{−σ};
        uniform replaces it by a uniform draw over [0, N) with that probability.
    """
    if isinstance(graph, str):
        if dim is None:
            raise ValueError("graph given by name: pass dim=V (the score width) or a Graph object")
        graph = graph_for_width(graph, dim)
    elif not isinstance(graph, Graph):
        raise TypeError(f"graph must be a name in {tuple(GRAPHS)} or a Graph, got {type(graph).__name__}")
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"x0 must be a [B, L] tensor of token ids, got {getattr(x0, 'shape', type(x0))}")
    check_tokens("x0", x0, tuple(x0.shape), x0.device, graph.N, "clean tokens are real tokens")
    sigma = check_per_row("sigma", sigma, x0.shape[0], x0.device)
    check_generator(generator, x0.device)
    if dispatch(x0.device, graph) == "triton":
        return custom_ops.sample_transition(x0, sigma, graph, generator)
    return reference.sample_transition(x0, sigma, graph, generator)
