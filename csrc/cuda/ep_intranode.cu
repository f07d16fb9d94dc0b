// sm_90a intranode EP kernels (SPEC §5, the `nvlink` backend) behind ep_intranode_kernels.h. Every rank's
// buffer (dsv3/ep/nvl_layout.h) is mapped into every peer; rows travel through per-(channel, source) ring
// queues that live on the receiver: the sender writes slots and release-stores the tail there, the receiver
// acquire-loads the tail, copies the rows out and release-stores the head the sender polls.
//
// dispatch / combine run 2·C blocks: block 2c sends channel c, block 2c+1 receives it. A block's warps are
// split into one group per peer rank (R groups of 24/R warps, synchronized by named barrier 1 + peer).
// Channel c holds tokens [c·⌈n/C⌉, (c+1)·⌈n/C⌉) of the sending rank, so the receiver's row of the i-th token
// of (channel c, source s) is rank_offset(s) + channel_start(s, c) + i: source rank, then token order.
// Every wait is bounded (SpinDeadline): a missing peer leaves an error code in host memory and traps.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "dsv3/ep/bf16x8.cuh"
#include "dsv3/ep/device_sync.cuh"
#include "ep_intranode_kernels.h"

namespace dsv3::cuda {
namespace {

using ep::NvlLayout;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 768;  // dispatch / combine: 24 warps, 24 / R per peer
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kNotifyThreads = 256;

__device__ __forceinline__ char* buffer_of(const NvlContext& ctx, int rank) {
  return reinterpret_cast<char*>(__ldg(reinterpret_cast<const unsigned long long*>(ctx.buffers) + rank));
}
__device__ __forceinline__ int* int_at(char* base, int64_t offset) {
  return reinterpret_cast<int*>(base + offset);
}

// Signed distance of two wrapping counters (a - b).
__device__ __forceinline__ int counter_diff(int a, int b) {
  return static_cast<int>(static_cast<unsigned>(a) - static_cast<unsigned>(b));
}

__device__ __forceinline__ void group_sync(int group, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(group + 1), "r"(threads) : "memory");
}

// Group barrier, run by a whole block. Each rank counts its barriers in its own epoch word; arriving adds one
// to signals[rank] in every peer, and the barrier is passed once every signals[s] here reached the epoch.
template <int R>
__device__ void barrier_block(const NvlContext& ctx, const NvlLayout& layout) {
  __shared__ int epoch_shared;
  int* own = int_at(buffer_of(ctx, ctx.rank), layout.barrier);
  __syncthreads();
  if (threadIdx.x == 0) {
    epoch_shared = own[ep::kNvlBarrierEpoch] + 1;
    own[ep::kNvlBarrierEpoch] = epoch_shared;
  }
  __syncthreads();
  if (threadIdx.x < R) {
    const int epoch = epoch_shared;
    ep::fence_acq_rel_sys();  // the block's writes to peers before the arrival
    ep::red_release_sys_add(int_at(buffer_of(ctx, threadIdx.x), layout.barrier) + ctx.rank, 1);
    const ep::SpinDeadline deadline(ctx.timeout_cycles);
    while (counter_diff(ep::ld_acquire_sys(own + threadIdx.x), epoch) < 0) {
      if (deadline.expired()) ep::ep_trap(ctx.host_counters + ep::kNvlHostError, ep::kNvlErrorBarrier);
    }
  }
  __syncthreads();
}

template <int R>
__device__ void zero_queue_ctrl(const NvlContext& ctx, const NvlLayout& layout) {
  int* ctrl = int_at(buffer_of(ctx, ctx.rank), layout.queue_ctrl);
  const int words = layout.num_channels * R * ep::kNvlQueueCtrlInts;
  for (int i = threadIdx.x; i < words; i += blockDim.x) ctrl[i] = 0;
}

template <int R>
__global__ void __launch_bounds__(kNotifyThreads) barrier_kernel(NvlContext ctx, NvlLayout layout) {
  barrier_block<R>(ctx, layout);
}

template <int R>
__global__ void __launch_bounds__(kNotifyThreads) reset_queues_kernel(NvlContext ctx, NvlLayout layout) {
  barrier_block<R>(ctx, layout);
  zero_queue_ctrl<R>(ctx, layout);
  barrier_block<R>(ctx, layout);
}

// Block 0: the count exchange and everything derived from it. Blocks 1..R: channel_prefix_matrix row of
// destination blockIdx.x - 1 (one warp per channel, then a serial prefix over the channels).
template <int R>
__global__ void __launch_bounds__(kNotifyThreads)
    notify_dispatch_kernel(NvlContext ctx, NvlLayout layout, const int* num_tokens_per_rank,
                           const int* num_tokens_per_expert, const bool* is_token_in_rank, int num_tokens,
                           int expert_alignment, int sequence, int* rank_prefix_matrix,
                           int* channel_prefix_matrix) {
  const int num_channels = layout.num_channels;
  if (blockIdx.x > 0) {
    const int dst = blockIdx.x - 1, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    int* row = channel_prefix_matrix + dst * num_channels;
    for (int c = warp; c < num_channels; c += kNotifyThreads / kWarpSize) {
      const ep::TokenRange range = ep::channel_token_range(num_tokens, num_channels, c);
      int count = 0;
      for (int t = range.begin + lane; t < range.end; t += kWarpSize) {
        count += is_token_in_rank[static_cast<int64_t>(t) * R + dst];
      }
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
        count += __shfl_xor_sync(kFullMask, count, offset);
      if (lane == 0) row[c] = count;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int c = 1; c < num_channels; ++c) row[c] += row[c - 1];
    }
    return;
  }

  const int rank = ctx.rank, num_local = layout.num_local_experts;
  barrier_block<R>(ctx, layout);  // every peer finished with the previous use of our buffers
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    const int dst = i / R, j = i % R;
    int_at(buffer_of(ctx, dst), layout.rank_counts)[rank * R + j] = num_tokens_per_rank[j];
  }
  for (int i = threadIdx.x; i < R * num_local; i += blockDim.x) {
    const int dst = i / num_local, e = i % num_local;
    int_at(buffer_of(ctx, dst), layout.expert_counts)[rank * num_local + e] = num_tokens_per_expert[i];
  }
  zero_queue_ctrl<R>(ctx, layout);
  barrier_block<R>(ctx, layout);  // every peer's counts are here

  __shared__ int counts[R * R];
  const int* rank_counts = int_at(buffer_of(ctx, rank), layout.rank_counts);
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) counts[i] = __ldcg(rank_counts + i);
  __syncthreads();
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    rank_prefix_matrix[i] = ep::rank_prefix_entry(counts, R, i / R, i % R);
  }
  int* host = ctx.host_counters;
  const int* expert_counts = int_at(buffer_of(ctx, rank), layout.expert_counts);
  for (int e = threadIdx.x; e < num_local; e += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < R; ++s) sum += __ldcg(expert_counts + s * num_local + e);
    ep::st_relaxed_sys(host + ep::kNvlHostExpertCounts + e, ep::align_up(sum, expert_alignment));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ep::st_relaxed_sys(host + ep::kNvlHostRecvTokens, ep::rank_prefix_entry(counts, R, R - 1, rank));
    ep::st_release_sys(host + ep::kNvlHostSeq, sequence);  // after every count of this call
  }
}

// ---- queue plumbing shared by dispatch and combine -------------------------------------------------------

// The sender's lead thread: waits until the queue has a free slot and returns how many of the `remaining`
// rows to send now (at most `chunk`). Accepting a partial chunk keeps a receiver that needs a few rows to
// make progress from waiting on a sender that waits for a whole chunk of space.
__device__ __forceinline__ int wait_free_slots(const NvlContext& ctx, const int* head, int sent, int slots,
                                               int chunk, int remaining, int error) {
  const ep::SpinDeadline deadline(ctx.timeout_cycles);
  int free_slots;
  while ((free_slots = slots - counter_diff(sent, ep::ld_acquire_sys(head))) <= 0) {
    if (deadline.expired()) ep::ep_trap(ctx.host_counters + ep::kNvlHostError, error);
  }
  return min(min(chunk, remaining), free_slots);
}

// The receiver's lead thread: waits until the queue holds more than `received` rows; returns the tail.
__device__ __forceinline__ int wait_tail(const NvlContext& ctx, const int* tail, int received, int error) {
  const ep::SpinDeadline deadline(ctx.timeout_cycles);
  int value;
  while (counter_diff(value = ep::ld_acquire_sys(tail), received) <= 0) {
    if (deadline.expired()) ep::ep_trap(ctx.host_counters + ep::kNvlHostError, error);
  }
  return value;
}

// One warp copies a row of `int4s` 16-byte words; four loads in flight per lane.
template <bool kFromPeerQueue>
__device__ __forceinline__ void warp_copy_row(int4* dst, const int4* src, int int4s, int lane) {
  constexpr int kUnroll = 4;
  int i = lane;
  for (; i + (kUnroll - 1) * kWarpSize < int4s; i += kUnroll * kWarpSize) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      v[u] = kFromPeerQueue ? ep::ld_cg_v4(src + i + u * kWarpSize) : ep::ld_nc_v4(src + i + u * kWarpSize);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) ep::st_global_v4(dst + i + u * kWarpSize, v[u]);
  }
  for (; i < int4s; i += kWarpSize) {
    ep::st_global_v4(dst + i, kFromPeerQueue ? ep::ld_cg_v4(src + i) : ep::ld_nc_v4(src + i));
  }
}

// ---- dispatch ---------------------------------------------------------------------------------------------

template <int R>
__device__ void dispatch_send(const NvlContext& ctx, const NvlLayout& layout, const NvlDispatchArgs& a,
                              int channel, int* shared_count) {
  constexpr int kGroupWarps = kWarps / R;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int dst = warp / kGroupWarps, group_warp = warp % kGroupWarps;
  const bool lead = group_warp == 0 && lane == 0;
  const int num_channels = layout.num_channels, slots = layout.num_slots, k = layout.num_topk;
  const ep::TokenRange range = ep::channel_token_range(a.num_tokens, num_channels, channel);
  const int start = channel == 0 ? 0 : a.channel_prefix_matrix[dst * num_channels + channel - 1];
  const int total = a.channel_prefix_matrix[dst * num_channels + channel] - start;
  const int q = layout.queue(channel, ctx.rank);
  char* peer = buffer_of(ctx, dst);
  int* ctrl = int_at(peer, layout.ctrl_offset(q, 0));
  if (lead) {
    ep::st_relaxed_sys(ctrl + ep::kQueueStart, ep::encode_offset(start));
    ep::st_release_sys(ctrl + ep::kQueueEnd, ep::encode_offset(start + total));
  }
  const int int4s = static_cast<int>(layout.hidden_bytes / 16);
  const int expert_begin = dst * a.num_local_experts;
  int cursor = range.begin;
  for (int sent = 0; sent < total;) {
    if (lead) {
      shared_count[dst] = wait_free_slots(ctx, ctrl + ep::kQueueHead, sent, slots, a.num_max_send_tokens,
                                          total - sent, ep::kNvlErrorDispatchSend);
    }
    group_sync(dst, kGroupWarps * kWarpSize);
    const int chunk = shared_count[dst];
    // Every warp of the group scans the same tokens (32 at a time) and copies every kGroupWarps-th of the
    // selected ones, so the token order in the queue is the token order of the channel.
    // (cursor < range.end only fails for a channel_prefix_matrix that does not match is_token_in_rank.)
    for (int taken = 0; taken < chunk && cursor < range.end;) {
      const int t = cursor + lane;
      const bool selected = t < range.end && a.is_token_in_rank[static_cast<int64_t>(t) * R + dst];
      unsigned mask = __ballot_sync(kFullMask, selected);
      int next_cursor = min(cursor + kWarpSize, range.end);
      const int want = chunk - taken;
      if (__popc(mask) > want) {  // the chunk ends inside this window: keep the first `want` tokens
        unsigned rest = mask;
        for (int i = 0; i < want; ++i) rest &= rest - 1;
        const int stop = __ffs(rest) - 1;
        mask &= (1u << stop) - 1;
        next_cursor = cursor + stop;
      }
      if (a.send_head != nullptr && group_warp == 0 && t < next_cursor && !selected) {
        a.send_head[static_cast<int64_t>(t) * R + dst] = -1;
      }
      for (int j = taken; mask; mask &= mask - 1, ++j) {
        if (j % kGroupWarps != group_warp) continue;
        const int token = cursor + __ffs(mask) - 1, seq = sent + j, slot = seq % slots;
        warp_copy_row<false>(reinterpret_cast<int4*>(peer + layout.x_offset(q, slot)),
                             reinterpret_cast<const int4*>(static_cast<const char*>(a.x) +
                                                           static_cast<int64_t>(token) * layout.hidden_bytes),
                             int4s, lane);
        if (lane == 0) {
          *int_at(peer, layout.src_idx_offset(q, slot)) = token;
          if (a.send_head != nullptr) a.send_head[static_cast<int64_t>(token) * R + dst] = seq;
        }
        if (a.topk_idx != nullptr) {
          auto* idx = reinterpret_cast<int64_t*>(peer + layout.topk_idx_offset(q, slot));
          auto* weights = reinterpret_cast<float*>(peer + layout.topk_weights_offset(q, slot));
          for (int i = lane; i < k; i += kWarpSize) {
            const int64_t e = a.topk_idx[static_cast<int64_t>(token) * k + i] - expert_begin;
            const bool local = e >= 0 && e < a.num_local_experts;
            idx[i] = local ? e : -1;
            weights[i] = local ? a.topk_weights[static_cast<int64_t>(token) * k + i] : 0.0f;
          }
        }
        if (a.x_scales != nullptr) {
          int* scales = int_at(peer, layout.scales_offset(q, slot));
          for (int i = lane; i < layout.num_scales; i += kWarpSize) {
            scales[i] = a.x_scales[token * a.scale_token_stride + i * a.scale_hidden_stride];
          }
        }
      }
      taken += __popc(__ballot_sync(kFullMask, selected && t < next_cursor));
      cursor = next_cursor;
    }
    group_sync(dst, kGroupWarps * kWarpSize);
    sent += chunk;
    if (lead) ep::st_release_sys(ctrl + ep::kQueueTail, sent);
  }
  if (a.send_head != nullptr && group_warp == 0) {  // tokens after the last one sent to dst
    for (int t = cursor + lane; t < range.end; t += kWarpSize)
      a.send_head[static_cast<int64_t>(t) * R + dst] = -1;
  }
}

template <int R>
__device__ void dispatch_recv(const NvlContext& ctx, const NvlLayout& layout, const NvlDispatchArgs& a,
                              int channel, int* shared_count, int* shared_start, int* shared_tail) {
  constexpr int kGroupWarps = kWarps / R;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int src = warp / kGroupWarps, group_warp = warp % kGroupWarps;
  const bool lead = group_warp == 0 && lane == 0;
  const int num_channels = layout.num_channels, slots = layout.num_slots, k = layout.num_topk;
  const int q = layout.queue(channel, src);
  char* own = buffer_of(ctx, ctx.rank);
  int* ctrl = int_at(own, layout.ctrl_offset(q, 0));
  if (lead) {
    const ep::SpinDeadline deadline(ctx.timeout_cycles);
    int end;
    while ((end = ep::ld_acquire_sys(ctrl + ep::kQueueEnd)) == 0) {
      if (deadline.expired()) ep::ep_trap(ctx.host_counters + ep::kNvlHostError, ep::kNvlErrorDispatchRecv);
    }
    shared_start[src] = ep::decode_offset(ep::ld_acquire_sys(ctrl + ep::kQueueStart));
    shared_count[src] = ep::decode_offset(end) - shared_start[src];
  }
  group_sync(src, kGroupWarps * kWarpSize);
  const int total = shared_count[src];
  const int base = ep::recv_rank_offset(a.rank_prefix_matrix, R, ctx.rank, src) + shared_start[src];
  if (lead && a.recv_channel_prefix_matrix != nullptr)
    a.recv_channel_prefix_matrix[src * num_channels + channel] = base;
  const int int4s = static_cast<int>(layout.hidden_bytes / 16);
  for (int received = 0; received < total;) {
    if (lead) shared_tail[src] = wait_tail(ctx, ctrl + ep::kQueueTail, received, ep::kNvlErrorDispatchRecv);
    group_sync(src, kGroupWarps * kWarpSize);
    const int tail = shared_tail[src];
    for (int seq = received + group_warp; seq < tail; seq += kGroupWarps) {
      const int slot = seq % slots;
      const int64_t row = base + seq;
      if (row >= a.num_recv_capacity) {  // more than num_worst_tokens rows: drop, and say so
        if (lane == 0) ep::st_relaxed_sys(ctx.host_counters + ep::kNvlHostError, ep::kNvlErrorRecvOverflow);
        continue;
      }
      warp_copy_row<true>(reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) + row * layout.hidden_bytes),
                          reinterpret_cast<const int4*>(own + layout.x_offset(q, slot)), int4s, lane);
      if (lane == 0 && a.recv_src_idx != nullptr)
        a.recv_src_idx[row] = __ldcg(int_at(own, layout.src_idx_offset(q, slot)));
      if (a.recv_topk_idx != nullptr) {
        const auto* idx = reinterpret_cast<const int64_t*>(own + layout.topk_idx_offset(q, slot));
        const auto* weights = reinterpret_cast<const float*>(own + layout.topk_weights_offset(q, slot));
        for (int i = lane; i < k; i += kWarpSize) {
          a.recv_topk_idx[row * k + i] = __ldcg(idx + i);
          a.recv_topk_weights[row * k + i] = __ldcg(weights + i);
        }
      }
      if (a.recv_x_scales != nullptr) {
        const int* scales = int_at(own, layout.scales_offset(q, slot));
        for (int i = lane; i < layout.num_scales; i += kWarpSize) {
          a.recv_x_scales[row * layout.num_scales + i] = __ldcg(scales + i);
        }
      }
    }
    group_sync(src, kGroupWarps * kWarpSize);
    if (lead) ep::st_release_sys(ctrl + ep::kQueueHead, tail);  // the slots may be overwritten now
    received = tail;
  }
}

template <int R>
__global__ void __launch_bounds__(kThreads, 1)
    dispatch_kernel(NvlContext ctx, NvlLayout layout, NvlDispatchArgs args) {
  __shared__ int shared_count[R], shared_start[R], shared_tail[R];
  const int channel = blockIdx.x / 2;
  if (blockIdx.x % 2 == 0) {
    dispatch_send<R>(ctx, layout, args, channel, shared_count);
  } else {
    dispatch_recv<R>(ctx, layout, args, channel, shared_count, shared_start, shared_tail);
  }
}

// ---- combine ------------------------------------------------------------------------------------------

// Sends the rows this rank received from `dst` in its channel c back to dst, in dispatch order, so that the
// i-th row of (c, this rank -> dst) is the token whose send_head[t, this rank] at dst is i.
template <int R>
__device__ void combine_send(const NvlContext& ctx, const NvlLayout& layout, const NvlCombineArgs& a,
                             int channel, int* shared_count) {
  constexpr int kGroupWarps = kWarps / R;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int dst = warp / kGroupWarps, group_warp = warp % kGroupWarps;
  const bool lead = group_warp == 0 && lane == 0;
  const int num_channels = layout.num_channels, slots = layout.num_slots, k = layout.num_topk;
  const int begin = a.recv_channel_prefix_matrix[dst * num_channels + channel];
  const int end = channel + 1 < num_channels ? a.recv_channel_prefix_matrix[dst * num_channels + channel + 1]
                                             : a.rank_prefix_matrix[dst * R + ctx.rank];
  const int total = end - begin, q = layout.queue(channel, ctx.rank);
  char* peer = buffer_of(ctx, dst);
  int* ctrl = int_at(peer, layout.ctrl_offset(q, 0));
  const int int4s = static_cast<int>(layout.hidden_bytes / 16);
  for (int sent = 0; sent < total;) {
    if (lead) {
      shared_count[dst] = wait_free_slots(ctx, ctrl + ep::kQueueHead, sent, slots, a.num_max_send_tokens,
                                          total - sent, ep::kNvlErrorCombineSend);
    }
    group_sync(dst, kGroupWarps * kWarpSize);
    const int chunk = shared_count[dst];
    for (int j = group_warp; j < chunk; j += kGroupWarps) {
      const int64_t row = begin + sent + j;
      const int slot = (sent + j) % slots;
      warp_copy_row<false>(
          reinterpret_cast<int4*>(peer + layout.x_offset(q, slot)),
          reinterpret_cast<const int4*>(static_cast<const char*>(a.x) + row * layout.hidden_bytes), int4s,
          lane);
      if (a.topk_weights != nullptr) {
        auto* weights = reinterpret_cast<float*>(peer + layout.topk_weights_offset(q, slot));
        for (int i = lane; i < k; i += kWarpSize) weights[i] = __ldg(a.topk_weights + row * k + i);
      }
    }
    group_sync(dst, kGroupWarps * kWarpSize);
    sent += chunk;
    if (lead) ep::st_release_sys(ctrl + ep::kQueueTail, sent);
  }
}

// Reduces this rank's tokens of channel c: one warp per token, windows of at most `slots` tokens (a window
// never needs more rows of one queue than the queue holds), then the heads advance past the window's rows.
template <int R>
__device__ void combine_recv(const NvlContext& ctx, const NvlLayout& layout, const NvlCombineArgs& a,
                             int channel) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int num_channels = layout.num_channels, slots = layout.num_slots, k = layout.num_topk;
  const ep::TokenRange range = ep::channel_token_range(a.num_tokens, num_channels, channel);
  const int window = min(kWarps, slots), int4s = a.hidden / 8;
  char* own = buffer_of(ctx, ctx.rank);
  int seen_tail = 0;  // lane r < R: the last tail read from queue (c, r)
  for (int first = range.begin; first < range.end; first += window) {
    const int count = min(window, range.end - first);
    if (warp < count) {
      const int64_t t = first + warp;
      int head[R];
#pragma unroll
      for (int r = 0; r < R; ++r) head[r] = __ldg(a.send_head + t * R + r);
      if (lane < R) {
        int h = head[0];
#pragma unroll
        for (int r = 1; r < R; ++r) h = lane == r ? head[r] : h;
        if (h >= 0 && seen_tail <= h) {
          seen_tail =
              wait_tail(ctx, int_at(own, layout.ctrl_offset(layout.queue(channel, lane), ep::kQueueTail)), h,
                        ep::kNvlErrorCombineRecv);
        }
      }
      __syncwarp();
      const int4* rows[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        rows[r] = head[r] < 0 ? nullptr
                              : reinterpret_cast<const int4*>(
                                    own + layout.x_offset(layout.queue(channel, r), head[r] % slots));
      }
      const int4* bias_0 = static_cast<const int4*>(a.bias_0);
      const int4* bias_1 = static_cast<const int4*>(a.bias_1);
      int4* out = static_cast<int4*>(a.combined_x) + t * int4s;
      for (int i = lane; i < int4s; i += kWarpSize) {
        float acc[8] = {};
        if (bias_0 != nullptr) ep::add_bf16x8(acc, __ldg(bias_0 + t * int4s + i));
        if (bias_1 != nullptr) ep::add_bf16x8(acc, __ldg(bias_1 + t * int4s + i));
#pragma unroll
        for (int r = 0; r < R; ++r) {  // ranks ascending: the reference's fp32 order
          if (rows[r] != nullptr) ep::add_bf16x8(acc, ep::ld_cg_v4(rows[r] + i));
        }
        int4 packed;
        auto* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
        out[i] = packed;
      }
      if (a.combined_topk_weights != nullptr) {
        for (int i = lane; i < k; i += kWarpSize) {
          float sum = 0.0f;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            if (head[r] >= 0) {
              sum += __ldcg(reinterpret_cast<const float*>(
                                own + layout.topk_weights_offset(layout.queue(channel, r), head[r] % slots)) +
                            i);
            }
          }
          a.combined_topk_weights[t * k + i] = sum;
        }
      }
    }
    __syncthreads();  // every row of the window has been read
    if (threadIdx.x < R) {
      const int r = threadIdx.x;
      int last = -1;
      for (int t = first; t < first + count; ++t)
        last = max(last, __ldg(a.send_head + static_cast<int64_t>(t) * R + r));
      if (last >= 0)
        ep::st_release_sys(int_at(own, layout.ctrl_offset(layout.queue(channel, r), ep::kQueueHead)),
                           last + 1);
    }
  }
}

template <int R>
__global__ void __launch_bounds__(kThreads, 1)
    combine_kernel(NvlContext ctx, NvlLayout layout, NvlCombineArgs args) {
  __shared__ int shared_count[R];
  const int channel = blockIdx.x / 2;
  if (blockIdx.x % 2 == 0) {
    combine_send<R>(ctx, layout, args, channel, shared_count);
  } else {
    combine_recv<R>(ctx, layout, args, channel);
  }
}

// Calls launch(std::integral_constant<int, R>) for the runtime rank count R.
template <typename Launch>
cudaError_t for_ranks(int num_ranks, Launch&& launch) {
  switch (num_ranks) {
    case 2:
      launch(std::integral_constant<int, 2>());
      break;
    case 4:
      launch(std::integral_constant<int, 4>());
      break;
    case 8:
      launch(std::integral_constant<int, 8>());
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t nvl_barrier(const NvlContext& ctx, const NvlLayout& layout, cudaStream_t stream) {
  return for_ranks(layout.num_ranks, [&](auto r) {
    barrier_kernel<decltype(r)::value><<<1, kNotifyThreads, 0, stream>>>(ctx, layout);
  });
}

cudaError_t nvl_reset_queues(const NvlContext& ctx, const NvlLayout& layout, cudaStream_t stream) {
  return for_ranks(layout.num_ranks, [&](auto r) {
    reset_queues_kernel<decltype(r)::value><<<1, kNotifyThreads, 0, stream>>>(ctx, layout);
  });
}

cudaError_t nvl_notify_dispatch(const NvlContext& ctx, const NvlLayout& layout,
                                const int* num_tokens_per_rank, const int* num_tokens_per_expert,
                                const bool* is_token_in_rank, int num_tokens, int expert_alignment,
                                int sequence, int* rank_prefix_matrix, int* channel_prefix_matrix,
                                cudaStream_t stream) {
  return for_ranks(layout.num_ranks, [&](auto r) {
    notify_dispatch_kernel<decltype(r)::value><<<1 + r(), kNotifyThreads, 0, stream>>>(
        ctx, layout, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, num_tokens,
        expert_alignment, sequence, rank_prefix_matrix, channel_prefix_matrix);
  });
}

cudaError_t nvl_dispatch(const NvlContext& ctx, const NvlLayout& layout, const NvlDispatchArgs& args,
                         cudaStream_t stream) {
  return for_ranks(layout.num_ranks, [&](auto r) {
    dispatch_kernel<decltype(r)::value><<<2 * layout.num_channels, kThreads, 0, stream>>>(ctx, layout, args);
  });
}

cudaError_t nvl_combine(const NvlContext& ctx, const NvlLayout& layout, const NvlCombineArgs& args,
                        cudaStream_t stream) {
  return for_ranks(layout.num_ranks, [&](auto r) {
    combine_kernel<decltype(r)::value><<<2 * layout.num_channels, kThreads, 0, stream>>>(ctx, layout, args);
  });
}

}  // namespace dsv3::cuda
