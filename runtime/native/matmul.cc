// MatMulLowBit (runtime/ops.py): prepacking, ISA dispatch and the portable scalar path.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "matmul_internal.h"

namespace lowbit {
namespace matmul_detail {

ActBuffers& act_buffers() {
  thread_local ActBuffers buffers;
  return buffers;
}

QuantRow* ActBuffers::quant_rows(int64_t M, int64_t Kp, int64_t nb) {
  q.resize(M * Kp);
  f.resize(M * nb);
  sums.resize(2 * M * nb);
  rows.resize(M);
  for (int64_t m = 0; m < M; ++m)
    rows[m] = {q.data() + m * Kp, f.data() + m * nb, sums.data() + 2 * m * nb, sums.data() + (2 * m + 1) * nb};
  return rows.data();
}

float* ActBuffers::float_rows(int64_t M, int64_t stride) {
  f.assign(M * stride, 0.f);
  return f.data();
}

bool exact_half(float f, uint16_t* h) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u, man = u & 0x7FFFFFu;
  const int exp = static_cast<int>((u >> 23) & 0xFFu) - 127;
  if ((u & 0x7FFFFFFFu) == 0) {
    *h = static_cast<uint16_t>(sign);
    return true;
  }
  if (exp > 15 || exp < -24) return false;  // too large, infinite, NaN, too small or a float subnormal
  if (exp >= -14) {                          // a normal half: 10 of the 23 mantissa bits
    if (man & 0x1FFFu) return false;
    *h = static_cast<uint16_t>(sign | static_cast<uint32_t>(exp + 15) << 10 | man >> 13);
    return true;
  }
  // a subnormal half m·2^−24: the float is (2^23 + man)·2^(exp − 23), so m = (2^23 + man) >> (−1 − exp)
  const uint32_t full = man | 0x800000u, shift = static_cast<uint32_t>(-1 - exp);
  if (full & ((1u << shift) - 1)) return false;
  *h = static_cast<uint16_t>(sign | full >> shift);
  return true;
}

bool exact_bytes(const float* s, int64_t count, int64_t stride, float* step, uint8_t* q) {
  float most = 0.f;
  for (int64_t i = 0; i < count; ++i) {
    const float v = s[i * stride];
    if (!(v >= 0.f && v <= std::numeric_limits<float>::max())) return false;
    most = std::max(most, v);
  }
  // the largest scale is step · top for some top ≤ 255: 255 when the quantizer set the step from
  // this row's scales, less when it set it beforehand (GPTQ); the largest top that fits is taken
  for (int top = 255; top >= 1; --top) {
    *step = most / static_cast<float>(top);
    bool fits = true;
    for (int64_t i = 0; fits && i < count; ++i) {
      const float v = s[i * stride], r = most > 0.f ? std::nearbyint(v / *step) : 0.f;
      fits = r <= 255.f && *step * r == v;
      if (fits) q[i * stride] = static_cast<uint8_t>(r);
    }
    if (fits) return true;  // always at top = 255 when every scale is 0 (step 0, q 0)
  }
  return false;
}

namespace {

int zero_point(const LowBitWeight& w, int64_t nb, int64_t n, int64_t b) {
  return w.zero_points ? w.zero_points[n * nb + b] : 1 << (w.bits - 1);
}

// The codes of block b of row n, one per byte (padding columns included).
void unpack_block(const LowBitWeight& w, int64_t nb, int64_t n, int64_t b, uint8_t* out) {
  const int64_t bytes = w.block_size * w.bits / 8;
  const uint8_t* src = w.packed + (n * nb + b) * bytes;
  const int per_byte = 8 / w.bits, mask = (1 << w.bits) - 1;
  for (int64_t i = 0; i < bytes; ++i)
    for (int j = 0; j < per_byte; ++j) out[i * per_byte + j] = (src[i] >> (j * w.bits)) & mask;
}

// An int8 codebook table: rint(level · 127 / lmax); returns scale · lmax / 127 rounded to a half.
float codebook_table(const float* levels, int count, float scale, int8_t* table) {
  float lmax = 0.f;
  for (int v = 0; v < count; ++v) lmax = std::max(lmax, std::fabs(levels[v]));
  const float inv = lmax > 0.f ? 127.f / lmax : 0.f;
  for (int v = 0; v < count; ++v) table[v] = static_cast<int8_t>(std::nearbyint(levels[v] * inv));
  return round_to_half(scale * (lmax / 127.f));
}

// Half scales (matmul_internal.h) when every one is exactly a half; the padded rows' 0 is one.
void use_half_scales(MatMulWeight& p) {
  AlignedVector<uint16_t> half(p.scales.size());
  for (std::size_t i = 0; i < half.size(); ++i)
    if (!exact_half(p.scales[i], &half[i])) return;
  p.half_scales = std::move(half);
  AlignedVector<float>().swap(p.scales);
}

// Byte scales (matmul_internal.h) when every row's scales are exact multiples of its step (the
// padded rows' 0 scales are: step 0) and a row has more than 4 blocks: a byte a block and a float
// step a row are then fewer bytes than a half a block.
bool use_byte_scales(MatMulWeight& p) {
  if (p.nblocks <= 4) return false;
  AlignedVector<uint8_t> bytes(p.scales.size());
  AlignedVector<float> steps(p.groups * kGroup);
  const int64_t nb = p.nblocks;
  for (int64_t g = 0; g < p.groups; ++g)
    for (int64_t i = 0; i < kGroup; ++i) {
      const int64_t at = g * nb * kGroup + i;
      if (!exact_bytes(p.scales.data() + at, nb, kGroup, &steps[g * kGroup + i], bytes.data() + at)) return false;
    }
  p.byte_scales = std::move(bytes);
  p.row_steps = std::move(steps);
  AlignedVector<float>().swap(p.scales);
  return true;
}

// The scales in the fewest bytes the kernels read: a uniform weight's as bytes when they are
// exact, else (a codebook's too) as halves when they are exact, else as they are.
void use_compact_scales(MatMulWeight& p) {
  if (p.w.format == Format::Codebook || !use_byte_scales(p)) use_half_scales(p);
}

// The x86 int8 layout (matmul_internal.h), one row and block at a time.
void prepack_interleaved(MatMulWeight& p) {
  const LowBitWeight& w = p.w;
  const int64_t nb = p.nblocks, G = p.groups, chunks = p.chunks(), bs = w.block_size;
  const int bits = w.bits, fields = 8 / bits, values = 1 << bits;
  const bool codebook = w.format == Format::Codebook;
  p.codes.assign(G * nb * chunks * 64, 0);
  p.scales.assign(G * nb * kGroup, 0.f);
  if (w.zero_points && !codebook) p.zp.assign(G * nb * kGroup, 0);
  if (codebook) p.tables.assign(G * (w.row_levels ? 1 : nb) * kGroup * values, 128);
  p.zp_const = codebook ? 128 : 1 << (bits - 1);
  std::vector<uint8_t> block(bs);
  int8_t table[16];
  for (int64_t n = 0; n < w.N; ++n) {
    const int64_t g = n / kGroup, i = n % kGroup;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t gb = g * nb + b;
      unpack_block(w, nb, n, b, block.data());
      uint8_t* dst = p.codes.data() + gb * chunks * 64 + 4 * i;
      for (int64_t c = 0; c < chunks; ++c)
        for (int t = 0; t < 4; ++t)
          for (int j = 0; j < fields; ++j)
            dst[c * 64 + t] |= block[c * (32 / bits) + 4 * j + t] << (j * bits);
      float s = w.scales[n * nb + b];
      if (codebook) s = codebook_table(w.level_table(n * nb + b), values, s, table);
      if (codebook && (!w.row_levels || b == 0)) {  // a row's one table: written at its first block
        uint8_t* t = p.tables.data() + (w.row_levels ? g : gb) * kGroup * values;
        for (int v = 0; v < values; ++v) {
          // 2-bit: row-major [16][4]; 4-bit: [r][L][16] with row i = 4L + r
          const int64_t at = bits == 2 ? 4 * i + v : (i % 4) * 64 + (i / 4) * 16 + v;
          t[at] = static_cast<uint8_t>(table[v] + 128);
        }
      }
      p.scales[gb * kGroup + i] = s;
      if (!p.zp.empty()) p.zp[gb * kGroup + i] = w.zero_points[n * nb + b];
    }
  }
  if (p.isa == Isa::Avx512Vnni) use_compact_scales(p);
}

void prepack_scalar_int8(MatMulWeight& p) {
  const LowBitWeight& w = p.w;
  if (w.format != Format::Codebook) return;
  const int values = 1 << w.bits;
  const int64_t count = w.N * p.nblocks;
  p.scalar_tables.resize(count * values);
  p.scalar_scales.resize(count);
  for (int64_t i = 0; i < count; ++i)
    p.scalar_scales[i] = codebook_table(w.level_table(i), values, w.scales[i],
                                        p.scalar_tables.data() + i * values);
}

#if defined(__aarch64__)
// The NEON int8 metadata (matmul_internal.h): scales (codebook: × lmax / 127) and zero points in
// the 16-row group layout, codebook tables in the scalar layout. The codes are not copied.
void prepack_neon_int8(MatMulWeight& p) {
  const LowBitWeight& w = p.w;
  const int64_t nb = p.nblocks, G = p.groups;
  const bool codebook = w.format == Format::Codebook;
  prepack_scalar_int8(p);  // codebook: scalar_tables, scalar_scales
  p.scales.assign(G * nb * kGroup, 0.f);
  if (w.zero_points && !codebook) p.zp.assign(G * nb * kGroup, 0);
  p.zp_const = codebook ? 0 : 1 << (w.bits - 1);
  for (int64_t n = 0; n < w.N; ++n)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = ((n / kGroup) * nb + b) * kGroup + n % kGroup;
      p.scales[at] = codebook ? p.scalar_scales[n * nb + b] : w.scales[n * nb + b];
      if (!p.zp.empty()) p.zp[at] = w.zero_points[n * nb + b];
    }
  use_compact_scales(p);
}
#endif

// ---- scalar kernels (the op's own layout) ----

// y[n0, n1) = a · Ŵᵀ in float: per block, the 2^bits decoded values in a table.
void rows_float(const MatMulWeight& p, const float* a, float* y, int64_t n0, int64_t n1) {
  const LowBitWeight& w = p.w;
  const int64_t nb = p.nblocks, bs = w.block_size;
  const int values = 1 << w.bits;
  std::vector<uint8_t> codes(bs);
  float table[16];
  for (int64_t n = n0; n < n1; ++n) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const float s = w.scales[n * nb + b];
      for (int v = 0; v < values; ++v)
        table[v] = w.format == Format::Codebook
                       ? w.level_table(n * nb + b)[v] * s
                       : static_cast<float>(v - zero_point(w, nb, n, b)) * s;
      unpack_block(w, nb, n, b, codes.data());
      const int64_t len = std::min(bs, w.K - b * bs);
      for (int64_t k = 0; k < len; ++k) acc += a[b * bs + k] * table[codes[k]];
    }
    y[n] = acc;
  }
}

// One row of A per ops.py, written over the whole padded block (q = 0 beyond K); the scalar
// kernel applies the zero points itself (QuantRow::init unused).
void quantize_row(const float* a, int64_t K, int64_t bs, const QuantRow& r) {
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += bs, ++b) {
    const int64_t k1 = std::min(K, k0 + bs);
    float amax = 0.f;
    for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(a[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = k0; k < k0 + bs; ++k) {
      r.q[k] = k < k1 ? static_cast<int8_t>(std::nearbyint(a[k] * inv)) : 0;
      sum += r.q[k];
    }
    r.d[b] = amax / 127.f;
    r.qneg[b] = -sum;
  }
}

// y[n0, n1) = Σ_b d_b · scale · Σ_k q_k · w_int (ops.py, accuracy=int8).
void rows_int8(const MatMulWeight& p, const QuantRow& r, float* y, int64_t n0, int64_t n1) {
  const LowBitWeight& w = p.w;
  const int64_t nb = p.nblocks, bs = w.block_size;
  const int values = 1 << w.bits;
  std::vector<uint8_t> codes(bs);
  for (int64_t n = n0; n < n1; ++n) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      unpack_block(w, nb, n, b, codes.data());
      const int64_t len = std::min(bs, w.K - b * bs);
      const int8_t* q = r.q + b * bs;
      int32_t dot = 0;
      float s;
      if (w.format == Format::Codebook) {
        const int8_t* t = p.scalar_tables.data() + (n * nb + b) * values;
        for (int64_t k = 0; k < len; ++k) dot += q[k] * t[codes[k]];
        s = p.scalar_scales[n * nb + b];
      } else {
        for (int64_t k = 0; k < len; ++k) dot += q[k] * codes[k];
        dot += zero_point(w, nb, n, b) * r.qneg[b];
        s = w.scales[n * nb + b];
      }
      acc += r.d[b] * s * static_cast<float>(dot);
    }
    y[n] = acc;
  }
}

}  // namespace

std::unique_ptr<PackedWeight> prepack(const LowBitWeight& w, Accuracy accuracy, Isa isa) {
  auto p = std::make_unique<MatMulWeight>();
  p->w = w;
  p->accuracy = accuracy;
  p->isa = isa;
  p->nblocks = w.blocks();
  p->groups = (w.N + kGroup - 1) / kGroup;
  if (isa == Isa::Scalar) {
    if (accuracy == Accuracy::Int8) prepack_scalar_int8(*p);
#if defined(__aarch64__)
  } else if (isa == Isa::Neon || isa == Isa::NeonDotprod) {
    if (accuracy == Accuracy::Int8) prepack_neon_int8(*p);
#endif
  } else if (accuracy == Accuracy::Int8) {
    prepack_interleaved(*p);
  }
  return p;
}

void matmul_scalar(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                   const ParallelFor& parallel) {
  const LowBitWeight& w = p.w;
  const QuantRow* rows = nullptr;
  if (p.accuracy == Accuracy::Int8) {
    rows = act_buffers().quant_rows(M, p.padded_k(), p.nblocks);
    for (int64_t m = 0; m < M; ++m) quantize_row(A + m * w.K, w.K, w.block_size, rows[m]);
  }
  for_ranges(w.N, parallel, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      float* y = Y + m * w.N;
      if (p.accuracy == Accuracy::Int8)
        rows_int8(p, rows[m], y, n0, n1);
      else
        rows_float(p, A + m * w.K, y, n0, n1);
      if (bias)
        for (int64_t n = n0; n < n1; ++n) y[n] += bias[n];
    }
  });
}

}  // namespace matmul_detail

std::unique_ptr<PackedWeight> prepack_matmul(const LowBitWeight& w, Accuracy accuracy) {
  return matmul_detail::prepack(w, accuracy, isa_level());
}

void matmul_lowbit(const PackedWeight& pw, const float* A, int64_t M, const float* bias, float* Y,
                   const ParallelFor& parallel) {
  const auto& p = static_cast<const matmul_detail::MatMulWeight&>(pw);
  if (M <= 0) return;
  switch (p.isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::Avx512Vnni: return matmul_detail::matmul_avx512(p, A, M, bias, Y, parallel);
    case Isa::Avx2: return matmul_detail::matmul_avx2(p, A, M, bias, Y, parallel);
#endif
#if defined(__aarch64__)
    case Isa::NeonDotprod: return matmul_detail::matmul_neon_dotprod(p, A, M, bias, Y, parallel);
    case Isa::Neon: return matmul_detail::matmul_neon(p, A, M, bias, Y, parallel);
#endif
    default: return matmul_detail::matmul_scalar(p, A, M, bias, Y, parallel);
  }
}

}  // namespace lowbit
