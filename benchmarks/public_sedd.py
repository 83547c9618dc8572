"""The public-code baseline: the op sequence the public SEDD code runs today, on bf16 input.

What users of the public code pay per training step and per reverse step, so that "× public"
is a speed-up over something people run (``sedd/ops/reference.py`` is this library's fp32 oracle,
which is already leaner in places). Written here from the math (docs/math.md) following the
public code's structure, not copied from it:

- the model's output post-processing runs in the output's dtype (bf16 under autocast): add the
  per-row shift, then scatter 0 into the current token's entry, each a new [B, L, V] tensor;
- the loss (its ``graph_lib``): absorbing selects the masked rows by boolean indexing (a copy),
  gathers ŝ_{x0}, materialises exp over the real columns and sums; uniform materialises exp over
  the full row, takes means and gathers; both weighted by dσ, summed per sequence, batch mean;
- the samplers exponentiate the scores to ratios, build the staggered score and the transposed
  transition row (a one-hot [B, L, V]) or the reverse rate (another one-hot), multiply, and draw
  with ``argmax(probs / noise)`` where noise = −log(U) from ``torch.rand_like`` in the dtype
  PyTorch's promotion gives the probabilities (fp32 here).

Every [B, L, V] intermediate is a real allocation and a real pass over memory, as in the public
code; that is the point of the baseline.
"""

from __future__ import annotations

import torch

from sedd.graph import Graph
from sedd.ops.reference import esigm1


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def postprocess(z: torch.Tensor, x_t: torch.Tensor, shift: torch.Tensor | None, graph: Graph) -> torch.Tensor:
    """ŝ = z + shift (absorbing only: the public model scales by σ for that graph alone), then
    ŝ[x_t] = 0, in z's dtype (the public model's last lines)."""
    s = z + _rows(shift, z).to(z.dtype) if shift is not None and graph.absorbing else z
    return torch.scatter(s, -1, x_t[..., None], torch.zeros_like(s[..., :1]))


def score_entropy_loss(z, sigma, x_t, x0, graph: Graph, shift, weight) -> torch.Tensor:
    """Σ_positions weight·ℓ per sequence, mean over the batch (the public training loss with
    weight = dσ), through the public op sequence."""
    s = postprocess(z, x_t, shift, graph)
    E = esigm1(sigma)[:, None].expand_as(x_t)
    if graph.absorbing:
        masked = x_t == graph.mask_id
        r = 1 / E[masked]
        rows = s[masked]  # boolean indexing: a copy of the masked rows
        neg = r * rows.gather(-1, x0[masked][:, None]).squeeze(-1)
        pos = rows[:, : graph.mask_id].exp().sum(-1)
        per_token = torch.zeros(x_t.shape, device=z.device, dtype=pos.dtype)
        per_token[masked] += pos - neg + r * (r.log() - 1)
    else:
        N = graph.N
        rho = E / (E + N)
        stay = x_t == x0
        neg0 = s.mean(-1) - s.gather(-1, x_t[..., None]).squeeze(-1) / N
        neg = torch.where(stay, rho * neg0, s.gather(-1, x0[..., None]).squeeze(-1) / E + neg0)
        const = torch.where(stay, (N - 1) / N * rho * (rho.log() - 1), ((-rho.log() - 1) / rho - (N - 2)) / N)
        ratios = s.exp()
        pos = ratios.mean(-1) - ratios.gather(-1, x_t[..., None]).squeeze(-1) / N
        per_token = pos - neg + const
    return (weight[:, None] * per_token).sum(-1).mean()


def _draw(probs: torch.Tensor) -> torch.Tensor:
    noise = 1e-10 - (torch.rand_like(probs) + 1e-10).log()
    return (probs / noise).argmax(-1)


def _one_hot(x_t: torch.Tensor, V: int, like: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(x_t, V).to(like.dtype)


def _staggered(ratios: torch.Tensor, dsigma: torch.Tensor, graph: Graph) -> torch.Tensor:
    """exp(−Δσ Q) s (docs/math.md, "Reverse steps")."""
    e = _rows(dsigma.exp(), ratios)
    if graph.absorbing:
        out = ratios * e
        out[..., graph.mask_id] += ((1 - e) * ratios.sum(-1, keepdim=True)).squeeze(-1)
        return out
    return e * ratios + (1 - e) / graph.N * ratios.sum(-1, keepdim=True)


def _transp_transition(x_t: torch.Tensor, sigma: torch.Tensor, graph: Graph, like: torch.Tensor) -> torch.Tensor:
    """exp(σQ)[x_t, ·] as a [B, L, V] tensor built from a one-hot."""
    decay = _rows((-sigma).exp(), like)
    row = decay * _one_hot(x_t, graph.dim, like)
    if graph.absorbing:
        return row + torch.where(x_t == graph.mask_id, 1 - decay[..., 0], 0.0)[..., None]
    return row + (1 - decay) / graph.N


def analytic_probs(z, x_t, dsigma, graph: Graph, shift) -> torch.Tensor:
    """The unnormalised weights of the analytic step (what :func:`analytic_step` draws from)."""
    ratios = postprocess(z, x_t, shift, graph).exp()
    return _staggered(ratios, dsigma, graph) * _transp_transition(x_t, dsigma, graph, ratios)


def denoise_probs(z, x_t, sigma, graph: Graph, shift) -> torch.Tensor:
    probs = analytic_probs(z, x_t, sigma, graph, shift)
    return probs[..., : graph.mask_id] if graph.absorbing else probs


def euler_probs(z, x_t, dsigma, dt: float, graph: Graph, shift) -> torch.Tensor:
    ratios = postprocess(z, x_t, shift, graph).exp()
    one_hot = _one_hot(x_t, graph.dim, ratios)
    if graph.absorbing:  # from MASK every real token is reachable at rate 1; −Σ on the diagonal below
        rate = torch.where((x_t == graph.mask_id)[..., None], 1 - one_hot, -one_hot) * ratios
    else:
        rate = (1 / graph.N - one_hot) * ratios
    rate = rate.scatter(-1, x_t[..., None], 0.0)
    rate = rate.scatter(-1, x_t[..., None], -rate.sum(-1, keepdim=True))
    return one_hot + _rows(dsigma * dt, rate) * rate


def analytic_step(z, x_t, dsigma, graph: Graph, shift) -> torch.Tensor:
    return _draw(analytic_probs(z, x_t, dsigma, graph, shift))


def denoise_step(z, x_t, sigma, graph: Graph, shift) -> torch.Tensor:
    return _draw(denoise_probs(z, x_t, sigma, graph, shift))


def euler_step(z, x_t, dsigma, dt: float, graph: Graph, shift) -> torch.Tensor:
    return _draw(euler_probs(z, x_t, dsigma, dt, graph, shift))
