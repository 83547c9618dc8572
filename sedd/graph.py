"""Forward processes ("graphs") over a vocabulary, in closed form per token.

The forward process noises every position independently with the rate matrix σ̄'(t)·Q, where
Q[to, from] has columns summing to zero (p_t = exp(σ Q) p_0). Both graphs have transition
matrices exp(σ Q) with a closed form, so nothing here builds a V×V tensor: every method works on
one row at a time, shaped [..., V].

Absorbing(N):  V = N + 1 with MASK = N.  Q[M, j] = 1 and Q[j, j] = −1 for j ≠ M.
Uniform(N):    V = N.                    Q = 11ᵀ/N − I.

Convention for ``sigma``: a tensor broadcastable against the token tensor (e.g. [B, 1] for
tokens [B, L]); :func:`expand_sigma` turns the usual [B] into that.
"""

from __future__ import annotations

import torch


def expand_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ of shape [B] or [B, 1] (or a scalar) reshaped to broadcast against ``x`` [B, ...]."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.dim() == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (x.dim() - 1)))


def _rows(dsigma: torch.Tensor | float, score: torch.Tensor) -> torch.Tensor:
    """Per-row scalars [B] (or a scalar) shaped to broadcast against rows [B, ..., V]."""
    dsigma = torch.as_tensor(dsigma, device=score.device, dtype=score.dtype)
    if dsigma.dim() == 0:
        return dsigma
    return dsigma.reshape(dsigma.shape[0], *([1] * (score.dim() - 1)))


class Graph:
    """Common interface. ``N`` real tokens, rows of width ``dim`` (V)."""

    name: str = ""
    absorbing: bool = False

    def __init__(self, N: int):
        if int(N) != N or N < 1:
            raise ValueError(f"the number of tokens N must be a positive integer, got {N}")
        self.N = int(N)

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(N={self.N})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.N == other.N

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.N))


class Absorbing(Graph):
    name = "absorb"
    absorbing = True

    @property
    def dim(self) -> int:
        return self.N + 1

    @property
    def mask_id(self) -> int:
        return self.N

    def transition_probs(self, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """p_{t|0}(· | x0) = exp(σQ)[:, x0]: e^{−σ} on x0 and 1 − e^{−σ} on MASK. [..., V] fp32."""
        sigma = expand_sigma(sigma, x0).float().unsqueeze(-1)
        stay = torch.exp(-sigma)
        probs = torch.zeros(*x0.shape, self.dim, device=x0.device)
        probs[..., self.mask_id] = 1.0
        probs = probs * (-torch.expm1(-sigma))
        return probs.scatter_add(-1, x0.unsqueeze(-1), stay.expand(*x0.shape, 1).clone())

    def transp_transition(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Row x_t of exp(σQ) as a function of the column y: exp(σQ)[x_t, y]. [..., V] fp32.

        From MASK every column is reachable (1 − e^{−σ}, and 1 for MASK itself); from a real
        token only the token itself (e^{−σ}).
        """
        sigma = expand_sigma(sigma, x_t).float().unsqueeze(-1)
        row = torch.nn.functional.one_hot(x_t, self.dim).float() * torch.exp(-sigma)
        from_mask = (x_t == self.mask_id).unsqueeze(-1)
        return torch.where(from_mask, row - torch.expm1(-sigma), row)

    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        """exp(−Δσ Q) s for ratio rows s [..., V]: e^{Δσ}s_j off MASK, s_M + (1 − e^{Δσ})Σ_{j≠M} s_j on MASK."""
        dsigma = _rows(dsigma, score)
        real_sum = score[..., : self.mask_id].sum(-1, keepdim=True)
        out = score * torch.exp(dsigma)
        out[..., self.mask_id] = score[..., self.mask_id] - (torch.expm1(dsigma) * real_sum).squeeze(-1)
        return out

    def sample_transition(self, x0: torch.Tensor, sigma: torch.Tensor, generator=None) -> torch.Tensor:
        """Mask each token independently with probability 1 − e^{−σ}."""
        p_mask = -torch.expm1(-expand_sigma(sigma, x0).float())
        move = torch.rand(x0.shape, device=x0.device, generator=generator) < p_mask
        return torch.where(move, torch.full_like(x0, self.mask_id), x0)

    def sample_limit(self, shape, device=None, generator=None) -> torch.Tensor:
        """The limit distribution: every position is MASK."""
        return torch.full(tuple(shape), self.mask_id, dtype=torch.long, device=device)


class Uniform(Graph):
    name = "uniform"
    absorbing = False

    @property
    def dim(self) -> int:
        return self.N

    def transition_probs(self, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """p_{t|0}(y | x0) = (1 − e^{−σ})/N, plus e^{−σ} at y = x0. [..., V] fp32."""
        sigma = expand_sigma(sigma, x0).float().unsqueeze(-1)
        probs = (-torch.expm1(-sigma) / self.N).expand(*x0.shape, self.N).clone()
        return probs.scatter_add(-1, x0.unsqueeze(-1), torch.exp(-sigma).expand(*x0.shape, 1).clone())

    def transp_transition(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """exp(σQ)[x_t, y]: Q is symmetric, so this is the forward transition row of x_t."""
        return self.transition_probs(x_t, sigma)

    def staggered_score(self, score: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
        """exp(−Δσ Q) s = e^{Δσ}s + ((1 − e^{Δσ})/N)·Σ_k s_k."""
        dsigma = _rows(dsigma, score)
        return score * torch.exp(dsigma) - torch.expm1(dsigma) / self.N * score.sum(-1, keepdim=True)

    def sample_transition(self, x0: torch.Tensor, sigma: torch.Tensor, generator=None) -> torch.Tensor:
        """With probability 1 − e^{−σ} replace the token by a uniform draw (which may equal x0)."""
        p_move = -torch.expm1(-expand_sigma(sigma, x0).float())
        move = torch.rand(x0.shape, device=x0.device, generator=generator) < p_move
        fresh = torch.randint(0, self.N, x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        return torch.where(move, fresh, x0)

    def sample_limit(self, shape, device=None, generator=None) -> torch.Tensor:
        """The limit distribution: uniform over [0, N)."""
        return torch.randint(0, self.N, tuple(shape), device=device, generator=generator)


def get_graph(graph: str | Graph, N: int | None = None) -> Graph:
    """A graph object from ``"absorb"`` / ``"uniform"`` and the number of real tokens N."""
    if isinstance(graph, Graph):
        return graph
    graphs = {"absorb": Absorbing, "absorbing": Absorbing, "uniform": Uniform}
    if graph not in graphs:
        raise ValueError(f"unknown graph {graph!r}; expected 'absorb' or 'uniform'")
    if N is None:
        raise ValueError("N (the number of real tokens) is needed to build a graph from its name")
    return graphs[graph](N)


def graph_for_width(graph: str | Graph, V: int) -> Graph:
    """The graph whose score rows have width V (N = V − 1 for absorbing, N = V for uniform)."""
    if isinstance(graph, Graph):
        return graph
    if graph in ("absorb", "absorbing"):
        return Absorbing(V - 1)
    return get_graph(graph, V)


def graph_from_config(config: dict) -> Graph:
    """The graph of a public-format training config: ``graph.type`` over ``tokens`` real tokens."""
    return get_graph(config["graph"]["type"], int(config["tokens"]))
