"""Every Triton kernel compiles for sm_90 (the H100/H200 the GPU benchmarks use), in fp32, fp16 and bf16, with
every constexpr branch the launchers take: caught here, on a GPU-less machine, instead of on a rare GPU visit.
See triton_sm90_compile.py (run in its own process: this one has TRITON_INTERPRET=1)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# On a GPU the triton tests compile and run every kernel for real; this check is for GPU-less machines.
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")]
SCRIPT = Path(__file__).with_name("triton_sm90_compile.py")
REPO = SCRIPT.parent.parent


def test_all_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=900)
    summary = [line for line in out.stdout.splitlines() if "compiled for sm_90" in line]
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert summary and " 0 failed" in summary[0], out.stdout[-3000:]
    assert int(summary[0].split()[0]) >= 20, summary[0]  # every kernel, several variants each: not a no-op
