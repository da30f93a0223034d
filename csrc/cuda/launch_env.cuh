// What the tensor-level CUDA entry points (chunk_*_entry.cuh) need from their caller: the device type the tensors
// must live on, the SM count the tiling targets and the stream. The nvcc build passes CUDA, the device's SM count
// and the current stream; the host emulation (csrc/emu) passes CPU, an SM count chosen by the test, and asks for
// NaN-poisoned outputs, so an element a kernel forgets to write shows.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <limits>

#include "launch.cuh"

namespace routing_kernels {

struct LaunchEnv {
  c10::DeviceType device;
  int sms;  // streaming multiprocessors the grid is sized for
  cudaStream_t stream;
  bool poison_outputs;  // fill every allocation with NaN (emulation only: costs a pass over memory)
};

inline at::Tensor empty_for(at::IntArrayRef sizes, const at::TensorOptions& opts, const LaunchEnv& env) {
  at::Tensor t = at::empty(sizes, opts);
  if (env.poison_outputs) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace routing_kernels
