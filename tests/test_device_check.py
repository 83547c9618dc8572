"""The device check (benchmarks/device_check.sh) on CPU: its dry run exercises every stage at tiny
shapes, so the one GPU run a session may get does not fail on plumbing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
STAGES = ["device", "smoke", "train", "sample", "kernelvsop", "kernels", "tests", "e2e", "profile", "sweep",
          "compiled"]


def _environ() -> dict[str, str]:
    """This process's environment less pytest-xdist's worker variables: the script's own pytest
    runs (the benchmarks) would read them as running under xdist, and pytest-benchmark then
    refuses to time anything."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}


def _run(results: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**_environ(), "PYTHON": sys.executable, "RESULTS": str(results), "SEDD_COMMIT": "test-commit", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=600)


def _stage_lines(results: Path) -> dict[str, str]:
    lines = (results / "status.txt").read_text().splitlines()
    return {line[1:].split("]")[0]: line for line in lines if line.startswith("[")}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole dry run, once for the module's four tests (~45 s of CPU: nine stages, each a
    Python process of its own); the tests that use it are marked slow."""
    results = tmp_path_factory.mktemp("device-check")
    return _run(results, "--dry-run"), results


@pytest.mark.slow
def test_dry_run_runs_or_skips_every_stage_with_a_reason(dry_run):
    proc, results = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = _stage_lines(results)
    assert list(stages) == STAGES
    for name, line in stages.items():
        assert line.startswith(f"[{name}] ok (") or line.startswith(f"[{name}] skipped: "), line
    assert "skipped" in stages["compiled"] and "skipped" in stages["tests"]
    # at most 8 files come back from a borrowed machine
    assert sorted(p.name for p in results.iterdir()) == sorted(
        ["status.txt", "device-check.md", "summary.json", "device-check.log", "device.json", "smoke.json",
         "bench.jsonl", "sweep.jsonl"]
    )


@pytest.mark.slow
def test_dry_run_writes_the_figures_and_the_table(dry_run):
    _, results = dry_run
    device = json.loads((results / "device.json").read_text())
    assert device["commit"] == "test-commit" and not device["cuda"]
    assert device["copy_gb_per_s"] > 0 and device["bf16_matmul_tflop_per_s"] > 0
    checks = json.loads((results / "smoke.json").read_text())["checks"]
    names = " ".join(c["check"] for c in checks)
    for part in ("absorb loss + gradient", "absorb loss + in-place gradient", "uniform per token",
                 "forward noising uniform", "uniform euler", "absorb denoise: draws", "fused head (linear score entropy) absorb",
                 "score entropy absorb at 64 rows"):
        assert part in names
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    records = [json.loads(line) for line in (results / "bench.jsonl").read_text().splitlines()]
    benches = {r["name"].split("::")[1].split("[")[0] for r in records}
    assert benches >= {"test_score_entropy", "test_reverse_step", "test_training_step", "test_sampling"}
    assert all(r["median_s"] > 0 for r in records if not r["extra_info"].get("skipped"))
    table = (results / "device-check.md").read_text()
    assert "| case | impl | median ms |" in table and "[smoke] ok" in table and "test-commit" in table
    sweep = [json.loads(line) for line in (results / "sweep.jsonl").read_text().splitlines()]
    assert {r["kernel"] for r in sweep} >= {"score_entropy absorb fwd+grad", "reverse_step uniform analytic"}
    assert all(r["median_s"] > 0 and "error" not in r for r in sweep)
    # the launchers' own choice is a row of its own, once per kernel
    assert sum(r["default"] for r in sweep) == len({r["kernel"] for r in sweep})
    assert "## Launch sweep" in table and "reverse_step uniform analytic" in table and "| kernel | default |" in table


@pytest.mark.slow
def test_dry_run_times_each_kernel_apart_from_its_op_and_summarises_it(dry_run):
    """The kernel-vs-op stage: every fused kernel (loss, loss + gradient, the three steps, both
    graphs) with its kernel time, op time, host time and bandwidth, into bench.jsonl, the table and
    the ``kernels`` entries of summary.json (issue 29's schema)."""
    _, results = dry_run
    records = [json.loads(line) for line in (results / "bench.jsonl").read_text().splitlines()]
    kvo = [r["extra_info"] for r in records if r["extra_info"].get("bench") == "kernel_vs_op"]
    names = {f"{i['kernel']} {i['graph']} {i['mode']}" for i in kvo}
    for graph in ("absorb", "uniform"):
        assert {f"score_entropy {graph} fwd", f"score_entropy {graph} fwd_bwd", f"reverse_step {graph} analytic",
                f"reverse_step {graph} euler", f"reverse_step {graph} denoise"} <= names
    for i in kvo:
        assert i["kernel_ms_min"] <= i["kernel_ms"] <= i["kernel_ms_max"] and i["op_ms_min"] <= i["op_ms"] <= i["op_ms_max"]
        assert i["host_us"] > 0 and i["bw_fraction"] > 0 and len(i["shape"]) == 3
    summary = json.loads((results / "summary.json").read_text())
    assert summary["commit"] == "test-commit" and summary["peaks"]["copy_gbps"] > 0
    assert {e["name"] for e in summary["kernels"]} == names
    for entry in summary["kernels"]:
        assert {"name", "shape", "kernel_ms", "op_ms", "bw_fraction"} <= set(entry)
        assert all(isinstance(entry[k], float) and entry[k] > 0 for k in ("kernel_ms", "op_ms", "bw_fraction"))
    assert "## Kernel vs op" in (results / "device-check.md").read_text()


@pytest.mark.slow
def test_dry_run_writes_the_summary_json(dry_run):
    """benchmarks/summarize.py's summary (issue 29's schema) from the dry run's records: train/run.py's
    step in every mode at both shapes (graphs skipped on the CPU, with the reason), the benchmark's
    own step, the sampler against today's path, the kernels as the benchmark table names them."""
    import datetime

    _, results = dry_run
    summary = json.loads((results / "summary.json").read_text())
    assert summary["commit"] == "test-commit" and summary["device"].startswith("cpu")
    datetime.datetime.fromisoformat(summary["date"].replace("Z", "+00:00"))
    assert summary["peaks"]["copy_gbps"] > 0 and summary["peaks"]["bf16_tflops"] > 0
    run = [e for e in summary["train_step"] if e["path"] == "run.py"]
    assert [(e["shape"], e["mode"]) for e in run] == [([B, 32], m) for B in (4, 2) for m in ("eager", "compiled", "graphs")]
    for e in run:
        if e["mode"] == "graphs":
            assert "CUDA" in e["skipped"] and e["ms"] is None
            continue
        assert {"ms", "tokens_per_s", "mfu", "host_ms", "gpu_ms"} <= e.keys() and "skipped" not in e
        assert e["ms"] > 0 and e["tokens_per_s"] == pytest.approx(e["shape"][0] * 32 / e["ms"] * 1e3)
        assert e["host_ms"] > 0 and e["gpu_ms"] is None and e["mfu"] is None  # no GPU: no GPU time, no MFU
    assert {e["impl"] for e in summary["train_step"] if e["path"] == "bench"} == {"eager"}
    # one MFU denominator per run: stage 1's bf16 peak
    records = [json.loads(line)["extra_info"] for line in (results / "bench.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["bench"] == "train_step_run" and not r.get("skipped")]
    assert timed and all(r["bf16_peak_source"] == "device.json" for r in timed)
    assert all(r["bf16_peak_tflop_per_s"] == pytest.approx(summary["peaks"]["bf16_tflops"]) for r in timed)
    sampling = summary["sampling"]
    assert [e["mode"] for e in sampling] == ["today", "eager", "compiled", "graphs"]
    assert sampling[0]["x_today"] == 1.0 and all(e["tokens_per_s"] > 0 for e in sampling[:3])
    assert sampling[0]["shape"] == [2, 32] and sampling[0]["steps"] == 4 and "skipped" in sampling[3]
    kernels = {e["name"]: e for e in summary["kernels"]}
    assert {"score_entropy absorb fwd_bwd", "reverse_step uniform analytic"} <= kernels.keys()
    assert all(len(e["shape"]) == 3 and e["kernel_ms"] > 0 and e["bw_fraction"] > 0 for e in kernels.values())
    assert "## Whole model" in (results / "device-check.md").read_text()


def test_stage_failures_and_an_empty_budget_are_reported(tmp_path):
    # a python that fails: every stage is reported failed with its error tail, the script exits 1
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'boom from the fake python' >&2\nexit 4\n")
    fake.chmod(0o755)
    proc = _run(tmp_path / "failed", PYTHON=str(fake), DEVICE_CHECK_BUDGET_S="100")
    assert proc.returncode == 1
    status = (tmp_path / "failed" / "status.txt").read_text()
    assert "[device] failed: exit status 4" in status and "    | boom from the fake python" in status
    assert "[compiled] failed" in status
    # no budget left: every stage skipped with the reason, the table still written
    proc = _run(tmp_path / "none", "--dry-run", DEVICE_CHECK_BUDGET_S="0")
    assert proc.returncode == 0, proc.stderr
    stages = _stage_lines(tmp_path / "none")
    assert stages["device"] == "[device] skipped: the 0 s budget is spent"
    assert "No benchmark finished" in (tmp_path / "none" / "device-check.md").read_text()
    # a selection of stages: the others are skipped as not selected
    proc = _run(tmp_path / "some", "--dry-run", DEVICE_CHECK_STAGES="compiled", DEVICE_CHECK_BUDGET_S="0")
    stages = _stage_lines(tmp_path / "some")
    assert stages["smoke"] == '[smoke] skipped: not selected (DEVICE_CHECK_STAGES="compiled")'
    assert stages["device"].startswith("[device] skipped: not selected")


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_public_sequence_computes_what_the_reference_does(graph_name):
    """The public-code baseline is the same math (in fp64 here), so "× public" compares like with like."""
    import torch

    from benchmarks import public_sedd
    from sedd.graph import get_graph
    from sedd.ops import reference

    graph = get_graph(graph_name, 11)
    B, L, V = 3, 6, graph.dim
    z = torch.randn(B, L, V, dtype=torch.float64) * 2
    sigma = torch.tensor([0.02, 0.7, 3.0], dtype=torch.float64)
    x0 = torch.randint(0, graph.N, (B, L))
    x_t = graph.sample_transition(x0, sigma)
    x_t[0, :2] = graph.mask_id if graph.absorbing else x0[0, :2]  # both branches of each formula
    shift = graph.score_shift(sigma).double()
    weight = torch.rand(B, dtype=torch.float64) + 0.5
    want = (reference.score_entropy(z, sigma, x_t, x0, graph, shift) * weight[:, None]).sum() / B
    got = public_sedd.score_entropy_loss(z, sigma, x_t, x0, graph, shift, weight)
    torch.testing.assert_close(got, want)
    dsigma = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)
    pairs = [
        (public_sedd.analytic_probs(z, x_t, dsigma, graph, shift), reference.analytic_probs(z, x_t, dsigma, graph, shift)),
        (public_sedd.euler_probs(z, x_t, dsigma, 0.01, graph, shift), reference.euler_probs(z, x_t, dsigma, 0.01, graph, shift)),
        (public_sedd.denoise_probs(z, x_t, sigma, graph, shift), reference.denoise_probs(z, x_t, sigma, graph, shift)),
    ]
    for got_w, want_p in pairs:
        got_w = got_w.clamp_min(0)
        want_p = want_p[..., : got_w.shape[-1]]
        torch.testing.assert_close(got_w / got_w.sum(-1, keepdim=True), want_p)


def test_a_copy_with_an_older_git_is_labelled_by_its_recorded_commit(tmp_path):
    """A borrowed machine may receive today's files with the first checkout's .git: the tree then
    reads as dirty at an old HEAD, and the commit --write-commit recorded is the one to report."""
    import shutil

    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks" / "device_check.sh")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (tmp_path / "file.txt").write_text("old\n")
    for cmd in (["init", "-q"], ["add", "file.txt"], ["commit", "-qm", "old"]):
        subprocess.run([*git, *cmd], cwd=tmp_path, check=True, capture_output=True)
    old = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    environ = {k: v for k, v in _environ().items() if k != "SEDD_COMMIT"}
    run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=120)

    def label(results: str) -> str:
        env = {**environ, "PYTHON": sys.executable, "RESULTS": str(tmp_path / results), "DEVICE_CHECK_BUDGET_S": "0"}
        subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], env=env, **run)
        return (tmp_path / results / "status.txt").read_text().splitlines()[0]

    assert f"commit {old}," in label("clean")
    (tmp_path / "file.txt").write_text("new\n")
    assert f"commit {old}-dirty," in label("dirty")  # no record: the dirty tree says so
    (tmp_path / "benchmarks" / "COMMIT").write_text("f00dcafe\n")
    assert "commit f00dcafe," in label("copied")
