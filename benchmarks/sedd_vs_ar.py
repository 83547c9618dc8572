"""SEDD against the autoregressive baseline on one corpus: the table and the plot of the comparison,
from the files the entry points wrote.

    python benchmarks/sedd_vs_ar.py --run "SEDD absorbing=RUNS/sedd-absorb" --run "AR=RUNS/ar" ... \\
        [--throughput objectives.json] --out benchmarks/results/sedd-vs-ar-cpu-DATE

Each ``--run NAME=DIR[:Q1.json,Q2.json,...]`` names a train/run.py output directory holding,
besides its checkpoint, ``eval.json`` (``train/eval.py --json``: the exact NLL, or the bound with
its interval) and the ``train/quality.py --json`` files named after the colon (default
``quality.json``: generative perplexity, entropy and NFE per record). Records of the same sampler
(predictor and cache; first hitting at several ``--tokens-per-step``) make one line of the plot. Its ``metrics.jsonl`` gives the training tokens/s the run logged (median of its log
lines) and its last validation loss. ``--throughput`` adds the side-by-side step times of
``benchmarks/objectives_cpu.py`` (keys sedd-absorb, sedd-uniform, ar; matched to a run by its
config's objective and graph).

Writes OUT.json (every figure, with the files it came from) and OUT.png (generative perplexity
against NFE, one line per model and sampler, the real text's as a dashed line; entropy beside
it), and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"sedd_vs_ar.py: error: {path} is missing")
    return json.loads(path.read_text())


def sampler_of(q: dict) -> str:
    """The sampler a quality.json's records come from, as the plot names it (the files before
    SamplingSpec named it "predictor" and the cache "on"/"off")."""
    name = (q.get("sampler") or q["predictor"]).replace("_", " ")
    cache = q.get("cache")
    if cache not in (None, False, "off"):
        name += f", cache {'on' if cache is True else cache}"
    return name


def collect(name: str, folder: Path, quality_files: list[str], throughput: dict | None) -> dict:
    config = _load(folder / "config.json")
    ev = _load(folder / "eval.json")
    qs = [_load(folder / f) for f in quality_files]
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tps = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    # per block, as the committed results have it (runs since issue 32's item 13 log nats per token
    # under val_loss and keep the per-block value under val_loss_per_sequence)
    vals = [m.get("val_loss_per_sequence", m["val_loss"]) for m in metrics if "val_loss" in m]
    objective = config.get("objective", "sedd")
    key = "ar" if objective == "ar" else f"sedd-{config['graph']['type']}"
    if objective != "ar" and config["model"].get("time_conditioning") is False:
        key += "-free"
    return {
        "name": name, "dir": str(folder), "objective": objective, "step": config.get("step"),
        "parameters": None if throughput is None else throughput["results"][key]["parameters"],
        "exact": ev["exact"], "nats_per_token": ev["nats_per_token"], "stderr_nats_per_token": ev["stderr_nats_per_token"],
        "perplexity": ev["perplexity_bound"], "perplexity_ci95": ev["perplexity_ci95"], "eval_tokens": ev["tokens"],
        "eval_blocks": ev["blocks"], "eval_draws": None if ev["exact"] else ev["num_samples"],
        "train_tokens_per_s_logged": statistics.median(tps) if tps else None,
        "train_tokens_per_s_side_by_side": None if throughput is None else throughput["results"][key]["tokens_per_s"],
        "final_val_loss": vals[-1] if vals else None,
        "quality_files": quality_files,
        "quality": [{"sampler": sampler_of(q), "tokens_per_step": r.get("tokens_per_step", q.get("tokens_per_step")),
                     **{k: r[k] for k in ("steps", "nfe", "gen_ppl", "gen_ppl_ci", "entropy", "degenerate", "wall_s",
                                          "tokens_per_s")}}
                    for q in qs for r in q["records"]],
        "reference": next((q["reference"] for q in qs if q.get("reference")), None),
    }


def table(runs: list[dict]) -> str:
    """Two markdown tables: likelihood and training speed per model; quality per model and sampler."""
    lines = ["| model | NLL / token (nats, ± 95% half-width) | perplexity [95% CI] | training tokens/s (side by side; logged in the run) |",
             "| --- | --- | --- | --- |"]
    for r in runs:
        lo, hi = r["perplexity_ci95"]
        nll = (f"{r['nats_per_token']:.3f} (exact)" if r["exact"]
               else f"≤ {r['nats_per_token']:.3f} ± {1.96 * r['stderr_nats_per_token']:.3f}")
        ppl = f"{r['perplexity']:.1f}" if r["exact"] else f"≤ {r['perplexity']:.1f} [{lo:.1f}, {hi:.1f}]"
        side = r["train_tokens_per_s_side_by_side"]
        tps = f"{side:,.0f}" if side else "–"
        tps += f"; {r['train_tokens_per_s_logged']:,.0f}" if r["train_tokens_per_s_logged"] else ""
        lines.append(f"| {r['name']} | {nll} | {ppl} | {tps} |")
    lines += ["", "| model | sampler | gen-PPL [95% CI] at NFE (entropy) |", "| --- | --- | --- |"]
    for r in runs:
        for sampler in dict.fromkeys(q["sampler"] for q in r["quality"]):
            cells = [f"{q['gen_ppl']:.0f} [{q['gen_ppl_ci'][0]:.0f}, {q['gen_ppl_ci'][1]:.0f}] at {q['nfe']:.0f} "
                     f"({q['entropy']:.2f})"
                     for q in sorted((q for q in r["quality"] if q["sampler"] == sampler), key=lambda q: q["nfe"])]
            lines.append(f"| {r['name']} | {sampler} | {'; '.join(cells)} |")
    ref = next((r["reference"] for r in runs if r["reference"]), None)
    if ref is not None:
        lo, hi = ref["gen_ppl_ci"]
        lines.append(f"| real text (validation) | – | {ref['gen_ppl']:.0f} [{lo:.0f}, {hi:.0f}] ({ref['entropy']:.2f}) |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5.2))
    for r in runs:
        for sampler in dict.fromkeys(x["sampler"] for x in r["quality"]):
            q = sorted((x for x in r["quality"] if x["sampler"] == sampler), key=lambda x: x["nfe"])
            nfe = [x["nfe"] for x in q]
            ppl = np.array([x["gen_ppl"] for x in q])
            ci = np.array([x["gen_ppl_ci"] for x in q])
            label = f"{r['name']} ({sampler})"
            marker = {"first hitting": "s", "ancestral": "*"}.get(sampler, "o")
            size = 12 if marker == "*" else 6
            a.errorbar(nfe, ppl, yerr=[ppl - ci[:, 0], ci[:, 1] - ppl], marker=marker, markersize=size, capsize=3,
                       label=label)
            b.plot(nfe, [x["entropy"] for x in q], marker=marker, markersize=size, label=label)
    ref = next((r["reference"] for r in runs if r["reference"]), None)
    if ref is not None:
        a.axhline(ref["gen_ppl"], color="gray", linestyle="--", label="real text")
        b.axhline(ref["entropy"], color="gray", linestyle="--", label="real text")
    for ax, label in ((a, "generative perplexity (judge)"), (b, "unigram entropy per sequence (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network evaluations per sequence (NFE)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    a.set_yscale("log")
    handles, labels = a.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sedd_vs_ar.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR[:Q.json,...]")
    p.add_argument("--throughput", type=Path, help="the JSON of benchmarks/objectives_cpu.py")
    p.add_argument("--out", required=True, type=Path, help="path prefix of OUT.json and OUT.png")
    p.add_argument("--title", default="cpu preset, default corpus, 1000 steps, seed 0")
    args = p.parse_args(argv)
    throughput = _load(args.throughput) if args.throughput else None
    runs = []
    for spec in args.run:
        name, sep, rest = spec.partition("=")
        if not sep:
            raise SystemExit(f"sedd_vs_ar.py: error: --run expects NAME=DIR[:Q.json,...], got {spec!r}")
        folder, _, files = rest.partition(":")
        runs.append(collect(name, Path(folder), files.split(",") if files else ["quality.json"], throughput))
    Path(f"{args.out}.json").write_text(json.dumps({"runs": runs, "throughput": throughput}, indent=2) + "\n")
    plot(runs, Path(f"{args.out}.png"), args.title)
    sys.stdout.write(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
