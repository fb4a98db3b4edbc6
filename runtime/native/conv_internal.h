// ConvLowBit internals shared by conv.cc and its per-ISA translation units.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"

// CMake defines LOWBIT_X86_KERNELS (1 when the *_avx2.cc / *_avx512.cc files are built); a
// hand build falls back to the compiler's target.
#ifndef LOWBIT_X86_KERNELS
#if defined(__x86_64__) || defined(_M_X64)
#define LOWBIT_X86_KERNELS 1
#else
#define LOWBIT_X86_KERNELS 0
#endif
#endif

namespace lowbit {
namespace conv_detail {

// The prepacked Conv weight: the op's packed arrays (referenced, not copied) plus, for int8
// accuracy, per-block metadata. Per (n, b):
//   wsum[n, b]     Σ_k w_int[n, k] over the block's real columns (k < K)
// and for a codebook also
//   lut[n, b, c]   int8 w_int of code c = rint(levels·127/lmax)
//   qscale[n, b]   the block's scale·lmax/127, rounded to a half (round_to_half)
// (uniform: w_int = code − zero point and the factor is the scale itself: see block_scales()).
// Float accuracy needs none of them.
struct ConvWeight final : PackedWeight {
  LowBitWeight w;
  Accuracy accuracy = Accuracy::Float;
  int64_t nblocks = 0, block_bytes = 0;
  std::vector<int32_t> wsum;
  std::vector<int8_t> lut;
  std::vector<float> qscale;
  std::size_t bytes() const override {
    return wsum.size() * sizeof(int32_t) + lut.size() + qscale.size() * sizeof(float);
  }
  // Defined in conv.cc (no ISA flags), like every non-static function this header declares:
  // the ISA translation units must not emit shared inline code the linker might pick for others.
  int zero_point(int64_t n, int64_t b) const;
  int code(int64_t n, int64_t k) const;     // the code of column k of row n
  float decoded(int64_t n, int64_t k) const;  // Ŵ[n, k] in float32, exactly as ops.py
  const float* block_scales() const;  // [N, blocks]: factor of each block's integer dot (int8)
  // the 2^bits values of w_int for codes of block (n, b) into t
  void int8_table(int64_t n, int64_t b, int8_t* t) const;
};

// Helpers defined here are static: each translation unit keeps its own copy.
static inline bool is_pointwise(const ConvShape& s) {
  return s.kh == 1 && s.kw == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_top == 0 &&
         s.pad_left == 0 && s.pad_bottom == 0 && s.pad_right == 0;
}

// The 2^bits values of block (n, b)'s codes as floats into t: Ŵ (float accuracy, computed as
// ops.py does) or w_int (int8). Inline: the kernels' weight decoding calls it once per block.
static inline void value_table(const ConvWeight& cw, int64_t n, int64_t b, float* t) {
  const LowBitWeight& w = cw.w;
  const int64_t i = n * cw.nblocks + b, ncodes = int64_t{1} << w.bits;
  if (cw.accuracy == Accuracy::Int8) {
    int8_t t8[16];
    cw.int8_table(n, b, t8);
    for (int64_t c = 0; c < ncodes; ++c) t[c] = t8[c];
  } else if (w.format == Format::Codebook) {
    for (int64_t c = 0; c < ncodes; ++c) t[c] = w.level_table(i)[c] * w.scales[i];
  } else {
    const int zp = cw.zero_point(n, b);
    for (int64_t c = 0; c < ncodes; ++c) t[c] = static_cast<float>(c - zp) * w.scales[i];
  }
}

// Thread-local scratch, 64-byte aligned, grown on demand and kept for the next call. Slots let
// one thread hold several buffers at once (callers of conv: 0, 5, 6; tasks: 1–4).
void* scratch(int slot, std::size_t bytes);
template <class T>
static T* scratch_of(int slot, std::size_t count) {
  return static_cast<T*>(scratch(slot, count * sizeof(T)));
}

// The im2col matrix [K, pixels] of one (image, group), read by pixel tiles. 1×1 stride-1 convs
// read the input planes themselves. Every other conv reads "virtual" pixels: the input is
// zero-padded and split into stride_h × stride_w phase planes of width wp (padded row r,
// column c → plane (r mod sh, c mod sw), position (r / sh, c / sw)), so output pixel (oh, ow)
// is j = oh·wp + ow and row k = (c, ky, kx) is the contiguous run offs[k] + j — no copies per
// tile. Virtual pixels with ow ≥ OW are computed and dropped by store().
struct Im2col {
  const ConvShape* s = nullptr;
  const float* x = nullptr;       // the group's first input channel
  const float* padded = nullptr;  // virtual: the phase planes
  const int64_t* offs = nullptr;  // virtual: start of row k in padded
  int64_t P = 0;                  // output pixels OH·OW
  int64_t cols = 0;               // computed pixels: P, or OH·wp when virtual
  int64_t wp = 0, plane = 0;      // virtual only
  bool pointwise = false;
  bool virtual_pixels() const { return padded != nullptr; }
  // r[i] = row k0 + i at pixel p0 for i < kn, valid for np pixels; buf (kn·np floats) holds
  // the rows that must be copied.
  void rows(int64_t k0, int64_t kn, int64_t p0, int64_t np, const float** r, float* buf) const;
  // Y[n0 + i, ·] ← src[i, ·] (rows i < nrows, stride sstride) for computed pixels [p0, p0 + np).
  void store(const float* src, int64_t sstride, int64_t nrows, int64_t p0, int64_t np,
             float* Yn0) const;
};
// Builds the view for the group whose first channel is x; the phase planes and row offsets go
// to scratch slots 5 and 6 (caller's thread), with slack for reads up to `overrun` pixels past
// the last computed one.
Im2col make_im2col(const ConvShape& s, const float* x, int64_t overrun);

// dst[i] = im2col element (c, ky, kx) of output pixel p0 + i for i < n (0 past the last pixel or
// in the padding); plane = input channel c of the image.
void im2col_row(const ConvShape& s, const float* plane, int64_t ky, int64_t kx, int64_t p0,
                int64_t n, float* dst);

// s.epilogue on planes [0, nrows) of yn (OH·OW floats apart), pixels [p0, p1). Static: each ISA
// translation unit vectorizes its own copy (ternaries, not std::min/max, so that the loops do).
static inline void finish_rows(const ConvShape& s, float* yn, int64_t nrows, int64_t p0, int64_t p1) {
  const ConvEpilogue& e = s.epilogue;
  if (!e.active()) return;
  const int64_t P = s.OH * s.OW;
  const float lo = e.lo, hi = e.hi;
  for (int64_t r = 0; r < nrows; ++r) {
    float* y = yn + r * P;
    if (e.Z != nullptr) {
      const float* z = e.Z + (y - e.Y);
      for (int64_t p = p0; p < p1; ++p) {
        float v = y[p] + z[p];
        v = v < lo ? lo : v;
        y[p] = v > hi ? hi : v;
      }
    } else {
      for (int64_t p = p0; p < p1; ++p) {
        const float v = y[p] < lo ? lo : y[p];
        y[p] = v > hi ? hi : v;
      }
    }
  }
}

// s.epilogue on the outputs of computed pixels [p0, p0 + np) of a tile (after store() when they
// are virtual), planes [0, nrows) of Yn0.
static inline void finish_tile(const Im2col& m, float* Yn0, int64_t nrows, int64_t p0, int64_t np) {
  if (!m.s->epilogue.active()) return;
  const int64_t p1 = p0 + np < m.cols ? p0 + np : m.cols;
  if (!m.virtual_pixels()) return finish_rows(*m.s, Yn0, nrows, p0, p1);
  // virtual pixel j = oh·wp + ow; the real ones of a range of j are a range of oh·OW + ow
  auto real = [&](int64_t j) { return j / m.wp * m.s->OW + (j % m.wp < m.s->OW ? j % m.wp : m.s->OW); };
  finish_rows(*m.s, Yn0, nrows, real(p0), real(p1));
}

// Splits Ng rows × ntiles pixel tiles into ~16 tasks: n chunks (multiples of nr, at most
// max_rows) × tile ranges (tgroups of tpt tiles). Task i takes chunk i / tgroups, tile group
// i % tgroups.
struct Split {
  int64_t nc, nchunks, tpt, tgroups;
  Split(int64_t Ng, int64_t ntiles, int64_t nr, int64_t max_rows);
};

// wk[k] for k < K of row n, as floats: Ŵ (float accuracy) or w_int (int8) — depthwise taps.
void decode_row(const ConvWeight& cw, int64_t n, float* wk);

void conv_scalar(const ConvWeight& w, const ConvShape& s, const float* X, const float* bias,
                 float* Y, const ParallelFor& parallel);
#if LOWBIT_X86_KERNELS
void conv_avx2(const ConvWeight& w, const ConvShape& s, const float* X, const float* bias,
               float* Y, const ParallelFor& parallel);
void conv_avx512(const ConvWeight& w, const ConvShape& s, const float* X, const float* bias,
                 float* Y, const ParallelFor& parallel);
#endif
#if defined(__aarch64__)
void conv_neon(const ConvWeight& w, const ConvShape& s, const float* X, const float* bias,
               float* Y, const ParallelFor& parallel);
// int8 general convs with sdot; the rest goes to conv_neon (conv_dotprod.cc)
void conv_neon_dotprod(const ConvWeight& w, const ConvShape& s, const float* X, const float* bias,
                       float* Y, const ParallelFor& parallel);
#endif

}  // namespace conv_detail
}  // namespace lowbit

// Hadamard (hadamard.cc): rows [r0, r1) of the op, perm = sequency permutation or nullptr.
namespace lowbit {
namespace hadamard_detail {

using RowsFn = void (*)(const float* X, int64_t r0, int64_t r1, int64_t size, int64_t group,
                        const int32_t* perm, float scale, float* Y);
void rows_scalar(const float* X, int64_t r0, int64_t r1, int64_t size, int64_t group,
                 const int32_t* perm, float scale, float* Y);
#if LOWBIT_X86_KERNELS
void rows_avx2(const float* X, int64_t r0, int64_t r1, int64_t size, int64_t group,
               const int32_t* perm, float scale, float* Y);
void rows_avx512(const float* X, int64_t r0, int64_t r1, int64_t size, int64_t group,
                 const int32_t* perm, float scale, float* Y);
#endif
#if defined(__aarch64__)
void rows_neon(const float* X, int64_t r0, int64_t r1, int64_t size, int64_t group,
               const int32_t* perm, float scale, float* Y);  // both NEON levels (hadamard_neon.cc)
#endif

}  // namespace hadamard_detail
}  // namespace lowbit
