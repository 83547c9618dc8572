"""Corpora: the default corpus (the standard library), local text files and directories, and
Hugging Face datasets, each as one split of an iterable of documents; and the split policy."""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from sedd.data.cache import FORMAT_VERSION, content_key
from sedd.data.detokenizers import detokenizer_for_file, detokenizer_for_name, resolve_detokenizer
from sedd.data.offline import cache_may_hold, go_offline, hub_offline_reason

DEFAULT_VALID_FRACTION = 0.02
LARGE_FILE_BYTES = 1 << 20  # files in a directory above this are cut into paragraphs/lines


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith(".") or spec.startswith("~")



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
DOC_SPLITS = ("auto", "file", "paragraph", "line")  # how local files become documents


def _split_files(directory: Path) -> dict[str, Path]:
    """split -> the file that holds it, for the split files present in ``directory``."""
    found = {}
    for split, names in _SPLIT_FILES.items():
        files = [directory / n for n in names if (directory / n).is_file()]
        if files:
            found[split] = files[0]
    return found


def predefined_splits(spec: str | os.PathLike) -> set[str] | None:
    """The splits a source defines itself: a dataset's own, or those of a directory's split files
    (train.txt, valid.txt, test.txt, ...). None for a source split by hashing (the default
    corpus, a text file, a directory without split files): it has "train", "validation", "all"."""
    spec = os.fspath(spec)
    if spec in HF_DATASETS:
        return set(HF_DATASETS[spec].splits)
    path = Path(spec).expanduser()
    if spec != "default" and path.is_dir():
        return set(_split_files(path)) or None
    return None


def validation_split(spec: str | os.PathLike) -> str:
    """The split a training run validates on: "validation", or "test" for a source that has a
    test split but no validation split (lambada, lm1b)."""
    splits = predefined_splits(spec)
    if splits is not None and "validation" not in splits and "test" in splits:
        return "test"
    return "validation"


def evaluation_split(spec: str | os.PathLike) -> str:
    """The split an evaluation reports on by default: "test" where the source has one, else
    "validation"; a text file, or a directory without test or validation files, is held-out text
    as a whole ("all"); the default corpus, which the CPU preset trains on, its "validation"."""
    splits = predefined_splits(spec)
    if splits is None:
        return "validation" if os.fspath(spec) == "default" else "all"
    for split in ("test", "validation"):
        if split in splits:
            return split
    return "all"


def auto_detokenizer(spec: str | os.PathLike) -> tuple[str | None, str]:
    """What ``detokenizer="auto"`` means for a source, and why: (a key of DETOKENIZERS or None,
    the reason in words). A dataset name uses its own; a local source only the name of the
    dataset it is: a directory's own name, a file's own name (``ptb.test.txt``) or, for a split
    file (``test.txt``, ``valid.txt``, ...), the name of the directory that holds the splits. No
    other folder of the path counts (``notes/penny/x.txt`` is not PTB)."""
    name = os.fspath(spec)
    if name in HF_DATASETS:
        detok = HF_DATASETS[name].detokenizer
        return detok, f"the dataset {name}'s own" if detok else f"the dataset {name} has none"
    path = Path(name).expanduser()
    split_files = {n for names in _SPLIT_FILES.values() for n in names}
    if path.is_file() and path.name.lower() in split_files:
        named = path.resolve().parent.name
        where, detok = f"the directory {named!r} of the split file {path.name}", detokenizer_for_name(named)
    elif path.is_file():
        where, detok = f"the file name {path.name!r}", detokenizer_for_file(path.name)
    else:
        named = path.resolve().name
        where, detok = f"the directory name {named!r}", detokenizer_for_name(named)
    if detok is None:
        return None, f"{where} names no dataset with a detokenizer"
    return detok, f"{where} names the {detok} dataset"


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
    h = hashlib.sha256(f"stdlib v{FORMAT_VERSION}".encode())
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
    fp = content_key({"src": h.hexdigest(), "split": split, "valid_fraction": valid_fraction})

    def items():
        for rel in chosen:
            yield rel, (root / rel).read_bytes().decode("utf-8")

    return Corpus("default", split, fp, items, num_docs=len(chosen))


def _local_corpus(path: Path, split: str, valid_fraction: float, doc_split: str, detok) -> Corpus:
    if doc_split not in DOC_SPLITS:
        raise ValueError(
            f"doc_split must be 'auto', 'file', 'paragraph' or 'line', got {doc_split!r}")
    path = path.resolve()
    single = path.is_file()
    files: list[tuple[Path, str]]  # (file, key prefix)
    split_files = {} if single else _split_files(path)
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
    fp = content_key({"src": "local", "path": str(path), "files": stats, "split": split,
                  "valid_fraction": valid_fraction if hashed else None, "doc_split": doc_split,
                  "detok": getattr(detok, "__qualname__", None), "v": FORMAT_VERSION})

    def items():
        def all_items():
            found = skipped = 0
            for f, key in files:
                text = _read_text(f)
                if text is None:
                    if single or not hashed:
                        raise ValueError(f"{f} is not UTF-8 text")
                    skipped += 1
                    continue  # binary or non-UTF-8 files in a directory are skipped
                how = doc_split
                if how == "auto" and not single and hashed and len(text) <= LARGE_FILE_BYTES:
                    how = "file"  # small files of a directory are one document each
                pieces = _cut(text, how)
                for i, piece in enumerate(pieces):
                    if piece.strip():
                        found += 1
                        yield (key if len(pieces) == 1 else f"{key}#{i}"), piece
            if not found:  # said here, where the counts are known, not as "0 blocks" much later
                n = len(files)
                raise ValueError(
                    f"no text found in {path} ({n} file{'s' * (n != 1)} read, {skipped} skipped as "
                    "binary or not UTF-8): every file is empty or blank"
                    + ("" if n else "; the directory holds no files (hidden ones are skipped)"))

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
    detok = resolve_detokenizer(detokenizer, spec.detokenizer)
    ds, label = load_hf_split(name, split)
    fp = content_key({"src": "hf", "label": label, "split": spec.splits[split], "column": spec.column,
                  "ds": getattr(ds, "_fingerprint", None),
                  "detok": getattr(detok, "__qualname__", None), "v": FORMAT_VERSION})

    def items():
        i = 0
        for batch in ds.iter(batch_size=1024):
            for text in batch[spec.column]:
                key, i = f"{split}:{i}", i + 1
                if text and text.strip():
                    yield key, (detok(text) if detok else text)

    return Corpus(name, split, fp, items, num_docs=len(ds))


def load_hf_split(name: str, split: str):
    """(``datasets.Dataset``, label) of one split of a name in :data:`HF_DATASETS`; offline, a
    ConnectionError at once unless the local cache may hold it (see :mod:`sedd.data.offline`)."""
    spec = HF_DATASETS[name]
    if split not in spec.splits:
        raise ValueError(f"dataset {name!r} has splits {sorted(spec.splits)}, not {split!r}")
    label = spec.path + (f"/{spec.config}" if spec.config else "")
    instead = (
        "pass a local copy instead: --data PATH (get_corpus(PATH)), a text file or a directory "
        "holding train.txt / validation.txt / test.txt"
    )
    offline = hub_offline_reason()
    if offline is not None:
        if not cache_may_hold(spec.path):  # fail now, not after the import and the retries
            raise ConnectionError(
                f"cannot reach the Hugging Face hub to load dataset {name!r} ({label}): {offline}, and "
                f"the local datasets cache holds no copy of it; {instead}"
            )
        go_offline()
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, spec.config, split=spec.splits[split])
    except Exception as e:
        if _is_network_error(e):
            raise ConnectionError(
                f"cannot reach the Hugging Face hub to load dataset {name!r} ({label}) and it is "
                f"not in the local datasets cache; {instead}"
            ) from e
        raise RuntimeError(
            f"failed to load Hugging Face dataset {name!r} ({label}): {e}; pass --data PATH to a "
            "local text file or directory instead"
        ) from e
    return ds, label


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
                             resolve_detokenizer(detokenizer, None))
    if _looks_like_path(spec_str) or isinstance(spec, os.PathLike):
        raise FileNotFoundError(f"data path {spec_str!r} does not exist")
    raise ValueError(
        f"unknown data source {spec_str!r}: not a path that exists, and not one of the known "
        f"names {['default', *HF_DATASETS]}"
    )

