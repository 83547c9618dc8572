#!/usr/bin/env bash
# The device check: everything a session with a GPU should run, in one command of at most
# ~7 minutes on an H100/H200, most valuable stage first. From the repository root:
#
#     bash benchmarks/device_check.sh                  # on the GPU machine
#     RESULTS=$OUT bash benchmarks/device_check.sh     # results where a borrowed machine returns them
#     bash benchmarks/device_check.sh --dry-run        # every stage on CPU at tiny shapes (interpreter)
#     bash benchmarks/device_check.sh --write-commit   # before copying a tree without .git
#
# It uses the image's python3 (PYTHON=... to change) with PYTHONPATH=., installs nothing and needs
# no .git: the commit id is $SEDD_COMMIT, else `git rev-parse HEAD`, else benchmarks/COMMIT
# (--write-commit, for a copy without .git), else "unknown". Stages, each under its own timeout and all under one
# budget ($DEVICE_CHECK_BUDGET_S, default 420 s; a stage gets what is left when it starts;
# DEVICE_CHECK_STAGES="smoke tests" runs only the stages named, e.g. to rerun what failed):
#   1 device     device name, copy bandwidth, bf16 matmul peak       benchmarks/device_peaks.py
#   2 smoke      every kernel against sedd/ops/reference.py, V = 50258   benchmarks/gpu_smoke.py
#   3 train      train/run.py's own step, 64 x 1024 and 8 x 1024: eager, compiled, CUDA graphs (MFU, host/GPU ms)
#                                                                    benchmarks/whole_model.py train
#   4 sample     the sampler, 16 x 1024 x 128 analytic steps: today's path, eager, compiled, graphs
#                                                                    benchmarks/whole_model.py sample
#   5 kernelvsop each fused kernel's device time apart from its op's, host µs per call   benchmarks/kernel_vs_op.py
#   6 kernels    kernel benchmarks, no torch.compile baselines       bench_score_entropy.py, bench_sampling.py
#   7 tests      the CUDA tests (compiled kernels, sync-free loop, captured steps)   pytest -m gpu
#   8 e2e        training step (MFU) and sampling, the benchmark's own loop   bench_end_to_end.py
#   9 profile    the top operators of a training and a sampling step   benchmarks/profile_step.py (log only)
#  10 sweep      the kernels' launch choices (BLOCK_V × warps, stages), each kernel alone   benchmarks/sweep_launch.py
#  11 compiled   torch.compile(reference) baselines, if time is left  bench_score_entropy.py, bench_sampling.py
# Under $RESULTS (default benchmarks/results), written as it goes, eight files:
#   status.txt        one line per stage: ok / failed (with the error tail) / skipped (with the reason)
#   device-check.md   the results table (rebuilt after every stage, so it exists whatever fails)
#   summary.json      the machine-readable summary (issue 29's schema; rebuilt after every stage)
#   device-check.log  every stage's full output
#   device.json, smoke.json, bench.jsonl, sweep.jsonl   the raw figures (one benchmark / launch choice per line)
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=1 ;;
  --write-commit)
    sha="$(git rev-parse HEAD)" || exit 1
    git diff --quiet HEAD -- 2>/dev/null || sha="$sha-dirty"
    echo "$sha" > benchmarks/COMMIT && echo "benchmarks/COMMIT: $sha"
    exit 0 ;;
  *) echo "usage: bash benchmarks/device_check.sh [--dry-run | --write-commit]" >&2; exit 2 ;;
esac

PY="${PYTHON:-python3}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="${RESULTS:-benchmarks/results}"
BUDGET="${DEVICE_CHECK_BUDGET_S:-420}"
mkdir -p "$RESULTS"
status="$RESULTS/status.txt"
log="$RESULTS/device-check.log"
records="$RESULTS/bench.jsonl"
: > "$status"; : > "$log"; : > "$records"
rm -f "$RESULTS/device.json" "$RESULTS/smoke.json" "$RESULTS/sweep.jsonl" "$RESULTS/summary.json"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

if [[ -z "${SEDD_COMMIT:-}" ]]; then  # git where the checkout has .git, so a stale COMMIT file cannot mislabel
  recorded="$(head -n1 benchmarks/COMMIT 2>/dev/null)"
  if sha="$(git rev-parse HEAD 2>/dev/null)"; then
    if git diff --quiet HEAD -- 2>/dev/null; then SEDD_COMMIT="$sha"
    # A copy whose .git is older than its files (a borrowed machine may get the first checkout's
    # .git with today's tree) reads as dirty at an old HEAD: --write-commit's record is the truth.
    elif [[ -n "$recorded" && "$recorded" != "$sha"* ]]; then SEDD_COMMIT="$recorded"
    else SEDD_COMMIT="$sha-dirty"; fi
  elif [[ -n "$recorded" ]]; then SEDD_COMMIT="$recorded"
  else SEDD_COMMIT=unknown; fi
fi
export SEDD_COMMIT SEDD_BENCH_RECORDS="$records"
if (( dry_run )); then
  # CPU only, even on a GPU machine; the kernels run in Triton's interpreter.
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  mode="dry run on CPU (tiny shapes, kernels interpreted: checks the plumbing, measures nothing)"
else
  export TRITON_INTERPRET=0
  mode="GPU"
fi
echo "# device check, $mode, commit $SEDD_COMMIT, started $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s" >> "$status"
have_timeout=0; command -v timeout > /dev/null && have_timeout=1
start=$SECONDS
abort=""

summarize() {
  "$PY" benchmarks/summarize.py --results "$RESULTS" --mode "$mode" >> "$log" 2>&1 \
    || echo "    (summarize.py failed; see device-check.log)" >> "$status"
}

skip() {  # skip NAME REASON
  echo "[$1] skipped: $2" >> "$status"
  echo "=== stage $1 skipped: $2" >> "$log"
}

stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2" left t rc elapsed t0 last
  shift 2
  left=$(( BUDGET - (SECONDS - start) ))
  if [[ -n "${DEVICE_CHECK_STAGES:-}" && " $DEVICE_CHECK_STAGES " != *" $name "* ]]; then
    skip "$name" "not selected (DEVICE_CHECK_STAGES=\"$DEVICE_CHECK_STAGES\")"; return
  fi
  if [[ -n "$abort" ]]; then skip "$name" "$abort"; return; fi
  if (( left < 15 )); then skip "$name" "the ${BUDGET} s budget is spent"; return; fi
  t=$(( limit < left ? limit : left ))
  echo "=== stage $name (timeout ${t}s): $*" >> "$log"
  t0=$SECONDS
  if (( have_timeout )); then
    timeout -k 10 "$t" "$@" > "$scratch/out" 2>&1; rc=$?
  else
    "$@" > "$scratch/out" 2>&1; rc=$?
  fi
  elapsed=$(( SECONDS - t0 ))
  cat "$scratch/out" >> "$log"
  last="$(grep -v '^[[:space:]]*$' "$scratch/out" | tail -n1 | cut -c1-160)"
  if (( rc == 0 )); then
    echo "[$name] ok (${elapsed}s): $last" >> "$status"
  else
    if (( rc == 124 || rc == 137 )); then
      echo "[$name] failed: timeout after ${t}s" >> "$status"
    else
      echo "[$name] failed: exit status $rc after ${elapsed}s" >> "$status"
    fi
    tail -n 25 "$scratch/out" | cut -c1-300 | sed 's/^/    | /' >> "$status"
  fi
  summarize
}

pytest_bench=("$PY" -m pytest -q -p no:cacheprovider --benchmark-only --benchmark-disable-gc)

if (( dry_run )); then
  stage device 60 "$PY" -m benchmarks.device_peaks --out "$RESULTS/device.json"
else
  stage device 60 "$PY" -m benchmarks.device_peaks --out "$RESULTS/device.json" --require-cuda
  if grep -q '^\[device\] failed: exit status 3' "$status"; then
    abort="no CUDA device (use --dry-run on CPU)"
  fi
fi
stage smoke 120 "$PY" -m benchmarks.gpu_smoke --out "$RESULTS/smoke.json"
if (( dry_run )); then  # aot_eager: the compiled path's plumbing without minutes of C++ builds
  stage train 120 "$PY" -m benchmarks.whole_model train --results "$RESULTS" --compile-backend aot_eager
  stage sample 90 "$PY" -m benchmarks.whole_model sample --results "$RESULTS" --compile-backend aot_eager
else
  stage train 180 "$PY" -m benchmarks.whole_model train --results "$RESULTS"
  stage sample 120 "$PY" -m benchmarks.whole_model sample --results "$RESULTS"
fi
stage kernelvsop 150 "$PY" -m benchmarks.kernel_vs_op --results "$RESULTS"
stage kernels 120 "${pytest_bench[@]}" benchmarks/bench_score_entropy.py benchmarks/bench_sampling.py -k "not compiled"
if (( dry_run )); then
  skip tests "the -m gpu tests need CUDA (the CPU test run collects them and skips every one)"
else
  # one process on the one GPU (-p no:xdist: tests/conftest.py would start two workers where
  # pytest-xdist is installed; harmless where it is not)
  stage tests 120 "$PY" -m pytest -q -p no:cacheprovider -p no:xdist -rs -m gpu tests/test_kernels_cuda.py \
    tests/test_train_loop.py tests/test_sampling_graphs.py tests/test_host_sync.py
fi
stage e2e 240 "${pytest_bench[@]}" benchmarks/bench_end_to_end.py
stage profile 60 "$PY" -m benchmarks.profile_step
stage sweep 150 "$PY" -m benchmarks.sweep_launch --out "$RESULTS/sweep.jsonl" --results "$RESULTS"
if (( dry_run )); then
  skip compiled "torch.compile on CPU builds C++ with inductor for minutes; the GPU run measures it"
else
  stage compiled 300 "${pytest_bench[@]}" benchmarks/bench_score_entropy.py benchmarks/bench_sampling.py -k compiled
fi
summarize
echo "# finished after $(( SECONDS - start ))s; results in $RESULTS" >> "$status"
cat "$status"
grep -q '^\[[a-z0-9]*\] failed' "$status" && exit 1
exit 0
