#!/usr/bin/env bash
# Everything a GPU session should run, in one go: the CUDA-only tests, then every benchmark, then
# the summary table in benchmarks/results/<device>-<date>-<commit>.md (commit that file).
#
#     bash benchmarks/run_gpu.sh            # from the repository root, in the project's venv
#
# RESULTS=DIR puts the raw JSON and the table elsewhere (e.g. $OUT on a borrowed machine).
set -euo pipefail
cd "$(dirname "$0")/.."
results="${RESULTS:-benchmarks/results}"
mkdir -p "$results"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

# The compiled kernels on the GPU (tests/test_kernels_cuda.py: the interpreter must be off).
TRITON_INTERPRET=0 python -m pytest -q -rs -m gpu
stamp="$(date -u +%Y%m%dT%H%M%SZ)-$(git rev-parse --short=8 HEAD 2>/dev/null || echo nocommit)"
python -m pytest benchmarks/bench_score_entropy.py benchmarks/bench_sampling.py benchmarks/bench_end_to_end.py \
    --benchmark-only --benchmark-json "$results/raw-$stamp.json" -q
python benchmarks/summarize.py "$results/raw-$stamp.json" --out-dir "$results"
