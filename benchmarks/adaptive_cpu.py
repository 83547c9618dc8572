"""Issue 33's measurements gathered: first hitting at fixed k against its adaptive rules (threshold
τ, entropy bound γ) and the analytic sampler, per model, from the ``train/quality.py --json`` files;
and what one evaluation of each costs.

    python benchmarks/adaptive_cpu.py gather --records RUNS/quality --model "time-independent=RUNS/sedd-ti" \\
        --model "default=RUNS/sedd" --out benchmarks/results/adaptive-cpu-DATE
    python benchmarks/adaptive_cpu.py cost CKPT [--batch 16] [--repeats 7] [--threads 1]

Each ``--model NAME=CHECKPOINT`` takes the ``--records`` folder's quality.py JSON files of that
checkpoint (its ``checkpoint`` field: NFE, wall time, gen-PPL with its 95% interval, entropy). A record belongs to a family by what set its cost: fixed
k (``tokens_per_step``), τ, γ, or the analytic sampler's T. Per model it checks the issue's target:

* a τ or γ whose gen-PPL lies inside k = 1's 95% interval at ≤ 1/3 of k = 1's NFE;
* the adaptive records against fixed k at the same NFE: fixed k's gen-PPL interpolated linearly in
  log NFE between its two neighbours (k = 1, 2, 4, 8, 16: NFE L, L/2, ..., L/16; an NFE within 5% of
  the range's ends counts as at the end), "at or below" when the adaptive gen-PPL is at most that,
  "intervals overlap" when its interval meets fixed k's there (the nearer neighbour's relative
  half-widths).

Writes OUT.json (every record with its family and file, the checks) and OUT.png (gen-PPL against
NFE, one line per family, one panel per model; wall time against NFE below), and prints the
markdown tables. Wall times are one run each on a shared machine: see the results file.

``cost``: one evaluation of the first-hitting sampler at the fully masked state of ``--batch``
sequences, as the sampler makes it (``FirstHittingPredictor._draw``): k = 1 (the trunk, the head at
one row per sequence and the denoise step there) against the rules' (the same plus the head at
every MASK row and ``sedd.ops.denoise_with_stats`` there), and the parts of the difference alone;
then whole ``sample`` calls of ``--batch`` sequences: k = 1, τ = 1 (no position is that sure on an
unconverged model: the same tokens, every evaluation paying for the statistics), and ``--rule``
settings against fixed k. Medians of interleaved repeats, milliseconds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

FAMILIES = ("first hitting, fixed k", "threshold τ", "entropy bound γ", "analytic T")


def family(record: dict) -> tuple[str, float]:
    """(family, the value that sets its cost) of one quality.py record."""
    if record.get("threshold") is not None:
        return "threshold τ", record["threshold"]
    if record.get("entropy_bound") is not None:
        return "entropy bound γ", record["entropy_bound"]
    if record.get("tokens_per_step") is not None:
        return "first hitting, fixed k", record["tokens_per_step"]
    return "analytic T", record["steps"]


def collect(name: str, checkpoint: str, folder: Path) -> dict:
    files = [(path, json.loads(path.read_text())) for path in sorted(folder.glob("*.json"))]
    files = [(path, q) for path, q in files if Path(q.get("checkpoint", "")) == Path(checkpoint)]
    if not files:
        raise SystemExit(f"adaptive_cpu.py: error: no quality.py JSON of {checkpoint} in {folder}")
    records, reference = [], None
    for path, q in files:
        reference = reference or q.get("reference")
        for r in q["records"]:
            fam, value = family(r)
            records.append({"family": fam, "value": value, "file": path.name,
                            **{k: r[k] for k in ("nfe", "wall_s", "tokens_per_s", "gen_ppl", "gen_ppl_ci", "entropy",
                                                 "degenerate", "num_samples", "length")}})
    records.sort(key=lambda r: (FAMILIES.index(r["family"]), -r["nfe"]))
    return {"name": name, "checkpoint": checkpoint, "records": records, "reference": reference,
            "checks": checks(records)}


def _fixed_at(fixed: list[dict], nfe: float) -> float | None:
    """Fixed k's gen-PPL at ``nfe``, linear in log NFE between its neighbours (None outside)."""
    pts = sorted((r["nfe"], r["gen_ppl"]) for r in fixed)
    if pts and pts[0][0] / 1.05 <= nfe < pts[0][0]:
        nfe = pts[0][0]
    for (n0, p0), (n1, p1) in zip(pts, pts[1:]):
        if n0 <= nfe <= n1:
            w = 0.0 if n1 == n0 else (math.log(nfe) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return p0 + w * (p1 - p0)
    return None


def checks(records: list[dict]) -> dict:
    fixed = [r for r in records if r["family"] == "first hitting, fixed k"]
    base = next(r for r in fixed if r["value"] == 1)
    lo, hi = base["gen_ppl_ci"]
    adaptive = [r for r in records if r["family"] in ("threshold τ", "entropy bound γ")]
    target = [r for r in adaptive if lo <= r["gen_ppl"] <= hi and r["nfe"] <= base["nfe"] / 3]
    against = []
    for r in adaptive:
        at = _fixed_at(fixed, r["nfe"])
        if at is None:
            continue
        # fixed k's interval at that NFE, from its nearer neighbour's relative half-widths
        near = min(fixed, key=lambda f: abs(math.log(f["nfe"]) - math.log(r["nfe"])))
        rel = (near["gen_ppl_ci"][0] / near["gen_ppl"], near["gen_ppl_ci"][1] / near["gen_ppl"])
        overlap = r["gen_ppl_ci"][0] <= at * rel[1] and at * rel[0] <= r["gen_ppl_ci"][1]
        against.append({"family": r["family"], "value": r["value"], "nfe": r["nfe"], "gen_ppl": r["gen_ppl"],
                        "fixed_k_gen_ppl": at, "at_or_below": r["gen_ppl"] <= at, "within_noise": overlap})
    return {"k1": {"nfe": base["nfe"], "gen_ppl": base["gen_ppl"], "ci": base["gen_ppl_ci"], "wall_s": base["wall_s"]},
            "target_met_by": [{"family": r["family"], "value": r["value"], "nfe": r["nfe"], "gen_ppl": r["gen_ppl"],
                               "wall_s": r["wall_s"]} for r in target],
            "against_fixed_k": against}


def tables(models: list[dict]) -> str:
    out = []
    for m in models:
        k1 = m["checks"]["k1"]
        out += [f"**{m['name']}** (`{m['checkpoint']}`)", "",
                "| sampler | value | NFE | wall s | tokens/s | × k = 1 wall | gen-PPL [95% CI] | entropy |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for r in m["records"]:
            lo, hi = r["gen_ppl_ci"]
            out.append(f"| {r['family']} | {r['value']:g} | {r['nfe']:.1f} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} "
                       f"| {r['wall_s'] / k1['wall_s']:.2f} | {r['gen_ppl']:.0f} [{lo:.0f}, {hi:.0f}] "
                       f"| {r['entropy']:.3f} |")
        if m["reference"]:
            ref = m["reference"]
            out.append(f"| real text (held out) | | | | | | {ref['gen_ppl']:.0f} [{ref['gen_ppl_ci'][0]:.0f}, "
                       f"{ref['gen_ppl_ci'][1]:.0f}] | {ref['entropy']:.3f} |")
        out += ["", "| adaptive | value | NFE | gen-PPL | fixed k at that NFE | at or below | intervals overlap |",
                "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for a in m["checks"]["against_fixed_k"]:
            out.append(f"| {a['family']} | {a['value']:g} | {a['nfe']:.1f} | {a['gen_ppl']:.0f} | {a['fixed_k_gen_ppl']:.0f} "
                       f"| {'yes' if a['at_or_below'] else 'no'} | {'yes' if a['within_noise'] else 'no'} |")
        met = m["checks"]["target_met_by"]
        out += ["", "Target (gen-PPL inside k = 1's interval at ≤ 1/3 of its NFE): "
                + (", ".join(f"{t['family']} {t['value']:g} (NFE {t['nfe']:.1f}, gen-PPL {t['gen_ppl']:.0f})" for t in met)
                   if met else "not met by any τ or γ measured") + ".", ""]
    return "\n".join(out)


def plot(models: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    markers = dict(zip(FAMILIES, "osD^"))
    for col, m in enumerate(models):
        top, bottom = axes[0, col], axes[1, col]
        for fam in FAMILIES:
            rs = sorted((r for r in m["records"] if r["family"] == fam), key=lambda r: r["nfe"])
            if not rs:
                continue
            nfe = [r["nfe"] for r in rs]
            ppl = [r["gen_ppl"] for r in rs]
            err = [[r["gen_ppl"] - r["gen_ppl_ci"][0] for r in rs], [r["gen_ppl_ci"][1] - r["gen_ppl"] for r in rs]]
            top.errorbar(nfe, ppl, yerr=err, marker=markers[fam], capsize=3, label=fam)
            bottom.plot(nfe, [r["wall_s"] for r in rs], marker=markers[fam], label=fam)
        if m["reference"]:
            top.axhline(m["reference"]["gen_ppl"], color="gray", linestyle="--", label="real text")
        top.set_title(m["name"], fontsize=10)
        top.set_ylabel("gen-PPL (local judge), 95% CI")
        bottom.set_ylabel("wall s to sample 64 × 128 tokens (CPU, 1 thread)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("network evaluations per sequence (NFE)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost(checkpoint: str, batch: int, repeats: int, run_repeats: int, rules: dict[str, dict]) -> dict:
    import statistics
    import time

    import torch

    from sedd import load_pretrained, ops
    from sedd.model.scoring import head_at_rows
    from sedd.sampling import FirstHittingPredictor, sample
    from sedd.sampling.first_hitting import side_generator

    p = load_pretrained(checkpoint, device="cpu")
    model, graph = p.model, p.graph
    L = model.length
    x = torch.full((batch, L), graph.mask_id)
    sigma = torch.full((batch,), 1.0)
    rows = torch.arange(batch)
    event = torch.zeros(batch, dtype=torch.long)
    masked = torch.arange(batch * L)
    gen = torch.Generator().manual_seed(0)
    side = side_generator(gen, torch.device("cpu"))
    weight, bias = model.output_layer.linear.weight, model.output_layer.linear.bias
    hidden = torch.randn(batch * L, weight.shape[1])
    z = head_at_rows(hidden, weight, bias, graph.dim)[:, None]
    mask = torch.full((batch * L, 1), graph.mask_id)
    parts = {
        "k = 1 evaluation": lambda: FirstHittingPredictor._draw(model, x, sigma, rows, event, rows, graph, gen, None,
                                                                None),
        "rule's evaluation": lambda: FirstHittingPredictor._draw(model, x, sigma, rows, event, rows, graph, gen, None,
                                                                 None, masked=masked, side=side),
        "trunk alone": lambda: model(x, sigma, head=lambda h, w, b: None),
        "head at every MASK row": lambda: head_at_rows(hidden, weight, bias, graph.dim),
        "denoise_with_stats at every MASK row": lambda: ops.denoise_with_stats(
            z, mask, sigma.repeat_interleave(L), graph, side),
    }
    runs = {f"sample, {name}": (lambda kw=kw: sample(model, graph, p.noise, batch_size=batch, length=L,
                                                     predictor="first_hitting", return_stats=True,
                                                     generator=torch.Generator().manual_seed(0), **kw))
            for name, kw in rules.items()}
    times = {name: [] for name in (*parts, *runs)}
    nfe = {}
    with torch.no_grad(), ops.value_checks(False):
        for fn in parts.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in parts.items():
                began = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - began)
    for _ in range(run_repeats):
        for name, fn in runs.items():
            began = time.perf_counter()
            _, stats = fn()
            times[name].append(time.perf_counter() - began)
            nfe[name] = stats.mean_nfe
    return {"checkpoint": checkpoint, "batch": batch, "length": L, "V": graph.dim, "repeats": repeats,
            "run_repeats": run_repeats, "threads": torch.get_num_threads(), "nfe": nfe,
            "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
            "ms_min_max": {name: [1e3 * min(t), 1e3 * max(t)] for name, t in times.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gather", help="the quality records' tables, checks and plot")
    g.add_argument("--records", required=True, type=Path, help="the folder of the quality.py JSON files")
    g.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="a model's name and its checkpoint, as the JSON files name it")
    g.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.png")
    g.add_argument("--cost", action="append", default=[], type=Path, help="a JSON that `cost` printed, kept in OUT.json")
    g.add_argument("--commands", type=Path, help="a text file of the commands that ran, kept in OUT.json")
    c = sub.add_parser("cost", help="one evaluation of k = 1 and of the rules, and the parts of the difference")
    c.add_argument("checkpoint")
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--repeats", type=int, default=7)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--run-repeats", type=int, default=3, help="repeats of the whole sample calls (0: none)")
    c.add_argument("--rule", action="append", default=[], metavar="NAME=VALUE",
                   help="a sample call besides k = 1 and threshold = 1: tokens_per_step=8, entropy_bound=30, ...")
    args = p.parse_args(argv)
    if args.command == "cost":
        import torch

        torch.set_num_threads(args.threads)
        rules = {"k = 1": {}, "threshold 1": {"threshold": 1.0}}
        for text in args.rule:
            name, value = text.split("=", 1)
            rules[text] = {name: int(value) if name == "tokens_per_step" else float(value)}
        result = cost(args.checkpoint, args.batch, args.repeats, args.run_repeats, rules)
        print(json.dumps(result, indent=2))
        return 0
    models = [collect(*spec.split("=", 1), args.records) for spec in args.model]
    out = Path(args.out)
    result = {"models": models, "cost": [json.loads(path.read_text()) for path in args.cost],
              "commands": args.commands.read_text().splitlines() if args.commands else None}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    plot(models, out.with_suffix(".png"))
    print(tables(models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
