"""Bad input raises a clear ValueError/TypeError naming the argument, through the public functions
and through torch.ops directly (the ops wrap the errors in their own message but keep ours)."""
from __future__ import annotations

import pytest
import torch

import routing_kernels as rk

X = torch.randn(2, 10, 3, 4)
Q = torch.randn(3, 4)
CU = torch.tensor([0, 4, 10], dtype=torch.int32)
XV = torch.randn(10, 3, 4)

CASES = [
    # (id, call, exception, message fragment)
    ("chunk_size_0", lambda: rk.chunk_mean(X, 0), ValueError, "chunk_size must be >= 1"),
    ("chunk_size_float", lambda: rk.chunk_mean(X, 2.5), TypeError, "chunk_size must be an int"),
    ("x_rank", lambda: rk.chunk_mean(X[0], 4), ValueError, "x must have rank 4"),
    ("x_rank_varlen", lambda: rk.chunk_mean(X, 4, cu_seqlens=CU), ValueError, "x must have rank 3"),
    ("x_int", lambda: rk.chunk_mean(X.long(), 4), TypeError, "x must be float16"),
    ("x_not_tensor", lambda: rk.chunk_mean([1.0], 4), TypeError, "x must be a torch.Tensor"),
    ("cu_dtype", lambda: rk.chunk_mean(XV, 4, cu_seqlens=CU.long()), TypeError, "cu_seqlens must be int32"),
    ("cu_2d", lambda: rk.chunk_mean(XV, 4, cu_seqlens=CU[None]), ValueError, "cu_seqlens must be 1-D"),
    ("cu_start", lambda: rk.chunk_mean(XV, 4, cu_seqlens=CU + 1), ValueError, "cu_seqlens must start at 0"),
    ("cu_end", lambda: rk.chunk_mean(XV[:9], 4, cu_seqlens=CU), ValueError, "must end at the number of tokens"),
    ("cu_decreasing", lambda: rk.chunk_mean(XV, 4, cu_seqlens=torch.tensor([0, 6, 5, 10], dtype=torch.int32)),
     ValueError, "non-decreasing"),
    ("max_seqlen_small", lambda: rk.chunk_mean(XV, 4, cu_seqlens=CU, max_seqlen=3), ValueError,
     "max_seqlen=3 is smaller than the longest sequence"),
    ("query_dtype", lambda: rk.chunk_route(X, Q.double(), 4), TypeError, "query has dtype"),
    ("query_shape", lambda: rk.chunk_route(X, torch.randn(3, 5), 4), ValueError, "query must have shape"),
    ("query_batch", lambda: rk.chunk_route(X, torch.randn(3, 3, 4), 4), ValueError, "query must have shape"),
    ("query_rank", lambda: rk.chunk_route(X, torch.randn(4), 4), ValueError, "query must have rank 2 or 3"),
    ("scale_str", lambda: rk.chunk_route(X, Q, 4, scale="1"), TypeError, "scale must be a float"),
    ("top_k_0", lambda: rk.route_chunks(X, X, 4, 0), ValueError, "top_k must be >= 1"),
    ("gqa_heads", lambda: rk.route_chunks(torch.randn(1, 8, 3, 4), torch.randn(1, 8, 2, 4), 4, 2), ValueError,
     r"heads of q \(3\) must be a multiple of that of k \(2\)"),
    ("k_head_dim", lambda: rk.route_chunks(X, torch.randn(2, 10, 3, 8), 4, 2), ValueError, "k must have the head dim"),
    ("k_shorter_than_q", lambda: rk.route_chunks(X, torch.randn(2, 9, 3, 4), 4, 2), ValueError,
     r"q has more tokens \(10\) than k \(9\)"),
    ("k_batch", lambda: rk.route_chunks(X, torch.randn(3, 10, 3, 4), 4, 2), ValueError, "with q's B = 2"),
    ("v_tokens", lambda: rk.routed_attention(X, X, torch.randn(2, 11, 3, 4), 4, 2), ValueError,
     "v must have the tokens of k"),
    # inference layouts
    ("cu_both_forms", lambda: rk.routed_attention(XV, XV, XV, 4, 2, cu_seqlens=CU, cu_seqlens_q=CU), ValueError,
     "either cu_seqlens"),
    ("cu_k_without_packed_q", lambda: rk.routed_attention(X, XV, XV, 4, 2, cu_seqlens_k=CU), ValueError,
     "cu_seqlens_k needs packed queries"),
    ("cu_k_sequences", lambda: rk.routed_attention(XV, XV, XV, 4, 2, cu_seqlens_q=CU,
                                                   cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)),
     ValueError, "cu_seqlens_k has 1 sequences but cu_seqlens has 2"),
    ("varlen_lq_gt_lk", lambda: rk.routed_attention(XV, XV, XV, 4, 2, cu_seqlens_q=CU,
                                                    cu_seqlens_k=torch.tensor([0, 2, 10], dtype=torch.int32)),
     ValueError, "sequence 0 has 4 queries but only 2 keys"),
    ("cu_k_end", lambda: rk.routed_attention(XV, XV, XV, 4, 2, cu_seqlens_q=CU,
                                             cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)),
     ValueError, "cu_seqlens_k must end at the number of tokens"),
    ("seqused_dtype", lambda: rk.routed_attention(X[:, :1], X, X, 4, 2, seqused_k=torch.tensor([3, 4])), TypeError,
     "seqused_k must be an int32"),
    ("seqused_range", lambda: rk.routed_attention(X[:, :1], X, X, 4, 2,
                                                  seqused_k=torch.tensor([3, 11], dtype=torch.int32)),
     ValueError, r"seqused_k must lie in \[0, capacity = 10\]"),
    ("seqused_too_few", lambda: rk.routed_attention(X[:, :2], X, X, 4, 2,
                                                    seqused_k=torch.tensor([1, 5], dtype=torch.int32)),
     ValueError, "sequence 0 has 2 queries but only 1 keys"),
    ("seqused_rows", lambda: rk.routed_attention(X[:, :1], X, X, 4, 2,
                                                 seqused_k=torch.tensor([3], dtype=torch.int32)), ValueError,
     "2 cache rows and seqused_k 1 entries"),
    ("block_indices_dtype", lambda: rk.routed_attention(X, X, X, 4, 2, block_indices=torch.zeros(2, 10, 3, 2).long()),
     TypeError, "block_indices must be an int32"),
    ("block_indices_shape", lambda: rk.routed_attention(
        X, X, X, 4, 2, block_indices=torch.zeros(2, 10, 3, 3, dtype=torch.int32)), ValueError,
     r"block_indices must have shape \(.., Hq, top_k\) = \(2, 10, 3, 2\)"),
    ("block_indices_range", lambda: rk.routed_attention(
        X, X, X, 4, 2, block_indices=torch.full((2, 10, 3, 2), 3, dtype=torch.int32)), ValueError,
     r"block_indices\[0, 0, 0\] = 3 is not a chunk"),
    ("block_indices_future", lambda: rk.routed_attention(
        X, X, X, 4, 2, block_indices=torch.ones(2, 10, 3, 2, dtype=torch.int32)), ValueError,
     r"block_indices\[0, 0, 0\] = 1 is not a chunk that query 0 of sequence 0 \(position 0"),
    ("v_heads", lambda: rk.routed_attention(X, X, torch.randn(2, 10, 1, 4), 4, 2), ValueError, "v must have the heads"),
    ("v_dtype", lambda: rk.routed_attention(X, X, X.half(), 4, 2), TypeError, "v has dtype"),
    ("backend", lambda: rk.routed_attention(X, X, X, 4, 2, backend="gpu"), ValueError, "backend must be"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_public(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_through_torch_ops():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        torch.ops.routing_kernels.chunk_route(X, Q, 0)
    with pytest.raises(ValueError, match="max_seqlen is required"):
        torch.ops.routing_kernels.chunk_mean(XV, 4, CU)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        torch.ops.routing_kernels.routed_attention(XV, XV, XV, 4, 2, True,
                                                   torch.tensor([0, 7, 3, 10], dtype=torch.int32), 7)


def test_bad_input_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 10, 3, 4)
        with pytest.raises(ValueError, match="top_k must be >= 1"):
            torch.ops.routing_kernels.route_chunks(x, x, 4, 0)
        assert torch.ops.routing_kernels.route_chunks(x, x, 4, 5).shape == (2, 10, 3, 5)


@pytest.mark.gpu
def test_mismatched_devices():
    with pytest.raises(ValueError, match="k is on"):
        rk.route_chunks(X.cuda(), X, 4, 2)
