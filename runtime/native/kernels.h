// lowbit's compute kernels: plain C++17, no onnxruntime types. The op schemas (packed layout,
// decoding, int8 accuracy mode, Hadamard order) are defined in runtime/ops.py; these functions
// implement exactly that text. ops.cc validates shapes/attributes before calling them, so the
// kernels may assume consistent arguments.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>

namespace lowbit {

enum class Format { Uniform, Codebook };
enum class Accuracy { Float, Int8 };
enum class Order { Natural, Sequency };

// Runs fn(i) for every i in [0, n), possibly on several threads at once, and returns when all
// are done. ops.cc builds it on onnxruntime's KernelContext_ParallelFor; tests use serial().
using ParallelFor = std::function<void(std::size_t n, const std::function<void(std::size_t)>& fn)>;
ParallelFor serial();

// The instruction set the kernels dispatch to on this CPU (common.cc). LOWBIT_ISA=scalar|avx2|
// avx512vnni in the environment caps it, read once per process (tests run every path).
// AVX-512 here means F+BW+VL+VNNI; AVX2 means AVX2+FMA. Kernels for each ISA live in their own
// translation units compiled with that ISA's flags (CMakeLists.txt) and are only called when
// isa_level() allows. On aarch64 the levels are scalar < neon (Advanced SIMD, every aarch64 CPU)
// < neon-dotprod (ARMv8.2 sdot/udot, HWCAP_ASIMDDP), capped by LOWBIT_ISA=scalar|neon; other
// CPUs get the scalar path.
enum class Isa { Scalar = 0, Avx2 = 1, Avx512Vnni = 2, Neon = 3, NeonDotprod = 4 };
Isa isa_level();
const char* isa();  // "avx512vnni", "avx2", "neon-dotprod", "neon" or "scalar"

// A packed canonical weight W[N, K] as the op inputs hold it (see runtime/ops.py).
struct LowBitWeight {
  const uint8_t* packed = nullptr;       // [N, blocks, block_size * bits / 8]
  const float* scales = nullptr;         // [N, blocks]
  const uint8_t* zero_points = nullptr;  // [N, blocks] or nullptr (-> 2^(bits-1)); uniform only
  const float* levels = nullptr;         // [N, blocks, 2^bits], or [N, 1, 2^bits]; codebook only
  bool row_levels = false;               // levels is [N, 1, 2^bits]: one table per row, every block
  int64_t N = 0, K = 0;
  int bits = 4;
  int64_t block_size = 32;
  Format format = Format::Uniform;
  int64_t blocks() const { return (K + block_size - 1) / block_size; }
  // The 2^bits levels of block i = n·blocks + b.
  const float* level_table(int64_t i) const { return levels + ((row_levels ? i / blocks() : i) << bits); }
};

// x rounded to the nearest float16 value (ties to even) when |x| lies in float16's normal range
// [2^-14, 65504], else x: the effective block scale of an int8 codebook (runtime/ops.py).
float round_to_half(float x);

// The weight re-laid out (or merely referenced) for this CPU's kernels, built once per constant
// weight and reused across runs. It must not keep a decoded float or int8 copy of the whole
// weight: the point of the format is to hold 2/4-bit weights in memory; only per-block
// metadata (e.g. an int8 codebook table, sums of codes) may be added.
class PackedWeight {
 public:
  virtual ~PackedWeight() = default;
  virtual std::size_t bytes() const = 0;  // memory it owns beyond the op inputs
};
// One for MatMulLowBit (matmul.cc), one for ConvLowBit (conv.cc): each kernel family lays out
// what it needs. The LowBitWeight's arrays must outlive the PackedWeight (onnxruntime keeps
// constant inputs alive for the session; ops.cc re-packs non-constant weights on every run).
std::unique_ptr<PackedWeight> prepack_matmul(const LowBitWeight& w, Accuracy accuracy);
std::unique_ptr<PackedWeight> prepack_conv(const LowBitWeight& w, Accuracy accuracy);

// Y[M, N] = A[M, K] · Ŵᵀ (+ bias[N] when bias != nullptr). M may be 0.
void matmul_lowbit(const PackedWeight& w, const float* A, int64_t M, const float* bias, float* Y,
                   const ParallelFor& parallel);

// What ConvLowBit does to each output after the conv and bias (its fused Add and Relu/Clip):
// y = min(max(y + Z[same index], lo), hi), the float32 operations of onnxruntime's Add and Clip.
// Z (of Y's shape) is optional; infinite bounds leave y as it is. The drivers apply it to each
// output once, right after writing it, while it is still in cache.
struct ConvEpilogue {
  const float* Y = nullptr;  // the output Z's indices are relative to
  const float* Z = nullptr;
  float lo = -std::numeric_limits<float>::infinity(), hi = std::numeric_limits<float>::infinity();
  bool active() const {
    return Z != nullptr || lo > -std::numeric_limits<float>::infinity() ||
           hi < std::numeric_limits<float>::infinity();
  }
};

struct ConvShape {
  int64_t batch = 1, C = 0, H = 0, W = 0;     // input
  int64_t N = 0, OH = 0, OW = 0;              // output channels and spatial size
  int64_t kh = 1, kw = 1, group = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  ConvEpilogue epilogue;  // none by default
};

// Y[batch, N, OH, OW] = conv(X[batch, C, H, W], Ŵ reshaped to [N, C/group, kh, kw]) (+ bias),
// then shape.epilogue. w.K == (C / group) * kh * kw.
void conv_lowbit(const PackedWeight& w, const ConvShape& shape, const float* X, const float* bias,
                 float* Y, const ParallelFor& parallel);

// Y[r, :] = scale · blockdiag(H_group)·X[r, :] for r < rows (runtime/ops.py, Hadamard).
// X and Y may alias (in place).
void hadamard(const float* X, int64_t rows, int64_t size, int64_t group, Order order, float scale,
              float* Y, const ParallelFor& parallel);

}  // namespace lowbit
