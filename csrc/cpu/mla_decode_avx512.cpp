// AVX-512 path of the CPU MLA decode kernel: the tile algorithm of mla_decode_tile.h with AVX-512 pieces.
// This file alone is compiled for AVX-512 (BF16/FP16 conversions included) and entered only after a
// run-time CPU check, so it includes no torch headers and everything but the entry point is in an anonymous
// namespace.
//
// Q·Kᵀ: 4 rows x 4 keys of dot products per register block (16 zmm accumulators over 16-float chunks of
// d_qk, reduced at the end); the K page (fp32, converted once per page) stays in L2 and is reused by every
// row of the tile. P·V: 4 rows x 64 columns per register block, P broadcast, V rows streamed from the same
// converted page. exp2 is a degree-7 polynomial on [-1/2, 1/2] scaled with vscalefps (relative error ~1e-7).

// GCC 12's AVX-512 intrinsics initialize their "undefined" operands from themselves (GCC PR 105593), which
// -Wall reports at every inlined use.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "mla_decode_kernel.h"

namespace dsv3::cpu {
namespace {

#include "mla_decode_tile.h"

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// 2^x for x <= 0 (scores minus their running max), NaN kept, -inf -> 0.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.f), x);  // second operand returned for NaN: NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));  // |f| <= ln2/2
  // e^f, Taylor to degree 7: error < (ln2/2)^8 / 8! ~ 5e-9 relative.
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 dot-product accumulators x[r * 4 + n] -> one vector of their 16 sums in the same order (a transpose-add
// tree: 45 instructions instead of 16 full reductions).
inline __m512 reduce16(const __m512* x) {
  __m512 y[8], z[4];
  for (int i = 0; i < 8; ++i)
    y[i] =
        _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(y[2 * i]), b = _mm512_castps_pd(y[2 * i + 1]);
    z[i] =
        _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // z[i] holds, per 128-bit lane L, the lane-L partial sums of x[4i .. 4i+3]; add the four lanes.
  const __m512 v01 =
      _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  const __m512 v23 =
      _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88), _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD));
}

template <int MR, int NR>
inline void qk_block(const float* q, int64_t ldq, const float* k, int64_t ldk, int64_t chunks, float* s,
                     int64_t lds) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m512 kv[NR];
    for (int n = 0; n < NR; ++n) kv[n] = _mm512_loadu_ps(k + n * ldk + 16 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512 qv = _mm512_loadu_ps(q + r * ldq + 16 * c);
      for (int n = 0; n < NR; ++n) acc[r][n] = _mm512_fmadd_ps(qv, kv[n], acc[r][n]);
    }
  }
  if constexpr (MR == 4 && NR == 4) {
    const __m512 sums = reduce16(&acc[0][0]);
    _mm_storeu_ps(s, _mm512_extractf32x4_ps(sums, 0));
    _mm_storeu_ps(s + lds, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(s + 2 * lds, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(s + 3 * lds, _mm512_extractf32x4_ps(sums, 3));
  } else {
    for (int r = 0; r < MR; ++r)
      for (int n = 0; n < NR; ++n) s[r * lds + n] = _mm512_reduce_add_ps(acc[r][n]);
  }
}

using QkBlockFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
template <int MR>
constexpr QkBlockFn kQkRow[4] = {qk_block<MR, 1>, qk_block<MR, 2>, qk_block<MR, 3>, qk_block<MR, 4>};
constexpr const QkBlockFn* kQk[4] = {kQkRow<1>, kQkRow<2>, kQkRow<3>, kQkRow<4>};

// O[MR rows][16 NZ columns] += P[rows][n_lo:n_hi] · V[n_lo:n_hi][columns].
template <int MR, int NZ>
inline void pv_block(const float* p, int64_t ldp, int64_t n_lo, int64_t n_hi, const float* v, int64_t ldv,
                     float* o, int64_t ldo) {
  __m512 acc[MR][NZ];
  for (int r = 0; r < MR; ++r)
    for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_loadu_ps(o + r * ldo + 16 * z);
  for (int64_t n = n_lo; n < n_hi; ++n) {
    __m512 vv[NZ];
    for (int z = 0; z < NZ; ++z) vv[z] = _mm512_loadu_ps(v + n * ldv + 16 * z);
    for (int r = 0; r < MR; ++r) {
      const __m512 w = _mm512_set1_ps(p[r * ldp + n]);
      for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_fmadd_ps(w, vv[z], acc[r][z]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(o + r * ldo + 16 * z, acc[r][z]);
}

using PvBlockFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t);
template <int MR>
constexpr PvBlockFn kPvRow[4] = {pv_block<MR, 1>, pv_block<MR, 2>, pv_block<MR, 3>, pv_block<MR, 4>};

struct Avx512Isa {
  static void to_float(MlaType t, const void* base, int64_t off, int64_t n, float scale, float* dst) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      __m512 x;
      if (t == MlaType::kF32) {
        x = _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + off + i);
      } else {
        const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + off + i);
        x = t == MlaType::kBF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                : _mm512_cvtph_ps(h);
      }
      _mm512_mask_storeu_ps(dst + i, m, _mm512_mul_ps(x, s));
    }
  }
  // One packed FP8 token -> fp32, bit-identical to the scalar conversion: each e4m3 byte becomes the fp16
  // word with its sign at bit 15 and its 7 magnitude bits at 7..13, which is the e4m3 value times 2^-8
  // exactly (subnormals included); vcvtph2ps widens it, × 256 (exact) restores the value and × the group's
  // scale rounds once, as the scalar code does. NaN codes (0x7F/0xFF) are patched to NaN.
  static void fp8_token(const uint8_t* tok, int64_t d_qk, int64_t d_v, float* dst) {
    const uint8_t* scales = tok + d_v;
    const uint16_t* rope = reinterpret_cast<const uint16_t*>(scales + 4 * ((d_v + 127) / 128));
    const __m256i sign = _mm256_set1_epi16(0x80), mag = _mm256_set1_epi16(0x7F);
    for (int64_t i = 0; i < d_v; i += 16) {
      const __mmask16 m = tail_mask(d_v - i);
      float s;
      memcpy(&s, scales + 4 * (i / 128), 4);
      const __m128i b = _mm_maskz_loadu_epi8(m, tok + i);
      const __m256i w = _mm256_cvtepu8_epi16(b);
      const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, sign), 8),
                                        _mm256_slli_epi16(_mm256_and_si256(w, mag), 7));
      __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f)), _mm512_set1_ps(s));
      const __mmask16 nan = _mm_cmpeq_epi8_mask(_mm_and_si128(b, _mm_set1_epi8(0x7F)), _mm_set1_epi8(0x7F));
      x = _mm512_mask_mov_ps(x, nan, _mm512_set1_ps(NAN));
      _mm512_mask_storeu_ps(dst + i, m, x);
    }
    to_float(MlaType::kBF16, rope, 0, d_qk - d_v, 1.f, dst + d_v);
  }
  static void fill(float* dst, int64_t n, float v) {
    for (int64_t i = 0; i < n; i += 16) _mm512_mask_storeu_ps(dst + i, tail_mask(n - i), _mm512_set1_ps(v));
  }
  // Key blocks outer, row blocks inner: a block of 4 converted K rows (9 KB at d_qk = 576) stays in L1 while
  // every row of the tile uses it.
  static void qk(const float* q, int64_t ldq, int64_t rows, const float* k, int64_t ldk, int64_t keys,
                 int64_t d, float* s, int64_t lds, MlaPrefetch& pf) {
    const int64_t chunks = (d + 15) / 16;  // rows are zero-padded to whole chunks
    for (int64_t n = 0; n < keys; n += 4) {
      const int64_t nr = mla_min(4, keys - n);
      for (int64_t r = 0; r < rows; r += 4) {
        kQk[mla_min(4, rows - r) - 1][nr - 1](q + r * ldq, ldq, k + n * ldk, ldk, chunks, s + r * lds + n,
                                              lds);
        pf.step();
      }
    }
  }
  static float row_max(const float* x, int64_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 t = tail_mask(n - i);
      const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), t, x + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      m = _mm512_max_ps(m, v);
    }
    return nan ? NAN : _mm512_reduce_max_ps(m);
  }
  static float exp2_sub_sum(float* x, int64_t n, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 t = tail_mask(n - i);
      const __m512 e = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, x + i), m));
      _mm512_mask_storeu_ps(x + i, t, e);
      sum = _mm512_mask_add_ps(sum, t, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
  }
  static void scale(float* x, int64_t n, float a) { scale_to(x, n, a, x); }
  static void scale_to(const float* x, int64_t n, float a, float* dst) {
    const __m512 s = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 t = tail_mask(n - i);
      _mm512_mask_storeu_ps(dst + i, t, _mm512_mul_ps(_mm512_maskz_loadu_ps(t, x + i), s));
    }
  }
  // Column blocks (64 columns) outer, row blocks inner: the block's V slab (16 KB for a full page) stays in
  // L1 for every row. Rows of a 4-row block share the keys they all see; the keys only some rows see (causal)
  // go row by row.
  static void pv(const float* p, int64_t ldp, int64_t rows, const int64_t* nv, const float* v, int64_t ldv,
                 int64_t d_v, float* o, int64_t ldo, MlaPrefetch& pf) {
    const int64_t zmms = (d_v + 15) / 16;  // O and V rows are padded to whole zmm
    for (int64_t z = 0; z < zmms; z += 4) {
      const PvBlockFn* one = kPvRow<1>;
      const int64_t nz = mla_min(4, zmms - z) - 1;
      const float* vz = v + 16 * z;
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) {
        int64_t common = nv[r];
        for (int i = 1; i < 4; ++i) common = mla_min(common, nv[r + i]);
        if (common > 0) kPvRow<4>[nz](p + r* ldp, ldp, 0, common, vz, ldv, o + r* ldo + 16 * z, ldo);
        pf.step();
        for (int i = 0; i < 4; ++i) {
          if (nv[r + i] > common)
            one[nz](p + (r + i) * ldp, ldp, common, nv[r + i], vz, ldv, o + (r + i) * ldo + 16 * z, ldo);
        }
      }
      for (; r < rows; ++r) {
        if (nv[r] > 0) one[nz](p + r * ldp, ldp, 0, nv[r], vz, ldv, o + r * ldo + 16 * z, ldo);
        pf.step();
      }
    }
  }
};

}  // namespace

void mla_attend_avx512(const MlaProblem& p, int64_t req, int64_t hk, int64_t row0, int64_t row1,
                       int64_t first_block, int64_t last_block, float* o, int64_t ldo, float* lse,
                       void* scratch) {
  mla_attend_tile<Avx512Isa, MlaF32Math<Avx512Isa>>(p, req, hk, row0, row1, first_block, last_block, o, ldo,
                                                    lse, scratch);
}

}  // namespace dsv3::cpu
