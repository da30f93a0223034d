"""FlexAttention as an independent oracle of routed_attention: its mask_mod reads our route_chunks
indices, so it checks the attention (masking, softmax, GQA) separately from the selection."""
from __future__ import annotations

import warnings

import pytest
import torch

import routing_kernels as rk

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def flex_routed(q, k, v, idx, chunk_size, causal):
    """q (B, N, Hq, D), k/v (B, N, Hkv, D), idx (B, N, Hq, top_k) -> (B, N, Hq, D)."""
    b, n, hq, _ = q.shape
    m = -(-n // chunk_size)
    table = torch.zeros(b, hq, n, m + 1, dtype=torch.bool)
    table.scatter_(-1, idx.permute(0, 2, 1, 3).long().masked_fill(idx.permute(0, 2, 1, 3) < 0, m), True)

    def mask_mod(bi, h, qi, kv):
        keep = table[bi, h, qi, kv // chunk_size]
        return keep & (kv <= qi) if causal else keep

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = flex.create_block_mask(mask_mod, b, hq, n, n, device="cpu", BLOCK_SIZE=chunk_size)
        o = flex.flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                                enable_gqa=hq != k.shape[2])
    return o.transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_flex_attention_with_our_indices_matches(backend, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 48, h, 16, generator=g) for h in (4, 2, 2))
    idx = rk.route_chunks(q, k, 8, 3, causal=causal, backend="reference")
    o = rk.routed_attention(q, k, v, 8, 3, causal=causal, backend=backend)
    torch.testing.assert_close(o, flex_routed(q, k, v, idx, 8, causal), rtol=1e-4, atol=1e-4)
