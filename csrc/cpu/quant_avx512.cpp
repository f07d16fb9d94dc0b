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

// The column-wise loops below take NV (1 or 2) zmm per source row: 16 * NV adjacent source columns, the
// first `lanes` of them real (the others masked off and read as zero).
template <int NV>
inline void lane_masks(int64_t lanes, __mmask16* m) {
  for (int v = 0; v < NV; ++v) m[v] = lanes > 16 * v ? tail_mask(lanes - 16 * v) : __mmask16(0);
}

// Per-lane amax of n source rows (row j at element offset j * ld): the same integer max of |bits| as
// amax_impl, so every lane gets the value (or the quiet NaN) that amax_impl returns for that column.
template <QuantDtype DT, int NV>
void amax_strided_impl(const void* x, int64_t ld, int64_t n, int64_t lanes, float* amax) {
  constexpr int kRows = 4 / NV;  // rows per iteration: four independent max chains
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __mmask16 m[NV];
  lane_masks<NV>(lanes, m);
  __m512i acc[4];
  for (auto& a : acc) a = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + kRows <= n; j += kRows)
    for (int u = 0; u < kRows; ++u)
      for (int v = 0; v < NV; ++v)
        acc[u * NV + v] = _mm512_max_epu32(
            acc[u * NV + v],
            _mm512_and_si512(_mm512_castps_si512(load16<DT>(x, (j + u) * ld + 16 * v, m[v])), abs_mask));
  for (; j < n; ++j)
    for (int v = 0; v < NV; ++v)
      acc[v] = _mm512_max_epu32(
          acc[v], _mm512_and_si512(_mm512_castps_si512(load16<DT>(x, j * ld + 16 * v, m[v])), abs_mask));
  for (int v = 0; v < NV; ++v) {
    __m512i r = acc[v];
    for (int u = 1; u < kRows; ++u) r = _mm512_max_epu32(r, acc[u * NV + v]);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(r, _mm512_set1_epi32(0x7F800000));
    _mm512_storeu_ps(amax + 16 * v, _mm512_mask_mov_ps(_mm512_castsi512_ps(r), nan, _mm512_set1_ps(NAN)));
  }
}

// In-lane transpose of the 16 x 16 byte blocks held one per 128-bit lane: row i of each block in
// x[kBitRev[i]], column c of each block comes out in x[c]. Four rounds of unpacks, each pairing register i
// with i + 8, rotate the 4 + 4 index bits (register, byte) by one; feeding the rows bit-reversed makes the
// byte order of the result the row order.
constexpr int kBitRev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

template <int kRound>
inline __m512i unpack_lo(__m512i a, __m512i b) {
  if constexpr (kRound == 0) return _mm512_unpacklo_epi8(a, b);
  if constexpr (kRound == 1) return _mm512_unpacklo_epi16(a, b);
  if constexpr (kRound == 2) return _mm512_unpacklo_epi32(a, b);
  return _mm512_unpacklo_epi64(a, b);
}

template <int kRound>
inline __m512i unpack_hi(__m512i a, __m512i b) {
  if constexpr (kRound == 0) return _mm512_unpackhi_epi8(a, b);
  if constexpr (kRound == 1) return _mm512_unpackhi_epi16(a, b);
  if constexpr (kRound == 2) return _mm512_unpackhi_epi32(a, b);
  return _mm512_unpackhi_epi64(a, b);
}

template <int kRound>
inline void transpose_round(__m512i* x) {
  __m512i y[16];
  for (int i = 0; i < 8; ++i) {
    y[2 * i] = unpack_lo<kRound>(x[i], x[i + 8]);
    y[2 * i + 1] = unpack_hi<kRound>(x[i], x[i + 8]);
  }
  for (int i = 0; i < 16; ++i) x[i] = y[i];
}

// Into L2, the kLines cache lines at byte offset `offset` of x: the source rows of the task to follow (the
// hardware prefetchers do not follow 128 interleaved row streams). uintptr_t: a prefetch may name any
// address.
template <int kLines>
inline void prefetch_row(const void* x, int64_t offset) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(x) + offset;
  for (int i = 0; i < kLines; ++i) _mm_prefetch(reinterpret_cast<const char*>(p + 64 * i), _MM_HINT_T1);
}

// Codes of the transposed layout: source row j (n of them, offset j * ld) holds output column j of the
// output rows (lanes), output row l starting at q + l * ldq. Each 64-column chunk is converted into byte
// tiles of four 16 x 16 blocks side by side, transposed in registers and stored as 64-byte rows.
template <QuantDtype DT, int NV>
void quant_strided_impl(const void* x, int64_t ld, int64_t n, int64_t lanes, const float* s, uint8_t* q,
                        int64_t ldq, const void* next_x, int64_t next_n) {
  constexpr int64_t kElem = DT == QuantDtype::kFloat ? 4 : 2;
  constexpr int kLines = NV * 16 * kElem / 64 > 0 ? NV * 16 * kElem / 64 : 1;  // cache lines per row
  const __m512 lo = _mm512_set1_ps(-448.f), hi = _mm512_set1_ps(448.f);
  __m512 vs[NV];
  __mmask16 m[NV];
  lane_masks<NV>(lanes, m);
  for (int v = 0; v < NV; ++v) vs[v] = _mm512_loadu_ps(s + 16 * v);
  alignas(64) uint8_t tile[NV][16][4][16];  // [lanes / 16][row in block][block][lane % 16]
  for (int64_t c0 = 0; c0 < n; c0 += 64) {
    const int64_t cn = n - c0 < 64 ? n - c0 : 64;
    if (cn < 64) __builtin_memset(tile, 0, sizeof(tile));
    for (int64_t j = 0; j < cn; ++j) {
      if (c0 + j < next_n) prefetch_row<kLines>(next_x, (c0 + j) * ld * kElem);
      for (int v = 0; v < NV; ++v) {
        const __m512 d = _mm512_div_ps(load16<DT>(x, (c0 + j) * ld + 16 * v, m[v]), vs[v]);
        _mm_store_si128(reinterpret_cast<__m128i*>(tile[v][j & 15][j >> 4]),
                        fp32_to_e4m3(_mm512_min_ps(hi, _mm512_max_ps(lo, d))));
      }
    }
    const __mmask64 cm = cn == 64 ? ~__mmask64(0) : (__mmask64(1) << cn) - 1;
    for (int v = 0; v < NV && 16 * v < lanes; ++v) {
      __m512i t[16];
      for (int i = 0; i < 16; ++i) t[kBitRev[i]] = _mm512_load_si512(tile[v][i]);
      transpose_round<0>(t);
      transpose_round<1>(t);
      transpose_round<2>(t);
      transpose_round<3>(t);
      const int64_t rows = lanes - 16 * v < 16 ? lanes - 16 * v : 16;
      for (int64_t l = 0; l < rows; ++l) _mm512_mask_storeu_epi8(q + (16 * v + l) * ldq + c0, cm, t[l]);
    }
  }
  for (int64_t j = n; j < next_n; ++j) prefetch_row<kLines>(next_x, j * ld * kElem);
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

void quant_amax_strided_avx512(const void* x, int64_t ld, int64_t n, int64_t lanes, float* amax,
                               QuantDtype dt) {
  switch (dt) {
    case QuantDtype::kFloat:
      return lanes > 16 ? amax_strided_impl<QuantDtype::kFloat, 2>(x, ld, n, lanes, amax)
                        : amax_strided_impl<QuantDtype::kFloat, 1>(x, ld, n, lanes, amax);
    case QuantDtype::kBFloat16:
      return lanes > 16 ? amax_strided_impl<QuantDtype::kBFloat16, 2>(x, ld, n, lanes, amax)
                        : amax_strided_impl<QuantDtype::kBFloat16, 1>(x, ld, n, lanes, amax);
    default:
      return lanes > 16 ? amax_strided_impl<QuantDtype::kHalf, 2>(x, ld, n, lanes, amax)
                        : amax_strided_impl<QuantDtype::kHalf, 1>(x, ld, n, lanes, amax);
  }
}

void quant_fp8_strided_avx512(const void* x, int64_t ld, int64_t n, int64_t lanes, const float* s, uint8_t* q,
                              int64_t ldq, const void* next_x, int64_t next_n, QuantDtype dt) {
  switch (dt) {
    case QuantDtype::kFloat:
      return lanes > 16
                 ? quant_strided_impl<QuantDtype::kFloat, 2>(x, ld, n, lanes, s, q, ldq, next_x, next_n)
                 : quant_strided_impl<QuantDtype::kFloat, 1>(x, ld, n, lanes, s, q, ldq, next_x, next_n);
    case QuantDtype::kBFloat16:
      return lanes > 16
                 ? quant_strided_impl<QuantDtype::kBFloat16, 2>(x, ld, n, lanes, s, q, ldq, next_x, next_n)
                 : quant_strided_impl<QuantDtype::kBFloat16, 1>(x, ld, n, lanes, s, q, ldq, next_x, next_n);
    default:
      return lanes > 16
                 ? quant_strided_impl<QuantDtype::kHalf, 2>(x, ld, n, lanes, s, q, ldq, next_x, next_n)
                 : quant_strided_impl<QuantDtype::kHalf, 1>(x, ld, n, lanes, s, q, ldq, next_x, next_n);
  }
}

}  // namespace dsv3::cpu
