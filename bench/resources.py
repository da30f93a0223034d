"""GPU resources of every kernel variant: registers, spills, shared memory, stack, and the occupancy they allow.

A kernel that spills, or cannot keep enough warps resident, is slow on the GPU however good its algorithm; the
compile already knows. Sources, all without a GPU:
- Triton: python_tests/triton_sm90_compile.py compiles every variant the compile check reaches, and with
  `--report` also the variants the launchers pick at the GPU benchmark shapes (bench_launches below: the
  "default" variants), for sm_90. ptxas -v gives the spill bytes (its log is kept beside Triton's cache entry;
  a cached kernel without one gets ptxas -v rerun on its PTX), cuobjdump --dump-resource-usage on the cubin
  the registers, stack frame and static shared memory, Triton's metadata the dynamic shared memory and
  num_warps. The default variants are compiled again for sm_80 and sm_86: shared memory per SM is 164 / 100 KB
  there, and Triton's pipelining (num_stages) is decided per arch.
- CUDA C++: cuobjdump --dump-resource-usage and --dump-sass (STL/LDL: spills) on routing_kernels/_C*.so, for
  the archs it was built for.
Occupancy (resident blocks and warps per SM) follows CUDA's cuda_occupancy.h: registers allocated per warp in
units of 256 across 4 sub-partitions of 16K registers, shared memory in units of 128 bytes plus the 1 KB the
driver reserves per block, the largest shared-memory carveout, and the warp and block limits of each arch.

    python -m bench.resources [--out bench/results]   # resources_sm90_<date>.{md,json}; exit 1 on a violation

Violations (the CI test python_tests/test_triton_sm90_compile.py fails on them): a default variant (Triton at
the benchmark shapes on sm_80/86/90; the CUDA C++ instances those shapes use, CUDA_DEFAULTS) that spills (ptxas'
spill bytes; CUDA C++: STL/LDL in the SASS), any variant that needs more shared memory per block than its arch
(CUDA C++: than sm_80, sm_86 and sm_90) allows or that no SM can hold. Warnings: spills of the other variants,
occupancy under 25% or a single block per SM, wgmma that ptxas serializes.
`python -m bench` adds a resources section to its JSON and markdown (bench_section).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KB = 1024
REGS_PER_SM = 65536  # also the per-block limit, sm_80 .. sm_90
MAX_REGS_PER_THREAD = 255
RESERVED_SMEM = 1024  # per block, by the driver, sm_80 and later
LOW_OCCUPANCY = 0.25


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    gpus: str
    smem_per_sm: int  # the largest carveout, bytes
    smem_per_block: int  # opt-in maximum of static + dynamic shared memory per block (without the reserved 1 KB)
    threads_per_sm: int
    blocks_per_sm: int


ARCHS = {
    90: Arch("sm_90", "H100/H200", 228 * KB, 227 * KB, 2048, 32),
    80: Arch("sm_80", "A100", 164 * KB, 163 * KB, 2048, 32),
    86: Arch("sm_86", "RTX 30xx, A10, A40 (sm_89: same shared memory and threads)", 100 * KB, 99 * KB, 1536, 16),
}


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def occupancy(arch: Arch, regs: int, smem: int, threads: int) -> dict:
    """Resident blocks/warps per SM of a kernel with `regs` registers per thread, `smem` bytes of static +
    dynamic shared memory per block and `threads` per block (cuda_occupancy.h, default carveout = the largest)."""
    warps = -(-threads // 32)
    max_warps = arch.threads_per_sm // 32
    limits = {"warps": max_warps // warps, "blocks": arch.blocks_per_sm}
    regs_warp = _round_up(max(regs, 1) * 32, 256)
    if regs > MAX_REGS_PER_THREAD or regs_warp * _round_up(warps, 4) > REGS_PER_SM:
        limits["regs"] = 0
    else:
        limits["regs"] = (REGS_PER_SM // 4 // regs_warp) * 4 // warps
    alloc = _round_up(smem + RESERVED_SMEM, 128)
    limits["smem"] = 0 if smem > arch.smem_per_block else arch.smem_per_sm // alloc
    limiter = min(limits, key=lambda k: (limits[k], k != "regs", k != "smem"))
    blocks = limits[limiter]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "occupancy": blocks * warps / max_warps,
            "limiter": limiter}


# ---- tools -------------------------------------------------------------------------------------------------

def cuobjdump_path() -> str | None:
    """cuobjdump of the toolkit, else the copy in triton's wheel (the toolkit here lacks it)."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for cand in (Path(cuda_home) / "bin" / "cuobjdump", shutil.which("cuobjdump")):
        if cand and Path(cand).exists():
            return str(cand)
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - no triton: no cuobjdump
        return None


_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ARCH = re.compile(r"arch = (sm_\d+a?)")


def parse_resource_usage(text: str) -> list:
    """cuobjdump --dump-resource-usage output -> [{arch, function, regs, stack, static_smem, local}], the arch
    from the preceding 'arch = sm_XX' line of a fatbin (None for a bare cubin)."""
    out = []
    arches = [(m.start(), m.group(1)) for m in _ARCH.finditer(text)]
    for m in _USAGE.finditer(text):
        arch = next((a for pos, a in reversed(arches) if pos < m.start()), None)
        out.append({"arch": arch, "function": m.group(1), "regs": int(m.group(2)), "stack": int(m.group(3)),
                    "static_smem": int(m.group(4)), "local": int(m.group(5))})
    return out


def cubin_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True, timeout=60).stdout
    usage = parse_resource_usage(text)
    if len(usage) != 1:
        raise RuntimeError(f"expected one function in the cubin, cuobjdump said:\n{text}")
    return usage[0]


_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_SERIALIZED = re.compile(r"wgmma\.mma_async instructions are serialized due to ([^\n]*?) in the function")


def parse_ptxas_log(log: str) -> dict | None:
    """ptxas -v log of one kernel -> stack frame, spill store/load bytes, registers, and why wgmma is serialized
    (sm_90's C7511 'Potential Performance Loss'), or None without the properties line."""
    m = _SPILLS.search(log)
    if not m:
        return None
    regs = _PTXAS_REGS.search(log)
    serial = _SERIALIZED.search(log)
    return {"stack_frame": int(m.group(1)), "spill_stores": int(m.group(2)), "spill_loads": int(m.group(3)),
            "ptxas_regs": int(regs.group(1)) if regs else None,
            "wgmma_serialized": serial.group(1) if serial else None}


def _ptxas_log(kernel, log: str) -> str:
    """The ptxas -v log of a compiled Triton kernel: the one captured at compile time (then stored beside the
    cache entry), the stored one (a cache hit), or ptxas -v rerun on the kernel's PTX with Triton 3.8's flags."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(kernel.hash)
    name = "routing_kernels_ptxas_v.log"
    if _SPILLS.search(log or ""):
        cache.put(log, name, binary=False)
        return log
    stored = cache.get_file(name)
    if stored:
        return Path(stored).read_text()
    from triton import knobs

    arch = kernel.metadata.target.arch
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    fmad = [] if kernel.metadata.enable_fp_fusion else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        run = subprocess.run([knobs.nvidia.ptxas.path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={gpu}", str(ptx), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    if _SPILLS.search(log):
        cache.put(log, name, binary=False)
    return log


# ---- Triton variants ---------------------------------------------------------------------------------------

def bench_launches():
    """Launcher calls at the GPU benchmark shapes (bench/cases.py default_cases("cuda"), bf16) with head dims 64
    and 128: the tile choices users get by default. Inputs are uninitialised CPU tensors with B = 1 and 2 heads
    (attention: Hq = 2 * group, Hkv = 2): no kernel runs under the compile check, and tile choices depend on N,
    D, the chunk size, top_k and the GQA group, not on B or the head count (2 heads, not 1: an int argument
    equal to 1 would be compiled as a constant)."""
    import torch

    from routing_kernels.ops.chunk_mean.triton import chunk_mean_bwd, chunk_mean_fwd
    from routing_kernels.ops.chunk_route.triton import chunk_route_bwd, chunk_route_fwd
    from routing_kernels.ops.route_chunks.triton import route_chunks_triton
    from routing_kernels.ops.routed_attention import triton as ra

    from .cases import ATTENTION_OPS, default_cases

    empty = torch.empty
    for case in default_cases("cuda"):
        for d in (64, 128):
            n, c, dt = case.N, case.chunk, case.dtype
            if case.op == "routed_decode":
                def decode(n=n, c=c, dt=dt, d=d, hq=2 * (case.H // case.hkv), top_k=case.top_k):
                    from routing_kernels.ops.routed_attention.triton_decode import routed_decode_triton
                    q, k, v = empty(1, 1, hq, d, dtype=dt), empty(1, n, 2, d, dtype=dt), empty(1, n, 2, d, dtype=dt)
                    sums, used = empty(1, -(-n // c), 2, d), torch.full((1,), n, dtype=torch.int32)
                    routed_decode_triton(q, k, v, sums, used, c, top_k, True)
                yield decode
            elif case.op in ATTENTION_OPS:
                hkv = 2
                hq = hkv * (case.H // case.hkv)

                def attention(n=n, c=c, dt=dt, d=d, hq=hq, hkv=hkv, top_k=case.top_k, op=case.op):
                    q, k, v = empty(1, n, hq, d, dtype=dt), empty(1, n, hkv, d, dtype=dt), empty(1, n, hkv, d, dtype=dt)
                    if op == "route_chunks":
                        route_chunks_triton(q, k, c, top_k, True)
                        return
                    o, lse = ra.routed_attention_fwd_triton(q, k, v, c, top_k, True)
                    ra.routed_attention_bwd_triton(empty(o.shape, dtype=dt), empty(lse.shape), q, k, v, o, lse, c,
                                                   top_k, True)
                yield attention
            else:
                def chunk(n=n, c=c, dt=dt, d=d, op=case.op):
                    x = empty(1, n, 2, d, dtype=dt)
                    if op == "chunk_mean":
                        means, _ = chunk_mean_fwd(x, c)
                        chunk_mean_bwd(empty(means.shape, dtype=dt), x, c)
                        return
                    query = empty(2, d, dtype=dt)
                    y, w, s = chunk_route_fwd(x, query, c, None, None, d ** -0.5)
                    chunk_route_bwd(empty(y.shape, dtype=dt), empty(w.shape), empty(s.shape, dtype=dt), x, query, w, c,
                                    None, None, d ** -0.5)
                yield chunk


def _in_types(signature: dict) -> str:
    return ",".join(sorted({t[1:] for t in signature.values() if t.startswith("*")}))


def _constexprs(constexprs: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(constexprs.items()))


def triton_record(variant: dict, kernel, log: str, arch: int, default: bool) -> dict:
    usage = cubin_usage(kernel.asm["cubin"])
    ptxas = parse_ptxas_log(_ptxas_log(kernel, log)) or {}
    meta = kernel.metadata
    threads = meta.num_warps * 32
    smem = usage["static_smem"] + meta.shared
    rec = {"kind": "triton", "arch": ARCHS[arch].name, "kernel": variant["fn"].__name__,
           "inputs": _in_types(variant["signature"]), "constexprs": _constexprs(variant["constexprs"]),
           "div16": sorted(variant["fn"].arg_names[path[0]] for path, attr in (variant.get("attrs") or {}).items()
                           if attr),
           "default": default, "num_warps": meta.num_warps, "num_stages": meta.num_stages, "threads": threads,
           "regs": usage["regs"], "stack": usage["stack"], "local": usage["local"],
           "spill_stores": ptxas.get("spill_stores"), "spill_loads": ptxas.get("spill_loads"),
           "static_smem": usage["static_smem"], "dynamic_smem": meta.shared, "smem": smem,
           "wgmma_serialized": ptxas.get("wgmma_serialized")}
    rec.update(occupancy(ARCHS[arch], usage["regs"], smem, threads))
    return rec


def triton_records(variants: dict, groups: dict, compile_fn, archs=(80, 86)) -> tuple[list, list]:
    """Records of every sm_90 variant, and of the default ones (reached by bench_launches) compiled again for
    `archs` with compile_fn(src, options, target) -> (kernel, ptxas log). Returns (records, compile errors)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    records, errors = [], []
    for i, (key, v) in enumerate(variants.items()):
        default = "bench" in groups.get(key, ())
        records.append(dict(triton_record(v, v["kernel"], v["ptxas_log"], 90, default), variant=i))
        if not default:
            continue
        for arch in archs:
            src = ASTSource(v["fn"], v["signature"], v["constexprs"], v.get("attrs"))
            try:
                kernel, log = compile_fn(src, v["options"], GPUTarget("cuda", arch, 32))
            except Exception as error:  # noqa: BLE001 - a variant that does not compile there is a violation
                errors.append({"kind": "triton", "kernel": v["fn"].__name__, "arch": ARCHS[arch].name,
                               "message": f"{v['fn'].__name__} {_constexprs(v['constexprs'])} does not compile "
                                          f"for {ARCHS[arch].name}: {type(error).__name__}: "
                                          f"{str(error).splitlines()[0][:200]}"})
                continue
            records.append(dict(triton_record(v, kernel, log, arch, True), variant=i))
    return records, errors


# ---- CUDA C++ kernels --------------------------------------------------------------------------------------

# Threads per block the launchers in csrc/cuda pick at the GPU benchmark shapes (H * D = 2048 values per token):
# chunk_mean.cu MAX_THREADS, chunk_route_kernels.cuh REDUCE_THREADS / SOFTMAX_THREADS / SCALE_THREADS. A kernel
# missing here is reported as a violation, so that this table follows the sources.
CUDA_THREADS = {"chunk_mean_kernel": 256, "reduce_chunks_kernel": 256, "softmax_summary_kernel": 256,
                "softmax_backward_kernel": 256, "scale_chunks_kernel": 256,
                "finish_table_chunks_kernel": 256}  # the reduce block (chunk_route_launch.cuh, chunk tables)
# The template instances those launchers pick at the benchmark shapes (bf16, dense, 16-byte aligned rows: VEC = 8;
# the softmax backward runs on the fp32 accumulators): the "default" CUDA variants, as the benchmark shapes'
# variants are for Triton. The others (fp16/fp32/fp64, varlen, the scalar fallback) are reported, not failed on.
CUDA_DEFAULTS = {"chunk_mean_kernel": "BFloat16, false", "reduce_chunks_kernel": "BFloat16, 8, false,",
                 "scale_chunks_kernel": "BFloat16, 8, false,", "softmax_summary_kernel": "BFloat16",
                 "softmax_backward_kernel": "float"}


def extension_path() -> Path | None:
    found = sorted((REPO / "routing_kernels").glob("_C*.so"))
    return found[0] if found else None


def _demangle(names: list) -> list:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def _short_cuda_name(demangled: str) -> tuple[str, str]:
    """'routing_kernels::(anonymous namespace)::reduce_chunks_kernel<c10::BFloat16, 8, true, false>(...)' ->
    ('reduce_chunks_kernel', 'c10::BFloat16, 8, true, false')."""
    head = demangled.replace("(anonymous namespace)::", "").split("(")[0].strip()
    m = re.search(r"(\w+)(?:<(.*)>)?$", head)
    if not m:
        return demangled, ""
    return m.group(1), (m.group(2) or "").replace("c10::", "")


def local_memory_ops(sass: str) -> dict:
    """cuobjdump -sass output -> {(arch, function): number of STL/LDL instructions}: the local-memory traffic
    (spills) of CUDA C++ kernels, whose ptxas -v log the extension does not keep. A stack frame alone (ptxas
    reserves one for a CALL, as in Triton's sm_86 dk/dv kernel) moves no data."""
    counts, arch, fn = {}, None, None
    for line in sass.splitlines():
        if "arch = " in line:
            arch = line.split("arch = ")[1].strip()
        elif "Function : " in line:
            fn = line.split("Function : ")[1].strip()
            counts[(arch, fn)] = 0
        elif fn is not None and re.search(r"\b(STL|LDL)(\.|\s)", line):
            counts[(arch, fn)] += 1
    return counts


def cuda_records(so: Path | None = None) -> tuple[list, str | None]:
    """Records of the CUDA C++ kernels in the extension, or ([], why not)."""
    so = so or extension_path()
    if so is None:
        return [], "routing_kernels/_C*.so is not built"
    tool = cuobjdump_path()
    if tool is None:
        return [], "no cuobjdump (neither the CUDA toolkit's nor triton's)"
    run = subprocess.run([tool, "--dump-resource-usage", str(so)], capture_output=True, text=True, timeout=120)
    usage = parse_resource_usage(run.stdout)
    if not usage:
        return [], f"{so.name} holds no CUDA kernels (built without CUDA)"
    local_ops = {}  # without a stack frame or local memory there is nowhere to spill: skip the SASS dump
    if any(u["stack"] or u["local"] for u in usage):
        sass = subprocess.run([tool, "--dump-sass", str(so)], capture_output=True, text=True, timeout=300).stdout
        local_ops = local_memory_ops(sass)
    names = _demangle([u["function"] for u in usage])
    records = []
    for u, name in zip(usage, names):
        base, targs = _short_cuda_name(name)
        arch_num = int(re.sub(r"\D", "", u["arch"] or "sm_90"))
        threads = CUDA_THREADS.get(base)
        default = base in CUDA_DEFAULTS and (targs + ",").startswith(CUDA_DEFAULTS[base].rstrip(",") + ",")
        rec = {"kind": "cuda", "arch": u["arch"], "kernel": base, "inputs": "", "constexprs": targs,
               "default": default, "num_warps": None if threads is None else threads // 32, "num_stages": None,
               "threads": threads, "regs": u["regs"], "stack": u["stack"], "local": u["local"],
               "local_ops": local_ops.get((u["arch"], u["function"]), 0 if not (u["stack"] or u["local"]) else None),
               "spill_stores": None, "spill_loads": None, "static_smem": u["static_smem"], "dynamic_smem": 0,
               "smem": u["static_smem"], "wgmma_serialized": None}
        if threads is not None and arch_num in ARCHS:
            rec.update(occupancy(ARCHS[arch_num], u["regs"], u["static_smem"], threads))
        records.append(rec)
    return records, None


# ---- checks and tables -------------------------------------------------------------------------------------

def _what(r: dict) -> str:
    inputs = f" [{r['inputs']}]" if r["inputs"] else ""
    return f"{r['kernel']}{inputs} {r['constexprs']} on {r['arch']}"


def _spills(r: dict) -> bool:
    """ptxas' spill bytes (Triton), else the local-memory instructions in the SASS (CUDA C++), else (neither
    known) a stack frame or local memory at all."""
    if r["spill_stores"] is not None:
        return bool(r["spill_stores"] + r["spill_loads"])
    if r.get("local_ops") is not None:
        return bool(r["local_ops"])
    return bool(r["stack"] + r["local"])


def _spill_text(r: dict) -> str:
    if r["spill_stores"] is not None:
        return f"spill stores/loads {r['spill_stores']}/{r['spill_loads']} bytes, stack frame {r['stack']} bytes"
    ops = "" if r.get("local_ops") is None else f"{r['local_ops']} local-memory instructions (STL/LDL), "
    return f"{ops}stack frame {r['stack']} bytes"


def violations(records: list, compile_errors: list = ()) -> list:
    """What the CI test fails on, as {kind, kernel, arch, message}:
    - a default variant (Triton at the benchmark shapes on sm_80/86/90, CUDA_DEFAULTS) that spills or has a
      stack frame;
    - any variant that needs more shared memory per block than its arch allows (CUDA C++: static shared
      memory, the same on every arch, against sm_80, sm_86 and sm_90), or that no SM can hold;
    - a default Triton variant that does not compile for sm_80/86; a CUDA kernel without a block size."""
    out = [dict(e) for e in compile_errors]
    for r in records:
        def add(message, r=r):
            out.append({"kind": r["kind"], "kernel": r["kernel"], "arch": r["arch"],
                        "message": f"{_what(r)}: {message}"})

        if r["default"] and _spills(r):
            add(f"spills ({_spill_text(r)})")
        archs = list(ARCHS.values()) if r["kind"] == "cuda" else [a for a in ARCHS.values() if a.name == r["arch"]]
        for arch in archs:
            if r["smem"] > arch.smem_per_block:
                add(f"{r['smem'] / KB:.1f} KB shared memory per block > {arch.name}'s {arch.smem_per_block // KB} KB")
        if r.get("blocks_per_sm") == 0 and all(r["smem"] <= a.smem_per_block for a in archs):
            add(f"no block fits an SM (limited by {r['limiter']})")
        if r["kind"] == "cuda" and r["threads"] is None:
            add("no block size in bench/resources.py CUDA_THREADS")
    return out


def warnings(records: list) -> list:
    """Worth a look, not failed on: spills of non-default variants, occupancy under 25% or a single block per
    SM, and sm_90 kernels whose wgmma ptxas serializes."""
    out = []
    for r in records:
        if not r["default"] and _spills(r):
            out.append(f"{_what(r)}: spills ({_spill_text(r)}); not a default variant")
        if r.get("blocks_per_sm") and (r["occupancy"] < LOW_OCCUPANCY or r["blocks_per_sm"] < 2):
            out.append(f"{_what(r)}: {r['warps_per_sm']} warps/SM ({100 * r['occupancy']:.0f}%), "
                       f"{r['blocks_per_sm']} block(s)/SM, limited by {r['limiter']}")
        if r["wgmma_serialized"]:
            out.append(f"{_what(r)}: ptxas serializes wgmma ({r['wgmma_serialized']})")
    return out


def _kb(v) -> str:
    return "-" if v is None else f"{v / KB:.1f}"


def _spill(r) -> str:
    if r["spill_stores"] is None:
        return "-"
    return f"{r['spill_stores']}/{r['spill_loads']}"


def _dedupe(lines: list) -> list:
    """Identical table rows (variants that differ only in the JIT's divisibility hints) once, with a count."""
    counts = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [line if n == 1 else line.replace(" |", f" (x{n}) |", 1) for line, n in counts.items()]


def markdown(records: list, problems: list, notes: list = (), cuda_note: str | None = None,
             triton_title: str = "Triton, default variants (GPU benchmark shapes, D = 64 / 128, bf16)") -> str:
    """Tables: default Triton variants on sm_90 with their sm_80 / sm_86 shared memory and occupancy beside;
    the other (compile check) Triton variants on sm_90; the CUDA C++ kernels."""
    lines = []
    tri = [r for r in records if r["kind"] == "triton"]
    cuda = [r for r in records if r["kind"] == "cuda"]
    summary = summarize(records)
    lines.append(f"{summary['variants']} kernel variants ({summary['triton_sm90']} Triton on sm_90, "
                 f"{summary['cuda']} CUDA C++); worst registers {summary['max_regs']} "
                 f"({summary['max_regs_kernel']}); spilling variants {summary['spilling']} "
                 f"({summary['spilling_default']} default); lowest occupancy {100 * summary['min_occupancy']:.0f}% "
                 f"({summary['min_occupancy_kernel']}); violations {len(problems)}.")
    lines.append("")
    lines.append("Columns: registers per thread; spill bytes stored/loaded (ptxas -v; CUDA C++: STL/LDL instructions "
                 "in the SASS); stack frame bytes; shared memory per block in KB (static + dynamic; static includes "
                 "ptxas' 1 KB reservation on sm_90); resident blocks and warps per SM (of 64 warps; sm_86: 48) and "
                 "what limits them. (xN): N variants that differ only in the JIT's divisible-by-16 hints.")
    head = "| kernel | in | constexprs | warps | regs | spill st/ld | stack | smem KB | blocks/SM | warps/SM | limit |"
    sep = "|" + "---|" * (head.count("|") - 1)

    def occ(r):
        return "-" if r.get("blocks_per_sm") is None else f"{r['warps_per_sm']} ({100 * r['occupancy']:.0f}%)"

    def row(r):
        spill = _spill(r) if r["kind"] == "triton" else ("-" if r.get("local_ops") is None else f"{r['local_ops']} ops")
        return (f"| {r['kernel']} | {r['inputs']} | {r['constexprs']} | {r['num_warps']} | {r['regs']} | "
                f"{spill} | {r['stack']} | {_kb(r['smem'])} | {r.get('blocks_per_sm', '-')} | {occ(r)} | "
                f"{r.get('limiter', '-')} |")

    order = lambda r: (r["kernel"], r["inputs"], r["constexprs"])  # noqa: E731
    defaults = [r for r in tri if r["default"] and r["arch"] == "sm_90"]
    if defaults:
        lines += ["", f"## {triton_title}", "",
                  head + " sm_80 smem KB / warps/SM | sm_86 smem KB / warps/SM |", sep + "---|---|"]
        body = []
        for r in sorted(defaults, key=order):
            cells = []
            for name in ("sm_80", "sm_86"):
                o = next((x for x in tri if x["arch"] == name and r.get("variant") is not None
                          and x.get("variant") == r["variant"]), None)
                cells.append("-" if o is None else f"{_kb(o['smem'])} / {occ(o)}, {_spill(o)}")
            body.append(row(r) + f" {cells[0]} | {cells[1]} |")
        lines += _dedupe(body)
    rest = [r for r in tri if not r["default"]]
    if rest:
        lines += ["", "## Triton, compile-check variants (sm_90; fp32 / fp16 / bf16, every constexpr branch)", "",
                  head, sep]
        lines += _dedupe([row(r) for r in sorted(rest, key=order)])
    lines += ["", "## CUDA C++ kernels (routing_kernels/_C*.so, cuobjdump; threads: the launchers' at the benchmark "
              "shapes; default: the instances those shapes use)", ""]
    if cuda:
        cuda_head = head.replace("| in | constexprs |", "| arch | template args |")
        lines += [cuda_head.replace(" limit |", " limit | default |"), sep + "---|"]
        for r in sorted(cuda, key=order):
            lines.append(row(dict(r, inputs=r["arch"])) + f" {'yes' if r['default'] else ''} |")
    else:
        lines.append(f"skipped: {cuda_note}")
    lines += ["", "## Violations (the CI test fails on these)", ""]
    lines += [f"- {m}" for m in dict.fromkeys(p["message"] for p in problems)] or ["none"]
    lines += ["", "## Warnings (spills of non-default variants, occupancy under 25% or one block per SM, "
              "serialized wgmma)", ""]
    lines += [f"- {w}" for w in dict.fromkeys(warnings(records))] or ["none"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def summarize(records: list) -> dict:
    live = [r for r in records if r.get("blocks_per_sm") is not None]
    worst = max(records, key=lambda r: r["regs"], default=None)
    low = min(live, key=lambda r: r["occupancy"], default=None)
    return {"variants": len(records),
            "triton_sm90": sum(r["kind"] == "triton" and r["arch"] == "sm_90" for r in records),
            "cuda": sum(r["kind"] == "cuda" for r in records),
            "max_regs": worst["regs"] if worst else None,
            "max_regs_kernel": f"{worst['kernel']} {worst['constexprs']} {worst['arch']}" if worst else None,
            "spilling": sum(_spills(r) for r in records),
            "spilling_default": sum(_spills(r) and r["default"] for r in records),
            "min_occupancy": low["occupancy"] if low else float("nan"),
            "min_occupancy_kernel": f"{low['kernel']} {low['constexprs']} {low['arch']}" if low else None}


def versions() -> dict:
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        commit = "unknown"
    return {"torch": torch.__version__, "triton": tv, "commit": commit,
            "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def write_report(variants: dict, groups: dict, compile_fn, out_dir: Path, stem: str = "resources") -> dict:
    """Builds the whole report (Triton records incl. sm_80/86, CUDA C++ records), writes <stem>.json and
    <stem>.md into out_dir, returns the JSON object."""
    records, errors = triton_records(variants, groups, compile_fn)
    cuda, cuda_note = cuda_records()
    records += cuda
    problems = violations(records, errors)
    meta = versions()
    notes = ["Triton variants are compiled ahead of time with the launch's arguments, specialized by the JIT's "
             "own binder (ints equal to 1 as constants, divisible-by-16 hints of ints and aligned pointers)."]
    if cuda_note:
        notes.append(f"CUDA C++ kernels skipped: {cuda_note}")
    report = {"meta": meta, "archs": {a.name: dataclasses.asdict(a) for a in ARCHS.values()},
              "summary": summarize(records), "violations": problems, "warnings": warnings(records),
              "cuda_skipped": cuda_note, "records": records}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    title = (f"# GPU kernel resources (sm_90; defaults also sm_80, sm_86) | torch {meta['torch']} | "
             f"triton {meta['triton']} | {meta['commit']} | {meta['timestamp']}\n\n")
    (out_dir / f"{stem}.md").write_text(title + markdown(records, problems, notes, cuda_note))
    return report


# ---- python -m bench: the section of a benchmark run -------------------------------------------------------

def _jit_functions():
    import importlib

    from triton.runtime.jit import JITFunction

    for op in ("chunk_mean", "chunk_route", "route_chunks", "routed_attention"):
        module = importlib.import_module(f"routing_kernels.ops.{op}.triton")
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                yield value


def bench_section(device: str) -> tuple[dict, str]:
    """Resources of what this benchmark run used: on a GPU the Triton kernels the JIT compiled (read from its
    caches, so exactly the variants that ran) and the CUDA C++ kernels of the extension; on CPU only the latter
    (the Triton report needs the compile pass: python -m bench.resources)."""
    records, notes = [], []
    if device.startswith("cuda"):
        import torch

        major, minor = torch.cuda.get_device_capability()
        cap = major * 10 + minor
        arch = ARCHS.get(cap) or (ARCHS[86] if cap == 89 else None)
        try:
            for fn in _jit_functions():
                for entry in getattr(fn, "device_caches", {}).values():
                    cache = entry[0] if isinstance(entry, tuple) else entry
                    for kernel in getattr(cache, "values", lambda: [])():
                        records.append(_jit_record(fn, kernel, cap, arch))
        except Exception as error:  # noqa: BLE001 - the benchmark's own results matter more
            notes.append(f"Triton JIT caches unreadable: {type(error).__name__}: {error}")
    cuda, cuda_note = cuda_records()
    records += cuda
    problems = violations(records)
    section = {"summary": summarize(records), "violations": problems, "warnings": warnings(records),
               "cuda_skipped": cuda_note, "records": records}
    if not device.startswith("cuda"):
        notes.append("Triton kernels did not run (CPU): their report is `python -m bench.resources`")
    text = markdown(records, problems, notes, cuda_note, triton_title="Triton kernels this run compiled (JIT)")
    return section, text.replace("\n## ", "\n### ")


def _jit_record(fn, kernel, cap: int, arch: Arch | None) -> dict:
    meta = kernel.metadata
    try:
        usage = cubin_usage(kernel.asm["cubin"])
    except Exception:  # noqa: BLE001 - no cuobjdump: the driver's numbers (static shared memory unknown: 0)
        usage = {"regs": kernel.n_regs, "stack": 4 * kernel.n_spills, "static_smem": 0, "local": 0}
    smem = usage["static_smem"] + meta.shared
    src = getattr(kernel, "src", None)  # the ASTSource the JIT compiled: its signature and constexprs
    signature = getattr(src, "signature", None) or {}
    constants = {fn.arg_names[k[0]] if isinstance(k, tuple) else k: v
                 for k, v in (getattr(src, "constants", None) or {}).items()}
    rec = {"kind": "triton", "arch": f"sm_{cap}", "kernel": fn.__name__, "inputs": _in_types(signature),
           "constexprs": _constexprs(constants),
           "default": True, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
           "threads": meta.num_warps * 32, "regs": usage["regs"], "stack": usage["stack"], "local": usage["local"],
           "spill_stores": None, "spill_loads": None, "static_smem": usage["static_smem"],
           "dynamic_smem": meta.shared, "smem": smem, "wgmma_serialized": None}
    if arch is not None:
        rec.update(occupancy(arch, usage["regs"], smem, meta.num_warps * 32))
    return rec


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.resources", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "bench.resources", *(argv or sys.argv[1:])], env=env,
                              cwd=REPO).returncode
    sys.path.insert(0, str(REPO / "python_tests"))
    import triton_sm90_compile as tsc

    stem = f"resources_sm90_{datetime.date.today():%Y%m%d}"
    rc = tsc.main(["--report", str(args.out), "--report-stem", stem])
    report = json.loads((args.out / f"{stem}.json").read_text())
    print((args.out / f"{stem}.md").read_text())
    print(f"wrote {args.out / stem}.md and .json", file=sys.stderr)
    return rc or (1 if report["violations"] else 0)


if __name__ == "__main__":
    sys.exit(main())
