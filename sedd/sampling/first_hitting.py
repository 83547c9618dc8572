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

Adaptive parallel decoding: ``threshold = τ`` or ``entropy_bound = γ`` decide per evaluation and per
row how many more positions to unmask, from the model's own confidence. The event is drawn as
above (k = 1: the same draws from the caller's generator, so the same tokens when no other position
qualifies); then the head runs at every MASK position of the rows (in bounded chunks) through
``sedd.ops.denoise_with_stats``, which draws a token for each and, from the same pass, its
confidence max_y p(y) and entropy H(p) after truncation. ``threshold`` also unmasks every other
position with confidence ≥ τ; ``entropy_bound`` the others in increasing order of H while their
sum stays ≤ γ. Their tokens come from a second random stream, seeded from the caller's generator's
state without advancing it (deterministic, and independent of the event's draws). The selection
runs on the device, on [B, L] values; the one host read per evaluation is the count of MASKs left
per row (which rows still run, and how many head rows). Time moves on to the last of the events
an evaluation stands for (1 + the positions added), as with ``tokens_per_step``; the times of the
added ones come from the second stream too, after the tokens. On a data distribution that
factorises over positions this samples it exactly for any τ or γ (each position's conditional is
its marginal); with dependence between positions, the positions unmasked together are drawn
independently given the same state, and the error grows as τ falls or γ rises.

The predictor owns its time grid: ``sample(..., predictor="first_hitting")`` refuses ``steps``,
the denoiser (every MASK is filled by the last event) and ``cache`` (every evaluation changes every
sequence it runs, so no output is ever reusable): see ``refuses`` below; ``eps`` is a floor on the
σ the network is evaluated at (the analytic sampler's last σ, σ̄(ε)), which matters only to a
σ-conditioned network. Fixed positions are never masked, so they are never drawn. Each evaluation reads the rows
still masked on the host: not a sync-free sampler.

The math: docs/math.md, "Fewer network evaluations", "Adaptive parallel decoding".
"""

from __future__ import annotations

import hashlib
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


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_threshold(value) -> float | None:
    if value is not None and not (_real(value) and 0 < value <= 1):
        raise ValueError(f"threshold must be a number in (0, 1], got {value!r}")
    return None if value is None else float(value)


def check_entropy_bound(value) -> float | None:
    if value is not None and not (_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"entropy_bound must be a finite number >= 0, got {value!r}")
    return None if value is None else float(value)


class _Checked:
    """An option of the predictor, checked at every assignment (``get_predictor`` sets options on a
    copy of an instance)."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj, value):
        setattr(obj, self.slot, self.check(value))


@register_predictor
class FirstHittingPredictor(Predictor):
    """Unmask one position per event at the exact event times (``tokens_per_step`` per evaluation),
    or as many as ``threshold`` / ``entropy_bound`` admit."""

    name = "first_hitting"
    tokens_per_step = _Checked(check_tokens_per_step)
    threshold = _Checked(check_threshold)
    entropy_bound = _Checked(check_entropy_bound)
    owns_grid = True
    absorbing_only = True
    options = ("tokens_per_step", "threshold", "entropy_bound")
    exclusive = ("tokens_per_step", "threshold", "entropy_bound")
    exclusive_why = ("each sets how many positions first_hitting unmasks per network evaluation; give one of "
                     "{tokens_per_step} (a fixed count), {threshold} or {entropy_bound} (from the model's confidence)")
    refuses = {
        "steps": "{steps} does not apply to first_hitting: it unmasks {tokens_per_step} tokens per network "
                 "evaluation (default 1), which sets its cost; drop {steps}",
        "denoise": "{denoise} does not apply to first_hitting: its last event fills every MASK",
        "denoiser": "{denoiser} does not apply to first_hitting: its last event fills every MASK",
        "masked_only": "{masked_only} does not apply to first_hitting: it runs the output layer at the positions "
                       "it unmasks only (with {threshold} or {entropy_bound}, at every MASK position)",
        "cuda_graph": "{cuda_graph} does not apply to first_hitting: it runs the network on sub-batches whose "
                      "size changes from one evaluation to the next, which a captured graph cannot replay",
        # every evaluation unmasks a token of every row it runs: no output is ever reusable
        "cache": "{cache} does not apply to first_hitting: each network evaluation unmasks a token in every "
                 "sequence it runs, so there is no unchanged sequence whose output could be reused; drop {cache}",
    }

    def __init__(self, *, masked_only: bool = True, tokens_per_step: int = 1, threshold: float | None = None,
                 entropy_bound: float | None = None):
        super().__init__(masked_only=masked_only)
        self.tokens_per_step = tokens_per_step
        self.threshold = threshold
        self.entropy_bound = entropy_bound

    def _rule(self) -> str | None:
        """"threshold", "entropy_bound" or None (a fixed count); ValueError when two options set the count."""
        given = [name for name, on in (("tokens_per_step", self.tokens_per_step != 1),
                                       ("threshold", self.threshold is not None),
                                       ("entropy_bound", self.entropy_bound is not None)) if on]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} cannot be combined: "
                             + self.exclusive_why.format_map({o: o for o in self.exclusive}))
        return given[0] if given and given[0] != "tokens_per_step" else None

    def run(self, model, x, *, graph, noise, eps, generator=None, project=None, progress=False, top_p=None,
            top_k=None):
        """Unmask every MASK of ``x`` [B, L]; returns the tokens [B, L]. ``project`` clamps fixed
        positions (the sampler's); ``model`` may be the sampler's :class:`~sedd.sampling.cache.NetworkCalls`."""
        project = project or (lambda tokens: tokens)
        rule = self._rule()
        B, L = x.shape
        device, k = x.device, self.tokens_per_step
        one = torch.ones(B, dtype=torch.float64, device=device)
        m = -torch.expm1(-noise.total(one))  # [B] fp64, per row
        floor = float(noise.total(torch.tensor(eps, dtype=torch.float64)))
        left = (x == graph.mask_id).sum(1)  # [B] masked free positions
        x = x.clone()
        if rule is not None:
            return self._run_adaptive(model, x, m, left, floor, rule, graph, generator, project, progress, top_p, top_k)
        evaluations = math.ceil(int(left.max()) / k) if B else 0
        for _ in tqdm(range(evaluations), desc="first hitting", disable=not progress, leave=False):
            active = (left > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            n = left[active]
            sigma, events = _next_events(m, active, n, k, generator)
            xa = x[active]
            sel_row, sel_pos = _positions(xa, k, graph.mask_id, generator)
            tokens = self._draw(model, xa, sigma.clamp_min(floor).float(), sel_row, sel_pos, active, graph,
                                generator, top_p, top_k)
            x[active[sel_row], sel_pos] = tokens.to(x.dtype)
            x = project(x)
            left = left.index_put((active,), n - events)
        return x

    def _run_adaptive(self, model, x, m, left, floor, rule, graph, generator, project, progress, top_p, top_k):
        """The loop of ``threshold`` / ``entropy_bound`` (module docstring): per evaluation the event
        of k = 1, then the positions the rule adds, selected on the device."""
        device = x.device
        side = side_generator(generator, device)
        bar = tqdm(desc="first hitting", unit="token", disable=not progress, leave=False)
        total = None
        while True:
            counts = left.tolist()  # the one host read of an evaluation: the rows still running, their MASKs
            rows = [i for i, c in enumerate(counts) if c > 0]
            if total is None:
                total = bar.total = sum(counts)
            bar.update(total - sum(counts) - bar.n)
            if not rows:
                break
            active_rows = torch.tensor(rows)
            active = active_rows.to(device)
            n = left[active]
            sigma, _ = _next_events(m, active, n, 1, generator)
            xa = x[active]
            sel_row, sel_pos = _positions(xa, 1, graph.mask_id, generator)
            masked = torch.nonzero_static(xa.reshape(-1) == graph.mask_id, size=sum(counts[i] for i in rows))
            tokens, (drawn, confidence, entropy) = self._draw(
                model, xa, sigma.clamp_min(floor).float(), sel_row, sel_pos, active_rows, graph, generator, top_p,
                top_k, masked=masked.squeeze(1), side=side)
            extra = xa == graph.mask_id
            extra[sel_row, sel_pos] = False  # the event is drawn from the caller's stream, not here
            if rule == "threshold":
                extra &= confidence >= self.threshold
            else:
                # the surest first while the entropies add up to at most γ (+∞ never adds)
                h, order = torch.where(extra, entropy.double(), torch.inf).sort(dim=1, stable=True)
                extra = torch.zeros_like(extra).scatter_(1, order, h.cumsum(1) <= self.entropy_bound)
            xa = torch.where(extra, drawn, xa)
            xa[sel_row, sel_pos] = tokens.to(x.dtype)
            x = project(x.index_put((active,), xa))
            added = extra.sum(1)
            _advance(m, active, n, added, xa.shape[1] - 1, side)
            left = left.index_put((active,), n - 1 - added)
        bar.close()
        return x

    @staticmethod
    def _draw(model, xa, sigma, sel_row, sel_pos, active, graph, generator, top_p, top_k, masked=None, side=None):
        """Tokens [R] for the positions (sel_row, sel_pos) of the sub-batch ``xa``: the denoising
        draw (y ∝ e^{ŝ_y} over the real tokens) from the scores at ``sigma`` [b]. With ``masked``
        (the flat MASK positions of ``xa``, [M]), also (drawn, confidence, entropy) [b, L] of
        ``sedd.ops.denoise_with_stats`` at every MASK from the ``side`` generator (drawn = ``xa``,
        confidence 1, entropy 0 elsewhere)."""
        b, L = xa.shape
        rows = max(sel_row.numel(), 0 if masked is None else masked.numel())
        mask = torch.full((rows, 1), graph.mask_id, dtype=xa.dtype, device=xa.device)

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
                if masked is None:
                    return out
                drawn, confidence, entropy = (xa.reshape(-1).clone(), torch.ones(b * L, device=xa.device),
                                              torch.zeros(b * L, device=xa.device))
                seq = torch.div(masked, L, rounding_mode="floor")
                for part in row_chunks(masked.numel(), weight.shape[0], hidden.element_size()):
                    idx = masked[part]
                    z = head_at_rows(hidden[idx], weight, bias, graph.dim)[:, None]
                    drawn[idx], confidence[idx], entropy[idx] = (
                        v.reshape(-1) for v in ops.denoise_with_stats(
                            z, mask[: z.shape[0]], sigma[seq[part]], graph, side, shift=shift[seq[part]],
                            top_p=top_p, top_k=top_k))
                return out, tuple(v.view(b, L) for v in (drawn, confidence, entropy))

            with on_rows(model, active):
                return model(xa, sigma, head=head)
        with on_rows(model, active):
            log_score, shift = model_scores(model, xa, sigma)
        out = draw(log_score[sel_row, sel_pos][:, None], sel_row, shift)
        if masked is None:
            return out
        # every position at once: the op leaves the ones that are not MASK alone, with (1, 0)
        return out, ops.denoise_with_stats(log_score, xa, sigma, graph, side, shift=shift, top_p=top_p, top_k=top_k)


def _next_events(m, active, n, k, generator):
    """σ̄ [b] at the next event of each active row (n [b] masked positions left) and the number of
    events [b] its evaluation makes, min(n, k); m [B] advances to the k-th event's in place."""
    j = torch.arange(k, device=m.device)
    events = torch.minimum(n, torch.tensor(k, device=m.device))
    # log of m(s_j)/m(s_{j−1}) for the next k events: u^{1/(n − j)}, one after another
    u = torch.rand(active.numel(), k, generator=generator, device=m.device, dtype=torch.float64)
    log_ratio = (u.log() / (n[:, None] - j).clamp_min(1)).cumsum(1)
    m_active = m[active]
    sigma = -torch.log1p(-m_active * log_ratio[:, 0].exp())  # σ̄ at the first event
    m[active] = m_active * log_ratio.gather(1, (events - 1)[:, None]).squeeze(1).exp()
    return sigma, events


def _advance(m, active, n, added, width, generator):
    """Move each active row's m [B] on from its event to the time of its (1 + added)-th event [b],
    as ``tokens_per_step`` moves it to its k-th: the next events after the first of n are at ratios
    u_j^{1/(n − j)}, one after another (uniforms from ``generator``, a fixed [b, width] draw, width ≥
    the most a row can add: no host read). A row that added none stays at its event."""
    u = torch.rand(added.shape[0], max(width, 1), generator=generator, device=m.device, dtype=torch.float64)
    j = torch.arange(1, u.shape[1] + 1, device=m.device)
    log_ratio = (u.log() / (n[:, None] - j).clamp_min(1)).cumsum(1)
    step = log_ratio.gather(1, (added - 1).clamp_min(0)[:, None]).squeeze(1)
    m[active] = m[active] * torch.where(added > 0, step, 0.0).exp()


def _positions(xa, k, mask_id, generator):
    """(row, position) of the next events of each row of ``xa``: the masked positions with the
    largest of i.i.d. uniform keys (a uniform subset), at most k per row; every row holds a MASK."""
    keys = torch.rand(xa.shape, generator=generator, device=xa.device)
    keys = keys.masked_fill(xa != mask_id, -1.0)
    top = keys.topk(min(k, xa.shape[1]), dim=1)
    if k == 1:  # one event in every row: no host read for which were chosen
        return torch.arange(xa.shape[0], device=xa.device), top.indices[:, 0]
    sel_row, sel_col = (top.values >= 0).nonzero(as_tuple=True)
    return sel_row, top.indices[sel_row, sel_col]


def side_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` for the adaptive rules' extra draws, seeded from a hash of the state
    of ``generator`` (None: the device's default generator) without advancing it: the same state gives
    the same draws, and the caller's stream is consumed exactly as without the rules."""
    if generator is None:
        generator = (torch.cuda.default_generators[device.index if device.index is not None
                                                   else torch.cuda.current_device()]
                     if device.type == "cuda" else torch.default_generator)
    state = generator.get_state().numpy().tobytes()  # a CPU tensor for every device: no sync
    seed = int.from_bytes(hashlib.blake2b(state, digest_size=8, person=b"sedd-adaptive").digest(), "little")
    return torch.Generator(device=device).manual_seed(seed >> 1)  # manual_seed takes values below 2**63 too
