"""Generate text from a SEDD checkpoint: unconditional samples, prompts, suffixes and infilling.
An autoregressive checkpoint (``train/run.py --objective ar``) is sampled ancestrally through the
same options (module ``sedd.sampling.ancestral``): one network evaluation per token (NFE = L),
``--temperature``, ``--top-p``, ``--top-k`` and ``--no-kv-cache`` apply and ``--steps``,
``--sampler``, ``--cache``, ``--tokens-per-step`` and ``--eps`` do not; a prompt conditions it exactly, fixed text after generated text only takes its place.

    python train/sample.py CKPT [--prefix TEXT] [--suffix TEXT] [--infill POS:TEXT ...]
                                [--template "The [MASK:5] sat on the [MASK:3]."]
                                [--length N] [--steps N] [--sampler analytic|euler|first_hitting]
                                [--cache [on|approximate]] [--tokens-per-step K]
                                [--batch-size B] [--seed S] [--device auto|cpu|cuda]
                                [--tokenizer SPEC] [--json PATH|-] [--out FILE]
                                [--input REQUESTS.jsonl|-] [--jsonl PATH|-] [--max-batch-rows N]
                                [--window N] [--stride N] [--top-p P] [--top-k K] [--temperature T]
                                [--no-kv-cache] [--threads N]

CKPT is a checkpoint directory written by train/run.py or ``SEDD.save_pretrained`` (config.json,
model.safetensors, usually tokenizer.json), a public SEDD checkpoint directory, or a Hub id such
as louaaron/sedd-small (needs the Hub). See ``sedd/pretrained.py`` for how the tokenizer is found.

Conditioning: the given tokens are held fixed at their positions before every reverse step and
at the end (docs/math.md, "Conditioning"), so any set of positions may be fixed and the rest is
generated. This is exact for absorbing-graph checkpoints; for uniform-graph ones it is biased
(the model reads the fixed tokens as noisy), and the sampler warns. Every text is tokenized on its own and placed token by token:

* ``--prefix TEXT`` starts at position 0; ``--suffix TEXT`` ends at the last position;
* ``--infill POS:TEXT`` starts at token position POS (0-based; negative counts from the end, so
  ``-10:`` starts 10 tokens before the end); repeatable;
* ``--template`` lays out the sequence from position 0: literal text is fixed, ``[MASK:n]`` is a
  hole of n generated tokens (``[MASK]`` = one). Positions after the template are generated too.

Byte-level BPE tokenizers (GPT-2's, the trained bpe:N) attach a space to the word after it, so with
them trailing spaces of a fixed text (prefix, infill, template piece) are left to the generated
token that follows: "The " is placed as "The" and the model writes " cat"; the bytes tokenizer
keeps every text verbatim. Spans may not overlap, fall in a template's hole or run past --length.

``--input FILE.jsonl`` reads one request per line instead (UTF-8; lines end at newlines only): a JSON
string (a prompt) or an object with any of "prefix", "suffix", "template" (strings) and "infill" (a
list of [pos, text] pairs or "POS:TEXT" strings). Each request gets --batch-size samples and is
sampled on its own generator, seeded from --seed and its line number (the "seed" of its output
lines: the same request given on the command line with that --seed gives the same samples), so
its samples do not depend on the other requests or on how many are sampled at once. The requests
run one after the other, at most --max-batch-rows rows per sampler call (a request with more
samples than that is sampled in calls of that many rows, in order, on its generator: only then do
its samples depend on --max-batch-rows), with a progress bar over the requests; each request's
output is written as soon as it is done. The output is JSONL, one object per sample with its text,
token ids, fixed spans, input line, seed, the seconds its request took and the settings (--jsonl
PATH|- chooses where; it works without --input too).

Several processes: ``torchrun --nproc_per_node N train/sample.py CKPT --input FILE ...`` splits
the requests into N contiguous shares, one per process (each on its own GPU with ``--device auto``
or ``cuda``); every request is sampled on its own generator, so the samples are those of one
process, and the first process writes every output in the order of the requests (its own share as
it is done, the others' at the end). One request's samples (no --input, or --input -) run in one
process: under torchrun that is one line of error.

A --length above the model's training length is generated semi-autoregressively: window by
window (--window, default the model's length), each later window holding the tokens before its
--stride new ones fixed (sedd.generation.sample_blockwise). A block-diffusion checkpoint
(``train/run.py --objective block``) generates any --length block by block over a KV cache of the
finished blocks, with no window re-run (--window caps the context a block reads; --no-kv-cache
re-runs the prefix instead); with --stop-at-eos each sample ends at its first generated EOS.

The output is every decoded sample under a header (to stdout and to --out), or JSON with the
token ids of every sample and of every fixed span (--json). Every value and every output path
(--out, --json, --jsonl: its directory exists, it is not a directory, nor one of the inputs) is
checked before anything loads. Exit status 0 on success, 2 on bad input (with a one-line message),
1 on other failures.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python train/sample.py`: the package of this checkout, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm.auto import tqdm

from sedd.generation import sample_blockwise, stopped_lengths
from sedd.sampling.spans import Span, fixed_spans, spans_to_mask
from train import cli
from train.cli import InputError

# Rows per sampler call when --max-batch-rows is not given: what a CPU gets through in reasonable
# time per call, and what a GPU holds for the public checkpoints' 1024 positions.
DEFAULT_MAX_BATCH_ROWS = {"cuda": 128, "cpu": 16}

EXAMPLES = """\
examples:
  # 4 unconditional samples of the model's length (1024 for sedd-small), 128 steps
  python train/sample.py runs/small --batch-size 4 --steps 128
  # public checkpoint, GPT-2 tokenizer from a local directory (offline)
  python train/sample.py path/to/sedd-small --tokenizer path/to/gpt2-tokenizer --length 128
  # prompt and ending
  python train/sample.py runs/small --prefix "Once upon a time" --suffix " The end." --length 256
  # fix spans at token positions 40 and 100
  python train/sample.py runs/small --infill "40:the treaty was signed" --infill "100:In 1848,"
  # fill the holes of a template; positions after it (up to --length) are generated too
  python train/sample.py runs/small --template "The [MASK:5] sat on the [MASK:3]." --length 32
  # reproducible, machine-readable
  python train/sample.py runs/small --seed 0 --json - > samples.json
  # one request per line in, one sample per line out
  python train/sample.py runs/small --input requests.jsonl --batch-size 2 --length 64 > samples.jsonl
  # 4096 tokens from a 1024-token model, 512 new tokens per window
  python train/sample.py runs/small --length 4096 --stride 512 --steps 256
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="sample.py",
        description="Sample text from a SEDD checkpoint, unconditionally or with fixed spans "
        "(prefix, suffix, infilling at any token positions, templates). Each fixed text is tokenized "
        "on its own and its tokens are held at their positions (exact conditioning for absorbing-graph "
        "checkpoints, biased for uniform ones); every other "
        "position is generated. Trailing spaces of a fixed text that generated tokens follow are "
        "left to them with byte-level BPEs (which attach the space to the next word). Prints every decoded sample "
        "under a header; --json gives the token ids too.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors) or Hub id")
    g = p.add_argument_group("conditioning (token positions are 0-based; spans may not overlap)")
    g.add_argument("--prefix", metavar="TEXT", help="fixed text at the start (a prompt)")
    g.add_argument("--suffix", metavar="TEXT", help="fixed text that ends at the last position")
    g.add_argument(
        "--infill", metavar="POS:TEXT", action="append", default=[],
        help="fixed text whose first token sits at position POS (negative: from the end); repeatable",
    )
    g.add_argument(
        "--template", metavar="TEXT",
        help="text with holes laid out from position 0: [MASK:n] is n generated tokens, [MASK] one; "
        "the literal text between holes is fixed",
    )
    s = p.add_argument_group("sampling")
    cli.add_sampler_options(s)
    s.add_argument("--batch-size", type=int, default=1, help="number of samples (of each --input request; default: 1)")
    s.add_argument("--max-batch-rows", type=int, metavar="N",
                   help="at most N rows (samples) per sampler call (default: "
                   + ", ".join(f"{n} on {d}" for d, n in DEFAULT_MAX_BATCH_ROWS.items()) + ")")
    s.add_argument("--seed", type=int, help="random seed in [0, 2**64) (default: a fresh one, printed with the output)")
    r = p.add_argument_group("model, tokenizer, output")
    r.add_argument(
        "--tokenizer", metavar="SPEC",
        help="tokenizer spec or path (default: CKPT/tokenizer.json if present, else GPT-2 from the "
        "Hub; offline: --tokenizer DIR, a directory holding GPT-2's vocab.json and merges.txt); it must "
        "be the tokenizer the checkpoint records, where it records one",
    )
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ... (default: auto)")
    r.add_argument("--json", metavar="PATH", help="write samples, token ids and settings as JSON (- for stdout, "
                   "replacing the text output)")
    r.add_argument("--input", metavar="PATH", help="JSONL requests, one per line (- for stdin): a JSON string "
                   "(a prompt) or an object with any of prefix, suffix, template and infill ([[pos, text], ...]); "
                   "--batch-size samples of each, each request on its own generator; writes JSONL (--jsonl -) "
                   "unless told otherwise, each request's lines as soon as it is done")
    r.add_argument("--jsonl", metavar="PATH", help="write one JSON object per sample (text, token ids, fixed "
                   "spans, input line, settings) per line (- for stdout, replacing the text output)")
    r.add_argument("--out", metavar="FILE", help="also write the text output to FILE")
    r.add_argument("--threads", type=int, help="CPU threads for PyTorch, at most the number of CPUs (default: "
                   "PyTorch's, one per core; on a busy shared machine 1 or 2 is often much faster)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


# ----------------------------------------------------------------------------------------------
# Spans
# ----------------------------------------------------------------------------------------------


def parse_infill(item) -> tuple[int, str]:
    """(position, text) of an ``--infill POS:TEXT`` value (or a JSONL ``[pos, text]`` pair or
    ``"POS:TEXT"`` string). The position must be an integer as written: 5.9 is not 5."""
    if isinstance(item, (list, tuple)):
        if len(item) != 2 or not isinstance(item[1], str) or isinstance(item[0], bool) or not isinstance(item[0], int):
            raise InputError(f"infill expects [pos, text] pairs with an integer token position and a string, "
                             f"got {json.dumps(item, ensure_ascii=False)}")
        return item[0], item[1]
    pos_text, sep, text = item.partition(":") if isinstance(item, str) else ("", "", "")
    # digits as written: int() would also read "5_0" as 50 and " 5" as 5
    pos = int(pos_text) if re.fullmatch(r"[+-]?[0-9]+", pos_text) else None
    if not sep or pos is None:
        raise InputError(f"--infill expects POS:TEXT with an integer token position, got {item!r}")
    return pos, text


def build_spans(tokenizer, length: int, *, prefix=None, suffix=None, infill=(), template=None,
                where: str = "") -> list[Span]:
    """Every fixed span one sample asks for (sedd.sampling.spans.fixed_spans), checked against
    ``length`` and each other. ``where`` ("--input x.jsonl line 3: ") starts the messages; the
    spans of command-line options are named after them (--prefix, --infill 40:'text', ...)."""
    try:
        infill = [parse_infill(item) for item in infill]
        spans = fixed_spans(tokenizer, length, prefix=prefix, suffix=suffix, infill=infill, template=template)
    except (InputError, ValueError) as err:
        raise InputError(f"{where}{err}") from None
    if not where:
        for span in spans:
            span.source = f"--{span.source}"
    return spans


_SPEC_KEYS = {"prefix", "suffix", "infill", "template"}


def _read_lines(path: str) -> list[str]:
    """The lines of ``--input``, split at newlines (LF) only: str.splitlines would also split at U+2028,
    U+2029 and U+0085, which may stand raw inside a JSON string (our own JSONL writes them so)."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"--input {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(f"--input {path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                         "save the file as UTF-8") from None
    return text.split("\n")


def read_requests(path: str) -> list[dict]:
    """The JSONL requests of ``--input``: per line a JSON string (a prompt) or an object with any
    of prefix, suffix, template (strings) and infill (a list of [pos, text] pairs, or of
    "POS:TEXT" strings); blank lines are skipped."""
    requests = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        where = f"--input {path} line {n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not JSON ({err.msg})") from None
        if isinstance(item, str):
            item = {"prefix": item}
        if not isinstance(item, dict) or not item.keys() <= _SPEC_KEYS:
            raise InputError(f"{where}: expected a string (a prompt) or an object with keys "
                             f"{sorted(_SPEC_KEYS)}, got {line.strip()[:80]!r}")
        for key in ("prefix", "suffix", "template"):
            if item.get(key) is not None and not isinstance(item[key], str):
                raise InputError(f"{where}: {key} must be a string, got {json.dumps(item[key], ensure_ascii=False)}")
        if not isinstance(item.get("infill", []), list):
            raise InputError(f"{where}: infill must be a list of [pos, text] pairs")
        try:
            item["infill"] = [parse_infill(pair) for pair in item.get("infill", [])]
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
        item["line"] = n
        requests.append(item)
    if not requests:
        raise InputError(f"--input {path} holds no request")
    return requests


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def request_seed(seed: int, line: int) -> int:
    """The seed of the generator of the request on ``line``: a function of the two numbers only,
    so a request's samples do not depend on the requests around it."""
    return int(np.random.SeedSequence([seed, line]).generate_state(1, np.uint64)[0] >> 1)


def _check_args(args) -> None:
    cli.check_positive(args, ("batch_size", "max_batch_rows"))
    cli.check_seed(args.seed)
    cli.check_threads(args.threads)
    if args.input is not None and (args.prefix or args.suffix or args.infill or args.template):
        raise InputError("--input gives the prefix, suffix, infill and template of every sample: "
                         "drop --prefix / --suffix / --infill / --template")


def _outputs(args) -> tuple[str | None, list[tuple[str, str | None]]]:
    """Where the JSONL goes (None: nowhere), and every (flag, path) output."""
    jsonl = args.jsonl if args.jsonl is not None or args.input is None or args.json is not None else "-"
    outputs = [("--json", args.json), ("--jsonl", jsonl), ("--out", args.out)]
    if "-" not in (args.json, jsonl):
        outputs.append(("the text output", "-"))
    return jsonl, outputs


def _format_text(samples: list[dict], header: str) -> str:
    out = [header]
    for s in samples:
        out.append(f"===== sample {s['index'] + 1}/{len(samples)} =====")
        out.append(s["text"])
    return "\n".join(out) + "\n"


def _described(spans: list[Span]) -> list[dict]:
    return [{"source": s.source, "start": s.start, "end": s.end, "text": s.text, "tokens": s.ids} for s in spans]


def run(args) -> int:
    _check_args(args)
    spec = cli.sampling_spec(args)
    jsonl, outputs = _outputs(args)
    inputs = cli.checkpoint_inputs(args.checkpoint, args.tokenizer)
    if args.input not in (None, "-"):
        inputs.append((f"the --input file {args.input}", Path(args.input)))
    cli.check_outputs(outputs, inputs)
    procs = cli.processes()
    if procs.several and (args.input is None or args.input == "-"):
        what = "the samples of one request" if args.input is None else "requests read from stdin"
        raise InputError(f"torchrun started {procs.world} processes, which split --input FILE's requests between "
                         f"them; {what} run in one process: run python train/sample.py without torchrun, or pass the "
                         "requests as a file (--input FILE)")
    requests = read_requests(args.input) if args.input is not None else []
    args.device = procs.device(args.device)
    procs.threads(args.threads)
    with procs.joined():
        return _sample(args, procs, spec, jsonl, requests)


def _sample(args, procs: cli.Processes, spec, jsonl: str | None, requests: list[dict]) -> int:
    """The run, in one of ``procs``: each samples its share of the requests, the main one writes
    every output, in the order of the requests."""
    progress = procs.main and (sys.stderr.isatty() if args.progress is None else args.progress)
    pre = cli.load_checkpoint(args)
    objective, plan = cli.check_spec(spec, pre, args.length, "sample.py", quiet=not procs.main)
    model, tokenizer = pre.model, pre.tokenizer
    device = next(model.parameters()).device
    length = plan.length
    # what the sampler resolves: steps per window (the diffusion samplers' default), the windows
    resolved = plan.resolved
    seed = procs.broadcast(args.seed if args.seed is not None else secrets.randbits(31))
    max_rows = args.max_batch_rows or DEFAULT_MAX_BATCH_ROWS.get(device.type, DEFAULT_MAX_BATCH_ROWS["cpu"])

    # Every request's spans are checked before the first sample is drawn.
    if requests:
        jobs = [(r["line"], request_seed(seed, r["line"]),
                 build_spans(tokenizer, length, prefix=r.get("prefix"), suffix=r.get("suffix"),
                             infill=r["infill"], template=r.get("template"),
                             where=f"--input {args.input} line {r['line']}: "))
                for r in requests]
    else:
        jobs = [(None, seed, build_spans(tokenizer, length, prefix=args.prefix, suffix=args.suffix,
                                         infill=args.infill, template=args.template))]
    settings = {
        "checkpoint": args.checkpoint,
        "tokenizer": {"name": tokenizer.name, "source": pre.tokenizer_source, "vocab_size": tokenizer.vocab_size},
        "objective": pre.objective,
        "graph": pre.graph.name if pre.graph is not None else None,
        "length": length,
        **spec.record(objective, **resolved),  # what ran: None for what does not apply
        "batch_size": args.batch_size,
        "max_batch_rows": max_rows,
        "seed": seed,
        "device": str(device),
        "processes": procs.world,
    }

    stream = None
    if jsonl is not None and procs.main:
        stream = sys.stdout if jsonl == "-" else open(jsonl, "w", encoding="utf-8")

    def write(batch: list[dict]) -> None:
        if stream is not None:
            for sample_ in batch:
                stream.write(json.dumps({**sample_, "settings": settings}, ensure_ascii=False) + "\n")
            stream.flush()

    share = procs.share(len(jobs))
    samples: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=len(share) if requests else args.batch_size, unit="request" if requests else "sample",
               desc="requests" if requests else "samples", dynamic_ncols=True,
               disable=not progress or (not requests and args.batch_size <= max_rows))
    try:
        for number in share:
            line, job_seed, spans = jobs[number]
            generator = torch.Generator(device=device).manual_seed(job_seed)
            began = time.perf_counter()
            done = []
            for first in range(0, args.batch_size, max_rows):
                rows = min(max_rows, args.batch_size - first)
                fixed_tokens = fixed_mask = None
                if spans:
                    fixed_tokens, fixed_mask = spans_to_mask([spans] * rows, length, device=device)
                x, stats = sample_blockwise(model, pre.graph, pre.noise, batch_size=rows, length=length, spec=spec,
                                            fixed_tokens=fixed_tokens, fixed_mask=fixed_mask, generator=generator,
                                            device=device, progress=progress, return_stats=True,
                                            eos_id=tokenizer.eos_id)
                ids = x.cpu().tolist()
                if spec.stop_at_eos:  # each sample ends at its first generated EOS
                    ids = [row[:n] for row, n in zip(ids, stopped_lengths(x, tokenizer.eos_id, fixed_mask))]
                done += zip(ids, stats.nfe)
                if not requests:
                    bar.update(rows)
            elapsed = round(time.perf_counter() - began, 3)
            batch = []
            for row, nfe in done:
                # numbered as one process numbers them: every request has --batch-size samples
                sample_ = {"index": number * args.batch_size + len(batch), "text": tokenizer.decode(row),
                           "tokens": row, "nfe": int(nfe)}
                if requests:
                    sample_.update(line=line, seed=job_seed, fixed=_described(spans), elapsed_s=elapsed)
                batch.append(sample_)
            samples += batch
            write(batch)  # the main process's share comes first: its lines go out as they are done
            if requests:
                bar.update(1)
        shares = procs.gather(samples)
        if procs.main:
            for other in shares[1:]:
                write(other)
                samples += other
    finally:
        bar.close()
        if stream is not None and stream is not sys.stdout:
            stream.close()
    if not procs.main:
        return 0
    elapsed = time.perf_counter() - start
    settings["elapsed_s"] = round(elapsed, 3)
    mean_nfe = sum(s["nfe"] for s in samples) / max(1, len(samples))
    settings["nfe_mean"] = mean_nfe
    if not requests:
        settings["fixed"] = _described(jobs[0][2])
    header = (
        f"# {args.checkpoint}: {len(samples)} sample(s) of {length} tokens, {spec.describe(objective, **resolved)}, "
        + f"{mean_nfe:.1f} network evaluations per sample, seed {seed}, "
        + (f"{len(requests)} request(s) from {args.input}" if requests else f"{len(jobs[0][2])} fixed span(s)")
        + (f" in {procs.world} processes" if procs.several else "")
        + f", {elapsed:.1f}s on {device}"
    )
    text = _format_text(samples, header)
    if args.json is not None:
        payload = json.dumps({**settings, "samples": samples}, ensure_ascii=False) + "\n"
        if args.json == "-":
            sys.stdout.write(payload)
        else:
            Path(args.json).write_text(payload, encoding="utf-8")
    if "-" not in (args.json, jsonl):
        sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


def attach_option_values(argv: list[str], options=("--infill",)) -> list[str]:
    """``--infill -8:TEXT`` as ``--infill=-8:TEXT``: argparse takes a value starting with "-" for an
    option, so a position counted from the end would not parse as two words."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] != "--":
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = attach_option_values(sys.argv[1:] if argv is None else list(argv))
    return cli.main_with_exit_codes("sample.py", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
