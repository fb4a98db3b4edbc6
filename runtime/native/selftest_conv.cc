// Standalone check and benchmark of ConvLowBit and Hadamard (no onnxruntime): every ISA path this
// CPU runs against a plain scalar reference of runtime/ops.py, then timings on 1 and 2 threads.
// Usage: lowbit_selftest [--bench | --bench-only] [case-name substring] [path name]
// (exit status 1 when a check fails)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "conv_internal.h"
#include "selftest.h"

using namespace lowbit;

namespace {

std::mt19937 rng(7);

using selftest::code;
using selftest::median_ms;
using selftest::Pool;
using selftest::Weight;

std::vector<float> randn(int64_t n, float sigma = 1.f) { return selftest::randn(rng, n, sigma); }

Weight random_weight(int64_t N, int64_t K, int bits, int64_t bs, Format fmt, bool with_zp) {
  return selftest::random_weight(rng, N, K, bits, bs, fmt, with_zp);
}

// ---- the reference: ops.py's formulas, one output element at a time ----

// im2col row of output pixel (oh, ow) in group g: order c·kh·kw + ky·kw + kx.
std::vector<float> ref_row(const ConvShape& s, const float* X, int64_t img, int64_t g, int64_t oh,
                           int64_t ow) {
  const int64_t Cg = s.C / s.group;
  std::vector<float> r;
  for (int64_t c = 0; c < Cg; ++c)
    for (int64_t ky = 0; ky < s.kh; ++ky)
      for (int64_t kx = 0; kx < s.kw; ++kx) {
        const int64_t ih = oh * s.stride_h - s.pad_top + ky * s.dilation_h;
        const int64_t iw = ow * s.stride_w - s.pad_left + kx * s.dilation_w;
        const bool in = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
        r.push_back(in ? X[((img * s.C + g * Cg + c) * s.H + ih) * s.W + iw] : 0.f);
      }
  return r;
}

std::vector<float> ref_conv(const LowBitWeight& w, Accuracy acc, const ConvShape& s,
                            const float* X, const float* bias) {
  const int64_t P = s.OH * s.OW, Ng = s.N / s.group, nb = w.blocks(), bs = w.block_size;
  const int ncodes = 1 << w.bits;
  std::vector<float> Y(s.batch * s.N * P);
  for (int64_t img = 0; img < s.batch; ++img)
    for (int64_t oh = 0; oh < s.OH; ++oh)
      for (int64_t ow = 0; ow < s.OW; ++ow)
        for (int64_t g = 0; g < s.group; ++g) {
          const std::vector<float> a = ref_row(s, X, img, g, oh, ow);
          for (int64_t n = g * Ng; n < (g + 1) * Ng; ++n) {
            double y = bias ? bias[n] : 0.0;
            for (int64_t b = 0; b < nb; ++b) {
              const int64_t k0 = b * bs, k1 = std::min(w.K, k0 + bs);
              const float sc = w.scales[n * nb + b];
              const int zp = w.zero_points ? w.zero_points[n * nb + b] : 1 << (w.bits - 1);
              const float* lv = w.levels ? w.levels + (n * nb + b) * ncodes : nullptr;
              if (acc == Accuracy::Float) {
                for (int64_t k = k0; k < k1; ++k) {
                  const int c = code(w, n, k);
                  const float wd = lv ? lv[c] * sc : static_cast<float>(c - zp) * sc;
                  y += static_cast<double>(a[k]) * wd;
                }
                continue;
              }
              float amax = 0.f;
              for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(a[k]));
              float lmax = 0.f;
              if (lv)
                for (int c = 0; c < ncodes; ++c) lmax = std::max(lmax, std::fabs(lv[c]));
              int64_t isum = 0;
              for (int64_t k = k0; k < k1; ++k) {
                const float q = amax == 0.f ? 0.f : std::nearbyint(a[k] * (127.f / amax));
                const int c = code(w, n, k);
                const float wi = lv ? (lmax == 0.f ? 0.f : std::nearbyint(lv[c] * 127.f / lmax))
                                    : static_cast<float>(c - zp);
                isum += static_cast<int64_t>(q) * static_cast<int64_t>(wi);
              }
              const double bscale = lv ? selftest::half_round(sc * (lmax / 127.f)) : sc;
              y += amax / 127.0 * bscale * static_cast<double>(isum);
            }
            Y[(img * s.N + n) * P + oh * s.OW + ow] = static_cast<float>(y);
          }
        }
  return Y;
}

// ---- paths ----

using ConvFn = void (*)(const conv_detail::ConvWeight&, const ConvShape&, const float*,
                        const float*, float*, const ParallelFor&);
struct Path {
  const char* name;
  ConvFn conv;
  hadamard_detail::RowsFn had;
};

std::vector<Path> paths() {
  std::vector<Path> p{{"scalar", conv_detail::conv_scalar, hadamard_detail::rows_scalar}};
#if LOWBIT_X86_KERNELS
  if (isa_level() >= Isa::Avx2)
    p.push_back({"avx2", conv_detail::conv_avx2, hadamard_detail::rows_avx2});
  if (isa_level() >= Isa::Avx512Vnni)
    p.push_back({"avx512vnni", conv_detail::conv_avx512, hadamard_detail::rows_avx512});
#endif
#if defined(__aarch64__)
  if (isa_level() >= Isa::Neon) p.push_back({"neon", conv_detail::conv_neon, hadamard_detail::rows_neon});
  if (isa_level() >= Isa::NeonDotprod)  // Hadamard has one NEON kernel for both levels
    p.push_back({"neon-dotprod", conv_detail::conv_neon_dotprod, hadamard_detail::rows_neon});
#endif
  return p;
}

ConvShape make_shape(int64_t batch, int64_t C, int64_t H, int64_t W, int64_t N, int64_t kh,
                     int64_t kw, int64_t group, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                     int64_t pb, int64_t pr, int64_t dh, int64_t dw) {
  ConvShape s;
  s.batch = batch, s.C = C, s.H = H, s.W = W, s.N = N, s.kh = kh, s.kw = kw, s.group = group;
  s.stride_h = sh, s.stride_w = sw, s.pad_top = pt, s.pad_left = pl, s.pad_bottom = pb;
  s.pad_right = pr, s.dilation_h = dh, s.dilation_w = dw;
  s.OH = (H + pt + pb - dh * (kh - 1) - 1) / sh + 1;
  s.OW = (W + pl + pr - dw * (kw - 1) - 1) / sw + 1;
  return s;
}

std::string describe(const ConvShape& s) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "b%ld C%ld %ldx%ld N%ld k%ldx%ld g%ld s%ld,%ld p%ld,%ld,%ld,%ld d%ld,%ld",
                s.batch, s.C, s.H, s.W, s.N, s.kh, s.kw, s.group, s.stride_h, s.stride_w,
                s.pad_top, s.pad_left, s.pad_bottom, s.pad_right, s.dilation_h, s.dilation_w);
  return buf;
}

// Returns false when some path exceeds the tolerance (relative to the output's max |y|).
bool check_conv(Pool& pool) {
  const std::vector<ConvShape> shapes = {
      make_shape(1, 8, 9, 11, 12, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),
      make_shape(2, 6, 10, 7, 10, 3, 3, 2, 2, 2, 1, 0, 2, 1, 1, 1),
      make_shape(1, 16, 12, 12, 16, 3, 3, 16, 1, 1, 1, 1, 1, 1, 1, 1),  // depthwise
      make_shape(1, 16, 13, 9, 32, 3, 3, 16, 2, 1, 1, 1, 1, 1, 1, 1),   // depthwise ×2
      make_shape(1, 24, 11, 11, 24, 5, 5, 24, 2, 2, 2, 2, 2, 2, 1, 1),  // depthwise 5×5 s2
      make_shape(1, 24, 14, 19, 24, 5, 5, 24, 1, 1, 2, 2, 2, 2, 1, 1),  // depthwise 5×5 s1
      make_shape(1, 6, 7, 7, 12, 5, 5, 6, 1, 1, 2, 1, 2, 3, 1, 1),      // depthwise 5×5 s1 ×2, asymmetric pads
      make_shape(1, 8, 20, 30, 8, 3, 3, 8, 1, 1, 1, 1, 1, 1, 1, 1),     // depthwise wide rows
      make_shape(2, 4, 14, 14, 4, 3, 3, 4, 1, 1, 1, 1, 1, 1, 1, 1),     // depthwise 14×14
      make_shape(1, 4, 18, 17, 4, 3, 3, 4, 1, 1, 2, 1, 0, 2, 2, 1),     // depthwise dilated
      make_shape(1, 8, 35, 37, 8, 3, 3, 8, 2, 2, 1, 1, 1, 1, 1, 1),     // depthwise s2 wide rows
      make_shape(1, 4, 9, 40, 4, 5, 5, 4, 1, 2, 2, 2, 2, 2, 1, 1),      // depthwise s(1,2) pad 2
      make_shape(1, 4, 8, 50, 8, 3, 3, 4, 3, 3, 0, 1, 2, 0, 1, 2),      // depthwise ×2 s3 dil
      make_shape(2, 20, 9, 10, 13, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1),    // pointwise
      make_shape(1, 67, 5, 6, 19, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1),     // pointwise odd K
      make_shape(1, 3, 17, 15, 8, 3, 3, 1, 2, 2, 0, 1, 1, 0, 1, 1),     // K = 27
      make_shape(1, 8, 12, 12, 8, 3, 3, 1, 1, 1, 2, 2, 2, 2, 2, 2),     // dilation 2
      make_shape(1, 32, 7, 7, 40, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),     // K = 288
      make_shape(1, 6, 10, 40, 10, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),    // wide rows
      make_shape(2, 10, 21, 45, 14, 3, 3, 2, 2, 2, 1, 0, 1, 2, 1, 1),   // wide, stride 2, groups
      make_shape(1, 12, 6, 5, 9, 1, 3, 3, 1, 2, 0, 1, 0, 1, 1, 1),
      make_shape(1, 64, 20, 21, 48, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1),
      make_shape(1, 4, 9, 7, 6, 1, 1, 2, 1, 1, 0, 0, 0, 0, 1, 1),       // K = 2
      make_shape(1, 12, 19, 40, 10, 1, 1, 1, 2, 2, 0, 0, 0, 0, 1, 1),   // 1×1 stride 2
      // depthwise 3×3 stride 1 (AVX-512 float: read from the planes, rows of 16-lane vectors and
      // a last ≤ 8 columns in ymm): widths around 8, 16, 64, pads 0 … 2, asymmetric
      make_shape(1, 3, 5, 1, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1),       // depthwise W = 1
      make_shape(1, 3, 2, 8, 6, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1),       // depthwise H = 2, ×2
      make_shape(2, 5, 11, 17, 5, 3, 3, 5, 1, 1, 0, 0, 0, 0, 1, 1),     // depthwise no pad
      make_shape(1, 4, 9, 24, 4, 3, 3, 4, 1, 1, 0, 1, 2, 0, 1, 1),      // depthwise 16 + 8 cols
      make_shape(1, 3, 12, 56, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1),     // depthwise 56
      make_shape(1, 2, 7, 70, 4, 3, 3, 2, 1, 1, 2, 2, 2, 2, 1, 1),      // depthwise pad 2, 5 vectors
      make_shape(1, 2, 6, 131, 2, 3, 3, 2, 1, 1, 1, 0, 1, 2, 1, 1),     // depthwise 9 vectors
      // depthwise stride 2 (AVX-512 float: from the planes, even/odd columns split in registers)
      make_shape(1, 3, 9, 130, 3, 3, 3, 3, 2, 2, 0, 0, 1, 1, 1, 1),     // depthwise s2 4 + ½ vectors
      make_shape(1, 4, 14, 14, 8, 5, 5, 4, 2, 2, 1, 1, 2, 2, 1, 1),     // depthwise 5×5 s2 ×2, 7 wide
      make_shape(1, 3, 13, 56, 3, 5, 5, 3, 2, 2, 1, 1, 2, 2, 1, 1),     // depthwise 5×5 s2, 28 wide
      make_shape(1, 2, 7, 33, 2, 3, 3, 2, 2, 2, 1, 0, 1, 0, 1, 1),      // depthwise s2 16 wide, pad top
      make_shape(1, 2, 5, 3, 2, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1),       // depthwise s2 W = 3
      // stride-1 dense convs read from the planes (AVX-512 int8)
      make_shape(1, 1, 8, 8, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),      // 1 channel (group 1)
      make_shape(2, 5, 9, 13, 12, 5, 5, 1, 1, 1, 2, 2, 2, 2, 1, 1),     // 5×5
      make_shape(1, 6, 7, 11, 8, 3, 3, 2, 1, 1, 0, 2, 1, 0, 1, 1),      // asymmetric pads, groups
      make_shape(1, 2, 5, 20, 4, 1, 17, 1, 1, 1, 0, 8, 0, 8, 1, 1),     // 1×17
      make_shape(1, 16, 4, 4, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1),     // 4×4
      make_shape(1, 32, 6, 6, 3, 3, 3, 1, 1, 1, 1, 0, 1, 0, 2, 2),      // dilated, OW = 2 < W
      make_shape(1, 3, 6, 9, 4, 3, 3, 1, 1, 1, 1, 2, 1, 2, 1, 1),       // OW = 11 > W
      make_shape(1, 4, 7, 10, 8, 3, 5, 2, 1, 1, 0, 5, 2, 3, 1, 2),      // 3×5 dilated, OW = W
  };
  const auto ps = paths();
  std::vector<double> worst(ps.size() * 4, 0.0);
  bool ok = true;
  int cases = 0;
  for (const auto& s : shapes)
    for (int bits : {2, 4})
      for (int64_t bs : {16, 32, 64, 128, 256})
        for (Format fmt : {Format::Uniform, Format::Codebook})
          for (Accuracy acc : {Accuracy::Float, Accuracy::Int8}) {
            const int64_t K = s.C / s.group * s.kh * s.kw;
            if (bs > 64 && K < bs / 2 && (cases++ % 3)) continue;  // thin out tiny-K cases
            const bool zp = (cases++ % 2) == 0;
            Weight w = random_weight(s.N, K, bits, bs, fmt, zp);
            const auto X = randn(s.batch * s.C * s.H * s.W);
            const auto bias = randn(s.N);
            const float* bp = (cases % 3) ? bias.data() : nullptr;
            const auto ref = ref_conv(w.view, acc, s, X.data(), bp);
            double ymax = 1e-30;
            for (float v : ref) ymax = std::max(ymax, std::fabs(static_cast<double>(v)));
            auto packed = prepack_conv(w.view, acc);
            const auto& cw = static_cast<const conv_detail::ConvWeight&>(*packed);
            for (std::size_t i = 0; i < ps.size(); ++i)
              for (int th : {1, 2}) {
                std::vector<float> Y(ref.size(), NAN);
                ps[i].conv(cw, s, X.data(), bp, Y.data(),
                           th == 1 ? serial() : pool.parallel());
                double err = 0;
                for (std::size_t j = 0; j < Y.size(); ++j) {
                  const double e = std::fabs(static_cast<double>(Y[j]) - ref[j]) / ymax;
                  err = std::isnan(Y[j]) ? INFINITY : std::max(err, e);
                }
                double& wv = worst[i * 4 + (fmt == Format::Codebook) * 2 + (acc == Accuracy::Int8)];
                wv = std::max(wv, err);
                if (err > 2e-5) {
                  ok = false;
                  std::printf("FAIL %s %s bits%d bs%ld %s %s threads%d: rel err %.3g\n",
                              ps[i].name, describe(s).c_str(), bits, bs,
                              fmt == Format::Codebook ? "codebook" : "uniform",
                              acc == Accuracy::Int8 ? "int8" : "float", th, err);
                }
              }
          }
  for (std::size_t i = 0; i < ps.size(); ++i)
    std::printf("conv %-12s max rel err: uniform/float %.2e uniform/int8 %.2e "
                "codebook/float %.2e codebook/int8 %.2e\n",
                ps[i].name, worst[i * 4], worst[i * 4 + 1], worst[i * 4 + 2], worst[i * 4 + 3]);
  return ok;
}

bool check_hadamard() {
  bool ok = true;
  const auto ps = paths();
  for (const auto& p : ps) {
    double worst = 0;
    for (int64_t size : {1, 2, 8, 16, 48, 64, 256, 768, 4096, 8192})
      for (int64_t group = 1; group <= size; group *= 2) {
        if (size % group) continue;
        for (Order order : {Order::Natural, Order::Sequency})
          for (bool inplace : {false, true}) {
            const int64_t rows = size > 4096 ? 1 : 3;
            auto X = randn(rows * size);
            const float scale = 1.f / std::sqrt(static_cast<float>(group));
            // reference: dense H in the requested row order
            int bits = 0;
            while ((int64_t{1} << bits) < group) ++bits;
            std::vector<double> ref(rows * size);
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t g = 0; g < size; g += group)
                for (int64_t i = 0; i < group; ++i) {
                  int64_t row = i;
                  if (order == Order::Sequency) {
                    const int64_t gray = i ^ (i >> 1);
                    row = 0;
                    for (int b = 0; b < bits; ++b) row |= ((gray >> b) & 1) << (bits - 1 - b);
                  }
                  double acc = 0;
                  for (int64_t j = 0; j < group; ++j)
                    acc += (__builtin_popcountll(row & j) & 1 ? -1.0 : 1.0) * X[r * size + g + j];
                  ref[r * size + g + i] = scale * acc;
                }
            std::vector<float> Yb(rows * size);
            float* Y = inplace ? X.data() : Yb.data();
            std::vector<int32_t> perm;
            if (order == Order::Sequency) {
              // the kernels take the permutation; hadamard() builds the same one
              for (int64_t i = 0; i < group; ++i) {
                const int64_t gray = i ^ (i >> 1);
                int64_t rev = 0;
                for (int b = 0; b < bits; ++b) rev |= ((gray >> b) & 1) << (bits - 1 - b);
                perm.push_back(static_cast<int32_t>(rev));
              }
            }
            p.had(X.data(), 0, rows, size, group, perm.empty() ? nullptr : perm.data(), scale, Y);
            for (int64_t j = 0; j < rows * size; ++j)
              worst = std::max(worst, std::fabs(Y[j] - ref[j]) / (1.0 + std::fabs(ref[j])));
          }
      }
    std::printf("hadamard %-12s max err %.2e\n", p.name, worst);
    if (worst > 1e-4) ok = false;
  }
  // the public entry (dispatch + permutation) once, in place
  auto X = randn(4 * 64);
  auto Y = X;
  hadamard(Y.data(), 4, 64, 16, Order::Sequency, 0.25f, Y.data(), serial());
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t g = 0; g < 64; g += 16) {
      double acc = 0;  // sequency row 1 = natural row 8 (16 = 2^4: gray 1 → 0001 → 1000)
      for (int64_t j = 0; j < 16; ++j)
        acc += (__builtin_popcountll(8 & j) & 1 ? -1.0 : 1.0) * X[r * 64 + g + j];
      if (std::fabs(Y[r * 64 + g + 1] - 0.25 * acc) > 1e-4) ok = false;
    }
  return ok;
}

// 1-thread times run with no pool alive (its spinning worker would steal the second core).
void bench(const char* filter, const char* path) {
  struct Case {
    const char* name;
    ConvShape s;
    double stock1, stock2;  // onnxruntime 1.31 float Conv (ms), measured on this machine
  };
  const std::vector<Case> cases = {
      {"3x3 64->64 56x56", make_shape(1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 2.11, 1.09},
      {"3x3 256->256 14x14", make_shape(1, 256, 14, 14, 256, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1), 2.07, 1.07},
      {"dw3x3 64 56x56", make_shape(1, 64, 56, 56, 64, 3, 3, 64, 1, 1, 1, 1, 1, 1, 1, 1), 0.091, 0.060},
      {"dw3x3 256 14x14", make_shape(1, 256, 14, 14, 256, 3, 3, 256, 1, 1, 1, 1, 1, 1, 1, 1), 0.035, 0.033},
      {"1x1 32->16 112x112", make_shape(1, 32, 112, 112, 16, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1), 0.178, 0.182},
      {"1x1 96->24 56x56", make_shape(1, 96, 56, 56, 24, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1), 0.215, 0.234},
      {"1x1 672->192 7x7", make_shape(1, 672, 7, 7, 192, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1), 0.124, 0.139},
  };
  const auto ps = paths();
  auto two = [](auto&& run) {
    Pool pool(2);
    return run(pool.parallel());
  };
  for (const auto& c : cases) {
    if (filter && !std::strstr(c.name, filter)) continue;
    const ConvShape& s = c.s;
    const int64_t K = s.C / s.group * s.kh * s.kw;
    Weight w = random_weight(s.N, K, 4, 32, Format::Uniform, true);
    Weight wc = random_weight(s.N, K, 4, 32, Format::Codebook, false);
    const auto X = randn(s.batch * s.C * s.H * s.W);
    const auto bias = randn(s.N);
    std::vector<float> Y(s.batch * s.N * s.OH * s.OW);
    std::printf("%-20s stock float %.3f / %.3f ms\n", c.name, c.stock1, c.stock2);
    for (const auto& p : ps) {
      if (std::strcmp(p.name, "scalar") == 0 || (path && std::strcmp(p.name, path))) continue;
      for (Accuracy acc : {Accuracy::Float, Accuracy::Int8})
        for (const Weight* wt : {&w, &wc}) {
          auto pk = prepack_conv(wt->view, acc);
          const auto& cw = static_cast<const conv_detail::ConvWeight&>(*pk);
          auto time = [&](const ParallelFor& par) {
            return median_ms([&] { p.conv(cw, s, X.data(), bias.data(), Y.data(), par); }, 60);
          };
          const double t[2] = {time(serial()), two(time)};
          std::printf("  %-12s %-8s %-5s 4-bit b32: %.3f / %.3f ms\n", p.name,
                      wt == &w ? "uniform" : "codebook", acc == Accuracy::Int8 ? "int8" : "float",
                      t[0], t[1]);
        }
    }
  }
  if (filter && !std::strstr("hadamard", filter)) return;
  for (int64_t M : {1, 32})
    for (int64_t group : {16, 256, 4096})
      for (Order order : {Order::Natural, Order::Sequency}) {
        const auto X = randn(M * 4096);
        std::vector<float> Y(X.size());
        auto time = [&](const ParallelFor& par) {
          return median_ms([&] { hadamard(X.data(), M, 4096, group, order, 0.1f, Y.data(), par); },
                           200);
        };
        const double t[2] = {time(serial()), two(time)};
        std::printf("hadamard M=%ld size 4096 group %ld %s: %.4f / %.4f ms\n", M, group,
                    order == Order::Natural ? "natural" : "sequency", t[0], t[1]);
      }
}

}  // namespace

int main(int argc, char** argv) {
  std::printf("isa: %s\n", isa());
  const bool only_bench = argc > 1 && std::strcmp(argv[1], "--bench-only") == 0;
  bool ok = true;
  if (!only_bench) {
    Pool pool(2);
    ok = check_conv(pool);
    ok = check_hadamard() && ok;
    std::printf("%s\n", ok ? "all checks passed" : "SOME CHECKS FAILED");
  }
  if (argc > 1 && std::strncmp(argv[1], "--bench", 7) == 0) bench(argc > 2 ? argv[2] : nullptr, argc > 3 ? argv[3] : nullptr);
  return ok ? 0 : 1;
}
