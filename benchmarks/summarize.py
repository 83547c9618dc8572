"""Turn a pytest-benchmark JSON into a markdown table naming the device, the date and the commit.

    python -m pytest benchmarks/bench_score_entropy.py --benchmark-only --benchmark-json out.json
    python benchmarks/summarize.py out.json [--out benchmarks/results/NAME.md]

Columns: median time, useful bandwidth (minimum bytes / time), that as a fraction of the copy
bandwidth measured in the same run, peak extra memory as a multiple of one [B, L, V] buffer, and
the speed-up against the eager reference and torch.compile(reference) of the same case.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def summarize(data: dict) -> tuple[str, str]:
    machine, commit = data.get("machine_info", {}), data.get("commit_info", {})
    device = machine.get("device") or machine.get("cpu", {}).get("brand_raw") or "unknown device"
    date = data.get("datetime", "unknown date")
    sha = commit.get("id", "unknown")[:12] + (" (dirty)" if commit.get("dirty") else "")
    rows, medians = [], {}
    for bench in data.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench.get("stats", {})
        key = (bench.get("group"), info.get("graph"), info.get("mode"))
        medians[(*key, info.get("impl"))] = stats.get("median")
        rows.append((key, info, stats, bench["name"]))
    lines = [
        f"# Benchmarks: {device}",
        "",
        f"- date: {date}",
        f"- commit: {sha} (branch {commit.get('branch', '?')})",
        f"- torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}",
        "",
        "| case | impl | median ms | GB/s | of copy BW | tokens/s | peak extra MB | peak extra / buffer "
        "| × vs eager | × vs compiled |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    copy = None
    for key, info, stats, name in sorted(rows, key=lambda r: (str(r[0]), str(r[1].get("impl")))):
        median = stats.get("median")
        eager, compiled = medians.get((*key, "eager")), medians.get((*key, "compiled"))
        case = f"{info.get('graph', '?')} {info.get('mode', '?')} {info.get('shape', '')} {info.get('dtype', '')}"
        copy = info.get("copy_gb_per_s") or copy
        peak = info.get("peak_extra_bytes", info.get("peak_memory_bytes"))
        lines.append(
            f"| {case} | {info.get('impl', name)} | {_fmt(median and median * 1e3, '.3f')} "
            f"| {_fmt(info.get('gb_per_s'), '.3g')} | {_fmt(info.get('fraction_of_copy'), '.0%')} "
            f"| {_fmt(info.get('tokens_per_s'), '.4g')} | {_fmt(peak and peak / 2**20, '.0f')} "
            f"| {_fmt(info.get('peak_over_buffer'), '.2f')} "
            f"| {_fmt(eager / median if eager and median else None, '.2f')} "
            f"| {_fmt(compiled / median if compiled and median else None, '.2f')} |"
        )
    lines += ["", f"Copy bandwidth measured in the same run: {_fmt(copy, '.3g')} GB/s (read + write)."]
    stem = "-".join(
        [re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower(), date[:10], commit.get("id", "nocommit")[:8]]
    )
    return "\n".join(lines) + "\n", stem


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: OUT_DIR/<device>-<date>-<commit>.md")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results",
                        help="directory of the default output file (default: benchmarks/results)")
    args = parser.parse_args(argv)
    text, stem = summarize(json.loads(args.json.read_text()))
    out = args.out or args.out_dir / f"{stem}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
