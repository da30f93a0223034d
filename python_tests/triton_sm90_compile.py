"""Compile every Triton kernel of the package for sm_90 (H100/H200) without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: a construct the compiler rejects (a loop-carried
value that changes type, an unsupported op, a bf16 path the interpreter cannot run) passes the CPU tests and
fails on the first GPU. This script calls the real launchers on CPU tensors with JITFunction.run replaced by an
ahead-of-time compile for GPUTarget("cuda", 90, 32): the launch arguments are specialized by the JIT's own binder
(argument types, ints equal to 1 as constants, divisible-by-16 hints of ints and aligned pointers), so these are
the variants a GPU compiles for the same arguments; the compile goes through TTIR, TTGIR, LLVM IR, PTX and ptxas,
and nothing is launched.

Run it in a process WITHOUT TRITON_INTERPRET (python_tests/test_triton_sm90_compile.py does). It prints one
line per compiled (kernel, signature) and exits 1 if any compile failed. With `--report DIR` it also compiles the
variants the launchers pick at the GPU benchmark shapes and writes the resource report of bench/resources.py
(registers, spills, shared memory, occupancy; sm_80/86 too) into DIR, reusing this one compile pass.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import traceback
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")

# Every @triton.jit kernel of the package: each must be reached by the launcher calls below.
EXPECTED_KERNELS = {"chunk_reduce_kernel", "chunk_mean_backward_kernel", "softmax_summary_kernel",
                    "softmax_backward_kernel", "chunk_scale_kernel", "route_select_kernel", "routed_fwd_kernel",
                    "routed_bwd_dq_kernel", "mark_tiles_kernel", "routed_bwd_dkv_kernel"}

from triton_sm90_decode import DECODE_KERNELS, decode_cases  # noqa: E402  the decode kernels' own cases

EXPECTED_KERNELS = EXPECTED_KERNELS | DECODE_KERNELS

# Constexpr branches that must each be compiled at least once: (kernel, constexpr) -> values.
EXPECTED_BRANCHES = {("route_select_kernel", "CAUSAL"): {True, False},
                     ("route_select_kernel", "SEPARATE_KEYS"): {True, False},  # chunked prefill: q shorter than k
                     ("routed_fwd_kernel", "SEPARATE_KEYS"): {True, False},
                     ("routed_bwd_dkv_kernel", "CAUSAL"): {True, False},
                     ("routed_bwd_dkv_kernel", "BLOCK_F"): {4, 128},  # one flag block per chunk / several
                     ("routed_fwd_kernel", "PACK"): {1, 2, 4},
                     ("chunk_reduce_kernel", "HAS_DY"): {True, False},
                     ("chunk_scale_kernel", "IS_BACKWARD"): {True, False},
                     # integer chunks and a chunk table (dynamic chunking, the triton_table.py launchers)
                     ("chunk_reduce_kernel", "IS_TABLE"): {True, False},
                     ("chunk_mean_backward_kernel", "IS_TABLE"): {True, False},
                     ("chunk_scale_kernel", "IS_TABLE"): {True, False},
                     ("softmax_summary_kernel", "IS_TABLE"): {True, False}}

compiled: dict = {}  # (kernel, signature, constexprs) -> None (ok) or an error string
# For the resource report: key -> dict(fn, signature, constexprs, options, kernel, ptxas_log) of each compiled
# variant, and key -> the launch groups that reached it ("check": _cases, "bench": the benchmark shapes).
variants: dict = {}
groups: dict = {}
_group = ["check"]


def compile_with_log(src, options, target=TARGET):
    """triton.compile, keeping ptxas -v's log (spill bytes); the log is empty when the kernel came from the cache."""
    knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of each ptxas run
    with contextlib.redirect_stdout(io.StringIO()) as log:
        kernel = triton_compile(src, target=target, options=options)
    return kernel, log.getvalue()


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def _plain_signature(fn, args, kwargs):
    """Signature and constexprs from the argument values alone (ints equal to 1 become constants, as in the JIT;
    no divisibility hints): the fallback where the JIT's binder below is not available."""
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature, constexprs = {}, {}
    for param in fn.params:
        value = bound[param.name] if param.name in bound else param.default
        one = isinstance(value, int) and not isinstance(value, bool) and value == 1 and not param.do_not_specialize
        if param.is_constexpr or one:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = _arg_type(value)
    return signature, constexprs, {}


def _jit_signature(fn, args, kwargs):
    """The JIT's own specialization of a launch (JITFunction.run, triton 3.8): argument types, ints equal to 1 as
    constants, and the divisible-by-16 hints (tt.divisibility) of ints and 16-byte aligned pointers, which decide
    whether loads vectorize and so change registers and spills. Returns (signature, constexprs by name, attrs)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(TARGET)
    if getattr(fn, "_aot_binder", None) is None:
        fn._aot_binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = fn._aot_binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, None)
    return signature, {fn.arg_names[path[0]]: value for path, value in constexprs.items()}, attrs


def _aot_run(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: compile for sm_90 with the launch's arguments, launch nothing."""
    try:
        signature, constexprs, attrs = _jit_signature(self, args, kwargs)
    except (ImportError, AttributeError, TypeError, ValueError):  # another triton: no hints, close relatives
        signature, constexprs, attrs = _plain_signature(self, args, kwargs)
    options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
    aligned = tuple(sorted(self.arg_names[path[0]] for path, attr in attrs.items() if attr))
    key = (self.__name__, (tuple(signature.items()), aligned), tuple(sorted(constexprs.items(), key=str)))
    groups.setdefault(key, set()).add(_group[0])
    if key in compiled:
        return None
    try:
        kernel, log = compile_with_log(ASTSource(self, signature, constexprs, attrs), options)
        compiled[key] = None
        variants[key] = dict(fn=self, signature=signature, constexprs=constexprs, attrs=attrs, options=options,
                             kernel=kernel, ptxas_log=log)
        print(f"ok   {self.__name__} {_short(signature, constexprs)}", flush=True)
    except Exception as error:  # noqa: BLE001 - collect every failure, report at the end
        compiled[key] = f"{type(error).__name__}: {error}"
        print(f"FAIL {self.__name__} {_short(signature, constexprs)}\n{traceback.format_exc()}", flush=True)
    return None


def _short(signature, constexprs) -> str:
    pointers = sorted({t for t in signature.values() if t.startswith("*")})
    return f"{','.join(pointers)} {constexprs}"


def _cases():
    """Launcher calls covering every kernel, dtype path and constexpr branch the GPU will see."""
    from routing_kernels.ops.chunk_mean.triton import chunk_mean_bwd, chunk_mean_fwd
    from routing_kernels.ops.chunk_route.triton import chunk_route_bwd, chunk_route_fwd
    from routing_kernels.ops.route_chunks.triton import route_chunks_triton
    from routing_kernels.ops.routed_attention import triton as ra

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # chunk_mean / chunk_route: dense and varlen, head dims 64 and 100 (padded to 128)
        for d in (64, 100):
            x = torch.randn(2, 40, 2, d, generator=g).to(dtype)
            query = torch.randn(2, d, generator=g).to(dtype)
            cu = torch.tensor([0, 17, 17, 80], dtype=torch.int32)
            for layout in ((x, None, None), (x.reshape(80, 2, d), cu, 63)):
                yield lambda a=layout: _chunk_mean(chunk_mean_fwd, chunk_mean_bwd, *a)
                yield lambda a=layout, q=query: _chunk_route(chunk_route_fwd, chunk_route_bwd, q, *a)
            if d == 64 or dtype == torch.bfloat16:  # chunk table (dynamic chunking)
                yield lambda x=x.reshape(80, 2, d), q=query: _chunk_table(x, q)
        # route_chunks / routed_attention: MHA and GQA groups 2 and 4 (head packing 1, 2, 4), D = 64 and 128
        for hq, hkv, d in ((4, 4, 64), (4, 2, 128), (8, 2, 64), (8, 2, 128)):
            q = torch.randn(1, 48, hq, d, generator=g).to(dtype)
            k = torch.randn(1, 48, hkv, d, generator=g).to(dtype)
            v = torch.randn(1, 48, hkv, d, generator=g).to(dtype)
            for causal in (True, False):
                yield lambda q=q, k=k, c=causal: route_chunks_triton(q, k, 16, 3, c)
                yield lambda q=q, k=k, v=v, c=causal: _attention(ra, q, k, v, c)
        # varlen with a sequence past 2K tokens (> 128 query tiles: the dK/dV flag scan at BLOCK_F = 128, several
        # flag blocks per chunk) beside an empty and a short one; and a top_k past the number of chunks
        cu = torch.tensor([0, 2100, 2100, 2137], dtype=torch.int32)
        q = torch.randn(2137, 4, 64, generator=g).to(dtype)
        k = torch.randn(2137, 2, 64, generator=g).to(dtype)
        v = torch.randn(2137, 2, 64, generator=g).to(dtype)
        for causal in (True, False):
            yield lambda q=q, k=k, v=v, c=causal, cu=cu: _attention(ra, q, k, v, c, cu, 2100, chunk_size=64)
        yield lambda q=q, k=k, cu=cu: route_chunks_triton(q, k, 512, 1000, True, cu, 2100)
        # chunked prefill (SEPARATE_KEYS): dense 20 queries against 48 keys, packed q against keys with their own
        # offsets (the forward only: the backward of these layouts is the reference's)
        k2, v2 = k, v  # the 2137 packed keys above, offsets cu
        q, k, v = (torch.randn(1, n, h, 64, generator=g).to(dtype) for n, h in ((20, 4), (48, 2), (48, 2)))
        cu_q, cu_k = torch.tensor([0, 20, 20, 37], dtype=torch.int32), cu
        qv = torch.randn(37, 4, 64, generator=g).to(dtype)
        for causal in (True, False):
            yield lambda q=q, k=k, c=causal: route_chunks_triton(q, k, 16, 3, c)
            yield lambda q=q, k=k, v=v, c=causal: ra.routed_attention_fwd_triton(q, k, v, 16, 3, c)
            yield lambda q=qv, k=k2, v=v2, c=causal, cu_q=cu_q, cu_k=cu_k: ra.routed_attention_fwd_triton(
                q, k, v, 64, 3, c, cu_q, 20, None, cu_seqlens_k=cu_k, max_seqlen_k=2100)


def _chunk_mean(fwd, bwd, x, cu, max_seqlen):
    means, _ = fwd(x, 8, cu, max_seqlen)
    bwd(torch.randn(means.shape).to(x.dtype), x, 8, cu, max_seqlen)


def _chunk_route(fwd, bwd, query, x, cu, max_seqlen):
    y, weights, summary = fwd(x, query, 8, cu, max_seqlen, 0.125)
    bwd(torch.randn_like(y), torch.randn_like(weights), torch.randn_like(summary), x, query, weights, 8, cu,
        max_seqlen, 0.125)


def _chunk_table(x, query):
    from routing_kernels.ops.chunk_mean.triton_table import chunk_mean_table_bwd, chunk_mean_table_fwd
    from routing_kernels.ops.chunk_route.triton_table import chunk_route_table_bwd, chunk_route_table_fwd

    table = (torch.tensor([0, 5, 17, 40, 41, 80], dtype=torch.int32),  # chunks of 5..39 tokens
             torch.tensor([0, 2, 2, 5], dtype=torch.int32), 3)  # sequences of 2, 0 and 3 chunks
    means = chunk_mean_table_fwd(x, *table)
    chunk_mean_table_bwd(torch.randn(means.shape).to(x.dtype), x, *table)
    y, weights, summary = chunk_route_table_fwd(x, query, *table, 0.125)
    chunk_route_table_bwd(torch.randn_like(y), torch.randn_like(weights), torch.randn_like(summary), x, query, weights,
                          *table, 0.125)


def _attention(ra, q, k, v, causal, cu=None, max_seqlen=None, chunk_size=16):
    o, lse = ra.routed_attention_fwd_triton(q, k, v, chunk_size, 3, causal, cu, max_seqlen)
    ra.routed_attention_bwd_triton(torch.randn_like(o), torch.randn_like(lse), q, k, v, o, lse, chunk_size, 3, causal,
                                   cu, max_seqlen)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, help="also write the resource report (bench/resources.py) here")
    parser.add_argument("--report-stem", default="resources", help="report file names: STEM.json, STEM.md")
    args = parser.parse_args(argv)
    JITFunction.run = _aot_run
    for call in _cases():
        call()
    for call in decode_cases():
        call()
    if args.report:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: bench/ is not installed
        from bench import resources

        _group[0] = "bench"
        for call in resources.bench_launches():
            call()
    names = {name for name, _, _ in compiled}
    missing = sorted(EXPECTED_KERNELS - names)
    failed = {k: v for k, v in compiled.items() if v is not None}
    if missing:
        print(f"NOT COMPILED (no launcher call reached them): {missing}")
        return 1
    seen: dict = {}
    for name, _, constexprs in compiled:
        for key, value in constexprs:
            seen.setdefault((name, key), set()).add(value)
    branches = {k: sorted(v - seen.get(k, set()), key=str) for k, v in EXPECTED_BRANCHES.items()}
    branches = {k: v for k, v in branches.items() if v}
    if branches:
        print(f"NOT COMPILED (constexpr branches no launcher call reached): {branches}")
        return 1
    print(f"{len(compiled)} kernel variants compiled for sm_90, {len(failed)} failed")
    for (name, _, constexprs), error in failed.items():
        print(f"FAILED {name} {dict(constexprs)}: {error.splitlines()[0][:300]}")
    if args.report:
        report = resources.write_report(variants, groups, compile_with_log, args.report, args.report_stem)
        print(f"resource report: {args.report / args.report_stem}.md, {len(report['violations'])} violations")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
