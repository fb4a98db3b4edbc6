// Hadamard rows for AVX2: the butterflies of distance 1, 2, 4 inside a ymm (a lane permute and
// an FMA with ±1: lane i becomes x[i ^ h] ± x[i]), the larger distances between ymm's of an
// L1-resident copy of the block, two stages per pass.
#include <immintrin.h>

#include "conv_internal.h"

namespace lowbit {
namespace hadamard_detail {
namespace {

inline __m256 sign(int h) {  // −1 in the lanes with bit h set
  alignas(32) float s[8];
  for (int i = 0; i < 8; ++i) s[i] = (i & h) ? -1.f : 1.f;
  return _mm256_load_ps(s);
}

// v ← H8·v
inline __m256 fwht8(__m256 v, const __m256* sg) {
  v = _mm256_fmadd_ps(v, sg[0], _mm256_permute_ps(v, 0xB1));
  v = _mm256_fmadd_ps(v, sg[1], _mm256_permute_ps(v, 0x4E));
  return _mm256_fmadd_ps(v, sg[2], _mm256_permute2f128_ps(v, v, 0x01));
}

// the stages of distance 8 … group/2 over t[0, group)
void stages(float* t, int64_t group) {
  int64_t h = 8;
  for (; 4 * h <= group; h *= 4)
    for (int64_t i = 0; i < group; i += 4 * h)
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_load_ps(t + j), b = _mm256_load_ps(t + j + h);
        const __m256 c = _mm256_load_ps(t + j + 2 * h), d = _mm256_load_ps(t + j + 3 * h);
        const __m256 s0 = _mm256_add_ps(a, b), d0 = _mm256_sub_ps(a, b);
        const __m256 s1 = _mm256_add_ps(c, d), d1 = _mm256_sub_ps(c, d);
        _mm256_store_ps(t + j, _mm256_add_ps(s0, s1));
        _mm256_store_ps(t + j + h, _mm256_add_ps(d0, d1));
        _mm256_store_ps(t + j + 2 * h, _mm256_sub_ps(s0, s1));
        _mm256_store_ps(t + j + 3 * h, _mm256_sub_ps(d0, d1));
      }
  if (h < group)
    for (int64_t j = 0; j < h; j += 8) {
      const __m256 a = _mm256_load_ps(t + j), b = _mm256_load_ps(t + j + h);
      _mm256_store_ps(t + j, _mm256_add_ps(a, b));
      _mm256_store_ps(t + j + h, _mm256_sub_ps(a, b));
    }
}

}  // namespace

void rows_avx2(const float* X, int64_t r0, int64_t r1, int64_t size, int64_t group,
               const int32_t* perm, float scale, float* Y) {
  if (group < 8) return rows_scalar(X, r0, r1, size, group, perm, scale, Y);
  const __m256 sg[3] = {sign(1), sign(2), sign(4)};
  const __m256 sc = _mm256_set1_ps(scale);
  float* t = conv_detail::scratch_of<float>(0, group);  // the block, 64-byte aligned
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < size; g += group) {
      const float* x = X + r * size + g;
      float* y = Y + r * size + g;
      for (int64_t j = 0; j < group; j += 8) _mm256_store_ps(t + j, fwht8(_mm256_loadu_ps(x + j), sg));
      stages(t, group);
      if (perm) {
        for (int64_t i = 0; i < group; ++i) y[i] = t[perm[i]] * scale;
      } else {
        for (int64_t i = 0; i < group; i += 8)
          _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_load_ps(t + i), sc));
      }
    }
}

}  // namespace hadamard_detail
}  // namespace lowbit
