// chunk_route_fwd / _bwd on tensors for the CUDA kernels (contract in include/routing_kernels/chunk_route.h):
// checks, allocation, the empty-input cases, dtype dispatch; the launches are in chunk_route_launch.cuh. Shared by
// chunk_route.cu and the host emulation (csrc/emu). cu_seqlens is read by the kernels only (no host sync); a
// sequence longer than max_seqlen is reported on the device by the emulation and by nvcc builds with
// -DROUTING_KERNELS_DEBUG_CHECKS (launch.cuh), and left partly unwritten by release builds.
#pragma once

#include <routing_kernels/chunk_route.h>

#include <ATen/Dispatch.h>

#include <tuple>

#include "chunk_route_launch.cuh"
#include "launch_env.cuh"

namespace routing_kernels {
namespace {

inline ChunkMeanShape chunk_route_prepare(const at::Tensor& x, const at::Tensor& query, int64_t chunk_size,
                                          const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                          c10::DeviceType device) {
  const ChunkMeanShape sh = check_chunk_mean_args(x, chunk_size, cu_seqlens, max_seqlen, device);
  check_chunk_route_query(query, x, sh);
  TORCH_CHECK(sh.head_dim <= MAX_HEAD_DIM, "the CUDA chunk_route kernels support head_dim <= ", MAX_HEAD_DIM, ", got ",
              sh.head_dim);
  return sh;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_route_fwd_entry(
    const at::Tensor& x, const at::Tensor& query, int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens,
    int64_t max_seqlen, double scale, const LaunchEnv& env) {
  const ChunkMeanShape sh = chunk_route_prepare(x, query, chunk_size, cu_seqlens, max_seqlen, env.device);
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
  at::Tensor means = empty_for({S * M, H * D}, acc_opts, env);
  const at::Tensor x_c = x.contiguous(), q_c = query.contiguous();
  const at::Tensor cu = sh.varlen ? cu_seqlens->contiguous() : at::Tensor();
  const int32_t* p_cu = sh.varlen ? cu.const_data_ptr<int32_t>() : nullptr;
  const Geometry g = geometry(sh, chunk_size, max_seqlen);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_route_fwd_cuda", [&] {
    using acc_t = accum_t<scalar_t>;
    chunk_route_fwd_launch<scalar_t>(sh, g, env.sms, x_c.const_data_ptr<scalar_t>(), q_c.const_data_ptr<scalar_t>(),
                                     query.dim() == 2 ? 0 : H * D, p_cu, static_cast<acc_t>(scale),
                                     weights.mutable_data_ptr<acc_t>(), means.mutable_data_ptr<acc_t>(),
                                     summary.mutable_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), env.stream);
  });
  return {y, weights, summary};
}

inline std::tuple<at::Tensor, at::Tensor> chunk_route_bwd_entry(
    const at::Tensor& dy, const at::Tensor& dweights, const at::Tensor& dsummary, const at::Tensor& x,
    const at::Tensor& query, const at::Tensor& weights, int64_t chunk_size,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale, const LaunchEnv& env) {
  const ChunkMeanShape sh = chunk_route_prepare(x, query, chunk_size, cu_seqlens, max_seqlen, env.device);
  const int64_t S = sh.num_seqs, M = sh.num_chunks, H = sh.num_heads, D = sh.head_dim;
  check_chunk_route_grads(dy, dweights, dsummary, weights, x, sh);
  const auto acc_opts = x.options().dtype(accum_type(x.scalar_type()));
  at::Tensor dx = empty_for(x.sizes(), x.options(), env);
  at::Tensor dquery = empty_for({S, H, D}, acc_opts, env);
  if (x.numel() == 0) {  // no tokens (or no values): dx is empty, and no chunk reaches the query
    dquery.zero_();
  } else {
    at::Tensor means = empty_for({S * M, H * D}, acc_opts, env);
    at::Tensor dw = empty_for({S, H, M}, acc_opts, env);  // dw after pass 1, ds after pass 2
    const at::Tensor x_c = x.contiguous(), dy_c = dy.contiguous(), q_c = query.contiguous();
    const at::Tensor w_c = weights.contiguous(), dsum_c = dsummary.contiguous();
    const at::Tensor dweights_c = dweights.to(accum_type(x.scalar_type())).contiguous();
    const at::Tensor cu = sh.varlen ? cu_seqlens->contiguous() : at::Tensor();
    const int32_t* p_cu = sh.varlen ? cu.const_data_ptr<int32_t>() : nullptr;
    const Geometry g = geometry(sh, chunk_size, max_seqlen);

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_route_bwd_cuda", [&] {
      using acc_t = accum_t<scalar_t>;
      chunk_route_bwd_launch<scalar_t>(
          sh, g, env.sms, x_c.const_data_ptr<scalar_t>(), dy_c.const_data_ptr<scalar_t>(),
          q_c.const_data_ptr<scalar_t>(), query.dim() == 2 ? 0 : H * D, dsum_c.const_data_ptr<scalar_t>(),
          w_c.const_data_ptr<acc_t>(), dweights_c.const_data_ptr<acc_t>(), p_cu, static_cast<acc_t>(scale),
          means.mutable_data_ptr<acc_t>(), dw.mutable_data_ptr<acc_t>(), dquery.mutable_data_ptr<acc_t>(),
          dx.mutable_data_ptr<scalar_t>(), env.stream);
    });
  }
  at::Tensor dq_out = query.dim() == 2 ? dquery.sum(0) : dquery;
  return {dx, dq_out.to(query.scalar_type())};
}

}  // namespace
}  // namespace routing_kernels
