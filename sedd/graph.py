"""Forward processes ("graphs") over a vocabulary, in closed form per token, and all the math
that depends on the graph: transitions, the eager score entropy, the reverse-step weights, the
prior term of the likelihood bound and the model's score shift.

The forward process noises every position independently with the rate matrix σ̄'(t)·Q, where
Q[to, from] has columns summing to zero (p_t = exp(σ Q) p_0). Every graph here has a closed form
for exp(σ Q), so nothing builds a V×V tensor: every method works on one row at a time, [..., V].

Absorbing(N):  V = N + 1 with MASK = N.  Q[M, j] = 1 and Q[j, j] = −1 for j ≠ M.
Uniform(N):    V = N.                    Q = 11ᵀ/N − I.

A new graph subclasses :class:`Graph` and implements its forward process (``dim``,
``transition_probs``, ``transp_transition``, ``staggered_score``, ``reverse_rates``,
``sample_transition``, ``sample_limit``; ``prior_kl`` for the likelihood bound); the score
entropy and the reverse-step weights then follow from the generic forms on :class:`Graph`.
Its ``kernel`` tag says which fused Triton kernel computes its math: ``"absorb"``, ``"uniform"``
or None (no kernel: :mod:`sedd.ops` runs the graph's eager methods, and refuses an explicit
``"triton"`` backend).

Conventions: ``sigma`` (and ``dsigma``, ``step``) are per-sequence scalars, [B], [B, 1] or a
number, reshaped to broadcast against the tokens. ``log_score`` is a row of post-processed
log-scores ŝ [..., V] with ŝ[x_t] = 0 (see :func:`sedd.ops.reference.log_scores`), in the dtype the
result is computed in (fp32, or fp64).

The math: docs/math.md, "Graphs", "Score entropy", "Reverse steps".
"""

from __future__ import annotations

import math

import torch


def esigm1(sigma: torch.Tensor) -> torch.Tensor:
    """E(σ) = e^σ − 1, through expm1 where σ is small enough for e^σ − 1 to cancel."""
    return torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)


def per_row(v: torch.Tensor | float, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sequence scalars ([B], [B, 1] or a scalar) shaped [B, 1, …, 1] to broadcast against
    ``like`` [B, ...], on like's device (and in ``dtype`` when given; a scalar stays 0-d)."""
    v = torch.as_tensor(v, device=like.device, dtype=dtype)
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


class Graph:
    """The interface every graph implements. ``N`` real tokens, rows of width ``dim`` (V).

    ``kernel``: the tag of the fused Triton kernel that implements this graph's score entropy,
    noising and reverse steps ("absorb" or "uniform"), or None when no kernel does.
    """

    name: str = ""
    kernel: str | None = None
    # The forward process has an absorbing MASK state (mask_id): a position is either clean or MASK,
    # and the reverse process only ever moves MASK positions to real tokens. What relies on it: the
    # samplers and the fused loss compute the output layer at MASK rows only, first hitting and the
    # harness's conditional likelihood run on such graphs only, conditioning on fixed tokens is exact
    # on them (and warned about otherwise), SEDD's default output scaling follows it and a model
    # without time conditioning needs it. A new graph sets it True only if all of that holds for it.
    absorbing: bool = False
    mask_id: int | None = None  # the MASK token's id, for a graph that has one
    default_noise: str = "loglinear"  # the schedule the paper pairs with this graph (sedd.noise names)

    @classmethod
    def from_width(cls, V: int) -> "Graph":
        """The graph whose score rows have width V."""
        return cls(V)

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

    # -- forward process (each graph implements these) --------------------------------------------

    def transition_probs(self, x0: torch.Tensor, sigma) -> torch.Tensor:
        """p_{t|0}(· | x0) = exp(σQ)[:, x0], [..., V] fp32."""
        raise NotImplementedError

    def transp_transition(self, x_t: torch.Tensor, sigma) -> torch.Tensor:
        """Row x_t of exp(σQ) as a function of the column y: exp(σQ)[x_t, y], [..., V] fp32."""
        raise NotImplementedError

    def staggered_score(self, score: torch.Tensor, dsigma) -> torch.Tensor:
        """exp(−Δσ Q) s for ratio rows s [..., V] (in score's dtype)."""
        raise NotImplementedError

    def reverse_rates(self, x_t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Q(x_t, y): the rate of the forward jump y → x_t for y ≠ x_t, [..., V] (0 at y = x_t)."""
        raise NotImplementedError

    def sample_transition(self, x0: torch.Tensor, sigma, generator=None) -> torch.Tensor:
        """x_t ~ p_{t|0}(· | x0) independently per position, x0's shape and dtype."""
        raise NotImplementedError

    def sample_limit(self, shape, device=None, generator=None) -> torch.Tensor:
        """A draw from the limit distribution (t = 1), int64 of ``shape``."""
        raise NotImplementedError

    def prior_kl(self, sigma: float) -> float:
        """The per-token prior term KL(p_{1|0}(·|x0) ‖ p_base) in nats at total noise σ̄(1) = ``sigma``."""
        raise NotImplementedError

    # -- model output ----------------------------------------------------------------------------

    def score_shift(self, sigma: torch.Tensor) -> torch.Tensor:
        """The σ-dependent shift a model with ``scale_by_sigma`` adds to its raw output z
        (ŝ = z + shift[:, None, None]), [B] fp32. No shift unless a graph defines one."""
        return torch.zeros(sigma.shape[0], dtype=torch.float32, device=sigma.device)

    # -- training loss ---------------------------------------------------------------------------

    def score_entropy(self, log_score: torch.Tensor, sigma, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Per-token score entropy ℓ(ŝ, σ, x_t, x0), [B, L] in log_score's dtype. The generic form

            ℓ = Σ_{y≠x_t} w_y [s_y − a_y log s_y + a_y(log a_y − 1)],
            w_y = Q(x_t, y),  a_y = p_{t|0}(y|x0) / p_{t|0}(x_t|x0),  a(log a − 1) = 0 at a = 0,

        one [B, L, V] pass from ``reverse_rates`` and ``transition_probs``; graphs with a closed
        form override it.
        """
        s = log_score
        p = self.transition_probs(x0, sigma).to(s.dtype)
        p_xt = p.gather(-1, x_t.unsqueeze(-1))
        # an x_t that x0 cannot reach has no defined ratio; reading a = 0 there keeps ℓ finite
        a = torch.where(p_xt > 0, p / p_xt.clamp_min(torch.finfo(p.dtype).tiny), 0.0)
        w = self.reverse_rates(x_t, s.dtype)
        const = torch.where(a > 0, a * (a.clamp_min(torch.finfo(a.dtype).tiny).log() - 1), 0.0)
        terms = torch.where(w > 0, w * (s.exp() - a * s + const), 0.0)
        return terms.sum(-1)

    # -- reverse steps: unnormalised categorical weights over the next token ---------------------

    def euler_weights(self, log_score: torch.Tensor, x_t: torch.Tensor, step) -> torch.Tensor:
        """Euler (τ-leaping), ``step`` = Δt·dσ: w_y = step·Q(x_t, y)·e^{ŝ_y} for y ≠ x_t, and the
        stay weight 1 − Σ_y w_y at y = x_t. [B, L, V]; may be negative (the sampler clamps)."""
        s = log_score
        step = per_row(step, x_t, s.dtype).unsqueeze(-1)
        w = step * self.reverse_rates(x_t, s.dtype) * s.exp()
        return w.scatter(-1, x_t.unsqueeze(-1), (1 - w.sum(-1)).unsqueeze(-1))

    def analytic_weights(self, log_score: torch.Tensor, x_t: torch.Tensor, dsigma) -> torch.Tensor:
        """Tweedie τ-leaping: w_y = (exp(−Δσ Q) s)_y · exp(Δσ Q)(x_t, y), Δσ = σ̄(t) − σ̄(t − Δt)."""
        s = log_score
        dsigma = torch.as_tensor(dsigma, dtype=s.dtype, device=s.device)
        return self.staggered_score(s.exp(), dsigma) * self.transp_transition(x_t, dsigma).to(s.dtype)

    def denoise_weights(self, log_score: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
        """The final step: the analytic weights with Δσ = σ (a jump to σ = 0)."""
        return self.analytic_weights(log_score, x_t, sigma)


class Absorbing(Graph):
    name = "absorb"
    default_noise = "loglinear"

    @classmethod
    def from_width(cls, V: int) -> "Absorbing":
        return cls(V - 1)  # the MASK column is the last of the V
    kernel = "absorb"
    absorbing = True

    @property
    def dim(self) -> int:
        return self.N + 1

    @property
    def mask_id(self) -> int:
        return self.N

    def transition_probs(self, x0: torch.Tensor, sigma) -> torch.Tensor:
        """p_{t|0}(· | x0) = exp(σQ)[:, x0]: e^{−σ} on x0 and 1 − e^{−σ} on MASK. [..., V] fp32."""
        sigma = per_row(sigma, x0).float().unsqueeze(-1)
        stay = torch.exp(-sigma)
        probs = torch.zeros(*x0.shape, self.dim, device=x0.device)
        probs[..., self.mask_id] = 1.0
        probs = probs * (-torch.expm1(-sigma))
        return probs.scatter_add(-1, x0.unsqueeze(-1), stay.expand(*x0.shape, 1).clone())

    def transp_transition(self, x_t: torch.Tensor, sigma) -> torch.Tensor:
        """Row x_t of exp(σQ) as a function of the column y: exp(σQ)[x_t, y]. [..., V] fp32.

        From MASK every column is reachable (1 − e^{−σ}, and 1 for MASK itself); from a real
        token only the token itself (e^{−σ}).
        """
        sigma = per_row(sigma, x_t).float().unsqueeze(-1)
        row = torch.nn.functional.one_hot(x_t, self.dim).float() * torch.exp(-sigma)
        from_mask = (x_t == self.mask_id).unsqueeze(-1)
        return torch.where(from_mask, row - torch.expm1(-sigma), row)

    def staggered_score(self, score: torch.Tensor, dsigma) -> torch.Tensor:
        """exp(−Δσ Q) s for ratio rows s [..., V]: e^{Δσ}s_j off MASK, s_M + (1 − e^{Δσ})Σ_{j≠M} s_j on MASK."""
        dsigma = per_row(dsigma, score, score.dtype)
        real_sum = score[..., : self.mask_id].sum(-1, keepdim=True)
        out = score * torch.exp(dsigma)
        out[..., self.mask_id] = score[..., self.mask_id] - (torch.expm1(dsigma) * real_sum).squeeze(-1)
        return out

    def reverse_rates(self, x_t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """1 for every real token when x_t = MASK, otherwise 0 (a real token never moves)."""
        rates = torch.ones(*x_t.shape, self.dim, dtype=dtype, device=x_t.device)
        rates[..., self.mask_id] = 0
        rates = rates * (x_t == self.mask_id).unsqueeze(-1)
        return rates.scatter(-1, x_t.unsqueeze(-1), 0.0)

    def sample_transition(self, x0: torch.Tensor, sigma, generator=None) -> torch.Tensor:
        """Mask each token independently with probability 1 − e^{−σ}."""
        p_mask = -torch.expm1(-per_row(sigma, x0).float())
        move = torch.rand(x0.shape, device=x0.device, generator=generator) < p_mask
        return torch.where(move, torch.full_like(x0, self.mask_id), x0)

    def sample_limit(self, shape, device=None, generator=None) -> torch.Tensor:
        """The limit distribution: every position is MASK."""
        return torch.full(tuple(shape), self.mask_id, dtype=torch.long, device=device)

    def prior_kl(self, sigma: float) -> float:
        """The sampler starts from all-MASK, against which the KL is infinite while e^{−σ} > 0.
        The base used instead is the forward marginal at t = 1 of a uniformly random clean token
        (MASK with probability 1 − e^{−σ}, each real token e^{−σ}/N): KL = e^{−σ}·log N exactly."""
        return math.exp(-sigma) * math.log(self.N)

    def score_shift(self, sigma: torch.Tensor) -> torch.Tensor:
        """−log E(σ) − log N, [B] fp32 (computed in fp64 for fp64 σ): the public checkpoints'
        ``scale_by_sigma``, which puts the raw output on the scale of the true ratios."""
        s = sigma if sigma.dtype == torch.float64 else sigma.float()
        return (-torch.log(esigm1(s)) - math.log(self.N)).float()

    def score_entropy(self, log_score: torch.Tensor, sigma, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Zero unless x_t = MASK; there, with r = 1/E(σ):  ℓ = Σ_{j≠M} e^{ŝ_j} − r·ŝ_{x0} + r(log r − 1)."""
        s = log_score
        r = 1.0 / esigm1(per_row(sigma, x_t, s.dtype))
        s_x0 = s.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        pos = s[..., : self.mask_id].exp().sum(-1)
        loss = pos - r * s_x0 + r * (torch.log(r) - 1)
        return torch.where(x_t == self.mask_id, loss, torch.zeros_like(loss))

    def denoise_weights(self, log_score: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
        """The analytic weights with Δσ = σ and the MASK column dropped: every MASK is filled."""
        weights = self.analytic_weights(log_score, x_t, sigma).clamp_min(0)
        weights[..., self.mask_id] = 0
        return weights


class Uniform(Graph):
    name = "uniform"
    kernel = "uniform"
    absorbing = False
    default_noise = "geometric"

    @property
    def dim(self) -> int:
        return self.N

    def transition_probs(self, x0: torch.Tensor, sigma) -> torch.Tensor:
        """p_{t|0}(y | x0) = (1 − e^{−σ})/N, plus e^{−σ} at y = x0. [..., V] fp32."""
        sigma = per_row(sigma, x0).float().unsqueeze(-1)
        probs = (-torch.expm1(-sigma) / self.N).expand(*x0.shape, self.N).clone()
        return probs.scatter_add(-1, x0.unsqueeze(-1), torch.exp(-sigma).expand(*x0.shape, 1).clone())

    def transp_transition(self, x_t: torch.Tensor, sigma) -> torch.Tensor:
        """exp(σQ)[x_t, y]: Q is symmetric, so this is the forward transition row of x_t."""
        return self.transition_probs(x_t, sigma)

    def staggered_score(self, score: torch.Tensor, dsigma) -> torch.Tensor:
        """exp(−Δσ Q) s = e^{Δσ}s + ((1 − e^{Δσ})/N)·Σ_k s_k."""
        dsigma = per_row(dsigma, score, score.dtype)
        return score * torch.exp(dsigma) - torch.expm1(dsigma) / self.N * score.sum(-1, keepdim=True)

    def reverse_rates(self, x_t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """1/N for every y ≠ x_t."""
        rates = torch.full((*x_t.shape, self.dim), 1.0 / self.N, dtype=dtype, device=x_t.device)
        return rates.scatter(-1, x_t.unsqueeze(-1), 0.0)

    def sample_transition(self, x0: torch.Tensor, sigma, generator=None) -> torch.Tensor:
        """With probability 1 − e^{−σ} replace the token by a uniform draw (which may equal x0)."""
        p_move = -torch.expm1(-per_row(sigma, x0).float())
        move = torch.rand(x0.shape, device=x0.device, generator=generator) < p_move
        fresh = torch.randint(0, self.N, x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        return torch.where(move, fresh, x0)

    def sample_limit(self, shape, device=None, generator=None) -> torch.Tensor:
        """The limit distribution: uniform over [0, N)."""
        return torch.randint(0, self.N, tuple(shape), device=device, generator=generator)

    def prior_kl(self, sigma: float) -> float:
        """KL(p_{1|0}(·|x0) ‖ Uniform(N)), against the sampler's true starting distribution."""
        stay = math.exp(-sigma)
        N = self.N
        a = stay + (1 - stay) / N  # probability of the clean token itself
        b = (1 - stay) / N  # of each other token
        return a * math.log(a * N) + ((N - 1) * b * math.log(b * N) if b > 0 else 0.0)

    def score_entropy(self, log_score: torch.Tensor, sigma, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """With E = E(σ), ρ = E/(E + N):
            pos  = (1/N) Σ_{y≠x_t} e^{ŝ_y},   neg₀ = (1/N) Σ_{y≠x_t} ŝ_y
            x_t = x0:  ℓ = pos − ρ·neg₀ + ((N−1)/N)·ρ(log ρ − 1)
            x_t ≠ x0:  ℓ = pos − neg₀ − ŝ_{x0}/E + ((−log ρ − 1)/ρ − (N − 2))/N
        """
        s = log_score
        E = esigm1(per_row(sigma, x_t, s.dtype))
        s_x0 = s.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        N = self.N
        not_current = torch.ones_like(s, dtype=torch.bool).scatter(-1, x_t.unsqueeze(-1), False)
        pos = torch.where(not_current, s.exp(), 0.0).sum(-1) / N
        neg0 = s.sum(-1) / N  # ŝ[x_t] = 0, so the full sum is the sum over y ≠ x_t
        rho = E / (E + N)
        stay = x_t == x0
        neg = torch.where(stay, rho * neg0, neg0 + s_x0 / E)
        const = torch.where(
            stay,
            (N - 1) / N * rho * (torch.log(rho) - 1),
            ((-torch.log(rho) - 1) / rho - (N - 2)) / N,
        )
        return pos - neg + const


# The graphs by name: every place that takes a graph name (configs, the command line, the ops)
# reads this table, so a new graph is one class and one entry here.
GRAPHS: dict[str, type[Graph]] = {"absorb": Absorbing, "uniform": Uniform}
GRAPH_ALIASES = {"absorbing": "absorb"}


def graph_class(name: str) -> type[Graph]:
    """The registered graph class of ``name`` (or one of its aliases); ValueError naming the choices."""
    cls = GRAPHS.get(GRAPH_ALIASES.get(name, name)) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown graph {name!r}; expected one of {tuple(GRAPHS)}")
    return cls


def get_graph(graph: str | Graph, N: int | None = None) -> Graph:
    """A graph object from a name in :data:`GRAPHS` and the number of real tokens N."""
    if isinstance(graph, Graph):
        return graph
    cls = graph_class(graph)
    if N is None:
        raise ValueError("N (the number of real tokens) is needed to build a graph from its name")
    return cls(N)


def graph_for_width(graph: str | Graph, V: int) -> Graph:
    """The graph whose score rows have width V (N = V − 1 for absorbing, N = V for uniform)."""
    if isinstance(graph, Graph):
        return graph
    return graph_class(graph).from_width(V)


def graph_from_config(config: dict) -> Graph:
    """The graph of a public-format training config: ``graph.type`` over ``tokens`` real tokens."""
    return get_graph(config["graph"]["type"], int(config["tokens"]))
