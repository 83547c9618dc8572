"""The fewer-evaluation options of the sampling entry points: train/sample.py and train/quality.py
take --predictor first_hitting, --cache and --tokens-per-step and report each sample's NFE.

Two untrained checkpoints with the byte tokenizer (so nothing is trained or downloaded), one
without time conditioning and one with; the judge of quality.py is the session's tiny random
GPT-2 (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sedd.data import get_tokenizer
from sedd.model import SEDD
from tests.helpers import small_model_config
from train import quality
from train import sample as sample_cli

L = 16


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch, one_thread):
    monkeypatch.setenv("SEDD_CACHE", str(tmp_path_factory.getbasetemp() / "sedd_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _checkpoint(folder: Path, time_conditioning: bool, graph: str = "absorb") -> Path:
    torch.manual_seed(0)
    model = SEDD(small_model_config(get_tokenizer("bytes").vocab_size, graph=graph, length=L, n_blocks=1,
                                    hidden_size=32, cond_dim=16, n_heads=2, time_conditioning=time_conditioning))
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def free_ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("free"), time_conditioning=False)


@pytest.fixture(scope="module")
def conditioned_ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("conditioned"), time_conditioning=True)


@pytest.fixture(scope="module")
def uniform_ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("uniform"), time_conditioning=True, graph="uniform")


def _sample(capsys, ckpt, *args) -> dict:
    argv = [str(ckpt), "--tokenizer", "bytes", "--device", "cpu", "--length", str(L), "--batch-size", "3",
            "--seed", "4", "--no-progress", "--json", "-", *map(str, args)]
    assert sample_cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_sample_first_hitting_reports_its_evaluations(capsys, free_ckpt):
    out = _sample(capsys, free_ckpt, "--predictor", "first_hitting", "--tokens-per-step", 3, "--prefix", "ab")
    assert [s["nfe"] for s in out["samples"]] == [-(-(L - 2) // 3)] * 3
    assert out["sampler"] == "first_hitting" and out["tokens_per_step"] == 3
    # the record says what ran: no step count (it was "steps": 16), no cache, no denoiser
    assert out["steps"] is None and out["cache"] is None and out["denoiser"] is None
    assert _sample(capsys, free_ckpt, "--predictor", "first_hitting")["tokens_per_step"] == 1
    assert _sample(capsys, free_ckpt)["steps"] == L  # the analytic sampler's default, as it ran


def test_sample_cache_draws_the_same_tokens_with_fewer_evaluations(capsys, free_ckpt):
    plain = _sample(capsys, free_ckpt, "--steps", 40)
    cached = _sample(capsys, free_ckpt, "--steps", 40, "--cache")
    assert [s["tokens"] for s in cached["samples"]] == [s["tokens"] for s in plain["samples"]]
    assert cached["cache"] is True and cached["nfe_mean"] < plain["nfe_mean"] <= 41


@pytest.mark.parametrize("args, message", [
    (["--cache"], "--time-conditioning off"),
    (["--tokens-per-step", "0", "--predictor", "first_hitting"], "--tokens-per-step must be a positive integer"),
    (["--tokens-per-step", "2"], "applies to the first_hitting predictor"),
    (["--predictor", "first_hitting", "--steps", "8"], "--steps does not apply to first_hitting"),
    (["--cache", "sometimes"], "invalid choice"),
])
def test_sample_bad_options(capsys, conditioned_ckpt, args, message):
    code = sample_cli.main([str(conditioned_ckpt), "--tokenizer", "bytes", "--device", "cpu", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len([line for line in err.splitlines() if "error" in line]) == 1


def test_first_hitting_on_a_uniform_checkpoint_is_one_line_before_any_work(capsys, uniform_ckpt, judge_dir,
                                                                           monkeypatch):
    """Was a traceback (exit 1) from inside the sampler, in quality.py after the judge had loaded."""
    monkeypatch.setattr(sample_cli, "sample_blockwise", lambda *a, **k: pytest.fail("sampled"))
    monkeypatch.setattr(quality, "load_judge", lambda *a, **k: pytest.fail("the judge loaded"))
    common = ["--tokenizer", "bytes", "--device", "cpu", "--sampler", "first_hitting"]
    assert sample_cli.main([str(uniform_ckpt), *common]) == 2
    assert quality.main([str(uniform_ckpt), "--judge", str(judge_dir), *common]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    want = "error: --sampler first_hitting samples the absorbing graph only; this model uses the uniform graph"
    assert lines == [f"sample.py: {want}", f"quality.py: {want}"]


@pytest.mark.parametrize("cache", ["on", "approximate"])
def test_the_cache_with_first_hitting_is_refused(capsys, free_ckpt, judge_dir, cache):
    """Was accepted and silently did nothing, while the JSON recorded "cache": "on"."""
    common = ["--tokenizer", "bytes", "--device", "cpu", "--sampler", "first_hitting", "--cache", cache]
    assert sample_cli.main([str(free_ckpt), *common]) == 2
    assert quality.main([str(free_ckpt), "--judge", str(judge_dir), *common]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("error: --cache does not apply to first_hitting" in line for line in lines)


def test_quality_records_nfe(capsys, free_ckpt, judge_dir):
    common = [str(free_ckpt), "--judge", str(judge_dir), "--tokenizer", "bytes", "--device", "cpu",
              "--num-samples", "3", "--batch-size", "2", "--no-progress", "--json", "-"]
    assert quality.main([*common, "--predictor", "first_hitting", "--tokens-per-step", "4,1"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]  # one per count, in increasing order
    assert [(r["tokens_per_step"], r["steps"], r["nfe"]) for r in records] == [(1, None, L), (4, None, L / 4)]
    assert quality.main([*common, "--steps", "40", "--cache"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cache"] is True and result["records"][0]["nfe"] < 41


def test_eval_loads_a_model_without_time_conditioning(capsys, free_ckpt, tmp_path):
    """The flag travels in config.json: eval.py builds the σ-free network (a σ-conditioned one would
    refuse the weights: no sigma_map) and bounds the data with it."""
    from train import eval as eval_cli

    text = tmp_path / "small.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 3)
    args = [str(free_ckpt), "--data", str(text), "--tokenizer", "bytes", "--device", "cpu", "--num-samples", "2",
            "--block-size", str(L), "--max-blocks", "2", "--json", "-", "--no-progress"]
    assert eval_cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["nats_per_token"] < float("inf")


def test_sample_and_quality_take_the_adaptive_rules(capsys, free_ckpt, judge_dir):
    """--threshold / --entropy-bound (issue 33): recorded, one quality record per value of a list,
    each with its NFE; no position of the untrained model is 99% sure, every one is 0.1% sure."""
    out = _sample(capsys, free_ckpt, "--predictor", "first_hitting", "--entropy-bound", 1000, "--prefix", "ab")
    assert out["entropy_bound"] == 1000 and out["threshold"] is None and out["tokens_per_step"] == 1
    assert [s["nfe"] for s in out["samples"]] == [1] * 3  # every free position joins the first event
    common = [str(free_ckpt), "--judge", str(judge_dir), "--tokenizer", "bytes", "--device", "cpu",
              "--num-samples", "3", "--batch-size", "2", "--no-progress", "--json", "-", "--predictor", "first_hitting"]
    assert quality.main([*common, "--threshold", "0.99,0.001"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["threshold"], r["entropy_bound"], r["nfe"]) for r in result["records"]] == [(0.001, None, 1),
                                                                                            (0.99, None, L)]
    assert "threshold" not in result and result["sampler"] == "first_hitting"


@pytest.mark.parametrize("args, message", [
    (["--threshold", "0"], "--threshold must be a number in (0, 1], got 0.0"),
    (["--entropy-bound", "-1"], "--entropy-bound must be a finite number >= 0, got -1.0"),
    (["--threshold", "0.9", "--entropy-bound", "1"], "--threshold and --entropy-bound cannot be combined"),
    (["--threshold", "0.9", "--tokens-per-step", "2"], "--tokens-per-step and --threshold cannot be combined"),
])
def test_bad_adaptive_options_are_one_line(capsys, free_ckpt, judge_dir, args, message):
    common = ["--tokenizer", "bytes", "--device", "cpu", "--predictor", "first_hitting", *args]
    assert sample_cli.main([str(free_ckpt), *common]) == 2
    assert quality.main([str(free_ckpt), "--judge", str(judge_dir), *common]) == 2
    assert quality.main([str(free_ckpt), "--judge", str(judge_dir), *common[:-2], "--threshold", "0.5,x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(message in line for line in lines[:2]), lines
    assert "--threshold expects comma-separated numbers" in lines[2]
