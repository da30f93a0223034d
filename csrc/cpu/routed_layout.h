// Where each sequence's queries and keys are, for the CPU kernels of route_chunks and routed_attention (internal to
// csrc/cpu/). One description serves every layout: the training one (q and k alike, dense or cu_seqlens) and the
// inference ones (queries shorter than keys: dense Nq <= Nk, packed with cu_seqlens_q / cu_seqlens_k, or a dense
// cache (B, capacity, ..) with seqused_k). The kernels read keys at a sequence's own key offset, so no layout is
// copied into another.
//
// Query i of a sequence with Lq queries and Lk keys sits at position p = Lk - Lq + i (bottom-right aligned,
// Lq <= Lk): own chunk p / C, eligible chunks (j + 1) * C <= p when causal, keys <= p.
#pragma once

#include <routing_kernels/routed_attention.h>

#include <optional>
#include <vector>

namespace routing_kernels {
namespace cpu {

struct SeqPair {
  int64_t q_bos, q_len;  // the sequence's query rows [q_bos, q_bos + q_len) of q's (tokens, Hq, D) view
  int64_t k_bos, k_len;  // its key rows [k_bos, k_bos + k_len) of k's (key rows, Hkv, D) view
  int64_t offset() const { return k_len - q_len; }  // position of query 0
};

struct RoutedLayout {
  RoutedShape sh;         // heads and dims; num_tokens = query rows; num_chunks = chunks of the longest key run
  int64_t num_keys = 0;   // key rows of k's flat view (B * capacity for a cache)
  bool keys_covered = true;  // every key row belongs to a sequence (false for a cache: dk / dv rows past seqused_k)
  std::vector<SeqPair> seqs;
  int64_t num_seqs() const { return static_cast<int64_t>(seqs.size()); }
  const SeqPair& operator[](int64_t s) const { return seqs[s]; }
};

// The training layout: checks as check_routed_args, then the spans (host values of cu_seqlens validated).
RoutedLayout training_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, int64_t chunk_size,
                             int64_t top_k, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen);

// Queries shorter than (or as long as) keys. q dense (B, Nq, Hq, D), or packed (Tq, Hq, D) with cu_seqlens_q;
// k / v: dense (B, Nk, Hkv, D) with dense q; packed (Tk, ..) with cu_seqlens_k (needs cu_seqlens_q); packed like q
// when only cu_seqlens_q is given; or a cache (B, capacity, ..) with seqused_k int32 (B,). Errors name the argument.
RoutedLayout inference_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, int64_t chunk_size,
                              int64_t top_k, const std::optional<at::Tensor>& cu_seqlens_q,
                              const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
                              int64_t max_seqlen_q, int64_t max_seqlen_k);

// A caller's selection (int32 (.., Hq, top_k) in q's layout, any order, -1 for none, repeats allowed) checked
// (each entry -1, the own chunk, or causally eligible) and normalised as the gate's output: per row ascending,
// each chunk once, -1 padding at the end. Returns int32 (query rows, Hq, top_k), contiguous.
at::Tensor normalized_block_indices(const at::Tensor& block_indices, const at::Tensor& q, const RoutedLayout& layout,
                                    int64_t chunk_size, int64_t top_k, bool causal);

// MoBA's gate (defined in route_chunks.cpp) on tensors already in the accumulation type, contiguous: q (query rows,
// Hq, D), k (key rows, Hkv, D). Returns int32 (query rows, Hq, top_k), ascending, -1 padded.
at::Tensor route_chunks_layout(const at::Tensor& q_acc, const at::Tensor& k_acc, const RoutedLayout& layout,
                               int64_t chunk_size, int64_t top_k, bool causal);

}  // namespace cpu
}  // namespace routing_kernels
