// chunk_mean_fwd(Tensor x, int chunk_size, Tensor? cu_seqlens, int max_seqlen) -> Tensor
//
//   dense : x (B, N, H, D), cu_seqlens None, max_seqlen ignored        -> out (B, M, H, D), M = ceil(N / chunk_size)
//   varlen: x (T, H, D), cu_seqlens int32 (S + 1,), max_seqlen >= L_s  -> out (S, M, H, D), M = ceil(max_seqlen / chunk_size)
//
// out[s, i] is the mean of x over tokens [i * chunk_size, min((i + 1) * chunk_size, L_s)) of sequence s, accumulated
// in fp32 (fp64 for fp64 input), and 0 where sequence s has no chunk i. Shape logic shared by the CPU and CUDA kernels.
//
// chunk_mean_bwd(Tensor grad_mean, Tensor x, int chunk_size, Tensor? cu_seqlens, int max_seqlen) -> Tensor dx
//
//   grad_mean (S, M, H, D) as out above, x's dtype, any strides (a .sum() backward hands a stride-0 expanded one);
//   dx like x (same shape and dtype, contiguous): dx[t] = grad_mean[s, i] / |chunk i| for every token t of chunk i of
//   sequence s, divided in fp32 (fp64 for fp64) and rounded once to x's dtype. Entries of chunks a sequence lacks
//   are not read.
#pragma once

#include <routing_kernels/checks.h>
#include <routing_kernels/chunk_shape.h>

#include <array>
#include <optional>

namespace routing_kernels {

inline ChunkMeanShape check_chunk_mean_args(const at::Tensor& x, int64_t chunk_size,
                                            const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                            c10::DeviceType device) {
  check_device(x, device, "x");
  check_float_dtype(x, "x");
  check_chunk_size(chunk_size);
  ChunkMeanShape shape{};
  shape.varlen = cu_seqlens.has_value();
  if (shape.varlen) {
    check_rank(x, 3, "x", "(T, H, D) when cu_seqlens is given");
    check_cu_seqlens(*cu_seqlens, x);
    TORCH_CHECK(max_seqlen >= 0, "max_seqlen must be >= 0, got ", max_seqlen);
    shape.num_seqs = cu_seqlens->numel() - 1;
    shape.num_tokens = x.size(0);
    shape.num_chunks = ceil_div(max_seqlen, chunk_size);
  } else {
    check_rank(x, 4, "x", "(B, N, H, D) when cu_seqlens is None");
    shape.num_seqs = x.size(0);
    shape.seqlen = x.size(1);
    shape.num_tokens = shape.num_seqs * shape.seqlen;
    shape.num_chunks = ceil_div(shape.seqlen, chunk_size);
  }
  shape.num_heads = x.size(-2);
  shape.head_dim = x.size(-1);
  return shape;
}

// grad_mean of chunk_mean_bwd: the forward output's shape (S, M, H, D), x's dtype and device; strides are free.
inline void check_chunk_mean_grad(const at::Tensor& grad_mean, const at::Tensor& x, const ChunkMeanShape& shape) {
  check_same_device(grad_mean, x, "grad_mean", "x");
  const std::array<int64_t, 4> want{shape.num_seqs, shape.num_chunks, shape.num_heads, shape.head_dim};
  TORCH_CHECK(grad_mean.sizes() == at::IntArrayRef(want) && grad_mean.scalar_type() == x.scalar_type(),
              "grad_mean must be (S, M, H, D) = ", at::IntArrayRef(want), " in x's dtype ", x.scalar_type(), ", got ",
              grad_mean.sizes(), " in ", grad_mean.scalar_type());
}

}  // namespace routing_kernels
