// CPU kernels of routing_kernels::chunk_mean_fwd / chunk_mean_bwd (contract in include/routing_kernels/chunk_mean.h)
// and of their chunk-table forms chunk_mean_table_fwd / _bwd (include/routing_kernels/chunk_table.h): one kernel
// body each, templated over the chunk geometry (include/routing_kernels/chunk_geometry.h).
#include <routing_kernels/accum.h>
#include <routing_kernels/chunk_geometry.h>
#include <routing_kernels/chunk_mean.h>
#include <routing_kernels/cpu_memory.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace routing_kernels {
namespace {

// Forward, one work piece per (sequence, chunk) slot, or per piece of a long chunk of a table (chunk_geometry.h):
// sum the token rows, then divide. A token's H * D values are contiguous, so the inner loops run over one flat row.
// They are plain loops, which GCC 12 vectorizes at -O3 (setup.py and CMake's Release build pass it; -fopt-info-vec
// shows 3 of the 4 dtypes vectorized, float16's conversion stays scalar). at::vec::Vectorized would gain nothing
// here: an extension is not compiled per CPU capability as ATen is, so it would use its generic version.
template <typename scalar_t, typename Geometry>
void chunk_mean_cpu_kernel(const scalar_t* x, scalar_t* out, const Geometry& geo) {
  using acc_t = accum_t<scalar_t>;  // float for half/bfloat16/float, double for double
  const int64_t row = geo.row();
  const SeqRange all{0, geo.shape.num_seqs};
  std::vector<acc_t> parts(geo.num_parts() * row);  // partial sums of the pieces of split chunks
  const auto finish = [&](int64_t slot, const acc_t* sum, int64_t count) {
    scalar_t* p_out = out + slot * row;
    const acc_t n = static_cast<acc_t>(count);
    for (int64_t j = 0; j < row; ++j) p_out[j] = static_cast<scalar_t>(sum[j] / n);
  };
  geo.for_each_piece(all, [&] {
    return [&, acc = std::vector<acc_t>(row)](const ChunkPiece& p) mutable {
      if (p.count == 0) {  // the sequence has no such chunk
        std::fill(out + p.slot * row, out + (p.slot + 1) * row, scalar_t(0));
        return;
      }
      acc_t* sum = p.part < 0 ? acc.data() : parts.data() + p.part * row;  // [H * D]
      std::fill(sum, sum + row, acc_t(0));
      for (int64_t t = p.first; t < p.first + p.count; ++t) {
        const scalar_t* p_x = x + t * row;
        for (int64_t j = 0; j < row; ++j) sum[j] += static_cast<acc_t>(p_x[j]);
      }
      if (p.part < 0) finish(p.slot, sum, p.count);
    };
  });
  geo.for_each_split(all, [&](const ChunkSplit& sp) {
    std::vector<acc_t> sum(parts.begin() + sp.part_begin * row, parts.begin() + (sp.part_begin + 1) * row);
    for (int64_t i = sp.part_begin + 1; i < sp.part_end; ++i)
      for (int64_t j = 0; j < row; ++j) sum[j] += parts[i * row + j];
    finish(sp.slot, sum.data(), sp.chunk_count);
  });
}

template <typename Geometry>
void chunk_mean_fwd_dispatch(const at::Tensor& x, at::Tensor& out, const Geometry& geo) {
  const at::Tensor x_c = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_mean_fwd_cpu", [&] {
    chunk_mean_cpu_kernel<scalar_t>(x_c.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), geo);
  });
}

at::Tensor chunk_mean_fwd_cpu(const at::Tensor& x, int64_t chunk_size, const std::optional<at::Tensor>& cu_seqlens,
                              int64_t max_seqlen) {
  const ChunkMeanShape shape = check_chunk_mean_args(x, chunk_size, cu_seqlens, max_seqlen, c10::DeviceType::CPU);
  at::Tensor cu;
  if (shape.varlen) {
    cu = cu_seqlens->contiguous();
    check_cu_seqlens_values(cu.const_data_ptr<int32_t>(), shape.num_seqs, shape.num_tokens, max_seqlen);
  }
  at::Tensor out = empty_cpu_output({shape.num_seqs, shape.num_chunks, shape.num_heads, shape.head_dim}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  const int32_t* p_cu = shape.varlen ? cu.const_data_ptr<int32_t>() : nullptr;
  chunk_mean_fwd_dispatch(x, out, UniformChunks(shape, p_cu, chunk_size));
  return out;
}

at::Tensor chunk_mean_table_fwd_cpu(const at::Tensor& x, const at::Tensor& cu_chunks, const at::Tensor& seq_chunks,
                                    int64_t max_chunks) {
  const CheckedTable t = check_cpu_chunk_table(x, cu_chunks, seq_chunks, max_chunks);
  at::Tensor out = empty_cpu_output({t.shape.num_seqs, max_chunks, t.shape.num_heads, t.shape.head_dim}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  chunk_mean_fwd_dispatch(x, out, t.geometry());
  return out;
}

// Streaming (non-temporal) stores for outputs far larger than the cache: a plain store first reads the line it
// writes (read-for-ownership), so writing dx costs twice its size in DRAM traffic; a streaming store skips the read.
// Measured at B=4 N=8192 H=8 D=64 fp32 (64 MB dx; 2-core Xeon VM under load, copy 6.4 GB/s): plain stores 1.51x
// the copy floor (bytes read + written at copy speed), streaming 0.97x. Smaller outputs keep plain stores: their
// consumer may still find them in cache, which streaming would bypass.
constexpr int64_t STREAM_MIN_BYTES = 16 << 20;  // half of a server L3 (32 MB here)

// dst[0, bytes) = src[0, bytes); with `stream`, 16-byte streaming stores (SSE2, every x86-64) where dst is aligned.
inline void copy_bytes(char* dst, const char* src, size_t bytes, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    const size_t head = std::min(bytes, (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15);
    std::memcpy(dst, src, head);
    size_t i = head;
    for (; i + 16 <= bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    }
    std::memcpy(dst + i, src + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Streaming stores are weakly ordered: a task fences them before its work counts as done. Held by each task's
// worker (chunk_geometry.h), so the fence runs on the thread that stored, when the task ends.
struct StreamFence {
  bool enabled;
  ~StreamFence() {
#if defined(__SSE2__)
    if (enabled) _mm_sfence();
#endif
  }
};

// Backward, one work piece per (sequence, chunk) slot or per piece of a long chunk: the chunk's row of dx,
// grad_mean[s, i] / |chunk| (H * D values, read through grad_mean's strides: it is small, M / N of dx), is computed
// once per piece and copied to each of its tokens. So dx is written once with whole-row copies, which is all the
// traffic there is: at B=4 N=8192 H=8 D=64 fp32 64 MB of dx against 0.5 MB of grad_mean.
template <typename scalar_t, typename Geometry>
void chunk_mean_bwd_cpu_kernel(const scalar_t* grad_mean, std::array<int64_t, 4> g_stride, scalar_t* dx,
                               const Geometry& geo) {
  using acc_t = accum_t<scalar_t>;
  const int64_t H = geo.shape.num_heads, D = geo.shape.head_dim, M = geo.shape.num_chunks, row = H * D;
  const bool stream = geo.shape.num_tokens * row * static_cast<int64_t>(sizeof(scalar_t)) >= STREAM_MIN_BYTES;
  const size_t row_bytes = static_cast<size_t>(row) * sizeof(scalar_t);

  geo.for_each_piece(SeqRange{0, geo.shape.num_seqs}, [&] {
    return [&, b_row = std::vector<scalar_t>(row), fence = StreamFence{stream}](const ChunkPiece& p) mutable {
      if (p.count == 0) return;  // no chunk, no tokens
      const acc_t count = static_cast<acc_t>(p.chunk_count);
      const int64_t i_s = p.slot / M, i_c = p.slot % M;
      const scalar_t* p_g = grad_mean + i_s * g_stride[0] + i_c * g_stride[1];
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d)
          b_row[h * D + d] = static_cast<scalar_t>(static_cast<acc_t>(p_g[h * g_stride[2] + d * g_stride[3]]) / count);
      for (int64_t t = p.first; t < p.first + p.count; ++t) {
        copy_bytes(reinterpret_cast<char*>(dx + t * row), reinterpret_cast<const char*>(b_row.data()), row_bytes,
                   stream);
      }
    };
  });
}

template <typename Geometry>
at::Tensor chunk_mean_bwd_dispatch(const at::Tensor& grad_mean, const at::Tensor& x, const Geometry& geo) {
  at::Tensor dx = empty_cpu_output(x.sizes(), x.options());
  if (dx.numel() == 0) {
    return dx;
  }
  const std::array<int64_t, 4> g_stride{grad_mean.stride(0), grad_mean.stride(1), grad_mean.stride(2),
                                        grad_mean.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_mean_bwd_cpu", [&] {
    chunk_mean_bwd_cpu_kernel<scalar_t>(grad_mean.const_data_ptr<scalar_t>(), g_stride,
                                        dx.mutable_data_ptr<scalar_t>(), geo);
  });
  return dx;
}

at::Tensor chunk_mean_bwd_cpu(const at::Tensor& grad_mean, const at::Tensor& x, int64_t chunk_size,
                              const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const ChunkMeanShape shape = check_chunk_mean_args(x, chunk_size, cu_seqlens, max_seqlen, c10::DeviceType::CPU);
  at::Tensor cu;
  if (shape.varlen) {
    cu = cu_seqlens->contiguous();
    check_cu_seqlens_values(cu.const_data_ptr<int32_t>(), shape.num_seqs, shape.num_tokens, max_seqlen);
  }
  check_chunk_mean_grad(grad_mean, x, shape);  // after max_seqlen: grad_mean's M follows from it
  const int32_t* p_cu = shape.varlen ? cu.const_data_ptr<int32_t>() : nullptr;
  return chunk_mean_bwd_dispatch(grad_mean, x, UniformChunks(shape, p_cu, chunk_size));
}

at::Tensor chunk_mean_table_bwd_cpu(const at::Tensor& grad_mean, const at::Tensor& x, const at::Tensor& cu_chunks,
                                    const at::Tensor& seq_chunks, int64_t max_chunks) {
  const CheckedTable t = check_cpu_chunk_table(x, cu_chunks, seq_chunks, max_chunks);
  check_chunk_mean_grad(grad_mean, x, t.shape);
  return chunk_mean_bwd_dispatch(grad_mean, x, t.geometry());
}

}  // namespace
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CPU, m) {
  m.impl("chunk_mean_fwd", TORCH_FN(routing_kernels::chunk_mean_fwd_cpu));
  m.impl("chunk_mean_bwd", TORCH_FN(routing_kernels::chunk_mean_bwd_cpu));
  m.impl("chunk_mean_table_fwd", TORCH_FN(routing_kernels::chunk_mean_table_fwd_cpu));
  m.impl("chunk_mean_table_bwd", TORCH_FN(routing_kernels::chunk_mean_table_bwd_cpu));
}
