"""On the CPU: the cpu preset's training step eager against compiled blocks, and the aligned head
against the unpadded one, in one interleaved run (the numbers behind train/run.py's CPU defaults).

    PYTHONPATH=. python benchmarks/compile_cpu.py --json benchmarks/results/compile-cpu-DATE.json

train/run.py's own step (:class:`train.step.TrainStep`) at the ``cpu`` preset (4 blocks of width
128, 16 blocks of 128 tokens, fused AdamW, EMA) over a vocabulary of 4096 ids (its default BPE),
on random tokens, in four variants: ``--compile off`` / ``on`` (inductor) × head padded to a
multiple of 64 (4097 -> 4160 rows) / unpadded. Each variant is warmed up (compilation included),
then the rounds go round-robin, ``--steps`` steps per variant per round, so that a machine
whose load changes (a shared one) slows every variant of a round alike. Reports each variant's
median and best (min-time) tokens/s, and the ratios as the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sedd.objectives import get_objective
from train.config import model_config, resolve_config
from train.step import LogWindow, TrainStep, make_optimizer

VARIANTS = [("eager", 64), ("eager", 1), ("compiled", 64), ("compiled", 1)]


def build(mode: str, pad: int, cfg: dict, config: dict):
    objective = get_objective(cfg["objective"])(config, training=cfg)
    torch.manual_seed(0)
    net = objective.build(config, None)
    if pad != 64:
        plain = type(net)(config, pad_head_to=pad)
        plain.load_state_dict(net.state_dict())
        net = plain
    if mode == "compiled":
        net.compile_blocks()
    optimizer = make_optimizer(net, cfg, fused=True)
    ema = {name: p.detach().clone() for name, p in net.named_parameters()}
    net.train()
    return TrainStep(net, net, objective, optimizer, ema, cfg, LogWindow(torch.device("cpu")),
                     device=torch.device("cpu"), eos_id=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="vocabulary (the cpu preset's BPE: 4096)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: every core, as train/run.py on one process")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cfg = resolve_config({}, "cpu", None, 1)
    config = model_config(cfg, args.tokens, 1)
    B, L = cfg["batch_size"], cfg["length"]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.tokens, (B, L), generator=gen) for _ in range(8)]
    steps, counters, times = {}, {}, {v: [] for v in VARIANTS}
    for v in VARIANTS:
        started = time.perf_counter()
        steps[v], counters[v] = build(*v, cfg, config), 0
        for _ in range(args.warmup):
            steps[v](counters[v], [batches[counters[v] % len(batches)]])
            counters[v] += 1
        print(f"{v}: built and warmed up in {time.perf_counter() - started:.1f} s", flush=True)
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for v in VARIANTS:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[v](counters[v], [batches[counters[v] % len(batches)]])
                counters[v] += 1
            times[v].append((time.perf_counter() - t0) / args.steps)
    load_after = os.getloadavg()
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "threads": threads,
              "torch": torch.__version__, "shape": [B, L], "tokens": args.tokens, "rounds": args.rounds,
              "steps_per_round": args.steps, "load_average_before_after": [load_before, load_after], "variants": {}}
    print("| variant | median ms/step [min-max] | tokens/s (median) | tokens/s (best round) |\n| --- | ---: | ---: | ---: |")
    for (mode, pad), t in times.items():
        median = statistics.median(t)
        name = f"{mode}, head padded to {pad}" if pad > 1 else f"{mode}, unpadded head"
        result["variants"][name] = {"median_s": median, "tokens_per_s": B * L / median,
                                    "best_tokens_per_s": B * L / min(t), "rounds_s": t}
        print(f"| {name} | {median * 1e3:.1f} [{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}] | {B * L / median:,.0f} "
              f"| {B * L / min(t):,.0f} |")
    def ratio(a, b):  # speed of a over b: the median of the rounds' time ratios b / a
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))

    result["compiled_over_eager"] = ratio(("compiled", 64), ("eager", 64))
    result["padded_over_unpadded_eager"] = ratio(("eager", 64), ("eager", 1))
    result["padded_over_unpadded_compiled"] = ratio(("compiled", 64), ("compiled", 1))
    print(f"speed, median of the per-round ratios: compiled / eager (padded head) {result['compiled_over_eager']:.3f}; "
          f"padded / unpadded head: eager {result['padded_over_unpadded_eager']:.3f}, compiled "
          f"{result['padded_over_unpadded_compiled']:.3f}; load average {load_before} -> {load_after}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
