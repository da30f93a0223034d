"""The CPU output cache of the C++ kernels (csrc/cpu/output_cache.cpp): large outputs are reused from freed
buffers, bounded by ROUTING_KERNELS_CPU_CACHE_MB, seen by the profiler, and never change a result."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import routing_kernels as rk
from routing_kernels import _ext
from routing_kernels.ops.chunk_route.reference import chunk_route_ref

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="routing_kernels._C not built")

MB = 2**20


def _inputs(B=2, N=1024, H=4, D=64, seed=0):  # x: 2 MB in fp32, above the 1 MB caching threshold
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, H, D, generator=g), torch.randn(H, D, generator=g)


def test_a_freed_output_is_reused_and_results_stay_exact():
    rk.empty_cpu_cache()
    x, q = _inputs()
    y = rk.chunk_route(x, q, chunk_size=100).y
    before = rk.cpu_cache_info()
    ptr = y.data_ptr()
    del y
    assert rk.cpu_cache_info()["cached_bytes"] == before["cached_bytes"] + 2 * MB
    x2, q2 = _inputs(seed=1)  # other values: a stale buffer must be fully overwritten
    y2 = rk.chunk_route(x2, q2, chunk_size=100).y
    after = rk.cpu_cache_info()
    assert y2.data_ptr() == ptr
    assert after["hits"] == before["hits"] + 1 and after["cached_bytes"] == before["cached_bytes"]
    torch.testing.assert_close(y2, chunk_route_ref(x2, q2, 100)[0], rtol=1e-5, atol=1e-6)


def test_small_outputs_bypass_the_cache():
    rk.empty_cpu_cache()
    x, q = _inputs(B=1, N=100)  # 100 KB
    before = rk.cpu_cache_info()
    rk.chunk_route(x, q, chunk_size=7)  # freed at once
    after = rk.cpu_cache_info()
    assert (after["hits"], after["misses"], after["cached_bytes"]) == (before["hits"], before["misses"], 0)


def test_empty_cpu_cache_frees_buffers_and_live_outputs_survive():
    x, q = _inputs()
    kept = rk.chunk_route(x, q, chunk_size=64).y
    rk.chunk_route(x, q, chunk_size=64)  # freed at once
    assert rk.cpu_cache_info()["cached_bytes"] >= 2 * MB
    rk.empty_cpu_cache()
    assert rk.cpu_cache_info()["cached_bytes"] == 0
    torch.testing.assert_close(kept, chunk_route_ref(x, q, 64)[0], rtol=1e-5, atol=1e-6)
    kept.resize_(4, 1024, 4, 64)  # storage resizing goes through the cache's allocator
    assert kept.shape == (4, 1024, 4, 64)


def test_profiler_sees_cached_outputs():
    """The benchmark's peak memory comes from torch.profiler's allocation events: cached outputs must be there."""
    x, q = _inputs()
    rk.chunk_route(x, q, chunk_size=64)  # freed at once  # warm: the next call is a cache hit
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = rk.chunk_route(x, q, chunk_size=64).y
        del y
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert x.numel() * 4 in sizes and -x.numel() * 4 in sizes


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_limit_from_the_environment():
    code = """
        import torch, routing_kernels as rk
        x, q = torch.randn(2, 1024, 4, 64), torch.randn(4, 64)
        a = rk.chunk_route(x, q, chunk_size=64).y
        b = rk.chunk_route(x, q, chunk_size=64).y
        del a, b
        info = rk.cpu_cache_info()
        print(info["limit_bytes"], info["cached_bytes"])
    """
    off = _run(code, ROUTING_KERNELS_CPU_CACHE_MB="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0", "0"]
    one = _run(code, ROUTING_KERNELS_CPU_CACHE_MB="3")  # room for one 2 MB buffer: the older is dropped
    assert one.returncode == 0, one.stderr
    assert one.stdout.split() == [str(3 * MB), str(2 * MB)]
    bad = _run(code, ROUTING_KERNELS_CPU_CACHE_MB="lots")
    assert bad.returncode != 0 and "ROUTING_KERNELS_CPU_CACHE_MB" in bad.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_a_working_cache():
    # The child runs on one thread, as DataLoader workers do: libgomp cannot run parallel regions after a fork
    # (plain torch ops hang there too).
    code = """
        import os, torch, routing_kernels as rk
        x, q = torch.randn(2, 1024, 4, 64), torch.randn(4, 64)
        rk.chunk_route(x, q, chunk_size=64)  # freed at once
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)
            y = rk.chunk_route(x, q, chunk_size=64).y
            ok = rk.cpu_cache_info()["cached_bytes"] == 0 and bool(y.isfinite().all())
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
