// CUDA entry of the MoE router: validate (dsv3/validate.h), allocate, and call the kernel of moe_route.cu on
// the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dsv3/ops.h"
#include "dsv3/validate.h"
#include "moe_route_kernels.h"

namespace dsv3::cuda {

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits_in,
                                             const std::optional<at::Tensor>& bias_in, int64_t top_k,
                                             int64_t n_group, int64_t topk_group,
                                             double routed_scaling_factor, bool norm_topk_prob) {
  check_moe_route(logits_in, bias_in, top_k, n_group, topk_group, routed_scaling_factor);
  static_assert(kRouteMaxExperts == kMaxRouteExperts, "the shared validation caps E at the kernel's limit");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  auto [topk_idx, topk_weights] = alloc_moe_route(logits_in, top_k);
  const at::Tensor logits = logits_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const cudaError_t err = moe_route(
      logits.const_data_ptr<float>(), has_bias ? bias.const_data_ptr<float>() : nullptr, logits.size(0),
      logits.size(1), top_k, n_group, topk_group, static_cast<float>(routed_scaling_factor), norm_topk_prob,
      topk_idx.data_ptr<int64_t>(), topk_weights.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "moe_route: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {topk_idx, topk_weights};
}

}  // namespace dsv3::cuda
