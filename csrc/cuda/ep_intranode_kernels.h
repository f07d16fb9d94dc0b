// Launchers of the intranode (NVLink) EP kernels of csrc/cuda/ep_intranode.cu, torch-free:
// csrc/cuda/ep_intranode_host.cpp validates the tensors, builds the NvlContext and calls these with raw
// pointers. Every rank of the group launches the same sequence with the same layout; each call returns
// cudaErrorInvalidValue for a rank count outside {2, 4, 8}, else the launch error.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dsv3/ep/nvl_layout.h"

namespace dsv3::cuda {

// What every kernel needs to reach the group: a device array [R] of each rank's buffer as mapped in this
// process (buffers[rank] is this rank's own; global memory, since kernels index it by a runtime rank), the
// device address of the host-mapped counters (nvl_layout.h: kNvlHost*), this rank, and
// the spin budget in SM clock cycles after which a wait gives up (error word, then trap).
struct NvlContext {
  void* const* buffers;
  int* host_counters;
  int rank;
  long long timeout_cycles;
};

// Barrier over the group (one block).
[[nodiscard]] cudaError_t nvl_barrier(const NvlContext& ctx, const ep::NvlLayout& layout,
                                      cudaStream_t stream);

// Barrier, zero this rank's queue head/tail/offset words, barrier: what a cached dispatch or a combine needs
// before its queues are used (the first barrier guarantees no peer still reads them).
[[nodiscard]] cudaError_t nvl_reset_queues(const NvlContext& ctx, const ep::NvlLayout& layout,
                                           cudaStream_t stream);

// Count exchange of a dispatch: writes num_tokens_per_rank [R] and num_tokens_per_expert [E] into every peer,
// then builds rank_prefix_matrix [R, R] (inclusive over sources) and channel_prefix_matrix [R, C] of
// is_token_in_rank [n, R], publishes the received row count and the per-local-expert counts rounded up to
// expert_alignment to the host counters (then `sequence` to kNvlHostSeq), and resets the queues for the
// dispatch that follows.
[[nodiscard]] cudaError_t nvl_notify_dispatch(const NvlContext& ctx, const ep::NvlLayout& layout,
                                              const int* num_tokens_per_rank,
                                              const int* num_tokens_per_expert, const bool* is_token_in_rank,
                                              int num_tokens, int expert_alignment, int sequence,
                                              int* rank_prefix_matrix, int* channel_prefix_matrix,
                                              cudaStream_t stream);

struct NvlDispatchArgs {
  const void* x;                                    // [n, hidden_bytes] rows
  const int* x_scales;                              // 4-byte scale words (fp32 or UE8M0 int32) or nullptr
  int64_t scale_token_stride, scale_hidden_stride;  // in elements
  const int64_t* topk_idx;           // [n, k] global expert ids (-1 = none) or nullptr (cached dispatch)
  const float* topk_weights;         // [n, k] or nullptr
  const bool* is_token_in_rank;      // [n, R]
  const int* rank_prefix_matrix;     // [R, R]
  const int* channel_prefix_matrix;  // [R, C] this rank's, inclusive
  int num_tokens, num_recv_capacity, num_local_experts, num_max_send_tokens;
  void* recv_x;                     // [capacity, hidden_bytes]
  int* recv_x_scales;               // [capacity, num_scales] or nullptr
  int64_t* recv_topk_idx;           // [capacity, k] local ids or -1, or nullptr
  float* recv_topk_weights;         // [capacity, k] or nullptr
  int* recv_src_idx;                // [capacity] or nullptr
  int* recv_channel_prefix_matrix;  // [R, C] or nullptr
  int* send_head;                   // [n, R] or nullptr
};
[[nodiscard]] cudaError_t nvl_dispatch(const NvlContext& ctx, const ep::NvlLayout& layout,
                                       const NvlDispatchArgs& args, cudaStream_t stream);

struct NvlCombineArgs {
  const void* x;                          // [num_recv, H] bf16, in dispatch order
  const float* topk_weights;              // [num_recv, k] or nullptr
  const void* bias_0;                     // [n, H] bf16 or nullptr
  const void* bias_1;                     // [n, H] bf16 or nullptr
  const int* rank_prefix_matrix;          // [R, R] of the dispatch
  const int* recv_channel_prefix_matrix;  // [R, C] of the dispatch (first row of each source's channel)
  const int* send_head;                   // [n, R] of the dispatch
  int num_tokens, hidden, num_max_send_tokens;
  void* combined_x;              // [n, H] bf16
  float* combined_topk_weights;  // [n, k] or nullptr
};
[[nodiscard]] cudaError_t nvl_combine(const NvlContext& ctx, const ep::NvlLayout& layout,
                                      const NvlCombineArgs& args, cudaStream_t stream);

}  // namespace dsv3::cuda
