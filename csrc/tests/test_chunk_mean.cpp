// Calls routing_kernels::chunk_mean_fwd through the dispatcher, as a libtorch user would, and compares it with a
// naive double loop. Exits non-zero on any mismatch. Run by ctest (see CMakeLists.txt).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

namespace {

using ChunkMeanFwd = at::Tensor(const at::Tensor&, int64_t, const std::optional<at::Tensor>&, int64_t);

// x (T, H, D) packed, sequence s = tokens [cu[s], cu[s + 1]) -> (S, M, H, D) in double, zero past each sequence.
at::Tensor chunk_mean_loop(const at::Tensor& x, int64_t chunk_size, const std::vector<int32_t>& cu, int64_t num_chunks) {
  const at::Tensor xd = x.to(at::kDouble);
  const int64_t num_seqs = static_cast<int64_t>(cu.size()) - 1;
  at::Tensor out = at::zeros({num_seqs, num_chunks, x.size(1), x.size(2)}, xd.options());
  auto p_x = xd.accessor<double, 3>();
  auto p_out = out.accessor<double, 4>();
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t first = cu[s] + c * chunk_size;
      const int64_t last = std::min<int64_t>(first + chunk_size, cu[s + 1]);
      for (int64_t h = 0; h < x.size(1); ++h) {
        for (int64_t d = 0; d < x.size(2); ++d) {
          double sum = 0;
          for (int64_t t = first; t < last; ++t) sum += p_x[t][h][d];
          p_out[s][c][h][d] = last > first ? sum / static_cast<double>(last - first) : 0.0;
        }
      }
    }
  }
  return out;
}

int failures = 0;

void expect_close(const std::string& name, const at::Tensor& out, const at::Tensor& expected, double tol) {
  const bool ok = out.sizes() == expected.sizes() && at::allclose(out.to(at::kDouble), expected, tol, tol);
  std::printf("%-28s %s\n", name.c_str(), ok ? "ok" : "MISMATCH");
  failures += !ok;
}

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("routing_kernels::chunk_mean_fwd", "").typed<ChunkMeanFwd>();
  at::manual_seed(0);

  // Dense (B, N, H, D) = (2, 10, 3, 5), chunk 4: last chunk has 2 tokens. Same as packed with cu = {0, 10, 20}.
  for (auto [dtype, tol] : {std::pair{at::kFloat, 1e-5}, std::pair{at::kBFloat16, 8e-3}}) {
    const at::Tensor x = at::randn({2, 10, 3, 5}).to(dtype);
    const at::Tensor out = op.call(x, 4, std::nullopt, 10);
    expect_close(std::string("dense ") + c10::toString(dtype), out,
                 chunk_mean_loop(x.reshape({20, 3, 5}), 4, {0, 10, 20}, 3), tol);
  }

  // Varlen with an empty sequence and max_seqlen above every length: rows past each sequence must be zero.
  const std::vector<int32_t> cu = {0, 7, 7, 12};
  const at::Tensor cu_seqlens = at::tensor(at::ArrayRef<int32_t>(cu), at::kInt);
  for (auto [dtype, tol] : {std::pair{at::kFloat, 1e-5}, std::pair{at::kDouble, 1e-12}}) {
    const at::Tensor x = at::randn({12, 2, 3}).to(dtype);
    const at::Tensor out = op.call(x, 3, cu_seqlens, 8);
    expect_close(std::string("varlen ") + c10::toString(dtype), out, chunk_mean_loop(x, 3, cu, 3), tol);
  }

  // Bad argument: the error names it.
  bool raised = false;
  try {
    op.call(at::randn({12, 2, 3}), 0, cu_seqlens, 7);
  } catch (const c10::Error& e) {
    raised = std::string(e.what_without_backtrace()).find("chunk_size") != std::string::npos;
  }
  std::printf("%-28s %s\n", "chunk_size=0 raises", raised ? "ok" : "MISSING ERROR");
  failures += !raised;

  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
