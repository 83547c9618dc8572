"""The results table: a markdown file naming the device, the date and the commit.

    python benchmarks/summarize.py --results benchmarks/results     # what device_check.sh writes
    python benchmarks/summarize.py out.json [--out FILE]             # a pytest-benchmark JSON

From a device-check results directory it reads ``status.txt`` (the stage lines), ``device.json``
(device, rooflines), ``smoke.json`` (correctness checks) and ``bench.jsonl`` (one benchmark per
line) and writes ``device-check.md`` and ``summary.json`` there; whatever is missing is reported
as missing. Commit them as ``<device>-<date>-<commit>.md`` and ``.summary.json``.

The summary (issue 29's schema): ``{"device", "commit", "date" (ISO 8601), "mode", "peaks":
{"copy_gbps", "bf16_tflops"}, "train_step": [{"path": "run.py" | "bench", "shape": [B, L], "mode":
"eager" | "compiled" | "graphs", "ms", "tokens_per_s", "mfu", "host_ms", "gpu_ms", ...}],
"sampling": [{"shape": [B, L], "steps", "mode": "today" | "eager" | "compiled" | "graphs",
"tokens_per_s", "x_today"}], "kernels": [{"name", "shape": [B, L, V], "kernel_ms", "op_ms",
"bw_fraction"}]}``; a case a stage could not run has its reason under ``"skipped"`` and nulls.
The ``kernels`` entries come from the kernel-vs-op stage (``benchmarks/kernel_vs_op.py``): the
kernel alone (``kernel_ms``, device time of launches back to back) beside the op as users call it
(``op_ms``), with min and max, host µs per call and ``bw_fraction`` from the kernel time.

Benchmark columns: median time, useful bandwidth (bytes the operation must move / time), that
as a fraction of the copy bandwidth measured in the same run, tokens/s and MFU (end to end),
peak extra memory (MB and per [B, L, V] buffer), the speed-up against the eager reference, the
``torch.compile``d reference and the public SEDD op sequence of the same case, and the targets
of issue 9 as pass/fail columns (recorded, never asserted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from pathlib import Path

# (column, which rows, extra_info key or speed-up baseline, threshold, "min" or "max")
TARGETS = [
    ("BW ≥ 85% copy", ("score_entropy", "fwd_bwd"), "fraction_of_copy", 0.85, "min"),
    ("× compiled ≥ 1.5", ("score_entropy", "fwd_bwd"), "compiled", 1.5, "min"),
    ("× public ≥ 5", ("score_entropy", "fwd_bwd"), "public", 5.0, "min"),
    ("in-place peak ≤ 0.05 buffer", ("score_entropy", "fwd_bwd", "triton_inplace"), "peak_over_buffer", 0.05, "max"),
    ("BW ≥ 80% copy", ("reverse_step", ("analytic", "euler")), "fraction_of_copy", 0.80, "min"),
    ("× public ≥ 10", ("reverse_step", ("analytic", "euler")), "public", 10.0, "min"),
]
FUSED = ("triton", "triton_inplace")
WHOLE_MODEL = ("train_step_run", "sampling_run")  # benchmarks/whole_model.py: their own table


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def _bench_kind(record) -> str:
    info = record.get("extra_info", {})
    if info.get("bench"):
        return info["bench"]
    match = re.search(r"test_(\w+?)(\[|$)", record.get("name", ""))
    return match.group(1) if match else "?"


def _applies(target_rows, kind, info) -> bool:
    want_kind, want_mode, *want_impl = target_rows
    modes = want_mode if isinstance(want_mode, tuple) else (want_mode,)
    impls = tuple(want_impl) or FUSED
    return kind == want_kind and info.get("mode") in modes and info.get("impl") in impls


def _target_cell(value, threshold, sense) -> str:
    if value is None:
        return "–"
    ok = value >= threshold if sense == "min" else value <= threshold
    return f"{'pass' if ok else 'FAIL'} ({value:.3g})"


def benchmark_table(records: list[dict]) -> list[str]:
    if not records:
        return ["No benchmark finished (see the stage lines above)."]
    medians = {}
    for r in records:
        info = r.get("extra_info", {})
        key = (_bench_kind(r), info.get("graph"), info.get("mode"), str(info.get("shape")))
        medians[(*key, info.get("impl"))] = r.get("median_s")
    target_names = [t[0] for t in TARGETS]
    lines = [
        "| case | impl | median ms | GB/s | of copy BW | tokens/s | MFU | peak extra MB | peak / buffer "
        "| × eager | × compiled | × public | " + " | ".join(target_names) + " |",
        "| --- | --- |" + " ---: |" * 10 + " --- |" * len(TARGETS),
    ]
    for r in sorted(records, key=lambda r: (_bench_kind(r), str(r["extra_info"].get("graph")),
                                             str(r["extra_info"].get("mode")), str(r["extra_info"].get("shape")),
                                             str(r["extra_info"].get("impl")))):
        info, median, kind = r.get("extra_info", {}), r.get("median_s"), _bench_kind(r)
        key = (kind, info.get("graph"), info.get("mode"), str(info.get("shape")))
        speedup = {}
        for base in ("eager", "compiled", "public"):
            other = medians.get((*key, base))
            speedup[base] = other / median if other and median and info.get("impl") != base else None
        peak = info.get("peak_extra_bytes", info.get("peak_memory_bytes"))
        case = f"{kind} {info.get('graph', '')} {info.get('mode', '')} {info.get('shape', '')} {info.get('dtype', '')}"
        cells = [
            case.strip(), str(info.get("impl", r.get("name"))), _fmt(median and median * 1e3, ".3f"),
            _fmt(info.get("gb_per_s"), ".4g"), _fmt(info.get("fraction_of_copy"), ".1%"),
            _fmt(info.get("tokens_per_s"), ".4g"), _fmt(info.get("mfu"), ".1%"),
            _fmt(peak and peak / 2**20, ".0f"), _fmt(info.get("peak_over_buffer"), ".3f"),
            _fmt(speedup["eager"], ".2f"), _fmt(speedup["compiled"], ".2f"), _fmt(speedup["public"], ".2f"),
        ]
        for _, rows, source, threshold, sense in TARGETS:
            if not _applies(rows, kind, info):
                cells.append("")
                continue
            value = speedup[source] if source in speedup else info.get(source)
            cells.append(_target_cell(value, threshold, sense))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def nfe_table(records: list[dict]) -> list[str]:
    """The sampling cases that report their network evaluations (bench_end_to_end.py)."""
    rows = [r for r in records if r.get("extra_info", {}).get("nfe_mean") is not None]
    if not rows:
        return []
    lines = ["", "## Network evaluations of the sampling cases (same tokens: cached against uncached, same seed)", "",
             "| case | impl | median ms | tokens/s | NFE per sequence | forward rows | reused rows | same tokens |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        info, median = r["extra_info"], r.get("median_s")
        same = info.get("same_tokens")
        lines.append(f"| {info.get('mode')} {info.get('shape')} | {info.get('impl')} | {_fmt(median and median * 1e3, '.1f')} "
                     f"| {_fmt(info.get('tokens_per_s'), ',.0f')} "
                     f"| {info['nfe_mean']:.1f} | {info.get('forward_rows')} | {info.get('reused_rows')} "
                     f"| {'–' if same is None else ('yes' if same else 'NO')} |")
    return lines


def whole_model_table(records: list[dict]) -> list[str]:
    """train/run.py's step and the sampler (benchmarks/whole_model.py)."""
    train = [r["extra_info"] for r in records if r.get("extra_info", {}).get("bench") == "train_step_run"]
    samples = [r["extra_info"] for r in records if r.get("extra_info", {}).get("bench") == "sampling_run"]
    if not train and not samples:
        return []
    lines = ["", "## Whole model: train/run.py's step and the sampler (medians after warm-up, [min-max])", ""]
    if train:
        lines += ["| step | mode | ms | tokens/s | MFU | host ms | GPU ms |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for i in train:
            if i.get("skipped"):
                lines.append(f"| {i['shape']} | {i['mode']} | skipped: {i['skipped']} | | | | |")
                continue
            lines.append(f"| {i['shape']} | {i['mode']} | {i['ms']:.1f} [{i['min_ms']:.1f}-{i['max_ms']:.1f}] "
                         f"| {i['tokens_per_s']:,.0f} | {_fmt(i.get('mfu'), '.1%')} | {i['host_ms']:.1f} "
                         f"| {_fmt(i.get('gpu_ms'), '.1f')} |")
    if samples:
        lines += ["", "| sampling | steps | mode | tokens/s | × today |", "| --- | ---: | --- | ---: | ---: |"]
        for i in samples:
            if i.get("skipped"):
                lines.append(f"| {i['shape']} | {i['steps']} | {i['mode']} | skipped: {i['skipped']} | |")
                continue
            lines.append(f"| {i['shape']} | {i['steps']} | {i['mode']} | {i['tokens_per_s']:,.0f} "
                         f"| {_fmt(i.get('x_today'), '.2f')} |")
    return lines


def _entry(info: dict, keys: tuple, **fixed) -> dict:
    entry = {**fixed, **{k: info.get(k) for k in keys}}
    if info.get("skipped"):
        entry["skipped"] = info["skipped"]
    return entry


def train_step_entries(records: list[dict]) -> list[dict]:
    """train/run.py's step (whole_model.py, path "run.py") and bench_end_to_end.py's (path "bench")."""
    out = []
    for r in records:
        info = r.get("extra_info", {})
        if info.get("bench") == "train_step_run":
            out.append(_entry(info, ("shape", "mode", "ms", "min_ms", "max_ms", "tokens_per_s", "mfu", "host_ms",
                                     "gpu_ms"), path="run.py"))
        elif info.get("bench") == "training_step":
            median = r.get("median_s")
            out.append({"path": "bench", "shape": info.get("shape", [None, None])[:2], "mode": "eager",
                        "impl": info.get("impl"), "ms": median and median * 1e3, "tokens_per_s": info.get("tokens_per_s"),
                        "mfu": info.get("mfu"), "host_ms": None, "gpu_ms": None})
    return out


def sampling_entries(records: list[dict]) -> list[dict]:
    return [_entry(r["extra_info"], ("shape", "steps", "mode", "tokens_per_s", "x_today"))
            for r in records if r.get("extra_info", {}).get("bench") == "sampling_run"]


def kernel_vs_op_table(records: list[dict]) -> list[str]:
    """The kernel-vs-op stage: each kernel's device time beside the op's, and the host per call."""
    rows = [r for r in records if r.get("extra_info", {}).get("bench") == "kernel_vs_op"]
    if not rows:
        return []
    lines = ["", "## Kernel vs op (benchmarks/kernel_vs_op.py: medians [min, max]; bandwidth from the kernel time)",
             "", "| case | shape | kernel ms | op ms | op − kernel ms | host µs / call | kernel of copy BW | op of copy BW |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        i = r["extra_info"]
        lines.append(f"| {i['kernel']} {i['graph']} {i['mode']} | {i['shape']} | {i['kernel_ms']:.3f} "
                     f"[{i['kernel_ms_min']:.3f}, {i['kernel_ms_max']:.3f}] | {i['op_ms']:.3f} [{i['op_ms_min']:.3f}, "
                     f"{i['op_ms_max']:.3f}] | {i['op_ms'] - i['kernel_ms']:.3f} | {i['host_us']:.0f} | "
                     f"{i['bw_fraction']:.1%} | {i['op_bw_fraction']:.1%} |")
    return lines


def kernel_entries(records: list[dict]) -> list[dict]:
    """summary.json's ``kernels``: one entry per kernel-vs-op case, named as the benchmark table
    names the case (``score_entropy absorb fwd_bwd``, ``reverse_step uniform analytic``)."""
    out = []
    for r in records:
        i = r.get("extra_info", {})
        if i.get("bench") != "kernel_vs_op":
            continue
        out.append({"name": f"{i['kernel']} {i['graph']} {i['mode']}", "shape": i["shape"],
                    "kernel_ms": i["kernel_ms"], "op_ms": i["op_ms"], "bw_fraction": i["bw_fraction"],
                    "kernel_ms_min": i["kernel_ms_min"], "kernel_ms_max": i["kernel_ms_max"],
                    "op_ms_min": i["op_ms_min"], "op_ms_max": i["op_ms_max"], "host_us": i["host_us"],
                    "op_bw_fraction": i["op_bw_fraction"], "bytes_moved": i["bytes_moved"]})
    return out


def summary(results: Path, mode: str | None = None) -> dict:
    """The machine-readable summary of a device-check results directory (the module docstring)."""
    device = _read_json(results / "device.json") or {}
    records = _read_jsonl(results / "bench.jsonl")
    date = device.get("date") or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "device": device.get("device"),
        "commit": device.get("commit") or os.environ.get("SEDD_COMMIT") or "unknown",
        "date": date,
        "mode": mode,
        "peaks": {"copy_gbps": device.get("copy_gb_per_s"), "bf16_tflops": device.get("bf16_matmul_tflop_per_s")},
        "train_step": train_step_entries(records),
        "sampling": sampling_entries(records),
        "kernels": kernel_entries(records),
    }


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize_results(results: Path, mode: str | None = None) -> str:
    device = _read_json(results / "device.json") or {}
    smoke = _read_json(results / "smoke.json")
    records = _read_jsonl(results / "bench.jsonl")
    status = (results / "status.txt").read_text() if (results / "status.txt").is_file() else "(no status.txt)\n"
    lines = [
        f"# Device check: {device.get('device', 'device unknown (stage 1 did not finish)')}",
        "",
        f"- mode: {mode or '?'}",
        f"- date: {device.get('date', '?')}",
        f"- commit: {device.get('commit', '?')}",
        f"- torch {device.get('torch', '?')}, triton {device.get('triton', '?')}, python {device.get('python', '?')}"
        + (f"; {device['capability']}, {device['sms']} SMs, {device['memory_gib']} GiB" if "sms" in device else ""),
        f"- copy bandwidth (read + write): {_fmt(device.get('copy_gb_per_s'), '.4g')} GB/s; "
        f"bf16 dense matmul: {_fmt(device.get('bf16_matmul_tflop_per_s'), '.4g')} TFLOP/s "
        "(medians, CUDA events, this run)",
        "",
        "## Stages",
        "",
        "```",
        status.rstrip("\n"),
        "```",
        "",
        "## Correctness smoke (kernels against sedd/ops/reference.py)",
        "",
    ]
    if smoke is None:
        lines.append("No smoke results (see the stage lines above).")
    else:
        lines += ["| check | shape | result | detail | s |", "| --- | --- | --- | --- | ---: |"]
        for c in smoke.get("checks", []):
            detail = str(c.get("detail", "")).replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {c['check']} | {c.get('shape')} | {'ok' if c['ok'] else 'FAIL'} | {detail} | {c.get('seconds')} |")
    lines += whole_model_table(records)
    lines += ["", "## Benchmarks (median of the rounds, CUDA events; targets recorded, not asserted)", ""]
    lines += benchmark_table([r for r in records if r.get("extra_info", {}).get("bench") not in WHOLE_MODEL
                              and r.get("extra_info", {}).get("bench") != "kernel_vs_op"])
    lines += kernel_vs_op_table(records)
    lines += nfe_table(records)
    sweep = _read_jsonl(results / "sweep.jsonl")
    if sweep:
        lines += ["", "## Launch sweep (benchmarks/sweep_launch.py: the kernel alone, BLOCK_V × warps and pipelining depth; "
                  "median ms, fraction of copy BW)", ""]
        lines += sweep_table(sweep)
    return "\n".join(lines) + "\n"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a killed stage
    return rows


def _choice(r: dict) -> str:
    """A sweep row's launch choice as a column name: "default" (the launchers' own), "BVxNW", "stages S"."""
    if r.get("default"):
        return "default"
    if r.get("block_v") is not None:
        return f"{r['block_v']}×{r['num_warps']}"
    return f"stages {r.get('num_stages')}"


def sweep_table(rows: list[dict]) -> list[str]:
    """One line per kernel: every launch choice's time and fraction of the copy bandwidth (the
    launchers' own choice in the "default" column), the fastest named."""
    choices = list(dict.fromkeys(_choice(r) for r in rows))
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    lines = ["| kernel | " + " | ".join(choices) + " | best |",
             "| --- | " + " | ".join("---:" for _ in choices) + " | --- |"]
    for k in kernels:
        mine = {_choice(r): r for r in rows if r["kernel"] == k}
        cells = []
        for choice in choices:
            r = mine.get(choice)
            if r is None or "fraction_of_copy" not in r:
                cells.append("–" if r is None else "error")
                continue
            cells.append(f"{r['median_s'] * 1e3:.3f} ms, {r['fraction_of_copy']:.0%}")
        timed = [(c, r) for c, r in mine.items() if "median_s" in r]
        best = min(timed, key=lambda cr: cr[1]["median_s"], default=None)
        cells.append(best[0] if best else "–")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def summarize_pytest_json(data: dict) -> tuple[str, str]:
    """A pytest-benchmark JSON -> (markdown, file stem <device>-<date>-<commit>)."""
    machine, commit = data.get("machine_info", {}), data.get("commit_info", {})
    device = machine.get("device") or machine.get("cpu", {}).get("brand_raw") or "unknown device"
    date = data.get("datetime", "unknown date")
    sha = machine.get("commit") or commit.get("id") or "unknown"
    records = [{"name": b.get("fullname", b.get("name", "?")), "median_s": b.get("stats", {}).get("median"),
                "extra_info": b.get("extra_info", {})} for b in data.get("benchmarks", [])]
    lines = [f"# Benchmarks: {device}", "", f"- date: {date}", f"- commit: {sha}",
             f"- torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}", ""]
    lines += benchmark_table(records)
    stem = "-".join([re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower(), date[:10], sha[:8]])
    return "\n".join(lines) + "\n", stem


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="?", help="a pytest-benchmark JSON file")
    parser.add_argument("--results", type=Path, help="a device-check results directory")
    parser.add_argument("--mode", help="how the device check ran (recorded in the file)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: RESULTS/device-check.md, or OUT_DIR/<device>-<date>-<commit>.md")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if (args.json is None) == (args.results is None):
        parser.error("give either a pytest-benchmark JSON file or --results DIR")
    if args.results is not None:
        text, out = summarize_results(args.results, args.mode), args.out or args.results / "device-check.md"
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "summary.json").write_text(json.dumps(summary(args.results, args.mode), indent=1) + "\n")
    else:
        text, stem = summarize_pytest_json(json.loads(args.json.read_text()))
        out = args.out or args.out_dir / f"{stem}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
