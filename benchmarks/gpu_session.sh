#!/usr/bin/env bash
# The GPU machine's session in two calls (docs/gpu.md), run from a copy of the repository root:
#
#   run(command="bash benchmarks/gpu_session.sh check", timeout_s=450)   # build, tests, compute-sanitizer
#   run(command="bash benchmarks/gpu_session.sh bench", timeout_s=270)   # the suite; at once, while still warm
#
# check: 1. build with CUDA (skipped when the extension already there loads its CUDA kernels), 2. the CUDA and
#   Triton op tests (pytest -k "cuda or triton" over the op test files, 8 workers), 3. tests/test_gpu.py (past 2**31
#   elements, determinism, streams, no host sync), 4. compute-sanitizer memcheck and racecheck over a small CUDA run of
#   every op (benchmarks/cuda_smoke.py ... small), where the machine runs it. Logs in $OUT.
# bench: build if needed, then the benchmark suite on the GPU (arguments replace the default "--dtypes fp32,bf16
#   --no-max-autotune"); in $OUT its runs.jsonl (this run's records), one <set>.md per dtype and plots.tar (the
#   <set>.png charts). Back here: `cat <returned>/runs.jsonl >> benchmarks/results/runs.jsonl`, then
#   `python -m benchmarks report` and `python -m benchmarks chart` (docs/benchmarks.md).
# Each mode ends with one line, "GPU CHECK: PASS (exit 0)" / "GPU CHECK: FAIL (exit 1): <what failed>" (GPU BENCH
# likewise), and exits with that status. Each step has a time cap so the whole call stays under LIMIT seconds.
# Wheels in .whl/ (carried with the call) are installed first, for packages the machine lacks.
set -u -o pipefail
MODE=${1:-}
shift || true
case "$MODE" in
    check) LIMIT=${LIMIT:-420} ;;
    bench) LIMIT=${LIMIT:-240} ;;
    *) echo "usage: bash benchmarks/gpu_session.sh check|bench [suite arguments]"; exit 2 ;;
esac
VERDICT="GPU $(echo "$MODE" | tr a-z A-Z)"
OUT=${OUT:-/tmp/fcn_fast_gpu_out}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
cap() { local l; l=$(left); echo $(( $1 < l ? $1 : (l > 5 ? l : 5) )); }  # a step's limit: its cap or what is left
exec > >(tee -a "$OUT/session_$MODE.log") 2>&1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FCN_FAST_BUILD_CUDA=1
PY=python3
FAILED=()
finish() {
    if [ ${#FAILED[@]} -eq 0 ]; then echo "$VERDICT: PASS (exit 0)$1"; exit 0; fi
    echo "$VERDICT: FAIL (exit 1): ${FAILED[*]}$1"; exit 1
}

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || FAILED+=("wheels")
fi

echo "== machine ($MODE, $(left) s left)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
                                         torch.version.cuda, 'triton', triton.__version__)"

has_cuda_kernels() {
    $PY -c "import sys, fcn_fast; sys.exit(0 if fcn_fast.available_backends()['cuda'].available else 1)" 2>/dev/null
}
echo "== build ($(left) s left)"
if [ -z "${FORCE_BUILD:-}" ] && has_cuda_kernels; then
    echo "fcn_fast._C with CUDA kernels is already built here: build skipped"
else
    timeout -k 10 "$(cap 200)" $PY setup.py build_ext --inplace >"$OUT/build_$MODE.log" 2>&1
    status=$?
    tail -n 3 "$OUT/build_$MODE.log"
    if [ $status -ne 0 ] || ! has_cuda_kernels; then
        grep -E "error|Error" "$OUT/build_$MODE.log" | head -n 20
        FAILED+=("build (exit $status, 124: time limit)")
        finish ""
    fi
fi
$PY -c "import fcn_fast; [print(f'  {k:10s} {v.available!s:5s} {v.reason}') for k, v in fcn_fast.available_backends().items()]"

# pytest under a time limit gets SIGINT, on which it still prints its summary; exit 5 (nothing collected) fails too.
run_pytest() {  # name, cap, pytest arguments...
    local name=$1 limit; limit=$(cap "$2"); shift 2
    echo "== $name ($(left) s left, at most $limit s)"
    timeout -s INT -k 15 "$limit" $PY -m pytest -q -p no:cacheprovider --timeout=300 "$@" >"$OUT/pytest_$name.log" 2>&1
    local status=$?
    grep -E "^(FAILED|ERROR)" "$OUT/pytest_$name.log" | head -n 25
    tail -n 1 "$OUT/pytest_$name.log"
    [ $status -eq 0 ] || FAILED+=("$name (pytest exit $status, 124/130: time limit)")
}

if [ "$MODE" = check ]; then
    OP_TESTS="tests/test_upsample_add.py tests/test_cross_entropy.py tests/test_upsample_cross_entropy.py
              tests/test_special_values.py tests/test_eager_path.py tests/test_triton_indexing.py"
    # Triton compiles every kernel variant on first use (cold cache): workers compile in parallel.
    run_pytest ops 130 -n 8 -m "not slow" -k "cuda or triton" $OP_TESTS
    run_pytest gpu 90 tests/test_gpu.py

    # Only kernels whose mangled name holds "fcn_fast" are instrumented (PyTorch's own kernels in the reference runs
    # are not this project's, and racecheck is slow on them); with the caching allocator off every tensor is its own
    # cudaMalloc, so an access past a tensor's end is out of bounds to memcheck.
    : >"$OUT/sanitizer.log"
    if ! command -v compute-sanitizer >/dev/null; then
        echo "== compute-sanitizer: SKIPPED, not installed on this machine"
    else
        for tool in memcheck racecheck; do
            limit=$(cap 40)
            echo "== compute-sanitizer --tool $tool ($(left) s left, at most $limit s)"
            echo "== compute-sanitizer --tool $tool" >>"$OUT/sanitizer.log"
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$limit" compute-sanitizer --tool "$tool" \
                --kernel-name kns=fcn_fast --error-exitcode 99 $PY -m benchmarks.cuda_smoke cuda small \
                >>"$OUT/sanitizer.log" 2>&1
            status=$?
            if grep -q "Device not supported" "$OUT/sanitizer.log"; then
                echo "$tool: SKIPPED, this machine's runtime does not support compute-sanitizer (Device not supported)"
                break
            fi
            case $status in
                0) echo "$tool: clean" ;;
                99) echo "$tool: ERRORS FOUND (sanitizer.log)"; FAILED+=("$tool") ;;
                124|137) echo "$tool: stopped at its time limit"; FAILED+=("$tool (time limit)") ;;
                *) echo "$tool: exit $status (1: a mismatch against the reference)"; FAILED+=("$tool (exit $status)") ;;
            esac
            grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cuda_smoke" "$OUT/sanitizer.log" | tail -n 2
        done
    fi
    finish ""
fi

echo "== benchmark suite ($(left) s left)"
# The suite starts no new case after its budget; 40 s stay for the case in flight and the files.
if [ $# -eq 0 ]; then set -- --dtypes fp32,bf16 --no-max-autotune; fi
budget=$(( $(left) - 40 ))
$PY -m benchmarks --device cuda --out "$OUT" --time-budget $(( budget > 10 ? budget : 10 )) "$@"
status=$?
[ $status -eq 0 ] || FAILED+=("suite (exit $status)")
(cd "$OUT" && ls *.png >/dev/null 2>&1 && tar cf plots.tar *.png && rm -f *.png)
ls "$OUT"
for md in "$OUT"/*.md; do [ -e "$md" ] && grep -E "^\| .*\| fcn_fast:" "$md" | cut -c1-160 | head -n 30; done
# Rows by status; a provider that failed its correctness check fails the call.
counts=$($PY - "$OUT/runs.jsonl" <<'PYEOF' 2>/dev/null
import collections, sys
from fcn_fast.bench import results
rows = results.load(sys.argv[1]).rows
print(" ".join(f"{v} {k}" for k, v in sorted(collections.Counter(r["status"] for r in rows).items())) or "no rows")
PYEOF
)
case "$counts" in *failed*) FAILED+=("rows failed their check") ;; esac
finish ": rows ${counts:-unreadable}"
