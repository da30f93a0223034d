#!/usr/bin/env bash
# The one prepared device visit (the team notes on using the GPU are kept outside this repository; everything needed is here), run from the repo root, under 8 minutes:
#   versions -> build the extension in place -> GPU tests -> ceilings + benchmarks into $OUT.
# Call:  run(command="PYTHONUNBUFFERED=1 bash bench/gpu_check.sh", timeout_s=480)
# $OUT receives: log, bench_<gpu>_<date>.{csv,json,md,png}. The short table is printed last.
# Local dry run of the script's plumbing (no build, tiny shapes):
#   OUT=/tmp/gc SKIP_BUILD=1 BENCH_ARGS=--quick bash bench/gpu_check.sh
set -uo pipefail
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log") 2>&1
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
T0=$SECONDS
DEADLINE=460  # seconds after start by which the benchmark must have written its files
step() { echo; echo "=== [$((SECONDS - T0))s] $*"; }

step versions
python3 -c 'import sys; print("python", sys.version.split()[0])'
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
python3 -c 'import triton; print("triton", triton.__version__)'
"$CUDA_HOME/bin/nvcc" --version | tail -n 2
nvidia-smi -L

step "build (log: /tmp/build.log)"
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    echo "SKIP_BUILD=1: not building"
elif ! MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace >/tmp/build.log 2>&1; then
    echo "BUILD FAILED. First errors:"
    grep -n -m 25 -E "error|Error" /tmp/build.log
    echo "--- last lines:"
    tail -n 30 /tmp/build.log
    exit 1
fi
tail -n 2 /tmp/build.log
python3 -c 'import routing_kernels as rk; print("build_info", rk.build_info())'

step "GPU tests"
# Triton compiles each kernel variant of the tests once (~1 s each, ~150 variants): hence the 200 s cap.
timeout 200 python3 -m pytest python_tests -m "gpu or triton" --maxfail=10 -q 2>&1 | tail -n 25
TESTS_RC=${PIPESTATUS[0]}

LEFT=$((DEADLINE - (SECONDS - T0)))
step "ceilings + benchmarks (${LEFT}s left)"
# --budget-s: stop starting measurements 40 s before the deadline (files, plot, one slow case)
timeout "$LEFT" python3 -m bench --ceilings --budget-s $((LEFT > 80 ? LEFT - 40 : 40)) --out "$OUT" ${BENCH_ARGS:-} >/tmp/bench_table.md
BENCH_RC=$?

step "done in $((SECONDS - T0))s: gpu tests rc=$TESTS_RC, bench rc=$BENCH_RC (124 = timed out)"
ls -la "$OUT"
cat /tmp/bench_table.md
