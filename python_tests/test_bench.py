"""Smoke test of the benchmark harness: `python -m bench --quick` end to end on this machine."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ["op", "provider", "mode", "shape", "dtype", "device", "ms_median", "ms_p20", "ms_p80",
           "throughput", "throughput_unit", "peak_mem_mb", "torch", "triton", "commit",
           "timestamp"]


def test_quick_bench_writes_csv_and_plot(tmp_path):
    pytest.importorskip("routing_kernels")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    csvs = list(tmp_path.glob("*.csv"))
    assert len(csvs) == 1, list(tmp_path.iterdir())
    with open(csvs[0], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert rows

    providers = {r["provider"] for r in rows}
    assert {"eager", "ours"} <= providers
    for provider in providers:  # every mode measured (or recorded as failed) for each provider
        assert {r["mode"] for r in rows if r["provider"] == provider} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert r["throughput_unit"] == ("TFLOP/s" if r["op"] == "routed_attention" else "GB/s")
        if r["provider"] == "eager":
            ms = float(r["ms_median"])
            assert math.isfinite(ms) and ms > 0, r
            assert float(r["ms_p20"]) <= ms <= float(r["ms_p80"]), r
            assert float(r["throughput"]) > 0, r

    # the GPU kernel resources section (bench/resources.py): here the CUDA C++ kernels of the extension, if built
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())["meta"]
    assert isinstance(meta["resources"], dict), meta["resources"]
    assert "## GPU kernel resources" in next(tmp_path.glob("*.md")).read_text()

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 0
