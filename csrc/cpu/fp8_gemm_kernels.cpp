// The CPU FP8 GEMM engine: run_gemms splits a batch of problems into tiles that ATen's intra-op threads take
// from a shared queue, each tile going to the AVX-512 kernel (fp8_gemm_avx512.cpp) or to the portable C++17
// kernel below, chosen at run time.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "dsv3/cpu_features.h"
#include "fp8_gemm_kernel.h"

namespace dsv3::cpu {
namespace {

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }
int64_t round_up(int64_t x, int64_t to) { return ceil_div(x, to) * to; }

// e4m3fn byte -> float, exact: bias 7, 3 mantissa bits, subnormals, 0x7F/0xFF are NaN.
struct E4m3Table {
  float value[256];
  E4m3Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      const float v = (b & 0x7F) == 0x7F ? NAN
                      : e == 0           ? std::ldexp(float(m), -9)
                                         : std::ldexp(float(8 + m), e - 10);
      value[b] = b & 0x80 ? -v : v;
    }
  }
};

uint16_t to_bf16(float v) {  // round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)
  if (std::isnan(v)) return 0x7FC0;
  uint32_t x;
  std::memcpy(&x, &v, 4);
  return uint16_t((x + 0x7FFF + ((x >> 16) & 1)) >> 16);
}

// D[m, n0 + j] (+)= values[j] for j < cols.
void store_row(const GemmProblem& p, int64_t m, int64_t n0, int64_t cols, const float* values) {
  const int64_t off = m * p.ldd + n0;
  if (p.d_type == OutType::kF32) {
    float* d = static_cast<float*>(p.d) + off;
    for (int64_t j = 0; j < cols; ++j) d[j] = p.accumulate ? d[j] + values[j] : values[j];
  } else {
    uint16_t* d = static_cast<uint16_t*>(p.d) + off;
    for (int64_t j = 0; j < cols; ++j) d[j] = to_bf16(values[j]);
  }
}

// 16 partial sums let the compiler vectorize the dot product without reassociating.
float dot_block(const float* x, const float* y) {
  float part[16] = {};
  for (int64_t k = 0; k < kScaleBlockK; k += 16)
    for (int l = 0; l < 16; ++l) part[l] += x[k + l] * y[k + l];
  float sum = 0.f;
  for (float v : part) sum += v;
  return sum;
}

void convert_block(const float* lut, const uint8_t* src, int64_t len, float* dst) {
  for (int64_t k = 0; k < len; ++k) dst[k] = lut[src[k]];
  std::fill(dst + len, dst + kScaleBlockK, 0.f);
}

}  // namespace

// Portable kernel, DeepGEMM's promotion literally: per 128-wide K block, exact fp32 products summed into a
// block sum, then acc += block_sum * sa * sb. Both operands are converted once per block into zero-padded
// fp32 rows.
void gemm_tile_portable(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* scratch) {
  static_assert((kTileMaxN * kScaleBlockK + kScaleBlockK + kTileMaxM * kTileMaxN) * 4 <= kScratchBytes);
  static const E4m3Table e4m3;
  const int64_t rows = m1 - m0, cols = n1 - n0;
  float* b_f = static_cast<float*>(scratch);    // [cols][kScaleBlockK]
  float* a_f = b_f + kTileMaxN * kScaleBlockK;  // [kScaleBlockK]
  float* acc = a_f + kScaleBlockK;              // [rows][cols]
  std::fill(acc, acc + rows * cols, 0.f);
  for (int64_t k0 = 0; k0 < p.k; k0 += kScaleBlockK) {
    const int64_t kb = k0 / kScaleBlockK, kc = std::min(kScaleBlockK, p.k - k0);
    for (int64_t j = 0; j < cols; ++j)
      convert_block(e4m3.value, p.b + (n0 + j) * p.ldb + k0, kc, b_f + j * kScaleBlockK);
    for (int64_t i = 0; i < rows; ++i) {
      convert_block(e4m3.value, p.a + (m0 + i) * p.lda + k0, kc, a_f);
      const float sa = p.sa[(m0 + i) * p.sa_sm + kb * p.sa_sk];
      for (int64_t j = 0; j < cols; ++j)
        acc[i * cols + j] +=
            dot_block(a_f, b_f + j * kScaleBlockK) * sa * p.sb[(n0 + j) / p.sb_rows * p.sb_sn + kb * p.sb_sk];
    }
  }
  for (int64_t i = 0; i < rows; ++i) store_row(p, m0 + i, n0, cols, acc + i * cols);
}

namespace {

constexpr int64_t kSplitMinK = 1024;  // K range of one split-K part at least

// A decode problem with too few B row blocks for the threads is split along K: each part computes its K range
// into an fp32 partial of D, and the part that finishes a column block last sums the partials into D.
struct SplitK {
  const GemmProblem& whole;
  int64_t parts;
  std::vector<float> partials;                         // [parts][m][n]
  std::unique_ptr<std::atomic<int64_t>[]> parts_done;  // per column block
};

struct Tile {
  GemmProblem problem;  // the problem itself or, for a split-K part, its K range writing to a partial
  int64_t m0, m1, n0, n1;
  SplitK* split;
  int64_t block;  // column block index within the split
};

GemmProblem k_part(SplitK& s, int64_t part, int64_t part_k) {
  GemmProblem q = s.whole;
  const int64_t k0 = part * part_k, kb0 = k0 / kScaleBlockK;
  q.k = std::min(part_k, q.k - k0);
  q.a += k0;
  q.b += k0;
  q.sa += kb0 * q.sa_sk;
  q.sb += kb0 * q.sb_sk;
  q.d = s.partials.data() + part * q.m * q.n;
  q.ldd = q.n;
  q.d_type = OutType::kF32;
  q.accumulate = false;
  return q;
}

// About 8 tiles per thread let the shared queue balance uneven tiles. Decode tiles keep all M rows (B is then
// streamed once) and are 16, 32, 64 or a multiple of 128 rows, so none straddles a 128-row block of sb (each
// block met costs the kernel a conversion of A, which must stay small next to streaming the tile's B: hence
// the minimum rows, and split-K when that leaves too few tiles). Taller tiles stay >= 64 columns wide to
// amortize converting A.
void plan_tiles(const GemmProblem& p, int64_t threads, std::vector<Tile>& tiles,
                std::vector<std::unique_ptr<SplitK>>& splits) {
  int64_t tile_m = p.m, tile_n, parts = 1;
  if (p.m <= kGemvMaxM) {
    const int64_t want = std::clamp(ceil_div(p.n, 8 * threads), int64_t(16), kTileMaxN);
    tile_n = want >= 128 ? want / 128 * 128 : int64_t(1) << (63 - __builtin_clzll(uint64_t(want)));
    const int64_t min_rows = p.m <= 2 ? 32 : p.m <= 4 ? 64 : 128;
    if (tile_n < min_rows) {
      tile_n = min_rows;
      parts = std::max(int64_t(1), std::min(ceil_div(8 * threads, ceil_div(p.n, tile_n)), p.k / kSplitMinK));
    }
  } else {
    tile_m = round_up(ceil_div(p.m, ceil_div(p.m, kTileMaxM)), kTileMRound);
    const int64_t n_tiles = ceil_div(8 * threads, ceil_div(p.m, tile_m));
    tile_n = std::clamp(round_up(ceil_div(p.n, n_tiles), kTileNRound), int64_t(64), kTileMaxN);
  }
  SplitK* split = nullptr;
  const int64_t part_k = round_up(ceil_div(p.k, parts), kScaleBlockK);
  if (parts > 1) {
    parts = ceil_div(p.k, part_k);
    splits.push_back(
        std::unique_ptr<SplitK>(new SplitK{p, parts, std::vector<float>(parts * p.m * p.n),
                                           std::make_unique<std::atomic<int64_t>[]>(ceil_div(p.n, tile_n))}));
    split = splits.back().get();
  }
  for (int64_t n0 = 0; n0 < p.n; n0 += tile_n)  // consecutive tiles share B columns
    for (int64_t m0 = 0; m0 < p.m; m0 += tile_m)
      for (int64_t part = 0; part < parts; ++part)
        tiles.push_back({split ? k_part(*split, part, part_k) : p, m0, std::min(p.m, m0 + tile_m), n0,
                         std::min(p.n, n0 + tile_n), split, n0 / tile_n});
}

// Sums the partials of columns [n0, n1) into D; `row` holds n1 - n0 floats.
void reduce_split(const SplitK& s, int64_t n0, int64_t n1, float* row) {
  const GemmProblem& p = s.whole;
  for (int64_t m = 0; m < p.m; ++m) {
    std::fill(row, row + (n1 - n0), 0.f);
    for (int64_t part = 0; part < s.parts; ++part) {
      const float* partial = s.partials.data() + (part * p.m + m) * p.n;
      for (int64_t n = n0; n < n1; ++n) row[n - n0] += partial[n];
    }
    store_row(p, m, n0, n1 - n0, row);
  }
}

}  // namespace

void run_gemms(const GemmProblem* problems, int64_t count) {
  const int64_t threads = at::get_num_threads();
  std::vector<Tile> tiles;
  std::vector<std::unique_ptr<SplitK>> splits;
  std::vector<float> zeros;
  for (int64_t i = 0; i < count; ++i) {
    const GemmProblem& p = problems[i];
    if (p.k == 0 && !p.accumulate) {  // an empty sum
      zeros.resize(std::max(zeros.size(), size_t(p.n)));
      for (int64_t m = 0; m < p.m; ++m) store_row(p, m, 0, p.n, zeros.data());
    } else if (p.m > 0 && p.n > 0 && p.k > 0) {
      plan_tiles(p, threads, tiles, splits);
    }
  }
  const int64_t num_tiles = int64_t(tiles.size()), slots = std::min(threads, num_tiles);
  if (num_tiles == 0) return;
  const auto tile_kernel = active_cpu_path() == CpuPath::kAvx512 ? gemm_tile_avx512 : gemm_tile_portable;
  const std::unique_ptr<void, decltype(&std::free)> scratch(std::aligned_alloc(64, slots * kScratchBytes),
                                                            &std::free);
  TORCH_CHECK(scratch, "fp8 gemm: cannot allocate ", slots * kScratchBytes, " bytes of scratch");
  std::atomic<int64_t> next{0};
  // One call per slot; each pulls tiles until the queue is empty (a nested, serial call runs them all).
  at::parallel_for(0, slots, 1, [&](int64_t slot, int64_t) {
    void* slot_scratch = static_cast<char*>(scratch.get()) + slot * kScratchBytes;
    for (int64_t i = next++; i < num_tiles; i = next++) {
      const Tile& t = tiles[i];
      tile_kernel(t.problem, t.m0, t.m1, t.n0, t.n1, slot_scratch);
      if (t.split &&
          t.split->parts_done[t.block].fetch_add(1, std::memory_order_acq_rel) == t.split->parts - 1)
        reduce_split(*t.split, t.n0, t.n1, static_cast<float*>(slot_scratch));
    }
  });
}

}  // namespace dsv3::cpu
