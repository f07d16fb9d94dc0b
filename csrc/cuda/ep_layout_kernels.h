// Launcher of the sm_90a EP dispatch-layout kernel of SPEC §5 (python/dsv3/ep/layout.py holds the reference).
// Torch-free: csrc/cuda/ep_layout_host.cpp validates the tensors, calls it with raw pointers and turns a
// returned error or a reported bad entry into an exception.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv3::cuda {

struct EpLayoutArgs {
  int64_t tokens, top_k;
  int64_t stride_token, stride_slot;  // topk_idx's strides, in elements
  int64_t num_experts, num_ranks, num_ranks_per_node;
  int32_t* num_tokens_per_rank;       // [num_ranks]
  int32_t* num_tokens_per_rdma_rank;  // [num_ranks / num_ranks_per_node] when num_ranks > num_ranks_per_node
  int32_t* num_tokens_per_expert;     // [num_experts]
  bool* is_token_in_rank;             // contiguous [tokens, num_ranks]
  // [3]: after the kernel, {0, ...} or {1, value, token * top_k + slot} of one entry outside [-1,
  // num_experts)
  int64_t* error;
};

// Writes every output of `args` from topk_idx (experts in contiguous blocks of num_experts / num_ranks per
// rank; -1 = no expert) on `stream`. Entries outside [-1, num_experts) are skipped and reported in
// args.error. Returns cudaSuccess, cudaErrorInvalidValue for arguments it cannot serve (a negative size,
// num_ranks not dividing num_experts, several nodes not splitting the ranks evenly, num_experts or
// tokens * top_k beyond int32), or the launch error.
[[nodiscard]] cudaError_t launch_ep_dispatch_layout(const int64_t* topk_idx, const EpLayoutArgs& args,
                                                    cudaStream_t stream);
[[nodiscard]] cudaError_t launch_ep_dispatch_layout(const int32_t* topk_idx, const EpLayoutArgs& args,
                                                    cudaStream_t stream);

}  // namespace dsv3::cuda
