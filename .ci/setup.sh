#!/usr/bin/env bash
# Sets up a fresh clone: Python dependencies, then routing_kernels._C built in place (with CUDA kernels when
# nvcc and a CUDA build of torch are present). Used by the README's two commands.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  # On our build machines this pin comes from the local wheel store (CUDA 13.0 build + triton 3.8);
  # elsewhere install any torch >= 2.6 first and this step is skipped.
  echo "+ pip install torch==2.14.1"
  "$PYTHON" -m pip install -q "torch==2.14.1"
fi
echo "+ pip install build/test/bench dependencies"
"$PYTHON" -m pip install -q ninja pybind11 numpy pytest pytest-benchmark expecttest matplotlib "transformers==5.24.0"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
echo "+ $PYTHON setup.py build_ext --inplace"
"$PYTHON" setup.py build_ext --inplace > build_ext.log 2>&1 || { tail -50 build_ext.log; exit 1; }
"$PYTHON" -c "import routing_kernels, json; print(json.dumps(routing_kernels.build_info(), indent=1))"
