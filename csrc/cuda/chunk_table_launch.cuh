// Host side of the CUDA chunk-table kernels (chunk_mean_table_* / chunk_route_table_*) on raw pointers: the same
// kernels and launches as the integer chunks (chunk_route_launch.cuh), with TableChunks as the chunk geometry.
// Shared by the nvcc build (chunk_table.cu through chunk_table_entry.cuh), the emulated ops and the sanitizer
// driver (csrc/emu). The tables are read by the kernels only: grids and workspaces come from T, K, S and
// max_chunks (no host synchronisation).
#pragma once

#include <algorithm>
#include <cstdint>

#include "chunk_route_launch.cuh"

namespace routing_kernels {
namespace {

// Tokens per pass-1 piece of a table chunk: a 1000x longer chunk becomes ~len / 256 work items, each as long as
// an integer chunk of 256, and the finish pass adds ~len / 256 partial rows per chunk instead of len tokens.
constexpr int64_t TABLE_SPLIT = 256;

// sh: varlen, S sequences, T tokens, H, D, num_chunks = max_chunks.
inline ChunkMeanShape table_shape(int64_t num_seqs, int64_t num_tokens, int64_t heads, int64_t dim,
                                  int64_t max_chunks) {
  return ChunkMeanShape{true, num_seqs, 0, num_tokens, heads, dim, max_chunks};
}

inline Geometry table_geometry(const ChunkMeanShape& sh) {
  Geometry g{};
  g.num_chunks = sh.num_chunks;
  g.num_heads = sh.num_heads;
  g.head_dim = sh.head_dim;
  g.row = sh.num_heads * sh.head_dim;
  g.chunk_size = TABLE_SPLIT;  // the reduce pass's piece length
  g.longest_chunk = std::max<int64_t>(1, std::min(TABLE_SPLIT, sh.num_tokens));
  return g;
}

// Rows of H * D accum_t values each partial-sum buffer needs (part_sum, and part_dot for the backward).
inline int64_t table_part_rows(const TableChunks& chunks) { return chunks.num_pieces(TABLE_SPLIT); }

// chunk_mean_table_fwd: means (S * max_chunks, H * D) in accum_t, zeros for missing chunks. Needs T > 0, H * D > 0.
template <typename scalar_t>
void chunk_mean_table_fwd_launch(const ChunkMeanShape& sh, const Geometry& g, int sms, const TableChunks& chunks,
                                 const scalar_t* p_x, accum_t<scalar_t>* p_means, accum_t<scalar_t>* p_part,
                                 cudaStream_t stream) {
  using acc_t = accum_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (can_vectorize<scalar_t>(g, {p_x})) {
    launch_reduce<scalar_t, VEC, false>(sh, g, sms, p_x, nullptr, chunks, nullptr, 0, nullptr, acc_t(0), acc_t(0),
                                        p_means, nullptr, p_part, nullptr, stream);
  } else {
    launch_reduce<scalar_t, 1, false>(sh, g, sms, p_x, nullptr, chunks, nullptr, 0, nullptr, acc_t(0), acc_t(0),
                                      p_means, nullptr, p_part, nullptr, stream);
  }
}

// chunk_mean_table_bwd: dx (T, H, D) = grad_mean[s, c] / |chunk| from a contiguous grad_mean (S, max_chunks, H, D).
template <typename scalar_t>
void chunk_mean_table_bwd_launch(const ChunkMeanShape& sh, const Geometry& g, const TableChunks& chunks,
                                 const scalar_t* p_grad, scalar_t* p_dx, cudaStream_t stream) {
  using acc_t = accum_t<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (can_vectorize<scalar_t>(g, {p_grad, p_dx})) {
    launch_scale<scalar_t, VEC, SCALE_MEAN_BWD>(sh, g, nullptr, p_dx, chunks, nullptr, nullptr, nullptr, 0, nullptr,
                                                p_grad, acc_t(0), stream);
  } else {
    launch_scale<scalar_t, 1, SCALE_MEAN_BWD>(sh, g, nullptr, p_dx, chunks, nullptr, nullptr, nullptr, 0, nullptr,
                                              p_grad, acc_t(0), stream);
  }
}

}  // namespace
}  // namespace routing_kernels
