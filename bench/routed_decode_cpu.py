"""Decode-step timing of the C++ CPU routed_decode_fwd against dense decode, in one process, with a copy of the same
bytes timed interleaved (the copy-bandwidth ratio of issue 8). `python -m bench --ops routed_decode` is the harness
case of the same step (bench/decode.py, whose union_sizes this script shares); this script adds the interleaved
copy ceiling and the kernel called without the public function's checks.

    python bench/routed_decode_cpu.py                      # the issue's shape: fp32, Hq=32, Hkv=8, D=128, C=512, top_k=8
    python bench/routed_decode_cpu.py --lengths 4096,65536 --batches 1 --reps 20

Per (B, cache length N): ms per decode step (median, 20/80 percentiles) of
  ours   torch.ops.routing_kernels.routed_decode_fwd (q_len 1, causal, seqused_k = N)
  sdpa   torch.nn.functional.scaled_dot_product_attention(enable_gqa=True) on (B, H, N, D) views of the cache
  gemm   dense decode with two batched GEMMs on the same views (q K^T, softmax, P V): a bandwidth-bound baseline
and ours' GB/s over the bytes a step must read: q, the valid chunk sums, the K/V rows of the union of the kv group's
selections (computed here from the same gate), plus o. The ceiling is a plain tensor copy of as many bytes, timed
interleaved with ours (read + write bytes / time), plus one 512 MB copy before and after. Before every timed call
1 GB is read (not timed) so that it starts from DRAM (--no-flush: warm caches). The CPU is shared: every figure is
a median of interleaved repetitions. Run with THP_MEM_ALLOC_ENABLE=1 for a cache on huge pages.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import routing_kernels  # noqa: F401  loads torch.ops.routing_kernels

try:
    from bench.decode import chunk_sums, union_sizes
except ImportError:  # run as a script from bench/: python bench/routed_decode_cpu.py
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.decode import chunk_sums, union_sizes


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def timed(fn, reps, warmup=2, flush=True):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if flush:
            flush_caches()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return statistics.median(ts), ts[int(0.2 * (len(ts) - 1))], ts[int(0.8 * (len(ts) - 1))]


_FLUSH = None


def flush_caches():
    """Read 1 GB (twice this machine's 480 MB L3) so that the next call reads from DRAM: a 16K-token layer's K/V
    (128 MB) would otherwise stay in L3 across repetitions, which a model with many layers never sees."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(2**28)
    _FLUSH.sum()


def interleaved(fns, reps, warmup=2, flush=True):
    """Median, p20, p80 of each fn, the fns called in turn each repetition (caches flushed before each call)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, ts):
            if flush:
                flush_caches()
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    out = []
    for t in ts:
        t.sort()
        out.append((statistics.median(t), t[int(0.2 * (len(t) - 1))], t[int(0.8 * (len(t) - 1))]))
    return out


def copy_gbs(mb=512, reps=10):
    src = torch.randn(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    med, _, _ = timed(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / med / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,16384,65536,131072")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dense-reps", type=int, default=3)
    ap.add_argument("--no-flush", action="store_true", help="keep caches warm between repetitions")
    ap.add_argument("--grouped-q", action="store_true",
                    help="the G query heads of a kv group share one q (+1%% noise): union = top_k")
    args = ap.parse_args()
    ops = torch.ops.routing_kernels
    hq, hkv, d, c, k_top = args.hq, args.hkv, args.dim, args.chunk, args.top_k
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    copy_before = copy_gbs()
    print(f"copy bandwidth (read+write): {copy_before:.1f} GB/s")
    rows = []
    for b in map(int, args.batches.split(",")):
        for n in map(int, args.lengths.split(",")):
            g = torch.Generator().manual_seed(n + b)
            k = torch.randn(b, n, hkv, d, generator=g)
            v = torch.randn(b, n, hkv, d, generator=g)
            if args.grouped_q:
                base = torch.randn(b, 1, hkv, 1, d, generator=g)
                q = (base + 0.01 * torch.randn(b, 1, hkv, hq // hkv, d, generator=g)).reshape(b, 1, hq, d)
            else:
                q = torch.randn(b, 1, hq, d, generator=g)
            m = -(-n // c)
            key_sums = chunk_sums(k, c)
            used = torch.full((b,), n, dtype=torch.int32)
            scale = d ** -0.5
            union = union_sizes(q, key_sums, n, c, k_top)
            need = (q.numel() * 4 + b * m * hkv * d * 4 + int(union.sum()) * c * 2 * d * 4 + b * hq * d * 4)

            def ours():
                return ops.routed_decode_fwd(q, k, v, key_sums, used, c, k_top, True, scale)

            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D) views

            def sdpa():
                return F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True)

            qg = q.view(b, hkv, hq // hkv, d)  # q_len 1: (B, Hkv, G, D)

            def gemm():
                s = torch.matmul(qg, kt.transpose(-1, -2)) * scale  # (B, Hkv, G, N)
                return torch.matmul(torch.softmax(s, -1), vt).view(b, hq, 1, -1)

            with torch.no_grad():
                if n <= 16384:  # the dense oracle of top_k >= chunks, and a sanity check of both baselines
                    ref = sdpa()
                    torch.testing.assert_close(gemm(), ref, rtol=1e-4, atol=1e-4)
                    if k_top >= m:
                        torch.testing.assert_close(ours()[0], ref.transpose(1, 2), rtol=1e-4, atol=1e-4)
                # ours interleaved with a copy of the same byte count (read + write = 2x), so both see the same
                # share of this shared machine; the ratio of their GB/s is the figure that travels.
                src = torch.empty(need // 4)
                src.normal_()
                dst = torch.empty_like(src)
                t_ours, t_copy = interleaved([ours, lambda: dst.copy_(src)], args.reps, warmup=3,
                                             flush=not args.no_flush)
                del src, dst
                t_gemm = timed(gemm, args.dense_reps, warmup=1, flush=not args.no_flush)
                t_sdpa = timed(sdpa, args.dense_reps, warmup=1, flush=not args.no_flush)
            row = dict(B=b, N=n, union=union.float().mean().item(), union_max=int(union.max()), chunks=m,
                       ours_ms=t_ours[0] * 1e3, ours_p20=t_ours[1] * 1e3, ours_p80=t_ours[2] * 1e3,
                       need_mb=need / 2**20, gbs=need / t_ours[0] / 1e9, sdpa_ms=t_sdpa[0] * 1e3,
                       gemm_ms=t_gemm[0] * 1e3, copy_gbs=2 * need / t_copy[0] / 1e9)
            rows.append(row)
            print(f"B={b} N={n:6d} union {row['union']:.1f}/{m} (max {row['union_max']}) "
                  f"ours {row['ours_ms']:.2f} ms [{row['ours_p20']:.2f}, {row['ours_p80']:.2f}] "
                  f"{row['need_mb']:.0f} MB -> {row['gbs']:.1f} GB/s (copy {row['copy_gbs']:.1f}) | sdpa {row['sdpa_ms']:.1f} ms "
                  f"(x{row['sdpa_ms'] / row['ours_ms']:.1f}) | gemm {row['gemm_ms']:.1f} ms "
                  f"(x{row['gemm_ms'] / row['ours_ms']:.1f})", flush=True)
            del k, v, kt, vt, key_sums
    copy_after = copy_gbs()
    print(f"copy bandwidth (read+write) after: {copy_after:.1f} GB/s")
    print("\n| B | N | union/chunks | ours ms (p20-p80) | GB/s needed | copy GB/s | % copy | sdpa ms | x | gemm ms | x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['N'] // 1024}K | {r['union']:.1f}/{r['chunks']} | {r['ours_ms']:.2f} "
              f"({r['ours_p20']:.2f}-{r['ours_p80']:.2f}) | {r['gbs']:.1f} | {r['copy_gbs']:.1f} | "
              f"{100 * r['gbs'] / r['copy_gbs']:.0f}% | "
              f"{r['sdpa_ms']:.1f} | {r['sdpa_ms'] / r['ours_ms']:.1f} | {r['gemm_ms']:.1f} | "
              f"{r['gemm_ms'] / r['ours_ms']:.1f} |")


if __name__ == "__main__":
    main()
