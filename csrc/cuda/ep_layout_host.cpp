// CUDA entry of the EP dispatch-layout op: validate (shared with the CPU and Meta kernels), allocate, run the
// kernel of ep_layout.cu on the current stream, then read back its bad-entry report (one small copy that
// waits for the kernel) so an out-of-range expert id raises like on the CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ep_layout_kernels.h"

namespace dsv3 {

// Defined in csrc/cpu/ep_layout.cpp, beside the op's schema.
void check_ep_dispatch_layout(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                              int64_t num_ranks_per_node);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> alloc_ep_dispatch_layout(
    const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks, int64_t num_ranks_per_node);
[[noreturn]] void throw_bad_topk_entry(int64_t value, int64_t token, int64_t slot, int64_t num_experts);

namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ep_dispatch_layout(const at::Tensor& topk_idx,
                                                                              int64_t num_experts,
                                                                              int64_t num_ranks,
                                                                              int64_t num_ranks_per_node) {
  check_ep_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node);
  const c10::cuda::CUDAGuard guard(topk_idx.device());
  auto outputs = alloc_ep_dispatch_layout(topk_idx, num_experts, num_ranks, num_ranks_per_node);
  auto& [per_rank, per_rdma_rank, per_expert, in_rank] = outputs;
  const at::Tensor error = at::empty({3}, topk_idx.options().dtype(at::kLong));
  const EpLayoutArgs args{topk_idx.size(0),
                          topk_idx.size(1),
                          topk_idx.stride(0),
                          topk_idx.stride(1),
                          num_experts,
                          num_ranks,
                          num_ranks_per_node,
                          per_rank.data_ptr<int32_t>(),
                          per_rdma_rank.data_ptr<int32_t>(),
                          per_expert.data_ptr<int32_t>(),
                          in_rank.data_ptr<bool>(),
                          error.data_ptr<int64_t>()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = topk_idx.scalar_type() == at::kLong
                              ? launch_ep_dispatch_layout(topk_idx.const_data_ptr<int64_t>(), args, stream)
                              : launch_ep_dispatch_layout(topk_idx.const_data_ptr<int32_t>(), args, stream);
  TORCH_CHECK(err == cudaSuccess, "ep_dispatch_layout: CUDA kernel launch failed: ", cudaGetErrorString(err));
  const at::Tensor report = error.cpu();
  const int64_t* bad = report.const_data_ptr<int64_t>();
  if (bad[0] != 0) throw_bad_topk_entry(bad[1], bad[2] / args.top_k, bad[2] % args.top_k, num_experts);
  return outputs;
}

}  // namespace cuda
}  // namespace dsv3

TORCH_LIBRARY_IMPL(dsv3, CUDA, m) { m.impl("ep_dispatch_layout", &dsv3::cuda::ep_dispatch_layout); }
