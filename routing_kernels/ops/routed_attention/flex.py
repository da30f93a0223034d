"""FlexAttention with a block mask built from our route_chunks indices: an independent oracle of
routed_attention (tests) and the baseline a user would otherwise write (benchmarks, which time the mask
construction too, since a user pays it per layer). Not a backend: it needs O(Hq * N * M) mask memory."""
from __future__ import annotations

import torch
from torch import Tensor


def routed_block_mask(indices: Tensor, chunk_size: int, causal: bool = True, compile_mask: bool = False):
    """indices (B, N, Hq, top_k) from route_chunks -> a flex_attention BlockMask with blocks of chunk_size."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, n, hq, _ = indices.shape
    m = -(-n // chunk_size)
    sel = indices.permute(0, 2, 1, 3).long()
    table = torch.zeros(b, hq, n, m + 1, dtype=torch.bool, device=indices.device)
    table.scatter_(-1, sel.masked_fill(sel < 0, m), True)  # padding (-1) lands in the spare column

    def mask_mod(bi, h, qi, kv):
        keep = table[bi, h, qi, kv // chunk_size]
        return keep & (kv <= qi) if causal else keep

    return create_block_mask(mask_mod, b, hq, n, n, device=indices.device, BLOCK_SIZE=chunk_size,
                             _compile=compile_mask)


def flex_routed_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, scale=None, attention=None) -> Tensor:
    """q (B, N, Hq, D), k/v (B, N, Hkv, D) -> (B, N, Hq, Dv) with flex_attention (or a compiled copy)."""
    if attention is None:
        from torch.nn.attention.flex_attention import flex_attention as attention
    o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
                  enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)
