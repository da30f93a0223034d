// The accumulation rule of every kernel, CPU and CUDA: fp64 stays fp64; fp32, fp16 and bf16 accumulate in fp32.
// Sums, softmax statistics and the fp32 outputs (chunk_route's weights, routed_attention's lse) use it.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

#include <type_traits>

namespace routing_kernels {

// For kernels templated on the element type (ATen's opmath type, which follows the same rule for these dtypes).
template <typename scalar_t>
using accum_t = at::opmath_type<scalar_t>;

static_assert(std::is_same_v<accum_t<double>, double> && std::is_same_v<accum_t<float>, float> &&
                  std::is_same_v<accum_t<at::Half>, float> && std::is_same_v<accum_t<at::BFloat16>, float>,
              "accum_t must keep fp64 and take fp32 for every other dtype");

// For tensors: the dtype a kernel accumulates (and stores its fp32-or-fp64 outputs) in, for inputs of `dtype`.
inline at::ScalarType accum_type(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace routing_kernels
