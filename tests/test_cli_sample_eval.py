"""The sampling and evaluation entry points (train/sample.py, train/eval.py) on tiny checkpoints.

Checkpoints are made here, untrained (random output layer, so samples and bounds are not trivial):
one with a 512-id byte-level BPE trained on Tiny Shakespeare and saved as its tokenizer.json (the
layout train/run.py writes), and one with GPT-2's 50257 tokens and no tokenizer file (the layout
of the public checkpoints), used with --tokenizer ../shared/data/gpt2. Each CLI runs once as a
subprocess (the real entry point); the other cases call main(argv) in-process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sedd.data import get_corpus, get_tokenizer, train_bpe
from sedd.model import SEDD
from tests.helpers import small_model_config
from train import eval as eval_cli
from train import sample as sample_cli

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GPT2_DIR = SHARED / "gpt2"
WIKITEXT = SHARED / "wikitext-2" / "test.txt"
PTB = SHARED / "ptb" / "test.txt"

pytestmark = pytest.mark.skipif(
    not (GPT2_DIR.is_dir() and WIKITEXT.is_file() and PTB.is_file()),
    reason="needs ../shared/data (gpt2, wikitext-2, ptb)",
)


def _random_model(tokens: int, graph: str = "absorb", seed: int = 0) -> SEDD:
    torch.manual_seed(seed)
    model = SEDD(small_model_config(tokens, graph, length=64, n_blocks=1))
    # The output layer is zero-initialised (every score equal); give it some structure.
    torch.nn.init.normal_(model.output_layer.linear.weight, std=0.3)
    torch.nn.init.normal_(model.output_layer.linear.bias, std=0.3)
    return model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sedd_cache")


@pytest.fixture(autouse=True)
def _offline_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("SEDD_CACHE", str(cache_dir))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory, cache_dir) -> Path:
    """Our layout: config.json, model.safetensors, tokenizer.json (a 512-id BPE)."""
    tok = train_bpe(get_corpus(SHARED / "tinyshakespeare" / "input.txt", "all"), 512,
                    cache_dir=cache_dir, progress=False)
    folder = tmp_path_factory.mktemp("bpe_ckpt")
    model = _random_model(tok.vocab_size)
    model.config["tokenizer"] = "bpe:512 (tinyshakespeare)"
    model.save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory) -> Path:
    """The public layout: GPT-2's tokens, no tokenizer file."""
    folder = tmp_path_factory.mktemp("gpt2_ckpt")
    _random_model(50257).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bpe(bpe_ckpt):
    return get_tokenizer(str(bpe_ckpt / "tokenizer.json"))


def _env(cache_dir) -> dict:
    env = dict(os.environ, SEDD_CACHE=str(cache_dir), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the scripts must find the package by themselves
    return env


def _run_script(name: str, args: list[str], cache_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train" / name), *map(str, args)],
        capture_output=True, text=True, env=_env(cache_dir), cwd=ROOT, timeout=120,
    )


def _sample_json(capsys, *args) -> dict:
    assert sample_cli.main([*map(str, args), "--json", "-", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------------------------
# train/sample.py
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_script_unconditional(bpe_ckpt, cache_dir, tmp_path):
    out = tmp_path / "samples.txt"
    proc = _run_script("sample.py", [bpe_ckpt, "--steps", 8, "--batch-size", 2, "--seed", 3,
                                     "--length", 48, "--out", out], cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "===== sample 1/2 =====" in proc.stdout and "===== sample 2/2 =====" in proc.stdout
    assert "seed 3" in proc.stdout
    texts = proc.stdout.split("=====\n")[1:]
    assert all(t.strip() for t in texts)
    assert out.read_text() == proc.stdout


def test_sample_top_p_top_k_reach_every_window(bpe_ckpt, capsys, monkeypatch):
    import sedd.objectives.diffusion

    seen = []
    real = sedd.objectives.diffusion.sample

    def spy(*args, spec, **kwargs):
        seen.append((spec.top_p, spec.top_k))
        return real(*args, spec=spec, **kwargs)

    monkeypatch.setattr(sedd.objectives.diffusion, "sample", spy)
    # 96 tokens with the model's 64-token window: semi-autoregressive, two windows
    out = _sample_json(capsys, bpe_ckpt, "--length", 96, "--steps", 3, "--seed", 0, "--top-p", 0.8, "--top-k", 7)
    assert seen == [(0.8, 7), (0.8, 7)]
    assert out["top_p"] == 0.8 and out["top_k"] == 7
    assert all(0 <= t < 512 for t in out["samples"][0]["tokens"])


def test_sample_help_documents_the_syntax():
    text = sample_cli.build_parser().format_help()
    for word in ("--prefix", "--suffix", "--infill", "POS:TEXT", "[MASK:5]", "--sampler", "--steps"):
        assert word in text


def test_sample_conditioning_is_kept_token_for_token(bpe_ckpt, bpe, capsys):
    out = _sample_json(capsys, bpe_ckpt, "--length", 64, "--steps", 6, "--batch-size", 2, "--seed", 0,
                       "--prefix", "First Citizen: ", "--suffix", " Go, get you home.",
                       "--infill", "30:the people", "--infill", "-20:O Rome")
    prefix, suffix = bpe.encode("First Citizen:"), bpe.encode(" Go, get you home.")
    middle, late = bpe.encode("the people"), bpe.encode("O Rome")
    fixed = {f["source"]: f for f in out["fixed"]}
    assert fixed["--prefix"]["tokens"] == prefix and fixed["--suffix"]["tokens"] == suffix
    assert len(out["samples"]) == 2
    for s in out["samples"]:
        toks = s["tokens"]
        assert len(toks) == 64
        assert toks[: len(prefix)] == prefix
        assert toks[64 - len(suffix):] == suffix
        assert toks[30 : 30 + len(middle)] == middle
        assert toks[44 : 44 + len(late)] == late
        assert all(0 <= t < bpe.vocab_size for t in toks)  # no MASK left
        assert s["text"] == bpe.decode(toks)
        assert s["text"].startswith("First Citizen:") and s["text"].endswith(" Go, get you home.")


def test_sample_template(bpe_ckpt, bpe, capsys):
    out = _sample_json(capsys, bpe_ckpt, "--template", "The [MASK:5] sat on the [MASK:3].",
                       "--length", 24, "--steps", 4, "--seed", 1)
    toks = out["samples"][0]["tokens"]
    the, mid, dot = bpe.encode("The"), bpe.encode(" sat on the"), bpe.encode(".")
    p = len(the) + 5
    assert toks[: len(the)] == the
    assert toks[p : p + len(mid)] == mid
    q = p + len(mid) + 3
    assert toks[q : q + len(dot)] == dot
    assert [f["start"] for f in out["fixed"]] == [0, p, q]


@pytest.mark.parametrize("sampler", ["analytic", "euler"])
def test_sample_same_seed_same_text(bpe_ckpt, capsys, sampler):
    args = [bpe_ckpt, "--length", 32, "--steps", 5, "--batch-size", 2, "--sampler", sampler]
    a = _sample_json(capsys, *args, "--seed", 7)
    b = _sample_json(capsys, *args, "--seed", 7)
    c = _sample_json(capsys, *args, "--seed", 8)
    assert a["sampler"] == sampler and a["steps"] == 5
    assert [s["tokens"] for s in a["samples"]] == [s["tokens"] for s in b["samples"]]
    assert [s["tokens"] for s in a["samples"]] != [s["tokens"] for s in c["samples"]]


def test_sample_public_layout_with_gpt2_tokenizer(gpt2_ckpt, capsys):
    out = _sample_json(capsys, gpt2_ckpt, "--tokenizer", GPT2_DIR, "--length", 12, "--steps", 3,
                       "--prefix", "Hello world,", "--seed", 0)
    assert out["samples"][0]["tokens"][:3] == [15496, 995, 11]  # as in ../shared/data/README.md
    assert out["tokenizer"]["source"] == str(GPT2_DIR)


def test_sample_uniform_graph(bpe_ckpt, bpe, tmp_path, capsys):
    folder = tmp_path / "uniform"
    _random_model(bpe.vocab_size, graph="uniform").save_pretrained(folder)
    bpe.save(folder / "tokenizer.json")
    out = _sample_json(capsys, folder, "--length", 16, "--steps", 4, "--suffix", " end.", "--seed", 0)
    assert out["graph"] == "uniform"
    assert out["samples"][0]["tokens"][-len(bpe.encode(" end.")):] == bpe.encode(" end.")


def test_sample_negative_infill_position_as_two_words_and_threads(bpe_ckpt, bpe, capsys):
    threads = torch.get_num_threads()
    out = _sample_json(capsys, bpe_ckpt, "--length", 40, "--steps", 2, "--seed", 0, "--infill", "-8:O Rome",
                       "--threads", 2)
    assert torch.get_num_threads() == 2 != threads
    assert out["samples"][0]["tokens"][32 : 32 + len(bpe.encode("O Rome"))] == bpe.encode("O Rome")
    assert out["fixed"][0]["start"] == 32


def test_sample_jsonl_in_and_out(bpe_ckpt, bpe, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([
        json.dumps("ROMEO:"),
        "",
        json.dumps({"suffix": " Farewell."}),
        json.dumps({"template": "The [MASK:3] king", "infill": [[-6, "O Rome"]]}),
        json.dumps({"infill": ["20:the people"]}),
    ]) + "\n")
    assert sample_cli.main([str(bpe_ckpt), "--input", str(requests), "--batch-size", "2", "--length", "32",
                            "--steps", "2", "--seed", "0", "--no-progress"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [s["line"] for s in lines] == [1, 1, 3, 3, 4, 4, 5, 5] and [s["index"] for s in lines] == list(range(8))
    for s in lines:
        assert len(s["tokens"]) == 32 and s["text"] == bpe.decode(s["tokens"])
        assert s["settings"]["length"] == 32 and s["settings"]["seed"] == 0 and s["settings"]["steps"] == 2
        for span in s["fixed"]:
            assert s["tokens"][span["start"] : span["end"]] == span["tokens"]
    assert lines[0]["tokens"][: len(bpe.encode("ROMEO:"))] == bpe.encode("ROMEO:")
    assert lines[2]["tokens"][-len(bpe.encode(" Farewell.")):] == bpe.encode(" Farewell.")
    assert [f["start"] for f in lines[4]["fixed"]] == [0, len(bpe.encode("The")) + 3, 26]
    assert lines[6]["fixed"][0]["start"] == 20
    assert lines[0]["tokens"] != lines[1]["tokens"]  # two samples per request

    bad = tmp_path / "bad.jsonl"
    for content, message in [('"ok"\n{not json\n', "line 2: not JSON"),
                             ('{"prefix": "x", "colour": 1}\n', "line 1: expected a string"),
                             ('{"prefix": "' + "word " * 40 + '"}\n', "line 1: prefix is"),
                             ("\n\n", "holds no request")]:
        bad.write_text(content)
        assert sample_cli.main([str(bpe_ckpt), "--input", str(bad), "--length", "32", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sample.py: error: --input") and message in err, err


def test_truncated_weights_name_the_file(bpe_ckpt, tmp_path, capsys):
    import shutil

    folder = tmp_path / "truncated"
    shutil.copytree(bpe_ckpt, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors.*1,000 bytes.*truncated"):
        SEDD.from_pretrained(folder)
    assert sample_cli.main([str(folder), "--length", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample.py: error: cannot read the weights") and str(weights) in err, err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback


def test_sample_longer_than_the_model_is_semi_autoregressive(bpe_ckpt, bpe, capsys):
    # the model's length is 64: 100 tokens are generated in windows ending at 64, 96 and 100
    assert sample_cli.main([str(bpe_ckpt), "--length", "100", "--steps", "2", "--seed", "0", "--prefix", "ROMEO:",
                            "--suffix", " Farewell.", "--json", "-", "--no-progress"]) == 0
    captured = capsys.readouterr()
    out, err = json.loads(captured.out), captured.err
    assert "longer than the 64-token window" in err and "3 windows" in err, err
    toks = out["samples"][0]["tokens"]
    assert len(toks) == 100 and out["window"] == 64 and out["stride"] == 32
    assert toks[: len(bpe.encode("ROMEO:"))] == bpe.encode("ROMEO:")
    assert toks[-len(bpe.encode(" Farewell.")):] == bpe.encode(" Farewell.")
    assert all(0 <= t < bpe.vocab_size for t in toks)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--length", 8, "--prefix", "a rather long prompt that will not fit in eight tokens at all"], "does not fit"),
        (["--length", 32, "--prefix", "one two three", "--infill", "1:four"], "overlaps"),
        (["--length", 32, "--infill", "x:word"], "POS:TEXT"),
        (["--length", 32, "--infill", "1_0:word"], "POS:TEXT"),  # int() alone would read 10
        (["--length", 32, "--infill", "40:word"], "does not fit"),
        (["--length", 32, "--template", "no holes here"], "no hole"),
        (["--length", 0], "--length must be >= 1"),
        (["--steps", 0], "--steps must be a positive integer"),
        (["--window", 0], "--window must be a positive integer"),
        (["--length", 100, "--stride", 64], "--stride must be smaller than the window (64)"),
        (["--top-p", 0], "--top-p must be a number in (0, 1]"),
        (["--top-p", 1.5], "--top-p must be a number in (0, 1]"),
        (["--top-k", 0], "--top-k must be a positive integer"),
    ],
)
def test_sample_bad_input(bpe_ckpt, capsys, args, message):
    assert sample_cli.main([str(bpe_ckpt), *map(str, args), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample.py: error:") and message in err, err


@pytest.mark.slow
def test_sample_missing_checkpoint_and_tokenizer(tmp_path, gpt2_ckpt, bpe_ckpt, cache_dir, capsys):
    assert sample_cli.main([str(tmp_path / "nope")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err
    # a GPT-2 tokenizer for a 512-token model does not fit
    assert sample_cli.main([str(bpe_ckpt), "--tokenizer", str(GPT2_DIR)]) == 2
    err = capsys.readouterr().err
    assert "50257 ids" in err and "512 tokens" in err
    # the public layout offline, without --tokenizer: the message says what to pass
    proc = _run_script("sample.py", [gpt2_ckpt, "--length", 8, "--steps", 1], cache_dir)
    assert proc.returncode == 2
    assert "--tokenizer DIR" in proc.stderr and "vocab.json and merges.txt" in proc.stderr
    assert "../shared" not in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# train/sample.py: --input in bounded, streamed calls; every bad input one line before any work
# ----------------------------------------------------------------------------------------------


def test_input_is_sampled_in_bounded_calls_and_streamed(bpe_ckpt, tmp_path, capsys, monkeypatch):
    requests, out = tmp_path / "requests.jsonl", tmp_path / "out.jsonl"
    requests.write_text("".join(json.dumps(f"prompt {i}") + "\n" for i in range(600)))
    calls, lines_written = [], []

    def fake(model, graph, noise, *, batch_size, length, generator, **kwargs):
        from sedd.sampling import SamplingStats

        calls.append(batch_size)
        lines_written.append(len(out.read_text().splitlines()))  # what earlier calls already wrote
        tokens = torch.randint(0, 512, (batch_size, length), generator=generator)
        return tokens, SamplingStats(nfe=torch.ones(batch_size, dtype=torch.int64))

    monkeypatch.setattr(sample_cli, "sample_blockwise", fake)
    assert sample_cli.main([str(bpe_ckpt), "--input", str(requests), "--batch-size", "2", "--length", "16",
                            "--steps", "1", "--seed", "0", "--jsonl", str(out), "--progress"]) == 0
    # was: one sampler call of 1200 rows, written when all were done
    assert calls == [2] * 600
    assert lines_written == list(range(0, 1200, 2))
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [i // 2 + 1 for i in range(1200)]
    assert re.search(r"requests: +100%.*600/600", capsys.readouterr().err)

    # one prompt with many samples: at most --max-batch-rows rows per call
    calls.clear()
    assert sample_cli.main([str(bpe_ckpt), "--batch-size", "5", "--max-batch-rows", "2", "--length", "16",
                            "--steps", "1", "--json", "-", "--no-progress"]) == 0
    assert calls == [2, 2, 1] and len(json.loads(capsys.readouterr().out)["samples"]) == 5


def _jsonl(capsys, *args) -> list[dict]:
    assert sample_cli.main([*map(str, args), "--no-progress"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.split("\n") if line]  # not splitlines: U+2028


def test_input_samples_do_not_depend_on_the_other_requests_or_the_grouping(bpe_ckpt, tmp_path, capsys):
    requests, alone = tmp_path / "requests.jsonl", tmp_path / "alone.jsonl"
    requests.write_text("\n".join(json.dumps(p) for p in ["ROMEO:", "JULIET:", {"suffix": " Farewell."}]) + "\n")
    alone.write_text("\n" + json.dumps("JULIET:") + "\n")  # the same request on the same line, alone
    common = [bpe_ckpt, "--batch-size", 2, "--length", 24, "--steps", 2, "--seed", 5]
    a = _jsonl(capsys, *common, "--input", requests, "--max-batch-rows", 2)
    b = _jsonl(capsys, *common, "--input", requests, "--max-batch-rows", 6)
    c = _jsonl(capsys, *common, "--input", alone)
    assert [s["tokens"] for s in a] == [s["tokens"] for s in b]
    assert [s["tokens"] for s in c] == [s["tokens"] for s in a[2:4]]
    assert a[0]["tokens"] != a[1]["tokens"] and a[0]["seed"] != a[2]["seed"]
    # a request's seed reproduces it from the command line
    single = _sample_json(capsys, *common[:-2], "--seed", a[2]["seed"], "--prefix", "JULIET:")
    assert [s["tokens"] for s in single["samples"]] == [s["tokens"] for s in a[2:4]]


def test_input_lines_end_at_newlines_only(bpe_ckpt, bpe, tmp_path, capsys):
    prompt = "O\u2028Rome\u2029and\x85"  # raw in a JSON string: valid, and what our own JSONL writes
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps(prompt, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = _jsonl(capsys, bpe_ckpt, "--input", requests, "--length", 32, "--steps", 1, "--seed", 0)
    assert len(lines) == 1 and lines[0]["fixed"][0]["text"] == prompt
    assert lines[0]["tokens"][: len(bpe.encode(prompt))] == bpe.encode(prompt)


@pytest.mark.parametrize("content, message", [
    ('"ok"\n{"prefix": 5}\n', "line 2: prefix must be a string, got 5"),
    ('{"suffix": ["a"]}\n', 'line 1: suffix must be a string, got ["a"]'),
    ('{"template": 3}\n', "line 1: template must be a string, got 3"),
    ('{"infill": [[5.9, "abc"]]}\n', "line 1: infill expects [pos, text] pairs with an integer token position"),
    ('{"infill": [[true, "abc"]]}\n', "line 1: infill expects [pos, text] pairs"),
    (b'"ok"\n"caf\xe9"\n', "line 2: not UTF-8 text (byte 0xe9)"),
])
def test_input_of_the_wrong_type_is_one_line_naming_the_line(bpe_ckpt, tmp_path, capsys, content, message):
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert sample_cli.main([str(bpe_ckpt), "--input", str(requests), "--length", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sample.py: error: --input {requests} ") and message in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--window", 1, "--length", 10], "--window 1 cannot generate --length 10 window by window"),
    (["--seed", 10**23], "--seed must be in [0, 2**64)"),
    (["--seed", -1], "--seed must be in [0, 2**64)"),
    (["--threads", 100000], "--threads must be at most the"),
    (["--eps", 1e-300], "--eps 1e-300 is too small"),
    (["--max-batch-rows", 0], "--max-batch-rows must be >= 1"),
    (["--sampler", "foo"], "sample.py: error: argument --sampler/--predictor: invalid choice: 'foo'"),
    (["--length", "x"], "argument --length: invalid int value: 'x' (--help lists the options)"),
])
def test_sample_edge_values_are_refused(bpe_ckpt, capsys, args, message):
    assert sample_cli.main([str(bpe_ckpt), *map(str, args), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample.py: error:") and message in err and len(err.strip().splitlines()) == 1, err


def test_sample_outputs_are_checked_before_any_work(bpe_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample_cli.cli, "load_checkpoint", lambda args: pytest.fail("loaded before the checks"))
    requests = tmp_path / "requests.jsonl"
    requests.write_text('"ROMEO:"\n')
    before = {p.name: p.read_bytes() for p in bpe_ckpt.iterdir()}
    for args, message in [
        (["--out", tmp_path / "missing" / "dir" / "f.txt"], "the directory"),
        (["--json", tmp_path / "missing" / "f.json"], "does not exist"),
        (["--jsonl", tmp_path], "that is a directory"),
        (["--json", tmp_path], "that is a directory"),
        (["--input", requests, "--jsonl", requests], "is the --input file"),
        (["--out", bpe_ckpt / "config.json"], "is a file of the checkpoint"),
        (["--json", bpe_ckpt / "tokenizer.json"], "is a file of the checkpoint"),
        (["--json", tmp_path / "a.json", "--out", tmp_path / "a.json"], "--json writes the same file"),
        (["--json", "-", "--jsonl", "-"], "writes to stdout too"),
    ]:
        assert sample_cli.main([str(bpe_ckpt), *map(str, args), "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("sample.py: error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert requests.read_text() == '"ROMEO:"\n'
    assert {p.name: p.read_bytes() for p in bpe_ckpt.iterdir()} == before


def test_sample_and_quality_define_the_sampler_options_once():
    from train import quality

    def options(parser):
        shared = ("predictor", "top_p", "top_k", "eps", "length", "window", "stride")
        return {a.dest: (tuple(a.option_strings), a.default, a.type, a.choices, a.help)
                for a in parser._actions if a.dest in shared}

    ours = options(sample_cli.build_parser())
    assert len(ours) == 7 and ours == options(quality.build_parser())
    assert "--sampler" in ours["predictor"][0] and "--predictor" in ours["predictor"][0]


# ----------------------------------------------------------------------------------------------
# train/eval.py
# ----------------------------------------------------------------------------------------------


def _check_report(rep: dict, *, blocks: int, block_size: int, K: int, sampler: str) -> None:
    nats = rep["nats_per_token"]
    assert math.isfinite(nats) and nats > 0
    assert rep["bits_per_token"] == pytest.approx(nats / math.log(2), rel=1e-12)
    assert rep["perplexity_bound"] == pytest.approx(math.exp(nats), rel=1e-12)
    assert math.isfinite(rep["stderr_nats_per_token"]) and rep["stderr_nats_per_token"] > 0
    lo, hi = rep["perplexity_ci95"]
    assert lo < rep["perplexity_bound"] < hi
    assert rep["blocks"] == rep["sequences"] == blocks and rep["block_size"] == block_size
    assert rep["tokens"] == blocks * block_size
    assert rep["num_samples"] == K and rep["time_sampler"] == sampler


@pytest.mark.slow
def test_eval_script_wikitext(bpe_ckpt, cache_dir, tmp_path):
    out = tmp_path / "report.json"
    proc = _run_script("eval.py", [bpe_ckpt, "--data", WIKITEXT, "--max-blocks", 2, "--num-samples", 4,
                                   "--block-size", 32, "--json", out], cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity ≤" in proc.stdout and "nats / token" in proc.stdout and "bits / token" in proc.stdout
    rep = json.loads(out.read_text())
    _check_report(rep, blocks=2, block_size=32, K=4, sampler="stratified")
    assert rep["data"] == str(WIKITEXT) and rep["split"] == "all" and rep["detokenizer"] == "wikitext"
    assert rep["checkpoint"] == str(bpe_ckpt)
    assert rep["tokenizer"]["source"] == str(bpe_ckpt / "tokenizer.json")


@pytest.mark.parametrize("sampler", ["antithetic", "stratified", "iid"])
def test_eval_ptb(bpe_ckpt, capsys, sampler):
    args = [str(bpe_ckpt), "--data", str(PTB), "--max-blocks", "3", "--num-samples", "4", "--block-size", "32",
            "--batch-size", "2", "--time-sampler", sampler, "--json", "-", "--no-progress"]
    assert eval_cli.main(args) == 0
    captured = capsys.readouterr()
    rep = json.loads(captured.out)  # with --json -, stdout is only the JSON ...
    assert "perplexity ≤" in captured.err  # ... and the table goes to stderr
    _check_report(rep, blocks=3, block_size=32, K=4, sampler=sampler)
    assert rep["detokenizer"] == "ptb"


def test_eval_gpt2_tokenizer_directory_split(gpt2_ckpt, capsys):
    args = [str(gpt2_ckpt), "--data", str(PTB.parent), "--tokenizer", str(GPT2_DIR), "--max-blocks", "2",
            "--num-samples", "2", "--block-size", "16", "--json", "-", "--no-progress"]
    assert eval_cli.main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    _check_report(rep, blocks=2, block_size=16, K=2, sampler="stratified")
    assert rep["split"] == "test" and rep["tokenizer"]["vocab_size"] == 50257


def test_eval_pads_or_drops_the_last_block(bpe_ckpt, bpe, tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text("To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n")
    n_tokens = sum(len(bpe.encode(line)) + 1 for line in text.read_text().splitlines())
    assert 32 < n_tokens < 64
    reports = {}
    for mode in ("pad", "drop"):
        assert eval_cli.main([str(bpe_ckpt), "--data", str(text), "--block-size", "32", "--num-samples", "4",
                              "--last-block", mode, "--json", "-", "--no-progress"]) == 0
        reports[mode] = json.loads(capsys.readouterr().out)
    assert reports["pad"]["tokens"] == n_tokens and reports["pad"]["blocks"] == 2
    assert reports["drop"]["tokens"] == 32 and reports["drop"]["blocks"] == 1
    assert math.isfinite(reports["pad"]["nats_per_token"])


def test_eval_public_sedd_protocol_cost_and_progress(bpe_ckpt, bpe, capsys, monkeypatch):
    from sedd.data.public import public_blocks, public_rows

    args = [str(bpe_ckpt), "--data", str(WIKITEXT), "--protocol", "sedd", "--max-blocks", "2", "-K", "4",
            "--block-size", "32", "--batch-size", "2", "--threads", "1", "--json", "-", "--progress"]
    assert eval_cli.main(args) == 0
    captured = capsys.readouterr()
    rep = json.loads(captured.out)
    _check_report(rep, blocks=2, block_size=32, K=4, sampler="stratified")
    assert rep["protocol"] == "sedd" and rep["prior_included"] is True
    assert rep["nats_per_token_without_prior"] == pytest.approx(rep["nats_per_token"] - rep["prior_nats_per_token"])
    assert 0 < rep["prior_nats_per_token"] < rep["nats_per_token"]
    # the blocks are the public pipeline's: rows with EOS, the first two blocks of 32
    expected = public_blocks(public_rows(WIKITEXT, detokenizer="wikitext"), bpe, 32)[:2]
    assert rep["tokens"] == expected.size
    err = captured.err
    assert "cost: 2 block(s) x K = 4 draws = 8 rows of 32 tokens in 4 model call(s) of up to 2 rows" in err, err
    assert re.search(r"draws: +100%.*8/8 \[\d\d:\d\d<", err), err  # one bar over all draws, with an ETA

    # a long run says how to make it shorter
    class SlowClock:
        now = 0.0

        @classmethod
        def perf_counter(cls):
            cls.now += 100.0
            return cls.now

    monkeypatch.setattr(eval_cli, "time", SlowClock)
    assert eval_cli.main([str(bpe_ckpt), "--data", str(PTB), "--max-blocks", "1", "-K", "40",
                          "--block-size", "16", "--batch-size", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "40 model call(s)" in err and "about 67 min" in err and "-K 4" in err and "--max-blocks M" in err, err


def test_make_blocks():
    tokens = np.arange(1, 11)
    blocks, mask = eval_cli.make_blocks(tokens, 4, "pad", None, pad_id=0)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert mask.sum().item() == 10 and mask[2].tolist() == [True, True, False, False]
    blocks, mask = eval_cli.make_blocks(tokens, 4, "drop", None, pad_id=0)
    assert blocks.shape == (2, 4) and bool(mask.all())
    blocks, _ = eval_cli.make_blocks(tokens, 4, "pad", 1, pad_id=0)
    assert blocks.tolist() == [[1, 2, 3, 4]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/no/such/file.txt"], "does not exist"),
        (["--data", "no-such-dataset"], "unknown data source"),
        (["--data", str(PTB), "--split", "test"], "no test split"),
        (["--data", str(PTB), "--time-sampler", "antithetic", "--num-samples", "5"], "must be even"),
        (["--data", str(PTB), "--block-size", "0"], "--block-size must be >= 1"),
        (["--data", str(PTB), "--protocol", "sedd", "--last-block", "pad"], "drop --last-block"),
        (["--data", str(PTB), "--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_eval_bad_input(bpe_ckpt, capsys, args, message):
    if "--num-samples" not in args:
        args = [*args, "--num-samples", "2"]
    assert eval_cli.main([str(bpe_ckpt), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "eval.py: error:" in err and message in err, err


@pytest.mark.slow
def test_eval_dataset_name_offline(bpe_ckpt, cache_dir):
    proc = _run_script("eval.py", [bpe_ckpt, "--data", "wikitext-103", "--num-samples", 2], cache_dir)
    assert proc.returncode == 2
    assert "eval.py: error:" in proc.stderr and "wikitext-103" in proc.stderr and "--data PATH" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_auto_detokenizer_reads_only_the_datasets_own_name(bpe_ckpt, tmp_path, capsys):
    from sedd.data import auto_detokenizer

    text = PTB.read_text()
    for name in ("penny/notes.txt", "wikitext-notes/a.txt", "ptb.test.txt", "notes/ptb/test.txt",
                 "wikitext-103/wiki.test.raw", "data/wikitext-2-raw/valid.txt", "data/test.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    expected = {"penny/notes.txt": None, "wikitext-notes/a.txt": None, "ptb.test.txt": "ptb",
                "notes/ptb/test.txt": "ptb", "wikitext-103/wiki.test.raw": "wikitext",
                "data/wikitext-2-raw/valid.txt": "wikitext", "data/test.txt": None, "wikitext-notes": None,
                "notes/ptb": "ptb"}
    # the folders above the data never count, however they are named
    assert {name: auto_detokenizer(tmp_path / name)[0] for name in expected} == expected
    assert auto_detokenizer("wikitext-103") == ("wikitext", "the dataset wikitext-103's own")

    assert eval_cli.main([str(bpe_ckpt), "--data", str(tmp_path / "penny" / "notes.txt"), "--max-blocks", "1",
                          "-K", "2", "--block-size", "16", "--json", "-", "--no-progress"]) == 0
    captured = capsys.readouterr()
    rep = json.loads(captured.out)
    assert rep["detokenizer"] is None  # was "ptb": "penny" starts like "penn"
    assert rep["detokenizer_reason"] == "auto: the file name 'notes.txt' names no dataset with a detokenizer"
    assert "eval.py: detokenizer none (auto: the file name 'notes.txt' names no dataset" in captured.err


def test_eval_sedd_protocol_reads_a_directory_as_its_split_file(bpe_ckpt, capsys):
    reports = []
    for data in (PTB.parent, PTB):
        assert eval_cli.main([str(bpe_ckpt), "--data", str(data), "--protocol", "sedd", "--max-blocks", "2",
                              "-K", "2", "--block-size", "32", "--json", "-", "--no-progress"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    folder, file = reports
    assert folder["split"] == "test" and folder["detokenizer"] == file["detokenizer"] == "ptb"
    assert folder["tokens"] == file["tokens"] == 64 and folder["nats_per_token"] == file["nats_per_token"]


def test_eval_outputs_and_values_are_checked_before_any_work(bpe_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(eval_cli.cli, "load_checkpoint", lambda args: pytest.fail("loaded before the checks"))
    data = tmp_path / "data.txt"
    data.write_text(PTB.read_text())
    for args, message in [
        (["--data", data, "--json", tmp_path / "missing" / "r.json"], "does not exist"),
        (["--data", data, "--json", tmp_path], "that is a directory"),
        (["--data", data, "--json", data], "is a file of --data"),
        (["--data", PTB.parent, "--json", PTB], "is a file of --data"),
        (["--data", data, "--json", bpe_ckpt / "model.safetensors"], "is a file of the checkpoint"),
        (["--data", data, "--seed", 10**23], "--seed must be in [0, 2**64)"),
        (["--data", data, "--threads", 100000], "--threads must be at most the"),
    ]:
        assert eval_cli.main([str(bpe_ckpt), *map(str, args), "-K", "2", "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("eval.py: error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert data.read_text() == PTB.read_text()
