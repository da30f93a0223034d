// Argument checks shared by every op and device. Each failure raises c10::Error (RuntimeError in Python)
// whose message names the offending argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace routing_kernels {

inline void check_device(const at::Tensor& t, c10::DeviceType type, const char* name) {
  TORCH_CHECK(t.device().type() == type, name, " must be a ", c10::DeviceTypeName(type, /*lower_case=*/true),
              " tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

// The dtypes every kernel is instantiated for.
inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == rank, name, " must have ", rank, " dimensions ", layout, ", got shape ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

inline void check_chunk_size(int64_t chunk_size, const char* name = "chunk_size") {
  TORCH_CHECK(chunk_size >= 1, name, " must be >= 1, got ", chunk_size);
}

// Metadata of the packed-varlen offsets: int32, 1-D with S+1 >= 1 entries, on the device of `x`.
inline void check_cu_seqlens(const at::Tensor& cu_seqlens, const at::Tensor& x, const char* name = "cu_seqlens") {
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, name, " must be int32, got ", cu_seqlens.scalar_type());
  check_rank(cu_seqlens, 1, name, "(S + 1,)");
  TORCH_CHECK(cu_seqlens.numel() >= 1, name, " must hold at least one offset (S + 1 >= 1)");
  check_same_device(cu_seqlens, x, name, "x");
}

// Values of host-side offsets: start at 0, non-decreasing, end at total_tokens, no length above max_seqlen.
// Checking device-side offsets would cost a synchronisation, so CUDA kernels trust them.
inline void check_cu_seqlens_values(const int32_t* cu, int64_t num_seqs, int64_t total_tokens, int64_t max_seqlen,
                                    const char* name = "cu_seqlens") {
  TORCH_CHECK(cu[0] == 0, name, "[0] must be 0, got ", cu[0]);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = int64_t{cu[s + 1]} - cu[s];
    TORCH_CHECK(len >= 0, name, " must be non-decreasing, got ", name, "[", s, "]=", cu[s], " > ", name, "[", s + 1,
                "]=", cu[s + 1]);
    TORCH_CHECK(len <= max_seqlen, "max_seqlen (", max_seqlen, ") is below the length ", len, " of sequence ", s,
                " in ", name);
  }
  TORCH_CHECK(cu[num_seqs] == total_tokens, name, "[-1] must equal the number of tokens of x (", total_tokens,
              "), got ", cu[num_seqs]);
}

}  // namespace routing_kernels
