#!/usr/bin/env bash
# One call on the GPU machine (H100/H200, torch 2.11+cu130, triton 3.6, Python 3.12, nvcc; no network), run from a
# copy of the repository root, under 10 minutes, with at most 8 files coming back from $OUT:
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# 1. builds with CUDA (pip install --no-build-isolation -e .), 2. runs the tests (not slow, plus every gpu test) on
# CUDA and Triton, tests/test_gpu.py first (int64 indexing past 2**31 elements, determinism, streams), at most 210 s,
# 3. runs compute-sanitizer memcheck (90 s at most), then racecheck (90 s at most), over a small CUDA run of every op
# (benchmarks/cuda_smoke.py), checking the fcn_fast kernels only (--kernel-name kns=fcn_fast) with the caching
# allocator off (so memcheck sees every tensor's own bounds), 4. runs the benchmark suite on the GPU with what time is
# left (cases not started in time are recorded as skipped), 5. leaves in $OUT: session.log, build.log, pytest.log,
# sanitizer.log (both tools), runs.jsonl (this run's rows), one <set>.md per dtype, plots.tar (the <set>.png charts).
#
# Arguments go to the suite instead of the default "--dtypes fp32,bf16 --no-max-autotune". A follow-up call on the
# still-warm machine can skip steps 2-3:  SKIP_CHECKS=1 bash benchmarks/gpu_session.sh --dtypes fp16
# Back here: `cat <returned>/runs.jsonl >> benchmarks/results/runs.jsonl`, then `python -m benchmarks report` and
# `python -m benchmarks chart` rewrite every set's markdown and chart from it (docs/benchmarks.md, "Results as data").
set -u -o pipefail
OUT=${OUT:-/tmp/fcn_fast_gpu_out}
mkdir -p "$OUT"
START=$(date +%s)
LIMIT=${LIMIT:-575}                     # seconds this script may take in all (the call's limit is 600)
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FCN_FAST_BUILD_CUDA=1
PY=python3

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvcc --version | tail -n 2

echo "== 1. build ($(left) s left)"
if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    tail -n 60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
tail -n 2 "$OUT/build.log"
$PY -c "import fcn_fast; [print(f'  {k:10s} {v.available!s:5s} {v.reason}') for k, v in fcn_fast.available_backends().items()]"

if [ -z "${SKIP_CHECKS:-}" ]; then
    echo "== 2. tests on CUDA and Triton ($(left) s left)"
    # test_gpu.py first, so that its checks report even if the rest of the suite runs into the time limit; at the
    # limit pytest gets SIGINT, on which it still prints its summary (FAILED lines, counts, durations).
    timeout -s INT -k 20 $(( $(left) / 2 < 210 ? $(left) / 2 : 210 )) \
        $PY -m pytest -q -m "not slow or gpu" -p no:cacheprovider --durations=25 \
        tests/test_gpu.py $(ls tests/test_*.py | grep -v '/test_gpu\.py$') >"$OUT/pytest.log" 2>&1
    echo "pytest exit code $? (124: stopped at its time limit)"
    grep -E "passed|failed|error" "$OUT/pytest.log" | tail -n 5
    grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -n 30

    # Both tools into sanitizer.log. Only kernels whose mangled name holds "fcn_fast" are instrumented (PyTorch's
    # own kernels in the reference runs are not this project's, and racecheck is slow on them); with the caching
    # allocator off every tensor is its own cudaMalloc, so an access past a tensor's end is out of bounds to memcheck.
    sanitize() {  # tool, time limit
        echo "== compute-sanitizer --tool $1" >>"$OUT/sanitizer.log"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$2" compute-sanitizer --tool "$1" --kernel-name kns=fcn_fast \
            --error-exitcode 99 $PY -m benchmarks.cuda_smoke cuda >>"$OUT/sanitizer.log" 2>&1
        echo "$1 exit code $? (0 clean, 99 errors found, 1 mismatch, 124 time limit)"
        tail -n 5 "$OUT/sanitizer.log"
    }
    : >"$OUT/sanitizer.log"
    echo "== 3. compute-sanitizer memcheck ($(left) s left)"
    sanitize memcheck 90
    echo "== 3b. compute-sanitizer racecheck ($(left) s left)"
    sanitize racecheck 90
fi

echo "== 4. benchmark suite ($(left) s left)"
# The suite starts no new case after its budget; 60 s stay for the case in flight and the files.
if [ $# -eq 0 ]; then set -- --dtypes fp32,bf16 --no-max-autotune; fi
$PY -m benchmarks --device cuda --out "$OUT" --time-budget $(( $(left) - 60 )) "$@"
echo "suite exit code $?"

echo "== 5. files ($(left) s left)"
(cd "$OUT" && ls *.png >/dev/null 2>&1 && tar cf plots.tar *.png && rm -f *.png)
ls -la "$OUT"
for md in "$OUT"/*.md; do grep -E "^\| .*\| fcn_fast:" "$md" | cut -c1-160 | head -n 40; done
