// sm_90a low-latency EP kernels on NVSHMEM (SPEC §5, DeepEP's low-latency mode), each phase its own launch so
// the receive phase can run later from a hook while the RDMA traffic flies without holding SMs:
//   dispatch send: one warp per token stages it in the send region (fp8 1x128 cast or bf16 copy) and puts
//                  one message per (token, k) into slot `slot` of [local expert][this rank][T] on the
//                  expert's rank, each put carrying a signal add; one warp per expert sends -count-1.
//   dispatch recv: one block per (source, local expert) waits for the counts of sources <= its own (its
//                  begin is their prefix: deterministic, no atomics on the row position) and for its
//                  messages, then packs them into [L, R*T, ...] with src_info and layout_range.
//   combine send:  one block per (source, local expert) returns each row to the source's
//                  [global expert][token] slot; combine recv: one warp per token waits for its experts'
//                  rows and sums w * row in k order in fp32 with one bf16 cast.
// `slot` is the number of earlier (token, k) entries of this rank routed to the same expert, so the rows of
// a (expert, source) block arrive in token order. Waits are bounded by clock64: a late peer sets the
// host-mapped error flag and traps (the host turns it into dsv3.ep.EPTimeoutError).
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>

#include "dsv3/ep/device_sync.cuh"
#include "dsv3/ep/ll_layout.h"
#include "ll_kernels.h"

namespace dsv3::ep::nvshmem {
// A named namespace, not an anonymous one: with relocatable device code nvcc prefixes internal-linkage
// kernels with a per-file tag that demanglers (and so the SASS audit) cannot read.
namespace ll {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kVec = 8;                              // bf16 values per 16-byte access
constexpr int kLanesPerGroup = kLLGroupSize / kVec;  // 16 lanes cover one 1x128 fp8 group

// Error codes in the host-mapped flag: (what << 24) | peer.
// kErrRouting: an expert id >= E, an expert twice in one token's top-k (its two combine rows would share a
// slot) or more than T rows for one expert; the sender traps rather than write past its slot region.
constexpr int kErrDispatchCount = 1, kErrDispatchData = 2, kErrCombineData = 3, kErrRouting = 4;

// A 16-byte global load of a row that a peer wrote (the pointer is a kernel-argument field, so the compiler
// cannot prove the global space; a generic load would also do, this one names the path).
__device__ __forceinline__ int4 load_global_16(const void* p) {
  int4 v;
  asm volatile("ld.global.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void fail(int* error_flag, int what, int peer) {
  ep_trap(error_flag, (what << 24) | peer);
}

// Spins until *p != 0 (a count message) and returns it.
__device__ __forceinline__ int wait_count(const int* p, const LLArgs& a, int peer) {
  const long long start = clock64();
  int v;
  while ((v = ld_acquire_sys(p)) == 0)
    if (clock64() - start > a.timeout_cycles) fail(a.error_flag, kErrDispatchCount, peer);
  return v;
}

// Spins until *p >= target (NVSHMEM signal adds land after the data they follow).
__device__ __forceinline__ void wait_arrivals(const uint64_t* p, uint64_t target, const LLArgs& a, int what,
                                              int peer) {
  const long long start = clock64();
  while (ld_acquire_sys(p) < target)
    if (clock64() - start > a.timeout_cycles) fail(a.error_flag, what, peer);
}

// Entries of topk_idx[0, end) equal to e, on every lane.
__device__ __forceinline__ int warp_count(const int64_t* __restrict__ topk_idx, int64_t end, int64_t e,
                                          int lane) {
  int c = 0;
  for (int64_t j = lane; j < end; j += kWarpSize) c += topk_idx[j] == e;
  return __reduce_add_sync(kFullMask, c);
}

// s = max(amax, 1e-4) / 448 (IEEE division, NaN kept), optionally rounded up to a power of two: the scale
// rule of dsv3.ops.quantize_per_token_group. amax arrives as the bits of |x| (NaN above inf).
__device__ __forceinline__ float fp8_scale(uint32_t amax_bits, bool pow2) {
  const float amax = __uint_as_float(amax_bits);
  const float s = isnan(amax) ? amax : __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
  const uint32_t bits = __float_as_uint(s), exp = bits >> 23 & 0xFF;
  if (!pow2 || exp == 0xFF || (bits & 0x7FFFFF) == 0) return s;  // s is normal and positive here
  return __uint_as_float((exp + 1) << 23);
}

__device__ __forceinline__ void unpack_bf16x8(const int4& v, float (&f)[kVec]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// Stages token t's message: header (source token index), then the payload.
template <bool kFp8>
__device__ __forceinline__ void stage_token(const LLArgs& a, const __nv_bfloat16* __restrict__ x, int t,
                                            bool pow2, int lane) {
  uint8_t* msg = a.send + int64_t(t) * a.dispatch_msg_bytes;
  if (lane == 0) *reinterpret_cast<int4*>(msg) = make_int4(t, 0, 0, 0);
  const int4* row = reinterpret_cast<const int4*>(x + int64_t(t) * a.hidden);
  if constexpr (kFp8) {
    uint8_t* q = msg + kLLHeaderBytes;
    float* scales = reinterpret_cast<float*>(msg + ll_fp8_scales_offset(a.hidden));
    // A warp covers two groups per step; when H / 128 is odd the last step's upper half-warp idles but
    // still joins the shuffles (the reduction stays within each 16-lane half).
    for (int base = 0; base < a.hidden; base += kWarpSize * kVec) {
      const int col = base + lane * kVec;
      const bool active = col < a.hidden;
      float f[kVec];
      unpack_bf16x8(active ? row[col / kVec] : make_int4(0, 0, 0, 0), f);
      uint32_t amax = 0;
#pragma unroll
      for (int i = 0; i < kVec; ++i) amax = max(amax, __float_as_uint(f[i]) & 0x7FFFFFFFu);
#pragma unroll
      for (int offset = kLanesPerGroup / 2; offset > 0; offset >>= 1)
        amax = max(amax, __shfl_xor_sync(kFullMask, amax, offset));
      const float s = fp8_scale(amax, pow2);
      uint16_t packed[kVec / 2];
#pragma unroll
      for (int i = 0; i < kVec / 2; ++i)
        packed[i] = __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(f[2 * i], s), __fdiv_rn(f[2 * i + 1], s)),
                                             __NV_SATFINITE, __NV_E4M3);
      if (active) {
        *reinterpret_cast<uint2*>(q + col) =
            make_uint2(packed[0] | uint32_t(packed[1]) << 16, packed[2] | uint32_t(packed[3]) << 16);
        if (lane % kLanesPerGroup == 0) scales[col / kLLGroupSize] = s;
      }
    }
  } else {
    int4* payload = reinterpret_cast<int4*>(msg + kLLHeaderBytes);
    for (int i = lane; i < a.hidden / kVec; i += kWarpSize) payload[i] = row[i];
  }
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads)
    ll_dispatch_send_kernel(LLArgs a, const __nv_bfloat16* __restrict__ x,
                            const int64_t* __restrict__ topk_idx, int num_tokens, int num_topk, bool pow2) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = (blockIdx.x * kThreads + threadIdx.x) / kWarpSize, num_warps = gridDim.x * kWarps;
  const int L = a.num_local_experts, R = a.num_ranks;
  const int64_t num_entries = int64_t(num_tokens) * num_topk;

  // Count messages: how many rows each expert gets from this rank (also sent when zero).
  for (int e = warp; e < a.num_experts; e += num_warps) {
    const int count = warp_count(topk_idx, num_entries, e, lane);
    if (count > a.num_max_tokens) fail(a.error_flag, kErrRouting, e);
    if (lane == 0) nvshmem_int_p(a.dispatch_count + (e % L) * R + a.rank, -count - 1, e / L);
  }

  const int64_t payload_bytes =
      kLLHeaderBytes + (kFp8 ? a.hidden + a.hidden / kLLGroupSize * 4 : int64_t(a.hidden) * 2);
  for (int t = warp; t < num_tokens; t += num_warps) {
    stage_token<kFp8>(a, x, t, pow2, lane);
    __syncwarp();
    __threadfence();  // the put reads the staged message: this warp (NVLink) or the NIC (IBGDA)
    const uint8_t* msg = a.send + int64_t(t) * a.dispatch_msg_bytes;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t entry = int64_t(t) * num_topk + k, e = topk_idx[entry];
      if (e < 0) continue;
      if (e >= a.num_experts) fail(a.error_flag, kErrRouting, int(e));
      for (int j = 0; j < k; ++j)
        if (topk_idx[entry - k + j] == e) fail(a.error_flag, kErrRouting, int(e));
      const int slot = warp_count(topk_idx, entry, e, lane);
      const int l = int(e) % L, dst = int(e) / L;  // e < E fits an int: 32-bit division
      uint8_t* dest = a.recv + ((int64_t(l) * R + a.rank) * a.num_max_tokens + slot) * a.dispatch_msg_bytes;
      nvshmemx_putmem_signal_nbi_warp(dest, msg, payload_bytes, a.dispatch_arrival + l * R + a.rank, 1,
                                      NVSHMEM_SIGNAL_ADD, dst);
    }
  }
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads)
    ll_dispatch_recv_kernel(LLArgs a, bool ue8m0, uint8_t* __restrict__ recv_x,
                            void* __restrict__ recv_scales, int* __restrict__ recv_count,
                            int* __restrict__ src_info, int64_t* __restrict__ layout_range) {
  const int src = blockIdx.x, l = blockIdx.y, R = a.num_ranks, T = a.num_max_tokens;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  __shared__ int s_begin, s_count;
  if (threadIdx.x == 0) s_begin = 0;
  __syncthreads();
  for (int i = threadIdx.x; i <= src; i += kThreads) {
    const int count = -wait_count(a.dispatch_count + l * R + i, a, i) - 1;
    if (i < src)
      atomicAdd(&s_begin, count);  // an integer sum: the same begin whatever the order
    else
      s_count = count;
  }
  __syncthreads();
  const int begin = s_begin, count = s_count;
  if (threadIdx.x == 0) wait_arrivals(a.dispatch_arrival + l * R + src, count, a, kErrDispatchData, src);
  __syncthreads();

  const int64_t rows = int64_t(R) * T, H = a.hidden, groups = H / kLLGroupSize;
  const int64_t row_bytes = kFp8 ? H : H * 2;
  for (int i = warp; i < count; i += kWarps) {
    const uint8_t* msg = a.recv + ((int64_t(l) * R + src) * T + i) * a.dispatch_msg_bytes;
    const int64_t row = int64_t(l) * rows + begin + i;
    if (lane == 0) src_info[row] = *reinterpret_cast<const int*>(msg);
    const int4* payload = reinterpret_cast<const int4*>(msg + kLLHeaderBytes);
    int4* out = reinterpret_cast<int4*>(recv_x + row * row_bytes);
    for (int64_t j = lane; j < row_bytes / 16; j += kWarpSize) out[j] = payload[j];
    if constexpr (kFp8) {
      // Column-major scales ([L, R*T, G] with strides (R*T*G, 1, R*T)), the TMA layout of the GEMMs.
      const float* scales = reinterpret_cast<const float*>(msg + ll_fp8_scales_offset(H));
      const int64_t expert_base = int64_t(l) * rows * (ue8m0 ? groups / 4 : groups);
      if (ue8m0) {
        for (int64_t g = lane; g < groups / 4; g += kWarpSize) {
          uint32_t packed = 0;
#pragma unroll
          for (int j = 0; j < 4; ++j) packed |= (__float_as_uint(scales[4 * g + j]) >> 23 & 0xFF) << (8 * j);
          static_cast<int*>(recv_scales)[expert_base + g * rows + begin + i] = int(packed);
        }
      } else {
        for (int64_t g = lane; g < groups; g += kWarpSize)
          static_cast<float*>(recv_scales)[expert_base + g * rows + begin + i] = scales[g];
      }
    }
  }
  if (threadIdx.x == 0) {
    layout_range[l * R + src] = int64_t(begin) << 32 | uint32_t(count);
    if (src == R - 1) recv_count[l] = begin + count;
    // The last block of this expert clears its signals for the next call on this half: every block of
    // the expert has read the counts by then.
    __threadfence();
    if (atomicAdd(a.done + l, 1) == R - 1) {
      for (int i = 0; i < R; ++i) {
        a.dispatch_count[l * R + i] = 0;
        a.dispatch_arrival[l * R + i] = 0;
      }
      a.done[l] = 0;
      __threadfence();
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    ll_combine_send_kernel(LLArgs a, const __nv_bfloat16* __restrict__ x, const int* __restrict__ src_info,
                           const int64_t* __restrict__ layout_range, bool zero_copy) {
  const int src = blockIdx.x, l = blockIdx.y, R = a.num_ranks, T = a.num_max_tokens;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t range = layout_range[l * R + src];
  const int begin = int(range >> 32), count = int(range & 0xFFFFFFFF);
  const int expert = a.rank * a.num_local_experts + l;
  for (int i = warp; i < count; i += kWarps) {
    const int64_t row = int64_t(l) * R * T + begin + i;
    const int t = src_info[row];
    uint8_t* staged = a.send + row * a.combine_msg_bytes;
    if (!zero_copy) {
      const int4* in = reinterpret_cast<const int4*>(x + row * a.hidden);
      for (int j = lane; j < a.hidden / kVec; j += kWarpSize) reinterpret_cast<int4*>(staged)[j] = in[j];
      __syncwarp();
      __threadfence();
    }
    uint8_t* dest = a.recv + (int64_t(expert) * T + t) * a.combine_msg_bytes;
    nvshmemx_putmem_signal_nbi_warp(dest, staged, a.combine_msg_bytes, a.combine_arrival + expert, 1,
                                    NVSHMEM_SIGNAL_ADD, src);
  }
}

__global__ void __launch_bounds__(kThreads)
    ll_combine_recv_kernel(LLArgs a, const int64_t* __restrict__ topk_idx,
                           const float* __restrict__ topk_weights, int num_tokens, int num_topk,
                           __nv_bfloat16* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = (blockIdx.x * kThreads + threadIdx.x) / kWarpSize, num_warps = gridDim.x * kWarps;
  const int64_t num_entries = int64_t(num_tokens) * num_topk, T = a.num_max_tokens;
  for (int t = warp; t < num_tokens; t += num_warps) {
    // Expert e sends back one row per entry of this rank routed to it: wait until all of them landed.
    for (int k = 0; k < num_topk; ++k) {
      const int64_t e = topk_idx[int64_t(t) * num_topk + k];
      if (e < 0) continue;
      const int expected = warp_count(topk_idx, num_entries, e, lane);
      if (lane == 0) wait_arrivals(a.combine_arrival + e, expected, a, kErrCombineData, int(e));
    }
    __syncwarp();
    for (int col = lane * kVec; col < a.hidden; col += kWarpSize * kVec) {
      float acc[kVec] = {};
      for (int k = 0; k < num_topk; ++k) {
        const int64_t entry = int64_t(t) * num_topk + k, e = topk_idx[entry];
        if (e < 0) continue;
        const float w = topk_weights[entry];
        const uint8_t* slot = a.recv + (e * T + t) * a.combine_msg_bytes;
        float f[kVec];
        unpack_bf16x8(load_global_16(slot + int64_t(col) * 2), f);
        // Separate multiply and add (no fma contraction): the reference's fp32 rounding, step by step.
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(f[i], w));
      }
      __align__(16) __nv_bfloat162 packed[kVec / 2];
#pragma unroll
      for (int i = 0; i < kVec / 2; ++i) packed[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
      *reinterpret_cast<int4*>(out + int64_t(t) * a.hidden + col) = *reinterpret_cast<const int4*>(packed);
    }
  }
  // The last block clears the arrival counters for the next combine on this half.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(a.done + a.num_local_experts, 1) == int(gridDim.x) - 1) {
      for (int e = 0; e < a.num_experts; ++e) a.combine_arrival[e] = 0;
      a.done[a.num_local_experts] = 0;
      __threadfence();
    }
  }
}

int grid_for_warps(int64_t warps) { return int(std::max<int64_t>(1, (warps + kWarps - 1) / kWarps)); }

}  // namespace ll

using namespace ll;

int get_unique_id(uint8_t* out) {
  static_assert(sizeof(nvshmemx_uniqueid_t) == kUniqueIdBytes, "NVSHMEM unique id size changed");
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  const int status = nvshmemx_get_uniqueid(&id);
  std::memcpy(out, &id, sizeof(id));
  return status;
}

int init(const uint8_t* unique_id, int rank, int num_ranks) {
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, unique_id, sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  const int status = nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr);
  if (status != 0) return status;
  return nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
}

void* symmetric_alloc(int64_t num_bytes) { return nvshmem_align(kLLAlign, size_t(num_bytes)); }
void symmetric_free(void* ptr) { nvshmem_free(ptr); }
void barrier_on_stream(cudaStream_t stream) { nvshmemx_barrier_all_on_stream(stream); }
void finalize() { nvshmem_finalize(); }

cudaError_t ll_dispatch_send(const LLArgs& a, const void* x, const int64_t* topk_idx, int num_tokens,
                             int num_topk, bool use_fp8, bool pow2_scales, cudaStream_t stream) {
  const int grid = grid_for_warps(std::max(num_tokens, a.num_experts));
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  if (use_fp8)
    ll_dispatch_send_kernel<true>
        <<<grid, kThreads, 0, stream>>>(a, xb, topk_idx, num_tokens, num_topk, pow2_scales);
  else
    ll_dispatch_send_kernel<false>
        <<<grid, kThreads, 0, stream>>>(a, xb, topk_idx, num_tokens, num_topk, pow2_scales);
  return cudaGetLastError();
}

cudaError_t ll_dispatch_recv(const LLArgs& a, bool use_fp8, bool ue8m0, void* recv_x, void* recv_scales,
                             int* recv_count, int* src_info, int64_t* layout_range, cudaStream_t stream) {
  const dim3 grid(a.num_ranks, a.num_local_experts);
  auto* out = static_cast<uint8_t*>(recv_x);
  if (use_fp8)
    ll_dispatch_recv_kernel<true>
        <<<grid, kThreads, 0, stream>>>(a, ue8m0, out, recv_scales, recv_count, src_info, layout_range);
  else
    ll_dispatch_recv_kernel<false>
        <<<grid, kThreads, 0, stream>>>(a, false, out, nullptr, recv_count, src_info, layout_range);
  return cudaGetLastError();
}

cudaError_t ll_combine_send(const LLArgs& a, const void* x, const int* src_info, const int64_t* layout_range,
                            bool zero_copy, cudaStream_t stream) {
  const dim3 grid(a.num_ranks, a.num_local_experts);
  ll_combine_send_kernel<<<grid, kThreads, 0, stream>>>(a, static_cast<const __nv_bfloat16*>(x), src_info,
                                                        layout_range, zero_copy);
  return cudaGetLastError();
}

cudaError_t ll_combine_recv(const LLArgs& a, const int64_t* topk_idx, const float* topk_weights,
                            int num_tokens, int num_topk, void* out, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;  // no entry: no peer sends rows here, nothing to clear
  ll_combine_recv_kernel<<<grid_for_warps(num_tokens), kThreads, 0, stream>>>(
      a, topk_idx, topk_weights, num_tokens, num_topk, static_cast<__nv_bfloat16*>(out));
  return cudaGetLastError();
}

}  // namespace dsv3::ep::nvshmem
