// The CPU MLA decode tile algorithm, written once over an ISA policy `Isa` (portable C++ or AVX-512) that
// supplies the vector pieces: row conversions to fp32, the Q·Kᵀ and P·V tile products, exp2 and row
// reductions. Included by mla_decode_kernels.cpp and mla_decode_avx512.cpp inside an anonymous namespace
// (each file gets its own copy compiled for its ISA), so it must include nothing with external inline
// definitions: <math.h> and <string.h> functions only.
//
// Per page of 64 keys: convert the valid tokens of the page to fp32 once (K, reused as V), S = Q·Kᵀ for the
// tile's rows (Q pre-scaled by softmax_scale·log2 e), online softmax in the log2 domain with exp2, O = O·α
// + P·V. Keys past cache_seqlens are never loaded; causal rows see a prefix of the page.

// ---- scalar conversions (shared by both policies for tails and the FP8 cache) ----

inline float mla_bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline float mla_f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else {  // zero or subnormal: mant * 2^-24, exact in fp32
    float f = float(mant) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// float8_e4m3fn: 4 exponent bits (bias 7), 3 mantissa bits, no infinities, 0x7F/0xFF = NaN.
inline float mla_e4m3_to_float(uint8_t q) {
  const uint32_t em = q & 0x7F;
  float f;
  if (em == 0x7F) {
    f = NAN;
  } else {
    const uint32_t e = em >> 3, m = em & 7;
    f = e == 0 ? float(m) * 0.001953125f : ldexpf(1.0f + float(m) * 0.125f, int(e) - 7);  // 2^-9 subnormals
  }
  return (q & 0x80) ? -f : f;
}

inline int64_t mla_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t mla_min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t mla_max(int64_t a, int64_t b) { return a > b ? a : b; }

// One packed FP8 token -> fp32 [d_qk]: d_v e4m3 values times their 1 x 128 group scale, then the bf16 rope.
inline void mla_fp8_token_scalar(const uint8_t* tok, int64_t d_qk, int64_t d_v, float* dst) {
  const int64_t groups = (d_v + 127) / 128;
  const uint8_t* scales = tok + d_v;
  const uint8_t* rope = scales + 4 * groups;
  for (int64_t g = 0; g < groups; ++g) {
    float s;
    memcpy(&s, scales + 4 * g, 4);
    for (int64_t i = g * 128; i < mla_min(d_v, (g + 1) * 128); ++i) dst[i] = mla_e4m3_to_float(tok[i]) * s;
  }
  for (int64_t i = d_v; i < d_qk; ++i) {
    uint16_t h;
    memcpy(&h, rope + 2 * (i - d_v), 2);
    dst[i] = mla_bf16_to_float(h);
  }
}

// A queue of cache lines to prefetch into L2: rows of `bytes` bytes, `stride` apart; step() issues the
// next `per_call` lines.
struct MlaPrefetch {
  const char* row = nullptr;
  int64_t stride = 0, bytes = 0, rows = 0, off = 0, per_call = 0;
  void step() {
    for (int64_t i = 0; i < per_call && rows > 0; ++i) {
      __builtin_prefetch(row + off, 0, 2);
      off += 64;
      if (off >= bytes) {
        off = 0;
        row += stride;
        --rows;
      }
    }
  }
};

// The fp32 math of a tile: Q rows (pre-scaled) and each page's K rows converted to fp32, Q·Kᵀ and P·V as
// fp32 products (Isa::qk / Isa::pv). Serves every dtype;
// Scratch (floats, 64-byte aligned arrays): Q [64][ldk], K [64][ldk]; the tile owns P [64][64], O [64][ldo].
template <class Isa>
struct MlaF32Math {
  const MlaProblem& pr;
  int64_t hk, ldk;
  float *q, *k;
  MlaPrefetch pf;

  static int64_t scratch_floats(int64_t d_qk) { return 2 * 64 * mla_round_up(d_qk, 16); }
  MlaF32Math(const MlaProblem& p, int64_t head, float* scratch)
      : pr(p), hk(head), ldk(mla_round_up(p.d_qk, 16)), q(scratch), k(scratch + 64 * ldk) {}

  void load_q(int64_t r, int64_t off) {
    Isa::to_float(pr.q_type, pr.q, off, pr.d_qk, pr.scale_log2, q + r * ldk);
    Isa::fill(q + r * ldk + pr.d_qk, ldk - pr.d_qk, 0.f);  // the products run over whole 16-float chunks
  }
  void load_page(int64_t page, int64_t valid) {
    for (int64_t n = 0; n < valid; ++n) {
      const int64_t off = page * pr.kv_sp + n * pr.kv_st + hk * pr.kv_sh;
      if (pr.kv_type == MlaType::kFp8Packed) {
        Isa::fp8_token(static_cast<const uint8_t*>(pr.kv) + off, pr.d_qk, pr.d_v, k + n * ldk);
      } else {
        Isa::to_float(pr.kv_type, pr.kv, off, pr.d_qk, 1.0f, k + n * ldk);
      }
      Isa::fill(k + n * ldk + pr.d_qk, ldk - pr.d_qk, 0.f);
    }
  }
  // Queues the next page's rows for prefetching into L2; qk and pv issue the prefetches a few lines at a time
  // between their register blocks, so the loads overlap compute (pages are scattered, so the hardware
  // prefetchers would start cold at each; a burst of ~1000 prefetches would stall on the fill buffers).
  void prefetch_page(int64_t page, int64_t n_valid, int64_t rows) {
    const int64_t elem = pr.kv_type == MlaType::kF32 ? 4 : pr.kv_type == MlaType::kFp8Packed ? 1 : 2;
    pf.bytes = pr.kv_type == MlaType::kFp8Packed
                   ? pr.d_v + 4 * ((pr.d_v + 127) / 128) + 2 * (pr.d_qk - pr.d_v)
                   : pr.d_qk * elem;
    pf.row = static_cast<const char*>(pr.kv) + (page * pr.kv_sp + hk * pr.kv_sh) * elem;
    pf.stride = pr.kv_st * elem;
    pf.rows = n_valid;
    pf.off = 0;
    const int64_t lines = n_valid * ((pf.bytes + 63) / 64);
    const int64_t calls = ((rows + 3) / 4) * (16 + (pr.d_v + 63) / 64);  // block calls of qk and pv
    pf.per_call = (lines + calls - 1) / calls;
  }
  // Scores in the log2 domain (Q carries softmax_scale · log2 e).
  void qk(int64_t rows, int64_t valid, float* s) { Isa::qk(q, ldk, rows, k, ldk, valid, pr.d_qk, s, 64, pf); }
  void pv(const float* p, int64_t rows, const int64_t* nv, float* o, int64_t ldo) {
    Isa::pv(p, 64, rows, nv, k, ldk, pr.d_v, o, ldo, pf);
    pf.rows = 0;  // whatever is left is loaded by the next page's conversion anyway
  }
};

// Floats the tile itself needs beside its math's scratch: P [64][64] and O [64][ldo], ldo = d_v rounded
// up to 32 floats.
inline int64_t mla_tile_floats(int64_t d_v) { return 64 * 64 + 64 * mla_round_up(d_v, 32); }

template <class Isa, class Math>
void mla_attend_tile(const MlaProblem& pr, int64_t req, int64_t hk, int64_t row0, int64_t row1,
                     int64_t first_block, int64_t last_block, float* out_o, int64_t ldo_out, float* out_lse,
                     void* scratch) {
  const int64_t rows = row1 - row0, d_v = pr.d_v, ldo = mla_round_up(d_v, 32);
  float* const sp = static_cast<float*>(scratch);
  float* const so = sp + 64 * 64;
  Math math(pr, hk, so + 64 * ldo);
  const int64_t s_k = pr.seqlens[req];
  const bool causal = pr.causal && pr.s_q > 1;

  float m[kMlaTileRows], l[kMlaTileRows];
  int64_t limit[kMlaTileRows];  // keys [0, limit) are visible to the row
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r, token = row / pr.group, head = hk * pr.group + row % pr.group;
    math.load_q(r, req * pr.q_sb + token * pr.q_ss + head * pr.q_sh);
    limit[r] = causal ? mla_max(0, mla_min(s_k, s_k - pr.s_q + token + 1)) : s_k;
    m[r] = -INFINITY;
    l[r] = 0.f;
    Isa::fill(so + r * ldo, ldo, 0.f);
  }

  for (int64_t blk = first_block; blk < last_block; ++blk) {
    const int64_t n0 = blk * kMlaPage, valid = mla_min(kMlaPage, s_k - n0);
    if (valid <= 0) break;
    if (blk + 1 < last_block && s_k > n0 + kMlaPage) {
      math.prefetch_page(pr.block_table[req * pr.bt_stride + blk + 1], mla_min(kMlaPage, s_k - n0 - kMlaPage),
                         rows);
    }
    math.load_page(pr.block_table[req * pr.bt_stride + blk], valid);
    math.qk(rows, valid, sp);
    int64_t nv[kMlaTileRows];  // keys of this page visible to each row (a prefix of the page)
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      float* p_row = sp + r * 64;
      nv[r] = mla_max(0, mla_min(valid, limit[r] - n0));
      if (nv[r] == 0) continue;
      const float mx = Isa::row_max(p_row, nv[r]);
      const float m_new = (mx > m[r] || mx != mx) ? mx : m[r];  // a NaN score makes the row NaN
      if (m_new == -INFINITY) {                                 // every visible score is -inf: nothing to add
        nv[r] = 0;
        continue;
      }
      const float alpha = m[r] == -INFINITY ? 0.f : exp2f(m[r] - m_new);
      const float sum = Isa::exp2_sub_sum(p_row, nv[r], m_new);
      if (alpha != 1.f) Isa::scale(so + r * ldo, d_v, alpha);
      l[r] = l[r] * alpha + sum;
      m[r] = m_new;
      any = true;
    }
    // Each row multiplies only the keys it sees: a NaN in a key it does not see must not reach it.
    if (any) math.pv(sp, rows, nv, so, ldo);
  }

  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out_o + r * ldo_out;
    if (l[r] == 0.f) {  // no key (NaN sums are not 0 and propagate below)
      Isa::fill(dst, d_v, 0.f);
      out_lse[r] = -INFINITY;
      continue;
    }
    Isa::scale_to(so + r * ldo, d_v, 1.f / l[r], dst);
    out_lse[r] = (m[r] + log2f(l[r])) * 0.6931471805599453f;
  }
}
