"""Device check, stage 1: what the device is and its two rooflines, measured in this run.

    PYTHONPATH=. python3 -m benchmarks.device_peaks --out benchmarks/results/device.json

Writes the device name (and, on CUDA, compute capability, SM count, memory), the versions, the
commit, the date, the device-to-device copy bandwidth (read + write bytes over time) and the
dense bf16 matmul rate, both timed as every benchmark is (``benchmarks/common.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from benchmarks import common


def measure() -> dict:
    info = {
        "device": common.device_name(),
        "cuda": common.CUDA,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": common.commit_id(),
        **common.versions(),
    }
    if common.CUDA:
        props = torch.cuda.get_device_properties(0)
        info.update(capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    info["copy_gb_per_s"] = common.copy_bandwidth() / 1e9
    info["bf16_matmul_tflop_per_s"] = common.matmul_peak(torch.bfloat16) / 1e12
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--require-cuda", action="store_true", help="exit with status 3 when no CUDA device is visible")
    args = parser.parse_args(argv)
    if args.require_cuda and not common.CUDA:
        print("no CUDA device visible to torch: on a CPU machine run `bash benchmarks/device_check.sh --dry-run`")
        raise SystemExit(3)
    info = measure()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    print(f"{info['device']}: copy {info['copy_gb_per_s']:.4g} GB/s, bf16 matmul {info['bf16_matmul_tflop_per_s']:.4g} TFLOP/s")


if __name__ == "__main__":
    main()
