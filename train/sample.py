"""Generate text from a SEDD checkpoint: unconditional samples, prompts, suffixes and infilling.

    python train/sample.py CKPT [--prefix TEXT] [--suffix TEXT] [--infill POS:TEXT ...]
                                [--template "The [MASK:5] sat on the [MASK:3]."]
                                [--length N] [--steps N] [--sampler analytic|euler|first_hitting]
                                [--cache [on|approximate]] [--tokens-per-step K]
                                [--batch-size B] [--seed S] [--device auto|cpu|cuda]
                                [--tokenizer SPEC] [--json PATH|-] [--out FILE]
                                [--input REQUESTS.jsonl|-] [--jsonl PATH|-] [--window N] [--stride N]
                                [--threads N]

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

Byte-level BPE tokenizers (GPT-2's) attach a space to the word after it, so trailing spaces of a
fixed text (prefix, infill, template piece) are left to the generated token that follows: "The "
is placed as "The" and the model writes " cat". Spans may not overlap or run past --length.

``--input FILE.jsonl`` reads one request per line instead: a JSON string (a prompt) or an object
with any of "prefix", "suffix", "template" and "infill" (a list of [pos, text] pairs); each request
gets --batch-size samples, all in one batch (every row with its own fixed positions), and the
output is JSONL, one object per sample with its text, token ids, fixed spans, input line and the
settings (--jsonl PATH|- chooses where; it works without --input too).

A --length above the model's training length is generated semi-autoregressively: window by
window (--window, default the model's length), each later window holding the tokens before its
--stride new ones fixed (sedd.generation.sample_blockwise).

The output is every decoded sample under a header (to stdout and to --out), or JSON with the
token ids of every sample and of every fixed span (--json); exit status 0 on success, 2 on bad
input (with a one-line message), 1 on other failures.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python train/sample.py`: the package of this checkout, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sedd.generation import Span, fixed_spans, sample_blockwise, spans_to_mask
from sedd.sampling import PREDICTORS
from train.cli import InputError, add_nfe_options, check_positive, load_checkpoint, main_with_exit_codes, nfe_options

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
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="Sample text from a SEDD checkpoint, unconditionally or with fixed spans "
        "(prefix, suffix, infilling at any token positions, templates). Each fixed text is tokenized "
        "on its own and its tokens are held at their positions (exact conditioning for absorbing-graph "
        "checkpoints, biased for uniform ones); every other "
        "position is generated. Trailing spaces of a fixed text that generated tokens follow are "
        "dropped (byte-level BPEs attach the space to the next word). Prints every decoded sample "
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
    s.add_argument("--length", type=int, help="tokens per sample (default: the model's training length); "
                   "longer than the model's length is generated window by window (--window, --stride)")
    s.add_argument("--window", type=int, help="semi-autoregressive window: tokens the model sees at once "
                   "(default: the model's training length)")
    s.add_argument("--stride", type=int, help="new tokens per window after the first, the rest of the window "
                   "holding the tokens before them (default: half the window)")
    s.add_argument(
        "--steps", type=int,
        help="reverse-process steps, one model call each (default: --length, as in the paper; "
        "fewer is faster, e.g. 128, at some cost in quality, more so for euler)",
    )
    s.add_argument("--sampler", "--predictor", dest="sampler", choices=PREDICTORS, default="analytic",
                   help="predictor (default: analytic); first_hitting: one network evaluation per generated "
                        "token (--steps unused)")
    add_nfe_options(s)
    s.add_argument("--top-p", type=float, metavar="P",
                   help="nucleus sampling: each step jumps only to the smallest set of candidate tokens holding "
                        "at least P of the jump probability (0 < P <= 1; default: off)")
    s.add_argument("--top-k", type=int, metavar="K",
                   help="each step jumps only to the K most likely candidate tokens (default: off)")
    s.add_argument("--batch-size", type=int, default=1, help="number of samples (default: 1)")
    s.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed with the output)")
    s.add_argument("--eps", type=float, default=1e-5, help="final time of the grid (default: 1e-5)")
    r = p.add_argument_group("model, tokenizer, output")
    r.add_argument(
        "--tokenizer", metavar="SPEC",
        help="tokenizer spec or path (default: CKPT/tokenizer.json if present, else GPT-2 from the "
        "Hub; offline: --tokenizer DIR, a directory holding GPT-2's vocab.json and merges.txt)",
    )
    r.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ... (default: auto)")
    r.add_argument("--json", metavar="PATH", help="write samples, token ids and settings as JSON (- for stdout, "
                   "replacing the text output)")
    r.add_argument("--input", metavar="PATH", help="JSONL requests, one per line (- for stdin): a JSON string "
                   "(a prompt) or an object with any of prefix, suffix, template and infill ([[pos, text], ...]); "
                   "--batch-size samples of each, all in one batch; writes JSONL (--jsonl -) unless told otherwise")
    r.add_argument("--jsonl", metavar="PATH", help="write one JSON object per sample (text, token ids, fixed "
                   "spans, input line, settings) per line (- for stdout, replacing the text output)")
    r.add_argument("--out", metavar="FILE", help="also write the text output to FILE")
    r.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's, one per core; "
                   "on a busy shared machine 1 or 2 is often much faster)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


# ----------------------------------------------------------------------------------------------
# Spans
# ----------------------------------------------------------------------------------------------


def parse_infill(item) -> tuple[int, str]:
    """(position, text) of an ``--infill POS:TEXT`` value (or a JSONL ``[pos, text]`` pair)."""
    if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], str):
        pos_text, text = item
        sep = True
    else:
        pos_text, sep, text = str(item).partition(":")
    try:
        pos = int(pos_text)
    except (TypeError, ValueError):
        pos = None
    if not sep or pos is None or isinstance(pos_text, bool):
        raise InputError(f"--infill expects POS:TEXT with an integer token position, got {item!r}")
    return pos, text


def build_spans(tokenizer, length: int, *, prefix=None, suffix=None, infill=(), template=None,
                where: str = "") -> list[Span]:
    """Every fixed span one sample asks for (sedd.generation.fixed_spans), checked against
    ``length`` and each other. ``where`` ("--input x.jsonl line 3: ") starts the messages; the
    spans of command-line options are named after them (--prefix, --infill 40:'text', ...)."""
    try:
        spans = fixed_spans(tokenizer, length, prefix=prefix, suffix=suffix,
                            infill=[parse_infill(item) for item in infill], template=template)
    except ValueError as err:
        raise InputError(f"{where}{err}") from None
    if not where:
        for span in spans:
            span.source = f"--{span.source}"
    return spans


_SPEC_KEYS = {"prefix", "suffix", "infill", "template"}


def read_requests(path: str) -> list[dict]:
    """The JSONL requests of ``--input``: per line a JSON string (a prompt) or an object with any
    of prefix, suffix, template (strings) and infill (a list of [pos, text] pairs, or of
    "POS:TEXT" strings); blank lines are skipped."""
    try:
        lines = (sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")).splitlines()
    except OSError as err:
        raise InputError(f"--input {path}: {err.strerror or err}") from None
    requests = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"--input {path} line {n}: not JSON ({err.msg})") from None
        if isinstance(item, str):
            item = {"prefix": item}
        if not isinstance(item, dict) or not item.keys() <= _SPEC_KEYS:
            raise InputError(f"--input {path} line {n}: expected a string (a prompt) or an object with keys "
                             f"{sorted(_SPEC_KEYS)}, got {line.strip()[:80]!r}")
        if not isinstance(item.get("infill", []), list):
            raise InputError(f"--input {path} line {n}: infill must be a list of [pos, text] pairs")
        item["line"] = n
        requests.append(item)
    if not requests:
        raise InputError(f"--input {path} holds no request")
    return requests


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _check_args(args) -> None:
    check_positive(args, ("length", "steps", "batch_size", "window", "stride", "threads", "top_k"))
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 < args.eps < 1:
        raise InputError(f"--eps must be in (0, 1), got {args.eps}")


def _format_text(samples: list[dict], header: str) -> str:
    out = [header]
    for s in samples:
        out.append(f"===== sample {s['index'] + 1}/{len(samples)} =====")
        out.append(s["text"])
    return "\n".join(out) + "\n"


def run(args) -> int:
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    pre = load_checkpoint(args)
    model, tokenizer = pre.model, pre.tokenizer
    device = next(model.parameters()).device
    length = args.length or model.length
    window = args.window or model.length
    if window > model.length:
        print(f"sample.py: warning: --window {window} is longer than the model's training length "
              f"{model.length}; quality drops past it", file=sys.stderr)
    if args.stride is not None and args.stride >= window:
        raise InputError(f"--stride must be smaller than the window ({window}), got {args.stride}")
    stride = args.stride or window // 2
    if length > window:
        blocks = 1 + -(-(length - window) // stride)
        print(f"sample.py: {length} tokens is longer than the {window}-token window: generating "
              f"semi-autoregressively in {blocks} windows, each holding the {window - stride} tokens before "
              f"its {stride} new ones fixed (--window, --stride)", file=sys.stderr)
    steps = args.steps or min(length, window)
    if args.input is not None:
        if args.prefix or args.suffix or args.infill or args.template:
            raise InputError("--input gives the prefix, suffix, infill and template of every sample: "
                             "drop --prefix / --suffix / --infill / --template")
        requests = read_requests(args.input)
        rows = [build_spans(tokenizer, length, prefix=r.get("prefix"), suffix=r.get("suffix"),
                            infill=r.get("infill", []), template=r.get("template"),
                            where=f"--input {args.input} line {r['line']}: ") for r in requests]
    else:
        requests = []
        rows = [build_spans(tokenizer, length, prefix=args.prefix, suffix=args.suffix, infill=args.infill,
                            template=args.template)]
    jsonl = args.jsonl if args.jsonl is not None or args.input is None or args.json is not None else "-"
    seed = args.seed if args.seed is not None else secrets.randbits(31)

    # One batch: every request's samples, each row with its own fixed positions.
    per_sample = [spans for spans in rows for _ in range(args.batch_size)]
    fixed_tokens = fixed_mask = None
    if any(per_sample):
        fixed_tokens, fixed_mask = spans_to_mask(per_sample, length, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    nfe_kwargs = nfe_options(args, model, args.sampler)
    start = time.perf_counter()
    x, stats = sample_blockwise(
        model, pre.graph, pre.noise, batch_size=len(per_sample), length=length, window=window, stride=stride,
        steps=steps, predictor=args.sampler, eps=args.eps, fixed_tokens=fixed_tokens, fixed_mask=fixed_mask,
        generator=generator, device=device, progress=progress, top_p=args.top_p, top_k=args.top_k,
        return_stats=True, **nfe_kwargs,
    )
    elapsed = time.perf_counter() - start
    ids = x.cpu().tolist()

    def described(spans):
        return [{"source": s.source, "start": s.start, "end": s.end, "text": s.text, "tokens": s.ids} for s in spans]

    samples = [{"index": i, "text": tokenizer.decode(row), "tokens": row, "nfe": int(n)}
               for i, (row, n) in enumerate(zip(ids, stats.nfe))]
    if requests:
        for i, sample_ in enumerate(samples):
            sample_.update(line=requests[i // args.batch_size]["line"], fixed=described(per_sample[i]))
    settings = {
        "checkpoint": args.checkpoint,
        "tokenizer": {"name": tokenizer.name, "source": pre.tokenizer_source, "vocab_size": tokenizer.vocab_size},
        "graph": pre.graph.name,
        "length": length,
        "window": window,
        "stride": stride if length > window else None,
        "steps": steps,
        "sampler": args.sampler,
        "cache": args.cache,
        "tokens_per_step": args.tokens_per_step,
        "nfe_mean": stats.mean_nfe,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "eps": args.eps,
        "batch_size": args.batch_size,
        "seed": seed,
        "device": str(device),
        "elapsed_s": round(elapsed, 3),
    }
    if not requests:
        settings["fixed"] = described(rows[0])
    header = (
        f"# {args.checkpoint}: {len(samples)} sample(s) of {length} tokens, {args.sampler} sampler, "
        f"{steps} steps, {stats.mean_nfe:.1f} network evaluations per sample, seed {seed}, "
        + (f"{len(requests)} request(s) from {args.input}" if requests else f"{len(rows[0])} fixed span(s)")
        + f", {elapsed:.1f}s on {device}"
    )
    text = _format_text(samples, header)
    outputs = []  # (destination, payload)
    if args.json is not None:
        outputs.append((args.json, json.dumps({**settings, "samples": samples}, ensure_ascii=False) + "\n"))
    if jsonl is not None:
        outputs.append((jsonl, "".join(json.dumps({**s, "settings": settings}, ensure_ascii=False) + "\n"
                                       for s in samples)))
    for dest, payload in outputs:
        if dest == "-":
            sys.stdout.write(payload)
        else:
            Path(dest).write_text(payload, encoding="utf-8")
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
    return main_with_exit_codes("sample.py", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
