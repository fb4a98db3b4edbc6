// MatMulLowBit kernels for AVX2 + FMA (layouts: matmul_internal.h). A 16-row group of the int8
// layout is two halves of 8 rows (32 bytes of each chunk), taken one after the other.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "matmul_internal.h"

namespace lowbit {
namespace matmul_detail {

namespace {

__m256i broadcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

__m256i first8(int64_t count) {  // all-ones in the lowest min(count, 8) lanes
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(count, 0, 8))), lane);
}

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// ---- accuracy=int8 ----

// One row of A per ops.py (vcvtps2dq rounds to nearest even), over the whole padded block.
void quantize(const float* a, int64_t K, int64_t bs, int zp_const, const QuantRow& r) {
  const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += bs, ++b) {
    const int64_t len = std::min(bs, K - k0);
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t k = 0; k < len; k += 8)
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(abs, _mm256_maskload_ps(a + k0 + k, first8(len - k))));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t k = 0; k < bs; k += 16) {
      const __m256i q0 = _mm256_cvtps_epi32(
          _mm256_mul_ps(_mm256_maskload_ps(a + k0 + k, first8(len - k)), inv));
      const __m256i q1 = _mm256_cvtps_epi32(
          _mm256_mul_ps(_mm256_maskload_ps(a + k0 + k + 8, first8(len - k - 8)), inv));
      sum = _mm256_add_epi32(sum, _mm256_add_epi32(q0, q1));
      const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(r.q + k0 + k),
                       _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
    }
    const int32_t s = hsum(sum);
    r.d[b] = amax / 127.f;
    r.qneg[b] = -s;
    r.init[b] = -zp_const * s;
  }
}

// Zero points as in matmul_avx512.cc; the codebook tables' w_int + 128 are turned back into
// w_int (xor 0x80) and multiplied as |q| · (w_int · sign q): vpmaddubsw's pair sums stay below
// 2·127·127, no saturation, and no correction is needed.
enum class Zp { Const, Block, Codebook };

struct Tables {
  __m256i t[4];
};

template <int BITS, int J>
LOWBIT_INLINE __m256i field(__m256i x) {
  return _mm256_and_si256(J ? _mm256_srli_epi16(x, J * BITS) : x, _mm256_set1_epi8((1 << BITS) - 1));
}

// Σ_fields Σ_4 columns q · w of chunk half x as int32 lanes (8 rows).
template <int BITS, Zp ZP, int... J>
LOWBIT_INLINE __m256i chunk_dot(__m256i x, const Tables& tab, const int8_t* q, std::integer_sequence<int, J...>) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (ZP != Zp::Codebook) {
    // codes ≤ 15, |q| ≤ 127: at most 2·(8 / BITS)·15·127 < 2^15 per int16 lane
    __m256i sum16 = _mm256_setzero_si256();
    ((sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(field<BITS, J>(x), broadcast32(q + 4 * J)))), ...);
    return _mm256_madd_epi16(sum16, ones);
  } else {
    __m256i sum = _mm256_setzero_si256();
    auto one = [&](auto j) {
      constexpr int kJ = decltype(j)::value;
      const __m256i v = field<BITS, kJ>(x);
      __m256i w;
      if constexpr (BITS == 2) {
        const __m256i offset = _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0,
                                                 0x04040404, 0x08080808, 0x0C0C0C0C);
        w = _mm256_shuffle_epi8(tab.t[0], _mm256_or_si256(v, offset));
      } else {
        const __m256i row = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3);
        w = _mm256_shuffle_epi8(tab.t[0], v);
        for (int r = 1; r < 4; ++r)
          w = _mm256_blendv_epi8(w, _mm256_shuffle_epi8(tab.t[r], v),
                                 _mm256_cmpeq_epi32(row, _mm256_set1_epi32(r)));
      }
      const __m256i qb = broadcast32(q + 4 * kJ);
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(
                                      _mm256_maddubs_epi16(_mm256_abs_epi8(qb), _mm256_sign_epi8(w, qb)), ones));
    };
    (one(std::integral_constant<int, J>{}), ...);
    return sum;
  }
}

// Rows 16g + 8h … 16g + 8h + 7 of Y[m] for MT rows of A.
template <int BITS, int MT, Zp ZP>
void half_int8(const MatMulWeight& p, const QuantRow* rows, int64_t g, int h, const float* bias,
               float* const* y_out) {
  const int64_t nb = p.nblocks, chunks = p.chunks(), bs = p.w.block_size;
  constexpr int kValues = 1 << BITS;
  const uint8_t* code = p.codes.data() + g * nb * chunks * 64 + 32 * h;
  __m256 y[MT];
  for (int m = 0; m < MT; ++m) y[m] = _mm256_setzero_ps();
  Tables tab;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t gb = g * nb + b;
    __m256i acc[MT];
    if constexpr (ZP == Zp::Block) {
      const __m256i zp = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.zp.data() + gb * kGroup + 8 * h)));
      for (int m = 0; m < MT; ++m) acc[m] = _mm256_madd_epi16(zp, _mm256_set1_epi32(rows[m].qneg[b]));
    } else {
      for (int m = 0; m < MT; ++m) acc[m] = _mm256_set1_epi32(rows[m].init[b]);
    }
    if constexpr (ZP == Zp::Codebook)
      for (int r = 0; r < kValues / 4; ++r)
        tab.t[r] = _mm256_xor_si256(_mm256_set1_epi8(-128), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                        p.tables.data() + (p.w.row_levels ? g : gb) * kGroup * kValues + 64 * r + 32 * h)));
    for (int64_t c = 0; c < chunks; ++c, code += 64) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(code));
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm256_add_epi32(acc[m], chunk_dot<BITS, ZP>(x, tab, rows[m].q + b * bs + c * (32 / BITS),
                                                              std::make_integer_sequence<int, 8 / BITS>{}));
    }
    const __m256 s = _mm256_loadu_ps(p.scales.data() + gb * kGroup + 8 * h);
    for (int m = 0; m < MT; ++m)
      y[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_mul_ps(s, _mm256_set1_ps(rows[m].d[b])), y[m]);
  }
  const int64_t n0 = g * kGroup + 8 * h;
  const __m256i valid = first8(p.w.N - n0);
  const __m256 add = bias ? _mm256_maskload_ps(bias + n0, valid) : _mm256_setzero_ps();
  for (int m = 0; m < MT; ++m) _mm256_maskstore_ps(y_out[m] + n0, valid, _mm256_add_ps(y[m], add));
}

using HalfFn = void (*)(const MatMulWeight&, const QuantRow*, int64_t, int, const float*, float* const*);

template <int BITS, Zp ZP>
HalfFn half_fn(int mt) {
  switch (mt) {
    case 4: return half_int8<BITS, 4, ZP>;
    case 2: return half_int8<BITS, 2, ZP>;
    default: return half_int8<BITS, 1, ZP>;
  }
}

template <int BITS>
HalfFn half_fn(const MatMulWeight& p, int mt) {
  if (p.w.format == Format::Codebook) return half_fn<BITS, Zp::Codebook>(mt);
  return p.zp.empty() ? half_fn<BITS, Zp::Const>(mt) : half_fn<BITS, Zp::Block>(mt);
}

void matmul_int8(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                 const ParallelFor& parallel) {
  const LowBitWeight& w = p.w;
  const int zp_const = w.format == Format::Codebook ? 0 : p.zp_const;
  const QuantRow* rows = act_buffers().quant_rows(M, p.padded_k(), p.nblocks);
  for (int64_t m = 0; m < M; ++m) quantize(A + m * w.K, w.K, w.block_size, zp_const, rows[m]);
  for_ranges(p.groups, parallel, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)  // a group's weights stay in cache for all rows of A
      for (int h = 0; h < 2 && g * kGroup + 8 * h < w.N; ++h)
        for (int64_t m = 0; m < M;) {
          const int mt = tile(M - m, 4);
          float* y[4];
          for (int i = 0; i < mt; ++i) y[i] = Y + (m + i) * w.N;
          (w.bits == 2 ? half_fn<2>(p, mt) : half_fn<4>(p, mt))(p, rows + m, g, h, bias, y);
          m += mt;
        }
  });
}

// ---- accuracy=float ----
// As matmul_avx512.cc with 8 lanes: a broadcast dword of codes shifted per lane indexes a table
// of decoded values. 2-bit: 16 columns per dword, two vectors, the 4 values repeated twice;
// 4-bit: 8 columns, 16 values in two halves chosen by the code's bit 3. A keeps its order.

template <int BITS, bool CODEBOOK, bool ZP>
void decode_tables(const LowBitWeight& w, int64_t nb, int64_t n, int64_t b, __m256* t) {
  const int64_t nbi = n * nb + b;
  const __m256 s = _mm256_set1_ps(w.scales[nbi]);
  if constexpr (CODEBOOK) {
    if constexpr (BITS == 2) {
      t[0] = _mm256_mul_ps(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(w.level_table(nbi))), s);
    } else {
      t[0] = _mm256_mul_ps(_mm256_loadu_ps(w.level_table(nbi)), s);
      t[1] = _mm256_mul_ps(_mm256_loadu_ps(w.level_table(nbi) + 8), s);
    }
  } else {
    const int zp = ZP ? w.zero_points[nbi] : 1 << (BITS - 1);
    const __m256i code = _mm256_and_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32((1 << BITS) - 1));
    const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(code, _mm256_set1_epi32(zp)));
    t[0] = _mm256_mul_ps(v, s);
    if constexpr (BITS == 4) t[1] = _mm256_mul_ps(_mm256_add_ps(v, _mm256_set1_ps(8.f)), s);
  }
}

// Y[0][n … n + 3] (rows past N repeat the last one and are not stored).
template <int BITS, bool CODEBOOK, bool ZP>
void rows_float(const LowBitWeight& w, int64_t nb, const float* a, int64_t n, const float* bias, float* y) {
  constexpr int R = 4;
  const int64_t bs = w.block_size, block_bytes = bs * BITS / 8;
  int64_t row[R];
  for (int r = 0; r < R; ++r) row[r] = std::min(n + r, w.N - 1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 table[R][2];
    const uint8_t* code[R];
    for (int r = 0; r < R; ++r) {
      decode_tables<BITS, CODEBOOK, ZP>(w, nb, row[r], b, table[r]);
      code[r] = w.packed + (row[r] * nb + b) * block_bytes;
    }
    const float* ab = a + b * bs;
    for (int64_t u = 0; u < block_bytes / 4; ++u) {
      for (int r = 0; r < R; ++r) {
        const __m256i c = broadcast32(code[r] + 4 * u);
        if constexpr (BITS == 2) {
          const __m256i lo = _mm256_srlv_epi32(c, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
          const __m256i hi = _mm256_srlv_epi32(c, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30));
          acc[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(table[r][0], lo), _mm256_loadu_ps(ab + 16 * u), acc[r]);
          acc[r] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(table[r][0], hi), _mm256_loadu_ps(ab + 16 * u + 8), acc[r]);
        } else {
          const __m256i idx = _mm256_srlv_epi32(c, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
          const __m256 wv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(table[r][0], idx),
                                             _mm256_permutevar8x32_ps(table[r][1], idx),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
          acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(ab + 8 * u), acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R && n + r < w.N; ++r) y[n + r] = hsum(acc[r]) + (bias ? bias[n + r] : 0.f);
}

using RowsFn = void (*)(const LowBitWeight&, int64_t, const float*, int64_t, const float*, float*);

template <int BITS>
RowsFn rows_fn(const LowBitWeight& w) {
  if (w.format == Format::Codebook) return rows_float<BITS, true, false>;
  return w.zero_points ? rows_float<BITS, false, true> : rows_float<BITS, false, false>;
}

void matmul_float(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                  const ParallelFor& parallel) {
  const LowBitWeight& w = p.w;
  const int64_t Kp = p.padded_k();
  float* a = act_buffers().float_rows(M, Kp);
  for (int64_t m = 0; m < M; ++m) std::memcpy(a + m * Kp, A + m * w.K, w.K * sizeof(float));
  const RowsFn fn = w.bits == 2 ? rows_fn<2>(w) : rows_fn<4>(w);
  for_ranges((w.N + 3) / 4, parallel, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      for (int64_t m = 0; m < M; ++m) fn(w, p.nblocks, a + m * Kp, 4 * q, bias, Y + m * w.N);
  });
}

}  // namespace

void matmul_avx2(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                 const ParallelFor& parallel) {
  if (p.accuracy == Accuracy::Int8)
    matmul_int8(p, A, M, bias, Y, parallel);
  else
    matmul_float(p, A, M, bias, Y, parallel);
}

}  // namespace matmul_detail
}  // namespace lowbit
