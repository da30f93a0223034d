// Host side of the CUDA chunk_route kernels on raw pointers: tiling, grid sizes, the vectorize-or-scalar choice
// and the three launches of each direction. Shared by the nvcc build (chunk_route.cu through
// chunk_route_entry.cuh) and the host emulation (csrc/emu), so both run the same decisions. No torch tensors here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <numeric>

#include "chunk_route_kernels.cuh"

namespace routing_kernels {
namespace {

inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// 16-byte accesses need every pointer 16-byte aligned and every token row (and tile start) a whole number of
// vectors; one head must also fit the 256 vectors of a reduce_chunks tile. Otherwise the scalar kernels run.
template <typename scalar_t>
bool can_vectorize(const Geometry& g, std::initializer_list<const void*> pointers) {
  constexpr int64_t VEC = 16 / sizeof(scalar_t);
  if (g.row == 0 || g.row % VEC != 0 || g.head_dim / std::gcd(g.head_dim, VEC) > 256) return false;
  return std::all_of(pointers.begin(), pointers.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; });
}

// Tiles of whole heads for reduce_chunks. The narrowest tile whose width is a multiple of VEC holds k heads; a
// tile takes as many such units as fit 256 vectors, then narrows while there are too few work items to give
// every SM 8 blocks (e.g. B = 1 with a few long chunks); narrower tiles leave more threads for token groups.
// pairs: the pass's work items before tiling (S * M integer chunks, or a table's pieces).
inline ReduceTiling reduce_tiling(const ChunkMeanShape& sh, int64_t pairs, int64_t longest_chunk, int64_t vec,
                                  int sms) {
  const int64_t H = sh.num_heads, D = sh.head_dim;
  const int64_t k = D == 0 ? 1 : vec / std::gcd(D, vec);  // H is a multiple of k: row % vec == 0
  const int64_t unit_vecs = k * D / vec;
  const int64_t max_units = H / k;
  int64_t units = unit_vecs == 0 ? max_units : std::min(max_units, std::max<int64_t>(1, REDUCE_THREADS / unit_vecs));
  while (units > 1 && pairs * ceil_div(max_units, units) < 8 * int64_t{sms}) units = ceil_div(units, 2);
  ReduceTiling tl{};
  tl.heads_per_tile = units * k;
  tl.num_tiles = ceil_div(H, tl.heads_per_tile);
  tl.tile_vecs = tl.heads_per_tile * D / vec;
  const int64_t block = tl.tile_vecs <= REDUCE_THREADS ? REDUCE_THREADS : round_up(tl.tile_vecs, 32);
  tl.token_groups = tl.tile_vecs == 0 ? 1 : std::min(block / tl.tile_vecs, longest_chunk);
  tl.threads = std::max<int64_t>(32, round_up(tl.token_groups * tl.tile_vecs, 32));
  tl.num_items = pairs * tl.num_tiles;
  return tl;
}

inline dim3 grid_for(int64_t num_items) { return dim3(static_cast<unsigned>(std::min(num_items, MAX_BLOCKS))); }

inline Geometry geometry(const ChunkMeanShape& sh, int64_t chunk_size, int64_t max_seqlen) {
  const int64_t longest_seq = sh.varlen ? max_seqlen : sh.seqlen;
  Geometry g{};
  g.seqlen = sh.seqlen;
  g.num_chunks = sh.num_chunks;
  g.num_heads = sh.num_heads;
  g.head_dim = sh.head_dim;
  g.row = sh.num_heads * sh.head_dim;
  g.chunk_size = chunk_size;
  g.longest_chunk = std::max<int64_t>(1, std::min(chunk_size, longest_seq));
  return g;
}

// Pass 1 launcher; IS_BWD when dy is given (then extra is dweights and alpha is unused). A table runs the pieces
// into part_sum / part_dot (Chunks::num_pieces rows of H * D each), then finish_table_chunks_kernel.
template <typename scalar_t, int VEC, bool IS_BWD, typename Chunks>
void launch_reduce(const ChunkMeanShape& sh, const Geometry& g, int sms, const scalar_t* x, const scalar_t* dy,
                   Chunks chunks, const scalar_t* vec, int64_t vec_seq_stride,
                   const accum_t<scalar_t>* extra, accum_t<scalar_t> alpha,
                   accum_t<scalar_t> empty_value, accum_t<scalar_t>* means,
                   accum_t<scalar_t>* out, accum_t<scalar_t>* part_sum, accum_t<scalar_t>* part_dot,
                   cudaStream_t stream) {
  int64_t pairs = sh.num_seqs * sh.num_chunks;
  if constexpr (Chunks::IS_TABLE) pairs = chunks.num_pieces(g.chunk_size);
  const ReduceTiling tl = reduce_tiling(sh, pairs, g.longest_chunk, VEC, sms);
  TORCH_INTERNAL_ASSERT(tl.token_groups * tl.tile_vecs * VEC <= ReduceSlots<VEC>::value && tl.threads <= 1024);
  constexpr int BOUND = REDUCE_MAX_THREADS<VEC>;
  const dim3 block(static_cast<unsigned>(tl.threads));
  if (tl.num_items > 0) {
    launch_kernel<BOUND>(reduce_chunks_kernel<scalar_t, VEC, Chunks, IS_BWD>, grid_for(tl.num_items), block, stream,
                         x, dy, chunks, vec, vec_seq_stride, extra, alpha, empty_value, means, out, part_sum,
                         part_dot, g, tl);
  }
  if constexpr (Chunks::IS_TABLE) {
    const int64_t num_items = sh.num_seqs * sh.num_chunks * tl.num_tiles;
    if (num_items > 0) {
      launch_kernel<BOUND>(finish_table_chunks_kernel<scalar_t, VEC, IS_BWD>, grid_for(num_items), block, stream,
                           chunks, vec, vec_seq_stride, extra, alpha, empty_value, part_sum, part_dot, means, out,
                           g, tl, num_items);
    }
  }
}

// Pass 3 launcher (ScaleMode MODE).
template <typename scalar_t, int VEC, int MODE, typename Chunks>
void launch_scale(const ChunkMeanShape& sh, const Geometry& g, const scalar_t* src, scalar_t* out, Chunks chunks,
                  const accum_t<scalar_t>* w, const accum_t<scalar_t>* ds, const scalar_t* q,
                  int64_t q_seq_stride, const scalar_t* dsummary, const scalar_t* grad_mean,
                  accum_t<scalar_t> scale, cudaStream_t stream) {
  const int64_t row_vecs = g.row / VEC;
  const int64_t threads = std::clamp<int64_t>(round_up(row_vecs, 32), 32, SCALE_THREADS);
  ScaleTiling tl{};
  tl.num_tiles = ceil_div(row_vecs, threads);
  if constexpr (Chunks::IS_TABLE) {
    tl.slab = SCALE_SLAB;
    tl.num_slabs = 1;  // unused: a table's pieces are numbered by chunk and token position
    tl.num_items = chunks.num_pieces(tl.slab) * tl.num_tiles;
  } else {
    tl.slab = std::min(g.longest_chunk, SCALE_SLAB);
    tl.num_slabs = ceil_div(g.longest_chunk, tl.slab);  // no item for the slabs of chunk_size > any sequence
    tl.num_items = sh.num_seqs * sh.num_chunks * tl.num_slabs * tl.num_tiles;
  }
  if (tl.num_items == 0) return;
  const dim3 grid = grid_for(tl.num_items), block(static_cast<unsigned>(threads));
  launch_kernel<SCALE_THREADS>(scale_chunks_kernel<scalar_t, VEC, Chunks, MODE>, grid, block, stream, src, out, chunks,
                               w, ds, q, q_seq_stride, dsummary, grad_mean, scale, g, tl);
}

// Forward on contiguous buffers: y like x, weights (S, H, M) and means (S*M, H*D) in accum_t, summary (S, H, D).
// q_stride: 0 for a shared (H, D) query, H * D for (S, H, D). Needs num_tokens > 0 and H > 0. A table also needs
// part_sum (chunks.num_pieces(g.chunk_size) rows of H * D, scratch).
template <typename scalar_t, typename Chunks>
void route_fwd_launch(const ChunkMeanShape& sh, const Geometry& g, int sms, Chunks chunks, const scalar_t* p_x,
                      const scalar_t* p_q, int64_t q_stride, accum_t<scalar_t> scale, accum_t<scalar_t>* p_w,
                      accum_t<scalar_t>* p_means, accum_t<scalar_t>* p_part, scalar_t* p_summary, scalar_t* p_y,
                      cudaStream_t stream) {
  using acc_t = accum_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t S = sh.num_seqs, H = sh.num_heads;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (can_vectorize<scalar_t>(g, {p_x})) {
    launch_reduce<scalar_t, VEC, false>(sh, g, sms, p_x, nullptr, chunks, p_q, q_stride, nullptr, scale, neg_inf,
                                        p_means, p_w, p_part, nullptr, stream);
  } else {
    launch_reduce<scalar_t, 1, false>(sh, g, sms, p_x, nullptr, chunks, p_q, q_stride, nullptr, scale, neg_inf,
                                      p_means, p_w, p_part, nullptr, stream);
  }
  launch_kernel<SOFTMAX_THREADS>(softmax_summary_kernel<scalar_t>, grid_for(S * H), dim3(SOFTMAX_THREADS), stream,
                                 p_w, p_means, p_summary, g, S * H);
  if (can_vectorize<scalar_t>(g, {p_x, p_y})) {
    launch_scale<scalar_t, VEC, SCALE_FWD>(sh, g, p_x, p_y, chunks, p_w, nullptr, nullptr, 0, nullptr, nullptr,
                                           acc_t(0), stream);
  } else {
    launch_scale<scalar_t, 1, SCALE_FWD>(sh, g, p_x, p_y, chunks, p_w, nullptr, nullptr, 0, nullptr, nullptr,
                                         acc_t(0), stream);
  }
}

// Backward on contiguous buffers: dx like x, dquery (S, H, D) in accum_t (per sequence, even for a shared
// query); means (S*M, H*D) and dw (S, H, M) are scratch, and for a table part_sum, part_dot (as the forward's).
// Needs x.numel() > 0.
template <typename scalar_t, typename Chunks>
void route_bwd_launch(const ChunkMeanShape& sh, const Geometry& g, int sms, Chunks chunks, const scalar_t* p_x,
                      const scalar_t* p_dy, const scalar_t* p_q, int64_t q_stride, const scalar_t* p_gsum,
                      const accum_t<scalar_t>* p_w, const accum_t<scalar_t>* p_dweights, accum_t<scalar_t> scale,
                      accum_t<scalar_t>* p_means, accum_t<scalar_t>* p_dw, accum_t<scalar_t>* p_part_sum,
                      accum_t<scalar_t>* p_part_dot, accum_t<scalar_t>* p_dquery, scalar_t* p_dx,
                      cudaStream_t stream) {
  using acc_t = accum_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t S = sh.num_seqs, H = sh.num_heads, D = sh.head_dim;
  if (can_vectorize<scalar_t>(g, {p_x, p_dy})) {
    launch_reduce<scalar_t, VEC, true>(sh, g, sms, p_x, p_dy, chunks, p_gsum, H * D, p_dweights, acc_t(1), acc_t(0),
                                       p_means, p_dw, p_part_sum, p_part_dot, stream);
  } else {
    launch_reduce<scalar_t, 1, true>(sh, g, sms, p_x, p_dy, chunks, p_gsum, H * D, p_dweights, acc_t(1), acc_t(0),
                                     p_means, p_dw, p_part_sum, p_part_dot, stream);
  }
  launch_kernel<SOFTMAX_THREADS>(softmax_backward_kernel<acc_t>, grid_for(S * H), dim3(SOFTMAX_THREADS), stream, p_w,
                                 p_dw, p_means, p_dquery, scale, g, S * H);
  if (can_vectorize<scalar_t>(g, {p_dy, p_dx})) {
    launch_scale<scalar_t, VEC, SCALE_BWD>(sh, g, p_dy, p_dx, chunks, p_w, p_dw, p_q, q_stride, p_gsum, nullptr,
                                           scale, stream);
  } else {
    launch_scale<scalar_t, 1, SCALE_BWD>(sh, g, p_dy, p_dx, chunks, p_w, p_dw, p_q, q_stride, p_gsum, nullptr, scale,
                                         stream);
  }
}

// The integer-chunk entry points (cu: cu_seqlens for varlen, nullptr for dense).
template <typename scalar_t>
void chunk_route_fwd_launch(const ChunkMeanShape& sh, const Geometry& g, int sms, const scalar_t* p_x,
                            const scalar_t* p_q, int64_t q_stride, const int32_t* p_cu, accum_t<scalar_t> scale,
                            accum_t<scalar_t>* p_w, accum_t<scalar_t>* p_means, scalar_t* p_summary, scalar_t* p_y,
                            cudaStream_t stream) {
  if (sh.varlen) {
    route_fwd_launch<scalar_t>(sh, g, sms, UniformChunks<true>{p_cu}, p_x, p_q, q_stride, scale, p_w, p_means,
                               nullptr, p_summary, p_y, stream);
  } else {
    route_fwd_launch<scalar_t>(sh, g, sms, UniformChunks<false>{nullptr}, p_x, p_q, q_stride, scale, p_w, p_means,
                               nullptr, p_summary, p_y, stream);
  }
}

template <typename scalar_t>
void chunk_route_bwd_launch(const ChunkMeanShape& sh, const Geometry& g, int sms, const scalar_t* p_x,
                            const scalar_t* p_dy, const scalar_t* p_q, int64_t q_stride, const scalar_t* p_gsum,
                            const accum_t<scalar_t>* p_w, const accum_t<scalar_t>* p_dweights, const int32_t* p_cu,
                            accum_t<scalar_t> scale, accum_t<scalar_t>* p_means, accum_t<scalar_t>* p_dw,
                            accum_t<scalar_t>* p_dquery, scalar_t* p_dx, cudaStream_t stream) {
  if (sh.varlen) {
    route_bwd_launch<scalar_t>(sh, g, sms, UniformChunks<true>{p_cu}, p_x, p_dy, p_q, q_stride, p_gsum, p_w,
                               p_dweights, scale, p_means, p_dw, nullptr, nullptr, p_dquery, p_dx, stream);
  } else {
    route_bwd_launch<scalar_t>(sh, g, sms, UniformChunks<false>{nullptr}, p_x, p_dy, p_q, q_stride, p_gsum, p_w,
                               p_dweights, scale, p_means, p_dw, nullptr, nullptr, p_dquery, p_dx, stream);
  }
}

// chunk_mean_bwd on integer chunks: dx (x's layout, contiguous) = grad_mean[s, c] / |chunk| from a contiguous
// grad_mean (S, M, H, D); the same scale_chunks pass as the table's backward. Needs x.numel() > 0.
template <typename scalar_t>
void chunk_mean_bwd_launch(const ChunkMeanShape& sh, const Geometry& g, const scalar_t* p_grad, const int32_t* p_cu,
                           scalar_t* p_dx, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const bool vec = can_vectorize<scalar_t>(g, {p_grad, p_dx});
  auto run = [&](auto chunks) {
    if (vec) {
      launch_scale<scalar_t, VEC, SCALE_MEAN_BWD>(sh, g, nullptr, p_dx, chunks, nullptr, nullptr, nullptr, 0, nullptr,
                                                  p_grad, accum_t<scalar_t>(0), stream);
    } else {
      launch_scale<scalar_t, 1, SCALE_MEAN_BWD>(sh, g, nullptr, p_dx, chunks, nullptr, nullptr, nullptr, 0, nullptr,
                                                p_grad, accum_t<scalar_t>(0), stream);
    }
  };
  if (sh.varlen) {
    run(UniformChunks<true>{p_cu});
  } else {
    run(UniformChunks<false>{nullptr});
  }
}

}  // namespace
}  // namespace routing_kernels
