// The shape of a chunked (dense or varlen) input, as check_chunk_mean_args (chunk_mean.h) derives it. No torch
// headers: the raw-pointer CUDA launch code and the sanitizer driver (csrc/emu) use it without libtorch.
#pragma once

#include <cstdint>

namespace routing_kernels {

struct ChunkMeanShape {
  bool varlen;
  int64_t num_seqs;    // B (dense) or S (varlen)
  int64_t seqlen;      // N (dense); 0 for varlen, where cu_seqlens gives each length
  int64_t num_tokens;  // B * N or T
  int64_t num_heads;   // H
  int64_t head_dim;    // D
  int64_t num_chunks;  // M
};

inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

}  // namespace routing_kernels
