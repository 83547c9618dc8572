"""Generation quality of a SEDD checkpoint against the number of sampling steps (and of an
autoregressive checkpoint, sampled ancestrally: one record at NFE = L).

    python train/quality.py CKPT --judge DIR_OR_HUB_ID [--steps 16,32,64] [--num-samples N]
                            [--predictor analytic|euler|first_hitting] [--cache [on|approximate]]
                            [--tokens-per-step 1,2,4,8] [--threshold 0.5,0.9] [--entropy-bound 0.3,1]
                            [--top-p P] [--top-k K] [--length L]
                            [--window W] [--stride S] [--batch-size B]
                            [--reference-data PATH_OR_NAME] [--json out.json] [--plot out.png]
                            [--first-token bos|skip] [--judge-batch-size B] [--judge-context C]
                            [--seed S] [--threads T] [--device auto|cpu|cuda] [--tokenizer SPEC]

For every step count (with ``--predictor first_hitting``: for every count of tokens unmasked per
network evaluation, --tokens-per-step, which takes no --steps, or every value of --threshold or of
--entropy-bound, its adaptive rules), N sequences are sampled
(``sedd.generation.sample_blockwise``: the chosen predictor, with --top-p/--top-k truncation if
asked for, then the final denoising step; a --length above the model's training length window by
window, as train/sample.py samples it; the sampler
options are train/sample.py's, ``train.cli.add_sampler_options``) and reported as:

* **generative perplexity**: exp of the judge's mean negative log-likelihood per judge token,
  over all tokens of all N sequences (exp(Σ_i nll_i / Σ_i n_i)), with a 95% confidence interval
  over sequences: the delta-method standard error of that ratio, from the spread of the
  per-sequence sums, mapped through exp (a normal approximation: optimistic for a handful of
  sequences);
* **entropy**: the unigram entropy (nats) of each sequence's own tokens (the checkpoint's token
  ids, as MDLM and Duo report it), averaged over sequences. A sampler that buys a low generative
  perplexity by repeating itself shows up here;
* **degenerate**: the fraction of sequences in which a single token id fills at least half of the
  positions (``--degenerate-share``);
* wall time of the sampling alone and generated tokens per second (N * L / wall time);
* **NFE**: the forward rows each sequence took (``SamplingStats.nfe``; a row served from the
  cache is not counted): steps + 1 for the diffusion samplers at most (the final denoising step;
  on the absorbing graph a step with no MASK left runs no network), L / k for first hitting at
  k tokens per evaluation (between 1 and L with --threshold or --entropy-bound), L for an
  autoregressive checkpoint (``train/run.py --objective ar``), which takes no --steps and is
  sampled ancestrally with --temperature / --top-p / --top-k (``sedd.sampling.sample_ancestral``).

The judge is any causal LM ``transformers`` loads (``AutoModelForCausalLM`` + ``AutoTokenizer``):
a local directory (``save_pretrained`` layout; ``train/train_judge.py`` writes one) or a Hub id
such as ``gpt2-large``. It runs in bf16 on CUDA and fp32 on CPU, in batches, with a progress bar.

Scoring convention (``sedd.metrics`` computes every number here). The judge's tokenizer usually
differs from the model's, so each sample is decoded to text with the checkpoint's tokenizer (EOS
kept as ``<|endoftext|>``) and that text is
re-encoded with the judge's tokenizer without special tokens; the judge scores this canonical
tokenization, not the sampler's token ids. With ``--first-token bos`` (the default) the judge's
BOS token (its EOS when it has none, as GPT-2) is put in front and every text token is scored, the
first one as the start of a document; with ``--first-token skip`` nothing is prepended and the
first token is not scored (the public SEDD code's convention). n_i counts the scored tokens.
Texts longer than the judge's context C are scored in windows of C tokens that start every
C // 2 tokens: each token is scored once, in the first window that holds it, so every token after
the first window sees at least C // 2 tokens of context (the sliding-window evaluation of the
``transformers`` perplexity guide).

``--reference-data`` scores N blocks of real text the same way (held-out text, the split
``sedd.data.evaluation_split`` picks, as train/eval.py does: cut into
blocks of L model tokens spread evenly over it, decoded and retokenized as the samples are): the
judge's perplexity and the entropy of real data, as a reference row and a line in the plot.

Offline: a local judge directory needs no network. For a Hub id, with ``HF_HUB_OFFLINE=1`` or when
the Hub does not answer (``sedd.data.offline``: one probe of about 2 s), only the local Hub cache
is tried; if the judge is not there the command fails at once, naming ``--judge DIR``.

Output: a table on stdout; ``--json PATH`` with one record per step count (steps, gen_ppl,
gen_ppl_ci, nll, nll_se, judge_tokens, entropy, degenerate, wall_s, tokens_per_s, nfe, the sampler
options that vary (tokens_per_step, threshold, entropy_bound), ...; steps
null for an autoregressive checkpoint), the reference record and every setting; ``--plot PATH`` a
PNG of generative perplexity and entropy against NFE. Exit status 0 on success, 2 on bad input
(with a one-line message), 1 otherwise.

A block-diffusion checkpoint (``train/run.py --objective block``) is sampled block by block
(``--steps`` per block: each count of the list is the steps of every block; by default b/4, b/2
and b, a quarter, half and one network evaluation per token; any --length without windows); with
``--stop-at-eos`` each sample ends at its first generated EOS: the judge scores it up to there, the
entropy counts its own tokens, tokens/s counts the tokens generated (``mean_length`` per record).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # `python train/quality.py`: the package of this checkout, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from sedd.generation import sample_blockwise, stopped_lengths
from sedd.metrics import Judge, generation_metrics, judge_source, load_judge
from train import cli
from train.cli import InputError

EXAMPLES = """\
examples:
  # a judge trained here on the same corpus (offline), three step counts
  python train/train_judge.py --out runs/judge
  python train/quality.py runs/cpu --judge runs/judge --steps 16,32,64,128 --num-samples 64 \\
      --reference-data default --json quality.json --plot quality.png
  # the usual judge of the papers (needs the Hub or its local cache; --tokenizer gpt2, or a folder
  # holding GPT-2's vocab.json and merges.txt)
  python train/quality.py louaaron/sedd-small --tokenizer gpt2 --judge gpt2-large \\
      --steps 128,256,1024 --num-samples 256
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="quality.py",
        description="Generative perplexity (under an autoregressive judge, with a 95% confidence "
        "interval), unigram entropy, degeneracy and speed of a SEDD checkpoint's samples, for "
        "several step counts.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors) or Hub id")
    s = p.add_argument_group("sampling")
    cli.add_sampler_options(s, steps_list=True)
    s.add_argument("--num-samples", "-n", type=int, default=32, help="sequences per step count (default: 32)")
    s.add_argument("--batch-size", type=int, default=16, help="sequences per sampler call (default: 16)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler in [0, 2**64), the same for every step count (default: 0)")
    j = p.add_argument_group("judge")
    j.add_argument("--judge", required=True, metavar="DIR_OR_HUB_ID",
                   help="causal LM for transformers: a local directory (offline) or a Hub id (e.g. gpt2-large)")
    j.add_argument("--first-token", choices=("bos", "skip"), default="bos",
                   help="bos: prepend the judge's BOS (or EOS) and score every token; skip: score all "
                   "but the first (default: bos)")
    j.add_argument("--judge-batch-size", type=int, default=8, help="windows per judge call (default: 8)")
    j.add_argument("--judge-context", type=int,
                   help="tokens per judge window (default: the judge's maximum positions)")
    j.add_argument("--degenerate-share", type=float, default=0.5,
                   help="a sequence is degenerate when one token id fills at least this share of it "
                   "(default: 0.5)")
    r = p.add_argument_group("reference, model, output")
    r.add_argument("--reference-data", metavar="PATH_OR_NAME",
                   help="also score N blocks of real text: 'default' (the Python standard library), a text "
                   "file or directory, or a dataset name")
    r.add_argument("--reference-split",
                   help="split of --reference-data (default: held-out text as train/eval.py picks it: test, "
                   "else validation; validation for the default corpus; all for a file)")
    r.add_argument("--tokenizer", metavar="SPEC",
                   help="the checkpoint's tokenizer (default: CKPT/tokenizer.json, else GPT-2; see sample.py)")
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ... (default: auto)")
    r.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default 0: torch's choice)")
    r.add_argument("--json", metavar="PATH", help="write the records and settings as JSON (- for stdout)")
    r.add_argument("--keep-samples", action="store_true", help="include every sample's text in the JSON")
    r.add_argument("--plot", metavar="PATH", help="PNG of generative perplexity and entropy against NFE")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    return p


# ----------------------------------------------------------------------------------------------
# Statistics (sedd.metrics), with the judge's arguments named by their flags
# ----------------------------------------------------------------------------------------------

JUDGE_FLAGS = {"judge": "--judge", "context": "--judge-context", "first_token": "--first-token"}
PER_RECORD = ("steps", "tokens_per_step", "threshold", "entropy_bound")  # the sampler options a list may vary


def sample_stats(tokens: torch.Tensor, texts: list[str], judge: Judge, args, progress: bool) -> dict:
    try:
        return generation_metrics(tokens, texts, judge, batch_size=args.judge_batch_size,
                                  degenerate_share=args.degenerate_share, progress=progress)
    except ValueError as err:  # nothing scored: the samples decode to empty text
        raise InputError(str(err)) from None


def _judge(call, *args, **kwargs):
    """``call`` (sedd.metrics' judge_source or load_judge) with its ValueError as the one-line error."""
    try:
        return call(*args, name=JUDGE_FLAGS.get, **kwargs)
    except ValueError as err:
        raise InputError(str(err)) from None


# ----------------------------------------------------------------------------------------------
# Reference text
# ----------------------------------------------------------------------------------------------


def reference_blocks(spec: str, split: str | None, tokenizer, n: int, length: int) -> tuple[torch.Tensor, str]:
    """[n, length] blocks of real text in the checkpoint's tokens, spread evenly over the split."""
    from sedd.data import evaluation_split, get_corpus, tokenize

    try:
        split = split or evaluation_split(spec)
        stream = tokenize(get_corpus(spec, split), tokenizer, progress=False)
    except (OSError, ValueError, RuntimeError) as err:  # no such path/split/dataset, Hub offline
        raise InputError(f"--reference-data {spec!r}: {err}") from err
    available = len(stream) // length
    if available < 1:
        raise InputError(f"--reference-data {spec!r} [{split}] holds {len(stream)} tokens: not one block of {length}")
    starts = np.unique(np.linspace(0, available - 1, min(n, available)).round().astype(np.int64)) * length
    blocks = np.stack([np.asarray(stream[s : s + length], dtype=np.int64) for s in starts])
    return torch.from_numpy(blocks), split


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _label(record: dict, short: bool = False) -> str:
    """What sets a record's cost: its steps, first hitting's rule or tokens per evaluation, or ancestral."""
    if record.get("threshold") is not None:
        return f"t={record['threshold']:g}" if short else f"threshold {record['threshold']:g}"
    if record.get("entropy_bound") is not None:
        return f"g={record['entropy_bound']:g}" if short else f"entropy bound {record['entropy_bound']:g}"
    if record.get("tokens_per_step") is not None:
        return f"k={record['tokens_per_step']}" if short else f"{record['tokens_per_step']} token(s) per evaluation"
    if record["steps"] is None:
        return "AR" if short else "ancestral"
    return str(record["steps"]) if short else f"{record['steps']} steps"


def format_table(records: list[dict], reference: dict | None) -> str:
    head = (f"{'steps':>6}  {'gen ppl':>10}  {'95% CI':>21}  {'entropy':>8}  {'degenerate':>10}  {'wall s':>8}  "
            f"{'tok/s':>9}  {'nfe':>7}")
    lines = [head, "-" * len(head)]
    for r in records:
        lo, hi = r["gen_ppl_ci"]
        flag = "  <- degenerate samples" if r["degenerate"] > 0 else ""
        lines.append(f"{_label(r, short=True):>6}  {r['gen_ppl']:>10.2f}  [{lo:>9.2f}, {hi:>9.2f}]  {r['entropy']:>8.3f}  "
                     f"{r['degenerate']:>10.3f}  {r['wall_s']:>8.1f}  {r['tokens_per_s']:>9.1f}  {r['nfe']:>7.1f}{flag}")
    if reference is not None:
        lo, hi = reference["gen_ppl_ci"]
        lines.append(f"{'data':>6}  {reference['gen_ppl']:>10.2f}  [{lo:>9.2f}, {hi:>9.2f}]  "
                     f"{reference['entropy']:>8.3f}  {reference['degenerate']:>10.3f}  {'':>8}  {'':>9}")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], reference: dict | None, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["nfe"] for r in records]
    ppl = np.array([r["gen_ppl"] for r in records])
    ci = np.array([r["gen_ppl_ci"] for r in records])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.errorbar(steps, ppl, yerr=[ppl - ci[:, 0], ci[:, 1] - ppl], marker="o", capsize=3, label="samples")
    b.plot(steps, [r["entropy"] for r in records], marker="o", label="samples")
    if reference is not None:
        a.axhline(reference["gen_ppl"], color="gray", linestyle="--", label="real text")
        b.axhline(reference["entropy"], color="gray", linestyle="--", label="real text")
    for ax, label in ((a, "generative perplexity (judge)"), (b, "unigram entropy per sequence (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [f"{s:g}" for s in steps])
        ax.set_xlabel("network evaluations per sequence (NFE)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _check_args(args) -> None:
    cli.check_positive(args, ("num_samples", "batch_size", "judge_batch_size"))
    if args.num_samples < 2:
        raise InputError("--num-samples must be >= 2: the confidence interval comes from the spread over sequences")
    if not 0 < args.degenerate_share <= 1:
        raise InputError(f"--degenerate-share must be in (0, 1], got {args.degenerate_share}")
    cli.check_threads(args.threads, zero="torch's choice")
    cli.check_seed(args.seed)
    inputs = [*cli.checkpoint_inputs(args.checkpoint, args.tokenizer),
              *cli.files_of(f"a file of --judge {args.judge}", args.judge),
              *cli.files_of(f"a file of --reference-data {args.reference_data}", args.reference_data)]
    cli.check_outputs([("--json", args.json), ("--plot", args.plot)], inputs)


def run(args) -> int:
    cli.one_process("quality.py", "python train/quality.py")
    _check_args(args)
    # one record per cost: --steps LIST (the diffusion samplers), or first hitting's
    # --tokens-per-step, --threshold or --entropy-bound LIST; an autoregressive checkpoint's is fixed
    steps_list = cli.parse_steps(args.steps) if args.steps else None
    k_list = cli.parse_steps(args.tokens_per_step, "--tokens-per-step") if args.tokens_per_step else None
    rules = {name: cli.parse_values(text, cli.flag_of(name)) for name, text in
             (("threshold", args.threshold), ("entropy_bound", args.entropy_bound)) if text}
    # the largest count meets a rule's list in the spec's check (at most one of them sets the count)
    spec = cli.sampling_spec(args, steps=steps_list[0] if steps_list else None,
                             tokens_per_step=(max(k_list) if rules else k_list[0]) if k_list else None,
                             **{name: values[0] for name, values in rules.items()})
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.threads:
        torch.set_num_threads(args.threads)
    _judge(judge_source, args.judge)  # an unusable judge fails here, in seconds, before anything loads
    pre = cli.load_checkpoint(args)
    # the sampler options against the checkpoint, before the judge loads
    objective, plan = cli.check_spec(spec, pre, args.length, "quality.py")
    if spec.applies("steps", objective):
        variants = [replace(spec, steps=n) for n in steps_list or objective.steps_sweep(plan.window)]
    elif rules:
        ((name, values),) = rules.items()
        variants = [replace(spec, **{name: v}) for v in values]
    elif spec.applies("tokens_per_step", objective):
        variants = [replace(spec, tokens_per_step=k) for k in k_list or [None]]
    else:
        variants = [spec]
    model, tokenizer = pre.model, pre.tokenizer
    device = next(model.parameters()).device
    judge = _judge(load_judge, args.judge, device, first_token=args.first_token, context=args.judge_context,
                   progress=progress)
    length = plan.length
    resolved = plan.resolved
    print(f"quality.py: {args.num_samples} samples of {length} tokens, "
          f"{'; '.join(v.describe(objective, **resolved) for v in variants)}, judge {args.judge} "
          f"(context {judge.context}, first token {args.first_token}) on {device}", file=sys.stderr)

    records = []
    for variant in variants:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        parts, nfe, wall = [], [], 0.0
        for start in range(0, args.num_samples, args.batch_size):
            b = min(args.batch_size, args.num_samples - start)
            began = time.perf_counter()
            x, stats = sample_blockwise(model, pre.graph, pre.noise, batch_size=b, length=length, spec=variant,
                                        generator=generator, device=device, progress=progress, return_stats=True,
                                        eos_id=tokenizer.eos_id)
            ends = stopped_lengths(x, tokenizer.eos_id) if variant.stop_at_eos else [length] * b
            parts += [row[:n] for row, n in zip(x.cpu(), ends)]  # a stop_at_eos sample ends at its EOS
            nfe.append(stats.nfe)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall += time.perf_counter() - began
        tokens = parts if variant.stop_at_eos else torch.stack(parts)
        texts = [tokenizer.decode(row) for row in tokens]
        generated = sum(len(row) for row in tokens)
        began = time.perf_counter()
        ran = variant.record(objective, **resolved)
        record = {name: ran[name] for name in PER_RECORD}
        record.update(sample_stats(tokens, texts, judge, args, progress))
        record.update(
            wall_s=wall, tokens_per_s=generated / wall, judge_s=time.perf_counter() - began,
            num_samples=len(tokens), length=length, nfe=float(torch.cat(nfe).double().mean()),
            mean_length=generated / len(tokens),
        )
        if args.keep_samples:
            record["samples"] = texts
        records.append(record)
        print(f"quality.py: {_label(record)}: gen ppl {record['gen_ppl']:.2f}, "
              f"entropy {record['entropy']:.3f}, NFE {record['nfe']:.1f}, {wall:.1f}s sampling", file=sys.stderr)

    reference = None
    if args.reference_data is not None:
        blocks, split = reference_blocks(args.reference_data, args.reference_split, tokenizer, args.num_samples,
                                         length)
        texts = [tokenizer.decode(row) for row in blocks]
        reference = {"data": args.reference_data, "split": split, "num_samples": len(blocks), "length": length,
                     **sample_stats(blocks, texts, judge, args, progress)}
        if args.keep_samples:
            reference["samples"] = texts

    table = format_table(records, reference)
    result = {
        "checkpoint": args.checkpoint,
        "tokenizer": {"name": tokenizer.name, "source": pre.tokenizer_source, "vocab_size": tokenizer.vocab_size},
        "objective": pre.objective,
        "graph": pre.graph.name if pre.graph is not None else None,
        # what ran; the options that vary between records are in each record
        **{k: v for k, v in spec.record(objective, **resolved).items() if k not in PER_RECORD},
        "length": length,
        "num_samples": args.num_samples,
        "seed": args.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "judge": {"name": args.judge, "context": judge.context, "first_token": args.first_token,
                  "prefix_id": judge.prefix_id, "dtype": str(next(judge.model.parameters()).dtype)},
        "degenerate_share": args.degenerate_share,
        "records": records,
        "reference": reference,
    }
    (sys.stderr if args.json == "-" else sys.stdout).write(table)
    if args.json is not None:
        payload = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
        if args.json == "-":
            sys.stdout.write(payload)
        else:
            Path(args.json).write_text(payload, encoding="utf-8")
    if args.plot:
        plot(records, reference, args.plot, f"{args.checkpoint}: {result['sampler']} sampler, {args.num_samples} x "
             f"{length} tokens, judge {args.judge}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main_with_exit_codes("quality.py", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
