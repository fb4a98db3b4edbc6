// MatMulLowBit on aarch64: what matmul_neon.cc (Advanced SIMD) and matmul_dotprod.cc (ARMv8.2
// sdot) share. The layout (codes in the op's own layout, activations permuted per unit of codes)
// is described in matmul_internal.h and below.
//
// accuracy=int8: a tile of 4 rows of W × up to 4 rows of A. Per 16 codes, each W row's codes
// become 16 int8 lanes (uniform: the codes 0 … 15 themselves; codebook: vqtbl1q into the block's
// int8 table) and each (A row, W row) pair adds q·w into an int32x4 accumulator: Dot::dot, sdot
// or vmull/vmlal + vpadal. Per block the accumulators are reduced exactly to one int32 per row
// (vpaddq), the zero point enters as −zp·Σq, and y += (d·scale)·dot in float — the scalar path's
// arithmetic, so the two agree bit for bit (with -ffp-contract=off, as CMakeLists.txt builds: no
// fused multiply-add on either side).
//
// Everything here has internal linkage (an unnamed namespace): matmul_dotprod.cc is compiled with
// -march=armv8.2-a+dotprod, and code it shared with other translation units through weak symbols
// could be the copy the linker keeps for a CPU without dotprod (DEVELOPERS.md). The helpers both
// files call are defined out of line in matmul_neon.cc.
#pragma once

#include <arm_neon.h>

#include <algorithm>
#include <cstring>

#include "matmul_internal.h"

namespace lowbit {
namespace matmul_detail {

// Rows [0, M) of A[M, K] permuted per narrow unit into out (row stride Kp, zero past K; out is
// zero-filled by the caller).
void neon_permute_rows(const float* A, int64_t M, int64_t K, int64_t Kp, int bits, float* out);
// Permuted per unit (wide or narrow), then each block quantized as ops.py says (QuantRow::init
// unused).
void neon_quantize_rows(const float* A, int64_t M, int64_t K, int64_t bs, int bits, bool wide,
                        const QuantRow* rows);

namespace {

// Units: a kernel takes a row's codes 16 columns at a time ("narrow", matmul_internal.h) or,
// for int8 when a block holds 16 bytes or more, 16 bytes at a time ("wide": 32 columns of 4-bit,
// 64 of 2-bit codes): one plain load, and field j of byte i (j < 8 / bits) — column (8/bits)·i + j
// of the unit — goes to lane i of vector j with a shift and a mask.
inline bool wide_units(int bits, int64_t bs) { return bs * bits >= 128; }

// The 16 codes of columns c … c + 15 (c a multiple of 16) from their packed bytes p, lane L
// holding column c + perm(L) (matmul_internal.h): the 8 bytes (2-bit: 4) duplicated over the
// register, one ushl, one and.
template <int BITS>
LOWBIT_INLINE uint8x16_t unit_codes(const uint8_t* p, int8x16_t shift) {
  if constexpr (BITS == 4) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return vandq_u8(vshlq_u8(vreinterpretq_u8_u64(vdupq_n_u64(v)), shift), vdupq_n_u8(15));
  } else {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return vandq_u8(vshlq_u8(vreinterpretq_u8_u32(vdupq_n_u32(v)), shift), vdupq_n_u8(3));
  }
}

// Per-lane right shifts (negative left shifts) that bring each lane's field down.
template <int BITS>
LOWBIT_INLINE int8x16_t unit_shifts() {
  if constexpr (BITS == 4) return vcombine_s8(vdup_n_s8(0), vdup_n_s8(-4));
  const int8x16_t lane = {0, 0, 0, 0, -2, -2, -2, -2, -4, -4, -4, -4, -6, -6, -6, -6};
  return lane;
}

enum class Zp { Const, Block, Codebook };

// 4 rows of W from n0 (rows ≥ N repeat the last and are not stored) × MT rows of A.
template <int BITS, Zp ZP, int MT, bool WIDE, class Dot>
void tile_int8(const MatMulWeight& p, const QuantRow* rows, int64_t n0, const float* bias,
               float* const* y) {
  constexpr int R = 4, kValues = 1 << BITS;
  const LowBitWeight& w = p.w;
  const int64_t nb = p.nblocks, bs = w.block_size, bb = bs * BITS / 8, units = bs / 16;
  const int8x16_t shift = unit_shifts<BITS>();
  int64_t row[R];
  for (int r = 0; r < R; ++r) row[r] = std::min(n0 + r, w.N - 1);
  const int64_t g = n0 / kGroup, i0 = n0 % kGroup;
  float32x4_t yv[MT];
  for (int m = 0; m < MT; ++m) yv[m] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* code[R];
    int8x16_t tab[R];
    for (int r = 0; r < R; ++r) {
      code[r] = w.packed + (row[r] * nb + b) * bb;
      if constexpr (ZP == Zp::Codebook) {
        const int8_t* t = p.scalar_tables.data() + (row[r] * nb + b) * kValues;
        if constexpr (BITS == 4) {
          tab[r] = vld1q_s8(t);
        } else {
          int32_t v;
          std::memcpy(&v, t, 4);
          tab[r] = vreinterpretq_s8_s32(vdupq_n_s32(v));
        }
      }
    }
    int32x4_t acc[MT][R];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = vdupq_n_s32(0);
    const int8_t* q[MT];
    for (int m = 0; m < MT; ++m) q[m] = rows[m].q + b * bs;
    // w_int of 16 codes: the codes themselves (uniform: −zp·Σq enters per block) or the table's
    auto weights = [&](int r, uint8x16_t idx) {
      if constexpr (ZP == Zp::Codebook)
        return vqtbl1q_s8(tab[r], idx);
      else
        return vreinterpretq_s8_u8(idx);
    };
    if constexpr (WIDE) {
      constexpr int F = 8 / BITS;  // fields per byte, vectors per 16-byte unit
      for (int64_t u = 0; u < bb / 16; ++u) {
        uint8x16_t x[R];
        for (int r = 0; r < R; ++r) x[r] = vld1q_u8(code[r] + 16 * u);
        for (int j = 0; j < F; ++j) {
          int8x16_t wv[R];
          for (int r = 0; r < R; ++r) {
            const uint8x16_t f = vshlq_u8(x[r], vdupq_n_s8(static_cast<int8_t>(-BITS * j)));
            wv[r] = weights(r, j + 1 < F ? vandq_u8(f, vdupq_n_u8((1 << BITS) - 1)) : f);
          }
          for (int m = 0; m < MT; ++m) {
            const int8x16_t qv = vld1q_s8(q[m] + 16 * (F * u + j));
            for (int r = 0; r < R; ++r) acc[m][r] = Dot::dot(acc[m][r], wv[r], qv);
          }
        }
      }
    } else {
      for (int64_t u = 0; u < units; ++u) {
        int8x16_t wv[R];
        for (int r = 0; r < R; ++r) wv[r] = weights(r, unit_codes<BITS>(code[r] + u * 2 * BITS, shift));
        for (int m = 0; m < MT; ++m) {
          const int8x16_t qv = vld1q_s8(q[m] + 16 * u);
          for (int r = 0; r < R; ++r) acc[m][r] = Dot::dot(acc[m][r], wv[r], qv);
        }
      }
    }
    const int64_t gb = g * nb + b;
    float32x4_t s;
    if (!p.byte_scales.empty()) {  // step · q, exactly the op's float scale
      uint32_t q4;
      std::memcpy(&q4, p.byte_scales.data() + gb * kGroup + i0, 4);
      const uint32x4_t q = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(q4)))));
      s = vmulq_f32(vld1q_f32(p.row_steps.data() + g * kGroup + i0), vcvtq_f32_u32(q));
    } else {
      s = p.half_scales.empty() ? vld1q_f32(p.scales.data() + gb * kGroup + i0)
                                : vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p.half_scales.data() + gb * kGroup + i0)));
    }
    int32x4_t zp = vdupq_n_s32(p.zp_const);
    if constexpr (ZP == Zp::Block) {
      uint32_t z4;
      std::memcpy(&z4, p.zp.data() + gb * kGroup + i0, 4);
      zp = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(z4))))));
    }
    for (int m = 0; m < MT; ++m) {
      int32x4_t dot = vpaddq_s32(vpaddq_s32(acc[m][0], acc[m][1]), vpaddq_s32(acc[m][2], acc[m][3]));
      if constexpr (ZP != Zp::Codebook) dot = vmlaq_n_s32(dot, zp, rows[m].qneg[b]);
      yv[m] = vaddq_f32(yv[m], vmulq_f32(vmulq_n_f32(s, rows[m].d[b]), vcvtq_f32_s32(dot)));
    }
  }
  const int64_t valid = std::min<int64_t>(R, w.N - n0);
  for (int m = 0; m < MT; ++m) {
    float out[R];
    vst1q_f32(out, yv[m]);
    for (int r = 0; r < valid; ++r) y[m][n0 + r] = out[r] + (bias ? bias[n0 + r] : 0.f);
  }
}

using TileFn = void (*)(const MatMulWeight&, const QuantRow*, int64_t, const float*, float* const*);

template <int BITS, Zp ZP, bool WIDE, class Dot>
TileFn tile_fn(int mt) {
  switch (mt) {
    case 4: return tile_int8<BITS, ZP, 4, WIDE, Dot>;
    case 2: return tile_int8<BITS, ZP, 2, WIDE, Dot>;
    default: return tile_int8<BITS, ZP, 1, WIDE, Dot>;
  }
}

template <int BITS, bool WIDE, class Dot>
TileFn tile_fn(const MatMulWeight& p, int mt) {
  if (p.w.format == Format::Codebook) return tile_fn<BITS, Zp::Codebook, WIDE, Dot>(mt);
  return p.zp.empty() ? tile_fn<BITS, Zp::Const, WIDE, Dot>(mt) : tile_fn<BITS, Zp::Block, WIDE, Dot>(mt);
}

template <class Dot>
TileFn tile_fn(const MatMulWeight& p, int mt) {
  const bool wide = wide_units(p.w.bits, p.w.block_size);
  if (p.w.bits == 2) return wide ? tile_fn<2, true, Dot>(p, mt) : tile_fn<2, false, Dot>(p, mt);
  return wide ? tile_fn<4, true, Dot>(p, mt) : tile_fn<4, false, Dot>(p, mt);
}

template <class Dot>
void matmul_int8_neon(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                      const ParallelFor& parallel) {
  const LowBitWeight& w = p.w;
  const QuantRow* rows = act_buffers().quant_rows(M, p.padded_k(), p.nblocks);
  neon_quantize_rows(A, M, w.K, w.block_size, w.bits, wide_units(w.bits, w.block_size), rows);
  TileFn fns[5];
  for (int mt : {1, 2, 4}) fns[mt] = tile_fn<Dot>(p, mt);
  for_ranges((w.N + 3) / 4, parallel, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)  // a tile's codes stay in L1 for all rows of A
      for (int64_t m = 0; m < M;) {
        const int mt = tile(M - m, 4);
        float* y[4];
        for (int i = 0; i < mt; ++i) y[i] = Y + (m + i) * w.N;
        fns[mt](p, rows + m, 4 * t, bias, y);
        m += mt;
      }
  });
}

}  // namespace
}  // namespace matmul_detail
}  // namespace lowbit
