"""Training throughput of the objectives at one preset, measured side by side: SEDD absorbing,
SEDD uniform, the time-independent absorbing SEDD (``--time-conditioning off``, key
``sedd-absorb-free``) and the autoregressive baseline (``train/run.py --objective ar``), each a full
training step (forward, fused loss, backward, AdamW) on the same real blocks.

    python benchmarks/objectives_cpu.py [--preset cpu] [--tokens 4096] [--batch 16] [--steps 10]
                                        [--rounds 5] [--threads 1] [--json OUT]

The objectives take turns (round 1: A, B, C, D; round 2: B, C, D, A; ...), ``--steps`` timed steps each
per round after one untimed warm-up step, so a machine whose load drifts (a shared CPU) slows them
alike; the figure is the median over rounds of tokens per second (batch × length / step time).
Random token ids in [0, --tokens) stand in for text: a step's cost does not depend on which ids
it reads (the absorbing fused head gathers the MASK rows, about half of them at a uniform t).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sedd.graph import graph_from_config  # noqa: E402
from sedd.losses import ar_loss, score_entropy_loss  # noqa: E402
from sedd.model import SEDD, ARModel  # noqa: E402
from sedd.noise import noise_from_config  # noqa: E402


def make_step(name: str, preset: str, tokens: int):
    """(a function running one training step on x0, the model's parameter count)."""
    torch.manual_seed(0)
    if name == "ar":
        model = ARModel(ARModel.config_for(preset, tokens=tokens))

        def loss_of(x0, g):
            return ar_loss(model, x0)
    else:
        model = SEDD(SEDD.config_for(preset, tokens=tokens, graph=name.split("-")[1],
                                     time_conditioning=not name.endswith("-free")))
        graph, noise = graph_from_config(model.config), noise_from_config(model.config)

        def loss_of(x0, g):
            return score_entropy_loss(model, x0, graph, noise, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step(x0, g):
        loss = loss_of(x0, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="objectives_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--tokens", type=int, default=4096, help="real tokens N (the cpu preset's BPE: 4096)")
    p.add_argument("--batch", type=int, default=16, help="blocks per step (the cpu preset's: 16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per objective per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the figures and settings as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["sedd-absorb", "sedd-uniform", "sedd-absorb-free", "ar"]
    steps = {n: make_step(n, args.preset, args.tokens) for n in names}
    length = SEDD.config_for(args.preset)["model"]["length"]
    data = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            step, _ = steps[name]
            g = torch.Generator().manual_seed(r)
            step(torch.randint(0, args.tokens, (args.batch, length), generator=data), g)  # warm-up
            began = time.perf_counter()
            for _ in range(args.steps):
                step(torch.randint(0, args.tokens, (args.batch, length), generator=data), g)
            times[name].append((time.perf_counter() - began) / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names),
              file=sys.stderr)
    rows = {n: {"parameters": steps[n][1], "step_s": statistics.median(times[n]),
                "tokens_per_s": args.batch * length / statistics.median(times[n]), "step_s_rounds": times[n]}
            for n in names}
    print("| objective | parameters | step (ms, median) | training tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    for n, r in rows.items():
        print(f"| {n} | {r['parameters'] / 1e6:.3f}M | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "length": length, "results": rows}, indent=2)
                                   + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
