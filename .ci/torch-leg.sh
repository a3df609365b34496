#!/usr/bin/env bash
# One more CI leg: the README's test command against another torch, in a fresh virtual environment.
#
#   bash .ci/torch-leg.sh VERSION [BACKENDS [EXTRA_REQUIREMENT ...]]
#
# VERSION is installed from the package index (torch==VERSION, with the Triton it depends on, if any); BACKENDS is
# what the leg must have (FCN_FAST_REQUIRE_BACKENDS, default cpu); the extra requirements go into the same
# environment. The extension is C++-only unless FCN_FAST_BUILD_CUDA=1 is set (then the CUDA kernels must compile
# against this torch, though no GPU here runs them). No torchvision build matches these torches on this index (the
# test extra's torchvision==0.29.1 would replace torch with 2.14.1), and smp needs torchvision: a leg installs the
# test tools alone and lets the tests of those peers skip.
#
# It runs in a copy of the working tree, so that its editable build does not replace the first leg's
# fcn_fast/_C*.so, which is built against another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="$1"
backends="${2:-cpu}"
extra=("${@:3}")
root=".ci/.torch-$torch_version"  # ignored: the environment and the copy, remade on every run
start=$SECONDS

rm -rf "$root"
mkdir -p "$root/src"
python - "$root/src" <<'PY'
import os, shutil, subprocess, sys
files = subprocess.check_output(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).split(b"\0")
for name in (f.decode() for f in files if f):
    if os.path.isfile(name) and not name.startswith(".ci/.torch-"):
        os.makedirs(os.path.join(sys.argv[1], os.path.dirname(name)), exist_ok=True)
        shutil.copy2(name, os.path.join(sys.argv[1], name))
PY
python -m venv "$root/venv"
py="$PWD/$root/venv/bin/python"
# --no-compile: byte-compiling all of torch's modules up front took minutes; imports compile what they use.
"$py" -m pip install -q --no-compile "torch==$torch_version" "setuptools>=64" wheel "${extra[@]}"
echo "torch $torch_version leg: environment ready after $((SECONDS - start)) s"
cd "$root/src"
export FCN_FAST_REQUIRE_BACKENDS="$backends"
export FCN_FAST_OPTIONAL_PEERS=torchvision,segmentation_models_pytorch,onnx,onnxscript,onnxruntime
"$py" -c "import torch; assert torch.__version__.startswith('$torch_version'), torch.__version__; print('torch', torch.__version__)"
# The test tools' own requirements must not move what the leg pinned.
printf '%s\n' "torch==$torch_version" "${extra[@]}" > "$PWD/../constraints.txt"
MAX_JOBS=2 FCN_FAST_BUILD_CUDA="${FCN_FAST_BUILD_CUDA:-0}" \
  "$py" -m pip install -q --no-build-isolation -c "$PWD/../constraints.txt" -e '.[test-base]'
echo "torch $torch_version leg: built after $((SECONDS - start)) s"
"$py" -m pytest -q -m "not slow" --timeout=900
echo "torch $torch_version leg: $((SECONDS - start)) s"
