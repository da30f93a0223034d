// CUDA kernels of routing_kernels::chunk_route_fwd / _bwd (contract in include/routing_kernels/chunk_route.h).
//
// The same three passes as the CPU kernels (cpu/chunk_route.cpp), one launch each, on the current stream:
//   forward : reduce_chunks [x -> means, scores]  softmax_summary [weights, summary]     scale_chunks [y = w x]
//   backward: reduce_chunks [x, dy -> means, dw]  softmax_backward [ds (in dw), dquery]   scale_chunks [dx]
// The per-chunk passes give one block to a (sequence, chunk, tile) work item, so a single long sequence still
// spreads over every SM; the softmax pass gives one block to a (sequence, head) row and loops over its M chunks.
// Unlike the CPU file, the backward keeps no (S*M, H*D) buffer of rows to add to dx: scale_chunks rebuilds
// (scale * ds * q + w * dsummary) / |chunk| from ds and w, which saves writing and reading an x-sized fp32 tensor.
// cu_seqlens is read by the kernels only (no host sync), and trusted as the header says.
#include <routing_kernels/chunk_route.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <tuple>

#include "chunk_route_kernels.cuh"

namespace routing_kernels {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Host side

int num_sms(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return std::max(count, 1);
}

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// 16-byte accesses need every pointer 16-byte aligned and every token row (and tile start) a whole number of
// vectors; one head must also fit the 256 vectors of a reduce_chunks tile. Otherwise the scalar kernels run.
template <typename scalar_t>
bool can_vectorize(const Geometry& g, std::initializer_list<const void*> pointers) {
  constexpr int64_t VEC = 16 / sizeof(scalar_t);
  if (g.row == 0 || g.row % VEC != 0 || g.head_dim / std::gcd(g.head_dim, VEC) > 256) return false;
  return std::all_of(pointers.begin(), pointers.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; });
}

// Tiles of whole heads for reduce_chunks. The narrowest tile whose width is a multiple of VEC holds k heads; a
// tile takes as many such units as fit 256 vectors, then narrows while there are too few work items to give
// every SM 8 blocks (e.g. B = 1 with a few long chunks); narrower tiles leave more threads for token groups.
ReduceTiling reduce_tiling(const ChunkMeanShape& sh, int64_t longest_chunk, int64_t vec, int sms) {
  const int64_t H = sh.num_heads, D = sh.head_dim;
  const int64_t k = D == 0 ? 1 : vec / std::gcd(D, vec);  // H is a multiple of k: row % vec == 0
  const int64_t unit_vecs = k * D / vec;
  const int64_t max_units = H / k;
  int64_t units = unit_vecs == 0 ? max_units : std::min(max_units, std::max<int64_t>(1, REDUCE_THREADS / unit_vecs));
  const int64_t pairs = sh.num_seqs * sh.num_chunks;
  while (units > 1 && pairs * ceil_div(max_units, units) < 8 * int64_t{sms}) units = ceil_div(units, 2);
  ReduceTiling tl{};
  tl.heads_per_tile = units * k;
  tl.num_tiles = ceil_div(H, tl.heads_per_tile);
  tl.tile_vecs = tl.heads_per_tile * D / vec;
  const int64_t block = tl.tile_vecs <= REDUCE_THREADS ? REDUCE_THREADS : round_up(tl.tile_vecs, 32);
  tl.token_groups = tl.tile_vecs == 0 ? 1 : std::min(block / tl.tile_vecs, longest_chunk);
  tl.threads = std::max<int64_t>(32, round_up(tl.token_groups * tl.tile_vecs, 32));
  tl.num_items = pairs * tl.num_tiles;
  return tl;
}

dim3 grid_for(int64_t num_items) { return dim3(static_cast<unsigned>(std::min(num_items, MAX_BLOCKS))); }

Geometry geometry(const ChunkMeanShape& sh, int64_t chunk_size, int64_t max_seqlen) {
  const int64_t longest_seq = sh.varlen ? max_seqlen : sh.seqlen;
  Geometry g{};
  g.seqlen = sh.seqlen;
  g.num_chunks = sh.num_chunks;
  g.num_heads = sh.num_heads;
  g.head_dim = sh.head_dim;
  g.row = sh.num_heads * sh.head_dim;
  g.chunk_size = chunk_size;
  g.longest_chunk = std::max<int64_t>(1, std::min(chunk_size, longest_seq));
  return g;
}

// Pass 1 launcher; IS_BWD when dy is given (then extra is dweights and alpha is unused).
template <typename scalar_t, int VEC, bool IS_BWD>
void launch_reduce(const ChunkMeanShape& sh, const Geometry& g, int sms, const scalar_t* x, const scalar_t* dy,
                   const int32_t* cu, const scalar_t* vec, int64_t vec_seq_stride,
                   const accum_t<scalar_t>* extra, accum_t<scalar_t> alpha,
                   accum_t<scalar_t> empty_value, accum_t<scalar_t>* means,
                   accum_t<scalar_t>* out, cudaStream_t stream) {
  const ReduceTiling tl = reduce_tiling(sh, g.longest_chunk, VEC, sms);
  TORCH_INTERNAL_ASSERT(tl.token_groups * tl.tile_vecs * VEC <= ReduceSlots<VEC>::value && tl.threads <= 1024);
  if (tl.num_items == 0) return;
  const dim3 grid = grid_for(tl.num_items), block(static_cast<unsigned>(tl.threads));
  if (sh.varlen) {
    reduce_chunks_kernel<scalar_t, VEC, true, IS_BWD>
        <<<grid, block, 0, stream>>>(x, dy, cu, vec, vec_seq_stride, extra, alpha, empty_value, means, out, g, tl);
  } else {
    reduce_chunks_kernel<scalar_t, VEC, false, IS_BWD>
        <<<grid, block, 0, stream>>>(x, dy, nullptr, vec, vec_seq_stride, extra, alpha, empty_value, means, out, g, tl);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pass 3 launcher; IS_BWD adds the per-chunk row rebuilt from ds, q and dsummary.
template <typename scalar_t, int VEC, bool IS_BWD>
void launch_scale(const ChunkMeanShape& sh, const Geometry& g, const scalar_t* src, scalar_t* out, const int32_t* cu,
                  const accum_t<scalar_t>* w, const accum_t<scalar_t>* ds, const scalar_t* q,
                  int64_t q_seq_stride, const scalar_t* dsummary, accum_t<scalar_t> scale,
                  cudaStream_t stream) {
  const int64_t row_vecs = g.row / VEC;
  const int64_t threads = std::clamp<int64_t>(round_up(row_vecs, 32), 32, SCALE_THREADS);
  ScaleTiling tl{};
  tl.slab = std::min(g.longest_chunk, SCALE_SLAB);
  tl.num_slabs = ceil_div(g.longest_chunk, tl.slab);  // no item for the slabs of chunk_size > any sequence
  tl.num_tiles = ceil_div(row_vecs, threads);
  tl.num_items = sh.num_seqs * sh.num_chunks * tl.num_slabs * tl.num_tiles;
  if (tl.num_items == 0) return;
  const dim3 grid = grid_for(tl.num_items), block(static_cast<unsigned>(threads));
  if (sh.varlen) {
    scale_chunks_kernel<scalar_t, VEC, true, IS_BWD>
        <<<grid, block, 0, stream>>>(src, out, cu, w, ds, q, q_seq_stride, dsummary, scale, g, tl);
  } else {
    scale_chunks_kernel<scalar_t, VEC, false, IS_BWD>
        <<<grid, block, 0, stream>>>(src, out, nullptr, w, ds, q, q_seq_stride, dsummary, scale, g, tl);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


ChunkMeanShape prepare(const at::Tensor& x, const at::Tensor& query, int64_t chunk_size,
                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const ChunkMeanShape sh = check_chunk_mean_args(x, chunk_size, cu_seqlens, max_seqlen, c10::DeviceType::CUDA);
  check_chunk_route_query(query, x, sh);
  TORCH_CHECK(sh.head_dim <= MAX_HEAD_DIM, "the CUDA chunk_route kernels support head_dim <= ", MAX_HEAD_DIM, ", got ",
              sh.head_dim);
  return sh;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_route_fwd_cuda(const at::Tensor& x, const at::Tensor& query,
                                                                    int64_t chunk_size,
                                                                    const std::optional<at::Tensor>& cu_seqlens,
                                                                    int64_t max_seqlen, double scale) {
  const ChunkMeanShape sh = prepare(x, query, chunk_size, cu_seqlens, max_seqlen);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t S = sh.num_seqs, M = sh.num_chunks, H = sh.num_heads, D = sh.head_dim;
  const auto acc_opts = x.options().dtype(accum_type(x.scalar_type()));
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor weights = at::empty({S, H, M}, acc_opts);
  at::Tensor summary = at::empty({S, H, D}, x.options());
  if (sh.num_tokens == 0 || H == 0) {  // every sequence empty: zero weights and summary, nothing to launch
    weights.zero_();
    summary.zero_();
    return {y, weights, summary};
  }
  at::Tensor means = at::empty({S * M, H * D}, acc_opts);
  const at::Tensor x_c = x.contiguous(), q_c = query.contiguous();
  const at::Tensor cu = sh.varlen ? cu_seqlens->contiguous() : at::Tensor();
  const int32_t* p_cu = sh.varlen ? cu.const_data_ptr<int32_t>() : nullptr;
  const Geometry g = geometry(sh, chunk_size, max_seqlen);
  const int sms = num_sms(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_route_fwd_cuda", [&] {
    using acc_t = accum_t<scalar_t>;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* p_x = x_c.const_data_ptr<scalar_t>();
    const scalar_t* p_q = q_c.const_data_ptr<scalar_t>();
    const int64_t q_stride = query.dim() == 2 ? 0 : H * D;
    acc_t* p_w = weights.mutable_data_ptr<acc_t>();
    acc_t* p_means = means.mutable_data_ptr<acc_t>();
    scalar_t* p_y = y.mutable_data_ptr<scalar_t>();
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

    if (can_vectorize<scalar_t>(g, {p_x})) {
      launch_reduce<scalar_t, VEC, false>(sh, g, sms, p_x, nullptr, p_cu, p_q, q_stride, nullptr,
                                          static_cast<acc_t>(scale), neg_inf, p_means, p_w, stream);
    } else {
      launch_reduce<scalar_t, 1, false>(sh, g, sms, p_x, nullptr, p_cu, p_q, q_stride, nullptr,
                                        static_cast<acc_t>(scale), neg_inf, p_means, p_w, stream);
    }
    softmax_summary_kernel<scalar_t>
        <<<grid_for(S * H), SOFTMAX_THREADS, 0, stream>>>(p_w, p_means, summary.mutable_data_ptr<scalar_t>(), g, S * H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (can_vectorize<scalar_t>(g, {p_x, p_y})) {
      launch_scale<scalar_t, VEC, false>(sh, g, p_x, p_y, p_cu, p_w, nullptr, nullptr, 0, nullptr, acc_t(0), stream);
    } else {
      launch_scale<scalar_t, 1, false>(sh, g, p_x, p_y, p_cu, p_w, nullptr, nullptr, 0, nullptr, acc_t(0), stream);
    }
  });
  return {y, weights, summary};
}

std::tuple<at::Tensor, at::Tensor> chunk_route_bwd_cuda(const at::Tensor& dy, const at::Tensor& dweights,
                                                        const at::Tensor& dsummary, const at::Tensor& x,
                                                        const at::Tensor& query, const at::Tensor& weights,
                                                        int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens,
                                                        int64_t max_seqlen, double scale) {
  const ChunkMeanShape sh = prepare(x, query, chunk_size, cu_seqlens, max_seqlen);
  const int64_t S = sh.num_seqs, M = sh.num_chunks, H = sh.num_heads, D = sh.head_dim;
  check_chunk_route_grads(dy, dweights, dsummary, weights, x, sh);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto acc_opts = x.options().dtype(accum_type(x.scalar_type()));
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dquery = at::empty({S, H, D}, acc_opts);
  if (x.numel() == 0) {  // no tokens (or no values): dx is empty, and no chunk reaches the query
    dquery.zero_();
  } else {
    at::Tensor means = at::empty({S * M, H * D}, acc_opts);
    at::Tensor dw = at::empty({S, H, M}, acc_opts);  // dw after pass 1, ds after pass 2
    const at::Tensor x_c = x.contiguous(), dy_c = dy.contiguous(), q_c = query.contiguous();
    const at::Tensor w_c = weights.contiguous(), dsum_c = dsummary.contiguous();
    const at::Tensor dweights_c = dweights.to(accum_type(x.scalar_type())).contiguous();
    const at::Tensor cu = sh.varlen ? cu_seqlens->contiguous() : at::Tensor();
    const int32_t* p_cu = sh.varlen ? cu.const_data_ptr<int32_t>() : nullptr;
    const Geometry g = geometry(sh, chunk_size, max_seqlen);
    const int sms = num_sms(x);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_route_bwd_cuda", [&] {
      using acc_t = accum_t<scalar_t>;
      constexpr int VEC = 16 / sizeof(scalar_t);
      const scalar_t* p_x = x_c.const_data_ptr<scalar_t>();
      const scalar_t* p_dy = dy_c.const_data_ptr<scalar_t>();
      const scalar_t* p_q = q_c.const_data_ptr<scalar_t>();
      const scalar_t* p_gsum = dsum_c.const_data_ptr<scalar_t>();
      const acc_t* p_w = w_c.const_data_ptr<acc_t>();
      const acc_t* p_dweights = dweights_c.const_data_ptr<acc_t>();
      acc_t* p_means = means.mutable_data_ptr<acc_t>();
      acc_t* p_dw = dw.mutable_data_ptr<acc_t>();
      scalar_t* p_dx = dx.mutable_data_ptr<scalar_t>();
      const int64_t q_stride = query.dim() == 2 ? 0 : H * D;
      const acc_t acc_scale = static_cast<acc_t>(scale);

      if (can_vectorize<scalar_t>(g, {p_x, p_dy})) {
        launch_reduce<scalar_t, VEC, true>(sh, g, sms, p_x, p_dy, p_cu, p_gsum, H * D, p_dweights, acc_t(1), acc_t(0),
                                           p_means, p_dw, stream);
      } else {
        launch_reduce<scalar_t, 1, true>(sh, g, sms, p_x, p_dy, p_cu, p_gsum, H * D, p_dweights, acc_t(1), acc_t(0),
                                         p_means, p_dw, stream);
      }
      softmax_backward_kernel<acc_t><<<grid_for(S * H), SOFTMAX_THREADS, 0, stream>>>(
          p_w, p_dw, p_means, dquery.mutable_data_ptr<acc_t>(), acc_scale, g, S * H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (can_vectorize<scalar_t>(g, {p_dy, p_dx})) {
        launch_scale<scalar_t, VEC, true>(sh, g, p_dy, p_dx, p_cu, p_w, p_dw, p_q, q_stride, p_gsum, acc_scale, stream);
      } else {
        launch_scale<scalar_t, 1, true>(sh, g, p_dy, p_dx, p_cu, p_w, p_dw, p_q, q_stride, p_gsum, acc_scale, stream);
      }
    });
  }
  at::Tensor dq_out = query.dim() == 2 ? dquery.sum(0) : dquery;
  return {dx, dq_out.to(query.scalar_type())};
}

}  // namespace
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CUDA, m) {
  m.impl("chunk_route_fwd", TORCH_FN(routing_kernels::chunk_route_fwd_cuda));
  m.impl("chunk_route_bwd", TORCH_FN(routing_kernels::chunk_route_bwd_cuda));
}
