"""Model checkpoints on disk and on the Hub: the config, the weights, and the checks between them.

A checkpoint directory holds ``config.json`` (the whole training config in the public layout:
``tokens``, ``graph``, ``noise``, ``model``, ...) and ``model.safetensors`` (or, in older public
checkpoints, ``pytorch_model.bin``). :meth:`sedd.model.SEDD.from_pretrained` and
:meth:`~sedd.model.SEDD.save_pretrained` are built from the functions here.

The math: docs/math.md, "Network and checkpoint".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sedd.graph import GRAPHS
from sedd.io import atomic_write

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# What a checkpoint was trained for (config key "objective", absent in the public checkpoints,
# which are "sedd") and the model class that loads it: filled by the model classes themselves
# (Checkpointed subclasses that set `objective`), so this layer names no objective but the
# public checkpoints' default. The objectives' own registry, above the model, is sedd.objectives.
DEFAULT_OBJECTIVE = "sedd"
MODEL_CLASSES: dict[str, type] = {}
REQUIRED_MODEL_KEYS = ("hidden_size", "cond_dim", "n_blocks", "n_heads")
DERIVED_KEYS = ("rotary_emb.inv_freq",)  # recomputed from the config: a checkpoint may omit them

__all__ = [
    "DEFAULT_OBJECTIVE",
    "MODEL_CLASSES",
    "WEIGHT_FILES",
    "checkpoint_dir",
    "config_objective",
    "check_state_fits",
    "normalise_config",
    "read_config",
    "read_weights",
    "strip_wrapper_prefix",
    "write_checkpoint",
]


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    """Nested dict / list copy of a config (OmegaConf DictConfig, Mapping, dataclass-free)."""
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf  # only reachable when the caller already has omegaconf

        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def config_objective(config: Any) -> str:
    """The objective a config was trained for: its ``objective`` key, "sedd" when absent (the
    public checkpoints). ValueError for a value no model class loads (:data:`MODEL_CLASSES`)."""
    cfg = config.get("config", config) if isinstance(config, Mapping) and "tokens" not in config else config
    objective = cfg.get("objective", DEFAULT_OBJECTIVE) if isinstance(cfg, Mapping) else DEFAULT_OBJECTIVE
    if objective not in MODEL_CLASSES:
        raise ValueError(f"config objective must be one of {tuple(MODEL_CLASSES)}, got {objective!r}")
    return objective


def _class_name(objective: str) -> str:
    return f"sedd.model.{MODEL_CLASSES[objective].__name__}"


def normalise_config(config: Any, *, objective: str = DEFAULT_OBJECTIVE) -> dict[str, Any]:
    """A plain-dict copy of a model config, checked for what the model class of ``objective``
    needs (a forward process, ``graph.type``, where its ``forward_process`` says so).

    Accepts a dict or an OmegaConf DictConfig, and the ``{"config": {...}}`` wrapping that newer
    PyTorchModelHubMixin versions write. Raises TypeError / ValueError naming what is missing,
    and ValueError for a config of another objective (naming the class that loads it)."""
    cfg = _to_plain(config)
    if not isinstance(cfg, dict):
        raise TypeError(f"config must be a dict (or an OmegaConf DictConfig), got {type(config).__name__}")
    if "tokens" not in cfg and isinstance(cfg.get("config"), dict):
        cfg = cfg["config"]
    if "tokens" not in cfg:
        raise ValueError("config has no 'tokens' key (the number of real tokens, e.g. 50257 for GPT-2)")
    found = config_objective(cfg)
    if found != objective:
        raise ValueError(f"this is a config of objective {found!r}, which {_class_name(found)} loads, not "
                         f"{_class_name(objective)} (sedd.load_pretrained loads any)")
    if MODEL_CLASSES[objective].forward_process:
        graph = cfg.get("graph")
        graph_type = graph.get("type") if isinstance(graph, dict) else graph
        if graph_type not in GRAPHS:
            raise ValueError(f"config graph.type must be one of {tuple(GRAPHS)}, got {graph_type!r}")
        if isinstance(graph, str):  # the short form the model always took; the loaders read graph.type
            cfg = {**cfg, "graph": {"type": graph}}
    model = cfg.get("model")
    if not isinstance(model, dict):
        raise ValueError("config has no 'model' section with hidden_size, cond_dim, n_blocks, n_heads")
    missing = [k for k in REQUIRED_MODEL_KEYS if k not in model]
    if missing:
        raise ValueError(f"config.model is missing {missing}")
    _check_field_types(cfg)
    return cfg


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_field_types(cfg: dict[str, Any]) -> None:
    """ValueError naming the first field of ``cfg`` whose value the model or the loaders would
    misread (257.9 tokens read as 257, the string "false" as True) or fail on deep inside."""

    def bad(field: str, want: str, value: Any) -> ValueError:
        try:
            shown = json.dumps(value)  # as the file spells it: null, "false"
        except (TypeError, ValueError):
            shown = repr(value)
        return ValueError(f"config {field} must be {want}, got {shown}")

    if not _is_int(cfg["tokens"]) or cfg["tokens"] < 1:
        raise bad("tokens", "a positive integer (the number of real tokens)", cfg["tokens"])
    model = cfg["model"]
    for key in (*REQUIRED_MODEL_KEYS, "length", "mlp_ratio", "block_size"):
        if key in model and (not _is_int(model[key]) or model[key] < 1):
            raise bad(f"model.{key}", "a positive integer", model[key])
    if "dropout" in model and not (_is_number(model["dropout"]) and 0 <= model["dropout"] < 1):
        raise bad("model.dropout", "a number in [0, 1)", model["dropout"])
    if "scale_by_sigma" in model and not isinstance(model["scale_by_sigma"], bool):
        raise bad("model.scale_by_sigma", "true or false", model["scale_by_sigma"])
    if "noise" not in cfg:
        return  # the loaders' default schedule
    noise = cfg["noise"]
    if not isinstance(noise, dict):
        raise bad("noise", "an object such as {\"type\": \"loglinear\"}", noise)
    if "type" in noise and not isinstance(noise["type"], str):
        raise bad("noise.type", "a schedule name such as \"loglinear\"", noise["type"])
    if "eps" in noise and not (_is_number(noise["eps"]) and 0 <= noise["eps"] < 1):
        raise bad("noise.eps", "a number in [0, 1)", noise["eps"])
    for key in ("sigma_min", "sigma_max"):
        if key in noise and not (_is_number(noise[key]) and noise[key] > 0):
            raise bad(f"noise.{key}", "a positive number", noise[key])


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else can only mean a local path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def checkpoint_dir(
    name: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local directory of checkpoint ``name``: the directory itself, or the Hub snapshot of a
    Hub id (``huggingface_hub.snapshot_download``; ``revision``, ``cache_dir`` and
    ``local_files_only`` are passed on). Raises OSError when the Hub cannot provide it
    (offline, no such repository), FileNotFoundError for a local path that does not exist."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(
            f"{name!r} is a file; pass the directory that holds config.json and model.safetensors"
        )
    if _looks_like_local_path(name):
        raise FileNotFoundError(f"no checkpoint directory at {name!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise OSError(
            f"{name!r} is not a local directory and huggingface_hub is not installed to fetch it "
            "from the Hub; pass a local directory holding config.json and model.safetensors"
        ) from err
    try:
        folder = snapshot_download(
            repo_id=name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=["config.json", *WEIGHT_FILES],
        )
    except Exception as err:  # offline, unknown repo, invalid id, HTTP errors: all mean "not here"
        raise OSError(
            f"could not get the checkpoint {name!r} from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). If you are offline or the repository does not exist, "
            "pass a local directory holding config.json and model.safetensors (or pytorch_model.bin)."
        ) from err
    return Path(folder)


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory (not yet normalised). Raises
    FileNotFoundError when there is none, ValueError when it is not JSON."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(folder)!r}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_file)!r} holds a JSON {type(config).__name__}, not an object with "
                         "'tokens', 'graph', 'noise' and 'model'")
    return config


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``folder`` (model.safetensors, else pytorch_model.bin), on the CPU."""
    safetensors_file, bin_file = (folder / f for f in WEIGHT_FILES)
    if safetensors_file.is_file() or bin_file.is_file():
        path = safetensors_file if safetensors_file.is_file() else bin_file
        try:
            if path is safetensors_file:
                from safetensors.torch import load_file

                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # SafetensorError, pickle and zip errors: a damaged file
            raise ValueError(
                f"cannot read the weights {str(path)!r} ({path.stat().st_size:,} bytes): {err}. The file is "
                "damaged, most likely truncated by an interrupted copy or download; copy it again"
            ) from err
    else:
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {str(folder)!r} (found {present})")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"the weights in {str(folder)!r} are not a flat state dict of tensors")
    return dict(state)


def write_checkpoint(folder: str | os.PathLike, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    # No weights are tied, so every tensor is saved as its own contiguous copy on the CPU.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(folder / "model.safetensors",
                 lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


# ----------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------


def strip_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the key prefix DDP ("module.") or torch.compile ("_orig_mod.") adds to
    every key; the weights are the same."""
    state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], model_name: str) -> None:
    """Raise ValueError naming the offending keys unless ``state`` has every key of ``expected``
    (but :data:`DERIVED_KEYS`), no other key, and every shape equal. ``model_name`` describes the
    model in the message."""
    missing = sorted(k for k in expected if k not in state and k not in DERIVED_KEYS)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise ValueError(
            f"checkpoint does not fit this model ({model_name}): "
            + "; ".join(problems)
            + ". Is config.json the config these weights were trained with?"
        )


class Checkpointed:
    """The checkpoint methods of the models (:class:`sedd.model.SEDD`, :class:`sedd.model.ARModel`):
    one directory of ``config.json`` and weights, loaded with every key and shape checked. A model
    class names itself in messages through :meth:`checkpoint_label`, and the objective whose
    configs it loads in ``objective`` (which registers it in :data:`MODEL_CLASSES`)."""

    objective: str | None = None
    forward_process: bool = False  # its config names a graph (graph.type) and a noise schedule

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("objective")
        if name is not None:
            if name in MODEL_CLASSES and MODEL_CLASSES[name] is not cls:
                raise ValueError(f"objective {name!r} is loaded by {MODEL_CLASSES[name].__name__} already")
            MODEL_CLASSES[name] = cls

    def checkpoint_label(self) -> str:
        """The model in a checkpoint error message (sizes that tell two configs apart)."""
        raise NotImplementedError

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """``load_state_dict`` with the checks a checkpoint needs: every key present (except the
        deterministic ``rotary_emb.inv_freq``), no unexpected key, every shape equal. Raises
        ValueError naming the offending keys. Strips a ``module.`` / ``_orig_mod.`` prefix."""
        state = strip_wrapper_prefix(state)
        check_state_fits(state, self.state_dict(), self.checkpoint_label())
        self.load_state_dict(state, strict=False)

    @classmethod
    def from_pretrained(
        cls,
        dir_or_hub_id: str | os.PathLike,
        map_location: str | torch.device = "cpu",
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        attn_backend: str = "auto",
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        **model_kwargs,
    ):
        """Load a checkpoint: a local directory, or a Hub id such as ``"louaaron/sedd-small"``.

        The directory holds ``config.json`` (the whole training config) and ``model.safetensors``
        (preferred) or ``pytorch_model.bin``. Hub ids go through ``huggingface_hub.snapshot_download``
        (``revision``, ``cache_dir``, ``local_files_only`` are passed on); failing that (offline, no
        such repository) raises OSError. A checkpoint that does not fit its config raises ValueError.
        ``model_kwargs`` go to the model's constructor (``pad_head_to``).
        Returns the model on ``map_location`` in eval mode.
        """
        folder = checkpoint_dir(
            os.fspath(dir_or_hub_id), revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        model = cls(read_config(folder), attn_backend=attn_backend, autocast_dtype=autocast_dtype, **model_kwargs)
        model.load_checkpoint_state(read_weights(folder))
        return model.to(map_location).eval()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` (the whole config) and ``model.safetensors`` into the directory,
        the layout :meth:`from_pretrained` and the public checkpoints use."""
        write_checkpoint(save_directory, self.config, self.state_dict())
