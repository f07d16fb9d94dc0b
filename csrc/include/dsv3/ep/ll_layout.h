// Byte layout of the low-latency EP buffer (one NVSHMEM symmetric allocation per rank) and of the messages in
// it, free of CUDA headers: the kernels of csrc/cuda/ep_nvshmem/ and the CPU op ep_ll_layout (which the
// Python size hint is tested against) use these functions, never a copy.
//
// The buffer is two identical halves (DeepEP's double buffering: each low-latency dispatch or combine uses
// the half after the previous one, so a peer that is one call ahead never writes into a half still being
// read). A half is [signals | send | recv]:
//   signals: dispatch counts int32 [L][R] (-count-1, 0 = not arrived), dispatch arrivals uint64 [L][R]
//            (messages landed, NVSHMEM signal adds), combine arrivals uint64 [E] (rows landed per expert),
//            done counters int32 [L + 1] (local only: the receive kernels' last block resets the signals);
//   send:    dispatch staging [T] messages, or combine staging [L][R*T] rows (the zero-copy view);
//   recv:    dispatch slots [L][R][T] messages, or combine slots [E][T] rows.
#pragma once
#include <algorithm>
#include <cstdint>

#ifdef __CUDACC__
#define DSV3_LL_HD __host__ __device__ __forceinline__
#else
#define DSV3_LL_HD inline
#endif

namespace dsv3::ep {

constexpr int64_t kLLAlign = 128;        // every region starts on a 128-byte boundary
constexpr int64_t kLLHeaderBytes = 16;   // dispatch message header: int32 source token index + padding
constexpr int64_t kLLGroupSize = 128;    // fp8 scale group along hidden (1x128, SPEC §2)
constexpr int64_t kLLMaxTopk = 11;       // DeepEP's low-latency limit
constexpr int64_t kLLHiddenAlign = 512;  // UE8M0 scales pack 4 groups per int32

DSV3_LL_HD int64_t ll_align(int64_t bytes) { return (bytes + kLLAlign - 1) / kLLAlign * kLLAlign; }

// A dispatch message: header, then either bf16 [H] or fp8 [H] followed by fp32 scales [H/128] (the UE8M0
// form is rounded to powers of two on the sender and packed only on the receiver, so the wire form is one).
DSV3_LL_HD int64_t ll_dispatch_msg_bytes(int64_t hidden) {
  const int64_t bf16 = hidden * 2, fp8 = hidden + hidden / kLLGroupSize * 4;
  return (kLLHeaderBytes + (bf16 > fp8 ? bf16 : fp8) + 15) / 16 * 16;
}
DSV3_LL_HD int64_t ll_fp8_scales_offset(int64_t hidden) { return kLLHeaderBytes + hidden; }
DSV3_LL_HD int64_t ll_combine_msg_bytes(int64_t hidden) { return hidden * 2; }

struct LLHalf {  // byte offsets from the start of the buffer
  int64_t dispatch_count, dispatch_arrival, combine_arrival, done;
  int64_t send, send_bytes;
  int64_t recv, recv_bytes;
  int64_t end;
};

struct LLLayout {
  int64_t num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts, num_local_experts;
  int64_t dispatch_msg_bytes, combine_msg_bytes;
  LLHalf half[2];
  int64_t total_bytes;
};

// Arguments are validated by the caller (ep_ll_layout's entry, the Python backend): T, hidden, R, E > 0,
// E % R == 0, hidden % 128 == 0.
inline LLLayout make_ll_layout(int64_t T, int64_t hidden, int64_t num_ranks, int64_t num_experts) {
  LLLayout l{};
  l.num_max_dispatch_tokens_per_rank = T;
  l.hidden = hidden;
  l.num_ranks = num_ranks;
  l.num_experts = num_experts;
  l.num_local_experts = num_experts / num_ranks;
  l.dispatch_msg_bytes = ll_dispatch_msg_bytes(hidden);
  l.combine_msg_bytes = ll_combine_msg_bytes(hidden);
  // L * R == E: the dispatch receive slots and the combine send rows are both E * T entries.
  const int64_t send_bytes = std::max(T * l.dispatch_msg_bytes, num_experts * T * l.combine_msg_bytes);
  const int64_t recv_bytes = num_experts * T * std::max(l.dispatch_msg_bytes, l.combine_msg_bytes);
  int64_t offset = 0;
  for (LLHalf& h : l.half) {
    h.dispatch_count = offset;
    h.dispatch_arrival = h.dispatch_count + ll_align(num_experts * 4);
    h.combine_arrival = h.dispatch_arrival + ll_align(num_experts * 8);
    h.done = h.combine_arrival + ll_align(num_experts * 8);
    h.send = h.done + ll_align((l.num_local_experts + 1) * 4);
    h.send_bytes = ll_align(send_bytes);
    h.recv = h.send + h.send_bytes;
    h.recv_bytes = ll_align(recv_bytes);
    h.end = h.recv + h.recv_bytes;
    offset = h.end;
  }
  l.total_bytes = offset;
  return l;
}

}  // namespace dsv3::ep
