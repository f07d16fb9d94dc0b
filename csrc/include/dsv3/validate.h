// Argument validation and output allocation shared by the CPU, CUDA and Meta kernels of every op, so the
// three agree on what is accepted and what comes out. Failures raise ValueError/TypeError naming the
// argument.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
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

// MLA decode (SPEC §4). check_mla_decode validates everything that does not need the tensors' contents and
// returns the problem's dimensions; the *_contents checks read block_table / cache_seqlens / the schedule and
// so need host-readable (CPU) tensors.
struct MlaDecodeDims {
  int64_t b, s_q, h_q, h_kv, d_qk, d_v;
  int64_t q_rows;      // packed query rows per KV head: s_q * h_q / h_kv
  int64_t num_blocks;  // pages in the cache
  int64_t max_blocks;  // columns of block_table
  int64_t num_parts;   // rows of the schedule (0 when none was passed)
  bool fp8_kv;         // packed FP8 cache: per token d_v e4m3, ceil(d_v/128) fp32 scales, d_qk - d_v bf16
  double softmax_scale;
};
// Bytes per token and KV head of the packed FP8 cache (656 for d_qk = 576, d_v = 512).
inline int64_t mla_fp8_token_bytes(int64_t d_qk, int64_t d_v) {
  return d_v + 4 * ceil_div(d_v, kGemmBlock) + 2 * (d_qk - d_v);
}
void check_mla_metadata_args(const at::Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k,
                             int64_t num_heads_k, std::optional<int64_t> num_sm_parts);
std::tuple<at::Tensor, at::Tensor> alloc_mla_metadata(const at::Tensor& cache_seqlens, int64_t num_parts);
// Parts of a CPU schedule: num_sm_parts, else one per ATen thread and (KV head, 64-row tile).
int64_t mla_cpu_parts(int64_t num_q_tokens_per_head_k, int64_t num_heads_k,
                      std::optional<int64_t> num_sm_parts);
MlaDecodeDims check_mla_decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                               const at::Tensor& cache_seqlens, int64_t head_dim_v,
                               std::optional<double> softmax_scale,
                               const std::optional<at::Tensor>& tile_scheduler_metadata,
                               const std::optional<at::Tensor>& num_splits);
void check_mla_decode_contents(const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                               const MlaDecodeDims& d);
void check_mla_schedule_contents(const at::Tensor& tile_scheduler_metadata, const at::Tensor& num_splits,
                                 const at::Tensor& cache_seqlens, const MlaDecodeDims& d);
// out [b, s_q, h_q, d_v] in q's dtype, lse fp32 [b, h_q, s_q].
std::tuple<at::Tensor, at::Tensor> alloc_mla_decode(const at::Tensor& q, const MlaDecodeDims& d);

// MoE router (SPEC §5). Experts per token are capped so the CUDA kernel keeps a token's scores in one warp's
// registers; every device enforces the cap so all accept the same inputs.
constexpr int64_t kMaxRouteExperts = 1024;
void check_moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
                     int64_t n_group, int64_t topk_group, double routed_scaling_factor);
// topk_idx int64 [T, top_k], topk_weights fp32 [T, top_k] on logits' device.
std::tuple<at::Tensor, at::Tensor> alloc_moe_route(const at::Tensor& logits, int64_t top_k);

}  // namespace dsv3
