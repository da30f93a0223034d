// Chunk geometries of the CPU chunk kernels (cpu/chunk_mean.cpp, cpu/chunk_route.cpp): where the tokens of each
// output slot (sequence s, chunk c; slot = s * M + c) live, and how the work is spread over threads. Each kernel is
// written once, as a template over the geometry:
//
//   UniformChunks  one integer chunk_size for the whole batch (dense or varlen). The work items are the slots, in
//                  the parallel partition the kernels always had: same summation order, same numbers, same speed.
//   TableChunks    explicit boundaries (chunk_table.h), sizes that may differ 1000x within a batch. Threads get
//                  equal numbers of TOKENS, not of slots, and a chunk longer than split_tokens() is cut into
//                  pieces; a reduction over such a chunk writes one partial row per piece into a workspace, and
//                  for_each_split adds them up in piece order after the parallel pass, so the result does not
//                  depend on the thread count. A chunk no longer than split_tokens() is one piece, summed exactly
//                  as UniformChunks sums it: a uniform table gives the integer path's numbers bit for bit.
//
// CPU only (at::parallel_for); the device-independent argument checks are in chunk_table.h.
#pragma once

#include <ATen/Parallel.h>
#include <routing_kernels/chunk_shape.h>
#include <routing_kernels/chunk_table.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace routing_kernels {

constexpr int64_t GRAIN_VALUES = 32768;  // token values per parallel task, ATen's usual grain

struct SeqRange {
  int64_t begin, end;
};

// One unit of parallel work: tokens [first, first + count) of output slot `slot`.
struct ChunkPiece {
  int64_t slot;         // s * M + c
  int64_t first;        // packed index of the piece's first token
  int64_t count;        // tokens in the piece; 0 when sequence s has no chunk c
  int64_t chunk_count;  // tokens in the whole chunk (0: no chunk)
  int64_t part;         // -1: the piece is the whole chunk; else its row of partial results
};

// A chunk cut into pieces: its partial rows are [part_begin, part_end), in token order.
struct ChunkSplit {
  int64_t slot, chunk_count, part_begin, part_end;
};

// Pieces of one chunk hold at most this many tokens: 4 grains (128K values, 512 KB of fp32 at H * D = 512, where it
// is 256 tokens). Two threads then end within 256 tokens of each other; at the CPU benchmark shape (32K tokens)
// that is 1.6% of the pass. Chunks up to this long stay whole, so the uniform tables of the benchmark (128) and
// random tables of mean 128 never pay for a workspace.
inline int64_t split_tokens(int64_t row) { return std::max<int64_t>(1, 4 * GRAIN_VALUES / std::max<int64_t>(1, row)); }

class UniformChunks {
 public:
  UniformChunks(const ChunkMeanShape& shape, const int32_t* cu_seqlens, int64_t chunk_size)
      : shape(shape), cu_(cu_seqlens), chunk_size_(chunk_size) {}

  const ChunkMeanShape shape;

  int64_t row() const { return shape.num_heads * shape.head_dim; }
  int64_t seq_tokens(int64_t s) const { return cu_ ? int64_t{cu_[s + 1]} - cu_[s] : shape.seqlen; }
  int64_t chunk_count(int64_t slot) const { return std::max<int64_t>(0, span(slot).count); }
  int64_t num_parts() const { return 0; }

  // Calls make() once per parallel task for a worker (which may own scratch buffers), then worker(piece) for every
  // slot of sequences [seqs.begin, seqs.end) that the task owns.
  template <typename MakeWorker>
  void for_each_piece(SeqRange seqs, MakeWorker make) const {
    const int64_t M = shape.num_chunks;
    // Each slot reads or writes up to chunk_size * row values.
    const int64_t grain = std::max<int64_t>(1, GRAIN_VALUES / std::max<int64_t>(1, chunk_size_ * row()));
    at::parallel_for(seqs.begin * M, seqs.end * M, grain, [&](int64_t begin, int64_t end) {
      auto work = make();
      for (int64_t slot = begin; slot < end; ++slot) {
        const Span sp = span(slot);
        const int64_t n = std::max<int64_t>(0, sp.count);
        work(ChunkPiece{slot, sp.first, n, n, -1});
      }
    });
  }

  // No chunk is ever split.
  template <typename Fn>
  void for_each_split(SeqRange, Fn) const {}

 private:
  struct Span {
    int64_t first, count;  // count <= 0: the sequence is too short to have that chunk
  };
  Span span(int64_t slot) const {
    const int64_t i_s = slot / shape.num_chunks, i_c = slot % shape.num_chunks;
    const int64_t bos = cu_ ? int64_t{cu_[i_s]} : i_s * shape.seqlen;
    return {bos + i_c * chunk_size_, std::min(chunk_size_, seq_tokens(i_s) - i_c * chunk_size_)};
  }

  const int32_t* cu_;  // cu_seqlens, nullptr for a dense batch
  int64_t chunk_size_;
};

// The work list is built on the host in O(S * M + T / split_tokens) per call: a (slot, piece) entry per piece and
// the running token cost, where the threads' ranges are cut.
class TableChunks {
 public:
  // The table must have passed check_chunk_table_values (chunk_table.h).
  TableChunks(const ChunkMeanShape& shape, const int32_t* cu_chunks, const int32_t* seq_chunks)
      : shape(shape), cu_(cu_chunks), seq_(seq_chunks) {
    const int64_t S = shape.num_seqs, M = shape.num_chunks, split = split_tokens(row());
    seq_piece_.reserve(S + 1);
    seq_split_.reserve(S + 1);
    pieces_.reserve(S * M);
    for (int64_t s = 0; s < S; ++s) {
      seq_piece_.push_back(static_cast<int64_t>(pieces_.size()));
      seq_split_.push_back(static_cast<int64_t>(splits_.size()));
      const int64_t g0 = seq_[s], owned = int64_t{seq_[s + 1]} - g0;
      for (int64_t c = 0; c < M; ++c) {
        const int64_t slot = s * M + c;
        if (c >= owned) {
          pieces_.push_back({slot, 0, 0, 0, -1});
          continue;
        }
        const int64_t first = cu_[g0 + c], len = int64_t{cu_[g0 + c + 1]} - first;
        if (len <= split) {
          pieces_.push_back({slot, first, len, len, -1});
          continue;
        }
        const int64_t part_begin = num_parts_;
        for (int64_t o = 0; o < len; o += split) {
          pieces_.push_back({slot, first + o, std::min(split, len - o), len, num_parts_++});
        }
        splits_.push_back({slot, len, part_begin, num_parts_});
      }
    }
    seq_piece_.push_back(static_cast<int64_t>(pieces_.size()));
    seq_split_.push_back(static_cast<int64_t>(splits_.size()));
    // Piece i costs its tokens plus one for the per-slot work (zero fill, H scores), which is about a token's.
    cost_.resize(pieces_.size() + 1, 0);
    for (size_t i = 0; i < pieces_.size(); ++i) cost_[i + 1] = cost_[i] + pieces_[i].count + 1;
  }

  const ChunkMeanShape shape;

  int64_t row() const { return shape.num_heads * shape.head_dim; }
  int64_t seq_tokens(int64_t s) const { return int64_t{cu_[seq_[s + 1]]} - cu_[seq_[s]]; }
  int64_t chunk_count(int64_t slot) const {
    const int64_t s = slot / shape.num_chunks, c = slot % shape.num_chunks, g = int64_t{seq_[s]} + c;
    return g < seq_[s + 1] ? int64_t{cu_[g + 1]} - cu_[g] : 0;
  }
  int64_t num_parts() const { return num_parts_; }

  // As UniformChunks::for_each_piece; the threads' ranges are cut in token cost, so a thread gets the pieces
  // whose cost starts in its range.
  template <typename MakeWorker>
  void for_each_piece(SeqRange seqs, MakeWorker make) const {
    const int64_t* cost = cost_.data();
    const int64_t pb = seq_piece_[seqs.begin], pe = seq_piece_[seqs.end];
    const int64_t grain = std::max<int64_t>(1, GRAIN_VALUES / std::max<int64_t>(1, row()));  // tokens
    at::parallel_for(cost[pb], cost[pe], grain, [&](int64_t begin, int64_t end) {
      const int64_t i0 = std::lower_bound(cost + pb, cost + pe, begin) - cost;
      const int64_t i1 = std::lower_bound(cost + pb, cost + pe, end) - cost;
      auto work = make();
      for (int64_t i = i0; i < i1; ++i) work(pieces_[i]);
    });
  }

  // fn(split) for every split chunk of sequences [seqs.begin, seqs.end), in parallel.
  template <typename Fn>
  void for_each_split(SeqRange seqs, Fn fn) const {
    at::parallel_for(seq_split_[seqs.begin], seq_split_[seqs.end], 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) fn(splits_[i]);
    });
  }

 private:
  const int32_t* cu_;   // cu_chunks (K + 1,)
  const int32_t* seq_;  // seq_chunks (S + 1,)
  std::vector<ChunkPiece> pieces_;
  std::vector<int64_t> cost_;       // cost_[i]: token cost of pieces [0, i)
  std::vector<int64_t> seq_piece_;  // (S + 1,): first piece of each sequence
  std::vector<ChunkSplit> splits_;
  std::vector<int64_t> seq_split_;  // (S + 1,): first split chunk of each sequence
  int64_t num_parts_ = 0;
};

// A CPU op's chunk table after its checks (chunk_table.h), with the contiguous offsets the geometry points into.
struct CheckedTable {
  ChunkMeanShape shape;
  at::Tensor cu, seq;
  TableChunks geometry() const {
    return TableChunks(shape, cu.const_data_ptr<int32_t>(), seq.const_data_ptr<int32_t>());
  }
};

inline CheckedTable check_cpu_chunk_table(const at::Tensor& x, const at::Tensor& cu_chunks,
                                          const at::Tensor& seq_chunks, int64_t max_chunks) {
  CheckedTable t{check_chunk_table_args(x, cu_chunks, seq_chunks, max_chunks, c10::DeviceType::CPU),
                 cu_chunks.contiguous(), seq_chunks.contiguous()};
  check_chunk_table_values(t.cu.const_data_ptr<int32_t>(), t.cu.numel() - 1, t.seq.const_data_ptr<int32_t>(),
                           t.shape.num_seqs, t.shape.num_tokens, max_chunks);
  return t;
}

}  // namespace routing_kernels
