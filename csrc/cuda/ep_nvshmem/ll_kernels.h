// Launchers of the low-latency EP kernels (ll_kernels.cu) and the NVSHMEM runtime calls host.cpp needs, free
// of torch and NVSHMEM headers. Pointers into the symmetric buffer are this rank's addresses; the same
// offsets address every peer's copy (csrc/include/dsv3/ep/ll_layout.h).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv3::ep::nvshmem {

constexpr int kUniqueIdBytes = 128;  // sizeof(nvshmemx_uniqueid_t)

// Runtime (thin wrappers so that only ll_kernels.cu includes nvshmem.h). Each returns 0 on success.
int get_unique_id(uint8_t* out);
int init(const uint8_t* unique_id, int rank, int num_ranks);
void* symmetric_alloc(int64_t num_bytes);  // nullptr on failure; collective
void symmetric_free(void* ptr);            // collective
void barrier_on_stream(cudaStream_t stream);
void finalize();

// Where one call's half of the buffer is (byte offsets already applied) and the geometry of the call.
struct LLArgs {
  uint8_t* send;
  uint8_t* recv;
  int* dispatch_count;         // [L][R]
  uint64_t* dispatch_arrival;  // [L][R]
  uint64_t* combine_arrival;   // [E]
  int* done;                   // [L + 1]
  int* error_flag;             // host-mapped; set before a timeout trap
  int rank, num_ranks, num_experts, num_local_experts;
  int num_max_tokens;  // T
  int hidden;
  int64_t dispatch_msg_bytes, combine_msg_bytes;
  int64_t timeout_cycles;
};

// Send phase of dispatch: stage every token (fp8 cast or bf16 copy) and put one message per (token, k)
// into the expert's slot region on its rank, then the per-(expert, rank) counts.
cudaError_t ll_dispatch_send(const LLArgs& a, const void* x, const int64_t* topk_idx, int num_tokens,
                             int num_topk, bool use_fp8, bool pow2_scales, cudaStream_t stream);

// Receive phase of dispatch: wait for the counts and messages, pack rows into [L, R*T, ...].
// scales: fp32 column-major [L, R*T, H/128] (or int32 UE8M0 [L, R*T, H/512] when ue8m0); null for bf16.
cudaError_t ll_dispatch_recv(const LLArgs& a, bool use_fp8, bool ue8m0, void* recv_x, void* recv_scales,
                             int* recv_count, int* src_info, int64_t* layout_range, cudaStream_t stream);

// Send phase of combine: rows of x [L, R*T, H] (contiguous bf16) go back to the (global expert, token) slot
// of their source rank; zero_copy: x already is the send region.
cudaError_t ll_combine_send(const LLArgs& a, const void* x, const int* src_info, const int64_t* layout_range,
                            bool zero_copy, cudaStream_t stream);

// Receive phase of combine: out[t] = bf16(sum_k w[t,k] * row(t, k)) in k order.
cudaError_t ll_combine_recv(const LLArgs& a, const int64_t* topk_idx, const float* topk_weights,
                            int num_tokens, int num_topk, void* out, cudaStream_t stream);

}  // namespace dsv3::ep::nvshmem
