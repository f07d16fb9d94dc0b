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

}  // namespace dsv3::cpu
