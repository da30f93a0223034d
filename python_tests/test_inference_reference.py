"""Inference semantics of the references (step 1 of the inference issue): queries shorter than keys,
bottom-right aligned (query i of a sequence with Lq queries and Lk keys sits at t = Lk - Lq + i), and a
caller's own selection (block_indices). The kernels and the public API build on these."""
from __future__ import annotations

import pytest
import torch

import bruteforce as bf
from routing_kernels.ops.route_chunks.reference import route_chunks_ref
from routing_kernels.ops.routed_attention.reference import routed_attention_backward_ref, routed_attention_ref

F64 = dict(rtol=1e-10, atol=1e-10)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cu(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)


# (id, q lengths, k lengths, chunk_size): decode (1 query), short chunked-prefill pieces, Lq == Lk, empty
# sequences, a piece ending exactly on a chunk boundary and one just past it.
VARLEN = [
    ("decode", [1, 1, 1, 1], [1, 4, 5, 13], 4),
    ("prefill_pieces", [3, 7, 0, 5], [3, 12, 6, 5], 4),
    ("boundary", [4, 1, 2], [8, 9, 17], 4),
    ("empty_k", [0, 2], [0, 9], 3),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", VARLEN, ids=[c[0] for c in VARLEN])
def test_varlen_q_shorter_than_k_matches_bruteforce(case, causal):
    _, lq, lk, cs = case
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, k, v = _rand(sum(lq), 4, 8, seed=0), _rand(sum(lk), 2, 8, seed=1), _rand(sum(lk), 2, 5, seed=2)
    kw = dict(cu_seqlens_k=cu_k, max_seqlen_k=max(lk))
    idx = route_chunks_ref(q, k, cs, 3, causal, cu_q, max(lq), **kw)
    torch.testing.assert_close(idx.long(), bf.route_chunks(q, k, cs, 3, causal, cu_q, cu_k), rtol=0, atol=0)
    o, lse = routed_attention_ref(q, k, v, cs, 3, causal, cu_q, max(lq), 0.3, **kw)
    torch.testing.assert_close((o, lse), bf.routed_attention(q, k, v, cs, 3, causal, cu_q, 0.3, cu_k), **F64)


@pytest.mark.parametrize("nq", [1, 5, 13], ids=lambda n: f"Nq{n}")
def test_dense_q_shorter_than_k_matches_bruteforce(nq):
    q, k, v = _rand(2, nq, 4, 8, seed=0), _rand(2, 13, 1, 8, seed=1), _rand(2, 13, 1, 8, seed=2)
    o, lse = routed_attention_ref(q, k, v, 4, 2, True)
    torch.testing.assert_close((o, lse), bf.routed_attention(q, k, v, 4, 2, True), **F64)


def test_decode_and_chunked_prefill_equal_the_full_sequence_rows():
    """The invariant everything leans on: position t gives the same selection (exactly) and output whether
    it is computed with the whole sequence, decoded against t + 1 keys, or in a prefill piece."""
    n, cs = 23, 4
    q, k, v = _rand(1, n, 4, 8, seed=0), _rand(1, n, 2, 8, seed=1), _rand(1, n, 2, 8, seed=2)
    full_idx = route_chunks_ref(q, k, cs, 3)
    full_o, full_lse = routed_attention_ref(q, k, v, cs, 3)
    for t in range(n):  # decode: one query against the first t + 1 keys
        idx = route_chunks_ref(q[:, t:t + 1], k[:, :t + 1], cs, 3)
        assert torch.equal(idx, full_idx[:, t:t + 1]), t
        o, lse = routed_attention_ref(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], cs, 3)
        torch.testing.assert_close((o, lse), (full_o[:, t:t + 1], full_lse[:, t:t + 1]), **F64)
    for piece in (1, 7, 64):  # chunked prefill
        for start in range(0, n, piece):
            end = min(start + piece, n)
            o, _ = routed_attention_ref(q[:, start:end], k[:, :end], v[:, :end], cs, 3)
            torch.testing.assert_close(o, full_o[:, start:end], **F64)


def test_top_k_covering_everything_is_bottom_right_causal_dense_attention():
    nq, nk = 5, 14
    q, k, v = _rand(1, nq, 2, 8, seed=0), _rand(1, nk, 2, 8, seed=1), _rand(1, nk, 2, 8, seed=2)
    o, _ = routed_attention_ref(q, k, v, 4, 100, True)
    mask = torch.arange(nk)[None, :] <= (nk - nq + torch.arange(nq))[:, None]  # bottom-right aligned
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(o, want, **F64)


def test_block_indices_from_the_gate_reproduce_the_op_forward_and_backward():
    lq, lk = [3, 1, 6], [7, 9, 6]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, k, v = _rand(sum(lq), 4, 8, seed=0), _rand(sum(lk), 2, 8, seed=1), _rand(sum(lk), 2, 8, seed=2)
    kw = dict(cu_seqlens_k=cu_k, max_seqlen_k=max(lk))
    idx = route_chunks_ref(q, k, 3, 2, True, cu_q, max(lq), **kw)
    shuffled = idx.flip(-1)  # any order: the selection is a set
    got = routed_attention_ref(q, k, v, 3, 2, True, cu_q, max(lq), **kw, block_indices=shuffled)
    want = routed_attention_ref(q, k, v, 3, 2, True, cu_q, max(lq), **kw)
    torch.testing.assert_close(got, want, **F64)
    do, dlse = _rand(*got[0].shape, seed=3), _rand(*got[1].shape, seed=4)
    torch.testing.assert_close(
        routed_attention_backward_ref(do, dlse, q, k, v, got[0], 3, 2, True, cu_q, max(lq), **kw,
                                      block_indices=shuffled),
        routed_attention_backward_ref(do, dlse, q, k, v, want[0], 3, 2, True, cu_q, max(lq), **kw), **F64)


def test_backward_with_q_shorter_than_k_matches_autograd_of_a_dense_masked_softmax():
    nq, nk, cs = 6, 11, 4
    q, k, v = (t.requires_grad_() for t in (_rand(1, nq, 2, 8, seed=0), _rand(1, nk, 1, 8, seed=1),
                                             _rand(1, nk, 1, 8, seed=2)))
    idx = route_chunks_ref(q, k, cs, 2)
    o, lse = routed_attention_ref(q, k, v, cs, 2)
    do, dlse = _rand(*o.shape, seed=3), _rand(*lse.shape, seed=4)
    got = routed_attention_backward_ref(do, dlse, q, k, v, o, cs, 2)
    # Autograd through a dense masked softmax built from the selection: an independent derivation.
    pos = nk - nq + torch.arange(nq)
    picked = (torch.arange(nk)[None, None, :] // cs == idx[0].long()[..., None]).any(-2)  # (Nq, Hq, Nk)
    allowed = picked.permute(1, 0, 2) & (torch.arange(nk)[None, :] <= pos[:, None])
    scores = 8 ** -0.5 * torch.einsum("thd,jd->htj", q[0], k[0, :, 0]).masked_fill(~allowed, float("-inf"))
    lse2 = scores.logsumexp(-1)
    o2 = torch.einsum("htj,jd->thd", (scores - lse2[..., None]).exp(), v[0, :, 0])
    want = torch.autograd.grad((o2[None], lse2.T[None]), (q, k, v), (do, dlse))
    torch.testing.assert_close(got, want, **F64)


def test_a_row_selecting_nothing_visible_is_zero_with_lse_minus_inf():
    q, k, v = _rand(1, 1, 1, 4, seed=0), _rand(1, 8, 1, 4, seed=1), _rand(1, 8, 1, 4, seed=2)
    none = torch.full((1, 1, 1, 2), -1, dtype=torch.int32)
    o, lse = routed_attention_ref(q, k, v, 4, 2, True, block_indices=none)
    assert torch.equal(o, torch.zeros_like(o)) and lse.item() == float("-inf")
    torch.testing.assert_close((o, lse), bf.routed_attention(q, k, v, 4, 2, True, block_indices=none), **F64)
