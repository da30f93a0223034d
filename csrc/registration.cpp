// The one place where the C++ ops' schemas are declared. FRAGMENT: Python adds more ops to this namespace
// with torch.library.custom_op. Kernels are registered per device in cpu/*.cpp and cuda/*.cu; fake (meta)
// kernels are registered from Python with torch.library.register_fake.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(routing_kernels, m) {
  // Per-chunk mean of x and its backward; see include/routing_kernels/chunk_mean.h for the contract.
  m.def("chunk_mean_fwd(Tensor x, int chunk_size, Tensor? cu_seqlens, int max_seqlen) -> Tensor");
  m.def("chunk_mean_bwd(Tensor grad_mean, Tensor x, int chunk_size, Tensor? cu_seqlens, int max_seqlen) -> Tensor");
  // chunk_route forward and backward; see include/routing_kernels/chunk_route.h.
  m.def(
      "chunk_route_fwd(Tensor x, Tensor query, int chunk_size, Tensor? cu_seqlens, int max_seqlen, float scale)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "chunk_route_bwd(Tensor dy, Tensor dweights, Tensor dsummary, Tensor x, Tensor query, Tensor weights,"
      " int chunk_size, Tensor? cu_seqlens, int max_seqlen, float scale) -> (Tensor, Tensor)");
  // The same two ops over explicit chunk boundaries (dynamic chunking): packed x (T, H, D); chunk g spans tokens
  // [cu_chunks[g], cu_chunks[g+1]) (int32, K+1 entries); sequence s owns chunks [seq_chunks[s], seq_chunks[s+1])
  // (int32, S+1); outputs are padded to max_chunks per sequence. See routing_kernels/_layout.py (ChunkTable).
  m.def("chunk_mean_table_fwd(Tensor x, Tensor cu_chunks, Tensor seq_chunks, int max_chunks) -> Tensor");
  m.def(
      "chunk_mean_table_bwd(Tensor grad_mean, Tensor x, Tensor cu_chunks, Tensor seq_chunks, int max_chunks)"
      " -> Tensor");
  m.def(
      "chunk_route_table_fwd(Tensor x, Tensor query, Tensor cu_chunks, Tensor seq_chunks, int max_chunks,"
      " float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "chunk_route_table_bwd(Tensor dy, Tensor dweights, Tensor dsummary, Tensor x, Tensor query, Tensor weights,"
      " Tensor cu_chunks, Tensor seq_chunks, int max_chunks, float scale) -> (Tensor, Tensor)");
  // MoBA-style routed attention: the chunk selection, forward and backward; see
  // include/routing_kernels/routed_attention.h.
  m.def(
      "route_chunks_fwd(Tensor q, Tensor k, int chunk_size, int top_k, bool causal, Tensor? cu_seqlens,"
      " int max_seqlen) -> Tensor");
  m.def(
      "routed_attention_fwd(Tensor q, Tensor k, Tensor v, int chunk_size, int top_k, bool causal,"
      " Tensor? cu_seqlens, int max_seqlen, float scale) -> (Tensor, Tensor)");
  m.def(
      "routed_attention_bwd(Tensor do, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse,"
      " int chunk_size, int top_k, bool causal, Tensor? cu_seqlens, int max_seqlen, float scale)"
      " -> (Tensor, Tensor, Tensor)");
  // The same with queries shorter than keys (chunked prefill: dense Nq <= Nk, or packed with cu_seqlens_q and
  // cu_seqlens_k; a dense cache with seqused_k) and, for the attention, a caller's selection block_indices. CPU
  // kernels only (the Triton kernels take these layouts from Python); see include/routing_kernels/routed_attention.h.
  m.def(
      "route_chunks_inference_fwd(Tensor q, Tensor k, int chunk_size, int top_k, bool causal, Tensor? cu_seqlens_q,"
      " Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k) -> Tensor");
  m.def(
      "routed_attention_inference_fwd(Tensor q, Tensor k, Tensor v, int chunk_size, int top_k, bool causal,"
      " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k,"
      " float scale, Tensor? block_indices) -> (Tensor, Tensor)");
  m.def(
      "routed_attention_inference_bwd(Tensor do, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse,"
      " int chunk_size, int top_k, bool causal, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k,"
      " int max_seqlen_q, int max_seqlen_k, float scale, Tensor? block_indices) -> (Tensor, Tensor, Tensor)");
  // Routed attention of the last Lq queries of each row of a KV cache (decode), gate on the cache's chunk key sums;
  // see include/routing_kernels/routed_decode.h. Forward only.
  m.def(
      "routed_decode_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor key_sums, Tensor seqused_k, int chunk_size,"
      " int top_k, bool causal, float scale) -> (Tensor, Tensor)");
}
