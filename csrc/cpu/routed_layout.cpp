// Layouts of the CPU route_chunks / routed_attention kernels (see routed_layout.h): argument checks that name the
// argument, and the per-sequence spans read from host offsets.
#include "routed_layout.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace routing_kernels {
namespace cpu {
namespace {

const int32_t* host_offsets(const at::Tensor& cu, at::Tensor& keep) {
  keep = cu.contiguous();
  return keep.const_data_ptr<int32_t>();
}

void check_heads_and_dims(RoutedShape& sh, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v) {
  sh.q_heads = q.size(-2);
  sh.kv_heads = k.size(-2);
  TORCH_CHECK(sh.kv_heads >= 1 && sh.q_heads % sh.kv_heads == 0, "the heads of q (", sh.q_heads,
              ") must be a multiple of the heads of k (", sh.kv_heads, ")");
  sh.group = sh.q_heads / sh.kv_heads;
  sh.head_dim = q.size(-1);
  TORCH_CHECK(k.size(-1) == sh.head_dim, "k must have q's head dim ", sh.head_dim, ", got ", k.size(-1));
  sh.v_dim = sh.head_dim;
  if (v) {
    TORCH_CHECK(v->dim() == k.dim() && v->sizes().slice(0, k.dim() - 2) == k.sizes().slice(0, k.dim() - 2),
                "v must have the key rows of k ", k.sizes().slice(0, k.dim() - 2), ", got shape ", v->sizes());
    TORCH_CHECK(v->size(-2) == sh.kv_heads, "v must have the heads of k (", sh.kv_heads, "), got ", v->size(-2));
    sh.v_dim = v->size(-1);
  }
}

}  // namespace

RoutedLayout training_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, int64_t chunk_size,
                             int64_t top_k, const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  RoutedLayout L;
  L.sh = check_routed_args(q, k, v, chunk_size, top_k, cu_seqlens, max_seqlen, c10::DeviceType::CPU);
  L.num_keys = L.sh.num_tokens;
  at::Tensor keep;
  const int32_t* cu = nullptr;
  if (L.sh.varlen) {
    cu = host_offsets(*cu_seqlens, keep);
    check_cu_seqlens_values(cu, L.sh.num_seqs, L.sh.num_tokens, max_seqlen);
  }
  L.seqs.resize(L.sh.num_seqs);
  for (int64_t s = 0; s < L.sh.num_seqs; ++s) {
    const SeqSpan sp = seq_span(L.sh, cu, s);
    L.seqs[s] = {sp.bos, sp.len, sp.bos, sp.len};
  }
  return L;
}

RoutedLayout inference_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, int64_t chunk_size,
                              int64_t top_k, const std::optional<at::Tensor>& cu_seqlens_q,
                              const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
                              int64_t max_seqlen_q, int64_t max_seqlen_k) {
  check_device(q, c10::DeviceType::CPU, "q");
  check_float_dtype(q, "q");
  check_chunk_size(chunk_size);
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1, got ", top_k);
  TORCH_CHECK(!(cu_seqlens_k && seqused_k), "pass either cu_seqlens_k (packed keys) or seqused_k (a dense cache), "
              "not both");
  RoutedLayout L;
  RoutedShape& sh = L.sh;
  sh.varlen = cu_seqlens_q.has_value();
  if (sh.varlen) {
    check_rank(q, 3, "q", "(T_q, Hq, D) when cu_seqlens_q is given");
    check_cu_seqlens(*cu_seqlens_q, q, "cu_seqlens_q");
    TORCH_CHECK(max_seqlen_q >= 0, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
    sh.num_seqs = cu_seqlens_q->numel() - 1;
    sh.num_tokens = q.size(0);
  } else {
    check_rank(q, 4, "q", "(B, N_q, Hq, D) when cu_seqlens_q is None");
    sh.num_seqs = q.size(0);
    sh.seqlen = q.size(1);
    sh.num_tokens = sh.num_seqs * sh.seqlen;
  }
  // k and v: the key layout, then the same device and dtype as q.
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{v, "v"}}) {
    if (t == nullptr) continue;
    check_same_device(*t, q, name, "q");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                t->scalar_type());
    if (seqused_k) {
      check_rank(*t, 4, name, "(B, capacity, Hkv, D) with seqused_k");
      TORCH_CHECK(t->size(0) == sh.num_seqs, name, " has ", t->size(0), " cache rows but q has ", sh.num_seqs,
                  " sequences");
    } else if (cu_seqlens_k) {
      TORCH_CHECK(sh.varlen, "cu_seqlens_k needs packed queries too (cu_seqlens_q)");
      check_rank(*t, 3, name, "(T_k, Hkv, D) with cu_seqlens_k");
    } else if (sh.varlen) {
      check_rank(*t, 3, name, "(T_q, Hkv, D): packed like q when cu_seqlens_k is None");
      TORCH_CHECK(t->size(0) == q.size(0), name, " must be packed like q, (", q.size(0), ", H, D), got shape ",
                  t->sizes());
    } else {
      check_rank(*t, 4, name, "(B, N_k, Hkv, D) when q is dense");
      TORCH_CHECK(t->size(0) == q.size(0), name, " must have q's batch ", q.size(0), ", got shape ", t->sizes());
    }
  }
  check_heads_and_dims(sh, q, k, v);
  L.num_keys = k.dim() == 4 ? k.size(0) * k.size(1) : k.size(0);

  at::Tensor keep_q, keep_k, keep_used;
  const int32_t* cu_q = sh.varlen ? host_offsets(*cu_seqlens_q, keep_q) : nullptr;
  if (cu_q) check_cu_seqlens_values(cu_q, sh.num_seqs, sh.num_tokens, max_seqlen_q, "cu_seqlens_q");
  const int32_t* cu_k = nullptr;
  const int32_t* used = nullptr;
  if (cu_seqlens_k) {
    check_cu_seqlens(*cu_seqlens_k, k, "cu_seqlens_k");
    TORCH_CHECK(cu_seqlens_k->numel() == sh.num_seqs + 1, "cu_seqlens_k has ", cu_seqlens_k->numel() - 1,
                " sequences but cu_seqlens_q has ", sh.num_seqs);
    TORCH_CHECK(max_seqlen_k >= 0, "max_seqlen_k must be >= 0, got ", max_seqlen_k);
    cu_k = host_offsets(*cu_seqlens_k, keep_k);
    check_cu_seqlens_values(cu_k, sh.num_seqs, k.size(0), max_seqlen_k, "cu_seqlens_k");
  }
  if (seqused_k) {
    TORCH_CHECK(seqused_k->scalar_type() == at::kInt && seqused_k->dim() == 1 && seqused_k->size(0) == sh.num_seqs,
                "seqused_k must be int32 (B,) = (", sh.num_seqs, ",), got ", seqused_k->scalar_type(), " ",
                seqused_k->sizes());
    check_same_device(*seqused_k, q, "seqused_k", "q");
    used = host_offsets(*seqused_k, keep_used);
    L.keys_covered = false;
  }
  int64_t longest_k = 0;
  L.seqs.resize(sh.num_seqs);
  for (int64_t s = 0; s < sh.num_seqs; ++s) {
    SeqPair& p = L.seqs[s];
    p.q_bos = cu_q ? cu_q[s] : s * sh.seqlen;
    p.q_len = cu_q ? int64_t{cu_q[s + 1]} - cu_q[s] : sh.seqlen;
    if (used) {
      p.k_bos = s * k.size(1);
      p.k_len = used[s];
      TORCH_CHECK(p.k_len >= 0 && p.k_len <= k.size(1), "seqused_k[", s, "] must lie in [0, capacity = ", k.size(1),
                  "], got ", p.k_len);
    } else if (cu_k) {
      p.k_bos = cu_k[s];
      p.k_len = int64_t{cu_k[s + 1]} - cu_k[s];
    } else if (sh.varlen) {
      p.k_bos = p.q_bos;
      p.k_len = p.q_len;
    } else {
      p.k_bos = s * k.size(1);
      p.k_len = k.size(1);
    }
    TORCH_CHECK(p.q_len <= p.k_len, "sequence ", s, " has ", p.q_len, " queries but only ", p.k_len,
                " keys: the queries are the last positions of the keys' sequence, so q_len <= k_len");
    longest_k = std::max(longest_k, p.k_len);
  }
  sh.num_chunks = ceil_div(longest_k, chunk_size);
  return L;
}

at::Tensor normalized_block_indices(const at::Tensor& block_indices, const at::Tensor& q, const RoutedLayout& L,
                                    int64_t chunk_size, int64_t top_k, bool causal) {
  TORCH_CHECK(block_indices.scalar_type() == at::kInt, "block_indices must be int32, got ",
              block_indices.scalar_type());
  check_same_device(block_indices, q, "block_indices", "q");
  std::vector<int64_t> want(q.sizes().begin(), q.sizes().end() - 1);
  want.push_back(top_k);
  TORCH_CHECK(block_indices.sizes() == at::IntArrayRef(want), "block_indices must have shape (.., Hq, top_k) = ",
              at::IntArrayRef(want), ", got ", block_indices.sizes());
  const at::Tensor src_t = block_indices.contiguous();
  const int32_t* src = src_t.const_data_ptr<int32_t>();
  const int64_t Hq = L.sh.q_heads;
  at::Tensor out_t = at::empty({L.sh.num_tokens, Hq, top_k}, q.options().dtype(at::kInt));
  int32_t* out = out_t.mutable_data_ptr<int32_t>();
  std::vector<int32_t> row(top_k);
  for (int64_t s = 0; s < L.num_seqs(); ++s) {
    const SeqPair& sp = L[s];
    const int64_t n = ceil_div(sp.k_len, chunk_size);
    for (int64_t i = 0; i < sp.q_len; ++i) {
      const int64_t pos = sp.offset() + i, own = pos / chunk_size;
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t r = ((sp.q_bos + i) * Hq + h) * top_k;
        int64_t m = 0;
        for (int64_t slot = 0; slot < top_k; ++slot) {
          const int64_t j = src[r + slot];
          const bool ok = j == -1 || (j >= 0 && j < n && (!causal || j == own || (j + 1) * chunk_size <= pos));
          TORCH_CHECK(ok, "block_indices[", sp.q_bos + i, ", ", h, ", ", slot, "] = ", j, " is not a chunk that query ",
                      i, " of sequence ", s, " (position ", pos, ", ", n, " chunks", causal ? ", causal" : "",
                      ") may attend to; use -1 for no chunk");
          if (j >= 0) row[m++] = static_cast<int32_t>(j);
        }
        std::sort(row.begin(), row.begin() + m);
        m = std::unique(row.begin(), row.begin() + m) - row.begin();
        std::copy_n(row.begin(), m, out + r);
        std::fill(out + r + m, out + r + top_k, -1);
      }
    }
  }
  return out_t;
}

}  // namespace cpu
}  // namespace routing_kernels
