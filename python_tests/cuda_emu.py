"""Builds and loads the CUDA kernels of csrc/cuda as host C++ under the CUDA emulation header
(csrc/emu/cuda_emu_ops.cpp), exposing torch.ops.routing_kernels_emu.* on CPU tensors.

Built with torch.utils.cpp_extension.load into build/cuda_emu (ninja: a rebuild only when a source changed), so
CI pays the compile once (~1 min on 2 cores) and only when these tests run; the production extension is not
touched. CMake builds the same library with -DROUTING_KERNELS_CUDA_EMU=ON (.ci/cmake_test.sh does not)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# schedule argument of the ops: bits 0-1 the fiber order, bit 2 blocks in reverse, bit 3 one thread per CUDA thread
ROUND_ROBIN, REVERSE, RACE_AHEAD, RANDOM = 0, 1, 2, 3
BLOCKS_REVERSED = 4
THREADS = 8


@functools.lru_cache(maxsize=None)
def load():
    """torch.ops.routing_kernels_emu, built on first use."""
    from torch.utils import cpp_extension

    build_dir = ROOT / "build" / "cuda_emu"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="routing_kernels_cuda_emu",
        sources=[str(ROOT / "csrc" / "emu" / "cuda_emu_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc" / "include")],
        # -O1: the kernels run a few thousand blocks per case; -O2 costs ~2x the compile for little run time.
        # No FMA contraction: the emulated kernels round like the CPU build of the extension.
        extra_cflags=["-O1", "-ffp-contract=off", "-DROUTING_KERNELS_CUDA_EMU=1"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("ROUTING_KERNELS_EMU_VERBOSE") == "1",
    )
    return torch.ops.routing_kernels_emu
