"""Generate text from a SEDD checkpoint: unconditional samples, prompts, suffixes and infilling.

    python train/sample.py CKPT [--prefix TEXT] [--suffix TEXT] [--infill POS:TEXT ...]
                                [--template "The [MASK:5] sat on the [MASK:3]."]
                                [--length N] [--steps N] [--sampler analytic|euler]
                                [--batch-size B] [--seed S] [--device auto|cpu|cuda]
                                [--tokenizer SPEC] [--json PATH|-] [--out FILE]

CKPT is a checkpoint directory written by train/run.py or ``SEDD.save_pretrained`` (config.json,
model.safetensors, usually tokenizer.json), a public SEDD checkpoint directory, or a Hub id such
as louaaron/sedd-small (needs the Hub). See ``sedd/pretrained.py`` for how the tokenizer is found.

Conditioning is exact: the given tokens are held fixed at their positions before every reverse
step and at the end (sedd-math.md, "Conditioning"), so any set of positions may be fixed and the
rest is generated. Every text is tokenized on its own and placed token by token:

* ``--prefix TEXT`` starts at position 0; ``--suffix TEXT`` ends at the last position;
* ``--infill POS:TEXT`` starts at token position POS (0-based; negative counts from the end, so
  ``-10:`` starts 10 tokens before the end); repeatable;
* ``--template`` lays out the sequence from position 0: literal text is fixed, ``[MASK:n]`` is a
  hole of n generated tokens (``[MASK]`` = one). Positions after the template are generated too.

Byte-level BPE tokenizers (GPT-2's) attach a space to the word after it, so trailing spaces of a
fixed text (prefix, infill, template piece) are left to the generated token that follows: "The "
is placed as "The" and the model writes " cat". Spans may not overlap or run past --length.

The output is every decoded sample under a header (to stdout and to --out), or JSON with the
token ids of every sample and of every fixed span (--json); exit status 0 on success, 2 on bad
input (with a one-line message), 1 on other failures.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python train/sample.py`: the package of this checkout, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from sedd.generation import sample_blockwise
from sedd.pretrained import load_pretrained
from sedd.sampling import PREDICTORS, conditioning

TEMPLATE_HOLE = re.compile(r"\[MASK(?::(\d+))?\]")

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
"""


class InputError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


@dataclass
class Span:
    """Fixed tokens ``ids`` at positions [start, start + len(ids)), and the option that set them."""

    source: str
    start: int
    ids: list[int]
    text: str  # as given on the command line (the tokens may have dropped its trailing spaces)

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py",
        description="Sample text from a SEDD checkpoint, unconditionally or with fixed spans "
        "(prefix, suffix, infilling at any token positions, templates). Each fixed text is tokenized "
        "on its own and its tokens are held at their positions (exact conditioning); every other "
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
    s.add_argument("--sampler", choices=PREDICTORS, default="analytic", help="predictor (default: analytic)")
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
    r.add_argument("--out", metavar="FILE", help="also write the text output to FILE")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


# ----------------------------------------------------------------------------------------------
# Spans
# ----------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str, *, followed_by_hole: bool) -> list[int]:
    # A byte-level BPE glues a space to the next word: "The " would end in a lone " " token that
    # the model rarely saw before a word. Leave the space to the generated token.
    if followed_by_hole:
        text = text.rstrip(" ")
    return tokenizer.encode(text) if text else []


def parse_template(template: str, tokenizer) -> list[Span]:
    """Fixed spans of a template: literal text is fixed, ``[MASK:n]`` holes are n free positions."""
    spans, pos, last = [], 0, 0
    pieces: list[tuple[str, int]] = []  # (literal text, hole size after it)
    for m in TEMPLATE_HOLE.finditer(template):
        n = int(m.group(1)) if m.group(1) is not None else 1
        if n < 1:
            raise InputError(f"--template: a hole needs at least one token, got {m.group(0)!r}")
        pieces.append((template[last : m.start()], n))
        last = m.end()
    pieces.append((template[last:], 0))
    if len(pieces) == 1:
        raise InputError("--template has no hole: mark the spans to generate with [MASK:n] (or [MASK])")
    for i, (text, hole) in enumerate(pieces):
        ids = _encode(tokenizer, text, followed_by_hole=True)  # free positions may follow the last piece too
        if ids:
            spans.append(Span(f"--template piece {i + 1} {text!r}", pos, ids, text))
        pos += len(ids) + hole
    return spans


def build_spans(args, tokenizer, length: int) -> list[Span]:
    """Every fixed span the options ask for, checked against ``length`` and each other."""
    spans: list[Span] = []
    if args.template is not None:
        spans += parse_template(args.template, tokenizer)
    if args.prefix:
        spans.append(Span("--prefix", 0, _encode(tokenizer, args.prefix, followed_by_hole=True), args.prefix))
    for item in args.infill:
        pos_text, sep, text = item.partition(":")
        try:
            pos = int(pos_text)
        except ValueError:
            pos = None
        if not sep or pos is None:
            raise InputError(f"--infill expects POS:TEXT with an integer token position, got {item!r}")
        ids = _encode(tokenizer, text, followed_by_hole=True)
        if not ids:
            raise InputError(f"--infill {item!r} has no text to place")
        start = pos + length if pos < 0 else pos
        if start < 0:
            raise InputError(f"--infill {item!r}: position {pos} is before the start of a {length}-token sequence")
        spans.append(Span(f"--infill {item!r}", start, ids, text))
    if args.suffix:
        ids = _encode(tokenizer, args.suffix, followed_by_hole=False)
        spans.append(Span("--suffix", length - len(ids), ids, args.suffix))

    spans = [s for s in spans if s.ids]
    for s in spans:
        if s.start < 0 or s.end > length:
            raise InputError(
                f"{s.source} is {len(s.ids)} tokens, which does not fit at position {max(s.start, 0)} "
                f"of a {length}-token sequence; raise --length or shorten the text"
            )
    ordered = sorted(spans, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.end:
            raise InputError(
                f"{a.source} (tokens {a.start}..{a.end - 1}) overlaps {b.source} (tokens {b.start}..{b.end - 1})"
            )
    if sum(len(s.ids) for s in spans) == length:
        raise InputError(f"the fixed spans cover all {length} positions: nothing is left to generate")
    return ordered


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _check_args(args) -> None:
    for name in ("length", "steps", "batch_size", "window", "stride"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
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
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        pre = load_pretrained(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
    except (OSError, ValueError) as err:  # missing files, Hub offline, tokenizer that does not fit
        raise InputError(str(err)) from err
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
    spans = build_spans(args, tokenizer, length)
    seed = args.seed if args.seed is not None else secrets.randbits(31)

    fixed_tokens = fixed_mask = None
    if spans:
        fixed_tokens, fixed_mask = conditioning(length, {s.start: s.ids for s in spans}, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    x = sample_blockwise(
        model, pre.graph, pre.noise, batch_size=args.batch_size, length=length, window=window, stride=stride,
        steps=steps, predictor=args.sampler, eps=args.eps, fixed_tokens=fixed_tokens, fixed_mask=fixed_mask,
        generator=generator, device=device, progress=progress,
    )
    elapsed = time.perf_counter() - start
    ids = x.cpu().tolist()
    samples = [{"index": i, "text": tokenizer.decode(row), "tokens": row} for i, row in enumerate(ids)]

    settings = {
        "checkpoint": args.checkpoint,
        "tokenizer": {"name": tokenizer.name, "source": pre.tokenizer_source, "vocab_size": tokenizer.vocab_size},
        "graph": pre.graph.name,
        "length": length,
        "window": window,
        "stride": stride if length > window else None,
        "steps": steps,
        "sampler": args.sampler,
        "eps": args.eps,
        "batch_size": args.batch_size,
        "seed": seed,
        "device": str(device),
        "elapsed_s": round(elapsed, 3),
        "fixed": [{"source": s.source, "start": s.start, "end": s.end, "text": s.text, "tokens": s.ids} for s in spans],
    }
    header = (
        f"# {args.checkpoint}: {args.batch_size} sample(s) of {length} tokens, {args.sampler} sampler, "
        f"{steps} steps, seed {seed}, {len(spans)} fixed span(s), {elapsed:.1f}s on {device}"
    )
    text = _format_text(samples, header)
    if args.json is not None:
        payload = json.dumps({**settings, "samples": samples}, ensure_ascii=False) + "\n"
        if args.json == "-":
            sys.stdout.write(payload)
        else:
            Path(args.json).write_text(payload, encoding="utf-8")
    if args.json != "-":
        sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as err:
        print(f"sample.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
