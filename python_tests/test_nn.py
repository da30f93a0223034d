"""routing_kernels.nn.ChunkRouter: one batched encoder call, padding, gradients, torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch import nn

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
