"""What the command-line entry points share: how bad input and failures end a run.

Exit status 0 on success, 2 on bad input (a one-line message), 1 on other failures.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence

__all__ = ["InputError", "check_positive", "die", "load_checkpoint", "main_with_exit_codes"]


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
