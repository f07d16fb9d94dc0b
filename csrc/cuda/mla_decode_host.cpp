// CUDA entries of MLA decode (SPEC §4): the split-KV schedule built on the device, then the sm_90a kernels of
// csrc/cuda/mla_decode.cu where they serve the call (d_qk 576, d_v 512, bf16/fp16 cache or the packed FP8
// cache with bf16 queries, 16-byte aligned tensors, an sm_90 device), else a correct but slow fallback in
// ATen ops on the GPU (gather the pages, fp32 matmuls, masked softmax). DSV3_MLA_FALLBACK=1 forces the
// fallback (for A/B checks).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "dsv3/checks.h"
#include "dsv3/mla_sched.h"
#include "dsv3/ops.h"
#include "dsv3/validate.h"
#include "mla_decode_kernels.h"

namespace dsv3::cuda {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&value, attr, device) == cudaSuccess, "cudaDeviceGetAttribute failed");
  return value;
}

// Content checks copy block_table / cache_seqlens / the schedule to the host, which a capturing stream
// forbids; then the kernel's own guards apply (pages outside the cache read as zeros, bad slots are skipped).
bool stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status) == cudaSuccess &&
         status != cudaStreamCaptureStatusNone;
}

bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  return true;
}

// The host-readable checks of dsv3/validate.h on small copies: cache_seqlens, the block_table columns the
// longest request needs (never the garbage past them), and the schedule when one is passed.
void check_contents(const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                    const std::optional<at::Tensor>& metadata, const std::optional<at::Tensor>& num_splits,
                    const MlaDecodeDims& d) {
  const at::Tensor lens = cache_seqlens.to(at::kCPU).contiguous();
  int64_t pages = 0;
  for (int64_t i = 0; i < d.b; ++i)
    pages = std::max<int64_t>(pages, mla::num_blocks_of(lens.const_data_ptr<int32_t>()[i]));
  pages = std::min(pages, d.max_blocks);
  const at::Tensor table = block_table.narrow(1, 0, pages).to(at::kCPU).contiguous();
  check_mla_decode_contents(table, lens, d);
  if (metadata) {
    check_mla_schedule_contents(metadata->to(at::kCPU).contiguous(), num_splits->to(at::kCPU).contiguous(),
                                lens, d);
  }
}

// A dim of size 1 is never stepped over: its stride (which may be anything) is passed as 0.
int64_t stride_of(const at::Tensor& t, int64_t dim) { return t.size(dim) > 1 ? t.stride(dim) : 0; }

bool fallback_forced() {
  const char* forced = std::getenv("DSV3_MLA_FALLBACK");  // read per call: tests flip it
  return forced != nullptr && std::strcmp(forced, "1") == 0;
}

// The WGMMA kernel's domain; everything else takes the fallback.
bool kernel_serves(const at::Tensor& q, const at::Tensor& kv_cache, const MlaDecodeDims& d) {
  if (fallback_forced()) return false;
  const int device = q.get_device();
  if (device_attribute(cudaDevAttrComputeCapabilityMajor, device) != 9 ||
      device_attribute(cudaDevAttrComputeCapabilityMinor, device) != 0)
    return false;
  const auto qt = q.scalar_type();
  if (d.d_qk != kMlaHeadDimQK || d.d_v != kMlaHeadDimV) return false;
  if (d.fp8_kv ? qt != at::kBFloat16 : (qt != at::kBFloat16 && qt != at::kHalf)) return false;
  if (d.h_kv > 65535 || d.b > 65535 || d.num_parts > 65535 || d.q_rows > std::numeric_limits<int>::max() / 2)
    return false;
  return aligned16(kv_cache);
}

// fp32 matmuls must stay fp32: the fallback is the A/B reference on the GPU.
struct NoTf32 {
  bool saved = at::globalContext().allowTF32CuBLAS();
  NoTf32() { at::globalContext().setAllowTF32CuBLAS(false); }
  ~NoTf32() { at::globalContext().setAllowTF32CuBLAS(saved); }
};

// Pages [n, 64, h_kv, last] of the cache as fp32 K [n, 64, h_kv, d_qk]; the packed FP8 layout is unpacked as
// e4m3 * scale of its 128-group, then the bf16 rope values.
at::Tensor pages_fp32(const at::Tensor& pages, const MlaDecodeDims& d) {
  if (!d.fp8_kv) return pages.to(at::kFloat);
  const at::Tensor raw = pages.view(at::kByte);
  const int64_t groups = ceil_div(d.d_v, kGemmBlock);
  const at::Tensor nope = raw.narrow(-1, 0, d.d_v).contiguous().view(at::kFloat8_e4m3fn).to(at::kFloat);
  const at::Tensor scales = raw.narrow(-1, d.d_v, 4 * groups).contiguous().view(at::kFloat);
  const at::Tensor rope = raw.narrow(-1, d.d_v + 4 * groups, 2 * (d.d_qk - d.d_v))
                              .contiguous()
                              .view(at::kBFloat16)
                              .to(at::kFloat);
  return at::cat({nope * scales.repeat_interleave(kGemmBlock, -1).narrow(-1, 0, d.d_v), rope}, -1);
}

// The reference semantics in batched ATen ops, a few requests at a time (about 1 GiB of gathered fp32 K per
// chunk). It reads no tensor contents on the host, so it also runs under CUDA-graph capture; page indices
// are clamped into the cache and keys past a request's length are zeroed before use (they may hold NaN).
void fallback(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
              const at::Tensor& cache_seqlens, const MlaDecodeDims& d, bool causal, at::Tensor& out,
              at::Tensor& lse) {
  const NoTf32 no_tf32;
  const int64_t g = d.h_q / d.h_kv, cols = d.num_blocks > 0 ? d.max_blocks : 0, keys = cols * mla::kPageSize;
  const int64_t request_bytes = std::max<int64_t>(1, keys * d.h_kv * d.d_qk * 4 * 3);
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 30) / request_bytes);
  const auto dev = q.device();
  const at::Tensor key_idx = at::arange(keys, at::TensorOptions().dtype(at::kLong).device(dev));
  const at::Tensor row_token =
      at::arange(d.q_rows, at::TensorOptions().dtype(at::kLong).device(dev)).div(g, "floor");
  const at::Tensor lens = cache_seqlens.to(at::kLong).clamp_min(0);
  for (int64_t b0 = 0; b0 < d.b; b0 += chunk) {
    const int64_t bc = std::min(chunk, d.b - b0);
    const at::Tensor table = block_table.narrow(0, b0, bc)
                                 .narrow(1, 0, cols)
                                 .to(at::kLong)
                                 .clamp(0, std::max<int64_t>(d.num_blocks - 1, 0));
    at::Tensor k =
        pages_fp32(kv_cache.index_select(0, table.flatten()), d).reshape({bc, keys, d.h_kv, d.d_qk});
    const at::Tensor len = lens.narrow(0, b0, bc);
    k = k.masked_fill((key_idx.unsqueeze(0) >= len.unsqueeze(1)).view({bc, keys, 1, 1}), 0.0)
            .permute({0, 2, 1, 3});
    const at::Tensor qf = q.narrow(0, b0, bc)
                              .to(at::kFloat)
                              .reshape({bc, d.s_q, d.h_kv, g, d.d_qk})
                              .permute({0, 2, 1, 3, 4})
                              .reshape({bc, d.h_kv, d.q_rows, d.d_qk});
    at::Tensor scores = at::matmul(qf, k.transpose(-1, -2)).mul_(d.softmax_scale);  // [bc, h_kv, rows, keys]
    // Row r (token r / g) sees keys < limit: the length, or with causal masking length - s_q + token + 1.
    const at::Tensor limit = causal ? (len.unsqueeze(1) - d.s_q + 1 + row_token.unsqueeze(0))
                                    : len.unsqueeze(1).expand({bc, d.q_rows});
    const at::Tensor hidden = key_idx.view({1, 1, keys}) >= limit.unsqueeze(2);
    scores.masked_fill_(hidden.unsqueeze(1), -std::numeric_limits<double>::infinity());
    const at::Tensor row_lse = at::logsumexp(scores, {-1});  // -inf for a row with no key
    const at::Tensor seen = at::logical_not(at::isneginf(row_lse));
    const at::Tensor probs = at::exp(scores - at::where(seen, row_lse, 0.0).unsqueeze(-1));
    const at::Tensor o = at::matmul(probs, k.narrow(-1, 0, d.d_v));  // [bc, h_kv, rows, d_v]
    out.narrow(0, b0, bc).copy_(
        o.reshape({bc, d.h_kv, d.s_q, g, d.d_v}).permute({0, 2, 1, 3, 4}).reshape({bc, d.s_q, d.h_q, d.d_v}));
    lse.narrow(0, b0, bc).copy_(at::where(seen, row_lse, std::numeric_limits<double>::infinity())
                                    .reshape({bc, d.h_kv, d.s_q, g})
                                    .permute({0, 1, 3, 2})
                                    .reshape({bc, d.h_q, d.s_q}));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> get_mla_decode_metadata(const at::Tensor& cache_seqlens,
                                                           int64_t num_q_tokens_per_head_k,
                                                           int64_t num_heads_k,
                                                           std::optional<int64_t> num_sm_parts) {
  check_mla_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts);
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  const int64_t parts = num_sm_parts.value_or(
      mla::num_parts_for(device_attribute(cudaDevAttrMultiProcessorCount, cache_seqlens.get_device()),
                         num_heads_k, num_q_tokens_per_head_k));
  auto [metadata, num_splits] = alloc_mla_metadata(cache_seqlens, parts);
  const at::Tensor lens = cache_seqlens.contiguous();
  check_launch(launch_mla_metadata(lens.const_data_ptr<int32_t>(), static_cast<int>(lens.size(0)),
                                   static_cast<int>(parts), metadata.data_ptr<int32_t>(),
                                   num_splits.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()),
               "get_mla_decode_metadata");
  return {metadata, num_splits};
}

std::tuple<at::Tensor, at::Tensor> mla_decode(const at::Tensor& q_in, const at::Tensor& kv_cache,
                                              const at::Tensor& block_table,
                                              const at::Tensor& cache_seqlens_in, int64_t head_dim_v,
                                              std::optional<double> softmax_scale, bool causal,
                                              const std::optional<at::Tensor>& tile_scheduler_metadata,
                                              const std::optional<at::Tensor>& num_splits_in) {
  MlaDecodeDims d = check_mla_decode(q_in, kv_cache, block_table, cache_seqlens_in, head_dim_v, softmax_scale,
                                     tile_scheduler_metadata, num_splits_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  if (!stream_capturing())
    check_contents(block_table, cache_seqlens_in, tile_scheduler_metadata, num_splits_in, d);
  auto [out, lse] = alloc_mla_decode(q_in, d);
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  causal = causal && d.s_q > 1;  // a single query token sees the whole cache either way

  if (!kernel_serves(q_in, kv_cache, d)) {
    fallback(q_in, kv_cache, block_table, cache_seqlens_in, d, causal, out, lse);
    return {out, lse};
  }
  // The kernel reads q with 16-byte cp.async: a misaligned q (small, one decode step) is copied.
  const at::Tensor q = aligned16(q_in) ? q_in : q_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor cache_seqlens = cache_seqlens_in.contiguous();
  at::Tensor metadata, num_splits;
  if (tile_scheduler_metadata) {
    metadata = tile_scheduler_metadata->contiguous();
    num_splits = num_splits_in->contiguous();
  } else {
    std::tie(metadata, num_splits) = get_mla_decode_metadata(cache_seqlens, d.q_rows, d.h_kv, std::nullopt);
  }
  const int64_t parts = metadata.size(0);
  if (parts > 65535) {  // beyond the grid's z limit: only reachable through an explicit num_sm_parts
    fallback(q_in, kv_cache, block_table, cache_seqlens, d, causal, out, lse);
    return {out, lse};
  }
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out_accum = at::empty({d.b + parts, d.h_kv, d.q_rows, d.d_v}, f32);
  at::Tensor lse_accum = at::empty({d.b + parts, d.h_kv, d.q_rows}, f32);

  MlaDecodeParams p{};
  p.q = q.const_data_ptr();
  p.q_batch_stride = stride_of(q, 0);
  p.q_token_stride = stride_of(q, 1);
  p.q_head_stride = stride_of(q, 2);
  p.kv = kv_cache.const_data_ptr();
  p.kv_block_stride = stride_of(kv_cache, 0);
  p.kv_token_stride = stride_of(kv_cache, 1);
  p.kv_head_stride = stride_of(kv_cache, 2);
  p.block_table = block_table.const_data_ptr<int32_t>();
  p.block_table_stride = stride_of(block_table, 0);
  p.cache_seqlens = cache_seqlens.const_data_ptr<int32_t>();
  p.metadata = metadata.const_data_ptr<int32_t>();
  p.num_splits = num_splits.const_data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_accum = out_accum.data_ptr<float>();
  p.lse_accum = lse_accum.data_ptr<float>();
  p.batch = static_cast<int>(d.b);
  p.s_q = static_cast<int>(d.s_q);
  p.h_q = static_cast<int>(d.h_q);
  p.h_kv = static_cast<int>(d.h_kv);
  p.q_rows = static_cast<int>(d.q_rows);
  p.num_blocks = static_cast<int>(std::min<int64_t>(d.num_blocks, std::numeric_limits<int>::max()));
  p.num_parts = static_cast<int>(parts);
  p.scale_log2 = static_cast<float>(d.softmax_scale * 1.4426950408889634);
  p.causal = causal;
  const MlaKvFormat format = d.fp8_kv                           ? MlaKvFormat::kFp8
                             : q.scalar_type() == at::kBFloat16 ? MlaKvFormat::kBF16
                                                                : MlaKvFormat::kF16;
  check_launch(launch_mla_decode(p, format, c10::cuda::getCurrentCUDAStream()), "mla_decode");
  return {out, lse};
}

}  // namespace dsv3::cuda
