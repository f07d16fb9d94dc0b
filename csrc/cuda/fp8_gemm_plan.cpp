// Host logic of the sm_90a FP8 GEMMs (declared in dsv3/sm90/fp8_gemm_plan.h): config choice, TMA parameters
// and the JSON plan behind torch.ops.dsv3.sm90_gemm_plan. Always compiled, also without CUDA, so CPU tests
// pin it.
#include "dsv3/sm90/fp8_gemm_plan.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace dsv3::sm90 {

TmaParams tma_operand(int64_t rows, int64_t k, int64_t groups, int64_t row_stride, int64_t group_stride,
                      int block_rows) {
  return {1,
          {uint64_t(k), uint64_t(rows), uint64_t(groups)},
          {uint64_t(row_stride), uint64_t(group_stride)},
          {uint32_t(kBlockK), uint32_t(block_rows), 1},
          128};
}

TmaParams tma_scales(int64_t rows, int64_t k_blocks, int64_t groups, int64_t kb_stride, int64_t group_stride,
                     int block_rows) {
  return {4,
          {uint64_t(rows), uint64_t(k_blocks), uint64_t(groups)},
          {uint64_t(kb_stride) * 4, uint64_t(group_stride) * 4},
          {uint32_t(block_rows), 1, 1},
          0};
}

TmaParams tma_output(int64_t rows, int64_t n, int64_t groups, int64_t row_stride, int64_t group_stride,
                     int block_m, int block_n) {
  return {2,
          {uint64_t(n), uint64_t(rows), uint64_t(groups)},
          {uint64_t(row_stride) * 2, uint64_t(group_stride) * 2},
          {uint32_t(block_n), uint32_t(block_m), 1},
          0};
}

std::string tma_problem(const TmaParams& p) {
  std::ostringstream why;
  for (int i = 0; i < 3; ++i) {
    if (p.dims[i] < 1 || p.dims[i] > (uint64_t(1) << 32)) why << "dim " << i << " not in [1, 2^32]; ";
    if (p.box[i] < 1 || p.box[i] > 256) why << "box " << i << " not in [1, 256]; ";
  }
  for (int i = 0; i < 2; ++i)
    if (p.strides_bytes[i] % 16 != 0 || p.strides_bytes[i] >= (uint64_t(1) << 40))
      why << "stride " << i + 1 << " (" << p.strides_bytes[i] << " B) not a multiple of 16 below 2^40; ";
  if ((p.box[0] * p.elem_bytes) % 16 != 0) why << "box row not a multiple of 16 bytes; ";
  if (p.swizzle_bytes != 0 && int(p.box[0]) * p.elem_bytes > p.swizzle_bytes)
    why << "box row wider than the swizzle span; ";
  return why.str();
}

int stages_that_fit(int block_m, int block_n, bool wgrad, int num_k_blocks) {
  for (int stages = kMaxStages; stages >= kMinStages; --stages)
    if (smem_layout(block_m, block_n, stages, wgrad, num_k_blocks).bytes <= kSmemCapacity) return stages;
  return 0;
}

GemmConfig select_config(GemmKind kind, int64_t m, int64_t n, int64_t k, int64_t num_groups, int num_sms) {
  GemmConfig best;
  if (m < 1 || n < 1 || k < 1 || num_groups < 1 || num_sms < 1) {
    best.reason = "empty problem (m, n, k, groups and SMs must be >= 1)";
    return best;
  }
  const bool wgrad = kind == GemmKind::kWgrad;
  const int64_t num_k_blocks = (k + kBlockK - 1) / kBlockK;
  const TileShape* shapes = wgrad ? kWgradTileShapes : kTileShapes;
  const int num_shapes = wgrad ? kNumWgradTileShapes : kNumTileShapes;
  double best_cost = 0;
  best.reason = "no tile shape fits in shared memory with >= 3 stages (K too large)";
  for (int i = 0; i < num_shapes; ++i) {
    const TileShape s = shapes[i];
    if (num_k_blocks > (int64_t(1) << 20)) break;
    const int stages = stages_that_fit(s.block_m, s.block_n, wgrad, int(num_k_blocks));
    if (stages == 0) continue;
    const int64_t m_blocks = (m + s.block_m - 1) / s.block_m, n_blocks = (n + s.block_n - 1) / s.block_n;
    const int64_t tiles = m_blocks * n_blocks * (kind == GemmKind::kMasked ? num_groups : 1);
    if (tiles > (int64_t(1) << 30)) {
      best.reason = "too many tiles for 32-bit tile indices";
      continue;
    }
    const int64_t waves = (tiles + num_sms - 1) / num_sms;
    const double cost = double(waves) * (s.block_m + 32) * (s.block_n + 32);
    const bool better = !best.ok || cost < best_cost ||
                        (cost == best_cost && s.block_m * s.block_n > best.block_m * best.block_n);
    if (!better) continue;
    best.ok = true;
    best.reason.clear();
    best_cost = cost;
    best.block_m = s.block_m;
    best.block_n = s.block_n;
    best.stages = stages;
    best.smem_bytes = smem_layout(s.block_m, s.block_n, stages, wgrad, int(num_k_blocks)).bytes;
    best.num_m_blocks = int(m_blocks);
    best.num_n_blocks = int(n_blocks);
    best.num_tiles = int(tiles);
    best.grid = int(std::min<int64_t>(tiles, num_sms));
    best.num_waves = int(waves);
    const int64_t last = tiles - (waves - 1) * num_sms;
    best.last_wave_util = double(last) / num_sms;
  }
  if (best.ok) best.cluster_size = choose_cluster_size(kind, m, best.num_n_blocks, best.grid);
  return best;
}

namespace {

GemmKind parse_kind(const std::string& kind) {
  if (kind == "dense") return GemmKind::kDense;
  if (kind == "contiguous") return GemmKind::kContiguous;
  if (kind == "masked") return GemmKind::kMasked;
  if (kind == "wgrad") return GemmKind::kWgrad;
  throw std::invalid_argument("sm90_gemm_plan: kind must be dense, contiguous, masked or wgrad, got '" +
                              kind + "'");
}

void write_tma(std::ostream& os, const char* name, const TmaParams& p) {
  os << "\"" << name << "\": {\"elem_bytes\": " << p.elem_bytes << ", \"dims\": [" << p.dims[0] << ", "
     << p.dims[1] << ", " << p.dims[2] << "], \"strides_bytes\": [" << p.strides_bytes[0] << ", "
     << p.strides_bytes[1] << "], \"box\": [" << p.box[0] << ", " << p.box[1] << ", " << p.box[2]
     << "], \"swizzle_bytes\": " << p.swizzle_bytes << ", \"problem\": \"" << tma_problem(p) << "\"}";
}

}  // namespace

std::string gemm_plan_json(const std::string& kind_name, int64_t m, int64_t n, int64_t k, int64_t num_groups,
                           int64_t num_sms) {
  const GemmKind kind = parse_kind(kind_name);
  const GemmConfig c =
      select_config(kind, m, n, k, num_groups, int(std::clamp<int64_t>(num_sms, 0, 1 << 20)));
  std::ostringstream os;
  os << "{\"kind\": \"" << kind_name << "\", \"ok\": " << (c.ok ? "true" : "false") << ", \"reason\": \""
     << c.reason << "\"";
  if (c.ok) {
    const bool wgrad = kind == GemmKind::kWgrad, masked = kind == GemmKind::kMasked;
    const int64_t kb = (k + kBlockK - 1) / kBlockK,
                  groups_b = kind == GemmKind::kDense || wgrad ? 1 : num_groups;
    const int64_t groups_a = masked ? num_groups : 1, m_pad = (m + 3) / 4 * 4;
    const SmemLayout l = smem_layout(c.block_m, c.block_n, c.stages, wgrad, int(kb));
    os << ", \"block_m\": " << c.block_m << ", \"block_n\": " << c.block_n << ", \"block_k\": " << kBlockK
       << ", \"num_k_blocks\": " << kb << ", \"stages\": " << c.stages << ", \"smem_bytes\": " << c.smem_bytes
       << ", \"smem_capacity\": " << kSmemCapacity
       << ", \"stage_bytes\": " << stage_tx_bytes(c.block_m, c.block_n, wgrad)
       << ", \"smem_offsets\": {\"a\": " << l.a << ", \"b\": " << l.b << ", \"sa\": " << l.sa
       << ", \"sb\": " << l.sb << ", \"full_bar\": " << l.full_bar << ", \"empty_bar\": " << l.empty_bar
       << ", \"sb_blocks\": " << l.sb_blocks << ", \"staging\": " << l.staging << "}"
       << ", \"cluster_size\": " << c.cluster_size << ", \"num_threads\": " << num_threads(c.block_m)
       << ", \"num_math_warpgroups\": " << num_math_warpgroups(c.block_m)
       << ", \"num_m_blocks\": " << c.num_m_blocks << ", \"num_n_blocks\": " << c.num_n_blocks
       << ", \"num_tiles\": " << c.num_tiles << ", \"grid\": " << c.grid << ", \"num_waves\": " << c.num_waves
       << ", \"last_wave_util\": " << c.last_wave_util << ", \"raster_group_n\": " << kRasterGroupN
       << ", \"tile_shapes\": [";
    const TileShape* shapes = wgrad ? kWgradTileShapes : kTileShapes;
    for (int i = 0, count = wgrad ? kNumWgradTileShapes : kNumTileShapes; i < count; ++i)
      os << (i ? ", [" : "[") << shapes[i].block_m << ", " << shapes[i].block_n << ", "
         << stages_that_fit(shapes[i].block_m, shapes[i].block_n, wgrad, int(kb)) << "]";
    os << "], \"tma\": {";
    write_tma(os, "a", tma_operand(m, k, groups_a, k, m * k, c.block_m));
    os << ", ";
    write_tma(os, "b", tma_operand(n, k, groups_b, k, n * k, c.block_n));
    os << ", ";
    write_tma(os, "sa", tma_scales(m, kb, groups_a, m_pad, kb * m_pad, c.block_m));
    os << ", ";
    if (wgrad)
      write_tma(os, "sb", tma_scales(n, kb, 1, (n + 3) / 4 * 4, kb * ((n + 3) / 4 * 4), c.block_n));
    else  // bf16 output [groups_a][m][n], contiguous
      write_tma(os, "d", tma_output(m, n, groups_a, n, m * n, c.block_m, c.block_n));
    os << "}";
    // The tile order per CTA, when small enough to print: [[group, m_block, n_block], ...] for each CTA, and
    // how many of the tiles a bf16 output writes with a TMA store (masked: every group with m rows; wgrad: 0,
    // its output is fp32).
    if (c.num_tiles <= 65536) {
      os << ", \"tiles_per_cta\": [";
      const auto rows_of = [m](int) { return int(m); };
      int tma_store_tiles = 0;
      for (int cta = 0; cta < c.grid; ++cta) {
        TileScheduler<decltype(rows_of)> sched{
            masked, int(num_groups), c.num_m_blocks, c.num_n_blocks, c.block_m, rows_of, cta, c.grid};
        os << (cta ? ", [" : "[");
        bool first = true;
        for (TileCoord t; sched.next(t); first = false) {
          os << (first ? "[" : ", [") << t.group << ", " << t.m_block << ", " << t.n_block << "]";
          tma_store_tiles += !wgrad && tile_uses_tma_store(kind, int(m) - t.m_block * c.block_m, c.block_m);
        }
        os << "]";
      }
      os << "], \"tma_store_tiles\": " << tma_store_tiles;
    }
  }
  os << "}";
  return os.str();
}

}  // namespace dsv3::sm90
