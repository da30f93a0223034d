// chunk_mean_table_fwd / _bwd and chunk_route_table_fwd / _bwd on tensors for the CUDA kernels (schemas in
// registration.cpp; the chunk table in routing_kernels/_layout.py): checks of shapes and dtypes, allocation, the
// empty cases, dtype dispatch. The launches are in chunk_table_launch.cuh. Shared by chunk_table.cu and the host
// emulation (csrc/emu). The table's VALUES are trusted here (the op layer validates them; reading them would cost
// a host sync); a sequence with more than max_chunks chunks is reported on the device by the emulation and by
// nvcc builds with -DROUTING_KERNELS_DEBUG_CHECKS.
#pragma once

#include <routing_kernels/chunk_route.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <tuple>

#include "chunk_table_launch.cuh"
#include "launch_env.cuh"

namespace routing_kernels {
namespace {

inline void check_table_index(const at::Tensor& t, const at::Tensor& x, const char* name, const char* layout) {
  check_same_device(t, x, name, "x");
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  check_rank(t, 1, name, layout);
  TORCH_CHECK(t.numel() >= 1, name, " must hold at least one offset ", layout, ", got none");
}

// x (T, H, D) packed, cu_chunks (K + 1,) and seq_chunks (S + 1,) int32 on x's device, max_chunks >= 0.
inline ChunkMeanShape check_chunk_table_args(const at::Tensor& x, const at::Tensor& cu_chunks,
                                             const at::Tensor& seq_chunks, int64_t max_chunks,
                                             c10::DeviceType device) {
  check_device(x, device, "x");
  check_float_dtype(x, "x");
  check_rank(x, 3, "x", "(T, H, D): packed tokens");
  check_table_index(cu_chunks, x, "cu_chunks", "(K + 1,)");
  check_table_index(seq_chunks, x, "seq_chunks", "(S + 1,)");
  TORCH_CHECK(max_chunks >= 0, "max_chunks must be >= 0, got ", max_chunks);
  TORCH_CHECK(x.size(0) <= std::numeric_limits<int32_t>::max(), "x has ", x.size(0),
              " tokens: int32 cu_chunks address at most 2^31 - 1");
  // What the shapes alone say (no values read): every chunk holds a token, and tokens mean a chunk somewhere.
  const int64_t num_tokens = x.size(0), num_chunks = cu_chunks.numel() - 1;
  TORCH_CHECK(num_chunks <= num_tokens && (num_chunks == 0) == (num_tokens == 0), "cu_chunks must hold K + 1 offsets "
              "with 1 <= K <= T (every chunk non-empty) when x has T > 0 tokens, and [0] when T = 0; got K = ",
              num_chunks, " for T = ", num_tokens);
  TORCH_CHECK(max_chunks >= 1 || num_tokens == 0, "max_chunks must be >= 1 when x has tokens, got ", max_chunks);
  return table_shape(seq_chunks.numel() - 1, x.size(0), x.size(1), x.size(2), max_chunks);
}

inline TableChunks table_chunks(const at::Tensor& cu, const at::Tensor& seq, const ChunkMeanShape& sh) {
  return TableChunks{cu.const_data_ptr<int32_t>(), seq.const_data_ptr<int32_t>(), cu.numel() - 1, sh.num_seqs,
                     sh.num_tokens};
}

inline at::Tensor chunk_mean_table_fwd_entry(const at::Tensor& x, const at::Tensor& cu_chunks,
                                             const at::Tensor& seq_chunks, int64_t max_chunks, const LaunchEnv& env) {
  const ChunkMeanShape sh = check_chunk_table_args(x, cu_chunks, seq_chunks, max_chunks, env.device);
  const int64_t S = sh.num_seqs, M = sh.num_chunks, H = sh.num_heads, D = sh.head_dim;
  const auto acc_opts = x.options().dtype(accum_type(x.scalar_type()));
  if (sh.num_tokens == 0 || S * M * H * D == 0) {  // no chunk anywhere, or nothing to write: zeros
    return at::zeros({S, M, H, D}, x.options());
  }
  const at::Tensor x_c = x.contiguous(), cu = cu_chunks.contiguous(), seq = seq_chunks.contiguous();
  const TableChunks chunks = table_chunks(cu, seq, sh);
  at::Tensor means = empty_for({S * M, H * D}, acc_opts, env);
  at::Tensor part = empty_for({table_part_rows(chunks), H * D}, acc_opts, env);
  const Geometry g = table_geometry(sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_mean_table_fwd_cuda", [&] {
    using acc_t = accum_t<scalar_t>;
    chunk_mean_table_fwd_launch<scalar_t>(sh, g, env.sms, chunks, x_c.const_data_ptr<scalar_t>(),
                                          means.mutable_data_ptr<acc_t>(), part.mutable_data_ptr<acc_t>(), env.stream);
  });
  return means.view({S, M, H, D}).to(x.scalar_type());
}

inline at::Tensor chunk_mean_table_bwd_entry(const at::Tensor& grad_mean, const at::Tensor& x,
                                             const at::Tensor& cu_chunks, const at::Tensor& seq_chunks,
                                             int64_t max_chunks, const LaunchEnv& env) {
  const ChunkMeanShape sh = check_chunk_table_args(x, cu_chunks, seq_chunks, max_chunks, env.device);
  check_chunk_mean_grad(grad_mean, x, sh);
  at::Tensor dx = empty_for(x.sizes(), x.options(), env);
  if (x.numel() == 0) return dx;
  const at::Tensor grad_c = grad_mean.contiguous(), cu = cu_chunks.contiguous(), seq = seq_chunks.contiguous();
  const TableChunks chunks = table_chunks(cu, seq, sh);
  const Geometry g = table_geometry(sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_mean_table_bwd_cuda", [&] {
    chunk_mean_table_bwd_launch<scalar_t>(sh, g, chunks, grad_c.const_data_ptr<scalar_t>(),
                                          dx.mutable_data_ptr<scalar_t>(), env.stream);
  });
  return dx;
}

inline ChunkMeanShape chunk_route_table_prepare(const at::Tensor& x, const at::Tensor& query,
                                                const at::Tensor& cu_chunks, const at::Tensor& seq_chunks,
                                                int64_t max_chunks, c10::DeviceType device) {
  const ChunkMeanShape sh = check_chunk_table_args(x, cu_chunks, seq_chunks, max_chunks, device);
  check_chunk_route_query(query, x, sh);
  TORCH_CHECK(sh.head_dim <= MAX_HEAD_DIM, "the CUDA chunk_route kernels support head_dim <= ", MAX_HEAD_DIM,
              ", got ", sh.head_dim);
  return sh;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_route_table_fwd_entry(
    const at::Tensor& x, const at::Tensor& query, const at::Tensor& cu_chunks, const at::Tensor& seq_chunks,
    int64_t max_chunks, double scale, const LaunchEnv& env) {
  const ChunkMeanShape sh = chunk_route_table_prepare(x, query, cu_chunks, seq_chunks, max_chunks, env.device);
  const int64_t S = sh.num_seqs, M = sh.num_chunks, H = sh.num_heads, D = sh.head_dim;
  const auto acc_opts = x.options().dtype(accum_type(x.scalar_type()));
  at::Tensor y = empty_for(x.sizes(), x.options(), env);
  at::Tensor weights = empty_for({S, H, M}, acc_opts, env);
  at::Tensor summary = empty_for({S, H, D}, x.options(), env);
  if (sh.num_tokens == 0 || H == 0) {  // every sequence empty: zero weights and summary, nothing to launch
    weights.zero_();
    summary.zero_();
    return {y, weights, summary};
  }
  const at::Tensor x_c = x.contiguous(), q_c = query.contiguous();
  const at::Tensor cu = cu_chunks.contiguous(), seq = seq_chunks.contiguous();
  const TableChunks chunks = table_chunks(cu, seq, sh);
  at::Tensor means = empty_for({S * M, H * D}, acc_opts, env);
  at::Tensor part = empty_for({table_part_rows(chunks), H * D}, acc_opts, env);
  const Geometry g = table_geometry(sh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_route_table_fwd_cuda", [&] {
    using acc_t = accum_t<scalar_t>;
    route_fwd_launch<scalar_t>(sh, g, env.sms, chunks, x_c.const_data_ptr<scalar_t>(), q_c.const_data_ptr<scalar_t>(),
                               query.dim() == 2 ? 0 : H * D, static_cast<acc_t>(scale),
                               weights.mutable_data_ptr<acc_t>(), means.mutable_data_ptr<acc_t>(),
                               part.mutable_data_ptr<acc_t>(), summary.mutable_data_ptr<scalar_t>(),
                               y.mutable_data_ptr<scalar_t>(), env.stream);
  });
  return {y, weights, summary};
}

inline std::tuple<at::Tensor, at::Tensor> chunk_route_table_bwd_entry(
    const at::Tensor& dy, const at::Tensor& dweights, const at::Tensor& dsummary, const at::Tensor& x,
    const at::Tensor& query, const at::Tensor& weights, const at::Tensor& cu_chunks, const at::Tensor& seq_chunks,
    int64_t max_chunks, double scale, const LaunchEnv& env) {
  const ChunkMeanShape sh = chunk_route_table_prepare(x, query, cu_chunks, seq_chunks, max_chunks, env.device);
  const int64_t S = sh.num_seqs, M = sh.num_chunks, H = sh.num_heads, D = sh.head_dim;
  check_chunk_route_grads(dy, dweights, dsummary, weights, x, sh);
  const auto acc_opts = x.options().dtype(accum_type(x.scalar_type()));
  at::Tensor dx = empty_for(x.sizes(), x.options(), env);
  at::Tensor dquery = empty_for({S, H, D}, acc_opts, env);
  if (x.numel() == 0) {  // no tokens (or no values): dx is empty, and no chunk reaches the query
    dquery.zero_();
  } else {
    const at::Tensor x_c = x.contiguous(), dy_c = dy.contiguous(), q_c = query.contiguous();
    const at::Tensor w_c = weights.contiguous(), dsum_c = dsummary.contiguous();
    const at::Tensor dweights_c = dweights.to(accum_type(x.scalar_type())).contiguous();
    const at::Tensor cu = cu_chunks.contiguous(), seq = seq_chunks.contiguous();
    const TableChunks chunks = table_chunks(cu, seq, sh);
    at::Tensor means = empty_for({S * M, H * D}, acc_opts, env);
    at::Tensor dw = empty_for({S, H, M}, acc_opts, env);  // dw after pass 1, ds after pass 2
    at::Tensor part_sum = empty_for({table_part_rows(chunks), H * D}, acc_opts, env);
    at::Tensor part_dot = empty_for({table_part_rows(chunks), H * D}, acc_opts, env);
    const Geometry g = table_geometry(sh);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_route_table_bwd_cuda", [&] {
      using acc_t = accum_t<scalar_t>;
      route_bwd_launch<scalar_t>(
          sh, g, env.sms, chunks, x_c.const_data_ptr<scalar_t>(), dy_c.const_data_ptr<scalar_t>(),
          q_c.const_data_ptr<scalar_t>(), query.dim() == 2 ? 0 : H * D, dsum_c.const_data_ptr<scalar_t>(),
          w_c.const_data_ptr<acc_t>(), dweights_c.const_data_ptr<acc_t>(), static_cast<acc_t>(scale),
          means.mutable_data_ptr<acc_t>(), dw.mutable_data_ptr<acc_t>(), part_sum.mutable_data_ptr<acc_t>(),
          part_dot.mutable_data_ptr<acc_t>(), dquery.mutable_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(),
          env.stream);
    });
  }
  at::Tensor dq_out = query.dim() == 2 ? dquery.sum(0) : dquery;
  return {dx, dq_out.to(query.scalar_type())};
}

}  // namespace
}  // namespace routing_kernels
