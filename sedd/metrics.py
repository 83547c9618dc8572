"""Generation quality: generative perplexity under an autoregressive judge, with its interval, and
the sample statistics the papers report beside it (unigram entropy, the top token's share).

    from sedd.metrics import load_judge, generation_metrics

    judge = load_judge("gpt2-large", torch.device("cuda"))          # or a local directory
    generation_metrics(tokens, [tokenizer.decode(row) for row in tokens], judge)
    # {"gen_ppl": ..., "gen_ppl_ci": [lo, hi], "entropy": ..., "degenerate": ..., ...}

Scoring convention. The judge's tokenizer usually differs from the model's, so each sample is
decoded to text with the model's tokenizer and that text is re-encoded with the judge's tokenizer
without special tokens; the judge scores this canonical tokenization, not the sampler's token ids.
With ``first_token="bos"`` the judge's BOS token (its EOS when it has none, as GPT-2) is put in
front and every text token is scored, the first one as the start of a document; with ``"skip"``
nothing is prepended and the first token is not scored (the public SEDD code's convention).
Texts longer than the judge's context C are scored in windows of C tokens that start every
C // 2 tokens: each token is scored once, in the first window that holds it, so every token after
the first window sees at least C // 2 tokens of context (:func:`judge_windows`).

Generative perplexity is exp(Σ_i nll_i / Σ_i n_i) over all scored tokens of all sequences, with a
95% interval from the delta-method standard error of that ratio over sequences (the sequences are
the independent draws), mapped through exp (a normal approximation: optimistic for a handful of
sequences). Entropy is the unigram entropy (nats) of each sequence's own token ids (as MDLM and
Duo report it), averaged over sequences: a sampler that buys a low perplexity by repeating itself
shows up there, and in the share of sequences one token id fills at least half of.

Bad input is a ``ValueError`` whose message names each argument as ``name(argument)`` says (the
command lines pass their flags: ``--judge``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sedd.data.offline import cache_may_hold, hub_offline_reason

__all__ = ["Judge", "Z_95", "generation_metrics", "judge_source", "judge_windows", "load_judge", "perplexity_summary",
           "top_share", "unigram_entropy"]

Z_95 = 1.959963984540054


@dataclass
class Judge:
    """A causal LM and its tokenizer, with the scoring convention of the module docstring."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    context: int
    prefix_id: int | None  # prepended to every text (BOS, or EOS when there is no BOS); None: skip
    device: torch.device

    def encode(self, text: str) -> list[int]:
        """The scored sequence of a text: [prefix] + its tokens (no special tokens added)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ([self.prefix_id] if self.prefix_id is not None else []) + ids

    @torch.inference_mode()
    def score(self, texts: list[str], *, batch_size: int = 8, progress: bool = False):
        """Per text: (sum of the scored tokens' NLL in nats, number of scored tokens).

        Returns two float64 / int64 numpy arrays [len(texts)]."""
        pieces = []  # (text index, window ids, number of scored tokens at the window's end)
        for i, text in enumerate(texts):
            pieces += [(i, w, k) for w, k in judge_windows(self.encode(text), self.context)]
        nll = np.zeros(len(texts), dtype=np.float64)
        count = np.zeros(len(texts), dtype=np.int64)
        for i, _, k in pieces:
            count[i] += k
        # Longest first: batches of similar lengths waste little on padding.
        pieces = [p for p in sorted(pieces, key=lambda p: -len(p[1])) if p[2] > 0]
        pad = self.prefix_id if self.prefix_id is not None else 0
        bar = tqdm(total=len(pieces), desc="judge", unit="window", disable=not progress, leave=False)
        for start in range(0, len(pieces), batch_size):
            batch = pieces[start : start + batch_size]
            width = len(batch[0][1])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)  # over the shifted targets
            for r, (_, w, k) in enumerate(batch):
                ids[r, : len(w)] = torch.tensor(w)
                attn[r, : len(w)] = 1
                scored[r, len(w) - 1 - k : len(w) - 1] = True
            ids, attn, scored = ids.to(self.device), attn.to(self.device), scored.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            token_nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(batch), width - 1)
            sums = (token_nll * scored).sum(1).double().cpu().numpy()
            for r, (i, _, _) in enumerate(batch):
                nll[i] += sums[r]
            bar.update(len(batch))
        bar.close()
        return nll, count


def judge_windows(ids: list[int], context: int) -> list[tuple[list[int], int]]:
    """Cut a scored sequence into judge windows: [(window ids, k)], where the last k tokens of the
    window are scored (predicted from the tokens before them in the window).

    Windows hold ``context`` tokens and start every ``context // 2`` tokens; the tokens ids[1:]
    are each scored exactly once, in the first window that holds them."""
    if context < 2:
        raise ValueError(f"the judge context must be >= 2 tokens, got {context}")
    stride = context // 2
    out, begin, done = [], 0, 1  # ids[0] is never a target (the prefix, or the unscored first token)
    while done < len(ids):
        end = min(begin + context, len(ids))
        out.append((ids[begin:end], end - done))
        done, begin = end, begin + stride
    return out


def _names(name: Callable[[str], str] | None) -> Callable[[str], str]:
    return name or (lambda argument: argument)


def judge_source(spec: str, *, name: Callable[[str], str] | None = None) -> tuple[str, str | None]:
    """Where the judge ``spec`` (a directory or a Hub id) loads from and, for a Hub id, why only
    the local cache may be used (None: the Hub is reachable). ValueError at once, before any model
    is loaded, when it is neither, or when the Hub cannot be used and the local cache has no copy."""
    n = _names(name)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{n('judge')} {spec!r} is a file; expected a model directory (config.json, weights, "
                             "tokenizer) or a Hub id")
        return str(path), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not re.fullmatch(r"[\w.\-/]+", spec):
        raise ValueError(f"{n('judge')} {spec!r}: no such directory (and not a Hub id)")
    offline = hub_offline_reason()
    if offline is None and os.environ.get("TRANSFORMERS_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        offline = "TRANSFORMERS_OFFLINE is set"
    if offline is not None and not cache_may_hold(spec):
        raise _offline_error(spec, offline, n)
    return spec, offline


def _offline_error(spec: str, reason: str, n: Callable[[str], str]) -> ValueError:
    return ValueError(
        f"{n('judge')} {spec!r}: the Hugging Face Hub cannot be used ({reason}) and the judge is not in the local "
        f"Hub cache. Use a local judge: {n('judge')} DIR, a directory written by save_pretrained "
        f"(python train/train_judge.py --out DIR trains a small one offline)"
    )


def load_judge(spec: str, device: torch.device, *, first_token: str = "bos", context: int | None = None,
               progress: bool = False, name: Callable[[str], str] | None = None) -> Judge:
    """Load the judge ``spec`` (:func:`judge_source`) with ``transformers``, in bf16 on CUDA and fp32
    on CPU. ``context``: tokens per window (default: the judge's maximum positions);
    ``first_token``: "bos" or "skip" (module docstring). ValueError when it cannot be found or
    used, with the offline alternative named."""
    n = _names(name)
    source, offline = judge_source(spec, name=name)
    local_only = offline is not None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        if local_only:
            raise _offline_error(spec, offline, n) from err
        raise ValueError(f"{n('judge')} {spec!r}: cannot load it with transformers: {str(err).splitlines()[0]}") from err
    model = model.to(device=device, dtype=dtype).eval()
    limit = next((getattr(model.config, k) for k in ("n_positions", "max_position_embeddings", "n_ctx")
                  if isinstance(getattr(model.config, k, None), int)), None)
    if context is None:
        if limit is None:
            raise ValueError(f"{n('judge')} {spec!r}: its config names no maximum length; pass {n('context')}")
        context = limit
    elif limit is not None and context > limit:
        raise ValueError(f"{n('context')} {context} is longer than the judge's {limit} positions")
    if context < 2:
        raise ValueError(f"{n('context')} must be >= 2, got {context}")
    prefix = None
    if first_token == "bos":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError(f"{n('judge')} {spec!r} has neither a BOS nor an EOS token: use {n('first_token')} skip")
    elif first_token != "skip":
        raise ValueError(f"{n('first_token')} must be 'bos' or 'skip', got {first_token!r}")
    return Judge(model, tokenizer, spec, int(context), prefix, device)


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def unigram_entropy(tokens: torch.Tensor) -> np.ndarray:
    """Entropy (nats) of the empirical token distribution of each row of [N, L] ids: [N] float64."""
    out = np.empty(len(tokens), dtype=np.float64)
    for i, row in enumerate(tokens):
        counts = torch.unique(row, return_counts=True)[1].double()
        p = counts / counts.sum()
        out[i] = float(-(p * p.log()).sum())
    return out


def top_share(tokens: torch.Tensor) -> np.ndarray:
    """Share of each row of [N, L] ids taken by its most frequent id: [N] float64."""
    return np.array([float(torch.unique(row, return_counts=True)[1].max()) / len(row) for row in tokens])


def perplexity_summary(nll: np.ndarray, count: np.ndarray) -> dict:
    """exp(Σ nll / Σ n) over sequences (``nll`` [m] summed nats, ``count`` [m] scored tokens) with
    a 95% interval from the delta-method standard error of the ratio over sequences. ValueError
    when no token was scored."""
    m, total = len(nll), int(count.sum())
    if total == 0:
        raise ValueError("the judge scored no token at all: the samples decode to empty text")
    mean = float(nll.sum() / total)
    if m > 1:
        resid = (nll - mean * count) / (total / m)
        se = float(math.sqrt((resid**2).sum() / (m * (m - 1))))
    else:
        se = float("nan")
    return {
        "gen_ppl": math.exp(mean),
        "gen_ppl_ci": [math.exp(mean - Z_95 * se), math.exp(mean + Z_95 * se)],
        "nll": mean,
        "nll_se": se,
        "judge_tokens": total,
    }


def generation_metrics(tokens: torch.Tensor, texts: list[str], judge: Judge, *, batch_size: int = 8,
                       degenerate_share: float = 0.5, progress: bool = False) -> dict:
    """The metrics of samples ``tokens`` [N, L] (the model's ids) decoded to ``texts``: generative
    perplexity under ``judge`` with its interval (:func:`perplexity_summary`), the mean unigram
    entropy (and its spread), the top token's mean share, and the share of degenerate sequences
    (one id filling at least ``degenerate_share`` of it). ValueError when nothing was scored."""
    if not 0 < degenerate_share <= 1:
        raise ValueError(f"degenerate_share must be in (0, 1], got {degenerate_share}")
    nll, count = judge.score(texts, batch_size=batch_size, progress=progress)
    entropy = unigram_entropy(tokens)
    share = top_share(tokens)
    return {
        **perplexity_summary(nll, count),
        "entropy": float(entropy.mean()),
        "entropy_std": float(entropy.std(ddof=1)) if len(entropy) > 1 else 0.0,
        "top_token_share": float(share.mean()),
        "degenerate": float((share >= degenerate_share).mean()),
    }
