"""Corpora, tokenizers, token caches and packed batches for training and evaluation.

Everything here works offline: the default corpus is the Python standard library of the running
interpreter and the default tokenizer is a byte-level BPE trained on it (once, then cached).
Hugging Face datasets and the hub GPT-2 tokenizer are used only when asked for by name.

Public API (details in each docstring)::

    get_tokenizer(spec="bpe", *, cache_dir=None, corpus="default") -> Tokenizer
        "bpe" / "bpe:8192" (trained byte-level BPE, cached), "gpt2" (hub), or a local path
        (a directory with vocab.json + merges.txt or with tokenizer.json, or a tokenizer.json).
    train_bpe(corpus, vocab_size=4096, *, cache_dir=None) -> Tokenizer
    Tokenizer: .name, .vocab_size, .eos_id, .encode(text), .encode_batch(texts), .decode(ids)

    get_corpus(spec="default", split="train", *, valid_fraction=0.02, doc_split="auto",
               detokenizer="auto") -> Corpus
        "default" (stdlib), a local text file or directory, or a Hugging Face dataset name
        (see HF_DATASETS). A Corpus iterates over document strings.

    tokenize(corpus, tokenizer, *, cache_dir=None) -> np.memmap [N] uint16 | uint32
        Flat token stream, EOS after every document, cached on disk (written atomically).
    load_tokens(data="default", split="train", tokenizer="bpe", ...) -> np.memmap
        get_corpus + get_tokenizer + tokenize in one call.

    PackedBlocks(tokens, block_size)          contiguous [block_size] blocks of the stream
    BatchIterator(blocks, batch_size, ...)    infinite, seeded, resumable, rank-sharded batches
    eval_batches(blocks, batch_size, ...)     every block once, in order, sharded by rank
    segment_ids(blocks, eos_id)               document index of every position of a block
    split_documents(tokens, eos_id)           the stream cut back into per-document token arrays

Splits. Sources with a predefined split (Hugging Face datasets, a directory holding train.txt /
valid.txt / test.txt) use it. Every other source (the default corpus, a text file, a directory of
text files) is split deterministically by hashing each document's key (its relative path, plus
"#i" for the i-th piece of a file that is cut into paragraphs or lines): a fraction
``valid_fraction`` goes to "validation", the rest to "train", "all" is everything; these sources
have no "test" split.

Default corpus. All ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, sorted by relative
path, one document per file, skipping ``site-packages``/``dist-packages`` (third-party code that
differs between machines), files that are not UTF-8 (a few deliberately mis-encoded test inputs) and
empty files. Test directories are kept: they are real, human-written code and make up about 60 % of
the ~32 M characters (Python 3.11: ~1,760 documents). Its fingerprint hashes file contents, so it is
the same on every machine with the same standard library.

Cache layout (``cache_dir`` argument, else ``$SEDD_CACHE``, else ``~/.cache/sedd``)::

    tokenizers/bpe{V}-{corpus fingerprint}.json            trained BPE (tokenizers JSON)
    tokens/{tokenizer name}/{corpus}-{split}-{fingerprint}.bin / .json   token stream + sidecar
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "EOS_TOKEN",
    "HF_DATASETS",
    "Tokenizer",
    "get_tokenizer",
    "train_bpe",
    "Corpus",
    "get_corpus",
    "tokenize",
    "load_tokens",
    "PackedBlocks",
    "BatchIterator",
    "eval_batches",
    "segment_ids",
    "split_documents",
    "get_cache_dir",
    "DETOKENIZERS",
]

EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 4096
DEFAULT_VALID_FRACTION = 0.02
LARGE_FILE_BYTES = 1 << 20  # files in a directory above this are cut into paragraphs/lines
_FORMAT_VERSION = 1  # bump to invalidate every cache written by this module


def get_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``cache_dir`` if given, else ``$SEDD_CACHE``, else ``~/.cache/sedd``."""
    path = cache_dir or os.environ.get("SEDD_CACHE") or Path.home() / ".cache" / "sedd"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; caches may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith(".") or spec.startswith("~")


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------


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
        _atomic_write_bytes(path, self._tok.to_str().encode())

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
    import huggingface_hub

    try:
        vocab = huggingface_hub.hf_hub_download(repo_id, "vocab.json")
        huggingface_hub.hf_hub_download(repo_id, "merges.txt")
    except Exception as e:
        if _is_network_error(e):
            raise ConnectionError(
                f"cannot reach the Hugging Face hub to download the {repo_id!r} tokenizer (and it "
                "is not in the local hub cache); pass a local directory holding vocab.json and "
                "merges.txt instead, e.g. get_tokenizer('../shared/data/gpt2')"
            ) from e
        raise
    return _from_vocab_merges(Path(vocab).parent, "gpt2")


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
        _atomic_write_bytes(path, tok.to_str().encode())
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
            train split of ``corpus`` and cached; ``"gpt2"``: GPT-2 (50257 ids, EOS 50256) from the
            Hugging Face hub (raises ``ConnectionError`` when the hub cannot be reached);
            otherwise a path: a directory holding ``vocab.json`` + ``merges.txt`` (byte-level BPE,
            e.g. ``../shared/data/gpt2``) or ``tokenizer.json``, or a ``tokenizer.json`` file.
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
    if spec == "gpt2":
        return _gpt2_from_hub("gpt2")
    path = Path(spec).expanduser()
    if path.exists():
        return _from_path(path)
    if _looks_like_path(spec):
        raise FileNotFoundError(f"tokenizer path {spec!r} does not exist")
    raise ValueError(
        f"unknown tokenizer {spec!r}: expected 'bpe', 'bpe:<vocab size>', 'gpt2' or a path to a "
        "directory holding vocab.json + merges.txt (or tokenizer.json)"
    )


# ------------------------------------------------------------------------------------------------
# Detokenizers: undo the word-level tokenisation of some evaluation sets before a subword tokenizer
# sees them (the conventions of the GPT-2 / SEDD zero-shot perplexity evaluations).
# ------------------------------------------------------------------------------------------------


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


def _resolve_detokenizer(detokenizer, default: str | None):
    if detokenizer == "auto":
        detokenizer = default
    if detokenizer is None or callable(detokenizer):
        return detokenizer
    if detokenizer not in DETOKENIZERS:
        raise ValueError(f"unknown detokenizer {detokenizer!r}; known: {sorted(DETOKENIZERS)}")
    return DETOKENIZERS[detokenizer]


# ------------------------------------------------------------------------------------------------
# Corpora
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFDataset:
    """How a dataset name maps onto ``datasets.load_dataset(path, config, split=...)[column]``."""

    path: str
    config: str | None
    column: str
    splits: dict[str, str]  # our split name -> Hugging Face split expression
    detokenizer: str | None = None


HF_DATASETS: dict[str, HFDataset] = {
    # openwebtext has only a train split: its last 100k documents are the validation set
    # (as in SEDD)
    "openwebtext": HFDataset(
        "openwebtext", None, "text", {"train": "train[:-100000]", "validation": "train[-100000:]"}
    ),
    "wikitext-103": HFDataset(
        "wikitext", "wikitext-103-raw-v1", "text",
        {"train": "train", "validation": "validation", "test": "test"}, "wikitext",
    ),
    "wikitext-2": HFDataset(
        "wikitext", "wikitext-2-raw-v1", "text",
        {"train": "train", "validation": "validation", "test": "test"}, "wikitext",
    ),
    "ptb": HFDataset(
        "ptb_text_only", None, "sentence",
        {"train": "train", "validation": "validation", "test": "test"}, "ptb",
    ),
    "lambada": HFDataset("EleutherAI/lambada_openai", None, "text", {"test": "test"}, "lambada"),
    "lm1b": HFDataset("lm1b", None, "text", {"train": "train", "test": "test"}, "lm1b"),
    "text8": HFDataset(
        "afmck/text8", None, "text", {"train": "train", "validation": "validation", "test": "test"}
    ),
}

_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
_SPLIT_FILES = {  # a directory holding any of these files uses them as its splits
    "train": ("train.txt",),
    "validation": ("valid.txt", "validation.txt", "val.txt", "dev.txt"),
    "test": ("test.txt",),
}


class Corpus:
    """An iterable of document strings (one split of one source), re-iterable and deterministic.

    Attributes:
        name: the source ("default", a dataset name, or a local file/directory name).
        split: "train", "validation", "test" or "all".
        fingerprint: hex digest identifying the exact documents (source, split and options);
            caches built from the corpus are keyed by it.
        num_docs: number of documents when known without reading them, else None.
    """

    def __init__(self, name: str, split: str, fingerprint: str,
                 items: Callable[[], Iterator[tuple[str, str]]], num_docs: int | None = None):
        self.name, self.split, self.fingerprint, self.num_docs = name, split, fingerprint, num_docs
        self._items = items

    def items(self) -> Iterator[tuple[str, str]]:
        """(key, document) pairs; keys are unique within the source and decide hashed splits."""
        return self._items()

    def __iter__(self) -> Iterator[str]:
        return (text for _, text in self._items())

    def __repr__(self) -> str:
        return (f"Corpus(name={self.name!r}, split={self.split!r}, "
                f"fingerprint={self.fingerprint[:12]!r})")


def _in_validation(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h < fraction * 2.0**64


def _in_split(key: str, split: str, fraction: float) -> bool:
    return split == "all" or _in_validation(key, fraction) == (split == "validation")


def _hash_split(items: Iterator[tuple[str, str]], split: str, fraction: float):
    return ((key, text) for key, text in items if _in_split(key, split, fraction))


def _cut(text: str, how: str) -> list[str]:
    """Cut a file's text into documents: "file" (whole), "paragraph" (on blank lines), "line",
    or "auto" (paragraphs if the text has a blank line, else lines)."""
    if how == "auto":
        how = "paragraph" if re.search(r"\n[ \t]*\n", text) else "line"
    if how == "file":
        return [text]
    parts = re.split(r"\n[ \t]*\n", text) if how == "paragraph" else text.splitlines()
    return [p.strip("\n") for p in parts]


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary (has a NUL byte) or not UTF-8."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not skip.intersection(p.relative_to(root).parts)
    )
    return root, rels


def _default_corpus(split: str, valid_fraction: float) -> Corpus:
    if split == "test":
        raise ValueError("the default corpus has no test split; use 'validation' or 'all'")
    root, rels = _stdlib_files()
    h = hashlib.sha256(f"stdlib v{_FORMAT_VERSION}".encode())
    chosen = []  # ~30 MB: reading and hashing every file costs well under a second
    for rel in rels:
        data = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + data + b"\0")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few deliberately mis-encoded test inputs
        if text.strip() and _in_split(rel, split, valid_fraction):
            chosen.append(rel)
    fp = _sha256({"src": h.hexdigest(), "split": split, "valid_fraction": valid_fraction})

    def items():
        for rel in chosen:
            yield rel, (root / rel).read_bytes().decode("utf-8")

    return Corpus("default", split, fp, items, num_docs=len(chosen))


def _local_corpus(path: Path, split: str, valid_fraction: float, doc_split: str, detok) -> Corpus:
    if doc_split not in ("auto", "file", "paragraph", "line"):
        raise ValueError(
            f"doc_split must be 'auto', 'file', 'paragraph' or 'line', got {doc_split!r}")
    path = path.resolve()
    single = path.is_file()
    files: list[tuple[Path, str]]  # (file, key prefix)
    split_files = {}
    if not single:
        for s, names in _SPLIT_FILES.items():
            found = [path / n for n in names if (path / n).is_file()]
            if found:
                split_files[s] = found[0]
    if single:
        if split == "test":
            raise ValueError(
                f"{path} is a single file and has no test split; use 'validation' or 'all'")
        files, hashed = [(path, path.name)], True
    elif split_files:  # predefined splits: no hashing
        if split == "all":
            files = [(f, f.name) for f in split_files.values()]
        elif split in split_files:
            files = [(split_files[split], split_files[split].name)]
        else:
            names = " / ".join(_SPLIT_FILES[split]) if split in _SPLIT_FILES else split
            raise FileNotFoundError(f"{path} has split files {sorted(split_files)} but no {names}")
        hashed = False
    else:
        if split == "test":
            raise ValueError(f"{path} has no test split (no test.txt); use 'validation' or 'all'")
        files = [
            (p, p.relative_to(path).as_posix())
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        hashed = True

    stats = [(key, f.stat().st_size, f.stat().st_mtime_ns) for f, key in files]
    fp = _sha256({"src": "local", "path": str(path), "files": stats, "split": split,
                  "valid_fraction": valid_fraction if hashed else None, "doc_split": doc_split,
                  "detok": getattr(detok, "__qualname__", None), "v": _FORMAT_VERSION})

    def items():
        def all_items():
            for f, key in files:
                text = _read_text(f)
                if text is None:
                    if single or not hashed:
                        raise ValueError(f"{f} is not UTF-8 text")
                    continue  # binary or non-UTF-8 files in a directory are skipped
                how = doc_split
                if how == "auto" and not single and hashed and len(text) <= LARGE_FILE_BYTES:
                    how = "file"  # small files of a directory are one document each
                pieces = _cut(text, how)
                for i, piece in enumerate(pieces):
                    if piece.strip():
                        yield (key if len(pieces) == 1 else f"{key}#{i}"), piece

        stream = _hash_split(all_items(), split, valid_fraction) if hashed else all_items()
        for key, text in stream:
            yield key, (detok(text) if detok else text)

    return Corpus(path.name, split, fp, items)


def _is_network_error(e: BaseException) -> bool:
    """True when ``e`` (or an exception it was raised from) says the hub could not be reached."""
    import socket

    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
             "ReadTimeout", "TimeoutException", "NetworkError", "ProxyError", "MaxRetryError"}
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if any(c.__name__ in names for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def _hf_corpus(name: str, split: str, detokenizer) -> Corpus:
    spec = HF_DATASETS[name]
    if split not in spec.splits:
        raise ValueError(f"dataset {name!r} has splits {sorted(spec.splits)}, not {split!r}")
    detok = _resolve_detokenizer(detokenizer, spec.detokenizer)
    import datasets

    label = spec.path + (f"/{spec.config}" if spec.config else "")
    try:
        ds = datasets.load_dataset(spec.path, spec.config, split=spec.splits[split])
    except Exception as e:
        if _is_network_error(e):
            raise ConnectionError(
                f"cannot reach the Hugging Face hub to load dataset {name!r} ({label}) and it is "
                "not in the local datasets cache; pass --data PATH to a local text file or "
                "directory instead"
            ) from e
        raise RuntimeError(
            f"failed to load Hugging Face dataset {name!r} ({label}): {e}; pass --data PATH to a "
            "local text file or directory instead"
        ) from e
    fp = _sha256({"src": "hf", "label": label, "split": spec.splits[split], "column": spec.column,
                  "ds": getattr(ds, "_fingerprint", None),
                  "detok": getattr(detok, "__qualname__", None), "v": _FORMAT_VERSION})

    def items():
        i = 0
        for batch in ds.iter(batch_size=1024):
            for text in batch[spec.column]:
                key, i = f"{split}:{i}", i + 1
                if text and text.strip():
                    yield key, (detok(text) if detok else text)

    return Corpus(name, split, fp, items, num_docs=len(ds))


def get_corpus(
    spec: str | os.PathLike = "default",
    split: str = "train",
    *,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    doc_split: str = "auto",
    detokenizer: str | Callable[[str], str] | None = "auto",
) -> Corpus:
    """One split of a text source, as an iterable of (non-empty) document strings.

    Args:
        spec: ``"default"`` (the Python standard library, see the module docstring); a name in
            :data:`HF_DATASETS` (loaded with ``datasets.load_dataset``; a name wins over a local
            path of the same name, write ``./ptb`` for the path); or a path: a UTF-8 text file, or
            a directory of them (read recursively in sorted order, skipping hidden, binary and
            non-UTF-8 files).
        split: "train", "validation" (aliases "valid", "val", "dev"), "test" or "all" (hashed
            sources only: everything).
        valid_fraction: fraction of documents in "validation" for hashed sources.
        doc_split: how local files become documents: "auto" (a single file given as ``spec`` is
            cut into paragraphs on blank lines, or into lines if it has no blank line; a file in a
            directory is one document unless larger than 1 MiB, then it is cut like a single
            file), "file", "paragraph" or "line".
        detokenizer: "auto" (the dataset's own, see :data:`DETOKENIZERS`, for Hugging Face names;
            none for local sources), None, a key of :data:`DETOKENIZERS`, or a callable str -> str
            (cache keys know a callable only by its qualified name: give distinct ones distinct
            names).

    Raises:
        ValueError: unknown dataset name or split.  FileNotFoundError: a path that does not exist.
        ConnectionError: a Hugging Face dataset while the hub cannot be reached.
    """
    split = _SPLIT_ALIASES.get(split, split)
    if split not in ("train", "validation", "test", "all"):
        raise ValueError(f"split must be 'train', 'validation', 'test' or 'all', got {split!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    spec_str = os.fspath(spec)
    if spec_str == "default":
        return _default_corpus(split, valid_fraction)
    if spec_str in HF_DATASETS:
        if split == "all":
            splits = sorted(HF_DATASETS[spec_str].splits)
            raise ValueError(f"dataset {spec_str!r} has splits {splits}, not 'all'")
        return _hf_corpus(spec_str, split, detokenizer)
    path = Path(spec_str).expanduser()
    if path.exists():
        return _local_corpus(path, split, valid_fraction, doc_split,
                             _resolve_detokenizer(detokenizer, None))
    if _looks_like_path(spec_str) or isinstance(spec, os.PathLike):
        raise FileNotFoundError(f"data path {spec_str!r} does not exist")
    raise ValueError(
        f"unknown data source {spec_str!r}: not a path that exists, and not one of the known "
        f"names {['default', *HF_DATASETS]}"
    )


# ------------------------------------------------------------------------------------------------
# Token cache
# ------------------------------------------------------------------------------------------------


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _open_tokens(path: Path, dtype, n: int) -> np.ndarray:
    if n == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


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
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=stem + ".", suffix=".tmp")
    n_tokens = n_docs = 0
    try:
        with os.fdopen(fd, "wb") as f, tqdm(total=corpus.num_docs, unit="doc", disable=not progress,
                                            desc=f"tokenizing {corpus.name}/{corpus.split}") as bar:
            def flush(batch):
                nonlocal n_tokens, n_docs
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

            batch, chars = [], 0
            for text in corpus:
                batch.append(text)
                chars += len(text)
                if chars >= batch_chars:
                    flush(batch)
                    batch, chars = [], 0
            if batch:
                flush(batch)
        os.chmod(tmp, 0o644)
        os.replace(tmp, bin_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = dict(meta_want, num_tokens=n_tokens, num_docs=n_docs)
    _atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())  # written last: the commit
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


# ------------------------------------------------------------------------------------------------
# Packing and batching
# ------------------------------------------------------------------------------------------------


class PackedBlocks(torch.utils.data.Dataset):
    """A token stream cut into ``len(self) = N // block_size`` contiguous, non-overlapping blocks
    (block i = tokens[i * block_size : (i + 1) * block_size]); the last N % block_size tokens are
    dropped. Documents run across block boundaries; EOS tokens already separate them.

    Args:
        tokens: [N] integer array, typically the memmap from :func:`tokenize` (read lazily).
        block_size: L, tokens per block.
    """

    def __init__(self, tokens: np.ndarray, block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.num_blocks = len(tokens) // block_size
        self._set_tokens(tokens)

    def _set_tokens(self, tokens: np.ndarray) -> None:
        self._tokens = tokens
        n = self.num_blocks * self.block_size
        self._blocks = tokens[:n].reshape(self.num_blocks, self.block_size)

    def __getstate__(self):
        # Pickled into DataLoader workers (spawn) as the file to map, not as a copy of the data.
        state = dict(self.__dict__, _blocks=None)
        t = self._tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap) and t.filename:
            state["_tokens"] = ("memmap", t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state):
        tokens = state.pop("_tokens")
        self.__dict__.update(state)
        if isinstance(tokens, tuple) and tokens[0] == "memmap":
            _, filename, dtype, offset, shape = tokens
            tokens = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset,
                               shape=shape)
        self._set_tokens(tokens)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        """Block i: int64 tensor [L]."""
        return torch.from_numpy(np.asarray(self._blocks[i], dtype=np.int64))

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Blocks ``indices`` stacked in the given order: int64 tensor [len(indices), L]."""
        return torch.from_numpy(self._blocks[np.asarray(indices, dtype=np.int64)].astype(np.int64))


class BatchIterator:
    """Endless training batches of blocks, deterministic given ``seed`` and resumable exactly.

    Every epoch visits the blocks in the order of a permutation drawn from (seed, epoch) (or in
    order when ``shuffle=False``), cut into global batches of ``batch_size * world_size`` blocks;
    an incomplete last global batch is dropped. Rank r takes the r-th slice of ``batch_size``
    blocks of each global batch, so ranks never overlap and together cover every global batch.
    ``position`` counts global batches served; ``state_dict()`` saves it and
    ``load_state_dict()`` makes the next batch the one that would have come next.

    Args:
        blocks: the :class:`PackedBlocks` to draw from.
        batch_size: B, blocks per rank per step.
        seed, shuffle, rank, world_size: as above.

    Yields:
        int64 tensors [B, L] (on CPU).
    """

    def __init__(self, blocks: PackedBlocks, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, int(seed)
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.global_batch_size = batch_size * world_size
        self.batches_per_epoch = len(blocks) // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(blocks)} blocks cannot fill one global batch of "
                             f"{self.global_batch_size} (batch_size * world_size)")
        self.position = 0
        self._order_epoch, self._order = -1, None

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (0-based)."""
        return self.position // self.batches_per_epoch

    def _indices(self, position: int) -> np.ndarray:
        epoch, step = divmod(position, self.batches_per_epoch)
        if epoch != self._order_epoch:
            n = len(self.blocks)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n)
                           if self.shuffle else np.arange(n))
            self._order_epoch = epoch
        start = step * self.global_batch_size + self.rank * self.batch_size
        return self._order[start: start + self.batch_size]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.blocks.get_batch(self._indices(self.position))
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        """Plain-int state: {"position", "seed", "shuffle", "global_batch_size", "num_blocks"}."""
        return {"position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch_size": self.global_batch_size, "num_blocks": len(self.blocks)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (the saved seed wins). The data and the global batch
        size must match; the world size may change if the global batch size does not."""
        for key in ("num_blocks", "global_batch_size"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(
                    f"cannot resume: saved {key}={state[key]}, this iterator has {mine}")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.position = int(state["position"])
        self._order_epoch = -1


def eval_batches(blocks: PackedBlocks, batch_size: int, *, rank: int = 0,
                 world_size: int = 1) -> Iterator[torch.Tensor]:
    """Every block exactly once, in order, for evaluation: rank r gets the r-th of ``world_size``
    contiguous, near-equal shards of the block indices (together they cover all blocks).

    Yields:
        int64 tensors [b, L] with b = batch_size except possibly for the last batch of a shard.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    shard = np.array_split(np.arange(len(blocks)), world_size)[rank]
    for s in range(0, len(shard), batch_size):
        yield blocks.get_batch(shard[s: s + batch_size])


def segment_ids(blocks: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the document each position belongs to, counted from 0 within each block.

    A document's EOS belongs to that document; the next document starts after it. Use for
    attention masks with no cross-document attention (attend where segment ids are equal).

    Args:
        blocks: integer tensor [..., L] of token ids.
    Returns:
        int64 tensor [..., L], non-decreasing along the last dimension.
    """
    is_eos = (blocks == eos_id).long()
    return is_eos.cumsum(-1) - is_eos
