// sm_90a warpgroup wrappers: FP8 (e4m3 x e4m3 -> fp32) WGMMA m64nNk32 for the N of the compiled tile shapes,
// shared-memory matrix descriptors (K-major, 128B swizzle), the wgmma fence/commit/wait trio, setmaxnreg.
#pragma once
#include <cstdint>

#include "dsv3/sm90/mbarrier.cuh"

namespace dsv3::sm90 {

// Descriptor of a K-major tile of 128-byte rows written by TMA with 128B swizzle: 8-row core groups 1024
// bytes apart (stride byte offset), leading byte offset unused, layout type 1 (128B swizzle). Advancing K by
// 32 e4m3 inside the swizzle atom adds 32 bytes to the start address (+2 in its 16-byte units).
__device__ __forceinline__ uint64_t smem_desc_k_major_sw128(const void* tile) {
  const uint64_t start = (smem_addr(tile) & 0x3FFFF) >> 4;
  return start | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accumulator reads/writes across the asynchronous wgmma boundaries.
template <int kCount>
__device__ __forceinline__ void fence_registers(float* r) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegisters));
}

// d[N/2] (+)= A[64 x 32] . B[N x 32]^T for one warpgroup; accumulate = false overwrites d (scale-d = 0).
// Accumulator layout: d[4j + {0,1}] is row warp*16 + lane/4, columns 8j + 2 (lane % 4) + {0, 1}; d[4j +
// {2,3}] is the same columns 8 rows below.
template <int N>
struct WgmmaE4M3;

// Operand lists for the inline asm: the register list "%0, ..., %7" of chunk c and eight "+f" accumulators.
#define DSV3_R8_0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define DSV3_R8_1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define DSV3_R8_2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define DSV3_R8_3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define DSV3_R8_4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define DSV3_R8_5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define DSV3_R8_6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define DSV3_R8_7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define DSV3_R8_8 "%64, %65, %66, %67, %68, %69, %70, %71"
#define DSV3_R8_9 "%72, %73, %74, %75, %76, %77, %78, %79"
#define DSV3_F8(i)                                                                            \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])

#define DSV3_WGMMA_E4M3(N, REGS, DESC_A, DESC_B, SCALE_D, ...)                                              \
  template <>                                                                                               \
  struct WgmmaE4M3<N> {                                                                                     \
    static constexpr int kRegisters = N / 2;                                                                \
    __device__ __forceinline__ static void mma(float* d, uint64_t desc_a, uint64_t desc_b,                  \
                                               bool accumulate) {                                           \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N \
                   "k32.f32.e4m3.e4m3 {" REGS "}, " DESC_A ", " DESC_B ", p, 1, 1;\n}"                      \
                   : __VA_ARGS__                                                                            \
                   : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));                                       \
    }                                                                                                       \
  };

DSV3_WGMMA_E4M3(16, DSV3_R8_0, "%8", "%9", "%10", DSV3_F8(0))
DSV3_WGMMA_E4M3(32, DSV3_R8_0 ", " DSV3_R8_1, "%16", "%17", "%18", DSV3_F8(0), DSV3_F8(8))
DSV3_WGMMA_E4M3(64, DSV3_R8_0 ", " DSV3_R8_1 ", " DSV3_R8_2 ", " DSV3_R8_3, "%32", "%33", "%34", DSV3_F8(0),
                DSV3_F8(8), DSV3_F8(16), DSV3_F8(24))
DSV3_WGMMA_E4M3(112,
                DSV3_R8_0 ", " DSV3_R8_1 ", " DSV3_R8_2 ", " DSV3_R8_3 ", " DSV3_R8_4 ", " DSV3_R8_5
                          ", " DSV3_R8_6,
                "%56", "%57", "%58", DSV3_F8(0), DSV3_F8(8), DSV3_F8(16), DSV3_F8(24), DSV3_F8(32),
                DSV3_F8(40), DSV3_F8(48))
DSV3_WGMMA_E4M3(128,
                DSV3_R8_0 ", " DSV3_R8_1 ", " DSV3_R8_2 ", " DSV3_R8_3 ", " DSV3_R8_4 ", " DSV3_R8_5
                          ", " DSV3_R8_6 ", " DSV3_R8_7,
                "%64", "%65", "%66", DSV3_F8(0), DSV3_F8(8), DSV3_F8(16), DSV3_F8(24), DSV3_F8(32),
                DSV3_F8(40), DSV3_F8(48), DSV3_F8(56))
DSV3_WGMMA_E4M3(160,
                DSV3_R8_0 ", " DSV3_R8_1 ", " DSV3_R8_2 ", " DSV3_R8_3 ", " DSV3_R8_4 ", " DSV3_R8_5
                          ", " DSV3_R8_6 ", " DSV3_R8_7 ", " DSV3_R8_8 ", " DSV3_R8_9,
                "%80", "%81", "%82", DSV3_F8(0), DSV3_F8(8), DSV3_F8(16), DSV3_F8(24), DSV3_F8(32),
                DSV3_F8(40), DSV3_F8(48), DSV3_F8(56), DSV3_F8(64), DSV3_F8(72))

#undef DSV3_WGMMA_E4M3
#undef DSV3_F8
#undef DSV3_R8_0
#undef DSV3_R8_1
#undef DSV3_R8_2
#undef DSV3_R8_3
#undef DSV3_R8_4
#undef DSV3_R8_5
#undef DSV3_R8_6
#undef DSV3_R8_7
#undef DSV3_R8_8
#undef DSV3_R8_9

}  // namespace dsv3::sm90
