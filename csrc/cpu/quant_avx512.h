// Entry points of the AVX-512 quantization loops (csrc/cpu/quant_avx512.cpp); callers must have checked
// active_cpu_path() == CpuPath::kAvx512.
#pragma once
#include <cstdint>

namespace dsv3::cpu {

enum class QuantDtype : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// max |x[i]| over n values, NaN if any is NaN.
float quant_amax_avx512(const void* x, int64_t n, QuantDtype dt);
// q[i] = e4m3(clamp(x[i] / s, +-448)), as dsv3::float_to_e4m3 does.
void quant_fp8_avx512(const void* x, uint8_t* q, int64_t n, float s, QuantDtype dt);
// out[i] = dt(e4m3(q[i]) * s) for a finite s. Returns true if some code was a NaN code: the caller must then
// redo these n values with the scalar code.
bool dequant_fp8_avx512(const uint8_t* q, void* out, int64_t n, float s, QuantDtype dt);

// The column-wise forms for a transposed matrix: n source rows, row j at element offset j * ld, of which the
// first `lanes` (1..kStridedLanes) values are as many output rows. amax[l] (kStridedLanes floats written) is
// quant_amax_avx512 of output row l's n values; the codes of output row l, e4m3(x / s[l]) as
// quant_fp8_avx512 makes them, go to q + l * ldq. s holds kStridedLanes scales (unused ones finite). The
// first next_n rows of the same shape at next_x (the caller's next task) are prefetched meanwhile.
constexpr int64_t kStridedLanes = 32;
void quant_amax_strided_avx512(const void* x, int64_t ld, int64_t n, int64_t lanes, float* amax,
                               QuantDtype dt);
void quant_fp8_strided_avx512(const void* x, int64_t ld, int64_t n, int64_t lanes, const float* s, uint8_t* q,
                              int64_t ldq, const void* next_x, int64_t next_n, QuantDtype dt);

}  // namespace dsv3::cpu
