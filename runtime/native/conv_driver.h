// ConvLowBit drivers shared by the per-ISA translation units (conv_avx2.cc, conv_avx512.cc,
// conv_neon.cc, conv_dotprod.cc): the task splitting, the im2col / K-chunk / pixel-tile loops and
// the depthwise loops, written once as templates over an ISA traits type `T` that each file
// defines in its unnamed namespace, with its vector length and micro-kernels:
//
//   struct T {
//     static constexpr int64_t kL;   // pixels per vector
//     // conv_float: kernels of up to kFR rows × kFV vectors, pixel tiles of ≤ kFTile vectors
//     static constexpr int kFR, kFV;
//     static constexpr int64_t kFTile;
//     static void decode_f32(const ConvWeight&, int64_t n, int64_t b, int64_t j1, float* dst);
//     static GemmF gemm_f32(int nr, int pv);         // the kernel of nr rows × pv vectors
//     // conv_int8_fma (int8 accuracy computed in float): kIR rows × kIV vectors
//     static constexpr int kIR, kIV;
//     static void quantize(const float* const* r, int64_t kn, int64_t off, float* q,
//                          int64_t qstride, float* d);  // one vector of pixels, kn rows
//     static GemmI8 gemm_i8(int nr, int pv);
//     // conv_depthwise_fma: up to kDV vectors in flight
//     static constexpr int kDV;
//     static void copy_row(float* dst, const float* src, int64_t n);
//     static DwPhase dw_phase(bool int8, int vectors);
//   };
//
// (a file provides only what the drivers it calls use; kernel_table builds its kernel tables).
// Linkage: a template instantiated with a traits type from an unnamed namespace has internal
// linkage, and everything else here (cdiv, the kernel tables, the aarch64 helpers at the end) sits
// in an unnamed namespace too, so each translation unit compiles its own copy and none emits a
// weak symbol another could pick (DEVELOPERS.md: a copy compiled for AVX-512 or ARMv8.2 must never
// serve the scalar path). Keep it so: what must exist once goes out of line into conv.cc (Split).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "conv_internal.h"

// register tiles are arrays of vectors: fully unrolled loops keep them in registers
#define LB_UNROLL _Pragma("GCC unroll 16")
#define LB_INLINE inline __attribute__((always_inline))

namespace lowbit {
namespace conv_detail {
namespace {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int64_t kKC = 256;  // K columns per float chunk (a multiple of every block size)

// y[r, L·v + lane] (+)= Σ_k wf[r, k]·row_k[off + L·v + lane] for r < NR, v < PV (lanes < valid),
// over a K chunk of kn rows; starts from the bias when first.
using GemmF = void (*)(const float* const* rows, int64_t off, int64_t kn, const float* wf,
                       int64_t wstride, const float* bias, bool first, float* y, int64_t ystride,
                       int64_t valid);

// int8 accuracy in float: a pixel tile's im2col rows quantized once (q as floats, d per pixel
// and block).
struct Int8Tile {
  int64_t K, bs, nb, np;  // np = pixels per tile row of q
  const float* q;         // [K][np]
  const float* d;         // [nb][np]
};
using GemmI8 = void (*)(const Int8Tile& tl, int64_t v0, const float* wf, int64_t wstride,
                        const float* qs, int64_t nb, const float* bias, float* y, int64_t ystride,
                        int64_t valid);

// Depthwise: V output vectors, vector u reads base + u·step.in and writes its first
// valid − u·step.dvalid lanes at y + u·step.out.
struct DwStep {
  int64_t in, out, dvalid;
};
using DwPhase = void (*)(const float* base, const int32_t* off, const float* wk, int64_t K,
                         int64_t bs, const float* qs, float bias, float* y, int64_t valid,
                         DwStep step);

// The kernels of 1 … NR rows × 1 … PV vectors: table(nr, pv). make(nr, pv), called with
// std::integral_constant<int, ·> arguments, names the kernel, e.g.
//   constexpr auto kGemmF = kernel_table<GemmF, 4, 3>([](auto r, auto v) -> GemmF {
//     return gemm_f32<decltype(r)::value, decltype(v)::value>; });
template <class Fn, int PV>
struct KernelRow {
  Fn fn[PV];
};
template <class Fn, int NR, int PV>
struct KernelTable {
  KernelRow<Fn, PV> row[NR];
  constexpr Fn operator()(int nr, int pv) const { return row[nr - 1].fn[pv - 1]; }
};
template <class Fn, int PV, int R, class Make, int... V>
constexpr KernelRow<Fn, PV> kernel_row(Make make, std::integer_sequence<int, V...>) {
  return {{make(std::integral_constant<int, R>(), std::integral_constant<int, V + 1>())...}};
}
template <class Fn, int NR, int PV, class Make, int... R>
constexpr KernelTable<Fn, NR, PV> kernel_rows(Make make, std::integer_sequence<int, R...>) {
  return {{kernel_row<Fn, PV, R + 1>(make, std::make_integer_sequence<int, PV>())...}};
}
template <class Fn, int NR, int PV, class Make>
constexpr KernelTable<Fn, NR, PV> kernel_table(Make make) {
  return kernel_rows<Fn, NR, PV>(make, std::make_integer_sequence<int, NR>());
}

// Row n's values for columns [0, K) into dst, block by block through T::decode_f32 (Ŵ at float
// accuracy; the decode_f32 of the int8-in-float ISAs gives w_int).
template <class T>
void decode_row_f32(const ConvWeight& cw, int64_t n, float* dst) {
  const int64_t bs = cw.w.block_size, K = cw.w.K;
  for (int64_t b = 0; b * bs < K; ++b) T::decode_f32(cw, n, b, min64(bs, K - b * bs), dst + b * bs);
}

// fn(i, nr, v, pv) over a task's kernel calls: rows [0, rows) NR at a time (the last fewer) ×
// the vectors of `valid` pixels (L per vector) in as few groups of ≤ PV as there can be, of
// sizes differing by at most one (4 vectors with PV = 3: 2 + 2, not 3 + 1).
template <int NR, int PV, int64_t L, class Fn>
inline void for_kernels(int64_t rows, int64_t valid, Fn&& fn) {
  const int64_t nv = cdiv(valid, L), groups = cdiv(nv, PV);
  for (int64_t i = 0; i < rows; i += NR) {
    const int nr = static_cast<int>(min64(NR, rows - i));
    for (int64_t gi = 0, v = 0; gi < groups; ++gi) {
      const int pv = static_cast<int>((nv - v) / (groups - gi));  // the rest split evenly
      fn(i, nr, v, pv);
      v += pv;
    }
  }
}

// Float accuracy, general conv (Im2col view): per task (n chunk × pixel tiles) the task's weight
// rows of a K chunk decoded to float and T's FMA kernels accumulating into Y (virtual pixels:
// into a buffer that Im2col::store compacts).
template <class T>
void conv_float(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                float* Y, const ParallelFor& parallel) {
  constexpr int64_t kL = T::kL;
  const int64_t K = cw.w.K, bs = cw.w.block_size, P = s.OH * s.OW;
  const int64_t kc = cdiv(kKC, bs) * bs;
  const int64_t Cg = s.C / s.group, Ng = s.N / s.group, tvmax = T::kFTile;
  for (int64_t img = 0; img < s.batch; ++img)
    for (int64_t g = 0; g < s.group; ++g) {
      const Im2col m = make_im2col(s, X + (img * s.C + g * Cg) * s.H * s.W, tvmax * kL);
      const int64_t nv = cdiv(m.cols, kL), tv = min64(nv, tvmax), ntiles = cdiv(nv, tv);
      const Split sp(Ng, ntiles, T::kFR, Ng);
      parallel(sp.nchunks * sp.tgroups, [&](std::size_t task) {
        const int64_t n0 = g * Ng + (task / sp.tgroups) * sp.nc;
        const int64_t rows = min64(sp.nc, (g + 1) * Ng - n0);
        const int64_t t0 = (task % sp.tgroups) * sp.tpt, t1 = min64(ntiles, t0 + sp.tpt);
        const int64_t span = (t1 - t0) * tv * kL;
        float* buf = scratch_of<float>(1, kc * tv * kL);
        float* wf = scratch_of<float>(2, rows * kc);
        // virtual pixels accumulate in ybuf over the K chunks, then store() keeps the real ones
        float* ybuf = m.virtual_pixels() ? scratch_of<float>(4, rows * span) : nullptr;
        float* yn0 = Y + (img * s.N + n0) * P;
        const int64_t ystride = ybuf ? span : P;
        const float* r[kKC];
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          const int64_t kn = min64(kc, K - k0);
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < kn; j += bs)
              T::decode_f32(cw, n0 + i, (k0 + j) / bs, min64(bs, kn - j), wf + i * kc + j);
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t p0 = t * tv * kL, np = min64(tv * kL, m.cols - p0);
            m.rows(k0, kn, p0, tv * kL, r, buf);
            float* y = ybuf ? ybuf + (t - t0) * tv * kL : yn0 + p0;
            for_kernels<T::kFR, T::kFV, kL>(rows, np, [&](int64_t i, int nr, int64_t v, int pv) {
              T::gemm_f32(nr, pv)(r, v * kL, kn, wf + i * kc, kc, bias ? bias + n0 + i : nullptr,
                                  k0 == 0, y + i * ystride + v * kL, ystride, np - v * kL);
            });
            if (!ybuf && k0 + kn == K) finish_tile(m, yn0, rows, p0, np);
          }
        }
        if (ybuf)
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t p0 = t * tv * kL, np = min64(tv * kL, m.cols - p0);
            m.store(ybuf + (t - t0) * tv * kL, span, rows, p0, np, yn0);
            finish_tile(m, yn0, rows, p0, np);
          }
      });
    }
}

// int8 accuracy computed in float (AVX2, NEON): q = rint(x·127/amax) and w_int are small
// integers and every block's Σ q·w_int stays below 2^24, hence exact. Per task, each pixel
// tile's im2col rows are quantized once (T::quantize), then T's kernels sum each block in
// registers: y += Σ_k q·w_int · (d[p]·block scale[n]).
template <class T>
void conv_int8_fma(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                   float* Y, const ParallelFor& parallel) {
  constexpr int64_t kL = T::kL;
  const int64_t K = cw.w.K, bs = cw.w.block_size, nb = cw.nblocks, P = s.OH * s.OW;
  const int64_t Cg = s.C / s.group, Ng = s.N / s.group;
  // tiles of tv vectors with a q buffer of ≤ ~192 KB
  const int64_t tvmax = 1 + min64(4 * T::kIV - 1, 192 * 1024 / (K * kL * 4));
  for (int64_t img = 0; img < s.batch; ++img)
    for (int64_t g = 0; g < s.group; ++g) {
      const Im2col m = make_im2col(s, X + (img * s.C + g * Cg) * s.H * s.W, tvmax * kL);
      const int64_t nv = cdiv(m.cols, kL), tv = min64(nv, tvmax), ntiles = cdiv(nv, tv);
      // the task's decoded rows (K floats each) stay within ~512 KB of L2
      const Split sp(Ng, ntiles, T::kIR, 1 + 512 * 1024 / (nb * bs * 4));
      parallel(sp.nchunks * sp.tgroups, [&](std::size_t task) {
        const int64_t n0 = g * Ng + (task / sp.tgroups) * sp.nc;
        const int64_t rows = min64(sp.nc, (g + 1) * Ng - n0);
        const int64_t t0 = (task % sp.tgroups) * sp.tpt, t1 = min64(ntiles, t0 + sp.tpt);
        const int64_t np = tv * kL;
        float* q = scratch_of<float>(1, K * np);
        float* d = scratch_of<float>(3, nb * np);
        float* wf = scratch_of<float>(2, rows * nb * bs);
        float* ybuf = m.virtual_pixels() ? scratch_of<float>(4, rows * np) : nullptr;
        float* yn0 = Y + (img * s.N + n0) * P;
        const int64_t ystride = ybuf ? np : P;
        const int64_t wstride = nb * bs;
        const float* r[256];
        for (int64_t i = 0; i < rows; ++i) decode_row_f32<T>(cw, n0 + i, wf + i * wstride);
        const Int8Tile tl{K, bs, nb, np, q, d};
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t p0 = t * np, nvalid = min64(np, m.cols - p0);
          for (int64_t b = 0; b < nb; ++b) {  // q = rint(x·127/amax) per pixel and block
            const int64_t k0 = b * bs, kn = min64(bs, K - k0);
            m.rows(k0, kn, p0, np, r, q + k0 * np);  // copies (if any) land in q, quantized in place
            for (int64_t v = 0; v < tv; ++v)
              T::quantize(r, kn, v * kL, q + k0 * np + v * kL, np, d + b * np + v * kL);
          }
          float* y = ybuf ? ybuf : yn0 + p0;
          for_kernels<T::kIR, T::kIV, kL>(rows, nvalid, [&](int64_t i, int nr, int64_t v, int pv) {
            T::gemm_i8(nr, pv)(tl, v, wf + i * wstride, wstride, cw.block_scales() + (n0 + i) * nb, nb,
                               bias ? bias + n0 + i : nullptr, y + i * ystride + v * kL, ystride,
                               nvalid - v * kL);
          });
          if (ybuf) m.store(ybuf, ystride, rows, p0, nvalid, yn0);
          finish_tile(m, yn0, rows, p0, nvalid);
        }
      });
    }
}

// Depthwise (AVX2, NEON; the layout of conv_avx512.cc): direct convolution over the zero-padded
// plane split by column phase; stride 1 runs over "virtual" pixels oh·wq + ow and compacts.
template <class T>
void conv_depthwise_fma(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                        float* Y, const ParallelFor& parallel) {
  constexpr int64_t kL = T::kL;
  constexpr int kDV = T::kDV;
  const int64_t K = cw.w.K, bs = cw.w.block_size, nb = cw.nblocks, Ng = s.N / s.group;
  const int64_t sh = s.stride_h, sw = s.stride_w;
  const int64_t hp = s.H + s.pad_top + s.pad_bottom, wp = s.W + s.pad_left + s.pad_right;
  const int64_t wq = cdiv(wp, sw), plane = hp * wq;
  const bool virt = sh == 1 && sw == 1;
  const int64_t run = virt ? s.OH * wq : s.OW, nvec = cdiv(run, kL);  // outputs per kernel run
  const int64_t P = s.OH * s.OW, planes = s.batch * s.group;
  const int64_t tasks = min64(planes, 8), per = cdiv(planes, tasks);
  const bool int8 = cw.accuracy == Accuracy::Int8;
  parallel(tasks, [&](std::size_t task) {
    const int64_t total = sw * plane + nvec * kL + 2 * wq;  // slack: lanes past the last output
    float* pad = scratch_of<float>(1, total);
    float* wk = scratch_of<float>(2, K);  // Ŵ (float) or w_int (int8) of the current channel
    int32_t* off = scratch_of<int32_t>(3, K);
    float* out = virt ? scratch_of<float>(4, nvec * kL) : nullptr;
    for (int64_t t = 0; t < K; ++t) {
      const int64_t cx = t % s.kw * s.dilation_w;
      off[t] = static_cast<int32_t>(cx % sw * plane + t / s.kw * s.dilation_h * wq + cx / sw);
    }
    std::memset(pad, 0, total * sizeof(float));  // the border stays zero: planes fill the interior
    for (int64_t pi = task * per; pi < min64(planes, (task + 1) * per); ++pi) {
      const int64_t img = pi / s.group, g = pi % s.group;
      const float* x = X + (img * s.C + g) * s.H * s.W;
      for (int64_t h = 0; h < s.H; ++h) {
        float* r = pad + (h + s.pad_top) * wq;
        if (sw == 1) {
          T::copy_row(r + s.pad_left, x + h * s.W, s.W);
          continue;
        }
        // padded column cp = c + pad_left goes to phase cp mod sw, position cp / sw
        for (int64_t c = 0, ph = s.pad_left % sw, q = s.pad_left / sw; c < s.W; ++c) {
          r[ph * plane + q] = x[h * s.W + c];
          if (++ph == sw) ph = 0, ++q;
        }
      }
      for (int64_t n = g * Ng; n < (g + 1) * Ng; ++n) {
        decode_row(cw, n, wk);
        const float b0 = bias ? bias[n] : 0.f;
        const float* qs = int8 ? cw.block_scales() + n * nb : nullptr;
        float* y = Y + (img * s.N + n) * P;
        if (virt) {
          for (int64_t v = 0; v < nvec; v += kDV)
            T::dw_phase(int8, static_cast<int>(min64(kDV, nvec - v)))(
                pad + v * kL, off, wk, K, bs, qs, b0, out + v * kL, run - v * kL, {kL, kL, kL});
          for (int64_t r = 0; r < s.OH; ++r) T::copy_row(y + r * s.OW, out + r * wq, s.OW);
        } else if (nvec == 1) {  // narrow rows: kDV rows at a time
          for (int64_t oh = 0; oh < s.OH; oh += kDV)
            T::dw_phase(int8, static_cast<int>(min64(kDV, s.OH - oh)))(
                pad + oh * sh * wq, off, wk, K, bs, qs, b0, y + oh * s.OW, s.OW, {sh * wq, s.OW, 0});
        } else {
          for (int64_t oh = 0; oh < s.OH; ++oh)
            for (int64_t v = 0; v < nvec; v += kDV)
              T::dw_phase(int8, static_cast<int>(min64(kDV, nvec - v)))(
                  pad + oh * sh * wq + v * kL, off, wk, K, bs, qs, b0, y + oh * s.OW + v * kL,
                  s.OW - v * kL, {kL, kL, kL});
        }
        finish_rows(s, y, 1, 0, P);
      }
    }
  });
}

// The whole op for an ISA whose int8 accuracy runs in float (AVX2, NEON).
template <class T>
void conv_fma(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
              float* Y, const ParallelFor& parallel) {
  if (s.C == s.group) return conv_depthwise_fma<T>(cw, s, X, bias, Y, parallel);
  if (cw.accuracy == Accuracy::Int8) return conv_int8_fma<T>(cw, s, X, bias, Y, parallel);
  conv_float<T>(cw, s, X, bias, Y, parallel);
}

#if defined(__aarch64__)
// What conv_neon.cc and conv_dotprod.cc share beside the drivers: 4-lane vectors.
// Stores the first n lanes (through a stack copy for a partial vector).
inline void store_lanes(float* p, float32x4_t v, int64_t n) {
  if (n >= 4) return vst1q_f32(p, v);
  float t[4];
  vst1q_f32(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}
// 16 codes j0 … j0+15 (j0 a multiple of 16) of a packed block, one per byte, in column order.
inline uint8x16_t codes16(const uint8_t* blk, int bits, int64_t j0) {
  if (bits == 4) {
    const uint8x8_t v = vld1_u8(blk + j0 / 2);
    const uint8x8_t lo = vand_u8(v, vdup_n_u8(15)), hi = vshr_n_u8(v, 4);
    return vcombine_u8(vzip1_u8(lo, hi), vzip2_u8(lo, hi));
  }
  uint32_t raw;
  std::memcpy(&raw, blk + j0 / 4, 4);
  const uint8x8_t v = vreinterpret_u8_u32(vdup_n_u32(raw)), m = vdup_n_u8(3);
  const uint8x8_t c0 = vand_u8(v, m), c1 = vand_u8(vshr_n_u8(v, 2), m);
  const uint8x8_t c2 = vand_u8(vshr_n_u8(v, 4), m), c3 = vshr_n_u8(v, 6);
  const uint16x4_t c01 = vreinterpret_u16_u8(vzip1_u8(c0, c1)), c23 = vreinterpret_u16_u8(vzip1_u8(c2, c3));
  return vcombine_u8(vreinterpret_u8_u16(vzip1_u16(c01, c23)), vreinterpret_u8_u16(vzip2_u16(c01, c23)));
}
#endif

}  // namespace
}  // namespace conv_detail
}  // namespace lowbit
