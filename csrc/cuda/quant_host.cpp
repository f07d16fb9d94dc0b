// CUDA entries of the quantization ops: validate (dsv3/validate.h), allocate, and call the sm_90a kernels
// of quant.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dsv3/checks.h"
#include "dsv3/ops.h"
#include "dsv3/validate.h"
#include "quant_kernels.h"

namespace dsv3::cuda {
namespace {

DType dtype_of(at::ScalarType t) {
  return t == at::kFloat ? DType::kF32 : t == at::kBFloat16 ? DType::kBF16 : DType::kF16;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_per_token_group(const at::Tensor& x_in, int64_t group_size,
                                                            bool ue8m0, bool col_major_scales) {
  check_quantize_per_token_group(x_in, group_size, col_major_scales);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto [q, scales] = alloc_quantize_per_token_group(x_in, group_size, col_major_scales);
  const at::Tensor x = x_in.contiguous();
  const TokenGroupScales g = token_group_scales(x, scales, /*writable=*/true);
  check_launch(quantize_per_token_group(x.const_data_ptr(), dtype_of(x.scalar_type()), g.batch, g.rows,
                                        x.size(-1), group_size, ue8m0, static_cast<uint8_t*>(q.data_ptr()),
                                        scales.data_ptr<float>(), g.scales3.stride(0), g.scales3.stride(1),
                                        g.scales3.stride(2), c10::cuda::getCurrentCUDAStream()),
               "quantize_per_token_group");
  return {q, scales};
}

at::Tensor dequantize_per_token_group(const at::Tensor& q_in, const at::Tensor& scales, int64_t group_size,
                                      std::optional<at::ScalarType> out_dtype) {
  const auto dt = out_dtype.value_or(at::kBFloat16);
  check_dequantize_per_token_group(q_in, scales, group_size, dt);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  auto out = at::empty(q.sizes(), q.options().dtype(dt));
  const TokenGroupScales g = token_group_scales(q, scales, /*writable=*/false);
  check_launch(dequantize_per_token_group(
                   static_cast<const uint8_t*>(q.const_data_ptr()), g.scales3.const_data_ptr<float>(),
                   g.scales3.stride(0), g.scales3.stride(1), g.scales3.stride(2), g.batch, g.rows, q.size(-1),
                   group_size, out.data_ptr(), dtype_of(dt), c10::cuda::getCurrentCUDAStream()),
               "dequantize_per_token_group");
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_block(const at::Tensor& w_in, int64_t block_size,
                                                      bool ue8m0) {
  check_quantize_per_block(w_in, block_size);
  const c10::cuda::CUDAGuard guard(w_in.device());
  auto [q, scale_inv] = alloc_quantize_per_block(w_in, block_size);
  const at::Tensor w = w_in.contiguous();
  check_launch(
      quantize_per_block(w.const_data_ptr(), dtype_of(w.scalar_type()), w.dim() == 3 ? w.size(0) : 1,
                         w.size(-2), w.size(-1), block_size, ue8m0, static_cast<uint8_t*>(q.data_ptr()),
                         scale_inv.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
      "quantize_per_block");
  return {q, scale_inv};
}

at::Tensor dequantize_per_block(const at::Tensor& q_in, const at::Tensor& scale_inv_in, int64_t block_size,
                                std::optional<at::ScalarType> out_dtype) {
  const auto dt = out_dtype.value_or(at::kBFloat16);
  check_dequantize_per_block(q_in, scale_inv_in, block_size, dt);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), scale_inv = scale_inv_in.contiguous();
  auto out = at::empty(q.sizes(), q.options().dtype(dt));
  check_launch(
      dequantize_per_block(static_cast<const uint8_t*>(q.const_data_ptr()), scale_inv.const_data_ptr<float>(),
                           q.dim() == 3 ? q.size(0) : 1, q.size(-2), q.size(-1), block_size, out.data_ptr(),
                           dtype_of(dt), c10::cuda::getCurrentCUDAStream()),
      "dequantize_per_block");
  return out;
}

}  // namespace dsv3::cuda
