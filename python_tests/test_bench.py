"""The benchmark harness end to end: `python -m bench --quick` with every provider that should run on the
device; each must give finite positive timings, the not-applicable ones must say why, and nothing may fail."""
import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ["op", "provider", "mode", "shape", "dtype", "device", "ms_median", "ms_p20", "ms_p80",
           "throughput", "throughput_unit", "peak_mem_mb", "status", "note", "torch", "triton", "commit",
           "timestamp"]
OPS = ("chunk_mean", "chunk_route", "route_chunks", "routed_attention", "routed_decode")
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("eager", "compile", "ours", "sdpa", "flex", "append")  # all of them should run on CPU and GPU


def expected_status(op: str, provider: str, mode: str, device: str):
    """What a quick run must record for (op, provider, mode): 'ok', 'n/a', or None (no row at all)."""
    if op in ("route_chunks", "routed_decode") and mode != "fwd":
        return None  # integer outputs / a decode step: no backward
    if provider == "append":
        return "ok" if op == "routed_decode" else None  # the cache's append: decode only
    if op == "routed_decode":
        return {"sdpa": "ok", "flex": None, "compile": "n/a"}.get(provider, "ok")
    if provider in ("sdpa", "flex") and op != "routed_attention":
        return None  # attention baselines only
    if provider == "flex" and device == "cpu" and mode != "fwd":
        return "n/a"  # FlexAttention has no CPU backward
    return "ok"


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def check_rows(rows: list, device: str, providers=PROVIDERS, ops=OPS):
    """Every expected (op, provider, mode, dynamic chunking or not) has exactly one row with the expected status;
    'ok' rows have finite positive times and throughput; 'n/a' rows give a reason; nothing failed or was skipped.
    The quick run has one chunk_route case with a cu_chunks table besides the integer one."""
    got = {}
    for r in rows:
        key = (r["op"], r["provider"], r["mode"], "cu_chunks=" in r["shape"])
        assert key not in got, f"two rows for {key}"
        got[key] = r
    want = {(op, p, m, table): s for op in ops for p in providers for m in MODES
            for table in ((False, True) if op == "chunk_route" and ops == OPS else (False,))
            if (s := expected_status(op, p, m, device))}
    assert set(got) == set(want), f"missing {set(want) - set(got)}, unexpected {set(got) - set(want)}"
    for key, r in got.items():
        assert r["status"] == want[key], f"{key}: {r['status']} ({r['note']}), expected {want[key]}"
        assert r["throughput_unit"] == ("TFLOP/s" if r["op"] == "routed_attention" else "GB/s"), r
        if r["status"] == "ok":
            ms = float(r["ms_median"])
            assert math.isfinite(ms) and ms > 0, r
            assert float(r["ms_p20"]) <= ms <= float(r["ms_p80"]), r
            assert math.isfinite(float(r["throughput"])) and float(r["throughput"]) > 0, r
        else:
            assert r["note"] and r["ms_median"] == "nan", r


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quick_bench_every_provider_runs(tmp_path, device):
    pytest.importorskip("routing_kernels")
    # compile and flex compile every case: ~80 s of the ~90 s this takes on 2 cores
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", device,
                           "--providers", ",".join(PROVIDERS), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    csvs = list(tmp_path.glob("*.csv"))
    assert len(csvs) == 1, list(tmp_path.iterdir())
    check_rows(read_csv(csvs[0]), device)
    assert "ours vs the fastest other provider" in proc.stdout
    md = next(tmp_path.glob("*.md")).read_text()
    assert "## Summary" in md and "| chunk_route | fwd+bwd |" in md
    if device == "cpu":
        assert "n/a: flex (routed_attention bwd,fwd+bwd N=256): FlexAttention has no CPU backward" in md

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


def test_a_broken_provider_is_recorded_and_fails_the_check(tmp_path, monkeypatch):
    """A planted failure in 'ours' becomes 'failed' rows with the error (not NaN rows that pass), the CLI
    exits 1, and check_rows rejects the run."""
    pytest.importorskip("routing_kernels")
    from bench import __main__ as cli
    from bench import providers, timing

    def broken(case):
        def run(*inputs):
            raise RuntimeError("planted failure")
        return run

    monkeypatch.setattr(timing, "guard_cpu_memory", lambda: "not capped")  # would cap this pytest process
    monkeypatch.setitem(providers.PROVIDERS, "ours", dataclasses.replace(providers.PROVIDERS["ours"], build=broken))
    rc = cli.main(["--quick", "--device", "cpu", "--ops", "chunk_mean", "--providers", "eager,ours",
                   "--out", str(tmp_path)])
    assert rc == 1
    rows = read_csv(next(tmp_path.glob("*.csv")))
    ours = [r for r in rows if r["provider"] == "ours"]
    assert len(ours) == 3 and all(r["status"] == "failed" and "planted failure" in r["note"] for r in ours)
    assert "FAILED: ours (chunk_mean fwd,bwd,fwd+bwd N=256): RuntimeError: planted failure" in \
        next(tmp_path.glob("*.md")).read_text()
    with pytest.raises(AssertionError, match="failed"):
        check_rows(rows, "cpu", providers=("eager", "ours"), ops=("chunk_mean",))


def test_flex_runs_when_the_sequence_is_shorter_than_a_chunk():
    """The default CPU matrix has routed_attention at N=256 with C=512: a block mask of one partial block. Built
    compiled, Inductor's CPU code for it did not compile (torch 2.14.1, AVX2), so flex failed there."""
    pytest.importorskip("routing_kernels")
    import torch

    import routing_kernels
    from bench.cases import Case
    from bench.providers import PROVIDERS

    case = Case("routed_attention", 1, 48, 4, 16, 64, torch.float32, "cpu", hkv=2, top_k=2)
    q, k, v = (t.detach() for t in case.make_inputs())
    got = PROVIDERS["flex"].build(case)(q, k, v)
    want = routing_kernels.routed_attention(q, k, v, **case.call_kwargs())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_summary_gives_the_geometric_mean_speedup_per_op_and_mode():
    from bench.report import summary_table

    def row(provider, n, ms, mode="fwd"):
        return {"op": "chunk_mean", "mode": mode, "shape": f"N={n}", "dtype": "float32", "provider": provider,
                "status": "ok", "ms_median": ms}

    rows = [row("ours", 1, 1.0), row("eager", 1, 2.0), row("compile", 1, 3.0),  # best other: 2x
            row("ours", 2, 1.0), row("eager", 2, 8.0),  # 8x
            row("ours", 3, 1.0), row("eager", 3, float("nan")) | {"status": "failed"},  # not counted
            row("ours", 1, 2.0, "bwd"), row("eager", 1, 1.0, "bwd")]  # 0.5x
    text = summary_table(rows, ["ours"])
    assert "| chunk_mean | fwd | 2 | 4.00x | 2.00x - 8.00x |" in text  # sqrt(2 * 8)
    assert "| chunk_mean | bwd | 1 | 0.50x | 0.50x - 0.50x |" in text
    assert "| chunk_mean | fwd | N=3 | 1 ms | none measured | - |" in text
