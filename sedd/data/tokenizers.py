"""Tokenizers: a byte-level BPE trained on a corpus and cached, GPT-2 from the hub, or a local
tokenizer, behind one small interface (:class:`Tokenizer`)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from sedd.data.cache import get_cache_dir
from sedd.data.corpora import Corpus, _is_network_error, _looks_like_path, get_corpus
from sedd.data.offline import cache_may_hold, go_offline, hub_offline_reason
from sedd.io import atomic_write_bytes

EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 4096


class Tokenizer:
    """A ``tokenizers.Tokenizer`` behind the small interface the trainer and evaluator use.

    Attributes:
        name: identifies the tokenizer in cache paths; ends with a hash of its full definition,
            so two tokenizers with the same name encode identically.
        vocab_size: number of token ids (special tokens included); ids lie in [0, vocab_size).
        eos_id: id of ``<|endoftext|>``, appended after every document in token streams.
    """

    def __init__(self, tok, kind: str, eos_token: str = EOS_TOKEN):
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer {kind!r} has no {eos_token!r} token to use as EOS")
        self._tok = tok
        self.eos_id: int = int(eos_id)
        self.vocab_size: int = int(tok.get_vocab_size(with_added_tokens=True))
        digest = hashlib.sha256(tok.to_str().encode()).hexdigest()[:12]
        self.name: str = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', kind)}-{digest}"

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no EOS appended)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts, encoded in parallel by ``tokenizers`` (no EOS appended)."""
        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets: same ids, ~1.5x faster
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of a sequence of ids (list, 1-D np.ndarray or 1-D torch.Tensor); EOS is kept as
        ``<|endoftext|>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.astype(np.int64).tolist()
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one ``tokenizer.json`` (atomically); ``get_tokenizer(path)`` reads it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self._tok.to_str().encode())

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _byte_level(tok):
    from tokenizers import decoders, pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _from_vocab_merges(directory: Path, kind: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tok = _byte_level(HFTokenizer(bpe))
    tok.add_special_tokens([EOS_TOKEN])  # as in GPT-2: "<|endoftext|>" in text encodes to EOS
    return Tokenizer(tok, kind)


def _from_path(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    if path.is_file():
        return Tokenizer(HFTokenizer.from_file(str(path)), path.stem)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _from_vocab_merges(path, path.name)
    if (path / "tokenizer.json").is_file():
        return Tokenizer(HFTokenizer.from_file(str(path / "tokenizer.json")), path.name)
    raise ValueError(f"{path} holds neither vocab.json + merges.txt nor tokenizer.json")


def _gpt2_from_hub(repo_id: str = "gpt2") -> Tokenizer:
    instead = (
        "pass a local copy instead: --tokenizer DIR on the command line, get_tokenizer(DIR) or "
        f"load_pretrained(..., tokenizer=DIR), where DIR holds GPT-2's vocab.json and merges.txt "
        f"(the files of https://huggingface.co/{repo_id}, fetched once on a machine with a network)"
    )
    offline = hub_offline_reason()
    if offline is not None:
        if not cache_may_hold(repo_id):
            raise ConnectionError(
                f"cannot reach the Hugging Face hub to download the {repo_id!r} tokenizer: {offline}, "
                f"and the local hub cache holds no copy of it; {instead}"
            )
        go_offline()
    import huggingface_hub

    try:
        vocab = huggingface_hub.hf_hub_download(repo_id, "vocab.json")
        huggingface_hub.hf_hub_download(repo_id, "merges.txt")
    except Exception as e:
        if _is_network_error(e):
            raise ConnectionError(
                f"cannot reach the Hugging Face hub to download the {repo_id!r} tokenizer (and it "
                f"is not in the local hub cache); {instead}"
            ) from e
        raise
    return _from_vocab_merges(Path(vocab).parent, "gpt2")


def byte_symbols() -> list[str]:
    """The character that stands for each byte 0..255 in byte-level BPE vocabularies (GPT-2's
    mapping: printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in order)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def byte_tokenizer() -> Tokenizer:
    """The byte-level BPE with no merges: ``<|endoftext|>`` = id 0 and byte b = id b + 1 (257 ids).
    Needs no training and no download: the quickest tokenizer for a first run, at about four times
    the tokens per text of a trained BPE."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    # Ids in byte order, so every process builds the same tokenizer (ByteLevel.alphabet() is a
    # set whose order changes from one process to the next).
    vocab = {EOS_TOKEN: 0}
    for char in byte_symbols():
        vocab[char] = len(vocab)
    tok = _byte_level(HFTokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens([EOS_TOKEN])
    return Tokenizer(tok, "bytes")


def _train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None, progress: bool):
    """Train a byte-level BPE with ``<|endoftext|>`` as special token (id 0). The slow part of
    :func:`train_bpe`, kept separate so tests can check that a cached tokenizer is not retrained."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = _byte_level(HFTokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def train_bpe(
    corpus: Corpus,
    vocab_size: int = DEFAULT_BPE_VOCAB,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` ids (256 bytes + merges + ``<|endoftext|>`` = id 0),
    trained on every document of ``corpus``, or loaded from the cache when one was already trained
    on a corpus with the same fingerprint. On the whole default corpus training takes seconds."""
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    name = f"bpe{vocab_size}-{corpus.fingerprint[:16]}.json"
    path = get_cache_dir(cache_dir) / "tokenizers" / name
    if not path.exists():
        tok = _train_bpe_tokenizer(iter(corpus), vocab_size, corpus.num_docs, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, tok.to_str().encode())
    return Tokenizer(HFTokenizer.from_file(str(path)), f"bpe{vocab_size}")


def get_tokenizer(
    spec: str = "bpe",
    *,
    cache_dir: str | os.PathLike | None = None,
    corpus: str | Corpus = "default",
    progress: bool = True,
) -> Tokenizer:
    """The tokenizer named by ``spec``.

    Args:
        spec: ``"bpe"`` or ``"bpe:N"``: byte-level BPE with N ids (default 4096) trained on the
            train split of ``corpus`` and cached; ``"bytes"``: :func:`byte_tokenizer` (257 ids, no
            training); ``"gpt2"``: GPT-2 (50257 ids, EOS 50256) from the
            Hugging Face hub (raises ``ConnectionError`` when the hub cannot be reached);
            otherwise a path: a directory holding ``vocab.json`` + ``merges.txt`` (byte-level BPE,
            GPT-2's for offline use) or ``tokenizer.json``, or a ``tokenizer.json`` file.
        cache_dir: see :func:`get_cache_dir`.
        corpus: corpus spec (or :class:`Corpus`) the BPE is trained on; ignored for other specs.
    """
    if spec == "bpe" or spec.startswith("bpe:"):
        try:
            vocab_size = int(spec.split(":", 1)[1]) if ":" in spec else DEFAULT_BPE_VOCAB
        except ValueError:
            raise ValueError(f"bad tokenizer spec {spec!r}: expected 'bpe' or 'bpe:<vocab size>'")
        if isinstance(corpus, str):
            corpus = get_corpus(corpus, "train")
        return train_bpe(corpus, vocab_size, cache_dir=cache_dir, progress=progress)
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "gpt2":
        return _gpt2_from_hub("gpt2")
    path = Path(spec).expanduser()
    if path.exists():
        return _from_path(path)
    if _looks_like_path(spec):
        raise FileNotFoundError(f"tokenizer path {spec!r} does not exist")
    raise ValueError(
        f"unknown tokenizer {spec!r}: expected 'bpe', 'bpe:<vocab size>', 'bytes', 'gpt2' or a path to a "
        "directory holding vocab.json + merges.txt (or tokenizer.json)"
    )

