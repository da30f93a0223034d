// CPU kernel of routing_kernels::routed_decode_fwd: routed attention of a few queries (decode, speculative decode)
// over a KV cache. Contract in include/routing_kernels/routed_decode.h.
//
// A decode step must cost the selected chunks, not the cache: at 128K keys, Hkv = 8, D = 128 fp32 the cache is 1 GB
// per layer, the ~28 chunks a kv group's heads select (random q) are 115 MB, the chunk sums the gate reads are 1 MB.
// Work items are (row, kv head), all in one parallel region (DecodeRun):
//   1. gate: the means key_sums / count of the row's chunks, each dotted with the Lq x G queries of the group (a
//      running top list per query, no gate matrix), then the sorted selections;
//   2. attention, task = (item, chunk of the union of the group's selections [, key range]): flash-decoding. The
//      task reads the chunk's K/V rows once, in 64-key blocks that stay in L1 while every (query, head) of the
//      group that selected the chunk attends to them, and leaves per (query, head, slot) a partial (max, sum, o).
//      With fewer than MIN_TASKS tasks in sight (B = 1, one kv head, top_k 2) chunks are cut into key ranges so that
//      one sequence still fills every core; the cut depends on the shapes only, never on the thread count;
//   3. merge, per (query, head), by whoever finishes the item's last task: the partials by their lse, in ascending
//      slot (= chunk) then key-range order.
// Which thread runs a gate, task or merge never changes its arithmetic, so results do not depend on the thread count.
//
// The inner loops (dots over D, the exp, the axpy over Dv) are built for AVX-512, AVX2 and baseline x86-64 by GCC's
// target_clones and picked at load time, as in routed_attention_common.h; with -ffp-contract=off and the dots and sums
// written with explicit 64-byte vectors (Vec64), the clones compute bit-identical results. K/V in q's dtype are read
// in place when that is the accumulation type (fp32, fp64) with unit stride over D; fp16/bf16 (or strided D) blocks
// are converted into a 64-key scratch first.
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
#include <memory>
#include <thread>
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
constexpr int64_t GATE_PREFETCH = 8;   // chunk sums prefetched ahead of the gate's means
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

// 64-byte GCC vectors (16 fp32 / 8 fp64 lanes): each clone lowers them to one zmm, two ymm or four xmm registers,
// and the operations and their order are the source's, so every clone computes bit-identical dots and sums (with
// -ffp-contract=off; omp simd reductions instead pick a lane order per vector width, and GCC spills 4 such
// accumulators to the stack and sums them lane by lane: 30% slower dots, measured). They only live inside
// always-inlined helpers of the clones, so the ABI note GCC gives for passing them (-Wpsabi) never applies.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T>
struct Vec64;
template <>
struct Vec64<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef float half __attribute__((vector_size(32)));
  typedef float quarter __attribute__((vector_size(16)));
  static constexpr int64_t LANES = 16;
};
template <>
struct Vec64<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef double half __attribute__((vector_size(32)));
  static constexpr int64_t LANES = 8;
};

template <typename T>
RK_INLINE typename Vec64<T>::type vload(const T* p) {
  typename Vec64<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The four lane sums of a0..a3 into out[0..4), one fixed tree that is the same for each of the four (so a key's dot
// does not depend on its place in the group of four).
RK_INLINE void hsum4(Vec64<float>::type a0, Vec64<float>::type a1, Vec64<float>::type a2, Vec64<float>::type a3,
                     float* out) {
  using V = Vec64<float>::type;
  const V x01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const V x23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const V y = __builtin_shufflevector(x01, x23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
              __builtin_shufflevector(x01, x23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const Vec64<float>::half z = __builtin_shufflevector(y, y, 0, 1, 4, 5, 8, 9, 12, 13) +
                               __builtin_shufflevector(y, y, 2, 3, 6, 7, 10, 11, 14, 15);
  const Vec64<float>::quarter w = __builtin_shufflevector(z, z, 0, 2, 4, 6) + __builtin_shufflevector(z, z, 1, 3, 5, 7);
  std::memcpy(out, &w, sizeof(w));
}

RK_INLINE void hsum4(Vec64<double>::type a0, Vec64<double>::type a1, Vec64<double>::type a2, Vec64<double>::type a3,
                     double* out) {
  using V = Vec64<double>::type;
  const V x01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  const V x23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  const V y = __builtin_shufflevector(x01, x23, 0, 1, 4, 5, 8, 9, 12, 13) +
              __builtin_shufflevector(x01, x23, 2, 3, 6, 7, 10, 11, 14, 15);
  const Vec64<double>::half w = __builtin_shufflevector(y, y, 0, 2, 4, 6) + __builtin_shufflevector(y, y, 1, 3, 5, 7);
  std::memcpy(out, &w, sizeof(w));
}

// out[j] = <x, y_j> for four rows y_0..y_3 (which may repeat): x loaded once per four rows, two accumulators per row
// (8 independent add chains), then hsum4 and the D % LANES tail in order.
template <typename acc_t>
RK_INLINE void dot4(const acc_t* x, const acc_t* y0, const acc_t* y1, const acc_t* y2, const acc_t* y3, int64_t D,
                    acc_t* out) {
  using V = typename Vec64<acc_t>::type;
  constexpr int64_t L = Vec64<acc_t>::LANES;
  V a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
  int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    const V xa = vload(x + d), xb = vload(x + d + L);
    a0 += xa * vload(y0 + d);
    a1 += xa * vload(y1 + d);
    a2 += xa * vload(y2 + d);
    a3 += xa * vload(y3 + d);
    b0 += xb * vload(y0 + d + L);
    b1 += xb * vload(y1 + d + L);
    b2 += xb * vload(y2 + d + L);
    b3 += xb * vload(y3 + d + L);
  }
  if (d + L <= D) {
    const V xa = vload(x + d);
    a0 += xa * vload(y0 + d);
    a1 += xa * vload(y1 + d);
    a2 += xa * vload(y2 + d);
    a3 += xa * vload(y3 + d);
    d += L;
  }
  hsum4(a0 + b0, a1 + b1, a2 + b2, a3 + b3, out);
  for (; d < D; ++d) {
    out[0] += x[d] * y0[d];
    out[1] += x[d] * y1[d];
    out[2] += x[d] * y2[d];
    out[3] += x[d] * y3[d];
  }
}

// sum of p[0..n): LANES partial sums, then a fixed tree (hsum4 of the partials and three zero vectors).
template <typename acc_t>
RK_INLINE acc_t vsum(const acc_t* p, int64_t n) {
  using V = typename Vec64<acc_t>::type;
  constexpr int64_t L = Vec64<acc_t>::LANES;
  V a{};
  int64_t i = 0;
  for (; i + L <= n; i += L) a += vload(p + i);
  acc_t out[4];
  hsum4(a, V{}, V{}, V{}, out);
  for (; i < n; ++i) out[0] += p[i];
  return out[0];
}

// rows dots of consecutive rows q[r * D ..] with one vector (the gate: G query heads against one chunk mean).
template <typename acc_t>
RK_DECODE_LOOP void dot_rows(const acc_t* q, int64_t rows, const acc_t* x, int64_t D, acc_t* out) {
  for (int64_t r = 0; r < rows; r += 4) {
    acc_t tmp[4];
    const acc_t* y0 = q + r * D;
    dot4(x, y0, y0 + std::min<int64_t>(1, rows - 1 - r) * D, y0 + std::min<int64_t>(2, rows - 1 - r) * D,
         y0 + std::min<int64_t>(3, rows - 1 - r) * D, D, tmp);
    for (int64_t j = 0; j < std::min<int64_t>(4, rows - r); ++j) out[r + j] = tmp[j];
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
// The dots take 4 keys at a time (dot4); the axpy adds 4 value rows per pass over o (one load and store of o per 4
// keys).
template <typename acc_t>
RK_DECODE_LOOP void attend_block(const acc_t* q, const acc_t* k, int64_t k_stride, const acc_t* v, int64_t v_stride,
                                 int64_t n, int64_t D, int64_t Dv, acc_t scale, acc_t* s, acc_t* ml, acc_t* o,
                                 int64_t prefetch_rows) {
  for (int64_t t = 0; t < n; t += 4) {
    // A last group of fewer than four keys repeats its last key (same arithmetic, one result kept per key).
    const acc_t* k0 = k + t * k_stride;
    const acc_t* k1 = k + std::min(t + 1, n - 1) * k_stride;
    const acc_t* k2 = k + std::min(t + 2, n - 1) * k_stride;
    const acc_t* k3 = k + std::min(t + 3, n - 1) * k_stride;
    prefetch_rows_l2(k, k_stride, D, t + PREFETCH_ROWS, std::min(t + PREFETCH_ROWS + 4, prefetch_rows));
    acc_t dots[4];
    dot4(q, k0, k1, k2, k3, D, dots);
    for (int64_t j = 0; j < std::min<int64_t>(4, n - t); ++j) s[t + j] = dots[j];
  }
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {
    s[i] *= scale;  // scale * <q, k>, as the reference rounds it
    mx = s[i] > mx ? s[i] : mx;
  }
  const acc_t m_old = ml[0], m_new = std::max(m_old, mx);
  if constexpr (std::is_same_v<acc_t, float>) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) s[i] = exp_nonpositive(s[i] - m_new);
  } else {  // fp64: the tolerance is 1e-12, so libm's exp
    for (int64_t i = 0; i < n; ++i) s[i] = std::exp(s[i] - m_new);
  }
  const acc_t sum = vsum(s, n);
  const acc_t alpha = std::exp(m_old - m_new);  // 0 on the first block (m_old = -inf, o = 0)
  ml[0] = m_new;
  ml[1] = ml[1] * alpha + sum;
  if (alpha != acc_t(1)) {
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
  }
  int64_t t = 0;
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
#pragma GCC diagnostic pop

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

struct Entry {
  int64_t chunk, row, slot;  // row = (b * Lq + i) * Hq + h
};

struct Task {
  int64_t k0, k1, split, e0, e1;  // keys [k0, k1) of one chunk for entries [e0, e1) of the item
};

// One (row b, kv head hk): its queries' selection as entries grouped by chunk, and the tasks over them.
struct Item {
  std::vector<Entry> entries;
  std::vector<Task> tasks;
};

// All of a call's work in ONE parallel region, so that a step pays one fork/join (on this shared 2-core machine a
// join waits for a descheduled thread, and three regions per step measured slower than one): the threads first
// take items to gate (atomic counter), then walk the items in order, taking each one's tasks (atomic counter per
// item) as soon as its gate is published; the thread that finishes an item's last task merges its rows. No thread
// ever waits for anything but an item whose gate another thread is computing, so any split of the region into
// invocations (one thread doing everything included) terminates. The arithmetic of each gate, task and merge does
// not depend on which thread runs it.
template <typename acc_t>
class DecodeRun {
 public:
  DecodeRun(const DecodeShape& sh, const at::Tensor& q_acc, const CacheView& kc, const CacheView& vc,
            const at::Tensor& key_sums, const int32_t* used, int64_t C, int64_t top_k, bool causal, acc_t scale,
            acc_t* o, acc_t* lse)
      : sh_(sh), kc_(kc), vc_(vc), used_(used), C_(C), top_k_(top_k), causal_(causal), scale_(scale), o_(o), lse_(lse),
        q_(q_acc.const_data_ptr<acc_t>()), ks_(key_sums.const_data_ptr<acc_t>()),
        ks_stride_{key_sums.stride(0), key_sums.stride(1), key_sums.stride(2), key_sums.stride(3)} {
    const int64_t rows = sh.batch * sh.q_len * sh.q_heads;
    slots_ = std::max<int64_t>(1, std::min(top_k, sh.num_chunks));
    want_ = std::min(top_k - 1, sh.num_chunks);
    // Key ranges per chunk from the shapes only (never the thread count): B * Hkv * min(top_k, M) is how many
    // (item, chunk) tasks there are at least when every row has top_k chunks.
    const int64_t tasks_est = sh.batch * sh.kv_heads * slots_;
    nsplit_ = tasks_est >= MIN_TASKS ? 1 : std::min(ceil_div(MIN_TASKS, tasks_est), ceil_div(C, KEY_BLOCK));
    split_len_ = ceil_div(ceil_div(C, nsplit_), KEY_BLOCK) * KEY_BLOCK;
    n_items_ = sh.batch * sh.kv_heads;
    items_.resize(n_items_);
    count_.resize(rows);
    part_o_.resize(rows * slots_ * nsplit_ * sh.v_dim);
    part_ml_.resize(rows * slots_ * nsplit_ * 2);
    ready_ = std::make_unique<std::atomic<int>[]>(n_items_);
    next_task_ = std::make_unique<std::atomic<int64_t>[]>(n_items_);
    remaining_ = std::make_unique<std::atomic<int64_t>[]>(n_items_);
    for (int64_t i = 0; i < n_items_; ++i) {
      ready_[i].store(0, std::memory_order_relaxed);
      next_task_[i].store(0, std::memory_order_relaxed);
    }
  }

  void run() {
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      c10::InferenceMode guard;  // worker threads do not inherit the caller's autograd state; nothing here needs it
      work();
    });
  }

 private:
  void work() {
    const DecodeShape& sh = sh_;
    std::vector<acc_t> mean(sh.head_dim), gate(sh.group), best_v(std::max<int64_t>(1, sh.q_len * sh.group * want_));
    std::vector<int64_t> best_i(best_v.size()), picked(top_k_);
    std::vector<TopList<acc_t>> top(sh.q_len * sh.group);
    for (int64_t it; (it = gate_next_.fetch_add(1)) < n_items_;) {
      plan(it, mean.data(), gate.data(), best_v.data(), best_i.data(), picked.data(), top.data());
      ready_[it].store(1, std::memory_order_release);
    }
    std::vector<acc_t> s(KEY_BLOCK), kbuf(kc_.direct ? 0 : KEY_BLOCK * sh.head_dim),
        vbuf(vc_.direct ? 0 : KEY_BLOCK * sh.v_dim);
    for (int64_t it = 0; it < n_items_; ++it) {
      while (!ready_[it].load(std::memory_order_acquire)) std::this_thread::yield();
      const Item& item = items_[it];
      const int64_t n_tasks = static_cast<int64_t>(item.tasks.size());
      for (int64_t t; (t = next_task_[it].fetch_add(1)) < n_tasks;) {
        attend(it, item, item.tasks[t], s.data(), kbuf.data(), vbuf.data());
        if (remaining_[it].fetch_sub(1, std::memory_order_acq_rel) == 1) merge(it);
      }
    }
  }

  // Gate of item (b, hk): the means key_sums / count of the row's chunks, each dotted with the Lq x G queries of the
  // group (a running top list per query), then the sorted selections, their entries by chunk and the tasks.
  void plan(int64_t it, acc_t* mean, acc_t* gate, acc_t* best_v, int64_t* best_i, int64_t* picked,
            TopList<acc_t>* top) {
    const int64_t Lq = sh_.q_len, Hq = sh_.q_heads, G = sh_.group, D = sh_.head_dim, C = C_;
    const int64_t b = it / sh_.kv_heads, hk = it % sh_.kv_heads, len = used_[b], n = ceil_div(len, C);
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t r = 0; r < Lq * G; ++r) top[r] = TopList<acc_t>{best_v + r * want_, best_i + r * want_, want_};
    for (int64_t j = 0; j < n && want_ > 0; ++j) {
      // Causal: chunk j is a candidate of query i iff j < own_i; the last query's own chunk is the largest.
      if (causal_ && j >= (len - 1) / C) break;
      if (j + GATE_PREFETCH < n)  // the sums of one head are strided like K (Hkv * D apart): prefetch ahead
        prefetch_rows_l2(ks_ + b * ks_stride_[0] + (j + GATE_PREFETCH) * ks_stride_[1] + hk * ks_stride_[2], 0,
                         ks_stride_[3] == 1 ? D : 1, 0, 1);
      chunk_mean_row(ks_ + b * ks_stride_[0] + j * ks_stride_[1] + hk * ks_stride_[2], ks_stride_[3], D,
                     static_cast<acc_t>(std::min(C, len - j * C)), mean);
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t own = (len - Lq + i) / C;
        if (causal_ && j >= own) continue;
        if (j == own) {  // non-causal: the own chunk takes part with gate -inf, as in the reference (then dropped)
          for (int64_t g = 0; g < G; ++g) top[i * G + g].feed(j, neg_inf);
          continue;
        }
        dot_rows(q_ + ((b * Lq + i) * Hq + hk * G) * D, G, mean, D, gate);
        for (int64_t g = 0; g < G; ++g) top[i * G + g].feed(j, gate[g]);
      }
    }
    Item& item = items_[it];
    item.entries.clear();
    for (int64_t i = 0; i < Lq; ++i) {
      const int64_t own = (len - Lq + i) / C;
      for (int64_t g = 0; g < G; ++g) {
        const TopList<acc_t>& tl = top[i * G + g];
        int64_t m = 0;
        picked[m++] = own;
        for (int64_t r = 0; r < tl.kept; ++r)
          if (tl.idx[r] != own) picked[m++] = tl.idx[r];
        std::sort(picked, picked + m);
        const int64_t row = (b * Lq + i) * Hq + hk * G + g;
        for (int64_t r = 0; r < m; ++r) {
          item.entries.push_back({picked[r], row, r});
        }
        count_[row] = m;
      }
    }
    std::sort(item.entries.begin(), item.entries.end(), [](const Entry& x, const Entry& y) {
      return x.chunk != y.chunk ? x.chunk < y.chunk : x.row < y.row;
    });
    item.tasks.clear();
    const int64_t n_entries = static_cast<int64_t>(item.entries.size());
    for (int64_t e0 = 0, e1; e0 < n_entries; e0 = e1) {
      const int64_t j = item.entries[e0].chunk;
      for (e1 = e0 + 1; e1 < n_entries && item.entries[e1].chunk == j; ++e1) {
      }
      const int64_t cb = j * C, ce = std::min(cb + C, len);
      for (int64_t sp = 0; sp < nsplit_; ++sp) {  // empty key ranges too: their partials say "nothing here"
        const int64_t k0 = std::min(cb + sp * split_len_, ce);
        item.tasks.push_back({k0, std::min(k0 + split_len_, ce), sp, e0, e1});
      }
    }
    remaining_[it].store(static_cast<int64_t>(item.tasks.size()), std::memory_order_relaxed);
  }

  // One task: keys [k0, k1) of a chunk for the item's entries that selected it, into their partials
  // part_o[(row * slots + slot) * nsplit + split] (Dv values) and part_ml[...] (max, sum).
  void attend(int64_t it, const Item& item, const Task& tk, acc_t* s, acc_t* kbuf, acc_t* vbuf) {
    const int64_t Lq = sh_.q_len, Hq = sh_.q_heads, D = sh_.head_dim, Dv = sh_.v_dim;
    const int64_t b = it / sh_.kv_heads, hk = it % sh_.kv_heads, len = used_[b];
    // The keys a query may see end at its position + 1 (causal) or at the row's end; only the own chunk of an
    // early query of a speculative step (Lq > 1) ends inside the range.
    auto seen = [&](int64_t row, int64_t kb, int64_t nb) {
      return causal_ ? std::clamp<int64_t>(len - Lq + (row / Hq) % Lq + 1 - kb, 0, nb) : nb;
    };
    for (int64_t e = tk.e0; e < tk.e1; ++e) {
      const int64_t pi = part_index(item.entries[e], tk.split);
      std::fill_n(part_o_.data() + pi * Dv, Dv, acc_t(0));
      part_ml_[pi * 2] = -std::numeric_limits<acc_t>::infinity();
      part_ml_[pi * 2 + 1] = 0;
    }
    const bool prefetch = kc_.direct && vc_.direct;
    if (prefetch && tk.k1 > tk.k0) {  // the first PREFETCH_ROWS rows now, later ones PREFETCH_ROWS ahead of use
      int64_t k_stride = 0, v_stride = 0;
      const int64_t r1 = std::min(PREFETCH_ROWS, tk.k1 - tk.k0);
      prefetch_rows_l2(block_rows<acc_t>(kc_, b, tk.k0, hk, 0, nullptr, &k_stride), k_stride, D, 0, r1);
      prefetch_rows_l2(block_rows<acc_t>(vc_, b, tk.k0, hk, 0, nullptr, &v_stride), v_stride, Dv, 0, r1);
    }
    for (int64_t kb = tk.k0; kb < tk.k1; kb += KEY_BLOCK) {
      const int64_t nb = std::min(KEY_BLOCK, tk.k1 - kb);
      int64_t n_max = 0;
      for (int64_t e = tk.e0; e < tk.e1; ++e) n_max = std::max(n_max, seen(item.entries[e].row, kb, nb));
      if (n_max == 0) break;  // later blocks are past every entry's position too
      int64_t k_stride = 0, v_stride = 0;
      const acc_t* kblk = block_rows<acc_t>(kc_, b, kb, hk, n_max, kbuf, &k_stride);
      const acc_t* vblk = block_rows<acc_t>(vc_, b, kb, hk, n_max, vbuf, &v_stride);
      bool first = true;  // the first entry that reads the block prefetches (rows up to the task's end)
      for (int64_t e = tk.e0; e < tk.e1; ++e) {
        const Entry& en = item.entries[e];
        const int64_t n = seen(en.row, kb, nb);
        if (n == 0) continue;
        const int64_t pi = part_index(en, tk.split);
        attend_block(q_ + en.row * D, kblk, k_stride, vblk, v_stride, n, D, Dv, scale_, s, part_ml_.data() + pi * 2,
                     part_o_.data() + pi * Dv, prefetch && first ? tk.k1 - kb : 0);
        first = false;
      }
    }
  }

  int64_t part_index(const Entry& en, int64_t split) const { return (en.row * slots_ + en.slot) * nsplit_ + split; }

  // The rows of item (b, hk): partials merged by their lse in slot (ascending chunk) then key-range order.
  void merge(int64_t it) {
    const int64_t Lq = sh_.q_len, Hq = sh_.q_heads, G = sh_.group, Dv = sh_.v_dim;
    const int64_t b = it / sh_.kv_heads, hk = it % sh_.kv_heads;
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < Lq; ++i)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = (b * Lq + i) * Hq + hk * G + g;
        const int64_t p0 = row * slots_ * nsplit_, np = count_[row] * nsplit_;
        acc_t m = neg_inf;
        for (int64_t p = 0; p < np; ++p) m = std::max(m, part_ml_[(p0 + p) * 2]);
        acc_t l = 0;
        acc_t* out = o_ + row * Dv;
        std::fill_n(out, Dv, acc_t(0));
        for (int64_t p = 0; p < np; ++p) {
          const acc_t mp = part_ml_[(p0 + p) * 2];
          if (mp == neg_inf) continue;  // a key range past the query's position (causal split): nothing in it
          const acc_t w = std::exp(mp - m);
          l += w * part_ml_[(p0 + p) * 2 + 1];
          const acc_t* src = part_o_.data() + (p0 + p) * Dv;
          for (int64_t d = 0; d < Dv; ++d) out[d] += w * src[d];
        }
        const acc_t inv = acc_t(1) / l;
        for (int64_t d = 0; d < Dv; ++d) out[d] *= inv;
        lse_[row] = m + std::log(l);
      }
  }

  const DecodeShape& sh_;
  const CacheView &kc_, &vc_;
  const int32_t* used_;
  const int64_t C_, top_k_;
  const bool causal_;
  const acc_t scale_;
  acc_t *o_, *lse_;
  const acc_t* q_;   // (B, Lq, Hq, D) contiguous
  const acc_t* ks_;  // key_sums, strided
  const int64_t ks_stride_[4];
  int64_t slots_, want_, nsplit_, split_len_, n_items_;
  std::vector<Item> items_;
  std::vector<int64_t> count_;  // chunks row selected (its slots 0 .. count - 1, ascending chunks)
  std::vector<acc_t> part_o_, part_ml_;
  std::atomic<int64_t> gate_next_{0};
  std::unique_ptr<std::atomic<int>[]> ready_;
  std::unique_ptr<std::atomic<int64_t>[]> next_task_, remaining_;
};

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
  const auto acc = accum_type(q.scalar_type());
  const at::Tensor q_acc = q.detach().to(acc).contiguous();  // (B, Lq, Hq, D): small, the gate and the tasks read it
  at::Tensor o = empty_cpu_output({sh.batch, sh.q_len, sh.q_heads, sh.v_dim}, q_acc.options());
  at::Tensor lse = empty_cpu_output({sh.batch, sh.q_len, sh.q_heads}, q_acc.options());
  if (o.numel() > 0 || lse.numel() > 0) {
    const CacheView kc(k_cache, acc), vc(v_cache, acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "routed_decode_fwd_cpu", [&] {
      DecodeRun<scalar_t>(sh, q_acc, kc, vc, key_sums, used, chunk_size, top_k, causal, static_cast<scalar_t>(scale),
                          o.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>())
          .run();
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
