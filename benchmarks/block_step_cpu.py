"""The cost of per-block σ conditioning in a block-diffusion training step, on the CPU.

    python benchmarks/block_step_cpu.py [--block-size 4 16] [--repeats 15] [--threads 1]

Times one training step's forward and backward (``block_diffusion_loss`` through the fused head,
as train/run.py runs it) of the cpu preset's model (D = 128, 4 blocks, L = 128, 4097 ids, batch 16)
without σ (c = SiLU(cond_embed), one row broadcast to every token) and with per-block σ (the adaLN
rows of the K noisy blocks and of the clean stream gathered to the 2L − b tokens,
:class:`sedd.model.layers.PerToken`). The two models share every weight but the conditioning and
run alternately, step for step, so that a change of the machine's load hits both; the figure is
the median over ``--repeats`` pairs of the per-pair ratio.

What to expect (counted, not timed): per token and DDiT block the step's matmuls are about
3 · (24·D² + 4·S·D) ≈ 1.6 MFLOP; the per-token conditioning adds, per token and block, a gathered
[6D] modulation written and read in the forward and its gradient written and scattered back in the
backward: about 4 · 6D fp32 values ≈ 12 KB, a few percent of the matmuls' time at this width.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _models(block_size: int, tokens: int):
    from sedd.model import BlockSEDD

    out = {}
    for name, tc in (("no sigma", False), ("sigma per block", True)):
        torch.manual_seed(0)
        out[name] = BlockSEDD(BlockSEDD.config_for("cpu", block_size=block_size, tokens=tokens,
                                                   time_conditioning=tc)).train()
    # the same trunk: only the conditioning differs
    shared = {k: v for k, v in out["no sigma"].state_dict().items() if k != "cond_embed"}
    out["sigma per block"].load_state_dict(shared, strict=False)
    return out


def _step(model, x0, graph, noise, seed: int) -> float:
    from sedd.block_diffusion import block_diffusion_loss

    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    block_diffusion_loss(model, x0, graph, noise, generator=torch.Generator().manual_seed(seed)).backward()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="block_step_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--block-size", type=int, nargs="+", default=[4, 16])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sedd import ops
    from sedd.graph import Absorbing
    from sedd.noise import LogLinear

    tokens, batch, length = 4096, 16, 128
    graph, noise = Absorbing(tokens), LogLinear()
    x0 = torch.randint(0, tokens, (batch, length), generator=torch.Generator().manual_seed(0))
    report = {"threads": args.threads, "batch": batch, "length": length, "tokens": tokens, "results": []}
    with ops.value_checks(False):
        for b in args.block_size:
            models = _models(b, tokens)
            times = {name: [] for name in models}
            for i in range(args.repeats + 2):  # two warm-up pairs
                for name, model in models.items():
                    t = _step(model, x0, graph, noise, seed=i)
                    if i >= 2:
                        times[name].append(t)
            ratios = [s / n for s, n in zip(times["sigma per block"], times["no sigma"])]
            row = {"block_size": b, **{f"{name} ms": 1e3 * statistics.median(v) for name, v in times.items()},
                   "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
            report["results"].append(row)
            print(f"b = {b}: no sigma {row['no sigma ms']:.1f} ms, sigma per block {row['sigma per block ms']:.1f} ms "
                  f"per step (median of {args.repeats}); ratio {row['ratio_median']:.3f} "
                  f"[{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
