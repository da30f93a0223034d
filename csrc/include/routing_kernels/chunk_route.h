// chunk_route_fwd(Tensor x, Tensor query, int chunk_size, Tensor? cu_seqlens, int max_seqlen, float scale)
//     -> (Tensor y, Tensor weights, Tensor summary)
// chunk_route_bwd(Tensor dy, Tensor dweights, Tensor dsummary, Tensor x, Tensor query, Tensor weights,
//                 int chunk_size, Tensor? cu_seqlens, int max_seqlen, float scale) -> (Tensor dx, Tensor dquery)
//
// Layouts as chunk_mean_fwd (chunk_mean.h); query (H, D) shared or (S, H, D). Per sequence s and head h:
//   score_i = scale * <query, mean_i>, w = softmax over the sequence's chunks, y_t = w_{chunk(t)} x_t,
//   summary = sum_i w_i mean_i. weights (S, H, M) in the accumulation type (fp32, fp64 for fp64), 0 for missing
//   chunks; y and summary in x's dtype. The backward formulas are in routing_kernels/ops/chunk_route/README.md.
#pragma once

#include <routing_kernels/accum.h>
#include <routing_kernels/chunk_mean.h>

namespace routing_kernels {

inline void check_chunk_route_query(const at::Tensor& query, const at::Tensor& x, const ChunkMeanShape& shape,
                                    const char* name = "query") {
  check_same_device(query, x, name, "x");
  TORCH_CHECK(query.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
              query.scalar_type());
  const bool shared = query.dim() == 2;
  TORCH_CHECK((shared || (query.dim() == 3 && query.size(0) == shape.num_seqs)) && query.size(-2) == shape.num_heads &&
                  query.size(-1) == shape.head_dim,
              name, " must be (H, D) or (S, H, D) = (", shape.num_seqs, ", ", shape.num_heads, ", ", shape.head_dim,
              "), got ", query.sizes());
}

// The gradients and saved weights chunk_route_bwd receives: devices, shapes and dtypes, named in the message.
inline void check_chunk_route_grads(const at::Tensor& dy, const at::Tensor& dweights, const at::Tensor& dsummary,
                                    const at::Tensor& weights, const at::Tensor& x, const ChunkMeanShape& sh) {
  const int64_t S = sh.num_seqs, M = sh.num_chunks, H = sh.num_heads, D = sh.head_dim;
  check_same_device(dy, x, "dy", "x");
  check_same_device(dweights, x, "dweights", "x");
  check_same_device(dsummary, x, "dsummary", "x");
  check_same_device(weights, x, "weights", "x");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "dy must match x, got ", dy.sizes());
  TORCH_CHECK(weights.sizes() == at::IntArrayRef({S, H, M}) && weights.scalar_type() == accum_type(x.scalar_type()),
              "weights must be (S, H, M) = (", S, ", ", H, ", ", M, ") in ", accum_type(x.scalar_type()), ", got ", weights.sizes());
  TORCH_CHECK(dweights.sizes() == weights.sizes(), "dweights must match weights, got ", dweights.sizes());
  TORCH_CHECK(dsummary.sizes() == at::IntArrayRef({S, H, D}) && dsummary.scalar_type() == x.scalar_type(),
              "dsummary must be (S, H, D) in x's dtype, got ", dsummary.sizes());
}

}  // namespace routing_kernels
