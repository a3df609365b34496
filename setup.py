"""Builds fcn_fast._C: the C++ (OpenMP) kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  FCN_FAST_BUILD_CUDA=0/1   force the CUDA kernels off/on (default: on when possible)
  TORCH_CUDA_ARCH_LIST      GPU targets (default "9.0+PTX": H100/H200 code plus PTX for newer GPUs)
  FCN_FAST_MARCH            CPU target of the C++ kernels: "native", "x86-64-v3", ... or "" for the compiler's
                            default. Default: native for in-place and editable builds (they run where they are
                            built), portable (x86-64-v2 on x86-64, the compiler's default elsewhere) for wheels,
                            which may be copied to other machines (pip wheel, python -m build, pip install of an sdist)
  DEBUG=1                   -O0 -g
  MAX_JOBS                  parallel compile jobs (torch's own variable)

Object files live in build/temp-<toolchain key>/, compiled by ninja, so a second build (the README's test command
after its demo command) recompiles only what changed: ninja's depfiles track the sources and the project's headers,
its log the compile commands; the directory key names what those miss (torch, the compiler, libc, CUDA, Python), so
another toolchain never reuses an object.
"""

import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
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


DEBUG = os.environ.get("DEBUG", "0") == "1"


def _portable_march() -> str:
    """A CPU target every machine of the architecture runs: x86-64-v2 (SSE4.2, POPCNT: every x86-64 CPU since
    about 2009) on x86-64; the compiler's default (no flag) elsewhere."""
    return "x86-64-v2" if platform.machine().lower() in ("x86_64", "amd64") else ""


def _march(stays_here: bool) -> str:
    """-march of the C++ kernels. An in-place or editable build runs where it was built: tune for this CPU (AVX2 /
    AVX-512 where present). A wheel is a file that travels (pip's cache, an index, another machine): portable, so
    that no wheel carries instructions its machine may lack (SIGILL). FCN_FAST_MARCH overrides both."""
    if "FCN_FAST_MARCH" in os.environ:
        return os.environ["FCN_FAST_MARCH"]
    return "native" if stays_here else _portable_march()


def _tool_version(command) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _toolchain_key(use_cuda: bool) -> str:
    """What ninja's dependency tracking does not see: the compiler (torch's depfiles list no system header, and the
    compile command names the compiler only as "c++"), libc, torch's headers and libraries, CUDA, Python. Object
    files of one key are never reused under another."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or "c++"
    stat = os.stat(cxx) if os.path.exists(cxx) else None
    facts = {
        "python": sys.version, "platform": platform.platform(), "libc": platform.libc_ver(),
        "torch": [torch.__version__, torch.version.git_version, os.path.dirname(torch.__file__)],
        "cxx": [os.path.realpath(cxx), stat and (stat.st_size, stat.st_mtime_ns), _tool_version([cxx, "--version"])],
    }
    if use_cuda:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        facts["cuda"] = [torch.version.cuda, os.path.realpath(nvcc), _tool_version([nvcc, "--version"])]
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cuda = f"-cu{torch.version.cuda}" if use_cuda else ""
    return f"torch{torch.__version__.split('+')[0]}{cuda}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"


class BuildExt(BuildExtension):
    """torch's BuildExtension with the -march policy above and a persistent, toolchain-keyed object folder."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp-" + _toolchain_key(_want_cuda()))
        # setuptools skips an extension whose output is newer than its .cpp/.cu files, blind to a changed header;
        # ninja decides what is out of date instead (a no-op when nothing is), then the link runs.
        self.force = True

    def build_extensions(self):
        march = "" if DEBUG else _march(stays_here=bool(self.inplace or getattr(self, "editable_mode", False)))
        for ext in self.extensions:
            if march:
                ext.extra_compile_args["cxx"].append(f"-march={march}")
        print(f"fcn_fast: C++ kernels with {'-march=' + march if march else 'the compiler default CPU target'}; "
              f"objects in {self.build_temp}", flush=True)
        super().build_extensions()


def _extensions():
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    # No -std: torch.utils.cpp_extension picks the standard its headers need (C++17 for older torch, C++20 newer).
    cxx = opt + ["-fopenmp"]
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
    cmdclass={"build_ext": BuildExt},
)
