// ConvLowBit for aarch64 Advanced SIMD: conv_avx2.cc's design with 4-pixel vectors. Vectors run
// along output pixels; int8 accuracy runs in float, exactly: q = rint(x·127/amax) (vrndnq, ties
// to even like nearbyint) and w_int are small integers and every block's Σ q·w_int stays below
// 2^24; y += Σ_k q·w_int · (d[p]·block scale[n]) per block. (An sdot version would need the
// pixels' q transposed into groups of 4 columns; the float kernel is what runs on both NEON
// levels.)
//
// General conv (Im2col view): per task (n chunk × pixel tiles) the task's weight rows decoded to
// float (Ŵ, or w_int for int8) and an FMA kernel of NR rows × PV vectors (4 × 4: 16 of the 32
// vector registers accumulate). Float walks K in chunks accumulating into Y; int8 quantizes a
// pixel tile's rows once, then sums each block in registers. Depthwise: direct convolution over
// the zero-padded, column-phase-split plane.
#include <arm_neon.h>

#include <cstring>

#include "conv_internal.h"

namespace lowbit {
namespace conv_detail {
namespace {

constexpr int64_t kL = 4;  // pixels per vector
// register tiles are arrays of vectors: fully unrolled loops keep them in registers
#define LB_UNROLL _Pragma("GCC unroll 16")

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
// Stores/loads the first n lanes (through a stack copy for a partial vector).
inline void store_lanes(float* p, float32x4_t v, int64_t n) {
  if (n >= kL) return vst1q_f32(p, v);
  float t[4];
  vst1q_f32(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}
inline float32x4_t load_lanes(const float* p, int64_t n) {
  if (n >= kL) return vld1q_f32(p);
  float t[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return vld1q_f32(t);
}
inline float32x4_t abs_ps(float32x4_t x) { return vabsq_f32(x); }
// 127 / amax, 0 where amax = 0
inline float32x4_t inv127(float32x4_t amax) {
  const uint32x4_t nz = vcgtq_f32(amax, vdupq_n_f32(0.f));
  return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vdivq_f32(vdupq_n_f32(127.f), amax)), nz));
}
inline float32x4_t rint_ps(float32x4_t x) { return vrndnq_f32(x); }

inline void copy_row(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + kL <= n; i += kL) vst1q_f32(dst + i, vld1q_f32(src + i));
  for (; i < n; ++i) dst[i] = src[i];
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

// Row n, block b, columns [0, j1) into dst: Ŵ (float accuracy) or w_int (int8), as floats.
void decode_row_block(const ConvWeight& cw, int64_t n, int64_t b, int64_t j1, float* dst) {
  const LowBitWeight& w = cw.w;
  const int64_t i = n * cw.nblocks + b, ncodes = int64_t{1} << w.bits;
  const uint8_t* blk = w.packed + i * cw.block_bytes;
  float table[16] = {};  // value of each code
  if (cw.accuracy == Accuracy::Int8) {
    int8_t t[16];
    cw.int8_table(n, b, t);
    for (int64_t c = 0; c < ncodes; ++c) table[c] = t[c];
  } else if (w.format == Format::Codebook) {
    for (int64_t c = 0; c < ncodes; ++c) table[c] = w.levels[i * ncodes + c] * w.scales[i];
  } else {
    const int zp = cw.zero_point(n, b);
    for (int64_t c = 0; c < ncodes; ++c) table[c] = static_cast<float>(c - zp) * w.scales[i];
  }
  // the weight rows are decoded once per task and K chunk, so a table look-up per code will do
  uint8_t c[16];
  for (int64_t j = 0; j < j1; j += 16) {
    vst1q_u8(c, codes16(blk, w.bits, j));
    for (int64_t t = 0; t < min64(16, j1 - j); ++t) dst[j + t] = table[c[t]];
  }
}

// y[r, 4v + lane] (+)= Σ_k wf[r, k]·row_k[8v + lane] for r < NR, v < PV (lanes < valid), over a
// K chunk of kn rows; starts from the bias when first.
template <int NR, int PV>
void gemm_f32(const float* const* rows, int64_t off, int64_t kn, const float* wf, int64_t wstride,
              const float* bias, bool first, float* y, int64_t ystride, int64_t valid) {
  float32x4_t a[NR][PV];
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v)
      a[r][v] = first ? vdupq_n_f32(bias ? bias[r] : 0.f)
                      : load_lanes(y + r * ystride + v * kL, valid - v * kL);
  for (int64_t k = 0; k < kn; ++k) {
    float32x4_t x[PV];
    LB_UNROLL
    for (int v = 0; v < PV; ++v) x[v] = vld1q_f32(rows[k] + off + v * kL);
    LB_UNROLL
    for (int r = 0; r < NR; ++r) {
      const float32x4_t wv = vld1q_dup_f32(wf + r * wstride + k);
      LB_UNROLL
      for (int v = 0; v < PV; ++v) a[r][v] = vfmaq_f32(a[r][v], wv, x[v]);
    }
  }
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v) store_lanes(y + r * ystride + v * kL, a[r][v], valid - v * kL);
}

using GemmF = void (*)(const float* const*, int64_t, int64_t, const float*, int64_t, const float*,
                       bool, float*, int64_t, int64_t);
constexpr int kNR = 4, kPV = 4;
template <int NR>
constexpr GemmF kFRow[kPV] = {gemm_f32<NR, 1>, gemm_f32<NR, 2>, gemm_f32<NR, 3>, gemm_f32<NR, 4>};
constexpr const GemmF* kGemmF[kNR] = {kFRow<1>, kFRow<2>, kFRow<3>, kFRow<4>};
constexpr int64_t kKC = 256;  // K columns per float chunk (a multiple of every block size)

// Splits Ng rows × ntiles tiles into ~16 tasks: n chunks (multiples of nr, at most max_rows) ×
// tile ranges.
struct Split {
  int64_t nc, nchunks, tpt, tgroups;
  Split(int64_t Ng, int64_t ntiles, int64_t nr, int64_t max_rows) {
    nchunks = cdiv(Ng, max_rows);
    while (ntiles * nchunks < 8 && Ng / (nchunks * 2) >= 16) nchunks *= 2;
    nc = cdiv(cdiv(Ng, nchunks), nr) * nr;
    nchunks = cdiv(Ng, nc);
    tgroups = min64(ntiles, cdiv(16, nchunks));
    tpt = cdiv(ntiles, tgroups);
    tgroups = cdiv(ntiles, tpt);
  }
};

void conv_float(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                float* Y, const ParallelFor& parallel) {
  const int64_t K = cw.w.K, bs = cw.w.block_size, P = s.OH * s.OW;
  const int64_t kc = cdiv(kKC, bs) * bs;
  const int64_t Cg = s.C / s.group, Ng = s.N / s.group, tvmax = 4 * kPV;
  for (int64_t img = 0; img < s.batch; ++img)
    for (int64_t g = 0; g < s.group; ++g) {
      const Im2col m = make_im2col(s, X + (img * s.C + g * Cg) * s.H * s.W, tvmax * kL);
      const int64_t nv = cdiv(m.cols, kL), tv = min64(nv, tvmax), ntiles = cdiv(nv, tv);
      const Split sp(Ng, ntiles, kNR, Ng);
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
              decode_row_block(cw, n0 + i, (k0 + j) / bs, min64(bs, kn - j), wf + i * kc + j);
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t p0 = t * tv * kL, np = min64(tv * kL, m.cols - p0);
            m.rows(k0, kn, p0, tv * kL, r, buf);
            float* y = ybuf ? ybuf + (t - t0) * tv * kL : yn0 + p0;
            for (int64_t i = 0; i < rows; i += kNR) {
              const int nr = static_cast<int>(min64(kNR, rows - i));
              for (int64_t v = 0; v * kL < np; v += kPV) {
                const int pv = static_cast<int>(min64(kPV, cdiv(np, kL) - v));
                kGemmF[nr - 1][pv - 1](r, v * kL, kn, wf + i * kc, kc, bias ? bias + n0 + i : nullptr,
                                       k0 == 0, y + i * ystride + v * kL, ystride, np - v * kL);
              }
            }
          }
        }
        if (ybuf)
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t p0 = t * tv * kL;
            m.store(ybuf + (t - t0) * tv * kL, span, rows, p0, min64(tv * kL, m.cols - p0), yn0);
          }
      });
    }
}

// ---------------------------------------------------------------------------------------------
// int8 accuracy: per task, each pixel tile's im2col rows quantized once (q as floats, d per
// pixel and block), then the kernel below per NR rows × PV vectors.

struct Int8Tile {
  int64_t K, bs, nb, np;  // np = pixels per tile row of q
  const float* q;         // [K][np]
  const float* d;         // [nb][np]
};

// Rows r < NR, vectors v < PV: per block the exact integer sums in registers, then
// y = (first block ? bias : y) + isum·d[v]·qs[r] through memory (registers hold only the sums).
template <int NR, int PV>
void gemm_i8(const Int8Tile& tl, int64_t v0, const float* wf, int64_t wstride, const float* qs,
             int64_t nb, const float* bias, float* y, int64_t ystride, int64_t valid) {
  for (int64_t b = 0; b < nb; ++b) {
    float32x4_t a[NR][PV];
    LB_UNROLL
    for (int r = 0; r < NR; ++r)
      LB_UNROLL
      for (int v = 0; v < PV; ++v) a[r][v] = vdupq_n_f32(0.f);
    for (int64_t k = b * tl.bs, k1 = min64(tl.K, k + tl.bs); k < k1; ++k) {
      float32x4_t x[PV];
      LB_UNROLL
      for (int v = 0; v < PV; ++v) x[v] = vld1q_f32(tl.q + k * tl.np + (v0 + v) * kL);
      LB_UNROLL
      for (int r = 0; r < NR; ++r) {
        const float32x4_t wv = vld1q_dup_f32(wf + r * wstride + k);
        LB_UNROLL
        for (int v = 0; v < PV; ++v) a[r][v] = vfmaq_f32(a[r][v], wv, x[v]);
      }
    }
    LB_UNROLL
    for (int r = 0; r < NR; ++r) {
      const float32x4_t sc = vld1q_dup_f32(qs + r * nb + b);
      LB_UNROLL
      for (int v = 0; v < PV; ++v) {
        float* yp = y + r * ystride + v * kL;
        const float32x4_t base = b == 0 ? vdupq_n_f32(bias ? bias[r] : 0.f) : load_lanes(yp, valid - v * kL);
        const float32x4_t dq = vmulq_f32(vld1q_f32(tl.d + b * tl.np + (v0 + v) * kL), sc);
        store_lanes(yp, vfmaq_f32(base, a[r][v], dq), valid - v * kL);
      }
    }
  }
}

using GemmI8 = void (*)(const Int8Tile&, int64_t, const float*, int64_t, const float*, int64_t,
                        const float*, float*, int64_t, int64_t);
constexpr int kIR = 4, kIV = 4;
template <int NR>
constexpr GemmI8 kIRow[kIV] = {gemm_i8<NR, 1>, gemm_i8<NR, 2>, gemm_i8<NR, 3>, gemm_i8<NR, 4>};
constexpr const GemmI8* kGemmI8[kIR] = {kIRow<1>, kIRow<2>, kIRow<3>, kIRow<4>};

void conv_int8(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
               float* Y, const ParallelFor& parallel) {
  const int64_t K = cw.w.K, bs = cw.w.block_size, nb = cw.nblocks, P = s.OH * s.OW;
  const int64_t Cg = s.C / s.group, Ng = s.N / s.group;
  // tiles of tv vectors with a q buffer of ≤ ~192 KB
  const int64_t tvmax = 1 + min64(4 * kIV - 1, 192 * 1024 / (K * kL * 4));
  for (int64_t img = 0; img < s.batch; ++img)
    for (int64_t g = 0; g < s.group; ++g) {
      const Im2col m = make_im2col(s, X + (img * s.C + g * Cg) * s.H * s.W, tvmax * kL);
      const int64_t nv = cdiv(m.cols, kL), tv = min64(nv, tvmax), ntiles = cdiv(nv, tv);
      // the task's decoded rows (K floats each) stay within ~512 KB of L2
      const Split sp(Ng, ntiles, kIR, 1 + 512 * 1024 / (nb * bs * 4));
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
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t b = 0; b < nb; ++b)
            decode_row_block(cw, n0 + i, b, min64(bs, K - b * bs), wf + i * wstride + b * bs);
        const Int8Tile tl{K, bs, nb, np, q, d};
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t p0 = t * np, nvalid = min64(np, m.cols - p0);
          for (int64_t b = 0; b < nb; ++b) {  // q = rint(x·127/amax) per pixel and block
            const int64_t k0 = b * bs, kn = min64(bs, K - k0);
            m.rows(k0, kn, p0, np, r, q + k0 * np);  // copies (if any) land in q, quantized in place
            for (int64_t v = 0; v < tv; ++v) {
              float32x4_t amax = vdupq_n_f32(0.f);
              for (int64_t i = 0; i < kn; ++i)
                amax = vmaxq_f32(amax, abs_ps(vld1q_f32(r[i] + v * kL)));
              const float32x4_t inv = inv127(amax);
              vst1q_f32(d + b * np + v * kL, vdivq_f32(amax, vdupq_n_f32(127.f)));
              for (int64_t i = 0; i < kn; ++i)
                vst1q_f32(q + (k0 + i) * np + v * kL,
                                 rint_ps(vmulq_f32(vld1q_f32(r[i] + v * kL), inv)));
            }
          }
          float* y = ybuf ? ybuf : yn0 + p0;
          for (int64_t i = 0; i < rows; i += kIR) {
            const int nr = static_cast<int>(min64(kIR, rows - i));
            for (int64_t v = 0; v * kL < nvalid; v += kIV) {
              const int pv = static_cast<int>(min64(kIV, cdiv(nvalid, kL) - v));
              kGemmI8[nr - 1][pv - 1](tl, v, wf + i * wstride, wstride, cw.block_scales() + (n0 + i) * nb, nb,
                                      bias ? bias + n0 + i : nullptr, y + i * ystride + v * kL,
                                      ystride, nvalid - v * kL);
            }
          }
          if (ybuf) m.store(ybuf, ystride, rows, p0, nvalid, yn0);
        }
      });
    }
}

// ---------------------------------------------------------------------------------------------
// depthwise (the layout of conv_avx512.cc: zero-padded plane split by column phase; stride 1
// runs over "virtual" pixels oh·wq + ow and compacts)

constexpr int kDV = 6;  // vectors in flight (FMA latency × 2 pipes)

// V output vectors: vector u reads base + u·step.in and writes its first valid − u·step.dvalid
// lanes at y + u·step.out. Float: Σ_t Ŵ_t·x_t; int8: per pixel and block q = rint(x·127/amax),
// Σ q·w_int exact in float (< 2^24).
struct DwStep {
  int64_t in, out, dvalid;
};
template <int V, bool INT8>
void dw_phase(const float* base, const int32_t* off, const float* wk, int64_t K, int64_t bs,
              const float* qs, float bias, float* y, int64_t valid, DwStep step) {
  float32x4_t acc[V];
  LB_UNROLL
  for (int u = 0; u < V; ++u) acc[u] = vdupq_n_f32(bias);
  auto tap = [&](int64_t t, int u) { return vld1q_f32(base + off[t] + u * step.in); };
  for (int64_t t0 = 0, b = 0; t0 < K; t0 += bs, ++b) {
    const int64_t t1 = min64(K, t0 + bs);
    if (!INT8) {
      for (int64_t t = t0; t < t1; ++t)
        LB_UNROLL
        for (int u = 0; u < V; ++u) acc[u] = vfmaq_n_f32(acc[u], tap(t, u), wk[t]);
      continue;
    }
    float32x4_t amax[V], inv[V], isum[V];
    LB_UNROLL
    for (int u = 0; u < V; ++u) amax[u] = isum[u] = vdupq_n_f32(0.f);
    for (int64_t t = t0; t < t1; ++t)
      LB_UNROLL
      for (int u = 0; u < V; ++u) amax[u] = vmaxq_f32(amax[u], abs_ps(tap(t, u)));
    LB_UNROLL
    for (int u = 0; u < V; ++u) inv[u] = inv127(amax[u]);
    for (int64_t t = t0; t < t1; ++t)
      LB_UNROLL
      for (int u = 0; u < V; ++u)
        isum[u] = vfmaq_n_f32(isum[u], rint_ps(vmulq_f32(tap(t, u), inv[u])), wk[t]);
    const float32x4_t sc = vdupq_n_f32(qs[b] / 127.f);
    LB_UNROLL
    for (int u = 0; u < V; ++u) acc[u] = vfmaq_f32(acc[u], isum[u], vmulq_f32(amax[u], sc));
  }
  LB_UNROLL
  for (int u = 0; u < V; ++u)
    store_lanes(y + u * step.out, acc[u], valid - u * step.dvalid);
}

using DwPhase = void (*)(const float*, const int32_t*, const float*, int64_t, int64_t,
                         const float*, float, float*, int64_t, DwStep);
constexpr DwPhase kDwPhase[2][kDV] = {
    {dw_phase<1, false>, dw_phase<2, false>, dw_phase<3, false>, dw_phase<4, false>,
     dw_phase<5, false>, dw_phase<6, false>},
    {dw_phase<1, true>, dw_phase<2, true>, dw_phase<3, true>, dw_phase<4, true>, dw_phase<5, true>,
     dw_phase<6, true>}};

void conv_depthwise(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                    float* Y, const ParallelFor& parallel) {
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
          copy_row(r + s.pad_left, x + h * s.W, s.W);
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
            kDwPhase[int8][min64(kDV, nvec - v) - 1](pad + v * kL, off, wk, K, bs, qs, b0,
                                                     out + v * kL, run - v * kL, {kL, kL, kL});
          for (int64_t r = 0; r < s.OH; ++r) copy_row(y + r * s.OW, out + r * wq, s.OW);
        } else if (nvec == 1) {  // narrow rows: kDV rows at a time
          for (int64_t oh = 0; oh < s.OH; oh += kDV)
            kDwPhase[int8][min64(kDV, s.OH - oh) - 1](pad + oh * sh * wq, off, wk, K, bs, qs, b0,
                                                      y + oh * s.OW, s.OW, {sh * wq, s.OW, 0});
        } else {
          for (int64_t oh = 0; oh < s.OH; ++oh)
            for (int64_t v = 0; v < nvec; v += kDV)
              kDwPhase[int8][min64(kDV, nvec - v) - 1](pad + oh * sh * wq + v * kL, off, wk, K, bs,
                                                       qs, b0, y + oh * s.OW + v * kL,
                                                       s.OW - v * kL, {kL, kL, kL});
        }
      }
    }
  });
}

}  // namespace

void conv_neon(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
               float* Y, const ParallelFor& parallel) {
  if (s.C == s.group) return conv_depthwise(cw, s, X, bias, Y, parallel);
  if (cw.accuracy == Accuracy::Int8) return conv_int8(cw, s, X, bias, Y, parallel);
  conv_float(cw, s, X, bias, Y, parallel);
}

}  // namespace conv_detail
}  // namespace lowbit
