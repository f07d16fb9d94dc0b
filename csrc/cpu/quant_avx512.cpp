// AVX-512 inner loops of the CPU FP8 quantization ops (csrc/cpu/quant.cpp). This file alone is compiled for
// AVX-512 and entered only after a run-time CPU check, so it includes no torch headers and defines no weak
// symbols (everything but the entry points is in an anonymous namespace). The math is the scalar path's, bit
// for bit: IEEE x / s, the clamp to +-448 and torch's round-to-nearest-even e4m3 conversion; dequantize is
// the exact e4m3 -> fp32 value times s, rounded to the output type as c10 does.

// GCC 12's AVX-512 intrinsics initialize their "undefined" operands from themselves (GCC PR 105593), which
// -Wall reports at every inlined use.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "quant_avx512.h"

namespace dsv3::cpu {
namespace {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// 16 values of type DT as fp32 (exact), only those under mask m read (the others zero).
template <QuantDtype DT>
inline __m512 load16(const void* p, int64_t i, __mmask16 m) {
  if constexpr (DT == QuantDtype::kFloat) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
    if constexpr (DT == QuantDtype::kBFloat16)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
}

// c10::detail::fp8e4m3fn_from_fp32_value on 16 lanes (inputs already clamped to +-448 or NaN).
inline __m128i fp32_to_e4m3(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i sign = _mm512_and_si512(bits, _mm512_set1_epi32(int32_t(0x80000000u)));
  const __m512i a = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF));
  // Normals: round the mantissa to 3 bits (RNE), rebias the exponent 127 -> 7.
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(a, _mm512_set1_epi32(int32_t(uint32_t(7 - 127) << 23) + 0x7FFFF));
  r = _mm512_srli_epi32(_mm512_add_epi32(r, odd), 20);
  // Below 2^-6: add 2^14 in fp32 (RNE at the subnormal step) and take the low bits.
  const __m512i denorm = _mm512_set1_epi32(141 << 23);
  const __m512i sub = _mm512_sub_epi32(
      _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(denorm))), denorm);
  r = _mm512_mask_mov_epi32(r, _mm512_cmplt_epi32_mask(a, _mm512_set1_epi32(121 << 23)), sub);
  // At or above 480 (here: NaN) -> 0x7F.
  r = _mm512_mask_mov_epi32(r, _mm512_cmpge_epi32_mask(a, _mm512_set1_epi32(1087 << 20)),
                            _mm512_set1_epi32(0x7F));
  r = _mm512_or_si512(_mm512_and_si512(r, _mm512_set1_epi32(0xFF)), _mm512_srli_epi32(sign, 24));
  return _mm512_cvtepi32_epi8(r);
}

// e4m3 -> fp32 of 16 codes, exact for the finite ones: the byte above a zero byte, shifted right by one, is
// the fp16 of value * 2^-8. NaN codes come out finite; the caller checks for them separately.
inline __m512 e4m3_to_fp32(__m128i codes) {
  const __m256i w = _mm256_slli_epi16(_mm256_cvtepu8_epi16(codes), 8);
  const __m256i h = _mm256_and_si256(_mm256_srai_epi16(w, 1), _mm256_set1_epi16(int16_t(0xBFFF)));
  return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
}

template <QuantDtype DT>
float amax_impl(const void* x, int64_t n) {
  // max of |x| as integers: any NaN's bits exceed those of inf and of every finite value.
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_castps_si512(load16<DT>(x, i, 0xFFFF)), abs_mask));
    m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_castps_si512(load16<DT>(x, i + 16, 0xFFFF)), abs_mask));
  }
  for (; i < n; i += 16)
    m0 = _mm512_max_epu32(
        m0, _mm512_and_si512(_mm512_castps_si512(load16<DT>(x, i, tail_mask(n - i))), abs_mask));
  const uint32_t r = _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
  if (r > 0x7F800000u) return NAN;
  float f;
  __builtin_memcpy(&f, &r, 4);
  return f;
}

template <QuantDtype DT>
void quant_impl(const void* x, uint8_t* q, int64_t n, float s) {
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-448.f), hi = _mm512_set1_ps(448.f);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_div_ps(load16<DT>(x, i, 0xFFFF), vs)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), fp32_to_e4m3(v));
  }
  if (i < n) {
    const __mmask16 m = tail_mask(n - i);
    // a NaN in the second operand of max/min passes through
    const __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_div_ps(load16<DT>(x, i, m), vs)));
    _mm_mask_storeu_epi8(q + i, m, fp32_to_e4m3(v));
  }
}

}  // namespace

float quant_amax_avx512(const void* x, int64_t n, QuantDtype dt) {
  switch (dt) {
    case QuantDtype::kFloat:
      return amax_impl<QuantDtype::kFloat>(x, n);
    case QuantDtype::kBFloat16:
      return amax_impl<QuantDtype::kBFloat16>(x, n);
    default:
      return amax_impl<QuantDtype::kHalf>(x, n);
  }
}

void quant_fp8_avx512(const void* x, uint8_t* q, int64_t n, float s, QuantDtype dt) {
  switch (dt) {
    case QuantDtype::kFloat:
      return quant_impl<QuantDtype::kFloat>(x, q, n, s);
    case QuantDtype::kBFloat16:
      return quant_impl<QuantDtype::kBFloat16>(x, q, n, s);
    default:
      return quant_impl<QuantDtype::kHalf>(x, q, n, s);
  }
}

bool dequant_fp8_avx512(const uint8_t* q, void* out, int64_t n, float s, QuantDtype dt) {
  const __m512 vs = _mm512_set1_ps(s);
  __m128i seen = _mm_setzero_si128();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m128i codes = _mm_maskz_loadu_epi8(m, q + i);
    seen = _mm_max_epu8(seen, _mm_or_si128(codes, _mm_set1_epi8(char(0x80))));
    const __m512 v = _mm512_mul_ps(e4m3_to_fp32(codes), vs);
    switch (dt) {
      case QuantDtype::kFloat:
        _mm512_mask_storeu_ps(static_cast<float*>(out) + i, m, v);
        break;
      case QuantDtype::kBFloat16: {  // c10's round to nearest even (no NaN here), denormals kept
        const __m512i b = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        const __m512i r =
            _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), odd), 16);
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, m, _mm512_cvtepi32_epi16(r));
        break;
      }
      default:
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, m,
                                 _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        break;
    }
  }
  return _mm_cmpeq_epi8_mask(seen, _mm_set1_epi8(char(0xFF))) != 0;
}

}  // namespace dsv3::cpu
