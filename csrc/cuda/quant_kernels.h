// Launchers of the sm_90a FP8 (e4m3) quantization kernels of SPEC §2: 1 x group_size per-token groups and
// block_size x block_size blocks, both directions. Torch-free: csrc/cuda/quant_host.cpp validates the
// tensors, calls these with raw pointers and turns a returned error into an exception.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv3::cuda {

// Element type of the high-precision side (quantize input, dequantize output).
enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Error convention: every launcher returns cudaSuccess, cudaErrorInvalidValue for arguments it cannot
// serve (unknown dtype, negative size, non-positive group/block size), or the launch error reported by
// cudaGetLastError(). Nothing is launched for an empty problem. The caller raises on anything else.
//
// Semantics (python/dsv3/ops/reference.py): s = max(amax, 1e-4) / 448 (ue8m0: rounded up to a power of
// two), q = e4m3(x / s) with saturation and round-to-nearest-even; a NaN in a group/block makes its scale
// NaN. Dequantization writes dtype(float(q) * s). x, q and out are contiguous [batch, rows, k] /
// [batch, n, k].

// The scale of (b, r, g) lives at scales[b * s_batch_stride + r * s_row_stride + g * s_group_stride]:
// row-major [batch, rows, ceil(k / group_size)] or the column-major TMA layout (strides
// (kg * m_pad, 1, m_pad)); padding entries are never written.
[[nodiscard]] cudaError_t quantize_per_token_group(const void* x, DType x_dtype, int64_t batch, int64_t rows,
                                                   int64_t k, int64_t group_size, bool ue8m0, uint8_t* q,
                                                   float* scales, int64_t s_batch_stride,
                                                   int64_t s_row_stride, int64_t s_group_stride,
                                                   cudaStream_t stream);

[[nodiscard]] cudaError_t dequantize_per_token_group(const uint8_t* q, const float* scales,
                                                     int64_t s_batch_stride, int64_t s_row_stride,
                                                     int64_t s_group_stride, int64_t batch, int64_t rows,
                                                     int64_t k, int64_t group_size, void* out,
                                                     DType out_dtype, cudaStream_t stream);

// scale_inv is contiguous [batch, ceil(n / block_size), ceil(k / block_size)] (HF weight_scale_inv).
[[nodiscard]] cudaError_t quantize_per_block(const void* w, DType w_dtype, int64_t batch, int64_t n,
                                             int64_t k, int64_t block_size, bool ue8m0, uint8_t* q,
                                             float* scale_inv, cudaStream_t stream);

[[nodiscard]] cudaError_t dequantize_per_block(const uint8_t* q, const float* scale_inv, int64_t batch,
                                               int64_t n, int64_t k, int64_t block_size, void* out,
                                               DType out_dtype, cudaStream_t stream);

}  // namespace dsv3::cuda
