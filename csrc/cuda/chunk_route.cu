// CUDA kernels of routing_kernels::chunk_route_fwd / _bwd (contract in include/routing_kernels/chunk_route.h).
//
// The same three passes as the CPU kernels (cpu/chunk_route.cpp), one launch each, on the current stream:
//   forward : reduce_chunks [x -> means, scores]  softmax_summary [weights, summary]     scale_chunks [y = w x]
//   backward: reduce_chunks [x, dy -> means, dw]  softmax_backward [ds (in dw), dquery]   scale_chunks [dx]
// The per-chunk passes give one block to a (sequence, chunk, tile) work item, so a single long sequence still
// spreads over every SM; the softmax pass gives one block to a (sequence, head) row and loops over its M chunks.
// Unlike the CPU file, the backward keeps no (S*M, H*D) buffer of rows to add to dx: scale_chunks rebuilds
// (scale * ds * q + w * dsummary) / |chunk| from ds and w, which saves writing and reading an x-sized fp32 tensor.
//
// Device code: chunk_route_kernels.cuh; launches: chunk_route_launch.cuh; tensor-level entry points:
// chunk_route_entry.cuh. All three are shared with the host emulation (csrc/emu); this file binds them to the
// device, its SM count and the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "chunk_route_entry.cuh"

namespace routing_kernels {
namespace {

LaunchEnv cuda_env(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return {c10::DeviceType::CUDA, std::max(count, 1), c10::cuda::getCurrentCUDAStream(), /*poison_outputs=*/false};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_route_fwd_cuda(const at::Tensor& x, const at::Tensor& query,
                                                                    int64_t chunk_size,
                                                                    const std::optional<at::Tensor>& cu_seqlens,
                                                                    int64_t max_seqlen, double scale) {
  check_device(x, c10::DeviceType::CUDA, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return chunk_route_fwd_entry(x, query, chunk_size, cu_seqlens, max_seqlen, scale, cuda_env(x));
}

std::tuple<at::Tensor, at::Tensor> chunk_route_bwd_cuda(const at::Tensor& dy, const at::Tensor& dweights,
                                                        const at::Tensor& dsummary, const at::Tensor& x,
                                                        const at::Tensor& query, const at::Tensor& weights,
                                                        int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens,
                                                        int64_t max_seqlen, double scale) {
  check_device(x, c10::DeviceType::CUDA, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return chunk_route_bwd_entry(dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens, max_seqlen, scale,
                               cuda_env(x));
}

}  // namespace
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CUDA, m) {
  m.impl("chunk_route_fwd", TORCH_FN(routing_kernels::chunk_route_fwd_cuda));
  m.impl("chunk_route_bwd", TORCH_FN(routing_kernels::chunk_route_bwd_cuda));
}
