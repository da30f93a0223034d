"""The CPU chunk-table kernels against the integer-chunk kernels, side by side in one process:

    python -m bench.chunk_table_cpu [--reps 25] [--threads N] [--integer-only]

Shape: B=4 sequences of 8192 tokens packed (T=32768), H=8, D=64, fp32, shared query. Providers, called through
torch.ops directly (no autograd), interleaved call by call: the integer path (chunk_size=128), a uniform table
(every chunk 128 long) and a random table (sizes uniform in [1, 255], mean 128). Modes fwd, bwd, fwd+bwd for
chunk_route and chunk_mean; median and 20/80 percentiles in ms, GB/s against the minimal traffic of
bench/cases.py (chunk_route fwd: x, query in, y, weights, summary out; bwd: x, dy, dweights, dsummary, query in,
dx, dquery out; chunk_mean: x in, means out / grad in, dx out). Then the 1000x-skewed table (a 24576-token
sequence as one chunk beside 24-token chunks) on 1 and 2 threads: the speedup shows whether both cores work.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

import routing_kernels  # noqa: F401  (loads the extension)

ops = torch.ops.routing_kernels
B, N, H, D, C = 4, 8192, 8, 64, 128
SCALE = D ** -0.5


def table(sizes_per_seq):
    bounds, firsts = [0], [0]
    for sizes in sizes_per_seq:
        for s in sizes:
            bounds.append(bounds[-1] + s)
        firsts.append(len(bounds) - 1)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return i32(bounds), i32(firsts), max(len(s) for s in sizes_per_seq)


def random_sizes(length, rng):
    sizes = []
    while sum(sizes) < length:
        sizes.append(min(rng.randint(1, 2 * C - 1), length - sum(sizes)))
    return sizes


def calls(op, x, q, cu, chunking):
    """(fwd, bwd) closures of one provider; bwd reuses the forward's weights."""
    if op == "chunk_mean":
        g = torch.randn(B, chunking[2] if isinstance(chunking, tuple) else N // C, H, D)
        if isinstance(chunking, tuple):
            return (lambda: ops.chunk_mean_table_fwd(x, *chunking)), (lambda: ops.chunk_mean_table_bwd(g, x, *chunking))
        return (lambda: ops.chunk_mean_fwd(x, C, cu, N)), (lambda: ops.chunk_mean_bwd(g, x, C, cu, N))
    if isinstance(chunking, tuple):
        fwd = lambda: ops.chunk_route_table_fwd(x, q, *chunking, SCALE)  # noqa: E731
    else:
        fwd = lambda: ops.chunk_route_fwd(x, q, C, cu, N, SCALE)  # noqa: E731
    y, w, s = fwd()
    dy, dw, ds = torch.randn_like(y), torch.zeros_like(w), torch.randn_like(s)
    if isinstance(chunking, tuple):
        return fwd, (lambda: ops.chunk_route_table_bwd(dy, dw, ds, x, q, w, *chunking, SCALE))
    return fwd, (lambda: ops.chunk_route_bwd(dy, dw, ds, x, q, w, C, cu, N, SCALE))


def traffic(op, mode, m):
    x, means, es = B * N * H * D * 4, B * m * H * D * 4, 4
    if mode == "fwd+bwd":
        return traffic(op, "fwd", m) + traffic(op, "bwd", m)
    if op == "chunk_mean":
        return x + means
    query, weights, summary = H * D * es, B * H * m * 4, B * H * D * es
    return 2 * x + query + weights + summary if mode == "fwd" else 3 * x + weights + summary + 2 * query


def timed(fn):
    """(wall ms, this thread's CPU ms). On one thread the kernels run in the calling thread, and its CPU time
    leaves out the time other processes held the core: steadier than wall time on a loaded machine."""
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3


def measure(providers, reps):
    """{(op, mode, provider): [ms]}, interleaved: every rep runs every provider once."""
    out = {}
    for op in ("chunk_route", "chunk_mean"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            fns = {}
            for name, (x, q, cu, chunking) in providers.items():
                fwd, bwd = calls(op, x, q, cu, chunking)
                fns[name] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": lambda f=fwd, b=bwd: (f(), b())}[mode]
                for _ in range(3):  # warm the output cache and the caches
                    fns[name]()
            for _ in range(reps):
                for name, fn in fns.items():
                    out.setdefault((op, mode, name), []).append(timed(fn))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--integer-only", action="store_true", help="only the integer path (to compare builds)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(B * N, H, D)
    q = torch.randn(H, D)
    cu = torch.arange(B + 1, dtype=torch.int32) * N
    rng = random.Random(0)
    uniform = table([[C] * (N // C)] * B)
    rand = table([random_sizes(N, rng) for _ in range(B)])
    providers = {"integer": (x, q, cu, None)}
    if not args.integer_only:
        providers.update({"uniform_table": (x, q, cu, uniform), "random_table": (x, q, cu, rand)})
    load0 = os.getloadavg()
    res = measure(providers, args.reps)
    load1 = os.getloadavg()
    print(f"threads {torch.get_num_threads()}, reps {args.reps}, load average before {load0[0]:.2f} "
          f"after {load1[0]:.2f}")
    one = torch.get_num_threads() == 1
    print(f"{'op':12s} {'mode':8s} {'provider':14s} {'median ms':>10s} {'p20':>7s} {'p80':>7s} {'GB/s':>6s} "
          f"{'vs int':>7s}"
          + (f" {'cpu ms':>7s} {'vs int':>7s}" if one else ""))
    med = {key: statistics.median(w for w, _ in ts) for key, ts in res.items()}
    cpu = {key: statistics.median(c for _, c in ts) for key, ts in res.items()}
    for (op, mode, name), ts in res.items():
        key, base = (op, mode, name), (op, mode, "integer")
        q20, _, _, q80 = statistics.quantiles([w for w, _ in ts], n=5)
        m = {"integer": N // C, "uniform_table": uniform[2], "random_table": rand[2]}[name]
        print(f"{op:12s} {mode:8s} {name:14s} {med[key]:10.2f} {q20:7.2f} {q80:7.2f} "
              f"{traffic(op, mode, m) / med[key] / 1e6:6.1f} {med[key] / med[base]:7.3f}"
              + (f" {cpu[key]:7.2f} {cpu[key] / cpu[base]:7.3f}" if one else ""))
    if args.integer_only:
        return
    # 1000x skew: sequence 0 is one 24576-token chunk, sequence 1 is 8192 tokens in chunks of 24 (the last 8).
    xs = torch.randn(32768, H, D)
    skew = table([[24576], [24] * 341 + [8]])
    for label, fn in (("uniform_table fwd", lambda: ops.chunk_route_table_fwd(x, q, *uniform, SCALE)),
                      ("skewed_table fwd", lambda: ops.chunk_route_table_fwd(xs, q, *skew, SCALE)),
                      ("skewed mean fwd", lambda: ops.chunk_mean_table_fwd(xs, *skew))):
        times = {}
        for threads in (1, os.cpu_count()):
            torch.set_num_threads(threads)
            for _ in range(3):
                fn()
            times[threads] = statistics.median(timed(fn)[0] for _ in range(args.reps))
        torch.set_num_threads(max(times))
        print(f"{label:18s} 1 thread {times[1]:7.2f} ms, {max(times)} threads {times[max(times)]:7.2f} ms: "
              f"speedup {times[1] / times[max(times)]:.2f}x")


if __name__ == "__main__":
    main()
