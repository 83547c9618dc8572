"""Fixed text as token spans: prompts, suffixes, infills and ``[MASK:n]`` templates, tokenized
piece by piece and placed at their positions, and the [B, L] tokens and mask the sampler holds
(docs/math.md, "Conditioning"; :func:`sedd.sampling.conditioning` is the same for token ids).

Byte-level BPE tokenizers (GPT-2's, the trained ``bpe:N``) attach a space to the word after it, so
with them the trailing spaces of a fixed text that generated tokens follow are left to the
generated token: the prompt "The " is placed as "The" and the model writes " cat". Tokenizers that
keep spaces as tokens of their own (``bytes``, character-level ones) place every text verbatim.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "Span", "TEMPLATE_HOLE", "check_fixed", "fixed_spans", "spaces_join_next_word", "spans_to_mask", "template_spans",
]

TEMPLATE_HOLE = re.compile(r"\[MASK(?::(\d+))?\]")


@dataclass
class Span:
    """Fixed tokens ``ids`` at positions [start, start + len(ids)).

    Attributes:
        source: what asked for it ("prefix", "suffix", "infill 40", "template piece 2"), for messages.
        text: the text as given (its tokens may have dropped trailing spaces).
    """

    source: str
    start: int
    ids: list[int]
    text: str

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


def spaces_join_next_word(tokenizer) -> bool:
    """Whether ``tokenizer`` glues a space to the word after it (" the" is one token), as byte-level
    BPEs (GPT-2's, the trained ``bpe:N``) and SentencePiece do; the ``bytes`` tokenizer and
    character-level ones do not. Such a tokenizer makes "The " end in a lone " " token that the
    model rarely saw before a word, so fixed text that generated tokens follow leaves its trailing
    spaces to them."""
    try:
        return any(len(tokenizer.encode(" " + word)) == 1 for word in ("the", "a", "of", "and", "to", "in"))
    except (KeyError, ValueError, TypeError):  # a tokenizer that cannot encode these words joins nothing
        return False


def _encode(tokenizer, text: str, *, followed_by_hole: bool, join: bool, source: str) -> list[int]:
    if not isinstance(text, str):
        raise ValueError(f"{source}: the text must be a string, got {text!r}")
    kept = text.rstrip(" ") if followed_by_hole and join else text
    if text and not kept:
        raise ValueError(f"{source} {text!r} is only spaces, which this tokenizer attaches to the word after "
                         "them: nothing would be held fixed (give some text, or leave it out)")
    return tokenizer.encode(kept) if kept else []


# Anything that looks like a hole ("[mask:3]", "[MASK: 3]", "[MASK:3 ]", an unclosed "[MASK:3")
# must be one exactly, or the template would silently fix it as literal text.
_HOLE_LIKE = re.compile(r"\[\s*mask(?![a-z])[^\[\]]*\]?", re.IGNORECASE)


@dataclass
class _Layout:
    spans: list[Span]
    holes: list[tuple[int, int, str]]  # (start, size, as written)
    end: int  # positions the template lays out, holes included


def _template_layout(template: str, tokenizer, join: bool) -> _Layout:
    if not isinstance(template, str):
        raise TypeError(f"template must be a string, got {type(template).__name__}")
    pieces: list[tuple[str, int, str]] = []  # (literal text, hole size after it, the hole as written)
    last = 0
    for m in _HOLE_LIKE.finditer(template):
        hole = TEMPLATE_HOLE.fullmatch(m.group(0))
        if hole is None:
            raise ValueError(f"template: {m.group(0)!r} is not a hole; write [MASK:n] for n generated tokens "
                             "or [MASK] for one (capitals, no spaces)")
        n = int(hole.group(1)) if hole.group(1) is not None else 1
        if n < 1:
            raise ValueError(f"template: a hole needs at least one token, got {m.group(0)!r}")
        pieces.append((template[last : m.start()], n, m.group(0)))
        last = m.end()
    pieces.append((template[last:], 0, ""))
    if len(pieces) == 1:
        raise ValueError(f"template {template!r} has no hole: mark the spans to generate with [MASK:n] (or [MASK])")
    spans, holes, pos = [], [], 0
    for i, (text, size, written) in enumerate(pieces):
        source = f"template piece {i + 1} {text!r}"
        if join and not text.strip(" "):
            ids = []  # spaces between holes: left to the generated token after them, as trailing spaces are
        else:  # free positions may follow the last piece too, so every piece counts as followed by a hole
            ids = _encode(tokenizer, text, followed_by_hole=True, join=join, source=source)
        if ids:
            spans.append(Span(source, pos, ids, text))
        pos += len(ids)
        if size:
            holes.append((pos, size, written))
        pos += size
    return _Layout(spans, holes, pos)


def template_spans(template: str, tokenizer) -> list[Span]:
    """The fixed spans of a template laid out from position 0: literal text is fixed,
    ``[MASK:n]`` is a hole of n generated tokens (``[MASK]`` = one).

    Raises:
        ValueError: no hole, a hole of 0 tokens, or something that looks like a hole but is not
            written exactly as one ("[mask:3]", "[MASK: 3]").
    """
    return _template_layout(template, tokenizer, spaces_join_next_word(tokenizer)).spans


def _position(pos) -> int:
    # 5.7 or True would silently become 5 or 1
    if isinstance(pos, bool) or not isinstance(pos, numbers.Integral):
        raise ValueError(f"an infill position must be an integer token position, got {pos!r}")
    return int(pos)


def fixed_spans(
    tokenizer,
    length: int,
    *,
    prefix: str | None = None,
    suffix: str | None = None,
    infill: Sequence[tuple[int, str]] = (),
    template: str | None = None,
) -> list[Span]:
    """Every fixed span of one sequence of ``length`` tokens, sorted by position.

    Args:
        prefix: text starting at position 0 (a prompt).
        suffix: text ending at the last position.
        infill: (position, text) pairs; the text's first token sits at the position (an integer;
            negative positions count from the end: -10 starts 10 tokens before the end).
        template: see :func:`template_spans`; it must fit in ``length`` holes included, and no
            other span may fall in one of its holes.

    Text is placed token for token as the tokenizer encodes it, except that a tokenizer which
    glues a space to the next word (:func:`spaces_join_next_word`) leaves the trailing spaces of a
    text that generated tokens follow (prefix, infill, template pieces) to them. "" is no text;
    text of spaces only that would so become nothing is an error.

    Raises:
        ValueError: a span that does not fit in ``length`` or overlaps another or a template hole,
            an infill without text or with a position that is not an integer, spaces only, or
            spans that leave nothing to generate.
    """
    for name, value in (("prefix", prefix), ("suffix", suffix)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    join = spaces_join_next_word(tokenizer)
    spans: list[Span] = []
    holes: list[tuple[int, int, str]] = []
    if template is not None:
        layout = _template_layout(template, tokenizer, join)
        if layout.end > length:
            raise ValueError(
                f"template {template!r} lays out {layout.end} tokens, holes included, which does not fit in a "
                f"{length}-token sequence; raise the length or make the holes smaller"
            )
        spans += layout.spans
        holes = layout.holes
    if prefix:
        spans.append(Span("prefix", 0, _encode(tokenizer, prefix, followed_by_hole=True, join=join,
                                               source="prefix"), prefix))
    for item in infill:
        try:
            pos, text = item
        except (TypeError, ValueError):
            raise ValueError(f"infill items are (position, text) pairs, got {item!r}") from None
        pos = _position(pos)
        ids = _encode(tokenizer, text, followed_by_hole=True, join=join, source=f"infill at position {pos}")
        if not ids:
            raise ValueError(f"infill at position {pos} has no text to place")
        start = pos + length if pos < 0 else pos
        if start < 0:
            raise ValueError(f"infill {pos}:{text!r}: position {pos} is before the start of a {length}-token sequence")
        spans.append(Span(f"infill {pos}:{text!r}", start, ids, text))
    if suffix:
        ids = _encode(tokenizer, suffix, followed_by_hole=False, join=join, source="suffix")
        spans.append(Span("suffix", length - len(ids), ids, suffix))

    spans = [s for s in spans if s.ids]
    for s in spans:
        if s.start < 0 or s.end > length:
            raise ValueError(
                f"{s.source} is {len(s.ids)} tokens, which does not fit at position {max(s.start, 0)} "
                f"of a {length}-token sequence; raise the length or shorten the text"
            )
    for s in spans:
        for start, size, written in holes:
            if s.start < start + size and start < s.end:
                raise ValueError(
                    f"{s.source} (tokens {s.start}..{s.end - 1}) falls in the template's hole {written} "
                    f"(tokens {start}..{start + size - 1}), which is to be generated"
                )
    ordered = sorted(spans, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.end:
            raise ValueError(
                f"{a.source} (tokens {a.start}..{a.end - 1}) overlaps {b.source} (tokens {b.start}..{b.end - 1})"
            )
    if sum(len(s.ids) for s in spans) == length:
        raise ValueError(f"the fixed spans cover all {length} positions: nothing is left to generate")
    return ordered


def spans_to_mask(rows: Sequence[Sequence[Span]], length: int, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed tokens and mask, both [len(rows), length], from each row's spans."""
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, spans in enumerate(rows):
        for s in spans:
            tokens[b, s.start : s.end] = torch.tensor(s.ids, dtype=torch.long)
            mask[b, s.start : s.end] = True
    return tokens.to(device), mask.to(device)


def check_fixed(fixed_tokens, fixed_mask, B: int, L: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fixed positions of a sampler call, as [B, L] int64 tokens and bool mask (expanded
    views), or None when neither is given. ValueError unless both are given, [L] or [B, L] (or
    [1, L]), and the tokens at the fixed positions are real tokens in [0, N)."""
    if fixed_tokens is None and fixed_mask is None:
        return None
    if fixed_tokens is None or fixed_mask is None:
        raise ValueError("fixed_tokens and fixed_mask must be given together")
    tokens = torch.as_tensor(fixed_tokens, device=device).long()
    mask = torch.as_tensor(fixed_mask, device=device).bool()
    if tokens.shape != mask.shape or tokens.shape[-1] != L or tokens.dim() not in (1, 2):
        raise ValueError(f"fixed_tokens and fixed_mask must both be [L] or [B, L] with L = {L}")
    if tokens.dim() == 2 and tokens.shape[0] not in (1, B):
        raise ValueError(f"fixed_tokens has batch {tokens.shape[0]}, expected 1 or {B}")
    tokens, mask = tokens.expand(B, L), mask.expand(B, L)
    fixed = tokens[mask]
    if fixed.numel() and (fixed.min() < 0 or fixed.max() >= N):
        raise ValueError(f"fixed_tokens must be real tokens in [0, {N}) at the fixed positions")
    return tokens, mask
