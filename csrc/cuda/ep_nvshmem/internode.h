// Launchers of the internode normal-mode EP kernels (internode.cu), free of torch and NVSHMEM headers:
// host.cpp validates the tensors and calls these with raw pointers. Every rank of the group launches the same
// sequence of calls with the same layout (csrc/include/dsv3/ep/internode_layout.h); PE = rank in the group,
// ranks node * 8 .. node * 8 + 7 share a node.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dsv3/ep/internode_layout.h"

namespace dsv3::ep::nvshmem {

// Error codes (what << 24 | peer) a timed-out internode wait leaves in the host-mapped error flag before
// it traps (1..4 are the low-latency kernels').
enum InternodeError : int {
  kErrInternodeBarrier = 5,
  kErrInternodeNotify = 6,
  kErrInternodeDispatchSend = 7,     // waiting for RDMA queue space at a forwarder
  kErrInternodeDispatchForward = 8,  // forwarder waiting for RDMA rows or NVLink queue space
  kErrInternodeDispatchRecv = 9,     // waiting for rows from a forwarder
  kErrInternodeCombineSend = 10,     // waiting for NVLink queue space at a forwarder
  kErrInternodeCombineForward = 11,  // forwarder waiting for NVLink rows or RDMA queue space
  kErrInternodeCombineRecv = 12,     // waiting for a node's partial sums
  kErrInternodeOverflow = 13,        // more rows than the outputs hold (num_worst_tokens too small)
};

struct InternodeContext {
  uint8_t* buffer;     // this rank's symmetric buffer
  int* error_flag;     // host-mapped
  int* host_counters;  // host-mapped [kInternodeHostInts]
  int rank, num_ranks;
  int64_t timeout_cycles;
};

// Whether the buffers of the 8 ranks of this rank's node are mapped into this process (NVSHMEM P2P): the
// kernels write NVLink queues through those mappings.
bool internode_node_mapped(const void* buffer, int rank);

// Two barrier rounds over the group with the buffer's reset region zeroed in between: afterwards every rank
// has finished its previous internode call and no stale flag, head or meta word is left. `rounds_before` is
// the number of barrier rounds this buffer did before (the barrier words count them; identical on all ranks).
cudaError_t internode_sync(const InternodeContext& ctx, const InternodeLayout& layout, int64_t rounds_before,
                           cudaStream_t stream);

// Sender-side matrices of is_token_in_rank [n, R]: rdma_channel_prefix_matrix [N, C] and
// gbl_channel_prefix_matrix [R, C], inclusive over channels.
cudaError_t internode_channel_prefix(const bool* is_token_in_rank, int num_tokens, int num_ranks,
                                     int num_channels, int* rdma_channel_prefix_matrix,
                                     int* gbl_channel_prefix_matrix, cudaStream_t stream);

// Count exchange (after internode_sync and internode_channel_prefix): every rank sends each peer its row
// total, node total and per-expert counts; builds recv_rdma_rank_prefix_sum [N] (rows this rank receives by
// RDMA from the rank with its local index on each node, inclusive) and recv_gbl_rank_prefix_sum [R]
// (inclusive), and publishes both totals and the per-local-expert counts rounded up to expert_alignment to
// the host counters, then `sequence`.
cudaError_t internode_notify(const InternodeContext& ctx, const InternodeLayout& layout,
                             const int* num_tokens_per_expert, int num_local_experts,
                             const int* rdma_channel_prefix_matrix, const int* gbl_channel_prefix_matrix,
                             int expert_alignment, int sequence, int* recv_rdma_rank_prefix_sum,
                             int* recv_gbl_rank_prefix_sum, cudaStream_t stream);

struct InternodeDispatchArgs {
  const void* x;  // [n, row_bytes]
  int64_t row_bytes;
  const int* x_scales;  // [n, num_scales] 4-byte words, row-major, or nullptr
  int num_scales;
  const int64_t* topk_idx;                // [n, k] global expert ids (-1 none), nullptr in a cached dispatch
  const float* topk_weights;              // [n, k] or nullptr
  int num_topk;                           // 0 in a cached dispatch
  const bool* is_token_in_rank;           // [n, R]
  const int* rdma_channel_prefix_matrix;  // [N, C] this rank's (sender side)
  const int* gbl_channel_prefix_matrix;   // [R, C] this rank's (sender side)
  const int* recv_rdma_rank_prefix_sum;   // [N]
  const int* recv_gbl_rank_prefix_sum;    // [R]
  int num_tokens, num_local_experts;
  int num_recv_capacity, num_rdma_recv_capacity;  // rows of the recv outputs / of send_nvl_head
  int rdma_chunk, nvl_chunk;                      // consumed records returned to the producer at once
  void* recv_x;                                   // [capacity, row_bytes]
  int* recv_x_scales;                             // [capacity, num_scales] or nullptr
  int64_t* recv_topk_idx;                         // [capacity, k] local ids or -1, or nullptr
  float* recv_topk_weights;                       // [capacity, k] or nullptr
  int* recv_src_meta;  // [capacity, 2] (source rank, is-in-rank bits of this node) or nullptr
  int* recv_rdma_channel_prefix_matrix;  // [N, C] or nullptr
  int* recv_gbl_channel_prefix_matrix;   // [R, C] or nullptr
  int* send_rdma_head;                   // [n, N] or nullptr
  int* send_nvl_head;                    // [rdma capacity, 8] or nullptr
};
cudaError_t internode_dispatch(const InternodeContext& ctx, const InternodeLayout& layout,
                               const InternodeDispatchArgs& args, cudaStream_t stream);

struct InternodeCombineArgs {
  const void* x;  // [num_recv, H] bf16 in dispatch order
  int hidden;
  const float* topk_weights;  // [num_recv, k] or nullptr
  int num_topk;
  const void* bias_0;  // [n, H] bf16 or nullptr
  const void* bias_1;
  const int* recv_rdma_channel_prefix_matrix;  // [N, C] of the dispatch
  const int* recv_rdma_rank_prefix_sum;        // [N]
  const int* recv_gbl_channel_prefix_matrix;   // [R, C]
  const int* send_rdma_head;                   // [n, N]
  const int* send_nvl_head;                    // [num_rdma_recv, 8]
  int num_tokens, num_rdma_recv;
  int rdma_chunk, nvl_chunk;
  void* combined_x;              // [n, H] bf16
  float* combined_topk_weights;  // [n, k] or nullptr
};
// Run after internode_sync.
cudaError_t internode_combine(const InternodeContext& ctx, const InternodeLayout& layout,
                              const InternodeCombineArgs& args, cudaStream_t stream);

}  // namespace dsv3::ep::nvshmem
