// The EP combine reduction on sm_90a: one CTA per token, its threads striding over the hidden columns; each
// column adds the biases, then the token's copies rank by rank in ascending order in fp32 (through a per-node
// partial rounded to the row type when the ranks span several nodes), then casts once. The adds happen in
// the CPU kernel's order (no FMA), so both devices give the same bits. Memory-bound: every copy is read
// once, coalesced along the row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ep_combine_kernels.h"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ep_combine_reduce_kernel(const T* __restrict__ x, const int64_t* __restrict__ row_of,
                             const float* __restrict__ bias_0, const float* __restrict__ bias_1,
                             T* __restrict__ out, int64_t hidden, int64_t ranks, int64_t node) {
  const int64_t t = blockIdx.x;
  const int64_t* rows = row_of + t * ranks;
  for (int64_t h = threadIdx.x; h < hidden; h += kThreads) {
    float acc = 0.0f;
    if (bias_0 != nullptr) acc = __fadd_rn(acc, bias_0[t * hidden + h]);
    if (bias_1 != nullptr) acc = __fadd_rn(acc, bias_1[t * hidden + h]);
    // The adds form one dependent chain anyway; unrolling them only multiplies predicates (spilled).
    if (node >= ranks) {
#pragma unroll 1
      for (int64_t r = 0; r < ranks; ++r) {
        const int64_t row = rows[r];
        if (row >= 0) acc = __fadd_rn(acc, to_float(x[row * hidden + h]));
      }
    } else {
#pragma unroll 1
      for (int64_t first = 0; first < ranks; first += node) {
        float part = 0.0f;
        const int64_t last = first + node < ranks ? first + node : ranks;
#pragma unroll 1
        for (int64_t r = first; r < last; ++r) {
          const int64_t row = rows[r];
          if (row >= 0) part = __fadd_rn(part, to_float(x[row * hidden + h]));
        }
        acc = __fadd_rn(acc, to_float(from_float<T>(part)));
      }
    }
    out[t * hidden + h] = from_float<T>(acc);
  }
}

template <typename T>
cudaError_t launch(const void* x, const int64_t* row_of, const float* bias_0, const float* bias_1, void* out,
                   int64_t tokens, int64_t hidden, int64_t ranks, int64_t node, cudaStream_t stream) {
  ep_combine_reduce_kernel<T><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      static_cast<const T*>(x), row_of, bias_0, bias_1, static_cast<T*>(out), hidden, ranks, node);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ep_combine_reduce(CombineRowType type, const void* x, const int64_t* row_of, const float* bias_0,
                              const float* bias_1, void* out, int64_t tokens, int64_t hidden, int64_t ranks,
                              int64_t node, cudaStream_t stream) {
  if (tokens < 0 || hidden < 0 || ranks < 0 || node < 1 || tokens > 0x7fffffff) return cudaErrorInvalidValue;
  if (tokens == 0 || hidden == 0) return cudaSuccess;
  switch (type) {
    case CombineRowType::kFloat:
      return launch<float>(x, row_of, bias_0, bias_1, out, tokens, hidden, ranks, node, stream);
    case CombineRowType::kBFloat16:
      return launch<__nv_bfloat16>(x, row_of, bias_0, bias_1, out, tokens, hidden, ranks, node, stream);
    case CombineRowType::kHalf:
      return launch<__half>(x, row_of, bias_0, bias_1, out, tokens, hidden, ranks, node, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dsv3::cuda
