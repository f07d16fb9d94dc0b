// Host logic of the sm_90a FP8 GEMM kernels (csrc/cuda/fp8_gemm.cu), free of CUDA headers so CPU-only builds
// compile and test it: tile shapes, config choice (block sizes, stages, shared-memory bytes, waves), TMA
// descriptor parameters as plain structs, the shared-memory carve-up and the persistent tile scheduler. The
// kernels include this header and use the same layout and scheduler functions (DSV3_HD), never a copy.
#pragma once
#include <cstdint>
#include <string>

#ifdef __CUDACC__
#define DSV3_HD __host__ __device__ __forceinline__
#else
#define DSV3_HD inline
#endif

namespace dsv3::sm90 {

constexpr int kBlockK = 128;           // one scale block along K per pipeline stage (the report's N_C)
constexpr int kSmemCapacity = 232448;  // opt-in dynamic shared memory per block on sm_90
constexpr int kSmemAlign = 1024;       // 128B-swizzled TMA/WGMMA tiles start on 1024-byte boundaries
constexpr int kMinStages = 3;
constexpr int kMaxStages = 8;
constexpr int kRasterGroupN = 16;  // N blocks per rasterization band (B tiles shared through L2)
constexpr int kWarpgroupThreads = 128;
constexpr int kStagingAlign = 128;     // the bf16 output staging tile is a TMA store source
constexpr int kClusterMinRows = 1024;  // dense GEMMs from this many rows may run on 2-CTA clusters

enum class GemmKind : int { kDense = 0, kContiguous = 1, kMasked = 2, kWgrad = 3 };

struct TileShape {
  int block_m, block_n;
};
// The compiled instantiations (fp8_gemm.cu instantiates exactly these). block_m = 64 per math warpgroup;
// block_n includes a non-power of two (112) and one above 128 (160): their tiles may straddle two B-scale
// blocks.
constexpr TileShape kTileShapes[] = {{64, 16},  {64, 32},   {64, 64},   {64, 128},
                                     {128, 64}, {128, 112}, {128, 128}, {128, 160}};
constexpr TileShape kWgradTileShapes[] = {{128, 64}, {128, 128}};
constexpr int kNumTileShapes = sizeof(kTileShapes) / sizeof(kTileShapes[0]);
constexpr int kNumWgradTileShapes = sizeof(kWgradTileShapes) / sizeof(kWgradTileShapes[0]);

DSV3_HD constexpr int ceil_div_int(int a, int b) { return (a + b - 1) / b; }
DSV3_HD constexpr int align_up(int a, int b) { return ceil_div_int(a, b) * b; }
DSV3_HD constexpr int num_math_warpgroups(int block_m) { return block_m / 64; }
DSV3_HD constexpr int num_threads(int block_m) {
  return (num_math_warpgroups(block_m) + 1) * kWarpgroupThreads;
}

// Byte offsets into the (1024-aligned) dynamic shared memory of one CTA. Per stage: A [block_m][128] and
// B [block_n][128] e4m3 (128B-swizzled), A's scales [block_m] fp32 and, for wgrad, B's scales [block_n].
// Then the full/empty barriers, the B-scale blocks of the current tile (two rows of num_k_blocks floats: a
// tile may straddle two 128-row blocks; not for wgrad) and the bf16 output staging tile (not for wgrad, whose
// fp32 output is written straight from registers): dense [block_m][block_n] rows, the layout of a TMA store
// box without swizzle, 128-byte aligned.
struct SmemLayout {
  int a, b, sa, sb, full_bar, empty_bar, sb_blocks, staging, bytes;
};
DSV3_HD constexpr int staging_pitch_bytes(int block_n) { return block_n * 2; }
DSV3_HD constexpr SmemLayout smem_layout(int block_m, int block_n, int stages, bool wgrad, int num_k_blocks) {
  SmemLayout l{};
  l.a = 0;
  l.b = l.a + stages * block_m * kBlockK;
  l.sa = l.b + stages * block_n * kBlockK;
  l.sb = l.sa + stages * block_m * 4;
  l.full_bar = align_up(l.sb + (wgrad ? stages * block_n * 4 : 0), 8);
  l.empty_bar = l.full_bar + stages * 8;
  l.sb_blocks = align_up(l.empty_bar + stages * 8, 16);
  l.staging = align_up(l.sb_blocks + (wgrad ? 0 : 2 * num_k_blocks * 4), kStagingAlign);
  // + kSmemAlign: slack to align the dynamic shared-memory base up to 1024 bytes inside the kernel.
  l.bytes = l.staging + (wgrad ? 0 : block_m * staging_pitch_bytes(block_n)) + kSmemAlign;
  return l;
}
DSV3_HD constexpr int stage_tx_bytes(int block_m, int block_n, bool wgrad) {
  return block_m * kBlockK + block_n * kBlockK + block_m * 4 + (wgrad ? block_n * 4 : 0);
}

// Which bf16 tiles the kernel writes with one TMA store of the staged tile. A TMA store clips the box at the
// tensor's edges, which are the M/N tails of dense and contiguous GEMMs, so their tiles always use it. A
// masked GEMM's tensor holds M_max rows per group but only rows < masked_m[g] may be written: a full tile
// (rows >= block_m valid rows) uses the TMA store, a partial one (the last M block of a group) plain
// predicated stores.
DSV3_HD constexpr bool tile_uses_tma_store(GemmKind kind, int rows, int block_m) {
  return kind != GemmKind::kMasked || rows >= block_m;
}

// ---- persistent tile scheduler: CTA b visits tiles b, b + grid, b + 2 grid, ... Within a group, tiles are
// rasterized in bands of kRasterGroupN N blocks: consecutive tiles walk M inside a band, so the CTAs running
// at one time share the band's B tiles (and their A tiles) through L2.
struct TileCoord {
  int group, m_block, n_block;
};
DSV3_HD TileCoord raster_tile(int local, int num_m_blocks, int num_n_blocks) {
  const int band_tiles = num_m_blocks * kRasterGroupN;
  const int band = local / band_tiles;
  const int first_n = band * kRasterGroupN;
  const int width = num_n_blocks - first_n < kRasterGroupN ? num_n_blocks - first_n : kRasterGroupN;
  const int in_band = local - band * band_tiles;
  return {0, in_band / width, first_n + in_band % width};
}

// Dense, contiguous-grouped and wgrad GEMMs walk one [num_m_blocks x num_n_blocks] grid (the contiguous group
// of an M block comes from m_indices, read by the kernel). Masked GEMMs walk the groups one after the other,
// group g having ceil(rows_of(g) / block_m) M blocks; rows_of reads masked_m (device memory in the kernel).
template <class RowsOfGroup>
struct TileScheduler {
  bool masked;
  int num_groups, num_m_blocks, num_n_blocks, block_m;
  RowsOfGroup rows_of;
  int next_tile, stride;
  int group = 0, group_first_tile = 0;

  DSV3_HD bool next(TileCoord& tile) {
    const int t = next_tile;
    next_tile += stride;
    if (!masked) {
      if (t >= num_m_blocks * num_n_blocks) return false;
      tile = raster_tile(t, num_m_blocks, num_n_blocks);
      return true;
    }
    for (; group < num_groups; ++group) {  // t only grows, so the walk resumes where it stopped
      const int m_blocks = ceil_div_int(rows_of(group), block_m);
      if (t < group_first_tile + m_blocks * num_n_blocks) {
        tile = raster_tile(t - group_first_tile, m_blocks, num_n_blocks);
        tile.group = group;
        return true;
      }
      group_first_tile += m_blocks * num_n_blocks;
    }
    return false;
  }
};

// 2-CTA clusters: CTAs 2c and 2c + 1 form a cluster; the first loads the A tile and A's scales of each stage
// once and multicasts them into both CTAs' shared memory, each loads its own B tile. That needs the pair to
// run tiles of one M block at every step, in lockstep: a dense GEMM (no skipped or masked tiles) with an even
// number of N blocks (every raster band then has an even width, so tiles 2i and 2i + 1 share their M block
// and are adjacent in N) and an even grid (CTA 2c runs tiles 2c + i grid, even, and both CTAs run as many
// tiles). Only where A traffic matters: m >= kClusterMinRows.
DSV3_HD constexpr int choose_cluster_size(GemmKind kind, int64_t m, int num_n_blocks, int grid) {
  return kind == GemmKind::kDense && m >= kClusterMinRows && num_n_blocks % 2 == 0 && grid % 2 == 0 ? 2 : 1;
}

// ---- TMA descriptor parameters (cuTensorMapEncodeTiled's arguments), 3-D: dim 0 is contiguous.
struct TmaParams {
  int elem_bytes;             // 1 (e4m3, as uint8), 2 (bf16) or 4 (fp32)
  uint64_t dims[3];           // elements
  uint64_t strides_bytes[2];  // of dims 1 and 2
  uint32_t box[3];            // elements
  int swizzle_bytes;          // 0 (none) or 128
};
// An e4m3 operand [groups][rows][k] (rows apart by row_stride bytes): boxes of 128 K bytes x block_rows rows,
// 128B swizzle (the WGMMA K-major layout).
TmaParams tma_operand(int64_t rows, int64_t k, int64_t groups, int64_t row_stride, int64_t group_stride,
                      int block_rows);
// fp32 scales, MN-major [groups][k_blocks][rows] (rows contiguous, k blocks apart by kb_stride elements):
// boxes of block_rows scales of one K block.
TmaParams tma_scales(int64_t rows, int64_t k_blocks, int64_t groups, int64_t kb_stride, int64_t group_stride,
                     int block_rows);
// The bf16 output [groups][rows][n] (rows apart by row_stride, groups by group_stride elements) as a TMA
// store destination: boxes of block_n x block_m, no swizzle (the staging tile's layout).
TmaParams tma_output(int64_t rows, int64_t n, int64_t groups, int64_t row_stride, int64_t group_stride,
                     int block_m, int block_n);
// Empty when cuTensorMapEncodeTiled accepts p (dims >= 1, strides multiples of 16 bytes, boxes <= 256, a
// swizzled box row <= the swizzle span), else why not.
std::string tma_problem(const TmaParams& p);

// ---- config choice
struct GemmConfig {
  bool ok = false;
  std::string reason;  // why no kernel config fits (then the op falls back), empty when ok
  int block_m = 0, block_n = 0, stages = 0, smem_bytes = 0, cluster_size = 1;
  int num_m_blocks = 0, num_n_blocks = 0, num_tiles = 0, grid = 0, num_waves = 0;
  double last_wave_util = 0;  // fraction of SMs busy in the last wave
};
// m: rows (dense/wgrad), sum of rows (contiguous), expected rows per group (masked); n, k: the problem's N, K
// (k: of one group for k-grouped wgrad). Minimizes the estimated time waves x (block_m + 32) x (block_n + 32)
// (the +32s stand for per-tile costs that do not shrink with the tile: scale loads, promotion, epilogue),
// ties broken by the larger tile; the stages are as many as fit in shared memory (<= kMaxStages); the cluster
// size by choose_cluster_size.
GemmConfig select_config(GemmKind kind, int64_t m, int64_t n, int64_t k, int64_t num_groups, int num_sms);
// Shared-memory stages for a tile shape, 0 when fewer than kMinStages fit.
int stages_that_fit(int block_m, int block_n, bool wgrad, int num_k_blocks);

// The JSON behind torch.ops.dsv3.sm90_gemm_plan (kind: dense | contiguous | masked | wgrad): the config, the
// TMA parameters of contiguous operands and the scheduler's tile order (masked: every group with m rows).
std::string gemm_plan_json(const std::string& kind, int64_t m, int64_t n, int64_t k, int64_t num_groups,
                           int64_t num_sms);

}  // namespace dsv3::sm90
