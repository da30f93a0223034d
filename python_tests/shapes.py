"""The awkward-shape grid shared by the tests. Every case is (id, layout) where layout is a dict:
dense: {"B", "N"}; varlen: {"lengths"}. Heads and dims are chosen per test."""
from __future__ import annotations

import torch

# (id, layout, chunk_size): each one exercises a boundary the kernels must get right.
LAYOUTS = [
    ("N1", {"B": 2, "N": 1}, 4),                       # a single token: one short chunk
    ("N_lt_chunk", {"B": 1, "N": 5}, 8),               # shorter than one chunk
    ("N_eq_chunk_plus1", {"B": 2, "N": 9}, 8),         # one full chunk + a 1-token chunk
    ("N_prime", {"B": 1, "N": 13}, 4),                 # prime length, short last chunk
    ("chunk1", {"B": 1, "N": 6}, 1),                   # every token its own chunk
    ("N_multiple", {"B": 3, "N": 16}, 4),              # exact multiple
    ("N0", {"B": 2, "N": 0}, 4),                       # empty sequences, dense
    ("varlen_empty_mid", {"lengths": [7, 0, 16, 3]}, 4),  # empty sequence between others
    ("varlen_empty_ends", {"lengths": [0, 11, 0]}, 5),    # empty at both ends
    ("varlen_single", {"lengths": [1]}, 3),
    ("varlen_all_empty", {"lengths": [0, 0]}, 2),
    ("varlen_prime", {"lengths": [13, 2, 17]}, 6),
]
LAYOUT_IDS = [c[0] for c in LAYOUTS]


def make(layout, heads, dim, dtype=torch.float32, seed=0, device="cpu"):
    """Random tensor in the layout and its (cu_seqlens, max_seqlen) (None, None for dense)."""
    g = torch.Generator().manual_seed(seed)
    if "lengths" in layout:
        lengths = layout["lengths"]
        cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
        x = torch.randn(sum(lengths), heads, dim, generator=g, dtype=torch.float64)
        return x.to(device=device, dtype=dtype), cu.to(device), max(lengths, default=0)
    x = torch.randn(layout["B"], layout["N"], heads, dim, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), None, None


def num_seqs(layout):
    return len(layout["lengths"]) if "lengths" in layout else layout["B"]


# The CUDA chunk kernels' grid (test_cuda_chunk_route.py on a GPU, test_cuda_emu_chunk_route.py under the host
# emulation): (id, layout, chunk_size), the boundaries the per-chunk work items must get right.
CUDA_CASES = [
    ("dense_ragged_tail", {"B": 2, "N": 37}, 8),             # N not a multiple of chunk_size: short last chunk
    ("dense_chunk1", {"B": 1, "N": 19}, 1),                  # every token its own chunk
    ("dense_chunk_gt_N", {"B": 2, "N": 5}, 16),              # a single chunk shorter than chunk_size
    ("dense_N0", {"B": 2, "N": 0}, 4),                       # no tokens: early return, zero summary
    ("varlen_empty_mid", {"lengths": [7, 0, 33, 1]}, 4),     # an empty sequence: zero weights and summary
    ("varlen_chunk1", {"lengths": [0, 5, 9]}, 1),
    ("varlen_chunk_gt_max", {"lengths": [3, 0, 6]}, 64),     # chunk_size beyond every sequence
    ("varlen_all_empty", {"lengths": [0, 0]}, 2),            # T = 0 with M > 0
]
# Two heads with a shared query and three with one query per sequence: with H = 2, D = 100 in fp16/bf16
# (and D = 1 in fp64) a 16-byte vector straddles two heads; H = 3 makes most rows odd: the scalar path.
CUDA_HEADS = [(2, True), (3, False)]
