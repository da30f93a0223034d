"""sm_90 compile cases of the decode kernels (routed_attention/triton_decode.py), kept apart from
triton_sm90_compile.py so that the two files merge easily; that script imports DECODE_KERNELS and
decode_cases() and compiles them like its own cases.

Covered per dtype (fp32, fp16, bf16): the gate with the broadcast (rows < 16) and tl.dot paths, with one split
(FINAL) and several (candidates + merge kernel), causal and not; the partials with the broadcast path (1, 4, 8
rows, D = 128 and 256), the tl.dot path (16, 32 and 128 rows = 2 tiles of 64), Dv != D; top_k = 1 (one slot)
and top_k > M. `TRITON_DUMP_PTXAS_LOG=1 python python_tests/triton_sm90_compile.py` prints ptxas's registers
and spills per variant.
"""
from __future__ import annotations

import os

import torch

DECODE_KERNELS = {"decode_gate_kernel", "decode_gate_merge_kernel", "decode_partial_kernel", "decode_merge_kernel"}

# (B, Lq, Hq, Hkv, D, Dv, capacity, chunk_size, top_k): each a tile path of the kernels (rows = Lq * Hq / Hkv)
_SHAPES = [
    (2, 1, 8, 8, 128, 128, 256, 16, 4),      # MHA decode: 1 row, broadcast
    (2, 1, 32, 8, 128, 128, 256, 16, 4),     # GQA 4: 4 rows, broadcast
    (1, 1, 8, 1, 256, 256, 256, 16, 3),      # 8 rows, D = 256: broadcast with short key blocks
    (1, 1, 16, 1, 128, 128, 256, 64, 8),     # GQA 16: 16 rows, tl.dot
    (1, 4, 32, 4, 64, 128, 256, 16, 2),      # Lq 4 x GQA 8: 32 rows, Dv != D
    (1, 16, 16, 2, 128, 128, 256, 16, 3),    # Lq 16 x GQA 8: 128 rows, two tiles of 64
    (1, 1, 4, 2, 64, 64, 4096, 16, 8),       # 256 chunks: the gate splits and merges (broadcast rows)
    (1, 8, 4, 2, 64, 64, 4096, 16, 8),       # the same with tl.dot rows
    (2, 1, 4, 2, 64, 64, 64, 16, 1),         # top_k = 1: one slot, nothing to rank
    (1, 2, 4, 2, 64, 64, 48, 16, 9),         # top_k > M = 3
]


def decode_cases():
    from routing_kernels.ops.routed_attention.triton_decode import routed_decode_triton

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b, lq, hq, hkv, d, dv, cap, cs, top_k in _SHAPES:
            q = torch.randn(b, lq, hq, d, generator=g).to(dtype)
            k = torch.randn(b, cap, hkv, d, generator=g).to(dtype)
            v = torch.randn(b, cap, hkv, dv, generator=g).to(dtype)
            sums = torch.randn(b, -(-cap // cs), hkv, d, generator=g)
            used = torch.full((b,), cap, dtype=torch.int32)
            for causal in (True, False):
                yield lambda q=q, k=k, v=v, s=sums, u=used, cs=cs, t=top_k, c=causal: routed_decode_triton(
                    q, k, v, s, u, cs, t, c)


def ptxas_report() -> int:
    """Compile the decode cases for sm_90 as the GPU JIT would (its divisible-by-16 hints on 16-byte aligned
    pointers and on ints % 16 == 0, which triton_sm90_compile.py does not reproduce and without which no 2D
    tile load vectorizes), and print ptxas's registers and spills per variant. Run without TRITON_INTERPRET:
    python python_tests/triton_sm90_decode.py"""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import JITFunction

    import triton_sm90_compile as aot

    seen, worst = set(), []

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in aot._LAUNCH_OPTIONS if k in kwargs}
        bound = dict(zip(self.arg_names, args), **kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(self.params):
            value = bound[param.name] if param.name in bound else param.default
            one = isinstance(value, int) and not isinstance(value, bool) and value == 1
            if param.is_constexpr or one:
                signature[param.name], constexprs[param.name] = "constexpr", value
                continue
            signature[param.name] = aot._arg_type(value)
            aligned = value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor) else (
                isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0)
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        key = (self.__name__, tuple(signature.items()), tuple(sorted(constexprs.items(), key=str)), str(attrs))
        if key in seen:
            return None
        seen.add(key)
        kernel = triton_compile(ASTSource(self, signature, constexprs, attrs), target=aot.TARGET, options=options)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(kernel.asm["ptx"])
            f.flush()
            log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True).stderr
        regs = int(re.search(r"Used (\d+) registers", log).group(1))
        spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
        worst.append((spills, regs, self.__name__))
        print(f"{self.__name__:26s} regs {regs:3d} spill stores {spills:5d} B  {aot._short(signature, constexprs)}")
        return None

    JITFunction.run = run
    for call in decode_cases():
        call()
    spilling = [w for w in worst if w[0]]
    print(f"{len(worst)} hinted decode variants, {len(spilling)} spill, max regs {max(w[1] for w in worst)}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(ptxas_report())
