"""The collectives of context-parallel routed attention, each counting the bytes this rank sends.

Counting: the payload this rank hands to OTHER ranks (what leaves the process), per named step. An
all-gather of n bytes counts (W - 1) * n (every other rank receives the n bytes, whatever the algorithm
underneath); an all-to-all counts the bytes of the splits addressed to other ranks.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommLog:
    """Bytes this rank sent, per step name (``"gate_sums"``, ``"kv"``, ``"dkv"``, ...), and the calls made."""

    bytes_sent: dict = field(default_factory=dict)
    collectives: int = 0

    def add(self, step: str, nbytes: int) -> None:
        self.bytes_sent[step] = self.bytes_sent.get(step, 0) + int(nbytes)
        self.collectives += 1

    @property
    def total(self) -> int:
        return sum(self.bytes_sent.values())


_LOGS: list[CommLog] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[CommLog]:
    """Record the bytes this rank sends inside the block (forward and backward alike).

    Example:
        >>> with count_bytes() as log:
        ...     o = context_parallel_routed_attention(q, k, v, 512, 8)
        ...     o.sum().backward()
        >>> log.bytes_sent   # {'check': .., 'gate_sums': .., 'requests': .., 'kv': .., 'dkv': ..}
    """
    log = CommLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _record(step: str, nbytes: int) -> None:
    for log in _LOGS:
        log.add(step, nbytes)


def all_gather_rows(x: Tensor, step: str, group=None) -> list[Tensor]:
    """Every rank's x (same shape on every rank): a list of W tensors."""
    world = dist.get_world_size(group)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous(), group=group)
    _record(step, (world - 1) * x.numel() * x.element_size())
    return out


def all_to_all_rows(x: Tensor, send_splits: list[int], recv_splits: list[int], step: str, group=None) -> Tensor:
    """Rows x[sum(send_splits[:r]) : ..+send_splits[r]] go to rank r; returns the rows received, by source."""
    rank = dist.get_rank(group)
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    wire, out_wire = x.contiguous(), out
    if x.device.type == "cpu" and x.dim() > 1:
        # gloo moves bytes, but its all-to-all refuses some dtypes (bf16, int16): send the rows as raw bytes
        wire, out_wire = wire.view(torch.uint8), out.view(torch.uint8)
    dist.all_to_all_single(out_wire, wire, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    row = math.prod(x.shape[1:]) * x.element_size() if x.dim() > 1 else x.element_size()
    _record(step, sum(n for r, n in enumerate(send_splits) if r != rank) * row)
    return out


def agree(descriptor: list[int], error: Optional[str], names: list[str], group=None) -> Tensor:
    """Every rank shares (error flag, descriptor); raises ValueError on EVERY rank when any rank had an error or
    the ranks disagree on a field that must be equal (names[i] labels descriptor[i]; a name starting with '~'
    may differ). Returns the gathered descriptors (W, len) int64. One small all-gather; no rank can hang in a
    later collective because another raised first."""
    mine = torch.tensor([0 if error is None else 1] + descriptor, dtype=torch.int64)
    table = torch.stack(all_gather_rows(_to_group_device(mine, group), "check", group)).cpu()
    bad = table[:, 0].nonzero().flatten().tolist()
    if bad:
        detail = f": {error}" if error is not None else ""
        raise ValueError(f"context_parallel_routed_attention: bad input on rank(s) {bad}{detail}")
    for i, name in enumerate(names):
        if not name.startswith("~") and not (table[:, i + 1] == table[0, i + 1]).all():
            raise ValueError(f"context_parallel_routed_attention: the ranks disagree on {name} "
                             f"({table[:, i + 1].tolist()}); every rank must pass the same value")
    return table[:, 1:]


def _to_group_device(x: Tensor, group) -> Tensor:
    """NCCL needs CUDA tensors, gloo CPU ones."""
    backend = dist.get_backend(group)
    return x.cuda() if backend == "nccl" else x


class ExchangeRows(torch.autograd.Function):
    """Forward: send ``x[send_rows]`` (split by destination) and return the rows received (by source).
    Backward: the reverse all-to-all brings the gradients of the rows this rank sent back; they are summed
    into their rows source by source, in rank order (a fixed order, and within one source the rows are
    distinct: deterministic)."""

    @staticmethod
    def forward(ctx, x: Tensor, send_rows: Tensor, send_splits: list[int], recv_splits: list[int], group):
        ctx.save_for_backward(send_rows)
        ctx.shape, ctx.splits, ctx.group = x.shape, (send_splits, recv_splits), group
        return all_to_all_rows(x[send_rows], send_splits, recv_splits, "kv", group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (send_rows,) = ctx.saved_tensors
        send_splits, recv_splits = ctx.splits
        back = all_to_all_rows(grad, recv_splits, send_splits, "dkv", ctx.group)
        dx = grad.new_zeros(ctx.shape)
        start = 0
        for n in send_splits:
            rows = send_rows[start:start + n]
            dx[rows] += back[start:start + n]
            start += n
        return dx, None, None, None, None
