"""SEDD models in EleutherAI's lm-evaluation-harness: the model type ``"sedd"``.

Importing this module registers the model with ``lm_eval`` (the ``eval`` extra:
``pip install -e ".[eval]"``)::

    python train/harness.py --model sedd --model_args pretrained=out/cpu,mc_samples=32 \\
        --include_path train/harness_tasks --tasks sedd_python_cloze

    import lm_eval, sedd.harness                      # from Python
    lm_eval.simple_evaluate(model="sedd", model_args={"pretrained": "out/cpu"}, tasks=[...])

A diffusion model has no exact log-likelihood: every number the harness receives is a Monte Carlo
estimate of the SEDD bound (:mod:`sedd.likelihood`), K draws of t per request (``mc_samples``,
stratified by default), with the standard error estimated from the spread of the draws. The
standard errors are logged after every batch of requests, kept in :attr:`SEDDLM.estimates` and,
with ``estimates=PATH``, appended to a JSON-lines file (lm_eval's sample files hold only what its
metrics read, so they cannot carry them).

The three request types (the conventions in full: docs/math.md, "Likelihood bound"):
``loglikelihood(context, continuation)`` returns (−B, is_greedy), B the conditional bound on
−log p(continuation | context) with the context held clean (absorbing graph only:
:class:`HarnessError` otherwise); ``loglikelihood_rolling(text)`` returns −B for the bound on
−log p(text + EOS), as ``train/eval.py`` computes it on a file holding only ``text``;
``generate_until(context, gen_kwargs)`` samples after the fixed context, window by window, and
cuts the text at EOS and the first stop string (greedy: top_k = 1 in every step).

Block-diffusion checkpoints (``train/run.py --objective block``) answer the same requests through
their objective (:mod:`sedd.objectives`): the bound is the sum of the blocks' bounds, the context
held clean within its last block and in the blocks before it; is_greedy reads each block's most
likely tokens given the clean blocks before it; generation runs block by block and stops at EOS.

Seeds: every request draws from its own generator, seeded from ``seed`` and the request's text
(for loglikelihood, its context only, so the choices of one question share their draws of t:
common random numbers make their differences less noisy than their values; on the example cloze
task with the cpu preset at K = 8, the variance of a difference between two choices was a tenth
of what independent draws give). A request's number
therefore depends on the seed, its text, K, the time sampler and the batch size, never on the
other requests of the run. Generation seeds each batch from its contexts and settings.

Batching: ``batch_size`` is rows per model call, as ``train/eval.py --batch-size``; the K draws
of a request (or the blocks of a document, with their draws) share calls up to that many rows.
Requests are not mixed in one call, so that their numbers stay independent of each other; at
small K the calls are therefore smaller than ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # the optional extra
    raise ImportError(
        "sedd.harness needs EleutherAI's lm-evaluation-harness: pip install -e \".[eval]\" "
        "(or pip install \"lm-eval>=0.4\")"
    ) from err

from sedd.likelihood import TIME_SAMPLERS, block_bounds, make_blocks
from sedd.objectives import BlockDiffusion, Diffusion, objective_of
from sedd.sampling import SamplingOptionError, SamplingSpec

__all__ = ["HarnessError", "SEDDLM", "MODEL_ARGS", "check_model_args"]

# lm_eval configures its own logger tree, not the root one: log under it so the CLI shows us
logger = logging.getLogger("lm_eval.models.sedd")

DTYPES = {"auto": "auto", "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256

MODEL_ARGS = {
    "pretrained": "checkpoint directory (config.json + model.safetensors) or Hugging Face Hub id",
    "tokenizer": "tokenizer spec or directory (default: the checkpoint's tokenizer.json, else GPT-2)",
    "device": "auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...",
    "batch_size": f"rows per model call, or auto ({DEFAULT_BATCH_SIZE})",
    "mc_samples": "K, draws of t per request (>= 2; default 32; the paper's bound used 1000)",
    "time_sampler": f"how the K times are drawn: {', '.join(TIME_SAMPLERS)} (default stratified)",
    "seed": "seed of every request's draws (default 0)",
    "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16, float16",
    "estimates": "append every estimate and its standard error to this JSON-lines file",
    # how generate_until samples: every field of sedd.sampling.SamplingSpec (top_p and top_k apply
    # to do_sample=True; greedy generation is top_k = 1)
    **{name: f"generate_until: {SamplingSpec.help(name)}" for name in SamplingSpec.names()},
    # passed by lm_eval itself; accepted and not used
    "max_batch_size": "(lm_eval's auto batch search; not used)",
    "trust_remote_code": "(lm_eval's; not used)",
}
FROM_LM_EVAL = ("max_batch_size", "trust_remote_code")
SAMPLING = SamplingSpec.names()
# the objectives whose checkpoints the model answers for: its requests read the SEDD bound (of a
# block-diffusion model: the sum of its blocks' bounds), through the objective's sequence_bounds
# and masked_argmax
ANSWERS = (Diffusion, BlockDiffusion)


class HarnessError(ValueError):
    """Bad model_args, a checkpoint that cannot be loaded, or a request the model cannot answer:
    its message is one line for the user."""


def _positive_int(name: str, value: Any, minimum: int = 1, where: str = "model_args") -> int:
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HarnessError(f"{where} {name} must be an integer >= {minimum}, got {value!r}")
    return value


def sampling_spec(values: dict[str, Any], where: str, base: SamplingSpec | None = None) -> SamplingSpec:
    """The :class:`~sedd.sampling.SamplingSpec` of ``base`` with the options ``values`` (text as
    lm_eval passes it, or values), from ``where`` ("model_args", "gen_kwargs"): HarnessError for a
    bad one, naming it as ``where name``."""
    parsed = {k: SamplingSpec.parse(k, v) if isinstance(v, str) else v for k, v in values.items()}
    try:
        return SamplingSpec.build(base, **parsed)
    except SamplingOptionError as err:
        raise HarnessError(err.render(lambda name: f"{where} {name}")) from None


def check_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """The model_args of ``"sedd"`` checked and normalised, without loading anything.

    Returns a dict with every key of :data:`MODEL_ARGS` (defaults filled in), and ``spec``, the
    sampling options as one :class:`~sedd.sampling.SamplingSpec`. Raises :class:`HarnessError` for
    an unknown key or a bad value.
    """
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        known = ", ".join(k for k in MODEL_ARGS if k not in FROM_LM_EVAL)
        raise HarnessError(f"unknown model_args key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} for "
                           f"the sedd model; known: {known}")
    out = {
        "pretrained": None, "tokenizer": None, "device": "auto", "batch_size": "auto", "mc_samples": 32,
        "time_sampler": "stratified", "seed": 0, "dtype": "auto", "estimates": None,
    }
    out.update({k: v for k, v in args.items() if v is not None and k not in FROM_LM_EVAL and k not in SAMPLING})
    spec = sampling_spec({k: v for k, v in args.items() if k in SAMPLING}, "model_args")
    out.update(dataclasses.asdict(spec), spec=spec)
    if out["pretrained"] is None or (isinstance(out["pretrained"], str) and not out["pretrained"].strip()):
        raise HarnessError("model_args needs pretrained=DIR_OR_HUB_ID (a checkpoint directory or a Hub id)")
    if isinstance(out["pretrained"], os.PathLike):
        out["pretrained"] = os.fspath(out["pretrained"])
    batch = out["batch_size"]
    if isinstance(batch, str) and batch.strip().lower().startswith("auto"):  # lm_eval's "auto" / "auto:N"
        out["batch_size"] = DEFAULT_BATCH_SIZE
    else:
        out["batch_size"] = _positive_int("batch_size", batch)
    out["mc_samples"] = _positive_int("mc_samples", out["mc_samples"], 2)
    if out["time_sampler"] not in TIME_SAMPLERS:
        raise HarnessError(f"model_args time_sampler must be one of {', '.join(TIME_SAMPLERS)}, "
                           f"got {out['time_sampler']!r}")
    if out["time_sampler"] == "antithetic" and out["mc_samples"] % 2:
        raise HarnessError(f"antithetic draws pair t with 1 - t: mc_samples must be even, got {out['mc_samples']}")
    out["seed"] = _positive_int("seed", out["seed"], 0)
    dtype = str(out["dtype"]).removeprefix("torch.")
    if dtype not in DTYPES:
        raise HarnessError(f"model_args dtype must be one of {', '.join(DTYPES)}, got {out['dtype']!r}")
    out["dtype"] = dtype
    for key in ("tokenizer", "estimates", "device"):
        if out[key] is not None:
            out[key] = str(out[key])
    return out


def _request_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from the run's seed and a request's text (stable across processes and
    versions of Python, unlike ``hash``)."""
    digest = hashlib.sha256(json.dumps([seed, *parts], ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _where(req) -> dict[str, Any]:
    """Which task, document and request an estimate answers (lm_eval's Instance fields)."""
    return {"task": getattr(req, "task_name", None), "doc_id": getattr(req, "doc_id", None),
            "idx": getattr(req, "idx", None)}


def _model_device(model) -> torch.device:
    tensor = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    if tensor is None and isinstance(model, torch.nn.Module):
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@register_model("sedd")
class SEDDLM(LM):
    """A SEDD checkpoint as an ``lm_eval`` model (module docstring: what each request returns).

    Args:
        pretrained: a checkpoint directory or Hub id (loaded with :func:`sedd.load_pretrained`),
            or an already loaded :class:`sedd.Pretrained` (``model`` any ``model(x_t, sigma)``
            with a ``length``; ``tokenizer`` with ``encode``, ``decode``, ``eos_id``, ``name``),
            which stays on its device (``device`` and ``dtype`` apply to loading only).
        other keyword arguments: the model_args of :data:`MODEL_ARGS`.

    Attributes:
        estimates: one dict per loglikelihood / loglikelihood_rolling request answered, in order:
            ``task``, ``doc_id``, ``idx`` (which lm_eval request), ``request`` (its type), ``value``
            (what lm_eval received), ``stderr`` (its Monte Carlo standard error, nats), ``tokens``
            (tokens scored), ``mc_samples`` and ``is_greedy`` (None for rolling requests).
    Raises:
        HarnessError: bad arguments, or a checkpoint that cannot be loaded.
    """

    def __init__(self, pretrained=None, **kwargs: Any) -> None:
        super().__init__()
        from sedd.pretrained import Pretrained, load_pretrained, resolve_device

        loaded = pretrained if isinstance(pretrained, Pretrained) else None
        opts = check_model_args({**kwargs, "pretrained": "(given)" if loaded is not None else pretrained})
        self.options = opts
        try:
            device = resolve_device(opts["device"])
        except ValueError as err:
            raise HarnessError(f"model_args device: {err}") from None
        if loaded is None:
            extra = {} if opts["dtype"] == "auto" else {"autocast_dtype": DTYPES[opts["dtype"]]}
            try:
                loaded = load_pretrained(opts["pretrained"], tokenizer=opts["tokenizer"], device=device, **extra)
            except (OSError, ValueError) as err:  # FileNotFoundError, ConnectionError, a bad config
                message = " ".join(str(err).split())
                raise HarnessError(f"cannot load checkpoint {opts['pretrained']!r}: {message}") from None
            if device.type != "cuda" and opts["dtype"] in ("bfloat16", "float16"):
                logger.warning("dtype=%s applies to CUDA autocast; on %s the model computes in float32",
                               opts["dtype"], device.type)
        objective = objective_of(loaded.model, graph=loaded.graph, noise=loaded.noise)
        if type(objective) not in ANSWERS:
            what = "exact perplexity" if objective.exact else "likelihood"
            raise HarnessError(f"{opts['pretrained']!r} is {objective.a_label()} checkpoint (train/run.py --objective "
                               f"{objective.name}): the model 'sedd' scores SEDD checkpoints; train/eval.py gives its "
                               f"{what}")
        try:
            opts["spec"].validate(objective)
        except SamplingOptionError as err:
            raise HarnessError(err.render(lambda name: f"model_args {name}")) from None
        self.pre, self.objective = loaded, objective
        self.model, self.graph, self.noise, self.tok = loaded.model, loaded.graph, loaded.noise, loaded.tokenizer
        self._device = _model_device(self.model)
        self.window = int(getattr(self.model, "length", 0) or 0)
        if self.window < 2:
            raise HarnessError("the model has no training length of at least 2 tokens (its `length`)")
        self.batch_size = opts["batch_size"]
        self.spec = opts["spec"]
        self.K, self.time_sampler, self.seed = opts["mc_samples"], opts["time_sampler"], opts["seed"]
        self.estimates: list[dict[str, Any]] = []
        self._warned: set[str] = set()

    # -- what lm_eval reads --------------------------------------------------------------------

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        # lm_eval adds its --batch_size / --device here; the same keys in model_args win (lm_eval's
        # own default would pass both twice and fail with a TypeError)
        merged = {k: v for k, v in (additional_config or {}).items() if v is not None}
        merged.update(arg_dict)
        return cls(**merged)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self.window

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tok, "name", type(self.tok).__name__))

    # -- helpers -------------------------------------------------------------------------------

    def _generator(self, *parts: Any) -> torch.Generator:
        return torch.Generator(device=self._device).manual_seed(_request_seed(self.seed, *parts))

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), as lm_eval's causal models split them."""
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        if not stripped:
            return [self.tok.eos_id], self.tok.encode(continuation)
        whole = self.tok.encode(stripped + continuation)
        ctx = self.tok.encode(stripped)
        return ctx, whole[len(ctx):]

    def _pieces(self, ctx: list[int], cont: list[int]) -> list[tuple[list[int], int]]:
        """(tokens, number of leading context tokens) per model window of a conditional request."""
        W = self.window
        if len(cont) < W:
            keep = W - len(cont)
            tail = ctx[-keep:]
            return [(tail + cont, len(tail))]
        chunk, pieces = W // 2, []
        for start in range(0, len(cont), chunk):
            new = cont[start : start + chunk]
            before = (ctx + cont[:start])[-(W - len(new)) :]
            pieces.append((before + new, len(before)))
        return pieces

    def _greedy(self, tokens: torch.Tensor, n_fixed: int) -> bool:
        """The is_greedy rule (module docstring) for one window [1, L]."""
        best = self.objective.masked_argmax(self.model, tokens, n_fixed)
        return bool(torch.equal(best, tokens[0, n_fixed:]))

    def _record(self, kind: str, entries: list[dict[str, Any]]) -> None:
        self.estimates.extend(entries)
        if not entries:
            return
        errors = [e["stderr"] for e in entries]
        logger.info("sedd: %d %s estimate(s), K = %d %s draws each: standard error median %.4g nats, "
                    "largest %.4g", len(entries), kind, self.K, self.time_sampler, statistics.median(errors),
                    max(errors))
        path = self.options.get("estimates")
        if path:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                for e in entries:
                    f.write(json.dumps(e, ensure_ascii=False) + "\n")

    # -- the three request types ---------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """[(−bound on −log p(continuation | context), is_greedy)] per request (module docstring)."""
        if not requests:
            return []
        if not self.graph.absorbing:
            raise HarnessError(
                f"loglikelihood needs a model on the absorbing graph; this one uses the {self.graph.name} graph, on "
                "which holding the context fixed does not give the exact conditional (the model cannot tell a "
                "clean context token from a noisy one). loglikelihood_rolling and generate_until work on it")
        results, entries = [], []
        for req in tqdm(requests, desc="sedd loglikelihood", unit="req", disable=disable_tqdm):
            context, continuation = req.args
            ctx, cont = self._pair_ids(context, continuation)
            if not cont:
                results.append((0.0, True))
                entries.append({**_where(req), "request": "loglikelihood", "value": 0.0, "stderr": 0.0,
                                "tokens": 0, "mc_samples": self.K, "is_greedy": True})
                continue
            generator = self._generator("loglikelihood", context)
            total = variance = 0.0
            greedy = True
            for ids, n_fixed in self._pieces(ctx, cont):
                x0 = torch.tensor([ids], dtype=torch.long, device=self._device)
                maskable = torch.zeros_like(x0, dtype=torch.bool)
                maskable[:, n_fixed:] = True
                out = self.objective.sequence_bounds(
                    self.model, x0, num_samples=self.K, time_sampler=self.time_sampler,
                    batch_size=self.batch_size, generator=generator, maskable=maskable,
                )
                total += float(out["integral"][0] + out["prior"][0])
                variance += float(out["variance"][0])
                greedy = self._greedy(x0, n_fixed) and greedy
            results.append((-total, greedy))
            entries.append({**_where(req), "request": "loglikelihood", "value": -total,
                            "stderr": math.sqrt(max(variance, 0.0)), "tokens": len(cont), "mc_samples": self.K,
                            "is_greedy": greedy})
        self._record("loglikelihood", entries)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """[−bound on −log p(text + EOS)] per request, over blocks as train/eval.py cuts them."""
        if not requests:
            return []
        eos = self.tok.eos_id
        docs = []
        for req in requests:
            (text,) = req.args[:1]
            blocks, mask = make_blocks(self.tok.encode(text) + [eos], self.window, "pad", None, eos)
            docs.append((text, blocks, mask))
        bar = tqdm(total=sum(len(b) for _, b, _ in docs) * self.K, desc="sedd loglikelihood_rolling",
                   unit="draw", disable=disable_tqdm)
        results, entries = [], []
        for req, (text, blocks, mask) in zip(requests, docs):
            parts = block_bounds(
                self.model, blocks, mask, self.graph, self.noise, num_samples=self.K,
                time_sampler=self.time_sampler, batch_size=self.batch_size,
                generator=self._generator("loglikelihood_rolling", text), device=self._device, on_draws=bar.update,
                estimator=self.objective.bound_estimator,
            )
            total = sum(float((p["integral"] + p["prior"]).sum()) for p in parts)
            variance = sum(float(p["variance"].sum()) for p in parts)
            results.append(-total)
            entries.append({**_where(req), "request": "loglikelihood_rolling", "value": -total,
                            "stderr": math.sqrt(max(variance, 0.0)), "tokens": int(mask.sum()),
                            "mc_samples": self.K, "is_greedy": None})
        bar.close()
        self._record("loglikelihood_rolling", entries)
        return results

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else [s for s in (until or []) if s]
        max_gen = kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
        do_sample, temperature = kwargs.pop("do_sample", None), kwargs.pop("temperature", None)
        where = "gen_kwargs"
        spec = sampling_spec({k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING}, where, self.spec)
        temperature = None if temperature is None else float(temperature)
        greedy = do_sample is False or (do_sample is None and not (temperature or 0) > 0)
        if greedy:
            spec = dataclasses.replace(spec, top_p=None, top_k=1)
        elif temperature not in (None, 0.0, 1.0):
            self._warn_once("temperature", "sedd: the SEDD samplers have no temperature; temperature=%s is "
                            "ignored (use top_p / top_k)", temperature)
        for key in kwargs:
            self._warn_once(f"gen:{key}", "sedd: generation argument %r is not used by the SEDD samplers", key)
        return {"until": tuple(until), "max_gen_toks": _positive_int("max_gen_toks", max_gen, 1, where),
                "spec": spec}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The generated text (no context) per request, cut at EOS and the ``until`` strings."""
        from sedd.generation import generate_samples

        if not requests:
            return []
        rows = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {})
            settings = self._generation_settings(gen_kwargs)
            prompt = context.rstrip(" ")  # generate_samples leaves a trailing space to the next token
            n_ctx = len(self.tok.encode(prompt)) if prompt else 0
            rows.append((i, prompt, n_ctx, settings))
        # one call per run of rows with the same context length and settings: a batch shares its length
        groups: dict[tuple, list] = {}
        for row in rows:
            key = (row[2], row[3]["until"], row[3]["max_gen_toks"], row[3]["spec"])
            groups.setdefault(key, []).append(row)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="sedd generate_until", unit="req", disable=disable_tqdm)
        for (n_ctx, *_), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                s = batch[0][3]
                prompts = [row[1] or None for row in batch]
                settings = sorted({**dataclasses.asdict(s["spec"]), "until": s["until"],
                                   "max_gen_toks": s["max_gen_toks"]}.items())
                generator = self._generator("generate_until", [row[1] for row in batch], settings)
                spec = s["spec"] if s["spec"].window is not None else dataclasses.replace(s["spec"], window=self.window)
                if spec.applies("stop_at_eos", self.objective):  # the text is cut at EOS: generate no further
                    spec = dataclasses.replace(spec, stop_at_eos=True)
                samples = generate_samples(self.pre, prompts, length=n_ctx + s["max_gen_toks"], spec=spec,
                                           generator=generator)
                for row, sample in zip(batch, samples):
                    start_gen = sample.fixed[0].end if sample.fixed else 0
                    ids = sample.tokens[start_gen : start_gen + s["max_gen_toks"]]
                    if self.tok.eos_id in ids:
                        ids = ids[: ids.index(self.tok.eos_id)]
                    text = self.tok.decode(ids)
                    for stop in s["until"]:
                        text = text.split(stop, 1)[0]
                    out[row[0]] = text
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]
