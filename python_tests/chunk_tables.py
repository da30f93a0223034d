"""Chunk tables for the dynamic-chunking tests: the boundary cases every table kernel must get right.

A case is (id, lengths, rule). ``make_table`` turns it into packed ``x`` plus (cu_seqlens, cu_chunks,
seq_chunks, max_chunks) built by plain Python loops, independent of the library's own helpers."""
from __future__ import annotations

import random

import torch

# rule: ("size", C) uniform chunks of C; ("random", mean) sizes drawn in [1, 2*mean]; ("ones",) every token
# its own chunk; ("whole",) each sequence one chunk; ("skewed",) sizes 1 and ~1000x larger mixed.
TABLE_CASES = [
    ("uniform4_empty_mid", [7, 0, 16, 3], ("size", 4)),
    ("random_mean3", [13, 2, 17], ("random", 3)),
    ("ones", [5, 0, 6], ("ones",)),
    ("whole_seq", [9, 1, 0, 12], ("whole",)),
    ("empty_ends", [0, 11, 0], ("random", 4)),
    ("all_empty", [0, 0], ("size", 2)),
    ("single_token", [1], ("ones",)),
    ("skewed_1000x", [1003, 4], ("skewed",)),
]
TABLE_IDS = [c[0] for c in TABLE_CASES]


def chunk_sizes(length: int, rule, rng: random.Random) -> list[int]:
    kind = rule[0]
    if kind == "size":
        return [min(rule[1], length - a) for a in range(0, length, rule[1])]
    if kind == "ones":
        return [1] * length
    if kind == "whole":
        return [length] if length else []
    sizes = []
    while sum(sizes) < length:
        if kind == "random":
            want = rng.randint(1, 2 * rule[1])
        else:  # skewed: mostly single tokens, then one chunk a thousand times longer
            want = 1000 if len(sizes) == 2 else 1
        sizes.append(min(want, length - sum(sizes)))
    return sizes


def make_table(lengths, rule, heads, dim, dtype=torch.float32, seed=0, device="cpu"):
    """Packed x (T, H, D) and its chunk table: (x, cu_seqlens, cu_chunks, seq_chunks, max_chunks)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    bounds, firsts, starts, most = [0], [], [0], 0
    for length in lengths:
        firsts.append(len(bounds) - 1)
        sizes = chunk_sizes(length, rule, rng)
        most = max(most, len(sizes))
        for size in sizes:
            bounds.append(bounds[-1] + size)
        starts.append(starts[-1] + length)
    firsts.append(len(bounds) - 1)
    x = torch.randn(sum(lengths), heads, dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return x, as_i32(starts), as_i32(bounds), as_i32(firsts), most
