// The CUDA kernels of csrc/cuda, compiled as host C++ under the emulation header and exposed as torch ops on CPU
// tensors in their own namespace, routing_kernels_emu (never routing_kernels: the production ops stay untouched).
// Also the chunk-table ops (chunk_*_table_*). Built by python_tests/cuda_emu.py (torch.utils.cpp_extension.load,
// cached under build/cuda_emu) or by CMake (ROUTING_KERNELS_CUDA_EMU=ON). Each op runs the production tensor
// entry (chunk_*_entry.cuh), so the grid, tiling, alignment and launch decisions are the real ones; the extra
// arguments pick what a GPU would decide:
//   sms       SM count the grids are sized for (1, 132 for an H100 SXM / H200)
//   schedule  bits 0-1: cuda_emu::Schedule; bit 2: blocks in reverse order; bit 3: std::thread per CUDA thread
//   seed      for the race-ahead and random schedules
// Outputs and scratch buffers are NaN-poisoned; shared memory is poisoned before each block.
#ifndef ROUTING_KERNELS_CUDA_EMU
#define ROUTING_KERNELS_CUDA_EMU 1
#endif

#include <torch/library.h>

#include "../cuda/chunk_mean_entry.cuh"
#include "../cuda/chunk_route_entry.cuh"
#include "../cuda/chunk_table_entry.cuh"

namespace routing_kernels {
namespace {

LaunchEnv emu_env(int64_t sms, int64_t schedule, int64_t seed) {
  TORCH_CHECK(sms >= 1, "sms must be >= 1, got ", sms);
  TORCH_CHECK(schedule >= 0 && schedule < 16, "schedule must be in [0, 16), got ", schedule);
  cuda_emu::Options& opts = cuda_emu::options();
  opts.schedule = static_cast<cuda_emu::Schedule>(schedule & 3);
  opts.reverse_blocks = (schedule & 4) != 0;
  opts.threads = (schedule & 8) != 0;
  opts.seed = static_cast<unsigned>(seed);
  return {c10::DeviceType::CPU, static_cast<int>(sms), nullptr, /*poison_outputs=*/true};
}

// A fault the emulator found (divergent barrier, partial shuffle mask, shared-memory overflow, trap) becomes a
// RuntimeError naming the op.
template <typename F>
auto guarded(const char* op, F&& f) {
  try {
    return f();
  } catch (const cuda_emu::Error& e) {
    TORCH_CHECK(false, op, " (CUDA emulation): ", e.what());
  }
}

at::Tensor chunk_mean_fwd_emu(const at::Tensor& x, int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens,
                              int64_t max_seqlen, int64_t sms, int64_t schedule, int64_t seed) {
  const LaunchEnv env = emu_env(sms, schedule, seed);
  return guarded("chunk_mean_fwd", [&] { return chunk_mean_fwd_entry(x, chunk_size, cu_seqlens, max_seqlen, env); });
}

at::Tensor chunk_mean_bwd_emu(const at::Tensor& grad_mean, const at::Tensor& x, int64_t chunk_size,
                              const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, int64_t sms,
                              int64_t schedule, int64_t seed) {
  const LaunchEnv env = emu_env(sms, schedule, seed);
  return guarded("chunk_mean_bwd",
                 [&] { return chunk_mean_bwd_entry(grad_mean, x, chunk_size, cu_seqlens, max_seqlen, env); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_route_fwd_emu(const at::Tensor& x, const at::Tensor& query,
                                                                   int64_t chunk_size,
                                                                   const std::optional<at::Tensor>& cu_seqlens,
                                                                   int64_t max_seqlen, double scale, int64_t sms,
                                                                   int64_t schedule, int64_t seed) {
  const LaunchEnv env = emu_env(sms, schedule, seed);
  return guarded("chunk_route_fwd", [&] {
    return chunk_route_fwd_entry(x, query, chunk_size, cu_seqlens, max_seqlen, scale, env);
  });
}

std::tuple<at::Tensor, at::Tensor> chunk_route_bwd_emu(const at::Tensor& dy, const at::Tensor& dweights,
                                                       const at::Tensor& dsummary, const at::Tensor& x,
                                                       const at::Tensor& query, const at::Tensor& weights,
                                                       int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens,
                                                       int64_t max_seqlen, double scale, int64_t sms, int64_t schedule,
                                                       int64_t seed) {
  const LaunchEnv env = emu_env(sms, schedule, seed);
  return guarded("chunk_route_bwd", [&] {
    return chunk_route_bwd_entry(dy, dweights, dsummary, x, query, weights, chunk_size, cu_seqlens, max_seqlen, scale,
                                 env);
  });
}

at::Tensor chunk_mean_table_fwd_emu(const at::Tensor& x, const at::Tensor& cu_chunks, const at::Tensor& seq_chunks,
                                    int64_t max_chunks, int64_t sms, int64_t schedule, int64_t seed) {
  const LaunchEnv env = emu_env(sms, schedule, seed);
  return guarded("chunk_mean_table_fwd",
                 [&] { return chunk_mean_table_fwd_entry(x, cu_chunks, seq_chunks, max_chunks, env); });
}

at::Tensor chunk_mean_table_bwd_emu(const at::Tensor& grad_mean, const at::Tensor& x, const at::Tensor& cu_chunks,
                                    const at::Tensor& seq_chunks, int64_t max_chunks, int64_t sms, int64_t schedule,
                                    int64_t seed) {
  const LaunchEnv env = emu_env(sms, schedule, seed);
  return guarded("chunk_mean_table_bwd",
                 [&] { return chunk_mean_table_bwd_entry(grad_mean, x, cu_chunks, seq_chunks, max_chunks, env); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_route_table_fwd_emu(const at::Tensor& x, const at::Tensor& query,
                                                                         const at::Tensor& cu_chunks,
                                                                         const at::Tensor& seq_chunks,
                                                                         int64_t max_chunks, double scale, int64_t sms,
                                                                         int64_t schedule, int64_t seed) {
  const LaunchEnv env = emu_env(sms, schedule, seed);
  return guarded("chunk_route_table_fwd", [&] {
    return chunk_route_table_fwd_entry(x, query, cu_chunks, seq_chunks, max_chunks, scale, env);
  });
}

std::tuple<at::Tensor, at::Tensor> chunk_route_table_bwd_emu(const at::Tensor& dy, const at::Tensor& dweights,
                                                             const at::Tensor& dsummary, const at::Tensor& x,
                                                             const at::Tensor& query, const at::Tensor& weights,
                                                             const at::Tensor& cu_chunks, const at::Tensor& seq_chunks,
                                                             int64_t max_chunks, double scale, int64_t sms,
                                                             int64_t schedule, int64_t seed) {
  const LaunchEnv env = emu_env(sms, schedule, seed);
  return guarded("chunk_route_table_bwd", [&] {
    return chunk_route_table_bwd_entry(dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks, max_chunks,
                                       scale, env);
  });
}

}  // namespace
}  // namespace routing_kernels

TORCH_LIBRARY(routing_kernels_emu, m) {
  m.def("chunk_mean_fwd(Tensor x, int chunk_size, Tensor? cu_seqlens, int max_seqlen, int sms, int schedule, "
        "int seed) -> Tensor");
  m.def("chunk_mean_bwd(Tensor grad_mean, Tensor x, int chunk_size, Tensor? cu_seqlens, int max_seqlen, int sms, "
        "int schedule, int seed) -> Tensor");
  m.def("chunk_route_fwd(Tensor x, Tensor query, int chunk_size, Tensor? cu_seqlens, int max_seqlen, float scale, "
        "int sms, int schedule, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("chunk_route_bwd(Tensor dy, Tensor dweights, Tensor dsummary, Tensor x, Tensor query, Tensor weights, "
        "int chunk_size, Tensor? cu_seqlens, int max_seqlen, float scale, int sms, int schedule, int seed) "
        "-> (Tensor, Tensor)");
  // The chunk-table kernels (chunk_table_entry.cuh), same extra arguments.
  m.def("chunk_mean_table_fwd(Tensor x, Tensor cu_chunks, Tensor seq_chunks, int max_chunks, int sms, int schedule, "
        "int seed) -> Tensor");
  m.def("chunk_mean_table_bwd(Tensor grad_mean, Tensor x, Tensor cu_chunks, Tensor seq_chunks, int max_chunks, "
        "int sms, int schedule, int seed) -> Tensor");
  m.def("chunk_route_table_fwd(Tensor x, Tensor query, Tensor cu_chunks, Tensor seq_chunks, int max_chunks, "
        "float scale, int sms, int schedule, int seed) -> (Tensor, Tensor, Tensor)");
  m.def("chunk_route_table_bwd(Tensor dy, Tensor dweights, Tensor dsummary, Tensor x, Tensor query, Tensor weights, "
        "Tensor cu_chunks, Tensor seq_chunks, int max_chunks, float scale, int sms, int schedule, int seed) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(routing_kernels_emu, CPU, m) {
  m.impl("chunk_mean_fwd", TORCH_FN(routing_kernels::chunk_mean_fwd_emu));
  m.impl("chunk_mean_bwd", TORCH_FN(routing_kernels::chunk_mean_bwd_emu));
  m.impl("chunk_route_fwd", TORCH_FN(routing_kernels::chunk_route_fwd_emu));
  m.impl("chunk_route_bwd", TORCH_FN(routing_kernels::chunk_route_bwd_emu));
  m.impl("chunk_mean_table_fwd", TORCH_FN(routing_kernels::chunk_mean_table_fwd_emu));
  m.impl("chunk_mean_table_bwd", TORCH_FN(routing_kernels::chunk_mean_table_bwd_emu));
  m.impl("chunk_route_table_fwd", TORCH_FN(routing_kernels::chunk_route_table_fwd_emu));
  m.impl("chunk_route_table_bwd", TORCH_FN(routing_kernels::chunk_route_table_bwd_emu));
}
