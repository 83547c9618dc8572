"""Block diffusion against SEDD and the autoregressive baseline on one corpus: the tables and the plot
of benchmarks/results/block-cpu-*, from the files the entry points wrote.

    python benchmarks/block_cpu.py --run "AR=RUNS/ar" --run "SEDD absorbing=RUNS/sedd-absorb" \\
        --run "block b=4=RUNS/block-4" ... --quality RUNS/quality --out benchmarks/results/block-cpu-DATE

Each ``--run NAME=DIR`` is a train/run.py output directory holding ``config.json``, ``metrics.jsonl``
(the validation loss every 100 steps) and ``eval.json`` (train/eval.py --json: the exact NLL, or the
bound with its standard error). ``--quality DIR`` holds the train/quality.py --json files named
``RUN-LENGTH.json`` (RUN the run directory's name, LENGTH the generated tokens).

Training compute is counted, not timed (the machine is shared): the dense matmul FLOPs of one
training step (forward and a backward of twice its cost) for each model's own token count and
attention (:func:`step_flops`). The lag of a model is in steps of the autoregressive run: the step at
which AR's validation loss (interpolated between its evaluations) equals the model's at its last
step, and the same in FLOPs.

Writes OUT.json (every figure, with the files it came from) and OUT.png (validation loss against
training FLOPs and against steps; generative perplexity against generation tokens/s), and prints
the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"block_cpu.py: error: {path} is missing")
    return json.loads(path.read_text())


def step_flops(config: dict, global_batch: int, sampling_eps: float = 1e-3) -> dict:
    """The FLOPs of one training step of the model of ``config`` (a run's config.json) on
    ``global_batch`` sequences: forward + backward (2× forward) of the dense matmuls.

    Per sequence of L tokens, width D, n blocks, V = score width:
      trunk      2 · 12·D² per token and block (qkv, out, MLP of ratio 4) over the S tokens the
                 network reads: L (SEDD, AR), 2L − b (block diffusion: [x_t ; x0 without its last block])
      attention  4 · S² · D per block (scores and values; SDPA computes the S² pairs whatever its mask)
      head       2 · D · V per row it computes: all L rows (AR), the masked rows (SEDD absorbing and
                 block diffusion: the fused head reads those only; E[masked] = L·(1 − ε)·E[t], t ~ U[ε_s, 1],
                 or U[t_β, t_ω] for a block run trained on a clipped range of masking rates)
    adaLN, embeddings and the loss's elementwise work are left out (under 1% here), and so is the
    per-token conditioning's gather of the adaLN rows (memory traffic, no matmul)."""
    m = config["model"]
    D, n, L = m["hidden_size"], m["n_blocks"], m["length"]
    ratio = m.get("mlp_ratio", 4)
    objective = config.get("objective", "sedd")
    V = config["tokens"] + (0 if objective == "ar" else 1)
    b = m.get("block_size", L)
    S = 2 * L - b if objective == "block" else L
    if objective == "ar":
        rows = L
    else:
        eps = config.get("noise", {}).get("eps", 1e-3)
        lo, hi = sampling_eps, 1.0
        rates = config.get("training", {}).get("mask_rate_range")
        if rates is not None:
            from sedd.block_diffusion import clipped_times
            from sedd.noise import noise_from_config

            lo, hi = clipped_times(noise_from_config(config), rates, sampling_eps)
        rows = L * (1 - eps) * (lo + hi) / 2
    trunk = 2 * (4 + 2 * ratio) * D * D * n * S
    attention = 4 * S * S * D * n
    head = 2 * D * V * rows
    forward = trunk + attention + head
    return {"tokens_read": S, "head_rows": rows, "trunk": trunk, "attention": attention, "head": head,
            "forward_per_sequence": forward, "step": 3 * forward * global_batch}


def _interp_step(curve: list[tuple[int, float]], loss: float) -> float | None:
    """The step at which ``curve`` [(step, loss)] first comes down to ``loss``, linear between
    evaluations; None if it never does."""
    if curve and curve[0][1] <= loss:
        return float(curve[0][0])
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= loss < l0:
            return s0 + (s1 - s0) * (l0 - loss) / (l0 - l1)
    return None


def collect(name: str, folder: Path, quality: Path | None) -> dict:
    config = _load(folder / "config.json")
    ev = _load(folder / "eval.json")
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    L = config["model"]["length"]
    training = config["training"]
    flops = step_flops(config, training["global_batch"], training.get("sampling_eps", 1e-3))
    # runs written before train/run.py logged per token kept the per-sequence value under val_loss
    curve = [(m["step"], m.get("val_loss_per_sequence", m["val_loss"]) / L) for m in metrics if "val_loss" in m]
    tps = sorted(m["tokens_per_s"] for m in metrics if "tokens_per_s" in m)
    out = {
        "name": name, "dir": str(folder), "objective": config.get("objective", "sedd"),
        "block_size": config["model"].get("block_size"), "step": config.get("step"),
        "exact": ev["exact"], "nats_per_token": ev["nats_per_token"],
        "stderr_nats_per_token": ev["stderr_nats_per_token"], "perplexity": ev["perplexity_bound"],
        "perplexity_ci95": ev["perplexity_ci95"], "eval_tokens": ev["tokens"], "eval_blocks": ev["blocks"],
        "eval_draws": None if ev["exact"] else ev["num_samples"],
        "flops": flops, "val_loss_per_token": curve,
        "train_tokens_per_s_logged_median": tps[len(tps) // 2] if tps else None,
        "generation": [],
    }
    if quality is not None:
        # RUN-LENGTH.json only: block-4-256.json, not block-4-clip-256.json of another run
        for path in sorted(p for p in quality.glob(f"{folder.name}-*.json")
                           if p.stem[len(folder.name) + 1:].isdigit()):
            q = _load(path)
            for r in q["records"]:
                out["generation"].append({
                    "file": str(path), "length": q["length"], "sampler": q["sampler"], "steps": r["steps"],
                    "window": q.get("window"), "stride": q.get("stride"), "kv_cache": q.get("kv_cache"),
                    "nfe_per_sequence": r["nfe"], "nfe_per_token": r["nfe"] / q["length"],
                    "tokens_per_s": r["tokens_per_s"], "wall_s": r["wall_s"], "num_samples": r["num_samples"],
                    "gen_ppl": r["gen_ppl"], "gen_ppl_ci": r["gen_ppl_ci"], "entropy": r["entropy"],
                    "threads": q.get("threads"),
                })
            if q.get("reference"):
                out.setdefault("reference", {})[q["length"]] = q["reference"]
    return out


def compare(runs: list[dict]) -> dict:
    """The lag of every model behind AR (steps and FLOPs at equal validation loss), the share of the
    SEDD-to-AR bound gap each closes at equal steps, and block against windowed SEDD per token."""
    ar = next((r for r in runs if r["objective"] == "ar"), None)
    sedd = next((r for r in runs if r["objective"] == "sedd"), None)
    out: dict = {"lag": {}, "gap_closed": {}, "speedup_per_token": {}}
    if ar is not None:
        for r in runs:
            if r is ar or not r["val_loss_per_token"]:
                continue
            step, final = r["val_loss_per_token"][-1]
            at = _interp_step(ar["val_loss_per_token"], final)
            out["lag"][r["name"]] = {
                "final_step": step, "final_val_loss_per_token": final, "ar_step_at_that_loss": at,
                "lag_steps": None if at is None else step - at,
                "flops_ratio": None if at is None else (step * r["flops"]["step"]) / (at * ar["flops"]["step"]),
            }
    # the share of the bound's gap to AR closed, from SEDD (σ-conditioned) and from the block model
    # with one block (b = L: the same network without σ, without context)
    whole = next((r for r in runs if r["objective"] == "block" and r["block_size"] == r["flops"]["tokens_read"]), None)
    for key, base in (("gap_closed", sedd), ("gap_closed_from_b_L", whole)):
        if ar is None or base is None:
            continue
        gap = base["nats_per_token"] - ar["nats_per_token"]
        out.setdefault(key, {})
        for r in runs:
            if r["objective"] == "block" and r is not base:
                out[key][r["name"]] = (base["nats_per_token"] - r["nats_per_token"]) / gap
    if sedd is not None:
        for r in runs:
            if r["objective"] != "block":
                continue
            for g in r["generation"]:
                base = [s for s in sedd["generation"] if s["length"] == g["length"]]
                if base:
                    s = base[0]
                    out["speedup_per_token"][f"{r['name']} @ {g['length']}"] = {
                        "tokens_per_s": g["tokens_per_s"], "sedd_tokens_per_s": s["tokens_per_s"],
                        "ratio": g["tokens_per_s"] / s["tokens_per_s"],
                        "nfe_per_token": g["nfe_per_token"], "sedd_nfe_per_token": s["nfe_per_token"],
                    }
    return out


def tables(runs: list[dict], cmp: dict) -> str:
    lines = ["| model | tokens read per sequence | training GFLOPs per step | NLL / token (nats, ± 95% half-width) "
             "| perplexity | val loss / token at the last step | AR step at that loss | lag (steps; FLOPs ratio) |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: | --- |"]
    for r in runs:
        nll = (f"{r['nats_per_token']:.3f} (exact)" if r["exact"]
               else f"≤ {r['nats_per_token']:.3f} ± {1.96 * r['stderr_nats_per_token']:.3f}")
        ppl = f"{r['perplexity']:.1f}" if r["exact"] else f"≤ {r['perplexity']:.1f}"
        lag = cmp["lag"].get(r["name"])
        final = r["val_loss_per_token"][-1][1] if r["val_loss_per_token"] else float("nan")
        at = "–" if lag is None or lag["ar_step_at_that_loss"] is None else f"{lag['ar_step_at_that_loss']:.0f}"
        behind = ("–" if lag is None or lag["lag_steps"] is None
                  else f"{lag['lag_steps']:.0f} steps; {lag['flops_ratio']:.1f}×")
        lines.append(f"| {r['name']} | {r['flops']['tokens_read']} | {r['flops']['step'] / 1e9:.1f} | {nll} | {ppl} | "
                     f"{final:.3f} | {at} | {behind} |")
    lines += ["", "| model | tokens | sampler | NFE / token | tokens/s | gen-PPL [95% CI] | entropy |",
              "| --- | ---: | --- | ---: | ---: | --- | ---: |"]
    for length in sorted({g["length"] for r in runs for g in r["generation"]}):
        for r in runs:
            for g in (g for g in r["generation"] if g["length"] == length):
                how = "ancestral, KV cache" if g["sampler"] == "ancestral" else f"{g['sampler']}, {g['steps']} steps"
                if r["objective"] == "block":
                    how += f" per block of {r['block_size']}, KV cache"
                elif g["stride"] is not None and r["objective"] != "ar":
                    how += f" per window of {g['window']} (stride {g['stride']})"
                if r["objective"] == "ar" and g["stride"] is not None:
                    how += f", windows of {g['window']} (stride {g['stride']})"
                lo, hi = g["gen_ppl_ci"]
                lines.append(f"| {r['name']} | {length} | {how} | {g['nfe_per_token']:.3f} | {g['tokens_per_s']:.1f} | "
                             f"{g['gen_ppl']:.0f} [{lo:.0f}, {hi:.0f}] | {g['entropy']:.2f} |")
        ref = next((r["reference"][length] for r in runs if length in r.get("reference", {})), None)
        if ref is not None:
            lo, hi = ref["gen_ppl_ci"]
            lines.append(f"| real text | {length} | – | – | – | {ref['gen_ppl']:.0f} [{lo:.0f}, {hi:.0f}] | "
                         f"{ref['entropy']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.8))
    for r in runs:
        steps = [s for s, _ in r["val_loss_per_token"]]
        loss = [v for _, v in r["val_loss_per_token"]]
        flops = [s * r["flops"]["step"] for s in steps]
        a.plot(flops[1:], loss[1:], marker="o", markersize=3, label=r["name"])
        b.plot(steps, loss, marker="o", markersize=3, label=r["name"])
        for marker, length in (("o", 256), ("s", 1024)):
            gens = [g for g in r["generation"] if g["length"] == length]
            for g in gens:
                lo, hi = g["gen_ppl_ci"]
                c.errorbar([g["tokens_per_s"]], [g["gen_ppl"]], yerr=[[g["gen_ppl"] - lo], [hi - g["gen_ppl"]]],
                           marker=marker, capsize=3, color=a.lines[-1].get_color(),
                           label=f"{r['name']}, {length} tokens")
    a.set_xscale("log")
    a.set_xlabel("training FLOPs (counted: dense matmuls, forward + backward)")
    b.set_xlabel("training step (16 × 128 tokens)")
    for ax in (a, b):
        ax.set_ylabel("validation loss, nats / token")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    a.set_title("AR: exact NLL; the others: the loss's estimate of the bound", fontsize=8)
    c.set_xscale("log")
    c.set_yscale("log")
    c.set_xlabel("generated tokens / s (1 thread; o 256 tokens, ■ 1024)")
    for ax in (a, c):
        ax.xaxis.set_minor_formatter(NullFormatter())
    c.set_ylabel("generative perplexity (local judge)")
    c.grid(alpha=0.3, which="both")
    c.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="block_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--quality", type=Path, help="directory of the quality.py JSON files, RUN-LENGTH.json")
    p.add_argument("--out", required=True, type=Path, help="path prefix of OUT.json and OUT.png")
    p.add_argument("--title", default="cpu preset, default corpus, 1000 steps, seed 0 (2-core shared CPU)")
    p.add_argument("--section", help="add the runs to OUT.json under sections.SECTION (the file's other figures "
                                     "kept) and plot them to OUT-SECTION.png")
    args = p.parse_args(argv)
    runs = []
    for spec in args.run:
        name, sep, folder = spec.rpartition("=")
        if not sep:
            raise SystemExit(f"block_cpu.py: error: --run expects NAME=DIR, got {spec!r}")
        runs.append(collect(name, Path(folder), args.quality))
    cmp = compare(runs)
    if args.section:
        whole = _load(Path(f"{args.out}.json"))
        whole.setdefault("sections", {})[args.section] = {"runs": runs, "comparison": cmp}
        Path(f"{args.out}.json").write_text(json.dumps(whole, indent=2) + "\n")
        plot(runs, Path(f"{args.out}-{args.section}.png"), args.title)
    else:
        Path(f"{args.out}.json").write_text(json.dumps({"runs": runs, "comparison": cmp}, indent=2) + "\n")
        plot(runs, Path(f"{args.out}.png"), args.title)
    sys.stdout.write(tables(runs, cmp))
    sys.stdout.write("\n" + json.dumps(cmp, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
