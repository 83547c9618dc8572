"""Cached against uncached sampling of one checkpoint: the same tokens?, forward rows, wall time.

For every step count T the analytic sampler runs uncached and with the cache (``--cache on`` for a
model without time conditioning, ``approximate`` for a σ-conditioned one) from the same seed, the
two interleaved ``--repeats`` times so that a machine's changing load hits both alike. Recorded per
T: whether the tokens are identical (and the share that differ), the NFE per sequence (mean, and
the forward rows of the batch), and the wall times (every repeat, their minimum and median).
Generative perplexity and entropy come from ``train/quality.py``; see ``benchmarks/results/nfe-*``.

    python -m benchmarks.nfe_cpu runs/free --steps 32,64,128,256,512 --cache on --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from tqdm.auto import tqdm

from sedd import load_pretrained
from sedd.sampling import sample


def measure(pre, steps: int, cache, batch: int, length: int, seed: int, repeats: int, progress: bool) -> dict:
    runs = {"uncached": [], "cached": []}
    tokens, stats = {}, {}
    for _ in tqdm(range(repeats), desc=f"T={steps}", disable=not progress, leave=False):
        for name, value in (("uncached", False), ("cached", cache)):
            generator = torch.Generator().manual_seed(seed)
            began = time.perf_counter()
            x, s = sample(pre.model, pre.graph, pre.noise, batch_size=batch, length=length, steps=steps,
                          generator=generator, cache=value, return_stats=True)
            runs[name].append(time.perf_counter() - began)
            tokens[name], stats[name] = x, s
    differ = float((tokens["uncached"] != tokens["cached"]).double().mean())
    record = {"steps": steps, "identical_tokens": differ == 0.0, "share_of_tokens_differing": differ}
    for name in runs:
        record[name] = {**stats[name].as_dict(), "wall_s": runs[name], "wall_min_s": min(runs[name]),
                        "wall_median_s": statistics.median(runs[name])}
    record["forward_rows_ratio"] = stats["uncached"].forward_rows / max(stats["cached"].forward_rows, 1)
    record["wall_ratio_min"] = record["uncached"]["wall_min_s"] / record["cached"]["wall_min_s"]
    record["wall_ratio_median"] = record["uncached"]["wall_median_s"] / record["cached"]["wall_median_s"]
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--steps", default="32,64,128,256,512", help="comma-separated step counts")
    p.add_argument("--cache", choices=["on", "approximate"], default="on")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--length", type=int, help="default: the model's length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokenizer", help="tokenizer spec (default: the checkpoint's)")
    p.add_argument("--json", help="write the records here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    pre = load_pretrained(args.checkpoint, tokenizer=args.tokenizer, device="cpu")
    cache = True if args.cache == "on" else "approximate"
    length = args.length or pre.model.length
    records = []
    for steps in sorted({int(s) for s in args.steps.split(",")}):
        records.append(measure(pre, steps, cache, args.batch_size, length, args.seed, args.repeats, progress))
        r = records[-1]
        print(f"T={steps}: identical {r['identical_tokens']}, NFE {r['uncached']['nfe_mean']:.1f} -> "
              f"{r['cached']['nfe_mean']:.1f} ({r['forward_rows_ratio']:.2f}x fewer rows), wall min "
              f"{r['uncached']['wall_min_s']:.1f}s -> {r['cached']['wall_min_s']:.1f}s ({r['wall_ratio_min']:.2f}x)",
              file=sys.stderr, flush=True)
    result = {"checkpoint": args.checkpoint, "cache": args.cache, "batch_size": args.batch_size, "length": length,
              "seed": args.seed, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "time_conditioning": pre.model.time_conditioning, "records": records}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
