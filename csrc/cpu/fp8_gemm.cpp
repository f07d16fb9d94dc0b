// CPU entries of the FP8 GEMM ops (SPEC §3): validate, then describe each op as a batch of GemmProblems
// (one per dense matrix, contiguous row run, masked group or K group) for the engine in fp8_gemm_kernels.cpp.
#include <ATen/ATen.h>

#include <vector>

#include "dsv3/checks.h"
#include "dsv3/ops.h"
#include "dsv3/validate.h"
#include "fp8_gemm_kernel.h"

namespace dsv3::cpu {
namespace {

const uint8_t* fp8_ptr(const at::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }

// The problem for rows [0, m) of `a`/`sa` against the 2-D `b`/`sb`, written to the 2-D `out`.
GemmProblem make_problem(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                         const at::Tensor& out, int64_t sb_rows, bool accumulate) {
  GemmProblem p;
  p.m = a.size(0);
  p.n = b.size(0);
  p.k = a.size(1);
  p.a = fp8_ptr(a);
  p.lda = a.stride(0);
  p.b = fp8_ptr(b);
  p.ldb = b.stride(0);
  p.sa = sa.data_ptr<float>();
  p.sa_sm = sa.stride(0);
  p.sa_sk = sa.stride(1);
  p.sb = sb.data_ptr<float>();
  p.sb_sn = sb.stride(0);
  p.sb_sk = sb.stride(1);
  p.sb_rows = sb_rows;
  p.d = out.data_ptr();
  p.ldd = out.stride(0);
  p.d_type = out.scalar_type() == at::kFloat ? OutType::kF32 : OutType::kBF16;
  p.accumulate = accumulate;
  return p;
}

void run(const std::vector<GemmProblem>& problems) {
  if (!problems.empty()) run_gemms(problems.data(), static_cast<int64_t>(problems.size()));
}

}  // namespace

void fp8_gemm_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                 at::Tensor& out) {
  check_fp8_gemm_nt(a, sa, b, sb, out);
  run({make_problem(a, sa, b, sb, out, kGemmBlock, false)});
}

void m_grouped_fp8_gemm_nt_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                      const at::Tensor& sb, const at::Tensor& m_indices, at::Tensor& out) {
  check_m_grouped_contiguous(a, sa, b, sb, m_indices, out);
  const int64_t rows = a.size(0), groups = b.size(0);
  const auto idx = m_indices.contiguous();
  const int32_t* gp = idx.const_data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    DSV3_CHECK(gp[r] >= -1 && gp[r] < groups, "m_grouped_fp8_gemm_nt_contiguous",
               "m_indices must be in [-1, ", groups, "), got m_indices[", r, "] = ", gp[r]);
  }
  // One problem per maximal run of rows sharing a group; rows of group -1 are skipped and zeroed.
  std::vector<GemmProblem> problems;
  for (int64_t r0 = 0, r1; r0 < rows; r0 = r1) {
    for (r1 = r0 + 1; r1 < rows && gp[r1] == gp[r0];) ++r1;
    auto o = out.narrow(0, r0, r1 - r0);
    if (gp[r0] < 0) {
      o.zero_();
      continue;
    }
    problems.push_back(make_problem(a.narrow(0, r0, r1 - r0), sa.narrow(0, r0, r1 - r0), b[gp[r0]],
                                    sb[gp[r0]], o, kGemmBlock, false));
  }
  run(problems);
}

void m_grouped_fp8_gemm_nt_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                  const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,
                                  at::Tensor& out) {
  check_m_grouped_masked(a, sa, b, sb, masked_m, expected_m, out);
  const int64_t groups = a.size(0), m_max = a.size(1);
  const auto counts = masked_m.contiguous();
  const int32_t* mp = counts.const_data_ptr<int32_t>();
  for (int64_t g = 0; g < groups; ++g) {
    DSV3_CHECK(mp[g] >= 0 && mp[g] <= m_max, "m_grouped_fp8_gemm_nt_masked", "masked_m must be in [0, ",
               m_max, "] (M_max), got masked_m[", g, "] = ", mp[g]);
  }
  std::vector<GemmProblem> problems;
  for (int64_t g = 0; g < groups; ++g) {
    if (mp[g] == 0) continue;
    problems.push_back(make_problem(a[g].narrow(0, 0, mp[g]), sa[g].narrow(0, 0, mp[g]), b[g], sb[g],
                                    out[g].narrow(0, 0, mp[g]), kGemmBlock, false));
  }
  run(problems);
}

void fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                       at::Tensor& out) {
  check_fp8_gemm_wgrad_nt(a, sa, b, sb, out);
  run({make_problem(a, sa, b, sb, out, 1, true)});
}

void k_grouped_fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                 const at::Tensor& sb, at::IntArrayRef ks, at::Tensor& out) {
  check_k_grouped_wgrad(a, sa, b, sb, ks, out);
  std::vector<GemmProblem> problems;
  int64_t k_off = 0, s_off = 0;
  for (size_t g = 0; g < ks.size(); ++g) {
    const int64_t kb = ceil_div(ks[g], kGemmBlock);
    if (ks[g] > 0) {
      problems.push_back(make_problem(a.narrow(1, k_off, ks[g]), sa.narrow(1, s_off, kb),
                                      b.narrow(1, k_off, ks[g]), sb.narrow(1, s_off, kb), out[g], 1, true));
    }
    k_off += ks[g];
    s_off += kb;
  }
  run(problems);
}

}  // namespace dsv3::cpu
