// Meta (fake-tensor) kernels: validate and allocate exactly as the real kernels do, compute nothing.
// torch.compile traces the ops through these.
#include "dsv3/ops.h"
#include "dsv3/validate.h"

#include <ATen/ATen.h>

namespace dsv3::meta {

std::tuple<at::Tensor, at::Tensor> quantize_per_token_group(const at::Tensor& x, int64_t group_size,
                                                            bool ue8m0, bool col_major_scales) {
  check_quantize_per_token_group(x, group_size, col_major_scales);
  return alloc_quantize_per_token_group(x, group_size, col_major_scales);
}

at::Tensor dequantize_per_token_group(const at::Tensor& q, const at::Tensor& scales, int64_t group_size,
                                      std::optional<at::ScalarType> out_dtype) {
  const auto dt = out_dtype.value_or(at::kBFloat16);
  check_dequantize_per_token_group(q, scales, group_size, dt);
  return at::empty(q.sizes(), q.options().dtype(dt));
}

std::tuple<at::Tensor, at::Tensor> quantize_per_block(const at::Tensor& w, int64_t block_size, bool ue8m0) {
  check_quantize_per_block(w, block_size);
  return alloc_quantize_per_block(w, block_size);
}

at::Tensor dequantize_per_block(const at::Tensor& q, const at::Tensor& scale_inv, int64_t block_size,
                                std::optional<at::ScalarType> out_dtype) {
  const auto dt = out_dtype.value_or(at::kBFloat16);
  check_dequantize_per_block(q, scale_inv, block_size, dt);
  return at::empty(q.sizes(), q.options().dtype(dt));
}

void fp8_gemm_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                 at::Tensor& out) {
  check_fp8_gemm_nt(a, sa, b, sb, out);
}

void m_grouped_fp8_gemm_nt_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                      const at::Tensor& sb, const at::Tensor& m_indices, at::Tensor& out) {
  check_m_grouped_contiguous(a, sa, b, sb, m_indices, out);
}

void m_grouped_fp8_gemm_nt_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                  const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,
                                  at::Tensor& out) {
  check_m_grouped_masked(a, sa, b, sb, masked_m, expected_m, out);
}

void fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                       at::Tensor& out) {
  check_fp8_gemm_wgrad_nt(a, sa, b, sb, out);
}

void k_grouped_fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                 const at::Tensor& sb, at::IntArrayRef ks, at::Tensor& out) {
  check_k_grouped_wgrad(a, sa, b, sb, ks, out);
}

// The schedule's row count depends on the device's workers; without a device it is num_sm_parts, or one
// part per ATen thread (the CPU choice).
std::tuple<at::Tensor, at::Tensor> get_mla_decode_metadata(const at::Tensor& cache_seqlens,
                                                           int64_t num_q_tokens_per_head_k,
                                                           int64_t num_heads_k,
                                                           std::optional<int64_t> num_sm_parts) {
  check_mla_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts);
  const int64_t parts = mla_cpu_parts(num_q_tokens_per_head_k, num_heads_k, num_sm_parts);
  return alloc_mla_metadata(cache_seqlens, parts);
}

std::tuple<at::Tensor, at::Tensor> mla_decode(const at::Tensor& q, const at::Tensor& kv_cache,
                                              const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                              int64_t head_dim_v, std::optional<double> softmax_scale,
                                              bool causal,
                                              const std::optional<at::Tensor>& tile_scheduler_metadata,
                                              const std::optional<at::Tensor>& num_splits) {
  const MlaDecodeDims d = check_mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                                           tile_scheduler_metadata, num_splits);
  return alloc_mla_decode(q, d);
}

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                             int64_t top_k, int64_t n_group, int64_t topk_group,
                                             double routed_scaling_factor, bool norm_topk_prob) {
  check_moe_route(logits, bias, top_k, n_group, topk_group, routed_scaling_factor);
  return alloc_moe_route(logits, top_k);
}

}  // namespace dsv3::meta
