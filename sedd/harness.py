"""sedd-triton checkpoints in EleutherAI's lm-evaluation-harness: the model type ``"sedd"``.

Importing this module registers the model with ``lm_eval`` (the ``eval`` extra:
``pip install -e ".[eval]"``)::

    python train/harness.py --model sedd --model_args pretrained=out/cpu,mc_samples=32 \\
        --include_path train/harness_tasks --tasks sedd_python_cloze

    import lm_eval, sedd.harness                      # from Python
    lm_eval.simple_evaluate(model="sedd", model_args={"pretrained": "out/cpu"}, tasks=[...])

One model name for every objective (:mod:`sedd.objectives` answers for each): a diffusion
checkpoint's numbers are Monte Carlo estimates of the SEDD bound from K draws of t per request
(``mc_samples``), with standard errors from the spread of the draws; an autoregressive
checkpoint's are exact (``mc_samples`` and ``time_sampler`` are refused for it). The standard
errors are logged, kept in :attr:`SEDDLM.estimates` and, with ``estimates=PATH``, appended to a
JSON-lines file (lm_eval's sample files hold only what its metrics read), with a record of every
generation (its sampler, windows and network evaluations).

What each request type returns, how generation lays its windows, picks its sampler (the cost
scales with the tokens generated) and treats the context's trailing spaces, and what seeds a
request: docs/math.md, "Likelihood bound" (in lm-evaluation-harness). In short, every request
draws from its own generator, seeded from ``seed`` and the request (for loglikelihood its context
only, so the choices of one question share their draws of t: on the example cloze task with the
cpu preset at K = 8 the variance of a difference between two choices was a tenth of what
independent draws give), so its number or text depends on the seed, the request, the model_args
and the machine, never on the other requests of the run or on how they are batched.

Batching: ``batch_size`` is rows per model call, as ``train/eval.py --batch-size``; the K draws
of a request (or the blocks of a document, with their draws) share calls up to that many rows.
Requests are not mixed in one call, so at small K the calls are smaller than ``batch_size``, and
generation samples one request per call.
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

from sedd.generation import continuation_layout, sample_blockwise
from sedd.likelihood import TIME_SAMPLERS, make_blocks
from sedd.objectives import objective_of
from sedd.sampling import SamplingOptionError, SamplingSpec, conditioning
from sedd.sampling.spans import spaces_join_next_word
from sedd.sampling.spec import FAMILIES

__all__ = ["HarnessError", "SEDDLM", "MODEL_ARGS", "check_model_args", "check_for_objective"]

# lm_eval configures its own logger tree, not the root one: log under it so the CLI shows us
logger = logging.getLogger("lm_eval.models.sedd")

DTYPES = {"auto": "auto", "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_MC_SAMPLES = 32

MODEL_ARGS = {
    "pretrained": "checkpoint directory (config.json + model.safetensors) or Hugging Face Hub id",
    "tokenizer": "tokenizer spec or directory (default: the checkpoint's tokenizer.json, else GPT-2)",
    "device": "auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...",
    "batch_size": f"rows per model call, or auto ({DEFAULT_BATCH_SIZE})",
    "mc_samples": f"K, draws of t per request (>= 2; default {DEFAULT_MC_SAMPLES}; the paper's bound used 1000; "
                  "diffusion checkpoints only)",
    "time_sampler": f"how the K times are drawn: {', '.join(TIME_SAMPLERS)} (default stratified; diffusion "
                    "checkpoints only)",
    "seed": "seed of every request's draws (default 0)",
    "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16, float16",
    "estimates": "append every estimate (its standard error) and every generation (its sampler, NFE) to this "
                 "JSON-lines file",
    # how generate_until samples: every field of sedd.sampling.SamplingSpec (top_p and top_k apply
    # to do_sample=True; greedy generation is top_k = 1, temperature 0 for an autoregressive model)
    **{name: f"generate_until: {SamplingSpec.help(name)}" for name in SamplingSpec.names()},
    # passed by lm_eval itself; accepted and not used
    "max_batch_size": "(lm_eval's auto batch search; not used)",
    "trust_remote_code": "(lm_eval's; not used)",
}
FROM_LM_EVAL = ("max_batch_size", "trust_remote_code")
SAMPLING = SamplingSpec.names()
# model_args that only a likelihood estimated from draws of t reads
DRAWS = ("mc_samples", "time_sampler")


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

    Returns a dict with every key of :data:`MODEL_ARGS` (defaults filled in), ``spec``, the
    sampling options as one :class:`~sedd.sampling.SamplingSpec`, and ``given``, the keys given.
    Raises :class:`HarnessError` for an unknown key or a bad value. What depends on the
    checkpoint is :func:`check_for_objective`'s.
    """
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        known = ", ".join(k for k in MODEL_ARGS if k not in FROM_LM_EVAL)
        raise HarnessError(f"unknown model_args key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} for "
                           f"the sedd model; known: {known}")
    out = {
        "pretrained": None, "tokenizer": None, "device": "auto", "batch_size": "auto",
        "mc_samples": DEFAULT_MC_SAMPLES, "time_sampler": "stratified", "seed": 0, "dtype": "auto", "estimates": None,
    }
    out.update({k: v for k, v in args.items() if v is not None and k not in FROM_LM_EVAL and k not in SAMPLING})
    spec = sampling_spec({k: v for k, v in args.items() if k in SAMPLING}, "model_args")
    out.update(dataclasses.asdict(spec), spec=spec,
               given=frozenset(k for k, v in args.items() if v is not None and k not in FROM_LM_EVAL))
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


def check_for_objective(opts: dict[str, Any], objective) -> None:
    """The refusals that depend on what the checkpoint was trained for (its objective, from its
    config: :func:`sedd.objectives.objective_of`), for model_args checked by
    :func:`check_model_args`: draws of t for an exact likelihood, sampler options its sampler does
    not read. :class:`HarnessError`; train/harness.py runs it before lm_eval indexes its tasks."""
    drawn = [k for k in DRAWS if k in opts["given"]]
    if objective.exact and drawn:
        raise HarnessError(
            f"model_args {' and '.join(drawn)} {'does' if len(drawn) == 1 else 'do'} not apply to "
            f"{objective.a_label()} checkpoint: its likelihood is exact (one forward per window, no draws of t); "
            f"drop {'it' if len(drawn) == 1 else 'them'}")
    try:
        opts["spec"].validate(objective)
    except SamplingOptionError as err:
        raise HarnessError(err.render(lambda name: f"model_args {name}")) from None


def _request_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from the run's seed and a request (stable across processes and versions of
    Python, unlike ``hash``; a predictor given as an object counts by its name)."""
    text = json.dumps([seed, *parts], ensure_ascii=False,
                      default=lambda o: getattr(o, "name", None) or type(o).__name__)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


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
    """A checkpoint of any objective as an ``lm_eval`` model (module docstring: what each
    request returns).

    Args:
        pretrained: a checkpoint directory or Hub id (loaded with :func:`sedd.load_pretrained`),
            or an already loaded :class:`sedd.Pretrained` (``model`` a SEDD or ARModel, or any
            ``model(x_t, sigma)`` with a ``length``; ``tokenizer`` with ``encode``, ``decode``,
            ``eos_id``, ``name``), which stays on its device (``device`` and ``dtype`` apply to
            loading only).
        other keyword arguments: the model_args of :data:`MODEL_ARGS`.

    Attributes:
        estimates: one dict per request answered, in order: ``task``, ``doc_id``, ``idx`` (which
            lm_eval request), ``request`` (its type); for the likelihoods ``value`` (what lm_eval
            received), ``stderr`` (its Monte Carlo standard error, nats; 0 when exact),
            ``tokens`` (tokens scored), ``mc_samples`` (None when exact) and ``is_greedy`` (None
            for rolling requests); for generations ``tokens`` (generated), ``context_tokens``
            (kept in the window) and ``context_cut`` (cut from its left), ``windows``, ``nfe``
            (network evaluations) and ``sampler`` (:meth:`~sedd.sampling.SamplingSpec.record`:
            what ran).
        objective: the checkpoint's :class:`~sedd.objectives.Objective`.
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
        self.objective = objective_of(loaded.model, graph=loaded.graph, noise=loaded.noise)
        check_for_objective(opts, self.objective)
        self.pre = loaded
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

    def _record(self, kind: str, entries: list[dict[str, Any]]) -> None:
        self.estimates.extend(entries)
        if not entries:
            return
        if kind == "generate_until":
            samplers = sorted({e["sampler"]["sampler"] for e in entries})
            logger.info("sedd: %d generation(s) by the %s sampler: %d generated tokens, %d network evaluations",
                        len(entries), ", ".join(samplers), sum(e["tokens"] for e in entries),
                        sum(e["nfe"] for e in entries))
        elif self.objective.exact:
            logger.info("sedd: %d %s value(s), exact (%s)", len(entries), kind, self.objective.label)
        else:
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

    @property
    def _draws(self) -> int | None:
        """K as recorded: None for an exact likelihood."""
        return None if self.objective.exact else self.K

    # -- the three request types ---------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """[(−bound on −log p(continuation | context), is_greedy)] per request (module docstring)."""
        if not requests:
            return []
        refusal = self.objective.continuation_refusal()
        if refusal is not None:
            raise HarnessError(f"loglikelihood {refusal}. loglikelihood_rolling and generate_until work on it")
        results, entries = [], []
        for req in tqdm(requests, desc="sedd loglikelihood", unit="req", disable=disable_tqdm):
            context, continuation = req.args
            ctx, cont = self._pair_ids(context, continuation)
            if not cont:
                results.append((0.0, True))
                entries.append({**_where(req), "request": "loglikelihood", "value": 0.0, "stderr": 0.0,
                                "tokens": 0, "mc_samples": self._draws, "is_greedy": True})
                continue
            generator = self._generator("loglikelihood", context)
            total = variance = 0.0
            greedy = True
            for ids, n_fixed in self._pieces(ctx, cont):
                x0 = torch.tensor([ids], dtype=torch.long, device=self._device)
                score = self.objective.continuation(self.model, x0, n_fixed, num_samples=self.K,
                                                    time_sampler=self.time_sampler, batch_size=self.batch_size,
                                                    generator=generator)
                total += score.nll
                variance += score.variance
                greedy = score.greedy and greedy
            results.append((-total, greedy))
            entries.append({**_where(req), "request": "loglikelihood", "value": -total,
                            "stderr": math.sqrt(max(variance, 0.0)), "tokens": len(cont),
                            "mc_samples": self._draws, "is_greedy": greedy})
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
        work = sum(self.objective.likelihood_work(len(b), self.K)[0] for _, b, _ in docs)
        unit = self.objective.likelihood_work(1, self.K)[1]
        bar = tqdm(total=work, desc="sedd loglikelihood_rolling", unit=unit, disable=disable_tqdm)
        results, entries = [], []
        for req, (text, blocks, mask) in zip(requests, docs):
            report = self.objective.likelihood(
                self.model, blocks, mask, num_samples=self.K, time_sampler=self.time_sampler,
                batch_size=self.batch_size, generator=self._generator("loglikelihood_rolling", text),
                device=self._device, on_progress=bar.update,
            )
            total = report.nats_per_token * report.tokens  # as train/eval.py's report gives it
            results.append(-total)
            entries.append({**_where(req), "request": "loglikelihood_rolling", "value": -total,
                            "stderr": report.stderr_nats_per_token * report.tokens, "tokens": report.tokens,
                            "mc_samples": self._draws, "is_greedy": None})
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
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING}
        spec = sampling_spec(options, where, self.spec)
        temperature = None if temperature is None else float(temperature)
        greedy = do_sample is False or (do_sample is None and not (temperature or 0) > 0)
        tempered = spec.applies("temperature", self.objective)  # an autoregressive model reads it
        if greedy:
            spec = dataclasses.replace(spec, top_p=None, top_k=None, temperature=0.0) if tempered else \
                dataclasses.replace(spec, top_p=None, top_k=1)
        elif tempered and temperature is not None:
            spec = sampling_spec({"temperature": temperature}, where, spec)
        elif temperature not in (None, 0.0, 1.0):
            self._warn_once("temperature", "sedd: the SEDD samplers have no temperature; temperature=%s is "
                            "ignored (use top_p / top_k)", temperature)
        for key in kwargs:
            self._warn_once(f"gen:{key}", "sedd: generation argument %r is not used by the %s sampler", key,
                            self.objective.label)
        try:
            spec.validate(self.objective)
        except SamplingOptionError as err:
            raise HarnessError(err.render(lambda name: f"{where} {name}")) from None
        return {"until": tuple(until), "max_gen_toks": _positive_int("max_gen_toks", max_gen, 1, where),
                "spec": spec, "given": self.options["given"] | set(options), "greedy": greedy}

    def _generation_spec(self, spec: SamplingSpec, given, new_per_window: int) -> SamplingSpec:
        """The spec that runs: first hitting where the user chose no predictor and it can run, else
        the steps the user chose or as many as the window's new tokens (module docstring)."""
        if spec.applies("stop_at_eos", self.objective):  # the text is cut at EOS: generate nothing after it
            spec = dataclasses.replace(spec, stop_at_eos=True)
        if "predictor" not in given:
            try:
                return dataclasses.replace(spec, predictor="first_hitting").validate(self.objective)
            except SamplingOptionError:  # another graph or family, or an option first hitting does not read
                pass
        if spec.steps is None and spec.applies("steps", self.objective):  # a block model's: per block
            spec = dataclasses.replace(spec, steps=self.objective.default_steps(new_per_window))
        return spec

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The generated text (no context) per request, cut at EOS and the ``until`` strings."""
        repeats: dict[int, int] = {}  # lm_eval passes a request with repeats that many times, the same object
        out, entries = [], []
        for req in tqdm(requests, desc="sedd generate_until", unit="req", disable=disable_tqdm):
            repeats[id(req)] = repeats.get(id(req), -1) + 1
            text, record = self._continue(req.args[0], req.args[1] if len(req.args) > 1 else {}, repeats[id(req)])
            out.append(text)
            entries.append({**_where(req), "request": "generate_until", **record})
        self._record("generate_until", entries)
        return out

    def _continue(self, context: str, gen_kwargs: dict[str, Any], repeat: int) -> tuple[str, dict[str, Any]]:
        s = self._generation_settings(gen_kwargs)
        # the rule of generate_samples (sedd.sampling.spans): a BPE's space belongs to the next word
        kept = context.rstrip(" ") if spaces_join_next_word(self.tok) else context
        ctx = self.tok.encode(kept) if kept else []
        new, window = s["max_gen_toks"], s["spec"].window or self.window
        stride = s["spec"].stride or window // 2
        if new >= window and stride >= window:
            raise HarnessError(f"gen_kwargs stride must be smaller than the window ({window}), got {stride}")
        keep, windows, stride = continuation_layout(len(ctx), new, window, stride,
                                                    windows=FAMILIES[self.objective.sampler].windows)
        spec = self._generation_spec(s["spec"], s["given"], new if stride is None else stride)
        fixed, mask = conditioning(keep + new, {0: ctx[len(ctx) - keep :]}, device=self._device)
        # seeded by the request, not by how it is sampled: the exact cache, say, draws the same tokens
        generator = self._generator("generate_until", context, s["until"], new, s["greedy"], repeat)
        x, stats = sample_blockwise(self.model, self.graph, self.noise, batch_size=1, length=keep + new, spec=spec,
                                    fixed_tokens=fixed, fixed_mask=mask, generator=generator, device=self._device,
                                    return_stats=True, eos_id=self.tok.eos_id)
        ids = x[0, keep:].tolist()
        text = self.tok.decode(ids[: ids.index(self.tok.eos_id)] if self.tok.eos_id in ids else ids)
        spaces = context[len(kept):]
        if spaces and text.startswith(spaces):  # the context's own space, not something generated after it
            text = text[len(spaces):]
        for stop in s["until"]:
            text = text.split(stop, 1)[0]
        return text, {"tokens": new, "context_tokens": keep, "context_cut": len(ctx) - keep, "windows": windows,
                      "nfe": int(stats.nfe[0]), "repeat": repeat,
                      "sampler": spec.record(self.objective, steps=spec.steps, window=window, stride=stride)}
