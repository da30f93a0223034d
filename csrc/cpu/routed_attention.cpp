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
//             go to a (query, slot) buffer, summed afterwards in slot (= ascending chunk) order: deterministic, no
//             atomics. The buffer is tokens x Hq x min(top_k, M) x D in the accumulation type (134 MB at 16K tokens,
//             8 heads, top_k 4, D 64); the alternative, a query-side pass that recomputes S and dP, costs 3 more
//             GEMMs per block (~60% more time).
//
// Tasks are handed out through an atomic counter (costliest first in the backward): the causal chunk 0 of a long
// sequence is selected by every query, and a static split would leave one thread with it. Which thread runs a
// task never changes its arithmetic. Inside tasks BLAS runs single-threaded (OpenMP does not nest).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <routing_kernels/cpu_memory.h>
#include <routing_kernels/routed_attention.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

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

struct Inputs {
  RoutedShape sh;
  at::Tensor cu_c;
  const int32_t* cu = nullptr;
  int64_t chunk_size, top_k;
  bool causal;
};

Inputs prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t chunk_size, int64_t top_k,
               bool causal, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  Inputs in{check_routed_args(q, k, &v, chunk_size, top_k, cu_seqlens, max_seqlen, c10::DeviceType::CPU), {}, nullptr,
            chunk_size, top_k, causal};
  if (in.sh.varlen) {
    in.cu_c = cu_seqlens->contiguous();
    in.cu = in.cu_c.const_data_ptr<int32_t>();
    check_cu_seqlens_values(in.cu, in.sh.num_seqs, in.sh.num_tokens, max_seqlen);
  }
  return in;
}

at::Tensor to_acc(const at::Tensor& t) { return t.detach().to(routed_acc_type(t.scalar_type())).contiguous(); }

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

// Backward: dS = P * (dP - delta), in place in dP.
template <typename acc_t>
RK_ROW_LOOP void ds_row(acc_t* dp, const acc_t* p, acc_t delta, int64_t c) {
#pragma omp simd
  for (int64_t i = 0; i < c; ++i) dp[i] = p[i] * (dp[i] - delta);
}

// ------------------------------------------------------------------------------------------------------ forward

template <typename acc_t>
void forward_kernel(const Inputs& in, const at::Tensor& q_a, const at::Tensor& k_a, const at::Tensor& v_a,
                    const int32_t* sel, acc_t scale, acc_t* o, acc_t* lse) {
  const RoutedShape& sh = in.sh;
  const int64_t Hq = sh.q_heads, Hkv = sh.kv_heads, G = sh.group, D = sh.head_dim, Dv = sh.v_dim;
  const int64_t cs = in.chunk_size, top_k = in.top_k;
  const int64_t block = std::max<int64_t>(1, ROWS_PER_TASK / G);
  struct Task {
    int64_t s, hk, p0, p1;
  };
  std::vector<Task> tasks;
  for (int64_t s = 0; s < sh.num_seqs; ++s) {
    const int64_t len = seq_span(sh, in.cu, s).len;
    for (int64_t hk = 0; hk < Hkv; ++hk)
      for (int64_t p0 = 0; p0 < len; p0 += block) tasks.push_back({s, hk, p0, std::min(len, p0 + block)});
  }
  // Causal: later token blocks select more chunks; start them first.
  if (in.causal) std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.p0 > b.p0; });
  const acc_t* q = q_a.const_data_ptr<acc_t>();
  const acc_t* k = k_a.const_data_ptr<acc_t>();
  const acc_t* v = v_a.const_data_ptr<acc_t>();
  const auto opts = q_a.options();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  run_tasks(static_cast<int64_t>(tasks.size()), [&](std::atomic<int64_t>& next) {
    Scratch<acc_t> sc(D, Dv);
    std::vector<int64_t> count, order;
    std::vector<acc_t> m_run, l_run, q_task, o_task;
    for (int64_t i_task; (i_task = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
      const Task& tk = tasks[i_task];
      const SeqSpan sp = seq_span(sh, in.cu, tk.s);
      const int64_t n = ceil_div(sp.len, cs), rows = (tk.p1 - tk.p0) * G;
      // Row r = (pos - p0) * G + g is query (pos, head hk * G + g); its output row is o_row(r).
      auto q_row = [&](int64_t r) { return (sp.bos + tk.p0 + r / G) * Hq + tk.hk * G + r % G; };
      // Counting sort of the rows by selected chunk; rows stay in ascending order inside a chunk.
      count.assign(n + 1, 0);
      for (int64_t r = 0; r < rows; ++r) {
        const int32_t* sr = sel + q_row(r) * top_k;
        for (int64_t i = 0; i < top_k && sr[i] >= 0; ++i) ++count[sr[i] + 1];
      }
      std::partial_sum(count.begin(), count.end(), count.begin());
      order.resize(count[n]);
      {
        std::vector<int64_t> fill(count.begin(), count.end() - 1);
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t* sr = sel + q_row(r) * top_k;
          for (int64_t i = 0; i < top_k && sr[i] >= 0; ++i) order[fill[sr[i]]++] = r;
        }
      }
      m_run.assign(rows, neg_inf);
      l_run.assign(rows, acc_t(0));
      // The task's queries (pre-scaled) and output accumulators as contiguous rows: the per-chunk gathers and
      // merges then hit L2 instead of rows Hq * D apart in q and o (measured ~15% of the forward at 4K tokens).
      q_task.resize(rows * D);
      o_task.assign(rows * Dv, acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* src = q + q_row(r) * D;
        for (int64_t d = 0; d < D; ++d) q_task[r * D + d] = src[d] * scale;
      }

      for (int64_t j = 0; j < n; ++j) {
        const int64_t kb = j * cs, ke = std::min(sp.len, kb + cs);
        for (int64_t k0 = kb; k0 < ke; k0 += KEY_BLOCK) {
          const int64_t k1 = std::min(ke, k0 + KEY_BLOCK);
          for (int64_t b0 = count[j], R = 0; b0 < count[j + 1]; b0 += R) {
            R = std::min(ROW_BLOCK, count[j + 1] - b0);
            // Causal: the chunk's own queries come first (rows are sorted by token) and see a triangle of keys;
            // half-size blocks there cut the masked work that is multiplied anyway (1/4 of a 512 chunk -> 1/8).
            if (in.causal && (tk.p0 + order[b0] / G) / cs == j) R = std::min(R, ROW_BLOCK / 2);
            const int64_t* rr = order.data() + b0;
            int64_t C = 0;
            for (int64_t i = 0; i < R; ++i) {
              sc.allowed[i] = allowed_keys(in.causal, tk.p0 + rr[i] / G, k0, k1);
              C = std::max(C, sc.allowed[i]);
            }
            if (C == 0) continue;
            for (int64_t i = 0; i < R; ++i) {
              std::copy_n(q_task.data() + rr[i] * D, D, sc.qg.data() + i * D);
            }
            // S (R, C) = (scale Q) K^T; then P = exp(S - running max), rows with no key in this block skipped.
            at::Tensor s_t = view2(sc.s.data(), R, C, C, opts);
            at::mm_out(s_t, view2(sc.qg.data(), R, D, D, opts),
                       view2(k + ((sp.bos + k0) * Hkv + tk.hk) * D, C, D, Hkv * D, opts).t());
            for (int64_t i = 0; i < R; ++i) {  // masked keys: zeroed after the exp too (see unmask)
              sc.row_a[i] = shift_row(sc.s.data() + i * C, sc.allowed[i], C, m_run[rr[i]]);
            }
            s_t.exp_();
            unmask(sc.s.data(), sc.allowed.data(), R, C);
            at::Tensor og = view2(sc.og.data(), R, Dv, Dv, opts);
            at::mm_out(og, s_t, view2(v + ((sp.bos + k0) * Hkv + tk.hk) * Dv, C, Dv, Hkv * Dv, opts));
            for (int64_t i = 0; i < R; ++i) {
              if (sc.allowed[i] == 0) continue;
              const acc_t sum = sum_row(sc.s.data() + i * C, sc.allowed[i]);
              const int64_t r = rr[i];
              const acc_t m_new = sc.row_a[i];
              const acc_t alpha = std::exp(m_run[r] - m_new);  // 0 on the first block (m_run = -inf)
              l_run[r] = l_run[r] * alpha + sum;
              m_run[r] = m_new;
              scale_add_row(o_task.data() + r * Dv, sc.og.data() + i * Dv, alpha, acc_t(1), Dv);
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* orow = o + q_row(r) * Dv;
        const acc_t inv = acc_t(1) / l_run[r];
        for (int64_t d = 0; d < Dv; ++d) orow[d] = o_task[r * Dv + d] * inv;
        lse[q_row(r)] = m_run[r] + std::log(l_run[r]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> routed_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, int64_t chunk_size, int64_t top_k,
                                                            bool causal, const std::optional<at::Tensor>& cu_seqlens,
                                                            int64_t max_seqlen, double scale) {
  const Inputs in = prepare(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen);
  const RoutedShape& sh = in.sh;
  const auto acc = routed_acc_type(q.scalar_type());
  const at::Tensor q_a = to_acc(q), k_a = to_acc(k), v_a = to_acc(v);
  at::Tensor o = empty_cpu_output({sh.num_tokens, sh.q_heads, sh.v_dim}, q_a.options());
  at::Tensor lse = empty_cpu_output({sh.num_tokens, sh.q_heads}, q_a.options());
  if (sh.num_tokens > 0) {
    const at::Tensor sel = route_chunks_acc(q_a, k_a, sh, in.cu, chunk_size, top_k, causal);
    AT_DISPATCH_FLOATING_TYPES(acc, "routed_attention_fwd_cpu", [&] {
      forward_kernel<scalar_t>(in, q_a, k_a, v_a, sel.const_data_ptr<int32_t>(), static_cast<scalar_t>(scale),
                               o.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>());
    });
  }
  return {like_layout(o, q, q.scalar_type(), 2), like_layout(lse, q, acc, 1)};
}

// ----------------------------------------------------------------------------------------------------- backward

template <typename acc_t>
void backward_kernel(const Inputs& in, const at::Tensor& q_a, const at::Tensor& k_a, const at::Tensor& v_a,
                     const at::Tensor& do_a, const acc_t* lse, const acc_t* delta, const int32_t* sel, acc_t scale,
                     int64_t slots, acc_t* dq_part, acc_t* dk, acc_t* dv) {
  const RoutedShape& sh = in.sh;
  const int64_t Hq = sh.q_heads, Hkv = sh.kv_heads, G = sh.group, D = sh.head_dim, Dv = sh.v_dim;
  const int64_t cs = in.chunk_size, top_k = in.top_k, S = sh.num_seqs;
  const auto opts = q_a.options();

  // Inverted index per (sequence, kv head): the (query row, slot) entries of every chunk, grouped by chunk, queries
  // ascending inside a chunk. Entry = q_row * slots + slot, where q_row = token * Hq + head. The entries of
  // (s, hk) live at [bos * Hq * slots + hk * len * G * slots, ...), at most len * G * slots of them.
  std::vector<int64_t> chunk_off(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) chunk_off[s + 1] = chunk_off[s] + ceil_div(seq_span(sh, in.cu, s).len, cs);
  std::vector<int64_t> entries(sh.num_tokens * Hq * slots);
  std::vector<int64_t> bucket((chunk_off[S] * Hkv) + 1, 0);  // bucket[(chunk_off[s] + j) * Hkv + hk] = first entry
  std::vector<int64_t> bucket_end(chunk_off[S] * Hkv, 0);
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> fill;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / Hkv, hk = item % Hkv;
      const SeqSpan sp = seq_span(sh, in.cu, s);
      const int64_t n = chunk_off[s + 1] - chunk_off[s];
      if (n == 0) continue;
      fill.assign(n + 1, 0);
      for (int64_t t = sp.bos; t < sp.bos + sp.len; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int32_t* sr = sel + (t * Hq + hk * G + g) * top_k;
          for (int64_t i = 0; i < top_k && sr[i] >= 0; ++i) ++fill[sr[i] + 1];
        }
      const int64_t base = sp.bos * Hq * slots + hk * sp.len * G * slots;
      fill[0] = base;
      for (int64_t j = 1; j <= n; ++j) fill[j] += fill[j - 1];
      for (int64_t j = 0; j < n; ++j) {
        bucket[(chunk_off[s] + j) * Hkv + hk] = fill[j];
        bucket_end[(chunk_off[s] + j) * Hkv + hk] = fill[j + 1];
      }
      for (int64_t t = sp.bos; t < sp.bos + sp.len; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t qr = t * Hq + hk * G + g;
          const int32_t* sr = sel + qr * top_k;
          for (int64_t i = 0; i < top_k && sr[i] >= 0; ++i) entries[fill[sr[i]]++] = qr * slots + i;
        }
    }
  });

  // Tasks: (sequence, chunk, kv head), costliest (most entries) first.
  std::vector<int64_t> tasks(chunk_off[S] * Hkv);
  std::iota(tasks.begin(), tasks.end(), 0);
  std::stable_sort(tasks.begin(), tasks.end(), [&](int64_t a, int64_t b) {
    return bucket_end[a] - bucket[a] > bucket_end[b] - bucket[b];
  });
  const acc_t* q = q_a.const_data_ptr<acc_t>();
  const acc_t* k = k_a.const_data_ptr<acc_t>();
  const acc_t* v = v_a.const_data_ptr<acc_t>();
  const acc_t* dout = do_a.const_data_ptr<acc_t>();

  run_tasks(static_cast<int64_t>(tasks.size()), [&](std::atomic<int64_t>& next) {
    Scratch<acc_t> sc(D, Dv);
    std::vector<acc_t> dk_acc, dv_acc, dog(ROW_BLOCK * Dv);
    for (int64_t i_task; (i_task = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
      const int64_t id = tasks[i_task], c = id / Hkv, hk = id % Hkv;
      const int64_t s = std::upper_bound(chunk_off.begin(), chunk_off.end(), c) - chunk_off.begin() - 1;
      const SeqSpan sp = seq_span(sh, in.cu, s);
      const int64_t kb = (c - chunk_off[s]) * cs, ke = std::min(sp.len, kb + cs), nk = ke - kb;
      dk_acc.assign(nk * D, acc_t(0));
      dv_acc.assign(nk * Dv, acc_t(0));
      const int64_t e_begin = bucket[id], e_end = bucket_end[id];
      for (int64_t k0 = kb; k0 < ke; k0 += KEY_BLOCK) {
        const int64_t k1 = std::min(ke, k0 + KEY_BLOCK);
        const at::Tensor k_blk = view2(k + ((sp.bos + k0) * Hkv + hk) * D, k1 - k0, D, Hkv * D, opts);
        const at::Tensor v_blk = view2(v + ((sp.bos + k0) * Hkv + hk) * Dv, k1 - k0, Dv, Hkv * Dv, opts);
        for (int64_t b0 = e_begin; b0 < e_end; b0 += ROW_BLOCK) {
          const int64_t R = std::min(ROW_BLOCK, e_end - b0);
          const int64_t* ee = entries.data() + b0;
          int64_t C = 0;
          for (int64_t i = 0; i < R; ++i) {
            const int64_t qr = ee[i] / slots;
            sc.allowed[i] = allowed_keys(in.causal, qr / Hq - sp.bos, k0, k1);
            C = std::max(C, sc.allowed[i]);
          }
          if (C == 0) continue;
          for (int64_t i = 0; i < R; ++i) {
            const int64_t qr = ee[i] / slots;
            std::copy_n(q + qr * D, D, sc.qg.data() + i * D);
            std::copy_n(dout + qr * Dv, Dv, dog.data() + i * Dv);
          }
          const at::Tensor qg = view2(sc.qg.data(), R, D, D, opts);
          const at::Tensor dog_t = view2(dog.data(), R, Dv, Dv, opts);
          // P = exp(scale Q K^T - lse) on the allowed keys, dP = dO V^T, dS = P * (dP - delta).
          at::Tensor p_t = view2(sc.s.data(), R, C, C, opts);
          at::Tensor ds_t = view2(sc.dp.data(), R, C, C, opts);
          at::mm_out(p_t, qg, k_blk.narrow(0, 0, C).t());
          for (int64_t i = 0; i < R; ++i) {
            lse_shift_row(sc.s.data() + i * C, sc.allowed[i], C, scale, lse[ee[i] / slots]);
          }
          p_t.exp_();
          unmask(sc.s.data(), sc.allowed.data(), R, C);
          at::mm_out(ds_t, dog_t, v_blk.narrow(0, 0, C).t());
          for (int64_t i = 0; i < R; ++i) {
            ds_row(sc.dp.data() + i * C, sc.s.data() + i * C, delta[ee[i] / slots], C);
          }
          // dV += P^T dO, dK += scale dS^T Q (this task owns these key rows), dQ share = scale dS K.
          at::Tensor dv_blk = view2(dv_acc.data() + (k0 - kb) * Dv, C, Dv, Dv, opts);
          at::Tensor dk_blk = view2(dk_acc.data() + (k0 - kb) * D, C, D, D, opts);
          dv_blk.addmm_(p_t.t(), dog_t);
          dk_blk.addmm_(ds_t.t(), qg, /*beta=*/1, /*alpha=*/scale);
          at::Tensor dqg = view2(sc.og.data(), R, D, D, opts);
          at::mm_out(dqg, ds_t, k_blk.narrow(0, 0, C));
          const bool first = k0 == kb;  // every row has keys in the chunk's first block (its own token when causal)
          for (int64_t i = 0; i < R; ++i) {
            if (first) {
              scaled_copy_row(dq_part + ee[i] * D, sc.og.data() + i * D, scale, D);
            } else {
              scale_add_row(dq_part + ee[i] * D, sc.og.data() + i * D, acc_t(1), scale, D);
            }
          }
        }
      }
      for (int64_t t = 0; t < nk; ++t) {
        std::copy_n(dk_acc.data() + t * D, D, dk + ((sp.bos + kb + t) * Hkv + hk) * D);
        std::copy_n(dv_acc.data() + t * Dv, Dv, dv + ((sp.bos + kb + t) * Hkv + hk) * Dv);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const at::Tensor& lse, int64_t chunk_size, int64_t top_k, bool causal,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale) {
  const Inputs in = prepare(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen);
  const RoutedShape& sh = in.sh;
  const auto acc = routed_acc_type(q.scalar_type());
  check_routed_token_tensor(o, q, sh, sh.q_heads, sh.v_dim, q.scalar_type(), "o", "(.., Hq, Dv)");
  check_routed_token_tensor(dout, q, sh, sh.q_heads, sh.v_dim, q.scalar_type(), "do", "(.., Hq, Dv)");
  check_routed_token_tensor(lse, q, sh, sh.q_heads, -1, acc, "lse", "(.., Hq)");
  check_routed_token_tensor(dlse, q, sh, sh.q_heads, -1, acc, "dlse", "(.., Hq)");
  const at::Tensor q_a = to_acc(q), k_a = to_acc(k), v_a = to_acc(v), do_a = to_acc(dout);
  const int64_t T = sh.num_tokens, Hq = sh.q_heads;
  at::Tensor dq = empty_cpu_output({T, Hq, sh.head_dim}, q_a.options());
  at::Tensor dk = empty_cpu_output({T, sh.kv_heads, sh.head_dim}, q_a.options());
  at::Tensor dv = empty_cpu_output({T, sh.kv_heads, sh.v_dim}, q_a.options());
  if (T > 0) {
    // delta = <dO, O> - dlse per query, with O as stored (q's dtype), like the reference.
    const at::Tensor delta =
        (do_a.view({T, Hq, sh.v_dim}) * to_acc(o).view({T, Hq, sh.v_dim})).sum(-1) - dlse.detach().reshape({T, Hq});
    const at::Tensor lse_c = lse.detach().reshape({T, Hq}).contiguous();
    const at::Tensor sel = route_chunks_acc(q_a, k_a, sh, in.cu, chunk_size, top_k, causal);
    const int64_t slots = std::min(top_k, std::max<int64_t>(sh.num_chunks, 1));
    at::Tensor dq_part = at::empty({T * Hq * slots, sh.head_dim}, q_a.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "routed_attention_bwd_cpu", [&] {
      scalar_t* part = dq_part.mutable_data_ptr<scalar_t>();
      backward_kernel<scalar_t>(in, q_a, k_a, v_a, do_a, lse_c.const_data_ptr<scalar_t>(),
                                delta.contiguous().const_data_ptr<scalar_t>(), sel.const_data_ptr<int32_t>(),
                                static_cast<scalar_t>(scale), slots, part, dk.mutable_data_ptr<scalar_t>(),
                                dv.mutable_data_ptr<scalar_t>());
      // dq = sum of the query's shares in slot order (ascending chunk): a fixed order, whatever the threads did.
      const int32_t* sp = sel.const_data_ptr<int32_t>();
      scalar_t* out = dq.mutable_data_ptr<scalar_t>();
      const int64_t D = sh.head_dim;
      at::parallel_for(0, T * Hq, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t* dst = out + r * D;
          std::fill_n(dst, D, scalar_t(0));
          for (int64_t i = 0; i < slots && sp[r * top_k + i] >= 0; ++i) {
            const scalar_t* src = part + (r * slots + i) * D;
            for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
          }
        }
      });
    });
  }
  return {like_layout(dq, q, q.scalar_type(), 2), like_layout(dk, k, k.scalar_type(), 2),
          like_layout(dv, v, v.scalar_type(), 2)};
}

}  // namespace
}  // namespace cpu
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CPU, m) {
  m.impl("routed_attention_fwd", TORCH_FN(routing_kernels::cpu::routed_attention_fwd_cpu));
  m.impl("routed_attention_bwd", TORCH_FN(routing_kernels::cpu::routed_attention_bwd_cpu));
}
