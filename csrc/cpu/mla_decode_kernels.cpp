// The portable C++ path of the CPU MLA decode kernel: the tile algorithm of mla_decode_tile.h over plain
// loops (left to the compiler's auto-vectorizer), used where AVX-512 is missing and as the A/B reference
// for the AVX-512 path.
#include <math.h>
#include <string.h>

#include "mla_decode_kernel.h"

namespace dsv3::cpu {
namespace {

#include "mla_decode_tile.h"

struct PortableIsa {
  static void to_float(MlaType t, const void* base, int64_t off, int64_t n, float scale, float* dst) {
    if (t == MlaType::kF32) {
      const float* src = static_cast<const float*>(base) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * scale;
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(base) + off;
      if (t == MlaType::kBF16) {
        for (int64_t i = 0; i < n; ++i) dst[i] = mla_bf16_to_float(src[i]) * scale;
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = mla_f16_to_float(src[i]) * scale;
      }
    }
  }
  static void fp8_token(const uint8_t* tok, int64_t d_qk, int64_t d_v, float* dst) {
    mla_fp8_token_scalar(tok, d_qk, d_v, dst);
  }
  static void fill(float* dst, int64_t n, float v) {
    for (int64_t i = 0; i < n; ++i) dst[i] = v;
  }
  static void qk(const float* q, int64_t ldq, int64_t rows, const float* k, int64_t ldk, int64_t keys,
                 int64_t d, float* s, int64_t lds, MlaPrefetch& pf) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t n = 0; n < keys; ++n) {
        float acc = 0.f;
        for (int64_t i = 0; i < d; ++i) acc += q[r * ldq + i] * k[n * ldk + i];
        s[r * lds + n] = acc;
      }
      pf.step();
    }
  }
  static float row_max(const float* x, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      if (x[i] != x[i]) return x[i];
      m = x[i] > m ? x[i] : m;
    }
    return m;
  }
  static float exp2_sub_sum(float* x, int64_t n, float m) {
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      x[i] = exp2f(x[i] - m);
      sum += x[i];
    }
    return sum;
  }
  static void scale(float* x, int64_t n, float a) {
    for (int64_t i = 0; i < n; ++i) x[i] *= a;
  }
  static void scale_to(const float* x, int64_t n, float a, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = x[i] * a;
  }
  static void pv(const float* p, int64_t ldp, int64_t rows, const int64_t* nv, const float* v, int64_t ldv,
                 int64_t d_v, float* o, int64_t ldo, MlaPrefetch& pf) {
    for (int64_t r = 0; r < rows; ++r) {
      float* orow = o + r * ldo;
      for (int64_t n = 0; n < nv[r]; ++n) {
        const float w = p[r * ldp + n];
        const float* vrow = v + n * ldv;
        for (int64_t c = 0; c < d_v; ++c) orow[c] += w * vrow[c];
      }
      pf.step();
    }
  }
};

}  // namespace

int64_t mla_scratch_bytes(int64_t d_qk, int64_t d_v) {
  return 4 * (mla_tile_floats(d_v) + MlaF32Math<PortableIsa>::scratch_floats(d_qk));
}

void mla_attend_portable(const MlaProblem& p, int64_t req, int64_t hk, int64_t row0, int64_t row1,
                         int64_t first_block, int64_t last_block, float* o, int64_t ldo, float* lse,
                         void* scratch) {
  mla_attend_tile<PortableIsa, MlaF32Math<PortableIsa>>(p, req, hk, row0, row1, first_block, last_block, o,
                                                        ldo, lse, scratch);
}

}  // namespace dsv3::cpu
