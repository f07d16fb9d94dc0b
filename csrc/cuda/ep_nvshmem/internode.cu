// sm_90a internode normal-mode EP kernels on NVSHMEM (SPEC §5, DeepEP's internode design): a token crosses
// RDMA once per destination node, to the forwarder (the rank with the sender's local index there), which
// forwards it over NVLink (NVSHMEM P2P puts) to the ranks of its node that need it; combine runs the queues
// backwards with DeepEP's two roundings (fp32 sum of a node's copies, bf16, fp32 sum of node partials +
// bias).
//
// dispatch / combine run 2·C blocks of 512 threads; channel c uses blocks 2c and 2c+1:
//   dispatch  2c:   warps 0-7 RDMA senders (warp w: destination nodes w, w+8, ...), warps 8-15 NVLink
//                   receivers (warp 8+f: rows forwarded by local rank f);
//             2c+1: warps 0-7 the forwarder (warp j: NVLink hop to local rank j), one RDMA record at a time.
//   combine   2c:   warps 0-7 NVLink senders (rows back to forwarder f), warps 8-15 the source receiver
//                   (one token at a time: node partials summed in node order);
//             2c+1: the forwarder, one token at a time: local copies summed in rank order, one partial out.
// Forwarders take source nodes in ascending order and receivers write row recv_gbl_rank_prefix_sum[s-1] +
// channel start + i, so the received order (source rank, then token) and every queue position are
// deterministic; send_rdma_head / send_nvl_head record the positions that combine replays.
// No deadlock: a consumer returns its consumed count (head) before it spins, and a forwarder serves source
// nodes in one global order. Every spin is bounded by clock64: a late peer leaves (what << 24 | peer) in the
// host-mapped error flag and traps, as the low-latency kernels do.
#include <cuda_bf16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "dsv3/ep/bf16x8.cuh"
#include "dsv3/ep/device_sync.cuh"
#include "dsv3/ep/nvl_layout.h"
#include "internode.h"

namespace dsv3::ep::nvshmem {
// A named namespace (not an anonymous one) so the SASS audit can read the kernel names under -rdc.
namespace internode {

constexpr int kWarpSize = 32;
constexpr int kThreads = 512;
constexpr int kGroupThreads = kThreads / 2;  // a role of 8 warps
constexpr int kNotifyThreads = 256;
constexpr int kP = kInternodeNodeRanks;
constexpr unsigned kFullMask = 0xffffffffu;

// Queue slots are rewritten by peers (P2P stores, the NIC) between reads: 16-byte loads go through L2 only
// (ld_cg_v4), flags are read with system-scope acquire (ld_acquire_sys), both from dsv3/ep/device_sync.cuh.
__device__ __forceinline__ void group_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Out of line: the spin loops stay small.
__device__ __noinline__ void fail(int* error_flag, int what, int peer) {
  ep_trap(error_flag, (what << 24) | peer);
}

__device__ __forceinline__ bool expired(long long start, const InternodeContext& ctx) {
  return clock64() - start > ctx.timeout_cycles;
}

template <typename T>
__device__ __forceinline__ T* at(const InternodeContext& ctx, int64_t offset) {
  return reinterpret_cast<T*>(ctx.buffer + offset);
}

// Spins until the word is nonzero (a meta word) and returns it.
__device__ uint64_t wait_nonzero(const InternodeContext& ctx, const uint64_t* p, int what, int peer) {
  uint64_t v = ld_acquire_sys(p);
  if (v != 0) return v;
  const long long start = clock64();
  while ((v = ld_acquire_sys(p)) == 0)
    if (expired(start, ctx)) fail(ctx.error_flag, what, peer);
  return v;
}
__device__ void wait_equal(const InternodeContext& ctx, const uint64_t* p, uint64_t target, int what,
                           int peer) {
  if (ld_acquire_sys(p) == target) return;
  const long long start = clock64();
  while (ld_acquire_sys(p) != target)
    if (expired(start, ctx)) fail(ctx.error_flag, what, peer);
}
// A producer at record `pos` waits until the consumer's head leaves a free slot.
__device__ void wait_space(const InternodeContext& ctx, const uint64_t* head, int pos, int slots, int what,
                           int peer) {
  if (int64_t(pos) - int64_t(ld_acquire_sys(head)) < slots) return;
  const long long start = clock64();
  while (int64_t(pos) - int64_t(ld_acquire_sys(head)) >= slots)
    if (expired(start, ctx)) fail(ctx.error_flag, what, peer);
}

// Consumed records not yet returned to a producer's head word (a signal add at PE `pe`).
struct HeadReturn {
  int pending = 0;
  __device__ void flush(uint64_t* head, int pe) {
    if (pending > 0) nvshmemx_signal_op(head, uint64_t(pending), NVSHMEM_SIGNAL_ADD, pe);
    pending = 0;
  }
};

// One warp copies int4s 16-byte words.
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int64_t int4s, int lane) {
  auto* d = static_cast<int4*>(dst);
  const auto* s = static_cast<const int4*>(src);
  for (int64_t i = lane; i < int4s; i += kWarpSize) d[i] = ld_cg_v4(s + i);
}

// Field offsets of a dispatch record (internode_layout.h).
struct DispatchRecord {
  int64_t row_bytes, meta, topk, weights, scales, bytes;
  __device__ DispatchRecord(int64_t row, int k, int s)
      : row_bytes(row),
        meta(row),
        topk(row + 8),
        weights(row + 8 + 4 * int64_t(k)),
        scales(row + 8 + 8 * int64_t(k)),
        bytes(internode_dispatch_record_bytes(row, k, s)) {}
};

// ---- sync, channel matrices, notify -----------------------------------------------------------------------

__device__ void barrier_round(const InternodeContext& ctx, const InternodeLayout& l, uint64_t target) {
  uint64_t* words = at<uint64_t>(ctx, l.barrier);
  __syncthreads();
  for (int r = threadIdx.x; r < ctx.num_ranks; r += blockDim.x)
    nvshmemx_signal_op(words + ctx.rank, 1, NVSHMEM_SIGNAL_ADD, r);
  for (int r = threadIdx.x; r < ctx.num_ranks; r += blockDim.x) {
    if (ld_acquire_sys(words + r) >= target) continue;
    const long long start = clock64();
    while (ld_acquire_sys(words + r) < target)
      if (expired(start, ctx)) fail(ctx.error_flag, kErrInternodeBarrier, r);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kNotifyThreads)
    internode_sync_kernel(InternodeContext ctx, InternodeLayout l, int64_t rounds_before) {
  barrier_round(ctx, l, uint64_t(rounds_before) + 1);  // every rank finished its previous call
  uint64_t* words = at<uint64_t>(ctx, l.reset_begin);
  for (int64_t i = threadIdx.x; i < (l.reset_end - l.reset_begin) / 8; i += blockDim.x) words[i] = 0;
  __threadfence_system();
  barrier_round(ctx, l, uint64_t(rounds_before) + 2);  // every rank's words are clean before any write
}

// Block b < R: gbl row of destination rank b; block R + p: rdma row of node p. One warp per channel.
__global__ void __launch_bounds__(kNotifyThreads)
    internode_channel_prefix_kernel(const bool* __restrict__ is_token_in_rank, int num_tokens, int num_ranks,
                                    int num_channels, int* rdma_channel_prefix_matrix,
                                    int* gbl_channel_prefix_matrix) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const bool is_node = int(blockIdx.x) >= num_ranks;
  const int row_index = is_node ? blockIdx.x - num_ranks : blockIdx.x;
  int* row = (is_node ? rdma_channel_prefix_matrix : gbl_channel_prefix_matrix) + row_index * num_channels;
  for (int c = warp; c < num_channels; c += kNotifyThreads / kWarpSize) {
    const TokenRange range = channel_token_range(num_tokens, num_channels, c);
    int count = 0;
    for (int t = range.begin + lane; t < range.end; t += kWarpSize) {
      const bool* in = is_token_in_rank + int64_t(t) * num_ranks;
      count += is_node ? node_bits(in, row_index) != 0 : in[row_index];
    }
    count = __reduce_add_sync(kFullMask, count);
    if (lane == 0) row[c] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int c = 1; c < num_channels; ++c) row[c] += row[c - 1];
}

__global__ void __launch_bounds__(kNotifyThreads)
    internode_notify_kernel(InternodeContext ctx, InternodeLayout l, const int* num_tokens_per_expert,
                            int num_local_experts, const int* rdma_channel_prefix_matrix,
                            const int* gbl_channel_prefix_matrix, int expert_alignment, int sequence,
                            int* recv_rdma_rank_prefix_sum, int* recv_gbl_rank_prefix_sum) {
  const int R = ctx.num_ranks, C = l.num_channels, L = num_local_experts, rank = ctx.rank;
  const int words = 2 + L, stride = int(l.notify_record_bytes / 4);
  int* send = at<int>(ctx, l.notify_send);
  // Record for peer r: rows sent to r, rows sent to r's node, rows sent to each of r's experts.
  for (int i = threadIdx.x; i < R * words; i += blockDim.x) {
    const int r = i / words, w = i % words;
    send[r * stride + w] = w == 0   ? gbl_channel_prefix_matrix[r * C + C - 1]
                           : w == 1 ? rdma_channel_prefix_matrix[(r / kP) * C + C - 1]
                                    : num_tokens_per_expert[r * L + w - 2];
  }
  __threadfence_system();  // the puts (P2P copies or the NIC) read the records
  __syncthreads();
  uint64_t* arrival = at<uint64_t>(ctx, l.notify_arrival);
  for (int r = threadIdx.x; r < R; r += blockDim.x)
    nvshmem_putmem_signal_nbi(at<int>(ctx, l.notify_recv) + rank * stride, send + r * stride, words * 4,
                              arrival + rank, 1, NVSHMEM_SIGNAL_SET, r);
  for (int s = threadIdx.x; s < R; s += blockDim.x) wait_nonzero(ctx, arrival + s, kErrInternodeNotify, s);
  __syncthreads();

  const int* recv = at<int>(ctx, l.notify_recv);
  __shared__ int s_num_recv, s_num_rdma_recv;
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int s = 0; s < R; ++s) recv_gbl_rank_prefix_sum[s] = sum += recv[s * stride];
    s_num_recv = sum;
  } else if (threadIdx.x == kWarpSize) {
    int sum = 0;
    for (int m = 0; m < l.num_nodes; ++m)
      recv_rdma_rank_prefix_sum[m] = sum += recv[(m * kP + rank % kP) * stride + 1];
    s_num_rdma_recv = sum;
  }
  int* host = ctx.host_counters;
  for (int e = threadIdx.x; e < L; e += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < R; ++s) sum += recv[s * stride + 2 + e];
    st_release_sys(host + kInternodeHostExperts + e, align_up(sum, expert_alignment));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    st_release_sys(host + kInternodeHostRecv, s_num_recv);
    st_release_sys(host + kInternodeHostRdmaRecv, s_num_rdma_recv);
    __threadfence_system();
    st_release_sys(host + kInternodeHostSeq, sequence);  // after every count of this call
  }
}

// ---- dispatch ---------------------------------------------------------------------------------------------

// Warp `warp` (0-7) of block 2c: the tokens of channel c going to nodes warp, warp + 8, ... in token order,
// each staged once per node and put into the forwarder's RDMA queue [c][our node].
__device__ void dispatch_rdma_send(const InternodeContext& ctx, const InternodeLayout& l,
                                   const InternodeDispatchArgs& a, int c, int warp, int lane) {
  const int R = ctx.num_ranks, N = l.num_nodes, C = l.num_channels, node = ctx.rank / kP,
            local = ctx.rank % kP;
  const DispatchRecord rec(a.row_bytes, a.num_topk, a.num_scales);
  const TokenRange range = channel_token_range(a.num_tokens, C, c);
  for (int p = warp; p < N; p += kP) {
    const int pe = p * kP + local;
    // The channel's ranges: in the stream to node p, and toward each of its ranks.
    if (lane < kInternodeMetaWords) {
      const int* row = lane == 0 ? a.rdma_channel_prefix_matrix + p * C
                                 : a.gbl_channel_prefix_matrix + (p * kP + lane - 1) * C;
      nvshmemx_signal_op(at<uint64_t>(ctx, l.rdma_meta_word(c, node, lane)),
                         pack_range(prefix_before(row, C, 0, c), row[c]), NVSHMEM_SIGNAL_SET, pe);
    }
    const uint64_t* head = at<uint64_t>(ctx, l.rdma_head_word(c, p));
    int pos = 0;
    for (int first = range.begin; first < range.end; first += kWarpSize) {
      const int t = first + lane;
      const uint32_t bits = t < range.end ? node_bits(a.is_token_in_rank + int64_t(t) * R, p) : 0;
      unsigned mask = __ballot_sync(kFullMask, bits != 0);
      if (a.send_rdma_head != nullptr && t < range.end)
        a.send_rdma_head[int64_t(t) * N + p] = bits ? pos + __popc(mask & ((1u << lane) - 1)) : -1;
      for (; mask; mask &= mask - 1, ++pos) {
        const int src_lane = __ffs(mask) - 1, token = first + src_lane;
        const uint32_t token_bits = __shfl_sync(kFullMask, bits, src_lane);
        const int slot = pos % l.rdma_slots;
        if (lane == 0) wait_space(ctx, head, pos, l.rdma_slots, kErrInternodeDispatchSend, pe);
        __syncwarp();
        uint8_t* staged = at<uint8_t>(ctx, l.rdma_send_slot(c, p, slot));
        warp_copy(staged, static_cast<const uint8_t*>(a.x) + int64_t(token) * a.row_bytes, a.row_bytes / 16,
                  lane);
        if (lane == 0) {
          reinterpret_cast<int*>(staged + rec.meta)[0] = ctx.rank;
          reinterpret_cast<int*>(staged + rec.meta)[1] = int(token_bits);
        }
        for (int i = lane; i < a.num_topk; i += kWarpSize) {
          reinterpret_cast<int*>(staged + rec.topk)[i] = int(a.topk_idx[int64_t(token) * a.num_topk + i]);
          reinterpret_cast<float*>(staged + rec.weights)[i] = a.topk_weights[int64_t(token) * a.num_topk + i];
        }
        for (int i = lane; i < a.num_scales; i += kWarpSize)
          reinterpret_cast<int*>(staged + rec.scales)[i] = a.x_scales[int64_t(token) * a.num_scales + i];
        __syncwarp();
        __threadfence();  // the put reads the staged record: this warp (P2P) or the NIC
        nvshmemx_putmem_signal_nbi_warp(at<uint8_t>(ctx, l.rdma_recv_slot(c, node, slot)), staged, rec.bytes,
                                        at<uint64_t>(ctx, l.rdma_flag_word(c, node, slot)), uint64_t(pos) + 1,
                                        NVSHMEM_SIGNAL_SET, pe);
      }
    }
  }
}

// Block 2c+1, warps 0-7 (warp j: the NVLink hop to local rank j): the RDMA records of channel c from source
// nodes 0, 1, ... in order; each goes to the ranks of this node its bits name.
__device__ void dispatch_forward(const InternodeContext& ctx, const InternodeLayout& l,
                                 const InternodeDispatchArgs& a, int c, int j, int lane) {
  constexpr int kBarrier = 1;
  const int N = l.num_nodes, C = l.num_channels, node = ctx.rank / kP, local = ctx.rank % kP;
  const int dst_pe = node * kP + j, tid = threadIdx.x;
  const DispatchRecord rec(a.row_bytes, a.num_topk, a.num_scales);
  __shared__ uint64_t s_meta[kInternodeMetaWords];
  const uint64_t* nvl_head = at<uint64_t>(ctx, l.nvl_head_word(c, j));
  int nvl_pos = 0;  // records sent to local rank j (warp-uniform)
  HeadReturn rdma_return;
  for (int m = 0; m < N; ++m) {
    const int src_pe = m * kP + local;
    if (tid < kInternodeMetaWords)
      s_meta[tid] = wait_nonzero(ctx, at<uint64_t>(ctx, l.rdma_meta_word(c, m, tid)),
                                 kErrInternodeDispatchForward, src_pe);
    group_sync(kBarrier, kGroupThreads);
    const int start = range_start(s_meta[0]), count = range_end(s_meta[0]) - start;
    if (tid == 0 && a.recv_rdma_channel_prefix_matrix != nullptr)
      a.recv_rdma_channel_prefix_matrix[m * C + c] = range_end(s_meta[0]);
    if (lane == 0)  // the range of (source rank m*8 + local, channel c) toward rank j
      nvshmemx_signal_op(at<uint64_t>(ctx, l.nvl_meta_word(c, local, m)), s_meta[1 + j], NVSHMEM_SIGNAL_SET,
                         dst_pe);
    const int first = (m > 0 ? a.recv_rdma_rank_prefix_sum[m - 1] : 0) + start;
    uint64_t* rdma_head = at<uint64_t>(ctx, l.rdma_head_word(c, node));  // at the source: its queue to us
    for (int i = 0; i < count; ++i) {
      const int slot = i % l.rdma_slots;
      const uint64_t* flag = at<uint64_t>(ctx, l.rdma_flag_word(c, m, slot));
      if (tid == 0 && ld_acquire_sys(flag) != uint64_t(i) + 1) {
        rdma_return.flush(rdma_head, src_pe);  // the source may be waiting for this space
        wait_equal(ctx, flag, uint64_t(i) + 1, kErrInternodeDispatchForward, src_pe);
      }
      group_sync(kBarrier, kGroupThreads);
      const int64_t token = first + i;
      if (token >= a.num_rdma_recv_capacity) fail(ctx.error_flag, kErrInternodeOverflow, src_pe);
      const uint8_t* record = at<uint8_t>(ctx, l.rdma_recv_slot(c, m, slot));
      const uint32_t bits = uint32_t(reinterpret_cast<const int*>(record + rec.meta)[1]);
      if (bits >> j & 1) {
        const int nvl_slot = nvl_pos % l.nvl_slots;
        if (lane == 0) wait_space(ctx, nvl_head, nvl_pos, l.nvl_slots, kErrInternodeDispatchForward, dst_pe);
        __syncwarp();
        // Blocking put: the record's RDMA slot is free for reuse once every warp returns.
        nvshmemx_putmem_signal_warp(at<uint8_t>(ctx, l.nvl_recv_slot(c, local, nvl_slot)), record, rec.bytes,
                                    at<uint64_t>(ctx, l.nvl_flag_word(c, local, nvl_slot)),
                                    uint64_t(nvl_pos) + 1, NVSHMEM_SIGNAL_SET, dst_pe);
        if (lane == 0 && a.send_nvl_head != nullptr) a.send_nvl_head[token * kP + j] = nvl_pos;
        ++nvl_pos;
      } else if (lane == 0 && a.send_nvl_head != nullptr) {
        a.send_nvl_head[token * kP + j] = -1;
      }
      group_sync(kBarrier, kGroupThreads);
      if (tid == 0 && ++rdma_return.pending >= a.rdma_chunk) rdma_return.flush(rdma_head, src_pe);
    }
    if (tid == 0) rdma_return.flush(rdma_head, src_pe);
    group_sync(kBarrier, kGroupThreads);  // s_meta is rewritten for the next source
  }
  if (tid == 0) nvshmem_quiet();  // the head adds land before this rank leaves the call
}

// Block 2c, warps 8-15 (forwarder f = warp - 8): rows of sources (m, f), m = 0, 1, ..., channel c, written at
// recv_gbl_rank_prefix_sum[s - 1] + the channel's start in source s's rows + i.
__device__ void dispatch_nvl_recv(const InternodeContext& ctx, const InternodeLayout& l,
                                  const InternodeDispatchArgs& a, int c, int f, int lane) {
  const int N = l.num_nodes, C = l.num_channels, node = ctx.rank / kP, local = ctx.rank % kP;
  const int forwarder_pe = node * kP + f, k = a.num_topk, L = a.num_local_experts;
  const DispatchRecord rec(a.row_bytes, k, a.num_scales);
  const int64_t expert_begin = int64_t(ctx.rank) * L;
  uint64_t* head = at<uint64_t>(ctx, l.nvl_head_word(c, local));  // at the forwarder
  HeadReturn ret;
  int pos = 0;
  for (int m = 0; m < N; ++m) {
    const int s = m * kP + f;
    uint64_t word = 0;
    if (lane == 0) {
      const uint64_t* meta = at<uint64_t>(ctx, l.nvl_meta_word(c, f, m));
      if (ld_acquire_sys(meta) == 0) ret.flush(head, forwarder_pe);
      word = wait_nonzero(ctx, meta, kErrInternodeDispatchRecv, forwarder_pe);
    }
    word = __shfl_sync(kFullMask, word, 0);
    const int count = range_end(word) - range_start(word);
    const int64_t base = (s > 0 ? a.recv_gbl_rank_prefix_sum[s - 1] : 0) + range_start(word);
    if (lane == 0 && a.recv_gbl_channel_prefix_matrix != nullptr)
      a.recv_gbl_channel_prefix_matrix[s * C + c] = int(base + count);
    for (int i = 0; i < count; ++i, ++pos) {
      const int slot = pos % l.nvl_slots;
      if (lane == 0) {
        const uint64_t* flag = at<uint64_t>(ctx, l.nvl_flag_word(c, f, slot));
        if (ld_acquire_sys(flag) != uint64_t(pos) + 1) {
          ret.flush(head, forwarder_pe);
          wait_equal(ctx, flag, uint64_t(pos) + 1, kErrInternodeDispatchRecv, forwarder_pe);
        }
      }
      __syncwarp();
      const int64_t row = base + i;
      if (row >= a.num_recv_capacity) fail(ctx.error_flag, kErrInternodeOverflow, s);
      const uint8_t* record = at<uint8_t>(ctx, l.nvl_recv_slot(c, f, slot));
      warp_copy(static_cast<uint8_t*>(a.recv_x) + row * a.row_bytes, record, a.row_bytes / 16, lane);
      const int* meta = reinterpret_cast<const int*>(record + rec.meta);
      if (lane < 2 && a.recv_src_meta != nullptr) a.recv_src_meta[row * 2 + lane] = meta[lane];
      for (int i2 = lane; i2 < k; i2 += kWarpSize) {
        // A -1 entry maps below 0 as well.
        const int64_t e = reinterpret_cast<const int*>(record + rec.topk)[i2] - expert_begin;
        const bool mine = e >= 0 && e < L;
        if (a.recv_topk_idx != nullptr) {
          a.recv_topk_idx[row * k + i2] = mine ? e : -1;
          a.recv_topk_weights[row * k + i2] =
              mine ? reinterpret_cast<const float*>(record + rec.weights)[i2] : 0.f;
        }
      }
      for (int i2 = lane; i2 < a.num_scales; i2 += kWarpSize)
        a.recv_x_scales[row * a.num_scales + i2] = reinterpret_cast<const int*>(record + rec.scales)[i2];
      __syncwarp();
      if (lane == 0 && ++ret.pending >= a.nvl_chunk) ret.flush(head, forwarder_pe);
    }
  }
  if (lane == 0) {
    ret.flush(head, forwarder_pe);
    nvshmem_quiet();
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    internode_dispatch_kernel(InternodeContext ctx, InternodeLayout l, InternodeDispatchArgs a) {
  const int c = blockIdx.x / 2, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (blockIdx.x % 2 == 0) {
    if (warp < kP)
      dispatch_rdma_send(ctx, l, a, c, warp, lane);
    else
      dispatch_nvl_recv(ctx, l, a, c, warp - kP, lane);
  } else if (warp < kP) {
    dispatch_forward(ctx, l, a, c, warp, lane);
  }
}

// ---- combine ----------------------------------------------------------------------------------------------

// Block 2c, warps 0-7 (warp f): this rank's rows of sources (m, f), channel c, back to forwarder f in the
// order they came (sources ascending, then rows), written straight into its NVLink queue through the P2P
// mapping.
__device__ void combine_nvl_send(const InternodeContext& ctx, const InternodeLayout& l,
                                 const InternodeCombineArgs& a, int c, int f, int lane) {
  const int N = l.num_nodes, C = l.num_channels, node = ctx.rank / kP, local = ctx.rank % kP;
  const int pe = node * kP + f, k = a.num_topk;
  const int64_t row_bytes = int64_t(a.hidden) * 2;
  const uint64_t* head = at<uint64_t>(ctx, l.nvl_head_word(c, f));
  auto* peer = static_cast<uint8_t*>(nvshmem_ptr(ctx.buffer, pe));  // checked non-null by the host
  int pos = 0;
  for (int m = 0; m < N; ++m) {
    const RowRange rows = gbl_row_range(a.recv_gbl_channel_prefix_matrix, C, m * kP + f, c);
    for (int64_t row = rows.begin; row < rows.end; ++row, ++pos) {
      const int slot = pos % l.nvl_slots;
      if (lane == 0) wait_space(ctx, head, pos, l.nvl_slots, kErrInternodeCombineSend, pe);
      __syncwarp();
      uint8_t* dst = peer + l.nvl_recv_slot(c, local, slot);
      warp_copy(dst, static_cast<const uint8_t*>(a.x) + row * row_bytes, row_bytes / 16, lane);
      for (int i = lane; i < k; i += kWarpSize)  // k is 0 without topk_weights
        reinterpret_cast<float*>(dst + row_bytes)[i] = a.topk_weights[row * k + i];
      __threadfence_system();  // every lane's stores reach the peer before the flag
      __syncwarp();
      if (lane == 0)
        nvshmemx_signal_op(at<uint64_t>(ctx, l.nvl_flag_word(c, local, slot)), uint64_t(pos) + 1,
                           NVSHMEM_SIGNAL_SET, pe);
    }
  }
}

// Block 2c+1 (all 512 threads): for each token this rank forwarded in channel c (source nodes ascending), the
// fp32 sum of its copies from local ranks 0..7 (send_nvl_head), rounded to bf16 once, put to the source.
__device__ void combine_forward(const InternodeContext& ctx, const InternodeLayout& l,
                                const InternodeCombineArgs& a, int c) {
  const int N = l.num_nodes, C = l.num_channels, node = ctx.rank / kP, local = ctx.rank % kP;
  const int tid = threadIdx.x, k = a.num_topk, int4s = a.hidden / 8;
  const int64_t row_bytes = int64_t(a.hidden) * 2, bytes = internode_combine_record_bytes(a.hidden, k);
  __shared__ int s_pos[kP];
  int nvl_taken = 0;  // thread j < 8: records of local rank j consumed (they are consumed in order)
  for (int m = 0; m < N; ++m) {
    const RowRange tokens =
        rdma_token_range(a.recv_rdma_channel_prefix_matrix, a.recv_rdma_rank_prefix_sum, C, m, c);
    const int pe = m * kP + local;
    const uint64_t* rdma_head = at<uint64_t>(ctx, l.rdma_head_word(c, m));
    for (int token = tokens.begin; token < tokens.end; ++token) {
      const int i = token - tokens.begin, slot = i % l.rdma_slots;
      if (token >= a.num_rdma_recv) fail(ctx.error_flag, kErrInternodeOverflow, pe);
      if (tid == 0) wait_space(ctx, rdma_head, i, l.rdma_slots, kErrInternodeCombineForward, pe);
      if (tid < kP) {
        const int q = a.send_nvl_head[int64_t(token) * kP + tid];
        s_pos[tid] = q;
        if (q >= 0)
          wait_equal(ctx, at<uint64_t>(ctx, l.nvl_flag_word(c, tid, q % l.nvl_slots)), uint64_t(q) + 1,
                     kErrInternodeCombineForward, node * kP + tid);
      }
      __syncthreads();
      uint8_t* staged = at<uint8_t>(ctx, l.rdma_send_slot(c, m, slot));
      for (int v = tid; v < int4s; v += kThreads) {
        float acc[8] = {};
#pragma unroll
        for (int j = 0; j < kP; ++j) {  // local ranks ascending: the reference's fp32 order
          if (s_pos[j] >= 0)
            add_bf16x8(acc,
                       ld_cg_v4(at<uint8_t>(ctx, l.nvl_recv_slot(c, j, s_pos[j] % l.nvl_slots)) + v * 16));
        }
        reinterpret_cast<int4*>(staged)[v] = pack_bf16x8(acc);
      }
      for (int i2 = tid; i2 < k; i2 += kThreads) {
        float sum = 0.f;
        for (int j = 0; j < kP; ++j) {
          if (s_pos[j] >= 0)
            sum += reinterpret_cast<const float*>(
                at<uint8_t>(ctx, l.nvl_recv_slot(c, j, s_pos[j] % l.nvl_slots)) + row_bytes)[i2];
        }
        reinterpret_cast<float*>(staged + row_bytes)[i2] = sum;
      }
      __threadfence();
      __syncthreads();
      if (tid < kWarpSize)
        nvshmemx_putmem_signal_nbi_warp(at<uint8_t>(ctx, l.rdma_recv_slot(c, node, slot)), staged, bytes,
                                        at<uint64_t>(ctx, l.rdma_flag_word(c, node, slot)), uint64_t(i) + 1,
                                        NVSHMEM_SIGNAL_SET, pe);
      // The copies were read: their slots go back to the local ranks at once (cheap P2P adds).
      if (tid < kP && s_pos[tid] >= 0) {
        ++nvl_taken;
        nvshmemx_signal_op(at<uint64_t>(ctx, l.nvl_head_word(c, local)), 1, NVSHMEM_SIGNAL_ADD,
                           node * kP + tid);
      }
      __syncthreads();
    }
  }
  if (tid < kP && nvl_taken > 0) nvshmem_quiet();
}

// Block 2c, warps 8-15 (256 threads, named barrier 1): this rank's tokens of channel c, one at a time:
// bias_0 + bias_1 + the node partials in node order, in fp32, one bf16 cast.
__device__ void combine_recv(const InternodeContext& ctx, const InternodeLayout& l,
                             const InternodeCombineArgs& a, int c) {
  constexpr int kBarrier = 1;
  const int N = l.num_nodes, C = l.num_channels, node = ctx.rank / kP, local = ctx.rank % kP;
  const int tid = threadIdx.x - kGroupThreads, k = a.num_topk, int4s = a.hidden / 8;
  const int64_t row_bytes = int64_t(a.hidden) * 2;
  const TokenRange range = channel_token_range(a.num_tokens, C, c);
  __shared__ int s_pos[kInternodeMaxNodes], s_waiting;
  HeadReturn ret;  // thread p < N: records of node p's queue consumed
  uint64_t* head = at<uint64_t>(ctx, l.rdma_head_word(c, node));
  for (int t = range.begin; t < range.end; ++t) {
    if (tid == 0) s_waiting = 0;
    group_sync(kBarrier, kGroupThreads);
    int pos = -1;
    bool ready = true;
    if (tid < N) {
      pos = a.send_rdma_head[int64_t(t) * N + tid];
      s_pos[tid] = pos;
      ready = pos < 0 || ld_acquire_sys(at<uint64_t>(ctx, l.rdma_flag_word(c, tid, pos % l.rdma_slots))) ==
                             uint64_t(pos) + 1;
      if (!ready) s_waiting = 1;
    }
    group_sync(kBarrier, kGroupThreads);
    if (tid < N) {
      if (s_waiting) ret.flush(head, tid * kP + local);  // a forwarder may wait for space in any queue
      if (!ready)
        wait_equal(ctx, at<uint64_t>(ctx, l.rdma_flag_word(c, tid, pos % l.rdma_slots)), uint64_t(pos) + 1,
                   kErrInternodeCombineRecv, tid * kP + local);
    }
    group_sync(kBarrier, kGroupThreads);
    const int4* b0 = static_cast<const int4*>(a.bias_0);
    const int4* b1 = static_cast<const int4*>(a.bias_1);
    for (int v = tid; v < int4s; v += kGroupThreads) {
      float acc[8] = {};
      if (b0 != nullptr) add_bf16x8(acc, __ldg(b0 + int64_t(t) * int4s + v));
      if (b1 != nullptr) add_bf16x8(acc, __ldg(b1 + int64_t(t) * int4s + v));
      for (int p = 0; p < N; ++p) {  // nodes ascending
        if (s_pos[p] >= 0)
          add_bf16x8(acc,
                     ld_cg_v4(at<uint8_t>(ctx, l.rdma_recv_slot(c, p, s_pos[p] % l.rdma_slots)) + v * 16));
      }
      static_cast<int4*>(a.combined_x)[int64_t(t) * int4s + v] = pack_bf16x8(acc);
    }
    if (a.combined_topk_weights != nullptr) {
      for (int i = tid; i < k; i += kGroupThreads) {
        float sum = 0.f;
        for (int p = 0; p < N; ++p) {
          if (s_pos[p] >= 0)
            sum += reinterpret_cast<const float*>(
                at<uint8_t>(ctx, l.rdma_recv_slot(c, p, s_pos[p] % l.rdma_slots)) + row_bytes)[i];
        }
        a.combined_topk_weights[int64_t(t) * k + i] = sum;
      }
    }
    group_sync(kBarrier, kGroupThreads);
    if (tid < N && pos >= 0 && ++ret.pending >= a.rdma_chunk) ret.flush(head, tid * kP + local);
  }
  if (tid < N) {
    ret.flush(head, tid * kP + local);
    nvshmem_quiet();
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    internode_combine_kernel(InternodeContext ctx, InternodeLayout l, InternodeCombineArgs a) {
  const int c = blockIdx.x / 2, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (blockIdx.x % 2 == 1) {
    combine_forward(ctx, l, a, c);
  } else if (warp < kP) {
    combine_nvl_send(ctx, l, a, c, warp, lane);
  } else {
    combine_recv(ctx, l, a, c);
  }
}

}  // namespace internode

using namespace internode;

bool internode_node_mapped(const void* buffer, int rank) {
  for (int j = 0; j < kP; ++j)
    if (nvshmem_ptr(buffer, rank / kP * kP + j) == nullptr) return false;
  return true;
}

cudaError_t internode_sync(const InternodeContext& ctx, const InternodeLayout& layout, int64_t rounds_before,
                           cudaStream_t stream) {
  internode_sync_kernel<<<1, kNotifyThreads, 0, stream>>>(ctx, layout, rounds_before);
  return cudaGetLastError();
}

cudaError_t internode_channel_prefix(const bool* is_token_in_rank, int num_tokens, int num_ranks,
                                     int num_channels, int* rdma_channel_prefix_matrix,
                                     int* gbl_channel_prefix_matrix, cudaStream_t stream) {
  internode_channel_prefix_kernel<<<num_ranks + num_ranks / kP, kNotifyThreads, 0, stream>>>(
      is_token_in_rank, num_tokens, num_ranks, num_channels, rdma_channel_prefix_matrix,
      gbl_channel_prefix_matrix);
  return cudaGetLastError();
}

cudaError_t internode_notify(const InternodeContext& ctx, const InternodeLayout& layout,
                             const int* num_tokens_per_expert, int num_local_experts,
                             const int* rdma_channel_prefix_matrix, const int* gbl_channel_prefix_matrix,
                             int expert_alignment, int sequence, int* recv_rdma_rank_prefix_sum,
                             int* recv_gbl_rank_prefix_sum, cudaStream_t stream) {
  internode_notify_kernel<<<1, kNotifyThreads, 0, stream>>>(
      ctx, layout, num_tokens_per_expert, num_local_experts, rdma_channel_prefix_matrix,
      gbl_channel_prefix_matrix, expert_alignment, sequence, recv_rdma_rank_prefix_sum,
      recv_gbl_rank_prefix_sum);
  return cudaGetLastError();
}

cudaError_t internode_dispatch(const InternodeContext& ctx, const InternodeLayout& layout,
                               const InternodeDispatchArgs& args, cudaStream_t stream) {
  internode_dispatch_kernel<<<2 * layout.num_channels, kThreads, 0, stream>>>(ctx, layout, args);
  return cudaGetLastError();
}

cudaError_t internode_combine(const InternodeContext& ctx, const InternodeLayout& layout,
                              const InternodeCombineArgs& args, cudaStream_t stream) {
  internode_combine_kernel<<<2 * layout.num_channels, kThreads, 0, stream>>>(ctx, layout, args);
  return cudaGetLastError();
}

}  // namespace dsv3::ep::nvshmem
