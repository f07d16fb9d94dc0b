// The split-KV tile scheduler of MLA decode (SPEC §4), shared by the CPU kernel, the CUDA metadata kernel
// and the CUDA decode kernel: plain integer code compiled for host and device, so both sides build the
// same schedule from the same `cache_seqlens`.
//
// Workers ("parts": SM groups on a GPU, threads on a CPU) each take one contiguous run of the requests'
// 64-token KV blocks, in request order. A request costs ceil(seqlen / 64) blocks plus kFixedCostBlocks (the
// per-request prologue/epilogue), and every part gets about the same cost. A request whose blocks are
// shared by several parts is split: each part computes a partial (fp32 out normalised by its own row sum,
// plus its lse) and a combine step merges them. `num_splits[b + 1]` is a prefix sum: request i owns
// split slots [num_splits[i], num_splits[i + 1]); a request with one slot is written straight to the output.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DSV3_HOST_DEVICE __host__ __device__
#else
#define DSV3_HOST_DEVICE
#endif

namespace dsv3::mla {

constexpr int kPageSize = 64;        // tokens per KV-cache page (and per scheduled block)
constexpr int kFixedCostBlocks = 5;  // cost of a request beyond its blocks, in blocks
constexpr int kMetaInts = 8;         // ints per part in the metadata tensor
constexpr int kRowsPerTile = 64;     // packed query rows per tile (the CUDA kernel's M)

// One part's work, as stored in row p of the int32 metadata tensor [num_parts, kMetaInts].
// Requests begin_req .. end_req (inclusive); blocks [begin_block, ...) of the first, [0, end_block) of the
// last (end_block is exclusive; the first and last request may be the same). begin_split is the split index
// of the first request's slice (later requests start at split 0). A part with no work has
// begin_req > end_req.
struct PartMeta {
  int32_t begin_req, begin_block, end_req, end_block, begin_split;
};
enum MetaField : int { kBeginReq = 0, kBeginBlock = 1, kEndReq = 2, kEndBlock = 3, kBeginSplit = 4 };

DSV3_HOST_DEVICE inline int32_t num_blocks_of(int32_t seqlen) {
  return seqlen <= 0 ? 0 : (seqlen + kPageSize - 1) / kPageSize;
}

// Parts for `workers` workers when each (KV head, 64-row query tile) pair already occupies one of them:
// max(1, workers / h_kv / ceil(q_rows / 64)), q_rows = s_q * h_q / h_kv.
DSV3_HOST_DEVICE inline int32_t num_parts_for(int64_t workers, int64_t num_heads_k, int64_t q_rows) {
  const int64_t tiles = num_heads_k * ((q_rows + kRowsPerTile - 1) / kRowsPerTile);
  const int64_t parts = tiles > 0 ? workers / tiles : workers;
  return static_cast<int32_t>(parts < 1 ? 1 : parts);
}

DSV3_HOST_DEVICE inline PartMeta load_part(const int32_t* meta, int64_t part) {
  const int32_t* m = meta + part * kMetaInts;
  return {m[kBeginReq], m[kBeginBlock], m[kEndReq], m[kEndBlock], m[kBeginSplit]};
}

// Block range [first, last) of request `req` inside part `pm` (requires begin_req <= req <= end_req).
DSV3_HOST_DEVICE inline void part_block_range(const PartMeta& pm, int32_t req, int32_t req_blocks,
                                              int32_t* first, int32_t* last) {
  *first = req == pm.begin_req ? pm.begin_block : 0;
  *last = req == pm.end_req ? pm.end_block : req_blocks;
}

// Fills meta[num_parts * kMetaInts] and num_splits[batch + 1] for `seqlens[batch]` (negative lengths count
// as 0; callers validate them). Every request gets at least one split, also an empty one (its part writes
// out = 0, lse = +inf); the total number of splits is at most batch + num_parts.
DSV3_HOST_DEVICE inline void build_schedule(const int32_t* seqlens, int32_t batch, int32_t num_parts,
                                            int32_t* meta, int32_t* num_splits) {
  int64_t total = 0;
  for (int32_t i = 0; i < batch; ++i) total += num_blocks_of(seqlens[i]) + kFixedCostBlocks;
  const int64_t payload = (total + num_parts - 1) / num_parts + kFixedCostBlocks;

  int32_t req = 0, block = 0, split = 0, cum = 0;
  num_splits[0] = 0;
  for (int32_t p = 0; p < num_parts; ++p) {
    int32_t* m = meta + int64_t(p) * kMetaInts;
    for (int i = 0; i < kMetaInts; ++i) m[i] = 0;
    m[kBeginReq] = req;
    m[kBeginBlock] = block;
    m[kBeginSplit] = split;
    int64_t remain = payload;
    while (req < batch) {
      const int32_t left = num_blocks_of(seqlens[req]) - block;
      if (remain >= left + kFixedCostBlocks || p == num_parts - 1) {
        // The request ends in this part (the last part takes whatever is left, which the payload bound
        // makes empty in exact arithmetic; it keeps the schedule complete for any input).
        cum += split + 1;
        num_splits[req + 1] = cum;
        remain -= left + kFixedCostBlocks;
        ++req;
        block = 0;
        split = 0;
      } else {
        const int64_t take = remain - kFixedCostBlocks;
        if (take > 0) {  // a slice of the request, then a new split for the next part
          block += static_cast<int32_t>(take);
          ++split;
        }
        break;
      }
    }
    if (block > 0) {
      m[kEndReq] = req;
      m[kEndBlock] = block;
    } else {
      m[kEndReq] = req - 1;
      m[kEndBlock] = req > 0 ? num_blocks_of(seqlens[req - 1]) : 0;
    }
  }
}

}  // namespace dsv3::mla
