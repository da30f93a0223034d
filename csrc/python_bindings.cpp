// The Python module routing_kernels._C. Loading it runs the TORCH_LIBRARY registrations of the other sources,
// which is what makes torch.ops.routing_kernels.* available; the module itself only reports how it was built.
#include <pybind11/pybind11.h>
#include <routing_kernels/cpu_memory.h>
#include <routing_kernels/routed_attention.h>

// setup.py passes these; the fallbacks keep other builds compiling.
#ifndef ROUTING_KERNELS_VERSION
#define ROUTING_KERNELS_VERSION "unknown"
#endif
#ifndef ROUTING_KERNELS_WITH_CUDA
#define ROUTING_KERNELS_WITH_CUDA 0
#endif
#ifndef ROUTING_KERNELS_CUDA_ARCHS
#define ROUTING_KERNELS_CUDA_ARCHS ""
#endif
#ifndef ROUTING_KERNELS_TORCH_VERSION
#define ROUTING_KERNELS_TORCH_VERSION "unknown"
#endif
#ifndef ROUTING_KERNELS_CUDA_VERSION
#define ROUTING_KERNELS_CUDA_VERSION ""
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = ROUTING_KERNELS_VERSION;
  info["cuda_built"] = static_cast<bool>(ROUTING_KERNELS_WITH_CUDA);
  info["cuda_archs"] = ROUTING_KERNELS_CUDA_ARCHS;  // TORCH_CUDA_ARCH_LIST at build time, "" without CUDA
  info["torch_version"] = ROUTING_KERNELS_TORCH_VERSION;
  const std::string cuda_version = ROUTING_KERNELS_CUDA_VERSION;
  info["cuda_version"] = cuda_version.empty() ? py::object(py::none()) : py::object(py::str(cuda_version));
  return info;
}

py::dict cpu_output_cache_stats() {
  const routing_kernels::CpuOutputCacheStats s = routing_kernels::cpu_output_cache_stats();
  py::dict info;
  info["cached_bytes"] = s.cached_bytes;
  info["limit_bytes"] = s.limit_bytes;
  info["hits"] = s.hits;
  info["misses"] = s.misses;
  return info;
}

py::dict routed_attention_bwd_stats() {
  const routing_kernels::cpu::RoutedAttentionBwdStats s = routing_kernels::cpu::routed_attention_bwd_stats();
  py::dict info;
  info["budget_bytes"] = s.budget_bytes;
  info["phases"] = s.phases;
  info["buffered_phases"] = s.buffered_phases;
  info["workspace_bytes"] = s.workspace_bytes;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++/CUDA kernels of routing_kernels; the ops are under torch.ops.routing_kernels";
  m.def("build_info", &build_info, "How this extension was built: version, cuda_built, cuda_archs, torch_version, "
                                   "cuda_version.");
  m.def("cpu_output_cache_stats", &cpu_output_cache_stats,
        "The CPU output cache: cached_bytes, limit_bytes, hits, misses.");
  m.def("empty_cpu_output_cache", &routing_kernels::empty_cpu_output_cache,
        "Free the CPU output cache's buffers (live outputs are unaffected).");
  m.def("set_cpu_output_cache_poison", &routing_kernels::set_cpu_output_cache_poison, py::arg("enabled"),
        "Tests: fill every C++ CPU kernel output with NaN (integers: -12345) before the kernel writes it.");
  m.def("set_routed_attention_bwd_workspace", &routing_kernels::cpu::set_routed_attention_bwd_workspace,
        py::arg("bytes"),
        "Tests: the CPU routed_attention backward's workspace budget in bytes (-1: ROUTING_KERNELS_CPU_BWD_WORKSPACE_MB).");
  m.def("routed_attention_bwd_stats", &routed_attention_bwd_stats,
        "The CPU routed_attention backward: budget_bytes, and of its last call phases, buffered_phases, "
        "workspace_bytes.");
}
