// ConvLowBit for AVX-512 (F/BW/VL/DQ/VNNI). Vectors run along output pixels: 16 pixels per zmm,
// NCHW's contiguous axis for the input planes, the Im2col rows (conv_internal.h) and Y.
//
// int8 accuracy (the fast path): phase 1 quantizes the im2col matrix once per call into u8
// (q + 128) in "quad" layout — per pixel tile, per group of 4 consecutive K columns, 16 pixels × 4
// bytes per zmm — plus d = amax / 127 per pixel and block; phase 2 decodes a few weight rows
// into an int8 panel (4-bit codes → w_int through 16-byte pshufb tables, 64 columns a step) and
// runs vpdpbusd with each row's 4 weights broadcast:  Σ (q + 128)·w = Σ q·w + 128·Σ w, so every
// block's integer accumulator starts at −128·wsum[n, b]. Per block: y += cvt(isum)·d[p]·(block
// scale). Stride-1 convs with OW = W (3×3 pad 1 and the like) read the im2col rows straight from
// the input planes with masked loads (DirectRows): no padded copy, no virtual pixels. A conv too
// small to share (< 2^20 multiply-adds) runs on the calling thread alone.
//
// float accuracy: per task the weight rows of a 256-column K chunk decoded to float (a 16-float
// table per block through vpermps) and an FMA kernel accumulating into Y (virtual pixels: into
// a buffer that Im2col::store compacts): conv_driver.h's conv_float over the traits Avx512.
//
// Depthwise (one input channel per group): float 3×3 stride 1 reads the planes directly, a few
// output rows per pass (conv_depthwise3x3); the rest runs a direct 2-D convolution over the
// zero-padded channel split into stride phases, one run of "virtual" pixels per plane (see
// conv_depthwise). A 1-channel int8 conv goes to conv_int8, which quantizes once for all outputs.
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // false positives in GCC 12's AVX-512 headers (PR 105593)
#endif

#include <cstring>
#include <functional>

#include "conv_driver.h"

namespace lowbit {
namespace conv_detail {
namespace {

constexpr int64_t kL = 16;  // pixels per vector
inline __mmask16 lanes(int64_t n) {
  return n >= kL ? static_cast<__mmask16>(0xFFFF)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

// dst[0, n) = src[0, n) for the short rows of a plane (no library call per row).
inline void copy_row(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += kL) {
    const __mmask16 m = lanes(n - i);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_maskz_loadu_ps(m, src + i));
  }
}

// Virtual pixels j … j+15 (see Im2col; first lane at row oh, column ow0 < wq, wq ≥ 16) into an
// output plane of rows OW wide: the lanes of row oh, then those past the row end into row
// oh + 1; lanes at ow ≥ OW or j ≥ run (the virtual pixels in all) are dropped.
inline void store_virtual(float* y, int64_t j, int64_t oh, int64_t ow0, int64_t wq, int64_t OW,
                          int64_t run, __m512 x) {
  _mm512_mask_storeu_ps(y + oh * OW + ow0, lanes(OW - ow0) & lanes(run - j), x);
  const int64_t next = wq - ow0;  // the first lane in row oh + 1
  if (next < kL)
    _mm512_mask_storeu_ps(y + (oh + 1) * OW - next,
                          lanes(run - j) & lanes(next + OW) & ~lanes(next), x);
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

inline __mmask64 lanes64(int64_t n) {
  return n >= 64 ? ~__mmask64{0} : n <= 0 ? __mmask64{0} : (__mmask64{1} << n) - 1;
}

// Row n's w_int for columns [0, nblocks·bs) into dst (block b at b·bs), 0 from column K on, 64
// columns per step: codes one per byte, then each 16-column lane through its block's table
// (pshufb): the codebook's int8 table or code − zero point.
void decode_row_s8(const ConvWeight& cw, int64_t n, int8_t* dst) {
  const int64_t bs = cw.w.block_size, nb = cw.nblocks, cols = nb * bs, K = cw.w.K;
  const int bits = cw.w.bits;
  const uint8_t* row = cw.w.packed + n * nb * cw.block_bytes;
  auto table = [&](int64_t b) {
    const int64_t i = n * nb + b;
    if (!cw.lut.empty())
      return _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (1 << bits)) - 1), cw.lut.data() + (i << bits));
    const int zp = cw.w.zero_points ? cw.w.zero_points[i] : 1 << (bits - 1);
    return _mm_sub_epi8(_mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                        _mm_set1_epi8(static_cast<char>(zp)));
  };
  const bool one_table = cw.lut.empty() && !cw.w.zero_points;
  __m512i t4 = _mm512_broadcast_i32x4(table(0));
  for (int64_t j = 0; j < cols; j += 64) {
    __m512i c;  // codes j … j+63
    if (bits == 4) {  // byte = two codes, low nibble first
      const __m512i w = _mm512_cvtepu8_epi16(
          _mm256_maskz_loadu_epi8(static_cast<__mmask32>(lanes64((cols - j) / 2)), row + j / 2));
      c = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(15)),
                          _mm512_slli_epi16(_mm512_srli_epi16(w, 4), 8));
    } else {  // byte = four codes, low bits first
      const __m512i w = _mm512_cvtepu8_epi32(
          _mm_maskz_loadu_epi8(static_cast<__mmask16>(lanes64((cols - j) / 4)), row + j / 4));
      c = _mm512_and_si512(_mm512_or_si512(_mm512_or_si512(w, _mm512_slli_epi32(w, 6)),
                                           _mm512_or_si512(_mm512_slli_epi32(w, 12), _mm512_slli_epi32(w, 18))),
                           _mm512_set1_epi32(0x03030303));
    }
    if (!one_table) {
      const int64_t b0 = j / bs, last = nb - 1;
      t4 = _mm512_castsi128_si512(table(b0));
      t4 = _mm512_inserti32x4(t4, table(min64((j + 16) / bs, last)), 1);
      t4 = _mm512_inserti32x4(t4, table(min64((j + 32) / bs, last)), 2);
      t4 = _mm512_inserti32x4(t4, table(min64((j + 48) / bs, last)), 3);
    }
    _mm512_mask_storeu_epi8(dst + j, lanes64(cols - j),
                            _mm512_maskz_shuffle_epi8(lanes64(K - j), t4, c));
  }
}

// Row n's Ŵ for columns [0, j1) of block b into dst.
void decode_f32(const ConvWeight& cw, int64_t n, int64_t b, int64_t j1, float* dst) {
  const LowBitWeight& w = cw.w;
  const int64_t i = n * cw.nblocks + b, ncodes = int64_t{1} << w.bits;
  const uint8_t* blk = w.packed + i * cw.block_bytes;
  // t[c] = Ŵ of code c, computed as ops.py does (lanes ≥ 2^bits unused)
  const __m512 sc = _mm512_set1_ps(w.scales[i]);
  const __m512 t =
      w.format == Format::Codebook
          ? _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(ncodes), w.level_table(i)), sc)
          : _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(
                              _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                              _mm512_set1_epi32(cw.zero_point(n, b)))),
                          sc);
  for (int64_t j = 0; j < j1; j += 16) {
    const __m512i c = _mm512_cvtepu8_epi32(codes16(blk, w.bits, j));
    _mm512_mask_storeu_ps(dst + j, lanes(j1 - j), _mm512_permutexvar_ps(c, t));
  }
}

// ---------------------------------------------------------------------------------------------
// int8 accuracy, general conv

struct Int8Plan {
  int64_t K, bs, nb, qb, qlast, cols, tv, ntiles, quads;
  // per tile: quads × tv × 64 bytes of activations, then nb × tv × 16 floats of d
  int64_t act_bytes() const { return quads * tv * 64; }
  int64_t tile_bytes() const { return act_bytes() + nb * tv * kL * 4; }
};

// Stride-1 convs whose output is as wide as the input (OW = W, e.g. 3×3 pad 1; not 1×1) read
// the input planes themselves, no padded copy: row k = (c, ky, kx) of output pixel
// p = oh·W + ow is X[c, oh + ky·dh − pt, ow + kx·dw − pl], i.e. plane c at p + off[ky·kw + kx]
// with off = (ky·dh − pt)·W + kx·dw − pl, where that (row, column) is inside the plane; masked
// loads (a mask per pixel vector and tap) read the rest as 0. Pixels are the real ones (no
// virtual pixels to compute and drop).
struct DirectRows {
  const float* x = nullptr;  // the group's first input channel
  int64_t hw = 0, taps = 0;  // plane size, kh·kw
  const int64_t* off = nullptr;  // [taps]
};

// The masks of a pixel tile: mk[v·taps + t] for pixel vector v < tv, lanes of pixels < P only.
void direct_masks(const ConvShape& s, int64_t p0, int64_t tv, __mmask16* mk) {
  const int64_t P = s.OH * s.OW, taps = s.kh * s.kw;
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t v = 0; v < tv; ++v) {
    const int64_t q0 = p0 + v * kL;
    const __m512i p = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(q0)), iota);
    // oh = p / OW exactly: p < 2^23, so p + 0.5 is a float and (p + 0.5) / OW, at least 0.5 / OW
    // from an integer, is never rounded onto one
    const __m512i oh = _mm512_cvttps_epi32(_mm512_div_ps(
        _mm512_add_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(0.5f)), _mm512_set1_ps(static_cast<float>(s.OW))));
    const __m512i ow = _mm512_sub_epi32(p, _mm512_mullo_epi32(oh, _mm512_set1_epi32(static_cast<int>(s.OW))));
    const __mmask16 real = lanes(P - q0);
    __mmask16 rows[16], cols[16];  // kh, kw ≤ 16 (else per tap below)
    const bool small = s.kh <= 16 && s.kw <= 16;
    auto row_ok = [&](int64_t ky) {  // 0 ≤ oh + ky·dh − pt < H (unsigned compare)
      return _mm512_cmplt_epu32_mask(
          _mm512_add_epi32(oh, _mm512_set1_epi32(static_cast<int>(ky * s.dilation_h - s.pad_top))),
          _mm512_set1_epi32(static_cast<int>(s.H)));
    };
    auto col_ok = [&](int64_t kx) {
      return _mm512_cmplt_epu32_mask(
          _mm512_add_epi32(ow, _mm512_set1_epi32(static_cast<int>(kx * s.dilation_w - s.pad_left))),
          _mm512_set1_epi32(static_cast<int>(s.W)));
    };
    if (small) {
      for (int64_t ky = 0; ky < s.kh; ++ky) rows[ky] = row_ok(ky) & real;
      for (int64_t kx = 0; kx < s.kw; ++kx) cols[kx] = col_ok(kx);
    }
    for (int64_t ky = 0, t = 0; ky < s.kh; ++ky)
      for (int64_t kx = 0; kx < s.kw; ++kx, ++t)
        mk[v * taps + t] = small ? rows[ky] & cols[kx] : row_ok(ky) & col_ok(kx) & real;
  }
}

// Phase 1: quantize pixel tile t of the im2col matrix into the plan's layout, its rows read from
// the Im2col view or (DIRECT) straight from the planes.
template <bool DIRECT>
void quantize_tile_from(const Int8Plan& pl, const Im2col& m, const DirectRows& dr, int64_t t,
                        uint8_t* tile) {
  const int64_t p0 = t * pl.tv * kL, np = pl.tv * kL;
  float* buf = DIRECT ? nullptr : scratch_of<float>(1, pl.bs * np);
  __mmask16* mk = DIRECT ? scratch_of<__mmask16>(3, pl.tv * dr.taps) : nullptr;
  if (DIRECT) direct_masks(*m.s, p0, pl.tv, mk);
  float* d = reinterpret_cast<float*>(tile + pl.act_bytes());
  const float* r[256];
  const __mmask16* rm[256];  // DIRECT: row i's masks, one per pixel vector (stride taps)
  const __m512i order = _mm512_set4_epi32(0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400);
  int64_t c = 0, tp = 0;  // DIRECT: channel and tap of row k0
  for (int64_t b = 0; b < pl.nb; ++b) {
    const int64_t k0 = b * pl.bs, kn = min64(pl.bs, pl.K - k0), nq = cdiv(kn, 4);
    if (DIRECT) {
      for (int64_t i = 0; i < kn; ++i) {
        r[i] = dr.x + c * dr.hw + dr.off[tp] + p0;  // may point outside the plane: masked lanes only
        rm[i] = mk + tp;
        if (++tp == dr.taps) tp = 0, ++c;
      }
    } else {
      m.rows(k0, kn, p0, np, r, buf);
    }
    auto load = [&](int64_t i, int64_t v) {
      return DIRECT ? _mm512_maskz_loadu_ps(rm[i][v * dr.taps], r[i] + v * kL)
                    : _mm512_loadu_ps(r[i] + v * kL);
    };
    uint8_t* out = tile + b * pl.qb * pl.tv * 64;
    for (int64_t v = 0; v < pl.tv; ++v) {
      __m512 am[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      int64_t i = 0;
      for (; i + 4 <= kn; i += 4)  // four chains: vrangeps' latency
        LB_UNROLL
        for (int j = 0; j < 4; ++j) am[j] = _mm512_range_ps(am[j], load(i + j, v), 0x0B);  // max |·|
      for (; i < kn; ++i) am[0] = _mm512_range_ps(am[0], load(i, v), 0x0B);
      const __m512 amax = _mm512_max_ps(_mm512_max_ps(am[0], am[1]), _mm512_max_ps(am[2], am[3]));
      const __mmask16 nz = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ);
      const __m512 inv = _mm512_maskz_div_ps(nz, _mm512_set1_ps(127.f), amax);
      _mm512_storeu_ps(d + (b * pl.tv + v) * kL, _mm512_div_ps(amax, _mm512_set1_ps(127.f)));
      for (int64_t q = 0; q < nq; ++q) {
        __m512i qi[4];
        LB_UNROLL
        for (int j = 0; j < 4; ++j) {
          const int64_t i = 4 * q + j;
          qi[j] = i < kn ? _mm512_cvtps_epi32(_mm512_mul_ps(load(i, v), inv)) : _mm512_setzero_si512();
        }
        // bytes per 128-bit lane: q0[0..3] q1[0..3] q2[0..3] q3[0..3] → pixel-major quads
        const __m512i b8 = _mm512_packs_epi16(_mm512_packs_epi32(qi[0], qi[1]),
                                              _mm512_packs_epi32(qi[2], qi[3]));
        const __m512i u8 = _mm512_xor_si512(_mm512_shuffle_epi8(b8, order),
                                            _mm512_set1_epi8(static_cast<char>(0x80)));
        _mm512_storeu_si512(out + (q * pl.tv + v) * 64, u8);
      }
    }
  }
}

void quantize_tile(const Int8Plan& pl, const Im2col& m, const DirectRows& dr, int64_t t,
                   uint8_t* tile) {
  if (dr.x) return quantize_tile_from<true>(pl, m, dr, t, tile);
  quantize_tile_from<false>(pl, m, dr, t, tile);
}

// Where gemm_i8 writes: y[r·ystride + 16v + lane] (lanes < valid) when wq = 0; else (wq ≥ 16)
// the virtual pixels j0 + 16v + lane scattered into output planes ystride apart (store_virtual).
struct GemmOut {
  int64_t wq = 0, OW = 0, run = 0, j0 = 0;
};

// Rows n0 … n0+NR−1 of Y for the tile's vectors v0 … v0+PV−1, from the tile's activations and
// a decoded panel of those rows; with ep (real pixels stored straight into Y only), its epilogue
// in registers before the store.
template <int NR, int PV>
void gemm_i8(const Int8Plan& pl, const ConvWeight& cw, const uint8_t* tile, int64_t v0,
             const int8_t* panel, int64_t n0, const float* bias, float* y, int64_t ystride,
             int64_t valid, GemmOut virt, const ConvEpilogue* ep) {
  const int64_t nb = pl.nb, astride = pl.tv * 64;
  const float* d = reinterpret_cast<const float*>(tile + pl.act_bytes());
  const float* qs = cw.block_scales();
  __m512 f[NR][PV];
  LB_UNROLL
  for (int r = 0; r < NR; ++r) {
    const __m512 b0 = _mm512_set1_ps(bias ? bias[n0 + r] : 0.f);
    LB_UNROLL
    for (int v = 0; v < PV; ++v) f[r][v] = b0;
  }
  for (int64_t b = 0; b < nb; ++b) {
    __m512i a[NR][PV];
    LB_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m512i init = _mm512_set1_epi32(-128 * cw.wsum[(n0 + r) * nb + b]);
      LB_UNROLL
      for (int v = 0; v < PV; ++v) a[r][v] = init;
    }
    const uint8_t* ap = tile + b * pl.qb * astride + v0 * 64;
    const int8_t* wp = panel + b * pl.bs;
    const int64_t nq = b + 1 < nb ? pl.qb : pl.qlast;
    for (int64_t q = 0; q < nq; ++q) {
      __m512i x[PV];
      LB_UNROLL
      for (int v = 0; v < PV; ++v) x[v] = _mm512_loadu_si512(ap + q * astride + v * 64);
      LB_UNROLL
      for (int r = 0; r < NR; ++r) {
        int32_t w4;
        std::memcpy(&w4, wp + r * nb * pl.bs + 4 * q, 4);
        const __m512i wv = _mm512_set1_epi32(w4);
        LB_UNROLL
        for (int v = 0; v < PV; ++v) a[r][v] = _mm512_dpbusd_epi32(a[r][v], x[v], wv);
      }
    }
    __m512 dv[PV];
    LB_UNROLL
    for (int v = 0; v < PV; ++v) dv[v] = _mm512_loadu_ps(d + (b * pl.tv + v0 + v) * kL);
    LB_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m512 sc = _mm512_set1_ps(qs[(n0 + r) * nb + b]);
      LB_UNROLL
      for (int v = 0; v < PV; ++v)
        f[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][v]), _mm512_mul_ps(dv[v], sc), f[r][v]);
    }
  }
  if (virt.wq == 0) {
    LB_UNROLL
    for (int r = 0; r < NR; ++r)
      LB_UNROLL
      for (int v = 0; v < PV; ++v) {
        float* p = y + r * ystride + v * kL;
        const __mmask16 m = lanes(valid - v * kL);
        if (ep != nullptr) {  // as finish_rows: v = y + z; v < lo ? lo : v; v > hi ? hi : v
          if (ep->Z != nullptr) f[r][v] = _mm512_add_ps(f[r][v], _mm512_maskz_loadu_ps(m, ep->Z + (p - ep->Y)));
          f[r][v] = _mm512_min_ps(_mm512_set1_ps(ep->hi), _mm512_max_ps(_mm512_set1_ps(ep->lo), f[r][v]));
        }
        _mm512_mask_storeu_ps(p, m, f[r][v]);
      }
    return;
  }
  LB_UNROLL
  for (int v = 0; v < PV; ++v) {
    const int64_t j = virt.j0 + v * kL, oh = j / virt.wq, ow0 = j - oh * virt.wq;
    LB_UNROLL
    for (int r = 0; r < NR; ++r)
      store_virtual(y + r * ystride, j, oh, ow0, virt.wq, virt.OW, virt.run, f[r][v]);
  }
}

using GemmVnni = void (*)(const Int8Plan&, const ConvWeight&, const uint8_t*, int64_t,
                          const int8_t*, int64_t, const float*, float*, int64_t, int64_t, GemmOut,
                          const ConvEpilogue*);
constexpr int kNR = 4, kPV = 3;
constexpr auto kI8 = kernel_table<GemmVnni, kNR, kPV>(
    [](auto r, auto v) -> GemmVnni { return gemm_i8<decltype(r)::value, decltype(v)::value>; });

void conv_int8(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
               float* Y, const ParallelFor& parallel) {
  const LowBitWeight& w = cw.w;
  const int64_t Cg = s.C / s.group, Ng = s.N / s.group, P = s.OH * s.OW;
  Int8Plan pl;
  pl.K = w.K, pl.bs = w.block_size, pl.nb = cw.nblocks, pl.qb = pl.bs / 4;
  pl.qlast = cdiv(pl.K - (pl.nb - 1) * pl.bs, 4);
  pl.quads = pl.nb * pl.qb;
  const int64_t tvmax = 2 * kPV;
  // stride 1 with OW = W (not 1×1): rows read from the planes (DirectRows), real pixels only
  const bool direct = s.stride_h == 1 && s.stride_w == 1 && s.OW == s.W && !is_pointwise(s) &&
                      P < (1 << 23) && s.H * s.W < (int64_t{1} << 30);
  int64_t* off = direct ? scratch_of<int64_t>(6, s.kh * s.kw) : nullptr;
  if (direct)
    for (int64_t ky = 0, t = 0; ky < s.kh; ++ky)
      for (int64_t kx = 0; kx < s.kw; ++kx, ++t)
        off[t] = (ky * s.dilation_h - s.pad_top) * s.W + kx * s.dilation_w - s.pad_left;
  // a small conv (≲ 5 µs on one core) runs as one task on the calling thread: waking another
  // thread costs about as much
  const bool one_task = P * Ng * pl.K < (int64_t{1} << 20);
  auto run = [&](std::size_t n, const std::function<void(std::size_t)>& fn) {
    if (one_task) {
      for (std::size_t i = 0; i < n; ++i) fn(i);
    } else {
      parallel(n, fn);
    }
  };
  for (int64_t img = 0; img < s.batch; ++img)
    for (int64_t g = 0; g < s.group; ++g) {
      const float* xg = X + (img * s.C + g * Cg) * s.H * s.W;
      Im2col m;
      DirectRows dr;
      if (direct) {
        m.s = &s, m.x = xg, m.P = m.cols = P;
        dr = {xg, s.H * s.W, s.kh * s.kw, off};
      } else {
        m = make_im2col(s, xg, tvmax * kL);
      }
      pl.cols = m.cols;
      const int64_t nv = cdiv(pl.cols, kL);
      pl.tv = min64(nv, tvmax);
      pl.ntiles = cdiv(nv, pl.tv);
      uint8_t* act = scratch_of<uint8_t>(0, pl.ntiles * pl.tile_bytes());
      // one n chunk: each task quantizes its own tiles; else all tiles first (a second call)
      Split sp(Ng, pl.ntiles, kNR, Ng);
      if (one_task) sp.nc = Ng, sp.nchunks = 1, sp.tpt = pl.ntiles, sp.tgroups = 1;
      const bool fused = sp.nchunks == 1;
      if (!fused)
        run(pl.ntiles, [&](std::size_t t) {
          quantize_tile(pl, m, dr, t, act + t * pl.tile_bytes());
        });
      run(sp.nchunks * sp.tgroups, [&](std::size_t task) {
        const int64_t n0 = g * Ng + (task / sp.tgroups) * sp.nc;
        const int64_t rows = min64(sp.nc, (g + 1) * Ng - n0);
        int8_t* panel = scratch_of<int8_t>(2, rows * pl.nb * pl.bs);
        for (int64_t r = 0; r < rows; ++r) decode_row_s8(cw, n0 + r, panel + r * pl.nb * pl.bs);
        // virtual pixels: scattered straight into Y (wq ≥ 16) or through ybuf and store()
        const bool scatter = m.virtual_pixels() && m.wp >= kL;
        float* ybuf =
            m.virtual_pixels() && !scatter ? scratch_of<float>(4, rows * pl.tv * kL) : nullptr;
        float* yn0 = Y + (img * s.N + n0) * P;
        // real pixels stored straight into Y take the epilogue in the kernel's registers
        const ConvEpilogue* ep = !m.virtual_pixels() && s.epilogue.active() ? &s.epilogue : nullptr;
        const int64_t t0 = (task % sp.tgroups) * sp.tpt;
        for (int64_t t = t0; t < min64(pl.ntiles, t0 + sp.tpt); ++t) {
          const int64_t p0 = t * pl.tv * kL, np = min64(pl.tv * kL, pl.cols - p0);
          uint8_t* tile = act + t * pl.tile_bytes();
          if (fused) quantize_tile(pl, m, dr, t, tile);
          float* y = ybuf ? ybuf : scatter ? yn0 : yn0 + p0;
          const int64_t ystride = ybuf ? pl.tv * kL : P;
          for_kernels<kNR, kPV, kL>(rows, np, [&](int64_t r, int nr, int64_t v, int pv) {
            GemmOut out;
            if (scatter) out = {m.wp, s.OW, m.cols, p0 + v * kL};
            kI8(nr, pv)(pl, cw, tile, v, panel + r * pl.nb * pl.bs, n0 + r, bias,
                                y + r * ystride + (scatter ? 0 : v * kL), ystride, np - v * kL, out, ep);
          });
          if (ybuf) m.store(ybuf, ystride, rows, p0, np, yn0);
          if (ep == nullptr) finish_tile(m, yn0, rows, p0, np);
        }
      });
    }
}

// ---------------------------------------------------------------------------------------------
// float accuracy, general conv

constexpr int kFR = 4, kFV = 4;

// y[r, 16v + lane] (+)= Σ_k wf[r, k]·row_k[16v + lane]; starts from the bias when first.
template <int NR, int PV>
void gemm_f32(const float* const* rows, int64_t off, int64_t kn, const float* wf, int64_t wstride,
              const float* bias, bool first, float* y, int64_t ystride, int64_t valid) {
  __m512 a[NR][PV];
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v)
      a[r][v] = first ? _mm512_set1_ps(bias ? bias[r] : 0.f)
                      : _mm512_maskz_loadu_ps(lanes(valid - v * kL), y + r * ystride + v * kL);
  for (int64_t k = 0; k < kn; ++k) {
    __m512 x[PV];
    LB_UNROLL
    for (int v = 0; v < PV; ++v) x[v] = _mm512_loadu_ps(rows[k] + off + v * kL);
    LB_UNROLL
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = _mm512_set1_ps(wf[r * wstride + k]);
      LB_UNROLL
      for (int v = 0; v < PV; ++v) a[r][v] = _mm512_fmadd_ps(wv, x[v], a[r][v]);
    }
  }
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v)
      _mm512_mask_storeu_ps(y + r * ystride + v * kL, lanes(valid - v * kL), a[r][v]);
}

constexpr auto kF = kernel_table<GemmF, kFR, kFV>(
    [](auto r, auto v) -> GemmF { return gemm_f32<decltype(r)::value, decltype(v)::value>; });

// The ISA traits of conv_driver.h's conv_float.
struct Avx512 {
  static constexpr int64_t kL = 16;
  static constexpr int kFR = 4, kFV = 4;
  static constexpr int64_t kFTile = 2 * kFV;
  static void decode_f32(const ConvWeight& cw, int64_t n, int64_t b, int64_t j1, float* dst) {
    conv_detail::decode_f32(cw, n, b, j1, dst);
  }
  static GemmF gemm_f32(int nr, int pv) { return kF(nr, pv); }
};
static_assert(Avx512::kL == kL, "one vector length");

// ---------------------------------------------------------------------------------------------
// depthwise: one input channel per group, Y[n] = conv(X[n / (N / C)], one kh×kw kernel)

constexpr int kDV = 4;  // vectors in flight (FMA latency)

// The channel is zero-padded and split into stride_h × stride_w phase planes of hq × wq, as
// Im2col does (padded row r, column c → plane (r mod sh, c mod sw), position (r / sh, c / sw)):
// output (oh, ow) is the virtual pixel j = oh·wq + ow and its tap t = (ky, kx) sits at j + off[t],
// so a run of 16 outputs is one load per tap, over the whole plane at once. Virtual pixels with
// ow ≥ OW are computed and dropped.

// Where a run of virtual outputs goes: straight into Y's rows when wq ≥ 16 (a vector then
// touches at most two rows), else into buf for compaction.
struct VirtualOut {
  float* y;
  float* buf;
  int64_t wq, OW, run;
  bool direct() const { return wq >= kL; }
  // vector v of the run, whose first lane is (oh, ow0); advances (oh, ow0) to vector v + 1
  void store(int64_t v, int64_t& oh, int64_t& ow0, __m512 x) const {
    if (!direct()) return _mm512_storeu_ps(buf + v * kL, x);
    store_virtual(y, v * kL, oh, ow0, wq, OW, run, x);
    ow0 += kL;
    if (ow0 >= wq) ow0 -= wq, ++oh;
  }
};

// A 3×3 float run of nvec vectors: the 9 weights stay in registers.
void dw_float9(const float* base, const int32_t* off, const float* wk, int64_t nvec, float bias,
               const VirtualOut& out) {
  __m512 wv[9];
  const float* src[9];
  LB_UNROLL
  for (int t = 0; t < 9; ++t) wv[t] = _mm512_set1_ps(wk[t]), src[t] = base + off[t];
  int64_t v = 0, oh = 0, ow0 = 0;
  for (; v + kDV <= nvec; v += kDV) {
    __m512 acc[kDV];
    LB_UNROLL
    for (int u = 0; u < kDV; ++u) acc[u] = _mm512_set1_ps(bias);
    LB_UNROLL
    for (int t = 0; t < 9; ++t)
      LB_UNROLL
      for (int u = 0; u < kDV; ++u)
        acc[u] = _mm512_fmadd_ps(wv[t], _mm512_loadu_ps(src[t] + (v + u) * kL), acc[u]);
    LB_UNROLL
    for (int u = 0; u < kDV; ++u) out.store(v + u, oh, ow0, acc[u]);
  }
  for (; v < nvec; ++v) {
    __m512 acc = _mm512_set1_ps(bias);
    LB_UNROLL
    for (int t = 0; t < 9; ++t) acc = _mm512_fmadd_ps(wv[t], _mm512_loadu_ps(src[t] + v * kL), acc);
    out.store(v, oh, ow0, acc);
  }
}

// Float 3×3 or 5×5 (KS), stride S = 1 or 2, dilation 1 (any pads): straight from the NCHW plane,
// no padded copy. Vectors run along an output row; a pass computes R output rows × NV column
// vectors and reads its S·(R − 1) + KS input rows once each, every loaded vector feeding the up to
// ⌈KS / S⌉ output rows it belongs to (masked loads: lanes in the padding or past the row read
// nothing and add nothing). Stride 1 loads the KS column shifts kx; stride 2 loads the pairs of
// vectors at shifts 0, 2, 4 and splits each into its even columns (tap kx = 0, 2, 4) and odd ones
// (kx = 1, 3). Every output sums its taps in the order t = 0 … KS² − 1 from the bias, as dw_float9
// and dw_run do. A last column vector of ≤ 8 lanes runs in ymm (half the FMA cost).
constexpr int kDwMaxKs = 5;
struct DwCol {
  int64_t c0;                  // first output column of the vector (16u)
  int64_t src;                 // input column of tap kx = 0 for lane 0: S·c0 − pad_left
  __mmask16 ld[kDwMaxKs + 1];  // per load (S = 1: tap kx; S = 2: vector h of shift 2p, 2p + h):
                               // lanes whose input column lies in [0, W) (and, S = 1, output < OW)
  __mmask16 st;                // lanes < OW − c0
};

// 16 lanes (zmm) or 8 (ymm, for a row's last ≤ 8 columns)
struct Zmm {
  using V = __m512;
  static constexpr int kN = 16;
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V load(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, __mmask16 m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  // columns 0, 2, … (odd: 1, 3, …) of the 32 in a, b
  static V even(V a, V b) {
    return _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
  }
  static V odd(V a, V b) {
    return _mm512_permutex2var_ps(a, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), b);
  }
};
struct Ymm {
  using V = __m256;
  static constexpr int kN = 8;
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V load(__mmask16 m, const float* p) { return _mm256_maskz_loadu_ps(static_cast<__mmask8>(m), p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, __mmask16 m, V v) { _mm256_mask_storeu_ps(p, static_cast<__mmask8>(m), v); }
  static V even(V a, V b) { return _mm256_permutex2var_ps(a, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), b); }
  static V odd(V a, V b) { return _mm256_permutex2var_ps(a, _mm256_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15), b); }
};

template <class T, int KS, int S, int NV, int R>
void dw_direct_pass(const float* x, int64_t H, int64_t W, int64_t ih0, const DwCol* col,
                    const float* wk, float bias, float* y, int64_t OW) {
  static_assert(S == 1 || S == 2, "stride 1 or 2");
  using V = typename T::V;
  constexpr int kLoads = S == 1 ? KS : KS + 1;
  V acc[R][NV];
  LB_UNROLL
  for (int r = 0; r < R; ++r)
    LB_UNROLL
    for (int u = 0; u < NV; ++u) acc[r][u] = T::set1(bias);
  V wv[KS * KS];
  LB_UNROLL
  for (int t = 0; t < KS * KS; ++t) wv[t] = T::set1(wk[t]);
  __mmask16 ld[NV][kLoads];  // kept in registers across the rows
  LB_UNROLL
  for (int u = 0; u < NV; ++u)
    LB_UNROLL
    for (int i = 0; i < kLoads; ++i) ld[u][i] = col[u].ld[i];
  LB_UNROLL
  for (int j = 0; j < S * (R - 1) + KS; ++j) {  // input row ih0 + j feeds output rows (j − ky) / S
    const int64_t ih = ih0 + j;
    if (ih < 0 || ih >= H) continue;
    const float* xr = x + ih * W + col[0].src;
    LB_UNROLL
    for (int u = 0; u < NV; ++u) {
      V l[KS];
      LB_UNROLL
      for (int kx = 0; kx < KS; kx += S) {
        if (S == 1) {
          l[kx] = T::load(ld[u][kx], xr + u * kL + kx);
          continue;
        }
        const float* p = xr + u * S * kL + kx;
        const V a = T::load(ld[u][kx], p), b = T::load(ld[u][kx + 1], p + T::kN);
        l[kx] = T::even(a, b);
        if (kx + 1 < KS) l[kx + 1] = T::odd(a, b);
      }
      LB_UNROLL
      for (int ky = KS - 1; ky >= 0; --ky) {
        if (j < ky || (j - ky) % S) continue;
        const int r = (j - ky) / S;
        if (r >= R) continue;
        LB_UNROLL
        for (int kx = 0; kx < KS; ++kx) acc[r][u] = T::fma(wv[KS * ky + kx], l[kx], acc[r][u]);
      }
    }
  }
  LB_UNROLL
  for (int r = 0; r < R; ++r)
    LB_UNROLL
    for (int u = 0; u < NV; ++u) T::store(y + r * OW + col[0].c0 + u * kL, col[u].st, acc[r][u]);
}

using DwPass = void (*)(const float*, int64_t, int64_t, int64_t, const DwCol*, const float*,
                        float, float*, int64_t);
constexpr int kDwV = 4, kDwR = 8;  // up to 4 column vectors × 8 rows per pass
template <int KS, int S>
constexpr auto kDwDirect = kernel_table<DwPass, kDwV, kDwR>([](auto v, auto r) -> DwPass {
  return dw_direct_pass<Zmm, KS, S, decltype(v)::value, decltype(r)::value>;
});
template <int KS, int S>
constexpr auto kDwDirectHalf = kernel_table<DwPass, 1, kDwR>([](auto v, auto r) -> DwPass {
  return dw_direct_pass<Ymm, KS, S, decltype(v)::value, decltype(r)::value>;
});
// most rows per pass for NV column vectors: R·NV accumulators + KS loads in 32 zmm, with 3×3's 9
// weights kept in registers too (5×5's 25 are read as they are needed)
constexpr int kDwRows[2][kDwV] = {{8, 6, 4, 4}, {8, 6, 4, 3}};

// Whether a row's last column vector (of nvr) has ≤ 8 lanes and runs in ymm.
inline bool ymm_tail(const ConvShape& s, int64_t nvr) { return s.OW - (nvr - 1) * kL <= 8; }

// Output plane y (OH × OW) of input plane x (H × W) with the KS² taps wk: column groups of ≤ 4
// vectors (the last ≤ 8 columns on their own in ymm), rows in passes of equal size.
template <int KS, int S>
void dw_direct_plane(const ConvShape& s, const float* x, const DwCol* col, int64_t nvr,
                     const float* wk, float bias, float* y) {
  // passes of R ≤ rmax rows, all of one size: the last may overlap the one before
  auto rows = [&](int64_t rmax, const DwPass* by_rows, const DwCol* c) {
    const int R = static_cast<int>(cdiv(s.OH, cdiv(s.OH, rmax)));
    for (int64_t oh0 = 0; oh0 < s.OH; oh0 += R) {
      const int64_t oh = min64(oh0, s.OH - R);
      by_rows[R - 1](x, s.H, s.W, oh * S - s.pad_top, c, wk, bias, y + oh * s.OW, s.OW);
    }
  };
  const bool half = ymm_tail(s, nvr);
  const int64_t full = nvr - half;
  for (int64_t u0 = 0; u0 < full; u0 += kDwV) {
    const int nv = static_cast<int>(min64(kDwV, full - u0));
    rows(kDwRows[KS == 5][nv - 1], kDwDirect<KS, S>.row[nv - 1].fn, col + u0);
  }
  if (half) rows(kDwR, kDwDirectHalf<KS, S>.row[0].fn, col + full);
}

// Vectors v0 … v0+V−1 of a run into out (any kernel size): float Σ_t Ŵ_t·x_t; int8 per pixel
// and block q = rint(x·127/amax), Σ q·w_int exact in float (< 2^24).
template <int V, bool INT8>
void dw_run(const float* base, const int32_t* off, const float* wk, int64_t K, int64_t bs,
            const float* qs, float bias, float* out) {
  __m512 acc[V];
  LB_UNROLL
  for (int u = 0; u < V; ++u) acc[u] = _mm512_set1_ps(bias);
  auto tap = [&](int64_t t, int u) { return _mm512_loadu_ps(base + off[t] + u * kL); };
  for (int64_t t0 = 0, b = 0; t0 < K; t0 += bs, ++b) {
    const int64_t t1 = min64(K, t0 + bs);
    if (!INT8) {
      for (int64_t t = t0; t < t1; ++t)
        LB_UNROLL
        for (int u = 0; u < V; ++u) acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(wk[t]), tap(t, u), acc[u]);
      continue;
    }
    __m512 amax[V], inv[V], isum[V];
    LB_UNROLL
    for (int u = 0; u < V; ++u) amax[u] = isum[u] = _mm512_setzero_ps();
    for (int64_t t = t0; t < t1; ++t)
      LB_UNROLL
      for (int u = 0; u < V; ++u) amax[u] = _mm512_range_ps(amax[u], tap(t, u), 0x0B);
    LB_UNROLL
    for (int u = 0; u < V; ++u) {
      const __mmask16 nz = _mm512_cmp_ps_mask(amax[u], _mm512_setzero_ps(), _CMP_GT_OQ);
      inv[u] = _mm512_maskz_div_ps(nz, _mm512_set1_ps(127.f), amax[u]);
    }
    for (int64_t t = t0; t < t1; ++t)
      LB_UNROLL
      for (int u = 0; u < V; ++u) {
        const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(tap(t, u), inv[u]),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        isum[u] = _mm512_fmadd_ps(q, _mm512_set1_ps(wk[t]), isum[u]);
      }
    const __m512 sc = _mm512_set1_ps(qs[b] / 127.f);
    LB_UNROLL
    for (int u = 0; u < V; ++u) acc[u] = _mm512_fmadd_ps(isum[u], _mm512_mul_ps(amax[u], sc), acc[u]);
  }
  LB_UNROLL
  for (int u = 0; u < V; ++u) _mm512_storeu_ps(out + u * kL, acc[u]);
}

using DwRun = void (*)(const float*, const int32_t*, const float*, int64_t, int64_t, const float*,
                       float, float*);
constexpr DwRun kDwRun[2][kDV] = {{dw_run<1, false>, dw_run<2, false>, dw_run<3, false>, dw_run<4, false>},
                                  {dw_run<1, true>, dw_run<2, true>, dw_run<3, true>, dw_run<4, true>}};

// Input row xr (W floats) into its phase planes: row base r (position pr / sh of phase pr mod sh),
// column w → phase (w + pl) mod sw at (w + pl) / sw.
void split_row(const float* xr, int64_t W, int64_t pl, int64_t sw, int64_t plane, float* r) {
  if (sw == 1) return copy_row(r + pl, xr, W);
  int64_t c = 0;
  if (sw == 2) {  // even w → phase pl mod 2 at w/2 + ⌊pl/2⌋, odd w → the other at w/2 + ⌈pl/2⌉
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_add_epi32(ie, _mm512_set1_epi32(1));
    float* re = r + (pl & 1) * plane + pl / 2;
    float* ro = r + (1 - (pl & 1)) * plane + (pl + 1) / 2;
    for (; c < W; c += 2 * kL) {
      const int64_t n = W - c;
      const __m512 a = _mm512_maskz_loadu_ps(lanes(n), xr + c);
      const __m512 b = _mm512_maskz_loadu_ps(lanes(n - kL), xr + c + kL);
      _mm512_mask_storeu_ps(re + c / 2, lanes((n + 1) / 2), _mm512_permutex2var_ps(a, ie, b));
      _mm512_mask_storeu_ps(ro + c / 2, lanes(n / 2), _mm512_permutex2var_ps(a, io, b));
    }
    return;
  }
  for (int64_t ph = pl % sw, q = pl / sw; c < W; ++c) {
    r[ph * plane + q] = xr[c];
    if (++ph == sw) ph = 0, ++q;
  }
}

// Float 3×3 or 5×5 (KS), stride S, dilation 1: dw_direct_plane per output channel, no copies.
// Tasks take runs of whole planes, only as many as there is work for (~50k FMAs each at least).
template <int KS, int S>
void conv_depthwise_direct(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                           float* Y, const ParallelFor& parallel) {
  const int64_t Ng = s.N / s.group, P = s.OH * s.OW, planes = s.batch * s.N, nvr = cdiv(s.OW, kL);
  const int64_t tasks = min64(min64(planes, 16), 1 + planes * P * KS * KS / 50000);
  const int64_t per = cdiv(planes, tasks);
  const bool half = ymm_tail(s, nvr);
  DwCol* col = scratch_of<DwCol>(0, nvr);  // the caller's slot, read by every task
  for (int64_t u = 0; u < nvr; ++u) {
    DwCol& c = col[u];
    c.c0 = u * kL;
    c.src = S * c.c0 - s.pad_left;
    c.st = lanes(s.OW - c.c0);
    // the vector's input columns [first, first + width) must lie in [0, W)
    auto within = [&](int64_t first, int64_t width) {
      return static_cast<__mmask16>(lanes(min64(width, s.W - first)) & ~lanes(-first));
    };
    if (S == 1) {
      for (int kx = 0; kx < KS; ++kx) c.ld[kx] = c.st & within(c.src + kx, kL);
      continue;
    }
    const int64_t width = u == nvr - 1 && half ? 8 : kL;  // lanes of the vector type
    for (int i = 0; i <= KS; ++i) c.ld[i] = within(c.src + (i & ~1) + (i & 1) * width, width);
  }
  parallel(cdiv(planes, per), [&](std::size_t task) {
    float* wk = scratch_of<float>(2, cw.w.K);
    for (int64_t pi = task * per; pi < min64(planes, (task + 1) * per); ++pi) {
      const int64_t img = pi / s.N, n = pi % s.N;
      decode_row_f32<Avx512>(cw, n, wk);
      dw_direct_plane<KS, S>(s, X + (img * s.C + n / Ng) * s.H * s.W, col, nvr, wk, bias ? bias[n] : 0.f,
                             Y + pi * P);
      finish_rows(s, Y + pi * P, 1, 0, P);
    }
  });
}

void conv_depthwise(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                    float* Y, const ParallelFor& parallel) {
  const int64_t K = cw.w.K, bs = cw.w.block_size, nb = cw.nblocks, Ng = s.N / s.group;
  const int64_t sh = s.stride_h, sw = s.stride_w;
  const int64_t hq = cdiv(s.H + s.pad_top + s.pad_bottom, sh);
  const int64_t wq = cdiv(s.W + s.pad_left + s.pad_right, sw), plane = hq * wq;
  const int64_t run = s.OH * wq, nvec = cdiv(run, kL);
  const int64_t P = s.OH * s.OW, planes = s.batch * s.group;
  const int64_t tasks = min64(planes, 8), per = cdiv(planes, tasks);
  const bool int8 = cw.accuracy == Accuracy::Int8;
  parallel(tasks, [&](std::size_t task) {
    // slack past the phase planes: the lanes of the last vector beyond the run
    const int64_t total = sh * sw * plane + (nvec + kDV) * kL + 2 * wq;
    float* pad = scratch_of<float>(1, total);
    float* wk = scratch_of<float>(2, K);  // Ŵ (float) or w_int (int8) of the current channel
    int32_t* off = scratch_of<int32_t>(3, K);
    float* out = scratch_of<float>(4, nvec * kL);
    for (int64_t t = 0; t < K; ++t) {
      const int64_t dy = t / s.kw * s.dilation_h, dx = t % s.kw * s.dilation_w;
      off[t] = static_cast<int32_t>((dy % sh * sw + dx % sw) * plane + dy / sh * wq + dx / sw);
    }
    std::memset(pad, 0, total * sizeof(float));  // the border stays zero: planes fill the interior
    for (int64_t pi = task * per; pi < min64(planes, (task + 1) * per); ++pi) {
      const int64_t img = pi / s.group, g = pi % s.group;
      const float* x = X + (img * s.C + g) * s.H * s.W;
      // padded row h + pad_top → phase ph = (h + pt) mod sh, position q = (h + pt) / sh
      for (int64_t h = 0, ph = s.pad_top % sh, q = s.pad_top / sh; h < s.H; ++h) {
        split_row(x + h * s.W, s.W, s.pad_left, sw, plane, pad + ph * sw * plane + q * wq);
        if (++ph == sh) ph = 0, ++q;
      }
      for (int64_t n = g * Ng; n < (g + 1) * Ng; ++n) {
        decode_row(cw, n, wk);
        const float b0 = bias ? bias[n] : 0.f;
        float* y = Y + (img * s.N + n) * P;
        const VirtualOut vo{y, out, wq, s.OW, run};
        const bool float9 = !int8 && K == 9;
        if (float9) {
          dw_float9(pad, off, wk, nvec, b0, vo);
        } else {
          const float* qs = int8 ? cw.block_scales() + n * nb : nullptr;
          for (int64_t v = 0; v < nvec; v += kDV)
            kDwRun[int8][min64(kDV, nvec - v) - 1](pad + v * kL, off, wk, K, bs, qs, b0, out + v * kL);
        }
        if (!(float9 && vo.direct()))  // the run went to out: compact it into Y's rows
          for (int64_t r = 0; r < s.OH; ++r) copy_row(y + r * s.OW, out + r * wq, s.OW);
        finish_rows(s, y, 1, 0, P);
      }
    }
  });
}

}  // namespace

void conv_avx512(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                 float* Y, const ParallelFor& parallel) {
  // a 1-channel input (group 1) is also "depthwise"; in int8 conv_int8 quantizes its windows once
  // for all output channels instead of once per channel
  if (s.C == s.group && !(cw.accuracy == Accuracy::Int8 && s.group == 1)) {
    if (cw.accuracy == Accuracy::Float && s.kh == s.kw && (s.kh == 3 || s.kh == 5) &&
        s.stride_h == s.stride_w && (s.stride_h == 1 || s.stride_h == 2) && s.dilation_h == 1 &&
        s.dilation_w == 1) {
      using Direct = void (*)(const ConvWeight&, const ConvShape&, const float*, const float*, float*,
                              const ParallelFor&);
      constexpr Direct direct[2][2] = {{conv_depthwise_direct<3, 1>, conv_depthwise_direct<3, 2>},
                                       {conv_depthwise_direct<5, 1>, conv_depthwise_direct<5, 2>}};
      return direct[s.kh == 5][s.stride_h == 2](cw, s, X, bias, Y, parallel);
    }
    return conv_depthwise(cw, s, X, bias, Y, parallel);
  }
  if (cw.accuracy == Accuracy::Int8) return conv_int8(cw, s, X, bias, Y, parallel);
  conv_float<Avx512>(cw, s, X, bias, Y, parallel);
}

}  // namespace conv_detail
}  // namespace lowbit
