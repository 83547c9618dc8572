"""train/run.py's loop in-process (``main(argv)``): the step reads nothing from the device between log
lines, the log is in nats per token, the compiled blocks train as the eager ones and resume
exactly, and on CUDA the loop runs under ``torch.cuda.set_sync_debug_mode("error")`` and as a
captured CUDA graph (those two skipped on CPU, run by the device check's tests stage)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from train import step as train_step
from train.run import main

ROOT = Path(__file__).resolve().parents[1]

# one byte per id (no tokenizer to train); the corpus is made from the checkout's own sources, so
# these tests run wherever the checkout goes (the device check's machine has no test data beside it)
TINY = ["--tokenizer", "bytes", "--hidden-size", "32", "--cond-dim", "16", "--n-blocks", "2",
        "--n-heads", "2", "--length", "32", "--batch-size", "4", "--global-batch", "8", "--warmup-steps", "2",
        "--lr", "3e-3", "--val-blocks", "8", "--num-samples", "0", "--threads", "1", "--dropout", "0.1"]
READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(token cache directory, corpus directory)."""
    corpus = tmp_path_factory.mktemp("corpus")
    for i, source in enumerate(sorted((ROOT / "sedd").rglob("*.py"))):
        (corpus / f"{i:03d}.txt").write_text(source.read_text())
    return tmp_path_factory.mktemp("sedd-cache"), corpus


def run(monkeypatch, cache, out, *args):
    monkeypatch.setenv("SEDD_CACHE", str(cache[0]))
    main([*TINY, "--data", str(cache[1]), "--out", str(out), *map(str, args)])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class _HostRead(AssertionError):
    pass


@contextlib.contextmanager
def _no_host_reads():
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def refuse(self, *args, _name="", **kwargs):
        raise _HostRead(f"Tensor.{_name} read a tensor value on the host inside a training step")

    try:
        for name in READS:
            setattr(torch.Tensor, name, lambda self, *a, _n=name, **k: refuse(self, _name=_n))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_steps_read_nothing_from_the_device_between_log_lines(monkeypatch, cache, tmp_path, capsys):
    """Every step runs with every way of reading a tensor's value refused (the sync-free paths on,
    as the loop has them on CUDA: every row through the fused head, no MASK count); the window is
    read once per log line, evaluation and checkpoint."""
    steps, reads = [], []
    real_call, real_read = train_step.TrainStep.__call__, train_step.LogWindow.read

    def guarded(self, step, micro_batches):
        steps.append(step)
        with _no_host_reads():
            real_call(self, step, micro_batches)

    def counted(self):
        reads.append(len(steps))
        return real_read(self)

    monkeypatch.setattr(train_step.TrainStep, "__call__", guarded)
    monkeypatch.setattr(train_step.LogWindow, "read", counted)
    monkeypatch.setenv("SEDD_SYNC_FREE", "1")
    metrics = run(monkeypatch, cache, tmp_path / "out", "--max-steps", 12, "--log-every", 4, "--eval-every", 6,
                    "--ckpt-every", 12)
    assert steps == list(range(12)) and reads == [4, 6, 8, 12]
    assert [m["step"] for m in metrics if "loss" in m] == [4, 8, 12]

    # the log's units: nats per token and the perplexity bound; the per-block values under their own names
    printed = capsys.readouterr()
    assert "step 6: val loss " in printed.out and " nats/token, perplexity <= " in printed.out
    assert "loss=" in printed.err and " nats/token" in printed.err  # the progress bar
    for m in metrics:
        if "loss" in m:
            assert m["loss"] == pytest.approx(m["loss_per_sequence"] / 32)
        if "val_loss" in m:
            assert m["val_loss"] == pytest.approx(m["val_loss_per_sequence"] / 32)
            assert m["val_perplexity_bound"] > torch.exp(torch.tensor(m["val_loss"])).item()  # the prior term


def test_a_non_finite_loss_is_reported_at_the_next_read_and_nothing_is_saved(monkeypatch, cache, tmp_path, capsys):
    out = tmp_path / "out"
    run(monkeypatch, cache, out, "--max-steps", 4, "--ckpt-every", 4, "--log-every", 4)
    before = (out / "training_state.pt").read_bytes()
    with pytest.raises(SystemExit) as stopped:
        run(monkeypatch, cache, out, "--resume", "--max-steps", 12, "--lr", "1e30", "--log-every", 4)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "keeps its checkpoint of step 4" in err
    assert 4 < int(err.split(" at step ")[1].split(";")[0]) <= 8  # the step it first appeared, read at step 8
    assert (out / "training_state.pt").read_bytes() == before


def _deterministic(metrics):
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics]


@pytest.mark.slow
def test_compiled_blocks_train_as_eager_and_resume_exactly(monkeypatch, cache, tmp_path, capsys):
    """--compile on (inductor on the CPU): without dropout the same losses as eager within float
    tolerance over a few steps; with dropout (drawn by inductor's own generator, seeded per step
    as eager dropout is) a run interrupted at step 2 and resumed continues bit-identically."""
    common = ["--max-steps", 4, "--log-every", 1, "--eval-every", 2, "--ckpt-every", 2]
    eager = run(monkeypatch, cache, tmp_path / "eager", *common, "--compile", "off", "--dropout", 0.0)
    compiled = run(monkeypatch, cache, tmp_path / "compiled", *common, "--compile", "on", "--dropout", 0.0)
    assert "compiled: the 2 transformer blocks" in capsys.readouterr().out
    assert [m["step"] for m in eager] == [m["step"] for m in compiled]
    for a, b in zip(eager, compiled):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-3), (a["step"], key)

    whole = run(monkeypatch, cache, tmp_path / "whole", *common, "--compile", "on")
    half = tmp_path / "half"
    run(monkeypatch, cache, half, *common[2:], "--max-steps", 2, "--compile", "on")
    resumed = run(monkeypatch, cache, half, "--resume", "--max-steps", 4, "--compile", "on")
    assert _deterministic(resumed) == _deterministic(whole)
    saved = [torch.load(d / "training_state.pt", weights_only=True) for d in (half, tmp_path / "whole")]
    for part in ("model", "ema"):
        for k, v in saved[1][part].items():
            assert torch.equal(saved[0][part][k], v), (part, k)


def needs_cuda(test):  # the device check's tests stage runs these (-m gpu)
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@needs_cuda
def test_cuda_steps_do_not_sync(monkeypatch, cache, tmp_path):
    """On CUDA the loop is sync-free by default: after two warm-up steps (compilation, lazy
    initialisation) every step runs under set_sync_debug_mode("error")."""
    real_call = train_step.TrainStep.__call__

    def strict(self, step, micro_batches):
        if step < 2:
            return real_call(self, step, micro_batches)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            real_call(self, step, micro_batches)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(train_step.TrainStep, "__call__", strict)
    metrics = run(monkeypatch, cache, tmp_path / "out", "--device", "cuda", "--max-steps", 6, "--log-every", 3,
                    "--eval-every", 0, "--ckpt-every", 6)
    assert [m["step"] for m in metrics] == [3, 6]


@needs_cuda
def test_cuda_graph_step_trains_as_eager(monkeypatch, cache, tmp_path):
    common = ["--device", "cuda", "--max-steps", 8, "--log-every", 1, "--eval-every", 4, "--ckpt-every", 8,
              "--compile", "off", "--dropout", "0.0"]
    eager = run(monkeypatch, cache, tmp_path / "eager", *common)
    graphs = run(monkeypatch, cache, tmp_path / "graphs", *common, "--cuda-graphs")
    for a, b in zip(eager, graphs):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3), (a["step"], key)
