// CPU kernels of routing_kernels::chunk_mean_fwd / chunk_mean_bwd (contract in include/routing_kernels/chunk_mean.h).
#include <routing_kernels/accum.h>
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

constexpr int64_t GRAIN_VALUES = 32768;  // x values per parallel task, ATen's usual grain (at::internal::GRAIN_SIZE)

// The tokens of work item `item` = (sequence, chunk) of the forward and backward kernels: the packed index of the
// chunk's first token and how many tokens it has (<= 0: the sequence is too short to have that chunk).
struct ChunkSpan {
  int64_t first, count;
};

inline ChunkSpan chunk_span(int64_t item, const int32_t* cu_seqlens, const ChunkMeanShape& shape, int64_t chunk_size) {
  const int64_t i_s = item / shape.num_chunks, i_c = item % shape.num_chunks;
  const int64_t bos = cu_seqlens ? int64_t{cu_seqlens[i_s]} : i_s * shape.seqlen;
  const int64_t len = cu_seqlens ? int64_t{cu_seqlens[i_s + 1]} - bos : shape.seqlen;
  return {bos + i_c * chunk_size, std::min(chunk_size, len - i_c * chunk_size)};
}

// One work item per (sequence, chunk): sum the chunk's token rows, then divide. A token's H * D values are
// contiguous, so the inner loops run over one flat row. They are plain loops, which GCC 12 vectorizes at -O3 (setup.py
// and CMake's Release build pass it; -fopt-info-vec shows 3 of the 4 dtypes vectorized, float16's conversion stays
// scalar). at::vec::Vectorized would gain nothing here: an extension is not compiled per CPU capability as ATen is,
// so it would use its generic version.
template <typename scalar_t>
void chunk_mean_cpu_kernel(const scalar_t* x, const int32_t* cu_seqlens, scalar_t* out, const ChunkMeanShape& shape,
                           int64_t chunk_size) {
  using acc_t = accum_t<scalar_t>;  // float for half/bfloat16/float, double for double
  const int64_t row = shape.num_heads * shape.head_dim;
  const int64_t num_items = shape.num_seqs * shape.num_chunks;
  // Each item reads up to chunk_size * row values.
  const int64_t grain = std::max<int64_t>(1, GRAIN_VALUES / std::max<int64_t>(1, chunk_size * row));

  at::parallel_for(0, num_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(row);
    for (int64_t item = begin; item < end; ++item) {
      const auto [o_t, n] = chunk_span(item, cu_seqlens, shape, chunk_size);  // first token, tokens (<= 0: none)
      scalar_t* p_out = out + item * row;
      if (n <= 0) {
        std::fill(p_out, p_out + row, scalar_t(0));
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* p_x = x + (o_t + t) * row;
        for (int64_t j = 0; j < row; ++j) acc[j] += static_cast<acc_t>(p_x[j]);
      }
      const acc_t count = static_cast<acc_t>(n);
      for (int64_t j = 0; j < row; ++j) p_out[j] = static_cast<scalar_t>(acc[j] / count);
    }
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
  const at::Tensor x_c = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_mean_fwd_cpu", [&] {
    chunk_mean_cpu_kernel<scalar_t>(x_c.const_data_ptr<scalar_t>(),
                                    shape.varlen ? cu.const_data_ptr<int32_t>() : nullptr,
                                    out.mutable_data_ptr<scalar_t>(), shape, chunk_size);
  });
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

// Streaming stores are weakly ordered: fence them before the thread's work counts as done.
inline void fence_streaming_stores() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Backward, one work item per (sequence, chunk): the chunk's row of dx, grad_mean[s, i] / count (H * D values, read
// through grad_mean's strides: it is small, M / N of dx), is computed once and copied to each of the chunk's tokens.
// So dx is written once with whole-row copies, which is all the traffic there is: at B=4 N=8192 H=8 D=64 fp32 64 MB
// of dx against 0.5 MB of grad_mean.
template <typename scalar_t>
void chunk_mean_bwd_cpu_kernel(const scalar_t* grad_mean, std::array<int64_t, 4> g_stride, const int32_t* cu_seqlens,
                               scalar_t* dx, const ChunkMeanShape& shape, int64_t chunk_size) {
  using acc_t = accum_t<scalar_t>;
  const int64_t H = shape.num_heads, D = shape.head_dim, row = H * D;
  const int64_t num_items = shape.num_seqs * shape.num_chunks;
  // Each item writes up to chunk_size * row values.
  const int64_t grain = std::max<int64_t>(1, GRAIN_VALUES / std::max<int64_t>(1, chunk_size * row));
  const bool stream = shape.num_tokens * row * static_cast<int64_t>(sizeof(scalar_t)) >= STREAM_MIN_BYTES;
  const size_t row_bytes = static_cast<size_t>(row) * sizeof(scalar_t);

  at::parallel_for(0, num_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> b_row(row);  // [H * D]
    for (int64_t item = begin; item < end; ++item) {
      const auto [o_t, n] = chunk_span(item, cu_seqlens, shape, chunk_size);  // first token, tokens (<= 0: none)
      if (n <= 0) continue;
      const acc_t count = static_cast<acc_t>(n);
      const int64_t i_s = item / shape.num_chunks, i_c = item % shape.num_chunks;
      const scalar_t* p_g = grad_mean + i_s * g_stride[0] + i_c * g_stride[1];
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d)
          b_row[h * D + d] = static_cast<scalar_t>(static_cast<acc_t>(p_g[h * g_stride[2] + d * g_stride[3]]) / count);
      for (int64_t t = 0; t < n; ++t) {
        copy_bytes(reinterpret_cast<char*>(dx + (o_t + t) * row), reinterpret_cast<const char*>(b_row.data()),
                   row_bytes, stream);
      }
    }
    if (stream) fence_streaming_stores();
  });
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
  at::Tensor dx = empty_cpu_output(x.sizes(), x.options());
  if (dx.numel() == 0) {
    return dx;
  }
  const std::array<int64_t, 4> g_stride{grad_mean.stride(0), grad_mean.stride(1), grad_mean.stride(2),
                                        grad_mean.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "chunk_mean_bwd_cpu", [&] {
    chunk_mean_bwd_cpu_kernel<scalar_t>(grad_mean.const_data_ptr<scalar_t>(), g_stride,
                                        shape.varlen ? cu.const_data_ptr<int32_t>() : nullptr,
                                        dx.mutable_data_ptr<scalar_t>(), shape, chunk_size);
  });
  return dx;
}

}  // namespace
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CPU, m) {
  m.impl("chunk_mean_fwd", TORCH_FN(routing_kernels::chunk_mean_fwd_cpu));
  m.impl("chunk_mean_bwd", TORCH_FN(routing_kernels::chunk_mean_bwd_cpu));
}
