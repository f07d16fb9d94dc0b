// CUDA entries of the FP8 GEMM ops until the sm_90a WGMMA kernels land: a correct but slow composite that
// dequantizes both operands to fp32 with dsv3's CUDA kernels and multiplies them with cuBLAS (fp32 matmul,
// TF32 disabled for the call). Same semantics as the CPU kernels up to fp32 rounding order.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "dsv3/checks.h"
#include "dsv3/ops.h"
#include "dsv3/validate.h"

namespace dsv3::cuda {
namespace {

// Restores the caller's TF32 setting on exit: the fallback must not silently drop to 10-bit mantissas.
struct NoTf32 {
  bool saved = at::globalContext().allowTF32CuBLAS();
  NoTf32() { at::globalContext().setAllowTF32CuBLAS(false); }
  ~NoTf32() { at::globalContext().setAllowTF32CuBLAS(saved); }
};

at::Tensor deq_rows(const at::Tensor& x, const at::Tensor& s) {  // 1x128 scales per row
  return dequantize_per_token_group(x, s, kGemmBlock, at::kFloat);
}
at::Tensor deq_blocks(const at::Tensor& w, const at::Tensor& s) {  // 128x128 scales
  return dequantize_per_block(w, s, kGemmBlock, at::kFloat);
}

// Host copy of a small int32 index tensor, with every entry checked against [lo, hi].
std::vector<int32_t> host_indices(const at::Tensor& t, int64_t lo, int64_t hi, const char* op,
                                  const char* name) {
  const at::Tensor h = t.to(at::kCPU).contiguous();
  std::vector<int32_t> v(h.const_data_ptr<int32_t>(), h.const_data_ptr<int32_t>() + h.numel());
  for (size_t i = 0; i < v.size(); ++i)
    DSV3_CHECK(v[i] >= lo && v[i] <= hi, op, name, " must be in [", lo, ", ", hi, "], got ", name, "[", i,
               "] = ", v[i]);
  return v;
}

}  // namespace

void fp8_gemm_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                 at::Tensor& out) {
  check_fp8_gemm_nt(a, sa, b, sb, out);
  const c10::cuda::CUDAGuard guard(a.device());
  const NoTf32 no_tf32;
  out.copy_(at::matmul(deq_rows(a, sa), deq_blocks(b, sb).t()));
}

void m_grouped_fp8_gemm_nt_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                      const at::Tensor& sb, const at::Tensor& m_indices, at::Tensor& out) {
  check_m_grouped_contiguous(a, sa, b, sb, m_indices, out);
  const c10::cuda::CUDAGuard guard(a.device());
  const NoTf32 no_tf32;
  const auto idx =
      host_indices(m_indices, -1, b.size(0) - 1, "m_grouped_fp8_gemm_nt_contiguous", "m_indices");
  const at::Tensor a32 = deq_rows(a, sa), b32 = deq_blocks(b, sb);
  const int64_t rows = a.size(0);
  for (int64_t r0 = 0, r1; r0 < rows; r0 = r1) {
    for (r1 = r0 + 1; r1 < rows && idx[r1] == idx[r0];) ++r1;
    auto o = out.narrow(0, r0, r1 - r0);
    if (idx[r0] < 0) {
      o.zero_();
    } else {
      o.copy_(at::matmul(a32.narrow(0, r0, r1 - r0), b32[idx[r0]].t()));
    }
  }
}

void m_grouped_fp8_gemm_nt_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                  const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,
                                  at::Tensor& out) {
  check_m_grouped_masked(a, sa, b, sb, masked_m, expected_m, out);
  const c10::cuda::CUDAGuard guard(a.device());
  const NoTf32 no_tf32;
  const auto counts = host_indices(masked_m, 0, a.size(1), "m_grouped_fp8_gemm_nt_masked", "masked_m");
  const at::Tensor a32 = deq_rows(a, sa), b32 = deq_blocks(b, sb);
  for (int64_t g = 0; g < a.size(0); ++g) {
    if (counts[g] > 0)
      out[g].narrow(0, 0, counts[g]).copy_(at::matmul(a32[g].narrow(0, 0, counts[g]), b32[g].t()));
  }
}

void fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                       at::Tensor& out) {
  check_fp8_gemm_wgrad_nt(a, sa, b, sb, out);
  const c10::cuda::CUDAGuard guard(a.device());
  const NoTf32 no_tf32;
  out.add_(at::matmul(deq_rows(a, sa), deq_rows(b, sb).t()));
}

void k_grouped_fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                 const at::Tensor& sb, at::IntArrayRef ks, at::Tensor& out) {
  check_k_grouped_wgrad(a, sa, b, sb, ks, out);
  const c10::cuda::CUDAGuard guard(a.device());
  const NoTf32 no_tf32;
  int64_t k_off = 0, s_off = 0;
  for (size_t g = 0; g < ks.size(); ++g) {
    const int64_t kb = ceil_div(ks[g], kGemmBlock);
    if (ks[g] > 0) {
      out[g].add_(at::matmul(deq_rows(a.narrow(1, k_off, ks[g]), sa.narrow(1, s_off, kb)),
                             deq_rows(b.narrow(1, k_off, ks[g]), sb.narrow(1, s_off, kb)).t()));
    }
    k_off += ks[g];
    s_off += kb;
  }
}

}  // namespace dsv3::cuda
