// The CPU MLA decode kernel's interface (SPEC §4): one problem description and the per-ISA entry that
// attends one tile of packed query rows over a range of KV pages. Torch-free so the AVX-512 file can
// include it; the op entries (validation, schedule, threading, combine) are in mla_decode.cpp.
#pragma once
#include <cstdint>

namespace dsv3::cpu {

enum class MlaType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kFp8Packed = 3 };

struct MlaProblem {
  int64_t s_q = 0, h_q = 0, h_kv = 0, d_qk = 0, d_v = 0;
  int64_t group = 1;  // h_q / h_kv: packed row r of a KV head is token r / group, head hk * group + r % group
  const void* q = nullptr;
  int64_t q_sb = 0, q_ss = 0, q_sh = 0;  // element strides of q [b, s_q, h_q, d_qk] (last dim contiguous)
  MlaType q_type = MlaType::kBF16;
  const void* kv = nullptr;
  int64_t kv_sp = 0, kv_st = 0, kv_sh = 0;  // element strides (bytes for the packed FP8 cache)
  MlaType kv_type = MlaType::kBF16;
  const int32_t* block_table = nullptr;
  int64_t bt_stride = 0;
  const int32_t* seqlens = nullptr;
  float scale_log2 = 0.f;  // softmax_scale * log2(e): scores live in the log2 domain (exp2)
  bool causal = false;     // applied only when s_q > 1
};

// Rows of one tile: at most kMlaTileRows packed rows of one (request, KV head).
constexpr int64_t kMlaTileRows = 64;
constexpr int64_t kMlaPage = 64;  // tokens per cache page

// Bytes of the per-call scratch the tile entries need (64-byte aligned by the caller).
int64_t mla_scratch_bytes(int64_t d_qk, int64_t d_v);

// Attends packed rows [row0, row1) of KV head `hk` of request `req` over KV pages [first_block, last_block)
// of the request. Writes O normalised by its own row sum (fp32 [rows, d_v], row stride ldo) and the natural
// log lse per row; a row that saw no key gets O = 0 and lse = -inf (a split's partial; the caller maps
// the final result to out = 0, lse = +inf).
void mla_attend_portable(const MlaProblem& p, int64_t req, int64_t hk, int64_t row0, int64_t row1,
                         int64_t first_block, int64_t last_block, float* o, int64_t ldo, float* lse,
                         void* scratch);
void mla_attend_avx512(const MlaProblem& p, int64_t req, int64_t hk, int64_t row0, int64_t row1,
                       int64_t first_block, int64_t last_block, float* o, int64_t ldo, float* lse,
                       void* scratch);

}  // namespace dsv3::cpu
