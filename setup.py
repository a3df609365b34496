"""Builds fcn_fast._C: the C++ (OpenMP) kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  FCN_FAST_BUILD_CUDA=0/1   force the CUDA kernels off/on (default: on when possible)
  TORCH_CUDA_ARCH_LIST      GPU targets (default "9.0+PTX": H100/H200 code plus PTX for newer GPUs)
  DEBUG=1                   -O0 -g
  MAX_JOBS                  parallel compile jobs (torch's own variable)
"""

import glob
import os
import shutil
import sys

# /usr/local/bin/nvcc can be a wrapper script, from which torch would guess CUDA_HOME=/usr/local and find no
# headers; the toolkit proper lives in /usr/local/cuda. This must be set before torch.utils.cpp_extension is imported.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda/include"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("FCN_FAST_BUILD_CUDA")
    possible = torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if forced is not None:
        if forced == "1" and not possible:
            sys.exit("FCN_FAST_BUILD_CUDA=1 but torch has no CUDA or nvcc/CUDA_HOME was not found")
        return forced == "1"
    return possible


def _extensions():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std: torch.utils.cpp_extension picks the standard its headers need (C++17 for older torch, C++20 newer).
    cxx = opt + ["-fopenmp"]
    # Built from source on the machine that runs it, so tune for that CPU (AVX2/AVX-512 where present);
    # FCN_FAST_MARCH=x86-64-v2 (say) builds a binary to copy to other machines.
    march = os.environ.get("FCN_FAST_MARCH", "native")
    if not debug and march:
        cxx.append(f"-march={march}")
    include_dirs = [os.path.join(ROOT, "kernels", "include")]
    cpp_sources = sorted(glob.glob(os.path.join("kernels", "*.cpp")) + glob.glob(os.path.join("kernels", "cpu", "*.cpp")))
    use_cuda = _want_cuda()
    define_macros = []
    if use_cuda:
        cuda_sources = sorted(glob.glob(os.path.join("kernels", "cuda", "*.cu")))
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "fcn_fast._C",
                cpp_sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=define_macros + [("FCN_FAST_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fcn_fast._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    packages=find_packages(include=["fcn_fast", "fcn_fast.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
