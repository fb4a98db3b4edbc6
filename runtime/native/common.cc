// Instruction-set dispatch and the serial ParallelFor shared by every kernel family.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace lowbit {

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
#endif
  return 0;
}

int level() {
  static const int chosen = [] {
    int best = detect();
    const char* cap = std::getenv("LOWBIT_ISA");
    if (cap != nullptr) {
      int wanted = std::strcmp(cap, "scalar") == 0 ? 0 : std::strcmp(cap, "avx2") == 0 ? 1 : 2;
      if (wanted < best) best = wanted;
    }
    return best;
  }();
  return chosen;
}

}  // namespace

Isa isa_level() { return static_cast<Isa>(level()); }

const char* isa() {
  switch (level()) {
    case 2: return "avx512vnni";
    case 1: return "avx2";
    default: return "scalar";
  }
}

}  // namespace lowbit
