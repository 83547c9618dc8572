"""The autoregressive judge of train/quality.py: a causal LM from ``transformers`` that scores
decoded samples (the scoring convention is in train/quality.py's docstring), where it is loaded
from (a local directory, or a Hub id with the offline rules of ``sedd.data.offline``), and how a
long text is cut into judge windows.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sedd.data.offline import cache_may_hold, hub_offline_reason
from train.cli import InputError

__all__ = ["Judge", "judge_source", "load_judge", "windows"]


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
            pieces += [(i, w, k) for w, k in windows(self.encode(text), self.context)]
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


def windows(ids: list[int], context: int) -> list[tuple[list[int], int]]:
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


def judge_source(spec: str) -> tuple[str, str | None]:
    """Where the judge loads from and, for a Hub id, why only the local cache may be used (None:
    the Hub is reachable). Fails at once, before any model is loaded, when the Hub cannot be used
    and the local cache has no copy."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"--judge {spec!r} is a file; expected a model directory (config.json, weights, "
                             "tokenizer) or a Hub id")
        return str(path), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not re.fullmatch(r"[\w.\-/]+", spec):
        raise InputError(f"--judge {spec!r}: no such directory (and not a Hub id)")
    offline = hub_offline_reason()
    if offline is None and os.environ.get("TRANSFORMERS_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        offline = "TRANSFORMERS_OFFLINE is set"
    if offline is not None and not cache_may_hold(spec):
        raise _offline_error(spec, offline)
    return spec, offline


def _offline_error(spec: str, reason: str) -> InputError:
    return InputError(
        f"--judge {spec!r}: the Hugging Face Hub cannot be used ({reason}) and the judge is not in the local "
        f"Hub cache. Use a local judge: --judge DIR, a directory written by save_pretrained "
        f"(python train/train_judge.py --out DIR trains a small one offline)"
    )


def load_judge(spec: str, device: torch.device, *, first_token: str = "bos", context: int | None = None,
               progress: bool = False) -> Judge:
    """Load the judge (bf16 on CUDA, fp32 on CPU). InputError when it cannot be found, with the
    offline alternative named."""
    source, offline = judge_source(spec)
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
            raise _offline_error(spec, offline) from err
        raise InputError(f"--judge {spec!r}: cannot load it with transformers: {str(err).splitlines()[0]}") from err
    model = model.to(device=device, dtype=dtype).eval()
    limit = next((getattr(model.config, k) for k in ("n_positions", "max_position_embeddings", "n_ctx")
                  if isinstance(getattr(model.config, k, None), int)), None)
    if context is None:
        if limit is None:
            raise InputError(f"--judge {spec!r}: its config names no maximum length; pass --judge-context")
        context = limit
    elif limit is not None and context > limit:
        raise InputError(f"--judge-context {context} is longer than the judge's {limit} positions")
    if context < 2:
        raise InputError(f"--judge-context must be >= 2, got {context}")
    prefix = None
    if first_token == "bos":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise InputError(f"--judge {spec!r} has neither a BOS nor an EOS token: use --first-token skip")
    return Judge(model, tokenizer, spec, int(context), prefix, device)
