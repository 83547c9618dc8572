"""Train a Score Entropy Discrete Diffusion (SEDD) model.

    python train/run.py                                  # CPU, a few minutes, no download
    python train/run.py --data notes/ --max-steps 2000   # your own text files
    torchrun --nproc_per_node 8 train/run.py --preset small --out out/sedd-small
    python train/run.py --out out/cpu --resume           # continue an interrupted run exactly

Presets (every field is a flag: ``max_steps`` is ``--max-steps``; ``--help`` lists them all):
  cpu     the default: the Python standard library as corpus (offline, no download), a byte-level
          BPE with 4096 ids trained on it and cached, a 2M-parameter DDiT on 128-token blocks, 1000
          steps of 16 blocks. The validation loss falls clearly within minutes on 2 CPU cores.
  small   the paper's SEDD-small run: OpenWebText through `datasets`, the GPT-2 tokenizer,
  medium  1024-token blocks, global batch 512, AdamW 3e-4, betas (0.9, 0.999), no weight decay,
          2500 warmup steps then constant, grad clip 1.0, EMA 0.9999, bf16 autocast on CUDA.
          The global batch is batch_size x grad_accum x world_size, and grad_accum is derived from
          --global-batch: small has batch_size 64 per GPU (medium 32), so 8 GPUs accumulate 1
          micro-batch (medium 2), as the public runs on one 8x80GB node; 1 GPU accumulates 8 (16).

Outputs (only rank 0 writes), in --out:
  config.json          the model config in the public layout (tokens, graph, noise, model) plus
                       "tokenizer", "data", "training" (every hyper-parameter) and "step"
  model.safetensors    the EMA weights: `sedd.model.SEDD.from_pretrained(out)` loads them
  tokenizer.json       the tokenizer: `sedd.data.get_tokenizer(out)` loads it, no cache needed
  training_state.pt    what --resume needs: raw and EMA weights, optimizer, step, RNG states,
                       data position, metrics history
  metrics.jsonl        one JSON object per logged step: step, loss, lr, grad_norm, tokens_per_s,
                       val_loss when evaluated (losses in nats per sequence, as sedd.losses)
  loss.png, samples.txt   train/validation loss curves; the samples printed at the end
Each file is written to a temporary name and renamed into place, training_state.pt last, so a
crash or a kill never leaves a half-written checkpoint. A non-finite loss or gradient stops the
run (exit code 1) before the optimizer step, so the last good checkpoint is never overwritten.

Resuming: `--resume` continues from OUT/training_state.pt with the configuration saved there.
Flags given with it may change how the run continues (--max-steps, --lr, --eval-every, ...) but
not what it trains: the data, tokenizer, model shape, diffusion, batch sizes and seed must stay
(asking to change them is an error). Every step draws its randomness (t, forward noise, dropout)
from generators seeded by (seed, step, micro-batch, rank), and the data iterator's position is
saved, so with the same number of processes an interrupted run continues bit-identically.

Multi-GPU / multi-node: launch with torchrun (DDP; nccl on CUDA, gloo on CPU). --fsdp shards
parameters, gradients and optimizer state with FSDP2 instead (meant for CUDA). The data is
sharded by rank; every rank reads the checkpoint on --resume (OUT must be on a shared filesystem).
Exit codes: 0 done, 1 a run-time failure (corrupt checkpoint, NaN loss, offline), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so a plain checkout runs without `pip install -e .`
from sedd import data as sdata  # noqa: E402
from sedd.graph import graph_from_config  # noqa: E402
from sedd.io import TMP_GLOB, atomic_write  # noqa: E402
from sedd.losses import score_entropy_loss  # noqa: E402
from sedd.model import PRESETS as MODEL_PRESETS  # noqa: E402
from sedd.model import SEDD  # noqa: E402
from sedd.noise import noise_from_config  # noqa: E402
from sedd.sampling import sample  # noqa: E402

STATE_FORMAT = "sedd-train-v1"

# -----------------------------------------------------------------------------------------------
# Presets. Every key is also a command-line flag that overrides it.

PAPER = dict(  # the GPT-2-scale runs of the paper and the public code (configs/config.yaml)
    data="openwebtext", tokenizer="gpt2", doc_mask=False,
    graph="absorb", noise="auto", noise_eps=1e-3, sigma_min=1e-4, sigma_max=20.0,
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
        PAPER, data="default", tokenizer="bpe:4096",
        hidden_size=128, cond_dim=64, n_blocks=4, n_heads=4, length=128, dropout=0.0,
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
    "graph": "forward process: absorb (masking) or uniform",
    "noise": "noise schedule: loglinear, geometric, or auto (loglinear for absorb, geometric for uniform)",
    "noise_eps": "epsilon of the log-linear schedule", "sigma_min": "geometric schedule sigma_min",
    "sigma_max": "geometric schedule sigma_max",
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
    "grad_clip": "clip the gradient norm to this (0: no clipping)", "ema": "EMA decay of the weights",
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
    "model and diffusion": ["graph", "noise", "noise_eps", "sigma_min", "sigma_max", "hidden_size", "cond_dim",
                            "n_blocks", "n_heads", "length", "dropout"],
    "optimisation": ["batch_size", "global_batch", "max_steps", "lr", "beta1", "beta2", "weight_decay",
                     "warmup_steps", "grad_clip", "ema", "sampling_eps", "bf16", "seed"],
    "evaluation, logging, checkpoints": ["log_every", "eval_every", "val_blocks", "ckpt_every", "num_samples",
                                         "sample_length", "sample_steps"],
}
CHOICES = {"graph": ["absorb", "uniform"], "noise": ["auto", "loglinear", "geometric"]}
# What a run trains: --resume refuses to change these (the checkpoint would no longer fit, or
# the data order and noise would silently differ from the run being continued).
FROZEN = ["data", "tokenizer", "doc_mask", "graph", "noise", "noise_eps", "sigma_min", "sigma_max", "hidden_size",
          "cond_dim", "n_blocks", "n_heads", "length", "batch_size", "global_batch", "seed"]
MODEL_KEYS = ["hidden_size", "cond_dim", "n_blocks", "n_heads", "length", "dropout"]
NOT_TRAINING = ["data", "tokenizer", "graph", "noise", "noise_eps", "sigma_min", "sigma_max", *MODEL_KEYS]  # own keys in config.json


def parse_args(argv=None):
    """Returns (args, overrides): overrides holds only the preset fields given on the command line."""
    def preset_default(key):
        values = {name: p[key] for name, p in PRESETS.items()}
        if len(set(map(str, values.values()))) == 1:
            return f" (default: {values['cpu']})"
        return " (" + ", ".join(f"{name}: {v}" for name, v in values.items()) + ")"

    parser = argparse.ArgumentParser(
        description="Train a SEDD model. Fields default to the chosen --preset; any flag overrides it.",
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                        help="configuration to start from (default: cpu)")
    parser.add_argument("--out", default=None, help="checkpoint directory (default: out/<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even though --out already holds a checkpoint")
    run = parser.add_argument_group("system")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto: CUDA when available (default: auto)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
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
    for key in ("hidden_size", "cond_dim", "n_blocks", "n_heads", "length", "batch_size", "global_batch",
                "log_every", "ckpt_every", "sample_steps"):
        if key in overrides and overrides[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {overrides[key]}")
    return args, overrides


def die(message: str, code: int = 1):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def step_seed(seed: int, stream: int, rank: int, step: int, micro: int = 0) -> int:
    """A seed for one (step, micro-batch, rank): randomness that depends on nothing but these
    numbers is what makes a resumed run identical to an uninterrupted one."""
    return int(np.random.SeedSequence([seed, stream, rank, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def full_state(tensors: dict) -> dict:
    """name -> tensor with FSDP's DTensor shards gathered into full CPU tensors (a collective)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


def like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as ``param`` (its shard, under FSDP), as a fresh copy."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype, copy=True)


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_losses(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation (EMA)")):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("score entropy (nats per sequence)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(argv=None):
    args, overrides = parse_args(argv)
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            die("--tensorboard needs the tensorboard package: pip install tensorboard", 2)

    # -------------------------------------------------------------------------------------------
    # Processes and device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    master = rank == 0
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        die("--device cuda, but CUDA is not available", 2)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast: TF32 is plenty
        torch.backends.cudnn.allow_tf32 = True
    else:
        # Processes on one machine share its cores; oversubscribing them slows every process down.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(args.threads or max(1, cores // local_world))
    if distributed:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    if args.fsdp and not distributed:
        die("--fsdp needs several processes: launch with torchrun", 2)

    def log(message: str) -> None:
        if master:
            tqdm.write(message)

    # -------------------------------------------------------------------------------------------
    # Configuration: the preset plus the flags, or, with --resume, the saved run plus the flags
    # that do not change what it trains.
    preset = getattr(args, "preset", None)
    out = Path(args.out or f"out/{preset or 'cpu'}")
    state = None
    if args.resume:
        path = out / "training_state.pt"
        if not path.is_file():
            die(f"--resume: no training_state.pt in {out} (nothing to resume; drop --resume to start a run)", 2)
        try:
            # weights_only: a checkpoint holds tensors and plain values, and loading one must not run code.
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ValueError(f"not a training state of this script (format {STATE_FORMAT})")
        except Exception as e:  # torch raises many types for a truncated or garbled file
            die(f"cannot resume: {path} is corrupt or unreadable ({type(e).__name__}: {e}). The files in "
                f"{out} were left untouched.")
        cfg = dict(state["cfg"])
        if preset is not None and preset != cfg["preset"]:
            die(f"--resume: {out} is a '{cfg['preset']}' run, not '{preset}'", 2)
        for key, value in overrides.items():
            if key in FROZEN and value != cfg[key]:
                die(f"--resume: cannot change {key} (the checkpoint has {cfg[key]!r}, the command line "
                    f"asks for {value!r}); start a new run with another --out instead", 2)
            cfg[key] = value
    else:
        if (out / "training_state.pt").exists() and not args.overwrite:
            die(f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite to "
                "start afresh (or choose another --out)", 2)
        cfg = dict(PRESETS[preset or "cpu"], **overrides, preset=preset or "cpu")
    if cfg["noise"] == "auto":
        cfg["noise"] = "loglinear" if cfg["graph"] == "absorb" else "geometric"
    if cfg["global_batch"] % (cfg["batch_size"] * world):
        die(f"--global-batch {cfg['global_batch']} is not a multiple of batch_size x world_size = "
            f"{cfg['batch_size']} x {world}", 2)
    grad_accum = cfg["global_batch"] // (cfg["batch_size"] * world)
    L = cfg["length"]

    # -------------------------------------------------------------------------------------------
    # Data: tokenizer, then the token streams (memory-mapped caches), packed into blocks of L
    # tokens with EOS between documents. Rank 0 builds the caches first; the others then map them.
    def load_data():
        tok = sdata.get_tokenizer(cfg["tokenizer"], corpus=cfg["data"], progress=master)
        if state is not None and (out / "tokenizer.json").is_file():
            saved = sdata.get_tokenizer(str(out / "tokenizer.json"))
            # Tokenizer names end with a hash of their whole definition.
            if saved.name.rsplit("-", 1)[-1] != tok.name.rsplit("-", 1)[-1]:
                log(f"note: {cfg['tokenizer']!r} now gives another tokenizer than the checkpoint's; "
                    f"using {out / 'tokenizer.json'}")
                tok = saved
        train = sdata.load_tokens(cfg["data"], "train", tok, progress=master)
        val = sdata.load_tokens(cfg["data"], sdata.validation_split(cfg["data"]), tok, progress=master)
        return tok, train, val

    if distributed and not master:
        dist.barrier()
    try:
        tok, train_tokens, val_tokens = load_data()
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, RuntimeError, OSError) as e:
        die(f"cannot load data {cfg['data']!r} with tokenizer {cfg['tokenizer']!r}: {e}")
    if distributed and master:
        dist.barrier()
    train_blocks = sdata.PackedBlocks(train_tokens, L)
    try:
        batches = sdata.BatchIterator(train_blocks, cfg["batch_size"], seed=cfg["seed"], rank=rank, world_size=world)
        if state is not None:
            batches.load_state_dict(state["data"])
    except ValueError as e:
        die(f"training data {cfg['data']!r}: {e}")
    val_blocks = sdata.PackedBlocks(val_tokens, L)
    n_val = min(cfg["val_blocks"] or len(val_blocks), len(val_blocks))
    # A fixed validation set spread over the whole split, sharded across ranks.
    val_index = np.unique(np.linspace(0, len(val_blocks) - 1, n_val).round().astype(np.int64)) if n_val else []
    my_val_index = np.array_split(val_index, world)[rank] if n_val else []
    if cfg["eval_every"] and len(val_index) < world:
        log(f"warning: the validation split has {len(val_blocks)} blocks of {L} tokens; validation is off")
        cfg["eval_every"] = 0
    log(f"data: {cfg['data']}, tokenizer {tok.name} ({tok.vocab_size} ids); train {len(train_tokens):,} tokens "
        f"= {len(train_blocks):,} blocks of {L}; validation set {len(val_index)} blocks")

    # -------------------------------------------------------------------------------------------
    # Model, in the public config layout so SEDD.from_pretrained(out) loads the checkpoint.
    config = {
        "tokens": tok.vocab_size,
        "graph": {"type": cfg["graph"]},
        "noise": {"type": cfg["noise"], "sigma_min": cfg["sigma_min"], "sigma_max": cfg["sigma_max"],
                  "eps": cfg["noise_eps"]},
        "model": {"name": cfg["preset"], "type": "ddit", **{k: cfg[k] for k in MODEL_KEYS},
                  "scale_by_sigma": cfg["graph"] == "absorb"},
        "tokenizer": cfg["tokenizer"],
        "data": cfg["data"],
        "training": {**{k: v for k, v in cfg.items() if k not in NOT_TRAINING},
                     "grad_accum": grad_accum, "world_size": world},
    }
    graph, noise = graph_from_config(config), noise_from_config(config)
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    try:
        net = SEDD(config, autocast_dtype=torch.bfloat16 if cfg["bf16"] else None)
    except ValueError as e:
        die(f"bad model configuration: {e}", 2)
    if state is not None:
        try:
            net.load_checkpoint_state(state["model"])
        except (ValueError, KeyError) as e:
            die(f"cannot resume from {out}: {e}")
    net.to(device)
    log(f"model: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, graph {cfg['graph']}, "
        f"noise {cfg['noise']}; batch {cfg['global_batch']} = {cfg['batch_size']} x {grad_accum} accumulation "
        f"x {world} processes, device {device.type}")

    model = net  # what the training forward goes through; net stays the plain SEDD
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        # The raw output is a view (a reshaped matmul); the loss reads it out of place, which is
        # what this warning asks for.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
    if args.compile:
        model = torch.compile(model)
    if distributed and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local_rank] if use_cuda else None)

    # -------------------------------------------------------------------------------------------
    # Optimizer and EMA. The learning rate is a pure function of the step (set before every
    # update), so the schedule needs no state of its own.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8,
                                  weight_decay=cfg["weight_decay"], fused=use_cuda and not args.fsdp)
    full_options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # keyed by parameter name

    def lr_at(step: int) -> float:
        return cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]

    params = dict(net.named_parameters())
    ema = {name: p.detach().clone() for name, p in params.items()}
    step, metrics, window = 0, [], {"loss": 0.0, "steps": 0}
    saved_step = None  # step of the checkpoint in `out`, for the error message of a diverged run
    if state is not None:
        try:
            set_optimizer_state_dict(net, optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            ema = {name: like(p, state["ema"][name]) for name, p in params.items()}
        except (ValueError, KeyError, RuntimeError) as e:
            die(f"cannot resume from {out}: the optimizer or EMA state does not fit the model ({e})")
        step, metrics, window = state["step"], state["metrics"], state["log_window"]
        saved_step = step
        set_rng_state(state["rng"])
        log(f"resumed from {out} at step {step}")
    del state  # the full copies of the weights are no longer needed

    @contextmanager
    def ema_weights():
        """Evaluate and sample with the EMA weights, then put the training weights back."""
        backup = [p.detach().clone() for p in params.values()]
        with torch.no_grad():
            for p, e in zip(params.values(), ema.values()):
                p.copy_(e)
        net.eval()
        try:
            yield
        finally:
            net.train()
            with torch.no_grad():
                for p, b in zip(params.values(), backup):
                    p.copy_(b)

    def model_kwargs(x0):
        return {"segment_ids": sdata.segment_ids(x0, tok.eos_id)} if cfg["doc_mask"] else {}

    @torch.no_grad()
    def validation_loss() -> float:
        """The training loss on the fixed validation blocks, with the same t and noise draws at every
        evaluation (seeded by batch), so successive values measure the model and not the draws."""
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with ema_weights():
            for b, start in enumerate(range(0, len(my_val_index), cfg["batch_size"])):
                x0 = val_blocks.get_batch(my_val_index[start:start + cfg["batch_size"]]).to(device)
                g = torch.Generator(device).manual_seed(step_seed(cfg["seed"], 1, rank, b))
                losses = score_entropy_loss(net, x0, graph, noise, generator=g, sampling_eps=cfg["sampling_eps"],
                                            reduction="none", **model_kwargs(x0))
                total += torch.stack([losses.double().sum(), torch.tensor(float(len(losses)), device=device)])
        if distributed:
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def save_checkpoint() -> None:
        nonlocal saved_step
        # Gather first: under FSDP every rank takes part; then rank 0 writes.
        raw = full_state(net.state_dict())
        ema_full = full_state(ema)
        optim = get_optimizer_state_dict(net, optimizer, options=full_options)
        if distributed and not args.fsdp:
            # DDP keeps the replicas equal by construction; check it, since everything else
            # (resume, the saved weights) rests on it. One scalar per checkpoint.
            checksum = torch.tensor([sum(float(v.double().sum()) for v in raw.values())], dtype=torch.float64, device=device)
            sums = [torch.zeros_like(checksum) for _ in range(world)]
            dist.all_gather(sums, checksum)
            if any(s.item() != sums[0].item() for s in sums):
                die(f"the {world} ranks hold different weights at step {step}: {[s.item() for s in sums]}")
            log(f"step {step}: weights identical on all {world} ranks (checksum {sums[0].item():.6f})")
        if master:
            out.mkdir(parents=True, exist_ok=True)
            from safetensors.torch import save_file

            tok.save(out / "tokenizer.json")
            ema_model = {**raw, **ema_full}  # the buffers (rotary inv_freq) come from raw
            atomic_write(out / "model.safetensors",
                         lambda tmp: save_file({k: v.contiguous() for k, v in ema_model.items()}, str(tmp),
                                               metadata={"format": "pt"}))
            atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps({**config, "step": step}, indent=2) + "\n"))
            training_state = {"format": STATE_FORMAT, "step": step, "cfg": cfg, "config": config, "model": raw,
                              "ema": ema_full, "optimizer": optim, "data": batches.state_dict(), "rng": rng_state(),
                              "metrics": metrics, "log_window": dict(window)}
            atomic_write(out / "training_state.pt", lambda tmp: torch.save(training_state, tmp))  # the commit point
            plot_losses(metrics, out / "loss.png")
        saved_step = step
        if distributed:
            dist.barrier()

    # -------------------------------------------------------------------------------------------
    # Output directory and logs: metrics.jsonl is rewritten from the saved history, dropping lines
    # a killed run wrote after its last checkpoint.
    writer = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.glob(TMP_GLOB):  # from a run killed while writing
            leftover.unlink(missing_ok=True)
        atomic_write(out / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics)))
        if args.tensorboard:
            writer = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)
    metrics_file = open(out / "metrics.jsonl", "a") if master else None

    def record(entry: dict) -> None:
        metrics.append(entry)
        if master:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()
            if writer is not None:
                for key, value in entry.items():
                    if key != "step":
                        writer.add_scalar(key, value, entry["step"])

    if step == 0 and cfg["eval_every"]:
        record({"step": 0, "val_loss": validation_loss()})
        log(f"step 0: val loss {metrics[-1]['val_loss']:.2f}")
    if step >= cfg["max_steps"]:
        log(f"{out} is already at step {step} (max_steps {cfg['max_steps']}): nothing to train")

    # -------------------------------------------------------------------------------------------
    # Training loop.
    tokens_per_step = cfg["global_batch"] * L
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, unit="step", dynamic_ncols=True)
    window_time, window_steps = 0.0, 0  # throughput of the steps since the last log line
    model.train()
    while step < cfg["max_steps"]:
        t0 = time.perf_counter()
        torch.manual_seed(step_seed(cfg["seed"], 2, rank, step))  # dropout
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            # Gradients are averaged across ranks on the last micro-batch only.
            sync = micro == grad_accum - 1
            if args.fsdp:
                net.set_requires_gradient_sync(sync)
            elif distributed:
                model.require_backward_grad_sync = sync
            x0 = next(batches).to(device, non_blocking=True)
            g = torch.Generator(device).manual_seed(step_seed(cfg["seed"], 0, rank, step, micro))
            # 1/grad_accum rides in the fused loss's per-row weight: no extra pass over the gradient
            loss = score_entropy_loss(model, x0, graph, noise, generator=g, sampling_eps=cfg["sampling_eps"],
                                      scale=1.0 / grad_accum, **model_kwargs(x0))
            loss.backward()
            loss_sum += loss.detach()
        loss = loss_sum
        if distributed:
            dist.all_reduce(loss)
            loss /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"] or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP
            grad_norm = grad_norm.full_tensor()
        loss_value, grad_norm_value = torch.stack([loss.float(), grad_norm.float().to(device)]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
            # Stop before the update: the weights stay finite and no checkpoint is written from them.
            bar.close()
            kept = f"{out} keeps its checkpoint of step {saved_step}" if saved_step else "no checkpoint was written"
            die(f"non-finite loss {loss_value} (gradient norm {grad_norm_value}) at step {step + 1}; stopped "
                f"without saving ({kept}). Try a lower --lr or check the data.")
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.values()), [p.detach() for p in params.values()], 1 - cfg["ema"])
        step += 1
        window["loss"] += loss_value
        window["steps"] += 1
        window_time += time.perf_counter() - t0
        window_steps += 1
        bar.update(1)

        entry = {"step": step}
        if step % cfg["log_every"] == 0:
            tokens_per_s = window_steps * tokens_per_step / window_time
            entry.update(loss=window["loss"] / window["steps"], lr=lr, grad_norm=grad_norm_value,
                         tokens_per_s=tokens_per_s)
            bar.set_postfix(loss=f"{entry['loss']:.4g}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            window.update(loss=0.0, steps=0)
            window_time, window_steps = 0.0, 0
        if cfg["eval_every"] and step % cfg["eval_every"] == 0:
            entry["val_loss"] = validation_loss()
            log(f"step {step}: val loss {entry['val_loss']:.2f}")
        if len(entry) > 1:
            record(entry)
        if step % cfg["ckpt_every"] == 0 or step == cfg["max_steps"]:
            save_checkpoint()
    bar.close()

    # -------------------------------------------------------------------------------------------
    # Samples from the EMA weights (every rank runs the sampler: FSDP needs all of them).
    if cfg["num_samples"] > 0:
        g = torch.Generator(device).manual_seed(step_seed(cfg["seed"], 3, 0, step))
        with ema_weights():
            x = sample(net, graph, noise, batch_size=cfg["num_samples"], length=cfg["sample_length"],
                       steps=cfg["sample_steps"], predictor="analytic", generator=g, device=device,
                       progress=master)
        texts = [tok.decode(row) for row in x.cpu()]
        report = f"=== {len(texts)} samples at step {step} (EMA weights, {cfg['sample_steps']} analytic steps) ===\n"
        report += "".join(f"--- sample {i + 1} ---\n{text}\n" for i, text in enumerate(texts))
        if master:
            print(report, end="", flush=True)
            atomic_write(out / "samples.txt", lambda tmp: tmp.write_text(report))
    if master:
        vals = [m["val_loss"] for m in metrics if "val_loss" in m]
        if len(vals) >= 2:
            print(f"validation loss: {vals[0]:.2f} -> {vals[-1]:.2f} nats per sequence "
                  f"({vals[0] / L:.3f} -> {vals[-1] / L:.3f} per token)")
        print(f"checkpoint: {out}  (load with sedd.model.SEDD.from_pretrained({str(out)!r}))", flush=True)
        metrics_file.close()
        if writer is not None:
            writer.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
