"""Device check, stage "sweep": the kernels' launch choices timed side by side.

    PYTHONPATH=. python3 -m benchmarks.sweep_launch --out benchmarks/results/sweep.jsonl

The fused kernels stream [rows, V] scores, one row per program on a GPU, in tiles of BLOCK_V
columns with ``num_warps`` warps. Which tile and warp count keep enough bytes in flight to reach
the copy bandwidth is a property of the chip, not something to argue on a machine without one, so
this stage times every (BLOCK_V, num_warps) pair below on the GPU at hand, at SEDD-small's
16 × 1024 rows of V = 50258 (absorbing) / 50257 (uniform) bf16 scores, half of the absorbing rows
MASK. Each line of the output is one (kernel, BLOCK_V, num_warps) with its median time (CUDA
events, ``benchmarks/common.py``), GB/s of the traffic the operation cannot avoid (as
``bench_score_entropy.py`` and ``bench_sampling.py`` count it) and the fraction of the copy
bandwidth measured in the same process. The launchers' defaults are marked.

Every launch is compiled once per pair; a pair that fails to compile or run (registers, shared
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
from sedd.kernels import sampling, score_entropy

CUDA, DEVICE = common.CUDA, common.DEVICE
if CUDA:
    B, L, PAIRS = 16, 1024, [(2048, 4), (4096, 4), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (16384, 16)]
else:
    B, L, PAIRS = 2, 8, [(64, 4), (128, 4)]
V_ABSORB, V_UNIFORM = (50258, 50257) if CUDA else (67, 66)


def _inputs(absorbing: bool):
    g = torch.Generator(DEVICE).manual_seed(0)
    V = V_ABSORB if absorbing else V_UNIFORM
    N = V - 1 if absorbing else V
    z = torch.randn(B, L, V, device=DEVICE, generator=g, dtype=torch.bfloat16)
    x0 = torch.randint(0, N, (B, L), device=DEVICE, generator=g)
    x_t = x0.clone()
    moved = torch.rand(B, L, device=DEVICE, generator=g) < 0.5
    x_t[moved] = N if absorbing else torch.randint(0, N, (int(moved.sum()),), device=DEVICE, generator=g)
    sigma = torch.full((B,), 1.0, device=DEVICE)
    return z, x_t, x0, sigma, V


def _cases():
    """(name, absorbing, run(block_v, num_warps), bytes the operation cannot avoid)."""
    for absorbing in (True, False):
        z, x_t, x0, sigma, V = _inputs(absorbing)
        read_rows = int((x_t == V - 1).sum()) if absorbing else B * L
        scores = read_rows * V * z.element_size()
        ids = 2 * B * L * x_t.element_size()
        grad = torch.empty_like(z)
        graph = "absorb" if absorbing else "uniform"

        def fwd(bv, nw, z=z, x_t=x_t, x0=x0, sigma=sigma, absorbing=absorbing):
            return score_entropy.score_entropy(z, sigma, x_t, x0, absorbing=absorbing, block_v=bv, num_warps=nw)

        def fwd_grad(bv, nw, z=z, x_t=x_t, x0=x0, sigma=sigma, absorbing=absorbing, grad=grad):
            return score_entropy.score_entropy(z, sigma, x_t, x0, absorbing=absorbing, grad=grad, block_v=bv,
                                               num_warps=nw)

        yield f"score_entropy {graph} fwd", fwd, scores + ids
        yield f"score_entropy {graph} fwd+grad", fwd_grad, scores + B * L * V * z.element_size() + ids
        seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        scalar = torch.full((B,), 0.05, device=DEVICE)
        for kind in ("analytic", "euler") if absorbing else ("euler", "analytic"):

            def step(bv, nw, kind=kind, z=z, x_t=x_t, absorbing=absorbing, V=V):
                return sampling.reverse_step(kind, z, x_t, scalar, absorbing, V - 1 if absorbing else V, seed=seed,
                                             block_v=bv, num_warps=nw)

            yield f"reverse_step {graph} {kind}", step, scores + ids
        del z, grad


def _default_pair(name: str) -> tuple[int, int]:
    if name.startswith("score_entropy"):
        _, bv, nw = score_entropy._launch_config(B * L, V_ABSORB, 2, None)
        return bv, nw
    bv = 4096 if CUDA else 256
    return bv, min(8, max(1, bv // 256))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per (kernel, BLOCK_V, num_warps)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    copy = common.copy_bandwidth()
    print(f"{common.device_name()}: copy {copy / 1e9:.4g} GB/s; [{B}, {L}, V] bf16")
    print("| kernel | BLOCK_V | warps | median ms | GB/s | of copy BW | default |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    with args.out.open("w") as out:
        for name, run, nbytes in _cases():
            default = _default_pair(name)
            for bv, nw in PAIRS:
                row = dict(kernel=name, block_v=bv, num_warps=nw, shape=[B, L], bytes=nbytes,
                           default=(bv, nw) == default, device=common.device_name(), commit=common.commit_id())
                t0 = time.perf_counter()
                try:
                    seconds = common.time_median(lambda: run(bv, nw), warmup=2, rounds=10 if CUDA else 1)
                except Exception as err:  # a pair the chip cannot run is a result, not the end of the sweep
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                    print(f"| {name} | {bv} | {nw} | – | – | – | {row['error']} |", flush=True)
                else:
                    row.update(median_s=seconds, gb_per_s=nbytes / seconds / 1e9, fraction_of_copy=nbytes / seconds / copy)
                    mark = "default" if row["default"] else ""
                    print(f"| {name} | {bv} | {nw} | {seconds * 1e3:.3f} | {row['gb_per_s']:.0f} | "
                          f"{row['fraction_of_copy']:.1%} | {mark} |", flush=True)
                row["wall_s"] = time.perf_counter() - t0
                out.write(json.dumps(row) + "\n")
                out.flush()
    print(f"sweep written to {args.out}")


if __name__ == "__main__":
    main()
