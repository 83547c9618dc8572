"""The first-hitting sampler (Zheng et al. 2024, "masked diffusion models are secretly
time-agnostic"): absorbing graph only, one network evaluation per unmasking event.

Each row keeps its own time, as m = 1 − e^{−σ̄(t)}, the probability that a position is masked at
t, starting from t = 1. With n masked free positions, each stays masked until s < t with probability
m(s)/m(t), independently, so the next unmasking event is at m(s) = m(t)·u^{1/n}, u ~ U(0, 1) (for
the log-linear schedule s = t·u^{1/n}). There one position, chosen uniformly among the masked ones,
takes y ∝ e^{ŝ_y} over the real tokens, the scores read at that σ (the denoising step's draw,
``sedd.ops.denoise_step``, on that row only). With a network that does not read σ this samples the
model's joint distribution exactly, in n evaluations per sequence: the T → ∞ limit of the
analytic sampler. ``tokens_per_step = k`` unmasks the next k events (their times drawn one after
another) from one evaluation at the first event's σ: ⌈n/k⌉ evaluations, an approximation.

The predictor owns its time grid: ``sample(..., predictor="first_hitting")`` refuses ``steps``,
the denoiser (every MASK is filled by the last event) and ``cache`` (every evaluation changes every
sequence it runs, so no output is ever reusable): see ``refuses`` below; ``eps`` is a floor on the
σ the network is evaluated at (the analytic sampler's last σ, σ̄(ε)), which matters only to a
σ-conditioned network. Fixed positions are never masked, so they are never drawn. Each evaluation reads the rows
still masked on the host: not a sync-free sampler.

The math: docs/math.md, "Fewer network evaluations".
"""

from __future__ import annotations

import math
import numbers

import torch
from tqdm.auto import tqdm

from sedd import ops
from sedd.model.scoring import accepts_head, head_at_rows, model_scores, row_chunks, unwrap
from sedd.sampling.cache import on_rows
from sedd.sampling.predictors import Predictor, register_predictor


def check_tokens_per_step(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"tokens_per_step must be a positive integer, got {value!r}")
    return int(value)


@register_predictor
class FirstHittingPredictor(Predictor):
    """Unmask one position per event at the exact event times (``tokens_per_step`` per evaluation)."""

    name = "first_hitting"
    owns_grid = True
    absorbing_only = True
    options = ("tokens_per_step",)
    refuses = {
        "steps": "{steps} does not apply to first_hitting: it unmasks {tokens_per_step} tokens per network "
                 "evaluation (default 1), which sets its cost; drop {steps}",
        "denoise": "{denoise} does not apply to first_hitting: its last event fills every MASK",
        "denoiser": "{denoiser} does not apply to first_hitting: its last event fills every MASK",
        "masked_only": "{masked_only} does not apply to first_hitting: it runs the output layer at the positions "
                       "it unmasks only",
        "cuda_graph": "{cuda_graph} does not apply to first_hitting: it runs the network on sub-batches whose "
                      "size changes from one evaluation to the next, which a captured graph cannot replay",
        # every evaluation unmasks a token of every row it runs: no output is ever reusable
        "cache": "{cache} does not apply to first_hitting: each network evaluation unmasks a token in every "
                 "sequence it runs, so there is no unchanged sequence whose output could be reused; drop {cache}",
    }

    def __init__(self, *, masked_only: bool = True, tokens_per_step: int = 1):
        super().__init__(masked_only=masked_only)
        self.tokens_per_step = tokens_per_step

    @property
    def tokens_per_step(self) -> int:
        return self._k

    @tokens_per_step.setter
    def tokens_per_step(self, value) -> None:
        self._k = check_tokens_per_step(value)

    def run(self, model, x, *, graph, noise, eps, generator=None, project=None, progress=False, top_p=None,
            top_k=None):
        """Unmask every MASK of ``x`` [B, L]; returns the tokens [B, L]. ``project`` clamps fixed
        positions (the sampler's); ``model`` may be the sampler's :class:`~sedd.sampling.cache.NetworkCalls`."""
        project = project or (lambda tokens: tokens)
        B, L = x.shape
        device, k = x.device, self.tokens_per_step
        one = torch.ones(B, dtype=torch.float64, device=device)
        m = -torch.expm1(-noise.total(one))  # [B] fp64, per row
        floor = float(noise.total(torch.tensor(eps, dtype=torch.float64)))
        left = (x == graph.mask_id).sum(1)  # [B] masked free positions
        evaluations = math.ceil(int(left.max()) / k) if B else 0
        j = torch.arange(k, device=device)
        x = x.clone()
        for _ in tqdm(range(evaluations), desc="first hitting", disable=not progress, leave=False):
            active = (left > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            n = left[active]
            events = torch.minimum(n, torch.tensor(k, device=device))
            # log of m(s_j)/m(s_{j−1}) for the next k events: u^{1/(n − j)}, one after another
            u = torch.rand(active.numel(), k, generator=generator, device=device, dtype=torch.float64)
            log_ratio = (u.log() / (n[:, None] - j).clamp_min(1)).cumsum(1)
            m_active = m[active]
            sigma = -torch.log1p(-m_active * log_ratio[:, 0].exp())  # σ̄ at the first event
            m[active] = m_active * log_ratio.gather(1, (events - 1)[:, None]).squeeze(1).exp()

            # which positions: the masked ones with the largest of i.i.d. uniform keys (a uniform subset)
            xa = x[active]
            keys = torch.rand(xa.shape, generator=generator, device=device)
            keys = keys.masked_fill(xa != graph.mask_id, -1.0)
            top = keys.topk(min(k, L), dim=1)
            chosen = top.values >= 0
            sel_row, sel_col = chosen.nonzero(as_tuple=True)
            sel_pos = top.indices[sel_row, sel_col]
            tokens = self._draw(model, xa, sigma.clamp_min(floor).float(), sel_row, sel_pos, active, graph,
                                generator, top_p, top_k)
            x[active[sel_row], sel_pos] = tokens.to(x.dtype)
            x = project(x)
            left = left.index_put((active,), n - events)
        return x

    @staticmethod
    def _draw(model, xa, sigma, sel_row, sel_pos, active, graph, generator, top_p, top_k):
        """Tokens [R] for the positions (sel_row, sel_pos) of the sub-batch ``xa``: the denoising
        draw (y ∝ e^{ŝ_y} over the real tokens) from the scores at ``sigma`` [b]."""
        L = xa.shape[1]
        mask = torch.full((sel_row.numel(), 1), graph.mask_id, dtype=xa.dtype, device=xa.device)

        def draw(z, rows, shift):
            return ops.denoise_step(z, mask[: z.shape[0]], sigma[rows], graph, generator,
                                    shift=None if shift is None else shift[rows], top_p=top_p,
                                    top_k=top_k).reshape(-1)

        net = unwrap(model)
        if accepts_head(net):
            shift = net.score_shift(sigma)
            flat = sel_row * L + sel_pos

            def head(hidden, weight, bias):
                hidden = hidden.reshape(-1, hidden.shape[-1])
                out = torch.empty(flat.numel(), dtype=torch.long, device=hidden.device)
                for part in row_chunks(flat.numel(), weight.shape[0], hidden.element_size()):
                    z = head_at_rows(hidden[flat[part]], weight, bias, graph.dim)[:, None]  # [rows, 1, V]
                    out[part] = draw(z, sel_row[part], shift)
                return out

            with on_rows(model, active):
                return model(xa, sigma, head=head)
        with on_rows(model, active):
            log_score, shift = model_scores(model, xa, sigma)
        return draw(log_score[sel_row, sel_pos][:, None], sel_row, shift)
