// Launchers of the sm_90a MLA decode kernels of csrc/cuda/mla_decode.cu (SPEC §4): the split-KV schedule
// (dsv3/mla_sched.h, built on the device), the paged attention kernel for d_qk = 576, d_v = 512 (bf16 / fp16
// cache, or the packed FP8 cache with bf16 queries) and the combine of split partials. Torch-free:
// csrc/cuda/mla_decode_host.cpp validates the tensors, fills MlaDecodeParams and raises on a returned error.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv3::cuda {

constexpr int kMlaHeadDimQK =
    576;  // the only head dims the kernel serves (DeepSeek-V3: 512 latent + 64 rope)
constexpr int kMlaHeadDimV = 512;
constexpr int kMlaFp8TokenBytes = 656;  // 512 e4m3 + 4 fp32 scales + 64 bf16 rope values

enum class MlaKvFormat : int { kBF16 = 0, kF16 = 1, kFp8 = 2 };  // kFp8: queries and output in bf16

// Strides are in elements of the tensor's dtype (bytes for the FP8 cache). Requirements (checked by the
// host, cudaErrorInvalidValue otherwise): q and kv_cache 16-byte aligned with every stride a multiple of 16
// bytes; out contiguous [batch, s_q, h_q, 512], lse contiguous [batch, h_q, s_q]; out_accum [batch +
// num_parts, h_kv, q_rows, 512] and lse_accum [batch + num_parts, h_kv, q_rows] fp32 workspaces.
struct MlaDecodeParams {
  const void* q;
  int64_t q_batch_stride, q_token_stride, q_head_stride;
  const void* kv;
  int64_t kv_block_stride, kv_token_stride, kv_head_stride;
  const int32_t* block_table;
  int64_t block_table_stride;
  const int32_t* cache_seqlens;
  const int32_t* metadata;    // [num_parts, 8] from launch_mla_metadata
  const int32_t* num_splits;  // [batch + 1]
  void* out;
  float* lse;
  float* out_accum;
  float* lse_accum;
  int batch, s_q, h_q, h_kv, q_rows, num_blocks, num_parts;
  float scale_log2;  // softmax_scale * log2(e): scores are exponentiated with exp2
  bool causal;       // only meaningful for s_q > 1 (the host passes causal && s_q > 1)
};

// One thread runs dsv3::mla::build_schedule: meta [num_parts, 8], num_splits [batch + 1], int32.
[[nodiscard]] cudaError_t launch_mla_metadata(const int32_t* cache_seqlens, int batch, int num_parts,
                                              int32_t* metadata, int32_t* num_splits, cudaStream_t stream);

// The decode kernel on grid (ceil(q_rows / 64), h_kv, num_parts), then the combine kernel. Returns
// cudaErrorInvalidValue for parameters it cannot serve (grid limits, alignment), else the launch error.
[[nodiscard]] cudaError_t launch_mla_decode(const MlaDecodeParams& params, MlaKvFormat format,
                                            cudaStream_t stream);

// Dynamic shared memory of the decode kernel (the same for every format).
int mla_decode_smem_bytes();

}  // namespace dsv3::cuda
