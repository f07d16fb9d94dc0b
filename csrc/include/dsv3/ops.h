// The per-device implementations registered in csrc/ops.cpp. Each validates its arguments first
// (dsv3/validate.h), so every device accepts and rejects the same inputs.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace dsv3 {

#define DSV3_DECLARE_OPS                                                                                     \
  std::tuple<at::Tensor, at::Tensor> quantize_per_token_group(const at::Tensor& x, int64_t group_size,       \
                                                              bool ue8m0, bool col_major_scales);            \
  at::Tensor dequantize_per_token_group(const at::Tensor& q, const at::Tensor& scales, int64_t group_size,   \
                                        std::optional<at::ScalarType> out_dtype);                            \
  std::tuple<at::Tensor, at::Tensor> quantize_per_block(const at::Tensor& w, int64_t block_size,             \
                                                        bool ue8m0);                                         \
  at::Tensor dequantize_per_block(const at::Tensor& q, const at::Tensor& scale_inv, int64_t block_size,      \
                                  std::optional<at::ScalarType> out_dtype);                                  \
  void fp8_gemm_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,     \
                   at::Tensor& out);                                                                         \
  void m_grouped_fp8_gemm_nt_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,      \
                                        const at::Tensor& sb, const at::Tensor& m_indices, at::Tensor& out); \
  void m_grouped_fp8_gemm_nt_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,          \
                                    const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,    \
                                    at::Tensor& out);                                                        \
  void fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,                     \
                         const at::Tensor& sb, at::Tensor& out);                                             \
  void k_grouped_fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,           \
                                   const at::Tensor& sb, at::IntArrayRef ks, at::Tensor& out);               \
  std::tuple<at::Tensor, at::Tensor> get_mla_decode_metadata(                                                \
      const at::Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k, int64_t num_heads_k,                 \
      std::optional<int64_t> num_sm_parts);                                                                  \
  std::tuple<at::Tensor, at::Tensor> mla_decode(                                                             \
      const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,                        \
      const at::Tensor& cache_seqlens, int64_t head_dim_v, std::optional<double> softmax_scale, bool causal, \
      const std::optional<at::Tensor>& tile_scheduler_metadata,                                              \
      const std::optional<at::Tensor>& num_splits);                                                          \
  std::tuple<at::Tensor, at::Tensor> moe_route(                                                              \
      const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k, int64_t n_group,       \
      int64_t topk_group, double routed_scaling_factor, bool norm_topk_prob);

namespace cpu {
DSV3_DECLARE_OPS
}
namespace meta {
DSV3_DECLARE_OPS
}
#ifdef DSV3_WITH_CUDA
namespace cuda {
DSV3_DECLARE_OPS
}
#endif
#undef DSV3_DECLARE_OPS

// Build and run-time facts as a JSON object (version, torch, cuda archs, cpu path), for `dsv3 info`.
std::string build_info();

}  // namespace dsv3
