// Launcher of the sm_90a FP8 block-scaled GEMM kernels of csrc/cuda/fp8_gemm.cu (SPEC §3). Torch-free:
// csrc/cuda/fp8_gemm_host.cpp validates the tensors, picks the config (dsv3/sm90/fp8_gemm_plan.h), fills
// these structs and raises on a returned error.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dsv3/sm90/fp8_gemm_plan.h"

namespace dsv3::cuda {

// The kernel's scalar arguments. Rows: m is all rows (dense, wgrad, contiguous) or M_max of a group (masked).
struct Fp8GemmParams {
  sm90::GemmKind kind;
  int m, n, k, num_groups, num_k_blocks, stages, num_m_blocks, num_n_blocks;
  // 128x128 B scales (not wgrad): sb[group * sb_group_stride + n_block * sb_row_stride + k_block *
  // sb_col_stride]
  const float* sb;
  int64_t sb_group_stride, sb_row_stride, sb_col_stride;
  const int* m_indices;  // contiguous: group of each row, -1 = zero rows; constant per 128-row block
  const int* masked_m;   // masked: valid rows per group (clamped to [0, m] by the kernel)
  void* out;             // bf16 or fp32 [groups][m][n], rows out_row_stride and groups out_group_stride apart
  int64_t out_row_stride, out_group_stride;
  bool out_fp32, accumulate;  // accumulate: out += result (fp32 only)
  int cluster_size;           // 1, or 2 (dense only: CTAs 2c and 2c + 1 share A, see choose_cluster_size)
};

struct Fp8GemmLaunch {
  Fp8GemmParams params;
  int block_m, block_n, smem_bytes, grid;
  // TMA sources: A and B e4m3 K-major, A's scales (and B's for wgrad) MN-major fp32; TMA destination: the
  // bf16 output (params.out; unused, and unset, for fp32 outputs).
  const void *a, *b;
  const float *sa, *sb_rows;
  sm90::TmaParams tma_a, tma_b, tma_sa, tma_sb_rows, tma_d;
};

// cudaErrorInvalidValue when no compiled kernel has the tile shape, a TMA descriptor is rejected (the host
// checks both beforehand) or the cluster size is not 1, or 2 with an even grid (not wgrad),
// cudaErrorNotSupported when the driver has no cuTensorMapEncodeTiled, else the launch error. Nothing is
// launched when the grid is empty.
[[nodiscard]] cudaError_t launch_fp8_gemm(const Fp8GemmLaunch& launch, cudaStream_t stream);

}  // namespace dsv3::cuda
