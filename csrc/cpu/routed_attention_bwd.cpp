// CPU backward of routing_kernels::routed_attention_bwd (the training layout) and routed_attention_inference_bwd
// (queries shorter than keys, a dense cache, a caller's selection): dq, dk, dv. Contract in
// include/routing_kernels/routed_attention.h, maths in routing_kernels/ops/routed_attention/README.md, the design of
// both directions in routed_attention_common.h.
#include <torch/library.h>

#include <cerrno>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "routed_attention_common.h"

namespace routing_kernels {
namespace cpu {
namespace {

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
  const RoutedShape& sh = in.sh();
  const RoutedLayout& L = in.layout;
  const int64_t Hq = sh.q_heads, Hkv = sh.kv_heads, G = sh.group, D = sh.head_dim, Dv = sh.v_dim;
  const int64_t cs = in.chunk_size, top_k = in.top_k, S = L.num_seqs(), M = sh.num_chunks;
  const auto opts = q_a.options();
  const auto long_opts = opts.dtype(at::kLong);

  // count[(chunk_off[s] + j) * Hkv + hk]: query rows of sequence s, kv head hk that selected key chunk j.
  std::vector<int64_t> chunk_off(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) chunk_off[s + 1] = chunk_off[s] + ceil_div(L[s].k_len, cs);
  at::Tensor count_t = at::zeros({chunk_off[S] * Hkv}, long_opts);  // a tensor: torch.profiler sees it
  int64_t* count = count_t.mutable_data_ptr<int64_t>();
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / Hkv, hk = item % Hkv;
      const SeqPair& sp = L[s];
      int64_t* c = count + chunk_off[s] * Hkv + hk;
      for (int64_t t = sp.q_bos; t < sp.q_bos + sp.q_len; ++t)
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
        const SeqPair& sp = L[s];
        int64_t next = region[item];
        for (int64_t j = j0; j < j1; ++j) {
          fill[j - j0] = next;
          if (j < chunk_off[s + 1] - chunk_off[s]) next += count[(chunk_off[s] + j) * Hkv + hk];
        }
        // Causal: a query selects no chunk after its own, so the queries at positions before chunk j0 have nothing
        // here (query i sits at position offset + i).
        const int64_t skip = in.causal ? std::clamp<int64_t>(j0 * cs - sp.offset(), 0, sp.q_len) : 0;
        for (int64_t t = sp.q_bos + skip; t < sp.q_bos + sp.q_len; ++t)
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
        const SeqPair& sp = L[tk.s];
        const int64_t kb = tk.j * cs, ke = std::min(sp.k_len, kb + cs), nk = ke - kb;
        const int64_t pos_of_row0 = sp.offset() - sp.q_bos;  // query row t (of q's tokens) sits at t + this
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
              sc.allowed[i] = allowed_keys(in.causal, ee[i] / Hq + pos_of_row0, k0, k1);
              C = std::max(C, sc.allowed[i]);
            }
            if (C == 0) continue;
            const at::Tensor k_blk = view2(k + ((sp.k_bos + k0) * Hkv + tk.hk) * D, C, D, Hkv * D, opts);
            const at::Tensor v_blk = view2(v + ((sp.k_bos + k0) * Hkv + tk.hk) * Dv, C, Dv, Hkv * Dv, opts);
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
          scaled_copy_row(dk + ((sp.k_bos + kb + t) * Hkv + tk.hk) * D, dk_acc.data() + t * D, scale, D);
          std::copy_n(dv_acc.data() + t * Dv, Dv, dv + ((sp.k_bos + kb + t) * Hkv + tk.hk) * Dv);
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
        item_off[s * Hkv + hk + 1] = item_off[s * Hkv + hk] + ceil_div(L[s].q_len, REDUCE_TOKENS);
    at::parallel_for(0, item_off.back(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t sk = std::upper_bound(item_off.begin(), item_off.end(), item) - item_off.begin() - 1;
        const int64_t s = sk / Hkv, hk = sk % Hkv;
        const SeqPair& sp = L[s];
        const int64_t t0 = sp.q_bos + (item - item_off[sk]) * REDUCE_TOKENS;
        const int64_t t1 = std::min(sp.q_bos + sp.q_len, t0 + REDUCE_TOKENS);
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

// The backward of any layout (see forward() in routed_attention_fwd.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const Inputs& in, const at::Tensor& dout,
                                                        const at::Tensor& dlse, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                                                        const at::Tensor& lse, double scale,
                                                        const std::optional<at::Tensor>& block_indices) {
  const RoutedShape& sh = in.sh();
  const auto acc = accum_type(q.scalar_type());
  check_routed_token_tensor(o, q, sh, sh.q_heads, sh.v_dim, q.scalar_type(), "o", "(.., Hq, Dv)");
  check_routed_token_tensor(dout, q, sh, sh.q_heads, sh.v_dim, q.scalar_type(), "do", "(.., Hq, Dv)");
  check_routed_token_tensor(lse, q, sh, sh.q_heads, -1, acc, "lse", "(.., Hq)");
  check_routed_token_tensor(dlse, q, sh, sh.q_heads, -1, acc, "dlse", "(.., Hq)");
  const at::Tensor sel_in = block_indices
      ? normalized_block_indices(*block_indices, q, in.layout, in.chunk_size, in.top_k, in.causal)
      : at::Tensor();
  const at::Tensor q_a = to_acc(q), k_a = to_acc(k), v_a = to_acc(v), do_a = to_acc(dout);
  const int64_t T = sh.num_tokens, Hq = sh.q_heads, Dv = sh.v_dim, NK = in.layout.num_keys;
  at::Tensor dq = empty_cpu_output({T, Hq, sh.head_dim}, q_a.options());
  // Key rows outside every sequence (a cache past seqused_k) get no task: zero gradient.
  auto key_grad = [&](int64_t dim) {
    return in.layout.keys_covered ? empty_cpu_output({NK, sh.kv_heads, dim}, q_a.options())
                                  : at::zeros({NK, sh.kv_heads, dim}, q_a.options());
  };
  at::Tensor dk = key_grad(sh.head_dim), dv = key_grad(Dv);
  if (T > 0) {
    const at::Tensor lse_c = lse.detach().reshape({T, Hq}).contiguous();
    const at::Tensor dlse_c = dlse.detach().reshape({T, Hq}).contiguous();
    const at::Tensor o_a = to_acc(o);  // O as stored (q's dtype), like the reference
    const at::Tensor sel = block_indices
        ? sel_in
        : route_chunks_layout(q_a, k_a, in.layout, in.chunk_size, in.top_k, in.causal);
    at::Tensor delta = at::empty({T, Hq}, q_a.options());
    AT_DISPATCH_FLOATING_TYPES(acc, "routed_attention_bwd_cpu", [&] {
      // delta = <dO, O> - dlse per query row, one row at a time (a (T, Hq, Dv) product would be dq-sized).
      const scalar_t* p_do = do_a.const_data_ptr<scalar_t>();
      const scalar_t* p_o = o_a.const_data_ptr<scalar_t>();
      const scalar_t* p_dlse = dlse_c.const_data_ptr<scalar_t>();
      scalar_t* p_delta = delta.mutable_data_ptr<scalar_t>();
      scalar_t* p_dq = dq.mutable_data_ptr<scalar_t>();
      const int32_t* p_sel = sel.const_data_ptr<int32_t>();
      const int64_t D = sh.head_dim, top_k = in.top_k;
      at::parallel_for(0, T * Hq, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          p_delta[r] = dot_row(p_do + r * Dv, p_o + r * Dv, Dv) - p_dlse[r];
          // A row that selected nothing (a caller's selection) gets no dQ share: its dq is 0.
          if (p_sel[r * top_k] < 0) std::fill(p_dq + r * D, p_dq + (r + 1) * D, scalar_t(0));
        }
      });
      backward_kernel<scalar_t>(in, q_a, k_a, v_a, do_a, lse_c.const_data_ptr<scalar_t>(), p_delta, p_sel,
                                static_cast<scalar_t>(scale), p_dq, dk.mutable_data_ptr<scalar_t>(),
                                dv.mutable_data_ptr<scalar_t>());
    });
  }
  return {like_layout(dq, q, q.scalar_type(), 2), like_layout(dk, k, k.scalar_type(), 2),
          like_layout(dv, v, v.scalar_type(), 2)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const at::Tensor& lse, int64_t chunk_size, int64_t top_k, bool causal,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale) {
  const Inputs in{training_layout(q, k, &v, chunk_size, top_k, cu_seqlens, max_seqlen), chunk_size, top_k, causal};
  return backward(in, dout, dlse, q, k, v, o, lse, scale, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_inference_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& o, const at::Tensor& lse, int64_t chunk_size, int64_t top_k, bool causal,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    const std::optional<at::Tensor>& block_indices) {
  const Inputs in{inference_layout(q, k, &v, chunk_size, top_k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                   max_seqlen_k),
                  chunk_size, top_k, causal};
  return backward(in, dout, dlse, q, k, v, o, lse, scale, block_indices);
}

}  // namespace

void set_routed_attention_bwd_workspace(int64_t bytes) { g_workspace_override = bytes < 0 ? -1 : bytes; }

RoutedAttentionBwdStats routed_attention_bwd_stats() {
  return {workspace_budget(), g_stat_phases.load(), g_stat_buffered_phases.load(), g_stat_workspace_bytes.load()};
}

}  // namespace cpu
}  // namespace routing_kernels

TORCH_LIBRARY_IMPL(routing_kernels, CPU, m) {
  m.impl("routed_attention_bwd", TORCH_FN(routing_kernels::cpu::routed_attention_bwd_cpu));
  m.impl("routed_attention_inference_bwd", TORCH_FN(routing_kernels::cpu::routed_attention_inference_bwd_cpu));
}
