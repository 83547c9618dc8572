"""The lm-evaluation-harness model "sedd" on a checkpoint: the cost of loglikelihood requests, and
its WikiText-2 word perplexity next to train/eval.py's bound on the same text.

    python benchmarks/harness_cpu.py out/cpu --wikitext path/to/wikitext-2/test.txt \\
        [--requests 100] [-K 8,32] [--ppl-K 8] [--articles N] [--threads 2] [--work DIR] [--json OUT]

1. Time: ``--requests`` loglikelihood requests built from the WikiText-2 text (the first 40 words
   of a paragraph as the context, the next word as the continuation), answered by
   ``SEDDLM.loglikelihood`` at each K (model loaded beforehand; bound and is_greedy included).
2. Perplexity, three runs of the command-line entry points on the same file (``--articles N``:
   the first N articles of it, written to the work directory):
   a. ``train/eval.py --doc-split file``: the file as one document, its bound in nats per token;
   b. ``train/harness.py`` on a local task whose one document is the whole file: the same tokens
      and blocks, so exp(−loglikelihood / words) must equal exp(a's nats/token × tokens / words)
      within Monte Carlo error;
   c. ``train/harness.py`` on the file cut into its articles (the layout of lm_eval's wikitext
      task): one more EOS per article and per-article blocks, so close to (a) but not the same
      bound.
   Words are counted as lm_eval's wikitext task counts them (``re.split(r"\\s+", page)``).

Prints a markdown table (and writes it with the settings as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def articles(text: str) -> list[str]:
    """WikiText's raw text cut at its level-1 headings (" = Title = " lines): one page per article."""
    pages = re.split(r"\n(?= = [^=].* = \n)", text)
    return [p if p.endswith("\n") else p + "\n" for p in pages if p.strip()]


def requests_from(text: str, n: int) -> list[tuple[str, str]]:
    from sedd.data import DETOKENIZERS

    detok = DETOKENIZERS["wikitext"]
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) > 60 and not line.lstrip().startswith("="):
            out.append((detok(" ".join(words[:40])), " " + detok(words[40])))
        if len(out) == n:
            return out
    raise SystemExit(f"harness_cpu.py: error: the text has fewer than {n} paragraphs of 60 words")


def time_loglikelihood(checkpoint: str, pairs, ks: list[int], seed: int, repeat: int) -> list[dict]:
    from lm_eval.api.instance import Instance

    from sedd.harness import SEDDLM

    rows = []
    for k in ks:
        lm = SEDDLM(pretrained=checkpoint, device="cpu", mc_samples=k, seed=seed)
        reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        lm.loglikelihood(reqs[:2], disable_tqdm=True)  # warm-up: first-call allocations
        runs, cpu = [], []
        for _ in range(repeat):  # on a shared machine the least loaded run is the closest to the cost
            lm.estimates.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            lm.loglikelihood(reqs, disable_tqdm=False)
            runs.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)  # CPU seconds of this process, all threads
        seconds = min(runs)
        errors = sorted(e["stderr"] for e in lm.estimates)
        tokens = sorted(e["tokens"] for e in lm.estimates)
        rows.append({"K": k, "requests": len(reqs), "seconds": seconds, "seconds_per_100": 100 * seconds / len(reqs),
                     "runs_s": [round(r, 2) for r in runs], "cpu_s": [round(c, 2) for c in cpu],
                     "cpu_seconds_per_100": 100 * min(cpu) / len(reqs), "load_average": os.getloadavg()[0],
                     "median_stderr_nats": errors[len(errors) // 2], "median_continuation_tokens": tokens[len(tokens) // 2],
                     "batch_size": lm.batch_size})
    return rows


def _run(cmd: list[str], env: dict) -> None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def perplexity(checkpoint: str, wikitext: Path, k: int, seed: int, work: Path, env: dict,
               first_articles: int | None = None) -> dict:
    text = wikitext.read_text(encoding="utf-8")
    if first_articles is not None:
        text = "".join(articles(text)[:first_articles])
        wikitext = work / f"wikitext2_first{first_articles}_articles.txt"
        wikitext.write_text(text, encoding="utf-8")
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    base = ROOT / "train" / "harness_tasks" / "sedd_wikitext_style.yaml"
    layouts = {"whole": [text], "articles": articles(text)}
    for name, pages in layouts.items():
        data = tasks / f"wikitext2_{name}.jsonl"
        data.write_text("".join(json.dumps({"page": p}, ensure_ascii=False) + "\n" for p in pages))
        (tasks / f"wikitext2_{name}.yaml").write_text(
            f"include: {base}\ntask: wikitext2_{name}\ndataset_kwargs:\n  data_files:\n    test: {data}\n")

    eval_json = work / "eval.json"
    _run([sys.executable, "train/eval.py", checkpoint, "--data", str(wikitext), "--doc-split", "file",
          "--detokenizer", "wikitext", "-K", str(k),
          "--seed", str(seed), "--batch-size", "32", "--device", "cpu", "--json", str(eval_json)], env)
    out = work / "harness"
    _run([sys.executable, "train/harness.py", "--model", "sedd", "--model_args",
          f"pretrained={checkpoint},mc_samples={k},seed={seed},device=cpu,estimates={work / 'estimates.jsonl'}",
          "--include_path", str(tasks), "--tasks", "wikitext2_whole,wikitext2_articles", "--output_path", str(out)],
         env)
    (results,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    metrics = json.loads(Path(results).read_text())["results"]
    estimates = [json.loads(line) for line in (work / "estimates.jsonl").read_text().splitlines()]
    rep = json.loads(eval_json.read_text())
    words = {name: sum(len(re.split(r"\s+", p)) for p in pages) for name, pages in layouts.items()}

    def harness_row(name: str) -> dict:
        mine = [e for e in estimates if e["task"] == f"wikitext2_{name}"]
        nats = -sum(e["value"] for e in mine)
        se = math.sqrt(sum(e["stderr"] ** 2 for e in mine))
        return {"documents": len(mine), "tokens": sum(e["tokens"] for e in mine), "words": words[name],
                "nats": nats, "stderr_nats": se,
                "word_perplexity": metrics[f"wikitext2_{name}"]["word_perplexity,none"],
                "nats_per_token": nats / sum(e["tokens"] for e in mine)}

    total = rep["nats_per_token"] * rep["tokens"]
    return {
        "eval_py": {"tokens": rep["tokens"], "blocks": rep["blocks"], "nats_per_token": rep["nats_per_token"],
                    "stderr_nats_per_token": rep["stderr_nats_per_token"], "nats": total,
                    "stderr_nats": rep["stderr_nats_per_token"] * rep["tokens"], "words": words["whole"],
                    "word_perplexity": math.exp(total / words["whole"])},
        "harness_whole": harness_row("whole"),
        "harness_articles": harness_row("articles"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--wikitext", type=Path, required=True, help="WikiText-2 test.txt (word-level, raw file)")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("-K", default="8,32", help="draws of t per loglikelihood request, comma separated")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per K; the fastest is reported (default 3)")
    p.add_argument("--ppl-K", type=int, default=8, help="draws of t per block for the perplexity runs")
    p.add_argument("--articles", type=int, help="perplexity on the first N articles only (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, help="where the task files and run outputs go (default: a temporary dir)")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-perplexity", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not args.wikitext.is_file():
        p.error(f"--wikitext {args.wikitext} is not a file")

    import torch

    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    report: dict = {"checkpoint": args.checkpoint, "wikitext": str(args.wikitext), "threads": args.threads,
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    text = args.wikitext.read_text(encoding="utf-8")
    lines = []
    if not args.skip_timing:
        ks = [int(k) for k in args.K.split(",")]
        report["timing"] = time_loglikelihood(args.checkpoint, requests_from(text, args.requests), ks, args.seed,
                                              args.repeat)
        lines += ["| K | requests | s / 100 requests (best run) | all runs (s) | CPU s / 100 requests (least) | "
                  "load average | median SE (nats) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['K']} | {r['requests']} | {r['seconds_per_100']:.1f} | {', '.join(map(str, r['runs_s']))} | "
                  f"{r['cpu_seconds_per_100']:.1f} | {r['load_average']:.1f} | {r['median_stderr_nats']:.3f} |"
                  for r in report["timing"]]
    if not args.skip_perplexity:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            report["perplexity"] = res = perplexity(args.checkpoint, args.wikitext, args.ppl_K, args.seed, work, env,
                                                    args.articles)
            report["articles"] = args.articles
        lines += ["", "| run | documents | tokens | words | bound (nats) | ± SE | nats/token | word perplexity |",
                  "|---|---|---|---|---|---|---|---|"]
        e = res["eval_py"]
        lines.append(f"| eval.py, one document | 1 | {e['tokens']} | {e['words']} | {e['nats']:.0f} | "
                     f"{e['stderr_nats']:.0f} | {e['nats_per_token']:.4f} | {e['word_perplexity']:.4g} |")
        for key, label in (("harness_whole", "harness, one document"), ("harness_articles", "harness, per article")):
            h = res[key]
            lines.append(f"| {label} | {h['documents']} | {h['tokens']} | {h['words']} | {h['nats']:.0f} | "
                         f"{h['stderr_nats']:.0f} | {h['nats_per_token']:.4f} | {h['word_perplexity']:.4g} |")
        diff = res["harness_whole"]["nats"] - e["nats"]
        se = math.hypot(res["harness_whole"]["stderr_nats"], e["stderr_nats"])
        lines.append(f"\nharness (one document) - eval.py = {diff:.0f} nats = {diff / se:.2f} combined standard errors")
        report["whole_minus_eval_in_se"] = diff / se
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
