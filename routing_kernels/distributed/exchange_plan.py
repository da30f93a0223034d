"""The gate of context-parallel routed attention and the plan of the K/V exchange it implies.

1. Every rank sums its keys over each chunk it holds (chunks are never split) and all-gathers the sums: each
   rank then has every chunk mean of every sequence, bit for bit what one process computes (the same
   ``index_add`` in token order, the same division), and runs the package's reference gate
   (``route_chunks``' ``_select_sequence``) on its own queries at their global positions.
2. The union of the chunks its queries selected that other ranks hold is requested from their owners
   (two small all-to-alls: counts, then chunk ids). The result tells every rank which of its rows to send
   to whom and how many rows it receives from whom.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._layout import accum_dtype
from ..ops.route_chunks.reference import _select_sequence
from .comm import all_gather_rows, all_to_all_rows
from .sharding import ShardPlan

GATE_BLOCK = 2048  # queries scored at once: the gate holds (block, Hq, M) scores, 64 MB at Hq 32, M 256


@dataclass
class ExchangePlan:
    selection: Tensor  # (T_local, Hq, top_k) int64 global chunk ids, -1 padded
    requested: Tensor  # (R,) int64 global ids this rank receives, ordered by owner then id
    send_rows: Tensor  # (rows,) int64 local rows this rank sends, grouped by destination rank
    send_splits: list  # rows sent to each rank
    recv_splits: list  # rows received from each rank
    chunk_start: Tensor  # (total_chunks,) int64 first local row of each chunk this rank holds, else -1
    chunk_len: Tensor  # (total_chunks,) int64 tokens of each chunk


def local_chunk_sums(k: Tensor, plan: ShardPlan, rank: int) -> Tensor:
    """(n_local_chunks, Hkv, D) sums of k (packed local layout) over each local chunk, in accum dtype."""
    lengths = torch.tensor([len_ for len_ in _local_chunk_lengths(plan, rank)], dtype=torch.int64)
    slots = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=k.shape[0]).to(k.device)
    acc = accum_dtype(k.dtype)
    return k.new_zeros((lengths.numel(), *k.shape[1:]), dtype=acc).index_add(0, slots, k.detach().to(acc))


def _local_chunk_lengths(plan: ShardPlan, rank: int) -> list[int]:
    return [end - start for start, end in (plan.chunk_tokens(s, j) for s, j in plan.local_chunks(rank))]


def global_chunk_means(k: Tensor, plan: ShardPlan, rank: int, group=None) -> Tensor:
    """(total_chunks, Hkv, D) means of every chunk of every sequence, from an all-gather of chunk sums."""
    world = plan.world_size
    sums = local_chunk_sums(k, plan, rank)
    width = max(len(plan.local_chunks(r)) for r in range(world))
    padded = sums.new_zeros((width, *sums.shape[1:]))
    padded[: sums.shape[0]] = sums
    gathered = all_gather_rows(padded, "gate_sums", group)
    table = sums.new_zeros((plan.total_chunks, *sums.shape[1:]))
    counts = torch.zeros(plan.total_chunks, dtype=torch.int64)
    for r in range(world):
        ids = torch.tensor([plan.chunk_base[s] + j for s, j in plan.local_chunks(r)], dtype=torch.int64)
        table[ids.to(table.device)] = gathered[r][: ids.numel()]
        counts[ids] = torch.tensor(_local_chunk_lengths(plan, r), dtype=torch.int64)
    shape = (-1,) + (1,) * (table.dim() - 1)
    return table / counts.clamp(min=1).to(table.device).view(shape).to(table.dtype)


def select_local(q: Tensor, means: Tensor, plan: ShardPlan, rank: int, top_k: int, causal: bool) -> Tensor:
    """(T_local, Hq, top_k) int64 GLOBAL chunk ids each local query selects (-1 padded): the single-process
    gate, run on this rank's queries at their positions in their sequences."""
    acc = means.dtype
    out = torch.full((q.shape[0], q.shape[1], top_k), -1, dtype=torch.int64, device=q.device)
    row, c = 0, plan.chunk_size
    for s, pieces in enumerate(plan.pieces[rank]):
        base, m = plan.chunk_base[s], plan.num_chunks[s]
        for a, b in pieces:
            length = plan.chunk_tokens(s, b - 1)[1] - a * c if b > a else 0
            for i in range(0, length, GATE_BLOCK):
                n = min(GATE_BLOCK, length - i)
                sel = _select_sequence(q[row + i: row + i + n].detach().to(acc), means[base: base + m], c, top_k,
                                       causal, offset=a * c + i)
                out[row + i: row + i + n] = torch.where(sel >= 0, sel + base, sel)
            row += length
    return out


def plan_exchange(q: Tensor, k: Tensor, plan: ShardPlan, rank: int, top_k: int, causal: bool,
                  group=None) -> ExchangePlan:
    """Gate + request exchange (collectives: one all-gather of chunk sums, two all-to-alls of chunk ids).
    q, k: this rank's packed local (T_local, H, D) tokens."""
    world, total = plan.world_size, plan.total_chunks
    means = global_chunk_means(k, plan, rank, group)
    selection = select_local(q, means, plan, rank, top_k, causal)
    owner = plan.owner()
    needed = torch.unique(selection[selection >= 0].cpu())
    remote = needed[owner[needed] != rank]
    remote = remote[torch.argsort(owner[remote] * max(total, 1) + remote)]  # by owner, then id
    want = torch.bincount(owner[remote], minlength=world)
    device = k.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    asked = all_to_all_rows(want.to(device), [1] * world, [1] * world, "requests", group).cpu()
    asked_ids = all_to_all_rows(remote.to(device), want.tolist(), asked.tolist(), "requests", group).cpu()

    chunk_len = torch.tensor([e - s for si in range(len(plan.lengths)) for s, e in
                              (plan.chunk_tokens(si, j) for j in range(plan.num_chunks[si]))], dtype=torch.int64)
    chunk_start = torch.full((total,), -1, dtype=torch.int64)
    local_ids = torch.tensor([plan.chunk_base[s] + j for s, j in plan.local_chunks(rank)], dtype=torch.int64)
    if local_ids.numel():
        lens = chunk_len[local_ids]
        chunk_start[local_ids] = lens.cumsum(0) - lens
    send_rows = _rows(chunk_start[asked_ids], chunk_len[asked_ids])
    send_splits = _split_rows(chunk_len[asked_ids], asked.tolist())
    recv_splits = _split_rows(chunk_len[remote], want.tolist())
    return ExchangePlan(selection, remote, send_rows, send_splits, recv_splits, chunk_start, chunk_len)


def _rows(starts: Tensor, lens: Tensor) -> Tensor:
    """Concatenation of arange(start, start + len) for each chunk."""
    if lens.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    total = int(lens.sum())
    first = torch.repeat_interleave(starts - (lens.cumsum(0) - lens), lens, output_size=total)
    return first + torch.arange(total)


def _split_rows(lens: Tensor, chunks_per_rank: list[int]) -> list[int]:
    out, start = [], 0
    for n in chunks_per_rank:
        out.append(int(lens[start:start + n].sum()))
        start += n
    return out
