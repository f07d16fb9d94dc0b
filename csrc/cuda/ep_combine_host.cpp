// CUDA entry of the EP combine reduction: the shared checks (dsv3/ep/combine.h), allocation, and the kernel
// of ep_combine.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dsv3/checks.h"
#include "dsv3/ep/combine.h"
#include "ep_combine_kernels.h"

namespace dsv3::cuda {
namespace {

at::Tensor ep_combine_reduce_cuda(const at::Tensor& x_in, const at::Tensor& row_of_in,
                                  const std::optional<at::Tensor>& bias_0,
                                  const std::optional<at::Tensor>& bias_1, int64_t ranks_per_node) {
  check_ep_combine_reduce(x_in, row_of_in, bias_0, bias_1, ranks_per_node);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor row_of = row_of_in.contiguous();
  DSV3_CHECK(row_of.size(0) <= 0x7fffffff, "ep_combine_reduce",
             "row_of must have fewer than 2^31 tokens, got ", row_of.size(0));
  check_ep_combine_rows(x, row_of);
  at::Tensor out = alloc_ep_combine_reduce(x, row_of);
  at::Tensor b[2];
  for (int i = 0; i < 2; ++i) {
    const auto& src = i ? bias_1 : bias_0;
    if (src.has_value()) b[i] = src->to(at::kFloat).contiguous();
  }
  const auto type = x.scalar_type() == at::kFloat      ? CombineRowType::kFloat
                    : x.scalar_type() == at::kBFloat16 ? CombineRowType::kBFloat16
                                                       : CombineRowType::kHalf;
  const int64_t ranks = row_of.size(1);
  const cudaError_t err = ep_combine_reduce(
      type, x.const_data_ptr(), row_of.const_data_ptr<int64_t>(),
      b[0].defined() ? b[0].const_data_ptr<float>() : nullptr,
      b[1].defined() ? b[1].const_data_ptr<float>() : nullptr, out.mutable_data_ptr(), row_of.size(0),
      x.size(1), ranks, ep_combine_node_size(ranks, ranks_per_node), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ep_combine_reduce: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace dsv3::cuda

TORCH_LIBRARY_IMPL(dsv3, CUDA, m) { m.impl("ep_combine_reduce", &dsv3::cuda::ep_combine_reduce_cuda); }
