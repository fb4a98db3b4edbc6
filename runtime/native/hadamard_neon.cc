// Hadamard rows for aarch64 Advanced SIMD (hadamard_avx2.cc's scheme with 4 lanes): the butterflies
// of distance 1 and 2 inside a register (a lane swap and an FMA with ±1: lane i becomes
// x[i ^ h] ± x[i]), the larger distances between registers of an L1-resident copy of the block,
// two stages per pass.
#include <arm_neon.h>

#include "conv_internal.h"

namespace lowbit {
namespace hadamard_detail {
namespace {

// v ← H4·v
inline float32x4_t fwht4(float32x4_t v, float32x4_t s1, float32x4_t s2) {
  v = vfmaq_f32(vrev64q_f32(v), v, s1);      // [x1, x0, x3, x2] ± x
  return vfmaq_f32(vextq_f32(v, v, 2), v, s2);  // [x2, x3, x0, x1] ± x
}

// the stages of distance 4 … group/2 over t[0, group)
void stages(float* t, int64_t group) {
  int64_t h = 4;
  for (; 4 * h <= group; h *= 4)
    for (int64_t i = 0; i < group; i += 4 * h)
      for (int64_t j = i; j < i + h; j += 4) {
        const float32x4_t a = vld1q_f32(t + j), b = vld1q_f32(t + j + h);
        const float32x4_t c = vld1q_f32(t + j + 2 * h), d = vld1q_f32(t + j + 3 * h);
        const float32x4_t s0 = vaddq_f32(a, b), d0 = vsubq_f32(a, b);
        const float32x4_t s1 = vaddq_f32(c, d), d1 = vsubq_f32(c, d);
        vst1q_f32(t + j, vaddq_f32(s0, s1));
        vst1q_f32(t + j + h, vaddq_f32(d0, d1));
        vst1q_f32(t + j + 2 * h, vsubq_f32(s0, s1));
        vst1q_f32(t + j + 3 * h, vsubq_f32(d0, d1));
      }
  if (h < group)
    for (int64_t j = 0; j < h; j += 4) {
      const float32x4_t a = vld1q_f32(t + j), b = vld1q_f32(t + j + h);
      vst1q_f32(t + j, vaddq_f32(a, b));
      vst1q_f32(t + j + h, vsubq_f32(a, b));
    }
}

}  // namespace

void rows_neon(const float* X, int64_t r0, int64_t r1, int64_t size, int64_t group,
               const int32_t* perm, float scale, float* Y) {
  if (group < 4) return rows_scalar(X, r0, r1, size, group, perm, scale, Y);
  const float32x4_t s1 = {1.f, -1.f, 1.f, -1.f}, s2 = {1.f, 1.f, -1.f, -1.f};
  float* t = conv_detail::scratch_of<float>(0, group);  // the block, 64-byte aligned
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < size; g += group) {
      const float* x = X + r * size + g;
      float* y = Y + r * size + g;
      for (int64_t j = 0; j < group; j += 4) vst1q_f32(t + j, fwht4(vld1q_f32(x + j), s1, s2));
      stages(t, group);
      if (perm) {
        for (int64_t i = 0; i < group; ++i) y[i] = t[perm[i]] * scale;
      } else {
        for (int64_t i = 0; i < group; i += 4) vst1q_f32(y + i, vmulq_n_f32(vld1q_f32(t + i), scale));
      }
    }
}

}  // namespace hadamard_detail
}  // namespace lowbit
