// Host logic of the NVLink EP buffer (csrc/include/dsv3/ep/nvl_layout.h) as CPU ops built into every dsv3._C,
// so the layout and the index arithmetic the kernels of csrc/cuda/ep_intranode.cu use are tested without a
// GPU:
//   ep_nvl_layout(...) -> str   the region offsets and sizes as JSON (dsv3.ep.config's size hint is tested
//                               against it)
//   ep_nvl_prefix(...)          rank_prefix_matrix, channel_prefix_matrix, the channel token ranges and the
//                               receiver's recv_channel_prefix_matrix, by the kernels' formulas
#include <ATen/ATen.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "dsv3/checks.h"
#include "dsv3/ep/nvl_layout.h"

namespace dsv3::ep {
namespace {

std::string nvl_layout_json(int64_t num_ranks, int64_t num_experts, int64_t hidden_bytes, int64_t num_scales,
                            int64_t num_topk, int64_t num_sms, int64_t num_max_send_tokens,
                            int64_t num_max_recv_tokens) {
  constexpr const char* op = "ep_nvl_layout";
  DSV3_CHECK(num_ranks == 2 || num_ranks == 4 || num_ranks == 8, op, "num_ranks must be 2, 4 or 8, got ",
             num_ranks);
  DSV3_CHECK(
      num_experts >= 0 && num_experts % num_ranks == 0 && num_experts / num_ranks <= kNvlMaxLocalExperts, op,
      "num_experts must be a multiple of num_ranks with at most ", kNvlMaxLocalExperts, " per rank, got ",
      num_experts);
  DSV3_CHECK(hidden_bytes >= 0 && hidden_bytes % 16 == 0, op, "hidden_bytes must be a multiple of 16, got ",
             hidden_bytes);
  DSV3_CHECK(num_scales >= 0 && num_scales <= kNvlMaxScales, op, "num_scales must be in [0, ", kNvlMaxScales,
             "], got ", num_scales);
  DSV3_CHECK(num_topk >= 0 && num_topk <= kNvlMaxTopk, op, "num_topk must be in [0, ", kNvlMaxTopk, "], got ",
             num_topk);
  DSV3_CHECK(num_sms >= 2 && num_sms % 2 == 0 && num_sms <= 2048, op,
             "num_sms must be even in [2, 2048], got ", num_sms);
  DSV3_CHECK(num_max_send_tokens >= 1 && num_max_send_tokens < num_max_recv_tokens, op,
             "num_max_send_tokens must be in [1, num_max_recv_tokens), got ", num_max_send_tokens, " and ",
             num_max_recv_tokens);
  DSV3_CHECK(num_max_recv_tokens <= (1 << 20), op, "num_max_recv_tokens must be <= 2^20, got ",
             num_max_recv_tokens);
  const NvlLayout l = make_nvl_layout(static_cast<int>(num_ranks), static_cast<int>(num_experts / num_ranks),
                                      hidden_bytes, static_cast<int>(num_scales), static_cast<int>(num_topk),
                                      static_cast<int>(num_sms / 2), static_cast<int>(num_max_recv_tokens));
  const int64_t queues = static_cast<int64_t>(l.num_channels) * l.num_ranks, slots = queues * l.num_slots;
  const std::pair<const char*, std::pair<int64_t, int64_t>> regions[] = {
      {"barrier", {l.barrier, kNvlBarrierInts * 4}},
      {"rank_counts", {l.rank_counts, num_ranks * num_ranks * 4}},
      {"queue_ctrl", {l.queue_ctrl, queues * kNvlQueueCtrlInts * 4}},
      {"expert_counts", {l.expert_counts, num_ranks * l.num_local_experts * 4}},
      {"x", {l.x, slots * hidden_bytes}},
      {"src_idx", {l.src_idx, slots * 4}},
      {"topk_idx", {l.topk_idx, slots * num_topk * 8}},
      {"topk_weights", {l.topk_weights, slots * num_topk * 4}},
      {"scales", {l.scales, slots * num_scales * 4}},
  };
  std::ostringstream os;
  os << "{\"num_ranks\": " << l.num_ranks << ", \"num_local_experts\": " << l.num_local_experts
     << ", \"num_channels\": " << l.num_channels << ", \"num_slots\": " << l.num_slots
     << ", \"hidden_bytes\": " << l.hidden_bytes << ", \"num_scales\": " << l.num_scales
     << ", \"num_topk\": " << l.num_topk << ", \"regions\": {";
  bool first = true;
  for (const auto& [name, region] : regions) {
    os << (first ? "" : ", ") << "\"" << name << "\": [" << region.first << ", " << region.second << "]";
    first = false;
  }
  // Spot checks of the per-slot accessors the kernels use: the last slot of the last queue.
  const int q = l.queue(l.num_channels - 1, l.num_ranks - 1), i = l.num_slots - 1;
  os << "}, \"last_slot\": {\"x\": " << l.x_offset(q, i) << ", \"src_idx\": " << l.src_idx_offset(q, i)
     << ", \"topk_idx\": " << l.topk_idx_offset(q, i) << ", \"topk_weights\": " << l.topk_weights_offset(q, i)
     << ", \"scales\": " << l.scales_offset(q, i) << ", \"tail\": " << l.ctrl_offset(q, kQueueTail)
     << "}, \"total_bytes\": " << l.total_bytes << "}";
  return os.str();
}

// rank_counts [R, R] int32 (row s: rows source s sends to each rank), is_token_in_rank [n, R] bool, and
// optionally source_channel_prefix [R, C] int32 (row s: source s's channel_prefix_matrix row toward `rank`).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nvl_prefix(
    const at::Tensor& rank_counts_in, const at::Tensor& is_token_in_rank_in, int64_t rank,
    int64_t num_channels, const std::optional<at::Tensor>& source_channel_prefix_in) {
  constexpr const char* op = "ep_nvl_prefix";
  DSV3_CHECK(rank_counts_in.dim() == 2 && rank_counts_in.size(0) == rank_counts_in.size(1) &&
                 rank_counts_in.size(0) >= 1 && rank_counts_in.size(0) <= kNvlMaxRanks,
             op, "rank_counts must be [R, R] with R in [1, ", kNvlMaxRanks, "], got ",
             rank_counts_in.sizes());
  const int R = static_cast<int>(rank_counts_in.size(0));
  DSV3_CHECK_TYPE(rank_counts_in.scalar_type() == at::kInt, op, "rank_counts must be int32");
  DSV3_CHECK(is_token_in_rank_in.dim() == 2 && is_token_in_rank_in.size(1) == R, op,
             "is_token_in_rank must be [n, ", R, "], got ", is_token_in_rank_in.sizes());
  DSV3_CHECK_TYPE(is_token_in_rank_in.scalar_type() == at::kBool, op, "is_token_in_rank must be bool");
  DSV3_CHECK(rank >= 0 && rank < R, op, "rank must be in [0, ", R, "), got ", rank);
  DSV3_CHECK(num_channels >= 1 && num_channels <= 1024, op, "num_channels must be in [1, 1024], got ",
             num_channels);
  const at::Tensor counts = rank_counts_in.cpu().contiguous();
  const at::Tensor in_rank = is_token_in_rank_in.cpu().contiguous();
  const int n = static_cast<int>(in_rank.size(0)), C = static_cast<int>(num_channels);
  const int* c = counts.data_ptr<int>();
  const bool* flags = in_rank.data_ptr<bool>();

  at::Tensor rank_prefix = at::empty({R, R}, at::kInt);
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < R; ++j) rank_prefix.data_ptr<int>()[i * R + j] = rank_prefix_entry(c, R, i, j);
  }
  at::Tensor ranges = at::empty({C, 2}, at::kInt), channel_prefix = at::empty({R, C}, at::kInt);
  for (int ch = 0; ch < C; ++ch) {
    const TokenRange range = channel_token_range(n, C, ch);
    ranges.data_ptr<int>()[2 * ch] = range.begin;
    ranges.data_ptr<int>()[2 * ch + 1] = range.end;
    for (int dst = 0; dst < R; ++dst) {
      int count = 0;
      for (int t = range.begin; t < range.end; ++t) count += flags[static_cast<int64_t>(t) * R + dst];
      channel_prefix.data_ptr<int>()[dst * C + ch] =
          count + (ch ? channel_prefix.data_ptr<int>()[dst * C + ch - 1] : 0);
    }
  }
  at::Tensor recv_channel_prefix;
  if (source_channel_prefix_in.has_value() && source_channel_prefix_in->defined()) {
    const at::Tensor scp = source_channel_prefix_in->cpu().contiguous();
    DSV3_CHECK(scp.scalar_type() == at::kInt && scp.dim() == 2 && scp.size(0) == R && scp.size(1) == C, op,
               "source_channel_prefix must be int32 [", R, ", ", C, "], got ", scp.sizes());
    recv_channel_prefix = at::empty({R, C}, at::kInt);
    for (int s = 0; s < R; ++s) {
      const int offset = recv_rank_offset(rank_prefix.data_ptr<int>(), R, static_cast<int>(rank), s);
      for (int ch = 0; ch < C; ++ch) {
        recv_channel_prefix.data_ptr<int>()[s * C + ch] =
            offset + (ch ? scp.data_ptr<int>()[s * C + ch - 1] : 0);
      }
    }
  } else {
    recv_channel_prefix = at::empty({0, C}, at::kInt);
  }
  return {rank_prefix, channel_prefix, ranges, recv_channel_prefix};
}

}  // namespace
}  // namespace dsv3::ep

TORCH_LIBRARY_FRAGMENT(dsv3, m) {
  m.def(
      "ep_nvl_layout(int num_ranks, int num_experts, int hidden_bytes, int num_scales, int num_topk, int "
      "num_sms, "
      "int num_max_send_tokens, int num_max_recv_tokens) -> str",
      &dsv3::ep::nvl_layout_json);
  m.def(
      "ep_nvl_prefix(Tensor rank_counts, Tensor is_token_in_rank, int rank, int num_channels, "
      "Tensor? source_channel_prefix=None) -> (Tensor, Tensor, Tensor, Tensor)",
      &dsv3::ep::nvl_prefix);
}
