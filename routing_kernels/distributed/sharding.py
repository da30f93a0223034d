"""How the tokens of every sequence are split over the ranks of a context-parallel group.

Every sequence is cut on chunk boundaries, so a chunk (the unit the gate scores and the exchange moves) lives
whole on one rank. ``contiguous``: rank r holds chunks [r*M//W, (r+1)*M//W) of each sequence (M chunks, W
ranks). ``zigzag`` (load balance for causal attention, where late chunks cost more): the chunks are cut in 2W
pieces and rank r holds pieces r and 2W-1-r. A rank's local tokens are, sequence after sequence, its pieces in
order: that packed layout is described by :meth:`ShardPlan.local_cu_seqlens`.

Only the global chunk M-1 of a sequence can be partial, and it is always the last local chunk of the rank
that holds it (its piece is that rank's last non-empty one); the attention module relies on it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._layout import ceil_div

LAYOUTS = ("contiguous", "zigzag")


class ShardPlan:
    """The split of sequences of ``lengths`` tokens over ``world_size`` ranks in chunks of ``chunk_size``.

    Global chunk ids number the chunks of all sequences one after the other: sequence s's chunk j is
    ``chunk_base[s] + j``. Everything here is plain Python / CPU int64 tensors, computed once per call.
    """

    def __init__(self, lengths: list[int], chunk_size: int, world_size: int, layout: str = "contiguous"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.lengths, self.chunk_size, self.world_size, self.layout = list(lengths), chunk_size, world_size, layout
        self.num_chunks = [ceil_div(n, chunk_size) for n in self.lengths]
        self.chunk_base = [0]
        for m in self.num_chunks:
            self.chunk_base.append(self.chunk_base[-1] + m)
        # pieces[r][s]: the (first, end) global-within-sequence chunk ranges rank r holds of sequence s.
        self.pieces = [[self._pieces_of(r, m) for m in self.num_chunks] for r in range(world_size)]

    def _pieces_of(self, rank: int, m: int) -> list[tuple[int, int]]:
        w = self.world_size
        if self.layout == "contiguous":
            return [(rank * m // w, (rank + 1) * m // w)]
        cut = [i * m // (2 * w) for i in range(2 * w + 1)]
        return [(cut[rank], cut[rank + 1]), (cut[2 * w - 1 - rank], cut[2 * w - rank])]

    @property
    def total_chunks(self) -> int:
        return self.chunk_base[-1]

    def chunk_tokens(self, s: int, j: int) -> tuple[int, int]:
        """Token range [start, end) of chunk j inside sequence s."""
        return j * self.chunk_size, min((j + 1) * self.chunk_size, self.lengths[s])

    def local_lengths(self, rank: int) -> list[int]:
        return [sum(self.chunk_tokens(s, b - 1)[1] - a * self.chunk_size for a, b in pcs if b > a)
                for s, pcs in enumerate(self.pieces[rank])]

    def local_cu_seqlens(self, rank: int, device=None) -> Tensor:
        """int32 (S+1,) offsets of rank's local packed tokens."""
        cu = torch.tensor([0] + self.local_lengths(rank), dtype=torch.int64).cumsum(0)
        return cu.to(device=device, dtype=torch.int32)

    def local_chunks(self, rank: int) -> list[tuple[int, int]]:
        """(sequence, chunk within it) of every chunk rank holds, in local order."""
        return [(s, j) for s, pcs in enumerate(self.pieces[rank]) for a, b in pcs for j in range(a, b)]

    def owner(self) -> Tensor:
        """int64 (total_chunks,): the rank holding each global chunk."""
        out = torch.empty(self.total_chunks, dtype=torch.int64)
        for r in range(self.world_size):
            for s, j in self.local_chunks(r):
                out[self.chunk_base[s] + j] = r
        return out

    def token_index(self, rank: int) -> Tensor:
        """int64 (T_local,): for every local token, its index in the full packed batch."""
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n)
        parts = [torch.arange(starts[s] + a * self.chunk_size, starts[s] + self.chunk_tokens(s, b - 1)[1])
                 for s, pcs in enumerate(self.pieces[rank]) for a, b in pcs if b > a]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def make_plan(chunk_size: int, world_size: int, *, cu_seqlens: Optional[Tensor] = None,
              seqlen: Optional[int] = None, batch: int = 1, layout: str = "contiguous") -> ShardPlan:
    """The plan for a varlen batch (global ``cu_seqlens``, int32 (S+1,)) or a dense one (``batch`` sequences of
    ``seqlen`` tokens). Reads cu_seqlens on the host (one sync on GPU)."""
    if cu_seqlens is not None:
        lengths = cu_seqlens.detach().to("cpu", torch.int64).diff().tolist()
    else:
        lengths = [int(seqlen)] * batch
    return ShardPlan(lengths, chunk_size, world_size, layout)


def shard(x: Tensor, chunk_size: int, world_size: int, rank: int, *, cu_seqlens: Optional[Tensor] = None,
          layout: str = "contiguous") -> Tensor:
    """Rank's shard of a full batch.

    Args:
        x: (B, N, ..) dense or packed (T, ..) with ``cu_seqlens`` int32 (S+1,) (the global offsets).
        chunk_size, world_size, rank, layout: the split (see the module docstring).
    Returns:
        (B, N_r, ..) or (T_r, ..): the rank's tokens in local order; varlen offsets from
        ``make_plan(...).local_cu_seqlens(rank)``.
    Example:
        >>> x = torch.randn(2, 1000, 4, 64)
        >>> shard(x, 128, 4, 1).shape          # chunks [2, 4) of 8
        torch.Size([2, 256, 4, 64])
        >>> cu = torch.tensor([0, 700, 700, 1000], dtype=torch.int32)
        >>> shard(torch.randn(1000, 4, 64), 128, 4, 0, cu_seqlens=cu, layout="zigzag").shape
        torch.Size([256, 4, 64])
    """
    plan = make_plan(chunk_size, world_size, cu_seqlens=cu_seqlens,
                     seqlen=None if cu_seqlens is not None else x.shape[1], layout=layout)
    index = plan.token_index(rank).to(x.device)
    return x[index] if cu_seqlens is not None else x[:, index]  # dense: one sequence's split, for every row


def unshard(local: Tensor, chunk_size: int, *, cu_seqlens: Optional[Tensor] = None, seqlen: Optional[int] = None,
            layout: str = "contiguous", group=None) -> Tensor:
    """The full batch from every rank's shard (an all-gather; every rank of ``group`` must call it).

    Args:
        local: this rank's (B, N_r, ..) or (T_r, ..) shard, as :func:`shard` makes it.
        cu_seqlens: the global int32 offsets for varlen; ``seqlen``: the full N for a dense batch.
    Returns:
        (B, N, ..) or (T, ..) on every rank. Not differentiable.
    """
    import torch.distributed as dist
    world = dist.get_world_size(group)
    dense = cu_seqlens is None
    if dense and seqlen is None:
        raise ValueError("unshard of a dense batch needs seqlen (the full sequence length)")
    plan = make_plan(chunk_size, world, cu_seqlens=cu_seqlens, seqlen=seqlen, layout=layout)
    flat = local.transpose(0, 1) if dense else local  # tokens first: (N_r, B, ..)
    index = [plan.token_index(r) for r in range(world)]
    width = max(i.numel() for i in index)
    padded = flat.new_zeros((width, *flat.shape[1:]))
    padded[: flat.shape[0]] = flat
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    full = flat.new_zeros((seqlen if dense else sum(plan.lengths), *flat.shape[1:]))
    for r in range(world):
        full[index[r].to(full.device)] = gathered[r][: index[r].numel()]
    return full.transpose(0, 1) if dense else full
