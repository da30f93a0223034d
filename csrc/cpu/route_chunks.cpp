// CPU kernel of routing_kernels::route_chunks_fwd (contract in include/routing_kernels/routed_attention.h and
// routing_kernels/ops/route_chunks/README.md), also the selection the routed_attention kernels recompute.
//
// Two passes: (1) the chunk means of k in the accumulation type, parallel over chunks; (2) per (sequence, block of
// tokens, query head) the gates g = Q_block means^T with one BLAS call into a (tokens x chunks) buffer, then a partial
// selection per row that keeps a sorted list of the top_k - 1 best candidates. The full (N x M) gate matrix of a
// sequence is never stored: 16K tokens x 8 heads x 32 chunks would be 16 MB, the buffer is at most 256 KB.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <routing_kernels/cpu_memory.h>
#include <routing_kernels/routed_attention.h>
#include <torch/library.h>

#include "routed_layout.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace routing_kernels {
namespace cpu {
namespace {

constexpr int64_t GATE_BUFFER = 1 << 16;  // gate values per task buffer (256 KB in fp32)
constexpr int64_t MAX_TOKEN_BLOCK = 256;

// x ranks strictly before y in torch.sort(descending=True): NaN first, then larger values. Equal keys keep their
// index order (the reference's stable sort), so a later candidate must be strictly better to move ahead.
template <typename acc_t>
inline bool ranks_before(acc_t x, acc_t y) {
  if (std::isnan(y)) return false;
  return std::isnan(x) || x > y;
}

// Per-sequence prefix of key chunk counts: the means of sequence s start at row chunk_off[s] (no S x M padding, which
// would blow up for many short sequences next to one long one).
std::vector<int64_t> chunk_offsets(const RoutedLayout& L, int64_t chunk_size) {
  std::vector<int64_t> off(L.num_seqs() + 1, 0);
  for (int64_t s = 0; s < L.num_seqs(); ++s) off[s + 1] = off[s] + ceil_div(L[s].k_len, chunk_size);
  return off;
}

// means[(chunk_off[s] + i) * Hkv * D + hk * D + d]: sum over the chunk's tokens in token order, then divided by the
// count, as the reference does (index_add then division), so exact inputs give bit-identical means.
template <typename acc_t>
void chunk_means(const acc_t* k, const RoutedLayout& L, int64_t chunk_size, const std::vector<int64_t>& off,
                 acc_t* means) {
  const int64_t row = L.sh.kv_heads * L.sh.head_dim;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, chunk_size * row));
  at::parallel_for(0, off.back(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t s = std::upper_bound(off.begin(), off.end(), c) - off.begin() - 1;
      const SeqPair& sp = L[s];
      const int64_t first = (c - off[s]) * chunk_size;
      const int64_t count = std::min(chunk_size, sp.k_len - first);
      acc_t* mean = means + c * row;
      std::fill(mean, mean + row, acc_t(0));
      for (int64_t t = sp.k_bos + first; t < sp.k_bos + first + count; ++t) {
        const acc_t* p_k = k + t * row;
        for (int64_t j = 0; j < row; ++j) mean[j] += p_k[j];
      }
      for (int64_t j = 0; j < row; ++j) mean[j] /= static_cast<acc_t>(count);
    }
  });
}

// One row of gates (n chunks) -> top_k sorted indices, -1 padded. `pos` is the token's position in its sequence.
template <typename acc_t>
void select_row(const acc_t* gate, int64_t n, int64_t pos, int64_t chunk_size, int64_t top_k, bool causal,
                acc_t* best_v, int64_t* best_i, int32_t* out) {
  const int64_t own = pos / chunk_size;
  const int64_t want = std::min(top_k - 1, n);
  // Causal: the eligible chunks are those before the own one. Non-causal: every chunk, the own one taking part with
  // gate -inf as in the reference (masked, then dropped as padding if it makes the cut).
  const int64_t last = causal ? own : n;
  int64_t kept = 0;
  for (int64_t i = 0; i < last && want > 0; ++i) {
    const acc_t x = i == own ? -std::numeric_limits<acc_t>::infinity() : gate[i];
    if (kept == want) {
      if (!ranks_before(x, best_v[want - 1])) continue;
      --kept;
    }
    int64_t p = kept++;
    for (; p > 0 && ranks_before(x, best_v[p - 1]); --p) {
      best_v[p] = best_v[p - 1];
      best_i[p] = best_i[p - 1];
    }
    best_v[p] = x;
    best_i[p] = i;
  }
  // The own chunk plus the others, ascending (insertion sort of at most top_k values), then -1 padding.
  int64_t m = 0;
  auto insert = [&](int64_t idx) {
    int64_t p = m++;
    for (; p > 0 && out[p - 1] > idx; --p) out[p] = out[p - 1];
    out[p] = static_cast<int32_t>(idx);
  };
  insert(own);
  for (int64_t r = 0; r < kept; ++r)
    if (best_i[r] != own) insert(best_i[r]);
  for (int64_t r = m; r < top_k; ++r) out[r] = -1;
}

template <typename acc_t>
void route_kernel(const at::Tensor& q_acc, const at::Tensor& k_acc, const RoutedLayout& L, int64_t chunk_size,
                  int64_t top_k, bool causal, int32_t* out) {
  const int64_t Hq = L.sh.q_heads, Hkv = L.sh.kv_heads, D = L.sh.head_dim, G = L.sh.group, S = L.num_seqs();
  const std::vector<int64_t> off = chunk_offsets(L, chunk_size);
  at::Tensor means_t = at::empty({off.back() * Hkv * D}, k_acc.options());
  acc_t* means = means_t.mutable_data_ptr<acc_t>();
  chunk_means<acc_t>(k_acc.const_data_ptr<acc_t>(), L, chunk_size, off, means);

  int64_t n_max = 1;
  for (int64_t s = 0; s < S; ++s) n_max = std::max(n_max, off[s + 1] - off[s]);
  const int64_t block = std::clamp<int64_t>(GATE_BUFFER / n_max, 1, MAX_TOKEN_BLOCK);
  // Work items: (sequence, block of its queries) pairs, each for every query head.
  std::vector<int64_t> item_off(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) item_off[s + 1] = item_off[s] + ceil_div(L[s].q_len, block);
  const acc_t* q = q_acc.const_data_ptr<acc_t>();
  const auto opts = q_acc.options();

  at::parallel_for(0, item_off.back() * Hq, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;  // worker threads do not inherit the caller's autograd state; nothing here needs it
    std::vector<acc_t> gate(block * n_max), best_v(top_k);
    std::vector<int64_t> best_i(top_k);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % Hq, blk = item / Hq;
      const int64_t s = std::upper_bound(item_off.begin(), item_off.end(), blk) - item_off.begin() - 1;
      const SeqPair& sp = L[s];
      const int64_t n = off[s + 1] - off[s];
      const int64_t p0 = (blk - item_off[s]) * block, rows = std::min(block, sp.q_len - p0);
      // g (rows, n) = Q (rows, D; row stride Hq * D) x means_h^T (means rows strided by Hkv * D).
      at::Tensor q_blk =
          at::from_blob(const_cast<acc_t*>(q) + ((sp.q_bos + p0) * Hq + h) * D, {rows, D}, {Hq * D, 1}, opts);
      at::Tensor m_blk = at::from_blob(means + (off[s] * Hkv + h / G) * D, {n, D}, {Hkv * D, 1}, opts);
      at::Tensor g_blk = at::from_blob(gate.data(), {rows, n}, opts);
      at::mm_out(g_blk, q_blk, m_blk.t());
      for (int64_t r = 0; r < rows; ++r) {
        select_row<acc_t>(gate.data() + r * n, n, sp.offset() + p0 + r, chunk_size, top_k, causal, best_v.data(),
                          best_i.data(), out + ((sp.q_bos + p0 + r) * Hq + h) * top_k);
      }
    }
  });
}

}  // namespace

at::Tensor route_chunks_layout(const at::Tensor& q_acc, const at::Tensor& k_acc, const RoutedLayout& layout,
                               int64_t chunk_size, int64_t top_k, bool causal) {
  const RoutedShape& sh = layout.sh;
  at::Tensor idx = empty_cpu_output({sh.num_tokens, sh.q_heads, top_k}, q_acc.options().dtype(at::kInt));
  if (sh.num_tokens == 0) return idx;
  AT_DISPATCH_FLOATING_TYPES(q_acc.scalar_type(), "route_chunks_cpu", [&] {
    route_kernel<scalar_t>(q_acc, k_acc, layout, chunk_size, top_k, causal, idx.mutable_data_ptr<int32_t>());
  });
  return idx;
}

namespace {

at::Tensor to_acc(const at::Tensor& t) { return t.detach().to(accum_type(t.scalar_type())).contiguous(); }

at::Tensor in_q_layout(const at::Tensor& idx, const at::Tensor& q, int64_t top_k) {
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end() - 1);
  out_shape.push_back(top_k);
  return idx.view(out_shape);
}

at::Tensor route_chunks_fwd_cpu(const at::Tensor& q, const at::Tensor& k, int64_t chunk_size, int64_t top_k,
                                bool causal, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  const RoutedLayout L = training_layout(q, k, nullptr, chunk_size, top_k, cu_seqlens, max_seqlen);
  return in_q_layout(route_chunks_layout(to_acc(q), to_acc(k), L, chunk_size, top_k, causal), q, top_k);
}

// Queries shorter than keys (include/routing_kernels/routed_attention.h).
at::Tensor route_chunks_inference_fwd_cpu(const at::Tensor& q, const at::Tensor& k, int64_t chunk_size, int64_t top_k,
                                          bool causal, const std::optional<at::Tensor>& cu_seqlens_q,
                                          const std::optional<at::Tensor>& cu_seqlens_k,
                                          const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k) {
  const RoutedLayout L = inference_layout(q, k, nullptr, chunk_size, top_k, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                          max_seqlen_q, max_seqlen_k);
  return in_q_layout(route_chunks_layout(to_acc(q), to_acc(k), L, chunk_size, top_k, causal), q, top_k);
}

}  // namespace
}  // namespace cpu
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CPU, m) {
  m.impl("route_chunks_fwd", TORCH_FN(routing_kernels::cpu::route_chunks_fwd_cpu));
  m.impl("route_chunks_inference_fwd", TORCH_FN(routing_kernels::cpu::route_chunks_inference_fwd_cpu));
}
