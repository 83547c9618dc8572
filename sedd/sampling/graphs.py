"""The sampler's network call as a CUDA graph: ``sample(..., cuda_graph=True)``.

A sampling step of SEDD-small at 16 × 1024 is mostly the transformer forward, and on an H200 its
host time (launching about a thousand kernels) exceeds the GPU's. Every step of a ``sample`` call
runs the forward on the same [B, L] shapes, so it is captured once, on the first step, and each
later step copies its tokens and σ into the captured inputs and replays the graph: one launch.

What it needs: a CUDA device, shapes that do not depend on the data (the full head at every
position, as under :func:`sedd.ops.sync_free`: the masked-rows head gathers a data-dependent
number of rows), and a predictor on the sampler's time grid (first hitting's sub-batches change
size from one evaluation to the next). The cache is refused with it (it finds the changed rows by
a host read). The output buffer is overwritten by the next replay: the step consumes it first.
"""

from __future__ import annotations

import torch


class GraphedForward:
    """``model(x_t, sigma, raw=True)`` captured on its first call and replayed on the later ones
    (same shapes and dtypes); ``module`` is the model, so :func:`sedd.model.scoring.unwrap` finds
    it, and other attributes are the model's."""

    WARMUP = 2  # eager calls on a side stream before the capture (cuBLAS handles, lazy initialisation)

    def __init__(self, model):
        self.module = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x = self.sigma = self.out = None

    def __getattr__(self, name):
        if name == "module":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, **kwargs):
        if kwargs != {"raw": True}:
            raise ValueError(f"a graphed sampler forward takes (x_t, sigma, raw=True), got {sorted(kwargs)}")
        if self.graph is None:
            self._capture(x_t, sigma)
        elif x_t.shape != self.x.shape or sigma.shape != self.sigma.shape:
            raise ValueError(f"the graphed forward was captured for x_t {list(self.x.shape)}, sigma "
                             f"{list(self.sigma.shape)}; got {list(x_t.shape)}, {list(sigma.shape)}")
        self.x.copy_(x_t)
        self.sigma.copy_(sigma)
        self.graph.replay()
        return self.out

    def _capture(self, x_t: torch.Tensor, sigma: torch.Tensor) -> None:
        self.x, self.sigma = x_t.clone(), sigma.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.module(self.x, self.sigma, raw=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.module(self.x, self.sigma, raw=True)
        self.graph = graph
