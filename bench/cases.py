"""Benchmark cases, defined once for the CLI harness and the pytest-benchmark suite.

A Case knows its inputs, how to call an op on them, which outputs to backpropagate, and how much
work the op must do at minimum (bytes or FLOPs), so every provider is scored against the same count.

Traffic conventions (GB/s ops), with X = B*N*H*D*itemsize, Y = B*M*H*D*itemsize, M = ceil(N/C):
  chunk_mean  fwd: read x + write means              = X + Y
              bwd: read dy + write dx                = Y + X   (the mean is linear: dx needs no x)
  chunk_route fwd: read x, query + write y, weights (fp32), summary
              bwd: read x, dy, dweights, dsummary, query + write dx, dquery
                   (x is needed again: d(weights)/dx depends on the chunk means of x)
  route_chunks fwd: read q, k + write the int32 indices (B, N, Hq, top_k)
  routed_decode fwd: one decode step (q_len 1) against a cache of N tokens: read q, the fp32 chunk key sums, the
                   K/V rows of the chunks the kv groups select (their union) + write o; provider "append": one
                   token per sequence appended (bench/decode.py)
  fwd+bwd = fwd + bwd: each pass moves its own bytes.
  cu_chunks cases (dynamic chunking) are scored with the same formulas, M = N / C (C the mean chunk size).
FLOP convention (routed_attention, TFLOP/s): 2*D (q.k) + 2*Dv (p.v) per (query, key) pair that the
selection and the causal mask allow; D == Dv here, so 4*D per pair. Routing scores (q against chunk
means) are not counted. Backward = 2.5 x forward (FlashAttention's convention: 5 matmuls vs 2);
fwd+bwd = 3.5 x forward.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
OPS = ("chunk_mean", "chunk_route", "route_chunks", "routed_attention", "routed_decode")
ATTENTION_OPS = ("route_chunks", "routed_attention", "routed_decode")


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    B: int
    N: int
    H: int  # heads of x (chunk ops) or of q (attention ops)
    D: int
    chunk: int
    dtype: torch.dtype
    device: str
    hkv: Optional[int] = None  # k/v heads (attention ops)
    top_k: Optional[int] = None
    # providers this case is sized away from, with the reason: ((provider, reason), ...). Such pairs get a
    # row with status "n/a" and the reason, never a silent gap (e.g. the O(N^2) eager reference at 16K)
    sized_away: tuple = ()
    # dynamic chunking (chunk ops): None = the integer chunk_size path; "uniform" = the same chunks given as an
    # explicit cu_chunks table; "random" = chunk sizes drawn uniformly in [1, 2*chunk-1] (mean ~chunk)
    chunking: Optional[str] = None

    # ---- description -------------------------------------------------------------------------
    @property
    def shape(self) -> str:
        if self.op in ATTENTION_OPS:
            return (f"B={self.B} N={self.N} Hq={self.H} Hkv={self.hkv} D={self.D} "
                    f"C={self.chunk} k={self.top_k}")
        table = f" cu_chunks={self.chunking}" if self.chunking else ""
        return f"B={self.B} N={self.N} H={self.H} D={self.D} C={self.chunk}{table}"

    @property
    def family(self) -> str:
        """The shape without N and B: the points of one line in a plot (B shrinks with N on the GPU)."""
        return " ".join(t for t in self.shape.split() if not t.startswith(("N=", "B=")))

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def modes(self) -> tuple:
        return ("fwd",) if self.op in ("route_chunks", "routed_decode") else MODES

    @property
    def M(self) -> int:
        return math.ceil(self.N / self.chunk)

    # ---- calling -----------------------------------------------------------------------------
    def make_inputs(self, seed: int = 0) -> tuple:
        """Random (never zero) inputs; float leaves require grad when the op has a backward."""
        if self.op == "routed_decode":
            from . import decode
            return decode.make_inputs(self, seed)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        grad = self.op != "route_chunks"

        def rand(*shape):
            t = torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32)
            return t.to(self.dtype).requires_grad_(grad)

        if self.op == "chunk_mean":
            return (rand(self.B, self.N, self.H, self.D),)
        if self.op == "chunk_route":
            return rand(self.B, self.N, self.H, self.D), rand(self.H, self.D)
        q = rand(self.B, self.N, self.H, self.D)
        k = rand(self.B, self.N, self.hkv, self.D)
        if self.op == "route_chunks":
            return q, k
        return q, k, rand(self.B, self.N, self.hkv, self.D)

    def call_kwargs(self) -> dict:
        """Keyword arguments shared by the public function and its eager reference."""
        if self.op in ATTENTION_OPS:
            return {"chunk_size": self.chunk, "top_k": self.top_k, "causal": True}
        if self.chunking:
            cu_chunks, max_chunks = self.chunk_table()
            return {"cu_chunks": cu_chunks, "max_chunks": max_chunks}
        return {"chunk_size": self.chunk}

    def chunk_table(self) -> tuple:
        """(cu_chunks, max_chunks) of a dynamic-chunking case over the dense batch read as packed tokens."""
        from routing_kernels import chunk_boundaries

        if self.chunking == "uniform":
            return chunk_boundaries(batch=self.B, seqlen=self.N, chunk_size=self.chunk, device=self.device)
        gen = torch.Generator().manual_seed(1234)
        bounds, most = [0], 0
        for b in range(self.B):
            sizes = torch.randint(1, 2 * self.chunk, (self.N,), generator=gen).tolist()
            cuts = [a for a in itertools.accumulate(sizes) if a < self.N] + [self.N]
            bounds += [b * self.N + a for a in cuts]
            most = max(most, len(cuts))
        return torch.tensor(bounds, dtype=torch.int32, device=self.device), most

    def pick_outputs(self, out) -> tuple:
        """The tensors a benchmark keeps and backpropagates: all of chunk_route's outputs,
        only `o` of routed_attention (the reference also returns lse; the public call does not)."""
        if self.op == "chunk_route":
            return tuple(out)[:3]
        if isinstance(out, (tuple, list)):
            return (out[0],)
        return (out,)

    # ---- work --------------------------------------------------------------------------------
    def bytes_moved(self, mode: str, provider: Optional[str] = None) -> float:
        if self.op == "routed_decode":
            from . import decode
            return decode.append_bytes(self) if provider == "append" else decode.bytes_needed(self)
        if mode == "fwd+bwd":
            return self.bytes_moved("fwd") + self.bytes_moved("bwd")
        es = torch.empty((), dtype=self.dtype).element_size()
        B, N, H, D, M = self.B, self.N, self.H, self.D, self.M
        x, means = B * N * H * D * es, B * M * H * D * es
        if self.op == "chunk_mean":
            return float(x + means)  # fwd: x in, means out; bwd: dy in, dx out
        if self.op == "chunk_route":
            query, weights, summary = H * D * es, B * H * M * 4, B * H * D * es
            if mode == "fwd":
                return float(x + query + x + weights + summary)
            return float(2 * x + weights + summary + query + x + query)
        if self.op == "route_chunks":
            return float(x + B * N * self.hkv * D * es + B * N * H * self.top_k * 4)
        raise ValueError(f"{self.op} is scored in FLOPs")

    def allowed_pairs(self) -> int:
        """(query, key) pairs per (batch, head) that routed attention must score, assuming the
        router picks min(top_k, chunks available) distinct chunks and always the query's own."""
        C, total = self.chunk, 0
        for j in range(self.M):
            L = min(C, self.N - j * C)  # queries in chunk j
            # earlier chunks are full; the own chunk is causal: query i sees i - j*C + 1 keys
            total += L * (min(self.top_k, j + 1) - 1) * C + L * (L + 1) // 2
        return total

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.D * self.allowed_pairs() * self.B * self.H
        return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]

    def work(self, mode: str, provider: Optional[str] = None) -> float:
        """What throughput divides by: FLOPs (routed_attention) or bytes (routed_decode: per provider, see
        bench/decode.py)."""
        return self.flops(mode) if self.op == "routed_attention" else self.bytes_moved(mode, provider)

    @property
    def throughput_unit(self) -> str:
        return "TFLOP/s" if self.op == "routed_attention" else "GB/s"

    def throughput(self, mode: str, ms: float, provider: Optional[str] = None) -> float:
        if not (ms > 0) or math.isinf(ms):
            return float("nan")
        return self.work(mode, provider) / (ms * 1e-3) / (1e12 if self.op == "routed_attention" else 1e9)


def _scores_gb(b, hq, n) -> float:
    """GB of one (B, Hq, N, N) fp32 score tensor, which the eager reference materialises."""
    return b * hq * n * n * 4 / 1e9


def _reference_too_big(b, hq, n) -> tuple:
    reason = f"eager reference materialises (B, Hq, N, N) fp32 scores: {_scores_gb(b, hq, n):.1f} GB"
    return (("eager", reason), ("compile", reason))


def default_cases(device: str, quick: bool = False, full: bool = False) -> list:
    """The benchmark matrix for a device ("cpu" or "cuda"). CPU: the default fits 5 minutes on a 2-core
    VM; full=True is the long matrix (~25 minutes there). GPU: one matrix (gpu_check.sh budgets it)."""
    cuda = device.startswith("cuda")
    if quick:  # seconds-long smoke run
        dt = torch.bfloat16 if cuda else torch.float32
        chunk = [Case(op, 2, 256, 2, 16, 64, dt, device) for op in ("chunk_mean", "chunk_route")]
        chunk.append(Case("chunk_route", 2, 256, 2, 16, 64, dt, device, chunking="random"))
        attn = [Case(op, 1, 256, 4, 16, 64, dt, device, hkv=2, top_k=2) for op in ATTENTION_OPS]
        return chunk + attn  # routed_decode's quick case: N=256, chunk 64, top_k 2 (decode.make_inputs)
    if not cuda:
        return _cpu_cases(device, full)
    chunk = []
    for op in ("chunk_mean", "chunk_route"):
        for n in (1024, 4096, 16384, 65536, 131072):
            b = max(4, min(8, 2**30 // (n * 16 * 128)))  # B*N*H*D <= ~2^30 elements (2 GiB bf16)
            chunk.append(Case(op, b, n, 16, 128, 128, torch.bfloat16, device))
    # eager attention scores at N=16K: 32 * 16K^2 fp32 = 34 GB per tensor; none beyond that
    attn = [Case(op, 1, n, 32, 128, 1024, torch.bfloat16, device, hkv=8, top_k=8,
                 sized_away=() if op == "route_chunks" or n <= 16384 else _reference_too_big(1, 32, n))
            for op in ("route_chunks", "routed_attention") for n in (4096, 8192, 16384, 65536, 131072, 262144)]
    # the other chunk sizes and top_k of the issue, at one length
    attn += [Case("routed_attention", 1, 32768, 32, 128, chunk, torch.bfloat16, device, hkv=8, top_k=top_k,
                  sized_away=_reference_too_big(1, 32, 32768))
             for chunk in (512, 1024, 2048) for top_k in (4, 8) if (chunk, top_k) != (1024, 8)]
    return chunk + attn + decode_cases(device, full=True)


_REF_DECODE = ("eager reference of a decode step: measured at N=4096 only (--full), ~2 s per call at 16K on 2 "
               "cores (it scores every key of the cache)")


def decode_cases(device: str, full: bool) -> list:
    """routed_decode: Hq=32, Hkv=8, D=128, chunk 512, top_k 8, the cache length as N. The default CPU run takes
    B=1 at 16K and 64K (~15 CPU s, measured at load 12); full: B=1 and 4 at 4K..128K. On the GPU bf16 (the decode kernels are Triton)."""
    cuda = device.startswith("cuda")
    dt = torch.bfloat16 if cuda else torch.float32
    shapes = [(b, n) for b in (1, 4) for n in (4096, 16384, 65536, 131072)] if full else [(1, 16384), (1, 65536)]
    out = []
    for b, n in shapes:
        away = (("eager", _REF_DECODE),) if n > 4096 else ()
        out.append(Case("routed_decode", b, n, 32, 128, 512, dt, device, hkv=8, top_k=8, sized_away=away))
    return out


# FlexAttention on CPU, measured on the 2-core VM (torch 2.14.1, B=1 Hq=8 D=64 C=512 top_k=4): the routed
# selection is per token, so the union of the chunks picked by a 512-query block covers nearly every earlier
# chunk (16.3 of 16.5 causal blocks per row at 16K): flex does dense causal work plus a per-element mask_mod,
# 1.4 s per call at 4K and ~28 s at 16K (dense SDPA: 0.12 s / 1.9 s), plus ~35 s of compilation per case.
_FLEX_CPU_16K = "FlexAttention on CPU: ~28 s per call at N=16384 (per-token routing makes its block mask dense); --full runs it"
_FLEX_CPU_MHA = "FlexAttention on CPU: ~20 s of compilation + 1.4-3 s per call per case; the default runs the GQA case; --full runs it"
# At N <= 1024 (C=512, top_k=4) routing covers every chunk: ours runs dense SDPA, and flex adds ~20 s of compilation
_FLEX_CPU_DENSE = "FlexAttention on CPU: ~20 s of compilation per case; at N <= 2 chunks routing covers everything (ours = dense SDPA); --full runs it"
# Dense SDPA's backward alone at 16K: ~6 s per call on an idle 2-core EPYC (36 s per measurement); its fwd and
# fwd+bwd rows (a training step) are measured, and bwd ~ fwd+bwd - fwd.
_SDPA_CPU_BWD_16K = "dense SDPA backward alone at N=16384: ~6 s per call on CPU; its fwd and fwd+bwd are measured; --full runs it"
# Dense SDPA does the same work for GQA 8:2 as for MHA; its fwd+bwd at 16K (~10 s per call, 50 s per measurement
# on an idle 2-core EPYC) is measured once, on the MHA case, so that the default run fits 5 minutes.
_SDPA_CPU_GQA_16K = "dense SDPA training step at N=16384: ~10 s per call on CPU, the same work as MHA (see the Hkv=8 row); --full runs it"
# Only our kernel at 64K: the peak memory of the CPU backward (bounded workspace) is what this row is for; dense
# SDPA would take ~35 s (fwd) to ~2 min (fwd+bwd) per call there.
_SDPA_CPU_64K = "dense SDPA at N=65536 on CPU: ~35 s (fwd) to ~2 min (fwd+bwd) per call; this row reports our time and peak memory"
# The eager reference of routed_attention at 4K costs 3.5 s (fwd) to 8 s (fwd+bwd) per call here: 6 of the
# default run's 8 minutes for one column that dense SDPA beats 30x. --full measures it.
_REF_CPU_4K = "eager reference of routed_attention: 3.5-8 s per call at N=4096 on CPU; --full runs it"


# torch.compile on 2 cores: 15-25 s of compilation per case and mode (fwd, then bwd; fwd+bwd reuses bwd's).
_COMPILE_CPU = "torch.compile: 15-25 s of compilation per case and mode on CPU; the default compiles the largest N only; --full runs it"


def _cpu_cases(device: str, full: bool) -> list:
    """The issue's "H=8" read both ways: MHA (Hkv=8) and GQA 8:2. Target case: chunk_route B=4, N=8192,
    H=8, D=64, C=128, fp32."""
    lengths = {"chunk_mean": (1024, 8192), "chunk_route": (1024, 8192),
               "route_chunks": (4096, 16384), "routed_attention": (256, 1024, 4096, 16384)}
    if full:  # the peak memory of the CPU backward at 64K (its workspace is bounded, whatever N)
        lengths["routed_attention"] += (65536,)

    def sized_away(op, n, hkv=None) -> tuple:
        away = {}
        if op == "routed_attention" and n > 4096:  # memory: 8.6 GB of scores at 16K, on every run
            away.update(_reference_too_big(1, 8, n))
        if op == "routed_attention" and n > 16384:
            away.update(sdpa=_SDPA_CPU_64K, flex=_SDPA_CPU_64K)
        if not full:  # time: the default run fits 5 minutes
            if op == "routed_attention":
                away.setdefault("eager", _REF_CPU_4K)
                away.setdefault("compile", _REF_CPU_4K)
                if n > 4096:
                    away["flex"] = _FLEX_CPU_16K
                    away["sdpa:bwd"] = _SDPA_CPU_BWD_16K
                    if hkv != 8:
                        away["sdpa:fwd+bwd"] = _SDPA_CPU_GQA_16K
                elif hkv == 8:
                    away["flex"] = _FLEX_CPU_MHA
                elif n < 4096:
                    away["flex"] = _FLEX_CPU_DENSE
            elif n < max(lengths[op]):
                away["compile"] = _COMPILE_CPU
        return tuple(away.items())

    chunk = [Case(op, 4, n, 8, 64, 128, torch.float32, device, sized_away=sized_away(op, n))
             for op in ("chunk_mean", "chunk_route") for n in lengths[op]]
    # dynamic chunking on the target shape: the integer path's chunks as a table, and random chunk sizes
    chunk += [Case("chunk_route", 4, 8192, 8, 64, 128, torch.float32, device, chunking=chunking,
                   sized_away=() if full else (("compile", _COMPILE_CPU),)) for chunking in ("uniform", "random")]
    attn = [Case(op, 1, n, 8, 64, 512, torch.float32, device, hkv=hkv, top_k=4, sized_away=sized_away(op, n, hkv))
            for op in ("route_chunks", "routed_attention") for n in lengths[op]
            for hkv in (8, 2)]  # a time budget cuts the long N
    return chunk + attn + decode_cases(device, full)
