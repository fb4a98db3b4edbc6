// MatMulLowBit for aarch64 CPUs with the ARMv8.2 dot-product extension (sdot; Cortex-A55/A76 and
// later), compiled with -march=armv8.2-a+dotprod and called only when HWCAP_ASIMDDP says the CPU
// has it. accuracy=int8 is matmul_neon.h's kernel with one sdot per 16 products of each (row of A,
// row of W) pair; accuracy=float has nothing to gain from sdot and runs matmul_neon.cc's kernel.
#include "matmul_neon.h"

namespace lowbit {
namespace matmul_detail {
namespace {

struct DotSdot {
  static LOWBIT_INLINE int32x4_t dot(int32x4_t acc, int8x16_t w, int8x16_t q) { return vdotq_s32(acc, w, q); }
};

}  // namespace

void matmul_neon_dotprod(const MatMulWeight& p, const float* A, int64_t M, const float* bias,
                         float* Y, const ParallelFor& parallel) {
  if (p.accuracy == Accuracy::Int8)
    matmul_int8_neon<DotSdot>(p, A, M, bias, Y, parallel);
  else
    matmul_neon(p, A, M, bias, Y, parallel);
}

}  // namespace matmul_detail
}  // namespace lowbit
