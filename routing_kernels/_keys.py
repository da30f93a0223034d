"""Where the keys of the attention ops are, when they are not laid out like the queries (inference).

Three layouts of k (and v) besides "like q":
- dense q (B, Nq, ..) with dense k (B, Nk, ..), Nq <= Nk: the queries are the last Nq positions;
- packed q (cu_seqlens) with packed k (cu_seqlens_k, max_seqlen_k), sequence by sequence Lq <= Lk;
- any q with a dense cache k (B, capacity, ..) of which row b holds ``seqused_k[b]`` valid keys (the KV cache
  layout of flash-attn's ``cache_seqlens``); with packed q, B is the number of sequences.
Query i of a sequence with Lq queries and Lk keys sits at position Lk - Lq + i (bottom-right aligned).
The metadata checks here are safe under fake tensors; the value checks read tensors (a device sync on GPU),
so the ops run them on CPU tensors, or in debug mode.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._validation import _fail, check_cu_seqlens_shape, check_int


class Keys(NamedTuple):
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_k: Optional[int] = None
    seqused_k: Optional[Tensor] = None

    @property
    def like_q(self) -> bool:
        return self.cu_seqlens_k is None and self.seqused_k is None


def num_seqs(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def check_key_layout(name: str, k: Tensor, q: Tensor, cu_seqlens: Optional[Tensor], keys: Keys) -> None:
    """Shapes of k (or v, by ``name``) against q for the layout ``keys`` describes (tensor checks done)."""
    cu_k, max_k, used = keys
    if cu_k is not None and used is not None:
        _fail("pass either cu_seqlens_k (packed keys) or seqused_k (a dense cache), not both")
    if used is not None:
        if not isinstance(used, Tensor) or used.dtype != torch.int32 or used.dim() != 1:
            _fail(f"seqused_k must be an int32 tensor of shape (B,), got "
                  f"{getattr(used, 'dtype', type(used).__name__)} {tuple(getattr(used, 'shape', ()))}", TypeError)
        if used.device != q.device:
            _fail(f"seqused_k is on {used.device} but the inputs are on {q.device}")
        if k.dim() != 4:
            _fail(f"{name} must be a dense cache (B, capacity, H, D) with seqused_k, got shape {tuple(k.shape)}")
        if k.shape[0] != num_seqs(q, cu_seqlens) or used.shape[0] != k.shape[0]:
            _fail(f"{name} has {k.shape[0]} cache rows and seqused_k {used.shape[0]} entries, but q has "
                  f"{num_seqs(q, cu_seqlens)} sequences")
        return
    if cu_k is not None:
        if cu_seqlens is None:
            _fail("cu_seqlens_k needs packed queries too (cu_seqlens or cu_seqlens_q)")
        check_cu_seqlens_shape(cu_k, max_k, k, name="cu_seqlens_k", max_name="max_seqlen_k")
        if cu_k.shape != cu_seqlens.shape:
            _fail(f"cu_seqlens_k has {cu_k.shape[0] - 1} sequences but cu_seqlens has {cu_seqlens.shape[0] - 1}")
        if k.dim() != 3:
            _fail(f"{name} must be packed (T_k, H, D) with cu_seqlens_k, got shape {tuple(k.shape)}")
        return
    if cu_seqlens is not None:
        if k.dim() != 3 or k.shape[0] != q.shape[0]:
            _fail(f"{name} must be packed like q, ({q.shape[0]}, H, D), got shape {tuple(k.shape)}")
        return
    if k.dim() != 4 or k.shape[0] != q.shape[0]:
        _fail(f"{name} must be (B, N_k, H, D) with q's B = {q.shape[0]}, got shape {tuple(k.shape)}")
    if k.shape[1] < q.shape[1]:
        _fail(f"q has more tokens ({q.shape[1]}) than {name} ({k.shape[1]}): the queries are the last positions "
              f"of the keys' sequence, so q_len <= k_len")


def check_key_values(q: Tensor, k: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int],
                     keys: Keys) -> None:
    """Data checks (read tensors): every sequence has at least as many keys as queries; offsets are sane."""
    cu_k, max_k, used = keys
    if cu_seqlens is None and used is None:
        return  # dense: the shapes said it all
    q_lens = (torch.full((q.shape[0],), q.shape[1], dtype=torch.int64) if cu_seqlens is None
              else cu_seqlens.detach().to("cpu", torch.int64).diff())
    if used is not None:
        k_lens = used.detach().to("cpu", torch.int64)
        if (k_lens < 0).any() or (k_lens > k.shape[1]).any():
            _fail(f"seqused_k must lie in [0, capacity = {k.shape[1]}], got {k_lens.tolist()}")
    elif cu_k is not None:
        k_lens = cu_k.detach().to("cpu", torch.int64).diff()
    else:
        return  # packed keys like q
    short = (q_lens > k_lens).nonzero().flatten().tolist()
    if short:
        s = short[0]
        _fail(f"sequence {s} has {q_lens[s].item()} queries but only {k_lens[s].item()} keys: the queries are the "
              f"last positions of the keys' sequence, so q_len <= k_len")


def longest_keys(k: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], keys: Keys) -> int:
    """An upper bound of any sequence's key count, known from shapes and arguments (no sync)."""
    if keys.seqused_k is not None:
        return k.shape[1]
    if keys.cu_seqlens_k is not None:
        return keys.max_seqlen_k
    return k.shape[1] if cu_seqlens is None else max_seqlen


def check_block_indices(block_indices: Tensor, q: Tensor, top_k: int) -> None:
    """Metadata of a caller's selection: int32 (.., Hq, top_k) in q's layout."""
    if not isinstance(block_indices, Tensor) or block_indices.dtype != torch.int32:
        _fail(f"block_indices must be an int32 tensor, got {getattr(block_indices, 'dtype', type(block_indices))}",
              TypeError)
    if block_indices.device != q.device:
        _fail(f"block_indices is on {block_indices.device} but the inputs are on {q.device}")
    check_int("top_k", top_k, 1)
    want = (*q.shape[:-1], top_k)
    if tuple(block_indices.shape) != want:
        _fail(f"block_indices must have shape (.., Hq, top_k) = {want}, got {tuple(block_indices.shape)}")


def check_block_index_values(block_indices: Tensor, q: Tensor, k: Tensor, chunk_size: int, causal: bool,
                             cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], keys: Keys) -> None:
    """Every entry is -1 or a chunk of the sequence's keys that the query may see: its own chunk, or (causal)
    one that ends at or before its position, (j + 1) * chunk_size <= t."""
    from .ops.route_chunks.reference import pack_qk, spans
    pq, pk = pack_qk(q, k, cu_seqlens, max_seqlen, *keys)
    sel = block_indices.detach().to("cpu", torch.int64).reshape(pq.data.shape[0], *block_indices.shape[-2:])
    for s, (qs, qe, ks, ke) in enumerate(spans(pq, pk)):
        if qe == qs:
            continue
        pos = (ke - ks) - (qe - qs) + torch.arange(qe - qs)  # (Lq,)
        j = sel[qs:qe]  # (Lq, Hq, top_k)
        num_chunks = -(-(ke - ks) // chunk_size)
        valid = (j == -1) | ((j >= 0) & (j < num_chunks))
        if causal:
            t = pos[:, None, None]
            valid &= (j == -1) | (j == t // chunk_size) | ((j + 1) * chunk_size <= t)
        if not valid.all():
            i, h, slot = (valid == 0).nonzero()[0].tolist()
            _fail(f"block_indices[{qs + i}, {h}, {slot}] = {j[i, h, slot].item()} is not a chunk that query "
                  f"{i} of sequence {s} (position {pos[i].item()}, {num_chunks} chunks"
                  f"{', causal' if causal else ''}) may attend to; use -1 for no chunk")
