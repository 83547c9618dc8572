"""Corpora, tokenizers, token caches and packed batches for training and evaluation.

One module per concept: ``corpora`` (sources, splits), ``detokenizers``, ``tokenizers``,
``tokens`` (the token cache), ``packing`` (blocks, document ids), ``batches``; ``cache`` says
where caches live. Import from ``sedd.data``: every public name is re-exported here.

Everything here works offline: the default corpus is the Python standard library of the running
interpreter and the default tokenizer is a byte-level BPE trained on it (once, then cached).
Hugging Face datasets and the hub GPT-2 tokenizer are used only when asked for by name.

Public API (details in each docstring)::

    get_tokenizer(spec="bpe", *, cache_dir=None, corpus="default") -> Tokenizer
        "bpe" / "bpe:8192" (trained byte-level BPE, cached), "bytes" (257 ids, no training),
        "gpt2" (hub), or a local path
        (a directory with vocab.json + merges.txt or with tokenizer.json, or a tokenizer.json).
    train_bpe(corpus, vocab_size=4096, *, cache_dir=None) -> Tokenizer
    Tokenizer: .name, .vocab_size, .eos_id, .encode(text), .encode_batch(texts), .decode(ids)

    get_corpus(spec="default", split="train", *, valid_fraction=0.02, doc_split="auto",
               detokenizer="auto") -> Corpus
        "default" (stdlib), a local text file or directory, or a Hugging Face dataset name
        (see HF_DATASETS). A Corpus iterates over document strings.
    auto_detokenizer(spec) -> (name | None, why)
        what an evaluation's "auto" detokenizer is for a source: a dataset's own, or the one a
        local source's own name (not any folder above it) names.

    tokenize(corpus, tokenizer, *, cache_dir=None) -> np.memmap [N] uint16 | uint32
        Flat token stream, EOS after every document, cached on disk (written atomically).
    load_tokens(data="default", split="train", tokenizer="bpe", ...) -> np.memmap
        get_corpus + get_tokenizer + tokenize in one call.

    PackedBlocks(tokens, block_size)          contiguous [block_size] blocks of the stream
    BatchIterator(blocks, batch_size, ...)    infinite, seeded, resumable, rank-sharded batches
    eval_batches(blocks, batch_size, ...)     every block once, in order, sharded by rank
    segment_ids(blocks, eos_id)               document index of every position of a block
    split_documents(tokens, eos_id)           the stream cut back into per-document token arrays

    validation_split(spec) / evaluation_split(spec)   the split training validates on / that an
                                              evaluation reports on by default

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

from sedd.data.batches import BatchIterator, eval_batches
from sedd.data.cache import get_cache_dir
from sedd.data.corpora import (
    DEFAULT_VALID_FRACTION,
    DOC_SPLITS,
    HF_DATASETS,
    LARGE_FILE_BYTES,
    Corpus,
    HFDataset,
    auto_detokenizer,
    evaluation_split,
    get_corpus,
    predefined_splits,
    validation_split,
)
from sedd.data.detokenizers import DETOKENIZERS
from sedd.data.packing import PackedBlocks, segment_ids
from sedd.data.tokenizers import DEFAULT_BPE_VOCAB, EOS_TOKEN, Tokenizer, byte_tokenizer, get_tokenizer, train_bpe
from sedd.data.tokens import load_tokens, split_documents, tokenize

__all__ = [
    "EOS_TOKEN",
    "DEFAULT_BPE_VOCAB",
    "DEFAULT_VALID_FRACTION",
    "DOC_SPLITS",
    "LARGE_FILE_BYTES",
    "HF_DATASETS",
    "HFDataset",
    "Tokenizer",
    "get_tokenizer",
    "byte_tokenizer",
    "train_bpe",
    "Corpus",
    "get_corpus",
    "predefined_splits",
    "validation_split",
    "evaluation_split",
    "tokenize",
    "load_tokens",
    "PackedBlocks",
    "BatchIterator",
    "eval_batches",
    "segment_ids",
    "split_documents",
    "get_cache_dir",
    "DETOKENIZERS",
    "auto_detokenizer",
]
