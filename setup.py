"""Build bnext's native operators against the installed torch (pip install --no-build-isolation .)."""
import glob
import os
import subprocess
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# BNEXT_CPU_ARCH=native (default) tunes the CPU kernels for the building machine; set it to a
# portable target (e.g. x86-64-v2) when the built package will run on other machines.
CPU_ARCH = os.environ.get("BNEXT_CPU_ARCH", "native")


def simd_capability(arch):
    """The at::vec capability (AVX512, AVX2 or none) that the compiler's target for `arch` supports."""
    try:
        macros = subprocess.run(
            ["c++", f"-march={arch}", "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    defined = set(line.split()[1] for line in macros.splitlines() if line.startswith("#define"))
    if {"__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__", "__FMA__"} <= defined:
        return "AVX512"
    if {"__AVX2__", "__FMA__"} <= defined:
        return "AVX2"
    return None


def build_cuda():
    """The CUDA backend is built when torch has CUDA and a toolkit is found; BNEXT_CUDA=0/1 forces it."""
    forced = os.environ.get("BNEXT_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def shared_libstdcxx_args():
    """Link flags that keep libstdc++ shared: libstdc++.so.6 named first, so that no static copy
    of it can end up in the extension. On the project's H100 machine (torch 2.11+cu130, gcc 13)
    the CUDA build's _C had no libstdc++.so.6 among its needed libraries and 136 std::locale
    symbols of its own: a second C++ runtime beside torch's, with an uninitialized locale, and the
    first number written into an error message crashed the process. Both `-static-libstdc++` and a
    library folder holding only libstdc++.a give that here too; this flag undoes both."""
    return ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []


capability = simd_capability(CPU_ARCH)
# C++20 whatever the torch version's default (torch adds its own -std only when none is given).
# -fno-math-errno: std::sqrt need not set errno (nothing reads it), so per-channel loops vectorize.
cxx_flags = ["-std=c++20", "-O3", "-fno-math-errno", "-fopenmp", f"-march={CPU_ARCH}", "-DPy_LIMITED_API=0x030A0000"]
if capability:
    cxx_flags += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
sources = ["csrc/bnext.cpp", *sorted(glob.glob("csrc/cpu/*.cpp")), *sorted(glob.glob("csrc/autograd/*.cpp"))]
extension = CppExtension
compile_args = {"cxx": cxx_flags}
if build_cuda():
    # TORCH_CUDA_ARCH_LIST picks the GPU architectures, as for any torch extension.
    extension = CUDAExtension
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    compile_args["nvcc"] = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-DPy_LIMITED_API=0x030A0000"]

setup(
    name="bnext",
    version="0.1.0",
    description="Batch normalization for PyTorch in native CPU and CUDA kernels, drop-in for torch.nn.BatchNorm",
    packages=find_packages(include=["bnext", "bnext.*"]),
    ext_modules=[
        extension(
            "bnext._C",
            sources,
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp", *shared_libstdcxx_args()],
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
)
