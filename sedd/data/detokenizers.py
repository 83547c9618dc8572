"""Detokenizers: undo the word-level tokenisation of some evaluation sets before a subword
tokenizer sees them (the conventions of the GPT-2 / SEDD zero-shot perplexity evaluations)."""

from __future__ import annotations

import re
from typing import Callable


def _wikitext_detok(s: str) -> str:
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("s '", "s'")):
        s = s.replace(a, b)
    for p in ":;.!?,":
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def _ptb_detok(s: str) -> str:
    s = s.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
    s = s.replace(" \n ", "\n").replace("\\/", "/")
    while " N " in s:  # repeated because adjacent matches overlap
        s = s.replace(" N ", " 1 ")
    return s.replace("$ 1", "$1").replace("# 1", "#1").replace("<unk>", "?")


def _lm1b_detok(s: str) -> str:
    s = s.replace("http : / / ", "http://").replace("https : / / ", "https://")
    s = re.sub(r" '(\w+)", r"'\1", s)
    s = re.sub(r" (\w+) \. ", r" \1. ", s)
    s = re.sub(r" (\w+) \.$", r" \1.", s)
    for p in "?!":
        s = s.replace(f" {p} ", f"{p} ")
        s = re.sub(rf" \{p}$", p, s)
    for a, b in ((" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/")):
        s = s.replace(a, b)
    s = re.sub(r'" ([^"]+) "', r'"\1"', s)
    s = re.sub(r"' ([^']+) '", r"'\1'", s)
    s = re.sub(r"\( ([^()]+) \)", r"(\1)", s)
    s = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", s)
    return s.replace("$ ", "$").replace("\N{POUND SIGN} ", "\N{POUND SIGN}")


def _lambada_detok(s: str) -> str:
    s = s.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"')
    s = s.replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
    return "\n" + s.strip()


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": _wikitext_detok,
    "ptb": _ptb_detok,
    "lm1b": _lm1b_detok,
    "lambada": _lambada_detok,
}


# The names each dataset goes by as a directory or file name, matched whole (case aside): a name
# that merely contains one ("penny", "wikitext-notes") says nothing about the text's conventions.
DATASET_NAMES: dict[str, str] = {
    "wikitext": r"wikitext(-?(2|103))?(-raw)?(-v1)?",
    "ptb": r"ptb(_text_only)?|penn[-_]?treebank",
    "lambada": r"lambada(_openai)?",
    "lm1b": r"lm1b",
}
# WikiText's own distribution names its files wiki.{train,valid,test}.{tokens,raw}.
_WIKITEXT_FILE = re.compile(r"wiki\.(train|valid|test)\.(tokens|raw)")
_SPLIT_SUFFIX = re.compile(r"[-_.](train|valid|validation|val|dev|test)$")


def detokenizer_for_name(name: str) -> str | None:
    """The detokenizer of the dataset a directory or file name (without its extensions) is
    the name of, or None."""
    name = name.lower()
    for detok, pattern in DATASET_NAMES.items():
        if re.fullmatch(pattern, name):
            return detok
    return None


def detokenizer_for_file(filename: str) -> str | None:
    """The detokenizer a text file's own name names: ``ptb.test.txt``, ``wikitext-2-test.txt``,
    ``wiki.test.raw``, ``lambada_test_plain_text.txt`` is not one (only the name up to its first
    dot, less a split word at its end, is compared with :data:`DATASET_NAMES`)."""
    filename = filename.lower()
    if _WIKITEXT_FILE.fullmatch(filename):
        return "wikitext"
    stem = filename.split(".", 1)[0]
    return detokenizer_for_name(_SPLIT_SUFFIX.sub("", stem))


def resolve_detokenizer(detokenizer, default: str | None):
    if detokenizer == "auto":
        detokenizer = default
    if detokenizer is None or callable(detokenizer):
        return detokenizer
    if detokenizer not in DETOKENIZERS:
        raise ValueError(f"unknown detokenizer {detokenizer!r}; known: {sorted(DETOKENIZERS)}")
    return DETOKENIZERS[detokenizer]

