"""routing_kernels.nn: ChunkRouter (one batched encoder call, padding, gradients, torch.compile) and RoutedAttention."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import routing_kernels as rk
from routing_kernels.nn import ChunkRouter
from routing_kernels.ops.chunk_route.reference import chunk_route_ref


class CountingLinear(nn.Linear):
    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        assert x.shape[1:] == (4, 12)  # (B*M, chunk_size, dim)
        return torch.tanh(super().forward(x))


def test_router_encodes_all_chunks_in_one_call_and_matches_reference():
    torch.manual_seed(0)
    enc = CountingLinear(12, 12)
    router = ChunkRouter(12, 3, 4, encoder=enc)
    x = torch.randn(2, 10, 12)  # 3 chunks, the last one 2 tokens long (padded to 4)
    CountingLinear.calls = 0
    y, w, s = router(x)
    assert CountingLinear.calls == 1
    encoded = torch.tanh(nn.functional.linear(x, enc.weight, enc.bias))  # token-wise: padding is invisible
    ry, rw, rs = chunk_route_ref(encoded.view(2, 10, 3, 4), router.query, 4)
    torch.testing.assert_close((y, w, s), (ry.view(2, 10, 12), rw, rs.reshape(2, 12)))


def test_router_gradients_reach_encoder_and_query():
    torch.manual_seed(1)
    router = ChunkRouter(8, 2, 3, encoder=nn.Linear(8, 8))
    y, w, s = router(torch.randn(2, 7, 8))
    (y.square().sum() + s.sum()).backward()
    assert router.query.grad is not None and router.query.grad.abs().sum() > 0
    assert router.encoder.weight.grad is not None and router.encoder.weight.grad.abs().sum() > 0


def test_router_transformer_encoder_ignores_padding():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).eval()
    router = ChunkRouter(16, 2, 4, encoder=layer).eval()
    x = torch.randn(1, 6, 16)  # chunk 1 holds 2 real tokens and 2 padded ones
    y, _, _ = router(x)
    # The last chunk's real tokens must not depend on what the padding holds: encode it alone, unpadded.
    alone = layer(x[:, 4:6])
    want_last = chunk_route_ref(torch.cat([layer(x[:, :4]), alone], 1).view(1, 6, 2, 8), router.query, 4)[0]
    torch.testing.assert_close(y, want_last.reshape(1, 6, 16), rtol=1e-5, atol=1e-5)


def test_router_compiles():
    torch.manual_seed(3)
    router = ChunkRouter(8, 2, 4, encoder=nn.Linear(8, 8))
    x = torch.randn(2, 9, 8)
    eager = router(x)
    compiled = torch.compile(router, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)


def test_router_rejects_bad_shapes():
    with pytest.raises(ValueError, match="dim \\(10\\) must be a multiple of heads"):
        ChunkRouter(10, 3, 4)
    with pytest.raises(ValueError, match="x must be"):
        ChunkRouter(8, 2, 4)(torch.randn(2, 5, 6))


# ---- RoutedAttention ----

def _rotary(q, k, positions):
    """A toy rotary embedding (rotate pairs by position-dependent angles), enough to see positions matter."""
    def rot(t):
        half = t.shape[-1] // 2
        angle = positions[..., None, None].to(t.dtype) * 0.1
        a, b = t[..., :half], t[..., half:2 * half]
        return torch.cat([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos(), t[..., 2 * half:]], -1)
    return rot(q), rot(k)


def _layer(**kw):
    torch.manual_seed(0)
    from routing_kernels.nn import RoutedAttention
    return RoutedAttention(32, num_heads=4, num_kv_heads=2, chunk_size=4, top_k=2, **kw)


def test_routed_attention_layer_is_projections_around_the_op():
    layer = _layer()
    x = torch.randn(2, 13, 32)
    q, k, v = (p(x).unflatten(-1, (-1, 8)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    want = layer.o_proj(rk.routed_attention(q, k, v, 4, 2, backend="reference").flatten(-2))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_routed_attention_layer_decode_through_the_cache_equals_the_full_forward():
    layer = _layer()
    x = torch.randn(2, 23, 32)
    full = layer(x, rotary=_rotary)
    cache = rk.RoutedKVCache(1, 2, 32, num_kv_heads=2, head_dim=8, chunk_size=4)
    parts = [layer(x[:, :9], rotary=_rotary, cache=cache)]  # prefill 9 tokens, then decode one at a time
    parts += [layer(x[:, t:t + 1], rotary=_rotary, cache=cache) for t in range(9, 23)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache.chunk_size"):
        layer(x[:, :1], cache=rk.RoutedKVCache(1, 2, 32, num_kv_heads=2, head_dim=8, chunk_size=8))


def test_routed_attention_layer_varlen_equals_each_sequence_alone():
    layer = _layer()
    lengths = [5, 0, 11]
    x = torch.randn(sum(lengths), 32)
    cu = torch.tensor([0, 5, 5, 16], dtype=torch.int32)
    got = layer(x, cu_seqlens=cu, rotary=_rotary)
    want = torch.cat([layer(x[s:e][None], rotary=_rotary)[0] for s, e in ((0, 5), (5, 16))])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_routed_attention_layer_gradients_and_compile():
    layer = _layer()
    layer.k_proj.weight.requires_grad_(False)  # only some tensors require grad
    x = torch.randn(2, 13, 32, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.k_proj.weight.grad is None
    for p in (layer.q_proj.weight, layer.v_proj.weight, layer.o_proj.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-5)
