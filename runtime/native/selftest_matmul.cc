// Standalone check and benchmark of MatMulLowBit (no onnxruntime): every ISA path this CPU runs
// against a plain reference of runtime/ops.py's formulas, then timings on 1 and 2 threads.
// Usage: lowbit_selftest_matmul [--bench [avx2|avx512vnni|neon|neon-dotprod]]   (exit status 1 when a check fails)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "matmul_internal.h"
#include "selftest.h"

using namespace lowbit;
using matmul_detail::MatMulWeight;

namespace {

std::mt19937 rng(11);

using selftest::code;
using selftest::median_ms;
using selftest::Pool;
using selftest::Weight;

std::vector<float> randn(std::size_t n) { return selftest::randn(rng, n); }

Weight random_weight(int64_t N, int64_t K, int bits, int64_t bs, Format fmt, bool with_zp) {
  return selftest::random_weight(rng, N, K, bits, bs, fmt, with_zp);
}

// ---- the reference: ops.py, one output element at a time, in double where the spec is free ----

// y[m, n] and a scale for the error: Σ|terms|.
void reference(const LowBitWeight& w, Accuracy acc, const float* A, int64_t M, const float* bias,
               std::vector<double>& y, std::vector<double>& mag) {
  const int64_t nb = w.blocks(), values = 1 << w.bits;
  y.assign(M * w.N, 0.0);
  mag.assign(M * w.N, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * w.K;
    std::vector<int> q(w.K);
    std::vector<float> d(nb);
    for (int64_t b = 0; b < nb; ++b) {  // accuracy=int8: the activations' blocks
      const int64_t k0 = b * w.block_size, k1 = std::min(w.K, k0 + w.block_size);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(a[k]));
      for (int64_t k = k0; k < k1; ++k)
        q[k] = amax == 0.f ? 0 : static_cast<int>(std::nearbyint(a[k] * (127.f / amax)));
      d[b] = amax / 127.f;
    }
    for (int64_t n = 0; n < w.N; ++n) {
      double sum = bias ? bias[n] : 0.0, size = bias ? std::fabs(bias[n]) : 0.0;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t k0 = b * w.block_size, k1 = std::min(w.K, k0 + w.block_size);
        const float s = w.scales[n * nb + b];
        const float* lv = w.levels ? w.levels + (n * nb + b) * values : nullptr;
        const int zp = w.zero_points ? w.zero_points[n * nb + b] : 1 << (w.bits - 1);
        if (acc == Accuracy::Float) {
          for (int64_t k = k0; k < k1; ++k) {
            const int c = code(w, n, k);
            const float wk = lv ? lv[c] * s : static_cast<float>(c - zp) * s;
            sum += static_cast<double>(a[k]) * wk;
            size += std::fabs(static_cast<double>(a[k]) * wk);
          }
        } else {
          float lmax = 0.f, bscale = s;
          if (lv) {
            for (int v = 0; v < values; ++v) lmax = std::max(lmax, std::fabs(lv[v]));
            bscale = selftest::half_round(s * (lmax / 127.f));
          }
          int64_t dot = 0, adot = 0;
          for (int64_t k = k0; k < k1; ++k) {
            const int c = code(w, n, k);
            const int wi = lv ? (lmax == 0.f ? 0 : static_cast<int>(std::nearbyint(lv[c] * (127.f / lmax))))
                              : c - zp;
            dot += q[k] * wi;
            adot += std::abs(q[k] * wi);
          }
          sum += static_cast<double>(d[b]) * bscale * dot;
          size += std::fabs(static_cast<double>(d[b]) * bscale) * adot;
        }
      }
      y[m * w.N + n] = sum;
      mag[m * w.N + n] = size;
    }
  }
}

// ---- the paths ----

std::vector<Isa> paths() {
  std::vector<Isa> out{Isa::Scalar};
#if defined(__x86_64__) || defined(_M_X64)
  if (isa_level() >= Isa::Avx2) out.push_back(Isa::Avx2);
  if (isa_level() >= Isa::Avx512Vnni) out.push_back(Isa::Avx512Vnni);
#endif
#if defined(__aarch64__)
  if (isa_level() >= Isa::Neon) out.push_back(Isa::Neon);
  if (isa_level() >= Isa::NeonDotprod) out.push_back(Isa::NeonDotprod);
#endif
  return out;
}

const char* name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni: return "avx512vnni";
    case Isa::Avx2: return "avx2";
    case Isa::NeonDotprod: return "neon-dotprod";
    case Isa::Neon: return "neon";
    default: return "scalar";
  }
}

// exact_half against numpy's float16 bits; -1: not a half.
bool check_halves() {
  const std::pair<float, int> cases[] = {
      {1.f, 0x3C00}, {65504.f, 0x7BFF}, {65520.f, -1}, {std::ldexp(1.f, -24), 0x0001}, {std::ldexp(1.f, -25), -1},
      {std::ldexp(3.f, -24), 0x0003}, {1.f + std::ldexp(1.f, -10), 0x3C01}, {1.f + std::ldexp(1.f, -11), -1},
      {-2.f, 0xC000}, {0.f, 0x0000}, {-0.f, 0x8000}, {std::ldexp(1.f, -14), 0x0400}, {std::ldexp(3.f, -16), 0x0300},
      {std::ldexp(3.f, -25), -1}, {0.1f, -1}, {INFINITY, -1}, {NAN, -1}, {std::ldexp(1.f, -130), -1}};
  bool ok = true;
  // round_to_half (the kernels') against the oracle's half_round: edges, ties, random values
  std::vector<float> xs = {std::ldexp(1.f, -14), std::ldexp(1.f, -14) * (1 - 1e-7f), 65504.f, 65519.f, 65520.f,
                           1.f + std::ldexp(1.f, -11), 1.f + 3 * std::ldexp(1.f, -11), -(2.f + std::ldexp(1.f, -10)),
                           2047.5f, 2048.5f, 0.f, NAN, INFINITY, 1e-30f, -0.3f};
  std::uniform_real_distribution<float> unit(-20.f, 20.f);
  for (int i = 0; i < 100000; ++i) xs.push_back(std::copysign(std::exp2(unit(rng)), unit(rng)));
  for (float x : xs) {
    const float a = round_to_half(x), b = selftest::half_round(x);
    if (std::memcmp(&a, &b, sizeof a) != 0 && !(std::isnan(a) && std::isnan(b))) {
      std::printf("FAIL round_to_half(%.9g) = %.9g, want %.9g\n", x, a, b);
      ok = false;
    }
  }
  for (const auto& [f, want] : cases) {
    uint16_t h = 0;
    const bool exact = matmul_detail::exact_half(f, &h);
    if (exact != (want >= 0) || (exact && h != want)) {
      std::printf("FAIL exact_half(%g): %s 0x%04x, want %s%04x\n", f, exact ? "half" : "no half", h, want < 0 ? "none " : "0x", want < 0 ? 0 : want);
      ok = false;
    }
  }
  return ok;
}

bool check(Pool& pool) {
  // worst error / Σ|terms| per (path, format, bits, block, accuracy)
  std::map<std::tuple<int, int, int, int64_t, int>, double> worst;
  const auto ps = paths();
  const ParallelFor par2 = pool.parallel();
  bool ok = true;
  int cases = 0;
  int64_t neon_int8_differ = 0;
  for (int bits : {2, 4})
    for (int64_t bs : {16, 32, 64, 128, 256})
      for (Format fmt : {Format::Uniform, Format::Codebook})
        for (int variant = 0; variant < 10; ++variant) {
          // K = block, K < block, odd K (variant 8: more than 4 blocks); N = 16 or random; M = 0 … 9; with and without zero points, bias
          std::uniform_int_distribution<int64_t> kd(1, 3 * bs + 7), nd(1, 53), md(0, 9);
          const int64_t K = variant == 0 ? bs : variant == 1 ? 1 + bs / 3 : variant == 8 ? (4 * bs + kd(rng)) | 1 : kd(rng) | 1;
          const int64_t N = variant == 2 ? 16 : nd(rng), M = variant == 3 ? 0 : md(rng);
          Weight w = random_weight(N, K, bits, bs, fmt, variant % 2 == 0);
          auto A = randn(M * K);
          if (variant == 4) {  // a block of zero activations, a block of zero levels
            if (M > 0) std::fill(A.begin(), A.begin() + std::min(K, bs), 0.f);
            std::fill(w.levels.begin(), w.levels.begin() + std::min<std::size_t>(w.levels.size(), 1 << bits), 0.f);
          }
          const bool halves = variant == 6 || variant == 7;  // scales the quantizer rounded to halves
          if (halves)
            for (float& s : w.scales) {
              uint32_t u;
              std::memcpy(&u, &s, sizeof u);
              u &= ~0x1FFFu;
              std::memcpy(&s, &u, sizeof u);
            }
          // scales = a half step per row times a byte, the row's largest 255 (quantize's scales=byte)
          // or, every other row, less (a step GPTQ set before the loop)
          const bool bytes = variant == 8 && fmt == Format::Uniform;
          if (bytes) {
            const int64_t nb = (K + bs - 1) / bs;
            std::uniform_int_distribution<int> qd(0, 255);
            for (int64_t n = 0; n < N; ++n) {
              const float step = selftest::half_round(0.0013f + 0.0001f * qd(rng));  // never a power of 2
              const int top = n % 2 ? 100 + static_cast<int>(n % 150) : 255;
              for (int64_t b = 0; b < nb; ++b) w.scales[n * nb + b] = step * (b == n % nb ? top : qd(rng) % (top + 1));
            }
          }
          const auto bias = randn(N);
          const float* b = variant == 5 ? nullptr : bias.data();
          for (Accuracy acc : {Accuracy::Float, Accuracy::Int8}) {
            std::vector<double> ref, mag;
            reference(w.view, acc, A.data(), M, b, ref, mag);
            std::vector<float> Ys;  // the scalar path's output (paths()[0])
            for (Isa isa : ps) {
              auto p = matmul_detail::prepack(w.view, acc, isa);
              // a codebook's effective scales (× lmax / 127) are rounded to halves by the spec, those
              // in float16's normal range (or 0)
              bool codebook_halves = fmt == Format::Codebook;
              for (std::size_t i = 0; codebook_halves && i < w.scales.size(); ++i) {
                float lmax = 0.f;
                for (int v = 0; v < 1 << bits; ++v) lmax = std::max(lmax, std::fabs(w.levels[i * (1 << bits) + v]));
                const float e = std::fabs(w.scales[i] * (lmax / 127.f));
                codebook_halves = e == 0.f || (e >= std::ldexp(1.f, -14) && e <= 65504.f);
              }
              const bool want_half = (fmt == Format::Codebook ? codebook_halves : halves) && acc == Accuracy::Int8 &&
                                     (isa == Isa::Avx512Vnni || isa == Isa::Neon || isa == Isa::NeonDotprod);
              const bool want_bytes = bytes && acc == Accuracy::Int8 && (K + bs - 1) / bs > 4 &&
                                      (isa == Isa::Avx512Vnni || isa == Isa::Neon || isa == Isa::NeonDotprod);
              if (static_cast<const MatMulWeight&>(*p).byte_scales.empty() == want_bytes) {
                std::printf("FAIL %s %d-bit block %ld: byte scales %s\n", name(isa), bits, bs,
                            want_bytes ? "not used" : "used where they do not apply");
                ok = false;
              }
              if (static_cast<const MatMulWeight&>(*p).half_scales.empty() == (want_half && !want_bytes)) {
                std::printf("FAIL %s %d-bit block %ld: half scales %s\n", name(isa), bits, bs,
                            want_half ? "not used" : "used where they do not apply");
                ok = false;
              }
              for (int th = 0; th < 2; ++th) {
                std::vector<float> Y(M * N, NAN);
                matmul_lowbit(*p, A.data(), M, b, Y.data(), th ? par2 : serial());
                double err = 0;
                for (int64_t i = 0; i < M * N; ++i) {
                  const double e = std::fabs(Y[i] - ref[i]) / (mag[i] + 1e-30);
                  err = std::max(err, std::isnan(e) ? INFINITY : e);
                }
                if (isa == Isa::Scalar) Ys = Y;
#if defined(__aarch64__)
                // the NEON int8 kernels do the scalar path's arithmetic: the same bits
                if (acc == Accuracy::Int8 && isa != Isa::Scalar) {
                  int64_t differ = 0;
                  for (int64_t i = 0; i < M * N; ++i) differ += std::memcmp(&Y[i], &Ys[i], sizeof(float)) != 0;
                  neon_int8_differ += differ;
                  if (differ) {
                    std::printf("FAIL %s int8 %d-bit block %ld %s K=%ld N=%ld M=%ld: %ld outputs differ from scalar\n",
                                name(isa), bits, bs, fmt == Format::Codebook ? "codebook" : "uniform", K, N, M,
                                static_cast<long>(differ));
                    ok = false;
                  }
                }
#endif
                if (!(err <= 1e-5)) {
                  std::printf("FAIL %s %s %d-bit block %ld %s K=%ld N=%ld M=%ld: error %.3g\n",
                              name(isa), fmt == Format::Codebook ? "codebook" : "uniform", bits, bs,
                              acc == Accuracy::Int8 ? "int8" : "float", K, N, M, err);
                  ok = false;
                }
                auto& slot = worst[{static_cast<int>(isa), static_cast<int>(fmt), bits, bs,
                                    static_cast<int>(acc)}];
                slot = std::max(slot, err);
              }
            }
          }
          ++cases;
        }
  std::printf("correctness: %d random cases, max |y - ref| / sum|terms| per path (1 and 2 threads)\n",
              cases);
  for (Isa isa : ps)
    for (int fmt = 0; fmt < 2; ++fmt)
      for (int acc = 0; acc < 2; ++acc) {
        std::printf("  %-12s %-8s %-5s", name(isa), fmt ? "codebook" : "uniform", acc ? "int8" : "float");
        for (int bits : {2, 4})
          for (int64_t bs : {16, 32, 64, 128, 256})
            std::printf(" %d/%ld:%.0e", bits, bs, worst[{static_cast<int>(isa), fmt, bits, bs, acc}]);
        std::printf("\n");
      }
#if defined(__aarch64__)
  if (ps.size() > 1)
    std::printf("neon int8 outputs differing from the scalar path: %ld\n", static_cast<long>(neon_int8_differ));
#endif
  return ok;
}

// ---- benchmark ----

// Read bandwidth of a 256 MB buffer, GB/s.
double memory_gbps(const ParallelFor& parallel) {
  const std::size_t n = std::size_t{1} << 25;
  std::vector<uint64_t> buf(n, 1);
  std::atomic<uint64_t> sink{0};
  const double ms = median_ms([&] {
    parallel(2, [&](std::size_t part) {
      uint64_t s = 0;
      for (std::size_t i = part * n / 2; i < (part + 1) * n / 2; ++i) s += buf[i];
      sink += s;
    });
  }, 5);
  return n * 8 / ms / 1e6;
}

void bench(Pool& pool, const char* only) {
  const ParallelFor par2 = pool.parallel();
  std::printf("memory read bandwidth (256 MB): %.1f GB/s 1 thread, %.1f GB/s 2 threads\n",
              memory_gbps(serial()), memory_gbps(par2));
  struct Case {
    const char* label;
    int bits;
    int64_t bs;
    Format fmt;
  };
  const Case cases[] = {{"uniform 2-bit b32", 2, 32, Format::Uniform},
                        {"uniform 2-bit b128", 2, 128, Format::Uniform},
                        {"uniform 4-bit b32", 4, 32, Format::Uniform},
                        {"codebook 2-bit b32", 2, 32, Format::Codebook},
                        {"codebook 4-bit b32", 4, 32, Format::Codebook}};
  const int64_t K = 4096, N = 4096;
  const auto A = randn(32 * K);
  std::vector<float> Y(32 * N);
  std::printf("K = N = 4096, ms 1 thread / 2 threads, weight GB/s streamed on 1 thread (op inputs; "
              "int8: the prepacked arrays)\n");
  for (Isa isa : paths()) {
    if (isa == Isa::Scalar || (only && std::strcmp(only, name(isa)) != 0)) continue;
    for (const Case& c : cases) {
      Weight w = random_weight(N, K, c.bits, c.bs, c.fmt, false);
      for (Accuracy acc : {Accuracy::Int8, Accuracy::Float}) {
        auto p = matmul_detail::prepack(w.view, acc, isa);
        const std::size_t bytes = acc == Accuracy::Int8 ? p->bytes() : w.bytes();
        std::printf("  %-12s %-19s %-5s", name(isa), c.label, acc == Accuracy::Int8 ? "int8" : "float");
        for (int64_t M : {1, 8, 32}) {
          double t[2];
          for (int th = 0; th < 2; ++th)
            t[th] = median_ms([&] { matmul_lowbit(*p, A.data(), M, nullptr, Y.data(), th ? par2 : serial()); },
                              M == 1 ? 200 : 40);
          std::printf("  M=%-2ld %.3f / %.3f", M, t[0], t[1]);
          if (M == 1) std::printf(" (%.0f GB/s)", bytes / t[0] / 1e6);
        }
        std::printf("\n");
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::printf("isa: %s\n", isa());
  Pool pool(2);
  const bool ok = check_halves() & check(pool);
  std::printf("%s\n", ok ? "all checks passed" : "SOME CHECKS FAILED");
  if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) bench(pool, argc > 2 ? argv[2] : nullptr);
  return ok ? 0 : 1;
}
