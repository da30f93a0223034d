// Device code of the CUDA chunk_mean_fwd kernel and its raw-pointer launch (grid and tiling), shared by the nvcc
// build (chunk_mean.cu) and the host emulation (csrc/emu). Contract in include/routing_kernels/chunk_mean.h.
#pragma once

#include <routing_kernels/chunk_shape.h>

#include <algorithm>
#include <cstdint>

#include "launch.cuh"

namespace routing_kernels {
namespace chunk_mean_cuda {

constexpr int MAX_THREADS = 256;
// Grid-stride over work items: B * M * tiles can pass the 2^31 - 1 limit of gridDim.x.
constexpr int64_t MAX_BLOCKS = int64_t{1} << 20;

// One work item per (sequence, chunk, tile of the H * D row); each thread owns one value of the row and walks the
// chunk's tokens, so a warp reads 32 consecutive values per token (coalesced). Each x value is read once.
template <typename scalar_t, bool IS_VARLEN>
__global__ void __launch_bounds__(MAX_THREADS)
    chunk_mean_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ cu_seqlens,
                      scalar_t* __restrict__ out, int64_t seqlen, int64_t num_chunks, int64_t row,
                      int64_t num_tiles, int64_t chunk_size, int64_t num_items) {
  using acc_t = accum_t<scalar_t>;
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t i_sc = item / num_tiles;  // (sequence, chunk) pair = row of out
    const int64_t j = (item % num_tiles) * blockDim.x + threadIdx.x;
    if (j >= row) {
      continue;
    }
    const int64_t i_s = i_sc / num_chunks;
    const int64_t i_c = i_sc % num_chunks;
    int64_t bos = i_s * seqlen;
    int64_t len = seqlen;
    if constexpr (IS_VARLEN) {
      bos = cu_seqlens[i_s];
      len = cu_seqlens[i_s + 1] - bos;
    }
    const int64_t o_t = i_c * chunk_size;
    const int64_t n = len - o_t < chunk_size ? len - o_t : chunk_size;  // <= 0: no such chunk
    acc_t b_acc = 0;
    for (int64_t t = 0; t < n; ++t) {
      b_acc += static_cast<acc_t>(x[(bos + o_t + t) * row + j]);
    }
    out[i_sc * row + j] = n > 0 ? static_cast<scalar_t>(b_acc / static_cast<acc_t>(n)) : scalar_t(0);
  }
}

// out (S, M, H, D) from x (contiguous) and, for varlen, cu (S + 1 offsets); out.numel() > 0.
template <typename scalar_t>
void launch_chunk_mean(const ChunkMeanShape& shape, int64_t chunk_size, const scalar_t* x, const int32_t* cu,
                       scalar_t* out, cudaStream_t stream) {
  const int64_t row = shape.num_heads * shape.head_dim;
  const int64_t threads = std::min<int64_t>(MAX_THREADS, (row + 31) / 32 * 32);  // whole warps, no more than needed
  const int64_t num_tiles = ceil_div(row, threads);
  const int64_t num_items = shape.num_seqs * shape.num_chunks * num_tiles;
  const dim3 grid(static_cast<unsigned>(std::min(num_items, MAX_BLOCKS)));
  const dim3 block(static_cast<unsigned>(threads));
  if (shape.varlen) {
    launch_kernel<MAX_THREADS>(chunk_mean_kernel<scalar_t, true>, grid, block, stream, x, cu, out, 0,
                               shape.num_chunks, row, num_tiles, chunk_size, num_items);
  } else {
    launch_kernel<MAX_THREADS>(chunk_mean_kernel<scalar_t, false>, grid, block, stream, x, nullptr, out,
                               shape.seqlen, shape.num_chunks, row, num_tiles, chunk_size, num_items);
  }
}

}  // namespace chunk_mean_cuda
}  // namespace routing_kernels
