// chunk_mean_fwd on tensors for the CUDA kernel (contract in include/routing_kernels/chunk_mean.h): checks,
// allocation, dtype dispatch and the launch, shared by chunk_mean.cu and the host emulation (csrc/emu).
#pragma once

#include <routing_kernels/chunk_mean.h>

#include <ATen/Dispatch.h>

#include "chunk_mean_kernels.cuh"
#include "launch_env.cuh"

namespace routing_kernels {

inline at::Tensor chunk_mean_fwd_entry(const at::Tensor& x, int64_t chunk_size,
                                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                       const LaunchEnv& env) {
  const ChunkMeanShape shape = check_chunk_mean_args(x, chunk_size, cu_seqlens, max_seqlen, env.device);
  at::Tensor out =
      empty_for({shape.num_seqs, shape.num_chunks, shape.num_heads, shape.head_dim}, x.options(), env);
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor x_c = x.contiguous();
  const at::Tensor cu = shape.varlen ? cu_seqlens->contiguous() : at::Tensor();
  const int32_t* p_cu = shape.varlen ? cu.const_data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_mean_fwd_cuda", [&] {
    chunk_mean_cuda::launch_chunk_mean<scalar_t>(shape, chunk_size, x_c.const_data_ptr<scalar_t>(), p_cu,
                                                 out.mutable_data_ptr<scalar_t>(), env.stream);
  });
  return out;
}

}  // namespace routing_kernels
