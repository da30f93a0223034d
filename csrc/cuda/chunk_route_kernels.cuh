// Device code of the CUDA chunk_route kernels (launched from chunk_route_launch.cuh): block reductions, the three
// passes (reduce_chunks, softmax forward/backward, scale_chunks) and their tiling constants. Compiled by nvcc and,
// unchanged, by the host emulation (launch.cuh).
#pragma once

#include <routing_kernels/chunk_shape.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "chunk_geometry.cuh"
#include "launch.cuh"

namespace routing_kernels {
namespace {


// Grid-stride over work items: S * M * tiles can pass the 2^31 - 1 limit of gridDim.x.
constexpr int64_t MAX_BLOCKS = int64_t{1} << 20;
constexpr int64_t REDUCE_THREADS = 256;   // reduce_chunks block, unless one tile needs more threads
constexpr int64_t MAX_HEAD_DIM = 1024;    // one head's values must fit one block of reduce_chunks
constexpr int64_t SOFTMAX_THREADS = 256;  // softmax blocks: loop over the M chunks of one row
constexpr int64_t SCALE_THREADS = 256;    // scale_chunks block: one vector of the row per thread
constexpr int64_t SCALE_SLAB = 32;        // tokens per scale_chunks work item (chunks longer than this are split)

// ---------------------------------------------------------------------------------------------------------------
// Device helpers

// VEC consecutive values moved as one 16-byte (or narrower) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// A GPU faults on a vector access off its size's boundary; the emulation reports it (x86 would not notice).
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  RK_DEVICE_CHECK(reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T, VEC>) == 0, "misaligned vector load");
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& pack) {
  RK_DEVICE_CHECK(reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T, VEC>) == 0, "misaligned vector store");
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {  // like std::max: keeps a when b is NaN
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a < b ? b : a;
  }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Every thread of the block gets op over the block's v, combined in a fixed order (deterministic).
// s_warp holds >= 32 values; blockDim.x is a multiple of 32. Must be reached by every thread.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* s_warp) {
  v = warp_reduce(v, op);
  __syncthreads();  // a previous call may still be reading s_warp
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = s_warp[0];
  for (unsigned w = 1; w < (blockDim.x >> 5); ++w) r = op(r, s_warp[w]);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// Pass 1, per (sequence, chunk, tile of heads): the chunk mean of x (into means (S*M, H*D)) and per head
//   forward : out[s, h, c] = alpha * <vec[s, h], mean_h>      (chunk_mean_table_fwd: vec and out nullptr)
//   backward: out[s, h, c] = <vec[s, h], mean_h> + sum_t <dy_t,h, x_t,h> + extra[s, h, c]
// and out = empty_value, mean = 0 where the sequence has no chunk c.
// A tile is heads [h0, h0 + HT): TV = HT * D / VEC vectors of VEC values. Thread (i_g, i_v) of the block owns
// vector i_v and sums tokens i_g, i_g + TG, ... of the chunk (TG token groups: many loads in flight even when the
// tile is one narrow head). The groups are added in a fixed order through shared memory, then one warp per head
// adds that head's D products: no atomics, so the result does not depend on scheduling.
// Integer chunks (at most chunk_size tokens) take one work item each. A table's chunk may be 1000x longer than
// the next, so its pieces (chunk_geometry.cuh, <= chunk_size tokens) take one item each and write their sums
// into part_sum / part_dot (a row per piece); finish_table_chunks_kernel then adds each chunk's pieces in order.

template <int VEC>
struct ReduceSlots {  // shared values per array: a tile of <= 256 vectors, or of <= 1024 scalars
  static constexpr int value = 256 * VEC > 1024 ? 256 * VEC : 1024;
};

struct ReduceTiling {
  int64_t heads_per_tile;  // HT
  int64_t num_tiles;       // ceil(H / HT)
  int64_t tile_vecs;       // vectors of a full tile, HT * D / VEC
  int64_t token_groups;    // TG
  int64_t num_items;       // pieces (S * M for integer chunks) * num_tiles
  int64_t threads;
};

// The block bound: a scalar tile of one head of D <= 1024 values needs 1024 threads; a vector tile 256.
template <int VEC>
constexpr int REDUCE_MAX_THREADS = VEC == 1 ? 1024 : 256;

// s[slot] + s[TV * VEC + slot] + ... over the TG groups, in group order.
template <typename acc_t>
__device__ __forceinline__ acc_t add_groups(const acc_t* s, int64_t slot, int64_t stride, int64_t TG) {
  acc_t sum = s[slot];
  for (int64_t o_g = 1; o_g < TG; ++o_g) sum += s[o_g * stride + slot];
  return sum;
}

// The missing chunk c of sequence s: mean 0 and out = empty_value over the tile. Block-uniform caller.
template <typename acc_t>
__device__ __forceinline__ void write_missing(acc_t* p_mean, acc_t* out, int64_t o_out, int64_t nh, int64_t D,
                                              int64_t M, acc_t empty_value) {
  for (int64_t e = threadIdx.x; e < nh * D; e += blockDim.x) p_mean[e] = acc_t(0);
  if (out != nullptr) {
    for (int64_t j = threadIdx.x; j < nh; j += blockDim.x) out[o_out + j * M] = empty_value;
  }
}

// The end of a pass-1 item, once s_sum (and s_dot) hold the TG groups' sums of the chunk: group 0 adds the groups,
// writes the mean, and leaves each value's share of its head's score in s_sum (in place: slot (0, i_v) is read by
// this thread only); then one warp per head adds its D shares into out[o_out + j * M]. Every thread calls it.
template <typename scalar_t, int VEC, bool IS_BWD>
__device__ void finish_chunk(accum_t<scalar_t>* s_sum, const accum_t<scalar_t>* s_dot, int64_t TV, int64_t TG,
                             int64_t n_vec, int64_t nh, int64_t D, int64_t M, int64_t count,
                             const scalar_t* p_vec, accum_t<scalar_t>* p_mean, accum_t<scalar_t>* out, int64_t o_out,
                             const accum_t<scalar_t>* extra, accum_t<scalar_t> alpha) {
  using acc_t = accum_t<scalar_t>;
  const int64_t i_v = threadIdx.x % (TV > 0 ? TV : 1), i_g = threadIdx.x / (TV > 0 ? TV : 1);
  const int64_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  if (i_g == 0 && i_v < n_vec) {
    const acc_t inv = acc_t(1) / static_cast<acc_t>(count);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t slot = i_v * VEC + k;
      const acc_t sum = add_groups(s_sum, slot, TV * VEC, TG);
      const acc_t dot = IS_BWD ? add_groups(s_dot, slot, TV * VEC, TG) : acc_t(0);
      const acc_t mean = sum * inv;
      p_mean[slot] = mean;
      if (p_vec != nullptr) s_sum[slot] = static_cast<acc_t>(p_vec[i_v * VEC + k]) * mean + dot;
    }
  }
  __syncthreads();

  if (out != nullptr) {  // one warp per head of the tile: add its D shares
    for (int64_t j = warp; j < nh; j += num_warps) {
      acc_t part = 0;
      for (int64_t d = lane; d < D; d += 32) part += s_sum[j * D + d];
      part = warp_reduce(part, SumOp{});
      if (lane == 0) {
        const int64_t o = o_out + j * M;
        if constexpr (IS_BWD) {
          out[o] = part + extra[o];
        } else {
          out[o] = alpha * part;
        }
      }
    }
  }
  __syncthreads();  // s_sum is rewritten by the next item
}

template <typename scalar_t, int VEC, typename Chunks, bool IS_BWD>
__global__ void __launch_bounds__(REDUCE_MAX_THREADS<VEC>)
    reduce_chunks_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, Chunks chunks,
                         const scalar_t* __restrict__ vec, int64_t vec_seq_stride,
                         const accum_t<scalar_t>* __restrict__ extra, accum_t<scalar_t> alpha,
                         accum_t<scalar_t> empty_value, accum_t<scalar_t>* __restrict__ means,
                         accum_t<scalar_t>* __restrict__ out, accum_t<scalar_t>* __restrict__ part_sum,
                         accum_t<scalar_t>* __restrict__ part_dot, Geometry g, ReduceTiling tl) {
  using acc_t = accum_t<scalar_t>;
  constexpr int SLOTS = ReduceSlots<VEC>::value;
  RK_SHARED_ARRAY(acc_t, s_sum, SLOTS);               // [group][value] partial sums, then each value's product
  RK_SHARED_ARRAY(acc_t, s_dot, IS_BWD ? SLOTS : 1);  // [group][value] partial <dy, x>
  const int64_t H = g.num_heads, D = g.head_dim, M = g.num_chunks, row = g.row;
  const int64_t TV = tl.tile_vecs, TG = tl.token_groups;
  const int64_t i_v = threadIdx.x % (TV > 0 ? TV : 1), i_g = threadIdx.x / (TV > 0 ? TV : 1);

  for (int64_t item = blockIdx.x; item < tl.num_items; item += gridDim.x) {
    const int64_t h0 = (item % tl.num_tiles) * tl.heads_per_tile;
    const Piece pc = chunks.piece(item / tl.num_tiles, g.chunk_size, 1, g);
    const int64_t i_s = pc.i_s, i_c = pc.i_c;
    const int64_t nh = min(tl.heads_per_tile, H - h0);  // the last tile may be narrower
    const int64_t n_vec = nh * D / VEC;
    const int64_t o_tile = h0 * D;  // first value of the tile in the row; a multiple of VEC
    acc_t* p_mean = means + (i_s * M + i_c) * row + o_tile;
    if constexpr (!Chunks::IS_TABLE) {  // once per sequence and tile, on its last chunk
      RK_DEVICE_CHECK(i_c != M - 1 || chunks.fits(i_s, g), Chunks::FIT_MESSAGE);
    }
    if (pc.t0 >= pc.t1) {  // block-uniform branch: no barrier is skipped by only part of the block
      if constexpr (!Chunks::IS_TABLE) {  // a missing chunk (a table's missing chunks are written by the finish)
        write_missing(p_mean, out, (i_s * H + h0) * M + i_c, nh, D, M, empty_value);
      }
      continue;
    }

    if (i_v < n_vec && i_g < TG) {
      acc_t b_sum[VEC], b_dot[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) b_sum[k] = b_dot[k] = acc_t(0);
      const int64_t o_x = (pc.span.first + pc.t0) * row + o_tile + i_v * VEC;
      const int64_t n_tok = pc.t1 - pc.t0;
#pragma unroll 4
      for (int64_t t = i_g; t < n_tok; t += TG) {
        const Pack<scalar_t, VEC> b_x = load_pack<VEC>(x + o_x + t * row);
        if constexpr (IS_BWD) {
          const Pack<scalar_t, VEC> b_dy = load_pack<VEC>(dy + o_x + t * row);
#pragma unroll
          for (int k = 0; k < VEC; ++k) b_dot[k] += static_cast<acc_t>(b_dy.v[k]) * static_cast<acc_t>(b_x.v[k]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) b_sum[k] += static_cast<acc_t>(b_x.v[k]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        s_sum[(i_g * TV + i_v) * VEC + k] = b_sum[k];
        if constexpr (IS_BWD) s_dot[(i_g * TV + i_v) * VEC + k] = b_dot[k];
      }
    }
    __syncthreads();

    if constexpr (Chunks::IS_TABLE) {  // the piece's sums, groups added in order, into its partial row
      if (i_g == 0 && i_v < n_vec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int64_t slot = i_v * VEC + k, o_p = pc.slot * row + o_tile + slot;
          part_sum[o_p] = add_groups(s_sum, slot, TV * VEC, TG);
          if constexpr (IS_BWD) part_dot[o_p] = add_groups(s_dot, slot, TV * VEC, TG);
        }
      }
      __syncthreads();  // s_sum is rewritten by the next item
    } else {
      finish_chunk<scalar_t, VEC, IS_BWD>(s_sum, s_dot, TV, TG, n_vec, nh, D, M, pc.span.count,
                                          vec + i_s * vec_seq_stride + o_tile, p_mean, out,
                                          (i_s * H + h0) * M + i_c, extra, alpha);
    }
  }
}

// Pass 1b of a chunk table, per (sequence, chunk, tile of heads): thread (i_g, i_v) adds pieces i_g, i_g + TG, ...
// of the chunk (its head piece, then its aligned pieces in token order), then finish_chunk as for integer chunks.
// Also writes the missing chunks, and checks (no host sync) that no sequence has more than max_chunks chunks.
template <typename scalar_t, int VEC, bool IS_BWD>
__global__ void __launch_bounds__(REDUCE_MAX_THREADS<VEC>)
    finish_table_chunks_kernel(TableChunks chunks, const scalar_t* __restrict__ vec, int64_t vec_seq_stride,
                               const accum_t<scalar_t>* __restrict__ extra, accum_t<scalar_t> alpha,
                               accum_t<scalar_t> empty_value, const accum_t<scalar_t>* __restrict__ part_sum,
                               const accum_t<scalar_t>* __restrict__ part_dot, accum_t<scalar_t>* __restrict__ means,
                               accum_t<scalar_t>* __restrict__ out, Geometry g, ReduceTiling tl, int64_t num_items) {
  using acc_t = accum_t<scalar_t>;
  constexpr int SLOTS = ReduceSlots<VEC>::value;
  RK_SHARED_ARRAY(acc_t, s_sum, SLOTS);
  RK_SHARED_ARRAY(acc_t, s_dot, IS_BWD ? SLOTS : 1);
  const int64_t H = g.num_heads, D = g.head_dim, M = g.num_chunks, row = g.row, K = chunks.num_chunks;
  const int64_t TV = tl.tile_vecs, TG = tl.token_groups;
  const int64_t i_v = threadIdx.x % (TV > 0 ? TV : 1), i_g = threadIdx.x / (TV > 0 ? TV : 1);

  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t i_sc = item / tl.num_tiles, h0 = (item % tl.num_tiles) * tl.heads_per_tile;
    const int64_t i_s = i_sc / M, i_c = i_sc % M;
    const int64_t nh = min(tl.heads_per_tile, H - h0), n_vec = nh * D / VEC, o_tile = h0 * D;
    const int64_t o_out = (i_s * H + h0) * M + i_c;
    acc_t* p_mean = means + i_sc * row + o_tile;
    RK_DEVICE_CHECK(i_c != M - 1 || chunks.chunks_of(i_s) <= M,
                    "a sequence of seq_chunks has more than max_chunks chunks: they would be left out");
    const Span sp = chunks.span(i_s, i_c, g);
    if (sp.count <= 0) {  // block-uniform
      write_missing(p_mean, out, o_out, nh, D, M, empty_value);
      continue;
    }
    const int64_t k = chunks.seq_chunks[i_s] + i_c;
    const int64_t j0 = chunks.first_aligned(k, g.chunk_size);
    const int64_t n_pieces = 1 + chunks.last_aligned(k, g.chunk_size) - j0;
    if (i_v < n_vec && i_g < TG) {
      acc_t b_sum[VEC], b_dot[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) b_sum[e] = b_dot[e] = acc_t(0);
      for (int64_t r = i_g; r < n_pieces; r += TG) {
        const int64_t o_p = (r == 0 ? k : K + j0 + r - 1) * row + o_tile + i_v * VEC;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          b_sum[e] += part_sum[o_p + e];
          if constexpr (IS_BWD) b_dot[e] += part_dot[o_p + e];
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        s_sum[(i_g * TV + i_v) * VEC + e] = b_sum[e];
        if constexpr (IS_BWD) s_dot[(i_g * TV + i_v) * VEC + e] = b_dot[e];
      }
    }
    __syncthreads();
    finish_chunk<scalar_t, VEC, IS_BWD>(s_sum, s_dot, TV, TG, n_vec, nh, D, M, sp.count,
                                        vec == nullptr ? nullptr : vec + i_s * vec_seq_stride + o_tile, p_mean, out,
                                        o_out, extra, alpha);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Pass 2, per (sequence, head) row; it touches only the (S, H, M) scores and the (S*M, H*D) means.

// out(d, sum_i coef[i] * mean_i[d]) for d < D, where mean_i[d] = p_mean[i * row + d]. The block is cut into
// groups of n_lanes threads (consecutive d: coalesced reads of a chunk's mean); group j adds chunks j, j + G, ...
// and the groups are combined in order through s_part (blockDim.x values). Every thread must call it.
template <typename acc_t, typename Out>
__device__ void weighted_chunk_sum(const acc_t* coef, const acc_t* __restrict__ p_mean, int64_t M, int64_t row,
                                   int64_t D, acc_t* s_part, Out out) {
  if (D == 0) return;
  const int64_t n_lanes = min(D, static_cast<int64_t>(blockDim.x));
  const int64_t n_groups = blockDim.x / n_lanes;
  const int64_t lane = threadIdx.x % n_lanes, grp = threadIdx.x / n_lanes;
  for (int64_t d0 = 0; d0 < D; d0 += n_lanes) {
    const int64_t d = d0 + lane;
    acc_t acc = 0;
    if (grp < n_groups && d < D) {
      for (int64_t i = grp; i < M; i += n_groups) acc += coef[i] * p_mean[i * row + d];
    }
    s_part[threadIdx.x] = acc;
    __syncthreads();
    if (grp == 0 && d < D) {
      for (int64_t o_g = 1; o_g < n_groups; ++o_g) acc += s_part[o_g * n_lanes + lane];
      out(d, acc);
    }
    __syncthreads();
  }
}

// Forward: scores -> weights in place (softmax over the row's M chunks), summary[s, h] = sum_i w_i mean_i.
template <typename scalar_t>
__global__ void __launch_bounds__(SOFTMAX_THREADS)
    softmax_summary_kernel(accum_t<scalar_t>* __restrict__ weights,
                           const accum_t<scalar_t>* __restrict__ means, scalar_t* __restrict__ summary,
                           Geometry g, int64_t num_rows) {
  using acc_t = accum_t<scalar_t>;
  RK_SHARED_ARRAY(acc_t, s_warp, 32);
  RK_SHARED_ARRAY(acc_t, s_part, SOFTMAX_THREADS);
  const int64_t H = g.num_heads, D = g.head_dim, M = g.num_chunks;
  const acc_t neg_inf = -static_cast<acc_t>(INFINITY);
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {  // r = s * H + h
    const int64_t i_s = r / H, i_h = r % H;
    acc_t* p_w = weights + r * M;
    acc_t top = neg_inf;
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x) top = MaxOp{}(top, p_w[i]);
    top = block_reduce(top, MaxOp{}, s_warp);
    if (top == neg_inf) top = 0;  // empty sequence (every score -inf): every weight becomes 0, not NaN
    acc_t den = 0;
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
      const acc_t e = exp_acc(p_w[i] - top);
      p_w[i] = e;
      den += e;
    }
    den = block_reduce(den, SumOp{}, s_warp);
    const acc_t inv = den == acc_t(0) ? acc_t(0) : acc_t(1) / den;  // 0: empty sequence; NaN stays NaN
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x) p_w[i] *= inv;
    __syncthreads();  // every weight final before threads read the others'
    scalar_t* p_out = summary + r * D;
    weighted_chunk_sum<acc_t>(p_w, means + i_s * M * g.row + i_h * D, M, g.row, D, s_part,
                              [&](int64_t d, acc_t v) { p_out[d] = static_cast<scalar_t>(v); });
  }
}

// Backward: dw -> ds in place, ds_i = w_i (dw_i - sum_j w_j dw_j); dquery[s, h] = scale * sum_i ds_i mean_i.
template <typename acc_t>
__global__ void __launch_bounds__(SOFTMAX_THREADS)
    softmax_backward_kernel(const acc_t* __restrict__ weights, acc_t* __restrict__ dw, const acc_t* __restrict__ means,
                            acc_t* __restrict__ dquery, acc_t scale, Geometry g, int64_t num_rows) {
  RK_SHARED_ARRAY(acc_t, s_warp, 32);
  RK_SHARED_ARRAY(acc_t, s_part, SOFTMAX_THREADS);
  const int64_t H = g.num_heads, D = g.head_dim, M = g.num_chunks;
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t i_s = r / H, i_h = r % H;
    const acc_t* p_w = weights + r * M;
    acc_t* p_g = dw + r * M;
    acc_t total = 0;
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x) total += p_w[i] * p_g[i];
    total = block_reduce(total, SumOp{}, s_warp);
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x) p_g[i] = p_w[i] * (p_g[i] - total);
    __syncthreads();  // every ds final before threads read the others'
    acc_t* p_dq = dquery + r * D;
    weighted_chunk_sum<acc_t>(p_g, means + i_s * M * g.row + i_h * D, M, g.row, D, s_part,
                              [&](int64_t d, acc_t v) { p_dq[d] = scale * v; });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Pass 3, per (piece of <= SCALE_SLAB tokens of a chunk, tile of blockDim vectors of the row):
//   SCALE_FWD     : out_t = w[s, h, c] * src_t
//   SCALE_BWD     : out_t = w[s, h, c] * src_t + (scale * ds[s, h, c] * q[s, h] + w[s, h, c] * dsummary[s, h]) / |c|
//   SCALE_MEAN_BWD: out_t = grad_mean[s, c] / |c|                      (chunk_mean's backward; src, w unused)
// The per-value factors are set up once per item, then each thread streams its vector over the piece's tokens.
// Pieces: (sequence, chunk, slab) for integer chunks, the table's aligned pieces for a table (chunk_geometry.cuh).

enum ScaleMode { SCALE_FWD = 0, SCALE_BWD = 1, SCALE_MEAN_BWD = 2 };

struct ScaleTiling {
  int64_t slab;       // tokens per item
  int64_t num_slabs;  // integer chunks: ceil(chunk_size / slab) slabs per chunk
  int64_t num_tiles;  // ceil(row / VEC / blockDim)
  int64_t num_items;  // pieces (S * M * num_slabs for integer chunks) * num_tiles
};

template <typename scalar_t, int VEC, typename Chunks, int MODE>
__global__ void __launch_bounds__(SCALE_THREADS)
    scale_chunks_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ out, Chunks chunks,
                        const accum_t<scalar_t>* __restrict__ w,
                        const accum_t<scalar_t>* __restrict__ ds, const scalar_t* __restrict__ q,
                        int64_t q_seq_stride, const scalar_t* __restrict__ dsummary,
                        const scalar_t* __restrict__ grad_mean, accum_t<scalar_t> scale, Geometry g, ScaleTiling tl) {
  using acc_t = accum_t<scalar_t>;
  const int64_t H = g.num_heads, D = g.head_dim, M = g.num_chunks, row = g.row;
  for (int64_t item = blockIdx.x; item < tl.num_items; item += gridDim.x) {
    const int64_t i_tile = item % tl.num_tiles;
    const Piece pc = chunks.piece(item / tl.num_tiles, tl.slab, tl.num_slabs, g);
    const int64_t i_s = pc.i_s, i_c = pc.i_c, t0 = pc.t0, t1 = pc.t1;
    const int64_t o_e = (i_tile * blockDim.x + threadIdx.x) * VEC;  // first value of this thread's vector
    if (t0 >= t1 || o_e >= row) continue;  // missing chunk, slab past the chunk's end, or lane past the row

    acc_t b_w[VEC], b_a[VEC];
    int64_t h = o_e / D, d = o_e % D;
    const acc_t inv = acc_t(1) / static_cast<acc_t>(pc.span.count);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {  // a vector may straddle heads when D is not a multiple of VEC
      const int64_t o_w = (i_s * H + h) * M + i_c;
      b_w[k] = 0;
      b_a[k] = 0;
      if constexpr (MODE == SCALE_MEAN_BWD) {
        b_a[k] = static_cast<acc_t>(grad_mean[(i_s * M + i_c) * row + o_e + k]) / static_cast<acc_t>(pc.span.count);
      } else {
        b_w[k] = w[o_w];
      }
      if constexpr (MODE == SCALE_BWD) {
        b_a[k] = (scale * ds[o_w] * static_cast<acc_t>(q[i_s * q_seq_stride + o_e + k]) +
                  b_w[k] * static_cast<acc_t>(dsummary[i_s * row + o_e + k])) *
                 inv;
      }
      if (++d == D) {
        d = 0;
        ++h;
      }
    }
    const int64_t o_first = (pc.span.first + t0) * row + o_e;
    if constexpr (MODE == SCALE_MEAN_BWD) {
      Pack<scalar_t, VEC> b_out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) b_out.v[k] = static_cast<scalar_t>(b_a[k]);
      for (int64_t t = 0; t < t1 - t0; ++t) store_pack<VEC>(out + o_first + t * row, b_out);
    } else {
#pragma unroll 4
      for (int64_t t = 0; t < t1 - t0; ++t) {
        const Pack<scalar_t, VEC> b_src = load_pack<VEC>(src + o_first + t * row);
        Pack<scalar_t, VEC> b_out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t v = b_w[k] * static_cast<acc_t>(b_src.v[k]);
          b_out.v[k] = static_cast<scalar_t>(MODE == SCALE_BWD ? v + b_a[k] : v);
        }
        store_pack<VEC>(out + o_first + t * row, b_out);
      }
    }
  }
}

}  // namespace
}  // namespace routing_kernels
