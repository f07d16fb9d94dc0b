// The EP dispatch-layout op (SPEC §5, DeepEP's get_dispatch_layout; python/dsv3/ep/layout.py holds the
// reference): its schema, the validation and allocation shared by every device, and the CPU and Meta kernels.
// The CUDA kernel lives in csrc/cuda/ep_layout.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "dsv3/checks.h"

namespace dsv3 {

using LayoutOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_ep_dispatch_layout(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                              int64_t num_ranks_per_node) {
  const char* op = "ep_dispatch_layout";
  DSV3_CHECK(topk_idx.defined(), op, "topk_idx must be a tensor, got None");
  const auto dtype = topk_idx.scalar_type();
  DSV3_CHECK_TYPE(dtype == at::kLong || dtype == at::kInt, op, "topk_idx must be int64 or int32, got ",
                  dtype);
  DSV3_CHECK(topk_idx.dim() == 2, op, "topk_idx must be 2-D [num_tokens, num_topk], got shape ",
             topk_idx.sym_sizes());
  // Every count fits an int32, the outputs' dtype (DeepEP's).
  DSV3_CHECK(topk_idx.sym_numel() <= std::numeric_limits<int32_t>::max(), op,
             "topk_idx must have fewer than 2^31 entries, got shape ", topk_idx.sym_sizes());
  DSV3_CHECK(num_experts >= 1 && num_experts <= std::numeric_limits<int32_t>::max(), op,
             "num_experts must be in [1, 2^31), got ", num_experts);
  DSV3_CHECK(num_ranks >= 1 && num_experts % num_ranks == 0, op,
             "num_ranks must be positive and divide num_experts = ", num_experts, ", got ", num_ranks);
  DSV3_CHECK(num_ranks_per_node >= 1, op, "num_ranks_per_node must be positive, got ", num_ranks_per_node);
  DSV3_CHECK(num_ranks <= num_ranks_per_node || num_ranks % num_ranks_per_node == 0, op,
             "num_ranks must be a multiple of num_ranks_per_node = ", num_ranks_per_node,
             " when it spans several nodes, got ", num_ranks);
}

namespace {
// The number of nodes counted in num_tokens_per_rdma_rank: none within one node (DeepEP returns None there).
int64_t ep_layout_num_nodes(int64_t num_ranks, int64_t num_ranks_per_node) {
  return num_ranks > num_ranks_per_node ? num_ranks / num_ranks_per_node : 0;
}
}  // namespace

// Sizes from sym_size so the Meta kernel also serves torch.compile's dynamic shapes.
LayoutOutputs alloc_ep_dispatch_layout(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                                       int64_t num_ranks_per_node) {
  const auto counts = topk_idx.options().dtype(at::kInt);
  return {at::empty({num_ranks}, counts),
          at::empty({ep_layout_num_nodes(num_ranks, num_ranks_per_node)}, counts),
          at::empty({num_experts}, counts),
          at::empty_symint({topk_idx.sym_size(0), c10::SymInt(num_ranks)}, counts.dtype(at::kBool))};
}

[[noreturn]] void throw_bad_topk_entry(int64_t value, int64_t token, int64_t slot, int64_t num_experts) {
  DSV3_CHECK(false, "ep_dispatch_layout", "topk_idx entries must be in [-1, num_experts = ", num_experts,
             "), got ", value, " at topk_idx[", token, ", ", slot, "]");
  __builtin_unreachable();
}

namespace cpu {
namespace {

struct LayoutArgs {
  int64_t tokens, top_k, stride_token, stride_slot;
  int64_t num_experts, num_ranks, num_nodes, experts_per_rank, ranks_per_node;
};

// One chunk of tokens: counts of its own (merged in chunk order afterwards, so the result never depends on
// the thread count) and the first out-of-range entry it met.
struct ChunkCounts {
  std::vector<int32_t> per_rank, per_node, per_expert;
  int64_t bad_value = 0, bad_token = -1, bad_slot = -1;
};

template <typename Index>
void count_chunk(const LayoutArgs& a, const Index* topk, int64_t begin, int64_t end, bool* in_rank,
                 ChunkCounts& c) {
  c.per_rank.assign(a.num_ranks, 0);
  c.per_node.assign(a.num_nodes, 0);
  c.per_expert.assign(a.num_experts, 0);
  // node_seen[j] == t: token t already counted for node j, so nothing is cleared between tokens.
  std::vector<int64_t> node_seen(a.num_nodes, -1);
  for (int64_t t = begin; t < end; ++t) {
    bool* row = in_rank + t * a.num_ranks;
    std::fill(row, row + a.num_ranks, false);
    for (int64_t j = 0; j < a.top_k; ++j) {
      const int64_t e = topk[t * a.stride_token + j * a.stride_slot];
      if (e == -1) continue;
      if (e < -1 || e >= a.num_experts) {
        if (c.bad_token < 0) std::tie(c.bad_value, c.bad_token, c.bad_slot) = std::tie(e, t, j);
        continue;
      }
      ++c.per_expert[e];  // not de-duplicated: a repeated expert counts twice, as in DeepEP
      const int64_t rank = e / a.experts_per_rank;
      if (row[rank]) continue;
      row[rank] = true;
      ++c.per_rank[rank];
      if (a.num_nodes == 0) continue;
      const int64_t node = rank / a.ranks_per_node;
      if (node_seen[node] == t) continue;
      node_seen[node] = t;
      ++c.per_node[node];
    }
  }
}

void sum_into(at::Tensor& out, const std::vector<ChunkCounts>& chunks,
              std::vector<int32_t> ChunkCounts::* field) {
  int32_t* dst = out.data_ptr<int32_t>();
  std::fill(dst, dst + out.numel(), 0);
  for (const ChunkCounts& c : chunks)
    for (size_t i = 0; i < (c.*field).size(); ++i) dst[i] += (c.*field)[i];
}

}  // namespace

LayoutOutputs ep_dispatch_layout(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                                 int64_t num_ranks_per_node) {
  check_ep_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node);
  auto outputs = alloc_ep_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node);
  auto& [per_rank, per_node, per_expert, in_rank] = outputs;
  const LayoutArgs args{topk_idx.size(0),  topk_idx.size(1), topk_idx.stride(0), topk_idx.stride(1),
                        num_experts,       num_ranks,        per_node.size(0),   num_experts / num_ranks,
                        num_ranks_per_node};
  // Fixed chunks of about 32K top-k entries, each a task: enough work per hand-off, and counts that merge
  // in a fixed order. Their count arrays are capped at about 64 MB in all (a concern only for huge E).
  const int64_t counters = args.num_experts + args.num_ranks + args.num_nodes;
  const int64_t max_chunks = std::max<int64_t>(1, (int64_t{16} << 20) / counters);
  const int64_t entries_per_chunk = std::max<int64_t>(32768, args.tokens * args.top_k / max_chunks + 1);
  const int64_t chunk_tokens = std::max<int64_t>(1, entries_per_chunk / std::max<int64_t>(1, args.top_k));
  const int64_t num_chunks = std::max<int64_t>(1, (args.tokens + chunk_tokens - 1) / chunk_tokens);
  std::vector<ChunkCounts> chunks(num_chunks);
  bool* in_rank_data = in_rank.data_ptr<bool>();
  AT_DISPATCH_INDEX_TYPES(topk_idx.scalar_type(), "ep_dispatch_layout", [&] {
    const index_t* topk = topk_idx.const_data_ptr<index_t>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        const int64_t end = std::min(args.tokens, (i + 1) * chunk_tokens);
        count_chunk(args, topk, i * chunk_tokens, end, in_rank_data, chunks[i]);
      }
    });
  });
  for (const ChunkCounts& c : chunks)  // the first bad entry in row-major order
    if (c.bad_token >= 0) throw_bad_topk_entry(c.bad_value, c.bad_token, c.bad_slot, num_experts);
  sum_into(per_rank, chunks, &ChunkCounts::per_rank);
  sum_into(per_node, chunks, &ChunkCounts::per_node);
  sum_into(per_expert, chunks, &ChunkCounts::per_expert);
  return outputs;
}

}  // namespace cpu

namespace meta {

// Shapes only: the entries are not readable here, so their range is checked by the device kernels.
LayoutOutputs ep_dispatch_layout(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                                 int64_t num_ranks_per_node) {
  check_ep_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node);
  return alloc_ep_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node);
}

}  // namespace meta
}  // namespace dsv3

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  // EP dispatch layout (SPEC §5): tokens per rank / node / expert and the token-to-rank mask; an empty
  // num_tokens_per_rdma_rank when all ranks share one node.
  m.def(
      "ep_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks, int num_ranks_per_node=8) -> "
      "(Tensor num_tokens_per_rank, Tensor num_tokens_per_rdma_rank, Tensor num_tokens_per_expert, "
      "Tensor is_token_in_rank)");
}

TORCH_LIBRARY_IMPL(dsv3, CPU, m) { m.impl("ep_dispatch_layout", &dsv3::cpu::ep_dispatch_layout); }

TORCH_LIBRARY_IMPL(dsv3, Meta, m) { m.impl("ep_dispatch_layout", &dsv3::meta::ep_dispatch_layout); }
