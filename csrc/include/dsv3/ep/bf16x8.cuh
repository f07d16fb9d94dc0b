// Eight bf16 values in one 16-byte word (the EP kernels' row access unit) summed into fp32 and rounded back:
// the combine reductions of the NVLink and NVSHMEM kernels. CUDA only.
#pragma once
#include <cuda_bf16.h>

namespace dsv3::ep {

// acc[i] += float(bf16 value i of v)
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

// The eight sums rounded to bf16 (nearest even), packed in one word.
__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  int4 packed;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return packed;
}

}  // namespace dsv3::ep
