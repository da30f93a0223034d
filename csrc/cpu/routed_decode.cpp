// CPU kernel of routing_kernels::routed_decode_fwd: routed attention of a few queries (decode, speculative decode)
// over a KV cache. Contract in include/routing_kernels/routed_decode.h.
//
// A decode step must cost the selected chunks, not the cache: at 128K keys, Hkv = 8, D = 128 fp32 the cache is 1 GB
// per layer, the ~28 chunks a kv group's heads select are 115 MB, the chunk sums the gate reads are 1 MB. Three
// phases, each with at::parallel_for:
//   1. gate, task = (row, kv head): the means key_sums / count of the row's chunks, each dotted with the Lq x G
//      queries of the group (a running top list per query, no gate matrix), then the sorted selection.
//   2. attention, task = (row, kv head, chunk of the union of the group's selections [, key range]): flash-decoding.
//      The task reads the chunk's K/V rows once, in 64-key blocks that stay in L1 while every (query, head) of the
//      group that selected the chunk attends to them, and leaves per (query, head, slot) a partial (max, sum, o).
//      With fewer than MIN_TASKS such tasks (B = 1, one kv head, top_k 2) chunks are cut into key ranges so that one
//      sequence still fills every core; the cut depends on the shapes and the selection, never on the thread count.
//   3. merge, per (query, head): the partials by their lse, in ascending slot (= chunk) then key-range order.
// Which thread runs a task never changes its arithmetic, so results do not depend on the thread count.
//
// The inner loops (dots over D, the exp, the axpy over Dv) are built for AVX-512, AVX2 and baseline x86-64 by GCC's
// target_clones and picked at load time, as in routed_attention.cpp; -ffp-contract=off makes the clones round alike
// up to the reductions' lane order. K/V in q's dtype are read in place when that is the accumulation type (fp32,
// fp64) with unit stride over D; fp16/bf16 (or strided D) blocks are converted into a 64-key scratch first.
// Workspace: the partials, B * Lq * Hq * min(top_k, M) * splits * (Dv + 2) values, and the selection; nothing
// scales with the cache length except the gate's O(M) loop over chunk sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <routing_kernels/cpu_memory.h>
#include <routing_kernels/routed_decode.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace routing_kernels {
namespace cpu {
namespace {

// Keys per online-softmax step: a block of K (or V) is 64 x 512 B = 32 KB at D = 128 fp32, so it stays in L1 (48 KB
// here) while the other rows of the task read it; the online rescale of o costs 1/64 of the axpy.
constexpr int64_t KEY_BLOCK = 64;
// Below this many (row, kv head, chunk) tasks, chunks are split into key ranges (16 = 8 per core on 2 cores, enough
// for the atomic counter to even out a partial last chunk; more splits only add partials to merge).
constexpr int64_t MIN_TASKS = 16;
constexpr int64_t PREFETCH_ROWS = 64;  // rows prefetched ahead: 32 KB of K and of V at D = 128 fp32 (see prefetch_rows_l2)

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RK_DECODE_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RK_DECODE_LOOP
#endif
#define RK_INLINE inline __attribute__((always_inline))

// ------------------------------------------------------------------------------------------------ inner loops

// exp(x) for x <= 0 (scores minus their running max), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a polynomial for
// e^r, 2^n from the exponent bits. Max relative error 8.1e-8 over every float in [-87, 0] (std::exp: 6.0e-8); below
// -87.3 it returns exp(-87.3) ~ 1.2e-38 instead of a denormal or 0, invisible next to the max key's exp(0) = 1 in the
// sum. Written scalar so that GCC vectorises it inside the clones' omp simd loops, where std::exp would stay one libm
// call per key. NaN stays NaN.
RK_INLINE float exp_nonpositive(float x) {
  x = x < -87.3365f ? -87.3365f : x;
  constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits
  const float t = x * 1.44269504088896341f + MAGIC;
  const float n = t - MAGIC;
  float r = x - n * 0.693359375f;  // ln2 in two parts (Cody-Waite): n * 0.693359375 is exact
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t e = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(MAGIC);  // n, in [-126, 0]
  return y * std::bit_cast<float>((e + 127) << 23);
}

// G dots of consecutive rows q[g * D ..] with one vector (the gate: G query heads against one chunk mean).
template <typename acc_t>
RK_DECODE_LOOP void dot_rows(const acc_t* q, int64_t rows, const acc_t* x, int64_t D, acc_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* a = q + r * D;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; ++d) sum += a[d] * x[d];
    out[r] = sum;
  }
}

// mean[d] = sum[d * stride] / count: the reference's chunk mean (sum, then one division) in the accumulation type.
template <typename acc_t>
RK_DECODE_LOOP void chunk_mean_row(const acc_t* sum, int64_t stride, int64_t D, acc_t count, acc_t* mean) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) mean[d] = sum[d * stride] / count;
}

// Software prefetch into L2 of rows [r0, r1) (each `dim` values, `stride` apart). One head's K/V rows are Hkv * D
// values apart (4 KB at Hkv = 8, D = 128 fp32): the L2 streamer stops at 4 KB pages and the IP-stride prefetcher at
// 2 KB strides, so without this every 512-byte row starts with a miss. Measured on one core (Xeon, THP, 512 B rows
// 4 KB apart): no prefetch 2.1 GB/s; prefetcht0 16 rows ahead 4.3; prefetcht1 64 rows ahead 11.8, 128 ahead 11.2
// (contiguous reads 25 GB/s). prefetcht0 holds an L1 fill buffer (16) per line, prefetcht1 only the L2's queue.
template <typename acc_t>
RK_INLINE void prefetch_rows_l2(const acc_t* p, int64_t stride, int64_t dim, int64_t r0, int64_t r1) {
  constexpr int64_t LINE = 64 / static_cast<int64_t>(sizeof(acc_t));
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t d = 0; d < dim; d += LINE) __builtin_prefetch(p + r * stride + d, 0, 2);
}

// One query row against n (>= 1) keys of a block: s = scale * q K^T, then the online-softmax step on (m, l, o):
// m' = max(m, max s), p = exp(s - m'), l' = l e^(m - m') + sum p, o' = o e^(m - m') + p V. ml = {m, l}.
// The dots take 4 keys at a time (4 independent accumulator chains, q loaded once for 4 keys); the axpy adds 4
// value rows per pass over o (one load and store of o per 4 keys).
template <typename acc_t>
RK_DECODE_LOOP void attend_block(const acc_t* q, const acc_t* k, int64_t k_stride, const acc_t* v, int64_t v_stride,
                                 int64_t n, int64_t D, int64_t Dv, acc_t scale, acc_t* s, acc_t* ml, acc_t* o,
                                 int64_t prefetch_rows) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const acc_t *k0 = k + t * k_stride, *k1 = k0 + k_stride, *k2 = k1 + k_stride, *k3 = k2 + k_stride;
    prefetch_rows_l2(k, k_stride, D, t + PREFETCH_ROWS, std::min(t + PREFETCH_ROWS + 4, prefetch_rows));
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      s0 += q[d] * k0[d];
      s1 += q[d] * k1[d];
      s2 += q[d] * k2[d];
      s3 += q[d] * k3[d];
    }
    s[t] = s0;
    s[t + 1] = s1;
    s[t + 2] = s2;
    s[t + 3] = s3;
  }
  for (; t < n; ++t) {
    const acc_t* kt = k + t * k_stride;
    acc_t s0 = 0;
#pragma omp simd reduction(+ : s0)
    for (int64_t d = 0; d < D; ++d) s0 += q[d] * kt[d];
    s[t] = s0;
  }
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {
    s[i] *= scale;  // scale * <q, k>, as the reference rounds it
    mx = s[i] > mx ? s[i] : mx;
  }
  const acc_t m_old = ml[0], m_new = std::max(m_old, mx);
  acc_t sum = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const float e = exp_nonpositive(s[i] - m_new);
      s[i] = e;
      sum += e;
    }
  } else {  // fp64: the tolerance is 1e-12, so libm's exp
    for (int64_t i = 0; i < n; ++i) {
      s[i] = std::exp(s[i] - m_new);
      sum += s[i];
    }
  }
  const acc_t alpha = std::exp(m_old - m_new);  // 0 on the first block (m_old = -inf, o = 0)
  ml[0] = m_new;
  ml[1] = ml[1] * alpha + sum;
  if (alpha != acc_t(1)) {
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
  }
  t = 0;
  for (; t + 4 <= n; t += 4) {
    const acc_t *v0 = v + t * v_stride, *v1 = v0 + v_stride, *v2 = v1 + v_stride, *v3 = v2 + v_stride;
    const acc_t p0 = s[t], p1 = s[t + 1], p2 = s[t + 2], p3 = s[t + 3];
    prefetch_rows_l2(v, v_stride, Dv, t + PREFETCH_ROWS, std::min(t + PREFETCH_ROWS + 4, prefetch_rows));
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) o[d] += ((p0 * v0[d] + p1 * v1[d]) + p2 * v2[d]) + p3 * v3[d];
  }
  for (; t < n; ++t) {
    const acc_t* vt = v + t * v_stride;
    const acc_t p0 = s[t];
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) o[d] += p0 * vt[d];
  }
}

// ------------------------------------------------------------------------------------------------- selection

// x ranks strictly before y in torch.sort(descending=True, stable=True): NaN first, then larger values; equal values
// keep index order, so a later candidate must be strictly better (as route_chunks.cpp).
template <typename acc_t>
RK_INLINE bool ranks_before(acc_t x, acc_t y) {
  if (std::isnan(y)) return false;
  return std::isnan(x) || x > y;
}

// The `want` best candidates fed so far (in ascending chunk order), best first: an insertion list.
template <typename acc_t>
struct TopList {
  acc_t* val;
  int64_t* idx;
  int64_t want, kept = 0;
  void feed(int64_t j, acc_t x) {
    if (kept == want) {
      if (!ranks_before(x, val[want - 1])) return;
      --kept;
    }
    int64_t p = kept++;
    for (; p > 0 && ranks_before(x, val[p - 1]); --p) {
      val[p] = val[p - 1];
      idx[p] = idx[p - 1];
    }
    val[p] = x;
    idx[p] = j;
  }
};

// Strided view of a 4-D cache tensor (B, cap, H, dim): element pointers of any dtype, in bytes.
struct CacheView {
  const char* base;
  int64_t s0, s1, s2, s3;  // strides in bytes
  int64_t dim;
  at::ScalarType dtype;
  bool direct;  // stored in the accumulation type with unit stride over dim: read in place
  CacheView(const at::Tensor& t, at::ScalarType acc)
      : base(static_cast<const char*>(t.const_data_ptr())), dim(t.size(3)), dtype(t.scalar_type()) {
    const int64_t es = static_cast<int64_t>(t.element_size());
    s0 = t.stride(0) * es;
    s1 = t.stride(1) * es;
    s2 = t.stride(2) * es;
    s3 = t.stride(3) * es;
    direct = dtype == acc && (t.stride(3) == 1 || dim == 1);
  }
  const char* row(int64_t b, int64_t pos, int64_t h) const { return base + b * s0 + pos * s1 + h * s2; }
};

// Keys [pos, pos + n) of (b, h) as acc_t rows: in place, or converted into `buf` (n x dim). Returns the row stride.
template <typename acc_t>
const acc_t* block_rows(const CacheView& c, int64_t b, int64_t pos, int64_t h, int64_t n, acc_t* buf,
                        int64_t* stride) {
  const char* p = c.row(b, pos, h);
  if (c.direct) {
    *stride = c.s1 / static_cast<int64_t>(sizeof(acc_t));
    return reinterpret_cast<const acc_t*>(p);
  }
  const int64_t es = static_cast<int64_t>(c10::elementSize(c.dtype));
  const at::Tensor src = at::from_blob(const_cast<char*>(p), {n, c.dim}, {c.s1 / es, c.s3 / es},
                                       at::TensorOptions().dtype(c.dtype));
  at::from_blob(buf, {n, c.dim}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value)).copy_(src);
  *stride = c.dim;
  return buf;
}

template <typename Fn>
void run_tasks(int64_t num_tasks, Fn fn) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1, [&](int64_t, int64_t) {
    c10::InferenceMode guard;  // worker threads do not inherit the caller's autograd state; nothing here needs it
    fn(next);
  });
}

struct Entry {
  int64_t chunk, row, slot;  // row = (b * Lq + i) * Hq + h
};

struct Task {
  int64_t b, hk, k0, k1, split, e0, e1;  // keys [k0, k1) for entries [e0, e1)
};

template <typename acc_t>
void decode_kernel(const DecodeShape& sh, const at::Tensor& q_acc, const CacheView& kc, const CacheView& vc,
                   const at::Tensor& key_sums, const int32_t* used, int64_t C, int64_t top_k, bool causal,
                   acc_t scale, acc_t* o, acc_t* lse) {
  const int64_t B = sh.batch, Lq = sh.q_len, Hq = sh.q_heads, Hkv = sh.kv_heads, G = sh.group;
  const int64_t D = sh.head_dim, Dv = sh.v_dim, rows_total = B * Lq * Hq;
  const int64_t slots = std::max<int64_t>(1, std::min(top_k, sh.num_chunks));
  const acc_t* q = q_acc.const_data_ptr<acc_t>();  // (B, Lq, Hq, D) contiguous
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  // ---- 1. gate and selection: sel[row * slots + i], ascending, count[row] entries.
  std::vector<int32_t> sel(rows_total * slots);
  std::vector<int64_t> count(rows_total);
  const acc_t* ks = key_sums.const_data_ptr<acc_t>();
  const int64_t ks0 = key_sums.stride(0), ks1 = key_sums.stride(1), ks2 = key_sums.stride(2), ks3 = key_sums.stride(3);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    const int64_t want = std::min(top_k - 1, sh.num_chunks);
    std::vector<acc_t> mean(D), gate(G), best_v(std::max<int64_t>(1, Lq * G * want));
    std::vector<int64_t> best_i(best_v.size()), picked(top_k);
    std::vector<TopList<acc_t>> top(Lq * G);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, hk = item % Hkv, len = used[b], n = ceil_div(len, C);
      for (int64_t r = 0; r < Lq * G; ++r) top[r] = TopList<acc_t>{best_v.data() + r * want, best_i.data() + r * want, want};
      if (want > 0) {
        for (int64_t j = 0; j < n; ++j) {
          // Causal: chunk j is a candidate of query i iff j < own_i; the last query's own chunk is the largest.
          if (causal && j >= (len - 1) / C) break;
          chunk_mean_row(ks + b * ks0 + j * ks1 + hk * ks2, ks3, D, static_cast<acc_t>(std::min(C, len - j * C)),
                         mean.data());
          for (int64_t i = 0; i < Lq; ++i) {
            const int64_t own = (len - Lq + i) / C;
            if (causal && j >= own) continue;
            // Non-causal: the own chunk takes part with gate -inf, as in the reference (masked, then dropped).
            if (j == own) {
              for (int64_t g = 0; g < G; ++g) top[i * G + g].feed(j, neg_inf);
              continue;
            }
            dot_rows(q + ((b * Lq + i) * Hq + hk * G) * D, G, mean.data(), D, gate.data());
            for (int64_t g = 0; g < G; ++g) top[i * G + g].feed(j, gate[g]);
          }
        }
      }
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t own = (len - Lq + i) / C;
        for (int64_t g = 0; g < G; ++g) {
          const TopList<acc_t>& tl = top[i * G + g];
          int64_t m = 0;
          picked[m++] = own;
          for (int64_t r = 0; r < tl.kept; ++r)
            if (tl.idx[r] != own) picked[m++] = tl.idx[r];
          std::sort(picked.begin(), picked.begin() + m);
          const int64_t row = (b * Lq + i) * Hq + hk * G + g;
          for (int64_t r = 0; r < m; ++r) sel[row * slots + r] = static_cast<int32_t>(picked[r]);
          count[row] = m;
        }
      }
    }
  });

  // ---- 2a. tasks: per (b, kv head) the union of the group's chunks, each with the (query, head, slot) entries that
  // selected it. Serial: at most rows_total * top_k entries (4K at B=4, Hq=32, top_k=8).
  std::vector<Entry> entries;
  entries.reserve(rows_total * slots);
  std::vector<int64_t> group_off{0};  // entries of each (b, hk, chunk) group
  std::vector<std::pair<int64_t, int64_t>> group_key;  // (b * Hkv + hk, chunk)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const size_t first = entries.size();
      for (int64_t i = 0; i < Lq; ++i)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t row = (b * Lq + i) * Hq + hk * G + g;
          for (int64_t r = 0; r < count[row]; ++r) entries.push_back({sel[row * slots + r], row, r});
        }
      std::sort(entries.begin() + first, entries.end(), [](const Entry& x, const Entry& y) {
        return x.chunk != y.chunk ? x.chunk < y.chunk : x.row < y.row;
      });
      for (size_t e = first; e < entries.size(); ++e) {
        if (e == first || entries[e].chunk != entries[e - 1].chunk) {
          if (e != first) group_off.push_back(static_cast<int64_t>(e));
          group_key.push_back({b * Hkv + hk, entries[e].chunk});
        }
      }
      if (entries.size() > first) group_off.push_back(static_cast<int64_t>(entries.size()));
    }
  }
  const int64_t groups = static_cast<int64_t>(group_key.size());
  const int64_t nsplit = groups >= MIN_TASKS ? 1 : std::min(ceil_div(MIN_TASKS, std::max<int64_t>(groups, 1)),
                                                             ceil_div(C, KEY_BLOCK));
  const int64_t split_len = ceil_div(ceil_div(C, nsplit), KEY_BLOCK) * KEY_BLOCK;
  std::vector<Task> tasks;
  tasks.reserve(groups * nsplit);
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t b = group_key[gi].first / Hkv, hk = group_key[gi].first % Hkv, j = group_key[gi].second;
    const int64_t cb = j * C, ce = std::min(cb + C, static_cast<int64_t>(used[b]));
    for (int64_t sp = 0; sp < nsplit; ++sp) {
      const int64_t k0 = std::min(cb + sp * split_len, ce), k1 = std::min(k0 + split_len, ce);
      tasks.push_back({b, hk, k0, k1, sp, group_off[gi], group_off[gi + 1]});
    }
  }

  // ---- 2b. attention per task into the partials: part_o[(row * slots + slot) * nsplit + split], part_ml likewise.
  const int64_t parts = rows_total * slots * nsplit;
  std::vector<acc_t> part_o(parts * Dv), part_ml(parts * 2);
  run_tasks(static_cast<int64_t>(tasks.size()), [&](std::atomic<int64_t>& next) {
    std::vector<acc_t> s(KEY_BLOCK), kbuf(kc.direct ? 0 : KEY_BLOCK * D), vbuf(vc.direct ? 0 : KEY_BLOCK * Dv);
    for (int64_t it; (it = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
      const Task& tk = tasks[it];
      const int64_t len = used[tk.b];
      // Keys each entry may see end at its position + 1 (causal) or at the row's end; only the own chunk of a
      // query, when Lq > 1, ends early.
      for (int64_t e = tk.e0; e < tk.e1; ++e) {
        const int64_t pi = (entries[e].row * slots + entries[e].slot) * nsplit + tk.split;
        std::fill_n(part_o.data() + pi * Dv, Dv, acc_t(0));
        part_ml[pi * 2] = neg_inf;
        part_ml[pi * 2 + 1] = 0;
      }
      // The first PREFETCH_ROWS rows at once (later ones are prefetched PREFETCH_ROWS ahead of their use).
      if (kc.direct && vc.direct && tk.k1 > tk.k0) {
        const int64_t r1 = std::min(PREFETCH_ROWS, tk.k1 - tk.k0);
        int64_t ks_ = 0, vs_ = 0;
        const acc_t* k0p = block_rows<acc_t>(kc, tk.b, tk.k0, tk.hk, 0, nullptr, &ks_);
        const acc_t* v0p = block_rows<acc_t>(vc, tk.b, tk.k0, tk.hk, 0, nullptr, &vs_);
        prefetch_rows_l2(k0p, ks_, D, 0, r1);
        prefetch_rows_l2(v0p, vs_, Dv, 0, r1);
      }
      for (int64_t kb = tk.k0; kb < tk.k1; kb += KEY_BLOCK) {
        const int64_t nb = std::min(KEY_BLOCK, tk.k1 - kb);
        int64_t n_max = 0;
        for (int64_t e = tk.e0; e < tk.e1; ++e) {
          const int64_t pos = len - Lq + (entries[e].row / Hq) % Lq;
          n_max = std::max(n_max, causal ? std::clamp<int64_t>(pos + 1 - kb, 0, nb) : nb);
        }
        if (n_max == 0) break;  // later blocks are past every entry's position too
        int64_t k_stride = 0, v_stride = 0;
        const acc_t* kblk = block_rows<acc_t>(kc, tk.b, kb, tk.hk, n_max, kbuf.data(), &k_stride);
        const acc_t* vblk = block_rows<acc_t>(vc, tk.b, kb, tk.hk, n_max, vbuf.data(), &v_stride);
        for (int64_t e = tk.e0; e < tk.e1; ++e) {
          const int64_t row = entries[e].row, pos = len - Lq + (row / Hq) % Lq;
          const int64_t n = causal ? std::clamp<int64_t>(pos + 1 - kb, 0, nb) : nb;
          if (n == 0) continue;
          const int64_t pi = (row * slots + entries[e].slot) * nsplit + tk.split;
          // The first query prefetches: rows up to the task's end, in place only (a converted block is in L1).
          const int64_t pf = e == tk.e0 && kc.direct && vc.direct ? tk.k1 - kb : 0;
          attend_block(q + row * D, kblk, k_stride, vblk, v_stride, n, D, Dv, scale, s.data(), part_ml.data() + pi * 2,
                       part_o.data() + pi * Dv, pf);
        }
      }
    }
  });

  // ---- 3. merge by lse, slots (ascending chunks) then splits in order.
  at::parallel_for(0, rows_total, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t p0 = row * slots * nsplit, np = count[row] * nsplit;
      acc_t m = neg_inf;
      for (int64_t p = 0; p < np; ++p) m = std::max(m, part_ml[(p0 + p) * 2]);
      acc_t l = 0;
      acc_t* out = o + row * Dv;
      std::fill_n(out, Dv, acc_t(0));
      for (int64_t p = 0; p < np; ++p) {
        const acc_t mp = part_ml[(p0 + p) * 2];
        if (mp == neg_inf) continue;  // a key range past the query's position (causal split): nothing in it
        const acc_t w = std::exp(mp - m);
        l += w * part_ml[(p0 + p) * 2 + 1];
        const acc_t* src = part_o.data() + (p0 + p) * Dv;
        for (int64_t d = 0; d < Dv; ++d) out[d] += w * src[d];
      }
      const acc_t inv = acc_t(1) / l;
      for (int64_t d = 0; d < Dv; ++d) out[d] *= inv;
      lse[row] = m + std::log(l);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> routed_decode_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                         const at::Tensor& v_cache, const at::Tensor& key_sums,
                                                         const at::Tensor& seqused_k, int64_t chunk_size,
                                                         int64_t top_k, bool causal, double scale) {
  const DecodeShape sh =
      check_routed_decode_args(q, k_cache, v_cache, key_sums, seqused_k, chunk_size, top_k, c10::DeviceType::CPU);
  const at::Tensor used_c = seqused_k.contiguous();
  const int32_t* used = used_c.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < sh.batch; ++b) {
    TORCH_CHECK(used[b] >= sh.q_len && used[b] <= sh.capacity, "seqused_k[", b, "] = ", used[b], " must lie in [Lq, "
                "capacity] = [", sh.q_len, ", ", sh.capacity, "]: the ", sh.q_len, " queries are the last positions of "
                "the row's keys");
  }
  const auto acc = routed_acc_type(q.scalar_type());
  const at::Tensor q_acc = q.detach().to(acc).contiguous();  // (B, Lq, Hq, D): small, the gate and the tasks read it
  at::Tensor o = empty_cpu_output({sh.batch, sh.q_len, sh.q_heads, sh.v_dim}, q_acc.options());
  at::Tensor lse = empty_cpu_output({sh.batch, sh.q_len, sh.q_heads}, q_acc.options());
  if (o.numel() > 0 || lse.numel() > 0) {
    const CacheView kc(k_cache, acc), vc(v_cache, acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "routed_decode_fwd_cpu", [&] {
      decode_kernel<scalar_t>(sh, q_acc, kc, vc, key_sums, used, chunk_size, top_k, causal,
                              static_cast<scalar_t>(scale), o.mutable_data_ptr<scalar_t>(),
                              lse.mutable_data_ptr<scalar_t>());
    });
  }
  return {o.to(q.scalar_type()), lse};
}

}  // namespace
}  // namespace cpu
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CPU, m) {
  m.impl("routed_decode_fwd", TORCH_FN(routing_kernels::cpu::routed_decode_fwd_cpu));
}
