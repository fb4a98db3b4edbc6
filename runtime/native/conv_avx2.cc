// ConvLowBit for AVX2 + FMA. Vectors run along output pixels (8 per ymm), as in conv_avx512.cc.
// AVX2 has no u8×s8 dot product that is both exact and faster than FMA, so int8 accuracy runs
// in float: q = rint(x·127/amax) and w_int are small integers and every block's Σ q·w_int stays
// below 2^24, hence exact; y += Σ_k q·w_int · (d[p]·block scale[n]) per block.
//
// General conv (Im2col view): per task (n chunk × pixel tiles) the task's weight rows decoded to
// float (Ŵ, or w_int for int8) and an FMA kernel of NR rows × PV vectors. Float walks K in
// chunks accumulating into Y; int8 quantizes a pixel tile's rows once, then sums each block in
// registers. Depthwise: direct convolution over the zero-padded, column-phase-split plane. The
// loops around the kernels are conv_driver.h's (conv_fma), over the traits Avx2 below.
#include <immintrin.h>

#include <cstring>

#include "conv_driver.h"

namespace lowbit {
namespace conv_detail {
namespace {

constexpr int64_t kL = 8;  // pixels per vector

inline __m256i lanes(int64_t n) {  // all-ones in lanes < n
  const int32_t k = static_cast<int32_t>(n < 0 ? 0 : n > kL ? kL : n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
// Stores/loads the first n lanes (vmaskmov only for partial vectors: it is slow on some CPUs).
inline void store_lanes(float* p, __m256 v, int64_t n) {
  if (n >= kL) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, lanes(n), v);
}
inline __m256 load_lanes(const float* p, int64_t n) {
  return n >= kL ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(n));
}
inline __m256 abs_ps(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
// 127 / amax, 0 where amax = 0
inline __m256 inv127(__m256 amax) {
  const __m256 nz = _mm256_cmp_ps(amax, _mm256_setzero_ps(), _CMP_GT_OQ);
  return _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(127.f), amax), nz);
}
inline __m256 rint_ps(__m256 x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

inline void copy_row(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + kL <= n; i += kL) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

// 16 codes j0 … j0+15 (j0 a multiple of 16) of a packed block, one per byte.
inline __m128i codes16(const uint8_t* blk, int bits, int64_t j0) {
  if (bits == 4) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + j0 / 2));
    const __m128i m = _mm_set1_epi8(15);
    return _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
  }
  int32_t raw;
  std::memcpy(&raw, blk + j0 / 4, 4);
  const __m128i v = _mm_cvtsi32_si128(raw), m = _mm_set1_epi8(3);
  const __m128i c0 = _mm_and_si128(v, m), c1 = _mm_and_si128(_mm_srli_epi16(v, 2), m);
  const __m128i c2 = _mm_and_si128(_mm_srli_epi16(v, 4), m), c3 = _mm_and_si128(_mm_srli_epi16(v, 6), m);
  return _mm_unpacklo_epi16(_mm_unpacklo_epi8(c0, c1), _mm_unpacklo_epi8(c2, c3));
}

// Row n, block b, columns [0, j1) into dst: Ŵ (float accuracy) or w_int (int8), as floats.
void decode_row_block(const ConvWeight& cw, int64_t n, int64_t b, int64_t j1, float* dst) {
  const uint8_t* blk = cw.w.packed + (n * cw.nblocks + b) * cw.block_bytes;
  alignas(32) float table[16] = {};  // value of each code
  value_table(cw, n, b, table);
  const __m256 lo = _mm256_load_ps(table), hi = _mm256_load_ps(table + 8);
  for (int64_t j = 0; j < j1; j += 16) {
    const __m128i c = codes16(blk, cw.w.bits, j);
    for (int h = 0; h < 2 && j + 8 * h < j1; ++h) {
      const __m256i ci = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(c, 8) : c);
      // codes ≥ 8 (bit 3 → sign bit) take the upper table
      const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, ci),
                                        _mm256_permutevar8x32_ps(hi, ci),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(ci, 28)));
      store_lanes(dst + j + 8 * h, v, j1 - j - 8 * h);
    }
  }
}

// a[r][v] += w[r·wstride]·x[v] for r < NR, v < PV: the step of both FMA kernels below.
template <int NR, int PV>
LB_INLINE void fma_step(__m256 (&a)[NR][PV], const __m256 (&x)[PV], const float* w, int64_t wstride) {
  LB_UNROLL
  for (int r = 0; r < NR; ++r) {
    const __m256 wv = _mm256_broadcast_ss(w + r * wstride);
    LB_UNROLL
    for (int v = 0; v < PV; ++v) a[r][v] = _mm256_fmadd_ps(wv, x[v], a[r][v]);
  }
}

// y[r, 8v + lane] (+)= Σ_k wf[r, k]·row_k[8v + lane] for r < NR, v < PV (lanes < valid), over a
// K chunk of kn rows; starts from the bias when first.
template <int NR, int PV>
void gemm_f32(const float* const* rows, int64_t off, int64_t kn, const float* wf, int64_t wstride,
              const float* bias, bool first, float* y, int64_t ystride, int64_t valid) {
  __m256 a[NR][PV];
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v)
      a[r][v] = first ? _mm256_set1_ps(bias ? bias[r] : 0.f)
                      : load_lanes(y + r * ystride + v * kL, valid - v * kL);
  for (int64_t k = 0; k < kn; ++k) {
    __m256 x[PV];
    LB_UNROLL
    for (int v = 0; v < PV; ++v) x[v] = _mm256_loadu_ps(rows[k] + off + v * kL);
    fma_step(a, x, wf + k, wstride);
  }
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v) store_lanes(y + r * ystride + v * kL, a[r][v], valid - v * kL);
}

constexpr auto kGemmF = kernel_table<GemmF, 4, 3>(
    [](auto r, auto v) -> GemmF { return gemm_f32<decltype(r)::value, decltype(v)::value>; });

// Rows r < NR, vectors v < PV: per block the exact integer sums in registers, then
// y = (first block ? bias : y) + isum·d[v]·qs[r] through memory (16 ymm hold only the sums).
template <int NR, int PV>
void gemm_i8(const Int8Tile& tl, int64_t v0, const float* wf, int64_t wstride, const float* qs,
             int64_t nb, const float* bias, float* y, int64_t ystride, int64_t valid) {
  for (int64_t b = 0; b < nb; ++b) {
    __m256 a[NR][PV];
    LB_UNROLL
    for (int r = 0; r < NR; ++r)
      LB_UNROLL
      for (int v = 0; v < PV; ++v) a[r][v] = _mm256_setzero_ps();
    for (int64_t k = b * tl.bs, k1 = min64(tl.K, k + tl.bs); k < k1; ++k) {
      __m256 x[PV];
      LB_UNROLL
      for (int v = 0; v < PV; ++v) x[v] = _mm256_loadu_ps(tl.q + k * tl.np + (v0 + v) * kL);
      fma_step(a, x, wf + k, wstride);
    }
    LB_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m256 sc = _mm256_broadcast_ss(qs + r * nb + b);
      LB_UNROLL
      for (int v = 0; v < PV; ++v) {
        float* yp = y + r * ystride + v * kL;
        const __m256 base = b == 0 ? _mm256_set1_ps(bias ? bias[r] : 0.f) : load_lanes(yp, valid - v * kL);
        const __m256 dq = _mm256_mul_ps(_mm256_loadu_ps(tl.d + b * tl.np + (v0 + v) * kL), sc);
        store_lanes(yp, _mm256_fmadd_ps(a[r][v], dq, base), valid - v * kL);
      }
    }
  }
}

constexpr auto kGemmI8 = kernel_table<GemmI8, 4, 3>(
    [](auto r, auto v) -> GemmI8 { return gemm_i8<decltype(r)::value, decltype(v)::value>; });

// dw_phase (conv_driver.h's DwStep): float Σ_t Ŵ_t·x_t; int8 per pixel and block
// q = rint(x·127/amax), Σ q·w_int exact in float (< 2^24).
template <int V, bool INT8>
void dw_phase(const float* base, const int32_t* off, const float* wk, int64_t K, int64_t bs,
              const float* qs, float bias, float* y, int64_t valid, DwStep step) {
  __m256 acc[V];
  LB_UNROLL
  for (int u = 0; u < V; ++u) acc[u] = _mm256_set1_ps(bias);
  auto tap = [&](int64_t t, int u) { return _mm256_loadu_ps(base + off[t] + u * step.in); };
  for (int64_t t0 = 0, b = 0; t0 < K; t0 += bs, ++b) {
    const int64_t t1 = min64(K, t0 + bs);
    if (!INT8) {
      for (int64_t t = t0; t < t1; ++t)
        LB_UNROLL
        for (int u = 0; u < V; ++u) acc[u] = _mm256_fmadd_ps(_mm256_set1_ps(wk[t]), tap(t, u), acc[u]);
      continue;
    }
    __m256 amax[V], inv[V], isum[V];
    LB_UNROLL
    for (int u = 0; u < V; ++u) amax[u] = isum[u] = _mm256_setzero_ps();
    for (int64_t t = t0; t < t1; ++t)
      LB_UNROLL
      for (int u = 0; u < V; ++u) amax[u] = _mm256_max_ps(amax[u], abs_ps(tap(t, u)));
    LB_UNROLL
    for (int u = 0; u < V; ++u) inv[u] = inv127(amax[u]);
    for (int64_t t = t0; t < t1; ++t)
      LB_UNROLL
      for (int u = 0; u < V; ++u)
        isum[u] = _mm256_fmadd_ps(rint_ps(_mm256_mul_ps(tap(t, u), inv[u])), _mm256_set1_ps(wk[t]),
                                  isum[u]);
    const __m256 sc = _mm256_set1_ps(qs[b] / 127.f);
    LB_UNROLL
    for (int u = 0; u < V; ++u) acc[u] = _mm256_fmadd_ps(isum[u], _mm256_mul_ps(amax[u], sc), acc[u]);
  }
  LB_UNROLL
  for (int u = 0; u < V; ++u)
    store_lanes(y + u * step.out, acc[u], valid - u * step.dvalid);
}

// kDwPhase(1 + int8, vectors)
constexpr auto kDwPhase = kernel_table<DwPhase, 2, 4>(
    [](auto i, auto v) -> DwPhase { return dw_phase<decltype(v)::value, decltype(i)::value == 2>; });

// The ISA traits of conv_driver.h's drivers.
struct Avx2 {
  static constexpr int64_t kL = 8;
  static constexpr int kFR = 4, kFV = 3, kIR = 4, kIV = 3;
  static constexpr int64_t kFTile = 4 * kFV;
  static constexpr int kDV = 4;  // vectors in flight (FMA latency)
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
    __m256 amax = _mm256_setzero_ps();
    for (int64_t i = 0; i < kn; ++i) amax = _mm256_max_ps(amax, abs_ps(_mm256_loadu_ps(r[i] + off)));
    const __m256 inv = inv127(amax);
    _mm256_storeu_ps(d, _mm256_div_ps(amax, _mm256_set1_ps(127.f)));
    for (int64_t i = 0; i < kn; ++i)
      _mm256_storeu_ps(q + i * qstride, rint_ps(_mm256_mul_ps(_mm256_loadu_ps(r[i] + off), inv)));
  }
};
static_assert(Avx2::kL == kL, "one vector length");

}  // namespace

void conv_avx2(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
               float* Y, const ParallelFor& parallel) {
  conv_fma<Avx2>(cw, s, X, bias, Y, parallel);
}

}  // namespace conv_detail
}  // namespace lowbit
