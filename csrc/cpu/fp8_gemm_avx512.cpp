// AVX-512 tile kernels of the CPU FP8 GEMM. This file alone is compiled for AVX-512 and entered only after a
// run-time CPU check, so it includes no torch headers and defines no weak symbols (everything but the entry
// points is in an anonymous namespace). Two kernels: a GEMV-style one for decode (M <= kGemvMaxM) that
// streams each weight byte once, and a BLIS-style 14x32 fp32 micro-kernel on panels converted from fp8.

// GCC 12's AVX-512 intrinsics initialize their "undefined" operands from themselves (GCC PR 105593), which
// -Wall reports at every inlined use.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "fp8_gemm_kernel.h"

namespace dsv3::cpu {
namespace {

constexpr int kMR = kTileMRound;  // micro-tile rows (A values broadcast)
constexpr int kNR = kTileNRound;  // micro-tile columns (two zmm of B)
constexpr int kKc = 256;          // K chunk of the packed kernel: a 32 KB fp32 B micro-panel stays in L1
constexpr float kTwo8 = 256.f;    // the conversion yields value * 2^-8
constexpr int64_t kGemvChunkFloats = 8192;    // scaled A of one GEMV K chunk: 32 KB, stays in L1
constexpr int64_t kGemvPrefetchBytes = 4096;  // B prefetch distance of the GEMV kernel, > memory latency
static_assert((kTileMaxM * kKc + kTileMaxN * kKc + kTileMaxM * kTileMaxN) * 4 <= kScratchBytes);
static_assert((kGemvChunkFloats + kGemvMaxM * kTileMaxN) * 4 <= kScratchBytes);

// ---- e4m3 -> fp32 ----
// Unpacking a byte b above a zero byte gives the word b << 8; an arithmetic shift right by one puts the 7
// magnitude bits at fp16 bits 7..13 and the sign at 15 (and 14, cleared by the and). As fp16 that word is the
// e4m3 value times 2^-8 exactly, subnormals included (vcvtph2ps takes fp16 subnormals at full speed). NaN
// codes (0x7F/0xFF) come out as +-1.875; finite magnitudes stay <= 1.75. Output order within 64 bytes
// ("unpack order"): v[0] = bytes 0-7,16-23; v[1] = 32-39,48-55; v[2] = 8-15,24-31; v[3] = 40-47,56-63. A and
// B are converted by this same routine, so the permutation of k cancels in every dot product.
inline void cvt64(__m512i raw, __m512 v[4]) {
  const __m512i zero = _mm512_setzero_si512(), keep = _mm512_set1_epi16(int16_t(0xBFFF));
  const __m512i lo = _mm512_and_si512(_mm512_srai_epi16(_mm512_unpacklo_epi8(zero, raw), 1), keep);
  const __m512i hi = _mm512_and_si512(_mm512_srai_epi16(_mm512_unpackhi_epi8(zero, raw), 1), keep);
  v[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(lo));
  v[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(lo, 1));
  v[2] = _mm512_cvtph_ps(_mm512_castsi512_si256(hi));
  v[3] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(hi, 1));
}

inline __m512 fix_nan(__m512 v) {
  const __mmask16 is_nan = _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(1.875f), _CMP_EQ_OQ);
  return _mm512_mask_mov_ps(v, is_nan, _mm512_set1_ps(NAN));
}

// Byte-wise max of (raw | 0x80) reaches 0xFF exactly when some byte is a NaN code: a 2-op check per 64 bytes
// lets the hot loops skip the NaN fix-up and redo the rare chunk that has one.
inline __m512i nan_track(__m512i seen, __m512i raw) {
  return _mm512_max_epu8(seen, _mm512_or_si512(raw, _mm512_set1_epi8(char(0x80))));
}
inline bool nan_seen(__m512i seen) { return _mm512_cmpeq_epi8_mask(seen, _mm512_set1_epi8(char(0xFF))) != 0; }
inline bool has_nan(__m512i raw) { return nan_seen(nan_track(_mm512_setzero_si512(), raw)); }

inline __m512i load64(const uint8_t* src, int64_t len) {  // zero-filled past len, never reads past it
  return len >= 64 ? _mm512_loadu_si512(src)
                   : _mm512_maskz_loadu_epi8(_cvtu64_mask64((~0ull) >> (64 - len)), src);
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }
inline int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

// Converts A[m0 + i, k0 : k0 + kc] (i < rows) to fp32, zero-padded to a multiple of 64 in k, each 128-block
// times sa[m, kb] * extra (* sb_row[kb] when given). Float (i, 64 g + c) lands at dst[i * row_step + g *
// group_step + c]. The bytes `prefetch` further (the next K chunk) are prefetched to L2: rows are read in
// runs too short for the hardware prefetcher. Prefetches never fault, so they may point past the operand.
void pack_a(const GemmProblem& p, int64_t m0, int64_t rows, int64_t k0, int64_t kc, const float* sb_row,
            float extra, float* dst, int64_t row_step, int64_t group_step, int64_t prefetch) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* src = p.a + (m0 + i) * p.lda + k0;
    const float* sa = p.sa + (m0 + i) * p.sa_sm;
    for (int64_t g = 0; g < kc; g += 64) {
      const int64_t kb = (k0 + g) / kScaleBlockK;
      const float s = sa[kb * p.sa_sk] * (sb_row ? sb_row[kb * p.sb_sk] * extra : extra);
      _mm_prefetch(reinterpret_cast<const char*>(src + g + prefetch), _MM_HINT_T1);
      const __m512i raw = load64(src + g, kc - g);
      const bool fix = has_nan(raw);
      __m512 v[4];
      cvt64(raw, v);
      float* out = dst + i * row_step + g / 64 * group_step;
      for (int j = 0; j < 4; ++j)
        _mm512_store_ps(out + 16 * j, _mm512_mul_ps(fix ? fix_nan(v[j]) : v[j], _mm512_set1_ps(s)));
    }
  }
}

// 16x16 fp32 transpose in registers: afterwards r[j] holds column j.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int i = 0; i < 2; ++i)
    for (int c = 0; c < 4; ++c) {
      t[8 * i + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
      t[8 * i + 4 + c] = _mm512_shuffle_f32x4(r[8 * i + c], r[8 * i + 4 + c], 0xDD);
    }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
  }
}

// Converts B[n0 : n0 + cols, k0 : k0 + kc] to fp32 micro-panels [cols_pad / 32][kc_pad][32] (k in unpack
// order), each value times 256 * sb[n / sb_rows, kb], prefetching the next K chunk as pack_a does. Padding
// rows and k are zero: stale floats could be denormals, which cost the FMAs a microcode assist each.
void pack_b(const GemmProblem& p, int64_t n0, int64_t cols, int64_t k0, int64_t kc, float* dst) {
  const int64_t kc_pad = round_up(kc, 64);
  alignas(64) float conv[4][16][16];
  alignas(64) float scale[16];
  for (int64_t r0 = 0; r0 < round_up(cols, kNR); r0 += 16) {
    float* panel = dst + (r0 / kNR) * kc_pad * kNR + r0 % kNR;
    for (int64_t g = 0; g < kc; g += 64) {
      const int64_t kb = (k0 + g) / kScaleBlockK;
      __m512i seen = _mm512_setzero_si512();
      for (int64_t r = 0; r < 16; ++r) {
        __m512 v[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        scale[r] = 0.f;
        if (r0 + r < cols) {
          const int64_t n = n0 + r0 + r;
          _mm_prefetch(reinterpret_cast<const char*>(p.b + n * p.ldb + k0 + g + kKc), _MM_HINT_T1);
          const __m512i raw = load64(p.b + n * p.ldb + k0 + g, kc - g);
          seen = nan_track(seen, raw);
          cvt64(raw, v);
          scale[r] = p.sb[(n / p.sb_rows) * p.sb_sn + kb * p.sb_sk] * kTwo8;
        }
        for (int j = 0; j < 4; ++j) _mm512_store_ps(conv[j][r], v[j]);
      }
      const bool fix = nan_seen(seen);
      const __m512 s = _mm512_load_ps(scale);  // after the transpose, lane r is row r
      for (int j = 0; j < 4; ++j) {
        __m512 t[16];
        for (int r = 0; r < 16; ++r) t[r] = _mm512_load_ps(conv[j][r]);
        transpose16(t);
        for (int c = 0; c < 16; ++c)
          _mm512_store_ps(panel + (g + 16 * j + c) * kNR, _mm512_mul_ps(fix ? fix_nan(t[c]) : t[c], s));
      }
    }
  }
}

// ---- packed kernel (M > kGemvMaxM) ----
// C[0:MR, 0:32] (+)= A_panel[0:MR, 0:kc] * B_panel[0:kc, 0:32]; A rows kKc floats apart, C rows ldc apart.
template <int MR>
void ukernel(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, bool load_c) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = load_c ? _mm512_load_ps(c + i * ldc) : _mm512_setzero_ps();
    acc[i][1] = load_c ? _mm512_load_ps(c + i * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(b + k * kNR), b1 = _mm512_load_ps(b + k * kNR + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i * kKc + k]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_store_ps(c + i * ldc, acc[i][0]);
    _mm512_store_ps(c + i * ldc + 16, acc[i][1]);
  }
}

using UKernel = void (*)(const float*, const float*, int64_t, float*, int64_t, bool);
constexpr UKernel kUKernels[kMR + 1] = {nullptr,     ukernel<1>,  ukernel<2>,  ukernel<3>,  ukernel<4>,
                                        ukernel<5>,  ukernel<6>,  ukernel<7>,  ukernel<8>,  ukernel<9>,
                                        ukernel<10>, ukernel<11>, ukernel<12>, ukernel<13>, ukernel<kMR>};

// ---- GEMV kernel (M <= kGemvMaxM) ----
// Lane i of the result is the horizontal sum of v[i].
inline __m512 hsum16(const __m512 v[16]) {
  __m512 s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; ++i)
    s8[i] =
        _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(s8[2 * i]), y = _mm512_castps_pd(s8[2 * i + 1]);
    s4[i] =
        _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    s2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0x88),
                          _mm512_shuffle_f32x4(s4[2 * i], s4[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88), _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD));
}

// Rows per B sweep: M * R <= 16 accumulators, R B rows share every A load.
constexpr int rows_per_sweep(int m) { return m >= 9 ? 1 : 16 / m; }

// One 64-wide k step of a sweep: B rows converted in registers, each applied to all M rows of A_s. The same
// bytes of a later sweep's rows (`ahead` bytes further) are prefetched: a sweep reads only a K chunk of each
// row, too short a run for the hardware prefetcher.
template <int M, int R, bool kFixNaN, bool kFull>
inline void gemv_step(const float* a_g, const uint8_t* const* rows, int64_t ahead, int64_t g, int64_t len,
                      __m512* acc, __m512i& seen) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(rows[r] + ahead + g), _MM_HINT_T0);
    const __m512i raw = kFull ? _mm512_loadu_si512(rows[r] + g) : load64(rows[r] + g, len);
    if (!kFixNaN) seen = nan_track(seen, raw);
    __m512 v[4];
    cvt64(raw, v);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      if (kFixNaN) v[j] = fix_nan(v[j]);
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
        acc[r * M + m] = _mm512_fmadd_ps(_mm512_load_ps(a_g + m * 64 + 16 * j), v[j], acc[r * M + m]);
    }
  }
}

// out[r * M + m] (+)= A_s[m, 0:kc] . B[row r, 0:kc] for the lanes in `valid`, one vector update since out is
// [n][m]; A_s is laid out [kc / 64][M][64] in unpack order. Returns false (kFixNaN = false) when a NaN code
// was seen: the caller then redoes it with the fix-up.
template <int M, int R, bool kFixNaN>
bool gemv_sweep(const float* a_s, const uint8_t* const* rows, int64_t ahead, int64_t kc, float* out,
                __mmask16 valid, bool add) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  __m512i seen = _mm512_setzero_si512();
  int64_t g = 0;
  for (; g + 64 <= kc; g += 64) gemv_step<M, R, kFixNaN, true>(a_s + g * M, rows, ahead, g, 64, acc, seen);
  if (g < kc) gemv_step<M, R, kFixNaN, false>(a_s + g * M, rows, ahead, g, kc - g, acc, seen);
  if (!kFixNaN && nan_seen(seen)) return false;
  __m512 sums = hsum16(acc);
  if (add) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(valid, out));
  _mm512_mask_storeu_ps(out, valid, sums);
  return true;
}

template <int M>
void gemv_rows(const float* a_s, const uint8_t* const* rows, int64_t ahead, int64_t kc, float* out,
               __mmask16 valid, bool add) {
  constexpr int R = rows_per_sweep(M);
  if (!gemv_sweep<M, R, false>(a_s, rows, ahead, kc, out, valid, add))
    gemv_sweep<M, R, true>(a_s, rows, ahead, kc, out, valid, add);
}

using GemvRows = void (*)(const float*, const uint8_t* const*, int64_t, int64_t, float*, __mmask16, bool);
constexpr GemvRows kGemvRows[kGemvMaxM + 1] = {
    nullptr,       gemv_rows<1>,  gemv_rows<2>,  gemv_rows<3>,  gemv_rows<4>,  gemv_rows<5>,
    gemv_rows<6>,  gemv_rows<7>,  gemv_rows<8>,  gemv_rows<9>,  gemv_rows<10>, gemv_rows<11>,
    gemv_rows<12>, gemv_rows<13>, gemv_rows<14>, gemv_rows<15>, gemv_rows<16>};

// ---- epilogue ----
inline __m256i to_bf16(__m512 v) {  // round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)
  const __m512i x = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                        _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// D[m0 + i, n0 + j] (+)= acc[i * row_step + j * col_step] for i < rows, j < cols (col_step <= 16).
void store_tile(const GemmProblem& p, int64_t m0, int64_t rows, int64_t n0, int64_t cols, const float* acc,
                int64_t row_step, int64_t col_step) {
  const __m512i gather =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(int(col_step)));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 mask = cols - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (cols - j)) - 1);
      const float* src = acc + i * row_step + j * col_step;
      __m512 v = col_step == 1 ? _mm512_maskz_loadu_ps(mask, src)
                               : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, gather, src, 4);
      const int64_t off = (m0 + i) * p.ldd + n0 + j;
      if (p.d_type == OutType::kF32) {
        float* d = static_cast<float*>(p.d) + off;
        if (p.accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, d));
        _mm512_mask_storeu_ps(d, mask, v);
      } else {
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.d) + off, mask, to_bf16(v));
      }
    }
}

// ---- tiles ----
// All M rows against B rows [n0, n1): each B byte is read from memory once. K goes in chunks whose scaled A
// (a * sa * sb * 2^16, one copy per sb row met) stays in L1; B rows are swept R at a time.
void gemv_tile(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* scratch) {
  const int64_t rows_m = m1 - m0, cols = n1 - n0;
  const int64_t chunk = kGemvChunkFloats / rows_m / kScaleBlockK * kScaleBlockK;  // >= 128
  const int R = rows_per_sweep(int(rows_m));
  const int64_t ahead_rows = R * ((kGemvPrefetchBytes + R * chunk - 1) / (R * chunk));  // whole sweeps ahead
  float* a_s = scratch;                 // [chunk / 64][rows_m][64]
  float* out = a_s + kGemvChunkFloats;  // [cols][rows_m]
  for (int64_t k0 = 0; k0 < p.k; k0 += chunk) {
    const int64_t kc = min64(chunk, p.k - k0);
    for (int64_t g0 = n0; g0 < n1;) {  // rows sharing one sb row
      const int64_t sb_r = g0 / p.sb_rows, g1 = min64(n1, (sb_r + 1) * p.sb_rows);
      pack_a(p, m0, rows_m, k0, kc, p.sb + sb_r * p.sb_sn, 65536.f, a_s, 64, rows_m * 64, chunk);
      for (int64_t n = g0; n < g1; n += R) {
        const uint8_t* rows[16];
        for (int r = 0; r < R; ++r)
          rows[r] = p.b + min64(n + r, g1 - 1) * p.ldb + k0;  // clamped rows are discarded
        const __mmask16 valid = __mmask16((1u << (rows_m * min64(R, g1 - n))) - 1);
        // Prefetches never fault, even past B's end.
        kGemvRows[rows_m](a_s, rows, ahead_rows * p.ldb, kc, out + (n - n0) * rows_m, valid, k0 > 0);
      }
      g0 = g1;
    }
  }
  store_tile(p, m0, rows_m, n0, cols, out, 1, rows_m);
}

// BLIS order: per K chunk convert the A tile and the B tile to fp32 panels (scales folded), then for each
// 32-column B micro-panel (L1) run the 14-row A micro-panels (L2) over it, accumulating in an fp32 C tile.
void packed_tile(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* scratch) {
  const int64_t rows = m1 - m0, cols = n1 - n0, cols_pad = round_up(cols, kNR),
                panels = (rows + kMR - 1) / kMR;
  float* a_pack = scratch;                   // [kTileMaxM][kKc]
  float* b_pack = a_pack + kTileMaxM * kKc;  // [cols_pad / 32][kKc][32]
  float* c_acc = b_pack + kTileMaxN * kKc;   // [rows][cols_pad]
  for (int64_t k0 = 0; k0 < p.k; k0 += kKc) {
    const int64_t kc = min64(kKc, p.k - k0), kc_pad = round_up(kc, 64);
    pack_a(p, m0, rows, k0, kc, nullptr, kTwo8, a_pack, kKc, 64, kKc);
    pack_b(p, n0, cols, k0, kc, b_pack);
    // Balanced micro-panels: 17 rows run as 9 + 8, not as 14 + 3.
    for (int64_t j = 0; j < cols_pad; j += kNR)
      for (int64_t panel = 0, i = 0, mr; panel < panels; ++panel, i += mr) {
        mr = rows / panels + (panel < rows % panels);
        kUKernels[mr](a_pack + i * kKc, b_pack + j * kc_pad, kc_pad, c_acc + i * cols_pad + j, cols_pad,
                      k0 > 0);
      }
  }
  store_tile(p, m0, rows, n0, cols, c_acc, cols_pad, 1);
}

}  // namespace

void gemm_tile_avx512(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* scratch) {
  if (m1 - m0 <= kGemvMaxM)
    gemv_tile(p, m0, m1, n0, n1, static_cast<float*>(scratch));
  else
    packed_tile(p, m0, m1, n0, n1, static_cast<float*>(scratch));
}

}  // namespace dsv3::cpu
