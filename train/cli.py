"""What the command-line entry points share: how bad input and failures end a run, the checks of
values and output paths that run before any work, and the sampler options of train/sample.py and
train/quality.py (defined and checked here once).

Exit status 0 on success, 2 on bad input (a one-line message), 1 on other failures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

__all__ = [
    "ArgumentParser", "InputError", "Processes", "SamplingPlan", "add_sampler_options", "check_outputs",
    "check_positive", "check_seed", "check_spec", "check_threads", "checkpoint_inputs", "die", "files_of", "flag_of",
    "load_checkpoint", "main_with_exit_codes", "one_process", "parse_steps", "parse_values", "processes",
    "sampling_spec",
]

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds below it; larger ones overflow


class InputError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line (``prog: error: ...``, exit status 2)
    like every other bad input, instead of the usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


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
    (``prog: error: ...``) and exit status 2, as argparse's own errors with :class:`ArgumentParser`.
    Warnings raised while it runs print as one line each (``prog: warning: ...``), without the
    library source line Python would show. Returns the exit status (--help's too)."""
    main = processes().main  # under torchrun every process meets the same bad input: the first says it
    try:
        with contextlib.ExitStack() as quiet:
            if not main:
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2

    def one_line(message, category, filename, lineno, file=None, line=None):
        kind = "" if category is UserWarning else f" ({category.__name__})"
        if main:
            print(f"{prog}: warning: {message}{kind}", file=sys.stderr if file is None else file)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            return run(args)
    except InputError as err:
        if main:
            print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun)
# ----------------------------------------------------------------------------------------------

# What each entry point does with several processes, for the messages that refuse them.
SEVERAL = ("train/run.py trains with DDP or FSDP, train/eval.py splits the blocks and train/sample.py --input the "
           "requests over the processes")


@dataclass(frozen=True)
class Processes:
    """The processes of one job: torchrun's RANK, WORLD_SIZE and LOCAL_RANK (one process when
    not under torchrun). An entry point that splits its work joins them with :meth:`joined`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def several(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that reports: writes the outputs, prints the notes and the progress."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """This process's contiguous share of ``n`` items, in rank order (the shares differ by one
        item at most)."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def device(self, requested: str) -> str:
        """The device of this process for ``--device requested``: under several processes, auto
        and cuda are cuda:LOCAL_RANK; one named CUDA device for all of them is an :class:`InputError`."""
        if not self.several:
            return requested
        import torch

        if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
            return f"cuda:{self.local_rank}"
        if requested.startswith("cuda:"):
            raise InputError(f"--device {requested}: the {self.world} processes would share one GPU; --device cuda "
                             "(or auto) gives each process its own, cuda:LOCAL_RANK")
        return requested

    def threads(self, requested: int | None) -> None:
        """CPU threads: ``requested`` (--threads), else under several processes their share of the
        cores (each would otherwise take every core)."""
        import torch

        if requested:
            torch.set_num_threads(requested)
        elif self.several:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // self.local_world))

    @contextlib.contextmanager
    def joined(self):
        """The processes joined by a gloo group (the results only travel between them, so the CPU
        backend serves CUDA runs too), left when the block ends; one already joined stays joined."""
        import torch.distributed as dist

        own = self.several and not dist.is_initialized()
        if own:
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world)
        try:
            yield self
        finally:
            if own:
                dist.destroy_process_group()

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` (picklable), in every process."""
        if not self.several:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every process's ``value`` (picklable), in rank order, on the main process; None on the others."""
        if not self.several:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(value, out, dst=0)
        return out


def processes() -> Processes:
    """The :class:`Processes` torchrun started (its environment variables), or one."""
    env = {k: int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))}
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    return Processes(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], local_world)


def one_process(prog: str, command: str) -> None:
    """:class:`InputError` under several processes, for an entry point that runs in one:
    ``command`` is what to run instead."""
    procs = processes()
    if procs.several:
        raise InputError(f"{prog} runs in one process, and torchrun started {procs.world}, each of which would run "
                         f"the whole job: run {command} ({SEVERAL})")


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Raise :class:`InputError` for any of the options ``names`` (dest names) given below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"{_flag(name)} must be >= 1, got {value}")


def check_seed(value: int | None, flag: str = "--seed") -> None:
    """Seeds are non-negative and below 2**64, what a torch generator takes (a larger one would
    fail after the checkpoint loads, a negative one would alias a large one)."""
    if value is not None and not 0 <= value < SEED_LIMIT:
        raise InputError(f"{flag} must be in [0, 2**64), got {value}")


def check_threads(value: int | None, *, zero: str | None = None) -> None:
    """``--threads`` between 1 (0 too where ``zero`` says what it means) and the number of CPUs:
    PyTorch crashes (SIGSEGV) when asked for tens of thousands of threads."""
    if value is None or (value == 0 and zero is not None):
        return
    if value < 1:
        raise InputError(f"--threads must be >= {0 if zero is not None else 1}, got {value}")
    cpus = os.cpu_count() or 1
    if value > cpus:
        raise InputError(f"--threads must be at most the {cpus} CPUs of this machine, got {value}")


# ----------------------------------------------------------------------------------------------
# Output paths: checked before the work, so that a typo does not cost the run
# ----------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def checkpoint_inputs(checkpoint: str, tokenizer: str | None = None) -> list[tuple[str, Path]]:
    """(description, path) of every local file a checkpoint (and an explicit tokenizer) is read
    from: no output may replace one of them."""
    names = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.json", "merges.txt")
    found = []
    for what, spec in (("a file of the checkpoint", checkpoint), ("a file of the tokenizer", tokenizer)):
        if spec is None:
            continue
        path = Path(spec).expanduser()
        if path.is_file():
            found.append((f"{what} {spec}", path))
        elif path.is_dir():
            found += [(f"{what} {spec}", path / name) for name in names if (path / name).is_file()]
    return found


def files_of(description: str, spec: str | None) -> list[tuple[str, Path]]:
    """(description, path) of the local input ``spec``: the file, or the files directly in the
    directory (a data directory's splits, a judge's weights)."""
    path = Path(spec).expanduser() if spec is not None else None
    if path is None or not path.exists():
        return []
    return [(description, f) for f in ([path] if path.is_file() else sorted(path.iterdir())) if f.is_file()]


def check_outputs(outputs: Sequence[tuple[str, str | None]],
                  inputs: Sequence[tuple[str, str | os.PathLike]] = ()) -> None:
    """:class:`InputError` for an output (``(flag, path)``; None: not asked for, "-": stdout) that
    cannot be written (no such directory, a directory, no permission), that is one of the
    ``inputs`` (``(description, path)``), or that another output writes too."""
    seen: list[tuple[str, Path | str]] = []
    for flag, spec in outputs:
        if spec is None:
            continue
        where = f"{flag} {spec}"
        for other_flag, other in seen:
            if spec == "-" and other == "-":
                raise InputError(f"{where}: {other_flag} writes to stdout too; send one of them to a file")
            if spec != "-" and other != "-" and _same_file(Path(spec).expanduser(), other):
                raise InputError(f"{where}: {other_flag} writes the same file; choose two files")
        if spec == "-":
            seen.append((flag, "-"))
            continue
        path = Path(spec).expanduser()
        parent = path.parent
        if path.is_dir():
            raise InputError(f"{where}: that is a directory; give the name of a file to write")
        if not parent.is_dir():
            reason = "is not a directory" if parent.exists() else "does not exist"
            raise InputError(f"{where}: the directory {str(parent)!r} {reason}")
        if not os.access(path if path.exists() else parent, os.W_OK):
            raise InputError(f"{where}: permission denied")
        for what, source in inputs:
            if _same_file(path, Path(source).expanduser()):
                raise InputError(f"{where} is {what}: writing it would destroy the input; choose another file")
        seen.append((flag, path))


# ----------------------------------------------------------------------------------------------
# The sampler options of train/sample.py and train/quality.py
# ----------------------------------------------------------------------------------------------


DEFAULT_STEPS_LIST = "16,32,64"
CACHE_CHOICES = {"off": False, "on": True, "approximate": "approximate"}
# The flag of a SamplingSpec field where it is not "--" + the field's name with dashes.
FLAG_OF = {"predictor": "--sampler", "kv_cache": "--no-kv-cache"}


def flag_of(field: str) -> str:
    """How the command line names the SamplingSpec option ``field`` (``--top-p``), in messages."""
    return FLAG_OF.get(field, _flag(field))


def add_sampler_options(group, *, steps_list: bool = False) -> None:
    """Add the options that choose how samples are drawn: --steps (one count, or with
    ``steps_list`` a comma-separated list), --sampler/--predictor, --cache, --tokens-per-step,
    --threshold and --entropy-bound (lists too with ``steps_list``), --top-p, --top-k, --temperature,
    --kv-cache, --eps, --length, --window and --stride: the fields of :class:`sedd.sampling.SamplingSpec` (its defaults are theirs) and
    --length. :func:`sampling_spec` makes the spec of them; :func:`check_spec` checks it against the
    checkpoint loaded."""
    from sedd.sampling import PREDICTORS, SamplingSpec

    default = SamplingSpec()
    if steps_list:
        group.add_argument("--steps", metavar="LIST",
                           help=f"comma-separated step counts (default: {DEFAULT_STEPS_LIST}; per block for a block-diffusion "
                                "checkpoint, b/4,b/2,b by default; an autoregressive checkpoint takes none: one "
                                "network evaluation per token)")
    else:
        group.add_argument(
            "--steps", type=int,
            help="reverse-process steps per window (per block for a block-diffusion checkpoint), one model "
            "call each (default: one per token, as in the paper: the window's length, or the block size; fewer "
            "is faster, e.g. 128, at some cost in quality, more so for euler)",
        )
    group.add_argument("--sampler", "--predictor", dest="predictor", choices=PREDICTORS, default=default.predictor,
                       help="predictor of every step (default: analytic); first_hitting: one network evaluation "
                            "per generated token, or per --tokens-per-step tokens, or as many as --threshold or "
                            "--entropy-bound admit (no --steps, no --cache)")
    group.add_argument("--cache", nargs="?", const="on", default="off", choices=list(CACHE_CHOICES),
                       help="reuse the network output of a sequence the last step left unchanged: on (exact, "
                            "for a model trained with --time-conditioning off), approximate (any model), off "
                            "(default: off; --cache alone: on)")
    if steps_list:
        group.add_argument("--tokens-per-step", metavar="LIST",
                           help="first_hitting: comma-separated counts of tokens unmasked per network evaluation, "
                                "one record each (default: 1, exact)")
    else:
        group.add_argument("--tokens-per-step", type=int, metavar="K",
                           help="first_hitting: tokens unmasked per network evaluation (default: 1, exact)")
    for flag, value, what in (("--threshold", "TAU", "every position whose most likely token has probability >= "
                                                     "TAU, in (0, 1]"),
                              ("--entropy-bound", "GAMMA", "the surest positions while their entropies (nats) sum "
                                                           "to <= GAMMA >= 0")):
        group.add_argument(flag, type=None if steps_list else float, metavar="LIST" if steps_list else value,
                           help=f"first_hitting: each evaluation also unmasks {what} (default: off)"
                                + ("; a comma-separated list of values, one record each" if steps_list else ""))
    group.add_argument("--top-p", type=float, metavar="P",
                       help="nucleus sampling: each step jumps only to the smallest set of candidate tokens holding "
                            "at least P of the jump probability (0 < P <= 1; default: off)")
    group.add_argument("--top-k", type=int, metavar="K",
                       help="each step jumps only to the K most likely candidate tokens (default: off)")
    group.add_argument("--temperature", type=float, default=default.temperature, metavar="T",
                       help="autoregressive checkpoints: divide the logits by T >= 0 before each draw, 0 greedy "
                            "(default: 1; the diffusion samplers have none)")
    group.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=default.kv_cache,
                       help="autoregressive checkpoints: keep the keys and values of earlier positions, one new "
                            "position per evaluation (default); block-diffusion checkpoints: of the finished blocks; "
                            "--no-kv-cache re-runs the whole prefix each time (the same tokens)")
    group.add_argument("--stop-at-eos", action="store_true", default=default.stop_at_eos,
                       help="block-diffusion checkpoints: end each sample at its first generated EOS (no later "
                            "block is generated; the sample's text and tokens end with the EOS)")
    group.add_argument("--eps", type=float, default=default.eps, help="final time of the grid, in (0, 1) "
                       f"(default: {default.eps:g})")
    group.add_argument("--length", type=int, help="tokens per sample (default: the model's training length); "
                       "longer than the model's length is generated window by window (--window, --stride), or "
                       "block by block by a block-diffusion checkpoint")
    group.add_argument("--window", type=int, help="semi-autoregressive window: tokens the model sees at once "
                       "(default: the model's training length); block-diffusion checkpoints: a block and the "
                       "context it reads")
    group.add_argument("--stride", type=int, help="new tokens per window after the first, the rest of the window "
                       "holding the tokens before them (default: half the window)")


def parse_values(text: str, flag: str) -> list[float]:
    """The numbers of a comma-separated list option of real values (quality.py's ``--threshold``),
    sorted, without repeats; their range is the sampling spec's to check."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"{flag} expects comma-separated numbers such as 0.5,0.9, got {text!r}") from None
    if not values:
        raise InputError(f"{flag} needs at least one number, got {text!r}")
    return sorted(set(values))


def parse_steps(text: str, flag: str = "--steps") -> list[int]:
    """The counts of a comma-separated list option (``--steps``, quality.py's ``--tokens-per-step``),
    sorted, without repeats."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"{flag} expects comma-separated integers such as 16,32,64, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise InputError(f"{flag} needs counts >= 1, got {text!r}")
    return sorted(set(steps))


def _spec_error(err) -> InputError:
    return InputError(err.render(flag_of))


def sampling_spec(args: argparse.Namespace, **overrides):
    """The :class:`sedd.sampling.SamplingSpec` of the options of :func:`add_sampler_options`
    (``overrides``: fields set by the caller, e.g. one count of a list option), checked before
    anything loads; :class:`InputError` naming the flag. The options that depend on the model are
    checked by :func:`check_spec` once it is loaded."""
    from sedd.sampling import SamplingOptionError, SamplingSpec

    check_positive(args, ["length"])
    options = {name: getattr(args, name) for name in SamplingSpec.names()
               if getattr(args, name, None) is not None and not isinstance(getattr(args, name), str | list)}
    options.update(predictor=args.predictor, cache=CACHE_CHOICES[args.cache], **overrides)
    try:
        return SamplingSpec(**options)
    except SamplingOptionError as err:
        raise _spec_error(err) from None


def check_spec(spec, pre, length: int | None, prog: str, *, quiet: bool = False):
    """``(objective, plan)``: the loaded checkpoint ``pre``'s objective
    (:func:`sedd.objectives.objective_of`), with ``spec`` checked against it (options its sampler
    does not read, a predictor its graph cannot run, an exact cache on a model that reads σ,
    ``--eps`` against its schedule), and the :class:`SamplingPlan` of ``length`` tokens (--length;
    None: the model's) in the windows of --window / --stride, with a note on stderr when they are
    semi-autoregressive (not ``quiet``: the processes after the first of several).
    :class:`InputError` for what cannot run."""
    from sedd.generation import plan_windows
    from sedd.objectives import objective_of
    from sedd.sampling import SamplingOptionError, check_eps
    from sedd.sampling.spec import FAMILIES

    model = pre.model
    objective = objective_of(model, graph=pre.graph, noise=pre.noise)
    try:
        spec.validate(objective)
        length = model.length if length is None else length
        window, stride = plan_windows(spec, length, model.length, windows=FAMILIES[objective.sampler].windows)
    except SamplingOptionError as err:
        raise _spec_error(err) from None
    if spec.applies("eps", objective):
        try:
            check_eps(pre.noise, spec.eps)
        except ValueError as err:
            raise InputError(f"--{err}") from None
    if window > model.length and not quiet:
        print(f"{prog}: warning: --window {window} is longer than the model's training length "
              f"{model.length}; quality drops past it", file=sys.stderr)
    plan = SamplingPlan(length, window, stride, objective.default_steps(min(length, window)))
    if stride is not None and not quiet:
        print(f"{prog}: {length} tokens is longer than the {window}-token window: generating semi-autoregressively "
              f"in {plan.windows} windows, each holding the {window - stride} tokens before its {stride} new "
              "ones fixed (--window, --stride)", file=sys.stderr)
    return objective, plan


@dataclass
class SamplingPlan:
    """Tokens per sample, the window the model sees at once, the new tokens per later window
    (None when one window holds the whole sample), and the steps per sampler call where the spec
    gives none (:meth:`sedd.objectives.Objective.default_steps`)."""

    length: int
    window: int
    stride: int | None
    steps: int | None = None

    @property
    def resolved(self) -> dict:
        """What the sampler resolves, for :meth:`sedd.sampling.SamplingSpec.record`."""
        return dict(steps=self.steps, window=self.window, stride=self.stride)

    @property
    def windows(self) -> int:
        if self.stride is None:
            return 1
        return 1 + -(-(self.length - self.window) // self.stride)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def load_checkpoint(args: argparse.Namespace):
    """:func:`sedd.pretrained.load_pretrained` of ``args.checkpoint`` with ``args.tokenizer`` on
    ``args.device``; what says the input is bad (missing files, the Hub offline, a tokenizer that
    does not fit) becomes an :class:`InputError`."""
    from sedd.pretrained import load_pretrained

    try:
        return load_pretrained(args.checkpoint, tokenizer=args.tokenizer, device=args.device)
    except (OSError, ValueError) as err:
        raise InputError(str(err)) from err

