"""The autoregressive baseline through the entry points: train/run.py --objective ar (and resume),
train/eval.py's exact NLL, train/sample.py, train/quality.py, and the combinations they refuse.
Every entry point runs in this process (``main(argv)``; tests/test_train.py runs train/run.py as a
process of its own); the token cache is the session's, shared with tests/test_train.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sedd.data import get_corpus, get_tokenizer, tokenize
from sedd.likelihood import make_blocks
from sedd.model import ARModel
from tests.helpers import run_main, tiny_judge
from train import eval as eval_cli
from train import quality
from train import run as run_cli
from train import sample as sample_cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason=f"test text {TEXT} is missing")

TINY = [
    "--data", str(TEXT), "--tokenizer", "bpe:512", "--objective", "ar",
    "--hidden-size", "32", "--cond-dim", "16", "--n-blocks", "1", "--n-heads", "2", "--length", "32",
    "--batch-size", "4", "--global-batch", "4", "--warmup-steps", "2", "--lr", "3e-3",
    "--val-blocks", "8", "--eval-every", "5", "--log-every", "1", "--ckpt-every", "5",
    "--num-samples", "1", "--sample-length", "16", "--threads", "1",
]


@pytest.fixture(scope="module")
def env(sedd_cache):
    return {"SEDD_CACHE": str(sedd_cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _cache(env, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def train(env, *args):
    """train/run.py's ``main(ARGS)`` in this process: exit status, stdout and stderr."""
    return run_main(run_cli.main, args, env=env)


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("ar") / "out"
    result = train(env, *TINY, "--max-steps", 10, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def test_training_writes_an_autoregressive_checkpoint(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["objective"] == "ar" and "graph" not in config and "noise" not in config
    assert not {"sampling_eps", "sample_steps"} & set(config["training"])
    model = ARModel.from_pretrained(trained)
    assert model.tokens == 512 and model.vocab_embed.embedding.shape[0] == 513
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_loss_per_sequence"] for m in metrics if "val_loss" in m]
    # the exact NLL of a 32-token block starts at the uniform guess, 32·ln 512, and falls
    assert abs(vals[0] - 32 * torch.log(torch.tensor(512.0)).item()) < 0.5 and vals[-1] < vals[0] - 2
    first = next(m for m in metrics if "val_loss" in m)  # the log's units: nats per token, the perplexity
    assert first["val_loss"] == pytest.approx(vals[0] / 32) and first["val_perplexity"] == pytest.approx(
        torch.exp(torch.tensor(vals[0] / 32)).item(), rel=1e-5)
    assert "ancestral" in (trained / "samples.txt").read_text()


def test_resume_is_exact_and_keeps_the_objective(env, trained, tmp_path):
    out = tmp_path / "resumed"
    assert train(env, *TINY, "--max-steps", 5, "--out", out).returncode == 0
    # No --threads: the resumed run keeps the saved one thread per process, whatever the
    # machine's default, so the bytes below match (a CPU sum's rounding depends on the count).
    result = train(env, "--resume", "--out", out, "--max-steps", 10)
    assert result.returncode == 0, result.stderr
    if len(os.sched_getaffinity(0)) > 1:
        assert "threads: 1 per process, as the run was saved with" in result.stdout
    assert (out / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    bad = train(env, "--resume", "--out", out, "--max-steps", 12, "--objective", "sedd")
    assert bad.returncode == 2 and "cannot change objective" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    bad = train(env, "--resume", "--out", out, "--max-steps", 12, "--graph", "absorb")
    assert bad.returncode == 2 and "--graph applies to the diffusion objective only" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["--graph", "uniform"], "--objective ar: --graph applies to the diffusion objective only"),
    (["--noise", "geometric", "--sampling-eps", "0.01"], "--noise, --sampling-eps apply to the diffusion"),
    (["--sample-steps", "4"], "--sample-steps applies to the diffusion objective only"),
    (["--time-conditioning", "off"], "--time-conditioning applies to the diffusion and block-diffusion objectives only"),
    (["--objective", "gpt"], "invalid choice: 'gpt'"),
])
def test_bad_combinations_are_one_line_and_exit_2(env, tmp_path, args, message):
    result = train(env, "--objective", "ar", *args, "--out", tmp_path / "x")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "x").exists()


def test_eval_reports_the_exact_nll(trained, capsys, tmp_path):
    report = tmp_path / "eval.json"
    assert eval_cli.main([str(trained), "--data", str(TEXT), "--max-blocks", "3", "--block-size", "20",
                          "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "perplexity =" in table and "(exact" in table and "≤" not in table
    got = json.loads(report.read_text())
    assert got["exact"] and got["objective"] == "ar" and got["stderr_nats_per_token"] == 0
    # independently: the same tokens, blocks of 20, −Σ log softmax of a plain forward in fp64
    model = ARModel.from_pretrained(trained).double()
    tok = get_tokenizer(str(trained / "tokenizer.json"))
    blocks, _ = make_blocks(tokenize(get_corpus(str(TEXT), "all"), tok), 20, "pad", 3, tok.eos_id)
    with torch.no_grad():
        logp = model(blocks).double().log_softmax(-1)
    nll = -logp.gather(-1, blocks[..., None]).sum()
    assert got["tokens"] == 60
    assert got["nats_per_token"] == pytest.approx(nll.item() / 60, rel=1e-5)
    assert got["perplexity"] == pytest.approx(torch.exp(nll / 60).item(), rel=1e-5)
    # the estimator's flags, given for the same command as a SEDD run's, change nothing and say so
    assert eval_cli.main([str(trained), "--data", str(TEXT), "--max-blocks", "3", "--block-size", "20", "-K", "8",
                          "--json", str(report)]) == 0
    assert "--num-samples and --time-sampler do not apply" in capsys.readouterr().err
    assert json.loads(report.read_text())["nats_per_token"] == got["nats_per_token"]


def test_eval_pads_the_last_block_like_sedd(trained, capsys, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question.\n")
    report = tmp_path / "eval.json"
    assert eval_cli.main([str(trained), "--data", str(text), "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    tok = get_tokenizer(str(trained / "tokenizer.json"))
    ids = tokenize(get_corpus(str(text), "all"), tok)
    assert got["blocks"] == 1 and got["tokens"] == len(ids) < 32  # EOS counted, padding not
    model = ARModel.from_pretrained(trained).double()
    x = torch.tensor([int(i) for i in ids])[None]
    with torch.no_grad():
        nll = -model(x).log_softmax(-1).gather(-1, x[..., None]).sum()
    assert got["nats_per_token"] == pytest.approx(nll.item() / len(ids), rel=1e-5)


def test_sample_is_reproducible_and_keeps_the_prompt(trained, capsys):
    argv = [str(trained), "--prefix", "ROMEO:", "--batch-size", "2", "--seed", "4", "--top-p", "0.9",
            "--temperature", "0.8", "--json", "-"]
    assert sample_cli.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert sample_cli.main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert [s["tokens"] for s in first["samples"]] == [s["tokens"] for s in second["samples"]]
    assert sample_cli.main([*argv, "--no-kv-cache"]) == 0  # re-running the prefix draws the same tokens
    plain = json.loads(capsys.readouterr().out)
    assert [s["tokens"] for s in plain["samples"]] == [s["tokens"] for s in first["samples"]]
    assert first["kv_cache"] is True and plain["kv_cache"] is False
    prompt = get_tokenizer(str(trained / "tokenizer.json")).encode("ROMEO:")
    for s in first["samples"]:
        assert s["tokens"][: len(prompt)] == prompt and len(s["tokens"]) == 32
    assert first["sampler"] == "ancestral" and first["steps"] is None and first["temperature"] == 0.8


def test_fixed_text_after_generated_text_is_one_warning_line(trained, capsys, monkeypatch):
    import sedd.sampling.ancestral as ancestral

    monkeypatch.setattr(ancestral, "_warned_infill", False)  # once per process: another test may have seen it
    assert sample_cli.main([str(trained), "--prefix", "ROMEO:", "--suffix", "JULIET:", "--length", "32",
                            "--seed", "0", "--json", "-"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "warning" in line]
    assert warned == [line for line in warned if line.startswith("sample.py: warning: an autoregressive model reads "
                                                                 "only the tokens before a position")]
    assert len(warned) == 1 and "UserWarning" not in err and "warnings.warn" not in err, err


@pytest.mark.parametrize("args,message", [
    (["--steps", "8"], "--steps applies to diffusion models"),
    (["--sampler", "euler"], "--sampler applies to diffusion models"),
    (["--cache"], "--cache applies to diffusion models"),
    (["--sampler", "first_hitting", "--tokens-per-step", "4"], "--sampler, --tokens-per-step apply to diffusion"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
])
def test_sample_refuses_what_an_autoregressive_checkpoint_does_not_read(trained, capsys, args, message):
    assert sample_cli.main([str(trained), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args,message", [
    (["--temperature", "0.5"], "--temperature applies to autoregressive models"),
    (["--no-kv-cache"], "--no-kv-cache applies to autoregressive and block-diffusion models"),
])
def test_ar_options_are_refused_for_a_diffusion_checkpoint(tmp_path, capsys, args, message):
    from sedd.model import SEDD

    tok = get_tokenizer("bytes")
    SEDD(SEDD.config_for("cpu", tokens=tok.vocab_size, n_blocks=1, length=16)).save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    assert sample_cli.main([str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_quality_samples_an_autoregressive_checkpoint_at_nfe_l(trained, tmp_path, capsys):
    judge = tmp_path / "judge"
    tiny_judge(get_tokenizer(str(trained / "tokenizer.json")), judge)
    report = tmp_path / "q.json"
    argv = [str(trained), "--judge", str(judge), "--num-samples", "3", "--batch-size", "2", "--length", "24",
            "--json", str(report), "--plot", str(tmp_path / "q.png")]
    assert quality.main(argv) == 0
    got = json.loads(report.read_text())
    (record,) = got["records"]
    assert got["objective"] == "ar" and got["sampler"] == "ancestral" and got["predictor"] is None
    assert record["steps"] is None
    assert record["nfe"] == 24 and record["num_samples"] == 3 and record["gen_ppl"] > 1
    assert "    AR" in capsys.readouterr().out
    assert quality.main([*argv, "--steps", "4"]) == 2
