// Hadamard rows for AVX-512: the butterflies of distance 1, 2, 4, 8 inside a zmm (a lane
// permute and an FMA with ±1: lane i becomes x[i ^ h] ± x[i]), the larger distances between
// zmm's of an L1-resident copy of the block, two stages per pass.
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // false positives in GCC 12's AVX-512 headers (PR 105593)
#endif

#include "conv_internal.h"

namespace lowbit {
namespace hadamard_detail {
namespace {

inline __m512 sign(int h) {  // −1 in the lanes with bit h set
  alignas(64) float s[16];
  for (int i = 0; i < 16; ++i) s[i] = (i & h) ? -1.f : 1.f;
  return _mm512_load_ps(s);
}

// v ← H16·v
inline __m512 fwht16(__m512 v, const __m512* sg) {
  v = _mm512_fmadd_ps(v, sg[0], _mm512_permute_ps(v, 0xB1));
  v = _mm512_fmadd_ps(v, sg[1], _mm512_permute_ps(v, 0x4E));
  v = _mm512_fmadd_ps(v, sg[2], _mm512_shuffle_f32x4(v, v, 0xB1));
  return _mm512_fmadd_ps(v, sg[3], _mm512_shuffle_f32x4(v, v, 0x4E));
}

// the stages of distance 16 … group/2 over t[0, group)
void stages(float* t, int64_t group) {
  int64_t h = 16;
  for (; 4 * h <= group; h *= 4)
    for (int64_t i = 0; i < group; i += 4 * h)
      for (int64_t j = i; j < i + h; j += 16) {
        const __m512 a = _mm512_load_ps(t + j), b = _mm512_load_ps(t + j + h);
        const __m512 c = _mm512_load_ps(t + j + 2 * h), d = _mm512_load_ps(t + j + 3 * h);
        const __m512 s0 = _mm512_add_ps(a, b), d0 = _mm512_sub_ps(a, b);
        const __m512 s1 = _mm512_add_ps(c, d), d1 = _mm512_sub_ps(c, d);
        _mm512_store_ps(t + j, _mm512_add_ps(s0, s1));
        _mm512_store_ps(t + j + h, _mm512_add_ps(d0, d1));
        _mm512_store_ps(t + j + 2 * h, _mm512_sub_ps(s0, s1));
        _mm512_store_ps(t + j + 3 * h, _mm512_sub_ps(d0, d1));
      }
  if (h < group)
    for (int64_t j = 0; j < h; j += 16) {
      const __m512 a = _mm512_load_ps(t + j), b = _mm512_load_ps(t + j + h);
      _mm512_store_ps(t + j, _mm512_add_ps(a, b));
      _mm512_store_ps(t + j + h, _mm512_sub_ps(a, b));
    }
}

}  // namespace

void rows_avx512(const float* X, int64_t r0, int64_t r1, int64_t size, int64_t group,
                 const int32_t* perm, float scale, float* Y) {
  if (group < 16) return rows_scalar(X, r0, r1, size, group, perm, scale, Y);
  const __m512 sg[4] = {sign(1), sign(2), sign(4), sign(8)};
  const __m512 sc = _mm512_set1_ps(scale);
  float* t = conv_detail::scratch_of<float>(0, group);  // the block, 64-byte aligned
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < size; g += group) {
      const float* x = X + r * size + g;
      float* y = Y + r * size + g;
      for (int64_t j = 0; j < group; j += 16) _mm512_store_ps(t + j, fwht16(_mm512_loadu_ps(x + j), sg));
      stages(t, group);
      if (perm) {
        for (int64_t i = 0; i < group; i += 16) {
          const __m512i idx = _mm512_loadu_si512(perm + i);
          _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_i32gather_ps(idx, t, 4), sc));
        }
      } else {
        for (int64_t i = 0; i < group; i += 16)
          _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_load_ps(t + i), sc));
      }
    }
}

}  // namespace hadamard_detail
}  // namespace lowbit
