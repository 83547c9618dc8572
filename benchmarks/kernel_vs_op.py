"""Device check, stage "kernelvsop": each fused kernel's device time apart from the op around it.

    PYTHONPATH=. python3 -m benchmarks.kernel_vs_op [--results DIR]

A figure like "the absorbing step runs at 21 % of the copy bandwidth" timed one op call between two
events, so it holds the op's host work too (checks, small tensors, the seed, the custom-op
dispatch, the launch): fitting two shapes put 0.2–0.5 ms of it into every call of the first H200
runs. Here every case is timed three ways, on the inputs of the benchmarks (``benchmarks/common.py``:
σ, MASK fraction, shift) and rotated among enough copies that they exceed the L2 cache:

- ``op_ms``: the op as users call it (``sedd.ops.*``, value checks off as the sampler and the
  training loss run it), one call between two CUDA events after a synchronisation, so a host that
  is slower than the kernel shows;
- ``kernel_ms``: the kernel alone (``sedd.ops.kernel_launch``: the call's host work done once), many
  launches back to back between two events, divided by their number: device time;
- ``host_us``: host time per op call, calls issued back to back without waiting for the device.

Each is the median over rounds, with min and max. ``bw_fraction`` is the traffic the op cannot avoid
(``common.loss_bytes`` / ``step_bytes``) over ``kernel_ms``, against the copy bandwidth of the same
run (stage 1's ``device.json`` under ``--results``, else measured here). Cases: the score entropy
("fwd": the loss; "fwd_bwd": loss and gradient in one pass, as training calls it) and the analytic,
Euler and denoise steps, both graphs, at SEDD-small's 16 × 1024 rows and the paper's per-GPU 64 ×
1024, bf16, V = 50258 / 50257. One JSON line per case goes to ``$SEDD_BENCH_RECORDS`` (``bench:
"kernel_vs_op"``); ``benchmarks/summarize.py`` turns them into the ``kernels`` entries of
summary.json and a table.

On CPU (the dry run) the kernels run in Triton's interpreter at a tiny shape and the clock is the
host's: a plumbing check, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks import common
from sedd import ops
from sedd.graph import get_graph

CUDA, DEVICE = common.CUDA, common.DEVICE
if CUDA:
    N, SHAPES, ROUNDS, LAUNCHES = 50257, [(16, 1024), (64, 1024)], 7, 10
    L2_BYTES = 60 << 20  # rotate inputs among copies worth at least this much (H100/H200: 50–60 MB of L2)
else:
    N, SHAPES, ROUNDS, LAUNCHES = 63, [(2, 8)], 1, 1
    L2_BYTES = 0
KINDS = ("analytic", "euler", "denoise")


def _copies(nbytes: int) -> int:
    """Input copies to rotate among so that one pass over all of them exceeds the L2 (at most 8)."""
    return max(1, min(8, -(-2 * L2_BYTES // max(nbytes, 1))))


def _stats(seconds: list[float]) -> tuple[float, float, float]:
    ms = [s * 1e3 for s in seconds]
    return statistics.median(ms), min(ms), max(ms)


def _time_each(calls) -> list[float]:
    """Seconds of one call each (device clock), the device idle before each."""
    times = []
    for call in calls:
        common.sync()
        start = common.device_clock()
        call()
        times.append(common.device_clock() - start)
    return times


def _time_back_to_back(calls, rounds: int) -> list[float]:
    """Seconds per call: all of ``calls`` issued back to back between two readings, per round."""
    times = []
    for _ in range(rounds):
        common.sync()
        start = common.device_clock()
        for call in calls:
            call()
        times.append((common.device_clock() - start) / len(calls))
    return times


def _host_per_call(calls) -> float:
    """Host seconds per call issued back to back (the device may still be running them)."""
    common.sync()
    start = time.perf_counter()
    for call in calls:
        call()
    host = (time.perf_counter() - start) / len(calls)
    common.sync()
    return host


def _loss_cases(graph, B: int, L: int):
    z, sigma, x_t, x0, shift, weight = common.loss_inputs(graph, B, L)
    n = _copies(z.numel() * z.element_size())
    zs = [z] + [z.clone() for _ in range(n - 1)]

    def fwd(zi):
        with torch.no_grad():
            return ops.score_entropy(zi, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="batchmean")

    def fwd_bwd(zi):
        leaf = zi.detach().requires_grad_()
        loss = ops.score_entropy(leaf, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="batchmean")
        return torch.autograd.grad(loss, leaf)[0]

    for mode, op in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        kernels = [ops.kernel_launch("score_entropy", zi, sigma, x_t, x0, graph, shift=shift, weight=weight,
                                     grad=mode == "fwd_bwd") for zi in zs]
        yield (mode, [lambda zi=zi, op=op: op(zi) for zi in zs], kernels,
               common.loss_bytes(graph, x_t, graph.dim, mode, z.element_size()), z.shape)


def _step_cases(graph, B: int, L: int):
    inp = common.step_inputs(graph, B, L)
    z, x_t, shift = inp["z"], inp["x_t"], inp["shift"]
    n = _copies(z.numel() * z.element_size())
    zs = [z] + [z.clone() for _ in range(n - 1)]
    gen = torch.Generator(DEVICE).manual_seed(1)
    for kind in KINDS:
        scalar = inp["sigma"] if kind == "denoise" else inp["dsigma"]
        args = (scalar, common.STEP_DT) if kind == "euler" else (scalar,)
        step = getattr(ops, f"{kind}_step")
        calls = [lambda zi=zi, step=step, args=args: step(zi, x_t, *args, graph, gen, shift=shift) for zi in zs]
        kernels = [ops.kernel_launch(f"{kind}_step", zi, x_t, *args, graph, gen, shift=shift) for zi in zs]
        yield kind, calls, kernels, common.step_bytes(graph, x_t, graph.dim, z.element_size()), z.shape


def _copy_bandwidth(results: Path | None) -> float:
    """Bytes/s of stage 1's copy in this run (``device.json``), else measured now."""
    if results is not None:
        try:
            return float(json.loads((results / "device.json").read_text())["copy_gb_per_s"]) * 1e9
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return common.copy_bandwidth()


def measure(bench: str, graph_name: str, mode: str, calls, kernels, nbytes: int, shape, copy: float) -> dict:
    """One case's record (the module docstring)."""
    with ops.value_checks(False), ops.use_backend("triton"):
        for call in calls[:1] + kernels[:1]:  # warm-up: compile the kernels, fill the allocator
            call()
        op = _time_each((calls * (-(-max(ROUNDS, 3) // len(calls))))[: max(ROUNDS, 3)])
        repeat = max(LAUNCHES, len(kernels))
        kernel = _time_back_to_back((kernels * -(-repeat // len(kernels)))[:repeat], ROUNDS)
        host = _host_per_call((calls * -(-repeat // len(calls)))[:repeat])
    op_ms, op_min, op_max = _stats(op)
    kernel_ms, kernel_min, kernel_max = _stats(kernel)
    return {
        "name": f"kernel_vs_op::{bench} {graph_name} {mode} {list(shape)}",
        "median_s": kernel_ms / 1e3,
        "rounds": ROUNDS,
        "extra_info": {
            "bench": "kernel_vs_op", "kernel": bench, "graph": graph_name, "mode": mode, "shape": list(shape),
            "dtype": "bf16", "device": common.device_name(), "commit": common.commit_id(),
            "kernel_ms": kernel_ms, "kernel_ms_min": kernel_min, "kernel_ms_max": kernel_max,
            "op_ms": op_ms, "op_ms_min": op_min, "op_ms_max": op_max, "host_us": host * 1e6,
            "bytes_moved": nbytes, "copy_gb_per_s": copy / 1e9,
            "bw_fraction": nbytes / (kernel_ms / 1e3) / copy, "op_bw_fraction": nbytes / (op_ms / 1e3) / copy,
            "input_copies": len(kernels),
        },
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None,
                        help="the device-check results directory (its device.json gives the copy bandwidth)")
    args = parser.parse_args(argv)
    copy = _copy_bandwidth(args.results)
    out = os.environ.get("SEDD_BENCH_RECORDS")
    print(f"{common.device_name()}: copy {copy / 1e9:.4g} GB/s")
    print("| case | shape | kernel ms [min, max] | op ms [min, max] | host µs/call | kernel of copy BW |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    with ops.use_backend("triton"), ops.value_checks(False):
        _run_all(copy, out)
    print("kernel vs op done")


def _run_all(copy: float, out: str | None) -> None:
    for graph_name in ("absorb", "uniform"):
        graph = get_graph(graph_name, N)
        for B, L in SHAPES:
            for bench, cases in (("score_entropy", _loss_cases(graph, B, L)), ("reverse_step", _step_cases(graph, B, L))):
                for mode, calls, kernels, nbytes, shape in cases:
                    record = measure(bench, graph_name, mode, calls, kernels, nbytes, shape, copy)
                    info = record["extra_info"]
                    print(f"| {bench} {graph_name} {mode} | {info['shape']} | {info['kernel_ms']:.3f} "
                          f"[{info['kernel_ms_min']:.3f}, {info['kernel_ms_max']:.3f}] | {info['op_ms']:.3f} "
                          f"[{info['op_ms_min']:.3f}, {info['op_ms_max']:.3f}] | {info['host_us']:.0f} | "
                          f"{info['bw_fraction']:.1%} |", flush=True)
                    if out:
                        with open(out, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    del calls, kernels
                if CUDA:
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
