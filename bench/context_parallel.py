"""Context-parallel routed attention vs ring attention on CPU/gloo: bytes each rank sends, and time per rank.

    python bench/context_parallel.py                       # bytes at 32K..128K (2 and 4 ranks) + timing at 8K
    python bench/context_parallel.py --worlds 4 --lengths 131072 --timing-lengths ''

Not part of `python -m bench` nor of pytest (its name does not start with test_). Writes
bench/results/context_parallel_<date>.{md,json} (CPU model, load, versions).

Bytes (per rank, exact): the routed run counts what it hands to gloo (routing_kernels.distributed.count_bytes).
At the long lengths it runs only the gate and the request exchange (`plan_folded`, the real collectives)
and sizes the K/V all-to-all from the plan: the attention itself would need the reference's
Hq * L_local * L_keys memory on CPU. Where both run (the timing lengths), the report's last column checks that
the plan's K/V bytes equal the bytes the full call sent. Ring attention (plain torch.distributed: each step sends
the local K/V block to the next rank and receives the previous rank's, W - 1 steps, dense attention with an lse
merge) sends (W - 1) * local K/V bytes in the forward, counted from its sends; its backward, where K/V go
round again and dK/dV travel back, is counted as 2 (W - 1) * local K/V (a lower bound: ring-flash-attn
sends dK/dV W times).

Workloads: "random" q, k iid N(0, 1): every query head picks top_k - 1 chunks at random, so a rank's union
of picks covers nearly every eligible chunk and the exchange sends about what ring does (the worst case);
"local": q and k share a direction that drifts slowly along the sequence (per head), so queries prefer
nearby chunks, a synthetic stand-in for position-local attention (not a measured model's gate).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = dict(hq=32, hkv=8, d=128)  # the model shape (as bench/routed_decode_cpu.py); bytes only
TIMING_SHAPE = dict(hq=4, hkv=1, d=64)  # small enough for the reference attention on 2 cores


def _inputs(workload, n, rank, world, chunk, hq, hkv, d, dtype=torch.float32):
    """This rank's shard of q, k, v (contiguous layout) without building the full tensors."""
    from routing_kernels.distributed import make_plan
    index = make_plan(chunk, world, seqlen=n).token_index(rank)
    g = torch.Generator().manual_seed(1000 + rank)
    q = torch.randn(index.numel(), hq, d, generator=g)
    k = torch.randn(index.numel(), hkv, d, generator=g)
    v = torch.randn(index.numel(), hkv, d, generator=g)
    if workload == "local":
        shared = torch.Generator().manual_seed(7)  # the drifting direction: the same on every rank
        walk = torch.randn(n // 64 + 1, hkv, d, generator=shared).cumsum(0)
        u = walk / walk.norm(dim=-1, keepdim=True) * d ** 0.5  # |u|^2 = D: the gate's signal ~ D * correlation
        u = u[index // 64]
        k += u
        q += u.repeat_interleave(hq // hkv, dim=1)
    return (x.to(dtype)[None] for x in (q, k, v))


def ring_attention(q, k, v, group=None):
    """Causal dense attention of contiguous shards: K/V blocks go round the ring, partial results merge by lse.
    q (1, L, Hq, D), k/v (1, L, Hkv, D), equal L on every rank (the benchmark's lengths divide evenly)."""
    from routing_kernels.distributed.comm import _record
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    group_size = q.shape[2] // k.shape[2]
    qh = q[0].transpose(0, 1).float() * q.shape[-1] ** -0.5  # (Hq, L, D)
    out = torch.zeros(qh.shape[0], qh.shape[1], v.shape[-1])
    lse = torch.full(qh.shape[:2], float("-inf"))
    block = torch.cat([k[0], v[0]], -1).contiguous()
    d = k.shape[-1]
    for step in range(world):
        src = (rank - step) % world
        if step < world - 1:  # start passing the block on while this one is computed
            nxt = torch.empty_like(block)
            ops = [dist.P2POp(dist.isend, block, (rank + 1) % world, group),
                   dist.P2POp(dist.irecv, nxt, (rank - 1) % world, group)]
            reqs = dist.batch_isend_irecv(ops)
            _record("ring_kv", block.numel() * block.element_size())
        if src <= rank:
            kb = block[..., :d].transpose(0, 1).float().repeat_interleave(group_size, 0)
            vb = block[..., d:].transpose(0, 1).float().repeat_interleave(group_size, 0)
            s = qh @ kb.transpose(1, 2)
            if src == rank:
                s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
            blk_lse = s.logsumexp(-1)
            new_lse = torch.logaddexp(lse, blk_lse)
            part = torch.softmax(s, -1) @ vb
            out = out * (lse - new_lse).exp()[..., None] + part * (blk_lse - new_lse).exp()[..., None]
            lse = new_lse
        if step < world - 1:
            for r in reqs:
                r.wait()
            block = nxt
    return out.transpose(0, 1)[None]


def _median_s(fn, reps):
    times = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _worker(rank, world, init, jobs, out_file, chunk, top_k, reps):
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from routing_kernels.distributed import context_parallel_routed_attention, count_bytes, make_plan
    from routing_kernels.distributed.attention import fold_kv_heads, plan_folded
    rows = []
    for workload, n, timing in jobs:
        shape = TIMING_SHAPE if timing else SHAPE
        q, k, v = _inputs(workload, n, rank, world, chunk, **shape)
        kv_row = 2 * shape["d"] * q.element_size()  # the exchange moves (token, kv head) rows
        row = dict(workload=workload, tokens=n, world=world, rank=rank, chunk=chunk, top_k=top_k, **shape)
        with count_bytes() as log:
            _, ex = plan_folded(fold_kv_heads(q[0], shape["hkv"]), fold_kv_heads(k[0], shape["hkv"]),
                                make_plan(chunk, world, seqlen=n), rank, top_k, True, shape["hkv"])
        row["cp_plan_bytes"] = dict(log.bytes_sent)
        row["cp_kv_bytes_fwd"] = sum(x for r, x in enumerate(ex.send_splits) if r != rank) * kv_row
        row["cp_dkv_bytes_bwd"] = sum(x for r, x in enumerate(ex.recv_splits) if r != rank) * kv_row
        row["chunks_received"] = int(ex.requested.numel())  # (chunk, kv head) pairs
        row["ring_kv_bytes_fwd"] = (world - 1) * q.shape[1] * shape["hkv"] * kv_row
        if timing:
            with count_bytes() as log:
                ring_attention(q, k, v)
            row["ring_kv_bytes_fwd_counted"] = log.bytes_sent["ring_kv"]
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            with count_bytes() as log:
                o = context_parallel_routed_attention(qg, kg, vg, chunk, top_k, backend="reference")
                o.backward(torch.ones_like(o))
            row["cp_call_bytes"] = dict(log.bytes_sent)
            row["ring_fwd_s"] = _median_s(lambda: ring_attention(q, k, v), reps)
            row["cp_fwd_s"] = _median_s(lambda: context_parallel_routed_attention(q, k, v, chunk, top_k,
                                                                                  backend="reference"), reps)
        rows.append(row)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    dist.destroy_process_group()


def run(world, jobs, chunk, top_k, reps):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), jobs, out, chunk, top_k, reps),
                           nprocs=world, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def _cpu_model():
    import subprocess
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _markdown(rows, meta):
    lines = [f"# Context-parallel routed attention vs ring attention (CPU, gloo)", "",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "Bytes each rank sends per call (MB = 1e6 B), forward and backward. CP = routed (chunk sums, chunk-id "
             "requests, selected K/V; backward dK/dV back). Ring forward = (W-1) x local K/V; ring backward "
             "counted as 2 (W-1) x local K/V. `max` = the busiest rank, the one that sets the step time.", "",
             "| workload | tokens | W | shape | (chunk, kv head) recv (max) | CP fwd MB (max / mean) | ring fwd MB | "
             "CP/ring fwd (max rank) | CP fwd+bwd MB (max) | ring fwd+bwd MB | CP/ring fwd+bwd (max rank) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["workload"], r["tokens"], r["world"], r["hq"]) for r in rows},
                  key=lambda x: (x[3], x[0], x[2], x[1]))
    for wl, n, w, hq in keys:
        rs = [r for r in rows if (r["workload"], r["tokens"], r["world"], r["hq"]) == (wl, n, w, hq)]
        fwd = [sum(r["cp_plan_bytes"].values()) + r["cp_kv_bytes_fwd"] for r in rs]
        both = [f + r["cp_dkv_bytes_bwd"] for f, r in zip(fwd, rs)]
        ring = rs[0]["ring_kv_bytes_fwd"]
        lines.append(f"| {wl} | {n} | {w} | Hq{hq}/Hkv{rs[0]['hkv']}/D{rs[0]['d']} | "
                     f"{max(r['chunks_received'] for r in rs)} | "
                     f"{max(fwd) / 1e6:.1f} / {sum(fwd) / len(fwd) / 1e6:.1f} | "
                     f"{ring / 1e6:.1f} | {max(fwd) / ring:.3f} | {max(both) / 1e6:.1f} | {3 * ring / 1e6:.1f} | "
                     f"{max(both) / (3 * ring):.3f} |")
    timed = [r for r in rows if "cp_fwd_s" in r]
    if timed:
        lines += ["", "Time per rank, forward only (median s; the busiest rank; CP attention runs the package's "
                  "eager reference on CPU for this layout, so this is not a kernel comparison):", "",
                  "| workload | tokens | W | shape | CP fwd s | ring fwd s | CP call bytes (fwd+bwd, max) = plan? |",
                  "|---|---|---|---|---|---|---|"]
        for wl, n, w, hq in sorted({(r["workload"], r["tokens"], r["world"], r["hq"]) for r in timed}):
            rs = [r for r in timed if (r["workload"], r["tokens"], r["world"], r["hq"]) == (wl, n, w, hq)]
            call = max(sum(r["cp_call_bytes"].values()) - r["cp_call_bytes"].get("check", 0) for r in rs)
            same = all(r["cp_call_bytes"].get("kv", 0) == r["cp_kv_bytes_fwd"]
                       and r["cp_call_bytes"].get("dkv", 0) == r["cp_dkv_bytes_bwd"] for r in rs)
            lines.append(f"| {wl} | {n} | {w} | Hq{hq}/Hkv{rs[0]['hkv']}/D{rs[0]['d']} | "
                         f"{max(r['cp_fwd_s'] for r in rs):.3f} | {max(r['ring_fwd_s'] for r in rs):.3f} | "
                         f"{call / 1e6:.2f} MB, {'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--lengths", default="32768,65536,131072")
    ap.add_argument("--timing-lengths", default="8192")
    ap.add_argument("--workloads", default="random,local")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    load0, start = os.getloadavg(), time.time()
    rows = []
    for world in map(int, args.worlds.split(",")):
        workloads = args.workloads.split(",")
        lengths = [int(n) for n in args.lengths.split(",") if n]
        timing = [int(n) for n in args.timing_lengths.split(",") if n]
        jobs = [(wl, n, False) for wl in workloads for n in lengths] + [(wl, n, True) for wl in workloads for n in timing]
        rows += run(world, jobs, args.chunk, args.top_k, args.reps)
        print(f"world {world} done at {time.time() - start:.0f} s", file=sys.stderr)
    import subprocess
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": f"{_cpu_model()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "python": platform.python_version(),
            "git commit": commit, "load average (start / end)": f"{load0} / {os.getloadavg()}",
            "chunk_size / top_k / causal / layout": f"{args.chunk} / {args.top_k} / True / contiguous",
            "dtype": "fp32 (bytes scale with the element size alike for both)", "wall s": round(time.time() - start)}
    md = _markdown(rows, meta)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"context_parallel_{datetime.date.today():%Y%m%d}")
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
