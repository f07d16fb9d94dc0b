// sm_90 TMA (cp.async.bulk.tensor) wrappers: 3-D tile loads into shared memory completing on an mbarrier.
#pragma once
#include <cuda.h>

#include <cstdint>

#include "dsv3/sm90/mbarrier.cuh"

namespace dsv3::sm90 {

__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Loads the box at (c0, c1, c2) of `map` into `dst`; the bytes count towards `bar`'s transaction count.
// Out-of-bounds elements are zero-filled (and still counted).
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

}  // namespace dsv3::sm90
