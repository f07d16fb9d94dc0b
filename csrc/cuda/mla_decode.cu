// sm_90a MLA decode attention (SPEC §4, FlashMLA semantics) over a paged latent cache, d_qk = 576, d_v = 512.
// One CTA (two warpgroups) owns a tile of 64 packed query rows of one KV head and walks the KV blocks of its
// part of the split-KV schedule (dsv3/mla_sched.h). Per 64-token page: S = Q.K^T on bf16/fp16 WGMMA (each
// warpgroup 32 of the 64 keys), an online softmax in the exp2 domain whose row maxima the warpgroups share
// through shared memory, P to shared memory, then O += P.V with V the transposed view of the same K page
// (each warpgroup 256 of the 512 output columns). Pages are loaded with cp.async, double-buffered against
// the MMAs; the FP8 cache is staged raw and dequantized to bf16 in shared memory. A combine kernel merges
// the partials of requests split across parts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "dsv3/mla_sched.h"
#include "dsv3/sm90/mbarrier.cuh"
#include "dsv3/sm90/tma.cuh"
#include "dsv3/sm90/wgmma.cuh"
#include "dsv3/sm90/wgmma_16bit.cuh"
#include "mla_decode_kernels.h"

namespace dsv3::cuda {
namespace {

using namespace dsv3::sm90;

constexpr int kThreads = 256;                             // two warpgroups
constexpr int kTileRows = mla::kRowsPerTile;              // packed query rows per CTA (WGMMA M)
constexpr int kPage = mla::kPageSize;                     // keys per page = per iteration
constexpr int kChunksPerRow = kMlaHeadDimQK * 2 / 16;     // 72 16-byte chunks per 576-element row
constexpr int kColTiles = kMlaHeadDimQK / 64;             // 9 column tiles of 64 elements (128-byte rows)
constexpr int kColTileBytes = kPage * 128;                // 8192: 64 rows x 128 bytes, 128B swizzle
constexpr int kOperandBytes = kColTiles * kColTileBytes;  // 73728: a 64 x 576 16-bit tile

// Shared memory: Q, two K pages (the FP8 kernel uses the first as its bf16 page and the second to stage the
// raw FP8 page), P, and the per-warpgroup row maxima / row sums exchanged between the warpgroups. Every
// operand tile starts on a 1024-byte boundary (the 128B swizzle pattern repeats every 8 rows of 128 bytes).
constexpr int kSmemQ = 0;
constexpr int kSmemK0 = kSmemQ + kOperandBytes;
constexpr int kSmemK1 = kSmemK0 + kOperandBytes;
constexpr int kSmemP = kSmemK1 + kOperandBytes;
constexpr int kSmemRowMax = kSmemP + kTileRows * kPage * 2;
constexpr int kSmemRowSum = kSmemRowMax + 2 * kTileRows * 4;
constexpr int kSmemBytes = kSmemRowSum + 2 * kTileRows * 4;  // 230400
static_assert(kSmemBytes <= 232448, "the decode kernel must fit in 227 KiB of shared memory");
static_assert(kPage * kMlaFp8TokenBytes <= kOperandBytes, "a raw FP8 page must fit in the second K buffer");
static_assert(kSmemP % 1024 == 0 && kSmemK1 % 1024 == 0, "operand tiles need 1024-byte alignment");

// Byte offset of 16-byte chunk `chunk` (of 72) of row `row` in a 64 x 576 16-bit tile stored as 9 column
// tiles of 64 x 64, each 128-byte row swizzled: chunk c of row r sits at chunk position c ^ (r % 8). This is
// the layout TMA's 128B swizzle writes and the WGMMA descriptors (layout type 1) read.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return (chunk >> 3) * kColTileBytes + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing (tokens past the length).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Q rows [m0, m0 + 64) of request `req`, KV head `hk`: packed row r is token r / g, head hk * g + r % g.
// Rows past q_rows are zero-filled.
template <typename T>
__device__ __forceinline__ void load_q(const MlaDecodeParams& p, uint8_t* sq, int req, int hk, int m0) {
  const int g = p.h_q / p.h_kv;
  const T* q = static_cast<const T*>(p.q);
  for (int idx = threadIdx.x; idx < kTileRows * kChunksPerRow; idx += kThreads) {
    const int row = idx / kChunksPerRow, chunk = idx % kChunksPerRow, r = m0 + row;
    const bool valid = r < p.q_rows;
    const T* src = q;
    if (valid) {
      const int s = r / g, h = hk * g + r % g;
      src = q + req * p.q_batch_stride + s * p.q_token_stride + h * p.q_head_stride + chunk * 8;
    }
    cp_async_16(sq + swizzled_offset(row, chunk), src, valid);
  }
}

// Number of tokens of block `blk` that may be read and the address of its first token for head hk, or 0
// tokens when the page index is outside the cache (a corrupt block table under CUDA-graph capture, where the
// host cannot check it: the page then reads as zeros instead of faulting).
template <typename E>
__device__ __forceinline__ int page_source(const MlaDecodeParams& p, int req, int hk, int blk, int seqlen,
                                           const E** base) {
  const int page = __ldg(p.block_table + req * p.block_table_stride + blk);
  *base = static_cast<const E*>(p.kv);
  if (page < 0 || page >= p.num_blocks) return 0;
  *base += page * p.kv_block_stride + hk * p.kv_head_stride;
  return min(kPage, seqlen - blk * kPage);
}

// A 16-bit K page into the swizzled tile; tokens past the sequence are zero-filled, never read.
template <typename T>
__device__ __forceinline__ void load_page(const MlaDecodeParams& p, uint8_t* sk, int req, int hk, int blk,
                                          int seqlen) {
  const T* base;
  const int tokens = page_source<T>(p, req, hk, blk, seqlen, &base);
  for (int idx = threadIdx.x; idx < kPage * kChunksPerRow; idx += kThreads) {
    const int t = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
    const bool valid = t < tokens;
    cp_async_16(sk + swizzled_offset(t, chunk), valid ? base + t * p.kv_token_stride + chunk * 8 : base,
                valid);
  }
}

// A packed FP8 page, raw (656 bytes per token, token-major) into the staging buffer; zero-filled past the
// sequence, so those tokens dequantize to 0 x 0 = 0.
__device__ __forceinline__ void load_page_fp8_raw(const MlaDecodeParams& p, uint8_t* raw, int req, int hk,
                                                  int blk, int seqlen) {
  constexpr int kChunks = kMlaFp8TokenBytes / 16;  // 41
  const uint8_t* base;
  const int tokens = page_source<uint8_t>(p, req, hk, blk, seqlen, &base);
  for (int idx = threadIdx.x; idx < kPage * kChunks; idx += kThreads) {
    const int t = idx / kChunks, chunk = idx % kChunks;
    const bool valid = t < tokens;
    cp_async_16(raw + t * kMlaFp8TokenBytes + chunk * 16,
                valid ? base + t * p.kv_token_stride + chunk * 16 : base, valid);
  }
}

// Raw FP8 page -> bf16 swizzled tile: value = e4m3 * scale of its 128-group (e4m3 -> f16 is exact, then fp32,
// then one rounding to bf16); the 64 rope values are bf16 already and copied.
__device__ __forceinline__ void dequantize_page(const uint8_t* raw, uint8_t* sk) {
  for (int idx = threadIdx.x; idx < kPage * kChunksPerRow; idx += kThreads) {
    const int t = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
    const uint8_t* token = raw + t * kMlaFp8TokenBytes;
    uint4 out;
    if (chunk < kMlaHeadDimV / 8) {
      const uint2 codes = *reinterpret_cast<const uint2*>(token + chunk * 8);
      const float scale = reinterpret_cast<const float*>(token + kMlaHeadDimV)[chunk >> 4];
      const uint32_t words[2] = {codes.x, codes.y};
      uint32_t packed[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[i >> 1] >> (16 * (i & 1)));
        const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
        packed[i] = pack2<__nv_bfloat16>(f.x * scale, f.y * scale);
      }
      out = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    } else {
      out = *reinterpret_cast<const uint4*>(token + kMlaHeadDimV + 16 + (chunk - kMlaHeadDimV / 8) * 16);
    }
    *reinterpret_cast<uint4*>(sk + swizzled_offset(t, chunk)) = out;
  }
}

// Grid (ceil(q_rows / 64), h_kv, num_parts). Thread roles: warpgroup wg computes S for keys [32 wg, 32 wg +
// 32) of each page and O for output columns [256 wg, 256 wg + 256); each thread holds 2 query rows (row0 =
// warp * 16 + lane / 4 and row0 + 8 of the tile) in both accumulators.
template <typename T, bool kFp8Kv>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const __grid_constant__ MlaDecodeParams p) {
  constexpr bool kF16 = std::is_same_v<T, __half>;
  extern __shared__ __align__(1024) uint8_t smem[];
  uint8_t* const sq = smem + kSmemQ;
  uint8_t* const sp = smem + kSmemP;
  float* const row_max_x = reinterpret_cast<float*>(smem + kSmemRowMax);  // [2][64]
  float* const row_sum_x = reinterpret_cast<float*>(smem + kSmemRowSum);  // [2][64]

  const int m0 = blockIdx.x * kTileRows, hk = blockIdx.y;
  const int wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int row0 = warp * 16 + lane / 4, quad_col = 2 * (lane % 4);
  const int g = p.h_q / p.h_kv;

  const mla::PartMeta pm = mla::load_part(p.metadata, blockIdx.z);
  const int end_req = min(pm.end_req, p.batch - 1);
  for (int req = max(pm.begin_req, 0); req <= end_req; ++req) {
    const int seqlen = max(__ldg(p.cache_seqlens + req), 0);
    const int blocks = mla::num_blocks_of(seqlen);
    int first, last;
    mla::part_block_range(pm, req, blocks, &first, &last);
    first = max(first, 0);
    last = min(last, blocks);
    const int split = req == pm.begin_req ? pm.begin_split : 0;
    const int split_begin = __ldg(p.num_splits + req);
    const bool single = __ldg(p.num_splits + req + 1) - split_begin == 1;

    // Keys a row may see: all `seqlen`, or with causal masking token s sees 0 .. seqlen - s_q + s.
    int limit[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m0 + row0 + 8 * h;
      limit[h] = p.causal ? seqlen - p.s_q + min(r, p.q_rows - 1) / g + 1 : seqlen;
    }

    __syncthreads();  // the previous request is done with Q, the pages and the exchange buffers
    if (first < last) {
      load_q<T>(p, sq, req, hk, m0);
      if constexpr (kFp8Kv) {
        load_page_fp8_raw(p, smem + kSmemK1, req, hk, first, seqlen);
      } else {
        load_page<T>(p, smem + kSmemK0, req, hk, first, seqlen);
      }
      cp_async_commit();
    }

    float o[128], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;

    for (int blk = first; blk < last; ++blk) {
      // Page blk has landed for every thread, and every thread has finished the previous page's MMAs (so
      // the other buffer, P and the exchange buffers may be overwritten). cp.async writes are generic-proxy
      // writes: the proxy fence makes them visible to WGMMA's async-proxy reads.
      cp_async_wait_all();
      fence_proxy_async_shared();
      __syncthreads();
      uint8_t* sk;
      if constexpr (kFp8Kv) {
        sk = smem + kSmemK0;
        dequantize_page(smem + kSmemK1, sk);
        fence_proxy_async_shared();
        __syncthreads();  // the bf16 page is complete and the staging buffer is free
        if (blk + 1 < last) load_page_fp8_raw(p, smem + kSmemK1, req, hk, blk + 1, seqlen);
      } else {
        sk = smem + ((blk - first) % 2 == 0 ? kSmemK0 : kSmemK1);
        uint8_t* const next = smem + ((blk - first) % 2 == 0 ? kSmemK1 : kSmemK0);
        if (blk + 1 < last) load_page<T>(p, next, req, hk, blk + 1, seqlen);
      }
      cp_async_commit();

      // S[64 x 32] = Q . K[32 wg .. 32 wg + 32)^T over the 576 columns: 9 column tiles x 4 k-steps of 16.
      float s[16];
      wgmma_fence();
#pragma unroll
      for (int kt = 0; kt < kColTiles; ++kt) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const uint64_t desc_q = smem_desc_k_major_sw128(sq + kt * kColTileBytes + kk * 32);
          const uint64_t desc_k = smem_desc_k_major_sw128(sk + kt * kColTileBytes + wg * 32 * 128 + kk * 32);
          Wgmma16<32>::mma<kF16, false>(s, desc_q, desc_k, kt + kk > 0);
        }
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers<16>(s);

      // Scale into the exp2 domain and mask keys a row may not see (past the length, or causal): -inf, so
      // they contribute exp2(-inf) = 0 and never multiply a value (tail rows of the page are zeros).
      const int key0 = blk * kPage + wg * 32 + quad_col;
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e / 2, key = key0 + 8 * j + (e % 2);
          float& v = s[4 * j + e];
          v = key < limit[h] ? v * p.scale_log2 : -INFINITY;
          tile_max[h] = fmaxf(tile_max[h], v);
        }
      }
      // Row maxima over all 64 keys: this warpgroup's 32 (quad shuffle), then the other's via shared memory.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = quad_max(tile_max[h]);
        if (lane % 4 == 0) row_max_x[wg * kTileRows + row0 + 8 * h] = tile_max[h];
      }
      __syncthreads();
      float alpha[2], m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float other = row_max_x[(1 - wg) * kTileRows + row0 + 8 * h];
        const float m_new = fmaxf(m[h], fmaxf(tile_max[h], other));
        // A row that has seen no key yet keeps m = -inf: exponentiate against 0 so that no -inf - -inf NaN
        // appears (its p are all 0 and its O and l are still 0).
        m_use[h] = m_new == -INFINITY ? 0.f : m_new;
        alpha[h] = exp2f(m[h] - m_use[h]);
        m[h] = m_new;
        l[h] *= alpha[h];
      }
      uint32_t* const p_rows[2] = {reinterpret_cast<uint32_t*>(sp + row0 * 128),
                                   reinterpret_cast<uint32_t*>(sp + (row0 + 8) * 128)};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float p0 = exp2f(s[4 * j + 2 * h] - m_use[h]), p1 = exp2f(s[4 * j + 2 * h + 1] - m_use[h]);
          l[h] += p0 + p1;
          // P [64 x 64] K-major, 128-byte rows, 128B swizzle: key c of row r at chunk (c / 8) ^ (r % 8).
          const int r = row0 + 8 * h, col = wg * 32 + 8 * j + quad_col;
          p_rows[h][((((col >> 3) ^ (r & 7)) << 4) + (col & 7) * 2) / 4] = pack2<T>(p0, p1);
        }
      }
#pragma unroll
      for (int j = 0; j < 32; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[4 * j + e] *= alpha[e / 2];
      }
      fence_proxy_async_shared();
      __syncthreads();  // P of both warpgroups is in shared memory

      // O[64 x 256 wg .. +256] += P[64 x 64] . V[64 x 256]: V is the K page read MN-major (tokens are K,
      // latent columns are N): atoms of 8 tokens x 64 columns, 64-column tiles 8192 bytes apart.
      fence_registers<128>(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t desc_p = smem_desc_k_major_sw128(sp + kk * 32);
        const uint64_t desc_v =
            smem_desc_mn_major_sw128(sk + 4 * wg * kColTileBytes + kk * 16 * 128, kColTileBytes);
        Wgmma16<256>::mma<kF16, true>(o, desc_p, desc_v, true);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers<128>(o);
    }
    cp_async_wait_all();  // nothing may still write into Q or a page when the next request reloads them

    // Row sums over both warpgroups' keys, then O / l. A row that saw no key has l = 0: out 0, lse +inf (its
    // partial: lse -inf, O 0, so the combine gives it no weight).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] = quad_sum(l[h]);
      if (lane % 4 == 0) row_sum_x[wg * kTileRows + row0 + 8 * h] = l[h];
    }
    __syncthreads();
    float inv[2], lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sum = row_sum_x[row0 + 8 * h] + row_sum_x[kTileRows + row0 + 8 * h];
      inv[h] = sum == 0.f ? 0.f : 1.f / sum;
      lse[h] = sum == 0.f ? (single ? INFINITY : -INFINITY) : (m[h] + log2f(sum)) * 0.69314718055994531f;
    }
    const int slot = split_begin + split;
    if (!single && slot >= p.batch + p.num_parts) continue;  // an inconsistent schedule (see page_source)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m0 + row0 + 8 * h;
      if (r >= p.q_rows) continue;
      const int s_tok = r / g, head = hk * g + r % g;
      if (single) {
        uint32_t* dst = reinterpret_cast<uint32_t*>(
            static_cast<T*>(p.out) + ((int64_t(req) * p.s_q + s_tok) * p.h_q + head) * kMlaHeadDimV +
            wg * 256 + quad_col);
#pragma unroll
        for (int j = 0; j < 32; ++j)
          dst[4 * j] = pack2<T>(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
        if (wg == 0 && lane % 4 == 0) p.lse[(int64_t(req) * p.h_q + head) * p.s_q + s_tok] = lse[h];
      } else {
        const int64_t acc_row = (int64_t(slot) * p.h_kv + hk) * p.q_rows + r;
        float2* dst = reinterpret_cast<float2*>(p.out_accum + acc_row * kMlaHeadDimV + wg * 256 + quad_col);
#pragma unroll
        for (int j = 0; j < 32; ++j)
          dst[4 * j] = make_float2(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
        if (wg == 0 && lane % 4 == 0) p.lse_accum[acc_row] = lse[h];
      }
    }
  }
}

// Merges the split partials of one (request, KV head, packed row): weights exp(lse_i - max lse), out =
// sum_i w_i O_i / sum_i w_i, lse = max + log(sum_i w_i); every partial empty -> out 0, lse +inf. Requests
// with one split were written by the decode kernel. Grid (q_rows, h_kv, batch), 128 threads x 4 columns.
template <typename T>
__global__ void __launch_bounds__(128) mla_combine_kernel(const __grid_constant__ MlaDecodeParams p) {
  const int r = blockIdx.x, hk = blockIdx.y, req = blockIdx.z;
  const int begin = __ldg(p.num_splits + req), count = __ldg(p.num_splits + req + 1) - begin;
  if (count <= 1 || begin + count > p.batch + p.num_parts) return;
  const int g = p.h_q / p.h_kv, s_tok = r / g, head = hk * g + r % g;
  const auto acc_row = [&](int i) { return (int64_t(begin + i) * p.h_kv + hk) * p.q_rows + r; };

  float lse_max = -INFINITY;  // NaN if any partial is NaN (fmaxf alone would drop it): the row stays NaN
  for (int i = 0; i < count; ++i) {
    const float li = p.lse_accum[acc_row(i)];
    lse_max = (li > lse_max || li != li) ? li : lse_max;
  }
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float weight_sum = 0.f;
  if (lse_max != -INFINITY) {
    for (int i = 0; i < count; ++i) {
      const float w = expf(p.lse_accum[acc_row(i)] - lse_max);
      weight_sum += w;
      const float4 v = reinterpret_cast<const float4*>(p.out_accum + acc_row(i) * kMlaHeadDimV)[threadIdx.x];
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
    const float inv = 1.f / weight_sum;
    acc = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
  }
  T* out = static_cast<T*>(p.out) + ((int64_t(req) * p.s_q + s_tok) * p.h_q + head) * kMlaHeadDimV;
  reinterpret_cast<uint2*>(out)[threadIdx.x] = make_uint2(pack2<T>(acc.x, acc.y), pack2<T>(acc.z, acc.w));
  if (threadIdx.x == 0) {
    p.lse[(int64_t(req) * p.h_q + head) * p.s_q + s_tok] =
        lse_max == -INFINITY ? INFINITY : lse_max + logf(weight_sum);
  }
}

__global__ void __launch_bounds__(32)
    mla_metadata_kernel(const int32_t* cache_seqlens, int batch, int num_parts, int32_t* metadata,
                        int32_t* num_splits) {
  // The schedule is a sequential greedy pass (dsv3/mla_sched.h), cheap next to the decode it plans; one
  // thread runs it so the CPU and GPU schedules are the same code.
  if (threadIdx.x == 0) mla::build_schedule(cache_seqlens, batch, num_parts, metadata, num_splits);
}

template <typename T, bool kFp8Kv>
cudaError_t launch_typed(const MlaDecodeParams& p, cudaStream_t stream) {
  const auto kernel = mla_decode_kernel<T, kFp8Kv>;
  if (const cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
      err != cudaSuccess)
    return err;
  const dim3 grid(unsigned((p.q_rows + kTileRows - 1) / kTileRows), unsigned(p.h_kv), unsigned(p.num_parts));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  mla_combine_kernel<T><<<dim3(unsigned(p.q_rows), unsigned(p.h_kv), unsigned(p.batch)), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

cudaError_t launch_mla_metadata(const int32_t* cache_seqlens, int batch, int num_parts, int32_t* metadata,
                                int32_t* num_splits, cudaStream_t stream) {
  if (batch < 0 || num_parts <= 0) return cudaErrorInvalidValue;
  mla_metadata_kernel<<<1, 32, 0, stream>>>(cache_seqlens, batch, num_parts, metadata, num_splits);
  return cudaGetLastError();
}

cudaError_t launch_mla_decode(const MlaDecodeParams& p, MlaKvFormat format, cudaStream_t stream) {
  if (p.batch == 0 || p.q_rows == 0) return cudaSuccess;
  const int64_t elem = format == MlaKvFormat::kFp8 ? 1 : 2;
  const bool ok = p.batch > 0 && p.h_kv > 0 && p.h_kv <= 65535 && p.num_parts > 0 && p.num_parts <= 65535 &&
                  p.batch <= 65535 && p.q_rows > 0 && p.h_q % p.h_kv == 0 && aligned16(p.q) &&
                  aligned16(p.kv) && (p.q_batch_stride * 2) % 16 == 0 && (p.q_token_stride * 2) % 16 == 0 &&
                  (p.q_head_stride * 2) % 16 == 0 && (p.kv_block_stride * elem) % 16 == 0 &&
                  (p.kv_token_stride * elem) % 16 == 0 && (p.kv_head_stride * elem) % 16 == 0;
  if (!ok) return cudaErrorInvalidValue;
  switch (format) {
    case MlaKvFormat::kBF16:
      return launch_typed<__nv_bfloat16, false>(p, stream);
    case MlaKvFormat::kF16:
      return launch_typed<__half, false>(p, stream);
    case MlaKvFormat::kFp8:
      return launch_typed<__nv_bfloat16, true>(p, stream);
  }
  return cudaErrorInvalidValue;
}

int mla_decode_smem_bytes() { return kSmemBytes; }

}  // namespace dsv3::cuda
