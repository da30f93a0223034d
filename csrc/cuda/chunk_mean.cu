// CUDA kernels of routing_kernels::chunk_mean_fwd / _bwd (contract in include/routing_kernels/chunk_mean.h). The
// forward kernel and its launch are in chunk_mean_kernels.cuh, the backward is chunk_route's scale pass
// (chunk_route_launch.cuh), the tensor-level entry in chunk_mean_entry.cuh (both shared with the
// host emulation); this file binds them to the device, its SM count and the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "chunk_mean_entry.cuh"

namespace routing_kernels {
namespace {

at::Tensor chunk_mean_fwd_cuda(const at::Tensor& x, int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens,
                               int64_t max_seqlen) {
  check_device(x, c10::DeviceType::CUDA, "x");  // before the guard, which needs a CUDA device
  const c10::cuda::CUDAGuard device_guard(x.device());
  const LaunchEnv env{c10::DeviceType::CUDA, /*sms=*/0, c10::cuda::getCurrentCUDAStream(), /*poison_outputs=*/false};
  return chunk_mean_fwd_entry(x, chunk_size, cu_seqlens, max_seqlen, env);
}

at::Tensor chunk_mean_bwd_cuda(const at::Tensor& grad_mean, const at::Tensor& x, int64_t chunk_size,
                               const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  check_device(x, c10::DeviceType::CUDA, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  const LaunchEnv env{c10::DeviceType::CUDA, /*sms=*/0, c10::cuda::getCurrentCUDAStream(), /*poison_outputs=*/false};
  return chunk_mean_bwd_entry(grad_mean, x, chunk_size, cu_seqlens, max_seqlen, env);
}

}  // namespace
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CUDA, m) {
  m.impl("chunk_mean_fwd", TORCH_FN(routing_kernels::chunk_mean_fwd_cuda));
  m.impl("chunk_mean_bwd", TORCH_FN(routing_kernels::chunk_mean_bwd_cuda));
}
