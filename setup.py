"""Build bnext's native operators against the installed torch (pip install --no-build-isolation .)."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# BNEXT_CPU_ARCH=native (default) tunes the CPU kernels for the building machine; set it to a
# portable target (e.g. x86-64-v2) when the built package will run on other machines.
cpu_arch = os.environ.get("BNEXT_CPU_ARCH", "native")
cxx_flags = ["-O3", "-fopenmp", f"-march={cpu_arch}", "-mprefer-vector-width=512", "-DPy_LIMITED_API=0x030A0000"]

setup(
    name="bnext",
    version="0.1.0",
    description="Batch normalization for PyTorch in native CPU kernels, drop-in for torch.nn.BatchNorm",
    packages=find_packages(include=["bnext", "bnext.*"]),
    ext_modules=[
        CppExtension(
            "bnext._C",
            ["csrc/bnext.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
)
