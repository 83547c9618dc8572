"""What the command-line entry points share: how bad input and failures end a run.

Exit status 0 on success, 2 on bad input (a one-line message), 1 on other failures.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

__all__ = ["InputError", "add_nfe_options", "check_positive", "die", "load_checkpoint", "main_with_exit_codes",
           "nfe_options"]


class InputError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


def die(message: str, code: int = 1, *, prog: str | None = None) -> NoReturn:
    """Print ``[prog: ]error: message`` to stderr and exit with ``code``."""
    print(f"{prog}: error: {message}" if prog else f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main_with_exit_codes(
    prog: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` and call ``run(args)``; an :class:`InputError` becomes its one-line message
    (``prog: error: ...``) and exit status 2. Returns the exit status."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def check_positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Raise :class:`InputError` for any of the options ``names`` (dest names) given below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def load_checkpoint(args: argparse.Namespace):
    """:func:`sedd.pretrained.load_pretrained` of ``args.checkpoint`` with ``args.tokenizer`` on
    ``args.device``; what says the input is bad (missing files, the Hub offline, a tokenizer that
    does not fit) becomes an :class:`InputError`."""
    from sedd.pretrained import load_pretrained

    try:
        return load_pretrained(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
    except (OSError, ValueError) as err:
        raise InputError(str(err)) from err


CACHE_CHOICES = {"off": False, "on": True, "approximate": "approximate"}


def add_nfe_options(group) -> None:
    """--cache [on|off|approximate] and --tokens-per-step K (the sampler's fewer-evaluation options)."""
    group.add_argument("--cache", nargs="?", const="on", default="off", choices=list(CACHE_CHOICES),
                       help="reuse the network output of a sequence the last step left unchanged: on (exact, "
                            "for a model trained with --time-conditioning off), approximate (any model), off "
                            "(default: off; --cache alone: on)")
    group.add_argument("--tokens-per-step", type=int, metavar="K",
                       help="first_hitting: tokens unmasked per network evaluation (default: 1, exact)")


def nfe_options(args: argparse.Namespace, model, predictor: str) -> dict:
    """The ``sample`` keyword arguments of :func:`add_nfe_options`' flags, checked against the
    model and the predictor (:class:`InputError` for a combination that cannot run)."""
    cache = CACHE_CHOICES[args.cache]
    if cache is True and getattr(model, "time_conditioning", True):
        raise InputError("--cache on reuses outputs exactly only for a model trained with --time-conditioning off; "
                         "this one reads sigma: use --cache approximate, or leave the cache off")
    if args.tokens_per_step is not None:
        if args.tokens_per_step < 1:
            raise InputError(f"--tokens-per-step must be >= 1, got {args.tokens_per_step}")
        if predictor != "first_hitting":
            raise InputError(f"--tokens-per-step applies to the first_hitting predictor, not {predictor}")
    return {"cache": cache, "tokens_per_step": args.tokens_per_step}
