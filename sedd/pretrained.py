"""A checkpoint together with everything needed to use it: model, graph, noise schedule and tokenizer.

The sampling and evaluation entry points (``train/sample.py``, ``train/eval.py``) and notebooks
all start the same way::

    p = load_pretrained("runs/small", device="cuda")            # or "louaaron/sedd-small"
    p.model, p.graph, p.noise, p.tokenizer

Autoregressive checkpoints (``"objective": "ar"`` in config.json, ``train/run.py --objective ar``)
load the same way into a :class:`sedd.model.ARModel`; they have no forward process, so ``p.graph``
and ``p.noise`` are None, and ``p.objective`` says which kind was loaded.

Checkpoints are directories in the layout of :meth:`sedd.model.SEDD.save_pretrained` (``config.json``
and ``model.safetensors``; the trainer adds ``tokenizer.json`` and records its spec under the
config key ``"tokenizer"``), or Hugging Face Hub ids of public SEDD checkpoints, which carry no
tokenizer and use GPT-2's.

Tokenizer resolution, first match wins:

1. the ``tokenizer`` argument (a :func:`sedd.data.get_tokenizer` spec: ``"gpt2"``, ``"bpe:N"``
   or a path to a directory with ``vocab.json`` + ``merges.txt`` or ``tokenizer.json``);
2. ``CHECKPOINT/tokenizer.json`` when the checkpoint is a local directory that holds one;
3. GPT-2 from the Hub (what the public checkpoints were trained with). Offline, the error explains
   the local alternative: ``tokenizer=DIR`` (``--tokenizer DIR``), a directory holding GPT-2's
   ``vocab.json`` and ``merges.txt``.

The tokenizer must fit the model: ``tokenizer.vocab_size <= config["tokens"]`` (every id it can
produce must be a real token of the model), otherwise ``ValueError``. A tokenizer given explicitly
must moreover be the one the checkpoint records, where it records one: the same vocabulary as its
``tokenizer.json``, and as many ids as the model has tokens when the config names a tokenizer spec
(the trainer writes both); another vocabulary would decode every sample wrongly without a sign, so
it is a ``ValueError`` (:func:`check_tokenizer_matches`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sedd.data import Tokenizer, get_tokenizer
from sedd.graph import Graph
from sedd.model import SEDD, ARModel
from sedd.model.checkpoint import checkpoint_dir, config_objective, normalise_config, read_config
from sedd.noise import Noise
from sedd.objectives import get_objective, objective_of

__all__ = [
    "Pretrained", "load_pretrained", "resolve_tokenizer", "check_tokenizer_fits", "check_tokenizer_matches",
    "resolve_device",
]


@dataclass
class Pretrained:
    """A loaded checkpoint.

    Attributes:
        model: the SEDD model (or, for an autoregressive checkpoint, the
            :class:`~sedd.model.ARModel`) on the requested device, in eval mode.
        graph, noise: the forward process and schedule of its config (None for an
            autoregressive checkpoint).
        tokenizer: the resolved tokenizer (see the module docstring).
        tokenizer_source: where the tokenizer came from, for reports: the spec given, the path of
            the checkpoint's ``tokenizer.json``, or ``"gpt2"`` (the Hub).
        checkpoint: the directory or Hub id as given.
        config: ``model.config`` (the whole public-format config).
    """

    model: SEDD | ARModel
    graph: Graph | None
    noise: Noise | None
    tokenizer: Tokenizer
    tokenizer_source: str
    checkpoint: str

    @property
    def config(self) -> dict[str, Any]:
        return self.model.config

    @property
    def objective(self) -> str:
        """The objective's name, a key of :data:`sedd.objectives.OBJECTIVES`: "sedd" (a diffusion
        model), "ar" (the autoregressive baseline), "block" (block diffusion); "sedd" for a score
        network without a config (a test double, a wrapped public model)."""
        return config_objective(getattr(self.model, "config", {}))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; anything else as ``torch.device``.
    Raises ValueError for a CUDA device on a machine without one."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"bad device {str(device)!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available here")
    return device


def _local_config(checkpoint: str) -> dict[str, Any] | None:
    """config.json of a local checkpoint directory, checked (:func:`sedd.model.checkpoint.normalise_config`),
    or None (a Hub id, or no such file yet). ValueError naming the file and the field."""
    folder = Path(os.path.expanduser(checkpoint))
    if not (folder / "config.json").is_file():
        return None
    config = read_config(folder)
    try:
        return normalise_config(config, objective=config_objective(config))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{str(folder / 'config.json')!r}: {err}") from None


def _config_tokens(config: dict[str, Any]) -> int | None:
    if "tokens" not in config and isinstance(config.get("config"), dict):  # newer hub-mixin wrapping
        config = config["config"]
    tokens = config.get("tokens")
    return int(tokens) if tokens is not None else None


def resolve_tokenizer(
    checkpoint: str | os.PathLike, spec: str | None = None, *, config: dict[str, Any] | None = None
) -> tuple[Tokenizer, str]:
    """The tokenizer of a checkpoint and where it came from (see the module docstring).

    Arguments:
        checkpoint: the checkpoint directory or Hub id.
        spec: an explicit :func:`sedd.data.get_tokenizer` spec, or None.
        config: the checkpoint's config, only used to make errors more helpful.
    Returns:
        (tokenizer, source) with source the spec, the tokenizer.json path, or "gpt2".
    Raises:
        FileNotFoundError / ValueError for a bad spec; ConnectionError when GPT-2 is needed and
        the Hub cannot be reached.
    """
    if spec is not None:
        return get_tokenizer(spec), spec
    checkpoint = os.fspath(checkpoint)
    local = Path(os.path.expanduser(checkpoint)) / "tokenizer.json"
    if local.is_file():
        return get_tokenizer(str(local)), str(local)
    try:
        return get_tokenizer("gpt2"), "gpt2"
    except ConnectionError as err:
        recorded = (config or {}).get("tokenizer")
        note = f" (its config records the tokenizer spec {recorded!r})" if recorded else ""
        raise ConnectionError(
            f"checkpoint {checkpoint!r} holds no tokenizer.json{note}, so its tokenizer defaults to "
            "GPT-2 from the Hugging Face Hub, which cannot be reached. Pass a local tokenizer "
            "instead: --tokenizer DIR on the command line, or load_pretrained(..., tokenizer=DIR), "
            "where DIR holds GPT-2's vocab.json and merges.txt (the files of "
            "https://huggingface.co/gpt2, fetched once on a machine with a network)."
        ) from err


def check_tokenizer_fits(tokenizer: Tokenizer, config: dict[str, Any], *, source: str = "") -> None:
    """ValueError unless every id of ``tokenizer`` is a real token of the model
    (``tokenizer.vocab_size <= config["tokens"]``)."""
    tokens = _config_tokens(config)
    if tokens is None:
        raise ValueError("the checkpoint config has no 'tokens' key")
    if tokenizer.vocab_size > tokens:
        src = f" (from {source})" if source else ""
        recorded = config.get("tokenizer")
        hint = f"; the checkpoint was trained with tokenizer {recorded!r}" if recorded else ""
        raise ValueError(
            f"tokenizer {tokenizer.name}{src} has {tokenizer.vocab_size} ids but the model has only "
            f"{tokens} tokens{hint}. Pass the tokenizer the checkpoint was trained with (--tokenizer)."
        )


def _same_vocabulary(a, b) -> bool:
    if a.name.rsplit("-", 1)[-1] == b.name.rsplit("-", 1)[-1]:  # names end with a hash of the definition
        return True
    vocab = [getattr(getattr(t, "_tok", None), "get_vocab", None) for t in (a, b)]
    # Two files of one BPE (vocab.json + merges.txt, or a tokenizer.json) differ in their text but
    # map every id to the same token.
    return all(vocab) and vocab[0](with_added_tokens=True) == vocab[1](with_added_tokens=True)


def check_tokenizer_matches(
    tokenizer, config: dict[str, Any], *, own: Tokenizer | None = None, own_source: str = "", source: str = "",
) -> None:
    """ValueError unless ``tokenizer`` (given explicitly, from ``source``) is the tokenizer the
    checkpoint records: the same vocabulary as ``own`` (its ``tokenizer.json``, found at
    ``own_source``) when there is one, and as many ids as the model's tokens when the config names
    a tokenizer spec (``config["tokenizer"]``). A checkpoint that records neither (the public
    ones: GPT-2 by convention) only needs the tokenizer to fit (:func:`check_tokenizer_fits`)."""
    src = f" (from {source})" if source else ""
    if own is not None and not _same_vocabulary(tokenizer, own):
        raise ValueError(
            f"tokenizer {tokenizer.name}{src} is not this checkpoint's tokenizer {own.name} ({own_source}): "
            "another vocabulary decodes every sample into the wrong text. Drop the tokenizer argument "
            "(--tokenizer) to use the checkpoint's own"
        )
    recorded, tokens = config.get("tokenizer"), _config_tokens(config)
    if recorded is not None and tokens is not None and tokenizer.vocab_size != tokens:
        raise ValueError(
            f"tokenizer {tokenizer.name}{src} has {tokenizer.vocab_size} ids, but the checkpoint was trained "
            f"with tokenizer {recorded!r} and {tokens} tokens: another vocabulary decodes every sample into the "
            "wrong text. Pass the tokenizer the checkpoint was trained with (--tokenizer)"
        )


def _check_tokenizer(tok: Tokenizer, source: str, config: dict[str, Any], checkpoint: str, *, explicit: bool) -> None:
    check_tokenizer_fits(tok, config, source=source)
    if explicit:
        own_file = Path(os.path.expanduser(checkpoint)) / "tokenizer.json"
        own = get_tokenizer(str(own_file)) if own_file.is_file() else None
        check_tokenizer_matches(tok, config, own=own, own_source=str(own_file), source=source)


def load_pretrained(
    checkpoint: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    device: str | torch.device | None = "auto",
    **from_pretrained_kwargs: Any,
) -> Pretrained:
    """Load a checkpoint (directory or Hub id) with its graph, noise schedule and tokenizer.

    Arguments:
        checkpoint: a directory holding config.json + model.safetensors (or pytorch_model.bin),
            or a Hub id such as ``"louaaron/sedd-small"``.
        tokenizer: explicit tokenizer spec, or None to resolve it (module docstring).
        device: "auto" (CUDA when available), or any torch device.
        from_pretrained_kwargs: passed to :meth:`SEDD.from_pretrained` (or
            :meth:`ARModel.from_pretrained`; ``revision``,
            ``local_files_only``, ``attn_backend``, ...).
    Raises:
        FileNotFoundError (no such directory / files), OSError (Hub id not reachable),
        ConnectionError (GPT-2 tokenizer needed offline), ValueError (the tokenizer or the
        weights do not fit the config).
    """
    name = os.fspath(checkpoint)
    device = resolve_device(device)
    # A local config lets a tokenizer problem surface before the (possibly large) weights load.
    config = _local_config(name)
    if config is not None:
        tok, source = resolve_tokenizer(name, tokenizer, config=config)
        _check_tokenizer(tok, source, config, name, explicit=tokenizer is not None)
    if config is None:  # a Hub id: which class loads it is in its config.json
        hub = {k: from_pretrained_kwargs[k] for k in ("revision", "cache_dir", "local_files_only")
               if k in from_pretrained_kwargs}
        objective = config_objective(read_config(checkpoint_dir(name, **hub)))
    else:
        objective = config_objective(config)
    model = get_objective(objective).model_class.from_pretrained(name, map_location=device, **from_pretrained_kwargs)
    if config is None:
        tok, source = resolve_tokenizer(name, tokenizer, config=model.config)
        _check_tokenizer(tok, source, model.config, name, explicit=tokenizer is not None)
    bound = objective_of(model)
    return Pretrained(model=model, graph=bound.graph, noise=bound.noise, tokenizer=tok, tokenizer_source=source,
                      checkpoint=name)
