// sm_90a FP8 quantization kernels (SPEC §2) behind the launchers of quant_kernels.h. They are memory-bound:
// each thread moves 16-byte vectors of the high-precision side, a group's amax is reduced with warp
// shuffles (a block's through shared memory), and the values stay in registers between the amax pass and
// the quantize pass, so every byte is read from DRAM once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant_kernels.h"

namespace dsv3::cuda {
namespace {

constexpr int kMaxThreads = 256;  // CTA size (an upper bound for the per-block kernels)
// Resident CTAs per SM the register budget must allow (__launch_bounds__, so <= 85 registers): 24 warps
// keep the 32-64 KB of loads in flight per SM that DRAM latency x bandwidth asks for, and a per-block CTA
// waiting at its amax barrier leaves others streaming.
constexpr int kMinCtasPerSm = 3;
constexpr int64_t kMaxCtas = 1 << 20;  // grid cap; the kernels loop (grid-stride) over what lies beyond
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;
// Vectors each thread keeps in registers between the amax and the quantize pass, the rest being read again
// (from L2). Per-token: 4 covers a 128 group in every vector width. Per-block: a 128 x 128 block over 256
// threads is 64 elements a thread: all of bf16/fp16 (8 x 16 B), half of fp32; more would spill.
constexpr int kTokenCacheVecs = 4;
constexpr int kBlockCacheVecs = 8;

// VEC elements moved as one access: 16 bytes on the vector path, a single element on the unaligned path.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// float -> T with round-to-nearest-even; pairs compile to one packed F2FP conversion.
__device__ __forceinline__ void round_pair(float a, float b, float* out) {
  out[0] = a;
  out[1] = b;
}
__device__ __forceinline__ void round_pair(float a, float b, __nv_bfloat16* out) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(a, b);
  out[0] = p.x;
  out[1] = p.y;
}
__device__ __forceinline__ void round_pair(float a, float b, __half* out) {
  const __half2 p = __floats2half2_rn(a, b);
  out[0] = p.x;
  out[1] = p.y;
}
__device__ __forceinline__ void round_one(float a, float* out) { *out = a; }
__device__ __forceinline__ void round_one(float a, __nv_bfloat16* out) { *out = __float2bfloat16_rn(a); }
__device__ __forceinline__ void round_one(float a, __half* out) { *out = __float2half_rn(a); }

// |x| as bits: non-negative floats order like their bit patterns and every NaN sorts above +inf, so an
// unsigned max is an amax that propagates NaN (fmaxf would drop it) and costs one integer instruction.
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Smallest power of two >= s for s > 0, exactly: a non-zero mantissa carries into the exponent. inf and
// NaN are returned unchanged (the carry would turn a NaN into -0).
__device__ __forceinline__ float ceil_pow2(float s) {
  const uint32_t u = __float_as_uint(s);
  if ((u & 0x7f800000u) == 0x7f800000u) return s;
  return __uint_as_float((u + 0x007fffffu) & 0xff800000u);
}

// s = max(amax, 1e-4) / 448 with an IEEE division, as the reference computes it in fp32.
__device__ __forceinline__ float scale_from_amax(uint32_t amax_bits, bool ue8m0) {
  const float clamped = __uint_as_float(max(amax_bits, __float_as_uint(kAmaxFloor)));  // keeps a NaN amax
  const float s = __fdiv_rn(clamped, kFp8Max);
  return ue8m0 ? ceil_pow2(s) : s;
}

// For 16-bit types the max runs on the packed bit patterns (which order like |x| as well) and only the
// result is widened: unpacking every element here would keep twice the registers live until the
// quantize pass.
template <typename T, int VEC>
__device__ __forceinline__ uint32_t vec_amax_bits(const Vec<T, VEC>& v) {
  if constexpr (sizeof(T) == 2 && VEC % 2 == 0) {
    uint32_t m16 = 0;
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      uint32_t pair;
      memcpy(&pair, &v.v[j], sizeof(pair));
      m16 = max(m16, max(pair & 0x7fffu, pair >> 16 & 0x7fffu));
    }
    return abs_bits(to_float(__builtin_bit_cast(T, static_cast<uint16_t>(m16))));
  } else {
    uint32_t m = 0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = max(m, abs_bits(to_float(v.v[j])));
    return m;
  }
}

// q = e4m3(clamp(x / s, -448, 448)): the SATFINITE conversion is the clamp (and, unlike fminf/fmaxf, keeps
// NaN a NaN: 0x7f); __fdiv_rn, not a reciprocal multiply, so q matches the CPU kernels bit for bit.
template <typename T, int VEC>
__device__ __forceinline__ Vec<uint8_t, VEC> quantize_vec(const Vec<T, VEC>& v, float s) {
  Vec<uint8_t, VEC> q;
  if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const float2 pair = make_float2(__fdiv_rn(to_float(v.v[j]), s), __fdiv_rn(to_float(v.v[j + 1]), s));
      const __nv_fp8x2_storage_t bytes = __nv_cvt_float2_to_fp8x2(pair, __NV_SATFINITE, __NV_E4M3);
      q.v[j] = static_cast<uint8_t>(bytes & 0xff);
      q.v[j + 1] = static_cast<uint8_t>(bytes >> 8);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      q.v[j] = __nv_cvt_float_to_fp8(__fdiv_rn(to_float(v.v[j]), s), __NV_SATFINITE, __NV_E4M3);
  }
  return q;
}

// out = T(float(q) * s); e4m3 -> f16 is exact, so the only rounding is the final RNE conversion.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> dequantize_vec(const Vec<uint8_t, VEC>& q, float s) {
  Vec<T, VEC> out;
  if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      const auto pair = static_cast<__nv_fp8x2_storage_t>(q.v[j] | (q.v[j + 1] << 8));
      const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
      round_pair(f.x * s, f.y * s, &out.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      round_one(__half2float(__half(__nv_cvt_fp8_to_halfraw(q.v[j], __NV_E4M3))) * s, &out.v[j]);
  }
  return out;
}

// Two passes over the `count` vectors this thread owns in one group or block (offset(i): element offset of
// vector i, -1 where it lies outside the tensor): amax, reduced across the owners by `reduce`, then
// quantize. The first kCache vectors stay in registers between the passes; later ones (groups or blocks
// far larger than 128) are read again, from L2. All cached loads are issued before any amax math, so they
// are in flight together. Returns the scale.
template <typename T, int VEC, int kCache, typename Offset, typename Reduce>
__device__ __forceinline__ float quantize_vectors(const T* __restrict__ x, uint8_t* __restrict__ q,
                                                  int64_t count, Offset offset, Reduce reduce, bool ue8m0) {
  static_assert(kCache <= 32, "`cached` validity is a 32-bit mask");
  Vec<T, VEC> cached[kCache];
  uint32_t cached_mask = 0;  // bit i: cached[i] holds data (vector i lies inside the tensor)
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int64_t off = i < count ? offset(i) : -1;
    if (off >= 0) {
      cached[i] = load_vec<T, VEC>(x + off);
      cached_mask |= 1u << i;
    }
  }
  uint32_t amax = 0;
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    if (cached_mask >> i & 1) amax = max(amax, vec_amax_bits(cached[i]));
  }
  for (int64_t i = kCache; i < count; ++i) {
    const int64_t off = offset(i);
    if (off >= 0) amax = max(amax, vec_amax_bits(load_vec<T, VEC>(x + off)));
  }
  const float s = scale_from_amax(reduce(amax), ue8m0);
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    if (cached_mask >> i & 1) store_vec(q + offset(i), quantize_vec(cached[i], s));
  }
  for (int64_t i = kCache; i < count; ++i) {
    const int64_t off = offset(i);
    if (off >= 0) store_vec(q + off, quantize_vec(load_vec<T, VEC>(x + off), s));
  }
  return s;
}

// out = T(q * s) for the `count` vectors this thread owns, kLoadBatch loads in flight at a time.
template <typename T, int VEC, typename Offset>
__device__ __forceinline__ void dequantize_vectors(const uint8_t* __restrict__ q, T* __restrict__ out,
                                                   int64_t count, Offset offset, float s) {
  constexpr int kLoadBatch = 4;
  for (int64_t i0 = 0; i0 < count; i0 += kLoadBatch) {
    int64_t off[kLoadBatch];
    Vec<uint8_t, VEC> v[kLoadBatch];
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      off[j] = i0 + j < count ? offset(i0 + j) : -1;
      if (off[j] >= 0) v[j] = load_vec<uint8_t, VEC>(q + off[j]);
    }
#pragma unroll
    for (int j = 0; j < kLoadBatch; ++j) {
      if (off[j] >= 0) store_vec(out + off[j], dequantize_vec<T, VEC>(v[j], s));
    }
  }
}

// ---- per-token groups: a team of `lanes` threads (a power of two <= 32, so a team sits inside one warp and
// reduces with shuffles) owns one group at a time; lane l holds vectors l, l + lanes, ... of the group.
// Lanes are added only once each holds kTokenCacheVecs vectors (a bf16 128 group: 4 lanes x 4 x 16 B), so
// a thread keeps 64 bytes of loads in flight, which a memory-bound kernel needs to reach DRAM bandwidth.
// Team i of the grid takes groups i, i + teams in grid, ... of the flattened [batch * rows, groups] index,
// so a warp's teams read consecutive groups and no team idles at the end of a short row.
struct TokenGroupShape {
  int64_t num_groups;  // batch * rows * groups_per_row
  int64_t rows, k, group_size, groups_per_row;
  int64_t s_batch_stride, s_row_stride, s_group_stride;
  int64_t vecs_per_lane;
  int lanes;
};

// Calls body(element offset of the group, real elements in it, index of its scale) for each group this
// thread's team owns.
template <typename Body>
__device__ __forceinline__ void for_each_token_group(const TokenGroupShape& p, Body body) {
  const int teams = blockDim.x / p.lanes;
  const int64_t step = static_cast<int64_t>(gridDim.x) * teams;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * teams + threadIdx.x / p.lanes; i < p.num_groups;
       i += step) {
    const int64_t t = i / p.groups_per_row, g = i - t * p.groups_per_row;  // token row, group in it
    const int64_t b = t / p.rows, r = t - b * p.rows;
    const int64_t col = g * p.group_size;
    body(t * p.k + col, std::min(p.group_size, p.k - col),
         b * p.s_batch_stride + r * p.s_row_stride + g * p.s_group_stride);
  }
}

template <int VEC>
__device__ __forceinline__ auto token_group_offsets(const TokenGroupShape& p, int64_t base, int64_t len) {
  const int lane = threadIdx.x % p.lanes, lanes = p.lanes;
  return [=](int64_t i) -> int64_t {
    const int64_t e = (lane + i * lanes) * VEC;
    return e < len ? base + e : -1;
  };
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinCtasPerSm)
    quantize_token_groups_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales,
                                 TokenGroupShape p, bool ue8m0) {
  // Shuffle only among this team's lanes: teams of one warp may run different numbers of groups.
  const unsigned team_mask =
      p.lanes == 32 ? 0xffffffffu : ((1u << p.lanes) - 1) << ((threadIdx.x % 32) & -p.lanes);
  const auto team_max = [=](uint32_t v) {
    for (int d = p.lanes / 2; d > 0; d /= 2) v = max(v, __shfl_xor_sync(team_mask, v, d));
    return v;
  };
  for_each_token_group(p, [&](int64_t base, int64_t len, int64_t s_index) {
    const float s = quantize_vectors<T, VEC, kTokenCacheVecs>(
        x, q, p.vecs_per_lane, token_group_offsets<VEC>(p, base, len), team_max, ue8m0);
    if (threadIdx.x % p.lanes == 0) scales[s_index] = s;
  });
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinCtasPerSm)
    dequantize_token_groups_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales,
                                   T* __restrict__ out, TokenGroupShape p) {
  for_each_token_group(p, [&](int64_t base, int64_t len, int64_t s_index) {
    dequantize_vectors<T, VEC>(q, out, p.vecs_per_lane, token_group_offsets<VEC>(p, base, len),
                               scales[s_index]);
  });
}

// ---- per-block: one CTA per block_size x block_size block (grid-stride past kMaxCtas). `lanes` threads (a
// power of two, up to the whole CTA) cover a block row; the CTA's `teams` = threads / lanes such row teams
// take rows team, team + teams, ... The amax is reduced over the CTA through shared memory.
struct BlockShape {
  int64_t n, k, block_size, blocks_n, blocks_k, num_blocks;  // num_blocks = batch * blocks_n * blocks_k
  int64_t rows_per_team;   // vectors per thread = rows_per_team << cols_per_lane_log2
  int cols_per_lane_log2;  // 0 unless a block row has more vectors than the CTA has threads
  int lanes, teams;
};

// Calls body(offsets of this thread's vectors in the block, linear block index) for each block of this CTA.
template <int VEC, typename Body>
__device__ __forceinline__ void for_each_block(const BlockShape& p, Body body) {
  const int team = threadIdx.x / p.lanes, lane = threadIdx.x % p.lanes;
  for (int64_t blk = blockIdx.x; blk < p.num_blocks; blk += gridDim.x) {
    const int64_t bk = blk % p.blocks_k, bn = blk / p.blocks_k % p.blocks_n,
                  b = blk / (p.blocks_k * p.blocks_n);
    const int64_t row0 = bn * p.block_size, col0 = bk * p.block_size;
    const int64_t nrows = std::min(p.block_size, p.n - row0),
                  nvecs = std::min(p.block_size, p.k - col0) / VEC;
    const int64_t base = (b * p.n + row0) * p.k + col0;
    body(
        [=](int64_t i) -> int64_t {
          const int64_t j = i >> p.cols_per_lane_log2, m = i & ((int64_t{1} << p.cols_per_lane_log2) - 1);
          const int64_t r = team + j * p.teams, c = lane + m * p.lanes;
          return r < nrows && c < nvecs ? base + r * p.k + c * VEC : -1;
        },
        blk);
  }
}

// Max over the CTA. The second barrier lets the next block of the grid-stride loop reuse warp_max.
__device__ __forceinline__ uint32_t cta_max(uint32_t v, uint32_t* warp_max) {
  for (int d = 16; d > 0; d /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, d));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
  __syncthreads();
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) v = max(v, warp_max[w]);
  __syncthreads();
  return v;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinCtasPerSm)
    quantize_blocks_kernel(const T* __restrict__ w, uint8_t* __restrict__ q, float* __restrict__ scale_inv,
                           BlockShape p, bool ue8m0) {
  __shared__ uint32_t warp_max[kMaxThreads / 32];
  for_each_block<VEC>(p, [&](auto offsets, int64_t blk) {
    const float s = quantize_vectors<T, VEC, kBlockCacheVecs>(
        w, q, p.rows_per_team << p.cols_per_lane_log2, offsets,
        [&](uint32_t v) { return cta_max(v, warp_max); }, ue8m0);
    if (threadIdx.x == 0) scale_inv[blk] = s;
  });
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads, kMinCtasPerSm)
    dequantize_blocks_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scale_inv,
                             T* __restrict__ out, BlockShape p) {
  for_each_block<VEC>(p, [&](auto offsets, int64_t blk) {
    dequantize_vectors<T, VEC>(q, out, p.rows_per_team << p.cols_per_lane_log2, offsets, scale_inv[blk]);
  });
}

// ---- host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// 16-byte accesses need the pointers aligned and every group/block row to start on a vector boundary.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T>
bool vector_path_ok(const void* wide, const uint8_t* fp8, int64_t k, int64_t span) {
  return aligned(wide, 16) && aligned(fp8, kVec<T>) && k % kVec<T> == 0 && span % kVec<T> == 0;
}

// Calls f(T{}) with the element type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F f) {
  switch (dtype) {
    case DType::kF32:
      return f(float{});
    case DType::kBF16:
      return f(__nv_bfloat16{});
    case DType::kF16:
      return f(__half{});
  }
  return cudaErrorInvalidValue;
}

TokenGroupShape token_group_shape(int64_t batch, int64_t rows, int64_t k, int64_t group_size,
                                  int64_t s_batch_stride, int64_t s_row_stride, int64_t s_group_stride,
                                  int vec) {
  TokenGroupShape p{};
  p.rows = rows;
  p.k = k;
  p.group_size = group_size;
  p.groups_per_row = ceil_div(k, group_size);
  p.s_batch_stride = s_batch_stride;
  p.s_row_stride = s_row_stride;
  p.s_group_stride = s_group_stride;
  const int64_t vecs = ceil_div(std::min(group_size, k), vec);
  p.lanes = static_cast<int>(std::min<int64_t>(32, pow2_ceil(ceil_div(vecs, kTokenCacheVecs))));
  p.vecs_per_lane = ceil_div(vecs, p.lanes);
  p.num_groups = batch * rows * p.groups_per_row;
  return p;
}

BlockShape block_shape(int64_t batch, int64_t n, int64_t k, int64_t block_size, int vec, int* threads) {
  BlockShape p{};
  p.n = n;
  p.k = k;
  p.block_size = block_size;
  p.blocks_n = ceil_div(n, block_size);
  p.blocks_k = ceil_div(k, block_size);
  p.num_blocks = batch * p.blocks_n * p.blocks_k;
  const int64_t span_n = std::min(block_size, n), vecs = ceil_div(std::min(block_size, k), vec);
  p.lanes = static_cast<int>(std::min<int64_t>(kMaxThreads, pow2_ceil(vecs)));
  // Small blocks get a smaller CTA rather than idle threads.
  *threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ceil_div(p.lanes * span_n, 32) * 32));
  p.teams = *threads / p.lanes;
  p.rows_per_team = ceil_div(span_n, p.teams);
  // A power of two, so the kernels split a vector index into (row, column) with shifts.
  while (int64_t{p.lanes} << p.cols_per_lane_log2 < vecs) ++p.cols_per_lane_log2;
  return p;
}

int grid_size(int64_t units) { return static_cast<int>(std::min(units, kMaxCtas)); }

template <typename T, int VEC>
cudaError_t launch_quantize_token_groups(const T* x, uint8_t* q, float* scales, const TokenGroupShape& p,
                                         bool ue8m0, cudaStream_t stream) {
  quantize_token_groups_kernel<T, VEC>
      <<<grid_size(ceil_div(p.num_groups, kMaxThreads / p.lanes)), kMaxThreads, 0, stream>>>(x, q, scales, p,
                                                                                             ue8m0);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_dequantize_token_groups(const uint8_t* q, const float* scales, T* out,
                                           const TokenGroupShape& p, cudaStream_t stream) {
  dequantize_token_groups_kernel<T, VEC>
      <<<grid_size(ceil_div(p.num_groups, kMaxThreads / p.lanes)), kMaxThreads, 0, stream>>>(q, scales, out,
                                                                                             p);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_quantize_blocks(const T* w, uint8_t* q, float* scale_inv, int64_t batch, int64_t n,
                                   int64_t k, int64_t block_size, bool ue8m0, cudaStream_t stream) {
  int threads = 0;
  const BlockShape p = block_shape(batch, n, k, block_size, VEC, &threads);
  quantize_blocks_kernel<T, VEC><<<grid_size(p.num_blocks), threads, 0, stream>>>(w, q, scale_inv, p, ue8m0);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_dequantize_blocks(const uint8_t* q, const float* scale_inv, T* out, int64_t batch,
                                     int64_t n, int64_t k, int64_t block_size, cudaStream_t stream) {
  int threads = 0;
  const BlockShape p = block_shape(batch, n, k, block_size, VEC, &threads);
  dequantize_blocks_kernel<T, VEC><<<grid_size(p.num_blocks), threads, 0, stream>>>(q, scale_inv, out, p);
  return cudaGetLastError();
}

bool bad_sizes(int64_t batch, int64_t rows, int64_t k, int64_t group) {
  return batch < 0 || rows < 0 || k < 0 || group <= 0;
}

bool empty(int64_t batch, int64_t rows, int64_t k) { return batch == 0 || rows == 0 || k == 0; }

}  // namespace

cudaError_t quantize_per_token_group(const void* x, DType x_dtype, int64_t batch, int64_t rows, int64_t k,
                                     int64_t group_size, bool ue8m0, uint8_t* q, float* scales,
                                     int64_t s_batch_stride, int64_t s_row_stride, int64_t s_group_stride,
                                     cudaStream_t stream) {
  if (bad_sizes(batch, rows, k, group_size)) return cudaErrorInvalidValue;
  if (empty(batch, rows, k)) return cudaSuccess;
  return dispatch_dtype(x_dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = kVec<T>;
    const T* xt = static_cast<const T*>(x);
    if (vector_path_ok<T>(x, q, k, std::min(group_size, k))) {
      const auto p =
          token_group_shape(batch, rows, k, group_size, s_batch_stride, s_row_stride, s_group_stride, V);
      return launch_quantize_token_groups<T, V>(xt, q, scales, p, ue8m0, stream);
    }
    const auto p =
        token_group_shape(batch, rows, k, group_size, s_batch_stride, s_row_stride, s_group_stride, 1);
    return launch_quantize_token_groups<T, 1>(xt, q, scales, p, ue8m0, stream);
  });
}

cudaError_t dequantize_per_token_group(const uint8_t* q, const float* scales, int64_t s_batch_stride,
                                       int64_t s_row_stride, int64_t s_group_stride, int64_t batch,
                                       int64_t rows, int64_t k, int64_t group_size, void* out,
                                       DType out_dtype, cudaStream_t stream) {
  if (bad_sizes(batch, rows, k, group_size)) return cudaErrorInvalidValue;
  if (empty(batch, rows, k)) return cudaSuccess;
  return dispatch_dtype(out_dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = kVec<T>;
    T* ot = static_cast<T*>(out);
    if (vector_path_ok<T>(out, q, k, std::min(group_size, k))) {
      const auto p =
          token_group_shape(batch, rows, k, group_size, s_batch_stride, s_row_stride, s_group_stride, V);
      return launch_dequantize_token_groups<T, V>(q, scales, ot, p, stream);
    }
    const auto p =
        token_group_shape(batch, rows, k, group_size, s_batch_stride, s_row_stride, s_group_stride, 1);
    return launch_dequantize_token_groups<T, 1>(q, scales, ot, p, stream);
  });
}

cudaError_t quantize_per_block(const void* w, DType w_dtype, int64_t batch, int64_t n, int64_t k,
                               int64_t block_size, bool ue8m0, uint8_t* q, float* scale_inv,
                               cudaStream_t stream) {
  if (bad_sizes(batch, n, k, block_size)) return cudaErrorInvalidValue;
  if (empty(batch, n, k)) return cudaSuccess;
  return dispatch_dtype(w_dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = kVec<T>;
    const T* wt = static_cast<const T*>(w);
    if (vector_path_ok<T>(w, q, k, std::min(block_size, k))) {
      return launch_quantize_blocks<T, V>(wt, q, scale_inv, batch, n, k, block_size, ue8m0, stream);
    }
    return launch_quantize_blocks<T, 1>(wt, q, scale_inv, batch, n, k, block_size, ue8m0, stream);
  });
}

cudaError_t dequantize_per_block(const uint8_t* q, const float* scale_inv, int64_t batch, int64_t n,
                                 int64_t k, int64_t block_size, void* out, DType out_dtype,
                                 cudaStream_t stream) {
  if (bad_sizes(batch, n, k, block_size)) return cudaErrorInvalidValue;
  if (empty(batch, n, k)) return cudaSuccess;
  return dispatch_dtype(out_dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int V = kVec<T>;
    T* ot = static_cast<T*>(out);
    if (vector_path_ok<T>(out, q, k, std::min(block_size, k))) {
      return launch_dequantize_blocks<T, V>(q, scale_inv, ot, batch, n, k, block_size, stream);
    }
    return launch_dequantize_blocks<T, 1>(q, scale_inv, ot, batch, n, k, block_size, stream);
  });
}

}  // namespace dsv3::cuda
