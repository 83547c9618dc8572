"""Token caches: a corpus encoded once into a flat, memory-mapped token stream on disk."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sedd.data.cache import get_cache_dir
from sedd.data.corpora import Corpus, get_corpus
from sedd.data.tokenizers import Tokenizer, get_tokenizer
from sedd.io import atomic_write, atomic_write_bytes


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _open_tokens(path: Path, dtype, n: int) -> np.ndarray:
    if n == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _text_batches(corpus: Corpus, batch_chars: int):
    """The corpus's documents in lists of about ``batch_chars`` characters (the last may be short)."""
    batch, chars = [], 0
    for text in corpus:
        batch.append(text)
        chars += len(text)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_to_file(path, corpus: Corpus, tokenizer: Tokenizer, dtype, batch_chars: int,
                    progress: bool) -> tuple[int, int]:
    """Write the token stream of ``corpus`` (EOS after every document) to ``path`` as raw
    ``dtype`` values. Returns (number of tokens, number of documents)."""
    n_tokens = n_docs = 0
    with open(path, "wb") as f, tqdm(total=corpus.num_docs, unit="doc", disable=not progress,
                                     desc=f"tokenizing {corpus.name}/{corpus.split}") as bar:
        for batch in _text_batches(corpus, batch_chars):
            ids = tokenizer.encode_batch(batch)
            lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, len(ids))
            out = np.full(int(lengths.sum()), tokenizer.eos_id, dtype=dtype)
            ends = np.cumsum(lengths) - 1  # EOS positions
            starts = ends - lengths + 1
            for s, e, x in zip(starts, ends, ids):
                out[s:e] = x
            f.write(out.tobytes())
            n_tokens, n_docs = n_tokens + len(out), n_docs + len(batch)
            bar.update(len(batch))
    return n_tokens, n_docs


def tokenize(
    corpus: Corpus,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_chars: int = 4_000_000,
    progress: bool = True,
) -> np.ndarray:
    """The corpus as one flat token stream, EOS (``tokenizer.eos_id``) after every document.

    Built once (documents encoded in parallel batches of about ``batch_chars`` characters) and
    stored under ``cache_dir/tokens/``: a raw ``.bin`` array and a ``.json`` sidecar (tokenizer
    name, corpus fingerprint, dtype, number of tokens and documents), each written to a temporary
    file and moved into place, so a crash never leaves a half-written cache. Later calls with the
    same tokenizer name and corpus fingerprint map the file instead of re-encoding. Concurrent
    builders (several ranks) are safe but duplicate the work: build on rank 0, then barrier.

    Returns:
        read-only ``np.memmap`` of shape [N], dtype ``np.uint16`` when ``vocab_size <= 65536``,
        else ``np.uint32`` (a plain empty array when N == 0).
    """
    dtype = _token_dtype(tokenizer.vocab_size)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", corpus.name)
    stem = f"{safe}-{corpus.split}-{corpus.fingerprint[:16]}"
    directory = get_cache_dir(cache_dir) / "tokens" / tokenizer.name
    bin_path, meta_path = directory / f"{stem}.bin", directory / f"{stem}.json"
    meta_want = {"tokenizer": tokenizer.name, "corpus": corpus.name, "split": corpus.split,
                 "corpus_fingerprint": corpus.fingerprint, "dtype": np.dtype(dtype).name,
                 "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size}
    if meta_path.exists() and bin_path.exists():
        meta = json.loads(meta_path.read_text())
        n = meta.get("num_tokens", -1)
        if all(meta.get(k) == v for k, v in meta_want.items()) and \
                bin_path.stat().st_size == n * np.dtype(dtype).itemsize:
            return _open_tokens(bin_path, dtype, n)

    directory.mkdir(parents=True, exist_ok=True)
    counts = []
    atomic_write(bin_path, lambda tmp: counts.extend(
        _encode_to_file(tmp, corpus, tokenizer, dtype, batch_chars, progress)))
    n_tokens, n_docs = counts
    meta = dict(meta_want, num_tokens=n_tokens, num_docs=n_docs)
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())  # written last: the commit
    return _open_tokens(bin_path, dtype, n_tokens)


def load_tokens(
    data: str | os.PathLike = "default",
    split: str = "train",
    tokenizer: Tokenizer | str = "bpe",
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **corpus_kwargs,
) -> np.ndarray:
    """``tokenize(get_corpus(data, split, **corpus_kwargs), tokenizer)``; ``tokenizer`` may be a
    :class:`Tokenizer` or a :func:`get_tokenizer` spec. Returns np.memmap [N] uint16 | uint32."""
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer, cache_dir=cache_dir, progress=progress)
    corpus = get_corpus(data, split, **corpus_kwargs)
    return tokenize(corpus, tokenizer, cache_dir=cache_dir, progress=progress)


def split_documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """Cut a token stream (shape [N], EOS after every document) back into documents.

    Returns:
        one 1-D array (a view of ``tokens``, EOS excluded) per document, in order; tokens after
        the last EOS, if any, form a final document.
    """
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    starts = np.concatenate([[0], ends + 1])
    docs = [tokens[s:e] for s, e in zip(starts[:-1], ends)]
    if starts[-1] < len(tokens):
        docs.append(tokens[starts[-1]:])
    return docs

