"""Train a Score Entropy Discrete Diffusion (SEDD) model, or the autoregressive or block-diffusion model on its trunk.

    python train/run.py                                  # CPU, a few minutes, no download
    python train/run.py --data notes/ --max-steps 2000   # your own text files
    python train/run.py --objective ar --out out/cpu-ar  # the autoregressive baseline, same everything else
    python train/run.py --objective block --block-size 16 --out out/cpu-block   # block diffusion (BD3-LM)
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
--sample-steps, ...) do not apply to it and are refused. --objective block trains block diffusion
(sedd.model.BlockSEDD): the sequence in blocks of --block-size tokens, each a SEDD model on the
absorbing graph conditioned on the clean blocks before it (a block-causal mask over [x_t ; x0], its
own noise level per block); it implies --graph absorb, reads no sigma unless --time-conditioning on
(each block then at its own sigma), and --mask-rate-range BETA,OMEGA trains on a clipped range of
masking rates. config.json records the objective (and the block size), and --resume keeps it.

Units: the log, the progress bar and loss.png give nats per token (the loss of a block over its L
tokens) and the perplexity: the autoregressive loss is the exact -log p, so exp(nats per token) is
its perplexity; SEDD's validation loss estimates its likelihood bound, so with the prior term
(docs/math.md, "Likelihood bound") it gives a bound on the perplexity, written "perplexity <=".
train/eval.py computes both with their standard errors.

Speed: on CUDA the transformer blocks run torch.compile'd (regional: one compiled block function;
--compile off turns it off; the CPU default is off, measured slower there, see the README) and the
loop is sync-free: between two log lines it reads nothing from the GPU (train/step.py), so the host
runs ahead. --cuda-graphs captures the whole step as one CUDA graph (one process, CUDA).

Outputs (only rank 0 writes), in --out:
  config.json          the model config in the public layout (tokens, graph, noise, model; "objective")
                       plus "tokenizer", "data", "training" (every hyper-parameter) and "step"
  model.safetensors    the EMA weights: `sedd.load_pretrained(out)` loads them (and the tokenizer)
  tokenizer.json       the tokenizer: `sedd.data.get_tokenizer(out)` loads it, no cache needed
  training_state.pt    what --resume needs: raw and EMA weights, optimizer, step, RNG states,
                       data position, metrics history
  metrics.jsonl        one JSON object per logged step: step, loss (nats per token), lr, grad_norm,
                       tokens_per_s; when evaluated val_loss (nats per token) and val_perplexity_bound
                       (SEDD; val_perplexity for AR); the losses per block (what sedd.losses returns)
                       as loss_per_sequence and val_loss_per_sequence
  loss.png, samples.txt   train/validation loss curves; the samples printed at the end
Each file is written to a temporary name and renamed into place, training_state.pt last, so a
crash or a kill never leaves a half-written checkpoint. A non-finite loss or gradient stops the
run (exit code 1) at the next log line, naming the step where it first appeared: the loop reads the
device before every evaluation and checkpoint, so the last good checkpoint is never overwritten.

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
import os
import sys
import time
import warnings
from pathlib import Path

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
    per_token_history,
    read_training_state,
    resume_optimizer_and_ema,
    save_checkpoint,
    set_rng_state,
)
from train.cli import die
from train.config import UsageError, model_config, parse_args, resolve_config
from train.step import (  # noqa: F401  (ema_decay: part of this script's interface)
    LogWindow,
    TrainStep,
    ema_decay,
    loop_context,
    lr_at,
    make_optimizer,
    step_seed,
)
from train.validation import describe_validation, ema_weights, validation_entry, validation_loss, validation_set

# Every file a run writes into --out (besides its temporary files and tensorboard/).
RUN_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training_state.pt", "metrics.jsonl",
             "loss.png", "samples.txt")


class Stop(Exception):
    """The run cannot go on: ``message`` for the user, exit ``code`` (1 failure, 2 bad usage)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.message, self.code = message, code


def open_run(args, overrides: dict, world: int):
    """(out, saved state or None, configuration): the run in --out opened or resumed, every
    refusal decided before any work or any process connects."""
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # fail now, not at the first log line
        except ImportError:
            raise Stop("--tensorboard needs the tensorboard package: pip install tensorboard", 2) from None
    if args.fsdp and world == 1:
        raise Stop("--fsdp needs several processes: launch with torchrun", 2)
    if args.cuda_graphs and world > 1:
        raise Stop("--cuda-graphs runs one process: DDP's and FSDP2's gradient collectives are not captured "
                   "(drop --cuda-graphs, or run one process)", 2)
    preset = getattr(args, "preset", None)
    out = Path(args.out or f"out/{preset or 'cpu'}")
    state = None
    if args.resume:
        try:
            state = read_training_state(out)
        except FileNotFoundError:
            raise Stop(f"--resume: no training_state.pt in {out} (nothing to resume; drop --resume to start a run)",
                       2) from None
        except ValueError as e:
            raise Stop(f"cannot resume: {e}. The files in {out} were left untouched.") from None
    elif (out / "training_state.pt").exists() and not args.overwrite:
        raise Stop(f"{out} already holds a checkpoint; pass --resume to continue it or --overwrite to "
                   "start afresh (or choose another --out)", 2)
    elif out.exists() and not out.is_dir():
        raise Stop(f"--out {out} is a file, not a directory", 2)
    elif not args.overwrite:
        # Not a checkpoint of this script: files the run would write must not replace a user's.
        clash = sorted(name for name in RUN_FILES if (out / name).exists())
        if clash:
            raise Stop(f"{out} is not a checkpoint of this script (no training_state.pt) but holds "
                       f"{', '.join(clash)}, which this run would overwrite; choose another --out, or pass "
                       "--overwrite to replace them", 2)
    try:
        cfg = resolve_config(overrides, preset, state["cfg"] if state else None, world, source=str(out))
    except UsageError as e:
        raise Stop(str(e), 2) from None
    return out, state, cfg


def pick_device(args, state: dict | None, world: int, local_rank: int) -> tuple[torch.device, str | None]:
    """The device of this process, and a note for the log (or None)."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise Stop("--device cuda, but CUDA is not available", 2)
    if args.cuda_graphs and not use_cuda:
        raise Stop("--cuda-graphs needs a CUDA device", 2)
    if use_cuda:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast: TF32 is plenty
        torch.backends.cudnn.allow_tf32 = True
        return device, None
    # Processes on one machine share its cores; oversubscribing them slows every process down.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    threads, note = args.threads or max(1, cores // local_world), None
    # A CPU sum's rounding depends on how many threads split it, so a resumed run keeps the
    # count it was saved with (unless --threads says otherwise) to continue bit-identically.
    saved = state.get("threads") if state is not None else None
    if not args.threads and saved and saved != threads and saved * local_world <= cores:
        threads = saved
        note = f"threads: {threads} per process, as the run was saved with (--threads changes it)"
    torch.set_num_threads(threads)
    return torch.device("cpu"), note


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


def wrap_model(net, args, device: torch.device, distributed: bool):
    """What the training forward goes through: FSDP2 shards (--fsdp), the compiled blocks
    (--compile), DDP. Returns (model, the line that says what was compiled, or None)."""
    model, note = net, None
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        # The raw output is a view (a reshaped matmul); the loss reads it out of place, which is
        # what this warning asks for.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        note = net.compile_blocks()
    if distributed and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return model, note


def next_micro_batches(batches, n: int, vocab_size: int, device: torch.device, data: str) -> list[torch.Tensor]:
    """The step's ``n`` micro-batches, their ids checked in host memory (the step itself checks no
    value on the device) and, for CUDA, pinned so that their copy does not wait on the GPU."""
    micro_batches = [next(batches) for _ in range(n)]
    for x0 in micro_batches:
        if int(x0.max()) >= vocab_size or int(x0.min()) < 0:
            raise Stop(f"training data {data!r} holds token ids outside [0, {vocab_size}) (a token cache of "
                       "another tokenizer?)")
    return [x0.pin_memory() for x0 in micro_batches] if device.type == "cuda" else micro_batches


def write_samples(net, ema, objective, tok, cfg, step, device, out: Path, *, master: bool, fsdp: bool) -> None:
    """Samples from the EMA weights, printed and written to OUT/samples.txt by rank 0."""
    g = torch.Generator(device).manual_seed(step_seed(cfg["seed"], 3, 0, step))
    with ema_weights(net, ema):
        x, _ = objective.sample(net, batch_size=cfg["num_samples"], length=cfg["sample_length"], generator=g,
                                device=device, progress=master, spec=objective.training_spec(fsdp=fsdp))
    texts = [tok.decode(row) for row in x.cpu()]
    report = f"=== {len(texts)} samples at step {step} (EMA weights, {objective.sample_note()}) ===\n"
    report += "".join(f"--- sample {i + 1} ---\n{text}\n" for i, text in enumerate(texts))
    if master:
        print(report, end="", flush=True)
        atomic_write(out / "samples.txt", lambda tmp: tmp.write_text(report))


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

    # -------------------------------------------------------------------------------------------
    # The run: the preset plus the flags, or, with --resume, the saved run plus the flags that do
    # not change what it trains; then the device. Settled before the processes connect, so that
    # bad input ends every rank at once.
    try:
        out, state, cfg = open_run(args, overrides, world)
        device, thread_note = pick_device(args, state, world, local_rank)
    except Stop as e:
        stop(e.message, e.code)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
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
    val_blocks, my_val_index, n_val = validation_set(val_tokens, cfg, rank, world)
    if cfg["eval_every"] and n_val < world:
        log(f"warning: the validation split has {len(val_blocks)} blocks of {L} tokens; validation is off")
        cfg["eval_every"] = 0
    log(f"data: {cfg['data']}, tokenizer {tok.name} ({tok.vocab_size} ids); train {len(train_tokens):,} tokens "
        f"= {len(train_blocks):,} blocks of {L}; validation set {n_val} blocks")

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
    model, compiled = wrap_model(net, args, device, distributed)  # what the training forward goes through
    if compiled:
        log(compiled)

    # -------------------------------------------------------------------------------------------
    # Optimizer, EMA and the step. The learning rate is a pure function of the step.
    optimizer = make_optimizer(net, cfg, fused=not args.fsdp, capturable=args.cuda_graphs)
    ema = {name: p.detach().clone() for name, p in net.named_parameters()}
    step, metrics, saved_window, saved_step = 0, [], None, None  # saved_step: the checkpoint in `out`
    if state is not None:
        try:
            resume_optimizer_and_ema(net, optimizer, ema, state)
        except (ValueError, KeyError, RuntimeError) as e:
            stop(f"cannot resume from {out}: the optimizer or EMA state does not fit the model ({e})")
        step, saved_step, saved_window = state["step"], state["step"], state["log_window"]
        metrics = per_token_history(state["metrics"], L)
        set_rng_state(state["rng"])
        log(f"resumed from {out} at step {step}")
    del state  # the full copies of the weights are no longer needed
    window = LogWindow(device, saved_window)
    step_fn = TrainStep(model, net, objective, optimizer, ema, cfg, window, device=device, eos_id=tok.eos_id,
                        rank=rank, world=world, fsdp=args.fsdp, cuda_graphs=args.cuda_graphs)
    if args.cuda_graphs:
        log("cuda graphs: the whole step is captured after a few eager steps and replayed")

    # -------------------------------------------------------------------------------------------
    # Logs: metrics.jsonl is rewritten from the saved history.
    metrics_log = MetricsLog(out, metrics, master=master, tensorboard=args.tensorboard, step=step)

    def evaluate(at: int) -> dict:
        entry = validation_entry(validation_loss(net, ema, val_blocks, my_val_index, objective, cfg, tok.eos_id,
                                                 device), L, objective)
        log(f"step {at}: val loss {describe_validation(entry)}")
        return entry

    if step == 0 and cfg["eval_every"]:
        metrics_log.record({"step": 0, **evaluate(0)})
    if step >= cfg["max_steps"]:
        log(f"{out} is already at step {step} (max_steps {cfg['max_steps']}): nothing to train")

    # -------------------------------------------------------------------------------------------
    # Training loop. A step reads nothing from the device (train/step.py); the window of steps
    # since the last log line is read at a log line, and before every evaluation and checkpoint.
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, unit="step", dynamic_ncols=True)
    clock, elapsed = time.perf_counter(), 0.0  # the window's wall time, evaluations and checkpoints aside
    model.train()
    with loop_context(device.type == "cuda"):
        while step < cfg["max_steps"]:
            try:
                micro_batches = next_micro_batches(batches, grad_accum, tok.vocab_size, device, cfg["data"])
            except Stop as e:
                stop(e.message, e.code)
            step_fn(step, micro_batches)
            step += 1
            bar.update(1)
            logging, evaluating = step % cfg["log_every"] == 0, cfg["eval_every"] and step % cfg["eval_every"] == 0
            saving = step % cfg["ckpt_every"] == 0 or step == cfg["max_steps"]
            if not (logging or evaluating or saving):
                continue
            figures = window.read()  # the one device read since the last log line
            elapsed += time.perf_counter() - clock
            if figures["bad"]:
                bar.close()
                at, loss_value, norm_value = figures["bad"]
                kept = f"{out} keeps its checkpoint of step {saved_step}" if saved_step else "no checkpoint was written"
                stop(f"non-finite loss {loss_value} (gradient norm {norm_value}) at step {at}; stopped "
                     f"without saving ({kept}). Try a lower --lr or check the data.")
            entry = {"step": step}
            if logging:
                tokens_per_s = window.steps * cfg["global_batch"] * L / elapsed
                entry.update(loss=figures["loss"] / L, loss_per_sequence=figures["loss"], lr=lr_at(step - 1, cfg),
                             grad_norm=figures["grad_norm"], tokens_per_s=tokens_per_s)
                bar.set_postfix(loss=f"{entry['loss']:.4g} nats/token", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                window.reset()
                elapsed = 0.0
            if evaluating:
                entry.update(evaluate(step))
            if len(entry) > 1:
                metrics_log.record(entry)
            if saving:
                try:
                    checksum = save_checkpoint(
                        out, net=net, ema=ema, optimizer=optimizer, step=step, cfg=cfg, config=config, tokenizer=tok,
                        batches=batches, metrics=metrics, log_window=window.state(), master=master,
                        loss_label=objective.loss_label, ddp_world=world if distributed and not args.fsdp else 1)
                except ReplicaMismatch as e:
                    stop(f"at step {step}: {e}")
                if checksum is not None:
                    log(f"step {step}: weights identical on all {world} ranks (checksum {checksum:.6f})")
                saved_step = step
            clock = time.perf_counter()
    bar.close()

    # -------------------------------------------------------------------------------------------
    # Samples from the EMA weights (every rank runs the sampler: FSDP needs all of them).
    if cfg["num_samples"] > 0:
        write_samples(net, ema, objective, tok, cfg, step, device, out, master=master, fsdp=args.fsdp)
    if master:
        vals = [m for m in metrics if "val_loss" in m]
        if len(vals) >= 2:
            print(f"validation loss: {describe_validation(vals[0])} -> {describe_validation(vals[-1])}")
        print(f"checkpoint: {out}  (load with sedd.load_pretrained({str(out)!r}))", flush=True)
    metrics_log.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
