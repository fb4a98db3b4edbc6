// Hadamard: blockwise fast Walsh–Hadamard transform (runtime/ops.py, Hadamard), dispatch and the
// portable path.
#include <algorithm>
#include <vector>

#include "conv_internal.h"

namespace lowbit {
namespace hadamard_detail {

// In-place Sylvester butterflies: v ← H·v, H[i, j] = (−1)^popcount(i & j).
static void fwht(float* v, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
}

void rows_scalar(const float* X, int64_t r0, int64_t r1, int64_t size, int64_t group,
                 const int32_t* perm, float scale, float* Y) {
  std::vector<float> t(group);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < size; g += group) {
      const float* x = X + r * size + g;
      float* y = Y + r * size + g;
      std::copy(x, x + group, t.data());
      fwht(t.data(), group);
      for (int64_t i = 0; i < group; ++i) y[i] = scale * t[perm ? perm[i] : i];
    }
}

}  // namespace hadamard_detail

void hadamard(const float* X, int64_t rows, int64_t size, int64_t group, Order order, float scale,
              float* Y, const ParallelFor& parallel) {
  using namespace hadamard_detail;
  if (rows <= 0 || size <= 0) return;
  // sequency row i = natural row bitreverse(gray(i)) over log2(group) bits; kept per thread for
  // the last group seen (building it costs more than transforming one row)
  thread_local std::vector<int32_t> perm;
  if (order == Order::Sequency && static_cast<int64_t>(perm.size()) != group) {
    int bits = 0;
    while ((int64_t{1} << bits) < group) ++bits;
    std::vector<int32_t> rev(group, 0);
    for (int64_t i = 1; i < group; ++i)
      rev[i] = (rev[i >> 1] >> 1) | static_cast<int32_t>((i & 1) << (bits - 1));
    perm.resize(group);
    for (int64_t i = 0; i < group; ++i) perm[i] = rev[i ^ (i >> 1)];
  }
  RowsFn fn = rows_scalar;
#if LOWBIT_X86_KERNELS
  if (isa_level() == Isa::Avx512Vnni) fn = rows_avx512;
  else if (isa_level() == Isa::Avx2) fn = rows_avx2;
#endif
#if defined(__aarch64__)
  if (isa_level() >= Isa::Neon) fn = rows_neon;
#endif
  // tasks of ≥ ~64k elements each, at most 64
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(64, rows * size / 65536));
  const int64_t per = (rows + tasks - 1) / tasks;
  const int32_t* pp = order == Order::Sequency ? perm.data() : nullptr;
  parallel(tasks, [&](std::size_t t) {
    const int64_t r0 = t * per, r1 = std::min(rows, r0 + per);
    if (r0 < r1) fn(X, r0, r1, size, group, pp, scale, Y);
  });
}

}  // namespace lowbit
