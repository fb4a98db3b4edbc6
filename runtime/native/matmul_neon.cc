// MatMulLowBit kernels for aarch64 Advanced SIMD (every aarch64 CPU; layouts: matmul_internal.h).
//
// accuracy=float: one row of W × up to 4 rows of A. Per block, the 2^bits decoded values
// Ŵ = (code − zp)·scale or level·scale (computed exactly as the scalar path does) are split into
// 4 byte planes, one register each; 16 codes then give their 16 floats with 4 vqtbl1q look-ups
// and 8 zips, which 4 FMAs per row of A take against the permuted activations.
// accuracy=int8 without the dot-product extension: matmul_neon.h's kernel, products by vmull_s8
// and vmlal_high_s8 (two products ≤ 2·127·127 fit int16) summed into int32 by vpadalq_s16.
#include "matmul_neon.h"

namespace lowbit {
namespace matmul_detail {

// Columns [c0, c0 + 16) of a row of K into the lanes of a narrow unit (zeros past K): lane L ←
// column perm(L) (matmul_internal.h), exactly what vld2q / vld4q de-interleave.
static void permute_narrow(const float* a, int64_t K, int64_t c0, int bits, float* dst) {
  float tail[16] = {};
  const float* src = a + c0;
  if (c0 + 16 > K) {
    for (int64_t k = c0; k < K; ++k) tail[k - c0] = a[k];
    src = tail;
  }
  if (bits == 4) {
    const float32x4x2_t x = vld2q_f32(src), y = vld2q_f32(src + 8);
    vst1q_f32(dst, x.val[0]);
    vst1q_f32(dst + 4, y.val[0]);
    vst1q_f32(dst + 8, x.val[1]);
    vst1q_f32(dst + 12, y.val[1]);
  } else {
    const float32x4x4_t x = vld4q_f32(src);
    for (int j = 0; j < 4; ++j) vst1q_f32(dst + 4 * j, x.val[j]);
  }
}

// Columns [c0, c0 + 128 / bits) into a wide unit: lane 16j + i ← column (8/bits)·i + j.
static void permute_wide(const float* a, int64_t K, int64_t c0, int bits, float* dst) {
  const int F = 8 / bits;
  for (int j = 0; j < F; ++j)
    for (int i = 0; i < 16; ++i) {
      const int64_t k = c0 + F * i + j;
      dst[16 * j + i] = k < K ? a[k] : 0.f;
    }
}

void neon_permute_rows(const float* A, int64_t M, int64_t K, int64_t Kp, int bits, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c0 = 0; c0 < K; c0 += 16) permute_narrow(A + m * K, K, c0, bits, out + m * Kp + c0);
}

void neon_quantize_rows(const float* A, int64_t M, int64_t K, int64_t bs, int bits, bool wide,
                        const QuantRow* rows) {
  const int64_t unit = wide ? 128 / bits : 16;
  alignas(16) float buf[256];  // one permuted block (block_size ≤ 256)
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * K;
    const QuantRow& r = rows[m];
    for (int64_t k0 = 0, b = 0; k0 < K; k0 += bs, ++b) {
      for (int64_t u = 0; u < bs; u += unit)
        (wide ? permute_wide : permute_narrow)(a, K, k0 + u, bits, buf + u);
      float32x4_t vmax = vdupq_n_f32(0.f);
      for (int64_t k = 0; k < bs; k += 4) vmax = vmaxq_f32(vmax, vabsq_f32(vld1q_f32(buf + k)));
      const float amax = vmaxvq_f32(vmax);
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32x4_t sum = vdupq_n_s32(0);
      for (int64_t k = 0; k < bs; k += 16) {
        int32x4_t q[4];
        for (int j = 0; j < 4; ++j) {  // rint(a·inv), ties to even like nearbyint
          q[j] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(buf + k + 4 * j), inv));
          sum = vaddq_s32(sum, q[j]);
        }
        const int16x8_t lo = vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]));
        const int16x8_t hi = vcombine_s16(vmovn_s32(q[2]), vmovn_s32(q[3]));
        vst1q_s8(r.q + k0 + k, vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
      }
      r.d[b] = amax / 127.f;
      r.qneg[b] = -vaddvq_s32(sum);
    }
  }
}

namespace {

// ---- accuracy=int8, plain NEON ----

struct DotMull {
  static LOWBIT_INLINE int32x4_t dot(int32x4_t acc, int8x16_t w, int8x16_t q) {
    const int16x8_t p = vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(q)), w, q);
    return vpadalq_s16(acc, p);
  }
};

// ---- accuracy=float ----

struct Planes {
  uint8x16_t p[4];  // p[j] lane v: byte j of the float value of code v
};

template <int BITS, bool CODEBOOK, bool ZP>
LOWBIT_INLINE Planes block_planes(const LowBitWeight& w, int64_t nb, int64_t n, int64_t b) {
  const int64_t i = n * nb + b;
  const float s = w.scales[i];
  float32x4_t t[4];
  if constexpr (CODEBOOK) {
    for (int j = 0; j < (BITS == 4 ? 4 : 1); ++j) t[j] = vmulq_n_f32(vld1q_f32(w.level_table(i) + 4 * j), s);
  } else {
    const float zp = static_cast<float>(ZP ? w.zero_points[i] : 1 << (BITS - 1));
    const float32x4_t iota = {0.f, 1.f, 2.f, 3.f};
    for (int j = 0; j < (BITS == 4 ? 4 : 1); ++j)  // (v − zp)·s: v − zp is exact in float
      t[j] = vmulq_n_f32(vsubq_f32(vaddq_f32(iota, vdupq_n_f32(4.f * j)), vdupq_n_f32(zp)), s);
  }
  if constexpr (BITS == 2) t[1] = t[2] = t[3] = t[0];  // codes < 4 never read them
  const uint8x16_t f0 = vreinterpretq_u8_f32(t[0]), f1 = vreinterpretq_u8_f32(t[1]);
  const uint8x16_t f2 = vreinterpretq_u8_f32(t[2]), f3 = vreinterpretq_u8_f32(t[3]);
  const uint8x16_t e01 = vuzp1q_u8(f0, f1), o01 = vuzp2q_u8(f0, f1);
  const uint8x16_t e23 = vuzp1q_u8(f2, f3), o23 = vuzp2q_u8(f2, f3);
  return {{vuzp1q_u8(e01, e23), vuzp1q_u8(o01, o23), vuzp2q_u8(e01, e23), vuzp2q_u8(o01, o23)}};
}

// The 16 floats of codes idx: w[j] = lanes 4j … 4j + 3.
LOWBIT_INLINE void lookup(const Planes& P, uint8x16_t idx, float32x4_t* w) {
  const uint8x16_t b0 = vqtbl1q_u8(P.p[0], idx), b1 = vqtbl1q_u8(P.p[1], idx);
  const uint8x16_t b2 = vqtbl1q_u8(P.p[2], idx), b3 = vqtbl1q_u8(P.p[3], idx);
  const uint16x8_t l01 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), h01 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
  const uint16x8_t l23 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), h23 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
  w[0] = vreinterpretq_f32_u16(vzip1q_u16(l01, l23));
  w[1] = vreinterpretq_f32_u16(vzip2q_u16(l01, l23));
  w[2] = vreinterpretq_f32_u16(vzip1q_u16(h01, h23));
  w[3] = vreinterpretq_f32_u16(vzip2q_u16(h01, h23));
}

// y[m][n] for MT rows of the permuted A (row stride Kp).
template <int BITS, bool CODEBOOK, bool ZP, int MT>
void row_float(const LowBitWeight& w, int64_t nb, const float* a, int64_t Kp, int64_t n,
               const float* bias, float* const* y) {
  const int64_t bs = w.block_size, units = bs / 16;
  const int8x16_t shift = unit_shifts<BITS>();
  const uint8_t* code = w.packed + n * nb * (bs * BITS / 8);
  float32x4_t acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < nb; ++b) {
    const Planes P = block_planes<BITS, CODEBOOK, ZP>(w, nb, n, b);
    for (int64_t u = 0; u < units; ++u, code += 2 * BITS) {
      float32x4_t wv[4];
      lookup(P, unit_codes<BITS>(code, shift), wv);
      const float* ap = a + b * bs + 16 * u;
      for (int m = 0; m < MT; ++m) {
        const float* am = ap + m * Kp;
        acc[m][0] = vfmaq_f32(acc[m][0], wv[0], vld1q_f32(am));
        acc[m][1] = vfmaq_f32(acc[m][1], wv[1], vld1q_f32(am + 4));
        acc[m][0] = vfmaq_f32(acc[m][0], wv[2], vld1q_f32(am + 8));
        acc[m][1] = vfmaq_f32(acc[m][1], wv[3], vld1q_f32(am + 12));
      }
    }
  }
  for (int m = 0; m < MT; ++m) y[m][n] = vaddvq_f32(vaddq_f32(acc[m][0], acc[m][1])) + (bias ? bias[n] : 0.f);
}

using RowFn = void (*)(const LowBitWeight&, int64_t, const float*, int64_t, int64_t, const float*,
                       float* const*);

template <int BITS, bool CODEBOOK, bool ZP>
RowFn row_fn(int mt) {
  switch (mt) {
    case 4: return row_float<BITS, CODEBOOK, ZP, 4>;
    case 2: return row_float<BITS, CODEBOOK, ZP, 2>;
    default: return row_float<BITS, CODEBOOK, ZP, 1>;
  }
}

template <int BITS>
RowFn row_fn(const LowBitWeight& w, int mt) {
  if (w.format == Format::Codebook) return row_fn<BITS, true, false>(mt);
  return w.zero_points ? row_fn<BITS, false, true>(mt) : row_fn<BITS, false, false>(mt);
}

void matmul_float(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                  const ParallelFor& parallel) {
  const LowBitWeight& w = p.w;
  const int64_t Kp = p.padded_k();
  float* a = act_buffers().float_rows(M, Kp);
  neon_permute_rows(A, M, w.K, Kp, w.bits, a);
  RowFn fns[5];
  for (int mt : {1, 2, 4}) fns[mt] = w.bits == 2 ? row_fn<2>(w, mt) : row_fn<4>(w, mt);
  for_ranges(w.N, parallel, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M;) {
        const int mt = tile(M - m, 4);
        float* y[4];
        for (int i = 0; i < mt; ++i) y[i] = Y + (m + i) * w.N;
        fns[mt](w, p.nblocks, a + m * Kp, Kp, n, bias, y);
        m += mt;
      }
  });
}

}  // namespace

void matmul_neon(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                 const ParallelFor& parallel) {
  if (p.accuracy == Accuracy::Int8)
    matmul_int8_neon<DotMull>(p, A, M, bias, Y, parallel);
  else
    matmul_float(p, A, M, bias, Y, parallel);
}

}  // namespace matmul_detail
}  // namespace lowbit
