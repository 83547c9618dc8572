"""One sampling spec for every surface, the objective registry, and the library's metrics.

SamplingSpec checks each value once, refuses an option the chosen predictor or the model's sampler
does not read (the Python API as the command lines: the autoregressive refusals the API used to
skip), and records what ran. The objectives are looked up by name, an unknown one refused."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sedd import generate, generate_samples
from sedd.data import get_tokenizer
from sedd.generation import sample_blockwise
from sedd.graph import Absorbing, Uniform
from sedd.metrics import generation_metrics, judge_source, judge_windows, perplexity_summary
from sedd.model import SEDD, ARModel
from sedd.model.checkpoint import config_objective
from sedd.noise import Geometric, LogLinear
from sedd.objectives import OBJECTIVES, get_objective, objective_of
from sedd.sampling import SamplingOptionError, SamplingSpec, sample, sample_ancestral
from tests.helpers import FactorizedScore, small_model_config

TOK = get_tokenizer("bytes")
PI = torch.tensor([0.05, 0.3, 0.1, 0.35, 0.2])


def _ar():
    torch.manual_seed(0)
    return ARModel(ARModel.config_for("cpu", tokens=TOK.vocab_size, n_blocks=1, hidden_size=32, cond_dim=16,
                                      n_heads=2, length=16)).eval()


def _sedd(graph="absorb"):
    torch.manual_seed(0)
    return SEDD(small_model_config(TOK.vocab_size, graph=graph, hidden_size=32, cond_dim=16, n_heads=2,
                                   n_blocks=1, length=16)).eval()


# -- values and predictors ------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"steps": 2.5}, "steps must be a positive integer, got 2.5"),
    ({"eps": 1.0}, r"eps must be a number in \(0, 1\), got 1.0"),
    ({"top_p": 0}, r"top_p must be a number in \(0, 1\], got 0"),
    ({"top_k": True}, "top_k must be a positive integer, got True"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"cache": "yes"}, "cache must be False, True or 'approximate', got 'yes'"),
    ({"kv_cache": 1}, "kv_cache must be True or False, got 1"),
    ({"window": 0}, "window must be a positive integer, got 0"),
    ({"predictor": "leapfrog"}, "predictor must be one of"),
    ({"predictor": "denoise"}, "final denoising step"),
    ({"denoiser": "analytic"}, "a per-step predictor"),
    ({"tokens_per_step": 2}, "predictor analytic takes no tokens_per_step: it applies to the first_hitting"),
    ({"predictor": "first_hitting", "steps": 8}, "steps does not apply to first_hitting"),
    ({"predictor": "first_hitting", "denoise": False}, "denoise does not apply to first_hitting"),
    # issue 32 item 8: the cache was accepted and silently did nothing under first hitting
    ({"predictor": "first_hitting", "cache": True}, "cache does not apply to first_hitting"),
    ({"predictor": "first_hitting", "cache": "approximate"}, "cache does not apply to first_hitting"),
])
def test_bad_values_and_predictor_options_are_refused_when_the_spec_is_made(options, message):
    with pytest.raises(SamplingOptionError, match=message) as info:
        SamplingSpec(**options)
    assert isinstance(info.value, ValueError) and set(info.value.fields) <= set(SamplingSpec.names())


def test_errors_name_each_option_as_the_caller_does():
    with pytest.raises(SamplingOptionError) as info:
        SamplingSpec(predictor="first_hitting", steps=8)
    flags = {"steps": "--steps", "tokens_per_step": "--tokens-per-step"}
    assert info.value.render(flags.get) == ("--steps does not apply to first_hitting: it unmasks --tokens-per-step "
                                            "tokens per network evaluation (default 1), which sets its cost; drop "
                                            "--steps")
    assert info.value.fields == ("steps",)


def test_unknown_options_and_variants():
    with pytest.raises(TypeError, match="unknown sampling option 'step'; the options are the fields of"):
        SamplingSpec.build(step=3)
    base = SamplingSpec(steps=16, top_p=0.9)
    assert SamplingSpec.build(base) is base and SamplingSpec.build(base, steps=8) == dataclasses.replace(base, steps=8)
    with pytest.raises(SamplingOptionError, match="takes no tokens_per_step"):
        SamplingSpec.build(base, tokens_per_step=2)
    assert SamplingSpec.parse("steps", "8") == 8 and SamplingSpec.parse("top_p", "0.5") == 0.5
    assert SamplingSpec.parse("cache", "true") is True and SamplingSpec.parse("top_k", "none") is None


# -- what applies to a model ---------------------------------------------------------------------------


def test_validate_refuses_what_the_models_sampler_does_not_read():
    ar, sedd = objective_of(_ar()), objective_of(_sedd())
    with pytest.raises(SamplingOptionError, match=r"^predictor, steps, eps apply to diffusion models; this one is "
                                                  r"autoregressive .*: drop them$"):
        SamplingSpec(predictor="euler", steps=4, eps=1e-3).validate(ar)
    with pytest.raises(SamplingOptionError, match="^temperature applies to autoregressive models; the diffusion"):
        SamplingSpec(temperature=0.5).validate(sedd)
    SamplingSpec(temperature=0.5, kv_cache=False, top_p=0.9).validate(ar)
    SamplingSpec(steps=4, top_k=3, predictor="euler").validate(sedd)
    uniform = objective_of(_sedd("uniform"))
    with pytest.raises(SamplingOptionError, match="first_hitting samples the absorbing graph only; this model uses "
                                                  "the uniform graph"):
        SamplingSpec(predictor="first_hitting").validate(uniform)
    with pytest.raises(SamplingOptionError, match="time_conditioning: false"):
        SamplingSpec(cache=True).validate(sedd)  # a sigma-conditioned model: only the approximate cache


def test_record_says_what_ran():
    sedd, ar = objective_of(_sedd()), objective_of(_ar())
    hit = SamplingSpec(predictor="first_hitting").record(sedd, steps=16, window=16)
    # issue 32 item 9: first hitting used no step count, and its default k is what ran
    assert hit["sampler"] == "first_hitting" and hit["steps"] is None and hit["tokens_per_step"] == 1
    assert hit["cache"] is None and hit["denoise"] is None and hit["temperature"] is None and hit["window"] == 16
    plain = SamplingSpec(cache="approximate").record(sedd, steps=16)
    assert plain["steps"] == 16 and plain["cache"] == "approximate" and plain["tokens_per_step"] is None
    assert SamplingSpec(steps=40).record(sedd, steps=16)["steps"] == 40  # given: what ran, not the default
    auto = SamplingSpec(temperature=0.0).record(ar, steps=16)
    assert auto["sampler"] == "ancestral" and auto["steps"] is None and auto["predictor"] is None
    assert auto["temperature"] == 0.0 and auto["kv_cache"] is True
    assert set(hit) == {"sampler", *SamplingSpec.names()}
    assert SamplingSpec(steps=8).describe(sedd) == "analytic sampler, 8 steps"
    assert SamplingSpec().describe(ar) == "ancestral sampler, one network evaluation per token"


# -- the Python API refuses what the command lines refuse (issue 32 item 11) -----------------------------------


@pytest.mark.parametrize("options", [{"predictor": "euler"}, {"steps": 8}, {"eps": 1e-3}, {"cache": True},
                                     {"predictor": "first_hitting", "tokens_per_step": 2}])
def test_an_autoregressive_model_refuses_the_diffusion_options_in_the_api(options):
    model = _ar()
    with pytest.raises(ValueError, match="(apply|applies) to diffusion models; this one is autoregressive"):
        generate(model, "ab", tokenizer=TOK, length=8, **options)
    with pytest.raises(ValueError, match="to diffusion models"):
        sample_blockwise(model, None, None, batch_size=1, length=8, **options)
    with pytest.raises(ValueError, match="to diffusion models"):
        sample_ancestral(model, batch_size=1, length=8, **options)
    # the same options in a spec, and the defaults they differ from, are fine
    (out,) = generate_samples(model, "ab", tokenizer=TOK, length=8, seed=0, spec=SamplingSpec(temperature=0.7))
    assert out.text.startswith("ab") and out.nfe == 6


def test_a_diffusion_model_refuses_the_autoregressive_options_and_the_uniform_graph_first_hitting():
    graph, noise = Absorbing(5), LogLinear()
    with pytest.raises(ValueError, match="kv_cache applies to autoregressive and block-diffusion models"):
        sample(FactorizedScore(PI, graph), graph, noise, batch_size=1, length=4, kv_cache=False)
    uniform = Uniform(5)
    calls = []
    model = FactorizedScore(PI, uniform)
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="absorbing graph only"):
        sample(model, uniform, Geometric(), batch_size=1, length=4, predictor="first_hitting")
    assert not calls  # refused before the first network call
    with pytest.raises(ValueError, match="window 8 is shorter than the 12 tokens this sampler draws at once"):
        sample(FactorizedScore(PI, graph), graph, noise, batch_size=1, length=12, window=8)


# -- the objective registry ----------------------------------------------------------------------------


def test_objectives_are_looked_up_and_an_unknown_one_is_refused(monkeypatch):
    import sedd.model.checkpoint as checkpoint

    assert {"sedd", "ar"} <= set(OBJECTIVES) and get_objective("ar").model_class is ARModel
    with pytest.raises(ValueError, match=r"objective must be one of \('sedd', 'ar'.*\), got 'mdlm'"):
        get_objective("mdlm")
    config = {**_sedd().config, "objective": "mdlm"}
    with pytest.raises(ValueError, match="config objective must be one of"):
        config_objective(config)  # no model class loads it
    # a model class for it but no registered objective: an error, not the diffusion branch
    monkeypatch.setitem(checkpoint.MODEL_CLASSES, "mdlm", SEDD)
    with pytest.raises(ValueError, match="objective must be one of"):
        objective_of(config)
    assert type(objective_of(_ar())).__name__ == "Autoregressive" and objective_of(_ar()).exact
    bound = objective_of(_sedd())
    assert bound.graph == Absorbing(TOK.vocab_size) and bound.time_conditioning is True and not bound.exact


def test_the_training_flags_an_objective_refuses_come_from_the_registry(monkeypatch):
    from train.config import UsageError, resolve_config

    monkeypatch.setattr(get_objective("ar"), "refused_flags", ("graph", "lr"))
    with pytest.raises(UsageError, match=r"--objective ar: --lr applies to the diffusion and block-diffusion objectives only \(an "):
        resolve_config({"objective": "ar", "lr": 0.1}, "cpu", None, 1)


# -- metrics in the library -----------------------------------------------------------------------------


class _Uniform:
    """A judge that gives every scored token probability 1/e (1 nat), and scores ``per_text`` tokens."""

    def __init__(self, per_text):
        self.per_text = per_text

    def score(self, texts, batch_size=8, progress=False):
        count = np.array([self.per_text] * len(texts))
        return count.astype(np.float64), count


def test_metrics_and_their_value_errors():
    out = perplexity_summary(np.array([3.0, 5.0]), np.array([3, 5]))
    assert out["gen_ppl"] == pytest.approx(math.e) and out["nll_se"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="the judge scored no token at all"):
        perplexity_summary(np.zeros(2), np.zeros(2, dtype=np.int64))
    tokens = torch.tensor([[1, 1, 1, 2], [1, 2, 3, 4]])
    got = generation_metrics(tokens, ["a", "b"], _Uniform(4), degenerate_share=0.75)
    assert got["gen_ppl"] == pytest.approx(math.e) and got["degenerate"] == 0.5
    assert got["entropy"] == pytest.approx((-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + math.log(4)) / 2)
    with pytest.raises(ValueError, match="the judge scored no token at all"):
        generation_metrics(tokens, ["", ""], _Uniform(0))
    with pytest.raises(ValueError, match=r"degenerate_share must be in \(0, 1\]"):
        generation_metrics(tokens, ["a", "b"], _Uniform(4), degenerate_share=0)
    with pytest.raises(ValueError, match="the judge context must be >= 2 tokens"):
        judge_windows([1, 2, 3], 1)
    with pytest.raises(ValueError, match=r"^--judge '\./nowhere': no such directory"):
        judge_source("./nowhere", name={"judge": "--judge"}.get)
    with pytest.raises(ValueError, match=r"^judge '\./nowhere': no such directory"):
        judge_source("./nowhere")
