"""Plants each bug the CUDA emulation must catch (issue 13, and the chunk-table kernels of issue 10) into a scratch
copy of the tree, one at a time, runs the emulated test suite that covers it (python_tests/test_cuda_emu_chunk_route.py
or test_cuda_emu_chunk_table.py) and, where named, a sanitizer flavour of csrc/emu/sanitize_driver.cpp, and prints
which of them failed. Exits 1 if some mutation went unnoticed.

    python csrc/emu/mutation_check.py [name ...]        (~2-5 min per mutation on 2 cores; not run by CI)
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = "csrc/cuda/chunk_route_kernels.cuh"
LAUNCH = "csrc/cuda/chunk_route_launch.cuh"
GEOMETRY = "csrc/cuda/chunk_geometry.cuh"
ROUTE_TESTS = "python_tests/test_cuda_emu_chunk_route.py"
TABLE_TESTS = "python_tests/test_cuda_emu_chunk_table.py"

# name: (file, text to replace (exactly once), replacement, sanitizer flavours to run[, test file])
MUTATIONS = {
    "dropped_syncthreads": (
        KERNELS, "  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = v;\n  __syncthreads();\n",
        "  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = v;\n", ["tsan"]),
    "token_too_far": (
        KERNELS, "for (int64_t t = i_g; t < n_tok; t += TG)", "for (int64_t t = i_g; t <= n_tok; t += TG)",
        ["asan"]),
    "unwritten_shared_slot": (
        KERNELS, "for (int64_t o_g = 1; o_g < n_groups; ++o_g) acc += s_part[o_g * n_lanes + lane];",
        "for (int64_t o_g = 1; o_g <= n_groups; ++o_g) acc += s_part[o_g * n_lanes + lane];", []),
    "barrier_under_branch": (
        KERNELS, "= b_dot[k];\n      }\n    }\n    __syncthreads();",  # the barrier moves into `if (active)`
        "= b_dot[k];\n      }\n      __syncthreads();\n    }", []),
    "alignment_ignored": (
        LAUNCH, "reinterpret_cast<uintptr_t>(p) % 16 == 0;", "reinterpret_cast<uintptr_t>(p) % 1 == 0;", ["asan"]),
    # The chunk-table kernels (test_cuda_emu_chunk_table.py).
    "table_last_token_skipped": (  # every chunk's last piece stops one token early
        GEOMETRY, "p.t1 = (next < end ? next : end) - first;", "p.t1 = (next < end ? next : end - 1) - first;", [],
        TABLE_TESTS),
    "table_seq_chunks_off_by_one": (  # a sequence's chunk count one short: its last chunk is dropped
        GEOMETRY, "return int64_t{seq_chunks[i_s + 1]} - seq_chunks[i_s];",
        "return int64_t{seq_chunks[i_s + 1]} - seq_chunks[i_s] - 1;", [], TABLE_TESTS),
    "table_wrong_inverse_count": (  # mean = sum / (|chunk| + 1) in the finish pass
        KERNELS, "finish_chunk<scalar_t, VEC, IS_BWD>(s_sum, s_dot, TV, TG, n_vec, nh, D, M, sp.count,",
        "finish_chunk<scalar_t, VEC, IS_BWD>(s_sum, s_dot, TV, TG, n_vec, nh, D, M, sp.count + 1,", [], TABLE_TESTS),
    "table_mean_bwd_wrong_count": (  # chunk_mean_table_bwd divides by |chunk| + 1
        KERNELS, "/ static_cast<acc_t>(pc.span.count);\n      } else {",
        "/ static_cast<acc_t>(pc.span.count + 1);\n      } else {", [], TABLE_TESTS),
    "table_piece_slot_shifted": (  # the finish pass reads the partial row after each aligned piece's
        KERNELS, "(r == 0 ? k : K + j0 + r - 1)", "(r == 0 ? k : K + j0 + r)", ["asan"], TABLE_TESTS),
    "table_finish_barrier_dropped": (  # the finish pass reads s_sum before every group wrote it
        KERNELS, "    __syncthreads();\n    finish_chunk<", "    finish_chunk<", ["tsan"], TABLE_TESTS),
}


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if f.startswith(("csrc/", "python_tests/", "routing_kernels/")) or f in ("conftest.py", "pyproject.toml"):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def run(cmd, cwd):
    t = time.time()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr, time.time() - t


def main(names):
    unnoticed = []
    for name in names or MUTATIONS:
        path, old, new, sanitizers, *test = MUTATIONS[name]
        tests = test[0] if test else ROUTE_TESTS
        with tempfile.TemporaryDirectory(prefix=f"rk_mut_{name}_") as tmp:
            dst = Path(tmp)
            copy_tree(dst)
            text = (dst / path).read_text()
            assert text.count(old) == 1, f"{name}: the text to mutate is not in {path} exactly once"
            (dst / path).write_text(text.replace(old, new))
            rc, out, dt = run([sys.executable, "-m", "pytest", tests, "-q",
                               "-p", "no:cacheprovider", "--maxfail=10000", "-W", "ignore"], dst)
            summary = out.strip().splitlines()[-1] if out.strip() else "(no output)"
            failed = [ln.split(" - ")[0].replace("FAILED ", "") for ln in out.splitlines() if ln.startswith("FAILED")]
            first = ""
            m = re.search(r"^E\s+(.*(?:CUDA emulation|Mismatch|differs|NaN).*)$", out, re.MULTILINE)
            if m:
                first = m.group(1)[:200]
            print(f"== {name}: pytest {summary} ({dt:.0f} s); rc={rc}")
            if failed:
                print(f"   e.g. {failed[0]}")
            if first:
                print(f"   first error: {first}")
            caught = rc != 0
            for flavour in sanitizers:
                rc_s, out_s, dt_s = run(["bash", "csrc/emu/run_sanitizers.sh", flavour], dst)
                lines = [ln for ln in out_s.splitlines() if re.search(r"ERROR|FAIL|runtime error|WARNING", ln)]
                print(f"== {name}: {flavour} driver rc={rc_s} ({dt_s:.0f} s): {lines[0][:200] if lines else ''}")
                caught |= rc_s != 0
            if not caught:
                unnoticed.append(name)
    print("unnoticed:", unnoticed or "none")
    return 1 if unnoticed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
