"""EleutherAI's lm-evaluation-harness with the SEDD model type registered as ``sedd``.

    python train/harness.py --model sedd --model_args pretrained=CKPT[,mc_samples=K,...] \\
        --tasks TASKS [--include_path DIR] [any other lm_eval option]

Everything after the program name goes to lm_eval's command line (``lm-eval run``), with the
model ``sedd`` (:mod:`sedd.harness`, diffusion and autoregressive checkpoints) registered first;
``--model_args`` of ``sedd``: pretrained, tokenizer, device, batch_size, mc_samples, time_sampler,
seed, dtype, estimates and every sampler option (steps, predictor, top_p, top_k, cache,
tokens_per_step, temperature, ...; ``sedd.harness.MODEL_ARGS`` says what each does).

What this adds to lm_eval's own command line, for ``--model sedd`` only:

* the model_args are checked before lm_eval indexes its tasks (which takes a while), against the
  checkpoint's config where it can be read without the network (a local directory, a Hub id in the
  local cache): a bad key or value, an option the checkpoint's objective does not read (mc_samples
  for an autoregressive checkpoint, first hitting on the uniform graph) is one line and exit status
  2, as is a local checkpoint directory that is missing; a checkpoint that cannot be loaded, a
  request the model cannot answer, and what lm_eval's own checks of its options reject (an unknown
  task name, options that do not go together) are one line too;
* it runs in one process: under torchrun, one line naming what to run instead;
* without ``--device``, the model runs on CUDA when available, else on the CPU (lm_eval's own
  default, cuda:0, fails on a machine without one); without ``--batch_size``, rows per model
  call default to sedd.harness's (32) instead of lm_eval's 1. model_args ``device=`` and
  ``batch_size=`` take precedence over both flags.

Needs the ``eval`` extra (``pip install -e ".[eval]"``); without it, one line saying so and exit
status 1. Example tasks that run offline are in ``train/harness_tasks/`` (run from the
repository root: their data paths are relative to it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/harness.py`: the package of this checkout, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "harness.py"


def _error(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


def _option(argv: list[str], *names: str) -> tuple[bool, list[str]]:
    """Whether an option is on the command line, and the values that follow each occurrence."""
    found, values = False, []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name:
                found = True
                j = i + 1
                while j < len(argv) and not argv[j].startswith("-"):
                    values.append(argv[j])
                    j += 1
            elif name.startswith("--") and arg.startswith(name + "="):
                found = True
                values.append(arg.split("=", 1)[1])
    return found, values


def _model_args(values: list[str]) -> dict:
    """--model_args as lm_eval reads them: a JSON object, or key=value pairs (comma or space separated)."""
    from lm_eval.utils import simple_parse_args_string

    args: dict = {}
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"--model_args is not valid JSON: {err}") from None
            if not isinstance(parsed, dict):
                raise ValueError("--model_args JSON must be an object")
            args.update(parsed)
            continue
        for pair in filter(None, value.split(",")):
            if "=" not in pair:
                raise ValueError(f"--model_args takes key=value pairs, got {pair!r}")
        args.update(simple_parse_args_string(value))
    return args


def prepare(argv: list[str]) -> list[str]:
    """The command line for lm_eval: for ``--model sedd``, its model_args checked and the defaults
    above added. Raises :class:`sedd.harness.HarnessError` (or ValueError) for bad input."""
    from sedd.harness import HarnessError, check_for_objective, check_model_args
    from sedd.objectives import objective_of
    from sedd.pretrained import resolve_device

    _, models = _option(argv, "--model", "-M")
    if not models or models[-1] != "sedd":
        return argv
    given = _model_args(_option(argv, "--model_args", "-a")[1])
    args = check_model_args(given)
    device_flag = _option(argv, "--device")[1]
    try:
        resolve_device(args["device"] if "device" in given or not device_flag else device_flag[-1])
    except ValueError as err:
        raise HarnessError(f"device: {err}") from None
    _check_checkpoint(args["pretrained"])
    config = _checkpoint_config(args["pretrained"])
    if config is not None:
        check_for_objective(args, objective_of(config))
    argv = list(argv)
    if not _option(argv, "--device")[0] and "device" not in given:
        argv += ["--device", "auto"]
    if not _option(argv, "--batch_size", "-b")[0] and "batch_size" not in given:
        argv += ["--batch_size", "auto"]
    return argv


def _check_checkpoint(name: str) -> None:
    """A local checkpoint directory that is missing or incomplete fails here, at once, not after
    lm_eval has indexed its tasks. Names that may be Hub ids ("name", "owner/name" where no local
    "owner" directory exists) are left to the model."""
    from sedd.harness import HarnessError

    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise HarnessError(f"checkpoint directory {name!r} holds no config.json")
        return
    if folder.exists():
        raise HarnessError(f"checkpoint {name!r} is a file; pass the directory that holds config.json")
    local = (folder.is_absolute() or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
             or (len(folder.parts) > 1 and folder.parent.is_dir()))
    if local:
        raise HarnessError(f"checkpoint directory {name!r} does not exist (python train/run.py writes one to "
                           "out/<preset>)")


def _checkpoint_config(name: str) -> dict | None:
    """The checkpoint's config.json, checked, where it can be read without the network (a local
    directory, or a Hub id already in the local cache); None otherwise (the model checks it once
    loaded). HarnessError for a config that cannot be used."""
    from sedd.harness import HarnessError
    from sedd.model.checkpoint import checkpoint_dir, config_objective, normalise_config, read_config

    try:
        folder = checkpoint_dir(name, local_files_only=True)
    except (OSError, ValueError):
        return None
    try:
        config = read_config(folder)
        return normalise_config(config, objective=config_objective(config))
    except FileNotFoundError:
        return None
    except (TypeError, ValueError) as err:
        raise HarnessError(f"checkpoint {name!r}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import lm_eval  # noqa: F401
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        return _error('lm-evaluation-harness is not installed: pip install -e ".[eval]" (the eval extra, '
                      'lm-eval>=0.4)', 1)
    from sedd.harness import MODEL_ARGS, HarnessError  # registers the model "sedd"
    from train.cli import InputError, one_process, processes

    try:
        one_process(PROG, "python train/harness.py (the model sedd does not split lm_eval's requests between processes)")
    except InputError as err:
        return _error(str(err), 2) if processes().main else 2

    if "-h" in argv or "--help" in argv:  # lm_eval's help follows; it cannot know sedd's model_args
        width = max(map(len, MODEL_ARGS))
        print("--model sedd: --model_args KEY=VALUE,... with these keys (sedd.harness):\n"
              + "\n".join(f"  {k:<{width}}  {v}" for k, v in MODEL_ARGS.items()) + "\n")
    try:
        argv = prepare(argv)
    except (HarnessError, ValueError) as err:
        return _error(str(err), 2)
    saved = sys.argv
    sys.argv = [PROG, *argv]  # lm_eval's command line reads sys.argv
    try:
        cli_evaluate()
    except HarnessError as err:
        return _error(str(err), 2)
    except (ValueError, FileNotFoundError) as err:
        if not _from_lm_eval_checks(err):
            raise
        return _error(" ".join(str(err).split()), 2)
    finally:
        sys.argv = saved
    return 0


def _from_lm_eval_checks(err: BaseException) -> bool:
    """Whether lm_eval raised ``err`` while checking its command line (an unknown task, options
    that do not go together): bad input, not a failure, so one line rather than a traceback."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module.startswith(("lm_eval.config", "lm_eval._cli", "lm_eval.__main__"))


if __name__ == "__main__":
    sys.exit(main())
