// Argument validation and output allocation for every op (see validate.h). Messages follow one pattern:
// "<op>: <argument> must <expectation>, got <what was passed>".
#include "dsv3/validate.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "dsv3/checks.h"
#include "dsv3/mla_sched.h"

namespace dsv3 {
namespace {

std::string shape_str(at::IntArrayRef s) { return c10::str(s); }

void check_defined(const at::Tensor& t, const char* op, const char* name) {
  DSV3_CHECK(t.defined(), op, name, " must be a tensor, got None");
}

void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType dt) {
  check_defined(t, op, name);
  DSV3_CHECK_TYPE(t.scalar_type() == dt, op, name, " must be ", dt, ", got ", t.scalar_type());
}

void check_float_input(const at::Tensor& t, const char* op, const char* name) {
  check_defined(t, op, name);
  auto dt = t.scalar_type();
  DSV3_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, name,
                  " must be float32, bfloat16 or float16, got ", dt);
}

void check_out_dtype(at::ScalarType dt, const char* op, const char* name) {
  DSV3_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, name,
                  " must be float32, bfloat16 or float16, got ", dt);
}

void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  DSV3_CHECK(t.dim() == dim, op, name, " must be ", dim, "-D, got shape ", shape_str(t.sizes()));
}

void check_shape(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef expected,
                 const char* meaning) {
  DSV3_CHECK(t.sizes() == expected, op, name, " must have shape ", meaning, " = ", shape_str(expected),
             ", got ", shape_str(t.sizes()));
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  DSV3_CHECK(t.device() == ref.device(), op, name, " must be on ", ref.device(), " like a, got ", t.device());
}

// K-major operand: unit stride along the last dim (rows may be padded).
void check_k_major(const at::Tensor& t, const char* op, const char* name) {
  DSV3_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, name,
             " must be K-major (stride(-1) == 1, e.g. .contiguous()), got strides ", shape_str(t.strides()));
  for (int64_t d = 0; d < t.dim(); ++d)
    DSV3_CHECK(t.stride(d) >= 0, op, name, " must not have negative strides, got ", shape_str(t.strides()));
}

// Output written by the kernels: unit stride along the last dim and no two rows overlapping.
void check_writable(const at::Tensor& t, const char* op, const char* name) {
  check_k_major(t, op, name);
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    DSV3_CHECK(t.size(d) <= 1 || t.stride(d) >= t.size(d + 1) * t.stride(d + 1), op, name,
               " must not have overlapping rows, got shape ", shape_str(t.sizes()), " and strides ",
               shape_str(t.strides()));
  }
}

void check_positive(int64_t v, const char* op, const char* name) {
  DSV3_CHECK(v > 0, op, name, " must be positive, got ", v);
}

void check_scales(const at::Tensor& s, const char* op, const char* name, at::IntArrayRef expected,
                  const char* meaning, const at::Tensor& a) {
  check_dtype(s, op, name, at::kFloat);
  check_same_device(s, a, op, name);
  check_shape(s, op, name, expected, meaning);
}

// Shared by every GEMM: e4m3 operands with the same K on one device, fp32 scales.
void check_gemm_operands(const char* op, const at::Tensor& a, const at::Tensor& b, int64_t a_dim,
                         int64_t b_dim) {
  check_dtype(a, op, "a", at::kFloat8_e4m3fn);
  check_dtype(b, op, "b", at::kFloat8_e4m3fn);
  check_dim(a, op, "a", a_dim);
  check_dim(b, op, "b", b_dim);
  check_same_device(b, a, op, "b");
  check_k_major(a, op, "a");
  check_k_major(b, op, "b");
  DSV3_CHECK(b.size(-1) == a.size(-1), op, "b must have K = ", a.size(-1), " columns like a, got shape ",
             shape_str(b.sizes()));
}

void check_gemm_out(const char* op, const at::Tensor& out, const at::Tensor& a, at::IntArrayRef expected,
                    const char* meaning, bool fp32_only) {
  check_defined(out, op, "out");
  if (fp32_only) {
    check_dtype(out, op, "out", at::kFloat);
  } else {
    DSV3_CHECK_TYPE(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat, op,
                    "out must be bfloat16 or float32, got ", out.scalar_type());
  }
  check_same_device(out, a, op, "out");
  check_shape(out, op, "out", expected, meaning);
  check_writable(out, op, "out");
}

at::Tensor alloc_scales(at::IntArrayRef lead, int64_t m, int64_t groups, bool col_major,
                        const at::TensorOptions& opts) {
  std::vector<int64_t> shape(lead.begin(), lead.end());
  shape.push_back(m);
  shape.push_back(groups);
  if (!col_major) return at::empty(shape, opts);
  // MN-major storage [..., groups, m_pad] viewed as [..., m, groups]: the TMA-aligned layout.
  const int64_t m_pad = ceil_div(m, 4) * 4;
  std::vector<int64_t> storage(lead.begin(), lead.end());
  storage.push_back(groups);
  storage.push_back(m_pad);
  return at::zeros(storage, opts).transpose(-1, -2).narrow(-2, 0, m);
}

}  // namespace

void check_quantize_per_token_group(const at::Tensor& x, int64_t group_size, bool col_major_scales) {
  const char* op = "quantize_per_token_group";
  check_float_input(x, op, "x");
  DSV3_CHECK(x.dim() >= 1, op, "x must have at least 1 dimension, got a scalar");
  DSV3_CHECK(!col_major_scales || x.dim() >= 2, op, "x must be at least 2-D for col_major_scales=True, got ",
             "shape ", shape_str(x.sizes()));
  check_positive(group_size, op, "group_size");
}

std::tuple<at::Tensor, at::Tensor> alloc_quantize_per_token_group(const at::Tensor& x, int64_t group_size,
                                                                  bool col_major_scales) {
  auto q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  const int64_t groups = ceil_div(x.size(-1), group_size);
  const auto opts = x.options().dtype(at::kFloat);
  if (x.dim() == 1) return {q, at::empty({groups}, opts)};
  auto lead = x.sizes().slice(0, x.dim() - 2);
  return {q, alloc_scales(lead, x.size(-2), groups, col_major_scales, opts)};
}

TokenGroupScales token_group_scales(const at::Tensor& x, const at::Tensor& scales, bool writable) {
  const int64_t rows = x.dim() == 1 ? 1 : x.size(-2);
  const int64_t batch = x.dim() <= 2 ? 1 : c10::multiply_integers(x.sizes().slice(0, x.dim() - 2));
  at::Tensor s3 = scales.reshape({batch, rows, scales.size(-1)});
  TORCH_INTERNAL_ASSERT(!writable || s3.data_ptr() == scales.data_ptr(),
                        "output scales must be viewable as 3-D");
  return {s3, batch, rows};
}

void check_dequantize_per_token_group(const at::Tensor& q, const at::Tensor& scales, int64_t group_size,
                                      at::ScalarType out_dtype) {
  const char* op = "dequantize_per_token_group";
  check_dtype(q, op, "q", at::kFloat8_e4m3fn);
  DSV3_CHECK(q.dim() >= 1, op, "q must have at least 1 dimension, got a scalar");
  check_positive(group_size, op, "group_size");
  check_out_dtype(out_dtype, op, "out_dtype");
  std::vector<int64_t> expected(q.sizes().begin(), q.sizes().end());
  expected.back() = ceil_div(q.size(-1), group_size);
  check_scales(scales, op, "scales", expected, "[..., ceil(K / group_size)]", q);
}

void check_quantize_per_block(const at::Tensor& w, int64_t block_size) {
  const char* op = "quantize_per_block";
  check_float_input(w, op, "w");
  DSV3_CHECK(w.dim() == 2 || w.dim() == 3, op, "w must be 2-D [N, K] or 3-D [G, N, K], got shape ",
             shape_str(w.sizes()));
  check_positive(block_size, op, "block_size");
}

std::tuple<at::Tensor, at::Tensor> alloc_quantize_per_block(const at::Tensor& w, int64_t block_size) {
  std::vector<int64_t> s(w.sizes().begin(), w.sizes().end());
  s[s.size() - 2] = ceil_div(w.size(-2), block_size);
  s[s.size() - 1] = ceil_div(w.size(-1), block_size);
  return {at::empty(w.sizes(), w.options().dtype(at::kFloat8_e4m3fn)),
          at::empty(s, w.options().dtype(at::kFloat))};
}

void check_dequantize_per_block(const at::Tensor& q, const at::Tensor& scale_inv, int64_t block_size,
                                at::ScalarType out_dtype) {
  const char* op = "dequantize_per_block";
  check_dtype(q, op, "q", at::kFloat8_e4m3fn);
  DSV3_CHECK(q.dim() == 2 || q.dim() == 3, op, "q must be 2-D [N, K] or 3-D [G, N, K], got shape ",
             shape_str(q.sizes()));
  check_positive(block_size, op, "block_size");
  check_out_dtype(out_dtype, op, "out_dtype");
  std::vector<int64_t> expected(q.sizes().begin(), q.sizes().end());
  expected[expected.size() - 2] = ceil_div(q.size(-2), block_size);
  expected[expected.size() - 1] = ceil_div(q.size(-1), block_size);
  check_scales(scale_inv, op, "scale_inv", expected, "[..., ceil(N / block_size), ceil(K / block_size)]", q);
}

void check_fp8_gemm_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                       const at::Tensor& out) {
  const char* op = "fp8_gemm_nt";
  check_gemm_operands(op, a, b, 2, 2);
  const int64_t m = a.size(0), n = b.size(0), kb = ceil_div(a.size(1), kGemmBlock);
  check_scales(sa, op, "sa", {m, kb}, "[M, ceil(K/128)]", a);
  check_scales(sb, op, "sb", {ceil_div(n, kGemmBlock), kb}, "[ceil(N/128), ceil(K/128)]", a);
  check_gemm_out(op, out, a, {m, n}, "[M, N]", false);
}

void check_m_grouped_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                const at::Tensor& sb, const at::Tensor& m_indices, const at::Tensor& out) {
  const char* op = "m_grouped_fp8_gemm_nt_contiguous";
  check_gemm_operands(op, a, b, 2, 3);
  const int64_t m = a.size(0), g = b.size(0), n = b.size(1), kb = ceil_div(a.size(1), kGemmBlock);
  check_scales(sa, op, "sa", {m, kb}, "[sum(M), ceil(K/128)]", a);
  check_scales(sb, op, "sb", {g, ceil_div(n, kGemmBlock), kb}, "[G, ceil(N/128), ceil(K/128)]", a);
  check_dtype(m_indices, op, "m_indices", at::kInt);
  check_same_device(m_indices, a, op, "m_indices");
  check_shape(m_indices, op, "m_indices", {m}, "[sum(M)]");
  check_gemm_out(op, out, a, {m, n}, "[sum(M), N]", false);
}

void check_m_grouped_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                            const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,
                            const at::Tensor& out) {
  const char* op = "m_grouped_fp8_gemm_nt_masked";
  check_gemm_operands(op, a, b, 3, 3);
  const int64_t g = a.size(0), m = a.size(1), n = b.size(1), kb = ceil_div(a.size(2), kGemmBlock);
  DSV3_CHECK(b.size(0) == g, op, "b must have G = ", g, " groups like a, got shape ", shape_str(b.sizes()));
  check_scales(sa, op, "sa", {g, m, kb}, "[G, M_max, ceil(K/128)]", a);
  check_scales(sb, op, "sb", {g, ceil_div(n, kGemmBlock), kb}, "[G, ceil(N/128), ceil(K/128)]", a);
  check_dtype(masked_m, op, "masked_m", at::kInt);
  check_same_device(masked_m, a, op, "masked_m");
  check_shape(masked_m, op, "masked_m", {g}, "[G]");
  DSV3_CHECK(expected_m >= 0, op, "expected_m must be non-negative, got ", expected_m);
  check_gemm_out(op, out, a, {g, m, n}, "[G, M_max, N]", false);
}

void check_fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                             const at::Tensor& sb, const at::Tensor& out) {
  const char* op = "fp8_gemm_wgrad_nt";
  check_gemm_operands(op, a, b, 2, 2);
  const int64_t m = a.size(0), n = b.size(0), kb = ceil_div(a.size(1), kGemmBlock);
  check_scales(sa, op, "sa", {m, kb}, "[M, ceil(K/128)]", a);
  check_scales(sb, op, "sb", {n, kb}, "[N, ceil(K/128)]", a);
  check_gemm_out(op, out, a, {m, n}, "[M, N]", true);
}

void check_k_grouped_wgrad(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                           const at::Tensor& sb, at::IntArrayRef ks, const at::Tensor& out) {
  const char* op = "k_grouped_fp8_gemm_wgrad_nt";
  check_gemm_operands(op, a, b, 2, 2);
  int64_t k_total = 0, kb_total = 0;
  for (size_t g = 0; g < ks.size(); ++g) {
    DSV3_CHECK(ks[g] >= 0, op, "ks must be non-negative, got ks[", g, "] = ", ks[g]);
    k_total += ks[g];
    kb_total += ceil_div(ks[g], kGemmBlock);
  }
  DSV3_CHECK(k_total == a.size(1), op, "ks must sum to K = ", a.size(1), " (the columns of a), got ",
             k_total);
  const int64_t m = a.size(0), n = b.size(0), g = static_cast<int64_t>(ks.size());
  check_scales(sa, op, "sa", {m, kb_total}, "[M, sum(ceil(ks/128))]", a);
  check_scales(sb, op, "sb", {n, kb_total}, "[N, sum(ceil(ks/128))]", a);
  check_gemm_out(op, out, a, {g, m, n}, "[len(ks), M, N]", true);
}

// ---- MLA decode --------------------------------------------------------------------------------------

void check_mla_metadata_args(const at::Tensor& cache_seqlens, int64_t num_q_tokens_per_head_k,
                             int64_t num_heads_k, std::optional<int64_t> num_sm_parts) {
  const char* op = "get_mla_decode_metadata";
  check_dtype(cache_seqlens, op, "cache_seqlens", at::kInt);
  check_dim(cache_seqlens, op, "cache_seqlens", 1);
  DSV3_CHECK(cache_seqlens.size(0) < (int64_t(1) << 30), op,
             "cache_seqlens must have fewer than 2^30 entries");
  check_positive(num_q_tokens_per_head_k, op, "num_q_tokens_per_head_k");
  check_positive(num_heads_k, op, "num_heads_k");
  if (num_sm_parts) {
    DSV3_CHECK(*num_sm_parts > 0 && *num_sm_parts <= (int64_t(1) << 20), op,
               "num_sm_parts must be in [1, 2^20], got ", *num_sm_parts);
  }
}

std::tuple<at::Tensor, at::Tensor> alloc_mla_metadata(const at::Tensor& cache_seqlens, int64_t num_parts) {
  const auto opts = cache_seqlens.options().dtype(at::kInt);
  return {at::empty({num_parts, mla::kMetaInts}, opts), at::empty({cache_seqlens.size(0) + 1}, opts)};
}

int64_t mla_cpu_parts(int64_t num_q_tokens_per_head_k, int64_t num_heads_k,
                      std::optional<int64_t> num_sm_parts) {
  return num_sm_parts.value_or(
      mla::num_parts_for(at::get_num_threads(), num_heads_k, num_q_tokens_per_head_k));
}

MlaDecodeDims check_mla_decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                               const at::Tensor& cache_seqlens, int64_t head_dim_v,
                               std::optional<double> softmax_scale,
                               const std::optional<at::Tensor>& tile_scheduler_metadata,
                               const std::optional<at::Tensor>& num_splits) {
  const char* op = "mla_decode";
  check_float_input(q, op, "q");
  check_dim(q, op, "q", 4);
  check_defined(kv_cache, op, "kv_cache");
  check_dim(kv_cache, op, "kv_cache", 4);
  check_same_device(kv_cache, q, op, "kv_cache");
  const auto kv_t = kv_cache.scalar_type();
  const bool fp8_kv = kv_t == at::kByte || kv_t == at::kFloat8_e4m3fn;
  DSV3_CHECK_TYPE(fp8_kv || kv_t == q.scalar_type(), op, "kv_cache must have q's dtype (", q.scalar_type(),
                  ") or be a packed FP8 cache (uint8 or float8_e4m3fn), got ", kv_t);
  DSV3_CHECK(q.stride(-1) == 1 || q.size(-1) <= 1, op,
             "q must be contiguous in its last dim (stride(-1) == 1), got strides ", shape_str(q.strides()));
  DSV3_CHECK(kv_cache.stride(-1) == 1 || kv_cache.size(-1) <= 1, op,
             "kv_cache must be contiguous in its last dim (stride(-1) == 1), got strides ",
             shape_str(kv_cache.strides()));
  for (int64_t i = 0; i < 4; ++i) {
    DSV3_CHECK(q.stride(i) >= 0, op, "q must not have negative strides, got ", shape_str(q.strides()));
    DSV3_CHECK(kv_cache.stride(i) >= 0, op, "kv_cache must not have negative strides, got ",
               shape_str(kv_cache.strides()));
  }

  MlaDecodeDims d{};
  d.b = q.size(0);
  d.s_q = q.size(1);
  d.h_q = q.size(2);
  d.d_qk = q.size(3);
  d.d_v = head_dim_v;
  d.num_blocks = kv_cache.size(0);
  d.h_kv = kv_cache.size(2);
  d.fp8_kv = fp8_kv;
  DSV3_CHECK(d.d_qk > 0, op, "q must have a non-empty head dim, got shape ", shape_str(q.sizes()));
  DSV3_CHECK(kv_cache.size(1) == mla::kPageSize, op, "kv_cache must have pages of ", mla::kPageSize,
             " tokens: shape [num_blocks, 64, h_kv, d], got ", shape_str(kv_cache.sizes()));
  DSV3_CHECK(d.h_kv > 0, op, "kv_cache must have at least one KV head, got shape ",
             shape_str(kv_cache.sizes()));
  DSV3_CHECK(d.h_q % d.h_kv == 0, op, "q's head count h_q = ", d.h_q,
             " must be a multiple of kv_cache's h_kv = ", d.h_kv);
  DSV3_CHECK(head_dim_v > 0 && head_dim_v <= d.d_qk, op, "head_dim_v must be in [1, d_qk = ", d.d_qk,
             "], got ", head_dim_v);
  const int64_t last = fp8_kv ? mla_fp8_token_bytes(d.d_qk, d.d_v) : d.d_qk;
  DSV3_CHECK(
      kv_cache.size(3) == last, op, "kv_cache must have last dim ", last,
      fp8_kv ? " (packed FP8 bytes: d_v e4m3 + 4 * ceil(d_v/128) scale bytes + 2 * (d_qk - d_v) rope bytes)"
             : " (q's d_qk)",
      ", got shape ", shape_str(kv_cache.sizes()));
  d.q_rows = d.s_q * (d.h_q / d.h_kv);

  check_dtype(block_table, op, "block_table", at::kInt);
  check_dim(block_table, op, "block_table", 2);
  check_same_device(block_table, q, op, "block_table");
  DSV3_CHECK(block_table.size(0) == d.b, op, "block_table must have b = ", d.b, " rows, got shape ",
             shape_str(block_table.sizes()));
  DSV3_CHECK(block_table.stride(1) == 1 || block_table.size(1) <= 1, op,
             "block_table must be contiguous in its last dim, got strides ",
             shape_str(block_table.strides()));
  d.max_blocks = block_table.size(1);
  check_dtype(cache_seqlens, op, "cache_seqlens", at::kInt);
  check_same_device(cache_seqlens, q, op, "cache_seqlens");
  check_shape(cache_seqlens, op, "cache_seqlens", {d.b}, "[b]");

  const double scale = softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(d.d_qk)));
  DSV3_CHECK(std::isfinite(scale), op, "softmax_scale must be finite, got ", scale);
  d.softmax_scale = scale;

  DSV3_CHECK(tile_scheduler_metadata.has_value() == num_splits.has_value(), op,
             "tile_scheduler_metadata and num_splits must be passed together (both from "
             "get_mla_decode_metadata) or both be None");
  d.num_parts = 0;
  if (tile_scheduler_metadata) {
    const at::Tensor& m = *tile_scheduler_metadata;
    const at::Tensor& n = *num_splits;
    check_dtype(m, op, "tile_scheduler_metadata", at::kInt);
    check_same_device(m, q, op, "tile_scheduler_metadata");
    DSV3_CHECK(m.dim() == 2 && m.size(1) == mla::kMetaInts && m.size(0) > 0 && m.is_contiguous(), op,
               "tile_scheduler_metadata must be a contiguous [num_parts, ", mla::kMetaInts,
               "] tensor from get_mla_decode_metadata, got shape ", shape_str(m.sizes()));
    check_dtype(n, op, "num_splits", at::kInt);
    check_same_device(n, q, op, "num_splits");
    check_shape(n, op, "num_splits", {d.b + 1}, "[b + 1]");
    DSV3_CHECK(n.is_contiguous(), op, "num_splits must be contiguous");
    d.num_parts = m.size(0);
  }
  return d;
}

void check_mla_decode_contents(const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                               const MlaDecodeDims& d) {
  const char* op = "mla_decode";
  const auto lens = cache_seqlens.contiguous();
  const int32_t* len = lens.const_data_ptr<int32_t>();
  const int32_t* bt = block_table.const_data_ptr<int32_t>();
  const int64_t bt_stride = block_table.stride(0);
  for (int64_t i = 0; i < d.b; ++i) {
    DSV3_CHECK(len[i] >= 0, op, "cache_seqlens must be non-negative, got cache_seqlens[", i, "] = ", len[i]);
    const int64_t pages = mla::num_blocks_of(len[i]);
    DSV3_CHECK(pages <= d.max_blocks, op, "cache_seqlens[", i, "] = ", len[i], " needs ", pages,
               " pages of 64 tokens but block_table has only ", d.max_blocks, " columns");
    for (int64_t j = 0; j < pages; ++j) {
      const int32_t page = bt[i * bt_stride + j];
      DSV3_CHECK(page >= 0 && page < d.num_blocks, op, "block_table[", i, ", ", j, "] = ", page,
                 " must be a page of kv_cache, i.e. in [0, ", d.num_blocks, ")");
    }
  }
}

void check_mla_schedule_contents(const at::Tensor& tile_scheduler_metadata, const at::Tensor& num_splits,
                                 const at::Tensor& cache_seqlens, const MlaDecodeDims& d) {
  const char* op = "mla_decode";
  const int32_t* ns = num_splits.const_data_ptr<int32_t>();
  const int32_t* meta = tile_scheduler_metadata.const_data_ptr<int32_t>();
  const auto lens = cache_seqlens.contiguous();
  const int32_t* len = lens.const_data_ptr<int32_t>();
  // Walk the parts in order: together they must cover every block of every request exactly once, in
  // order, with split indices and split counts matching num_splits.
  int64_t req = 0, block = 0, split = 0;
  bool ok = ns[0] == 0;
  int64_t bad_part = -1;
  for (int64_t p = 0; ok && p < d.num_parts; ++p) {
    const mla::PartMeta pm = mla::load_part(meta, p);
    if (pm.begin_req > pm.end_req) continue;  // an idle part
    ok = pm.begin_req == req && pm.begin_block == block && pm.begin_split == split && pm.end_req < d.b;
    for (int64_t r = pm.begin_req; ok && r <= pm.end_req; ++r) {
      const int32_t blocks = mla::num_blocks_of(len[r]);
      int32_t first = 0, last = 0;
      mla::part_block_range(pm, static_cast<int32_t>(r), blocks, &first, &last);
      ok = first <= last && last <= blocks && (r == pm.end_req || last == blocks);
      if (ok && last < blocks) {  // the request continues in the next part
        block = last;
        ++split;
        ok = first < last;
      } else if (ok) {
        ok = ns[r + 1] - ns[r] == split + 1;
        req = r + 1;
        block = 0;
        split = 0;
      }
    }
    if (!ok) bad_part = p;
  }
  ok = ok && req == d.b;
  DSV3_CHECK(ok, op, "tile_scheduler_metadata and num_splits are not a schedule for these cache_seqlens",
             bad_part >= 0 ? " (first mismatch at part " + std::to_string(bad_part) + ")" : std::string(),
             "; pass the output of get_mla_decode_metadata(cache_seqlens, ...) for the same lengths");
}

std::tuple<at::Tensor, at::Tensor> alloc_mla_decode(const at::Tensor& q, const MlaDecodeDims& d) {
  return {at::empty({d.b, d.s_q, d.h_q, d.d_v}, q.options()),
          at::empty({d.b, d.h_q, d.s_q}, q.options().dtype(at::kFloat))};
}

void check_moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias, int64_t top_k,
                     int64_t n_group, int64_t topk_group, double routed_scaling_factor) {
  const char* op = "moe_route";
  check_dtype(logits, op, "logits", at::kFloat);
  check_dim(logits, op, "logits", 2);
  const int64_t experts = logits.size(1);
  DSV3_CHECK(experts <= kMaxRouteExperts, op, "logits must have at most ", kMaxRouteExperts,
             " experts (columns), got shape ", shape_str(logits.sizes()));
  if (bias.has_value() && bias->defined()) {
    check_dtype(*bias, op, "bias", at::kFloat);
    DSV3_CHECK(bias->device() == logits.device(), op, "bias must be on ", logits.device(),
               " like logits, got ", bias->device());
    check_shape(*bias, op, "bias", {experts}, "[E]");
  }
  DSV3_CHECK(top_k >= 1 && top_k <= experts, op, "top_k must be in [1, E = ", experts, "], got ", top_k);
  DSV3_CHECK(n_group >= 1 && experts % n_group == 0, op, "n_group must be positive and divide E = ", experts,
             ", got ", n_group);
  DSV3_CHECK(topk_group >= 1 && topk_group <= n_group, op, "topk_group must be in [1, n_group = ", n_group,
             "], got ", topk_group);
  DSV3_CHECK(top_k <= topk_group * (experts / n_group), op,
             "top_k must be at most topk_group * E / n_group = ", topk_group * (experts / n_group),
             " (the experts of the kept groups), got ", top_k);
  DSV3_CHECK(std::isfinite(routed_scaling_factor), op, "routed_scaling_factor must be finite, got ",
             routed_scaling_factor);
}

std::tuple<at::Tensor, at::Tensor> alloc_moe_route(const at::Tensor& logits, int64_t top_k) {
  const int64_t tokens = logits.size(0);
  return {at::empty({tokens, top_k}, logits.options().dtype(at::kLong)),
          at::empty({tokens, top_k}, logits.options().dtype(at::kFloat))};
}

}  // namespace dsv3
