// CPU kernels of the FP8 quantization ops (SPEC §2): per-token 1 x group and per-block scaling and their
// inverses. Scalar fp32 math identical to dsv3.ops.reference, so results match it bit for bit; on the AVX-512
// path the inner loops run in csrc/cpu/quant_avx512.cpp with the same math.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "dsv3/cpu_features.h"
#include "dsv3/fp8.h"
#include "dsv3/ops.h"
#include "dsv3/validate.h"
#include "quant_avx512.h"

namespace dsv3::cpu {
namespace {

// Per-token-group scales addressed by flat row (batch * rows + row) and group, whatever their layout.
struct ScaleView {
  float* data;
  int64_t batch_stride, row_stride, group_stride, rows;
  explicit ScaleView(const TokenGroupScales& t)
      : data(t.scales3.data_ptr<float>()),
        batch_stride(t.scales3.stride(0)),
        row_stride(t.scales3.stride(1)),
        group_stride(t.scales3.stride(2)),
        rows(t.rows) {}
  float& at(int64_t row, int64_t group) const {
    return data[(row / rows) * batch_stride + (row % rows) * row_stride + group * group_stride];
  }
};

// Grain sizes: enough elements per task to amortize the thread hand-off.
int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, elems_per_item));
}

// The element types the AVX-512 loops take (double stays on the scalar code).
template <typename T>
constexpr bool kVecType =
    std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

template <typename T>
constexpr QuantDtype quant_dtype() {
  if constexpr (std::is_same_v<T, float>) return QuantDtype::kFloat;
  if constexpr (std::is_same_v<T, at::BFloat16>) return QuantDtype::kBFloat16;
  return QuantDtype::kHalf;
}

bool use_avx512() { return active_cpu_path() == CpuPath::kAvx512; }

template <typename T>
float group_amax(const T* x, int64_t n, bool avx) {
  if constexpr (kVecType<T>)
    if (avx) return quant_amax_avx512(x, n, quant_dtype<T>());
  float amax = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::fabs(static_cast<float>(x[i]));
    nan |= std::isnan(v);
    amax = std::fmax(amax, v);
  }
  return nan ? NAN : amax;
}

template <typename T>
void quantize_group(const T* x, uint8_t* q, int64_t n, float s, bool avx) {
  if constexpr (kVecType<T>)
    if (avx) return quant_fp8_avx512(x, q, n, s, quant_dtype<T>());
  for (int64_t i = 0; i < n; ++i) q[i] = float_to_e4m3(static_cast<float>(x[i]) / s);
}

// out[i] = T(e4m3(q[i]) * s); the AVX-512 loop leaves NaN codes and non-finite scales to the scalar code.
template <typename T>
void dequantize_run(const uint8_t* q, T* out, int64_t n, float s, bool avx) {
  if constexpr (kVecType<T>)
    if (avx && std::isfinite(s) && !dequant_fp8_avx512(q, out, n, s, quant_dtype<T>())) return;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(e4m3_to_float(q[i]) * s);
}

}  // namespace

namespace {

// x is the transpose of a contiguous [k, rows] matrix (strides (1, rows)): Wgrad's token-major operand, t.t()
// of an activation. It is quantized from the source layout, without writing and re-reading a transposed copy,
// to the same amax, scales and codes as x.contiguous() (bf16/fp16 -> fp32 is exact and both paths quantize
// fp32(x) / s).
bool is_transposed_matrix(const at::Tensor& x) {
  return x.dim() == 2 && x.size(0) > 1 && x.size(1) > 1 && x.stride(0) == 1 && x.stride(1) == x.size(0);
}

// AVX-512: one task is a strip of 32 (or 16) output rows, as many adjacent source columns, x one group: the
// strip's amaxes taken at once down the group's source rows, then its codes converted and transposed in
// registers. Tasks run in bands of up to 8 strips, group by group within a band: consecutive tasks share the
// group's source rows (and their pages) while a band's output rows stay few, and the threads' task ranges
// mostly cover whole output rows, so they seldom write into the same lines of the scales. While one task
// computes, the next one's output lines are prefetched, and its source rows into L2: each takes
// a short piece of many rows at a large stride, which the hardware prefetchers do not follow.
template <typename T>
void quantize_transposed_avx512(const T* base, int64_t rows, int64_t k, int64_t group_size, bool ue8m0,
                                const ScaleView& sv, uint8_t* qp) {
  const int64_t groups = ceil_div(k, group_size), threads = at::get_num_threads();
  // Half-width strips where full ones would leave too few tasks to share out evenly.
  const int64_t width = groups * ceil_div(rows, kStridedLanes) >= 8 * threads ? kStridedLanes : 16;
  const int64_t strips = ceil_div(rows, width), tasks = groups * strips;
  const int64_t band = std::clamp<int64_t>(strips / (4 * threads), 1, 8);
  struct Task {
    int64_t g, r0, k0, n, lanes;
  };
  const auto task = [&](int64_t i) {
    const int64_t b = i / (groups * band), rem = i - b * groups * band;
    const int64_t band_strips = std::min(band, strips - b * band), g = rem / band_strips;
    const int64_t r0 = (b * band + rem % band_strips) * width, k0 = g * group_size;
    return Task{g, r0, k0, std::min(group_size, k - k0), std::min(width, rows - r0)};
  };
  at::parallel_for(0, tasks, grain_for(width * group_size), [&](int64_t begin, int64_t end) {
    float amax[kStridedLanes], scale[kStridedLanes];
    for (int64_t i = begin; i < end; ++i) {
      const Task t = task(i), next = task(std::min(i + 1, end - 1));
      const int64_t next_n = i + 1 < end ? next.n : 0;
      for (int64_t l = 0; next_n > 0 && l < next.lanes; ++l)
        for (int64_t c = 0; c < next_n; c += 64)
          __builtin_prefetch(qp + (next.r0 + l) * k + next.k0 + c, 1, 3);
      const T* src = base + t.k0 * rows + t.r0;
      quant_amax_strided_avx512(src, rows, t.n, t.lanes, amax, quant_dtype<T>());
      float* sp = &sv.at(t.r0, t.g);  // a 2-D x has one batch: its rows are row_stride apart
      for (int64_t l = 0; l < kStridedLanes; ++l) {
        scale[l] = l < t.lanes ? fp8_scale(amax[l], ue8m0) : 1.0f;
        if (l < t.lanes) sp[l * sv.row_stride] = scale[l];
      }
      quant_fp8_strided_avx512(src, rows, t.n, t.lanes, scale, qp + t.r0 * k + t.k0, k,
                               base + next.k0 * rows + next.r0, next_n, quant_dtype<T>());
    }
  });
}

// Portable code (no AVX-512): tiles of kTileRows rows x one group of columns gathered from the
// source's contiguous rows into a float buffer and quantized from there.
constexpr int64_t kTileRows = 32;

template <typename T>
void quantize_transposed(const T* base, int64_t rows, int64_t k, int64_t group_size, bool ue8m0,
                         const ScaleView& sv, uint8_t* qp, bool avx) {
  if constexpr (kVecType<T>)
    if (avx) return quantize_transposed_avx512(base, rows, k, group_size, ue8m0, sv, qp);
  const int64_t groups = ceil_div(k, group_size), tiles = ceil_div(rows, kTileRows);
  at::parallel_for(0, tiles * groups, grain_for(kTileRows * group_size), [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kTileRows * group_size);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = (i / groups) * kTileRows, g = i % groups, k0 = g * group_size;
      const int64_t n = std::min(group_size, k - k0), nr = std::min(kTileRows, rows - r0);
      for (int64_t j = 0; j < n; ++j) {
        const T* src = base + (k0 + j) * rows + r0;  // column k0 + j of rows r0.., contiguous in the source
        for (int64_t f = 0; f < nr; ++f) tile[f * group_size + j] = static_cast<float>(src[f]);
      }
      for (int64_t f = 0; f < nr; ++f) {
        const float* src = tile.data() + f * group_size;
        const float s = fp8_scale(group_amax(src, n, avx), ue8m0);
        sv.at(r0 + f, g) = s;
        quantize_group(src, qp + (r0 + f) * k + k0, n, s, avx);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_per_token_group(const at::Tensor& x_in, int64_t group_size,
                                                            bool ue8m0, bool col_major_scales) {
  check_quantize_per_token_group(x_in, group_size, col_major_scales);
  auto [q, scales] = alloc_quantize_per_token_group(x_in, group_size, col_major_scales);
  if (is_transposed_matrix(x_in)) {
    const ScaleView sv(token_group_scales(x_in, scales, /*writable=*/true));
    auto* qp = static_cast<uint8_t*>(q.data_ptr());
    const bool avx = use_avx512();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "quantize_per_token_group",
                                    [&] {
                                      quantize_transposed(x_in.const_data_ptr<scalar_t>(), x_in.size(0),
                                                          x_in.size(1), group_size, ue8m0, sv, qp, avx);
                                    });
    return {q, scales};
  }
  const at::Tensor x = x_in.contiguous();
  const int64_t k = x.size(-1), rows = k == 0 ? 0 : x.numel() / k, groups = ceil_div(k, group_size);
  if (rows == 0 || groups == 0) return {q, scales};
  const ScaleView sv(token_group_scales(x, scales, /*writable=*/true));
  auto* qp = static_cast<uint8_t*>(q.data_ptr());
  const bool avx = use_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_per_token_group", [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows * groups, grain_for(group_size), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = i / groups, g = i % groups, k0 = g * group_size;
        const int64_t n = std::min(group_size, k - k0);
        const scalar_t* src = xp + row * k + k0;
        const float s = fp8_scale(group_amax(src, n, avx), ue8m0);
        sv.at(row, g) = s;
        quantize_group(src, qp + row * k + k0, n, s, avx);
      }
    });
  });
  return {q, scales};
}

at::Tensor dequantize_per_token_group(const at::Tensor& q_in, const at::Tensor& scales, int64_t group_size,
                                      std::optional<at::ScalarType> out_dtype) {
  const auto dt = out_dtype.value_or(at::kBFloat16);
  check_dequantize_per_token_group(q_in, scales, group_size, dt);
  const at::Tensor q = q_in.contiguous();
  auto out = at::empty(q.sizes(), q.options().dtype(dt));
  const int64_t k = q.size(-1), rows = k == 0 ? 0 : q.numel() / k;
  if (rows == 0) return out;
  const TokenGroupScales layout = token_group_scales(q, scales, /*writable=*/false);  // keeps a copy alive
  const ScaleView sv(layout);
  const auto* qp = static_cast<const uint8_t*>(q.data_ptr());
  const bool avx = use_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "dequantize_per_token_group", [&] {
    auto* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(k), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t k0 = 0; k0 < k; k0 += group_size)
          dequantize_run(qp + row * k + k0, op + row * k + k0, std::min(group_size, k - k0),
                         sv.at(row, k0 / group_size), avx);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_block(const at::Tensor& w_in, int64_t block_size,
                                                      bool ue8m0) {
  check_quantize_per_block(w_in, block_size);
  auto [q, scale_inv] = alloc_quantize_per_block(w_in, block_size);
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.size(-2), k = w.size(-1), batch = w.dim() == 3 ? w.size(0) : 1;
  const int64_t nb = ceil_div(n, block_size), kb = ceil_div(k, block_size);
  if (batch * nb * kb == 0) return {q, scale_inv};
  auto* qp = static_cast<uint8_t*>(q.data_ptr());
  float* sp = scale_inv.data_ptr<float>();
  const bool avx = use_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "quantize_per_block", [&] {
    const auto* wp = w.const_data_ptr<scalar_t>();
    // One task takes a row panel of blocks, span_b blocks wide (about 1 MB of input), and walks it row by row
    // twice (amax, then quantize): long contiguous runs per row keep the hardware prefetchers busy.
    const int64_t block_bytes = block_size >= 1024
                                    ? int64_t(1) << 20
                                    : block_size * block_size * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t span_b = std::max<int64_t>(1, (int64_t(1) << 20) / block_bytes);
    const int64_t spans = ceil_div(kb, span_b);
    at::parallel_for(0, batch * nb * spans, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> amax(span_b), scale(span_b);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bi = i / (nb * spans), pb = (i / spans) % nb, b0 = i % spans * span_b;
        const int64_t r0 = pb * block_size, rn = std::min(block_size, n - r0), bn = std::min(span_b, kb - b0);
        const scalar_t* src = wp + (bi * n + r0) * k;
        uint8_t* dst = qp + (bi * n + r0) * k;
        std::fill(amax.begin(), amax.end(), 0.0f);
        for (int64_t r = 0; r < rn; ++r)
          for (int64_t b = 0; b < bn; ++b) {
            const int64_t c0 = (b0 + b) * block_size;
            const float ra = group_amax(src + r * k + c0, std::min(block_size, k - c0), avx);
            amax[b] = std::isnan(ra) || std::isnan(amax[b]) ? NAN : std::fmax(amax[b], ra);
          }
        for (int64_t b = 0; b < bn; ++b) {
          scale[b] = fp8_scale(amax[b], ue8m0);
          sp[(bi * nb + pb) * kb + b0 + b] = scale[b];
        }
        for (int64_t r = 0; r < rn; ++r)
          for (int64_t b = 0; b < bn; ++b) {
            const int64_t c0 = (b0 + b) * block_size;
            quantize_group(src + r * k + c0, dst + r * k + c0, std::min(block_size, k - c0), scale[b], avx);
          }
      }
    });
  });
  return {q, scale_inv};
}

at::Tensor dequantize_per_block(const at::Tensor& q_in, const at::Tensor& scale_inv_in, int64_t block_size,
                                std::optional<at::ScalarType> out_dtype) {
  const auto dt = out_dtype.value_or(at::kBFloat16);
  check_dequantize_per_block(q_in, scale_inv_in, block_size, dt);
  const at::Tensor q = q_in.contiguous(), s = scale_inv_in.contiguous();
  auto out = at::empty(q.sizes(), q.options().dtype(dt));
  const int64_t n = q.size(-2), k = q.size(-1), rows = q.numel() / std::max<int64_t>(k, 1);
  const int64_t nb = ceil_div(n, block_size), kb = ceil_div(k, block_size);
  if (q.numel() == 0) return out;
  const auto* qp = static_cast<const uint8_t*>(q.data_ptr());
  const float* sp = s.data_ptr<float>();
  const bool avx = use_avx512();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "dequantize_per_block", [&] {
    auto* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(k), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float* srow = sp + ((row / n) * nb + (row % n) / block_size) * kb;
        for (int64_t k0 = 0; k0 < k; k0 += block_size)
          dequantize_run(qp + row * k + k0, op + row * k + k0, std::min(block_size, k - k0),
                         srow[k0 / block_size], avx);
      }
    });
  });
  return out;
}

}  // namespace dsv3::cpu
