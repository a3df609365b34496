#!/usr/bin/env bash
# The cpu and the emulated CUDA kernels under gcc's AddressSanitizer + UndefinedBehaviorSanitizer (docs/emulator.md):
# the CPU stand-in for compute-sanitizer's memcheck. Builds a scratch copy of this checkout with FCN_FAST_SANITIZE=1
# (the installed fcn_fast is left alone), then runs the op tests of the cpu and cuda_emulated backends there. Any
# report aborts the test process: the script exits non-zero. About 15 minutes on 2 cores.
#
#   tools/sanitize.sh [SCRATCH_DIR] [extra pytest arguments]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=${1:-$(mktemp -d "${TMPDIR:-/tmp}/fcn_fast_sanitize.XXXXXX")}
shift || true
src="$scratch/src"
mkdir -p "$src"

# The tracked and the new (not ignored) files: sources without any build output.
(cd "$root" && git ls-files -co --exclude-standard -z) | python3 -c '
import os, shutil, sys
root, dest = sys.argv[1:]
for name in sys.stdin.buffer.read().decode().split("\0"):
    path = os.path.join(root, name)
    if name and os.path.isfile(path):
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        shutil.copy2(path, os.path.join(dest, name))
' "$root" "$src"

cd "$src"
echo "sanitize: building the cpu and emulated CUDA kernels with -fsanitize=address,undefined in $src"
FCN_FAST_SANITIZE=1 FCN_FAST_BUILD_CUDA=0 FCN_FAST_BUILD_EMULATED=1 MAX_JOBS="${MAX_JOBS:-2}" \
  python setup.py build_ext --inplace > "$scratch/build.log" 2>&1 || { tail -40 "$scratch/build.log"; exit 1; }

# Python itself is not instrumented, so the ASan runtime must be loaded first, and libstdc++ with it: otherwise
# ASan's C++-exception interceptor finds no __cxa_throw and aborts the first time a library loaded later (Triton's,
# at import) throws. Leak checking is off: the interpreter keeps objects alive at exit by design.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
echo "sanitize: running the cpu and cuda_emulated op tests"
python -m pytest -q -p no:cacheprovider -m "not slow" --timeout=3000 \
  tests/test_upsample_add.py tests/test_cross_entropy.py tests/test_upsample_cross_entropy.py tests/test_eager_path.py \
  tests/test_emulator.py -k "cpu or cuda_emulated or test_emulator" "$@"
echo "sanitize: no reports"
