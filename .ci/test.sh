#!/usr/bin/env bash
# The README's test command: set up, build the CUDA sources for sm_90 (needs nvcc, not a GPU), build and
# ctest the CMake target, then the Python tests (GPU tests skip without a GPU; Triton runs in its
# interpreter on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

start=$SECONDS
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # one arch: setup.sh and build_ext.sh share the build
bash .ci/setup.sh
if command -v "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" >/dev/null && "$PYTHON" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  bash .ci/build_ext.sh  # nothing left to compile: checks the .so holds sm_90 code (cuobjdump)
fi
bash .ci/cmake_test.sh
# The CUDA kernels on the CPU under the host CUDA emulation, with ASan+UBSan and with TSan (csrc/README.md);
# the unsanitized grid is python_tests/test_cuda_emu_chunk_route.py, run by pytest below.
bash csrc/emu/run_sanitizers.sh asan tsan
echo "== build steps took $((SECONDS - start)) s"
"$PYTHON" -m pytest python_tests bench -q -p no:cacheprovider --durations=10
echo "== total $((SECONDS - start)) s"
