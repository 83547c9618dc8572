"""What the kernels track can measure without a GPU (issue 30): truncated against untruncated steps
on the eager path, and the host work of one op call.

    TRITON_INTERPRET=1 PYTHONPATH=. python -m benchmarks.kernels_cpu [--threads 1] [--rounds 5] [--json F]

1. Truncation at SEDD-small's sampling shape [8, 128, V] (V = 50258 absorbing, 50257 uniform; fp32
   scores ~ N(0, 1) with the model's shift at σ = 2, Δσ = 0.05; absorbing all MASK): the analytic
   step on the torch backend untruncated, with top_p = 0.9, top_k = 50 and both. The cases run
   interleaved, round after round, and each truncated case is reported as the median over rounds
   of its time over the untruncated step's of the same round (a loaded machine drifts between
   rounds, not within one).
2. Host work per op call on the Triton backend with the kernel launches themselves made no-ops (the
   interpreter's grid executor is replaced; what remains is the op's checks, its small tensors, the
   seed, the custom-op dispatch and the launchers' Python): µs per call at [2, 4, 64]. On a GPU each
   small tensor op is also a CUDA launch, so these are a lower bound there; the device check's
   kernelvsop stage measures host µs per call on the GPU itself. And, as the issue's proxy, the
   same calls on the eager backend.

Only public ``sedd.ops`` calls: the same script times the code before a change (another checkout on
PYTHONPATH) and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from sedd import ops
from sedd.graph import get_graph

SHAPE = (8, 128)
TRUNCS = {"untruncated": {}, "top_p=0.9": {"top_p": 0.9}, "top_k=50": {"top_k": 50},
          "top_p=0.9,top_k=50": {"top_p": 0.9, "top_k": 50}}


def _step_inputs(graph, B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, L, graph.dim, generator=g)
    x_t = torch.full((B, L), graph.mask_id) if graph.absorbing else torch.randint(0, graph.N, (B, L), generator=g)
    sigma = torch.full((B,), 2.0)
    return z, x_t, torch.full((B,), 0.05), graph.score_shift(sigma)


def truncation(rounds: int) -> list[dict]:
    out = []
    for graph_name in ("absorb", "uniform"):
        graph = get_graph(graph_name, 50257)
        z, x_t, dsigma, shift = _step_inputs(graph, *SHAPE)

        def step(kw):
            with ops.use_backend("torch"), ops.value_checks(False):
                return ops.analytic_step(z, x_t, dsigma, graph, torch.Generator().manual_seed(1), shift=shift, **kw)

        for kw in TRUNCS.values():
            step(kw)  # warm-up
        times = {name: [] for name in TRUNCS}
        for _ in range(rounds):
            for name, kw in TRUNCS.items():
                start = time.perf_counter()
                step(kw)
                times[name].append(time.perf_counter() - start)
        for name in TRUNCS:
            ratios = [t / u for t, u in zip(times[name], times["untruncated"])]
            out.append({"graph": graph_name, "shape": [*SHAPE, graph.dim], "case": name,
                        "median_ms": statistics.median(times[name]) * 1e3, "min_ms": min(times[name]) * 1e3,
                        "max_ms": max(times[name]) * 1e3, "x_untruncated": statistics.median(ratios)})
    return out


def _no_launch():
    """Replace the interpreter's grid executor by a no-op (the kernels do not run; their outputs are
    uninitialised). Returns the function that restores it."""
    import triton.runtime.interpreter as interpreter

    real = interpreter.GridExecutor.__call__
    interpreter.GridExecutor.__call__ = lambda self, *args, **kwargs: None
    return lambda: setattr(interpreter.GridExecutor, "__call__", real)


def host(rounds: int, calls: int = 200) -> list[dict]:
    out = []
    B, L = 2, 4
    for graph_name in ("absorb", "uniform"):
        graph = get_graph(graph_name, 63)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(B, L, graph.dim, generator=g)
        x0 = torch.randint(0, graph.N, (B, L), generator=g)
        x_t = graph.sample_transition(x0, torch.full((B,), 1.0), generator=g)
        sigma, weight = torch.rand(B, generator=g) + 0.5, torch.rand(B, generator=g) + 0.5
        shift = graph.score_shift(sigma)
        gen = torch.Generator().manual_seed(1)
        leaf = z.clone().requires_grad_()

        def fwd_bwd():
            loss = ops.score_entropy(leaf * 1, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="batchmean")
            loss.backward()

        cases = {
            "score_entropy fwd": lambda: ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift, weight=weight),
            "score_entropy fwd_bwd": fwd_bwd,
            "euler_step": lambda: ops.euler_step(z, x_t, sigma, 0.01, graph, gen, shift=shift),
            "analytic_step": lambda: ops.analytic_step(z, x_t, sigma, graph, gen, shift=shift),
            "denoise_step": lambda: ops.denoise_step(z, x_t, sigma, graph, gen, shift=shift),
        }
        for backend in ("triton", "torch"):
            restore = _no_launch() if backend == "triton" else (lambda: None)
            try:
                with ops.use_backend(backend), ops.value_checks(False):
                    for name, fn in cases.items():
                        fn()
                        per_round = []
                        for _ in range(rounds):
                            start = time.perf_counter()
                            for _ in range(calls):
                                fn()
                            per_round.append((time.perf_counter() - start) / calls)
                        out.append({"graph": graph_name, "op": name, "backend": backend,
                                    "kernel": "no-op launch" if backend == "triton" else "eager",
                                    "us_per_call": statistics.median(per_round) * 1e6,
                                    "min_us": min(per_round) * 1e6, "max_us": max(per_round) * 1e6})
            finally:
                restore()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--part", choices=["all", "truncation", "host"], default="all")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("set TRITON_INTERPRET=1 (the host part runs the Triton backend's wrappers on CPU tensors)")
    torch.set_num_threads(args.threads)
    record = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "rounds": args.rounds}
    tables = {
        "truncation": (truncation, "| graph | case | median ms [min, max] | × untruncated (median of per-round ratios) |",
                       "| {graph} | {case} | {median_ms:.0f} [{min_ms:.0f}, {max_ms:.0f}] | {x_untruncated:.2f} |"),
        "host": (host, "| graph | op | backend | µs per call [min, max] |",
                 "| {graph} | {op} | {backend} ({kernel}) | {us_per_call:.0f} [{min_us:.0f}, {max_us:.0f}] |"),
    }
    for part, (run, header, row) in tables.items():
        if args.part not in ("all", part):
            continue
        record[part] = run(args.rounds)
        print(header)
        print("|" + " --- |" * (header.count("|") - 1))
        for r in record[part]:
            print(row.format(**r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
