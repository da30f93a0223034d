// Shared pieces of the CPU routed_attention kernels (routed_attention_fwd.cpp, routed_attention_bwd.cpp): task
// scheduling, gathered-block scratch, and the row loops between the GEMMs. Internal to csrc/cpu/; everything here
// has internal linkage (an anonymous namespace), so each kernel file gets its own copy of the target_clones loops.
//
// CPU kernels of routing_kernels::routed_attention_fwd / routed_attention_bwd (contract in
// include/routing_kernels/routed_attention.h, maths in routing_kernels/ops/routed_attention/README.md).
//
// Both directions work on gathered blocks with BLAS (at::mm_out on pointer views, no copies of k or v): the rows of
// one block are the (token, head) queries of one kv head that selected one key chunk, found through a counting sort
// of the selection (an inverted index), so every GEMM is (rows x D) x (D x keys) with keys <= one chunk. The causal
// mask only touches blocks whose chunk is the queries' own one, and there the keys past the last row's token are not
// even multiplied (rows are sorted by token, so a row block needs keys up to its last token only).
//
//   forward : task = (sequence, kv head, block of tokens). The task owns the output rows of its queries and visits
//             their chunks in ascending order, merging each block into (running max, sum, o) online, so the result
//             does not depend on the thread count and no per-chunk partials are stored.
//   backward: task = (sequence, kv head, key chunk), the owner of that chunk's dK / dV rows. Its queries' dQ shares
//             are added into dq in slot (= ascending chunk) order: deterministic, no atomics. Chunk indices are
//             processed in ascending phases whose shares fit a fixed workspace budget (see "Workspace" below), so
//             the extra memory does not grow with the shares (tokens x Hq x top_k x D: 17 GB at 128K tokens,
//             32 heads, top_k 8, D 128). The alternative, a query-side pass that recomputes S and dP, costs 3 more
//             GEMMs per block (~60% more time).
//
// Tasks are handed out through an atomic counter (costliest first in the backward): the causal chunk 0 of a long
// sequence is selected by every query, and a static split would leave one thread with it. Which thread runs a
// task never changes its arithmetic. Inside tasks BLAS runs single-threaded (OpenMP does not nest).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <routing_kernels/cpu_memory.h>
#include <routing_kernels/routed_attention.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "routed_layout.h"

namespace routing_kernels {
namespace cpu {
namespace {

constexpr int64_t ROW_BLOCK = 256;        // gathered query rows per GEMM
constexpr int64_t KEY_BLOCK = 512;        // keys per GEMM: S is at most 256 x 512 (512 KB fp32)
constexpr int64_t ROWS_PER_TASK = 2048;   // forward: query rows (tokens x group) per task

template <typename Fn>
void run_tasks(int64_t num_tasks, Fn fn) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1, [&](int64_t, int64_t) {
    c10::InferenceMode guard;  // worker threads do not inherit the caller's autograd state; nothing here needs it
    fn(next);
  });
}

// What both directions need: where the queries and keys of each sequence are, and the gate's knobs.
struct Inputs {
  RoutedLayout layout;
  int64_t chunk_size, top_k;
  bool causal;
  const RoutedShape& sh() const { return layout.sh; }
};

at::Tensor to_acc(const at::Tensor& t) { return t.detach().to(accum_type(t.scalar_type())).contiguous(); }

// (tokens, heads, dim) flat tensor -> the caller's layout (.., heads, dim).
at::Tensor like_layout(const at::Tensor& flat, const at::Tensor& ref, at::ScalarType dtype, int64_t tail_dims) {
  std::vector<int64_t> shape(ref.sizes().begin(), ref.sizes().end() - 2);
  for (int64_t d = flat.dim() - tail_dims; d < flat.dim(); ++d) shape.push_back(flat.size(d));
  return flat.to(dtype).view(shape);
}

// Blocks of one task: query rows of one (sequence, kv head) that selected one chunk, sorted by token.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> qg, s, dp, og, row_a, row_b;
  std::vector<int64_t> allowed;
  Scratch(int64_t D, int64_t Dv) : qg(ROW_BLOCK * std::max(D, Dv)), s(ROW_BLOCK * KEY_BLOCK),
                                   dp(ROW_BLOCK * KEY_BLOCK), og(ROW_BLOCK * std::max(D, Dv)),
                                   row_a(ROW_BLOCK), row_b(ROW_BLOCK), allowed(ROW_BLOCK) {}
};

template <typename acc_t>
at::Tensor view2(const acc_t* p, int64_t rows, int64_t cols, int64_t row_stride, const at::TensorOptions& o) {
  return at::from_blob(const_cast<acc_t*>(p), {rows, cols}, {row_stride, 1}, o);
}

// Keys [k0, k1) of a chunk seen by a query at position pos: all of them, or up to pos when causal.
inline int64_t allowed_keys(bool causal, int64_t pos, int64_t k0, int64_t k1) {
  return causal ? std::clamp<int64_t>(std::min(k1, pos + 1) - k0, 0, k1 - k0) : k1 - k0;
}

// Masked scores (keys past a causal query's token) go through the exp as 0 and are zeroed afterwards: -inf (or any
// value below -87, where fp32 exp underflows) sends MKL's vectorised exp to its slow special-value path.
template <typename acc_t>
void unmask(acc_t* p, const int64_t* allowed, int64_t R, int64_t C) {
  for (int64_t i = 0; i < R; ++i) std::fill(p + i * C + allowed[i], p + (i + 1) * C, acc_t(0));
}

// ------------------------------------------------------------------------------------------- row loops
// The softmax row loops between the GEMMs. The extension is compiled for baseline x86-64 (SSE2), where these loops
// took ~30% of the forward at 4K tokens next to MKL's AVX-512 GEMMs (perf); GCC's target_clones builds them for
// AVX-512 and AVX2 as well and picks one at load time (ifunc). The build passes -ffp-contract=off (no fused
// multiply-adds), so the clones round alike; the reductions' lane order does depend on the vector width, so sums
// are deterministic run to run on one machine, and may differ in the last bits between machines.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RK_ROW_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RK_ROW_LOOP
#endif

// Forward: shift row [0, a) of S by its new running max and zero [a, c) (masked keys, see unmask). Returns the max.
template <typename acc_t>
RK_ROW_LOOP acc_t shift_row(acc_t* row, int64_t a, int64_t c, acc_t m_prev) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  // omp simd: without it GCC keeps max and sum reductions scalar (a 4-cycle dependency chain per value, measured
  // 35% of the forward); the order it picks is fixed at compile time, so still deterministic.
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < a; ++i) mx = row[i] > mx ? row[i] : mx;
  const acc_t m_new = a > 0 ? std::max(m_prev, mx) : acc_t(0);
#pragma omp simd
  for (int64_t i = 0; i < a; ++i) row[i] -= m_new;
  for (int64_t i = a; i < c; ++i) row[i] = 0;
  return m_new;
}

template <typename acc_t>
RK_ROW_LOOP acc_t sum_row(const acc_t* row, int64_t a) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < a; ++i) sum += row[i];
  return sum;
}

// out = out * alpha + add_scale * add: the online-softmax merge of one output row (alpha = 0 still reads out, so
// a NaN there stays NaN, as in the dense reference), and the dQ shares.
template <typename acc_t>
RK_ROW_LOOP void scale_add_row(acc_t* out, const acc_t* add, acc_t alpha, acc_t add_scale, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = out[i] * alpha + add_scale * add[i];
}

// out = add_scale * add, without reading out (uninitialized memory).
template <typename acc_t>
RK_ROW_LOOP void scaled_copy_row(acc_t* out, const acc_t* add, acc_t add_scale, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = add_scale * add[i];
}

// Backward: row [0, a) of scale * Q K^T becomes its exponent against the saved lse; [a, c) is zeroed.
template <typename acc_t>
RK_ROW_LOOP void lse_shift_row(acc_t* row, int64_t a, int64_t c, acc_t scale, acc_t lse) {
#pragma omp simd
  for (int64_t i = 0; i < a; ++i) row[i] = row[i] * scale - lse;
  for (int64_t i = a; i < c; ++i) row[i] = 0;
}

// Backward: <a, b> over one row (delta = <dO, O> - dlse).
template <typename acc_t>
RK_ROW_LOOP acc_t dot_row(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Backward: dS = P * (dP - delta), in place in dP.
template <typename acc_t>
RK_ROW_LOOP void ds_row(acc_t* dp, const acc_t* p, acc_t delta, int64_t c) {
#pragma omp simd
  for (int64_t i = 0; i < c; ++i) dp[i] = p[i] * (dp[i] - delta);
}

}  // namespace
}  // namespace cpu
}  // namespace routing_kernels
