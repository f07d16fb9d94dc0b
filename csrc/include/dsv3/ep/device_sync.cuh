// Device-side memory operations of the EP kernels (NVLink and NVSHMEM): system-scope acquire/release flags
// (peers write into this GPU's memory over NVLink or RDMA, the host reads mapped counters), L1-bypassing and
// read-only 16-byte loads, and the bounded spin every wait goes through, ending in `ep_trap`. CUDA only
// (csrc/cuda/ep_intranode.cu, csrc/cuda/ep_nvshmem/*.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv3::ep {

// Flags are read at system scope: the writer is another GPU (or this one's peer blocks) and the value must
// not come from a stale L1 line; acquire orders the loads of the data the flag guards after it.
__device__ __forceinline__ int ld_acquire_sys(const int* p) {
  int v;
  asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Release: every write this thread (and, through a preceding bar.sync, its block) made is visible to the
// system before the flag is.
__device__ __forceinline__ void st_release_sys(int* p, int v) {
  asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void st_relaxed_sys(int* p, int v) {
  asm volatile("st.relaxed.sys.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void red_release_sys_add(int* p, int v) {
  asm volatile("red.release.sys.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// Queue slots another GPU wrote: cached in L2 only (this GPU's L2 is where the peer's NVLink stores land).
__device__ __forceinline__ int4 ld_cg_v4(const int4* p) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ int4 ld_cg_v4(const void* p) { return ld_cg_v4(static_cast<const int4*>(p)); }

// Global stores through pointers loaded at run time (peer buffers), which the compiler cannot place itself.
__device__ __forceinline__ void st_global_v4(int4* p, int4 v) {
  asm volatile("st.global.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Inputs of this kernel, never written while it runs.
__device__ __forceinline__ int4 ld_nc_v4(const int4* p) { return __ldg(p); }

__device__ __forceinline__ long long clock_cycles() {
  long long v;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(v));
  return v;
}

// A bounded wait: `expired()` turns true `timeout_cycles` SM clock cycles after construction.
struct SpinDeadline {
  long long start, cycles;
  __device__ __forceinline__ explicit SpinDeadline(long long timeout_cycles)
      : start(clock_cycles()), cycles(timeout_cycles) {}
  __device__ __forceinline__ bool expired() const { return clock_cycles() - start > cycles; }
};

// A peer did not arrive in time (or the input is unusable): leave `code` in the host-mapped error word for
// the host to report, then abort the kernel (the CUDA context is unusable afterwards, as after any
// device-side trap).
__device__ __forceinline__ void ep_trap(int* host_error, int code) {
  st_relaxed_sys(host_error, code);
  fence_acq_rel_sys();
  asm volatile("trap;");
}

}  // namespace dsv3::ep
