// The one way our CUDA kernels are launched, and the few spellings that differ between the nvcc build and the host
// emulation (include/routing_kernels/cuda_emu/cuda_emu.h, built with ROUTING_KERNELS_CUDA_EMU). Kernel (.cuh) and
// launch code include this header and nothing CUDA-specific, so the emulated build runs the production grid,
// tiling and alignment decisions, not a copy of them.
#pragma once

#include <routing_kernels/accum.h>

#include <c10/util/Exception.h>

#include <type_traits>

#if defined(ROUTING_KERNELS_CUDA_EMU)
#include <routing_kernels/cuda_emu/cuda_emu.h>
// A static __shared__ array of a kernel: a slice of the emulator's per-block arena, NaN-poisoned for each block.
#define RK_SHARED_ARRAY(T, name, count)        \
  static ::cuda_emu::SharedSlot name##_slot_; \
  T* const name = name##_slot_.get<T>(static_cast<std::size_t>(count), __FILE__, __LINE__)
#elif defined(__CUDACC__)
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#define RK_SHARED_ARRAY(T, name, count) __shared__ T name[count]
#else
#error "launch.cuh is for nvcc or the host emulation (define ROUTING_KERNELS_CUDA_EMU)"
#endif

// A device-side check of an input the host does not read (it would cost a synchronisation): the emulation always
// checks and reports the message with the source line; an nvcc build compiled with -DROUTING_KERNELS_DEBUG_CHECKS
// traps (the launch then fails with an illegal-instruction error); a release nvcc build compiles it out.
#if defined(ROUTING_KERNELS_CUDA_EMU)
#define RK_DEVICE_CHECK(cond, msg)                                                   \
  do {                                                                               \
    if (!(cond)) ::cuda_emu::fail_in_kernel(::cuda_emu::at_line(msg, __FILE__, __LINE__)); \
  } while (0)
#elif defined(ROUTING_KERNELS_DEBUG_CHECKS)
#define RK_DEVICE_CHECK(cond, msg) \
  do {                             \
    if (!(cond)) __trap();         \
  } while (0)
#else
#define RK_DEVICE_CHECK(cond, msg) (void)0
#endif

namespace routing_kernels {

// Launches kernel<<<grid, block, 0, stream>>>(args...) after checking the block against MAX_THREADS, the bound
// the kernel declares with __launch_bounds__(MAX_THREADS) (give both the same constant). A block above the bound
// would fail to launch on the GPU; here it fails the same way in both builds, before the launch.
template <int MAX_THREADS, typename... Params>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   std::type_identity_t<Params>... args) {
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  TORCH_INTERNAL_ASSERT(threads >= 1 && threads <= MAX_THREADS, "block of ", threads,
                        " threads above the kernel's __launch_bounds__(", MAX_THREADS, ")");
#if defined(ROUTING_KERNELS_CUDA_EMU)
  (void)stream;
  ::cuda_emu::launch(kernel, grid, block, args...);
#else
  kernel<<<grid, block, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace routing_kernels
