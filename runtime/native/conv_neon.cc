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
// the zero-padded, column-phase-split plane. The loops around the kernels are conv_driver.h's
// (conv_fma), over the traits Neon below.
#include <arm_neon.h>

#include <cstring>

#include "conv_driver.h"

namespace lowbit {
namespace conv_detail {
namespace {

constexpr int64_t kL = 4;  // pixels per vector

// Loads the first n lanes (through a stack copy for a partial vector).
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

// Row n, block b, columns [0, j1) into dst: Ŵ (float accuracy) or w_int (int8), as floats.
void decode_row_block(const ConvWeight& cw, int64_t n, int64_t b, int64_t j1, float* dst) {
  const uint8_t* blk = cw.w.packed + (n * cw.nblocks + b) * cw.block_bytes;
  float table[16] = {};  // value of each code
  value_table(cw, n, b, table);
  // the weight rows are decoded once per task and K chunk, so a table look-up per code will do
  uint8_t c[16];
  for (int64_t j = 0; j < j1; j += 16) {
    vst1q_u8(c, codes16(blk, cw.w.bits, j));
    for (int64_t t = 0; t < min64(16, j1 - j); ++t) dst[j + t] = table[c[t]];
  }
}

// a[r][v] += w[r·wstride]·x[v] for r < NR, v < PV: the step of both FMA kernels below.
template <int NR, int PV>
LB_INLINE void fma_step(float32x4_t (&a)[NR][PV], const float32x4_t (&x)[PV], const float* w, int64_t wstride) {
  LB_UNROLL
  for (int r = 0; r < NR; ++r) {
    const float32x4_t wv = vld1q_dup_f32(w + r * wstride);
    LB_UNROLL
    for (int v = 0; v < PV; ++v) a[r][v] = vfmaq_f32(a[r][v], wv, x[v]);
  }
}

// y[r, 4v + lane] (+)= Σ_k wf[r, k]·row_k[4v + lane] for r < NR, v < PV (lanes < valid), over a
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
    fma_step(a, x, wf + k, wstride);
  }
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v) store_lanes(y + r * ystride + v * kL, a[r][v], valid - v * kL);
}

constexpr auto kGemmF = kernel_table<GemmF, 4, 4>(
    [](auto r, auto v) -> GemmF { return gemm_f32<decltype(r)::value, decltype(v)::value>; });

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
      fma_step(a, x, wf + k, wstride);
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

constexpr auto kGemmI8 = kernel_table<GemmI8, 4, 4>(
    [](auto r, auto v) -> GemmI8 { return gemm_i8<decltype(r)::value, decltype(v)::value>; });

// dw_phase (conv_driver.h's DwStep): float Σ_t Ŵ_t·x_t; int8 per pixel and block
// q = rint(x·127/amax), Σ q·w_int exact in float (< 2^24).
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

// kDwPhase(1 + int8, vectors)
constexpr auto kDwPhase = kernel_table<DwPhase, 2, 6>(
    [](auto i, auto v) -> DwPhase { return dw_phase<decltype(v)::value, decltype(i)::value == 2>; });

// The ISA traits of conv_driver.h's drivers.
struct Neon {
  static constexpr int64_t kL = 4;
  static constexpr int kFR = 4, kFV = 4, kIR = 4, kIV = 4;  // 16 of the 32 registers accumulate
  static constexpr int64_t kFTile = 4 * kFV;
  static constexpr int kDV = 6;  // vectors in flight (FMA latency × 2 pipes)
  static void decode_f32(const ConvWeight& cw, int64_t n, int64_t b, int64_t j1, float* dst) {
    decode_row_block(cw, n, b, j1, dst);
  }
  static GemmF gemm_f32(int nr, int pv) { return kGemmF(nr, pv); }
  static GemmI8 gemm_i8(int nr, int pv) { return kGemmI8(nr, pv); }
  static DwPhase dw_phase(bool int8, int vectors) { return kDwPhase(1 + int8, vectors); }
  static void copy_row(float* dst, const float* src, int64_t n) { conv_detail::copy_row(dst, src, n); }
  // q = rint(x·127/amax) of one vector of pixels over rows r[0, kn) at off, d = amax / 127
  static void quantize(const float* const* r, int64_t kn, int64_t off, float* q, int64_t qstride,
                       float* d) {
    float32x4_t amax = vdupq_n_f32(0.f);
    for (int64_t i = 0; i < kn; ++i) amax = vmaxq_f32(amax, abs_ps(vld1q_f32(r[i] + off)));
    const float32x4_t inv = inv127(amax);
    vst1q_f32(d, vdivq_f32(amax, vdupq_n_f32(127.f)));
    for (int64_t i = 0; i < kn; ++i) vst1q_f32(q + i * qstride, rint_ps(vmulq_f32(vld1q_f32(r[i] + off), inv)));
  }
};
static_assert(Neon::kL == kL, "one vector length");

}  // namespace

void conv_neon(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
               float* Y, const ParallelFor& parallel) {
  conv_fma<Neon>(cw, s, X, bias, Y, parallel);
}

}  // namespace conv_detail
}  // namespace lowbit
