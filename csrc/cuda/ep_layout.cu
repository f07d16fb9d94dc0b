// sm_90a EP dispatch-layout kernel (SPEC §5) behind the launcher of ep_layout_kernels.h. Every block reads
// all of topk_idx and owns kColumns outputs of one kind: experts (every (token, k) entry counts), ranks or
// nodes (a token counts once per rank / node; rank blocks also write their columns of is_token_in_rank). Each
// thread counts its tokens in its own shared-memory row; the rows are summed after one barrier, so every
// output is written once, with no atomics and a result independent of the schedule.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "ep_layout_kernels.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kColumns = 8;                   // outputs per block: a byte of is_token_in_rank per token
constexpr int kRowStride = kColumns + 1;      // odd: one column of all rows spans all 32 banks
constexpr int kGroups = kThreads / kColumns;  // row groups of the first reduction step
constexpr int kRowsPerGroup = kThreads / kGroups;

enum Role { kExperts, kRanks, kNodes };

struct KernelArgs {
  int64_t tokens, stride_token, stride_slot;
  int top_k, num_experts, num_ranks, num_nodes;
  int experts_per_rank, experts_per_node;
  int expert_blocks, rank_blocks;
  int32_t* num_tokens_per_rank;
  int32_t* num_tokens_per_rdma_rank;
  int32_t* num_tokens_per_expert;
  bool* is_token_in_rank;
  unsigned long long* error;
};

template <typename Index>
__global__ void __launch_bounds__(kThreads)
    ep_dispatch_layout_kernel(const Index* __restrict__ topk_idx, const KernelArgs a) {
  __shared__ int32_t counts[kThreads * kRowStride];
  __shared__ int32_t partial[kGroups * kColumns];

  int block = blockIdx.x;
  const Role role = block < a.expert_blocks                   ? kExperts
                    : block < a.expert_blocks + a.rank_blocks ? kRanks
                                                              : kNodes;
  if (role == kRanks) block -= a.expert_blocks;
  if (role == kNodes) block -= a.expert_blocks + a.rank_blocks;
  const int first = block * kColumns;
  const int total = role == kExperts ? a.num_experts : role == kRanks ? a.num_ranks : a.num_nodes;
  const int columns = min(kColumns, total - first);
  // The column of expert e is e / divisor - first: experts themselves, or their rank / node.
  const int divisor = role == kExperts ? 1 : role == kRanks ? a.experts_per_rank : a.experts_per_node;
  const int lo = first * divisor, hi = (first + columns) * divisor;  // the experts this block counts
  // Only the first block reports bad entries; the others skip them the same way.
  const bool reports = blockIdx.x == 0;

  int32_t* my_counts = counts + threadIdx.x * kRowStride;
#pragma unroll
  for (int c = 0; c < kColumns; ++c) my_counts[c] = 0;

  int64_t bad_at = -1, bad_value = 0;  // an entry outside [-1, num_experts), reported once per thread
  for (int64_t t = threadIdx.x; t < a.tokens; t += kThreads) {
    const Index* row = topk_idx + t * a.stride_token;
    uint32_t hit = 0;  // this token's columns (ranks or nodes), each counted once
    for (int j = 0; j < a.top_k; ++j) {
      const int64_t e = static_cast<int64_t>(row[j * a.stride_slot]);
      if (e < lo || e >= hi) {
        if (e < -1 || e >= a.num_experts) {
          bad_at = t * a.top_k + j;
          bad_value = e;
        }
        continue;
      }
      const int column = (static_cast<int>(e) - lo) / divisor;
      if (role == kExperts)
        ++my_counts[column];  // not de-duplicated: a repeated expert counts twice, as in DeepEP
      else
        hit |= 1u << column;
    }
    if (role == kExperts) continue;
#pragma unroll
    for (int c = 0; c < kColumns; ++c) my_counts[c] += hit >> c & 1;
    if (role == kRanks) {
      bool* in_rank = a.is_token_in_rank + t * a.num_ranks + first;
      for (int c = 0; c < columns; ++c) in_rank[c] = hit >> c & 1;
    }
  }
  if (reports && bad_at >= 0 && atomicCAS(a.error, 0ull, 1ull) == 0ull) {
    a.error[1] = static_cast<unsigned long long>(bad_value);
    a.error[2] = static_cast<unsigned long long>(bad_at);
  }
  __syncthreads();

  // Two steps of fixed-order sums: kGroups partials per column, then the column totals.
  {
    const int column = threadIdx.x % kColumns, group = threadIdx.x / kColumns;
    int32_t sum = 0;
#pragma unroll
    for (int r = 0; r < kRowsPerGroup; ++r) sum += counts[(group * kRowsPerGroup + r) * kRowStride + column];
    partial[group * kColumns + column] = sum;
  }
  __syncthreads();
  if (threadIdx.x < columns) {
    int32_t sum = 0;
#pragma unroll 8
    for (int g = 0; g < kGroups; ++g) sum += partial[g * kColumns + threadIdx.x];
    int32_t* out = role == kExperts ? a.num_tokens_per_expert
                   : role == kRanks ? a.num_tokens_per_rank
                                    : a.num_tokens_per_rdma_rank;
    out[first + threadIdx.x] = sum;
  }
}

int64_t blocks_for(int64_t outputs) { return (outputs + kColumns - 1) / kColumns; }

template <typename Index>
cudaError_t launch_kernel(const Index* topk_idx, const EpLayoutArgs& args, cudaStream_t stream) {
  if (args.tokens < 0 || args.top_k < 0 || args.num_experts < 1 || args.num_experts > INT_MAX ||
      args.num_ranks < 1 || args.num_experts % args.num_ranks != 0 || args.num_ranks_per_node < 1 ||
      (args.top_k > 0 && args.tokens > INT_MAX / args.top_k))
    return cudaErrorInvalidValue;
  const bool multi_node = args.num_ranks > args.num_ranks_per_node;
  if (multi_node && args.num_ranks % args.num_ranks_per_node != 0) return cudaErrorInvalidValue;
  const int num_nodes = multi_node ? static_cast<int>(args.num_ranks / args.num_ranks_per_node) : 0;
  const int experts_per_rank = static_cast<int>(args.num_experts / args.num_ranks);
  const KernelArgs a{args.tokens,
                     args.stride_token,
                     args.stride_slot,
                     static_cast<int>(args.top_k),
                     static_cast<int>(args.num_experts),
                     static_cast<int>(args.num_ranks),
                     num_nodes,
                     experts_per_rank,
                     multi_node ? experts_per_rank * static_cast<int>(args.num_ranks_per_node) : 1,
                     static_cast<int>(blocks_for(args.num_experts)),
                     static_cast<int>(blocks_for(args.num_ranks)),
                     args.num_tokens_per_rank,
                     args.num_tokens_per_rdma_rank,
                     args.num_tokens_per_expert,
                     args.is_token_in_rank,
                     reinterpret_cast<unsigned long long*>(args.error)};
  cudaError_t err = cudaMemsetAsync(args.error, 0, 3 * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  const int64_t blocks = blocks_for(args.num_experts) + blocks_for(args.num_ranks) + blocks_for(num_nodes);
  ep_dispatch_layout_kernel<Index><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(topk_idx, a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ep_dispatch_layout(const int64_t* topk_idx, const EpLayoutArgs& args,
                                      cudaStream_t stream) {
  return launch_kernel(topk_idx, args, stream);
}

cudaError_t launch_ep_dispatch_layout(const int32_t* topk_idx, const EpLayoutArgs& args,
                                      cudaStream_t stream) {
  return launch_kernel(topk_idx, args, stream);
}

}  // namespace dsv3::cuda
