// CUDA kernels of the chunk-table ops (dynamic chunking, issue 10): chunk_mean_table_fwd / _bwd and
// chunk_route_table_fwd / _bwd, schemas in registration.cpp. They are the integer-chunk kernels of
// chunk_route_kernels.cuh run over a TableChunks geometry (chunk_geometry.cuh):
//   chunk_route_table_fwd: reduce_chunks [pieces of <= 256 tokens -> partial sums]  finish_table_chunks [means,
//                          scores]  softmax_summary  scale_chunks [y = w x, pieces of <= 32 tokens]
//   chunk_route_table_bwd: the same with dy (partial <dy, x> too), softmax_backward, scale_chunks [dx]
//   chunk_mean_table_fwd : reduce_chunks + finish_table_chunks without scores; chunk_mean_table_bwd: scale_chunks
// Tensor-level entries: chunk_table_entry.cuh (shared with the host emulation); this file binds them to the device,
// its SM count and the current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "chunk_table_entry.cuh"

namespace routing_kernels {
namespace {

LaunchEnv table_cuda_env(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return {c10::DeviceType::CUDA, std::max(count, 1), c10::cuda::getCurrentCUDAStream(), /*poison_outputs=*/false};
}

at::Tensor chunk_mean_table_fwd_cuda(const at::Tensor& x, const at::Tensor& cu_chunks, const at::Tensor& seq_chunks,
                                     int64_t max_chunks) {
  check_device(x, c10::DeviceType::CUDA, "x");  // before the guard, which needs a CUDA device
  const c10::cuda::CUDAGuard device_guard(x.device());
  return chunk_mean_table_fwd_entry(x, cu_chunks, seq_chunks, max_chunks, table_cuda_env(x));
}

at::Tensor chunk_mean_table_bwd_cuda(const at::Tensor& grad_mean, const at::Tensor& x, const at::Tensor& cu_chunks,
                                     const at::Tensor& seq_chunks, int64_t max_chunks) {
  check_device(x, c10::DeviceType::CUDA, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return chunk_mean_table_bwd_entry(grad_mean, x, cu_chunks, seq_chunks, max_chunks, table_cuda_env(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_route_table_fwd_cuda(const at::Tensor& x, const at::Tensor& query,
                                                                          const at::Tensor& cu_chunks,
                                                                          const at::Tensor& seq_chunks,
                                                                          int64_t max_chunks, double scale) {
  check_device(x, c10::DeviceType::CUDA, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return chunk_route_table_fwd_entry(x, query, cu_chunks, seq_chunks, max_chunks, scale, table_cuda_env(x));
}

std::tuple<at::Tensor, at::Tensor> chunk_route_table_bwd_cuda(const at::Tensor& dy, const at::Tensor& dweights,
                                                              const at::Tensor& dsummary, const at::Tensor& x,
                                                              const at::Tensor& query, const at::Tensor& weights,
                                                              const at::Tensor& cu_chunks,
                                                              const at::Tensor& seq_chunks, int64_t max_chunks,
                                                              double scale) {
  check_device(x, c10::DeviceType::CUDA, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return chunk_route_table_bwd_entry(dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks, max_chunks,
                                     scale, table_cuda_env(x));
}

}  // namespace
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CUDA, m) {
  m.impl("chunk_mean_table_fwd", TORCH_FN(routing_kernels::chunk_mean_table_fwd_cuda));
  m.impl("chunk_mean_table_bwd", TORCH_FN(routing_kernels::chunk_mean_table_bwd_cuda));
  m.impl("chunk_route_table_fwd", TORCH_FN(routing_kernels::chunk_route_table_fwd_cuda));
  m.impl("chunk_route_table_bwd", TORCH_FN(routing_kernels::chunk_route_table_bwd_cuda));
}
