// ConvLowBit: prepacking, ISA dispatch and the portable scalar path (runtime/ops.py, ConvLowBit).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "conv_internal.h"

namespace lowbit {

using conv_detail::ConvWeight;

std::unique_ptr<PackedWeight> prepack_conv(const LowBitWeight& w, Accuracy accuracy) {
  auto p = std::make_unique<ConvWeight>();
  p->w = w;
  p->accuracy = accuracy;
  p->nblocks = w.blocks();
  p->block_bytes = w.block_size * w.bits / 8;
  if (accuracy != Accuracy::Int8) return p;
  const int ncodes = 1 << w.bits;
  const int64_t nb = p->nblocks;
  const bool codebook = w.format == Format::Codebook;
  if (codebook) {
    p->lut.resize(w.N * nb * ncodes);
    p->qscale.resize(w.N * nb);
  }
  p->wsum.assign(w.N * nb, 0);
  for (int64_t n = 0; n < w.N; ++n) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i = n * nb + b;
      if (codebook) {
        const float* lv = w.level_table(i);
        float lmax = 0.f;
        for (int c = 0; c < ncodes; ++c) lmax = std::max(lmax, std::fabs(lv[c]));
        for (int c = 0; c < ncodes; ++c)  // rint(levels·127 / lmax), as ops.py writes it
          p->lut[i * ncodes + c] = lmax > 0.f ? static_cast<int8_t>(std::nearbyint(lv[c] * 127.f / lmax)) : 0;
        p->qscale[i] = round_to_half(w.scales[i] * (lmax / 127.f));
      }
      int8_t t[16];
      p->int8_table(n, b, t);
      const int64_t k1 = std::min(w.K, (b + 1) * w.block_size);
      for (int64_t k = b * w.block_size; k < k1; ++k) p->wsum[i] += t[p->code(n, k)];
    }
  }
  return p;
}

namespace conv_detail {

int ConvWeight::zero_point(int64_t n, int64_t b) const {
  return w.zero_points ? w.zero_points[n * nblocks + b] : 1 << (w.bits - 1);
}

int ConvWeight::code(int64_t n, int64_t k) const {
  const int64_t b = k / w.block_size, j = k % w.block_size;
  const uint8_t byte = w.packed[(n * nblocks + b) * block_bytes + j * w.bits / 8];
  return (byte >> (j * w.bits % 8)) & ((1 << w.bits) - 1);
}

float ConvWeight::decoded(int64_t n, int64_t k) const {
  const int64_t b = k / w.block_size;
  const int c = code(n, k);
  const float s = w.scales[n * nblocks + b];
  if (w.format == Format::Codebook) return w.level_table(n * nblocks + b)[c] * s;
  return static_cast<float>(c - zero_point(n, b)) * s;
}

const float* ConvWeight::block_scales() const {
  return qscale.empty() ? w.scales : qscale.data();
}

void ConvWeight::int8_table(int64_t n, int64_t b, int8_t* t) const {
  const int ncodes = 1 << w.bits;
  if (!lut.empty()) {
    std::copy(&lut[(n * nblocks + b) * ncodes], &lut[(n * nblocks + b) * ncodes] + ncodes, t);
    return;
  }
  const int zp = zero_point(n, b);
  for (int c = 0; c < ncodes; ++c) t[c] = static_cast<int8_t>(c - zp);
}

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

Split::Split(int64_t Ng, int64_t ntiles, int64_t nr, int64_t max_rows) {
  nchunks = cdiv(Ng, max_rows);
  while (ntiles * nchunks < 8 && Ng / (nchunks * 2) >= 16) nchunks *= 2;
  nc = cdiv(cdiv(Ng, nchunks), nr) * nr;
  nchunks = cdiv(Ng, nc);
  tgroups = std::min(ntiles, cdiv(16, nchunks));
  tpt = cdiv(ntiles, tgroups);
  tgroups = cdiv(ntiles, tpt);
}

void* scratch(int slot, std::size_t bytes) {
  thread_local std::vector<char> buf[8];
  std::vector<char>& b = buf[slot];
  if (b.size() < bytes + 64) b.resize(bytes + 64);
  return reinterpret_cast<void*>((reinterpret_cast<std::uintptr_t>(b.data()) + 63) & ~std::uintptr_t{63});
}

static int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

void im2col_row(const ConvShape& s, const float* plane, int64_t ky, int64_t kx, int64_t p0,
                int64_t n, float* dst) {
  const int64_t P = s.OH * s.OW, off = kx * s.dilation_w - s.pad_left, sw = s.stride_w;
  // valid ow: 0 <= ow·sw + off < W
  const int64_t ow_lo = floor_div(-off + sw - 1, sw), ow_hi = floor_div(s.W - 1 - off, sw) + 1;
  for (int64_t p = p0, end = p0 + n; p < end;) {
    float* o = dst + (p - p0);
    if (p >= P) {
      std::fill(o, dst + n, 0.f);
      break;
    }
    const int64_t oh = p / s.OW, ow0 = p % s.OW, cnt = std::min(end - p, s.OW - ow0);
    const int64_t ih = oh * s.stride_h - s.pad_top + ky * s.dilation_h;
    if (ih < 0 || ih >= s.H) {
      std::fill(o, o + cnt, 0.f);
    } else {
      const float* row = plane + ih * s.W;
      const int64_t lo = std::clamp<int64_t>(ow_lo - ow0, 0, cnt);
      const int64_t hi = std::clamp<int64_t>(ow_hi - ow0, lo, cnt);
      std::fill(o, o + lo, 0.f);
      if (sw == 1) {
        std::copy(row + ow0 + lo + off, row + ow0 + hi + off, o + lo);
      } else {
        for (int64_t i = lo; i < hi; ++i) o[i] = row[(ow0 + i) * sw + off];
      }
      std::fill(o + hi, o + cnt, 0.f);
    }
    p += cnt;
  }
}

// Portable path: per task (batch, group, pixel range) an im2col matrix [pixels][Kg] (rows
// quantized per block for int8), then one decoded weight row at a time dotted with every pixel.
void conv_scalar(const ConvWeight& cw, const ConvShape& s, const float* X, const float* bias,
                 float* Y, const ParallelFor& parallel) {
  const LowBitWeight& w = cw.w;
  const int64_t Cg = s.C / s.group, Ng = s.N / s.group, K = w.K, bs = w.block_size;
  const int64_t nb = cw.nblocks, P = s.OH * s.OW;
  const bool int8 = cw.accuracy == Accuracy::Int8;
  const float* qs = cw.block_scales();
  const int64_t outer = s.batch * s.group;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((P + 63) / 64, 64 / outer));
  const int64_t per = (P + chunks - 1) / chunks;
  parallel(outer * chunks, [&](std::size_t task) {
    const int64_t bg = task / chunks, p0 = (task % chunks) * per, p1 = std::min(P, p0 + per);
    if (p0 >= p1) return;
    const int64_t g = bg % s.group, img = bg / s.group;
    const float* x = X + (img * s.C + g * Cg) * s.H * s.W;
    const int64_t np = p1 - p0;
    std::vector<float> col(np * K), dq(int8 ? np * nb : 0), row(K);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t oh = p / s.OW, ow = p % s.OW;
      float* r = &col[(p - p0) * K];
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t ky = 0; ky < s.kh; ++ky)
          for (int64_t kx = 0; kx < s.kw; ++kx) {
            const int64_t ih = oh * s.stride_h - s.pad_top + ky * s.dilation_h;
            const int64_t iw = ow * s.stride_w - s.pad_left + kx * s.dilation_w;
            const bool in = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
            *r++ = in ? x[(c * s.H + ih) * s.W + iw] : 0.f;
          }
      if (!int8) continue;
      // q = rint(a·(127/amax)) per block (kept as float: integer dot sums stay < 2^24, exact)
      r = &col[(p - p0) * K];
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * bs, k1 = std::min(K, k0 + bs);
        float amax = 0.f;
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(r[k]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int64_t k = k0; k < k1; ++k) r[k] = std::nearbyint(r[k] * inv);
        dq[(p - p0) * nb + b] = amax / 127.f;
      }
    }
    for (int64_t j = 0; j < Ng; ++j) {
      const int64_t n = g * Ng + j;
      float* y = Y + (img * s.N + n) * P;
      const float b0 = bias ? bias[n] : 0.f;
      decode_row(cw, n, row.data());  // Ŵ, or w_int for int8
      if (!int8) {
        for (int64_t p = p0; p < p1; ++p) {
          const float* r = &col[(p - p0) * K];
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc += r[k] * row[k];
          y[p] = acc + b0;
        }
        finish_rows(s, y, 1, p0, p1);
        continue;
      }
      for (int64_t p = p0; p < p1; ++p) {
        const float* r = &col[(p - p0) * K];
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          float isum = 0.f;
          for (int64_t k = b * bs, k1 = std::min(K, k + bs); k < k1; ++k) isum += r[k] * row[k];
          acc += dq[(p - p0) * nb + b] * qs[n * nb + b] * isum;
        }
        y[p] = acc + b0;
      }
      finish_rows(s, y, 1, p0, p1);
    }
  });
}

void decode_row(const ConvWeight& cw, int64_t n, float* wk) {
  const LowBitWeight& w = cw.w;
  const int bits = w.bits, mask = (1 << bits) - 1;
  for (int64_t b = 0, k0 = 0; k0 < w.K; ++b, k0 += w.block_size) {
    const int64_t kn = std::min(w.block_size, w.K - k0);
    const uint8_t* blk = w.packed + (n * cw.nblocks + b) * cw.block_bytes;
    float t[16];
    value_table(cw, n, b, t);
    for (int64_t j = 0; j < kn; ++j) wk[k0 + j] = t[(blk[j * bits / 8] >> (j * bits % 8)) & mask];
  }
}

Im2col make_im2col(const ConvShape& s, const float* x, int64_t overrun) {
  Im2col m;
  m.s = &s;
  m.x = x;
  m.P = m.cols = s.OH * s.OW;
  m.pointwise = is_pointwise(s);
  if (m.pointwise) return m;
  // zero-padded channels split into sh × sw phase planes (padded row r, column c → plane
  // (r mod sh, c mod sw), position (r / sh, c / sw)) of hq × wq
  const int64_t Cg = s.C / s.group, sh = s.stride_h, sw = s.stride_w;
  const int64_t hq = (s.H + s.pad_top + s.pad_bottom + sh - 1) / sh;
  m.wp = (s.W + s.pad_left + s.pad_right + sw - 1) / sw;
  m.plane = hq * m.wp;
  m.cols = s.OH * m.wp;
  const int64_t chan = sh * sw * m.plane, total = Cg * chan + m.plane + overrun;
  float* pad = scratch_of<float>(5, total);
  for (int64_t c = 0; c < Cg; ++c) {
    float* o = pad + c * chan;
    const float* xc = x + c * s.H * s.W;
    if (sh == 1 && sw == 1) {  // one plane: zero only the border
      std::fill(o, o + s.pad_top * m.wp, 0.f);
      for (int64_t h = 0; h < s.H; ++h) {
        float* r = o + (s.pad_top + h) * m.wp;
        std::fill(r, r + s.pad_left, 0.f);
        std::copy(xc + h * s.W, xc + (h + 1) * s.W, r + s.pad_left);
        std::fill(r + s.pad_left + s.W, r + m.wp, 0.f);
      }
      std::fill(o + (s.pad_top + s.H) * m.wp, o + m.plane, 0.f);
      continue;
    }
    std::fill(o, o + chan, 0.f);
    for (int64_t h = 0, ph = s.pad_top % sh, q = s.pad_top / sh; h < s.H; ++h) {
      float* r = o + ph * sw * m.plane + q * m.wp;  // padded row h + pad_top: phase ph, position q
      if (++ph == sh) ph = 0, ++q;
      const float* xr = xc + h * s.W;
      // column w → phase (w + pl) mod sw at (w + pl) / sw: one strided loop per phase
      for (int64_t w0 = 0; w0 < std::min(sw, s.W); ++w0) {
        const int64_t cp = w0 + s.pad_left;
        float* dst = r + cp % sw * m.plane + cp / sw;
        for (int64_t i = 0, n = (s.W - w0 + sw - 1) / sw; i < n; ++i) dst[i] = xr[w0 + i * sw];
      }
    }
  }
  std::fill(pad + Cg * chan, pad + total, 0.f);
  // row k = (c, ky, kx) starts at offs[k]: virtual pixel j = oh·wq + ow reads offs[k] + j
  const int64_t K = Cg * s.kh * s.kw;
  int64_t* offs = scratch_of<int64_t>(6, K);
  for (int64_t c = 0, k = 0; c < Cg; ++c)
    for (int64_t ky = 0; ky < s.kh; ++ky)
      for (int64_t kx = 0; kx < s.kw; ++kx, ++k) {
        const int64_t dy = ky * s.dilation_h, dx = kx * s.dilation_w;
        offs[k] = c * chan + (dy % sh * sw + dx % sw) * m.plane + dy / sh * m.wp + dx / sw;
      }
  m.offs = offs;
  m.padded = pad;
  return m;
}

void Im2col::rows(int64_t k0, int64_t kn, int64_t p0, int64_t np, const float** r,
                  float* buf) const {
  if (padded) {
    for (int64_t i = 0; i < kn; ++i) r[i] = padded + offs[k0 + i] + p0;
    return;
  }
  const int64_t hw = s->H * s->W, Cg = s->C / s->group;
  for (int64_t i = 0; i < kn; ++i) {
    const int64_t c = k0 + i;  // 1×1 stride 1: row k is channel k
    if (c * hw + p0 + np <= Cg * hw) {
      r[i] = x + c * hw + p0;  // a tail tile may read into the next channels: lanes never stored
    } else {
      im2col_row(*s, x + c * hw, 0, 0, p0, np, buf + i * np);
      r[i] = buf + i * np;
    }
  }
}

void Im2col::store(const float* src, int64_t sstride, int64_t nrows, int64_t p0, int64_t np,
                   float* Yn0) const {
  for (int64_t j = p0, end = std::min(p0 + np, cols); j < end;) {
    const int64_t oh = j / wp, ow = j % wp, cnt = std::min(end - j, wp - ow);
    if (ow < s->OW)
      for (int64_t i = 0; i < nrows; ++i)
        std::copy(src + i * sstride + (j - p0), src + i * sstride + (j - p0) + std::min(cnt, s->OW - ow),
                  Yn0 + i * P + oh * s->OW + ow);
    j += cnt;
  }
}

}  // namespace conv_detail

void conv_lowbit(const PackedWeight& pw, const ConvShape& s, const float* X, const float* bias,
                 float* Y, const ParallelFor& parallel) {
  const auto& cw = static_cast<const ConvWeight&>(pw);
  if (s.batch == 0 || s.N == 0 || s.OH <= 0 || s.OW <= 0) return;
#if LOWBIT_X86_KERNELS
  if (isa_level() == Isa::Avx512Vnni) return conv_detail::conv_avx512(cw, s, X, bias, Y, parallel);
  if (isa_level() == Isa::Avx2) return conv_detail::conv_avx2(cw, s, X, bias, Y, parallel);
#endif
#if defined(__aarch64__)
  if (isa_level() == Isa::NeonDotprod) return conv_detail::conv_neon_dotprod(cw, s, X, bias, Y, parallel);
  if (isa_level() == Isa::Neon) return conv_detail::conv_neon(cw, s, X, bias, Y, parallel);
#endif
  conv_detail::conv_scalar(cw, s, X, bias, Y, parallel);
}

}  // namespace lowbit
