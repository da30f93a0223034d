// Where the chunks of a launch lie, for the CUDA chunk_route / chunk_mean kernels: one kernel body serves two
// chunk geometries, chosen by a template parameter `Chunks`:
//   UniformChunks<IS_VARLEN>: an integer chunk_size (chunk i of sequence s is tokens [i * C, (i + 1) * C) of it);
//   TableChunks: a chunk table (cu_chunks (K + 1,), seq_chunks (S + 1,), both int32; TABLE_CONTRACT / issue 10).
// Both answer span(s, c) (the chunk's first token and length) and cut the chunks into PIECES of at most `split`
// tokens, so that a 1000x longer chunk spreads over many blocks. Device code only reads the tables: the host
// never does (no synchronisation), and every grid comes from tensor shapes.
#pragma once

#include <routing_kernels/chunk_shape.h>

#include <cstdint>

#include "launch.cuh"

namespace routing_kernels {
namespace {

struct Geometry {
  int64_t seqlen;      // N (dense); unused for varlen and tables
  int64_t num_chunks;  // M (for tables: max_chunks)
  int64_t num_heads;   // H
  int64_t head_dim;    // D
  int64_t row;         // H * D values per token
  int64_t chunk_size;  // integer chunks; for tables the reduce pass's piece length
  int64_t longest_chunk;  // min(chunk_size, longest sequence), >= 1; sizes token loops and slabs
};

struct Span {
  int64_t first;  // first token (row of x)
  int64_t count;  // tokens in the chunk; <= 0 when the sequence has no such chunk
};

// A piece of a chunk: tokens [first + t0, first + t1) of chunk c of sequence s (t0 >= t1: nothing to do). slot
// numbers the piece in its enumeration (where the table reduce pass writes its partial sums).
struct Piece {
  int64_t i_s, i_c;
  Span span;
  int64_t t0, t1;
  int64_t slot;
};

// First index i in [0, n) with a[i] > v (n if none): a is nondecreasing.
__device__ __forceinline__ int64_t upper_bound(const int32_t* __restrict__ a, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] <= v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <bool IS_VARLEN>
struct UniformChunks {
  static constexpr bool IS_TABLE = false;
  const int32_t* cu;  // cu_seqlens (S + 1,) for varlen, nullptr for dense

  __device__ __forceinline__ Span span(int64_t i_s, int64_t i_c, const Geometry& g) const {
    int64_t bos = i_s * g.seqlen, len = g.seqlen;
    if constexpr (IS_VARLEN) {
      bos = cu[i_s];
      len = cu[i_s + 1] - bos;
    }
    const int64_t o_t = i_c * g.chunk_size;
    return {bos + o_t, len - o_t < g.chunk_size ? len - o_t : g.chunk_size};
  }

  // The grids cover M = ceil(max_seqlen / chunk_size) chunks of at most longest_chunk tokens each (longest_chunk
  // is min(chunk_size, max_seqlen)); a varlen sequence longer than that would keep tokens no work item reaches.
  static constexpr const char* FIT_MESSAGE =
      "a sequence of cu_seqlens is longer than max_seqlen: its tail would be left unwritten";
  __device__ __forceinline__ bool fits(int64_t i_s, const Geometry& g) const {
    if constexpr (!IS_VARLEN) return true;
    const int64_t len = int64_t{cu[i_s + 1]} - cu[i_s];
    return len <= g.num_chunks * g.chunk_size && (g.longest_chunk == g.chunk_size || len <= g.longest_chunk);
  }

  // Pieces are (sequence, chunk, slab of `split` tokens), num_slabs per chunk: idx = (s * M + c) * num_slabs + slab.
  __device__ __forceinline__ Piece piece(int64_t idx, int64_t split, int64_t num_slabs, const Geometry& g) const {
    const int64_t i_slab = idx % num_slabs, i_sc = idx / num_slabs;
    Piece p{};
    p.i_s = i_sc / g.num_chunks;
    p.i_c = i_sc % g.num_chunks;
    p.span = span(p.i_s, p.i_c, g);
    p.t0 = i_slab * split;
    p.t1 = p.t0 + split < p.span.count ? p.t0 + split : p.span.count;
    p.slot = idx;
    return p;
  }
};

// Pieces of a chunk table without a prefix sum over the chunks' piece counts: the chunks are cut at the global
// token positions that are multiples of `split`. Pieces 0 .. K-1 are the chunks' heads (chunk k from its start
// to the first multiple of split after it, or its end); piece K + j starts at token j * split and runs to the
// next multiple or the chunk's end, and is empty when a chunk starts there (that chunk's head covers it) or
// j * split >= T. So sum_k ceil(len_k / split) <= K + ceil(T / split) = num_pieces, a bound from shapes alone,
// and no piece is longer than split tokens however long its chunk.
struct TableChunks {
  static constexpr bool IS_TABLE = true;
  const int32_t* cu_chunks;   // (K + 1,)
  const int32_t* seq_chunks;  // (S + 1,)
  int64_t num_chunks;         // K
  int64_t num_seqs;           // S
  int64_t num_tokens;         // T

  int64_t num_pieces(int64_t split) const {
    return num_chunks + ceil_div(num_tokens, split);
  }

  __device__ __forceinline__ int64_t chunks_of(int64_t i_s) const {
    return int64_t{seq_chunks[i_s + 1]} - seq_chunks[i_s];
  }

  // Local chunk c of sequence s is global chunk seq_chunks[s] + c when c < the sequence's chunk count.
  __device__ __forceinline__ Span span(int64_t i_s, int64_t i_c, const Geometry&) const {
    if (i_c >= chunks_of(i_s)) return {0, 0};
    const int64_t k = seq_chunks[i_s] + i_c, first = cu_chunks[k];
    return {first, cu_chunks[k + 1] - first};
  }

  // The pieces of chunk k after its head are K + j for j in [first_aligned(k), last_aligned(k)).
  __device__ __forceinline__ int64_t first_aligned(int64_t k, int64_t split) const {
    return cu_chunks[k] / split + 1;
  }
  __device__ __forceinline__ int64_t last_aligned(int64_t k, int64_t split) const {
    return (int64_t{cu_chunks[k + 1]} - 1) / split + 1;
  }

  __device__ __forceinline__ Piece piece(int64_t idx, int64_t split, int64_t, const Geometry&) const {
    Piece p{};
    p.slot = idx;
    int64_t k = idx;
    if (idx >= num_chunks) {  // an aligned piece: inside a chunk, or nothing
      const int64_t pos = (idx - num_chunks) * split;
      if (pos >= num_tokens) return p;
      k = upper_bound(cu_chunks, num_chunks + 1, pos) - 1;  // cu_chunks[k] <= pos < cu_chunks[k + 1]
      if (cu_chunks[k] == pos) return p;
    }
    const int64_t first = cu_chunks[k], end = cu_chunks[k + 1];
    const int64_t from = idx >= num_chunks ? (idx - num_chunks) * split : first;
    const int64_t next = (from / split + 1) * split;
    p.span = {first, end - first};
    p.t0 = from - first;
    p.t1 = (next < end ? next : end) - first;
    p.i_s = upper_bound(seq_chunks, num_seqs + 1, k) - 1;  // the last s with seq_chunks[s] <= k: skips empty ones
    p.i_c = k - seq_chunks[p.i_s];
    return p;
  }
};

}  // namespace
}  // namespace routing_kernels
