// Scalar float8_e4m3fn helpers shared by the CPU kernels: the fp32 scale rule of SPEC §2 and the
// conversions, bit-compatible with torch's `.to(torch.float8_e4m3fn)` (round to nearest even).
#pragma once
#include <c10/util/Float8_e4m3fn.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dsv3 {

constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// Smallest power of two >= s, exact (NaN and inf pass through).
inline float ceil_to_ue8m0(float s) {
  uint32_t bits;
  std::memcpy(&bits, &s, 4);
  uint32_t exp = (bits >> 23) & 0xFF, mant = bits & 0x7FFFFF;
  if (exp == 0xFF || s <= 0.0f || mant == 0) return s;  // NaN, inf, zero, negative or a power of two
  if (exp != 0) {
    bits = (exp + 1) << 23;
  } else {  // subnormal: the next power of two above the mantissa's top bit
    uint32_t top = 1u << (31 - __builtin_clz(mant));
    bits = (mant == top) ? mant : top << 1;
  }
  float r;
  std::memcpy(&r, &bits, 4);
  return r;
}

// s = max(amax, 1e-4) / 448, NaN-propagating, optionally rounded up to a power of two.
inline float fp8_scale(float amax, bool ue8m0) {
  float s = (std::isnan(amax) ? amax : std::fmax(amax, kAmaxFloor)) / kFp8Max;
  return ue8m0 ? ceil_to_ue8m0(s) : s;
}

inline uint8_t float_to_e4m3(float v) {
  v = std::isnan(v) ? v : std::fmin(std::fmax(v, -kFp8Max), kFp8Max);
  return c10::detail::fp8e4m3fn_from_fp32_value(v);
}

inline float e4m3_to_float(uint8_t q) { return c10::detail::fp8e4m3fn_to_fp32_value(q); }

}  // namespace dsv3
