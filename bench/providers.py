"""Providers: name -> builder(case) -> callable(*inputs).

Baselines come from the package's own eager references, never re-implemented here.
Adding a provider is one function and one line in PROVIDERS (see _sdpa).
A provider that does not apply to an op (SDPA for chunk_mean) gives no row; one that applies but cannot
run a (case, mode) for a known reason (no CPU backward, sized away) gives a row with status "n/a" and
the reason (see not_applicable); anything else that goes wrong is a "failed" row.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Provider:
    build: Callable  # (case) -> callable(*inputs) -> outputs
    applies: Callable = lambda case: True  # False: no row at all (by design, not a failure)
    not_applicable: Callable = lambda case, mode: None  # a reason: an "n/a" row instead of a measurement
    ours: bool = False  # one of our kernels: never the "best other provider" of the summary
    # seconds of compilation per case and mode, a guess for the time-left estimate until one is measured
    compile_s_guess: float = 0.0


def not_applicable(name: str, case, mode: str):
    """Why provider `name` is not measured on (case, mode), or None when it should run. What the provider
    cannot do (no CPU backward) comes before what the case sizes away (time, memory): a `sized_away` key is a
    provider (every mode) or "provider:mode" (that mode only)."""
    away = dict(case.sized_away)
    return PROVIDERS[name].not_applicable(case, mode) or away.get(name) or away.get(f"{name}:{mode}")


def _reference(op: str) -> Callable:
    module = importlib.import_module(f"routing_kernels.ops.{op}.reference")
    return getattr(module, f"{op}_ref")


def _eager(case):
    if case.op == "routed_decode":
        from . import decode
        return decode.eager(case)
    ref, kwargs = _reference(case.op), case.call_kwargs()
    if case.chunking:  # the table reference takes packed tokens: the public function reads the dense batch so
        import routing_kernels
        ref, kwargs = getattr(routing_kernels, case.op), dict(kwargs, backend="reference")
    return lambda *inputs: ref(*inputs, **kwargs)


def _compiled(case):
    # A fresh compile per case: reset so that earlier cases' guards neither count against the
    # recompile limit nor fall back to eager silently. Static shapes: one graph per case.
    torch._dynamo.reset()
    # The bwd mode replays one backward with retain_graph=True, which AOTAutograd refuses for
    # graphs compiled with donated buffers (a memory-only optimisation): turn donation off.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    return torch.compile(_eager(case), dynamic=False)


def _public(backend):
    def build(case):
        import routing_kernels

        if case.op == "routed_decode":
            from . import decode
            return decode.ours(case, backend)

        fn, kwargs = getattr(routing_kernels, case.op), case.call_kwargs()
        return lambda *inputs: fn(*inputs, backend=backend, **kwargs)
    return build


def _triton_one_head_per_tile(case):
    """Our Triton routed_attention with GQA head packing off (HEADS_PER_TILE = 1) during the forward call,
    to measure what packing a kv group's q heads into one program buys. Compare fwd rows: in the backward
    modes only the forward is affected (autograd runs the backward after the call returns)."""
    import routing_kernels
    from routing_kernels.ops.routed_attention import triton as ra_triton

    kwargs = case.call_kwargs()

    def run(*inputs):
        saved, ra_triton.HEADS_PER_TILE = ra_triton.HEADS_PER_TILE, 1
        try:
            return routing_kernels.routed_attention(*inputs, backend="triton", **kwargs)
        finally:
            ra_triton.HEADS_PER_TILE = saved
    return run


def _is_attention(case) -> bool:
    return case.op == "routed_attention"


def _is_gqa_on_gpu(case) -> bool:
    return _is_attention(case) and case.device.startswith("cuda") and case.hkv < case.H


_COMPILE_DECODE = "torch.compile of the eager reference: not measured for decode (the eager column is the oracle)"


def _is_decode(case) -> bool:
    return case.op == "routed_decode"


def _sdpa(case):
    """Dense causal attention, torch's best SDPA backend for the device: what routing must beat (for decode:
    q_len 1 over the whole cache, bench/decode.py)."""
    if _is_decode(case):
        from . import decode
        return decode.sdpa(case)

    def run(q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)
    return run


def _append(case):
    from . import decode
    return decode.append(case)


def _flex(case):
    """FlexAttention over a block mask built from our route_chunks indices, timing the selection and the
    mask construction too (a user rebuilds both per layer). Compiled, on every device: the eager
    flex_attention materialises the dense scores.

    The mask is built compiled too. Eagerly, create_block_mask evaluates mask_mod over the whole
    (B, Hq, N, N) grid with int64 index temporaries, ~9 bytes per (head, query, key): RSS grew 0.3 / 1.3 /
    5.0 GB at N = 2K / 4K / 8K (B=1, Hq=8, 2-core VM), so ~20 GB at 16K, past the CPU address-space cap
    (85% of free memory): that was the "OOM" of every flex row at 16K. Compiled, it streams over the grid
    (the whole process peaked at 0.9 GB at 16K) and takes 1.6 s at 4K instead of 3-4.6 s."""
    import routing_kernels
    from routing_kernels.ops.routed_attention.flex import flex_routed_attention, routed_block_mask
    from torch.nn.attention.flex_attention import flex_attention

    attention = torch.compile(flex_attention, dynamic=False)
    kwargs = case.call_kwargs()
    # Small grids are built eagerly: Inductor's CPU code for the mask does not compile when N < chunk_size
    # (torch 2.14.1, AVX2: "operands to ?: have different types VecMask<int, 1> and VecMask<float, 1>"), and
    # eagerly they cost < 0.3 GB up to N = 2K.
    compile_mask = case.B * case.H * case.N * case.N > 2**25

    def run(q, k, v):
        with torch.no_grad():
            idx = routing_kernels.route_chunks(q, k, kwargs["chunk_size"], kwargs["top_k"], causal=kwargs["causal"])
            mask = routed_block_mask(idx, kwargs["chunk_size"], kwargs["causal"], compile_mask=compile_mask)
        if not q.is_cuda:  # CPU flex refuses inputs that require grad, even under no_grad (fwd only here)
            q, k, v = q.detach(), k.detach(), v.detach()
        return flex_routed_attention(q, k, v, mask, attention=attention)
    return run


def _flex_na(case, mode):
    if mode != "fwd" and not case.device.startswith("cuda"):
        return f"FlexAttention has no CPU backward (torch {torch.__version__})"
    return None


PROVIDERS = {
    "eager": Provider(_eager),
    "compile": Provider(_compiled, not_applicable=lambda case, mode: _COMPILE_DECODE if _is_decode(case) else None,
                        compile_s_guess=20.0),
    "ours": Provider(_public(None), ours=True),
    "sdpa": Provider(_sdpa, lambda case: _is_attention(case) or _is_decode(case)),
    # RoutedKVCache.append of one token per sequence (routed_decode only): what a step pays besides attention
    "append": Provider(_append, _is_decode, ours=True),
    "flex": Provider(_flex, _is_attention, _flex_na, compile_s_guess=30.0),
    # explicit backends, not in the default set: compare kernels of the same op side by side
    "triton": Provider(_public("triton"), ours=True),
    "cuda": Provider(_public("cuda"), ours=True),
    "cpu": Provider(_public("cpu"), ours=True),
    "triton-pack1": Provider(_triton_one_head_per_tile, _is_gqa_on_gpu, ours=True),
}


def default_providers(device: str, quick: bool) -> list:
    # torch.compile of four ops (forward and training graphs) takes minutes on a 2-core CPU,
    # which does not fit a seconds-long smoke run: quick mode leaves it out unless asked for.
    if quick:
        return ["eager", "ours", "sdpa", "append"]
    return ["eager", "compile", "ours", "sdpa", "flex", "triton-pack1", "append"]
