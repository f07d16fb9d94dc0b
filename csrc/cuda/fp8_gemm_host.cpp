// CUDA entries of the FP8 GEMM ops: the sm_90a WGMMA kernels (csrc/cuda/fp8_gemm.cu) where they serve the
// call, else a correct but slow fallback that dequantizes both operands to fp32 with dsv3's CUDA kernels and
// multiplies them with cuBLAS (fp32, TF32 off). The fallback serves non-sm_90 GPUs, K = 0, TMA-unaligned
// strides or pointers, N not a multiple of 16 bytes of output, contiguous m_indices not constant per 128-row
// block, K too large for shared memory, and every call when DSV3_GEMM_FALLBACK=1 (for A/B checks).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "dsv3/checks.h"
#include "dsv3/ops.h"
#include "dsv3/validate.h"
#include "fp8_gemm_kernels.h"

namespace dsv3::cuda {
namespace {

using sm90::GemmKind;

// ---- fallback: dequantize + fp32 cuBLAS

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

void fallback_dense(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                    at::Tensor& out) {
  const NoTf32 no_tf32;
  out.copy_(at::matmul(deq_rows(a, sa), deq_blocks(b, sb).t()));
}

void fallback_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                         const std::vector<int32_t>& idx, at::Tensor& out) {
  const NoTf32 no_tf32;
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

void fallback_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                     const std::vector<int32_t>& counts, at::Tensor& out) {
  const NoTf32 no_tf32;
  const at::Tensor a32 = deq_rows(a, sa), b32 = deq_blocks(b, sb);
  for (int64_t g = 0; g < a.size(0); ++g) {
    if (counts[g] > 0)
      out[g].narrow(0, 0, counts[g]).copy_(at::matmul(a32[g].narrow(0, 0, counts[g]), b32[g].t()));
  }
}

void fallback_wgrad(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                    at::Tensor out) {
  const NoTf32 no_tf32;
  out.add_(at::matmul(deq_rows(a, sa), deq_rows(b, sb).t()));
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

// ---- kernel path

int device_attribute(cudaDeviceAttr attr, const at::Tensor& on) {
  int value = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&value, attr, on.get_device()) == cudaSuccess,
              "cudaDeviceGetAttribute failed");
  return value;
}

bool kernels_enabled(const at::Tensor& a) {
  const char* forced = std::getenv("DSV3_GEMM_FALLBACK");  // read per call: tests flip it
  if (forced != nullptr && std::strcmp(forced, "1") == 0) return false;
  return device_attribute(cudaDevAttrComputeCapabilityMajor, a) == 9 &&
         device_attribute(cudaDevAttrComputeCapabilityMinor, a) == 0;
}

// Host-side validation of m_indices / masked_m needs a device-to-host copy, which a capturing stream forbids;
// then the kernels rely on their own clamping (out-of-range groups or rows are never read or written).
bool stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status) == cudaSuccess &&
         status != cudaStreamCaptureStatusNone;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// TMA needs 16-byte aligned bases and strides (of every dim but the last; a dim of size 1 has no stride).
bool tma_aligned(const at::Tensor& t) {
  if (!aligned16(t.const_data_ptr())) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  return true;
}

// The epilogue stores 16 bytes (bf16) or 8 bytes (fp32) per thread: N and the row strides must keep them
// aligned.
bool out_aligned(const at::Tensor& out) {
  return out.stride(-1) == 1 && tma_aligned(out) && (out.size(-1) * out.element_size()) % 16 == 0;
}

// fp32 1x128 scales [G, rows, kb] in the MN-major, TMA-aligned layout (rows contiguous, K blocks and groups a
// multiple of 4 floats apart), the col_major_scales layout of quantize_per_token_group; copied into it if
// not.
at::Tensor mn_major_scales(const at::Tensor& s) {
  const at::Tensor s3 = s.dim() == 2 ? s.unsqueeze(0) : s;
  const int64_t groups = s3.size(0), rows = s3.size(1), kb = s3.size(2);
  const bool ok = (rows <= 1 || s3.stride(1) == 1) &&
                  (kb <= 1 || (s3.stride(2) % 4 == 0 && s3.stride(2) >= rows)) &&
                  (groups <= 1 || s3.stride(0) % 4 == 0) && aligned16(s3.const_data_ptr());
  if (ok) return s3;
  const int64_t rows_pad = ceil_div(rows, 4) * 4;
  at::Tensor t = at::empty({groups, kb, rows_pad}, s.options()).narrow(2, 0, rows).transpose(1, 2);
  t.copy_(s3);
  return t;
}

sm90::TmaParams scales_tma(const at::Tensor& s3, int block_rows) {
  const int64_t groups = s3.size(0), rows = s3.size(1), kb = s3.size(2);
  const int64_t kb_stride = kb > 1 ? s3.stride(2) : ceil_div(rows, 4) * 4;
  return sm90::tma_scales(rows, kb, groups, kb_stride, groups > 1 ? s3.stride(0) : kb * kb_stride,
                          block_rows);
}

// An e4m3 operand [G, rows, K] (2-D: G = 1).
sm90::TmaParams operand_tma(const at::Tensor& t, int block_rows) {
  const at::Tensor t3 = t.dim() == 2 ? t.unsqueeze(0) : t;
  const int64_t rows = t3.size(1), k = t3.size(2);
  const int64_t row_stride = rows > 1 ? t3.stride(1) : ceil_div(k, 16) * 16;
  return sm90::tma_operand(rows, k, t3.size(0), row_stride, t3.size(0) > 1 ? t3.stride(0) : rows * row_stride,
                           block_rows);
}

// The bf16 output [G, rows, N] (2-D: G = 1) as the TMA store destination.
sm90::TmaParams output_tma(const at::Tensor& out, int block_m, int block_n) {
  const at::Tensor o3 = out.dim() == 2 ? out.unsqueeze(0) : out;
  const int64_t rows = o3.size(1), n = o3.size(2);
  const int64_t row_stride = rows > 1 ? o3.stride(1) : ceil_div(n, 8) * 8;
  return sm90::tma_output(rows, n, o3.size(0), row_stride, o3.size(0) > 1 ? o3.stride(0) : rows * row_stride,
                          block_m, block_n);
}

struct KernelCall {
  sm90::GemmConfig config;
  cuda::Fp8GemmLaunch launch{};
};

// Fills the launch of one GEMM; false (fallback) when no config fits or a TMA descriptor would be rejected.
bool prepare(KernelCall& call, GemmKind kind, const at::Tensor& a, const at::Tensor& sa3, const at::Tensor& b,
             const at::Tensor& out, int64_t config_m, int64_t num_groups) {
  const int64_t n = b.size(-2), k = a.size(-1);
  const int num_sms = device_attribute(cudaDevAttrMultiProcessorCount, a);
  call.config = sm90::select_config(kind, config_m, n, k, num_groups, num_sms);
  const sm90::GemmConfig& c = call.config;
  if (!c.ok) return false;
  Fp8GemmLaunch& l = call.launch;
  Fp8GemmParams& p = l.params;
  p.kind = kind;
  p.m = int(a.size(-2));
  p.n = int(n);
  p.k = int(k);
  p.num_groups = int(num_groups);
  p.num_k_blocks = int(ceil_div(k, kGemmBlock));
  p.stages = c.stages;
  p.num_m_blocks = int(ceil_div(p.m, c.block_m));
  p.num_n_blocks = c.num_n_blocks;
  p.out = out.data_ptr();
  p.out_row_stride = out.stride(-2);
  p.out_group_stride = out.dim() == 3 ? out.stride(0) : 0;
  p.out_fp32 = out.scalar_type() == at::kFloat;
  p.accumulate = kind == GemmKind::kWgrad;
  l.block_m = c.block_m;
  l.block_n = c.block_n;
  l.smem_bytes = c.smem_bytes;
  const int64_t tiles =
      int64_t(p.num_m_blocks) * p.num_n_blocks * (kind == GemmKind::kMasked ? num_groups : 1);
  l.grid = int(std::min<int64_t>(tiles, num_sms));
  p.cluster_size = l.grid == c.grid ? c.cluster_size : 1;  // masked: tiles from M_max, c from expected_m
  l.a = a.const_data_ptr();
  l.b = b.const_data_ptr();
  l.sa = sa3.const_data_ptr<float>();
  l.tma_a = operand_tma(a, c.block_m);
  l.tma_b = operand_tma(b, c.block_n);
  l.tma_sa = scales_tma(sa3, c.block_m);
  if (!p.out_fp32) {
    l.tma_d = output_tma(out, c.block_m, c.block_n);
    if (!sm90::tma_problem(l.tma_d).empty()) return false;
  }
  return sm90::tma_problem(l.tma_a).empty() && sm90::tma_problem(l.tma_b).empty() &&
         sm90::tma_problem(l.tma_sa).empty();
}

void set_block_scales(Fp8GemmParams& p, const at::Tensor& sb) {  // 128x128 B scales [(G,) N/128, K/128]
  const at::Tensor sb3 = sb.dim() == 2 ? sb.unsqueeze(0) : sb;
  p.sb = sb3.const_data_ptr<float>();
  p.sb_group_stride = sb3.stride(0);
  p.sb_row_stride = sb3.stride(1);
  p.sb_col_stride = sb3.stride(2);
}

void run(const KernelCall& call, const char* op) {
  const cudaError_t err = launch_fp8_gemm(call.launch, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": sm_90a FP8 GEMM launch failed (block ", call.config.block_m, "x",
              call.config.block_n, "): ", cudaGetErrorString(err));
}

// Operands the kernels can read through TMA and an output they can store to, for a non-empty problem.
bool kernel_shapes_ok(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  return a.numel() > 0 && b.numel() > 0 && tma_aligned(a) && tma_aligned(b) && out_aligned(out);
}

// m_indices constant over each 128-row block (the contiguous layout's alignment), so a tile has one group.
bool blocks_uniform(const std::vector<int32_t>& idx) {
  for (size_t r = 0; r < idx.size(); ++r)
    if (idx[r] != idx[r - r % kGemmBlock]) return false;
  return true;
}

}  // namespace

void fp8_gemm_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                 at::Tensor& out) {
  check_fp8_gemm_nt(a, sa, b, sb, out);
  const c10::cuda::CUDAGuard guard(a.device());
  if (kernels_enabled(a) && kernel_shapes_ok(a, b, out)) {
    KernelCall call;
    const at::Tensor sa3 = mn_major_scales(sa);
    if (prepare(call, GemmKind::kDense, a, sa3, b, out, a.size(0), 1)) {
      set_block_scales(call.launch.params, sb);
      return run(call, "fp8_gemm_nt");
    }
  }
  fallback_dense(a, sa, b, sb, out);
}

void m_grouped_fp8_gemm_nt_contiguous(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                      const at::Tensor& sb, const at::Tensor& m_indices, at::Tensor& out) {
  const char* op = "m_grouped_fp8_gemm_nt_contiguous";
  check_m_grouped_contiguous(a, sa, b, sb, m_indices, out);
  const c10::cuda::CUDAGuard guard(a.device());
  const bool capturing = stream_capturing();
  std::vector<int32_t> idx;
  if (!capturing) idx = host_indices(m_indices, -1, b.size(0) - 1, op, "m_indices");
  if (kernels_enabled(a) && kernel_shapes_ok(a, b, out) && (capturing || blocks_uniform(idx))) {
    KernelCall call;
    const at::Tensor sa3 = mn_major_scales(sa);
    if (prepare(call, GemmKind::kContiguous, a, sa3, b, out, a.size(0), b.size(0))) {
      set_block_scales(call.launch.params, sb);
      call.launch.params.m_indices = m_indices.const_data_ptr<int32_t>();
      return run(call, op);
    }
  }
  TORCH_CHECK(!capturing, op, ": this call needs the fallback, which cannot run under CUDA graph capture");
  fallback_contiguous(a, sa, b, sb, idx, out);
}

void m_grouped_fp8_gemm_nt_masked(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                  const at::Tensor& sb, const at::Tensor& masked_m, int64_t expected_m,
                                  at::Tensor& out) {
  const char* op = "m_grouped_fp8_gemm_nt_masked";
  check_m_grouped_masked(a, sa, b, sb, masked_m, expected_m, out);
  const c10::cuda::CUDAGuard guard(a.device());
  const bool capturing = stream_capturing();
  std::vector<int32_t> counts;
  if (!capturing) counts = host_indices(masked_m, 0, a.size(1), op, "masked_m");
  if (kernels_enabled(a) && kernel_shapes_ok(a, b, out)) {
    KernelCall call;
    const at::Tensor sa3 = mn_major_scales(sa);
    const int64_t config_m = expected_m > 0 ? std::min(expected_m, a.size(1)) : a.size(1);
    if (prepare(call, GemmKind::kMasked, a, sa3, b, out, config_m, a.size(0))) {
      set_block_scales(call.launch.params, sb);
      call.launch.params.masked_m = masked_m.const_data_ptr<int32_t>();
      return run(call, op);
    }
  }
  TORCH_CHECK(!capturing, op, ": this call needs the fallback, which cannot run under CUDA graph capture");
  fallback_masked(a, sa, b, sb, counts, out);
}

namespace {

// out += a . b^T with 1x128 scales on both operands, by the wgrad kernel when it serves the call.
void wgrad(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
           at::Tensor out) {
  if (kernels_enabled(a) && kernel_shapes_ok(a, b, out)) {
    KernelCall call;
    const at::Tensor sa3 = mn_major_scales(sa), sb3 = mn_major_scales(sb);
    if (prepare(call, GemmKind::kWgrad, a, sa3, b, out, a.size(0), 1)) {
      call.launch.sb_rows = sb3.const_data_ptr<float>();
      call.launch.tma_sb_rows = scales_tma(sb3, call.config.block_n);
      if (sm90::tma_problem(call.launch.tma_sb_rows).empty()) return run(call, "fp8_gemm_wgrad_nt");
    }
  }
  fallback_wgrad(a, sa, b, sb, out);
}

}  // namespace

void fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                       at::Tensor& out) {
  check_fp8_gemm_wgrad_nt(a, sa, b, sb, out);
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.size(1) > 0) wgrad(a, sa, b, sb, out);
}

// One wgrad GEMM per group over its K columns (DeepGEMM v1's approach); the scales are made MN-major once.
void k_grouped_fp8_gemm_wgrad_nt(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b,
                                 const at::Tensor& sb, at::IntArrayRef ks, at::Tensor& out) {
  check_k_grouped_wgrad(a, sa, b, sb, ks, out);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor sa3 = mn_major_scales(sa)[0], sb3 = mn_major_scales(sb)[0];
  int64_t k_off = 0, s_off = 0;
  for (size_t g = 0; g < ks.size(); ++g) {
    const int64_t kb = ceil_div(ks[g], kGemmBlock);
    if (ks[g] > 0)
      wgrad(a.narrow(1, k_off, ks[g]), sa3.narrow(1, s_off, kb), b.narrow(1, k_off, ks[g]),
            sb3.narrow(1, s_off, kb), out[g]);
    k_off += ks[g];
    s_off += kb;
  }
}

}  // namespace dsv3::cuda
