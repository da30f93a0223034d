// Large CPU outputs (y, dx: the size of x) come from a small cache of recently freed buffers.
//
// Why: torch's CPU allocator hands blocks of 32 MB and more straight back to the OS when they are freed (glibc
// malloc's mmap threshold), so every call of a memory-bound kernel page-faults its outputs in again: the kernel
// zeroes each fresh page before we write it. Measured on our 2-core VM (B=4 N=8192 H=8 D=64 fp32, 64 MB
// outputs): chunk_route fwd 19.5 ms with fresh pages (2 MB huge pages already), 10.5 ms with warm ones; fwd+bwd
// 42 ms -> 26 ms. A training loop calls the op with the same shapes every step, so a freed output is exactly
// what the next call needs.
//
// The cache keeps whole buffers, keyed by their size rounded up to 2 MB, most recently freed first, up to
// ROUTING_KERNELS_CPU_CACHE_MB megabytes (default 256; 0 turns it off, and
// large outputs then come from at::empty, still advised to use huge pages). Buffers are 2 MB aligned and advised
// to be backed by transparent huge pages. Outputs under 1 MB use at::empty as before. The allocation events go
// to torch.profiler like torch's own (so peak-memory measurements see them); the cached bytes are reserved
// memory, like the CUDA caching allocator's, and empty_cpu_output_cache() frees them (glibc
// hands buffers of 32 MB and more back to the OS at once, smaller ones to its heap).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace routing_kernels {

// An uninitialized contiguous CPU tensor: at::empty, with large ones served from the output cache.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct CpuOutputCacheStats {
  int64_t cached_bytes;  // held by the cache, free for reuse
  int64_t limit_bytes;   // ROUTING_KERNELS_CPU_CACHE_MB, in bytes
  int64_t hits;          // outputs served from the cache
  int64_t misses;        // outputs that needed fresh memory
};

CpuOutputCacheStats cpu_output_cache_stats();

// Frees every cached buffer (outputs still alive are unaffected).
void empty_cpu_output_cache();

// Tests: fill every output empty_cpu_output hands out, cached or not, with NaN (integers: -12345), so an output
// element a kernel forgets to write shows up instead of passing on leftover data.
void set_cpu_output_cache_poison(bool enabled);

}  // namespace routing_kernels
