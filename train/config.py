"""The configuration of a training run: presets, command-line flags, and what --resume may change.

Every field of a preset is also a flag (``max_steps`` is ``--max-steps``). A run's configuration is
the preset plus the flags given, or, with --resume, the saved run plus the flags that do not change
what it trains (:data:`FROZEN`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sedd import data as sdata
from sedd.graph import GRAPHS
from sedd.model import PRESETS as MODEL_PRESETS
from sedd.model.checkpoint import DEFAULT_OBJECTIVE
from sedd.noise import NOISES
from sedd.objectives import OBJECTIVES, get_objective
from train.cli import SEED_LIMIT, ArgumentParser

PAPER = dict(  # the GPT-2-scale runs of the paper and the public code (configs/config.yaml)
    data="openwebtext", tokenizer="gpt2", doc_mask=False, objective=DEFAULT_OBJECTIVE,
    graph="absorb", noise="auto", noise_eps=1e-3, sigma_min=1e-4, sigma_max=20.0, time_conditioning="on",
    global_batch=512, max_steps=1_300_000, lr=3e-4, beta1=0.9, beta2=0.999, weight_decay=0.0,
    warmup_steps=2500, grad_clip=1.0, ema=0.9999, sampling_eps=1e-3, bf16=True,
    log_every=50, eval_every=2500, val_blocks=512, ckpt_every=10_000,
    num_samples=2, sample_length=128, sample_steps=128, seed=0,
)
PRESETS = {
    # Sized so the whole run (BPE training and tokenization included) takes 3-5 minutes on 2 CPU
    # cores: the output layer over 4097 ids costs as much as the 4 blocks, so a wider model buys
    # little here, and for a fixed number of tokens 1000 steps of 16 blocks reach a lower loss
    # than 500 steps of 32. EMA 0.99 because 0.9999 would barely move from the initial weights.
    "cpu": dict(
        PAPER, **MODEL_PRESETS["cpu"], data="default", tokenizer="bpe:4096",
        batch_size=16, global_batch=16, max_steps=1000, lr=1e-3, warmup_steps=50, ema=0.99,
        log_every=10, eval_every=100, val_blocks=256, ckpt_every=500, sample_length=64, sample_steps=64,
    ),
    "small": dict(PAPER, **MODEL_PRESETS["small"], batch_size=64),
    "medium": dict(PAPER, **MODEL_PRESETS["medium"], batch_size=32),
}
HELP = {
    # data
    "data": "training text: 'default' (the Python standard library, offline), a local text file or "
            "directory, or a Hugging Face dataset: " + ", ".join(sdata.HF_DATASETS),
    "tokenizer": "'bpe' or 'bpe:N' (byte-level BPE with N ids trained on the training text, cached), 'bytes' "
                 "(one id per byte, no training), 'gpt2' "
                 "(from the hub), or a directory holding vocab.json + merges.txt (or tokenizer.json)",
    "doc_mask": "no attention across the EOS boundaries of packed documents (the paper attends across them)",
    # model and diffusion
    "objective": "sedd (score entropy discrete diffusion), ar (the autoregressive baseline on the same trunk: "
                 "causal attention, no sigma, next-token cross entropy; the diffusion flags do not apply) or block "
                 "(block diffusion: SEDD within blocks of --block-size tokens, causal across them; absorbing, no "
                 "sigma input)",
    "graph": "forward process: absorb (masking) or uniform",
    "noise": "noise schedule: loglinear, geometric, or auto (loglinear for absorb, geometric for uniform)",
    "noise_eps": "epsilon of the log-linear schedule", "sigma_min": "geometric schedule sigma_min",
    "sigma_max": "geometric schedule sigma_max",
    "time_conditioning": "on (SEDD's default): the network reads sigma (--objective block: each block's own sigma); "
                         "off (--objective block's default): it does not (absorbing only; sigma enters through the "
                         "score shift alone), so sampling with --cache reuses its outputs exactly",
    "hidden_size": "transformer width", "cond_dim": "width of the sigma conditioning",
    "n_blocks": "transformer blocks", "n_heads": "attention heads",
    "length": "tokens per training block (documents are packed into blocks with EOS between them)",
    "dropout": "dropout in the blocks",
    # optimisation
    "batch_size": "blocks per micro-batch on each process",
    "global_batch": "blocks per optimizer step over all processes (= batch_size x grad_accum x world_size; "
                    "grad_accum is derived from it)",
    "max_steps": "optimizer steps to train for", "lr": "AdamW peak learning rate",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear warmup steps, then a constant learning rate",
    "grad_clip": "clip the gradient norm to this (0: no clipping)", "ema": "EMA decay of the weights (ramped up as (1+n)/(10+n) over the first n steps)",
    "sampling_eps": "t is drawn from U[sampling_eps, 1]", "bf16": "bf16 autocast on CUDA (no effect on CPU)",
    "seed": "seed of the initialisation, the data order and every step's noise",
    # evaluation, logging, checkpoints
    "log_every": "write metrics every N steps", "eval_every": "validation loss (EMA weights) every N steps, 0: never",
    "val_blocks": "held-out blocks in the fixed validation set (0: all)", "ckpt_every": "checkpoint every N steps",
    "num_samples": "samples printed at the end", "sample_length": "tokens per sample",
    "sample_steps": "steps of the analytic sampler",
}
GROUPS = {
    "data": ["data", "tokenizer", "doc_mask"],
    "model and diffusion": ["objective", "graph", "noise", "noise_eps", "sigma_min", "sigma_max", "time_conditioning",
                            "hidden_size", "cond_dim", "n_blocks", "n_heads", "length", "dropout"],
    "optimisation": ["batch_size", "global_batch", "max_steps", "lr", "beta1", "beta2", "weight_decay",
                     "warmup_steps", "grad_clip", "ema", "sampling_eps", "bf16", "seed"],
    "evaluation, logging, checkpoints": ["log_every", "eval_every", "val_blocks", "ckpt_every", "num_samples",
                                         "sample_length", "sample_steps"],
}
CHOICES = {"objective": list(OBJECTIVES), "graph": list(GRAPHS), "noise": ["auto", *NOISES],
           "time_conditioning": ["on", "off"]}
# The flags of one objective alone (sedd.objectives: its `flags`, e.g. --block-size): every preset
# takes their defaults, every other objective refuses them; they shape the model (frozen, in its
# config), except the objective's training_flags (e.g. --mask-rate-range: the training section).
OBJECTIVE_FLAGS = {key: cls for cls in OBJECTIVES.values() for key in cls.flags}
MODEL_SHAPING_FLAGS = [key for key, cls in OBJECTIVE_FLAGS.items() if key not in cls.training_flags]
for _key, _cls in OBJECTIVE_FLAGS.items():
    for _preset in PRESETS.values():
        _preset.setdefault(_key, _cls.flags[_key][0])
    HELP[_key] = _cls.flags[_key][1]
    GROUPS["model and diffusion"].append(_key)
# What an objective does not read (sedd.objectives: its refused_flags, e.g. the diffusion flags for
# --objective ar) a run of it refuses, and keeps none of in its configuration.
# What a run trains: --resume refuses to change these (the checkpoint would no longer fit, or
# the data order and noise would silently differ from the run being continued). The micro-batch
# (batch_size) is not among them: it only says how each process makes up its share of the global
# batch, and is derived again for another number of processes.
FROZEN = ["data", "tokenizer", "doc_mask", "objective", "graph", "noise", "noise_eps", "sigma_min", "sigma_max",
          "time_conditioning", "hidden_size", "cond_dim", "n_blocks", "n_heads", "length", "global_batch", "seed",
          *MODEL_SHAPING_FLAGS]
MODEL_KEYS = ["hidden_size", "cond_dim", "n_blocks", "n_heads", "length", "dropout"]
NOT_TRAINING = ["data", "tokenizer", "objective", "graph", "noise", "noise_eps", "sigma_min", "sigma_max",
                "time_conditioning", *MODEL_KEYS, *MODEL_SHAPING_FLAGS]  # own keys in config.json


def parse_args(argv=None, *, epilog: str = ""):
    """Returns (args, overrides): overrides holds only the preset fields given on the command line.
    ``epilog`` ends ``--help`` (train/run.py passes its docstring)."""
    def preset_default(key):
        values = {name: p[key] for name, p in PRESETS.items()}
        if len(set(map(str, values.values()))) == 1:
            return f" (default: {values['cpu']})"
        return " (" + ", ".join(f"{name}: {v}" for name, v in values.items()) + ")"

    parser = ArgumentParser(
        description="Train a SEDD model. Fields default to the chosen --preset; any flag overrides it.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                        help="configuration to start from (default: cpu)")
    parser.add_argument("--out", default=None, help="checkpoint directory (default: out/<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even though --out already holds a checkpoint")
    run = parser.add_argument_group("system")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto: CUDA when available (default: auto)")
    run.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                     help="torch.compile the transformer blocks (regional: one compiled block function reused by "
                          "every block); auto: on for CUDA, off on the CPU (default: auto; --compile alone: on)")
    run.add_argument("--cuda-graphs", action="store_true",
                     help="capture the whole training step (forward, backward, clip, AdamW, EMA) as one CUDA graph "
                          "and replay it (CUDA, one process)")
    run.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP (for CUDA)")
    run.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    run.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: cores / processes)")
    for title, keys in GROUPS.items():
        group = parser.add_argument_group(title)
        for key in keys:
            flag, kind = "--" + key.replace("_", "-"), type(PRESETS["cpu"][key])
            common = dict(dest=key, default=argparse.SUPPRESS, help=HELP[key] + preset_default(key))
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            else:
                metavar = None if key in CHOICES else {int: "N", float: "X", str: "SPEC"}[kind]
                group.add_argument(flag, type=kind, choices=CHOICES.get(key), metavar=metavar, **common)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in PRESETS["cpu"]}

    # Check names and paths now, before minutes of work, with argparse's message and exit code 2.
    for key in ("data", "tokenizer"):
        if key not in overrides:
            continue
        spec, path = overrides[key], Path(overrides[key]).expanduser()
        known = ["default", *sdata.HF_DATASETS] if key == "data" else ["bpe", "bytes", "gpt2"]
        if spec in known or (key == "tokenizer" and spec.startswith("bpe:")):
            continue
        if not path.exists():
            parser.error(f"--{key} {spec!r}: no such file or directory, and not one of {known}")
        if not os.access(path, os.R_OK):
            parser.error(f"--{key} {spec!r}: permission denied")
        # Absolute, so --resume finds it from any working directory, but with symbolic links kept:
        # the path is stored and compared as the user spelled it.
        overrides[key] = os.path.abspath(path)
    for key in POSITIVE:
        if key in overrides and not overrides[key] > 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {overrides[key]}")
    for key in NON_NEGATIVE:
        if key in overrides and not overrides[key] >= 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0 ({NON_NEGATIVE[key]}), got {overrides[key]}")
    if "dropout" in overrides and not 0 <= overrides["dropout"] < 1:
        parser.error(f"--dropout must be in [0, 1), got {overrides['dropout']}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: cores / processes), got {args.threads}")
    if args.threads > (os.cpu_count() or 1):  # PyTorch crashes (SIGSEGV) on tens of thousands
        parser.error(f"--threads must be at most the {os.cpu_count()} CPUs of this machine, got {args.threads}")
    if "seed" in overrides and not 0 <= overrides["seed"] < SEED_LIMIT:
        parser.error(f"--seed must be in [0, 2**64), got {overrides['seed']}")
    return args, overrides


# Counts, sizes and lengths: below 1 (or 0) a run would do nothing, or nothing sensible, so the
# command line refuses them with exit status 2 instead of, say, writing an untrained checkpoint.
POSITIVE = ("hidden_size", "cond_dim", "n_blocks", "n_heads", "length", "batch_size", "global_batch",
            "max_steps", "log_every", "ckpt_every", "sample_length", "sample_steps", "lr", "noise_eps",
            "sigma_min", "sigma_max")
NON_NEGATIVE = {"warmup_steps": "0: no warmup", "eval_every": "0: no validation",
                "val_blocks": "0: the whole validation split", "num_samples": "0: no samples",
                "weight_decay": "0: none", "grad_clip": "0: no clipping", "ema": "0: no averaging"}


class UsageError(ValueError):
    """A configuration the command line asked for that cannot run: exit status 2."""


def resolve_config(overrides: dict, preset: str | None, saved: dict | None, world: int, *,
                   source: str = "the checkpoint") -> dict:
    """The run's configuration: ``PRESETS[preset]`` with the flags ``overrides``, or the ``saved``
    configuration of the run being resumed (from ``source``) with the flags that do not change
    what it trains.
    Also settles ``noise="auto"`` and the objective's own "auto" values (:meth:`~sedd.objectives.Objective.settle_run`)
    and adds ``grad_accum`` (micro-batches per optimizer step).
    Raises :class:`UsageError` for a combination that cannot run."""
    if saved is not None:
        cfg = dict(saved)
        cfg.setdefault("objective", DEFAULT_OBJECTIVE)  # a run saved before these flags existed
        if "time_conditioning" not in get_objective(cfg["objective"]).refused_flags:
            cfg.setdefault("time_conditioning", "on")
        if preset is not None and preset != cfg["preset"]:
            raise UsageError(f"--resume: {source} is a '{cfg['preset']}' run, not '{preset}'")
        if "objective" in overrides and overrides["objective"] != cfg["objective"]:
            raise UsageError(
                f"--resume: cannot change objective (the checkpoint trains {cfg['objective']!r}, the command line "
                f"asks for {overrides['objective']!r}); start a new run with another --out instead")
        _check_objective_flags(cfg["objective"], overrides, resuming=True)
        for key, value in overrides.items():
            if key in FROZEN and value != cfg[key]:
                raise UsageError(
                    f"--resume: cannot change {key} (the checkpoint has {cfg[key]!r}, the command line "
                    f"asks for {value!r}); start a new run with another --out instead")
            cfg[key] = value
    else:
        cfg = dict(PRESETS[preset or "cpu"], **overrides, preset=preset or "cpu")
        _check_objective_flags(cfg["objective"], overrides, resuming=False)
        cls = get_objective(cfg["objective"])
        for key in (*cls.refused_flags, *(k for k, owner in OBJECTIVE_FLAGS.items() if owner is not cls)):
            del cfg[key]
        cfg.update({key: value for key, (value, _) in cls.default_flags.items() if key not in overrides})
        cfg.update({key: value for key, (value, _) in cls.implied_flags.items()})
    try:  # also on --resume, for the flags it may change
        get_objective(cfg["objective"]).check_run(cfg)
    except ValueError as err:
        raise UsageError(f"--objective {cfg['objective']}: {err}") from None
    get_objective(cfg["objective"]).settle_run(cfg)
    if cfg.get("noise") == "auto":
        cfg["noise"] = GRAPHS[cfg["graph"]].default_noise
    if cfg.get("time_conditioning") == "off" and not GRAPHS[cfg["graph"]].absorbing:
        raise UsageError(f"--time-conditioning off needs --graph absorb (got {cfg['graph']}): only the absorbing "
                         "score carries its whole sigma-dependence in the shift")
    global_batch, batch_size = cfg["global_batch"], cfg["batch_size"]
    if global_batch % (batch_size * world):
        if global_batch % world:
            if saved is not None:  # the global batch is frozen: only the number of processes can change
                raise UsageError(
                    f"--resume: the checkpoint's global batch of {global_batch} blocks does not divide over "
                    f"{world} processes; resume on a number of processes that divides it "
                    f"({', '.join(map(str, _divisors(global_batch)))})")
            raise UsageError(f"--global-batch {global_batch} does not divide over {world} processes: pass a "
                             f"--global-batch that is a multiple of {world}")
        per_process = global_batch // world
        if "batch_size" in overrides and saved is not None:
            raise UsageError(
                f"--batch-size {batch_size} does not divide the {per_process} blocks each of {world} process(es) "
                f"takes per step of the checkpoint's global batch of {global_batch}: pass a --batch-size that divides "
                f"{per_process} ({', '.join(map(str, _divisors(per_process)))}), or none to have one derived")
        if "batch_size" in overrides:
            raise UsageError(
                f"--global-batch {global_batch} is not a multiple of batch_size x world_size = {batch_size} x "
                f"{world} (--batch-size, {world} process(es)): pass --global-batch as a multiple of "
                f"{batch_size * world}, or a --batch-size that divides {global_batch} / {world} = {per_process}")
        # The micro-batch (the preset's, or the checkpoint's when another number of processes
        # resumes it) does not divide over these processes: the largest that does and is no
        # larger (the optimizer step keeps its global batch).
        cfg["batch_size"] = max(b for b in _divisors(per_process) if b <= batch_size)
    cfg["grad_accum"] = global_batch // (cfg["batch_size"] * world)
    return cfg


def _check_objective_flags(objective: str, overrides: dict, *, resuming: bool) -> None:
    """:class:`UsageError` for a flag the run's objective does not read (a diffusion flag given to
    an autoregressive run, another objective's own flag) or fixes to another value."""
    cls = get_objective(objective)
    run = f"the checkpoint trains --objective {objective}" if resuming else f"--objective {objective}"

    def flag(key: str) -> str:
        return "--" + key.replace("_", "-")

    def readers(keys) -> str:  # the objectives where the user chooses these flags
        names = [o.label for o in OBJECTIVES.values()
                 if not set(keys) & {*o.refused_flags, *o.implied_flags, *(k for k, c in OBJECTIVE_FLAGS.items()
                                                                          if c is not o)}]
        return f"the {' and '.join(names)} objective{'s' * (len(names) > 1)} only"

    given = [key for key in cls.refused_flags if key in overrides]
    if given:
        raise UsageError(f"{run}: {', '.join(map(flag, given))} {'applies' if len(given) == 1 else 'apply'} to "
                         f"{readers(given)} ({cls.refused_because})")
    foreign = [key for key, owner in OBJECTIVE_FLAGS.items() if owner is not cls and key in overrides]
    if foreign:
        raise UsageError(f"{run}: {', '.join(map(flag, foreign))} {'applies' if len(foreign) == 1 else 'apply'} to "
                         f"{readers(foreign)}")
    for key, (value, why) in cls.implied_flags.items():
        if key in overrides and overrides[key] != value:
            raise UsageError(f"{run}: {flag(key)} {overrides[key]} cannot run: it takes {flag(key)} {value} ({why}); "
                             "drop the flag")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def model_config(cfg: dict, vocab_size: int, world: int) -> dict:
    """The config.json of the run: the public layout (tokens, graph, noise, model), so
    the model class of its objective loads it (``SEDD.from_pretrained(out)``; for ``--objective ar``
    tokens, model and ``ARModel.from_pretrained``), plus "objective", "tokenizer", "data" and
    "training" (every other hyper-parameter)."""
    config = get_objective(cfg["objective"]).model_config(cfg, vocab_size, {k: cfg[k] for k in MODEL_KEYS})
    config["objective"] = cfg["objective"]
    config["tokenizer"], config["data"] = cfg["tokenizer"], cfg["data"]
    config["training"] = {**{k: v for k, v in cfg.items() if k not in NOT_TRAINING}, "world_size": world}
    return config
