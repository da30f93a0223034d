// CPU kernels of routing_kernels::chunk_route_fwd / chunk_route_bwd (contract in
// include/routing_kernels/chunk_route.h) and of their chunk-table forms chunk_route_table_fwd / _bwd
// (include/routing_kernels/chunk_table.h): every pass is written once, templated over the chunk geometry
// (include/routing_kernels/chunk_geometry.h: an integer chunk size, or a table whose long chunks are split).
//
// Each direction makes two passes over the token data, parallel over (sequence, chunk) work items, with a cheap
// per-(sequence, head) softmax step between them that touches only the (S, M, H, D) chunk means:
//   forward : [sum x -> means, scores]  [softmax, summary]  [y = w * x]
//   backward: [sum x, <dy, x> -> means, dw]  [ds, dquery]  [dx = w * dy + per-chunk row]
// A token's H * D values are contiguous, so the inner loops run over flat rows; they are plain loops that GCC
// vectorizes at -O3 (see chunk_mean.cpp for why not at::vec). Nothing the size of x is allocated besides outputs,
// and those (y, dx) come from the output cache of cpu_memory.h: fresh pages cost as much as the kernel itself.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <routing_kernels/chunk_geometry.h>
#include <routing_kernels/chunk_route.h>
#include <routing_kernels/cpu_memory.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace routing_kernels {
namespace {

// Sequences are processed in groups whose token data (bytes_per_token for every stream a pass reads or writes)
// fits in about half of a server L3 (36 MB here): the second pass over a group then reads x (or dy) from cache
// rather than DRAM, so each direction costs about one DRAM pass instead of two. A sequence larger than the
// budget is a group of its own; the softmax needs all of a sequence's chunks, so groups never split one.
constexpr int64_t CACHE_BUDGET_BYTES = 16 << 20;

template <typename Geometry, typename Fn>
void for_each_group(const Geometry& geo, int64_t bytes_per_token, Fn fn) {
  int64_t begin = 0, tokens = 0;
  for (int64_t s = 0; s < geo.shape.num_seqs; ++s) {
    const int64_t len = geo.seq_tokens(s);
    if (s > begin && (tokens + len) * bytes_per_token > CACHE_BUDGET_BYTES) {
      fn(SeqRange{begin, s});
      begin = s;
      tokens = 0;
    }
    tokens += len;
  }
  if (geo.shape.num_seqs > 0) fn(SeqRange{begin, geo.shape.num_seqs});
}

// Pass 1 of both directions, per (sequence, chunk) slot: the chunk mean of x (into means, (S*M, H*D)) and, per head,
//   out[s, h, c] = alpha * <vec[s, h], mean_h> (+ sum_t <dy_t,h, x_t,h> when dy) (+ extra[s, h, c] when extra)
// Missing chunks get a zero mean and out = empty_value. The pieces of a split chunk (TableChunks) sum into their
// rows of `parts` ((num_parts, 2 * H * D): the sum of x, then of dy * x), added up in order by the split pass.
template <typename scalar_t, typename acc_t, typename Geometry>
void reduce_chunks(const Geometry& geo, SeqRange seqs, const scalar_t* x, const scalar_t* dy, const scalar_t* vec,
                   int64_t vec_seq_stride, const acc_t* extra, acc_t alpha, acc_t empty_value, acc_t* means,
                   acc_t* out, acc_t* parts) {
  const int64_t H = geo.shape.num_heads, D = geo.shape.head_dim, M = geo.shape.num_chunks, row = geo.row();
  // Scores of slot `slot` from the sums of its count tokens (mean becomes the mean).
  const auto finish = [&](int64_t slot, acc_t* mean, const acc_t* dot, int64_t count) {
    const int64_t i_s = slot / M, i_c = slot % M;
    const acc_t inv = acc_t(1) / static_cast<acc_t>(count);
    for (int64_t j = 0; j < row; ++j) mean[j] *= inv;
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t* v = vec + i_s * vec_seq_stride + h * D;
      acc_t value = 0;
      for (int64_t d = 0; d < D; ++d) value += static_cast<acc_t>(v[d]) * mean[h * D + d];
      value *= alpha;
      if (dy) {
        for (int64_t d = 0; d < D; ++d) value += dot[h * D + d];
      }
      const int64_t o = (i_s * H + h) * M + i_c;
      out[o] = extra ? value + extra[o] : value;
    }
  };
  geo.for_each_piece(seqs, [&] {
    return [&, dot_row = std::vector<acc_t>(row)](const ChunkPiece& p) mutable {
      const bool whole = p.part < 0;
      acc_t* mean = whole ? means + p.slot * row : parts + p.part * 2 * row;  // [H * D]
      acc_t* dot = whole ? dot_row.data() : mean + row;                       // [H * D]
      std::fill(mean, mean + row, acc_t(0));
      if (p.count == 0) {
        const int64_t i_s = p.slot / M, i_c = p.slot % M;
        for (int64_t h = 0; h < H; ++h) out[(i_s * H + h) * M + i_c] = empty_value;
        return;
      }
      if (dy) std::fill(dot, dot + row, acc_t(0));
      for (int64_t t = p.first; t < p.first + p.count; ++t) {
        const scalar_t* p_x = x + t * row;
        for (int64_t j = 0; j < row; ++j) mean[j] += static_cast<acc_t>(p_x[j]);
        if (dy) {
          const scalar_t* p_dy = dy + t * row;
          for (int64_t j = 0; j < row; ++j) dot[j] += static_cast<acc_t>(p_dy[j]) * static_cast<acc_t>(p_x[j]);
        }
      }
      if (whole) finish(p.slot, mean, dot, p.count);
    };
  });
  geo.for_each_split(seqs, [&](const ChunkSplit& sp) {
    acc_t* mean = means + sp.slot * row;
    std::vector<acc_t> dot(row, acc_t(0));
    std::fill(mean, mean + row, acc_t(0));
    for (int64_t i = sp.part_begin; i < sp.part_end; ++i) {
      const acc_t* part = parts + i * 2 * row;
      for (int64_t j = 0; j < row; ++j) mean[j] += part[j];
      if (dy) {
        for (int64_t j = 0; j < row; ++j) dot[j] += part[row + j];
      }
    }
    finish(sp.slot, mean, dot.data(), sp.chunk_count);
  });
}

// Pass 2 of both directions, per (sequence, head): touches only scores/weights and means.
template <typename Fn>
void for_each_row(const ChunkMeanShape& shape, SeqRange seqs, Fn fn) {
  const int64_t H = shape.num_heads;
  const int64_t grain = std::max<int64_t>(1, GRAIN_VALUES / std::max<int64_t>(1, shape.num_chunks * shape.head_dim));
  at::parallel_for(seqs.begin * H, seqs.end * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r / H, r % H);
  });
}

// Pass 3 of both directions, per piece of a (sequence, chunk) slot: out_t,h = w[s, h, c] * src_t,h (+ add[slot, h]
// when add).
template <typename scalar_t, typename acc_t, typename Geometry>
void scale_chunks(const Geometry& geo, SeqRange seqs, const scalar_t* src, const acc_t* weights, const acc_t* add,
                  scalar_t* out) {
  const int64_t H = geo.shape.num_heads, D = geo.shape.head_dim, M = geo.shape.num_chunks, row = geo.row();
  geo.for_each_piece(seqs, [&] {
    return [&](const ChunkPiece& p) {
      const int64_t i_s = p.slot / M, i_c = p.slot % M;
      for (int64_t t = p.first; t < p.first + p.count; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          const acc_t w = weights[(i_s * H + h) * M + i_c];
          const scalar_t* p_src = src + t * row + h * D;
          scalar_t* p_out = out + t * row + h * D;
          if (add) {
            const acc_t* a = add + p.slot * row + h * D;
            for (int64_t d = 0; d < D; ++d) p_out[d] = static_cast<scalar_t>(w * static_cast<acc_t>(p_src[d]) + a[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) p_out[d] = static_cast<scalar_t>(w * static_cast<acc_t>(p_src[d]));
          }
        }
      }
    };
  });
}

template <typename Geometry>
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_fwd(const at::Tensor& x, const at::Tensor& query,
                                                         const Geometry& geo, double scale) {
  const ChunkMeanShape& sh = geo.shape;
  const int64_t S = sh.num_seqs, M = sh.num_chunks, H = sh.num_heads, D = sh.head_dim;
  const auto acc_opts = x.options().dtype(accum_type(x.scalar_type()));
  at::Tensor y = empty_cpu_output(x.sizes(), x.options());
  at::Tensor weights = empty_cpu_output({S, H, M}, acc_opts);
  at::Tensor summary = empty_cpu_output({S, H, D}, x.options());
  at::Tensor means = at::empty({S * M, H * D}, acc_opts);
  at::Tensor parts = at::empty({geo.num_parts(), 2 * H * D}, acc_opts);
  const at::Tensor x_c = x.contiguous(), q_c = query.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_route_fwd_cpu", [&] {
    using acc_t = accum_t<scalar_t>;
    acc_t* w = weights.mutable_data_ptr<acc_t>();
    const acc_t* mu = means.const_data_ptr<acc_t>();
    scalar_t* out_summary = summary.mutable_data_ptr<scalar_t>();
    for_each_group(geo, 2 * geo.row() * x.element_size(), [&](SeqRange seqs) {
      reduce_chunks<scalar_t, acc_t>(geo, seqs, x_c.const_data_ptr<scalar_t>(), nullptr,
                                     q_c.const_data_ptr<scalar_t>(), query.dim() == 2 ? 0 : H * D, nullptr,
                                     static_cast<acc_t>(scale), -std::numeric_limits<acc_t>::infinity(),
                                     means.mutable_data_ptr<acc_t>(), w, parts.mutable_data_ptr<acc_t>());
      for_each_row(sh, seqs, [&](int64_t s, int64_t h) {
        acc_t* row = w + (s * H + h) * M;
        acc_t top = -std::numeric_limits<acc_t>::infinity();
        for (int64_t i = 0; i < M; ++i) top = std::max(top, row[i]);
        if (std::isinf(top) && top < 0) top = 0;  // empty sequence: every weight becomes 0
        acc_t den = 0;
        for (int64_t i = 0; i < M; ++i) den += (row[i] = std::exp(row[i] - top));
        const acc_t inv = den == acc_t(0) ? acc_t(0) : acc_t(1) / den;  // 0: empty sequence; NaN stays NaN
        std::vector<acc_t> acc(D, acc_t(0));
        for (int64_t i = 0; i < M; ++i) {
          row[i] *= inv;
          const acc_t* mean = mu + (s * M + i) * H * D + h * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += row[i] * mean[d];
        }
        for (int64_t d = 0; d < D; ++d) out_summary[(s * H + h) * D + d] = static_cast<scalar_t>(acc[d]);
      });
      scale_chunks<scalar_t, acc_t>(geo, seqs, x_c.const_data_ptr<scalar_t>(), w, nullptr,
                                    y.mutable_data_ptr<scalar_t>());
    });
  });
  return {y, weights, summary};
}

template <typename Geometry>
std::tuple<at::Tensor, at::Tensor> route_bwd(const at::Tensor& dy, const at::Tensor& dweights,
                                             const at::Tensor& dsummary, const at::Tensor& x, const at::Tensor& query,
                                             const at::Tensor& weights, const Geometry& geo, double scale) {
  const ChunkMeanShape& sh = geo.shape;
  const int64_t S = sh.num_seqs, M = sh.num_chunks, H = sh.num_heads, D = sh.head_dim;
  check_chunk_route_grads(dy, dweights, dsummary, weights, x, sh);
  const auto acc_opts = x.options().dtype(accum_type(x.scalar_type()));
  at::Tensor dx = empty_cpu_output(x.sizes(), x.options());
  at::Tensor dquery = empty_cpu_output({S, H, D}, acc_opts);
  at::Tensor means = at::empty({S * M, H * D}, acc_opts);
  at::Tensor dw = at::empty({S, H, M}, acc_opts);
  at::Tensor add = at::empty({S * M, H * D}, acc_opts);  // per-chunk row added to every token's dx
  at::Tensor parts = at::empty({geo.num_parts(), 2 * H * D}, acc_opts);
  const at::Tensor x_c = x.contiguous(), dy_c = dy.contiguous(), q_c = query.contiguous();
  const at::Tensor w_c = weights.contiguous(), dsum_c = dsummary.contiguous();
  const at::Tensor dweights_c = dweights.to(accum_type(x.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_route_bwd_cpu", [&] {
    using acc_t = accum_t<scalar_t>;
    const acc_t* w = w_c.const_data_ptr<acc_t>();
    const acc_t* mu = means.const_data_ptr<acc_t>();
    const scalar_t* q = q_c.const_data_ptr<scalar_t>();
    const scalar_t* gsum = dsum_c.const_data_ptr<scalar_t>();
    const int64_t q_stride = query.dim() == 2 ? 0 : H * D;
    acc_t* g = dw.mutable_data_ptr<acc_t>();
    acc_t* dq = dquery.mutable_data_ptr<acc_t>();
    acc_t* a = add.mutable_data_ptr<acc_t>();
    for_each_group(geo, 3 * geo.row() * x.element_size(), [&](SeqRange seqs) {
      reduce_chunks<scalar_t, acc_t>(geo, seqs, x_c.const_data_ptr<scalar_t>(), dy_c.const_data_ptr<scalar_t>(),
                                     gsum, H * D, dweights_c.const_data_ptr<acc_t>(), acc_t(1), acc_t(0),
                                     means.mutable_data_ptr<acc_t>(), g, parts.mutable_data_ptr<acc_t>());
      for_each_row(sh, seqs, [&](int64_t s, int64_t h) {
        const acc_t* wr = w + (s * H + h) * M;
        const acc_t* gr = g + (s * H + h) * M;
        acc_t total = 0;
        for (int64_t i = 0; i < M; ++i) total += wr[i] * gr[i];
        acc_t* dqr = dq + (s * H + h) * D;
        std::fill(dqr, dqr + D, acc_t(0));
        const scalar_t* qr = q + s * q_stride + h * D;
        const scalar_t* gs = gsum + (s * H + h) * D;
        for (int64_t i = 0; i < M; ++i) {
          const acc_t ds = wr[i] * (gr[i] - total);
          const acc_t* mean = mu + (s * M + i) * H * D + h * D;
          for (int64_t d = 0; d < D; ++d) dqr[d] += static_cast<acc_t>(scale) * ds * mean[d];
          // dmean_i / |chunk i|, the share of every token of chunk i (missing chunks have no tokens).
          const int64_t count = geo.chunk_count(s * M + i);
          const acc_t inv = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
          acc_t* ar = a + (s * M + i) * H * D + h * D;
          for (int64_t d = 0; d < D; ++d)
            ar[d] =
                (static_cast<acc_t>(scale) * ds * static_cast<acc_t>(qr[d]) + wr[i] * static_cast<acc_t>(gs[d])) * inv;
        }
      });
      scale_chunks<scalar_t, acc_t>(geo, seqs, dy_c.const_data_ptr<scalar_t>(), w, a,
                                    dx.mutable_data_ptr<scalar_t>());
    });
  });
  at::Tensor dq_out = query.dim() == 2 ? dquery.sum(0) : dquery;
  return {dx, dq_out.to(query.scalar_type())};
}

// The integer-chunk geometry of (x, chunk_size, cu_seqlens, max_seqlen), checked; `cu` keeps the offsets alive.
UniformChunks uniform_geometry(const at::Tensor& x, const at::Tensor& query, int64_t chunk_size,
                               const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, at::Tensor& cu) {
  const ChunkMeanShape shape = check_chunk_mean_args(x, chunk_size, cu_seqlens, max_seqlen, c10::DeviceType::CPU);
  check_chunk_route_query(query, x, shape);
  if (shape.varlen) {
    cu = cu_seqlens->contiguous();
    check_cu_seqlens_values(cu.const_data_ptr<int32_t>(), shape.num_seqs, shape.num_tokens, max_seqlen);
  }
  return UniformChunks(shape, shape.varlen ? cu.const_data_ptr<int32_t>() : nullptr, chunk_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_route_fwd_cpu(const at::Tensor& x, const at::Tensor& query,
                                                                   int64_t chunk_size,
                                                                   const std::optional<at::Tensor>& cu_seqlens,
                                                                   int64_t max_seqlen, double scale) {
  at::Tensor cu;
  return route_fwd(x, query, uniform_geometry(x, query, chunk_size, cu_seqlens, max_seqlen, cu), scale);
}

std::tuple<at::Tensor, at::Tensor> chunk_route_bwd_cpu(const at::Tensor& dy, const at::Tensor& dweights,
                                                       const at::Tensor& dsummary, const at::Tensor& x,
                                                       const at::Tensor& query, const at::Tensor& weights,
                                                       int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens,
                                                       int64_t max_seqlen, double scale) {
  at::Tensor cu;
  return route_bwd(dy, dweights, dsummary, x, query, weights,
                   uniform_geometry(x, query, chunk_size, cu_seqlens, max_seqlen, cu), scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_route_table_fwd_cpu(const at::Tensor& x, const at::Tensor& query,
                                                                         const at::Tensor& cu_chunks,
                                                                         const at::Tensor& seq_chunks,
                                                                         int64_t max_chunks, double scale) {
  const CheckedTable t = check_cpu_chunk_table(x, cu_chunks, seq_chunks, max_chunks);
  check_chunk_route_query(query, x, t.shape);
  return route_fwd(x, query, t.geometry(), scale);
}

std::tuple<at::Tensor, at::Tensor> chunk_route_table_bwd_cpu(const at::Tensor& dy, const at::Tensor& dweights,
                                                             const at::Tensor& dsummary, const at::Tensor& x,
                                                             const at::Tensor& query, const at::Tensor& weights,
                                                             const at::Tensor& cu_chunks, const at::Tensor& seq_chunks,
                                                             int64_t max_chunks, double scale) {
  const CheckedTable t = check_cpu_chunk_table(x, cu_chunks, seq_chunks, max_chunks);
  check_chunk_route_query(query, x, t.shape);
  return route_bwd(dy, dweights, dsummary, x, query, weights, t.geometry(), scale);
}

}  // namespace
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CPU, m) {
  m.impl("chunk_route_fwd", TORCH_FN(routing_kernels::chunk_route_fwd_cpu));
  m.impl("chunk_route_bwd", TORCH_FN(routing_kernels::chunk_route_bwd_cpu));
  m.impl("chunk_route_table_fwd", TORCH_FN(routing_kernels::chunk_route_table_fwd_cpu));
  m.impl("chunk_route_table_bwd", TORCH_FN(routing_kernels::chunk_route_table_bwd_cpu));
}
