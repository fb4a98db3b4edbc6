// Instruction-set dispatch and the serial ParallelFor shared by every kernel family.
#include <cstdlib>
#include <cstring>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#endif

#include "kernels.h"

namespace lowbit {

float round_to_half(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t mag = u & 0x7FFFFFFFu;
  if (mag < 0x38800000u || mag > 0x477FE000u) return x;  // outside [2^-14, 65504], NaN included
  u += 0x0FFFu + ((u >> 13) & 1u);                       // to nearest, ties to even, at 10 mantissa bits
  u &= ~0x1FFFu;
  std::memcpy(&x, &u, sizeof u);
  return x;
}

ParallelFor serial() {
  return [](std::size_t n, const std::function<void(std::size_t)>& fn) {
    for (std::size_t i = 0; i < n; ++i) fn(i);
  };
}

namespace {

int detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#elif defined(__aarch64__)
#if defined(__linux__)
  const unsigned long caps = getauxval(AT_HWCAP);
  if ((caps & HWCAP_ASIMD) && (caps & HWCAP_ASIMDDP)) return static_cast<int>(Isa::NeonDotprod);
#endif
  return static_cast<int>(Isa::Neon);  // Advanced SIMD is part of every aarch64 CPU
#endif
  return 0;
}

// The level LOWBIT_ISA names (no cap for a name this processor does not know).
int wanted(const char* cap, int best) {
#if defined(__aarch64__)
  if (std::strcmp(cap, "scalar") == 0) return 0;
  if (std::strcmp(cap, "neon") == 0) return static_cast<int>(Isa::Neon);
  return best;
#else
  return std::strcmp(cap, "scalar") == 0 ? 0 : std::strcmp(cap, "avx2") == 0 ? 1 : 2;
#endif
}

int level() {
  static const int chosen = [] {
    int best = detect();
    const char* cap = std::getenv("LOWBIT_ISA");
    if (cap != nullptr) {
      const int w = wanted(cap, best);
      if (w < best) best = w;
    }
    return best;
  }();
  return chosen;
}

}  // namespace

Isa isa_level() { return static_cast<Isa>(level()); }

// Each processor's names lowest level first (tests/test_edge.py reads them in this order).
const char* isa() {
  switch (level()) {
    case 3: return "neon";
    case 4: return "neon-dotprod";
    case 1: return "avx2";
    case 2: return "avx512vnni";
    default: return "scalar";
  }
}

}  // namespace lowbit
