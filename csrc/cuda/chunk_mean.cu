// CUDA kernel of routing_kernels::chunk_mean_fwd (contract in include/routing_kernels/chunk_mean.h).
#include <routing_kernels/accum.h>
#include <routing_kernels/chunk_mean.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace routing_kernels {
namespace {

constexpr int64_t MAX_THREADS = 256;
// Grid-stride over work items: B * M * tiles can pass the 2^31 - 1 limit of gridDim.x.
constexpr int64_t MAX_BLOCKS = int64_t{1} << 20;

// One work item per (sequence, chunk, tile of the H * D row); each thread owns one value of the row and walks the
// chunk's tokens, so a warp reads 32 consecutive values per token (coalesced). Each x value is read once.
template <typename scalar_t, bool IS_VARLEN>
__global__ void chunk_mean_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ cu_seqlens,
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

at::Tensor chunk_mean_fwd_cuda(const at::Tensor& x, int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens,
                               int64_t max_seqlen) {
  const ChunkMeanShape shape = check_chunk_mean_args(x, chunk_size, cu_seqlens, max_seqlen, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty({shape.num_seqs, shape.num_chunks, shape.num_heads, shape.head_dim}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor x_c = x.contiguous();
  const at::Tensor cu = shape.varlen ? cu_seqlens->contiguous() : at::Tensor();
  const int32_t* p_cu = shape.varlen ? cu.const_data_ptr<int32_t>() : nullptr;

  const int64_t row = shape.num_heads * shape.head_dim;
  const int64_t threads = std::min(MAX_THREADS, (row + 31) / 32 * 32);  // whole warps, no more than the row needs
  const int64_t num_tiles = ceil_div(row, threads);
  const int64_t num_items = shape.num_seqs * shape.num_chunks * num_tiles;
  const dim3 grid(static_cast<unsigned>(std::min(num_items, MAX_BLOCKS)));
  const dim3 block(static_cast<unsigned>(threads));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_mean_fwd_cuda", [&] {
    const scalar_t* p_x = x_c.const_data_ptr<scalar_t>();
    scalar_t* p_out = out.mutable_data_ptr<scalar_t>();
    if (shape.varlen) {
      chunk_mean_kernel<scalar_t, true><<<grid, block, 0, stream>>>(p_x, p_cu, p_out, 0, shape.num_chunks, row,
                                                                    num_tiles, chunk_size, num_items);
    } else {
      chunk_mean_kernel<scalar_t, false><<<grid, block, 0, stream>>>(p_x, nullptr, p_out, shape.seqlen,
                                                                     shape.num_chunks, row, num_tiles, chunk_size,
                                                                     num_items);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CUDA, m) {
  m.impl("chunk_mean_fwd", TORCH_FN(routing_kernels::chunk_mean_fwd_cuda));
}
