"""The SEDD perplexity bound of a checkpoint on a text file, a directory or a dataset (the exact
perplexity of an autoregressive checkpoint).

    python train/eval.py CKPT --data PATH_OR_NAME [--split S] [--num-samples 1000]
                              [--time-sampler stratified|antithetic|iid] [--block-size N]
                              [--batch-size B] [--max-blocks M] [--seed S] [--json PATH|-]
                              [--detokenizer auto|none|wikitext|ptb|lm1b|lambada] [--tokenizer SPEC]
                              [--protocol packed|sedd] [--threads N]

What it computes (docs/math.md, "Likelihood bound"): for every block x0,
−log p(x0) ≤ ∫_0^1 E[Σ_positions σ̄'(t)·ℓ] dt + prior KL, with the integral estimated from K draws
of t per block (:func:`sedd.likelihood.sequence_bounds`); the report is the total bound over the
total number of tokens, in nats and bits per token, and the perplexity bound exp(nats/token), each
with a standard error from the spread of the draws (:func:`sedd.likelihood.summarize`).

An autoregressive checkpoint (``train/run.py --objective ar``) is scored on the same blocks with the
same token counting: its exact −log p(block) = −Σ_i log p(x_i | x_<i), every token predicted (the
first of a block from BOS), so its nats per token and perplexity are exact ("=", no standard
error, no draws: --num-samples and --time-sampler do not apply) where SEDD's are bounds ("≤"), and
the two numbers compare directly (docs/math.md, "Autoregressive baseline").

Data pipeline, as in the paper's zero-shot evaluation: the text is cut into documents (wikitext
paragraphs, ptb lines), detokenized (the word-level wikitext/ptb conventions are undone before
the subword tokenizer sees the text), tokenized with the checkpoint's tokenizer (GPT-2 for the
public checkpoints) with EOS after every document, concatenated and cut into blocks of
``--block-size`` tokens (default: the model's length, 1024 for sedd-small). The last, partial
block is kept and padded with EOS under an attention mask (``--last-block pad``, the default: every
token of the data is scored, padding is neither attended to nor counted) or dropped
(``--last-block drop``, as the paper's packing did). ``--max-blocks`` evaluates only the first M
blocks (quick checks). The token stream is cached under $SEDD_CACHE (sedd.data.tokenize).

Data sources (sedd.data.get_corpus): a text file (split "all"), a directory (its test.txt, else
its valid.txt, else everything), or a Hugging Face dataset name (wikitext-2, wikitext-103, ptb,
lambada, lm1b, text8, openwebtext; split "test" by default; needs the Hub or its local cache).
``--detokenizer auto`` uses the dataset's own detokenizer for dataset names and, for local paths,
the one the data's own name names, matched whole (sedd.data.auto_detokenizer): a directory's
name (``wikitext-2/``, ``ptb/``), a file's name (``ptb.test.txt``, ``wiki.test.raw``), or for a
split file (``test.txt``, ``valid.txt``) the name of its directory; no other folder of the path
counts. It says on stderr, in the table and in the JSON report which one it chose and why.
``--protocol sedd`` reads a directory as the default protocol does: its split file.

Conventions of the numbers (also in the JSON report):

* **Prior term included.** The bound is the diffusion term plus the prior term KL(p_1|0 ‖ base)
  (sedd.likelihood.prior_kl): for the absorbing graph e^{−σ̄(1)}·log N per token, about 0.011
  nats per token at GPT-2's width with the log-linear ε = 1e-3; for the uniform graph the KL to
  the uniform distribution. The public SEDD code reports the diffusion term alone:
  ``nats_per_token_without_prior`` in the JSON report is that number.
* **Tokens counted:** every real token of the blocks, the EOS tokens between documents (rows)
  included; padding (``--last-block pad``) is neither attended to nor counted.
* **Data pipeline** (``--protocol``): ``packed`` (the default, described above: documents, empty
  ones dropped, one stream, every token scored) or ``sedd``, the public SEDD code's pipeline, to
  reproduce its numbers: every dataset row detokenized and followed by EOS, empty rows included
  (WikiText: one row per line), blocks of the model's length cut within each batch of 1000 rows
  of 8 contiguous shards, and every batch's remainder dropped (sedd.data.public).

Note: the word-level WikiText-2 (wikitext-2-v1, with <unk> tokens) is not the raw
version the paper used, so its numbers are close to but not comparable with the paper's table.

Output: a table (stdout), and with ``--json PATH`` a JSON object holding the report and every
setting (checkpoint, data, split, tokenizer, K, time sampler, blocks, seed); ``--json -`` writes
the JSON to stdout and the table to stderr. Exit status 0 on success, 2 on bad input (one-line
message), 1 on other failures.

Several processes: ``torchrun --nproc_per_node N train/eval.py ...`` splits the blocks into N
contiguous shares, one per process (each on its own GPU with ``--device auto`` or ``cuda``, with
its share of the cores on a CPU), and the first process writes the one report (``"processes": N``
in the JSON). The draws of the first process come from ``--seed``, the others' from seeds derived
from it and their rank: the same seed and number of processes give the same numbers, and an
autoregressive checkpoint's exact numbers do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python train/eval.py`: the package of this checkout, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sedd.data import DETOKENIZERS, DOC_SPLITS, HF_DATASETS, auto_detokenizer, evaluation_split, get_corpus, tokenize
from sedd.data.public import public_blocks, public_rows
from sedd.likelihood import TIME_SAMPLERS, combine, make_blocks
from sedd.objectives import objective_of
from train import cli
from train.cli import InputError

EXAMPLES = """\
examples:
  # the paper's setting: K = 1000 stratified draws per 1024-token block
  python train/eval.py path/to/sedd-small --tokenizer path/to/gpt2-tokenizer \\
      --data path/to/wikitext-2/test.txt --json wikitext2.json
  python train/eval.py runs/small --data path/to/ptb/test.txt
  # a quick check: 4 blocks, 64 antithetic draws each
  python train/eval.py runs/small --data path/to/ptb --max-blocks 4 --num-samples 64 \\
      --time-sampler antithetic
  # a Hugging Face dataset (needs the Hub or its cache), through the public SEDD pipeline
  python train/eval.py louaaron/sedd-small --data wikitext-103 --protocol sedd --json -
"""


# the paper's K; the default draws of t (an autoregressive checkpoint reads neither)
ESTIMATOR_DEFAULTS = {"num_samples": 1000, "time_sampler": "stratified"}


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="eval.py",
        description="Monte-Carlo estimate of the SEDD likelihood bound (nats/token, bits/token, "
        "perplexity bound, with standard errors) of a checkpoint on a text corpus.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors) or Hub id")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, metavar="PATH_OR_NAME",
                   help=f"text file, directory, or dataset name ({', '.join(HF_DATASETS)})")
    d.add_argument("--split", help="train / validation / test / all (default: test for dataset names and "
                   "directories with test.txt, validation for directories with only valid.txt and for the "
                   "default corpus, all for files; see sedd.data.evaluation_split)")
    d.add_argument("--detokenizer", default="auto", choices=["auto", "none", *DETOKENIZERS],
                   help="undo word-level tokenization before the subword tokenizer (default: auto)")
    d.add_argument("--doc-split", default="auto", choices=DOC_SPLITS,
                   help="how local files become documents (default: auto: paragraphs if there are blank "
                   "lines, else lines); EOS follows every document")
    d.add_argument("--protocol", choices=("packed", "sedd"), default="packed",
                   help="data pipeline: packed (documents, EOS after each, one stream, the last block padded: "
                   "every token scored) or sedd (the public SEDD code's: every dataset row with EOS, empty rows "
                   "too, blocks cut per batch of 1000 rows of 8 shards, remainders dropped; sedd.data.public) "
                   "(default: packed)")
    d.add_argument("--block-size", type=int, help="tokens per block (default: the model's length)")
    d.add_argument("--last-block", choices=("pad", "drop"),
                   help="the final partial block: pad it under an attention mask, or drop it (default: pad; "
                   "--protocol sedd drops every batch's remainder)")
    d.add_argument("--max-blocks", type=int, help="evaluate only the first M blocks")
    e = p.add_argument_group("estimator")
    e.add_argument("--num-samples", "-K", type=int, default=ESTIMATOR_DEFAULTS["num_samples"],
                   help="draws of t per block, >= 2 (default: 1000, as in the paper; even for antithetic)")
    e.add_argument("--time-sampler", choices=TIME_SAMPLERS, default=ESTIMATOR_DEFAULTS["time_sampler"],
                   help="how the K times are drawn (default: stratified)")
    e.add_argument("--batch-size", type=int, default=8,
                   help="rows per model call; draws of the same block share a call when there are "
                   "fewer blocks than this (default: 8)")
    e.add_argument("--seed", type=int, default=0, help="seed of the times and the forward noise (default: 0)")
    r = p.add_argument_group("model, tokenizer, output")
    r.add_argument("--tokenizer", metavar="SPEC",
                   help="tokenizer spec or path (default: CKPT/tokenizer.json if present, else GPT-2 from "
                   "the Hub; offline: --tokenizer DIR, a directory holding GPT-2's vocab.json and merges.txt)")
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ... (default: auto)")
    r.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's, one per core; "
                   "on a busy shared machine 1 or 2 is often much faster)")
    r.add_argument("--json", metavar="PATH", help="write the report and settings as JSON (- for stdout)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    return p


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def resolve_detokenizer(choice: str, data: str) -> tuple[str | None, str]:
    """The detokenizer (a key of DETOKENIZERS, or None) and why: as chosen, or for "auto" what
    the dataset name or the data's own name says (sedd.data.auto_detokenizer)."""
    if choice == "none":
        return None, "--detokenizer none"
    if choice != "auto":
        return choice, f"--detokenizer {choice}"
    name, why = auto_detokenizer(data)
    return name, f"auto: {why}"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _check_args(args) -> None:
    cli.check_positive(args, ("block_size", "batch_size", "max_blocks", "num_samples"))
    cli.check_threads(args.threads)
    cli.check_seed(args.seed)
    if args.time_sampler == "antithetic" and args.num_samples % 2:
        raise InputError(f"--time-sampler antithetic pairs t with 1 − t: --num-samples must be even, got {args.num_samples}")
    if args.num_samples < 2:
        raise InputError("--num-samples must be >= 2: the standard error comes from the spread of the draws")
    if args.protocol == "sedd" and args.last_block is not None:
        raise InputError("--protocol sedd drops the remainder of every batch of rows: drop --last-block")
    if args.protocol == "sedd" and args.doc_split != "auto":
        raise InputError("--protocol sedd makes one row per line (per dataset row): drop --doc-split")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _print_cost(args, model, objective, blocks: torch.Tensor, device) -> None:
    """The number of model calls the run makes and, from one timed call of the largest shape, the
    time it will take, with what makes it shorter when that is long."""
    K, bs, L = args.num_samples, args.batch_size, blocks.shape[1]
    calls, widest = objective.likelihood_calls(len(blocks), K, bs)
    x = blocks[:1].to(device).expand(widest, L)
    g = torch.Generator(device=device).manual_seed(0)  # its own stream: the estimate changes no number
    t0 = time.perf_counter()
    objective.likelihood_probe(model, x, g)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    per_call_s = time.perf_counter() - t0
    if objective.exact:  # one call per batch of blocks, no draws
        print(f"eval.py: cost: {len(blocks)} block(s) of {L} tokens, exact ({objective.label}) in {calls:,} "
              f"model call(s); one took {per_call_s:.2f} s here", file=sys.stderr, flush=True)
        return
    estimate = calls * per_call_s
    message = (f"eval.py: cost: {len(blocks)} block(s) x K = {K} draws = {len(blocks) * K:,} rows of {L} tokens "
               f"in {calls:,} model call(s) of up to {widest} rows; one call took {per_call_s:.2f} s here, so "
               f"about {_duration(estimate)}")
    if estimate > 600:
        message += (f". For a quicker, noisier number: -K {max(2, K // 20 * 2)} (about {math.sqrt(10):.1f}x the "
                    "standard error) or --max-blocks M (fewer tokens); a larger --batch-size packs more rows per "
                    "call where memory allows")
    print(message, file=sys.stderr, flush=True)


def run(args) -> int:
    _check_args(args)
    inputs = [*cli.checkpoint_inputs(args.checkpoint, args.tokenizer),
              *cli.files_of(f"a file of --data {args.data}", args.data)]
    cli.check_outputs([("--json", args.json)], inputs)
    procs = cli.processes()
    args.device = procs.device(args.device)
    procs.threads(args.threads)
    with procs.joined():
        return _evaluate(args, procs)


def _evaluate(args, procs: cli.Processes) -> int:
    """The run, in one of ``procs``: each scores its share of the blocks, the main one reports."""
    say = (lambda message: print(message, file=sys.stderr, flush=True)) if procs.main else (lambda message: None)
    progress = procs.main and (sys.stderr.isatty() if args.progress is None else args.progress)
    started = time.perf_counter()
    pre = cli.load_checkpoint(args)
    model, tokenizer = pre.model, pre.tokenizer
    device = next(model.parameters()).device
    block_size = args.block_size or model.length
    if block_size > model.length:
        say(f"eval.py: warning: --block-size {block_size} is longer than the model's training length {model.length}")

    split = args.split or evaluation_split(args.data)
    detok, detok_reason = resolve_detokenizer(args.detokenizer, args.data)
    say(f"eval.py: detokenizer {detok or 'none'} ({detok_reason})")
    last_block = args.last_block or "pad"
    if procs.several and not procs.main:  # the main process fills the token cache, then the others read it
        dist.barrier()
    try:
        if args.protocol == "sedd":
            rows = public_rows(args.data, split, detokenizer=detok)
            blocks = torch.from_numpy(public_blocks(rows, tokenizer, block_size)[: args.max_blocks])
            mask = torch.ones(blocks.shape, dtype=torch.bool)
            n_tokens = sum(len(r) for r in tokenizer.encode_batch(rows)) + len(rows)
            last_block = "dropped per batch of rows (sedd protocol)"
        else:
            corpus = get_corpus(args.data, split, doc_split=args.doc_split, detokenizer=detok)
            tokens = tokenize(corpus, tokenizer, progress=progress)
            n_tokens = len(tokens)
            blocks, mask = make_blocks(tokens, block_size, last_block, args.max_blocks, tokenizer.eos_id)
    except (OSError, ValueError, RuntimeError) as err:  # no such path/split/dataset, Hub offline
        raise InputError(str(err)) from err
    finally:
        if procs.several and procs.main:
            dist.barrier()
    if len(blocks) == 0:
        hint = "a smaller --block-size" + (" or --protocol packed" if args.protocol == "sedd" else
                                           " or --last-block pad")
        raise InputError(f"{args.data} ({split}) holds {n_tokens} tokens: not one block of {block_size} ({hint})")
    objective = objective_of(model, graph=pre.graph, noise=pre.noise)
    exact = objective.exact
    if exact and (args.num_samples != ESTIMATOR_DEFAULTS["num_samples"]
                  or args.time_sampler != ESTIMATOR_DEFAULTS["time_sampler"]):
        say(f"eval.py: note: --num-samples and --time-sampler do not apply to {objective.a_label()} checkpoint "
            "(its NLL is exact, no draws of t): ignored")
    how = (f"the exact NLL ({objective.label})" if exact
           else f"K = {args.num_samples} {args.time_sampler} draws each")
    say(f"eval.py: {len(blocks)} block(s) of {block_size} tokens ({int(mask.sum())} tokens) from "
        f"{args.data} [{split}], {how}, on {device}")
    share = procs.share(len(blocks))
    if procs.several:
        each = sorted({len(blocks) // procs.world, -(-len(blocks) // procs.world)})
        say(f"eval.py: {procs.world} processes score {' or '.join(map(str, each))} block(s) each (the first draws from "
            "--seed, the others from seeds derived from it and their rank); the first writes the report")
    mine, mine_mask = blocks[share.start : share.stop], mask[share.start : share.stop]
    report = None
    if len(mine):
        generator = torch.Generator(device=device).manual_seed(_process_seed(args.seed, procs.rank))
        if procs.main:
            _print_cost(args, model, objective, mine, device)
        total, unit = objective.likelihood_work(len(mine), args.num_samples)
        bar = tqdm(total=total, desc=f"{unit}s", unit=unit, disable=not progress, dynamic_ncols=True)
        report = objective.likelihood(model, mine, mine_mask, num_samples=args.num_samples,
                                      time_sampler=args.time_sampler, batch_size=args.batch_size,
                                      generator=generator, device=device, on_progress=bar.update)
        bar.close()
    reports = procs.gather(report)
    if not procs.main:
        return 0
    report = combine([r for r in reports if r is not None])
    elapsed = time.perf_counter() - started

    result = {
        "checkpoint": args.checkpoint,
        "data": args.data,
        "split": split,
        "detokenizer": detok,
        "detokenizer_reason": detok_reason,
        "doc_split": args.doc_split,
        "tokenizer": {"name": tokenizer.name, "source": pre.tokenizer_source, "vocab_size": tokenizer.vocab_size},
        "objective": pre.objective,
        "model": objective.describe(),  # a block-diffusion model's own block size is here, not in block_size
        "graph": pre.graph.name if pre.graph is not None else None,
        "noise": repr(pre.noise) if pre.noise is not None else None,
        "block_size": block_size,
        "blocks": len(blocks),
        "last_block": last_block,
        "protocol": args.protocol,
        "seed": args.seed,
        "device": str(device),
        "processes": procs.world,
        **report.as_dict(),
        "stderr_bits_per_token": report.stderr_nats_per_token / math.log(2),
        # exact: an autoregressive model's exact likelihood; otherwise the bound, which includes the
        # prior term; without it, the number the public SEDD code reports.
        "exact": exact,
        **({"perplexity": report.perplexity_bound} if exact else {}),
        "prior_included": True,
        "nats_per_token_without_prior": report.nats_per_token - report.prior_nats_per_token,
        "elapsed_s": round(elapsed, 3),
    }
    result["perplexity_ci95"] = list(result["perplexity_ci95"])
    table = "\n".join([
        f"checkpoint  {args.checkpoint}",
        f"data        {args.data} [{split}], detokenizer {detok or 'none'} ({detok_reason})",
        f"tokenizer   {tokenizer.name} ({pre.tokenizer_source})",
        f"blocks      {len(blocks)} x {block_size} tokens (protocol {args.protocol}, last block: {last_block})",
        "",
        report.table(),
    ]) + "\n"
    (sys.stderr if args.json == "-" else sys.stdout).write(table)
    if args.json is not None:
        payload = json.dumps(result, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(payload)
        else:
            Path(args.json).write_text(payload)
    return 0


def _process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s draws: ``seed`` itself in the first (so one process draws
    as it always has), one derived from the two numbers in the others."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def main(argv: list[str] | None = None) -> int:
    return cli.main_with_exit_codes("eval.py", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
