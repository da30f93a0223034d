// Arguments of the chunk-table ops (dynamic chunking), shared by every device:
//
//   chunk_mean_table_fwd(x, cu_chunks, seq_chunks, max_chunks)             -> mean (S, max_chunks, H, D)
//   chunk_mean_table_bwd(grad_mean, x, cu_chunks, seq_chunks, max_chunks)  -> dx like x
//   chunk_route_table_fwd(x, query, cu_chunks, seq_chunks, max_chunks, scale)      -> (y, weights, summary)
//   chunk_route_table_bwd(dy, dweights, dsummary, x, query, weights, cu_chunks, seq_chunks, max_chunks, scale)
//                                                                           -> (dx, dquery)
//
// x is packed (T, H, D). Chunk g spans tokens [cu_chunks[g], cu_chunks[g+1]) (int32, K + 1 entries, 0 = cu_chunks[0]
// < ... < cu_chunks[K] = T); sequence s owns the chunks [seq_chunks[s], seq_chunks[s+1]) (int32, S + 1 entries,
// none for an empty sequence, seq_chunks[0] = 0, seq_chunks[S] = K); local chunk c of sequence s is global chunk
// seq_chunks[s] + c. Outputs are padded to max_chunks chunks per sequence; semantics are those of the integer-chunk
// ops (chunk_mean.h, chunk_route.h) with the chunks from the table.
#pragma once

#include <routing_kernels/checks.h>
#include <routing_kernels/chunk_shape.h>

#include <cstdint>

namespace routing_kernels {

// A chunk-table offsets tensor: int32, 1-D, at least one entry, on x's device. `layout` names its shape.
inline void check_table_offsets(const at::Tensor& t, const at::Tensor& x, const char* name, const char* layout) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  check_rank(t, 1, name, layout);
  TORCH_CHECK(t.numel() >= 1, name, " must hold at least one offset ", layout, ", got none");
  check_same_device(t, x, name, "x");
}

// Shapes and dtypes of (x, cu_chunks, seq_chunks, max_chunks). The result is the varlen shape of the integer
// ops with M = max_chunks, so their checks of query and gradients (chunk_mean.h, chunk_route.h) apply unchanged.
inline ChunkMeanShape check_chunk_table_args(const at::Tensor& x, const at::Tensor& cu_chunks,
                                             const at::Tensor& seq_chunks, int64_t max_chunks,
                                             c10::DeviceType device) {
  check_device(x, device, "x");
  check_float_dtype(x, "x");
  check_rank(x, 3, "x", "(T, H, D) (packed tokens; the chunk-table ops take no dense batch)");
  check_table_offsets(cu_chunks, x, "cu_chunks", "(K + 1,)");
  check_table_offsets(seq_chunks, x, "seq_chunks", "(S + 1,)");
  TORCH_CHECK(max_chunks >= 0, "max_chunks must be >= 0, got ", max_chunks);
  ChunkMeanShape shape{};
  shape.varlen = true;
  shape.num_seqs = seq_chunks.numel() - 1;
  shape.num_tokens = x.size(0);
  shape.num_heads = x.size(1);
  shape.head_dim = x.size(2);
  shape.num_chunks = max_chunks;
  return shape;
}

// Values of host-side tables (CPU): every chunk inside x and at least one token long, every sequence's chunks
// inside the table and at most max_chunks of them. With these a kernel cannot read or write out of bounds.
// Checking device-side tables would cost a synchronisation, so GPU kernels trust them (the Python layer checks).
inline void check_chunk_table_values(const int32_t* cu_chunks, int64_t num_chunks_total, const int32_t* seq_chunks,
                                     int64_t num_seqs, int64_t num_tokens, int64_t max_chunks) {
  TORCH_CHECK(cu_chunks[0] == 0, "cu_chunks[0] must be 0, got ", cu_chunks[0]);
  for (int64_t g = 0; g < num_chunks_total; ++g) {
    TORCH_CHECK(cu_chunks[g + 1] > cu_chunks[g], "cu_chunks must be strictly increasing (chunks of >= 1 token), got ",
                "cu_chunks[", g, "]=", cu_chunks[g], " >= cu_chunks[", g + 1, "]=", cu_chunks[g + 1]);
  }
  TORCH_CHECK(cu_chunks[num_chunks_total] == num_tokens, "cu_chunks[-1] must equal the number of tokens of x (",
              num_tokens, "), got ", cu_chunks[num_chunks_total]);
  TORCH_CHECK(seq_chunks[0] == 0, "seq_chunks[0] must be 0, got ", seq_chunks[0]);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t owned = int64_t{seq_chunks[s + 1]} - seq_chunks[s];
    TORCH_CHECK(owned >= 0, "seq_chunks must be non-decreasing, got seq_chunks[", s, "]=", seq_chunks[s],
                " > seq_chunks[", s + 1, "]=", seq_chunks[s + 1]);
    TORCH_CHECK(owned <= max_chunks, "max_chunks (", max_chunks, ") is below the ", owned,
                " chunks of sequence ", s, " in seq_chunks");
  }
  TORCH_CHECK(seq_chunks[num_seqs] == num_chunks_total,
              "seq_chunks[-1] must equal the number of chunks in cu_chunks (K = cu_chunks.numel() - 1 = ",
              num_chunks_total, "), got ", seq_chunks[num_seqs]);
}

}  // namespace routing_kernels
