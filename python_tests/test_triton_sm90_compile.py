"""Every Triton kernel compiles for sm_90 (the H100/H200 the GPU benchmarks use), in fp32, fp16 and bf16, with
every constexpr branch the launchers take: caught here, on a GPU-less machine, instead of on a rare GPU visit.
The same compile pass (plus the variants the launchers pick at the GPU benchmark shapes, compiled again for
sm_80 and sm_86) gives the resource report of bench/resources.py: registers, spills, shared memory and occupancy
of every Triton and CUDA C++ kernel, printed at the end of the pytest output. The default variants must not spill
nor need more shared memory than sm_80 / sm_86 / sm_90 give a block.
See triton_sm90_compile.py (run in its own process: this one has TRITON_INTERPRET=1)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# On a GPU the triton tests compile and run every kernel for real; this check is for GPU-less machines.
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")]
SCRIPT = Path(__file__).with_name("triton_sm90_compile.py")
REPO = SCRIPT.parent.parent


@pytest.fixture(scope="module")
def sm90_compile(tmp_path_factory):
    """One run of triton_sm90_compile.py --report: (completed process, report folder, seconds)."""
    pytest.importorskip("triton")
    out_dir = tmp_path_factory.mktemp("resources")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(SCRIPT), "--report", str(out_dir)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=1800)
    return out, out_dir, time.perf_counter() - start


def test_all_triton_kernels_compile_for_sm90(sm90_compile):
    out, _, _ = sm90_compile
    summary = [line for line in out.stdout.splitlines() if "compiled for sm_90" in line]
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert summary and " 0 failed" in summary[0], out.stdout[-3000:]
    assert int(summary[0].split()[0]) >= 20, summary[0]  # every kernel, several variants each: not a no-op


def _report(sm90_compile, record_property):
    out, out_dir, seconds = sm90_compile
    path = out_dir / "resources.json"
    assert path.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    # printed by conftest.pytest_terminal_summary, with or without -s
    table = (out_dir / "resources.md").read_text()
    record_property("resource_table", f"(compile pass + report: {seconds:.0f} s)\n{table}")
    return json.loads(path.read_text())


def test_default_triton_variants_fit_sm80_86_90(sm90_compile, record_property):
    report = _report(sm90_compile, record_property)
    records = [r for r in report["records"] if r["kind"] == "triton"]
    sm90 = {r["kernel"] for r in records if r["arch"] == "sm_90"}
    for arch in ("sm_90", "sm_80", "sm_86"):  # the benchmark shapes reach every kernel (decode too), on every arch
        assert {r["kernel"] for r in records if r["default"] and r["arch"] == arch} == sm90, arch
    for r in records:  # the numbers were read, not defaulted
        assert r["regs"] > 0 and r["spill_stores"] is not None and r["threads"] == 32 * r["num_warps"], r
    problems = [v["message"] for v in report["violations"] if v["kind"] == "triton"]
    # The decode kernels' default variants came under this check with the routed_decode benchmark case
    # (bench/resources.py); four bf16 broadcast-path variants spill a few bytes (found 2026-12-04, not fixed: no GPU
    # to measure a change of tiles against). Listed by name so that any other spill still fails, and so that a fix
    # must take its entry out (a listed spill that no longer appears fails too).
    known = [m for m in problems if m.split(": spills")[0] in KNOWN_DECODE_SPILLS]
    assert {m.split(": spills")[0] for m in known} == KNOWN_DECODE_SPILLS, "\n".join(problems)
    problems = [m for m in problems if m not in known]
    assert not problems, "\n".join(problems)


KNOWN_DECODE_SPILLS = {
    "decode_merge_kernel [bf16,fp32,i32] BLOCK_DV=64 BLOCK_M=8 BLOCK_S=8 HEAD_DIM_V=64 q_len=1 on sm_80",
    "decode_partial_kernel [bf16,fp32,i32] BLOCK_D=64 BLOCK_DV=64 BLOCK_N=32 BLOCK_R=4 BLOCK_S=8 CAUSAL=1 "
    "DOT_PREC=tf32 HEAD_DIM=64 HEAD_DIM_V=64 USE_DOT=0 num_tiles=1 q_len=1 on sm_90",
    "decode_partial_kernel [bf16,fp32,i32] BLOCK_D=64 BLOCK_DV=64 BLOCK_N=32 BLOCK_R=4 BLOCK_S=8 CAUSAL=1 "
    "DOT_PREC=tf32 HEAD_DIM=64 HEAD_DIM_V=64 USE_DOT=0 num_tiles=1 q_len=1 on sm_80",
    "decode_gate_kernel [bf16,fp32,i32] BLOCK_C=8 BLOCK_D=128 BLOCK_K=8 BLOCK_R=4 CAUSAL=1 FINAL=1 HEAD_DIM=128 "
    "USE_DOT=0 num_splits=1 num_tiles=1 q_len=1 on sm_86",
}


def test_cuda_kernels_fit_sm80_86_90(sm90_compile, record_property):
    report = _report(sm90_compile, record_property)
    if report["cuda_skipped"]:
        pytest.skip(report["cuda_skipped"])
    records = [r for r in report["records"] if r["kind"] == "cuda"]
    assert {r["kernel"] for r in records} >= {"chunk_mean_kernel", "reduce_chunks_kernel", "scale_chunks_kernel",
                                              "softmax_summary_kernel", "softmax_backward_kernel"}
    assert any(r["default"] for r in records)
    problems = [v["message"] for v in report["violations"] if v["kind"] == "cuda"]
    assert not problems, "\n".join(problems)
