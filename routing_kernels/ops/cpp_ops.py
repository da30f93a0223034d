"""The C++ kernels as torch ops: fake kernels and autograd for ``torch.ops.routing_kernels.*_fwd / *_bwd``.

csrc/registration.cpp declares these schemas and csrc/{cpu,cuda}/ register their kernels. They are the
kernels behind the public ops' ``backend="cpu"`` / ``"cuda"``; the public ops (``chunk_mean``, ``chunk_route``,
``route_chunks``, ``routed_attention``) are what users should call. Called directly they still behave as torch
ops should (as pytorch/extension-cpp registers them): a fake kernel each, so FakeTensorMode and torch.compile
can trace them, and autograd on the forward kernels, wired to their backward kernels, so a requires_grad
input gets its gradient instead of a silent None. The backward kernels have no derivative themselves: double
backward raises.
"""
from __future__ import annotations

import torch

from .. import _ext
from .._layout import accum_dtype
from .chunk_mean.op import out_shape as chunk_mean_shape

_NS = "routing_kernels::"


def _lengths_shape(x, chunk_size, cu_seqlens, max_seqlen):
    """(S, M, H, D) of the C++ kernels, whose max_seqlen is N for a dense batch."""
    return chunk_mean_shape(x, chunk_size, cu_seqlens, max_seqlen)


def _declared(name: str) -> bool:
    """Whether the loaded _C declares the op (an extension built from an older tree may lack a newer one)."""
    return torch._C._dispatch_has_kernel(_NS + name)


def _contiguous_like(t):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _no_double_backward(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"{name} has no derivative (double backward through routing_kernels is not supported)")
    return backward


def _register_fakes():
    def chunk_mean_fwd(x, chunk_size, cu_seqlens, max_seqlen):
        return x.new_empty(_lengths_shape(x, chunk_size, cu_seqlens, max_seqlen))

    def chunk_mean_bwd(grad_mean, x, chunk_size, cu_seqlens, max_seqlen):
        # grad_mean (S, M, H, D) in x's dtype, any strides; max_seqlen is N for a dense x
        want = _lengths_shape(x, chunk_size, cu_seqlens, max_seqlen)
        torch._check(tuple(grad_mean.shape) == tuple(want),
                     lambda: f"grad_mean must be (S, M, H, D) = {tuple(want)}, got {tuple(grad_mean.shape)}")
        return _contiguous_like(x)

    def chunk_route_fwd(x, query, chunk_size, cu_seqlens, max_seqlen, scale):
        s, m, h, d = _lengths_shape(x, chunk_size, cu_seqlens, max_seqlen)
        return x.new_empty(x.shape), x.new_empty((s, h, m), dtype=accum_dtype(x.dtype)), x.new_empty((s, h, d))

    def chunk_route_bwd(dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens, max_seqlen, scale):
        return _contiguous_like(x), _contiguous_like(query)

    def route_chunks_fwd(q, k, chunk_size, top_k, causal, cu_seqlens, max_seqlen):
        return q.new_empty((*q.shape[:-1], top_k), dtype=torch.int32)

    def routed_attention_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale):
        return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=accum_dtype(q.dtype))

    def routed_attention_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale):
        return _contiguous_like(q), _contiguous_like(k), _contiguous_like(v)

    def route_chunks_inference_fwd(q, k, chunk_size, top_k, causal, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                   max_seqlen_q, max_seqlen_k):
        return q.new_empty((*q.shape[:-1], top_k), dtype=torch.int32)

    def routed_attention_inference_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                       max_seqlen_q, max_seqlen_k, scale, block_indices):
        return routed_attention_fwd(q, k, v, chunk_size, top_k, causal, None, 0, scale)

    def routed_attention_inference_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens_q,
                                       cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale, block_indices):
        return _contiguous_like(q), _contiguous_like(k), _contiguous_like(v)

    def routed_decode_fwd(q, k_cache, v_cache, key_sums, seqused_k, chunk_size, top_k, causal, scale):
        torch._check(q.dim() == 4 and v_cache.dim() == 4, lambda: "q and v_cache must be 4-D (B, Lq, Hq, D)")
        return (q.new_empty((*q.shape[:-1], v_cache.shape[-1])),
                q.new_empty(q.shape[:-1], dtype=accum_dtype(q.dtype)))

    def chunk_mean_table_fwd(x, cu_chunks, seq_chunks, max_chunks):
        return x.new_empty((seq_chunks.shape[0] - 1, max_chunks, *x.shape[1:]))

    def chunk_mean_table_bwd(grad_mean, x, cu_chunks, seq_chunks, max_chunks):
        return _contiguous_like(x)

    def chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, max_chunks, scale):
        s, (h, d) = seq_chunks.shape[0] - 1, x.shape[1:]
        return (x.new_empty(x.shape), x.new_empty((s, h, max_chunks), dtype=accum_dtype(x.dtype)),
                x.new_empty((s, h, d)))

    def chunk_route_table_bwd(dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks, max_chunks, scale):
        return _contiguous_like(x), _contiguous_like(query)

    for fn in (chunk_mean_fwd, chunk_mean_bwd, chunk_route_fwd, chunk_route_bwd, route_chunks_fwd,
               routed_attention_fwd, routed_attention_bwd, routed_decode_fwd, route_chunks_inference_fwd,
               routed_attention_inference_fwd, routed_attention_inference_bwd, chunk_mean_table_fwd,
               chunk_mean_table_bwd, chunk_route_table_fwd, chunk_route_table_bwd):
        if _declared(fn.__name__):
            torch.library.register_fake(_NS + fn.__name__, fn)


def _register_autograd():
    ops = torch.ops.routing_kernels

    def chunk_mean_setup(ctx, inputs, output):
        x, chunk_size, cu_seqlens, max_seqlen = inputs
        ctx.save_for_backward(x, cu_seqlens)
        ctx.args = (chunk_size, max_seqlen)

    def chunk_mean_backward(ctx, grad_mean):
        x, cu_seqlens = ctx.saved_tensors
        chunk_size, max_seqlen = ctx.args
        return ops.chunk_mean_bwd(grad_mean, x, chunk_size, cu_seqlens, max_seqlen), None, None, None

    def chunk_route_setup(ctx, inputs, output):
        x, query, chunk_size, cu_seqlens, max_seqlen, scale = inputs
        ctx.save_for_backward(x, query, output[1], cu_seqlens)
        ctx.args = (chunk_size, max_seqlen, scale)

    def chunk_route_backward(ctx, dy, dweights, dsummary):
        x, query, weights, cu_seqlens = ctx.saved_tensors
        chunk_size, max_seqlen, scale = ctx.args
        dx, dq = ops.chunk_route_bwd(dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens, max_seqlen,
                                     scale)
        return dx, dq, None, None, None, None

    def attention_setup(ctx, inputs, output):
        q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen, scale = inputs
        ctx.save_for_backward(q, k, v, *output, cu_seqlens)
        ctx.args = (chunk_size, top_k, causal, max_seqlen, scale)

    def attention_backward(ctx, do, dlse):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        chunk_size, top_k, causal, max_seqlen, scale = ctx.args
        dq, dk, dv = ops.routed_attention_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_seqlens,
                                              max_seqlen, scale)
        return dq, dk, dv, None, None, None, None, None, None

    def inference_setup(ctx, inputs, output):
        q, k, v, *rest = inputs
        (chunk_size, top_k, causal, cu_q, cu_k, used, max_q, max_k, scale, block_indices) = rest
        ctx.save_for_backward(q, k, v, *output, cu_q, cu_k, used, block_indices)
        ctx.args = (chunk_size, top_k, causal, max_q, max_k, scale)

    def inference_backward(ctx, do, dlse):
        q, k, v, o, lse, cu_q, cu_k, used, block_indices = ctx.saved_tensors
        chunk_size, top_k, causal, max_q, max_k, scale = ctx.args
        dq, dk, dv = ops.routed_attention_inference_bwd(do, dlse, q, k, v, o, lse, chunk_size, top_k, causal, cu_q,
                                                        cu_k, used, max_q, max_k, scale, block_indices)
        return (dq, dk, dv) + (None,) * 10

    def table_mean_setup(ctx, inputs, output):
        x, cu_chunks, seq_chunks, max_chunks = inputs
        ctx.save_for_backward(x, cu_chunks, seq_chunks)
        ctx.max_chunks = max_chunks

    def table_mean_backward(ctx, grad_mean):
        x, cu_chunks, seq_chunks = ctx.saved_tensors
        return ops.chunk_mean_table_bwd(grad_mean, x, cu_chunks, seq_chunks, ctx.max_chunks), None, None, None

    def table_route_setup(ctx, inputs, output):
        x, query, cu_chunks, seq_chunks, max_chunks, scale = inputs
        ctx.save_for_backward(x, query, output[1], cu_chunks, seq_chunks)
        ctx.args = (max_chunks, scale)

    def table_route_backward(ctx, dy, dweights, dsummary):
        x, query, weights, cu_chunks, seq_chunks = ctx.saved_tensors
        dx, dq = ops.chunk_route_table_bwd(dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks,
                                           *ctx.args)
        return dx, dq, None, None, None, None

    if _declared("chunk_mean_table_fwd"):
        torch.library.register_autograd(_NS + "chunk_mean_table_fwd", table_mean_backward,
                                        setup_context=table_mean_setup)
        torch.library.register_autograd(_NS + "chunk_route_table_fwd", table_route_backward,
                                        setup_context=table_route_setup)
    if _declared("routed_attention_inference_fwd"):
        torch.library.register_autograd(_NS + "routed_attention_inference_fwd", inference_backward,
                                        setup_context=inference_setup)
    if _declared("chunk_mean_bwd"):
        torch.library.register_autograd(_NS + "chunk_mean_fwd", chunk_mean_backward, setup_context=chunk_mean_setup)
    torch.library.register_autograd(_NS + "chunk_route_fwd", chunk_route_backward, setup_context=chunk_route_setup)
    torch.library.register_autograd(_NS + "routed_attention_fwd", attention_backward, setup_context=attention_setup)
    for name in ("chunk_mean_bwd", "chunk_route_bwd", "routed_attention_bwd", "routed_attention_inference_bwd",
                 "chunk_mean_table_bwd", "chunk_route_table_bwd"):
        if _declared(name):
            torch.library.register_autograd(_NS + name, _no_double_backward(name))
    # route_chunks_fwd returns int32 indices: nothing to differentiate. routed_decode_fwd is a forward kernel only
    # (no autograd here): routed_attention's op layer sends its gradients to the reference backward.


if _ext.HAS_C:
    _register_fakes()
    _register_autograd()
