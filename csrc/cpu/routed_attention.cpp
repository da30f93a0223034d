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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <routing_kernels/cpu_memory.h>
#include <routing_kernels/routed_attention.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
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
  const auto acc = accum_type(q.scalar_type());
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
//
// Workspace. A task (sequence s, key chunk j, kv head hk) computes one dQ share per query row that selected j; a
// row's dQ is the sum of its shares in slot (= ascending chunk) order. The chunks are processed in phases, each a
// range of chunk indices [j0, j1) of every sequence and kv head, in ascending order, so a row receives its shares
// phase after phase in slot order: adding each phase's shares into dq as the phase ends gives the same sums, bit
// for bit, however the chunks are grouped. A phase of one chunk index has one task per (s, hk), whose rows are its
// own: it adds its shares straight into dq, no buffer. A phase of several chunk indices keeps its shares in a
// buffer of (entries x D) and adds them afterwards. The planner groups chunk indices while the buffer and index of
// a phase stay within the workspace budget (ROUTING_KERNELS_CPU_BWD_WORKSPACE_MB, default 256), so the extra
// memory is bounded: budget + the phase's index (8 bytes per query row of one chunk index when a single chunk index
// is over budget) + the selection (int32 top_k per query row) + delta (one value per query row), against
// tokens x Hq x slots x (D + 2) x 4 bytes before (17 GB at 128K tokens, 32 heads, top_k 8, D 128).

int64_t workspace_budget_from_env() {
  const char* text = std::getenv("ROUTING_KERNELS_CPU_BWD_WORKSPACE_MB");
  if (text == nullptr || *text == '\0') return int64_t{256} << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0' && errno == 0 && mb >= 0 && mb <= (int64_t{1} << 40),
              "routing_kernels: ROUTING_KERNELS_CPU_BWD_WORKSPACE_MB must be a whole number of megabytes in [0, 2^40], "
              "got '", text, "'");
  return static_cast<int64_t>(mb) << 20;
}

std::atomic<int64_t> g_workspace_override{-1};  // bytes; -1: the environment's value
std::atomic<int64_t> g_stat_phases{0}, g_stat_buffered_phases{0}, g_stat_workspace_bytes{0};

int64_t workspace_budget() {
  const int64_t forced = g_workspace_override.load();
  if (forced >= 0) return forced;
  static const int64_t from_env = workspace_budget_from_env();
  return from_env;
}

// dq row += a dQ share; the row's first share is copied (dq starts uninitialized: 0 * NaN would stay NaN).
template <typename acc_t>
void add_share(acc_t* dq_row, const acc_t* share, bool first, int64_t D) {
  if (first) {
    scaled_copy_row(dq_row, share, acc_t(1), D);
  } else {
    scale_add_row(dq_row, share, acc_t(1), acc_t(1), D);
  }
}

template <typename acc_t>
void backward_kernel(const Inputs& in, const at::Tensor& q_a, const at::Tensor& k_a, const at::Tensor& v_a,
                     const at::Tensor& do_a, const acc_t* lse, const acc_t* delta, const int32_t* sel, acc_t scale,
                     acc_t* dq, acc_t* dk, acc_t* dv) {
  const RoutedShape& sh = in.sh;
  const int64_t Hq = sh.q_heads, Hkv = sh.kv_heads, G = sh.group, D = sh.head_dim, Dv = sh.v_dim;
  const int64_t cs = in.chunk_size, top_k = in.top_k, S = sh.num_seqs, M = sh.num_chunks;
  const auto opts = q_a.options();
  const auto long_opts = opts.dtype(at::kLong);

  // count[(chunk_off[s] + j) * Hkv + hk]: query rows of sequence s, kv head hk that selected chunk j.
  std::vector<int64_t> chunk_off(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) chunk_off[s + 1] = chunk_off[s] + ceil_div(seq_span(sh, in.cu, s).len, cs);
  at::Tensor count_t = at::zeros({chunk_off[S] * Hkv}, long_opts);  // a tensor: torch.profiler sees it
  int64_t* count = count_t.mutable_data_ptr<int64_t>();
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / Hkv, hk = item % Hkv;
      const SeqSpan sp = seq_span(sh, in.cu, s);
      int64_t* c = count + chunk_off[s] * Hkv + hk;
      for (int64_t t = sp.bos; t < sp.bos + sp.len; ++t)
        for (int64_t g = 0; g < G; ++g) {
          const int32_t* sr = sel + (t * Hq + hk * G + g) * top_k;
          for (int64_t i = 0; i < top_k && sr[i] >= 0; ++i) ++c[sr[i] * Hkv];
        }
    }
  });

  // Phases: ranges of chunk indices, ascending, each within the budget unless it is a single chunk index.
  std::vector<int64_t> column(M, 0);  // entries of chunk index j over every sequence and kv head
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < chunk_off[s + 1] - chunk_off[s]; ++j)
      for (int64_t hk = 0; hk < Hkv; ++hk) column[j] += count[(chunk_off[s] + j) * Hkv + hk];
  const int64_t entry_bytes = D * static_cast<int64_t>(sizeof(acc_t)) + static_cast<int64_t>(sizeof(int64_t));
  const int64_t budget = workspace_budget();
  std::vector<std::pair<int64_t, int64_t>> phases;
  int64_t max_entries = 0, max_buffered = 0;
  for (int64_t j0 = 0, j1; j0 < M; j0 = j1) {
    int64_t entries = column[j0];
    for (j1 = j0 + 1; j1 < M && (entries + column[j1]) * entry_bytes <= budget; ++j1) entries += column[j1];
    phases.emplace_back(j0, j1);
    max_entries = std::max(max_entries, entries);
    if (j1 - j0 > 1) max_buffered = std::max(max_buffered, entries);
  }
  // From the output cache like the outputs: fresh pages of a 134 MB buffer (16K tokens, 8 heads, top_k 4, D 64) cost
  // ~70 ms of page faults per call, and the next call needs the same buffer.
  at::Tensor entries_t = empty_cpu_output({max_entries}, long_opts);
  at::Tensor share_t = empty_cpu_output({max_buffered, D}, opts);
  int64_t* entries = entries_t.mutable_data_ptr<int64_t>();
  acc_t* shares = share_t.mutable_data_ptr<acc_t>();
  g_stat_phases = static_cast<int64_t>(phases.size());
  g_stat_buffered_phases = std::count_if(phases.begin(), phases.end(), [](const auto& p) { return p.second - p.first > 1; });
  g_stat_workspace_bytes = max_entries * static_cast<int64_t>(sizeof(int64_t)) + max_buffered * D * sizeof(acc_t);

  const acc_t* q = q_a.const_data_ptr<acc_t>();
  const acc_t* k = k_a.const_data_ptr<acc_t>();
  const acc_t* v = v_a.const_data_ptr<acc_t>();
  const acc_t* dout = do_a.const_data_ptr<acc_t>();
  struct Task {
    int64_t s, hk, j, begin, count;  // entries [begin, begin + count) of the phase's index
  };
  std::vector<Task> tasks;
  std::vector<int64_t> region;  // per (s, hk) of the phase: first entry

  for (const auto& [j0, j1] : phases) {
    const bool buffered = j1 - j0 > 1;
    // Index of the phase: per (s, hk) a region, in it the buckets of chunks j0.. ascending, rows ascending inside.
    tasks.clear();
    region.assign(S * Hkv + 1, 0);
    int64_t total = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t n = chunk_off[s + 1] - chunk_off[s];
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        region[s * Hkv + hk] = total;
        for (int64_t j = j0; j < std::min(j1, n); ++j) {
          const int64_t c = count[(chunk_off[s] + j) * Hkv + hk];
          tasks.push_back({s, hk, j, total, c});
          total += c;
        }
      }
    }
    region[S * Hkv] = total;
    at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> fill(j1 - j0);
      for (int64_t item = begin; item < end; ++item) {
        if (region[item + 1] == region[item]) continue;
        const int64_t s = item / Hkv, hk = item % Hkv;
        const SeqSpan sp = seq_span(sh, in.cu, s);
        int64_t next = region[item];
        for (int64_t j = j0; j < j1; ++j) {
          fill[j - j0] = next;
          if (j < chunk_off[s + 1] - chunk_off[s]) next += count[(chunk_off[s] + j) * Hkv + hk];
        }
        // Causal: a token selects no chunk after its own, so the tokens before chunk j0 have nothing here.
        for (int64_t t = sp.bos + (in.causal ? std::min(sp.len, j0 * cs) : 0); t < sp.bos + sp.len; ++t)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t qr = t * Hq + hk * G + g;
            const int32_t* sr = sel + qr * top_k;
            for (int64_t i = 0; i < top_k && sr[i] >= 0 && sr[i] < j1; ++i)  // ascending, -1 padded
              if (sr[i] >= j0) entries[fill[sr[i] - j0]++] = qr;
          }
      }
    });
    // Costliest (most entries) first.
    std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.count > b.count; });

    run_tasks(static_cast<int64_t>(tasks.size()), [&](std::atomic<int64_t>& next) {
      Scratch<acc_t> sc(D, Dv);
      std::vector<acc_t> dk_acc, dv_acc, dog(ROW_BLOCK * Dv), share_rows(buffered ? 0 : ROW_BLOCK * D);
      for (int64_t i_task; (i_task = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
        const Task& tk = tasks[i_task];
        const SeqSpan sp = seq_span(sh, in.cu, tk.s);
        const int64_t kb = tk.j * cs, ke = std::min(sp.len, kb + cs), nk = ke - kb;
        dk_acc.assign(nk * D, acc_t(0));
        dv_acc.assign(nk * Dv, acc_t(0));
        for (int64_t b0 = 0; b0 < tk.count; b0 += ROW_BLOCK) {
          const int64_t R = std::min(ROW_BLOCK, tk.count - b0);
          const int64_t* ee = entries + tk.begin + b0;  // query rows, ascending
          for (int64_t i = 0; i < R; ++i) {
            std::copy_n(q + ee[i] * D, D, sc.qg.data() + i * D);
            std::copy_n(dout + ee[i] * Dv, Dv, dog.data() + i * Dv);
          }
          const at::Tensor qg = view2(sc.qg.data(), R, D, D, opts);
          const at::Tensor dog_t = view2(dog.data(), R, Dv, Dv, opts);
          // The rows' dQ shares: in the phase's buffer, or in share_rows until they go into dq below.
          acc_t* share = buffered ? shares + (tk.begin + b0) * D : share_rows.data();
          for (int64_t k0 = kb; k0 < ke; k0 += KEY_BLOCK) {
            const int64_t k1 = std::min(ke, k0 + KEY_BLOCK);
            int64_t C = 0;
            for (int64_t i = 0; i < R; ++i) {
              sc.allowed[i] = allowed_keys(in.causal, ee[i] / Hq - sp.bos, k0, k1);
              C = std::max(C, sc.allowed[i]);
            }
            if (C == 0) continue;
            const at::Tensor k_blk = view2(k + ((sp.bos + k0) * Hkv + tk.hk) * D, C, D, Hkv * D, opts);
            const at::Tensor v_blk = view2(v + ((sp.bos + k0) * Hkv + tk.hk) * Dv, C, Dv, Hkv * Dv, opts);
            // P = exp(scale Q K^T - lse) on the allowed keys, dP = dO V^T, dS = P * (dP - delta).
            at::Tensor p_t = view2(sc.s.data(), R, C, C, opts);
            at::Tensor ds_t = view2(sc.dp.data(), R, C, C, opts);
            at::mm_out(p_t, qg, k_blk.t());
            for (int64_t i = 0; i < R; ++i) lse_shift_row(sc.s.data() + i * C, sc.allowed[i], C, scale, lse[ee[i]]);
            p_t.exp_();
            unmask(sc.s.data(), sc.allowed.data(), R, C);
            at::mm_out(ds_t, dog_t, v_blk.t());
            for (int64_t i = 0; i < R; ++i) ds_row(sc.dp.data() + i * C, sc.s.data() + i * C, delta[ee[i]], C);
            // dV += P^T dO, dK += dS^T Q (this task owns these key rows; scaled once at the end), dQ share +=
            // scale dS K. No alpha in the GEMM: MKL's sgemm with alpha != 1 rounded differently with 1 and 2 threads.
            at::Tensor dv_blk = view2(dv_acc.data() + (k0 - kb) * Dv, C, Dv, Dv, opts);
            at::Tensor dk_blk = view2(dk_acc.data() + (k0 - kb) * D, C, D, D, opts);
            dv_blk.addmm_(p_t.t(), dog_t);
            dk_blk.addmm_(ds_t.t(), qg);
            at::Tensor dqg = view2(sc.og.data(), R, D, D, opts);
            at::mm_out(dqg, ds_t, k_blk);
            const bool first = k0 == kb;  // every row has keys in the chunk's first block (its own token when causal)
            for (int64_t i = 0; i < R; ++i) {
              if (first) {
                scaled_copy_row(share + i * D, sc.og.data() + i * D, scale, D);
              } else {
                scale_add_row(share + i * D, sc.og.data() + i * D, acc_t(1), scale, D);
              }
            }
          }
          if (!buffered) {  // one task per (s, hk) in this phase: the rows are this task's alone
            for (int64_t i = 0; i < R; ++i) {
              const bool first_share = sel[ee[i] * top_k] == tk.j;  // the row's first (lowest) chunk
              add_share(dq + ee[i] * D, share + i * D, first_share, D);
            }
          }
        }
        for (int64_t t = 0; t < nk; ++t) {
          scaled_copy_row(dk + ((sp.bos + kb + t) * Hkv + tk.hk) * D, dk_acc.data() + t * D, scale, D);
          std::copy_n(dv_acc.data() + t * Dv, Dv, dv + ((sp.bos + kb + t) * Hkv + tk.hk) * Dv);
        }
      }
    });
    if (!buffered) continue;
    // dq += the buffered shares, per row in ascending chunk order. Items: (s, hk, block of tokens); the rows of a
    // token block are a contiguous range of each (ascending) bucket.
    constexpr int64_t REDUCE_TOKENS = 512;
    std::vector<int64_t> item_off(S * Hkv + 1, 0);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t hk = 0; hk < Hkv; ++hk)
        item_off[s * Hkv + hk + 1] = item_off[s * Hkv + hk] + ceil_div(seq_span(sh, in.cu, s).len, REDUCE_TOKENS);
    at::parallel_for(0, item_off.back(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t sk = std::upper_bound(item_off.begin(), item_off.end(), item) - item_off.begin() - 1;
        const int64_t s = sk / Hkv, hk = sk % Hkv;
        const SeqSpan sp = seq_span(sh, in.cu, s);
        const int64_t t0 = sp.bos + (item - item_off[sk]) * REDUCE_TOKENS;
        const int64_t t1 = std::min(sp.bos + sp.len, t0 + REDUCE_TOKENS);
        const int64_t n = chunk_off[s + 1] - chunk_off[s];
        int64_t bucket = region[sk];
        for (int64_t j = j0; j < std::min(j1, n); ++j) {
          const int64_t c = count[(chunk_off[s] + j) * Hkv + hk];
          const int64_t *b_begin = entries + bucket, *b_end = b_begin + c;
          const int64_t* lo = std::lower_bound(b_begin, b_end, t0 * Hq);
          const int64_t* hi = std::lower_bound(lo, b_end, t1 * Hq);
          for (const int64_t* e = lo; e < hi; ++e) {
            const bool first_share = sel[*e * top_k] == j;
            add_share(dq + *e * D, shares + (e - entries) * D, first_share, D);
          }
          bucket += c;
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const at::Tensor& lse, int64_t chunk_size, int64_t top_k, bool causal,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale) {
  const Inputs in = prepare(q, k, v, chunk_size, top_k, causal, cu_seqlens, max_seqlen);
  const RoutedShape& sh = in.sh;
  const auto acc = accum_type(q.scalar_type());
  check_routed_token_tensor(o, q, sh, sh.q_heads, sh.v_dim, q.scalar_type(), "o", "(.., Hq, Dv)");
  check_routed_token_tensor(dout, q, sh, sh.q_heads, sh.v_dim, q.scalar_type(), "do", "(.., Hq, Dv)");
  check_routed_token_tensor(lse, q, sh, sh.q_heads, -1, acc, "lse", "(.., Hq)");
  check_routed_token_tensor(dlse, q, sh, sh.q_heads, -1, acc, "dlse", "(.., Hq)");
  const at::Tensor q_a = to_acc(q), k_a = to_acc(k), v_a = to_acc(v), do_a = to_acc(dout);
  const int64_t T = sh.num_tokens, Hq = sh.q_heads, Dv = sh.v_dim;
  at::Tensor dq = empty_cpu_output({T, Hq, sh.head_dim}, q_a.options());
  at::Tensor dk = empty_cpu_output({T, sh.kv_heads, sh.head_dim}, q_a.options());
  at::Tensor dv = empty_cpu_output({T, sh.kv_heads, sh.v_dim}, q_a.options());
  if (T > 0) {
    const at::Tensor lse_c = lse.detach().reshape({T, Hq}).contiguous();
    const at::Tensor dlse_c = dlse.detach().reshape({T, Hq}).contiguous();
    const at::Tensor o_a = to_acc(o);  // O as stored (q's dtype), like the reference
    const at::Tensor sel = route_chunks_acc(q_a, k_a, sh, in.cu, chunk_size, top_k, causal);
    at::Tensor delta = at::empty({T, Hq}, q_a.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "routed_attention_bwd_cpu", [&] {
      // delta = <dO, O> - dlse per query row, one row at a time (a (T, Hq, Dv) product would be dq-sized).
      const scalar_t* p_do = do_a.const_data_ptr<scalar_t>();
      const scalar_t* p_o = o_a.const_data_ptr<scalar_t>();
      const scalar_t* p_dlse = dlse_c.const_data_ptr<scalar_t>();
      scalar_t* p_delta = delta.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, T * Hq, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) p_delta[r] = dot_row(p_do + r * Dv, p_o + r * Dv, Dv) - p_dlse[r];
      });
      backward_kernel<scalar_t>(in, q_a, k_a, v_a, do_a, lse_c.const_data_ptr<scalar_t>(), p_delta,
                                sel.const_data_ptr<int32_t>(), static_cast<scalar_t>(scale),
                                dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                                dv.mutable_data_ptr<scalar_t>());
    });
  }
  return {like_layout(dq, q, q.scalar_type(), 2), like_layout(dk, k, k.scalar_type(), 2),
          like_layout(dv, v, v.scalar_type(), 2)};
}

}  // namespace

void set_routed_attention_bwd_workspace(int64_t bytes) { g_workspace_override = bytes < 0 ? -1 : bytes; }

RoutedAttentionBwdStats routed_attention_bwd_stats() {
  return {workspace_budget(), g_stat_phases.load(), g_stat_buffered_phases.load(), g_stat_workspace_bytes.load()};
}

}  // namespace cpu
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CPU, m) {
  m.impl("routed_attention_fwd", TORCH_FN(routing_kernels::cpu::routed_attention_fwd_cpu));
  m.impl("routed_attention_bwd", TORCH_FN(routing_kernels::cpu::routed_attention_bwd_cpu));
}
