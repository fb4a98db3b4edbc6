// The onnxruntime binding of lowbit's ops (domain "lowbit", version 1): MatMulLowBit, ConvLowBit,
// Hadamard, as specified in runtime/ops.py.
//
// This is the only file that sees onnxruntime's C API. It uses the API table handed to
// RegisterCustomOps (the library is not linked against libonnxruntime), and the V2 kernel entry
// points, which return an OrtStatus*: every error — a bad attribute when the session is created, a
// bad input when it runs, even an exception from a kernel — becomes an onnxruntime error naming the
// node and the attribute or input. No C++ exception crosses into onnxruntime.
//
// Headers: API version 21 (ORT 1.21). At run time the library asks onnxruntime for API
// kRequiredApi, the oldest version that has everything used here (KernelContext_ParallelFor came
// with 1.17), so it also loads into onnxruntime 1.17 … 1.20.
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "kernels.h"

#ifndef LOWBIT_VERSION_STRING
#define LOWBIT_VERSION_STRING "unknown"
#endif

#define LOWBIT_EXPORT extern "C" __attribute__((visibility("default")))

namespace lowbit {
namespace {

constexpr uint32_t kRequiredApi = 17;
const OrtApi* g_api = nullptr;

// An error to report as an OrtStatus; thrown inside this file only, caught at the C boundary.
struct OpError : std::exception {
  OrtErrorCode code;
  std::string message;
  OpError(OrtErrorCode c, std::string m) : code(c), message(std::move(m)) {}
  const char* what() const noexcept override { return message.c_str(); }
};

// Turns a failing onnxruntime call into an OpError (prefixed with what we were doing).
void check(OrtStatus* status, const std::string& context) {
  if (status == nullptr) return;
  std::string message = context + ": " + g_api->GetErrorMessage(status);
  OrtErrorCode code = g_api->GetErrorCode(status);
  g_api->ReleaseStatus(status);
  throw OpError(code, message);
}

// The same with the context built only on failure: these run for every input of every call.
template <class Context>
void check_lazy(OrtStatus* status, const Context& context) {
  if (status != nullptr) check(status, context());
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "another element type";
  }
}

// A tensor input: its element type, shape and data (nullptr data when absent).
struct Tensor {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t elements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  template <typename T>
  const T* as() const { return static_cast<const T*>(data); }
};

// ``label``: the node; ``input``: the input's name or index, for messages.
Tensor describe(const OrtValue* value, const std::string& label, const std::string& input) {
  Tensor t;
  if (value == nullptr) return t;
  const auto who = [&] { return label + ": input " + input; };
  int is_tensor = 0;
  check_lazy(g_api->IsTensor(value, &is_tensor), who);
  if (!is_tensor) throw OpError(ORT_INVALID_ARGUMENT, who() + " is not a tensor");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check_lazy(g_api->GetTensorTypeAndShape(value, &info), who);
  std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> guard(
      info, [](OrtTensorTypeAndShapeInfo* p) { g_api->ReleaseTensorTypeAndShapeInfo(p); });
  check_lazy(g_api->GetTensorElementType(info, &t.type), who);
  size_t rank = 0;
  check_lazy(g_api->GetDimensionsCount(info, &rank), who);
  t.shape.resize(rank);
  if (rank) check_lazy(g_api->GetDimensions(info, t.shape.data(), rank), who);
  void* data = nullptr;
  check_lazy(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data), who);
  t.data = data;
  t.present = true;
  return t;
}

// ---- attributes ----------------------------------------------------------------------------

// Reads attributes of one node at kernel creation; every message starts with the node's label.
class Attributes {
 public:
  Attributes(const OrtKernelInfo* info, std::string label) : info_(info), label_(std::move(label)) {}

  const std::string& label() const { return label_; }

  [[noreturn]] void fail(const std::string& what) const {
    throw OpError(ORT_INVALID_ARGUMENT, label_ + ": " + what);
  }

  bool int64(const char* name, int64_t* out) const {
    return ok(g_api->KernelInfoGetAttribute_int64(info_, name, out));
  }
  int64_t required_int(const char* name) const {
    int64_t v = 0;
    if (!int64(name, &v)) fail(std::string("attribute '") + name + "' (an int) is required");
    return v;
  }
  int64_t optional_int(const char* name, int64_t fallback) const {
    int64_t v = fallback;
    return int64(name, &v) ? v : fallback;
  }
  bool ints(const char* name, std::vector<int64_t>* out) const {
    size_t n = 0;
    if (!ok(g_api->KernelInfoGetAttributeArray_int64(info_, name, nullptr, &n))) return false;
    out->assign(n, 0);
    if (n == 0) return true;
    return ok(g_api->KernelInfoGetAttributeArray_int64(info_, name, out->data(), &n));
  }
  bool string(const char* name, std::string* out) const {
    size_t n = 0;
    if (!ok(g_api->KernelInfoGetAttribute_string(info_, name, nullptr, &n))) return false;
    std::vector<char> buffer(n + 1, '\0');
    if (!ok(g_api->KernelInfoGetAttribute_string(info_, name, buffer.data(), &n))) return false;
    *out = buffer.data();
    return true;
  }
  // A string attribute that must be one of `choices` (default: the first).
  int choice(const char* name, const std::vector<const char*>& choices) const {
    std::string value;
    if (!string(name, &value)) return 0;
    for (size_t i = 0; i < choices.size(); ++i)
      if (value == choices[i]) return static_cast<int>(i);
    std::string allowed;
    for (size_t i = 0; i < choices.size(); ++i) allowed += std::string(i ? ", " : "") + "'" + choices[i] + "'";
    fail(std::string("attribute '") + name + "' is '" + value + "', expected one of " + allowed);
  }
  bool float32(const char* name, float* out) const {
    return ok(g_api->KernelInfoGetAttribute_float(info_, name, out));
  }

 private:
  // true on success; a failed lookup (absent attribute, or one of another type) is "not given"
  static bool ok(OrtStatus* status) {
    if (status == nullptr) return true;
    g_api->ReleaseStatus(status);
    return false;
  }
  const OrtKernelInfo* info_;
  std::string label_;
};

// "MatMulLowBit node 'name'" (or just the op type for an unnamed node).
std::string node_label(const OrtKernelInfo* info, const char* op) {
  std::string label = op;
  size_t n = 0;
  OrtStatus* status = g_api->KernelInfo_GetNodeName(info, nullptr, &n);
  if (status != nullptr) {
    g_api->ReleaseStatus(status);
    return label;
  }
  std::vector<char> buffer(n + 1, '\0');
  status = g_api->KernelInfo_GetNodeName(info, buffer.data(), &n);
  if (status != nullptr) {
    g_api->ReleaseStatus(status);
    return label;
  }
  if (buffer[0] != '\0') label += std::string(" node '") + buffer.data() + "'";
  return label;
}

// The attributes MatMulLowBit and ConvLowBit share, validated against runtime/ops.py.
struct WeightAttributes {
  int64_t K = 0, N = 0, block_size = 32;
  int bits = 4;
  Format format = Format::Uniform;
  Accuracy accuracy = Accuracy::Float;

  explicit WeightAttributes(const Attributes& a) {
    K = a.required_int("K");
    N = a.required_int("N");
    if (K < 1) a.fail("attribute 'K' is " + std::to_string(K) + ", expected an int >= 1");
    if (N < 1) a.fail("attribute 'N' is " + std::to_string(N) + ", expected an int >= 1");
    int64_t b = a.required_int("bits");
    if (b != 2 && b != 4) a.fail("attribute 'bits' is " + std::to_string(b) + ", expected 2 or 4");
    bits = static_cast<int>(b);
    block_size = a.required_int("block_size");
    if (block_size != 16 && block_size != 32 && block_size != 64 && block_size != 128 && block_size != 256)
      a.fail("attribute 'block_size' is " + std::to_string(block_size) + ", expected 16, 32, 64, 128 or 256");
    format = a.choice("format", {"uniform", "codebook"}) == 0 ? Format::Uniform : Format::Codebook;
    accuracy = a.choice("accuracy", {"float", "int8"}) == 0 ? Accuracy::Float : Accuracy::Int8;
  }
  int64_t blocks() const { return (K + block_size - 1) / block_size; }
};

// ---- weights -------------------------------------------------------------------------------

constexpr size_t kW = 1, kScales = 2, kZeroPoints = 3, kLevels = 4, kBias = 5;
constexpr size_t kZ = 6;  // ConvLowBit's residual (a fused Add): a run-time input, never prepacked
// the bits of the weight inputs W, scales, zero_points, levels in an input mask
constexpr unsigned kWeightMask = (1u << kW) | (1u << kScales) | (1u << kZeroPoints) | (1u << kLevels);
const char* const kWeightInputs[] = {"A/X", "W", "scales", "zero_points", "levels", "bias"};

void expect(const std::string& label, const char* input, const Tensor& t, ONNXTensorElementDataType type,
            const std::vector<int64_t>& shape, const char* meaning) {
  if (t.type != type)
    throw OpError(ORT_INVALID_ARGUMENT, label + ": input '" + input + "' is " + type_name(t.type) + ", expected " +
                                            type_name(type));
  if (t.shape != shape)
    throw OpError(ORT_INVALID_ARGUMENT, label + ": input '" + input + "' has shape " + shape_text(t.shape) +
                                            ", expected " + shape_text(shape) + " " + meaning);
}

// Validates W, scales, zero_points, levels (runtime/ops.py) and returns the kernel's view of them.
LowBitWeight weight_view(const std::string& label, const WeightAttributes& at, const Tensor& W, const Tensor& scales,
                         const Tensor& zero_points, const Tensor& levels) {
  const int64_t blocks = at.blocks();
  if (!W.present) throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'W' is required");
  if (!scales.present) throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'scales' is required");
  expect(label, "W", W, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {at.N, blocks, at.block_size * at.bits / 8},
         "(N, ceil(K / block_size), block_size * bits / 8)");
  expect(label, "scales", scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {at.N, blocks}, "(N, ceil(K / block_size))");
  const float* s = scales.as<float>();
  for (int64_t i = 0, n = at.N * blocks; i < n; ++i)
    if (!std::isfinite(s[i]))
      throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'scales' holds a non-finite value (" + std::to_string(s[i]) +
                                              " at row " + std::to_string(i / blocks) + ", block " +
                                              std::to_string(i % blocks) + ")");
  LowBitWeight w;
  w.packed = W.as<uint8_t>();
  w.scales = s;
  w.N = at.N;
  w.K = at.K;
  w.bits = at.bits;
  w.block_size = at.block_size;
  w.format = at.format;
  if (zero_points.present) {
    if (at.format != Format::Uniform)
      throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'zero_points' is given but format is 'codebook' "
                                                  "(zero points belong to format 'uniform')");
    expect(label, "zero_points", zero_points, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {at.N, blocks},
           "(N, ceil(K / block_size), one byte per block)");
    const uint8_t* z = zero_points.as<uint8_t>();
    const int limit = 1 << at.bits;
    for (int64_t i = 0, n = at.N * blocks; i < n; ++i)
      if (z[i] >= limit)
        throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'zero_points' holds " + std::to_string(z[i]) + " at row " +
                                                std::to_string(i / blocks) + ", block " + std::to_string(i % blocks) +
                                                ", expected a value < 2^bits = " + std::to_string(limit));
    w.zero_points = z;
  }
  if (at.format == Format::Codebook) {
    if (!levels.present)
      throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'levels' is required with format 'codebook'");
    const int64_t count = int64_t{1} << at.bits;
    // one table per block, or one per row ([N, 1, 2^bits]) that every block of the row scales
    w.row_levels = blocks > 1 && levels.shape.size() == 3 && levels.shape[1] == 1;
    const int64_t tables = w.row_levels ? 1 : blocks;
    expect(label, "levels", levels, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {at.N, tables, count},
           "(N, ceil(K / block_size) or 1, 2^bits)");
    const float* l = levels.as<float>();
    for (int64_t i = 0, n = at.N * tables * count; i < n; ++i)
      if (!std::isfinite(l[i]))
        throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'levels' holds a non-finite value at row " +
                                                std::to_string(i / (tables * count)) + ", block " +
                                                std::to_string(i / count % tables));
    w.levels = l;
  } else if (levels.present) {
    throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'levels' is given but format is 'uniform' "
                                                "(levels belong to format 'codebook')");
  }
  return w;
}

const float* bias_view(const std::string& label, const WeightAttributes& at, const Tensor& bias) {
  if (!bias.present) return nullptr;
  expect(label, "bias", bias, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {at.N}, "(N)");
  return bias.as<float>();
}

// The node's input names, to tell an absent optional input ("" or past the end) from a present one.
std::vector<bool> inputs_present(const OrtKernelInfo* info) {
  size_t count = 0;
  check(g_api->KernelInfo_GetInputCount(info, &count), "reading the node's inputs");
  std::vector<bool> present(count, false);
  for (size_t i = 0; i < count; ++i) {
    size_t n = 0;
    OrtStatus* status = g_api->KernelInfo_GetInputName(info, i, nullptr, &n);
    if (status != nullptr) {
      g_api->ReleaseStatus(status);
      continue;
    }
    present[i] = n > 1;  // n counts the terminating NUL
  }
  return present;
}

// A MatMulLowBit or ConvLowBit kernel's weight: prepacked once when every weight input is a
// constant initializer (and valid), else validated and packed on every run.
struct WeightState {
  WeightAttributes attributes;
  std::unique_ptr<PackedWeight> prepacked;
  bool conv = false;

  WeightState(const Attributes& a, const OrtKernelInfo* info, bool is_conv) : attributes(a), conv(is_conv) {
    std::vector<bool> present = inputs_present(info);
    Tensor t[kBias];
    for (size_t i = kW; i <= kLevels; ++i) {
      if (i >= present.size() || !present[i]) continue;
      int is_constant = 0;
      const OrtValue* value = nullptr;
      OrtStatus* status = g_api->KernelInfoGetConstantInput_tensor(info, i, &is_constant, &value);
      if (status != nullptr) {
        g_api->ReleaseStatus(status);
        return;
      }
      if (!is_constant || value == nullptr) return;  // packed per run
      t[i] = describe(value, a.label(), std::string("'") + kWeightInputs[i] + "'");
    }
    try {
      LowBitWeight w = weight_view(a.label(), attributes, t[kW], t[kScales], t[kZeroPoints], t[kLevels]);
      prepacked = conv ? prepack_conv(w, attributes.accuracy) : prepack_matmul(w, attributes.accuracy);
    } catch (const OpError&) {
      // an invalid constant weight is reported when the node runs (runtime/ops.py: inputs fail the run)
    }
  }
};

// ---- threads -------------------------------------------------------------------------------

// lowbit::ParallelFor on onnxruntime's intra-op thread pool, self-scheduled: every work item
// onnxruntime runs claims tasks from one shared counter until none are left. onnxruntime's own
// split (SimpleParallelFor) hands each thread a fixed share of the items, so a pool worker that
// wakes late makes the calling thread wait for the whole of its share; here the calling thread
// takes on whatever a late worker has not claimed yet, and the worker's item, when it finally
// runs, finds nothing left. An exception thrown by a task is caught on its thread, the remaining
// tasks are skipped, and the first exception is rethrown on the calling thread.
ParallelFor ort_parallel_for(const OrtKernelContext* context) {
  return [context](std::size_t n, const std::function<void(std::size_t)>& fn) {
    if (n == 0) return;
    if (n == 1) return fn(0);
    struct Job {
      const std::function<void(std::size_t)>* fn;
      std::size_t n;
      std::atomic<std::size_t> next{0};
      std::mutex mutex;
      std::exception_ptr error;
    } job;
    job.fn = &fn;
    job.n = n;
    auto run = [](void* data, size_t) {
      Job* j = static_cast<Job*>(data);
      for (std::size_t i; (i = j->next.fetch_add(1, std::memory_order_relaxed)) < j->n;) {
        try {
          (*j->fn)(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(j->mutex);
          if (!j->error) j->error = std::current_exception();
          j->next.store(j->n, std::memory_order_relaxed);
        }
      }
    };
    OrtStatus* status = g_api->KernelContext_ParallelFor(context, run, n, 0, &job);
    if (status != nullptr) {  // no thread pool to use: run serially
      g_api->ReleaseStatus(status);
      run(&job, 0);
    }
    if (job.error) std::rethrow_exception(job.error);
  };
}

// ---- kernels -------------------------------------------------------------------------------

struct Kernel {
  std::string label;
  virtual ~Kernel() = default;
  virtual void compute(OrtKernelContext* context) = 0;
};

// The node's inputs, described; those whose bit is set in ``skip`` are left absent (a prepacked
// weight's inputs, which were read and validated when the kernel was created).
std::vector<Tensor> inputs(OrtKernelContext* context, const std::string& label, size_t expected, unsigned skip = 0) {
  size_t count = 0;
  check_lazy(g_api->KernelContext_GetInputCount(context, &count), [&] { return label + ": reading the inputs"; });
  std::vector<Tensor> out(expected);
  static const std::string names[] = {"0", "1", "2", "3", "4", "5", "6"};
  for (size_t i = 0; i < count && i < expected; ++i) {
    if (skip & (1u << i)) continue;
    const OrtValue* value = nullptr;
    check_lazy(g_api->KernelContext_GetInput(context, i, &value), [&] { return label + ": reading input " + names[i]; });
    out[i] = describe(value, label, names[i]);
  }
  return out;
}

float* output(OrtKernelContext* context, const std::string& label, const std::vector<int64_t>& shape) {
  OrtValue* value = nullptr;
  check_lazy(g_api->KernelContext_GetOutput(context, 0, shape.data(), shape.size(), &value),
             [&] { return label + ": allocating the output " + shape_text(shape); });
  void* data = nullptr;
  check_lazy(g_api->GetTensorMutableData(value, &data), [&] { return label + ": the output"; });
  return static_cast<float*>(data);
}

void expect_float(const std::string& label, const char* input, const Tensor& t) {
  if (!t.present) throw OpError(ORT_INVALID_ARGUMENT, label + ": input '" + input + "' is required");
  if (t.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw OpError(ORT_INVALID_ARGUMENT, label + ": input '" + input + "' is " + type_name(t.type) + ", expected float32");
}

// The weight to run with: the prepacked one, or this run's inputs validated and packed.
const PackedWeight& run_weight(const WeightState& state, const std::string& label, const std::vector<Tensor>& in,
                               std::unique_ptr<PackedWeight>* holder) {
  if (state.prepacked) return *state.prepacked;
  LowBitWeight w = weight_view(label, state.attributes, in[kW], in[kScales], in[kZeroPoints], in[kLevels]);
  *holder = state.conv ? prepack_conv(w, state.attributes.accuracy) : prepack_matmul(w, state.attributes.accuracy);
  return **holder;
}

struct MatMulKernel : Kernel {
  WeightState weight;
  MatMulKernel(const Attributes& a, const OrtKernelInfo* info) : weight(a, info, false) { label = a.label(); }

  void compute(OrtKernelContext* context) override {
    const WeightAttributes& at = weight.attributes;
    std::vector<Tensor> in = inputs(context, label, 6, weight.prepacked ? kWeightMask : 0u);
    const Tensor& A = in[0];
    expect_float(label, "A", A);
    if (A.shape.empty() || A.shape.back() != at.K)
      throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'A' has shape " + shape_text(A.shape) +
                                              ", expected its last dimension to be K = " + std::to_string(at.K));
    std::unique_ptr<PackedWeight> per_run;
    const PackedWeight& packed = run_weight(weight, label, in, &per_run);
    const float* bias = bias_view(label, at, in[kBias]);
    std::vector<int64_t> out_shape(A.shape.begin(), A.shape.end() - 1);
    out_shape.push_back(at.N);
    const int64_t M = A.elements() / at.K;
    float* Y = output(context, label, out_shape);
    if (M == 0) return;
    matmul_lowbit(packed, A.as<float>(), M, bias, Y, ort_parallel_for(context));
  }
};

struct ConvKernel : Kernel {
  WeightState weight;
  int64_t kh = 1, kw = 1, group = 1;
  float clip_min = -std::numeric_limits<float>::infinity(), clip_max = std::numeric_limits<float>::infinity();
  std::vector<int64_t> strides{1, 1}, pads{0, 0, 0, 0}, dilations{1, 1};

  ConvKernel(const Attributes& a, const OrtKernelInfo* info) : weight(a, info, true) {
    label = a.label();
    std::vector<int64_t> kernel_shape;
    if (!a.ints("kernel_shape", &kernel_shape))
      a.fail("attribute 'kernel_shape' ([kh, kw]) is required");
    if (kernel_shape.size() != 2 || kernel_shape[0] < 1 || kernel_shape[1] < 1)
      a.fail("attribute 'kernel_shape' is " + shape_text(kernel_shape) + ", expected [kh, kw] with both >= 1");
    kh = kernel_shape[0];
    kw = kernel_shape[1];
    if (a.ints("strides", &strides) && (strides.size() != 2 || strides[0] < 1 || strides[1] < 1))
      a.fail("attribute 'strides' is " + shape_text(strides) + ", expected [sh, sw] with both >= 1");
    if (a.ints("pads", &pads) &&
        (pads.size() != 4 || pads[0] < 0 || pads[1] < 0 || pads[2] < 0 || pads[3] < 0))
      a.fail("attribute 'pads' is " + shape_text(pads) + ", expected [top, left, bottom, right] with all >= 0");
    if (a.ints("dilations", &dilations) && (dilations.size() != 2 || dilations[0] < 1 || dilations[1] < 1))
      a.fail("attribute 'dilations' is " + shape_text(dilations) + ", expected [dh, dw] with both >= 1");
    group = a.optional_int("group", 1);
    const WeightAttributes& at = weight.attributes;
    if (group < 1) a.fail("attribute 'group' is " + std::to_string(group) + ", expected an int >= 1");
    if (at.N % group != 0)
      a.fail("attribute 'N' = " + std::to_string(at.N) + " is not divisible by 'group' = " + std::to_string(group));
    if (at.K % (kh * kw) != 0)
      a.fail("attribute 'K' = " + std::to_string(at.K) + " is not (C / group) * kh * kw for 'kernel_shape' " +
             shape_text(kernel_shape));
    a.float32("clip_min", &clip_min);
    a.float32("clip_max", &clip_max);
    if (std::isnan(clip_min) || std::isnan(clip_max) || clip_min > clip_max)
      a.fail("attributes 'clip_min' = " + std::to_string(clip_min) + " and 'clip_max' = " + std::to_string(clip_max) +
             " must be numbers with clip_min <= clip_max");
  }

  void compute(OrtKernelContext* context) override {
    const WeightAttributes& at = weight.attributes;
    std::vector<Tensor> in = inputs(context, label, 7, weight.prepacked ? kWeightMask : 0u);
    const Tensor& X = in[0];
    expect_float(label, "X", X);
    if (X.shape.size() != 4)
      throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'X' has shape " + shape_text(X.shape) +
                                              ", expected 4 dimensions [batch, C, H, W]");
    ConvShape s;
    s.batch = X.shape[0];
    s.C = X.shape[1];
    s.H = X.shape[2];
    s.W = X.shape[3];
    const int64_t per_group = at.K / (kh * kw);
    if (s.C != per_group * group)
      throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'X' has " + std::to_string(s.C) + " channels, expected " +
                                              std::to_string(per_group * group) + " (K / (kh * kw) = " +
                                              std::to_string(per_group) + " per group, group = " +
                                              std::to_string(group) + ")");
    s.N = at.N;
    s.kh = kh;
    s.kw = kw;
    s.group = group;
    s.stride_h = strides[0];
    s.stride_w = strides[1];
    s.pad_top = pads[0];
    s.pad_left = pads[1];
    s.pad_bottom = pads[2];
    s.pad_right = pads[3];
    s.dilation_h = dilations[0];
    s.dilation_w = dilations[1];
    const int64_t span_h = s.H + s.pad_top + s.pad_bottom - s.dilation_h * (kh - 1) - 1;
    const int64_t span_w = s.W + s.pad_left + s.pad_right - s.dilation_w * (kw - 1) - 1;
    if (span_h < 0 || span_w < 0)
      throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'X' has spatial size " + std::to_string(s.H) + "x" +
                                              std::to_string(s.W) + ", smaller than the dilated kernel with pads");
    s.OH = span_h / s.stride_h + 1;
    s.OW = span_w / s.stride_w + 1;
    std::unique_ptr<PackedWeight> per_run;
    const PackedWeight& packed = run_weight(weight, label, in, &per_run);
    const float* bias = bias_view(label, at, in[kBias]);
    const std::vector<int64_t> y_shape{s.batch, s.N, s.OH, s.OW};
    const Tensor& Z = in[kZ];
    if (Z.present) expect(label, "Z", Z, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, y_shape, "(Y's shape [B, N, OH, OW])");
    const float* z = Z.present ? Z.as<float>() : nullptr;
    float* Y = output(context, label, y_shape);
    if (s.batch == 0) return;
    // the fused Add and Relu/Clip, applied by the conv's drivers as each output is written
    s.epilogue = {Y, z, clip_min, clip_max};
    conv_lowbit(packed, s, X.as<float>(), bias, Y, ort_parallel_for(context));
  }
};

struct HadamardKernel : Kernel {
  int64_t size = 0, group = 0;
  Order order = Order::Natural;
  float scale = 1.f;

  explicit HadamardKernel(const Attributes& a) {
    label = a.label();
    size = a.required_int("size");
    if (size < 1) a.fail("attribute 'size' is " + std::to_string(size) + ", expected an int >= 1");
    group = a.optional_int("group", size);
    if (group < 1 || (group & (group - 1)) != 0 || size % group != 0)
      a.fail("attribute 'group' is " + std::to_string(group) + ", expected a power of two dividing size = " +
             std::to_string(size));
    order = a.choice("order", {"natural", "sequency"}) == 0 ? Order::Natural : Order::Sequency;
    scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(group)));
    float given = 0.f;
    if (a.float32("scale", &given)) {
      if (!std::isfinite(given)) a.fail("attribute 'scale' is not finite");
      scale = given;
    }
  }

  void compute(OrtKernelContext* context) override {
    std::vector<Tensor> in = inputs(context, label, 1);
    const Tensor& X = in[0];
    expect_float(label, "X", X);
    if (X.shape.empty() || X.shape.back() != size)
      throw OpError(ORT_INVALID_ARGUMENT, label + ": input 'X' has shape " + shape_text(X.shape) +
                                              ", expected its last dimension to be size = " + std::to_string(size));
    float* Y = output(context, label, X.shape);
    const int64_t rows = X.elements() / size;
    if (rows == 0) return;
    hadamard(X.as<float>(), rows, size, group, order, scale, Y, ort_parallel_for(context));
  }
};

// ---- the C boundary ------------------------------------------------------------------------

OrtStatus* to_status(const std::string& label, std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const OpError& e) {
    return g_api->CreateStatus(e.code, e.message.c_str());
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, (label + ": out of memory").c_str());
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, (label + ": internal error: " + e.what()).c_str());
  } catch (...) {
    return g_api->CreateStatus(ORT_FAIL, (label + ": internal error").c_str());
  }
}

enum class OpKind { MatMul, Conv, Hadamard };

// One OrtCustomOp per op type; the callbacks are plain functions reading `kind`.
struct CustomOp : OrtCustomOp {
  OpKind kind;
  const char* name;
  const ONNXTensorElementDataType* input_types;
  size_t input_count;
  size_t required_inputs;
};

const ONNXTensorElementDataType kLowBitTypes[] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
// ConvLowBit: the same, then Z (runtime/ops.py)
const ONNXTensorElementDataType kConvTypes[] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
const ONNXTensorElementDataType kHadamardTypes[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

const CustomOp& self(const OrtCustomOp* op) { return *static_cast<const CustomOp*>(op); }

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  std::string label = self(op).name;
  try {
    label = node_label(info, self(op).name);
    Attributes attributes(info, label);
    switch (self(op).kind) {
      case OpKind::MatMul: *kernel = new MatMulKernel(attributes, info); break;
      case OpKind::Conv: *kernel = new ConvKernel(attributes, info); break;
      case OpKind::Hadamard: *kernel = new HadamardKernel(attributes); break;
    }
    return nullptr;
  } catch (...) {
    *kernel = nullptr;
    return to_status(label, std::current_exception());
  }
}

OrtStatus* ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* context) {
  Kernel* k = static_cast<Kernel*>(kernel);
  try {
    k->compute(context);
    return nullptr;
  } catch (...) {
    return to_status(k->label, std::current_exception());
  }
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

CustomOp make_op(OpKind kind, const char* name, const ONNXTensorElementDataType* types, size_t count,
                 size_t required) {
  CustomOp op;
  std::memset(static_cast<OrtCustomOp*>(&op), 0, sizeof(OrtCustomOp));
  op.version = kRequiredApi;  // onnxruntime reads only the callbacks that exist in this version
  op.kind = kind;
  op.name = name;
  op.input_types = types;
  op.input_count = count;
  op.required_inputs = required;
  op.GetName = [](const OrtCustomOp* o) { return self(o).name; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };  // CPU
  op.GetInputType = [](const OrtCustomOp* o, size_t i) { return self(o).input_types[i]; };
  op.GetInputTypeCount = [](const OrtCustomOp* o) { return self(o).input_count; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetInputCharacteristic = [](const OrtCustomOp* o, size_t i) {
    return i < self(o).required_inputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute_kernel;
  op.KernelDestroy = destroy_kernel;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 1; };
  return op;
}

const CustomOp kOps[] = {
    make_op(OpKind::MatMul, "MatMulLowBit", kLowBitTypes, 6, 3),
    make_op(OpKind::Conv, "ConvLowBit", kConvTypes, 7, 3),
    make_op(OpKind::Hadamard, "Hadamard", kHadamardTypes, 1, 1),
};

// One domain for the whole process, shared by every session that registers the library
// (onnxruntime only reads it; it is never released, like the library itself).
std::mutex g_domain_mutex;
OrtCustomOpDomain* g_domain = nullptr;

}  // namespace
}  // namespace lowbit

LOWBIT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace lowbit;
  const OrtApi* api = api_base->GetApi(kRequiredApi);
  if (api == nullptr) {
    // too old an onnxruntime for this library: find any API version to report it with
    for (uint32_t v = kRequiredApi - 1; v >= 1 && api == nullptr; --v) api = api_base->GetApi(v);
    if (api == nullptr) return nullptr;  // nothing to report an error with; onnxruntime then lacks the ops
    std::string message = std::string("lowbit's op library needs onnxruntime >= 1.17 (C API ") +
                          std::to_string(kRequiredApi) + "), this is onnxruntime " + api_base->GetVersionString();
    return api->CreateStatus(ORT_FAIL, message.c_str());
  }
  g_api = api;
  std::lock_guard<std::mutex> lock(g_domain_mutex);
  if (g_domain == nullptr) {
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* status = api->CreateCustomOpDomain("lowbit", &domain)) return status;
    for (const CustomOp& op : kOps) {
      if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op)) {
        api->ReleaseCustomOpDomain(domain);
        return status;
      }
    }
    g_domain = domain;
  }
  return api->AddCustomOpDomain(options, g_domain);
}

LOWBIT_EXPORT const char* lowbit_isa() { return lowbit::isa(); }

LOWBIT_EXPORT const char* lowbit_version() { return LOWBIT_VERSION_STRING; }
