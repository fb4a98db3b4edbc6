// MatMulLowBit kernels for AVX-512 F/BW/VL/DQ + VNNI (layouts: matmul_internal.h).
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsics trip -W(maybe-)uninitialized inside its own headers (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "matmul_internal.h"

namespace lowbit {
namespace matmul_detail {

namespace {

__mmask16 first(int64_t count) {  // the lowest min(count, 16) lanes
  return count >= 16 ? 0xFFFF : count <= 0 ? 0 : static_cast<__mmask16>((1u << count) - 1);
}

__m512i broadcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// The bytes of 16 codes in every lane: 4 (2-bit) or 8 (4-bit, dword i mod 2 in lane i).
template <int BITS>
__m512i broadcast_unit(const uint8_t* p) {
  if constexpr (BITS == 2) {
    return broadcast32(p);
  } else {
    int64_t v;
    std::memcpy(&v, p, 8);
    return _mm512_set1_epi64(v);
  }
}

// ---- accuracy=int8 ----

// One row of A per ops.py: per block amax, q = rint(a · (127 / amax)) — vcvtps2dq rounds to
// nearest even — written over the whole padded block (0 beyond K).
void quantize(const float* a, int64_t K, int64_t bs, int zp_const, const QuantRow& r) {
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += bs, ++b) {
    const int64_t len = std::min(bs, K - k0);
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < len; k += 16)
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(first(len - k), a + k0 + k)));
    const float amax = _mm512_reduce_max_ps(vmax);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < bs; k += 16) {
      const __m512 x = _mm512_maskz_loadu_ps(first(len - k), a + k0 + k);
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(x, inv));
      sum = _mm512_add_epi32(sum, q);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(r.q + k0 + k), _mm512_cvtsepi32_epi8(q));
    }
    const int32_t s = _mm512_reduce_add_epi32(sum);
    r.d[b] = amax / 127.f;
    r.qneg[b] = -s;
    r.init[b] = -zp_const * s;
  }
}

// How a block's zero point enters the integer dot Σ q·(u − zp), u the unsigned VNNI operand:
// Const: −zp·Σq is the same for all rows, the accumulator starts there (QuantRow::init);
// Block: per-row zero points, −zp·Σq by one vpdpwssd of the zero points with −Σq (fits int16);
// Codebook: u = w_int + 128 from the tables, so zp = 128 (Const).
enum class Zp { Const, Block, Codebook };

struct Tables {
  __m512i t[4];
};

// Field J of every byte of chunk x as the unsigned VNNI operand. Uniform: fields 0 and 2 (2-bit;
// 4-bit: 0) are code, fields 1 and 3 (4-bit: 1) are masked in place, code · 2^bits, and go to a
// second accumulator divided by 2^bits at the end of the block: one shift per chunk instead of
// one per field. `high` is x shifted right by 2·bits.
template <int BITS, Zp ZP, int J>
LOWBIT_INLINE __m512i field(__m512i x, __m512i high, const Tables& tab) {
  if constexpr (ZP != Zp::Codebook) {
    return _mm512_and_si512(J / 2 ? high : x, _mm512_set1_epi8(((1 << BITS) - 1) << (BITS * (J % 2))));
  } else if constexpr (BITS == 2) {
    // look-up index within the 128-bit lane of 4 rows, r = row mod 4: even fields (code) index
    // table t[0] at 4r + code, odd fields (masked in place, 4·code) its transpose t[1] at
    // 4·code + r; (field & mask) | r-offset is one ternary op
    const __m512i r4 = _mm512_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404,
                                         0x08080808, 0x0C0C0C0C, 0, 0x04040404, 0x08080808,
                                         0x0C0C0C0C, 0, 0x04040404, 0x08080808, 0x0C0C0C0C);
    const __m512i offset = J % 2 ? _mm512_srli_epi32(r4, 2) : r4;
    const __m512i idx = _mm512_ternarylogic_epi32(J / 2 ? high : x, _mm512_set1_epi8(3 << (2 * (J % 2))),
                                                  offset, 0xEA);
    return _mm512_shuffle_epi8(tab.t[J % 2], idx);
  } else {
    // 4 look-ups, each kept for the rows at position r of their 128-bit lane
    const __m512i idx = _mm512_and_si512(J ? _mm512_srli_epi16(x, 4) : x, _mm512_set1_epi8(15));
    __m512i u = _mm512_shuffle_epi8(tab.t[0], idx);
    u = _mm512_mask_shuffle_epi8(u, 0x00F000F000F000F0ull, tab.t[1], idx);
    u = _mm512_mask_shuffle_epi8(u, 0x0F000F000F000F00ull, tab.t[2], idx);
    return _mm512_mask_shuffle_epi8(u, 0xF000F000F000F000ull, tab.t[3], idx);
  }
}

// The 16 rows' codebook tables at t as the look-ups of `field` read them.
template <int BITS>
LOWBIT_INLINE void load_tables(const uint8_t* t, Tables& tab) {
  if constexpr (BITS == 2) {
    tab.t[0] = _mm512_load_si512(t);
    tab.t[1] = _mm512_shuffle_epi8(tab.t[0], _mm512_broadcast_i32x4(_mm_setr_epi8(
                                                 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)));
  } else {
    for (int r = 0; r < 4; ++r) tab.t[r] = _mm512_load_si512(t + 64 * r);
  }
}

// acc[m] (odd uniform fields: scaled[m]) += Σ over the chunk's fields of field · q[m], 4 columns
// of q broadcast per field.
template <int BITS, int MT, Zp ZP, int... J>
LOWBIT_INLINE void chunk_dot(__m512i x, const Tables& tab, const int8_t* const* q, int64_t col,
                             __m512i* acc, __m512i* scaled, std::integer_sequence<int, J...>) {
  const __m512i high = _mm512_srli_epi16(x, 2 * BITS);
  auto one = [&](auto j) {
    constexpr int kJ = decltype(j)::value;
    const __m512i f = field<BITS, ZP, kJ>(x, high, tab);
    __m512i* to = ZP != Zp::Codebook && kJ % 2 ? scaled : acc;
    for (int m = 0; m < MT; ++m) to[m] = _mm512_dpbusd_epi32(to[m], f, broadcast32(q[m] + col + 4 * kJ));
  };
  (one(std::integral_constant<int, J>{}), ...);
}

// Codes are prefetched this many bytes ahead of the chunk read (64 chunks: half a group's codes at
// 2 bits, block 32). A 4096² 2-bit weight streamed from memory on 2 threads: about 0.58× → 0.50×
// the time of stock MatMulNBits block 32 over 6 interleaved runs each (1024 and 4096 ahead helped
// less; prefetching the scales as well did not help).
constexpr int kPrefetch = 8192;
constexpr std::size_t kPrefetchFrom = std::size_t{1} << 20;

// Rows 16g … 16g + 15 of Y[m] for MT rows of A.
template <int BITS, int MT, Zp ZP>
void group_int8(const MatMulWeight& p, const QuantRow* rows, int64_t g, const float* bias,
                float* const* y_out) {
  const int64_t nb = p.nblocks, chunks = p.chunks(), bs = p.w.block_size;
  const uint8_t* code = p.codes.data() + g * nb * chunks * 64;
  // only a weight larger than L2 is prefetched, and never past its end: a prefetch of an unmapped
  // address costs a page walk, and slowed a small model (the digits CNN) by a quarter
  const uint8_t* prefetch_end = p.codes.size() >= kPrefetchFrom ? p.codes.data() + p.codes.size() - kPrefetch : nullptr;
  const bool half = !p.half_scales.empty(), bytes = !p.byte_scales.empty();
  const float* scale = half || bytes ? nullptr : p.scales.data() + g * nb * kGroup;
  const uint16_t* half_scale = half ? p.half_scales.data() + g * nb * kGroup : nullptr;
  const uint8_t* byte_scale = bytes ? p.byte_scales.data() + g * nb * kGroup : nullptr;
  const __m512 step = bytes ? _mm512_load_ps(p.row_steps.data() + g * kGroup) : _mm512_setzero_ps();
  constexpr int kValues = 1 << BITS;
  const int8_t* q[MT];
  for (int m = 0; m < MT; ++m) q[m] = rows[m].q;
  __m512 y[MT];
  for (int m = 0; m < MT; ++m) y[m] = _mm512_setzero_ps();
  Tables tab;
  // a row's one table serves every block: the group's tables are loaded once
  const bool row_tables = p.w.row_levels;
  if (ZP == Zp::Codebook && row_tables) load_tables<BITS>(p.tables.data() + g * kGroup * kValues, tab);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t gb = g * nb + b;
    __m512i acc[MT], scaled[MT];
    for (int m = 0; m < MT; ++m) scaled[m] = _mm512_setzero_si512();
    if constexpr (ZP == Zp::Block) {
      const __m512i zp = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zp.data() + gb * kGroup)));
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm512_dpwssd_epi32(_mm512_setzero_si512(), zp, _mm512_set1_epi32(rows[m].qneg[b]));
    } else {
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_set1_epi32(rows[m].init[b]);
    }
    if (ZP == Zp::Codebook && !row_tables) load_tables<BITS>(p.tables.data() + gb * kGroup * kValues, tab);
    for (int64_t c = 0; c < chunks; ++c, code += 64) {
      if (code < prefetch_end) _mm_prefetch(reinterpret_cast<const char*>(code) + kPrefetch, _MM_HINT_T0);
      chunk_dot<BITS, MT, ZP>(_mm512_loadu_si512(code), tab, q, b * bs + c * (32 / BITS), acc,
                              scaled, std::make_integer_sequence<int, 8 / BITS>{});
    }
    if constexpr (ZP != Zp::Codebook)
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_add_epi32(acc[m], _mm512_srai_epi32(scaled[m], BITS));
    const __m512 s =
        half    ? _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(half_scale + b * kGroup)))
        : bytes ? _mm512_mul_ps(step, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                          _mm_load_si128(reinterpret_cast<const __m128i*>(byte_scale + b * kGroup)))))
                : _mm512_loadu_ps(scale + b * kGroup);
    for (int m = 0; m < MT; ++m)
      y[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]),
                             _mm512_mul_ps(s, _mm512_set1_ps(rows[m].d[b])), y[m]);
  }
  const int64_t n0 = g * kGroup;
  const __mmask16 valid = first(p.w.N - n0);
  const __m512 add = bias ? _mm512_maskz_loadu_ps(valid, bias + n0) : _mm512_setzero_ps();
  for (int m = 0; m < MT; ++m)
    _mm512_mask_storeu_ps(y_out[m] + n0, valid, _mm512_add_ps(y[m], add));
}

using GroupFn = void (*)(const MatMulWeight&, const QuantRow*, int64_t, const float*, float* const*);

template <int BITS, Zp ZP>
GroupFn group_fn(int mt) {
  switch (mt) {
    case 4: return group_int8<BITS, 4, ZP>;
    case 2: return group_int8<BITS, 2, ZP>;
    default: return group_int8<BITS, 1, ZP>;
  }
}

template <int BITS>
GroupFn group_fn(const MatMulWeight& p, int mt) {
  if (p.w.format == Format::Codebook) return group_fn<BITS, Zp::Codebook>(mt);
  return p.zp.empty() ? group_fn<BITS, Zp::Const>(mt) : group_fn<BITS, Zp::Block>(mt);
}

void matmul_int8(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                 const ParallelFor& parallel) {
  const LowBitWeight& w = p.w;
  const QuantRow* rows = act_buffers().quant_rows(M, p.padded_k(), p.nblocks);
  for (int64_t m = 0; m < M; ++m) quantize(A + m * w.K, w.K, w.block_size, p.zp_const, rows[m]);
  for_ranges(p.groups, parallel, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)  // a group's weights stay in cache for all rows of A
      for (int64_t m = 0; m < M;) {
        const int mt = tile(M - m, 4);
        float* y[4];
        for (int i = 0; i < mt; ++i) y[i] = Y + (m + i) * w.N;
        (w.bits == 2 ? group_fn<2>(p, mt) : group_fn<4>(p, mt))(p, rows + m, g, bias, y);
        m += mt;
      }
  });
}

// ---- accuracy=float: the op's layout ----
// Row n's block b: a broadcast 4 (2-bit) or 8 (4-bit) bytes of codes, shifted per lane so lane i's
// low 4 bits start with its code, index a 16-entry table of the block's decoded values
// (code − zp)·scale or level·scale (2-bit: the 4 values repeated, so the next code's bits above
// do not matter). 2-bit lane i is column i of the 16; 4-bit lanes take dword i mod 2 shifted by
// 4·(i / 2), column 8·(i mod 2) + i / 2: A is permuted to match (prepare_permuted).

void prepare_permuted(const float* a, int64_t K, int bits, float* out) {
  if (bits == 2) {
    std::memcpy(out, a, K * sizeof(float));
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t base = k & ~int64_t{15}, col = k - base;
    out[base + 2 * (col % 8) + col / 8] = a[k];
  }
}

template <int BITS, bool CODEBOOK, bool ZP>
__m512 decode_table(const LowBitWeight& w, int64_t nbi) {
  const __m512 s = _mm512_set1_ps(w.scales[nbi]);
  if constexpr (CODEBOOK) {
    if constexpr (BITS == 2) return _mm512_mul_ps(_mm512_broadcast_f32x4(_mm_loadu_ps(w.level_table(nbi))), s);
    return _mm512_mul_ps(_mm512_loadu_ps(w.level_table(nbi)), s);
  }
  const __m512i code = _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32((1 << BITS) - 1));
  const int zp = ZP ? w.zero_points[nbi] : 1 << (BITS - 1);
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(code, _mm512_set1_epi32(zp))), s);
}

// Y[m][n … n + 3] for MT rows of A (rows past N repeat the last one and are not stored).
template <int BITS, int MT, bool CODEBOOK, bool ZP>
void rows_float(const LowBitWeight& w, int64_t nb, const float* const* a, int64_t n,
                   const float* bias, float* const* y_out) {
  constexpr int R = 4, kUnit = 16 * BITS / 8;  // rows, bytes of 16 codes
  const int64_t bs = w.block_size, block_bytes = bs * BITS / 8;
  const __m512i shift = BITS == 2 ? _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
                                  : _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  int64_t row[R];
  for (int r = 0; r < R; ++r) row[r] = std::min(n + r, w.N - 1);
  __m512 acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 table[R];
    const uint8_t* code[R];
    for (int r = 0; r < R; ++r) {
      table[r] = decode_table<BITS, CODEBOOK, ZP>(w, row[r] * nb + b);
      code[r] = w.packed + (row[r] * nb + b) * block_bytes;
    }
    for (int64_t u = 0; u < bs / 16; ++u) {
      __m512 x[MT];
      for (int m = 0; m < MT; ++m) x[m] = _mm512_loadu_ps(a[m] + b * bs + 16 * u);
      for (int r = 0; r < R; ++r) {
        const __m512i c = broadcast_unit<BITS>(code[r] + kUnit * u);
        const __m512 wv = _mm512_permutexvar_ps(_mm512_srlv_epi32(c, shift), table[r]);
        for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_fmadd_ps(wv, x[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R && n + r < w.N; ++r)
    for (int m = 0; m < MT; ++m)
      y_out[m][n + r] = _mm512_reduce_add_ps(acc[r][m]) + (bias ? bias[n + r] : 0.f);
}

using RowsFn = void (*)(const LowBitWeight&, int64_t, const float* const*, int64_t, const float*,
                        float* const*);

template <int BITS, bool CODEBOOK, bool ZP>
RowsFn rows_fn(int mt) {
  switch (mt) {
    case 4: return rows_float<BITS, 4, CODEBOOK, ZP>;
    case 2: return rows_float<BITS, 2, CODEBOOK, ZP>;
    default: return rows_float<BITS, 1, CODEBOOK, ZP>;
  }
}

template <int BITS>
RowsFn rows_fn(const LowBitWeight& w, int mt) {
  if (w.format == Format::Codebook) return rows_fn<BITS, true, false>(mt);
  return w.zero_points ? rows_fn<BITS, false, true>(mt) : rows_fn<BITS, false, false>(mt);
}

void matmul_float(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                  const ParallelFor& parallel) {
  const LowBitWeight& w = p.w;
  const int64_t Kp = p.padded_k();
  float* a = act_buffers().float_rows(M, Kp);
  for (int64_t m = 0; m < M; ++m) prepare_permuted(A + m * w.K, w.K, w.bits, a + m * Kp);
  for_ranges((w.N + 3) / 4, parallel, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      for (int64_t m = 0; m < M;) {
        const int mt = tile(M - m, 4);
        const float* am[4];
        float* y[4];
        for (int i = 0; i < mt; ++i) {
          am[i] = a + (m + i) * Kp;
          y[i] = Y + (m + i) * w.N;
        }
        (w.bits == 2 ? rows_fn<2>(w, mt) : rows_fn<4>(w, mt))(w, p.nblocks, am, 4 * q, bias, y);
        m += mt;
      }
  });
}

}  // namespace

void matmul_avx512(const MatMulWeight& p, const float* A, int64_t M, const float* bias, float* Y,
                   const ParallelFor& parallel) {
  if (p.accuracy == Accuracy::Int8)
    matmul_int8(p, A, M, bias, Y, parallel);
  else
    matmul_float(p, A, M, bias, Y, parallel);
}

}  // namespace matmul_detail
}  // namespace lowbit
