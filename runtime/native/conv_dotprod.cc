// ConvLowBit for aarch64 CPUs with the ARMv8.2 dot-product extension (compiled with
// -march=armv8.2-a+dotprod, called only when HWCAP_ASIMDDP says the CPU has it): the general
// conv at int8 accuracy, with one sdot per 16 products. Float accuracy and depthwise convs have
// nothing to gain from sdot and run conv_neon.cc's kernels.
//
// As in conv_avx512.cc: per pixel tile, the im2col rows are quantized once (q = rint(x·127/amax),
// vcvtnq ties to even like nearbyint) into "quads": per group of 4 consecutive K columns, 4
// pixels × 4 int8 per register, pixel-major, so that sdot's 32-bit lane i is pixel i; d = amax/127
// per pixel and block. A task decodes its weight rows once into an int8 panel (w_int through a
// vqtbl1q table); the kernel loads 16 of a row's weights (4 quads) at a time and takes quad j with
// the by-element sdot (vdotq_laneq_s32, lane j). Per block the exact int32 sums become floats:
// y += isum·(d[p]·block scale[n]).
#include <arm_neon.h>

#include <cstring>

#include "conv_driver.h"

namespace lowbit {
namespace conv_detail {
namespace {

constexpr int64_t kL = 4;  // pixels per vector

// Row n's w_int for the columns of block b into dst[0, bs): zero from the block's last real column.
void decode_s8(const ConvWeight& cw, int64_t n, int64_t b, int8_t* dst) {
  const int64_t bs = cw.w.block_size, kn = min64(bs, cw.w.K - b * bs);
  const uint8_t* blk = cw.w.packed + (n * cw.nblocks + b) * cw.block_bytes;
  int8_t t[16] = {};
  cw.int8_table(n, b, t);
  const int8x16_t lut = vld1q_s8(t);
  for (int64_t j = 0; j < kn; j += 16) vst1q_s8(dst + j, vqtbl1q_s8(lut, codes16(blk, cw.w.bits, j)));
  for (int64_t j = kn; j < bs; ++j) dst[j] = 0;
}

struct Plan {
  int64_t K, bs, nb, qb, tv, np;  // qb = quads per block, np = tv·kL pixels per tile
  // a tile: nb × qb × tv × 16 bytes of quads, then nb × np floats of d
  int64_t act_bytes() const { return nb * qb * tv * 16; }
  int64_t tile_bytes() const { return act_bytes() + nb * np * 4; }
};

// The quads and d of the np pixels from p0 (quads past the last column are zero).
void quantize_tile(const Plan& pl, const Im2col& m, int64_t p0, int8_t* tile) {
  float* buf = scratch_of<float>(1, pl.bs * pl.np);
  float* d = reinterpret_cast<float*>(tile + pl.act_bytes());
  const float* r[256];
  const uint8x16_t order = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  for (int64_t b = 0; b < pl.nb; ++b) {
    const int64_t k0 = b * pl.bs, kn = min64(pl.bs, pl.K - k0), nq = cdiv(kn, 4);
    m.rows(k0, kn, p0, pl.np, r, buf);
    int8_t* out = tile + b * pl.qb * pl.tv * 16;
    for (int64_t v = 0; v < pl.tv; ++v) {
      float32x4_t amax = vdupq_n_f32(0.f);
      for (int64_t i = 0; i < kn; ++i) amax = vmaxq_f32(amax, vabsq_f32(vld1q_f32(r[i] + v * kL)));
      const uint32x4_t nz = vcgtq_f32(amax, vdupq_n_f32(0.f));
      const float32x4_t inv =
          vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vdivq_f32(vdupq_n_f32(127.f), amax)), nz));
      vst1q_f32(d + b * pl.np + v * kL, vdivq_f32(amax, vdupq_n_f32(127.f)));
      for (int64_t q = 0; q < nq; ++q) {
        int32x4_t qi[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t i = 4 * q + j;
          qi[j] = i < kn ? vcvtnq_s32_f32(vmulq_f32(vld1q_f32(r[i] + v * kL), inv)) : vdupq_n_s32(0);
        }
        // column-major bytes (4 columns × 4 pixels) → pixel-major quads
        const int8x16_t b8 = vcombine_s8(vmovn_s16(vcombine_s16(vmovn_s32(qi[0]), vmovn_s32(qi[1]))),
                                         vmovn_s16(vcombine_s16(vmovn_s32(qi[2]), vmovn_s32(qi[3]))));
        vst1q_s8(out + (q * pl.tv + v) * 16, vqtbl1q_s8(b8, order));
      }
      for (int64_t q = nq; q < pl.qb; ++q) vst1q_s8(out + (q * pl.tv + v) * 16, vdupq_n_s8(0));
    }
  }
}

// Quad J of 4: a[r][v] += Σ_4 columns x[v]·(row r's weights of quad J).
template <int J, int NR, int PV>
LB_INLINE void quad(int32x4_t (&a)[NR][PV], const int8x16_t (&wv)[NR], const int8_t* ap, int64_t astride) {
  int8x16_t x[PV];
  LB_UNROLL
  for (int v = 0; v < PV; ++v) x[v] = vld1q_s8(ap + J * astride + v * 16);
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v) a[r][v] = vdotq_laneq_s32(a[r][v], x[v], wv[r], J);
}

// Rows n0 … n0+NR−1 of Y for the tile's vectors v0 … v0+PV−1 (lanes < valid stored).
template <int NR, int PV>
void gemm_s8(const Plan& pl, const ConvWeight& cw, const int8_t* tile, int64_t v0,
             const int8_t* panel, int64_t n0, const float* bias, float* y, int64_t ystride,
             int64_t valid) {
  const int64_t nb = pl.nb, astride = pl.tv * 16, wstride = nb * pl.bs;
  const float* d = reinterpret_cast<const float*>(tile + pl.act_bytes());
  const float* qs = cw.block_scales();
  float32x4_t f[NR][PV];
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v) f[r][v] = vdupq_n_f32(bias ? bias[n0 + r] : 0.f);
  for (int64_t b = 0; b < nb; ++b) {
    int32x4_t a[NR][PV];
    LB_UNROLL
    for (int r = 0; r < NR; ++r)
      LB_UNROLL
      for (int v = 0; v < PV; ++v) a[r][v] = vdupq_n_s32(0);
    const int8_t* ap = tile + b * pl.qb * astride + v0 * 16;
    const int8_t* wp = panel + b * pl.bs;
    for (int64_t q = 0; q < pl.qb; q += 4, ap += 4 * astride) {  // 16 columns (bs is a multiple)
      int8x16_t wv[NR];
      LB_UNROLL
      for (int r = 0; r < NR; ++r) wv[r] = vld1q_s8(wp + r * wstride + 4 * q);
      quad<0>(a, wv, ap, astride);
      quad<1>(a, wv, ap, astride);
      quad<2>(a, wv, ap, astride);
      quad<3>(a, wv, ap, astride);
    }
    float32x4_t dv[PV];
    LB_UNROLL
    for (int v = 0; v < PV; ++v) dv[v] = vld1q_f32(d + b * pl.np + (v0 + v) * kL);
    LB_UNROLL
    for (int r = 0; r < NR; ++r) {
      const float sc = qs[(n0 + r) * nb + b];
      LB_UNROLL
      for (int v = 0; v < PV; ++v) f[r][v] = vfmaq_f32(f[r][v], vcvtq_f32_s32(a[r][v]), vmulq_n_f32(dv[v], sc));
    }
  }
  LB_UNROLL
  for (int r = 0; r < NR; ++r)
    LB_UNROLL
    for (int v = 0; v < PV; ++v) store_lanes(y + r * ystride + v * kL, f[r][v], valid - v * kL);
}

using GemmS8 = void (*)(const Plan&, const ConvWeight&, const int8_t*, int64_t, const int8_t*, int64_t,
                        const float*, float*, int64_t, int64_t);
constexpr int kNR = 4, kPV = 2;  // 8 int32 + 8 float accumulators, 4 weight and 2 pixel registers
constexpr auto kGemm = kernel_table<GemmS8, kNR, kPV>(
    [](auto r, auto v) -> GemmS8 { return gemm_s8<decltype(r)::value, decltype(v)::value>; });

void conv_int8(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
               float* Y, const ParallelFor& parallel) {
  const int64_t K = cw.w.K, bs = cw.w.block_size, nb = cw.nblocks, P = s.OH * s.OW;
  const int64_t Cg = s.C / s.group, Ng = s.N / s.group;
  // tiles of tv vectors whose quads take ≤ ~128 KB
  const int64_t tvmax = 1 + min64(4 * kPV - 1, 128 * 1024 / (nb * bs * kL));
  for (int64_t img = 0; img < s.batch; ++img)
    for (int64_t g = 0; g < s.group; ++g) {
      const Im2col m = make_im2col(s, X + (img * s.C + g * Cg) * s.H * s.W, tvmax * kL);
      const int64_t nv = cdiv(m.cols, kL), tv = min64(nv, tvmax), ntiles = cdiv(nv, tv);
      const Plan pl{K, bs, nb, bs / 4, tv, tv * kL};
      // the task's panel (K bytes per row) stays within ~256 KB of L2
      const Split sp(Ng, ntiles, kNR, 1 + 256 * 1024 / (nb * bs));
      parallel(sp.nchunks * sp.tgroups, [&](std::size_t task) {
        const int64_t n0 = g * Ng + (task / sp.tgroups) * sp.nc;
        const int64_t rows = min64(sp.nc, (g + 1) * Ng - n0);
        const int64_t t0 = (task % sp.tgroups) * sp.tpt, t1 = min64(ntiles, t0 + sp.tpt);
        int8_t* panel = scratch_of<int8_t>(2, rows * nb * bs);
        int8_t* tile = scratch_of<int8_t>(3, pl.tile_bytes());
        float* ybuf = m.virtual_pixels() ? scratch_of<float>(4, rows * pl.np) : nullptr;
        float* yn0 = Y + (img * s.N + n0) * P;
        const int64_t ystride = ybuf ? pl.np : P;
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t b = 0; b < nb; ++b) decode_s8(cw, n0 + i, b, panel + (i * nb + b) * bs);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t p0 = t * pl.np, nvalid = min64(pl.np, m.cols - p0);
          quantize_tile(pl, m, p0, tile);
          float* y = ybuf ? ybuf : yn0 + p0;
          for_kernels<kNR, kPV, kL>(rows, nvalid, [&](int64_t i, int nr, int64_t v, int pv) {
            kGemm(nr, pv)(pl, cw, tile, v, panel + i * nb * bs, n0 + i, bias, y + i * ystride + v * kL,
                          ystride, nvalid - v * kL);
          });
          if (ybuf) m.store(ybuf, ystride, rows, p0, nvalid, yn0);
          finish_tile(m, yn0, rows, p0, nvalid);
        }
      });
    }
}

}  // namespace

void conv_neon_dotprod(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                       float* Y, const ParallelFor& parallel) {
  if (s.C == s.group || cw.accuracy != Accuracy::Int8) return conv_neon(cw, s, X, bias, Y, parallel);
  conv_int8(cw, s, X, bias, Y, parallel);
}

}  // namespace conv_detail
}  // namespace lowbit
