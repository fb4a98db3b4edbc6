// MatMulLowBit internals shared by matmul.cc, its per-ISA translation units and the self-test.
//
// accuracy=float reads the op's arrays as they are: one row of W at a time, a block's 2^bits
// decoded values Ŵ = (code − zp)·scale or level·scale in a register table, 16 columns per table
// look-up and FMA. Nothing is prepacked.
//
// accuracy=int8 on x86 re-lays the codes so that one VNNI dot product serves 16 rows: rows are
// taken in groups of 16 (the last group padded with code 0 and scale 0), and a group's block is
// chunks of 64 bytes, one int32 lane per row:
//   chunk c of block b, lane i (row 16g + i), byte t, bit field j (bits j·bits … j·bits + bits − 1)
//     = code of column b·block_size + c·(32 / bits) + 4j + t
// so field j of every byte of a chunk, pulled out with a shift and a mask, multiplies the
// 4 consecutive quantized activations q[… + 4j, … + 4j + 3] broadcast to all rows. Beside the
// codes, per group and block: the 16 rows' scales (codebook: × lmax / 127), zero points (only when
// the op has them) and, for a codebook, the 16 rows' int8 tables (stored + 128 as uint8, below).
// The scalar path keeps the op's own layout.
//
// On aarch64 (matmul_neon.h) the codes stay in the op's layout: a kernel reads 16 columns of a
// row at a time (8 bytes of 4-bit codes, 4 bytes of 2-bit), spreads them over a 128-bit register
// with one load-and-duplicate, a shift per lane and a mask, so that lane L holds the code of
// column perm(L) of the 16 (4-bit: L < 8 → 2L, else 2(L − 8) + 1; 2-bit: 4·(L mod 4) + L / 4);
// the int8 kernels, when a block has 16 bytes or more, read 16 bytes at a time instead (32 or 64
// columns; field j of byte i, column (8/bits)·i + j, into lane i of vector j). The activations
// are permuted the same way once per call, so lanes line up without any shuffle of the codes.
// accuracy=int8 prepacks only per-block metadata: `scales` and `zp` in the 16-row
// group layout above (scale·lmax/127 for a codebook; padded rows 0) and, for a codebook, the int8
// tables in `scalar_tables` [N, blocks, 2^bits].
#pragma once

#include <cstdint>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernels.h"

// The per-chunk helpers must inline into their loops, where the accumulators live in registers.
#if defined(__GNUC__)
#define LOWBIT_INLINE inline __attribute__((always_inline))
#else
#define LOWBIT_INLINE inline
#endif

namespace lowbit {
namespace matmul_detail {

constexpr int kGroup = 16;  // rows per interleaved group

// Storage aligned to 64 bytes, so that a chunk or a group's 16 scales is one cache line. On Linux,
// arrays of 2 MB and more are mapped on their own, 2 MB-aligned, and asked to be backed by huge
// pages before their first touch (a weight streamed once per call then costs a few TLB misses
// instead of one per 4 KB). They do not come from the allocator: glibc serves such requests from
// its heap once its mmap threshold has grown, in pages already faulted as 4 KB ones, and then no
// huge page backs them (seen: AnonHugePages 0 kB for a 4 MB weight, cold 4096² 2-bit calls at
// 17 GB/s; a fresh mapping streams at the machine's 25-28 GB/s).
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  static constexpr std::size_t kHuge = std::size_t{2} << 20;
#if defined(__linux__)
  static std::size_t mapped(std::size_t bytes) { return (bytes + kHuge - 1) & ~(kHuge - 1); }
  T* allocate(std::size_t n) {
    const std::size_t bytes = n * sizeof(T);
    if (bytes < kHuge) return static_cast<T*>(::operator new(bytes, std::align_val_t{64}));
    const std::size_t size = mapped(bytes);
    void* raw = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    char* base = static_cast<char*>(raw);
    char* p = reinterpret_cast<char*>((reinterpret_cast<std::uintptr_t>(base) + kHuge - 1) & ~(kHuge - 1));
    if (p > base) munmap(base, static_cast<std::size_t>(p - base));  // the slack before and after
    if (base + kHuge > p) munmap(p + size, static_cast<std::size_t>(base + kHuge - p));
    madvise(p, size, MADV_HUGEPAGE);
    return reinterpret_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) {
    const std::size_t bytes = n * sizeof(T);
    if (bytes < kHuge)
      ::operator delete(p, std::align_val_t{64});
    else
      munmap(p, mapped(bytes));
  }
#else
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
#endif
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, Aligned64<T>>;

struct MatMulWeight final : PackedWeight {
  LowBitWeight w;
  Accuracy accuracy = Accuracy::Float;
  Isa isa = Isa::Scalar;  // the kernels this was packed for
  int64_t nblocks = 0, groups = 0;

  // int8 accuracy, x86 layout (empty otherwise; NEON uses the scales, zp and zp_const)
  AlignedVector<uint8_t> codes;   // [groups, blocks, chunks, 64]
  AlignedVector<float> scales;    // [groups, blocks, 16]
  // The same scales as IEEE half bits, instead of `scales` (then empty), when the kernels are
  // AVX-512's or NEON's, the format uniform and every scale exactly a half — as the quantizer
  // writes them (quantize's scales=auto): a 4096² 2-bit block-32 weight then streams 5 MB
  // instead of 6 MB on x86; on NEON the scales beside the op's codes shrink from 2 MB to 1 MB.
  AlignedVector<uint16_t> half_scales;
  // Or, when the kernels are AVX-512's or NEON's, the format uniform and a row has more than 4
  // blocks, the scales as a step per row times a byte, instead of both: every scale of row n must
  // be exactly step · q for an integer q in [0, 255] (exact_bytes), as quantize's scales=byte
  // writes them (a step of 11 significant bits, quant.rtn.byte_round). A 4096² 2-bit block-32
  // weight then streams 4.5 MB instead of 5 MB; on NEON its scales take 0.5 MB instead of 1 MB.
  AlignedVector<uint8_t> byte_scales;  // [groups, blocks, 16]
  AlignedVector<float> row_steps;      // [groups, 16]
  AlignedVector<uint8_t> zp;      // [groups, blocks, 16], empty: every zero point is zp_const
  AlignedVector<uint8_t> tables;  // codebook: [groups, blocks, 16 << bits], w_int + 128;
                                  // [groups, 16 << bits] when the levels are one table per row
  int zp_const = 0;             // uniform without zero points: 2^(bits−1); codebook: 128 (NEON: 0)
  // int8 accuracy, scalar and NEON: codebook tables [N, blocks, 2^bits] and scale·lmax/127 [N, blocks]
  std::vector<int8_t> scalar_tables;
  std::vector<float> scalar_scales;

  std::size_t bytes() const override {
    return codes.size() + scales.size() * sizeof(float) + half_scales.size() * sizeof(uint16_t) +
           byte_scales.size() + row_steps.size() * sizeof(float) + zp.size() + tables.size() +
           scalar_tables.size() + scalar_scales.size() * sizeof(float);
  }
  int64_t padded_k() const { return nblocks * w.block_size; }
  int64_t chunks() const { return w.block_size * w.bits / 32; }  // 64-byte chunks per block
};

// The codebook tables, 16 rows of one block. 2-bit: byte 4i + v = row i's value of code v, so a
// 128-bit lane holds the 4 rows whose int32 lanes it also holds and `pshufb` looks codes up by
// index v + 4·(row mod 4). 4-bit: 4 vectors T_r (r = 0 … 3) of 64 bytes, lane L of T_r is row 4L + r's
// 16 values; a look-up is 4 `pshufb`s blended per row. Values are w_int + 128 (1 … 255) so VNNI
// may use them as its unsigned operand; Σ 128·q is taken off with the zero-point correction.

// The IEEE binary16 bits of f in *h when f is exactly a half (no rounding; ±0 included).
bool exact_half(float f, uint16_t* h);

// The scales s[0], s[stride], … (count of them) as step · q[i] exactly, q an integer in [0, 255]
// and step = max / top for the largest top ≤ 255 that fits; false (q, step unspecified) when no
// step fits or a scale is negative or not finite.
bool exact_bytes(const float* s, int64_t count, int64_t stride, float* step, uint8_t* q);

// Packs w for `isa`'s kernels (matmul.cc).
std::unique_ptr<PackedWeight> prepack(const LowBitWeight& w, Accuracy accuracy, Isa isa);

// One row of A quantized for accuracy=int8, shared by all N rows.
struct QuantRow {
  int8_t* q;      // [padded K], 0 beyond K
  float* d;       // [blocks] amax / 127
  int32_t* qneg;  // [blocks] −Σq                  (zero points per block)
  int32_t* init;  // [blocks] −zp_const·Σq          (one zero point for all)
};

// Per-thread buffers for A as the kernels read it, reused across calls: the calling thread fills
// them, the parallel tasks only read them. Defined in matmul.cc, out of line, so that no
// std::vector code is instantiated in the per-ISA translation units: an inline copy compiled
// with AVX-512 flags could be the one the linker keeps for every caller, and crash a CPU
// without AVX-512 on the scalar path.
struct ActBuffers {
  std::vector<int8_t> q;
  std::vector<float> f;
  std::vector<int32_t> sums;
  std::vector<QuantRow> rows;
  // M quantized rows of padded length Kp with nb blocks.
  QuantRow* quant_rows(int64_t M, int64_t Kp, int64_t nb);
  // M rows of `stride` floats, zero-filled.
  float* float_rows(int64_t M, int64_t stride);
};
ActBuffers& act_buffers();  // this thread's

// fn(begin, end) over [0, units) rows or groups of W, in a few contiguous ranges (tasks).
template <class F>
void for_ranges(int64_t units, const ParallelFor& parallel, F&& fn) {
  const int64_t tasks = units < 8 ? units : 8;
  parallel(static_cast<std::size_t>(tasks), [&](std::size_t t) {
    const int64_t i = static_cast<int64_t>(t);
    fn(units * i / tasks, units * (i + 1) / tasks);
  });
}

// Rows of A are taken up to `most` (a power of two) at a time, then halves: e.g. 4, 2, 1.
inline int tile(int64_t rows_left, int most) {
  int t = most;
  while (t > rows_left) t /= 2;
  return t;
}

void matmul_scalar(const MatMulWeight& w, const float* A, int64_t M, const float* bias, float* Y,
                   const ParallelFor& parallel);
#if defined(__x86_64__) || defined(_M_X64)
void matmul_avx2(const MatMulWeight& w, const float* A, int64_t M, const float* bias, float* Y,
                 const ParallelFor& parallel);
void matmul_avx512(const MatMulWeight& w, const float* A, int64_t M, const float* bias, float* Y,
                   const ParallelFor& parallel);
#endif
#if defined(__aarch64__)
// matmul_neon.cc (Advanced SIMD) and matmul_dotprod.cc (ARMv8.2 sdot, int8 accuracy only: float
// accuracy runs matmul_neon's kernel).
void matmul_neon(const MatMulWeight& w, const float* A, int64_t M, const float* bias, float* Y,
                 const ParallelFor& parallel);
void matmul_neon_dotprod(const MatMulWeight& w, const float* A, int64_t M, const float* bias,
                         float* Y, const ParallelFor& parallel);
#endif

}  // namespace matmul_detail
}  // namespace lowbit
