// route_chunks_fwd(Tensor q, Tensor k, int chunk_size, int top_k, bool causal, Tensor? cu_seqlens, int max_seqlen)
//     -> Tensor idx
// routed_attention_fwd(Tensor q, Tensor k, Tensor v, int chunk_size, int top_k, bool causal, Tensor? cu_seqlens,
//                      int max_seqlen, float scale) -> (Tensor o, Tensor lse)
// routed_attention_bwd(Tensor do, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, int chunk_size,
//                      int top_k, bool causal, Tensor? cu_seqlens, int max_seqlen, float scale)
//     -> (Tensor dq, Tensor dk, Tensor dv)
//
//   dense : q (B, N, Hq, D), k (B, N, Hkv, D), v (B, N, Hkv, Dv); cu_seqlens None, max_seqlen ignored
//   varlen: q (T, Hq, D),    k (T, Hkv, D),    v (T, Hkv, Dv);    cu_seqlens int32 (S + 1,), max_seqlen >= L_s
//
// Queries shorter than keys (inference; CPU kernels, csrc/cpu/routed_layout.h):
// route_chunks_inference_fwd(q, k, chunk_size, top_k, causal, cu_seqlens_q?, cu_seqlens_k?, seqused_k?,
//                            max_seqlen_q, max_seqlen_k) -> idx
// routed_attention_inference_fwd(q, k, v, chunk_size, top_k, causal, cu_seqlens_q?, cu_seqlens_k?, seqused_k?,
//                                max_seqlen_q, max_seqlen_k, scale, block_indices?) -> (o, lse)
// routed_attention_inference_bwd(do, dlse, q, k, v, o, lse, <the forward's arguments after v>) -> (dq, dk, dv)
//   q dense (B, Nq, Hq, D) or packed (Tq, Hq, D) with cu_seqlens_q; k / v dense (B, Nk, Hkv, D) with Nq <= Nk,
//   packed (Tk, Hkv, D) with cu_seqlens_k, or a cache (B, capacity, Hkv, D) of which row b holds seqused_k[b] keys.
//   Query i of a sequence with Lq queries and Lk >= Lq keys sits at position Lk - Lq + i (bottom-right aligned).
//   block_indices int32 (.., Hq, top_k) in q's layout replaces the gate: any order, -1 for none, repeats count once,
//   each entry the own chunk or (causal) a chunk ending at or before the query's position; a row with no chunk
//   gets o = 0, lse = -inf, dq = 0. dk / dv rows of a cache past seqused_k are 0.
//
// Hq is a multiple of Hkv; query head h reads kv head h / (Hq / Hkv). idx is int32 (.., Hq, top_k): MoBA's gate,
// the chunks each (token, head) attends to, sorted ascending and padded with -1 (routing_kernels/ops/route_chunks/
// README.md). o (.., Hq, Dv) in q's dtype, lse (.., Hq) fp32 (fp64 for fp64); dq, dk, dv like q, k, v. The maths
// are in routing_kernels/ops/routed_attention/README.md. Shape logic shared by the kernels of every device.
#pragma once

#include <routing_kernels/accum.h>
#include <routing_kernels/chunk_mean.h>

#include <optional>
#include <vector>

namespace routing_kernels {

struct RoutedShape {
  bool varlen;
  int64_t num_seqs;    // B (dense) or S (varlen)
  int64_t seqlen;      // N (dense); 0 for varlen, where cu_seqlens gives each length
  int64_t num_tokens;  // B * N or T
  int64_t q_heads;     // Hq
  int64_t kv_heads;    // Hkv
  int64_t group;       // Hq / Hkv
  int64_t head_dim;    // D
  int64_t v_dim;       // Dv (equal to D for route_chunks, which has no v)
  int64_t num_chunks;  // M: chunks of the longest sequence
};

// First token and length of sequence s (cu: host copy of cu_seqlens, nullptr for dense input).
struct SeqSpan {
  int64_t bos, len;
};
inline SeqSpan seq_span(const RoutedShape& shape, const int32_t* cu, int64_t s) {
  if (!cu) return {s * shape.seqlen, shape.seqlen};
  return {int64_t{cu[s]}, int64_t{cu[s + 1]} - int64_t{cu[s]}};
}

// Same device, dtype, layout rank and tokens as q.
inline void check_routed_like_q(const at::Tensor& t, const at::Tensor& q, const char* name, bool varlen) {
  check_same_device(t, q, name, "q");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  check_rank(t, q.dim(), name, varlen ? "(T, H, D) when cu_seqlens is given" : "(B, N, H, D) when cu_seqlens is None");
  const int64_t lead = varlen ? 1 : 2;
  TORCH_CHECK(t.sizes().slice(0, lead) == q.sizes().slice(0, lead), name, " must have q's leading shape ",
              q.sizes().slice(0, lead), ", got ", t.sizes());
}

// Metadata checks of q, k (and v when given), chunk_size, top_k, cu_seqlens (not its values: see
// check_cu_seqlens_values, host-side only).
inline RoutedShape check_routed_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, int64_t chunk_size,
                                     int64_t top_k, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                     c10::DeviceType device) {
  check_device(q, device, "q");
  check_float_dtype(q, "q");
  check_chunk_size(chunk_size);
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  RoutedShape shape{};
  shape.varlen = cu_seqlens.has_value();
  if (shape.varlen) {
    check_rank(q, 3, "q", "(T, H, D) when cu_seqlens is given");
    check_cu_seqlens(*cu_seqlens, q);
    TORCH_CHECK(max_seqlen >= 0, "max_seqlen must be >= 0, got ", max_seqlen);
    shape.num_seqs = cu_seqlens->numel() - 1;
    shape.num_tokens = q.size(0);
    shape.num_chunks = ceil_div(max_seqlen, chunk_size);
  } else {
    check_rank(q, 4, "q", "(B, N, H, D) when cu_seqlens is None");
    shape.num_seqs = q.size(0);
    shape.seqlen = q.size(1);
    shape.num_tokens = shape.num_seqs * shape.seqlen;
    shape.num_chunks = ceil_div(shape.seqlen, chunk_size);
  }
  check_routed_like_q(k, q, "k", shape.varlen);
  shape.q_heads = q.size(-2);
  shape.kv_heads = k.size(-2);
  TORCH_CHECK(shape.kv_heads >= 1 && shape.q_heads % shape.kv_heads == 0, "the heads of q (", shape.q_heads,
              ") must be a multiple of the heads of k (", shape.kv_heads, ")");
  shape.group = shape.q_heads / shape.kv_heads;
  shape.head_dim = q.size(-1);
  TORCH_CHECK(k.size(-1) == shape.head_dim, "k must have q's head dim ", shape.head_dim, ", got ", k.size(-1));
  shape.v_dim = shape.head_dim;
  if (v) {
    check_routed_like_q(*v, q, "v", shape.varlen);
    TORCH_CHECK(v->size(-2) == shape.kv_heads, "v must have the heads of k (", shape.kv_heads, "), got ", v->size(-2));
    shape.v_dim = v->size(-1);
  }
  return shape;
}

// A tensor of q's tokens: (.., heads, dim) with q's leading shape and dtype `dtype`.
inline void check_routed_token_tensor(const at::Tensor& t, const at::Tensor& q, const RoutedShape& shape,
                                      int64_t heads, int64_t dim, at::ScalarType dtype, const char* name,
                                      const char* layout) {
  check_same_device(t, q, name, "q");
  std::vector<int64_t> want(q.sizes().begin(), q.sizes().end() - 2);
  want.push_back(heads);
  if (dim >= 0) want.push_back(dim);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(want) && t.scalar_type() == dtype, name, " must be ", layout, " = ",
              at::IntArrayRef(want), " in ", dtype, ", got ", t.sizes(), " in ", t.scalar_type());
}

namespace cpu {
// The CPU backward's workspace (cpu/routed_attention_bwd.cpp): the dQ shares of the chunks it processes together stay
// within a budget of ROUTING_KERNELS_CPU_BWD_WORKSPACE_MB megabytes (default 256). Results do not depend on it.
// Tests force another budget (bytes; -1 goes back to the environment's) and read what the last call used.
void set_routed_attention_bwd_workspace(int64_t bytes);
struct RoutedAttentionBwdStats {
  int64_t budget_bytes;     // the budget in force
  int64_t phases;           // last call: phases (ranges of chunk indices processed together)
  int64_t buffered_phases;  // last call: phases of several chunk indices (their shares in a buffer)
  int64_t workspace_bytes;  // last call: the share buffer and the phase index, as allocated
};
RoutedAttentionBwdStats routed_attention_bwd_stats();
}  // namespace cpu

}  // namespace routing_kernels
