// Byte layout of the internode (normal-mode) EP buffer, the one NVSHMEM symmetric allocation per rank that
// the kernels of csrc/cuda/ep_nvshmem/internode.cu use, and the token/prefix arithmetic they share with the
// CPU op ep_internode_layout / ep_internode_plan (which the Python size hint and tests check). Plain C++.
//
// Geometry: R = 8 * N ranks, rank = node * 8 + local; C channels (channel c = tokens [c*ceil(n/C), ...)).
// A token crosses RDMA once per destination node, to the rank with the sender's local index there (the
// forwarder), which forwards it over NVLink (NVSHMEM P2P) to the ranks of its node that need it. Every hop is
// a ring queue of `slots` records living at the consumer: the producer puts record `pos` into slot pos %
// slots with a signal that sets that slot's flag to pos + 1, and the consumer returns its consumed count to
// the producer's head word with signal adds. RDMA queues are indexed [channel][peer node], NVLink queues
// [channel][peer local rank]; in combine the same queues run in the opposite direction.
//
// Regions, each 128-byte aligned, in order:
//   barrier         uint64 [R]         barrier arrivals per source rank (monotonic; zeroed only on a reset)
//   -- zeroed by every sync (the words below, up to notify_send) --
//   notify_arrival  uint64 [R]         notify record of source s landed
//   rdma_meta       uint64 [C][N][9]   per source node: packed (start, end) of its channel in the RDMA
//                                      stream, then of its gbl channel toward each of our 8 local ranks
//   rdma_head       uint64 [C][N]      records the consumer at node m took from our queue
//   rdma_flag       uint64 [C][N][rdma_slots]
//   nvl_meta        uint64 [C][8][N]   per (forwarder, source node): packed (start, end) toward this rank
//   nvl_head        uint64 [C][8]
//   nvl_flag        uint64 [C][8][nvl_slots]
//   -- data --
//   notify_send / notify_recv  int32 [R][2 + kInternodeMaxLocalExperts] count records per peer
//   rdma_send / rdma_recv      [C][N][rdma_slots] records of slot_bytes (send: staging of our puts)
//   nvl_recv                   [C][8][nvl_slots] records of slot_bytes (written through NVLink P2P, so no
//                              send staging: the node's buffers must be mapped into each other, nvshmem_ptr)
// A dispatch record: row bytes | int32 source rank, int32 is-in-rank bits of the destination node |
// int32 top-k expert ids [k] (global, -1 none) | fp32 top-k weights [k] | 4-byte scales [s], 16-byte aligned.
// A combine record: bf16 row [H] | fp32 top-k weights [k], 16-byte aligned.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define DSV3_INTERNODE_HD __host__ __device__ __forceinline__
#else
#define DSV3_INTERNODE_HD inline
#endif

namespace dsv3::ep {

constexpr int kInternodeNodeRanks = 8;  // NVLink domain: ranks per node
constexpr int kInternodeAlign = 128;
constexpr int kInternodeMaxNodes = 32;           // one thread per node in the combine receiver
constexpr int kInternodeMaxLocalExperts = 1024;  // host counter words and notify records are sized for this
constexpr int kInternodeMetaWords = 1 + kInternodeNodeRanks;
// Bounds the size hint is computed for (the kernels take anything that fits the buffer).
constexpr int kInternodeHintTopk = 32;
constexpr int kInternodeHintScales = 128;
// Host-mapped counter words: the notify's sequence number (written last), received rows, rows received by
// RDMA (this rank as forwarder), per-local-expert counts rounded up to expert_alignment.
constexpr int kInternodeHostSeq = 0, kInternodeHostRecv = 1, kInternodeHostRdmaRecv = 2,
              kInternodeHostExperts = 3;
constexpr int kInternodeHostInts = kInternodeHostExperts + kInternodeMaxLocalExperts;

DSV3_INTERNODE_HD int64_t internode_align(int64_t bytes, int64_t to) { return (bytes + to - 1) / to * to; }

DSV3_INTERNODE_HD int64_t internode_dispatch_record_bytes(int64_t row_bytes, int64_t num_topk,
                                                          int64_t num_scales) {
  return internode_align(row_bytes + 8 + num_topk * 8 + num_scales * 4, 16);
}
DSV3_INTERNODE_HD int64_t internode_combine_record_bytes(int64_t hidden, int64_t num_topk) {
  return internode_align(hidden * 2 + num_topk * 4, 16);
}

struct InternodeLayout {
  int num_ranks, num_nodes, num_channels, rdma_slots, nvl_slots;
  int64_t slot_bytes;
  // byte offsets from the start of the buffer; [reset_begin, reset_end) is what a sync zeroes
  int64_t barrier, reset_begin, notify_arrival, rdma_meta, rdma_head, rdma_flag, nvl_meta, nvl_head, nvl_flag,
      reset_end;
  int64_t notify_send, notify_recv, notify_record_bytes;
  int64_t rdma_send, rdma_recv, nvl_recv;
  int64_t total_bytes;

  DSV3_INTERNODE_HD int64_t rdma_meta_word(int c, int node, int w) const {
    return rdma_meta + ((int64_t(c) * num_nodes + node) * kInternodeMetaWords + w) * 8;
  }
  DSV3_INTERNODE_HD int64_t rdma_head_word(int c, int node) const {
    return rdma_head + (int64_t(c) * num_nodes + node) * 8;
  }
  DSV3_INTERNODE_HD int64_t rdma_queue(int c, int node) const { return int64_t(c) * num_nodes + node; }
  DSV3_INTERNODE_HD int64_t rdma_flag_word(int c, int node, int slot) const {
    return rdma_flag + (rdma_queue(c, node) * rdma_slots + slot) * 8;
  }
  DSV3_INTERNODE_HD int64_t rdma_send_slot(int c, int node, int slot) const {
    return rdma_send + (rdma_queue(c, node) * rdma_slots + slot) * slot_bytes;
  }
  DSV3_INTERNODE_HD int64_t rdma_recv_slot(int c, int node, int slot) const {
    return rdma_recv + (rdma_queue(c, node) * rdma_slots + slot) * slot_bytes;
  }
  DSV3_INTERNODE_HD int64_t nvl_queue(int c, int local) const {
    return int64_t(c) * kInternodeNodeRanks + local;
  }
  DSV3_INTERNODE_HD int64_t nvl_meta_word(int c, int local, int node) const {
    return nvl_meta + (nvl_queue(c, local) * num_nodes + node) * 8;
  }
  DSV3_INTERNODE_HD int64_t nvl_head_word(int c, int local) const {
    return nvl_head + nvl_queue(c, local) * 8;
  }
  DSV3_INTERNODE_HD int64_t nvl_flag_word(int c, int local, int slot) const {
    return nvl_flag + (nvl_queue(c, local) * nvl_slots + slot) * 8;
  }
  DSV3_INTERNODE_HD int64_t nvl_recv_slot(int c, int local, int slot) const {
    return nvl_recv + (nvl_queue(c, local) * nvl_slots + slot) * slot_bytes;
  }
};

// Arguments are validated by the callers (the CPU op's entry, host.cpp): R a positive multiple of 8, C, slots
// and slot_bytes positive, slot_bytes a multiple of 16.
inline InternodeLayout make_internode_layout(int num_ranks, int num_channels, int rdma_slots, int nvl_slots,
                                             int64_t slot_bytes) {
  InternodeLayout l{};
  l.num_ranks = num_ranks;
  l.num_nodes = num_ranks / kInternodeNodeRanks;
  l.num_channels = num_channels;
  l.rdma_slots = rdma_slots;
  l.nvl_slots = nvl_slots;
  l.slot_bytes = slot_bytes;
  const int64_t R = num_ranks, N = l.num_nodes, C = num_channels, P = kInternodeNodeRanks;
  int64_t at = 0;
  auto take = [&at](int64_t bytes) {
    const int64_t offset = at;
    at += internode_align(bytes, kInternodeAlign);
    return offset;
  };
  l.barrier = take(R * 8);
  l.reset_begin = at;
  l.notify_arrival = take(R * 8);
  l.rdma_meta = take(C * N * kInternodeMetaWords * 8);
  l.rdma_head = take(C * N * 8);
  l.rdma_flag = take(C * N * rdma_slots * 8);
  l.nvl_meta = take(C * P * N * 8);
  l.nvl_head = take(C * P * 8);
  l.nvl_flag = take(C * P * nvl_slots * 8);
  l.reset_end = at;
  l.notify_record_bytes = (2 + kInternodeMaxLocalExperts) * 4;
  l.notify_send = take(R * l.notify_record_bytes);
  l.notify_recv = take(R * l.notify_record_bytes);
  l.rdma_send = take(C * N * rdma_slots * slot_bytes);
  l.rdma_recv = take(C * N * rdma_slots * slot_bytes);
  l.nvl_recv = take(C * P * nvl_slots * slot_bytes);
  l.total_bytes = at;
  return l;
}

// ---- token and prefix arithmetic shared by the kernels and the CPU plan op --------------------------------

// A channel's range in a stream travels as one nonzero word: (start + 1) << 32 | (end + 1).
DSV3_INTERNODE_HD uint64_t pack_range(int start, int end) {
  return uint64_t(uint32_t(start + 1)) << 32 | uint32_t(end + 1);
}
DSV3_INTERNODE_HD int range_start(uint64_t word) { return int(uint32_t(word >> 32)) - 1; }
DSV3_INTERNODE_HD int range_end(uint64_t word) { return int(uint32_t(word)) - 1; }

// Bits of the 8 ranks of `node` that token row `row` (of is_token_in_rank, R columns) goes to.
DSV3_INTERNODE_HD uint32_t node_bits(const bool* is_token_in_rank_row, int node) {
  uint32_t bits = 0;
  for (int j = 0; j < kInternodeNodeRanks; ++j)
    bits |= uint32_t(is_token_in_rank_row[node * kInternodeNodeRanks + j]) << j;
  return bits;
}

// Inclusive prefix entry [row, c] of an [rows, C] matrix, 0 before channel 0.
DSV3_INTERNODE_HD int prefix_before(const int* matrix, int num_channels, int row, int c) {
  return c == 0 ? 0 : matrix[row * num_channels + c - 1];
}

// Received rows of (source rank s, channel c) at a rank, from recv_gbl_channel_prefix_matrix [R, C]: entry
// [s, c] is the end row (exclusive) of that block; blocks are ordered by source, then channel.
struct RowRange {
  int begin, end;
};
DSV3_INTERNODE_HD RowRange gbl_row_range(const int* recv_gbl_channel_prefix_matrix, int num_channels, int s,
                                         int c) {
  const int* m = recv_gbl_channel_prefix_matrix;
  const int begin = c > 0 ? m[s * num_channels + c - 1] : (s > 0 ? m[s * num_channels - 1] : 0);
  return {begin, m[s * num_channels + c]};
}

// Tokens a forwarder received by RDMA from (source node m, channel c), as indices into its RDMA-received
// token list: recv_rdma_rank_prefix_sum [N] (inclusive over source nodes) and recv_rdma_channel_prefix_matrix
// [N, C] (inclusive over channels, within the source node's block).
DSV3_INTERNODE_HD RowRange rdma_token_range(const int* recv_rdma_channel_prefix_matrix,
                                            const int* recv_rdma_rank_prefix_sum, int num_channels, int m,
                                            int c) {
  const int base = m > 0 ? recv_rdma_rank_prefix_sum[m - 1] : 0;
  return {base + prefix_before(recv_rdma_channel_prefix_matrix, num_channels, m, c),
          base + recv_rdma_channel_prefix_matrix[m * num_channels + c]};
}

}  // namespace dsv3::ep
