#!/usr/bin/env bash
# Builds csrc/emu/sanitize_driver.cpp (the CUDA launches of csrc/cuda under the host CUDA emulation, against a
# float64 reference, without libtorch) in the flavours below and runs each. Called by .ci/test.sh.
#
#   csrc/emu/run_sanitizers.sh [asan|tsan|plain ...]     default: asan tsan
#
#   asan : -fsanitize=address,undefined (heap overflows, misaligned 16-byte accesses, UB), one OS thread per CUDA
#          thread (ASan does not follow the emulator's fiber switches)
#   tsan : -fsanitize=thread, one OS thread per CUDA thread: a missing __syncthreads is a data race on shared memory
#   plain: no sanitizer, fibers (a quick look at the driver itself)
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
CXX=${CXX:-g++}
OUT=${BUILD_DIR:-build/cuda_emu_sanitize}
torch_dir=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
mkdir -p "$OUT"
flavours=("$@")
[[ ${#flavours[@]} -eq 0 ]] && flavours=(asan tsan)

common=(-std=c++20 -g -fno-omit-frame-pointer -ffp-contract=off -Icsrc/include -I"$torch_dir/include"
        csrc/emu/sanitize_driver.cpp -L"$torch_dir/lib" -lc10 -Wl,-rpath,"$torch_dir/lib" -pthread)
for flavour in "${flavours[@]}"; do
  start=$SECONDS
  case $flavour in
    # -O0 for ASan+UBSan: the -O1 build took ~3 min on 2 busy cores, -O0 ~15 s, and runs in ~20 s
    asan) flags=(-O0 -fsanitize=address,undefined -fno-sanitize-recover=all); args=(--threads)
          export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ;;
    tsan) flags=(-O1 -fsanitize=thread); args=(--threads)
          export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 ;;
    plain) flags=(-O1); args=(--fibers) ;;
    *) echo "unknown flavour $flavour (asan, tsan, plain)" >&2; exit 2 ;;
  esac
  exe="$OUT/sanitize_driver_$flavour"
  # Rebuild only when a source is newer than the binary (the driver includes csrc/cuda and the emulator).
  if [[ ! -x $exe ]] || [[ -n $(find csrc/cuda csrc/emu csrc/include -newer "$exe" -type f | head -1) ]]; then
    echo "+ $CXX ${flags[*]} ... -o $exe"
    "$CXX" "${flags[@]}" "${common[@]}" -o "$exe"
  fi
  built=$SECONDS
  echo "+ $exe ${args[*]}"
  "$exe" "${args[@]}" | grep -v '^ok   [a-z_0-9]*/'
  echo "== cuda_emu $flavour: built in $((built - start)) s, ran in $((SECONDS - built)) s"
done
