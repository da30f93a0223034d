// CPU forward of routing_kernels::routed_attention_fwd (the training layout) and routed_attention_inference_fwd
// (queries shorter than keys, a dense cache, a caller's selection); contract in
// include/routing_kernels/routed_attention.h, maths in routing_kernels/ops/routed_attention/README.md, the design of
// both directions in routed_attention_common.h.
#include <torch/library.h>

#include <numeric>
#include <optional>
#include <tuple>

#include "routed_attention_common.h"

namespace routing_kernels {
namespace cpu {
namespace {

template <typename acc_t>
void forward_kernel(const Inputs& in, const at::Tensor& q_a, const at::Tensor& k_a, const at::Tensor& v_a,
                    const int32_t* sel, acc_t scale, acc_t* o, acc_t* lse) {
  const RoutedShape& sh = in.sh();
  const RoutedLayout& L = in.layout;
  const int64_t Hq = sh.q_heads, Hkv = sh.kv_heads, G = sh.group, D = sh.head_dim, Dv = sh.v_dim;
  const int64_t cs = in.chunk_size, top_k = in.top_k;
  const int64_t block = std::max<int64_t>(1, ROWS_PER_TASK / G);
  struct Task {
    int64_t s, hk, p0, p1;
  };
  std::vector<Task> tasks;
  for (int64_t s = 0; s < L.num_seqs(); ++s) {
    const int64_t len = L[s].q_len;
    for (int64_t hk = 0; hk < Hkv; ++hk)
      for (int64_t p0 = 0; p0 < len; p0 += block) tasks.push_back({s, hk, p0, std::min(len, p0 + block)});
  }
  // Causal: later token blocks select more chunks; start them first. (p0 counts queries; with queries shorter than
  // keys every block of a sequence shares its offset, so the order by p0 is still the order by position.)
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
      const SeqPair& sp = L[tk.s];
      const int64_t n = ceil_div(sp.k_len, cs), rows = (tk.p1 - tk.p0) * G;
      // Row r = (i - p0) * G + g is query i of the sequence with head hk * G + g, at position pos0 + r / G; its
      // output row is q_row(r).
      const int64_t pos0 = sp.offset() + tk.p0;
      auto q_row = [&](int64_t r) { return (sp.q_bos + tk.p0 + r / G) * Hq + tk.hk * G + r % G; };
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
        const int64_t kb = j * cs, ke = std::min(sp.k_len, kb + cs);
        for (int64_t k0 = kb; k0 < ke; k0 += KEY_BLOCK) {
          const int64_t k1 = std::min(ke, k0 + KEY_BLOCK);
          for (int64_t b0 = count[j], R = 0; b0 < count[j + 1]; b0 += R) {
            R = std::min(ROW_BLOCK, count[j + 1] - b0);
            // Causal: the chunk's own queries come first (rows are sorted by token) and see a triangle of keys;
            // half-size blocks there cut the masked work that is multiplied anyway (1/4 of a 512 chunk -> 1/8).
            if (in.causal && (pos0 + order[b0] / G) / cs == j) R = std::min(R, ROW_BLOCK / 2);
            const int64_t* rr = order.data() + b0;
            int64_t C = 0;
            for (int64_t i = 0; i < R; ++i) {
              sc.allowed[i] = allowed_keys(in.causal, pos0 + rr[i] / G, k0, k1);
              C = std::max(C, sc.allowed[i]);
            }
            if (C == 0) continue;
            for (int64_t i = 0; i < R; ++i) {
              std::copy_n(q_task.data() + rr[i] * D, D, sc.qg.data() + i * D);
            }
            // S (R, C) = (scale Q) K^T; then P = exp(S - running max), rows with no key in this block skipped.
            at::Tensor s_t = view2(sc.s.data(), R, C, C, opts);
            at::mm_out(s_t, view2(sc.qg.data(), R, D, D, opts),
                       view2(k + ((sp.k_bos + k0) * Hkv + tk.hk) * D, C, D, Hkv * D, opts).t());
            for (int64_t i = 0; i < R; ++i) {  // masked keys: zeroed after the exp too (see unmask)
              sc.row_a[i] = shift_row(sc.s.data() + i * C, sc.allowed[i], C, m_run[rr[i]]);
            }
            s_t.exp_();
            unmask(sc.s.data(), sc.allowed.data(), R, C);
            at::Tensor og = view2(sc.og.data(), R, Dv, Dv, opts);
            at::mm_out(og, s_t, view2(v + ((sp.k_bos + k0) * Hkv + tk.hk) * Dv, C, Dv, Hkv * Dv, opts));
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
        if (l_run[r] == acc_t(0)) {  // no chunk (a caller's selection of -1 only): no visible key
          std::fill(orow, orow + Dv, acc_t(0));
          lse[q_row(r)] = neg_inf;
          continue;
        }
        const acc_t inv = acc_t(1) / l_run[r];
        for (int64_t d = 0; d < Dv; ++d) orow[d] = o_task[r * Dv + d] * inv;
        lse[q_row(r)] = m_run[r] + std::log(l_run[r]);
      }
    }
  });
}

// The forward of any layout: the gate's selection, or the caller's (block_indices, checked and normalised).
std::tuple<at::Tensor, at::Tensor> forward(const Inputs& in, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, double scale,
                                           const std::optional<at::Tensor>& block_indices) {
  const RoutedShape& sh = in.sh();
  const auto acc = accum_type(q.scalar_type());
  const at::Tensor sel_in = block_indices
      ? normalized_block_indices(*block_indices, q, in.layout, in.chunk_size, in.top_k, in.causal)
      : at::Tensor();
  const at::Tensor q_a = to_acc(q), k_a = to_acc(k), v_a = to_acc(v);
  at::Tensor o = empty_cpu_output({sh.num_tokens, sh.q_heads, sh.v_dim}, q_a.options());
  at::Tensor lse = empty_cpu_output({sh.num_tokens, sh.q_heads}, q_a.options());
  if (sh.num_tokens > 0) {
    const at::Tensor sel = block_indices ? sel_in
                                         : route_chunks_layout(q_a, k_a, in.layout, in.chunk_size, in.top_k, in.causal);
    AT_DISPATCH_FLOATING_TYPES(acc, "routed_attention_fwd_cpu", [&] {
      forward_kernel<scalar_t>(in, q_a, k_a, v_a, sel.const_data_ptr<int32_t>(), static_cast<scalar_t>(scale),
                               o.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>());
    });
  }
  return {like_layout(o, q, q.scalar_type(), 2), like_layout(lse, q, acc, 1)};
}

std::tuple<at::Tensor, at::Tensor> routed_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, int64_t chunk_size, int64_t top_k,
                                                            bool causal, const std::optional<at::Tensor>& cu_seqlens,
                                                            int64_t max_seqlen, double scale) {
  const Inputs in{training_layout(q, k, &v, chunk_size, top_k, cu_seqlens, max_seqlen), chunk_size, top_k, causal};
  return forward(in, q, k, v, scale, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> routed_attention_inference_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t chunk_size, int64_t top_k, bool causal,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    const std::optional<at::Tensor>& block_indices) {
  const Inputs in{inference_layout(q, k, &v, chunk_size, top_k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                   max_seqlen_k),
                  chunk_size, top_k, causal};
  return forward(in, q, k, v, scale, block_indices);
}

}  // namespace
}  // namespace cpu
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CPU, m) {
  m.impl("routed_attention_fwd", TORCH_FN(routing_kernels::cpu::routed_attention_fwd_cpu));
  m.impl("routed_attention_inference_fwd", TORCH_FN(routing_kernels::cpu::routed_attention_inference_fwd_cpu));
}
