"""Block diffusion through the entry points: train/run.py --objective block --block-size b (config,
resume, refusals), train/eval.py's bound, train/sample.py and train/quality.py (the KV cache,
--stop-at-eos, any length without windows), generate, and the harness model, all in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sedd import generate, generate_samples, load_pretrained
from sedd.data import get_corpus, get_tokenizer, tokenize
from sedd.likelihood import make_blocks
from sedd.model import SEDD, ARModel, BlockSEDD
from sedd.objectives import objective_of
from tests.helpers import tiny_judge
from train import eval as eval_cli
from train import quality
from train import run as run_cli
from train import sample as sample_cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason=f"test text {TEXT} is missing")

TINY = [
    "--data", str(TEXT), "--tokenizer", "bpe:512", "--objective", "block", "--block-size", "8",
    "--hidden-size", "32", "--cond-dim", "16", "--n-blocks", "1", "--n-heads", "2", "--length", "32",
    "--batch-size", "4", "--global-batch", "4", "--warmup-steps", "2", "--lr", "3e-3",
    "--val-blocks", "8", "--eval-every", "5", "--log-every", "1", "--ckpt-every", "5",
    "--num-samples", "1", "--sample-length", "40", "--threads", "1",
]


@pytest.fixture(scope="module")
def cache_dir(sedd_cache):
    return sedd_cache  # the session's: the BPE and token streams tests/test_train.py builds too


@pytest.fixture(autouse=True)
def _env(cache_dir, monkeypatch, one_thread):
    monkeypatch.setenv("SEDD_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def train(*args) -> int:
    """train/run.py in this process: its exit status."""
    try:
        run_cli.main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        torch.set_num_threads(1)
    return 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("block") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEDD_CACHE", str(cache_dir))
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert train(*TINY, "--max-steps", 10, "--out", out) == 0
    return out


def test_training_writes_a_block_checkpoint(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["objective"] == "block" and config["graph"] == {"type": "absorb"}
    assert config["model"]["block_size"] == 8 and config["model"]["time_conditioning"] is False
    assert not {"sample_steps", "block_size"} & set(config["training"])  # the model section holds b
    assert config["training"]["mask_rate_range"] == "0.3,0.8"  # auto, settled for b = 8: what trained
    state = torch.load(trained / "training_state.pt", weights_only=False)
    assert state["cfg"]["block_size"] == 8 and state["cfg"]["time_conditioning"] == "off"
    p = load_pretrained(str(trained), device="cpu")
    assert isinstance(p.model, BlockSEDD) and p.objective == "block" and p.model.block_size == 8
    assert p.graph.absorbing and objective_of(p.model).block_size == 8
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_loss_per_sequence"] for m in metrics if "val_loss" in m]
    # the masked blocks' score entropy starts near the uniform guess of every masked token, and falls
    assert len(vals) == 3 and vals[-1] < vals[0] - 2
    assert "blocks of 8" in (trained / "samples.txt").read_text()


def test_resume_is_exact_and_keeps_the_block_size(trained, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert train(*TINY, "--max-steps", 5, "--out", out) == 0
    assert train("--resume", "--out", out, "--max-steps", 10) == 0
    assert (out / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    capsys.readouterr()
    for args, message in [(["--block-size", "4"], "cannot change block_size"),
                          (["--objective", "sedd"], "cannot change objective"),
                          (["--sample-steps", "4"], "--sample-steps applies to the diffusion objective only")]:
        assert train("--resume", "--out", out, "--max-steps", 12, *args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert train("--resume", "--out", out, "--max-steps", 12, "--graph", "absorb") == 0  # what it implies


def test_both_settings_round_trip_through_config_and_resume(tmp_path, capsys):
    """Per-block sigma and the clipped mask-rate range: recorded in config.json (the model section,
    the training section), read back by the objective, kept by --resume (a resumed run's weights
    are the straight run's), the range changeable on resume and sigma frozen."""
    flags = ["--time-conditioning", "on", "--mask-rate-range", "0.3,0.8", "--eval-every", 0, "--num-samples", 0]
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    assert train(*TINY, *flags, "--max-steps", 6, "--out", straight) == 0
    assert train(*TINY, *flags, "--max-steps", 3, "--out", out) == 0
    assert train("--resume", "--out", out, "--max-steps", 6) == 0
    assert (out / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["time_conditioning"] is True and config["training"]["mask_rate_range"] == "0.3,0.8"
    assert "mask_rate_range" not in config["model"]
    p = load_pretrained(str(out), device="cpu")
    objective = objective_of(p.model)
    assert p.model.time_conditioning and objective.mask_rate_range == (0.3, 0.8)
    assert "sigma per block" in objective.describe() and "mask rates in [0.3, 0.8]" in objective.describe()
    capsys.readouterr()
    assert train("--resume", "--out", out, "--max-steps", 7, "--time-conditioning", "off") == 2
    err = capsys.readouterr().err
    assert "cannot change time_conditioning" in err and len(err.strip().splitlines()) == 1, err
    assert train("--resume", "--out", out, "--max-steps", 7, "--mask-rate-range", "0.2,0.9") == 0
    assert json.loads((out / "config.json").read_text())["training"]["mask_rate_range"] == "0.2,0.9"
    assert train("--resume", "--out", out, "--max-steps", 8, "--mask-rate-range", "0.9,0.2") == 2
    assert "--mask-rate-range must be auto or BETA,OMEGA with 0 <= BETA < OMEGA <= 1, got '0.9,0.2'" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--block-size", "5"], "--objective block: --block-size 5 must divide --length 32"),
    (["--block-size", "0"], "--block-size must be a positive integer"),
    (["--graph", "uniform"], "--graph uniform cannot run: it takes --graph absorb"),
    (["--mask-rate-range", "0.5,0.5"], "--objective block: --mask-rate-range must be auto or BETA,OMEGA with 0 <= BETA < "
                                       "OMEGA <= 1, got '0.5,0.5'"),
    (["--mask-rate-range", "0.4"], "--mask-rate-range must be auto or BETA,OMEGA"),
    (["--objective", "sedd", "--mask-rate-range", "0.4,0.9", "--block-size", "8"],
     "--objective sedd: --block-size, --mask-rate-range apply to the block-diffusion objective only"),
    (["--sample-steps", "4"], "--sample-steps applies to the diffusion objective only"),
    (["--objective", "ar"], "--objective ar: --block-size applies to the block-diffusion objective only"),
    (["--objective", "sedd"], "--objective sedd: --block-size applies to the block-diffusion objective only"),
])
def test_bad_combinations_are_one_line_and_exit_2_before_any_work(tmp_path, capsys, args, message):
    assert train(*TINY, *args, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("b,rates", [(1, "0.45,0.95"), (4, "0.45,0.95"), (8, "0.3,0.8"), (16, "0.3,0.8"), (32, "0,1")])
def test_auto_mask_rates_by_block_size_and_no_sigma_by_default(b, rates):
    from train.config import resolve_config

    cfg = resolve_config({"objective": "block", "block_size": b, "length": 32}, "cpu", None, 1)
    assert cfg["mask_rate_range"] == rates and cfg["time_conditioning"] == "off"
    given = resolve_config({"objective": "block", "block_size": b, "length": 32, "mask_rate_range": "0,1",
                            "time_conditioning": "on"}, "cpu", None, 1)
    assert given["mask_rate_range"] == "0,1" and given["time_conditioning"] == "on"  # the command line wins
    assert resolve_config({}, "cpu", None, 1)["time_conditioning"] == "on"  # SEDD's default unchanged


def test_the_implied_flags_may_be_given(tmp_path):
    out = tmp_path / "explicit"
    assert train(*TINY, "--graph", "absorb", "--time-conditioning", "off", "--max-steps", 1, "--eval-every", 0,
                 "--num-samples", 0, "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["model"]["block_size"] == 8


def test_eval_reports_the_bound_for_any_evaluation_length(trained, capsys, tmp_path):
    report = tmp_path / "eval.json"
    argv = [str(trained), "--data", str(TEXT), "--max-blocks", "3", "--block-size", "20", "-K", "4", "--seed", "3",
            "--json", str(report), "--no-progress"]
    assert eval_cli.main(argv) == 0
    assert "perplexity ≤" in capsys.readouterr().out
    got = json.loads(report.read_text())
    assert got["objective"] == "block" and not got["exact"] and got["tokens"] == 60 and got["stderr_nats_per_token"] > 0
    assert got["model"].startswith("block diffusion, blocks of 8 tokens")  # the model's b, beside the data's block_size
    # 20 is no multiple of b = 8: the blocks are padded to 24, and the padding is read by no one
    p = load_pretrained(str(trained), device="cpu")
    tok = get_tokenizer(str(trained / "tokenizer.json"))
    blocks, mask = make_blocks(tokenize(get_corpus(str(TEXT), "all"), tok), 20, "pad", 3, tok.eos_id)
    objective = objective_of(p.model)
    values = []
    for pad in (0, 7):
        x0 = torch.cat([blocks, torch.full((3, 4), pad)], 1)
        m = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
        out = objective.sequence_bounds(p.model, x0, attention_mask=m, num_samples=4, batch_size=4,
                                        generator=torch.Generator().manual_seed(3))
        values.append(out["integral"] + out["prior"])
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    assert got["nats_per_token"] == pytest.approx(float(values[0].sum()) / 60, rel=1e-9)
    # the model's own length, whole blocks: nothing padded
    assert eval_cli.main([str(trained), "--data", str(TEXT), "--max-blocks", "2", "-K", "2", "--json", str(report),
                          "--no-progress"]) == 0
    assert json.loads(report.read_text())["tokens"] == 64


def test_sample_any_length_the_kv_cache_and_the_stop_at_eos(trained, capsys):
    base = [str(trained), "--prefix", "ROMEO:", "--batch-size", "3", "--seed", "4", "--steps", "4", "--top-p", "0.9",
            "--json", "-"]

    def sample(*extra):
        assert sample_cli.main([*base, *extra]) == 0
        out = capsys.readouterr()
        return json.loads(out.out), out.err

    long, err = sample("--length", "70")  # past the 32-token training length: one call, no windows
    assert "windows" not in err and long["window"] == 32 and long["stride"] is None
    assert long["sampler"] == "analytic" and long["steps"] == 4 and long["kv_cache"] is True
    assert long["stop_at_eos"] is False and all(len(s["tokens"]) == 70 for s in long["samples"])
    again, _ = sample("--length", "70", "--no-kv-cache")  # re-running the prefix: the same tokens
    assert [s["tokens"] for s in again["samples"]] == [s["tokens"] for s in long["samples"]]
    assert again["kv_cache"] is False
    stopped, _ = sample("--length", "70", "--stop-at-eos")
    eos = get_tokenizer(str(trained / "tokenizer.json")).eos_id
    assert stopped["stop_at_eos"] is True
    for s, full in zip(stopped["samples"], long["samples"]):
        tokens = s["tokens"]
        assert eos not in tokens[:-1] and (tokens[-1] == eos or len(tokens) == 70)
    # the same generator draws the same first block, whether or not the sampler stops in it or later
    for s, f in zip(stopped["samples"], long["samples"]):
        n = min(8, len(s["tokens"]))
        assert s["tokens"][:n] == f["tokens"][:n]


@pytest.mark.parametrize("args,message", [
    (["--temperature", "0.5"], "--temperature applies to autoregressive models"),
    (["--stride", "8"], "--stride applies to diffusion and autoregressive models"),
    (["--window", "4"], "--window 4 is shorter than one block (8 tokens)"),
])
def test_sample_refuses_what_a_block_checkpoint_does_not_read(trained, capsys, args, message):
    assert sample_cli.main([str(trained), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_stop_at_eos_is_refused_where_no_sampler_reads_it(tmp_path, capsys):
    tok = get_tokenizer("bytes")
    for model in (SEDD(SEDD.config_for("cpu", tokens=tok.vocab_size, n_blocks=1, length=16)),
                  ARModel(ARModel.config_for("cpu", tokens=tok.vocab_size, n_blocks=1, length=16))):
        with pytest.raises(ValueError, match="stop_at_eos applies to block-diffusion models"):
            generate(model, "a", length=8, tokenizer=tok, stop_at_eos=True)
    SEDD(SEDD.config_for("cpu", tokens=tok.vocab_size, n_blocks=1, length=16)).save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    assert sample_cli.main([str(tmp_path), "--stop-at-eos"]) == 2
    assert "--stop-at-eos applies to block-diffusion models" in capsys.readouterr().err


def test_generate_stops_at_eos_and_takes_any_length(trained):
    p = load_pretrained(str(trained), device="cpu")
    eos = p.tokenizer.eos_id
    with torch.no_grad():
        p.model.output_layer.linear.bias[eos] += 4.0  # an EOS in most samples, not at once
    samples = generate_samples(p, "ROMEO:", num_samples=6, length=80, seed=0, steps=4, stop_at_eos=True)
    ends = [len(s.tokens) for s in samples]
    assert min(ends) < 80 and all(s.tokens[-1] == eos for s in samples if len(s.tokens) < 80)
    assert all(eos not in s.tokens[2:-1] for s in samples)  # ("ROMEO:" is two tokens)
    assert all(s.text.startswith("ROMEO:") for s in samples)
    # without the stop: every sample holds 80 tokens, and a stopped one is its prefix
    full = generate_samples(p, "ROMEO:", num_samples=6, length=80, seed=0, steps=4)
    assert all(len(f.tokens) == 80 for f in full)
    assert all(f.tokens[: min(8, len(s.tokens))] == s.tokens[:8] for f, s in zip(full, samples))


def test_quality_scores_stopped_samples_up_to_their_eos(trained, tmp_path, capsys):
    judge = tmp_path / "judge"
    tiny_judge(get_tokenizer(str(trained / "tokenizer.json")), judge)
    report = tmp_path / "q.json"
    argv = [str(trained), "--judge", str(judge), "--num-samples", "3", "--batch-size", "3", "--length", "48",
            "--steps", "2,8", "--json", str(report), "--no-progress"]
    assert quality.main([*argv, "--stop-at-eos"]) == 0
    got = json.loads(report.read_text())
    assert got["objective"] == "block" and got["sampler"] == "analytic" and got["stop_at_eos"] is True
    assert [r["steps"] for r in got["records"]] == [2, 8]
    for r in got["records"]:
        assert 1 <= r["mean_length"] <= 48 and r["tokens_per_s"] > 0 and r["gen_ppl"] > 1
        assert r["tokens_per_s"] == pytest.approx(r["mean_length"] * 3 / r["wall_s"])
    assert quality.main(argv) == 0
    assert all(r["mean_length"] == 48 for r in json.loads(report.read_text())["records"])
    # without --steps: b/4, b/2 and b steps per block (a quarter, half and one evaluation per
    # token), not SEDD's 16, 32, 64 per window, which would cost up to 8 evaluations per token here
    argv = [str(trained), "--judge", str(judge), "--num-samples", "2", "--batch-size", "2", "--length", "16",
            "--json", str(report), "--no-progress"]
    assert quality.main(argv) == 0
    assert [r["steps"] for r in json.loads(report.read_text())["records"]] == [2, 4, 8]
    capsys.readouterr()


def test_the_harness_answers_for_a_block_checkpoint(trained):
    from lm_eval.api.instance import Instance

    from sedd.harness import SEDDLM

    lm = SEDDLM(pretrained=str(trained), device="cpu", mc_samples=4, batch_size=8)
    (ll, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("ROMEO: To be", " or not"), 0)])
    assert math.isfinite(ll) and ll < 0 and isinstance(greedy, bool) and lm.estimates[-1]["stderr"] > 0
    # is_greedy: with the continuation masked, the most likely token of each of its positions given
    # the clean blocks before it (a window of whole blocks: nothing padded)
    p = lm.pre
    x0 = torch.tensor([p.tokenizer.encode("ROMEO: To be, or not to be, that is the question:")[:16]])
    score = lm.objective.continuation(p.model, x0, 5, num_samples=4, time_sampler="stratified", batch_size=8,
                                      generator=torch.Generator().manual_seed(0))
    x_t = x0.clone()
    x_t[:, 5:] = p.graph.mask_id
    # each block at the noise level at which its masked fraction (3/8, then 8/8) is masked on average
    noise = lm.objective.noise
    top = float(noise.total(torch.tensor(1.0)))
    sigma = torch.tensor([[-math.log1p(-3 / 8), top]])
    assert sigma[0, 0] > float(noise.total(torch.tensor(lm.objective.training["sampling_eps"])))
    with torch.no_grad():
        want = p.model(x_t, x0, sigma, raw=True)[0, 5:, : p.graph.N].argmax(-1)
    assert x0.shape[1] % 8 == 0 and score.greedy == torch.equal(want, x0[0, 5:])
    assert math.isfinite(score.nll) and score.nll > 0 and score.variance > 0
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("To be, or not to be",), 0)])
    assert math.isfinite(rolling) and rolling < 0
    (text,) = lm.generate_until([Instance("generate_until", {}, ("ROMEO:", {"max_gen_toks": 40, "until": ["\n\n"],
                                                                            "steps": 2}), 0)])
    assert isinstance(text, str)


def test_a_block_models_default_length_is_its_own_whatever_the_window(trained):
    # window bounds the context a block reads; it is not the length of a sample, as it is for the
    # windowing samplers (where the default sample is one window)
    p = load_pretrained(str(trained), device="cpu")
    (s,) = generate_samples(p, "ROMEO:", length=None, window=16, seed=0, steps=2)
    assert len(s.tokens) == p.model.length
