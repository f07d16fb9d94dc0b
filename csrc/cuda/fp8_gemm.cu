// sm_90a FP8 block-scaled GEMMs (SPEC §3): D[m, n] = sum_kb (sum_{k in kb} A[m, k] B[n, k]) sa[m, kb] sb[.,
// kb]. One persistent, warp-specialized kernel per tile shape: a producer warpgroup (registers lowered) feeds
// a ring of shared-memory stages with TMA; one or two math warpgroups run FP8 WGMMA over each 128-wide K
// block into a fresh accumulator and promote it into fp32 registers with the block's scales (two-level
// accumulation). Dense, contiguous-grouped and masked-grouped GEMMs share the kernel (runtime kind); wgrad
// (1x128 B scales, fp32 out accumulated) is a compile-time variant. Tile order, shared-memory layout:
// dsv3/sm90/fp8_gemm_plan.h.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>

#include <array>
#include <utility>

#include "dsv3/sm90/mbarrier.cuh"
#include "dsv3/sm90/tma.cuh"
#include "dsv3/sm90/wgmma.cuh"
#include "fp8_gemm_kernels.h"

namespace dsv3::cuda {
namespace {

using namespace dsv3::sm90;

constexpr int kProducerRegisters = 40;
constexpr int kMathRegisters = 232;

struct MaskedRows {  // rows of group g in masked mode, clamped so a bad masked_m cannot write out of bounds
  const int* masked_m;
  int max_rows;
  DSV3_HD int operator()(int g) const {
    const int rows = masked_m[g];
    return rows < 0 ? 0 : rows > max_rows ? max_rows : rows;
  }
};

// Where a tile's operands come from and how many of its rows are stored.
struct TileWork {
  int m0, a_group, b_group, out_group, rows;
  bool skip;  // contiguous block of -1 rows: no loads, zeros stored
};

template <int kBlockM>
__device__ __forceinline__ TileWork tile_work(const Fp8GemmParams& p, const TileCoord& t) {
  const int m0 = t.m_block * kBlockM;
  if (p.kind == GemmKind::kMasked) {
    const int rows = MaskedRows{p.masked_m, p.m}(t.group) - m0;
    return {m0, t.group, t.group, t.group, rows, false};
  }
  int group = 0;
  bool skip = false;
  if (p.kind == GemmKind::kContiguous) {
    group = __ldg(p.m_indices + m0);
    skip = group < 0 || group >= p.num_groups;
  }
  return {m0, 0, skip ? 0 : group, 0, p.m - m0, skip};
}

template <int kBlockM, int kBlockN, bool kWgrad>
__global__ void __launch_bounds__(num_threads(kBlockM), 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                    const __grid_constant__ CUtensorMap tmap_sa, const __grid_constant__ CUtensorMap tmap_sb,
                    const __grid_constant__ CUtensorMap tmap_d, const Fp8GemmParams p) {
  constexpr int kMathThreads = num_math_warpgroups(kBlockM) * kWarpgroupThreads,
                kMathWarps = kMathThreads / 32;
  constexpr int kAccum = kBlockN / 2;  // fp32 accumulator registers per thread (m64 x kBlockN per warpgroup)
  using Mma = WgmmaE4M3<kBlockN>;
  static_assert(kBlockM % 64 == 0 && kBlockN % 8 == 0 && Mma::kRegisters == kAccum, "unsupported tile shape");

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + (kSmemAlign - smem_addr(smem_raw) % kSmemAlign) % kSmemAlign;
  const SmemLayout layout = smem_layout(kBlockM, kBlockN, p.stages, kWgrad, p.num_k_blocks);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + layout.full_bar);
  uint64_t* empty = reinterpret_cast<uint64_t*>(smem + layout.empty_bar);

  // Clusters of p.cluster_size (1 or 2) CTAs, paired on tiles of one M block (fp8_gemm_plan.h,
  // choose_cluster_size): rank 0 multicasts A and its scales into both CTAs, each loads its own B. A stage is
  // free again when the math warps of every CTA of the cluster have released it: each math warp arrives once
  // on the empty barrier of every CTA.
  if (threadIdx.x == kMathThreads) {
    tma_prefetch_descriptor(&tmap_a);
    tma_prefetch_descriptor(&tmap_b);
    tma_prefetch_descriptor(&tmap_sa);
    if constexpr (kWgrad) tma_prefetch_descriptor(&tmap_sb);
    if constexpr (!kWgrad) tma_prefetch_descriptor(&tmap_d);
    for (int s = 0; s < p.stages; ++s) {
      mbar_init(full + s, 1);
      mbar_init(empty + s, p.cluster_size * kMathWarps);
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (p.cluster_size > 1) cluster_sync();  // the peer's barriers are initialized before any multicast

  TileScheduler<MaskedRows> scheduler{
      p.kind == GemmKind::kMasked, p.num_groups,    p.num_m_blocks, p.num_n_blocks, kBlockM,
      MaskedRows{p.masked_m, p.m}, int(blockIdx.x), int(gridDim.x)};
  int stage = 0;
  uint32_t phase = 0;
  const auto advance = [&] {
    if (++stage == p.stages) {
      stage = 0;
      phase ^= 1;
    }
  };
  const auto release_stage = [&] {  // this warp is done with the stage: WGMMAs waited, scales read
    __syncwarp();
    const uint32_t lane = threadIdx.x % 32;
    if (lane < uint32_t(p.cluster_size)) mbar_arrive_cluster(empty + stage, lane);
  };

  if (threadIdx.x >= kMathThreads) {  // producer warpgroup: one thread issues every TMA load
    setmaxnreg_dec<kProducerRegisters>();
    if (threadIdx.x == kMathThreads) {
      for (TileCoord tile; scheduler.next(tile);) {
        const TileWork w = tile_work<kBlockM>(p, tile);
        if (w.skip) continue;
        const int n0 = tile.n_block * kBlockN;
#pragma unroll 1  // unrolled, it no longer fits the producer's 40 registers (wgrad)
        for (int kb = 0; kb < p.num_k_blocks; ++kb, advance()) {
          mbar_wait(empty + stage, phase ^ 1);  // a fresh barrier passes parity 1 at once
          uint64_t* bar = full + stage;
          // Each CTA expects the whole stage: its B, and A with A's scales from rank 0's (multicast) loads.
          mbar_arrive_expect_tx(bar, stage_tx_bytes(kBlockM, kBlockN, kWgrad));
          uint8_t* a_dst = smem + layout.a + stage * kBlockM * kBlockK;
          uint8_t* sa_dst = smem + layout.sa + stage * kBlockM * 4;
          if (!kWgrad && p.cluster_size > 1) {  // wgrad runs without clusters
            if (cluster_ctarank() == 0) {
              tma_load_3d_multicast(a_dst, &tmap_a, bar, 0b11, kb * kBlockK, w.m0, w.a_group);
              tma_load_3d_multicast(sa_dst, &tmap_sa, bar, 0b11, w.m0, kb, w.a_group);
            }
          } else {
            tma_load_3d(a_dst, &tmap_a, bar, kb * kBlockK, w.m0, w.a_group);
            tma_load_3d(sa_dst, &tmap_sa, bar, w.m0, kb, w.a_group);
          }
          tma_load_3d(smem + layout.b + stage * kBlockN * kBlockK, &tmap_b, bar, kb * kBlockK, n0, w.b_group);
          if constexpr (kWgrad) tma_load_3d(smem + layout.sb + stage * kBlockN * 4, &tmap_sb, bar, n0, kb, 0);
        }
      }
    }
    __syncwarp();
    if (p.cluster_size > 1) cluster_sync();  // as at the end of the math warpgroups
    return;
  }

  // math warpgroups
  setmaxnreg_inc<kMathRegisters>();
  const int warpgroup = threadIdx.x / kWarpgroupThreads, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  const int row0 = warpgroup * 64 + warp * 16 + lane / 4;  // this thread's tile rows: row0 and row0 + 8
  const int col0 = lane % 4 * 2;                           // and columns 8j + col0 + {0, 1}
  float* sb_blocks = reinterpret_cast<float*>(smem + layout.sb_blocks);
  float accum[kAccum], final_accum[kAccum];

  for (TileCoord tile; scheduler.next(tile);) {
    const TileWork w = tile_work<kBlockM>(p, tile);
    const int n0 = tile.n_block * kBlockN;
    // Columns [0, 8 num_former_chunks) use B-scale block n0 / 128, the rest the next one: tiles straddle two
    // blocks when kBlockN does not divide 128 (or exceeds it).
    const int num_former_chunks = min(kBlockN, kBlockK - n0 % kBlockK) / 8;
    if constexpr (!kWgrad) {
      if (!w.skip) {  // this tile's two rows of 128x128 B scales, for every K block
        const int block0 = n0 / kBlockK, block1 = min(block0 + 1, (p.n - 1) / kBlockK);
        const float* sb = p.sb + w.b_group * p.sb_group_stride;
        for (int i = threadIdx.x; i < 2 * p.num_k_blocks; i += kMathThreads) {
          const bool second = i >= p.num_k_blocks;
          const int kb = second ? i - p.num_k_blocks : i;
          sb_blocks[i] = __ldg(sb + (second ? block1 : block0) * p.sb_row_stride + kb * p.sb_col_stride);
        }
      }
      named_barrier_sync(1, kMathThreads);  // also: the previous tile's staged output has been stored
    }
#pragma unroll
    for (int i = 0; i < kAccum; ++i) final_accum[i] = 0.f;

    for (int kb = 0; !w.skip && kb < p.num_k_blocks; ++kb, advance()) {
      mbar_wait(full + stage, phase);
      const float* sa = reinterpret_cast<const float*>(smem + layout.sa + stage * kBlockM * 4);
      const float sa0 = sa[row0], sa1 = sa[row0 + 8];
      const uint64_t desc_a =
          smem_desc_k_major_sw128(smem + layout.a + stage * kBlockM * kBlockK + warpgroup * 64 * kBlockK);
      const uint64_t desc_b = smem_desc_k_major_sw128(smem + layout.b + stage * kBlockN * kBlockK);
      fence_registers<kAccum>(accum);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < kBlockK / 32; ++k) Mma::mma(accum, desc_a + 2 * k, desc_b + 2 * k, k > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers<kAccum>(accum);
      // Promotion: final += accum * sa[row] * sb (fp32 on the CUDA cores, once per 128 K).
      if constexpr (kWgrad) {
        const float* sb = reinterpret_cast<const float*>(smem + layout.sb + stage * kBlockN * 4);
#pragma unroll
        for (int j = 0; j < kAccum / 4; ++j) {
          const float2 sb2 = *reinterpret_cast<const float2*>(sb + j * 8 + col0);
          final_accum[4 * j + 0] += sa0 * sb2.x * accum[4 * j + 0];
          final_accum[4 * j + 1] += sa0 * sb2.y * accum[4 * j + 1];
          final_accum[4 * j + 2] += sa1 * sb2.x * accum[4 * j + 2];
          final_accum[4 * j + 3] += sa1 * sb2.y * accum[4 * j + 3];
        }
        release_stage();
      } else {
        release_stage();  // the producer(s) may refill the stage
        const float sb_former = sb_blocks[kb], sb_latter = sb_blocks[p.num_k_blocks + kb];
        const float s0f = sa0 * sb_former, s0l = sa0 * sb_latter, s1f = sa1 * sb_former,
                    s1l = sa1 * sb_latter;
#pragma unroll
        for (int j = 0; j < kAccum / 4; ++j) {
          const bool former = j < num_former_chunks;  // a predicate, not a branch
          const float s0 = former ? s0f : s0l, s1 = former ? s1f : s1l;
          final_accum[4 * j + 0] += s0 * accum[4 * j + 0];
          final_accum[4 * j + 1] += s0 * accum[4 * j + 1];
          final_accum[4 * j + 2] += s1 * accum[4 * j + 2];
          final_accum[4 * j + 3] += s1 * accum[4 * j + 3];
        }
      }
    }

    // Epilogue: rows >= w.rows and columns >= n are not stored (M/N tails, masked rows).
    const int64_t out_offset = w.out_group * p.out_group_stride + int64_t(w.m0) * p.out_row_stride + n0;
    if (p.out_fp32) {  // straight from registers: each quad stores 32 contiguous bytes of a row
      float* out = static_cast<float*>(p.out) + out_offset;
#pragma unroll
      for (int j = 0; j < kAccum / 4; ++j) {
        const int col = j * 8 + col0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row0 + 8 * h;
          if (row >= w.rows || n0 + col >= p.n) continue;
          float2* dst = reinterpret_cast<float2*>(out + row * p.out_row_stride + col);
          float2 v = make_float2(final_accum[4 * j + 2 * h], final_accum[4 * j + 2 * h + 1]);
          if (p.accumulate) {
            const float2 old = *dst;
            v.x += old.x;
            v.y += old.y;
          }
          *dst = v;
        }
      }
    } else if constexpr (!kWgrad) {
      // bf16: staged in shared memory, then written by one TMA store (clipped at the tensor's edges) or, for
      // a partial masked tile whose rows past masked_m lie inside the tensor, by predicated 16-byte row
      // stores.
      constexpr int kPitch = staging_pitch_bytes(kBlockN);
      uint8_t* staging = smem + layout.staging;
      if (threadIdx.x == 0) tma_store_wait_read<0>();  // the previous tile's TMA store has read the staging
      named_barrier_sync(3, kMathThreads);
#pragma unroll
      for (int j = 0; j < kAccum / 4; ++j) {
        const int col = j * 8 + col0;
        *reinterpret_cast<__nv_bfloat162*>(staging + row0 * kPitch + col * 2) =
            __floats2bfloat162_rn(final_accum[4 * j + 0], final_accum[4 * j + 1]);
        *reinterpret_cast<__nv_bfloat162*>(staging + (row0 + 8) * kPitch + col * 2) =
            __floats2bfloat162_rn(final_accum[4 * j + 2], final_accum[4 * j + 3]);
      }
      const bool tma_store = tile_uses_tma_store(p.kind, w.rows, kBlockM);  // uniform over the CTA
      if (tma_store) fence_proxy_async_shared();  // the staged tile, visible to the TMA unit
      named_barrier_sync(2, kMathThreads);
      if (tma_store) {
        if (threadIdx.x == 0) {
          tma_store_3d(&tmap_d, staging, n0, w.m0, w.out_group);
          tma_store_commit();
        }
      } else {
        constexpr int kVectorsPerRow = kBlockN / 8;
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + out_offset;
        for (int i = threadIdx.x; i < kBlockM * kVectorsPerRow; i += kMathThreads) {
          const int row = i / kVectorsPerRow, vec = i % kVectorsPerRow;
          if (row < w.rows && n0 + vec * 8 < p.n)
            *reinterpret_cast<uint4*>(out + row * p.out_row_stride + vec * 8) =
                *reinterpret_cast<const uint4*>(staging + row * kPitch + vec * 16);
        }
      }
    }
  }
  if constexpr (!kWgrad)
    if (threadIdx.x == 0) tma_store_wait_read<0>();  // the shared memory outlives the last store's reads
  // No CTA of a cluster exits while its peer may still arrive on its empty barriers.
  if (p.cluster_size > 1) cluster_sync();
}

using KernelFn = void (*)(CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, Fp8GemmParams);

template <size_t... I>
constexpr std::array<KernelFn, sizeof...(I)> dense_kernels(std::index_sequence<I...>) {
  return {&fp8_gemm_kernel<kTileShapes[I].block_m, kTileShapes[I].block_n, false>...};
}
template <size_t... I>
constexpr std::array<KernelFn, sizeof...(I)> wgrad_kernels(std::index_sequence<I...>) {
  return {&fp8_gemm_kernel<kWgradTileShapes[I].block_m, kWgradTileShapes[I].block_n, true>...};
}

KernelFn find_kernel(bool wgrad, int block_m, int block_n) {
  static constexpr auto dense = dense_kernels(std::make_index_sequence<kNumTileShapes>());
  static constexpr auto wgrads = wgrad_kernels(std::make_index_sequence<kNumWgradTileShapes>());
  const TileShape* shapes = wgrad ? kWgradTileShapes : kTileShapes;
  const int count = wgrad ? kNumWgradTileShapes : kNumTileShapes;
  for (int i = 0; i < count; ++i)
    if (shapes[i].block_m == block_m && shapes[i].block_n == block_n) return wgrad ? wgrads[i] : dense[i];
  return nullptr;
}

// cuTensorMapEncodeTiled from the driver, found at run time (the extension does not link libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

bool encode(CUtensorMap* map, const TmaParams& t, const void* base) {
  const cuuint64_t dims[3] = {t.dims[0], t.dims[1], t.dims[2]};
  const cuuint64_t strides[2] = {t.strides_bytes[0], t.strides_bytes[1]};
  const cuuint32_t box[3] = {t.box[0], t.box[1], t.box[2]}, elem_strides[3] = {1, 1, 1};
  return encode_tiled()(
             map,
             t.elem_bytes == 1   ? CU_TENSOR_MAP_DATA_TYPE_UINT8
             : t.elem_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                 : CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
             3, const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             t.swizzle_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

cudaError_t launch_fp8_gemm(const Fp8GemmLaunch& l, cudaStream_t stream) {
  const bool wgrad = l.params.kind == GemmKind::kWgrad;
  const KernelFn kernel = find_kernel(wgrad, l.block_m, l.block_n);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  if (l.grid <= 0) return cudaSuccess;
  if (l.params.cluster_size != 1 && (l.params.cluster_size != 2 || l.grid % 2 != 0 || wgrad))
    return cudaErrorInvalidValue;
  if (encode_tiled() == nullptr) return cudaErrorNotSupported;
  // Kernels that do not read a map get a valid one in its place: wgrad's B scales (others: A's), the bf16
  // output (wgrad and fp32 outputs: A).
  const bool tma_store = !wgrad && !l.params.out_fp32;
  CUtensorMap map_a, map_b, map_sa, map_sb, map_d;
  if (!encode(&map_a, l.tma_a, l.a) || !encode(&map_b, l.tma_b, l.b) || !encode(&map_sa, l.tma_sa, l.sa) ||
      !encode(&map_sb, wgrad ? l.tma_sb_rows : l.tma_sa, wgrad ? l.sb_rows : l.sa) ||
      !encode(&map_d, tma_store ? l.tma_d : l.tma_a, tma_store ? l.params.out : l.a))
    return cudaErrorInvalidValue;
  if (const cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, l.smem_bytes);
      err != cudaSuccess)
    return err;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = unsigned(l.params.cluster_size);
  cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(l.grid));
  config.blockDim = dim3(unsigned(num_threads(l.block_m)));
  config.dynamicSmemBytes = size_t(l.smem_bytes);
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, map_a, map_b, map_sa, map_sb, map_d, l.params);
}

}  // namespace dsv3::cuda
