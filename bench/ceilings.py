"""The two ceilings every result is divided by, measured in the benchmark's own process:
copy bandwidth (bytes read + written, GB/s) and dense matmul throughput (TFLOP/s).

GPU: device-to-device copy of 1 GiB bf16; bf16 8192^3 matmul on random data.
CPU: copy of 256 MiB fp32; fp32 2048^3 matmul (bf16 matmul is not the CPU's fast path).
"""
from __future__ import annotations

import time

import torch


def _bench_ms(fn, device: str) -> float:
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: str, quick: bool = False) -> dict:
    cuda = device.startswith("cuda")
    copy_bytes = (2**30 if cuda else 2**28) // (16 if quick else 1)
    dtype = torch.bfloat16 if cuda else torch.float32
    n_mm = (8192 if cuda else 2048) // (4 if quick else 1)

    src = torch.randn(copy_bytes // dtype.itemsize, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = _bench_ms(lambda: dst.copy_(src), device)
    copy_gbs = 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9
    del src, dst

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n_mm, n_mm, generator=gen, device=device).to(dtype)
    b = torch.randn(n_mm, n_mm, generator=gen, device=device).to(dtype)
    mm_ms = _bench_ms(lambda: a @ b, device)
    tflops = 2 * n_mm**3 / (mm_ms * 1e-3) / 1e12
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return {"copy_GB/s": copy_gbs, "matmul_TFLOP/s": tflops,
            "copy": f"{copy_bytes / 2**20:.0f} MiB {str(dtype)[6:]}",
            "matmul": f"{str(dtype)[6:]} {n_mm}^3"}
