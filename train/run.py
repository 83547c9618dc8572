"""Train a Score Entropy Discrete Diffusion (SEDD) model, or the autoregressive baseline on its trunk.

    python train/run.py                                  # CPU, a few minutes, no download
    python train/run.py --data notes/ --max-steps 2000   # your own text files
    python train/run.py --objective ar --out out/cpu-ar  # the autoregressive baseline, same everything else
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

Objectives: --objective sedd (the default) trains SEDD on --graph with --noise; --objective ar
trains the autoregressive baseline (sedd.model.ARModel): the same DDiT blocks with causal attention,
the adaLN conditioning from a learned constant instead of sigma, the next-token cross entropy with
the head fused into the loss. The diffusion flags (--graph, --noise, --sigma-min, --sampling-eps,
--sample-steps, ...) do not apply to it and are refused. Both losses are in nats per sequence; the
autoregressive one is the exact -log p(block), SEDD's a bound on it. config.json records the objective,
and --resume keeps it.

Outputs (only rank 0 writes), in --out:
  config.json          the model config in the public layout (tokens, graph, noise, model; "objective")
                       plus "tokenizer", "data", "training" (every hyper-parameter) and "step"
  model.safetensors    the EMA weights: `sedd.load_pretrained(out)` loads them (and the tokenizer)
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
not what it trains: the data, tokenizer, model shape, diffusion, global batch and seed must stay
(asking to change them is an error). Every step draws its randomness (t, forward noise, dropout)
from generators seeded by (seed, step, micro-batch, rank), and the data iterator's position is
saved, so with the same number of processes an interrupted run continues bit-identically (on CPU,
also with the same threads per process: --resume keeps the saved count unless --threads is given). On
another number of processes (more or fewer) the micro-batch and the accumulation are derived again
(the checkpoint's micro-batch, or the largest below it that divides the new share of the global
batch; --batch-size picks one), so any number of processes that divides the global batch resumes it.

Multi-GPU / multi-node: launch with torchrun (DDP; nccl on CUDA, gloo on CPU). --fsdp shards
parameters, gradients and optimizer state with FSDP2 instead (meant for CUDA). The data is
sharded by rank; every rank reads the checkpoint on --resume (OUT must be on a shared filesystem).
Exit codes: 0 done, 1 a run-time failure (corrupt checkpoint, NaN loss, offline), 2 bad usage.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
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
from sedd import data as sdata
from sedd.io import atomic_write
from sedd.objectives import get_objective
from train.checkpoint import (
    MetricsLog,
    ReplicaMismatch,
    like,
    read_training_state,
    save_checkpoint,
    set_rng_state,
)
from train.cli import die
from train.config import UsageError, model_config, parse_args, resolve_config

# Every file a run writes into --out (besides its temporary files and tensorboard/).
RUN_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training_state.pt", "metrics.jsonl",
             "loss.png", "samples.txt")


def step_seed(seed: int, stream: int, rank: int, step: int, micro: int = 0) -> int:
    """A seed for one (step, micro-batch, rank): randomness that depends on nothing but these
    numbers is what makes a resumed run identical to an uninterrupted one."""
    return int(np.random.SeedSequence([seed, stream, rank, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def lr_at(step: int, cfg: dict) -> float:
    """Linear warmup, then constant: a pure function of the step, so the schedule has no state."""
    return cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]


def load_data(cfg: dict, out: Path, resuming: bool, master: bool, log):
    """The tokenizer and the train / validation token streams (memory-mapped caches). A resumed
    run keeps the checkpoint's tokenizer when the spec now gives another one."""
    tok = sdata.get_tokenizer(cfg["tokenizer"], corpus=cfg["data"], progress=master)
    if resuming and (out / "tokenizer.json").is_file():
        saved = sdata.get_tokenizer(str(out / "tokenizer.json"))
        # Tokenizer names end with a hash of their whole definition.
        if saved.name.rsplit("-", 1)[-1] != tok.name.rsplit("-", 1)[-1]:
            log(f"note: {cfg['tokenizer']!r} now gives another tokenizer than the checkpoint's; "
                f"using {out / 'tokenizer.json'}")
            tok = saved
    train = sdata.load_tokens(cfg["data"], "train", tok, progress=master)
    val = sdata.load_tokens(cfg["data"], sdata.validation_split(cfg["data"]), tok, progress=master)
    return tok, train, val


def doc_mask_kwargs(x0: torch.Tensor, cfg: dict, eos_id: int) -> dict:
    return {"segment_ids": sdata.segment_ids(x0, eos_id)} if cfg["doc_mask"] else {}


def ema_decay(step: int, decay: float) -> float:
    """The EMA decay of update ``step + 1``: ``decay``, ramped up as (1 + n)/(10 + n) over the
    first n updates (as the public SEDD code does), so a short run's EMA is not dominated by the
    initial weights (at a constant 0.9999 they would still weigh 37% after 10k steps)."""
    n = step + 1
    return min(decay, (1 + n) / (10 + n))


@contextmanager
def ema_weights(net: torch.nn.Module, ema: dict):
    """Evaluate and sample with the EMA weights, then put the training weights back."""
    params = list(net.parameters())
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema.values()):
            p.copy_(e)
    net.eval()
    try:
        yield
    finally:
        net.train()
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


@torch.no_grad()
def validation_loss(net, ema, val_blocks, index, objective, cfg, eos_id, device) -> float:
    """The training loss (EMA weights) on the fixed validation blocks, this rank's share ``index``
    of them, averaged over all ranks. Every block draws its t and forward noise (SEDD) from a
    generator seeded by the block's index, so successive values measure the model and not the
    draws, and the number is the same for any number of processes (up to float rounding)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    index = [int(i) for i in index]
    with ema_weights(net, ema):
        for start in range(0, len(index), cfg["batch_size"]):
            chunk = index[start : start + cfg["batch_size"]]
            x0 = val_blocks.get_batch(chunk).to(device)
            # each block's draws from its own generator, so they do not depend on the blocks beside it
            generators = [torch.Generator(device).manual_seed(step_seed(cfg["seed"], 1, 0, i)) for i in chunk]
            loss = objective.validation_losses(net, x0, generators, **doc_mask_kwargs(x0, cfg, eos_id))
            total += torch.stack([loss.double().sum(), torch.tensor(float(len(chunk)), dtype=torch.float64,
                                                                    device=device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def main(argv=None):
    # -------------------------------------------------------------------------------------------
    # Processes. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK. Every rank reads the same command
    # line and the same files, so every rank meets the same bad input: rank 0 alone reports it.
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    distributed, master = world > 1, rank == 0

    def stop(message: str, code: int = 1, *, every_rank: bool = False):
        """Exit with ``code``, the message printed by rank 0 (or, for a failure that may be one
        rank's own, by every rank that meets it, naming itself)."""
        if master or every_rank:
            die(f"rank {rank}: {message}" if every_rank and distributed else message, code)
        sys.exit(code)

    with contextlib.ExitStack() as quiet:
        if not master:  # argparse's usage errors and --help: once, from rank 0
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        args, overrides = parse_args(argv, epilog=__doc__.split("\n\n", 2)[2])
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # fail now, not at the first log line
        except ImportError:
            stop("--tensorboard needs the tensorboard package: pip install tensorboard", 2)
    if args.fsdp and not distributed:
        stop("--fsdp needs several processes: launch with torchrun", 2)

    # -------------------------------------------------------------------------------------------
    # Configuration: the preset plus the flags, or, with --resume, the saved run plus the flags
    # that do not change what it trains. Settled before the processes connect, so that bad input
    # ends every rank at once.
    preset = getattr(args, "preset", None)
    out = Path(args.out or f"out/{preset or 'cpu'}")
    state = None
    if args.resume:
        try:
            state = read_training_state(out)
        except FileNotFoundError:
            stop(f"--resume: no training_state.pt in {out} (nothing to resume; drop --resume to start a run)", 2)
        except ValueError as e:
            stop(f"cannot resume: {e}. The files in {out} were left untouched.")
    elif (out / "training_state.pt").exists() and not args.overwrite:
        stop(f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite to "
             "start afresh (or choose another --out)", 2)
    elif out.exists() and not out.is_dir():
        stop(f"--out {out} is a file, not a directory", 2)
    elif not args.overwrite:
        # Not a checkpoint of this script: files the run would write must not replace a user's.
        clash = sorted(name for name in RUN_FILES if (out / name).exists())
        if clash:
            stop(f"{out} is not a checkpoint of this script (no training_state.pt) but holds "
                 f"{', '.join(clash)}, which this run would overwrite; choose another --out, or pass "
                 "--overwrite to replace them", 2)
    try:
        cfg = resolve_config(overrides, preset, state["cfg"] if state else None, world, source=str(out))
    except UsageError as e:
        stop(str(e), 2)

    # -------------------------------------------------------------------------------------------
    # Device, then the process group.
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        stop("--device cuda, but CUDA is not available", 2)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    thread_note = None
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast: TF32 is plenty
        torch.backends.cudnn.allow_tf32 = True
    else:
        # Processes on one machine share its cores; oversubscribing them slows every process down.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        threads = args.threads or max(1, cores // local_world)
        # A CPU sum's rounding depends on how many threads split it, so a resumed run keeps the
        # count it was saved with (unless --threads says otherwise) to continue bit-identically.
        saved_threads = state.get("threads") if state is not None else None
        if not args.threads and saved_threads and saved_threads != threads \
                and saved_threads * local_world <= cores:
            threads = saved_threads
            thread_note = f"threads: {threads} per process, as the run was saved with (--threads changes it)"
        torch.set_num_threads(threads)
    if distributed:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    log = tqdm.write if master else (lambda message: None)
    if thread_note:
        log(thread_note)
    grad_accum, L = cfg["grad_accum"], cfg["length"]

    # -------------------------------------------------------------------------------------------
    # Data: tokenizer, then the token streams, packed into blocks of L tokens with EOS between
    # documents. Rank 0 builds the caches first; the others then map them.
    if distributed and not master:
        dist.barrier()
    try:
        tok, train_tokens, val_tokens = load_data(cfg, out, state is not None, master, log)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, RuntimeError, OSError) as e:
        stop(f"cannot load data {cfg['data']!r} with tokenizer {cfg['tokenizer']!r}: {e}", every_rank=True)
    if distributed and master:
        dist.barrier()
    train_blocks = sdata.PackedBlocks(train_tokens, L)
    try:
        batches = sdata.BatchIterator(train_blocks, cfg["batch_size"], seed=cfg["seed"], rank=rank, world_size=world)
        if state is not None:
            batches.load_state_dict(state["data"])
    except ValueError as e:
        stop(f"training data {cfg['data']!r}: {e}")
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
    # Model, in the public config layout so SEDD.from_pretrained(out) (ARModel's) loads the checkpoint.
    config = model_config(cfg, tok.vocab_size, world)
    objective = get_objective(cfg["objective"])(config, training=cfg)
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    try:
        net = objective.build(config, torch.bfloat16 if cfg["bf16"] else None)
    except ValueError as e:
        stop(f"bad model configuration: {e}", 2)
    if state is not None:
        try:
            net.load_checkpoint_state(state["model"])
        except (ValueError, KeyError) as e:
            stop(f"cannot resume from {out}: {e}")
    net.to(device)
    log(f"model: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {objective.describe()}; batch {cfg['global_batch']} = {cfg['batch_size']} x {grad_accum} accumulation "
        f"x {world} processes, device {device.type}")

    model = net  # what the training forward goes through; net stays the plain SEDD (or ARModel)
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
    # Optimizer and EMA. The learning rate is a pure function of the step (set before every update).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8,
                                  weight_decay=cfg["weight_decay"], fused=use_cuda and not args.fsdp)
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
            stop(f"cannot resume from {out}: the optimizer or EMA state does not fit the model ({e})")
        step, metrics, window = state["step"], state["metrics"], state["log_window"]
        saved_step = step
        set_rng_state(state["rng"])
        log(f"resumed from {out} at step {step}")
    del state  # the full copies of the weights are no longer needed

    # -------------------------------------------------------------------------------------------
    # Logs: metrics.jsonl is rewritten from the saved history.
    metrics_log = MetricsLog(out, metrics, master=master, tensorboard=args.tensorboard, step=step)
    if step == 0 and cfg["eval_every"]:
        metrics_log.record({"step": 0, "val_loss": validation_loss(
            net, ema, val_blocks, my_val_index, objective, cfg, tok.eos_id, device)})
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
            loss = objective.loss(model, x0, g, 1.0 / grad_accum, **doc_mask_kwargs(x0, cfg, tok.eos_id))
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
            stop(f"non-finite loss {loss_value} (gradient norm {grad_norm_value}) at step {step + 1}; stopped "
                 f"without saving ({kept}). Try a lower --lr or check the data.")
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.values()), [p.detach() for p in params.values()], 1 - ema_decay(step, cfg["ema"]))
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
            entry["val_loss"] = validation_loss(
                net, ema, val_blocks, my_val_index, objective, cfg, tok.eos_id, device)
            log(f"step {step}: val loss {entry['val_loss']:.2f}")
        if len(entry) > 1:
            metrics_log.record(entry)
        if step % cfg["ckpt_every"] == 0 or step == cfg["max_steps"]:
            try:
                checksum = save_checkpoint(
                    out, net=net, ema=ema, optimizer=optimizer, step=step, cfg=cfg, config=config, tokenizer=tok,
                    batches=batches, metrics=metrics, log_window=window, master=master, loss_label=objective.loss_label,
                    ddp_world=world if distributed and not args.fsdp else 1)
            except ReplicaMismatch as e:
                stop(f"at step {step}: {e}")
            if checksum is not None:
                log(f"step {step}: weights identical on all {world} ranks (checksum {checksum:.6f})")
            saved_step = step
    bar.close()

    # -------------------------------------------------------------------------------------------
    # Samples from the EMA weights (every rank runs the sampler: FSDP needs all of them).
    if cfg["num_samples"] > 0:
        g = torch.Generator(device).manual_seed(step_seed(cfg["seed"], 3, 0, step))
        with ema_weights(net, ema):
            x, _ = objective.sample(net, batch_size=cfg["num_samples"], length=cfg["sample_length"], generator=g,
                                    device=device, progress=master, spec=objective.training_spec(fsdp=args.fsdp))
        texts = [tok.decode(row) for row in x.cpu()]
        report = f"=== {len(texts)} samples at step {step} (EMA weights, {objective.sample_note()}) ===\n"
        report += "".join(f"--- sample {i + 1} ---\n{text}\n" for i, text in enumerate(texts))
        if master:
            print(report, end="", flush=True)
            atomic_write(out / "samples.txt", lambda tmp: tmp.write_text(report))
    if master:
        vals = [m["val_loss"] for m in metrics if "val_loss" in m]
        if len(vals) >= 2:
            print(f"validation loss: {vals[0]:.2f} -> {vals[-1]:.2f} nats per sequence "
                  f"({vals[0] / L:.3f} -> {vals[-1] / L:.3f} per token)")
        print(f"checkpoint: {out}  (load with sedd.load_pretrained({str(out)!r}))", flush=True)
    metrics_log.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
