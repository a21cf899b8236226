"""Build of the compiled op library `coconut_kernels._C`.

The CPU kernels are always built. The CUDA kernels are added when a CUDA toolkit and a CUDA build of
torch are present, or when FORCE_CUDA=1 (to compile without a GPU). DEBUG=1 builds with -O0 -g.
Install with `pip install --no-build-isolation -e .` so the extension is built against the torch that is
already installed (its C++ ABI must match the one you run with).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"
FORCE_CUDA = os.environ.get("FORCE_CUDA", "0") == "1"
WITH_CUDA = FORCE_CUDA or (torch.version.cuda is not None and CUDA_HOME is not None)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cxx = ["-O0", "-g"] if DEBUG else ["-O3"]
    # -fopenmp makes at::parallel_for parallel; the libgomp.so.1 torch ships is the one loaded at run time.
    cxx += ["-fopenmp", "-DCOCONUT_PYTHON_MODULE"]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not WITH_CUDA:
        return CppExtension(
            "coconut_kernels._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    nvcc = ["-O0", "-g", "-G"] if DEBUG else ["-O3", "--use_fast_math"]
    nvcc += ["-DCOCONUT_WITH_CUDA", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "coconut_kernels._C",
        srcs + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx + ["-DCOCONUT_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["coconut_kernels", "coconut_kernels.*"]),  # the suite is coconut_kernels.bench
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
