"""Builds routing_kernels and its C++/CUDA extension routing_kernels._C.

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

Environment knobs:
    ROUTING_KERNELS_BUILD_CUDA=0|1  0: CPU-only; 1: CUDA or fail. Unset: CUDA when nvcc and a CUDA torch exist.
    CUDA_HOME                       CUDA toolkit (default /usr/local/cuda when it exists).
    TORCH_CUDA_ARCH_LIST            e.g. "9.0"; unset: the visible GPUs' archs, or "8.0;9.0" without a GPU.
    MAX_JOBS                        parallel compile jobs (read by torch.utils.cpp_extension).
"""

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# torch.utils.cpp_extension reads CUDA_HOME when it is imported, and without it guesses /usr/local from
# `which nvcc`, where linking then fails with "cannot find -lcudart". So set it before importing torch.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# In case cpp_extension was imported before this file ran: its guess would be stale.
cpp_extension.CUDA_HOME = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension.CUDA_HOME


def read_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE).group(1)


def want_cuda() -> bool:
    """CUDA kernels are built from what is installed (nvcc, a CUDA torch), never from whether a GPU is visible."""
    knob = os.environ.get("ROUTING_KERNELS_BUILD_CUDA", "").strip()
    if knob not in ("", "0", "1"):
        raise SystemExit(f"ROUTING_KERNELS_BUILD_CUDA must be 0 or 1, got {knob!r}")
    if knob == "0":
        return False
    cuda_home = cpp_extension.CUDA_HOME
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if not cuda_home or not (Path(cuda_home) / "bin" / "nvcc").exists():
        missing.append(f"no nvcc under CUDA_HOME={cuda_home!r} (set CUDA_HOME to the CUDA toolkit)")
    if missing and knob == "1":
        raise SystemExit("ROUTING_KERNELS_BUILD_CUDA=1 but CUDA cannot be built: " + "; ".join(missing))
    if missing:
        print("routing_kernels: building CPU-only:", "; ".join(missing))
    return not missing


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, filled in when unset: without a GPU torch would die with an IndexError."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        # device_count() only asks the driver; it is 0 on a GPU-less build machine.
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs = ";".join(f"{major}.{minor}" for major, minor in caps) or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def make_extension():
    version = read_version()
    with_cuda = want_cuda()
    sources = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("csrc/*.cpp"), *ROOT.glob("csrc/cpu/*.cpp")])
    archs = ""
    if with_cuda:
        archs = cuda_arch_list()
        sources += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/cuda/*.cu"))
        print(f"routing_kernels: building CUDA kernels for {archs} with CUDA_HOME={cpp_extension.CUDA_HOME}")

    # String defines go to the C++ compiler only (python_bindings.cpp reads them): nvcc splits -D values
    # at commas. torch shell-quotes every flag, so the quotes and ';' reach the compiler intact.
    build_defines = {
        "ROUTING_KERNELS_VERSION": version,
        "ROUTING_KERNELS_CUDA_ARCHS": archs,
        "ROUTING_KERNELS_TORCH_VERSION": torch.__version__,
        "ROUTING_KERNELS_CUDA_VERSION": torch.version.cuda if with_cuda else "",
    }
    # at::parallel_for is an inline OpenMP template: without -fopenmp it silently runs on one thread.
    # The loader resolves libgomp.so.1 to the copy torch already loaded.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # -ffp-contract=off: no fused multiply-adds, so the AVX-512 / AVX2 / baseline clones of the CPU row loops
    # (csrc/cpu/routed_attention_common.h) round alike and results do not depend on the machine's vector width.
    cxx_flags = ["-O3", "-ffp-contract=off", *openmp] + [f'-D{name}="{value}"' for name, value in build_defines.items()]
    nvcc_flags = ["-O3", "-lineinfo"]
    extension = CUDAExtension if with_cuda else CppExtension
    return extension(
        name="routing_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "include")],
        define_macros=[("ROUTING_KERNELS_WITH_CUDA", "1" if with_cuda else "0")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
        extra_link_args=openmp,
    )


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Always hands the compile to ninja, which redoes what changed, compile flags included. setuptools alone
    would skip the build when the .so is newer than the sources, missing a new arch list or CUDA knob."""

    def finalize_options(self):
        super().finalize_options()
        self.force = True


setup(
    packages=find_packages(include=["routing_kernels", "routing_kernels.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
