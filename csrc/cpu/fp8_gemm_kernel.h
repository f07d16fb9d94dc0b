// The CPU FP8 block-scaled GEMM engine: one problem description shared by every GEMM op (dense, grouped,
// wgrad) and the entry that runs a batch of them. Torch-free so the AVX-512 file can include it.
#pragma once
#include <cstdint>

namespace dsv3::cpu {

enum class OutType : int { kBF16 = 0, kF32 = 1 };

// D[m, n] (+)= sum_kb (sum_{k in kb} A[m, k] * B[n, k]) * sa[m, kb] * sb[n / sb_rows, kb]
// A and B hold float8_e4m3fn bytes, K contiguous; kb runs over 128-wide K blocks (the last may be partial).
struct GemmProblem {
  int64_t m = 0, n = 0, k = 0;
  const uint8_t* a = nullptr;
  int64_t lda = 0;  // elements between rows of A
  const uint8_t* b = nullptr;
  int64_t ldb = 0;
  const float* sa = nullptr;  // sa[m, kb] at sa[m * sa_sm + kb * sa_sk]
  int64_t sa_sm = 0, sa_sk = 0;
  const float* sb = nullptr;  // sb[r, kb] at sb[r * sb_sn + kb * sb_sk], r = n / sb_rows
  int64_t sb_sn = 0, sb_sk = 0;
  int64_t sb_rows = 128;  // 128: block-scaled weights; 1: per-row 1x128 scales (wgrad)
  void* d = nullptr;
  int64_t ldd = 0;
  OutType d_type = OutType::kBF16;
  bool accumulate = false;  // D += result (fp32 D only) instead of D = result
};

constexpr int64_t kScaleBlockK = 128;

// Runs every problem (their outputs must not overlap), parallel over ATen's intra-op threads.
void run_gemms(const GemmProblem* problems, int64_t count);

// The per-ISA tile kernels behind run_gemms: compute D[m0:m1, n0:n1] of one problem with a per-thread,
// 64-byte aligned `scratch` of kScratchBytes. A tile of at most kGemvMaxM rows holds all M rows of its
// problem (decode: every B byte is then read from memory once); taller tiles are at most kTileMaxM x
// kTileMaxN, sized in multiples of the AVX-512 micro-tile (kTileMRound x kTileNRound).
constexpr int64_t kGemvMaxM = 16;
constexpr int64_t kTileMRound = 14, kTileNRound = 32;
constexpr int64_t kTileMaxM = 20 * kTileMRound, kTileMaxN = 256;
constexpr int64_t kScratchBytes = int64_t(1) << 20;
void gemm_tile_portable(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* scratch);
void gemm_tile_avx512(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* scratch);

}  // namespace dsv3::cpu
