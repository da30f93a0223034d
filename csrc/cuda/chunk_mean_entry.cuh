// chunk_mean_fwd (and _bwd) on tensors for the CUDA kernels (contract in include/routing_kernels/chunk_mean.h): checks,
// allocation, dtype dispatch and the launch, shared by chunk_mean.cu and the host emulation (csrc/emu).
#pragma once

#include <routing_kernels/chunk_mean.h>

#include <ATen/Dispatch.h>

#include "chunk_mean_kernels.cuh"
#include "chunk_route_launch.cuh"
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

// dx = grad_mean[s, c] / |chunk| on the chunk_route scale pass (chunk_route_launch.cuh). Like the forward, it
// trusts max_seqlen (a longer varlen sequence leaves its tail of dx unwritten).
inline at::Tensor chunk_mean_bwd_entry(const at::Tensor& grad_mean, const at::Tensor& x, int64_t chunk_size,
                                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                       const LaunchEnv& env) {
  const ChunkMeanShape shape = check_chunk_mean_args(x, chunk_size, cu_seqlens, max_seqlen, env.device);
  check_chunk_mean_grad(grad_mean, x, shape);
  at::Tensor dx = empty_for(x.sizes(), x.options(), env);
  if (x.numel() == 0) return dx;
  const at::Tensor grad_c = grad_mean.contiguous();
  const at::Tensor cu = shape.varlen ? cu_seqlens->contiguous() : at::Tensor();
  const int32_t* p_cu = shape.varlen ? cu.const_data_ptr<int32_t>() : nullptr;
  const Geometry g = geometry(shape, chunk_size, max_seqlen);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_mean_bwd_cuda", [&] {
    chunk_mean_bwd_launch<scalar_t>(shape, g, grad_c.const_data_ptr<scalar_t>(), p_cu, dx.mutable_data_ptr<scalar_t>(),
                                    env.stream);
  });
  return dx;
}

}  // namespace routing_kernels
