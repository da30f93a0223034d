// Runs the CUDA chunk_route / chunk_mean launches (csrc/cuda/*_launch / *_kernels .cuh, the production code) under
// the host CUDA emulation without libtorch (c10 only, for Half / BFloat16 and TORCH_INTERNAL_ASSERT), against a
// float64 reference written here, so that it can be built with -fsanitize=address,undefined or =thread.
// csrc/emu/run_sanitizers.sh builds and runs it. Also checks that the emulator's own detectors fire (divergent
// barrier, exited thread at a barrier, partial shuffle mask, shared memory above 48 KB, launch bounds).
//
//   sanitize_driver [--threads] [--fibers]     (default --threads: the sanitizers do not follow fiber switches)
// Exits 1 on any mismatch or undetected fault, printing each.
#ifndef ROUTING_KERNELS_CUDA_EMU
#define ROUTING_KERNELS_CUDA_EMU 1
#endif

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../cuda/chunk_mean_kernels.cuh"
#include "../cuda/chunk_route_launch.cuh"
#include "../cuda/chunk_table_launch.cuh"

namespace rk = routing_kernels;

namespace {

int g_failures = 0;

void fail(const std::string& what) {
  std::printf("FAIL %s\n", what.c_str());
  ++g_failures;
}

const char* name_of(double) { return "fp64"; }
const char* name_of(float) { return "fp32"; }
const char* name_of(c10::Half) { return "fp16"; }
const char* name_of(c10::BFloat16) { return "bf16"; }

double tol_of(double) { return 1e-12; }
double tol_of(float) { return 1e-5; }
double tol_of(c10::Half) { return 4e-3; }
double tol_of(c10::BFloat16) { return 3e-2; }

// A buffer of n values, optionally starting one element past a 16-byte boundary (the scalar fallback). ASan sees
// reads past n: the allocation holds exactly the values (plus the one-element offset before them).
template <typename T>
struct Buf {
  std::vector<T> store;
  T* p;
  Buf(std::size_t n, bool misalign) : store(n + (misalign ? 1 : 0)), p(store.data() + (misalign ? 1 : 0)) {}
  void poison() {
    for (std::size_t i = 0; i < store.size(); ++i) store[i] = static_cast<T>(NAN);
  }
};

uint64_t g_rng = 88172645463325252ull;
double rnd() {  // xorshift, uniform in [-1, 1)
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return static_cast<double>(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

struct Case {
  const char* name;
  std::vector<int32_t> lengths;  // varlen when dense_b == 0
  int64_t dense_b, dense_n;
  int64_t heads, dim, chunk_size;
  bool shared_query, misalign;
  int sms;
  std::vector<std::vector<int32_t>> table;  // chunk sizes per sequence: the chunk-table kernels (lengths unused)
};

template <typename T>
void compare(const std::string& what, const T* got, const std::vector<double>& want, double tol) {
  double scale = 0;
  for (double v : want) scale = std::max(scale, std::abs(v));
  scale = std::min(std::max(scale, 1e-3), 1.0);
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double g = static_cast<double>(got[i]);
    if (!(std::abs(g - want[i]) <= tol * (scale + std::abs(want[i])))) {
      fail(what + "[" + std::to_string(i) + "] = " + std::to_string(g) + ", want " + std::to_string(want[i]));
      return;
    }
  }
}

template <typename T>
void run_case(const Case& c) {
  using acc_t = rk::accum_t<T>;
  const bool varlen = c.dense_b == 0, is_table = !c.table.empty();
  std::vector<int32_t> cu{0}, cu_chunks{0}, seq_chunks{0};
  int64_t longest = 0, most_chunks = 0;
  if (is_table) {
    for (const auto& sizes : c.table) {
      for (int32_t n : sizes) cu_chunks.push_back(cu_chunks.back() + n);
      seq_chunks.push_back(static_cast<int32_t>(cu_chunks.size()) - 1);
      cu.push_back(cu_chunks.back());
      most_chunks = std::max<int64_t>(most_chunks, static_cast<int64_t>(sizes.size()));
    }
  } else if (varlen) {
    for (int32_t len : c.lengths) cu.push_back(cu.back() + len), longest = std::max<int64_t>(longest, len);
  } else {
    for (int64_t b = 0; b < c.dense_b; ++b) cu.push_back(static_cast<int32_t>(cu.back() + c.dense_n));
    longest = c.dense_n;
  }
  const int64_t S = static_cast<int64_t>(cu.size()) - 1, T_ = cu.back(), H = c.heads, D = c.dim, R = H * D;
  const int64_t cs = c.chunk_size, M = is_table ? most_chunks : rk::ceil_div(longest, cs);
  const rk::ChunkMeanShape sh = is_table ? rk::table_shape(S, T_, H, D, M)
                                         : rk::ChunkMeanShape{varlen, S, varlen ? 0 : c.dense_n, T_, H, D, M};
  const rk::Geometry g = is_table ? rk::table_geometry(sh) : rk::geometry(sh, cs, longest);
  const int64_t K = static_cast<int64_t>(cu_chunks.size()) - 1;
  const rk::TableChunks chunks{cu_chunks.data(), seq_chunks.data(), K, S, T_};
  // chunk (s, m): tokens [first, first + count) (count 0: no such chunk)
  std::vector<int64_t> first(S * M, 0), count(S * M, 0);
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t m = 0; m < M; ++m) {
      if (is_table) {
        if (m < seq_chunks[s + 1] - seq_chunks[s]) {
          first[s * M + m] = cu_chunks[seq_chunks[s] + m];
          count[s * M + m] = cu_chunks[seq_chunks[s] + m + 1] - first[s * M + m];
        }
      } else {
        const int64_t t0 = cu[s] + m * cs, t1 = std::min<int64_t>(cu[s + 1], t0 + cs);
        first[s * M + m] = t0;
        count[s * M + m] = std::max<int64_t>(0, t1 - t0);
      }
    }
  }
  const double scale = 0.3;
  const int64_t q_rows = c.shared_query ? 1 : S;

  Buf<T> x(T_ * R, c.misalign), q(q_rows * R, c.misalign), dy(T_ * R, c.misalign), dsum(S * R, c.misalign);
  for (int64_t i = 0; i < T_ * R; ++i) x.p[i] = static_cast<T>(rnd()), dy.p[i] = static_cast<T>(rnd());
  for (int64_t i = 0; i < q_rows * R; ++i) q.p[i] = static_cast<T>(rnd());
  for (int64_t i = 0; i < S * R; ++i) dsum.p[i] = static_cast<T>(rnd());
  std::vector<acc_t> dweights(S * H * M);
  for (acc_t& v : dweights) v = static_cast<acc_t>(rnd());
  auto X = [&](int64_t t, int64_t h, int64_t d) { return static_cast<double>(x.p[t * R + h * D + d]); };

  // float64 reference: means, weights, y, summary; then dw, ds, dx, dquery (per sequence)
  std::vector<double> mean(S * M * R, 0.0), w(S * H * M, 0.0), y(T_ * R), summary(S * R, 0.0);
  std::vector<double> dx(T_ * R), dq(S * R, 0.0);
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t m = 0; m < M; ++m) {
      const int64_t t0 = first[s * M + m], t1 = t0 + count[s * M + m];
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t e = 0; e < R; ++e) mean[(s * M + m) * R + e] += X(t, e / D, e % D) / (t1 - t0);
    }
    for (int64_t h = 0; h < H; ++h) {
      double top = -INFINITY, den = 0;
      std::vector<double> sc(M);
      for (int64_t m = 0; m < M; ++m) {
        if (!count[s * M + m]) continue;
        double dot = 0;
        for (int64_t d = 0; d < D; ++d)
          dot += static_cast<double>(q.p[(c.shared_query ? 0 : s) * R + h * D + d]) * mean[(s * M + m) * R + h * D + d];
        sc[m] = scale * dot;
        top = std::max(top, sc[m]);
      }
      for (int64_t m = 0; m < M; ++m)
        if (count[s * M + m]) den += std::exp(sc[m] - top);
      for (int64_t m = 0; m < M; ++m) {
        const double wm = count[s * M + m] ? std::exp(sc[m] - top) / den : 0.0;
        w[(s * H + h) * M + m] = wm;
        for (int64_t d = 0; d < D; ++d) summary[s * R + h * D + d] += wm * mean[(s * M + m) * R + h * D + d];
      }
    }
  }
  std::vector<acc_t> w_in(w.begin(), w.end());  // the backward gets the reference weights
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t h = 0; h < H; ++h) {
      std::vector<double> dw(M, 0.0), ds(M, 0.0);
      double tot = 0;
      for (int64_t m = 0; m < M; ++m) {
        if (!count[s * M + m]) continue;
        const int64_t t0 = first[s * M + m];
        for (int64_t t = t0; t < t0 + count[s * M + m]; ++t)
          for (int64_t d = 0; d < D; ++d) dw[m] += static_cast<double>(dy.p[t * R + h * D + d]) * X(t, h, d);
        for (int64_t d = 0; d < D; ++d)
          dw[m] += static_cast<double>(dsum.p[s * R + h * D + d]) * mean[(s * M + m) * R + h * D + d];
        dw[m] += dweights[(s * H + h) * M + m];
        tot += w_in[(s * H + h) * M + m] * dw[m];
      }
      for (int64_t m = 0; m < M; ++m) {
        if (!count[s * M + m]) continue;
        const double wm = w_in[(s * H + h) * M + m];
        ds[m] = wm * (dw[m] - tot);
        const int64_t t0 = first[s * M + m];
        for (int64_t d = 0; d < D; ++d) {
          const int64_t e = h * D + d;
          const double qv = static_cast<double>(q.p[(c.shared_query ? 0 : s) * R + e]);
          const double share = (scale * ds[m] * qv + wm * static_cast<double>(dsum.p[s * R + e])) / count[s * M + m];
          for (int64_t t = t0; t < t0 + count[s * M + m]; ++t) {
            y[t * R + e] = wm * X(t, h, d);
            dx[t * R + e] = wm * static_cast<double>(dy.p[t * R + e]) + share;
          }
          dq[s * R + e] += scale * ds[m] * mean[(s * M + m) * R + e];
        }
      }
    }
  }

  Buf<T> y_out(T_ * R, c.misalign), sum_out(S * R, false), dx_out(T_ * R, c.misalign), mean_out(S * M * R, false);
  Buf<acc_t> w_out(S * H * M, false), means(S * M * R, false), dw(S * H * M, false), dq_out(S * R, false);
  const int64_t P = is_table ? rk::table_part_rows(chunks) : 0;
  Buf<acc_t> part_sum(P * R, false), part_dot(P * R, false), mean_acc(S * M * R, false);
  Buf<T> grad_mean(S * M * R, c.misalign), dx_mean(T_ * R, c.misalign);
  for (int64_t i = 0; i < S * M * R; ++i) grad_mean.p[i] = static_cast<T>(rnd());
  std::vector<double> dx_mean_ref(T_ * R);
  for (int64_t i = 0; i < S * M; ++i)
    for (int64_t t = first[i]; t < first[i] + count[i]; ++t)
      for (int64_t e = 0; e < R; ++e) dx_mean_ref[t * R + e] = static_cast<double>(grad_mean.p[i * R + e]) / count[i];
  for (auto* b : {&y_out, &sum_out, &dx_out, &mean_out, &dx_mean}) b->poison();
  for (auto* b : {&w_out, &means, &dw, &dq_out, &part_sum, &part_dot, &mean_acc}) b->poison();
  const std::string name = std::string(c.name) + "/" + name_of(T{});
  const int32_t* p_cu = varlen ? cu.data() : nullptr;
  try {
    if (T_ > 0 && H > 0 && is_table) {
      rk::route_fwd_launch<T>(sh, g, c.sms, chunks, x.p, q.p, c.shared_query ? 0 : R, static_cast<acc_t>(scale),
                              w_out.p, means.p, part_sum.p, sum_out.p, y_out.p, nullptr);
      rk::route_bwd_launch<T>(sh, g, c.sms, chunks, x.p, dy.p, q.p, c.shared_query ? 0 : R, dsum.p, w_in.data(),
                              dweights.data(), static_cast<acc_t>(scale), means.p, dw.p, part_sum.p, part_dot.p,
                              dq_out.p, dx_out.p, nullptr);
    } else if (T_ > 0 && H > 0) {
      rk::chunk_route_fwd_launch<T>(sh, g, c.sms, x.p, q.p, c.shared_query ? 0 : R, p_cu, static_cast<acc_t>(scale),
                                    w_out.p, means.p, sum_out.p, y_out.p, nullptr);
      rk::chunk_route_bwd_launch<T>(sh, g, c.sms, x.p, dy.p, q.p, c.shared_query ? 0 : R, dsum.p, w_in.data(),
                                    dweights.data(), p_cu, static_cast<acc_t>(scale), means.p, dw.p, dq_out.p,
                                    dx_out.p, nullptr);
    }
    if (T_ > 0 && H > 0) {
      compare(name + " y", y_out.p, y, tol_of(T{}));
      compare(name + " weights", w_out.p, w, tol_of(T{}));
      compare(name + " summary", sum_out.p, summary, tol_of(T{}));
      compare(name + " dx", dx_out.p, dx, tol_of(T{}));
      compare(name + " dquery", dq_out.p, dq, tol_of(T{}));
    }
    if (S * M * R > 0 && T_ > 0 && is_table) {
      rk::chunk_mean_table_fwd_launch<T>(sh, g, c.sms, chunks, x.p, mean_acc.p, part_sum.p, nullptr);
      compare(name + " chunk_mean_table", mean_acc.p, mean, tol_of(T{}));
      rk::chunk_mean_table_bwd_launch<T>(sh, g, chunks, grad_mean.p, dx_mean.p, nullptr);
      compare(name + " chunk_mean_table dx", dx_mean.p, dx_mean_ref, tol_of(T{}));
    } else if (S * M * R > 0 && !is_table) {
      rk::chunk_mean_cuda::launch_chunk_mean<T>(sh, cs, x.p, p_cu, mean_out.p, nullptr);
      compare(name + " chunk_mean", mean_out.p, mean, tol_of(T{}));
      if (T_ > 0) {
        rk::chunk_mean_bwd_launch<T>(sh, g, grad_mean.p, p_cu, dx_mean.p, nullptr);
        compare(name + " chunk_mean dx", dx_mean.p, dx_mean_ref, tol_of(T{}));
      }
    }
  } catch (const std::exception& e) {
    fail(name + ": " + e.what());
  }
  std::printf("ok   %s\n", name.c_str());
}

// ---------------------------------------------------------------------------------------------------------------
// The emulator's detectors, on small kernels with a planted fault each.

__global__ void barrier_under_branch(int* out) {  // two barriers where CUDA needs one for the whole block
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
__global__ void early_exit_then_barrier(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void partial_mask_shuffle(int* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffu, int(threadIdx.x), 1); }
__global__ void too_much_shared(int* out) {
  RK_SHARED_ARRAY(double, s_big, 7000);  // 56000 bytes > 48 KB
  s_big[threadIdx.x] = 1;
  out[threadIdx.x] = static_cast<int>(s_big[0]);
}
__global__ void shuffle_and_reduce(int* out) {
  int v = static_cast<int>(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

template <typename F>
void expect_error(const char* what, const char* needle, F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    if (std::strstr(e.what(), needle) == nullptr) fail(std::string(what) + ": unexpected message: " + e.what());
    else std::printf("ok   detector %s: %.*s\n", what, static_cast<int>(std::strcspn(e.what(), "\n")), e.what());
    return;
  }
  fail(std::string(what) + ": no error");
}

void detector_tests() {
  std::vector<int> out(64, 0);
  expect_error("barrier under a branch", "divergent __syncthreads",
               [&] { cuda_emu::launch(barrier_under_branch, dim3(1), dim3(32), out.data()); });
  expect_error("exited thread at a barrier", "exited the kernel",
               [&] { cuda_emu::launch(early_exit_then_barrier, dim3(1), dim3(32), out.data()); });
  expect_error("partial shuffle mask", "mask 0xffff",
               [&] { cuda_emu::launch(partial_mask_shuffle, dim3(1), dim3(32), out.data()); });
  expect_error("shared memory limit", "48 KB",
               [&] { cuda_emu::launch(too_much_shared, dim3(1), dim3(32), out.data()); });
  expect_error("launch bounds", "__launch_bounds__(32)",
               [&] { rk::launch_kernel<32>(shuffle_and_reduce, dim3(1), dim3(64), nullptr, out.data()); });
  cuda_emu::launch(shuffle_and_reduce, dim3(2), dim3(64), out.data());
  for (int i = 0; i < 64; ++i) {
    const int want = (i / 32) * 32 * 32 + 31 * 32 / 2;  // sum of the warp's lane ids
    if (out[i] != want) fail("shuffle reduction lane " + std::to_string(i) + ": " + std::to_string(out[i]));
  }
}

// The chunk table's pieces (chunk_geometry.cuh): for each split, the K + ceil(T / split) pieces cover every token
// exactly once, none is longer than split, each names its chunk's (sequence, local chunk), and the finish pass's
// slots of chunk k (k, then K + j for j in [first_aligned, last_aligned)) are exactly its non-empty pieces.
void table_piece_tests() {
  const std::vector<std::vector<int32_t>> tables[] = {
      {{3, 1, 1000, 2}, {}, {1, 7, 1}}, {{256, 256, 1}, {255, 2}}, {{1}}, {{}, {}}};
  for (const auto& seqs : tables) {
    std::vector<int32_t> cu{0}, seq{0};
    for (const auto& sizes : seqs) {
      for (int32_t n : sizes) cu.push_back(cu.back() + n);
      seq.push_back(static_cast<int32_t>(cu.size()) - 1);
    }
    const int64_t K = static_cast<int64_t>(cu.size()) - 1, S = static_cast<int64_t>(seq.size()) - 1, T = cu.back();
    const rk::TableChunks chunks{cu.data(), seq.data(), K, S, T};
    const rk::Geometry g{};
    for (int64_t split : {1, 4, 32, 256}) {
      const std::string what = "table pieces K=" + std::to_string(K) + " split=" + std::to_string(split);
      std::vector<int> covered(T, 0);
      std::vector<std::vector<int64_t>> slots(K);
      for (int64_t idx = 0; idx < chunks.num_pieces(split); ++idx) {
        const rk::Piece p = chunks.piece(idx, split, 1, g);
        if (p.t0 >= p.t1) continue;
        const int64_t k = seq[p.i_s] + p.i_c;
        if (p.t1 - p.t0 > split || p.span.first != cu[k] || p.span.count != cu[k + 1] - cu[k] || p.t1 > p.span.count ||
            p.i_c >= seq[p.i_s + 1] - seq[p.i_s]) {
          fail(what + ": bad piece " + std::to_string(idx));
        }
        for (int64_t t = p.span.first + p.t0; t < p.span.first + p.t1; ++t) ++covered[t];
        slots[k].push_back(p.slot);
      }
      for (int64_t t = 0; t < T; ++t)
        if (covered[t] != 1) fail(what + ": token " + std::to_string(t) + " covered " + std::to_string(covered[t]));
      for (int64_t k = 0; k < K; ++k) {
        std::vector<int64_t> want{k};
        for (int64_t j = chunks.first_aligned(k, split); j < chunks.last_aligned(k, split); ++j) want.push_back(K + j);
        if (slots[k] != want) fail(what + ": finish slots of chunk " + std::to_string(k));
      }
    }
  }
  std::printf("ok   table pieces\n");
}

}  // namespace

int main(int argc, char** argv) {
  cuda_emu::options().threads = !(argc > 1 && std::strcmp(argv[1], "--fibers") == 0);
  std::printf("cuda_emu sanitize_driver: %s\n", cuda_emu::options().threads ? "threads" : "fibers");
  detector_tests();
  table_piece_tests();
  // Small on purpose: with one OS thread per CUDA thread under a sanitizer, every block costs milliseconds.
  const std::vector<Case> cases = {
      {"dense_ragged_vec", {}, 2, 37, 2, 64, 8, true, false, 132},
      {"dense_chunk1_scalar", {}, 1, 9, 3, 5, 1, false, false, 1},
      {"varlen_empty_mid", {7, 0, 33, 1}, 0, 0, 2, 16, 4, false, false, 132},
      {"varlen_misaligned", {9, 0, 20}, 0, 0, 4, 16, 16, true, true, 132},
      {"varlen_long_chunk_1sm", {40, 3}, 0, 0, 1, 32, 64, true, false, 1},
      {"varlen_all_empty", {0, 0}, 0, 0, 2, 8, 2, true, false, 132},
      // The chunk-table kernels: chunks of 1 to 600 tokens (600 spans three 256-token pieces of the reduce pass),
      // an empty sequence, a one-token chunk; misaligned (scalar path) in its second dtype.
      {"table_skewed", {}, 0, 0, 2, 16, 0, false, false, 132, {{3, 1, 600, 2}, {}, {1, 7, 1}}},
      {"table_skewed_misaligned", {}, 0, 0, 2, 16, 0, true, true, 1, {{300, 1}, {2, 1, 2}}},
  };
  // Every case in fp32 and in one of fp64 / bf16 / fp16 in turn: the Python tests run the full dtype grid, the
  // sanitizers need each vector width and the scalar path, not every pairing (each pairing costs ~5 s here).
  for (std::size_t i = 0; i < cases.size(); ++i) {
    run_case<float>(cases[i]);
    switch (i % 3) {
      case 0: run_case<double>(cases[i]); break;
      case 1: run_case<c10::BFloat16>(cases[i]); break;
      default: run_case<c10::Half>(cases[i]); break;
    }
  }
  std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
  return g_failures ? 1 : 0;
}
