"""The training entry point, train/run.py: its outputs, resume, refusals and messages.

A tiny model (one block of width 32) on 32-token blocks of Shakespeare with a 512-id BPE trained on
that text, so each run takes a second or two on a CPU. Most cases call ``main(argv)`` in this
process (tests.helpers.run_main: exit status, stdout and stderr as a subprocess gives them); the
ones that need a process of their own run it the way users do, `python train/run.py ...` in a
subprocess, and are marked slow: a run killed with SIGKILL and resumed, torchrun's two processes,
and the other entry points on the trained checkpoint. The cache (tokenizer, token streams) is the
session's (``sedd_cache`` in tests/conftest.py), shared with tests/test_cli_ar.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import run_main
from train import run as run_cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "run.py"
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason=f"test text {TEXT} is missing")

TINY = [
    "--data", str(TEXT), "--tokenizer", "bpe:512",
    "--hidden-size", "32", "--cond-dim", "16", "--n-blocks", "1", "--n-heads", "2", "--length", "32",
    "--batch-size", "4", "--global-batch", "4", "--warmup-steps", "2", "--lr", "3e-3",
    "--val-blocks", "8", "--eval-every", "5", "--log-every", "1", "--ckpt-every", "5",
    "--num-samples", "1", "--sample-length", "16", "--sample-steps", "4", "--threads", "1",
]
FILES = ["config.json", "model.safetensors", "tokenizer.json", "training_state.pt", "metrics.jsonl", "loss.png",
         "samples.txt"]


@pytest.fixture(scope="module")
def env(sedd_cache):
    return dict(os.environ, SEDD_CACHE=str(sedd_cache), PYTHONUNBUFFERED="1")


def train(env, *args, launcher=(), timeout=300):
    """`python train/run.py ARGS` in a subprocess (``launcher``: e.g. torchrun's module)."""
    cmd = [sys.executable, *launcher, str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def train_here(env, *args, **more_env):
    """train/run.py's ``main(ARGS)`` in this process, with the module's cache (and ``more_env``)."""
    return run_main(run_cli.main, args, env={"SEDD_CACHE": env["SEDD_CACHE"], **more_env})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def deterministic(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics]


def snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("training_state.pt", "model.safetensors", "config.json")}


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    """A finished 10-step run: (output directory, completed process)."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = train_here(env, *TINY, "--max-steps", 10, "--out", out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_end_to_end(trained):
    from sedd.data import get_tokenizer
    from sedd.model import SEDD

    out, result = trained
    for name in FILES:
        assert (out / name).is_file(), f"{name} missing; {sorted(p.name for p in out.iterdir())}"
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Samples are printed and saved.
    assert "--- sample 1 ---" in result.stdout
    assert (out / "samples.txt").read_text() in result.stdout
    assert re.search(r"sampling:\s+\d+%.*\| \d+/4 \[", result.stderr), result.stderr[-2000:]  # per-step bar

    # One metrics line per step (log_every 1), validation at 0, 5, 10.
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(11))
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 5, 10]
    for m in metrics[1:]:
        assert {"loss", "loss_per_sequence", "lr", "grad_norm", "tokens_per_s"} <= m.keys()
        assert all(isinstance(v, (int, float)) for v in m.values())
    # the log's units: nats per token with the perplexity bound (issue 32, item 13)
    assert re.search(r"step 5: val loss \d+\.\d+ nats/token, perplexity <= \d", result.stdout), result.stdout
    assert metrics[5]["val_loss"] == pytest.approx(metrics[5]["val_loss_per_sequence"] / 32)

    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 10
    assert config["graph"]["type"] == "absorb" and config["noise"]["type"] == "loglinear"
    assert config["model"]["hidden_size"] == 32 and config["model"]["length"] == 32
    assert config["tokenizer"] == "bpe:512" and config["data"] == str(TEXT)
    assert config["training"]["max_steps"] == 10 and config["training"]["grad_accum"] == 1

    tok = get_tokenizer(str(out))
    assert tok.vocab_size == config["tokens"] == 512

    # The checkpoint loads with the public loader, and holds the EMA weights.
    model = SEDD.from_pretrained(out)
    state = torch.load(out / "training_state.pt", map_location="cpu", weights_only=True)
    weights = model.state_dict()  # the public layout (the aligned head's padding is in memory only)
    for name in dict(model.named_parameters()):
        assert torch.equal(weights[name], state["ema"][name]), name
    assert not all(torch.equal(state["model"][k], state["ema"][k]) for k in state["ema"])
    x = torch.tensor([tok.encode("To be, or not to be")])
    score = model(x, torch.tensor([1.0]))
    assert score.shape == (1, x.shape[1], 513) and torch.isfinite(score).all()


@pytest.mark.slow
def test_sample_and_eval_the_trained_checkpoint(env, trained, tmp_path):
    """The trained run's directory is all the other entry points need: sample with a prompt, then bound it."""
    out, _ = trained
    run = lambda name, *args: subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "train" / name), str(out), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    sampled = run("sample.py", "--prefix", "ROMEO:", "--length", 16, "--steps", 4, "--batch-size", 2,
                  "--seed", 1, "--json", tmp_path / "samples.json", "--no-progress")
    assert sampled.returncode == 0, sampled.stderr
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert "===== sample 2/2 =====" in sampled.stdout
    assert all(text.startswith("ROMEO:") for text in (s["text"] for s in samples["samples"]))

    evaluated = run("eval.py", "--data", TEXT, "--max-blocks", 2, "--num-samples", 4, "--block-size", 32,
                    "--json", tmp_path / "bound.json", "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "bound.json").read_text())
    assert report["checkpoint"] == str(out) and report["tokens"] == 64
    assert 0 < report["nats_per_token"] < 50 and report["perplexity_bound"] > 1


@pytest.mark.slow
def test_interrupt_and_resume_is_exact(env, tmp_path):
    steps = 40
    args = [*TINY, "--max-steps", steps]
    a, b = tmp_path / "a", tmp_path / "b"
    result = train_here(env, *args, "--out", a)  # the uninterrupted run: here, as a process of its own would
    assert result.returncode == 0, result.stderr

    # Kill run b for real (SIGKILL, no clean-up) as soon as its first checkpoint is on disk.
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args), "--out", str(b)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (b / "training_state.pt").exists():
        assert proc.poll() is None, f"run b exited ({proc.returncode}) before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(b / "training_state.pt", map_location="cpu", weights_only=True)["step"]
    assert 0 < killed_at < steps

    result = train(env, *args, "--out", b, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resumed from {b} at step {killed_at}" in result.stdout

    # Same losses, learning rates, gradient norms and validation losses at every step, and the
    # same weights, EMA and optimizer state at the end.
    assert deterministic(read_metrics(b)) == deterministic(read_metrics(a))
    assert [m["step"] for m in read_metrics(b)] == list(range(steps + 1))
    sa, sb = (torch.load(d / "training_state.pt", map_location="cpu", weights_only=True) for d in (a, b))
    assert sa["step"] == sb["step"] == steps
    for part in ("model", "ema"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), (part, k)
    for k, v in sa["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(v[name], sb["optimizer"]["state"][k][name]), (k, name)
    assert sa["data"] == sb["data"]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_torchrun_two_processes(env, tmp_path):
    out = tmp_path / "ddp"
    # no --batch-size: the preset's 16 does not divide a global batch of 8 over 2 processes, so
    # the micro-batch is derived (4)
    tiny = [a for i, a in enumerate(TINY) if "--batch-size" not in TINY[max(i - 1, 0): i + 1]]
    args = [*tiny, "--global-batch", 8, "--ckpt-every", 3, "--out", out]
    result = train(env, *args, "--max-steps", 6,
                   launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"))
    assert result.returncode == 0, result.stderr + result.stdout
    # The script compares a checksum of the weights across ranks at every checkpoint.
    assert result.stdout.count("weights identical on all 2 ranks") == 2
    # Only rank 0 prints and writes: every line once, every metrics step once.
    assert result.stdout.count("--- sample 1 ---") == 1
    assert result.stdout.count("model: ") == 1
    assert [m["step"] for m in read_metrics(out)] == list(range(7))
    assert not list(out.glob(".*.tmp"))
    for name in FILES:
        assert (out / name).is_file(), name
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["world_size"] == 2 and training["batch_size"] == 4 and training["grad_accum"] == 1
    assert training["global_batch"] == 8
    ddp_val0 = read_metrics(out)[0]["val_loss"]

    # Elastic resume: the 2-process run continues with 1 process (2 micro-batches per step), the
    # global data position re-split.
    resumed = train_here(env, *args, "--max-steps", 8, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out} at step 6" in resumed.stdout
    assert [m["step"] for m in read_metrics(out)] == list(range(9))
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["world_size"] == 1 and training["grad_accum"] == 2

    # ... then with a micro-batch of the whole global batch (--batch-size may change on resume) ...
    resumed = train_here(env, *args, "--max-steps", 9, "--resume", "--batch-size", 8)
    assert resumed.returncode == 0, resumed.stderr
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["world_size"] == 1 and training["batch_size"] == 8 and training["grad_accum"] == 1

    # ... and upward again, on 2 processes: the micro-batch of 8 is derived down to 4 (was refused:
    # "pass --global-batch as a multiple of 16", and --global-batch is frozen)
    resumed = train(env, *args, "--max-steps", 10, "--resume",
                    launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"))
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"resumed from {out} at step 9" in resumed.stdout
    assert [m["step"] for m in read_metrics(out)] == list(range(11))
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["world_size"] == 2 and training["batch_size"] == 4 and training["grad_accum"] == 1

    # Validation draws are seeded by block: one process sees the same number at step 0.
    single = train_here(env, *args[:-1], tmp_path / "single", "--max-steps", 1, "--num-samples", 0)
    assert single.returncode == 0, single.stderr
    assert read_metrics(tmp_path / "single")[0]["val_loss"] == pytest.approx(ddp_val0, rel=1e-5)


def test_resume_derives_the_micro_batch_for_any_number_of_processes():
    from train.config import UsageError, resolve_config

    one = resolve_config({"batch_size": 8, "global_batch": 8}, None, None, 1)  # a 1-process run
    assert (one["batch_size"], one["grad_accum"]) == (8, 1)
    for world, flags, batch, accum in [(2, {}, 4, 1), (8, {}, 1, 1), (2, {"batch_size": 2}, 2, 2),
                                       (1, {"batch_size": 2}, 2, 4), (4, {"global_batch": 8}, 2, 1)]:
        cfg = resolve_config(flags, None, one, world)
        assert (cfg["batch_size"], cfg["grad_accum"], cfg["global_batch"]) == (batch, accum, 8), (world, flags)
    # the checkpoint's micro-batch is the largest it may become: 4 processes of a 2-process run
    # (micro-batch 2, global 16) accumulate 2 micro-batches of 2, not 1 of 4
    two = resolve_config({"batch_size": 2, "global_batch": 16}, None, None, 2)
    assert (two["batch_size"], two["grad_accum"]) == (2, 4)
    assert (resolve_config({}, None, two, 4)["batch_size"], resolve_config({}, None, two, 4)["grad_accum"]) == (2, 2)

    # what cannot run says what can, and that works
    with pytest.raises(UsageError, match=r"does not divide over 3 processes; resume on a number of processes "
                                         r"that divides it \(1, 2, 4, 8\)"):
        resolve_config({}, None, one, 3)
    with pytest.raises(UsageError, match=r"--batch-size 3 does not divide .* pass a --batch-size that divides 4 "
                                         r"\(1, 2, 4\), or none"):
        resolve_config({"batch_size": 3}, None, one, 2)
    with pytest.raises(UsageError, match="cannot change global_batch"):
        resolve_config({"global_batch": 16}, None, one, 2)
    with pytest.raises(UsageError, match="--global-batch 8 does not divide over 3 processes: pass a --global-batch "
                                         "that is a multiple of 3"):
        resolve_config({"global_batch": 8}, None, None, 3)


def test_an_error_is_printed_by_rank_0_only(env, trained, tmp_path):
    """Every rank meets the same bad input; under torchrun (simulated here by its variables) only
    rank 0 says so, before the processes connect."""
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    results = {}
    for rank in (0, 1, 2):
        ranked = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=3, LOCAL_WORLD_SIZE=3)
        results[rank] = (train_here(env, *TINY, "--max-steps", 20, "--out", out, "--resume", **ranked),
                         train_here(env, *TINY, "--preset", "huge", "--out", out, **ranked))
    for rank, (resumed, bad_flag) in results.items():
        assert resumed.returncode == bad_flag.returncode == 2, resumed.stderr
        if rank == 0:
            assert resumed.stderr.strip().splitlines() == [
                "error: --resume: the checkpoint's global batch of 4 blocks does not divide over 3 processes; "
                "resume on a number of processes that divides it (1, 2, 4)"]
            assert "invalid choice: 'huge'" in bad_flag.stderr
        else:
            assert resumed.stderr == bad_flag.stderr == "" and resumed.stdout == bad_flag.stdout == ""


def test_help_lists_the_flags():
    result = run_main(run_cli.main, ["--help"])
    assert result.returncode == 0
    for flag in ("--max-steps", "--out", "--resume", "--seed", "--data", "--preset", "--graph", "--noise",
                 "--tokenizer", "--lr", "--global-batch", "--batch-size", "--ema", "--warmup-steps", "--grad-clip",
                 "--compile", "--fsdp", "--tensorboard", "--eval-every", "--ckpt-every"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--data", "no-such-dataset"], "not one of"),
    (["--data", "/no/such/dir/input.txt"], "no such file or directory"),
    (["--graph", "diagonal"], "invalid choice: 'diagonal'"),
    (["--noise", "cosine"], "invalid choice: 'cosine'"),
    (["--tokenizer", "/no/such/tokenizer"], "no such file or directory"),
    (["--max-steps", "-5"], "--max-steps must be positive, got -5"),
    (["--sample-length", "0", "--batch-size", "-2"], "must be positive"),
    (["--num-samples", "-1"], "--num-samples must be >= 0"),
    (["--batch-size", "3", "--global-batch", "8"], "pass --global-batch as a multiple of 3"),
    (["--threads", "100000"], "--threads must be at most the"),  # was a SIGSEGV
    (["--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
    (["--graph", "uniform", "--time-conditioning", "off"], "--time-conditioning off needs --graph absorb"),
    (["--time-conditioning", "no"], "invalid choice: 'no'"),
])
def test_bad_arguments(env, tmp_path, args, message):
    result = train_here(env, *args, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # argparse's usage block too
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_is_reported_and_left_alone(env, trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    state = out / "training_state.pt"
    state.write_bytes(state.read_bytes()[:5000])  # a truncated file, as from a full disk
    before = snapshot(out)
    result = train_here(env, *TINY, "--max-steps", 20, "--out", out, "--resume")
    assert result.returncode == 1
    assert "corrupt" in result.stderr and str(state) in result.stderr
    assert snapshot(out) == before


def test_nan_loss_stops_without_saving(env, trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    before = snapshot(out)
    result = train_here(env, *TINY, "--max-steps", 20, "--out", out, "--resume", "--lr", "1e30")
    assert result.returncode == 1
    assert "non-finite loss" in result.stderr
    step = int(result.stderr.split(" at step ")[1].split(";")[0])
    assert 10 < step <= 20
    assert "keeps its checkpoint of step 10" in result.stderr
    assert snapshot(out) == before


def test_existing_checkpoint_is_never_silently_replaced(env, trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    before = snapshot(out)
    fresh = train_here(env, *TINY, "--max-steps", 20, "--out", out)  # forgot --resume
    assert fresh.returncode == 2 and "--resume" in fresh.stderr
    reshaped = train_here(env, *TINY, "--max-steps", 20, "--out", out, "--resume", "--hidden-size", 64)
    assert reshaped.returncode == 2 and "cannot change hidden_size" in reshaped.stderr
    missing = train_here(env, *TINY, "--out", tmp_path / "empty", "--resume")
    assert missing.returncode == 2 and "no training_state.pt" in missing.stderr
    assert snapshot(out) == before

    # A directory that is not a checkpoint: the files a run writes are never replaced unasked.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text('{"mine": true}')
    (notes / "samples.txt").write_text("my samples")
    (notes / "ideas.md").write_text("keep")
    refused = train_here(env, *TINY, "--max-steps", 1, "--out", notes)
    assert refused.returncode == 2, refused.stderr
    assert "config.json, samples.txt" in refused.stderr and "--overwrite" in refused.stderr
    assert (notes / "config.json").read_text() == '{"mine": true}' and sorted(p.name for p in notes.iterdir()) == [
        "config.json", "ideas.md", "samples.txt"]


def test_time_conditioning_off_is_saved_and_frozen(env, tmp_path):
    out = tmp_path / "out"
    first = train_here(env, *TINY, "--max-steps", 2, "--ckpt-every", 2, "--num-samples", 0, "--time-conditioning",
                       "off", "--out", out)
    assert first.returncode == 0, first.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["time_conditioning"] is False
    from sedd.model import SEDD

    assert SEDD.from_pretrained(out).time_conditioning is False
    changed = train_here(env, *TINY, "--max-steps", 4, "--out", out, "--resume", "--time-conditioning", "on")
    assert changed.returncode == 2 and "cannot change time_conditioning" in changed.stderr
    resumed = train_here(env, *TINY, "--max-steps", 4, "--ckpt-every", 2, "--num-samples", 0, "--out", out,
                         "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "config.json").read_text())["model"]["time_conditioning"] is False
    assert "cond_embed" in torch.load(out / "training_state.pt", weights_only=False)["model"]


def test_ema_decay_ramps_up_like_the_public_code():
    from train.run import ema_decay

    assert ema_decay(0, 0.9999) == pytest.approx(2 / 11)  # the first update keeps 2/11 of the init
    assert ema_decay(99, 0.9999) == pytest.approx(101 / 110)
    assert ema_decay(10**6, 0.9999) == 0.9999
    assert ema_decay(5, 0.0) == 0.0  # --ema 0: no averaging
    # after 10k steps the initial weights weigh ∏ decay_k: ~1e-3 (ramped) instead of 0.9999^10k ≈ 0.37
    init_weight = 1.0
    for k in range(10_000):
        init_weight *= ema_decay(k, 0.9999)
    assert init_weight < 2e-3
