#!/usr/bin/env bash
# Configures (CPU kernels only), builds and ctests the libtorch CMake build of csrc/.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUILD_DIR=${BUILD_DIR:-build/cmake}
JOBS=${MAX_JOBS:-2}
site=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
nvidia_lib="$site/nvidia/cu13/lib"  # nvrtc and friends of the CUDA build of torch
echo "== cmake_test: build dir $BUILD_DIR, torch cmake prefix $prefix"

start=$SECONDS
# A CUDA build of torch looks for its CUDA libraries even when we build no CUDA code.
cmake_args=(-S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" -DROUTING_KERNELS_WITH_CUDA=OFF)
if "$PYTHON" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  cmake_args+=(-DCUDA_TOOLKIT_ROOT_DIR="${CUDA_HOME:-/usr/local/cuda}")
  [[ -e "$nvidia_lib/libnvrtc.so.13" ]] && cmake_args+=(-DCUDA_nvrtc_LIBRARY="$nvidia_lib/libnvrtc.so.13")
fi
echo "+ cmake ${cmake_args[*]}"
cmake "${cmake_args[@]}"
echo "+ cmake --build $BUILD_DIR -j $JOBS"
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "== built in $((SECONDS - start)) s"

echo "+ ctest --output-on-failure (in $BUILD_DIR)"
cd "$BUILD_DIR"
LD_LIBRARY_PATH="$nvidia_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ctest --output-on-failure -V
