"""Functions of the example tasks (lm_eval imports this file by its path, for ``!function utils.*``)."""

import re

from sedd.data import DETOKENIZERS


def wikitext_page(doc: dict) -> str:
    """The text the model scores: the page with WikiText's word-level conventions undone."""
    return DETOKENIZERS["wikitext"](doc["page"])


def rolling_results(doc: dict, results: list) -> dict:
    """Per-document (log-likelihood, count) pairs for lm_eval's weighted perplexities. Words and
    bytes are those of the original page, as lm_eval's wikitext task counts them, so the word
    perplexity is comparable across tokenizers (and with that task)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    size = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, size),
        "bits_per_byte": (loglikelihood, size),
    }
