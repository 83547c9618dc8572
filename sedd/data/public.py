"""The evaluation data pipeline of the public SEDD code, to reproduce its zero-shot numbers.

The library's own pipeline (:func:`sedd.data.get_corpus` + :func:`sedd.data.tokenize` + blocks)
cuts text into documents, drops empty ones, puts EOS after each and packs one stream, keeping or
padding the last partial block. The public code (``data.py`` of louaaron/Score-Entropy-Discrete-
Diffusion) differs in three ways, which this module reproduces:

1. **Rows, EOS after every one.** Every row of the dataset is detokenized, tokenized and followed
   by EOS, empty rows included (they become a lone EOS). WikiText rows are lines: a local
   WikiText file gives one row per line, a non-blank line with its newline, a blank line as an
   empty row (how the Hugging Face WikiText builder makes its rows). Other local files: one row
   per line, the same way.
2. **Blocks per batch of rows.** The rows are concatenated and cut into blocks within each batch
   of :data:`BATCH_ROWS` rows (``datasets.map(batched=True)``'s default) of each of
   :data:`NUM_PROC` contiguous shards (``num_proc=8``), not over the whole stream.
3. **Remainders dropped.** Each batch's last tokens that do not fill a block are dropped.

The likelihood bound is the same; ``train/eval.py --protocol sedd`` reports it with this data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sedd.data.corpora import _SPLIT_ALIASES, _SPLIT_FILES, HF_DATASETS, _read_text, _split_files, load_hf_split
from sedd.data.detokenizers import resolve_detokenizer

NUM_PROC = 8  # the public get_dataset's num_proc
BATCH_ROWS = 1000  # datasets.Dataset.map's default batch_size

__all__ = ["NUM_PROC", "BATCH_ROWS", "public_rows", "public_blocks"]


def public_rows(spec: str | os.PathLike, split: str = "test",
                detokenizer: str | Callable[[str], str] | None = "auto") -> list[str]:
    """Every row of ``spec`` (a name in :data:`HF_DATASETS`, a local text file, or a directory of
    split files: test.txt, valid.txt, ...), detokenized, empty rows included (rule 1 of the module
    docstring).

    Args:
        split: for dataset names and directories (its split file); a local file is all one split.
        detokenizer: "auto" (the dataset's own for names, none for files), None, a key of
            :data:`sedd.data.DETOKENIZERS` or a callable. Applied to every row, empty ones too, as
            the public code does.
    """
    name = os.fspath(spec)
    if name in HF_DATASETS:
        ds, _ = load_hf_split(name, split)
        rows = list(ds[HF_DATASETS[name].column])
        detok = resolve_detokenizer(detokenizer, HF_DATASETS[name].detokenizer)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            path = _split_file(path, split)
        if not path.is_file():
            raise FileNotFoundError(f"the public pipeline reads a dataset name, a text file or a directory of "
                                    f"split files; {name!r} is none of them")
        text = _read_text(path)
        if text is None:
            raise ValueError(f"{path} is not UTF-8 text")
        rows = [line if line.strip() else "" for line in text.splitlines(keepends=True)]
        detok = resolve_detokenizer(detokenizer, None)
    return [detok(r) for r in rows] if detok else rows


def _split_file(directory: Path, split: str) -> Path:
    """The file of ``split`` in a directory of split files (test.txt, valid.txt, ...), as the
    library's own pipeline reads such a directory."""
    files = _split_files(directory)
    if not files:
        names = sorted(n for names in _SPLIT_FILES.values() for n in names)
        raise ValueError(f"{str(directory)!r} holds none of the split files {names}: give the text file itself")
    split = _SPLIT_ALIASES.get(split, split)
    if split not in files:
        raise ValueError(f"{str(directory)!r} has no {split!r} split file (it has {sorted(files)})")
    return files[split]


def _shards(n_rows: int, num_proc: int) -> list[tuple[int, int]]:
    """The contiguous [start, end) row ranges of ``datasets``' map(num_proc=...)."""
    num_proc = max(1, min(num_proc, n_rows))  # datasets lowers num_proc to the number of rows
    div, mod = divmod(n_rows, num_proc)
    bounds = []
    for i in range(num_proc):
        start = div * i + min(i, mod)
        bounds.append((start, start + div + (1 if i < mod else 0)))
    return bounds


def public_blocks(rows: Sequence[str], tokenizer, block_size: int, *, num_proc: int = NUM_PROC,
                  batch_rows: int = BATCH_ROWS) -> np.ndarray:
    """[n, block_size] int64 blocks of ``rows`` (rules 1-3 of the module docstring).

    Returns an empty [0, block_size] array when no batch fills a block.
    """
    if block_size < 1 or num_proc < 1 or batch_rows < 1:
        raise ValueError(f"block_size, num_proc and batch_rows must be >= 1, got {block_size}, {num_proc}, {batch_rows}")
    eos = tokenizer.eos_id
    blocks: list[np.ndarray] = []
    for start, end in _shards(len(rows), num_proc):
        for b in range(start, end, batch_rows):
            ids = tokenizer.encode_batch(list(rows[b : min(b + batch_rows, end)]))
            stream = np.fromiter((t for row in ids for t in (*row, eos)), dtype=np.int64)
            n = len(stream) // block_size
            if n:
                blocks.append(stream[: n * block_size].reshape(n, block_size))
    return np.concatenate(blocks) if blocks else np.zeros((0, block_size), dtype=np.int64)
