"""train/quality.py: generative perplexity under a judge, entropy, degeneracy, through the CLI.

Everything is built here from one file of this interpreter's standard library (argparse.py), so
nothing is downloaded and no shared data is needed: a tiny SEDD checkpoint (one block, 32 tokens,
a 512-id BPE, a few optimizer steps) and a tiny GPT-2 judge built with ``transformers`` (random
weights, its own 300-id BPE, so the samples really are retokenized), saved to temporary
directories (the judge and its BPE are the session's, tests/conftest.py). The main path runs once
as a subprocess (the real entry point, slow); the other cases call main(argv) or the scoring
functions in-process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sedd.data import get_corpus, load_tokens, train_bpe
from sedd.graph import graph_from_config
from sedd.losses import score_entropy_loss
from sedd.metrics import judge_windows, load_judge
from sedd.model import SEDD
from sedd.noise import noise_from_config
from tests.helpers import ARGPARSE, small_model_config, tiny_judge
from train import quality

ROOT = Path(__file__).resolve().parents[1]
TEXT = ARGPARSE
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sedd_cache")


@pytest.fixture(autouse=True)
def _env(cache_dir, monkeypatch, one_thread):
    monkeypatch.setenv("SEDD_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, cache_dir) -> Path:
    """A SEDD checkpoint in train/run.py's layout, trained for a few steps on argparse.py."""
    tok = train_bpe(get_corpus(TEXT, "all"), 512, cache_dir=cache_dir, progress=False)
    stream = load_tokens(TEXT, "all", tok, cache_dir=cache_dir, progress=False)
    torch.manual_seed(0)
    model = SEDD(small_model_config(tok.vocab_size, length=32, n_blocks=1, hidden_size=32, cond_dim=16, n_heads=2))
    graph, noise = graph_from_config(model.config), noise_from_config(model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    blocks = torch.from_numpy(np.asarray(stream[: 8 * 4 * 32], dtype=np.int64)).view(8, 4, 32)
    for x0 in blocks:
        opt.zero_grad()
        score_entropy_loss(model, x0, graph, noise).mean().backward()
        opt.step()
    folder = tmp_path_factory.mktemp("ckpt")
    model.config["tokenizer"] = "bpe:512 (argparse.py)"
    model.save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def degenerate_ckpt(ckpt, tmp_path_factory) -> Path:
    """The same model made to put all its mass on one token: every sample is one token repeated."""
    model = SEDD.from_pretrained(ckpt)
    with torch.no_grad():
        model.output_layer.linear.weight.zero_()
        model.output_layer.linear.bias.fill_(-30.0)
        model.output_layer.linear.bias[7] = 30.0
    folder = tmp_path_factory.mktemp("degenerate_ckpt")
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes())
    return folder


@pytest.fixture(scope="module")
def cli_run(ckpt, judge_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    env = dict(os.environ, SEDD_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the script must find the package by itself
    result = subprocess.run(
        [sys.executable, str(ROOT / "train" / "quality.py"), str(ckpt), "--judge", str(judge_dir),
         "--steps", "4,2", "--num-samples", "3", "--batch-size", "2", "--judge-batch-size", "2",
         "--reference-data", str(TEXT), "--keep-samples", "--threads", "1", "--seed", "3",
         "--json", str(out / "q.json"), "--plot", str(out / "q.png")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out, result


def _oracle_nll(tok, model, text: str) -> tuple[float, int]:
    """The judge's summed NLL of a text after its EOS (= its BOS, as GPT-2's), by one plain forward."""
    ids = torch.tensor([[tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
    assert ids.shape[1] <= model.config.n_positions
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return float(-logp.gather(-1, ids[0, 1:, None]).sum()), ids.shape[1] - 1


@pytest.mark.slow
def test_cli_records_match_an_independent_judge(cli_run, judge_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = cli_run
    tok = AutoTokenizer.from_pretrained(judge_dir)
    model = AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    report = json.loads((out / "q.json").read_text())
    records = report["records"]
    assert [r["steps"] for r in records] == [2, 4]  # sorted
    assert report["judge"]["first_token"] == "bos" and report["judge"]["dtype"] == "torch.float32"
    for r in records + [report["reference"]]:
        for key in ("gen_ppl", "gen_ppl_ci", "entropy", "degenerate", "nll_se", "judge_tokens"):
            assert key in r
        assert len(r["samples"]) == 3
        per_text = [_oracle_nll(tok, model, t) for t in r["samples"]]
        nll = np.array([p[0] for p in per_text])
        n = np.array([p[1] for p in per_text])
        assert r["judge_tokens"] == n.sum()
        assert r["gen_ppl"] == pytest.approx(math.exp(nll.sum() / n.sum()), rel=1e-5)
        lo, hi = r["gen_ppl_ci"]
        assert lo < r["gen_ppl"] < hi
        # the interval is the spread of the per-sequence sums around the ratio (delta method)
        mean = nll.sum() / n.sum()
        se = math.sqrt((((nll - mean * n) / n.mean()) ** 2).sum() / (3 * 2))
        assert r["nll_se"] == pytest.approx(se, rel=1e-4)
        assert hi == pytest.approx(math.exp(mean + 1.96 * se), rel=1e-3)
        assert 0 < r["entropy"] <= math.log(32)
    for r in records:
        assert r["num_samples"] == 3 and r["length"] == 32
        assert r["tokens_per_s"] == pytest.approx(3 * 32 / r["wall_s"])
        assert r["degenerate"] == 0.0
    assert report["reference"]["split"] == "all"
    assert (out / "q.png").read_bytes()[:8] == PNG_MAGIC
    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["steps", "gen", "ppl"]
    assert [line.split()[0] for line in table[2:]] == ["2", "4", "data"]


def test_degenerate_sampler_is_flagged(degenerate_ckpt, judge_dir, tmp_path, capsys):
    path = tmp_path / "d.json"
    rc = quality.main([str(degenerate_ckpt), "--judge", str(judge_dir), "--steps", "2", "--num-samples", "2",
                       "--json", str(path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    record = json.loads(path.read_text())["records"][0]
    assert record["degenerate"] == 1.0 and record["top_token_share"] == 1.0
    assert record["entropy"] == 0.0
    assert "degenerate samples" in out


def test_windows_score_each_token_once_with_the_stated_context(tmp_path, argparse_bpe):
    """A judge with an 8-token context on longer texts: windows of 8 every 4 tokens, each token
    scored in the first window holding it, against a per-token oracle; both conventions."""
    judge_dir = tiny_judge(argparse_bpe, tmp_path / "short", n_positions=8)
    texts = ["To be, or not to be, that is the question: whether 'tis nobler", "H", "a b c d e f g"]
    for first_token in ("bos", "skip"):
        judge = load_judge(str(judge_dir), torch.device("cpu"), first_token=first_token)
        assert judge.context == 8
        nll, count = judge.score(texts, batch_size=2)
        for i, text in enumerate(texts):
            ids = judge.encode(text)
            assert len(ids) == len(judge.tokenizer(text, add_special_tokens=False)["input_ids"]) + (first_token == "bos")
            want = 0.0
            for j in range(1, len(ids)):
                begin = 4 * max(0, (j - 8) // 4 + 1)  # the first window [4k, 4k + 8) holding j
                assert begin < j and j - begin < 8
                with torch.no_grad():
                    logits = judge.model(input_ids=torch.tensor([ids[begin:j]])).logits[0, -1].double()
                want -= float(logits.log_softmax(-1)[ids[j]])
            assert count[i] == len(ids) - 1
            assert nll[i] == pytest.approx(want, rel=1e-4)


def test_windows_cover_every_target_once():
    for n in (1, 2, 7, 8, 9, 16, 33):
        ids = list(range(n))
        scored = []
        for w, k in judge_windows(ids, 8):
            assert len(w) <= 8 and 1 <= k < len(w)
            scored += w[len(w) - k :]
        assert scored == ids[1:]


def test_offline_hub_id_fails_fast_naming_a_local_judge(ckpt, monkeypatch, capsys):
    argv = [str(ckpt), "--judge", "no-such-org/no-such-judge", "--steps", "2", "--num-samples", "2"]
    assert quality.main(argv) == 2
    assert "--judge DIR" in capsys.readouterr().err
    # checked before the checkpoint loads (that could take a while): the judge is what is reported
    assert quality.main(["no/such/checkpoint", *argv[1:]]) == 2
    assert "--judge DIR" in capsys.readouterr().err
    # not flagged offline, but the Hub does not answer (a closed local port): the probe says so
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert quality.main(argv) == 2
    assert "--judge DIR" in capsys.readouterr().err


def test_bad_input_is_one_line(ckpt, judge_dir, capsys):
    for extra in (["--steps", "4,x"], ["--num-samples", "1"], ["--judge-context", "100000"]):
        argv = [str(ckpt), "--judge", str(judge_dir), "--num-samples", "2", *extra]
        assert quality.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("quality.py: error:") and "\n" not in err


def test_longer_than_the_model_is_sampled_window_by_window_with_truncation(ckpt, judge_dir, tmp_path, capsys,
                                                                            monkeypatch):
    import sedd.objectives.diffusion

    seen = []
    real = sedd.objectives.diffusion.sample

    def spy(*args, spec, **kwargs):
        seen.append((kwargs["length"], spec.top_p, spec.top_k))
        return real(*args, spec=spec, **kwargs)

    monkeypatch.setattr(sedd.objectives.diffusion, "sample", spy)
    path = tmp_path / "q.json"
    # the model's length is 32: 48 tokens are two windows, ending at 32 and 48 (stride 16)
    assert quality.main([str(ckpt), "--judge", str(judge_dir), "--steps", "2", "--num-samples", "2", "--length", "48",
                         "--top-p", "0.9", "--top-k", "5", "--json", str(path), "--no-progress"]) == 0
    assert "longer than the 32-token window" in capsys.readouterr().err
    assert seen == [(32, 0.9, 5), (32, 0.9, 5)]  # was: one call of 48 positions, no truncation
    report = json.loads(path.read_text())
    assert report["records"][0]["length"] == 48 and report["window"] == 32 and report["stride"] == 16
    assert report["top_p"] == 0.9 and report["top_k"] == 5


def test_outputs_and_values_are_checked_before_any_work(ckpt, judge_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quality.cli, "load_checkpoint", lambda args: pytest.fail("loaded before the checks"))
    for extra, message in [
        (["--plot", str(tmp_path / "missing" / "q.png")], "does not exist"),
        (["--json", str(tmp_path)], "that is a directory"),
        (["--json", str(ckpt / "config.json")], "is a file of the checkpoint"),
        (["--plot", str(judge_dir / "config.json")], "is a file of --judge"),
        (["--json", str(tmp_path / "q"), "--plot", str(tmp_path / "q")], "--json writes the same file"),
        (["--seed", str(10**23)], "--seed must be in [0, 2**64)"),
        (["--threads", "100000"], "--threads must be at most the"),
        (["--top-p", "1.5"], "--top-p must be a number in (0, 1]"),
    ]:
        assert quality.main([str(ckpt), "--judge", str(judge_dir), "--num-samples", "2", *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("quality.py: error:") and message in err and "\n" not in err, err
