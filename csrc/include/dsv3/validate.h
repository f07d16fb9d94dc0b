// Argument validation and output allocation shared by the CPU, CUDA and Meta kernels of every op, so the
// three agree on what is accepted and what comes out. Failures raise ValueError/TypeError naming the
// argument.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace dsv3 {

constexpr int64_t kGemmBlock = 128;  // K block of every scale; N block of the weight scales
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Quantization (SPEC §2). Outputs: q e4m3 with x's shape; scales fp32 [..., ceil(K/g)] (col-major: MN-major
// over the last two dims, M padded to a multiple of 4, padding zero-filled).
void check_quantize_per_token_group(const at::Tensor& x, int64_t group_size, bool col_major_scales);
std::tuple<at::Tensor, at::Tensor> alloc_quantize_per_token_group(const at::Tensor& x, int64_t group_size,
                                                                  bool col_major_scales);
// The scales of a per-token-group op over x [..., rows, K] (1-D x: one row) as [batch, rows, groups]. For
// `writable` scales (an op's output) this is always a view; read-only scales may be copied when they cannot
// be viewed so.
struct TokenGroupScales {
  at::Tensor scales3;
  int64_t batch, rows;
};
TokenGroupScales token_group_scales(const at::Tensor& x, const at::Tensor& scales, bool writable);
void check_dequantize_per_token_group(const at::Tensor& q, const at::Tensor& scales, int64_t group_size,
                                      at::ScalarType out_dtype);
void check_quantize_per_block(const at::Tensor& w, int64_t block_size);
std::tuple<at::Tensor, at::Tensor> alloc_quantize_per_block(const at::Tensor& w, int64_t block_size);
void check_dequantize_per_block(const at::Tensor& q, const at::Tensor& scale_inv, int64_t block_size,
                                at::ScalarType out_dtype);

// GEMMs (SPEC §3).
void check_fp8_gemm_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                       const at::Tensor& out);
void check_m_grouped_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                const at::Tensor& sb, const at::Tensor& m_indices, const at::Tensor& out);
void check_m_grouped_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                            const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,
                            const at::Tensor& out);
void check_fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                             const at::Tensor& sb, const at::Tensor& out);
void check_k_grouped_wgrad(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                           const at::Tensor& sb, at::IntArrayRef ks, const at::Tensor& out);

}  // namespace dsv3
