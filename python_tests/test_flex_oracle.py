"""FlexAttention as an independent oracle of routed_attention: its mask_mod reads our route_chunks
indices, so it checks the attention (masking, softmax, GQA) separately from the selection."""
from __future__ import annotations

import warnings

import pytest
import torch

import routing_kernels as rk

pytest.importorskip("torch.nn.attention.flex_attention")
from routing_kernels.ops.routed_attention.flex import flex_routed_attention, routed_block_mask  # noqa: E402


def flex_routed(q, k, v, idx, chunk_size, causal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns when run eagerly
        return flex_routed_attention(q, k, v, routed_block_mask(idx, chunk_size, causal))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_flex_attention_with_our_indices_matches(backend, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 48, h, 16, generator=g) for h in (4, 2, 2))
    idx = rk.route_chunks(q, k, 8, 3, causal=causal, backend="reference")
    o = rk.routed_attention(q, k, v, 8, 3, causal=causal, backend=backend)
    torch.testing.assert_close(o, flex_routed(q, k, v, idx, 8, causal), rtol=1e-4, atol=1e-4)
