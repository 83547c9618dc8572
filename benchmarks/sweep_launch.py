"""Device check, stage "sweep": the kernels' launch choices timed side by side.

    PYTHONPATH=. python3 -m benchmarks.sweep_launch --out benchmarks/results/sweep.jsonl [--results DIR]

The fused kernels stream [rows, V] scores, one row per program on a GPU, in tiles of BLOCK_V
columns with ``num_warps`` warps (and Triton's software pipelining ``num_stages`` deep). Which tile
and warp count keep enough bytes in flight to reach the copy bandwidth is a property of the chip,
not something to argue on a machine without one, so this stage times every (BLOCK_V, num_warps)
pair below on the GPU at hand, and two pipelining depths at the launchers' default pair, at
SEDD-small's 16 × 1024 rows of V = 50258 (absorbing) / 50257 (uniform) bf16 scores, on the inputs of
the benchmarks and of the kernel-vs-op stage (``benchmarks/common.py``: σ, MASK fraction, shift).
The launches go through the public ops (``sedd.ops.launch_options`` and ``sedd.ops.kernel_launch``:
nothing outside ``sedd.ops`` imports the kernels), and each time is the kernel alone: ``LAUNCHES``
launches back to back between two CUDA events, the median over rounds (``kernel_ms`` of the
kernel-vs-op stage, so the two agree). Each line of the output is one (kernel, choice) with its
median time, GB/s of the traffic the operation cannot avoid (``common.loss_bytes`` /
``step_bytes``) and the fraction of the copy bandwidth of the same run (stage 1's ``device.json``
under ``--results``, else measured here). The launchers' own choice is timed as a row of its own
(``"default": true``, no option set), so the default is marked by what ran, not by a copy of the
launchers' rules.

Every launch is compiled once per choice; a choice that fails to compile or run (registers, shared
memory) is recorded with its error and the sweep goes on. On CPU (the dry run) it runs the same
code at a tiny shape under the interpreter and two pairs per kernel: a plumbing check only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.kernel_vs_op import _copy_bandwidth
from sedd import ops
from sedd.graph import get_graph

CUDA, DEVICE = common.CUDA, common.DEVICE
if CUDA:
    B, L, N, ROUNDS, LAUNCHES = 16, 1024, 50257, 7, 10
    PAIRS = [(2048, 4), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16)]
    STAGES = [1, 4]  # Triton's default is 3 on NVIDIA
else:
    B, L, N, ROUNDS, LAUNCHES = 2, 8, 66, 1, 1
    PAIRS = [(64, 4), (128, 4)]
    STAGES = [1]


def _cases():
    """(name, make(**launch) -> kernel launch, bytes the operation cannot avoid)."""
    for graph_name in ("absorb", "uniform"):
        graph = get_graph(graph_name, N)
        z, sigma, x_t, x0, shift, weight = common.loss_inputs(graph, B, L)
        for grad in (False, True):
            def make(z=z, sigma=sigma, x_t=x_t, x0=x0, shift=shift, weight=weight, graph=graph, grad=grad):
                return ops.kernel_launch("score_entropy", z, sigma, x_t, x0, graph, shift=shift, weight=weight, grad=grad)

            yield (f"score_entropy {graph_name} {'fwd+grad' if grad else 'fwd'}", make,
                   common.loss_bytes(graph, x_t, graph.dim, "fwd_bwd" if grad else "fwd", z.element_size()))
        del z
        inp = common.step_inputs(graph, B, L)
        gen = torch.Generator(DEVICE).manual_seed(1)
        for kind in ("analytic", "euler", "denoise"):
            scalar = inp["sigma"] if kind == "denoise" else inp["dsigma"]
            args = (scalar, common.STEP_DT) if kind == "euler" else (scalar,)

            def make(kind=kind, args=args, inp=inp, graph=graph):
                return ops.kernel_launch(f"{kind}_step", inp["z"], inp["x_t"], *args, graph, gen, shift=inp["shift"])

            yield (f"reverse_step {graph_name} {kind}", make,
                   common.step_bytes(graph, inp["x_t"], graph.dim, inp["z"].element_size()))


def _time(launch) -> float:
    """Median seconds per launch: LAUNCHES back to back between two readings, over ROUNDS."""
    launch()  # compile
    times = []
    for _ in range(ROUNDS):
        common.sync()
        start = common.device_clock()
        for _ in range(LAUNCHES):
            launch()
        times.append((common.device_clock() - start) / LAUNCHES)
    return sorted(times)[len(times) // 2]


def _choices():
    """(block_v, num_warps, num_stages): None everywhere is the launchers' own choice."""
    yield None, None, None
    for bv, nw in PAIRS:
        yield bv, nw, None
    for ns in STAGES:
        yield None, None, ns


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per (kernel, launch choice)")
    parser.add_argument("--results", type=Path, default=None,
                        help="the device-check results directory (its device.json gives the copy bandwidth)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    copy = _copy_bandwidth(args.results)
    print(f"{common.device_name()}: copy {copy / 1e9:.4g} GB/s; [{B}, {L}, V] bf16")
    print("| kernel | BLOCK_V | warps | stages | median ms | GB/s | of copy BW |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with args.out.open("w") as out, ops.use_backend("triton"), ops.value_checks(False):
        for name, make, nbytes in _cases():
            for bv, nw, ns in _choices():
                row = dict(kernel=name, block_v=bv, num_warps=nw, num_stages=ns, shape=[B, L], bytes=nbytes,
                           default=bv is None and nw is None and ns is None, device=common.device_name(),
                           commit=common.commit_id())
                t0 = time.perf_counter()
                try:
                    with ops.launch_options(block_v=bv, num_warps=nw, num_stages=ns):
                        launch = make()
                    seconds = _time(launch)
                except Exception as err:  # a choice the chip cannot run is a result, not the end of the sweep
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                    print(f"| {name} | {bv} | {nw} | {ns} | – | – | {row['error']} |", flush=True)
                else:
                    row.update(median_s=seconds, gb_per_s=nbytes / seconds / 1e9, fraction_of_copy=nbytes / seconds / copy)
                    print(f"| {name} | {bv or 'default'} | {nw or 'default'} | {ns or 'default'} | {seconds * 1e3:.3f} | "
                          f"{row['gb_per_s']:.0f} | {row['fraction_of_copy']:.1%} |", flush=True)
                row["wall_s"] = time.perf_counter() - t0
                out.write(json.dumps(row) + "\n")
                out.flush()
    print(f"sweep written to {args.out}")


if __name__ == "__main__":
    main()
