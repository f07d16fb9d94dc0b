// Byte layout of one rank's NVLink buffer (the `nvlink` EP backend: every rank's buffer is mapped into every
// peer with CUDA IPC) and the token/prefix arithmetic shared by the kernels of csrc/cuda/ep_intranode.cu,
// their launcher, and the CPU op ep_nvl_layout (which the Python size hint in dsv3/ep/config.py is tested
// against). Plain C++ (no CUDA headers) so CPU code compiles it.
//
// Regions, each 16-byte aligned, in order; queue regions are indexed [channel][source rank][slot] and live on
// the receiving rank (the sender writes rows and the tail into the receiver's buffer, the receiver writes the
// head into its own buffer and the sender polls it):
//   barrier       int32 [16]: signals[8] (barrier arrivals per source rank), epoch (this rank's barrier
//   count) rank_counts   int32 [R][R]  row s: the rows source s sends to each rank (written by s in notify)
//   queue_ctrl    int32 [C][R][4] head, tail, start and end of the source's channel (encoded -v-1, 0 = unset)
//   expert_counts int32 [R][L]  row s: the rows source s sends to each of this rank's local experts
// The offsets of barrier, rank_counts and queue_ctrl depend on R and C only (a reset before a cached dispatch
// or a combine, which know no expert count, zeroes the same words the dispatch and combine use).
//   x             uint8 [C][R][slots][hidden_bytes]
//   src_idx       int32 [C][R][slots]
//   topk_idx      int64 [C][R][slots][k]
//   topk_weights  fp32  [C][R][slots][k]
//   scales        fp32/int32 [C][R][slots][num_scales]
// The total is rounded up to 128 bytes.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define DSV3_NVL_HD __host__ __device__ __forceinline__
#else
#define DSV3_NVL_HD inline
#endif

namespace dsv3::ep {

constexpr int kNvlMaxRanks = 8;
constexpr int kNvlMaxTopk = 32;
constexpr int kNvlMaxScales = 128;
constexpr int kNvlMaxLocalExperts = 1024;
constexpr int kNvlBarrierInts = 16;
constexpr int kNvlBarrierEpoch = kNvlMaxRanks;  // index of the epoch word in the barrier region
constexpr int kNvlQueueCtrlInts = 4;
enum NvlQueueCtrl : int { kQueueHead = 0, kQueueTail = 1, kQueueStart = 2, kQueueEnd = 3 };
// Host-mapped counter words (pinned host memory the kernels write): an error code, the sequence number of the
// notify that wrote the counts (written last, so a host that sees its own number reads that call's counts),
// the received row count and the per-local-expert counts.
constexpr int kNvlHostError = 0, kNvlHostSeq = 1, kNvlHostRecvTokens = 2, kNvlHostExpertCounts = 3;
constexpr int kNvlHostCounterInts = kNvlHostExpertCounts + kNvlMaxLocalExperts;
// Error codes a timed-out kernel leaves in the host error word (0 = none).
enum NvlError : int {
  kNvlErrorNone = 0,
  kNvlErrorBarrier = 1,
  kNvlErrorDispatchSend = 2,
  kNvlErrorDispatchRecv = 3,
  kNvlErrorCombineSend = 4,
  kNvlErrorCombineRecv = 5,
  kNvlErrorRecvOverflow = 6,  // more rows arrived than num_worst_tokens (no trap: the extra rows are dropped)
};

DSV3_NVL_HD int64_t nvl_align(int64_t bytes, int64_t to) { return (bytes + to - 1) / to * to; }

struct NvlLayout {
  int num_ranks, num_local_experts, num_channels, num_slots, num_topk, num_scales;
  int64_t hidden_bytes;
  // byte offsets from the start of the buffer
  int64_t barrier, rank_counts, queue_ctrl, expert_counts, x, src_idx, topk_idx, topk_weights, scales;
  int64_t total_bytes;

  // Queue q = channel * R + source; slot i of it.
  DSV3_NVL_HD int queue(int channel, int source) const { return channel * num_ranks + source; }
  DSV3_NVL_HD int64_t slot(int q, int i) const { return static_cast<int64_t>(q) * num_slots + i; }
  DSV3_NVL_HD int64_t x_offset(int q, int i) const { return x + slot(q, i) * hidden_bytes; }
  DSV3_NVL_HD int64_t src_idx_offset(int q, int i) const { return src_idx + slot(q, i) * 4; }
  DSV3_NVL_HD int64_t topk_idx_offset(int q, int i) const { return topk_idx + slot(q, i) * num_topk * 8; }
  DSV3_NVL_HD int64_t topk_weights_offset(int q, int i) const {
    return topk_weights + slot(q, i) * num_topk * 4;
  }
  DSV3_NVL_HD int64_t scales_offset(int q, int i) const { return scales + slot(q, i) * num_scales * 4; }
  DSV3_NVL_HD int64_t ctrl_offset(int q, int field) const {
    return queue_ctrl + (q * kNvlQueueCtrlInts + field) * 4;
  }
};

DSV3_NVL_HD NvlLayout make_nvl_layout(int num_ranks, int num_local_experts, int64_t hidden_bytes,
                                      int num_scales, int num_topk, int num_channels, int num_slots) {
  NvlLayout l{};
  l.num_ranks = num_ranks;
  l.num_local_experts = num_local_experts;
  l.num_channels = num_channels;
  l.num_slots = num_slots;
  l.num_topk = num_topk;
  l.num_scales = num_scales;
  l.hidden_bytes = hidden_bytes;
  const int64_t queues = static_cast<int64_t>(num_channels) * num_ranks;
  const int64_t slots = queues * num_slots;
  int64_t at = 0;
  auto take = [&at](int64_t bytes) {
    const int64_t offset = at;
    at += nvl_align(bytes, 16);
    return offset;
  };
  l.barrier = take(kNvlBarrierInts * 4);
  l.rank_counts = take(static_cast<int64_t>(num_ranks) * num_ranks * 4);
  l.queue_ctrl = take(queues * kNvlQueueCtrlInts * 4);
  l.expert_counts = take(static_cast<int64_t>(num_ranks) * num_local_experts * 4);
  l.x = take(slots * hidden_bytes);
  l.src_idx = take(slots * 4);
  l.topk_idx = take(slots * num_topk * 8);
  l.topk_weights = take(slots * num_topk * 4);
  l.scales = take(slots * num_scales * 4);
  l.total_bytes = nvl_align(at, 128);
  return l;
}

// Tokens of channel c among n tokens split into C channels: [begin, end) with ceil(n / C) tokens per channel
// (the last ones may be short or empty).
struct TokenRange {
  int begin, end;
};
DSV3_NVL_HD TokenRange channel_token_range(int num_tokens, int num_channels, int channel) {
  const int per = (num_tokens + num_channels - 1) / num_channels;
  const int64_t begin = static_cast<int64_t>(per) * channel, end = begin + per;
  return {static_cast<int>(begin < num_tokens ? begin : num_tokens),
          static_cast<int>(end < num_tokens ? end : num_tokens)};
}

// rank_prefix_matrix[i][j] = rows sent by sources 0..i to rank j, from counts[s][j] (row-major [R][R]).
DSV3_NVL_HD int rank_prefix_entry(const int* counts, int num_ranks, int i, int j) {
  int sum = 0;
  for (int s = 0; s <= i; ++s) sum += counts[s * num_ranks + j];
  return sum;
}

// First row, at rank `rank`, of the rows coming from `source`: rows of sources < source.
DSV3_NVL_HD int recv_rank_offset(const int* rank_prefix_matrix, int num_ranks, int rank, int source) {
  return source == 0 ? 0 : rank_prefix_matrix[(source - 1) * num_ranks + rank];
}

DSV3_NVL_HD int align_up(int value, int alignment) { return (value + alignment - 1) / alignment * alignment; }

// Queue offsets are published as -v-1 so that 0 means "not written yet".
DSV3_NVL_HD int encode_offset(int v) { return -v - 1; }
DSV3_NVL_HD int decode_offset(int v) { return -v - 1; }

}  // namespace dsv3::ep
