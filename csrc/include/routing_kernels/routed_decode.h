// routed_decode_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor key_sums, Tensor seqused_k, int chunk_size,
//                   int top_k, bool causal, float scale) -> (Tensor o, Tensor lse)
//
// Routed (MoBA) attention of the last few queries of each row of a KV cache: decode and speculative decode.
//
//   q          (B, Lq, Hq, D)        fp32/fp16/bf16/fp64, any strides; query i of row b sits at position
//                                    p = seqused_k[b] - Lq + i (bottom-right aligned, as flash-attn's cache_seqlens)
//   k_cache    (B, cap, Hkv, D)      q's dtype; row b holds seqused_k[b] valid keys, the rest is never read
//   v_cache    (B, cap, Hkv, Dv)     q's dtype
//   key_sums   (B, ceil(cap / C), Hkv, D)  the accumulation type (fp32, fp64 for fp64): sum of k over each chunk of
//                                    the valid keys (RoutedKVCache.key_sums); chunks past a row's keys are not read
//   seqused_k  (B,) int32, Lq <= seqused_k[b] <= cap
//   -> o (B, Lq, Hq, Dv) in q's dtype, lse (B, Lq, Hq) in the accumulation type.
//
// Semantics are routed_attention_ref(q, k_cache, v_cache, C, top_k, causal, seqused_k=seqused_k, scale=scale):
// gate g_j = <q, key_sums[b, j] / count_j> (accumulation type, unscaled; count_j = C, or the remainder for the last
// chunk); the own chunk p / C is always selected, plus the top_k - 1 largest gates among the other eligible chunks
// ((j + 1) * C <= p when causal, every other chunk of the row when not; ties to the lower index); then exact softmax
// attention (scale) over the keys of the selected chunks, restricted to positions <= p when causal. Query head h
// reads kv head h / (Hq / Hkv).
//
// Cost: the gate reads key_sums[b, :ceil(seqused_k[b] / C)], the attention reads the K/V rows of the chunks some
// query of the kv group selected (each once per step), never the rest of the cache.
#pragma once

#include <routing_kernels/chunk_mean.h>
#include <routing_kernels/routed_attention.h>

namespace routing_kernels {

struct DecodeShape {
  int64_t batch;       // B
  int64_t q_len;       // Lq
  int64_t q_heads;     // Hq
  int64_t kv_heads;    // Hkv
  int64_t group;       // Hq / Hkv
  int64_t head_dim;    // D
  int64_t v_dim;       // Dv
  int64_t capacity;    // cap
  int64_t num_chunks;  // M = ceil(cap / C), the chunks key_sums has room for
};

// Metadata checks (shapes, dtypes, devices) of every argument; the values of seqused_k are the kernel's to check.
inline DecodeShape check_routed_decode_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                            const at::Tensor& key_sums, const at::Tensor& seqused_k,
                                            int64_t chunk_size, int64_t top_k, c10::DeviceType device) {
  check_device(q, device, "q");
  check_float_dtype(q, "q");
  check_chunk_size(chunk_size);
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  check_rank(q, 4, "q", "(B, Lq, Hq, D)");
  const char* layouts[] = {"(B, capacity, Hkv, D)", "(B, capacity, Hkv, Dv)"};
  const at::Tensor* caches[] = {&k_cache, &v_cache};
  const char* names[] = {"k_cache", "v_cache"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *caches[i];
    check_same_device(t, q, names[i], "q");
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), names[i], " must have q's dtype ", q.scalar_type(), ", got ",
                t.scalar_type());
    check_rank(t, 4, names[i], layouts[i]);
    TORCH_CHECK(t.size(0) == q.size(0), names[i], " must have q's batch size ", q.size(0), ", got shape ", t.sizes());
  }
  DecodeShape sh{};
  sh.batch = q.size(0);
  sh.q_len = q.size(1);
  sh.q_heads = q.size(2);
  sh.head_dim = q.size(3);
  sh.capacity = k_cache.size(1);
  sh.kv_heads = k_cache.size(2);
  TORCH_CHECK(sh.kv_heads >= 1 && sh.q_heads % sh.kv_heads == 0, "the heads of q (", sh.q_heads,
              ") must be a multiple of the heads of k_cache (", sh.kv_heads, ")");
  sh.group = sh.q_heads / sh.kv_heads;
  TORCH_CHECK(k_cache.size(3) == sh.head_dim, "k_cache must have q's head dim ", sh.head_dim, ", got shape ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.size(1) == sh.capacity && v_cache.size(2) == sh.kv_heads, "v_cache must be (B, capacity, Hkv, Dv)"
              " with k_cache's capacity and heads (", sh.capacity, ", ", sh.kv_heads, "), got shape ", v_cache.sizes());
  sh.v_dim = v_cache.size(3);
  sh.num_chunks = ceil_div(sh.capacity, chunk_size);
  check_same_device(key_sums, q, "key_sums", "q");
  const auto acc = accum_type(q.scalar_type());
  TORCH_CHECK(key_sums.scalar_type() == acc, "key_sums must be in the accumulation type ", acc, " (fp64 for fp64 q, "
              "else fp32), got ", key_sums.scalar_type());
  TORCH_CHECK(key_sums.sizes() == at::IntArrayRef({sh.batch, sh.num_chunks, sh.kv_heads, sh.head_dim}),
              "key_sums must be (B, ceil(capacity / chunk_size), Hkv, D) = (", sh.batch, ", ", sh.num_chunks, ", ",
              sh.kv_heads, ", ", sh.head_dim, "), got shape ", key_sums.sizes());
  check_same_device(seqused_k, q, "seqused_k", "q");
  TORCH_CHECK(seqused_k.scalar_type() == at::kInt, "seqused_k must be int32, got ", seqused_k.scalar_type());
  TORCH_CHECK(seqused_k.dim() == 1 && seqused_k.size(0) == sh.batch, "seqused_k must be (B,) = (", sh.batch,
              ",), got shape ", seqused_k.sizes());
  return sh;
}

}  // namespace routing_kernels
