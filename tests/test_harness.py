"""The lm-evaluation-harness model "sedd" (sedd/harness.py) and its entry point (train/harness.py).

Checkpoints are made here: a tiny untrained DDiT over the 257-id byte tokenizer (32 positions,
so every text spans several windows), and, for the conditional likelihood, the exact concrete
score of a known distribution over three positions of three tokens (tests/helpers.py), for which
log p(continuation | context) is computed by enumeration.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from sedd.data import get_tokenizer
from sedd.graph import Absorbing, graph_from_config
from sedd.harness import SEDDLM, HarnessError, _request_seed, check_model_args
from sedd.likelihood import prior_kl
from sedd.model import SEDD
from sedd.noise import LogLinear, noise_from_config
from sedd.pretrained import Pretrained
from tests.helpers import ExactSequenceScore, small_model_config
from train import eval as eval_cli
from train import harness as harness_cli

ROOT = Path(__file__).resolve().parents[1]
A, DOT = ord("a") + 1, ord(".") + 1  # byte-tokenizer ids (byte b is id b + 1)


@pytest.fixture(autouse=True)
def _one_thread(one_thread, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEDD_CACHE", str(tmp_path_factory.getbasetemp() / "sedd_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny(graph: str = "absorb", seed: int = 0) -> SEDD:
    torch.manual_seed(seed)
    model = SEDD(small_model_config(257, graph, length=32, n_blocks=1))
    # the output layer is zero-initialised (every score equal); give it some structure
    torch.nn.init.normal_(model.output_layer.linear.weight, std=0.3)
    torch.nn.init.normal_(model.output_layer.linear.bias, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_sedd")
    _tiny().save_pretrained(folder)
    get_tokenizer("bytes").save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def lm(ckpt) -> SEDDLM:
    return SEDDLM(pretrained=str(ckpt), device="cpu", mc_samples=16, batch_size=8)


def _req(kind: str, *args, idx: int = 0) -> Instance:
    return Instance(kind, {}, tuple(args), idx)


# ----------------------------------------------------------------------------------------------
# loglikelihood_rolling = train/eval.py's bound
# ----------------------------------------------------------------------------------------------

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age"


def test_rolling_is_eval_py_bound(lm, ckpt, tmp_path, capsys):
    data = tmp_path / "one_document.txt"
    data.write_text(TEXT)
    rolling_seed = _request_seed(0, "loglikelihood_rolling", TEXT)

    def eval_py(seed: int) -> dict:
        assert eval_cli.main([str(ckpt), "--data", str(data), "--doc-split", "file", "--detokenizer", "none",
                              "-K", "16", "--batch-size", "8", "--seed", str(seed), "--device", "cpu",
                              "--json", "-", "--no-progress"]) == 0
        return json.loads(capsys.readouterr().out)

    value = lm.loglikelihood_rolling([_req("loglikelihood_rolling", TEXT)])[0]
    estimate = lm.estimates[-1]
    assert estimate["tokens"] == len(TEXT) + 1 and estimate["stderr"] > 0  # every byte and the EOS, once

    # independent draws: the two estimates of the same bound agree within their errors
    other = eval_py(seed=12345)
    assert other["tokens"] == estimate["tokens"] and other["blocks"] == 3
    bound = other["nats_per_token"] * other["tokens"]
    se = math.hypot(estimate["stderr"], other["stderr_nats_per_token"] * other["tokens"])
    assert abs(-value - bound) < 3 * se, (-value, bound, se)
    # and with the draws of the harness's request seed, the same number: the same blocks, estimator and prior
    same = eval_py(seed=rolling_seed)
    assert -value == pytest.approx(same["nats_per_token"] * same["tokens"], rel=1e-9)
    assert estimate["stderr"] == pytest.approx(same["stderr_nats_per_token"] * same["tokens"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# loglikelihood against an exact score
# ----------------------------------------------------------------------------------------------


class Letters:
    """A tokenizer of the letters a, b, c (ids 0, 1, 2)."""

    name, vocab_size, eos_id = "abc", 3, 0

    def encode(self, text: str) -> list[int]:
        return ["abc".index(ch) for ch in text]

    def decode(self, ids) -> str:
        return "".join("abc"[i] for i in ids)


def _exact_lm(p0: torch.Tensor, **kwargs) -> SEDDLM:
    graph, noise = Absorbing(3), LogLinear()
    model = ExactSequenceScore(p0, graph)
    model.length = 3
    pre = Pretrained(model=model, graph=graph, noise=noise, tokenizer=Letters(), tokenizer_source="test",
                     checkpoint="exact")
    return SEDDLM(pretrained=pre, device="cpu", **kwargs)


def _conditional_terms(p0, graph, noise, ctx: list[int], cont: list[int]):
    """log p(cont | ctx), KL(p_{1|0}(·|cont) ‖ p_1(·|ctx)) over the continuation positions, and
    the independent argmax of each continuation position's conditional marginal."""
    cond = p0[tuple(ctx)] / p0[tuple(ctx)].sum()  # [N] * len(cont)
    sigma1 = float(noise.total(torch.tensor(1.0, dtype=torch.float64)))
    P = graph.transition_probs(torch.arange(graph.N).unsqueeze(0), torch.tensor([sigma1]))[0].double().T  # [V, N]
    q, p1 = torch.ones((), dtype=torch.float64), cond
    for axis, token in enumerate(cont):
        q = torch.tensordot(q, P[:, token], dims=0)
        p1 = torch.tensordot(P, p1, dims=([1], [axis])).movedim(0, axis)
    keep = q > 0
    kl = (q[keep] * (q[keep].log() - p1[keep].log())).sum().item()
    greedy = all(
        int(cond.sum(dim=[a for a in range(len(cont)) if a != i]).argmax()) == token if len(cont) > 1
        else int(cond.argmax()) == token
        for i, token in enumerate(cont)
    )
    return math.log(cond[tuple(cont)].item()), kl, greedy


def test_loglikelihood_is_the_conditional_log_probability_less_the_prior():
    g = torch.Generator().manual_seed(5)
    p0 = torch.rand(3, 3, 3, generator=g, dtype=torch.float64) + 0.1
    for k in range(3):
        p0[k, k, k] += 1.0  # strongly correlated positions: the context matters
    p0 /= p0.sum()
    lm = _exact_lm(p0, mc_samples=1000, batch_size=1000)
    pairs = [("a", "bc"), ("c", "cc"), ("ab", "c"), ("bb", "b"), ("ca", "a")]
    out = lm.loglikelihood([_req("loglikelihood", c, x, idx=i) for i, (c, x) in enumerate(pairs)])
    greedy_seen = set()
    for (context, continuation), (ll, is_greedy), est in zip(pairs, out, lm.estimates):
        logp, kl, greedy = _conditional_terms(p0, lm.graph, lm.noise, Letters().encode(context),
                                              Letters().encode(continuation))
        prior = len(continuation) * prior_kl(lm.graph, lm.noise)
        assert est["value"] == ll and est["tokens"] == len(continuation)
        assert abs(ll - (logp + kl - prior)) < 4 * est["stderr"] + 1e-3, (context, continuation, ll, logp, est)
        assert est["stderr"] < 0.1 * abs(logp) + 0.02
        assert is_greedy == greedy, (context, continuation)
        greedy_seen.add(greedy)
    assert greedy_seen == {True, False}  # the check has power both ways


def test_loglikelihood_needs_the_absorbing_graph():
    model = _tiny("uniform")
    pre = Pretrained(model=model, graph=graph_from_config(model.config), noise=noise_from_config(model.config),
                     tokenizer=get_tokenizer("bytes"), tokenizer_source="bytes", checkpoint="uniform")
    lm = SEDDLM(pretrained=pre, device="cpu", mc_samples=2)
    with pytest.raises(HarnessError, match="absorbing graph"):
        lm.loglikelihood([_req("loglikelihood", "The", " end")])


def test_long_continuations_are_scored_in_windows_by_the_chain_rule(lm):
    ctx, cont = list(range(100, 110)), list(range(40))  # the window is 32
    pieces = lm._pieces(ctx, cont)
    assert all(len(tokens) <= 32 and 0 < n_fixed < len(tokens) for tokens, n_fixed in pieces)
    assert sum((tokens[n:] for tokens, n in pieces), []) == cont  # every token scored once, in order
    for tokens, n in pieces:  # after the tokens just before it
        start = len(ctx) + cont.index(tokens[n])
        assert tokens[:n] == (ctx + cont)[start - n : start]
    assert lm._pieces(ctx, cont[:5]) == [(ctx + cont[:5], 10)]  # fits: one window, the whole context
    (ll, _), = lm.loglikelihood([_req("loglikelihood", "x" * 50, "y" * 40)])
    assert math.isfinite(ll) and ll < 0 and lm.estimates[-1]["tokens"] == 40


def test_same_seed_same_numbers_whatever_else_is_asked(lm, ckpt):
    a, b = _req("loglikelihood", "Hello", " world"), _req("loglikelihood", "Good", " night")
    alone = lm.loglikelihood([b])
    together = lm.loglikelihood([a, b])
    assert together[1] == alone[0]
    doc = _req("loglikelihood_rolling", TEXT)
    assert lm.loglikelihood_rolling([doc]) == lm.loglikelihood_rolling([b.__class__("loglikelihood_rolling", {},
                                                                                    ("Other.",), 0), doc])[1:]
    reseeded = SEDDLM(pretrained=str(ckpt), device="cpu", mc_samples=16, batch_size=8, seed=1)
    assert reseeded.loglikelihood([b])[0][0] != alone[0][0]


class Recorder(torch.nn.Module):
    """A model's scores, and the σ of every row it is asked about."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.length, self.sigmas = model, model.length, []

    def forward(self, x_t, sigma, attention_mask=None):
        self.sigmas.append(sigma.clone())
        return self.inner(x_t, sigma, attention_mask=attention_mask)


def test_the_choices_of_one_context_share_their_draws_of_t():
    """Common random numbers: the choices' estimates move together, so comparing them is less
    noisy than each value (about 10x less variance of the difference on the cloze task, cpu preset)."""
    model = Recorder(_tiny())
    pre = Pretrained(model=model, graph=graph_from_config(model.inner.config),
                     noise=noise_from_config(model.inner.config), tokenizer=get_tokenizer("bytes"),
                     tokenizer_source="bytes", checkpoint="recorder")
    lm = SEDDLM(pretrained=pre, device="cpu", mc_samples=8, batch_size=8)
    times = []
    for context, continuation in [("Hello", " world"), ("Hello", " there!"), ("Bye", " world")]:
        model.sigmas.clear()
        lm.loglikelihood([_req("loglikelihood", context, continuation)])
        times.append(model.sigmas[0])  # the bound's call (the is_greedy pass comes after it)
    assert len(times[0]) == 8 and torch.equal(times[0], times[1]) and not torch.equal(times[0], times[2])


# ----------------------------------------------------------------------------------------------
# generate_until
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def letters_lm(tmp_path_factory) -> SEDDLM:
    """A model that writes only 'a' and '.', 'a' the more likely (whatever it is shown)."""
    model = _tiny()
    with torch.no_grad():
        model.output_layer.linear.weight.zero_()
        model.output_layer.linear.bias.fill_(-30.0)
        model.output_layer.linear.bias[A] = 0.0
        model.output_layer.linear.bias[DOT] = -1.0
    folder = tmp_path_factory.mktemp("letters")
    model.save_pretrained(folder)
    get_tokenizer("bytes").save(folder / "tokenizer.json")
    return SEDDLM(pretrained=str(folder), device="cpu", steps=8, batch_size=4)


def test_generate_until_returns_only_new_text_cut_at_the_stop_string(letters_lm):
    context = "XYZ " * 10  # 40 tokens: with 12 new ones, three windows of 32
    sampled = [_req("generate_until", context + str(i), {"until": ["."], "max_gen_toks": 12, "do_sample": True},
                    idx=i) for i in range(6)]
    out = letters_lm.generate_until(sampled)
    assert all(re.fullmatch(r"a{0,12}", text) for text in out), out  # no context, nothing after the stop
    assert any(len(text) < 12 for text in out), out  # the stop string did cut (P(no '.') = 0.73^12 per row)
    assert letters_lm.generate_until(sampled) == out  # same seed, same samples

    no_stop = letters_lm.generate_until([_req("generate_until", context, {"until": [], "max_gen_toks": 9,
                                                                          "do_sample": True})])
    assert len(no_stop[0]) == 9 and set(no_stop[0]) <= {"a", "."} and "." in no_stop[0]
    greedy = letters_lm.generate_until([_req("generate_until", context, {"until": ["."], "max_gen_toks": 7})])
    assert greedy == ["a" * 7]  # greedy: the most likely token everywhere, max_gen_toks of them


# ----------------------------------------------------------------------------------------------
# model_args and the entry point
# ----------------------------------------------------------------------------------------------


def test_model_args_are_checked_and_normalised():
    args = check_model_args({"pretrained": "x", "batch_size": "auto:4", "mc_samples": "8", "top_p": "0.9",
                             "trust_remote_code": True})
    assert args["batch_size"] == 32 and args["mc_samples"] == 8 and args["top_p"] == 0.9
    assert args["time_sampler"] == "stratified" and args["seed"] == 0 and args["device"] == "auto"
    for bad, message in [({"mc_samples": 1}, "mc_samples must be an integer >= 2"),
                         ({"mc_samples": 6, "time_sampler": "antithetic", "seed": 0}, None),
                         ({"mc_samples": 5, "time_sampler": "antithetic"}, "must be even"),
                         ({"predictor": "heun"}, "predictor must be one of"),
                         ({"dtype": "int8"}, "dtype must be one of"),
                         ({"top_p": 1.5}, "top_p must be a number in")]:
        if message is None:
            check_model_args({"pretrained": "x", **bad})
            continue
        with pytest.raises(HarnessError, match=message):
            check_model_args({"pretrained": "x", **bad})


def test_model_args_take_every_sampler_option_through_the_spec():
    args = check_model_args({"pretrained": "x", "predictor": "first_hitting", "tokens_per_step": "4"})
    assert args["spec"].predictor == "first_hitting" and args["tokens_per_step"] == 4 and args["steps"] is None
    assert check_model_args({"pretrained": "x", "cache": "approximate"})["spec"].cache == "approximate"
    for bad, message in [({"tokens_per_step": "0", "predictor": "first_hitting"},
                          "model_args tokens_per_step must be a positive integer, got 0"),
                         ({"tokens_per_step": "2"}, "model_args predictor analytic takes no model_args tokens_per_step"),
                         ({"predictor": "first_hitting", "cache": "true"}, "model_args cache does not apply")]:
        with pytest.raises(HarnessError, match=message):
            check_model_args({"pretrained": "x", **bad})


@pytest.mark.parametrize("model_args, message", [
    ("pretrained={ckpt},foo=1", "unknown model_args key 'foo' for the sedd model; known: pretrained"),
    ("pretrained={ckpt},mc_samples=0", "model_args mc_samples must be an integer >= 2, got 0"),
    ("pretrained={ckpt}/missing", "checkpoint directory '{ckpt}/missing' does not exist"),
    ("pretrained={ckpt},device=tpu9", "bad device 'tpu9'"),
    ("mc_samples=8", "model_args needs pretrained=DIR_OR_HUB_ID"),
])
def test_bad_model_args_are_one_line_and_exit_2(ckpt, capsys, model_args, message):
    argv = ["--model", "sedd", "--model_args", model_args.format(ckpt=ckpt), "--tasks", "sedd_python_cloze"]
    assert harness_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness.py: error: ") and message.format(ckpt=ckpt) in err, err


def test_entry_point_adds_defaults_and_reports_model_errors_in_one_line(ckpt, capsys, monkeypatch):
    import lm_eval.__main__

    seen = {}

    def fake_cli():
        seen["argv"] = list(sys.argv)
        raise HarnessError("loglikelihood needs a model on the absorbing graph")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
    argv = ["--model", "sedd", "--model_args", f"pretrained={ckpt}", "--tasks", "t"]
    assert harness_cli.main(argv) == 2
    assert capsys.readouterr().err == "harness.py: error: loglikelihood needs a model on the absorbing graph\n"
    assert seen["argv"][1:] == [*argv, "--device", "auto", "--batch_size", "auto"]
    harness_cli.main(["--model", "sedd", "--model_args", f"pretrained={ckpt}", "batch_size=4", "--device", "cpu",
                      "--tasks", "t"])
    assert "--batch_size" not in seen["argv"] and seen["argv"].count("--device") == 1


def test_lm_eval_usage_errors_are_one_line_other_errors_are_not_hidden(ckpt, capsys, monkeypatch):
    argv = ["--model", "sedd", "--model_args", f"pretrained={ckpt}", "--tasks", "t", "--log_samples"]
    assert harness_cli.main(argv) == 2  # lm_eval's own check: --log_samples needs --output_path
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness.py: error: ") and "--output_path" in err, err

    import lm_eval.__main__

    def broken():
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", broken)
    with pytest.raises(ValueError, match="a bug"):
        harness_cli.main(argv[:-1])


def test_help_names_the_model_args(capsys):
    with pytest.raises(SystemExit) as exit_:
        harness_cli.main(["run", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--model sedd" in out and "mc_samples" in out and "time_sampler" in out and "--model_args" in out


def test_entry_point_without_lm_eval_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails
    assert harness_cli.main(["--model", "sedd", "--tasks", "t"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and '.[eval]' in err and "lm-evaluation-harness is not installed" in err


@pytest.mark.slow
def test_readme_command_runs_the_local_tasks_through_lm_eval(ckpt, tmp_path):
    """The README's command, as written, from a directory laid out like the repository after
    `python train/run.py` (out/cpu: here the tiny checkpoint): lm_eval writes its results with
    finite metrics for the three example tasks, and the estimates file their standard errors."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## lm-evaluation-harness", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["python", "train/harness.py"]
    (tmp_path / "train").symlink_to(ROOT / "train")
    shutil.copytree(ckpt, tmp_path / "out" / "cpu")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               SEDD_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the script finds the package by itself
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "standard error median" in proc.stderr
    (results,) = (tmp_path / "out" / "harness").rglob("results_*.json")
    metrics = json.loads(results.read_text())["results"]
    cloze, wiki, gen = metrics["sedd_python_cloze"], metrics["sedd_wikitext_style"], metrics["sedd_python_generate"]
    assert 0 <= cloze["acc,none"] <= 1 and 0 <= cloze["acc_norm,none"] <= 1
    assert 0 <= gen["exact_match,none"] <= 1
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(wiki[key]) and wiki[key] > 0, (key, wiki[key])
    assert wiki["word_perplexity,none"] > wiki["byte_perplexity,none"] > 1  # a word is several bytes
    records = [json.loads(line) for line in (tmp_path / "out" / "harness" / "estimates.jsonl").read_text().splitlines()]
    lines = [e for e in records if e["request"] != "generate_until"]
    assert [e["request"] for e in lines] == ["loglikelihood"] * 32 + ["loglikelihood_rolling"] * 3
    assert all(math.isfinite(e["stderr"]) and e["stderr"] > 0 and e["mc_samples"] == 8 for e in lines)
    assert {e["task"] for e in lines} == {"sedd_python_cloze", "sedd_wikitext_style"}
    # the README's default: first hitting, one network evaluation per generated token (16 each)
    generations = [e for e in records if e["request"] == "generate_until"]
    assert len(generations) == 6 and {e["task"] for e in generations} == {"sedd_python_generate"}
    assert all(e["sampler"]["sampler"] == "first_hitting" and e["nfe"] == 16 == e["tokens"] for e in generations)


# ----------------------------------------------------------------------------------------------
# autoregressive checkpoints: exact numbers through the objective registry
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ar_ckpt(tmp_path_factory) -> Path:
    from sedd.model import ARModel

    torch.manual_seed(3)
    model = ARModel(ARModel.config_for("cpu", tokens=257, hidden_size=64, cond_dim=32, n_blocks=1, n_heads=4,
                                       length=32))
    torch.nn.init.normal_(model.output_layer.linear.weight, std=0.5)
    folder = tmp_path_factory.mktemp("tiny_ar")
    model.save_pretrained(folder)
    get_tokenizer("bytes").save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def ar_lm(ar_ckpt) -> SEDDLM:
    return SEDDLM(pretrained=str(ar_ckpt), device="cpu", batch_size=8)


def _ids(text: str) -> list[int]:
    return get_tokenizer("bytes").encode(text)


def test_autoregressive_loglikelihood_is_exact(ar_lm):
    from sedd.losses import ar_loss
    from sedd.sampling import sample_ancestral

    model = ar_lm.model

    def logp(ids: list[int]) -> float:  # log p(ids) by the training loss: the fused head, not the harness's path
        with torch.no_grad():
            return -float(ar_loss(model, torch.tensor([ids]), reduction="none")[0])

    def greedy(ctx: list[int], cont: list[int]) -> bool:
        with torch.no_grad():
            return model(torch.tensor([ctx + cont]))[0, len(ctx):].argmax(-1).tolist() == cont

    long_context = "x = 1\n" * 7 + "x = 1"  # 47 bytes: cut to the window's last 32 - 3 before 3 bytes
    pairs = [("def main():", " pass"), (long_context, "y =")]
    out = ar_lm.loglikelihood([_req("loglikelihood", c, x, idx=i) for i, (c, x) in enumerate(pairs)])
    for (context, continuation), (ll, is_greedy), est in zip(pairs, out, ar_lm.estimates[-2:]):
        ctx, cont = _ids(context)[-(32 - len(continuation)):], _ids(continuation)
        assert ll == pytest.approx(logp(ctx + cont) - logp(ctx), abs=1e-4), (context, continuation)
        assert is_greedy == greedy(ctx, cont)
        assert est["stderr"] == 0 and est["mc_samples"] is None and est["tokens"] == len(cont)
    # the model's own greedy continuation is greedy (ids: greedy bytes need not be text)
    ctx = _ids("def main():")
    fixed = torch.tensor(ctx + [0] * 4)
    best = sample_ancestral(model, batch_size=1, length=len(ctx) + 4, temperature=0, fixed_tokens=fixed,
                            fixed_mask=fixed.new_tensor([1] * len(ctx) + [0] * 4).bool())[0, len(ctx):].tolist()
    score = ar_lm.objective.continuation(model, torch.tensor([ctx + best]), len(ctx), num_samples=2,
                                         time_sampler="stratified", batch_size=8)
    assert score.greedy and score.variance == 0
    assert -score.nll == pytest.approx(logp(ctx + best) - logp(ctx), abs=1e-4)


def test_autoregressive_rolling_is_eval_py_exact_nll(ar_lm, ar_ckpt, tmp_path, capsys):
    data = tmp_path / "one_document.txt"
    data.write_text(TEXT)
    (value,) = ar_lm.loglikelihood_rolling([_req("loglikelihood_rolling", TEXT)])
    assert eval_cli.main([str(ar_ckpt), "--data", str(data), "--doc-split", "file", "--detokenizer", "none",
                          "--batch-size", "8", "--device", "cpu", "--json", "-", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact"] and report["tokens"] == len(TEXT) + 1 == ar_lm.estimates[-1]["tokens"]
    assert -value == pytest.approx(report["nats_per_token"] * report["tokens"], rel=1e-12)
    assert ar_lm.estimates[-1]["stderr"] == 0


def test_autoregressive_generation_is_ancestral(ar_lm):
    from sedd.sampling import sample_ancestral

    context = "import os\nimport"
    ctx = _ids(context)
    greedy = sample_ancestral(ar_lm.model, batch_size=1, length=len(ctx) + 10, temperature=0,
                              fixed_tokens=torch.tensor(ctx + [0] * 10),
                              fixed_mask=torch.tensor([True] * len(ctx) + [False] * 10))[0, len(ctx):].tolist()
    (text,) = ar_lm.generate_until([_req("generate_until", context, {"until": [], "max_gen_toks": 10})])
    expected = get_tokenizer("bytes").decode(greedy[: greedy.index(256)] if 256 in greedy else greedy)
    assert text == expected
    record = ar_lm.estimates[-1]
    assert record["nfe"] == 10 and record["windows"] == 1 and record["sampler"]["sampler"] == "ancestral"
    assert record["sampler"]["temperature"] == 0.0  # greedy: the argmax, not a truncated draw
    hot = ar_lm.generate_until([_req("generate_until", context, {"until": [], "max_gen_toks": 10, "do_sample": True,
                                                               "temperature": 0.7})])
    assert ar_lm.estimates[-1]["sampler"]["temperature"] == 0.7 and hot != [text]


@pytest.mark.parametrize("model_args, message", [
    ("mc_samples=8", "model_args mc_samples does not apply to an autoregressive checkpoint"),
    ("time_sampler=iid", "model_args time_sampler does not apply to an autoregressive checkpoint"),
    ("steps=16", "model_args steps applies to diffusion models"),
    ("predictor=first_hitting", "model_args predictor applies to diffusion models"),
])
def test_refusals_decided_by_the_checkpoint_come_before_lm_eval_indexes_its_tasks(ar_ckpt, tmp_path, capsys,
                                                                                   monkeypatch, model_args, message):
    import lm_eval.__main__

    def indexing():
        raise AssertionError("lm_eval ran (and indexed its tasks) before the refusal")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", indexing)
    argv = ["--model", "sedd", "--model_args", f"pretrained={ar_ckpt},{model_args}", "--tasks", "t"]
    assert harness_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness.py: error: ") and message in err, err
    # and one decided by a diffusion checkpoint's graph
    uniform = tmp_path / "uniform"
    _tiny("uniform").save_pretrained(uniform)
    argv = ["--model", "sedd", "--model_args", f"pretrained={uniform},predictor=first_hitting", "--tasks", "t"]
    assert harness_cli.main(argv) == 2
    assert "model_args predictor first_hitting samples the absorbing graph only" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# generate_until: cost, windows, seeds, spaces, the fewer-evaluations samplers
# ----------------------------------------------------------------------------------------------


class Calls:
    """Counts the network evaluations of a model (forward calls; one row each here)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


def _generate(lm, context: str, **gen_kwargs) -> tuple[str, dict, int]:
    """(text, its record, network evaluations counted) of one generate_until request."""
    with Calls(lm.model) as calls:
        (text,) = lm.generate_until([_req("generate_until", context, {"until": [], **gen_kwargs})])
    return text, lm.estimates[-1], calls.n


def test_generation_costs_the_tokens_it_generates(lm):
    # first hitting by default on the absorbing graph: one network evaluation per generated token
    text, record, calls = _generate(lm, "x" * 40, max_gen_toks=4)  # 40 context tokens before 4 new ones
    assert calls == record["nfe"] == 4 and record["tokens"] == 4
    assert record["sampler"]["sampler"] == "first_hitting" and record["sampler"]["steps"] is None
    # the uniform graph (no first hitting): the analytic sampler, as many steps as new tokens (and the denoiser)
    model = _tiny("uniform")
    pre = Pretrained(model=model, graph=graph_from_config(model.config), noise=noise_from_config(model.config),
                     tokenizer=get_tokenizer("bytes"), tokenizer_source="bytes", checkpoint="uniform")
    uniform = SEDDLM(pretrained=pre, device="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="conditioning on the uniform graph is not exact")
        _, record, calls = _generate(uniform, "x" * 40, max_gen_toks=4)
    assert calls == record["nfe"] == 5 and record["sampler"]["sampler"] == "analytic"
    assert record["sampler"]["steps"] == 4


def test_a_request_that_fits_after_cutting_its_context_is_one_window(lm, letters_lm):
    text, record, calls = _generate(lm, "y" * 25, max_gen_toks=8)  # 25 + 8 > 32: the context loses one token
    assert record["windows"] == 1 and record["context_tokens"] == 24 and record["context_cut"] == 1
    assert calls == 8
    # max_gen_toks of the window's length or more: windows of 16 new tokens after the first
    text, record, calls = _generate(letters_lm, "XYZ " * 5, max_gen_toks=40)
    assert record["context_tokens"] == 16 and record["windows"] == 3 and len(text) == 40
    assert calls == record["nfe"] == 3 * 9  # steps=8 and the denoiser in each window


def test_a_generation_does_not_depend_on_the_other_requests(lm):
    sampled = {"until": [], "max_gen_toks": 6, "do_sample": True}
    a, b = _req("generate_until", "Hello", sampled), _req("generate_until", "World", sampled)
    (alone,) = lm.generate_until([a])
    assert lm.generate_until([b, a])[1] == alone  # today's batches shared one generator
    assert lm.generate_until([a, b])[0] == alone
    first, second = lm.generate_until([a, a])  # lm_eval's repeats: the same request twice
    assert first == alone and second != first and lm.generate_until([a, a]) == [first, second]
    reseeded = SEDDLM(pretrained=lm.pre, seed=1)
    assert reseeded.generate_until([a]) != [alone]


def test_the_context_keeps_its_space_with_the_bytes_tokenizer(letters_lm):
    text, record, _ = _generate(letters_lm, "XYZ ", max_gen_toks=4)
    assert record["context_tokens"] == 4 and text == "aaaa"  # "XYZ " held verbatim, then four 'a'


class SpacedWords:
    """A tokenizer that glues a space to the word after it, as byte-level BPEs do: " a" is one
    token; any other character is "?"."""

    name, eos_id = "spaced-words", 0
    pieces = ["<eos>", " a", "a", " ", ".", "?", "X"]
    vocab_size = len(pieces)

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith(" a", i):
                ids.append(1)
                i += 2
                continue
            ids.append(self.pieces.index(text[i]) if text[i] in self.pieces else 5)
            i += 1
        return ids

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_a_continuation_never_repeats_the_context_space():
    model = SEDD(small_model_config(SpacedWords.vocab_size, length=8, n_blocks=1))
    with torch.no_grad():  # writes " a" wherever it can
        model.output_layer.linear.bias.fill_(-30.0)
        model.output_layer.linear.bias[1] = 0.0
    pre = Pretrained(model=model.eval(), graph=graph_from_config(model.config), noise=noise_from_config(model.config),
                     tokenizer=SpacedWords(), tokenizer_source="test", checkpoint="spaced")
    lm = SEDDLM(pretrained=pre, device="cpu")
    text, record, _ = _generate(lm, "X ", max_gen_toks=3)
    assert record["context_tokens"] == 1 and text == "a a a"  # "X" + " a a a": the space is the context's
    assert _generate(lm, "X", max_gen_toks=3)[0] == " a a a"  # no space in the context: the model's own


def test_the_fewer_evaluations_samplers_are_reached_and_recorded(ckpt, tmp_path):
    hitting = SEDDLM(pretrained=str(ckpt), device="cpu", predictor="first_hitting", tokens_per_step=3)
    _, record, calls = _generate(hitting, "abc", max_gen_toks=8)
    assert calls == record["nfe"] == 3 and record["sampler"]["tokens_per_step"] == 3  # ceil(8 / 3)
    _, record, calls = _generate(hitting, "abc", max_gen_toks=8, tokens_per_step=8)  # per request too
    assert calls == record["nfe"] == 1 and record["sampler"]["tokens_per_step"] == 8
    torch.manual_seed(0)
    free = SEDD(small_model_config(257, length=32, n_blocks=1, time_conditioning=False))
    torch.nn.init.normal_(free.output_layer.linear.weight, std=0.3)
    free.save_pretrained(tmp_path / "free")
    get_tokenizer("bytes").save(tmp_path / "free" / "tokenizer.json")
    cached = SEDDLM(pretrained=str(tmp_path / "free"), device="cpu", cache="true", steps=64)
    text, record, calls = _generate(cached, "abc", max_gen_toks=8, do_sample=True)
    assert record["sampler"]["cache"] is True and record["sampler"]["steps"] == 64
    assert calls == record["nfe"] < 64  # steps that changed nothing reused the output
    plain = SEDDLM(pretrained=str(tmp_path / "free"), device="cpu", steps=64)
    assert _generate(plain, "abc", max_gen_toks=8, do_sample=True)[0] == text  # the exact cache: the same tokens
