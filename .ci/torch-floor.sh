#!/usr/bin/env bash
# The second CI leg: the README's test command against the oldest torch CI can install, torch 2.13.0 (the CPU-only
# build on the machine's disk: no CUDA, so a C++-only extension; no Triton, so the triton backend's tests skip), in a
# fresh virtual environment. It runs in a copy of the working tree so that its editable build does not replace the
# first leg's fcn_fast/_C*.so, which is built against another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${FCN_FAST_CI_TORCH:-2.13.0}"
root=.ci/.torch-floor  # ignored: the environment and the copy, remade on every run
start=$SECONDS

rm -rf "$root"
mkdir -p "$root/src"
python - "$root/src" <<'PY'
import os, shutil, subprocess, sys
files = subprocess.check_output(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).split(b"\0")
for name in (f.decode() for f in files if f):
    if os.path.isfile(name) and not name.startswith(".ci/.torch-floor/"):
        os.makedirs(os.path.join(sys.argv[1], os.path.dirname(name)), exist_ok=True)
        shutil.copy2(name, os.path.join(sys.argv[1], name))
PY
python -m venv "$root/venv"
py="$PWD/$root/venv/bin/python"
# --no-compile: byte-compiling all of torch's modules up front took minutes; imports compile what they use.
"$py" -m pip install -q --no-compile "torch==$torch_version" "setuptools>=64" wheel
echo "torch $torch_version leg: environment ready after $((SECONDS - start)) s"
cd "$root/src"
# The backends this leg must have: the first leg's less triton (not installed) and cuda (no CUDA in this torch).
export FCN_FAST_REQUIRE_BACKENDS=cpu
# No torchvision build matches torch 2.13.0 here (the test extra's torchvision==0.29.1 would replace it with 2.14.1),
# and smp needs torchvision: this leg installs the test tools alone and lets the tests of those peers skip.
export FCN_FAST_OPTIONAL_PEERS=torchvision,segmentation_models_pytorch,onnx,onnxscript,onnxruntime
"$py" -c "import torch; assert torch.__version__.startswith('$torch_version'), torch.__version__; print('torch', torch.__version__)"
MAX_JOBS=2 "$py" -m pip install -q --no-build-isolation -e '.[test-base]'
echo "torch $torch_version leg: built after $((SECONDS - start)) s"
"$py" -m pytest -q -m "not slow" --timeout=900
echo "torch $torch_version leg: $((SECONDS - start)) s"
