#!/usr/bin/env bash
# Builds routing_kernels._C in place with its CUDA kernels, checks the .so holds code for every requested arch,
# and prints the build report. Needs nvcc, not a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export ROUTING_KERNELS_BUILD_CUDA=1  # fail rather than quietly build CPU-only
echo "== build_ext: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

start=$SECONDS
echo "+ $PYTHON setup.py build_ext --inplace"
"$PYTHON" setup.py build_ext --inplace
echo "== compiled in $((SECONDS - start)) s"

so=$(ls routing_kernels/_C*.so)
# cuobjdump ships with the full toolkit; triton's wheel carries a copy when the toolkit lacks it.
cuobjdump=$(command -v "$CUDA_HOME/bin/cuobjdump" || command -v cuobjdump ||
  "$PYTHON" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))')
echo "+ $cuobjdump --list-elf $so"
elves=$("$cuobjdump" --list-elf "$so")
echo "$elves"
for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
  sm="sm_${arch%%+PTX}"
  sm="${sm//./}"
  if ! grep -q "\.${sm}\.cubin" <<<"$elves"; then
    echo "error: $so holds no $sm code" >&2
    exit 1
  fi
  echo "== $so holds $sm code"
done

echo "+ routing_kernels.build_info()"
"$PYTHON" - <<'PY'
import routing_kernels
from routing_kernels import _ext

info = routing_kernels.build_info()
for key, value in info.items():
    print(f"  {key}: {value}")
assert info["extension"] == "loaded" and info["cuda_built"], "routing_kernels._C did not load with CUDA kernels"
assert _ext.has_kernel("chunk_mean_fwd", "cpu") and _ext.has_kernel("chunk_mean_fwd", "cuda")
for op in ("chunk_route_fwd", "chunk_mean_bwd", "chunk_mean_table_fwd", "chunk_mean_table_bwd", "chunk_route_table_fwd",
           "chunk_route_table_bwd"):
    assert _ext.has_kernel(op, "cuda"), f"routing_kernels._C has no CUDA kernel for {op}"
PY
