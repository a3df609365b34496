#!/usr/bin/env bash
# The package builds from what it ships: build the sdist, unpack it, build a wheel from nothing but the unpacked
# files, install that into a fresh virtual environment and smoke-test it from outside the repository.
#
# The venv sees the system's torch (--system-site-packages: torch from the local files, no download, no build
# isolation) and nothing of this checkout; the smoke test checks that it imports the installed copy. The wheel is
# built C++-only unless SDIST_SMOKE_CUDA=1 (the CUDA kernels take minutes to compile; the main build compiles them
# from the checkout, and every kernels/ source and header git tracks must be in the sdist, checked below). A wheel
# must not carry -march=native code: the build must pick the portable target, and the binary must hold no AVX
# (ymm/zmm) instruction.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m build --sdist --no-isolation --skip-dependency-check --outdir "$work/dist" . >"$work/sdist.log" 2>&1 \
    || { tail -40 "$work/sdist.log"; exit 1; }
sdist="$(ls "$work"/dist/fcn_fast-*.tar.gz)"
echo "sdist-smoke: built $(basename "$sdist")"

# Every source and header the build reads (git's list of kernels/) is in the sdist.
tar -tzf "$sdist" | sed 's|^[^/]*/||' | sort >"$work/shipped.txt"
missing="$(git ls-files kernels setup.py pyproject.toml MANIFEST.in | sort | comm -23 - "$work/shipped.txt")"
if [ -n "$missing" ]; then
    echo "sdist-smoke: the sdist lacks files the build needs:"; echo "$missing"; exit 1
fi

mkdir "$work/src"
tar -xzf "$sdist" -C "$work/src"
src="$(ls -d "$work"/src/fcn_fast-*)"
python -m venv --system-site-packages "$work/venv"
# Python 3.11's venv brings its own old setuptools (65), which shadows the system's and cannot build a wheel without
# the separate `wheel` package; build with the setuptools the main build used (Python >= 3.12 venvs bring none).
if compgen -G "$work/venv/lib/python*/site-packages/setuptools" >/dev/null; then
    "$work/venv/bin/python" -m pip uninstall -y -q setuptools
fi
export FCN_FAST_BUILD_CUDA="${SDIST_SMOKE_CUDA:-0}"
unset FCN_FAST_MARCH
(cd "$work" && MAX_JOBS="${MAX_JOBS:-2}" "$work/venv/bin/python" -m pip wheel -v --no-build-isolation --no-deps \
    --wheel-dir "$work/wheels" "$src" >"$work/wheel.log" 2>&1) || { tail -60 "$work/wheel.log"; exit 1; }
if grep -q -- "-march=native" "$work/wheel.log"; then
    echo "sdist-smoke: the wheel was compiled with -march=native"; exit 1
fi
grep -o "fcn_fast: C++ kernels with [^;]*" "$work/wheel.log" | head -1
"$work/venv/bin/python" -m pip install --no-deps --no-index "$work"/wheels/fcn_fast-*.whl >"$work/install.log" 2>&1 \
    || { tail -20 "$work/install.log"; exit 1; }

# From outside the repository, with the venv's Python: the installed package, its CLI, its kernels.
cd "$work"
"$work/venv/bin/python" "$repo/.ci/sdist_smoke.py" "$work/venv"
"$work/venv/bin/fcn-fast" --help >/dev/null
so="$(ls "$work"/venv/lib/python*/site-packages/fcn_fast/_C*.so)"
if [ "$(uname -m)" = "x86_64" ] && objdump -d --no-show-raw-insn "$so" | grep -q -E '%[yz]mm[0-9]'; then
    echo "sdist-smoke: $so holds AVX instructions: not a portable build"; exit 1
fi
echo "sdist-smoke: OK (the wheel built from the sdist installs, imports and computes; portable CPU code)"
