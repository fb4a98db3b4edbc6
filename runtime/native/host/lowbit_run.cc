// lowbit-run: run an ONNX model on onnxruntime, with lowbit's op library, on the device itself.
//
// The smallest program a device team needs to check a compressed model where it will run: it
// opens the model with onnxruntime's public C++ API (API 21, onnxruntime 1.21), registers
// liblowbit_ops.so with the one call SessionOptions::RegisterCustomOpsLibrary, feeds inputs from
// .npy or raw files, times Session::Run, and writes every output as .npy. It is meant to be read
// and copied into an application: nothing here is specific to lowbit beyond the library's name
// and the message when a model needs it.
//
//   lowbit-run MODEL.onnx [--ops LIB | --no-ops] [--input NAME=FILE]... [--output-dir DIR]
//              [--runs N] [--warmup N] [--threads N] [--json]
//
// A deployment folder holds lowbit-run, libonnxruntime.so.1 and liblowbit_ops.so: the executable
// finds onnxruntime through its RPATH ($ORIGIN) and the op library beside itself (/proc/self/exe).
//
// Exit status: 0 on success; 2 for anything the user caused (a bad option, a missing or malformed
// file, an input of the wrong type/shape/size, a model needing lowbit's ops with no library), with
// one line on stderr naming the file, input or option; 1 when onnxruntime fails otherwise (its
// error text included). Outputs are written only after every run succeeded, each to a temporary
// file renamed into place, so a failure never leaves an output file behind.
#define ORT_API_MANUAL_INIT  // the API table is checked for (and a too old onnxruntime reported) in main
#include <onnxruntime_cxx_api.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "npy.h"

namespace {

constexpr int kUserError = 2;
constexpr int kRuntimeError = 1;
constexpr const char* kLibraryName = "liblowbit_ops.so";
constexpr const char* kDomain = "lowbit";

const char kUsage[] =
    "usage: lowbit-run MODEL.onnx [--ops LIB | --no-ops] [--input NAME=FILE]... [--output-dir DIR]\n"
    "                  [--runs N] [--warmup N] [--threads N] [--json]\n"
    "\n"
    "Runs an ONNX model on onnxruntime (with lowbit's op library) and reports its latency.\n"
    "\n"
    "  --ops LIB          the op library to register (default: liblowbit_ops.so beside lowbit-run, if there)\n"
    "  --no-ops           register no op library\n"
    "  --input NAME=FILE  the value of model input NAME: a .npy file, or raw little-endian bytes (any other\n"
    "                     name) shaped by the model's static dims; every input is needed\n"
    "  --output-dir DIR   write each output to DIR/<name>.npy\n"
    "  --runs N           timed runs (default 10)\n"
    "  --warmup N         untimed runs first (default 1)\n"
    "  --threads N        onnxruntime intra-op threads (default 1)\n"
    "  --json             print one JSON object instead of text\n";

// An error to report and exit with; thrown anywhere below, caught in main.
struct Failure {
  int code;
  std::string message;
};

[[noreturn]] void user_error(const std::string& message) { throw Failure{kUserError, message}; }
[[noreturn]] void runtime_error(const std::string& message) { throw Failure{kRuntimeError, message}; }

// onnxruntime's messages may span lines; the error report is one line.
std::string one_line(const std::string& text) {
  std::string out;
  bool space = false;
  for (char c : text) {
    if (c == '\n' || c == '\r' || c == '\t' || c == ' ') {
      space = !out.empty();
    } else {
      if (space) out += ' ';
      space = false;
      out += c;
    }
  }
  return out;
}

std::string quoted(const std::string& s) { return "'" + s + "'"; }

bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  if (s.size() < suffix.size()) return false;
  for (size_t i = 0; i < suffix.size(); ++i) {
    char c = s[s.size() - suffix.size() + i];
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    if (c != suffix[i]) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// command line

struct InputArg {
  std::string name, file;
};

struct Options {
  std::string model;
  std::string ops;  // explicit --ops
  bool no_ops = false;
  std::vector<InputArg> inputs;
  std::string output_dir;
  long runs = 10, warmup = 1, threads = 1;
  bool json = false;
};

long parse_count(const std::string& option, const std::string& value, long minimum, long maximum) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno != 0 || v < minimum || v > maximum)
    user_error(option + " must be an integer from " + std::to_string(minimum) + " to " + std::to_string(maximum) +
               ", not " + quoted(value));
  return v;
}

Options parse_args(int argc, char** argv) {
  Options o;
  bool have_model = false, have_ops = false;
  std::set<std::string> seen_inputs;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (arg.size() > 1 && arg[0] == '-') {
      std::string name = arg, value;
      bool inline_value = false;
      size_t eq = arg.find('=');
      if (arg.compare(0, 2, "--") == 0 && eq != std::string::npos) {
        name = arg.substr(0, eq);
        value = arg.substr(eq + 1);
        inline_value = true;
      }
      auto take_value = [&]() {
        if (inline_value) return value;
        if (i + 1 >= argc) user_error("option " + name + " needs a value (see lowbit-run --help)");
        return std::string(argv[++i]);
      };
      auto no_value = [&]() {
        if (inline_value) user_error("option " + name + " takes no value");
      };
      if (name == "--ops") {
        if (have_ops) user_error("option --ops is given twice");
        o.ops = take_value();
        if (o.ops.empty()) user_error("option --ops needs a library path");
        have_ops = true;
      } else if (name == "--no-ops") {
        no_value();
        o.no_ops = true;
      } else if (name == "--input") {
        std::string spec = take_value();
        size_t at = spec.find('=');
        if (at == std::string::npos || at == 0 || at + 1 == spec.size())
          user_error("option --input expects NAME=FILE, not " + quoted(spec));
        InputArg in{spec.substr(0, at), spec.substr(at + 1)};
        if (!seen_inputs.insert(in.name).second) user_error("input " + quoted(in.name) + " is given twice (--input)");
        o.inputs.push_back(in);
      } else if (name == "--output-dir") {
        o.output_dir = take_value();
        if (o.output_dir.empty()) user_error("option --output-dir needs a folder");
      } else if (name == "--runs") {
        o.runs = parse_count("--runs", take_value(), 1, 1000000);
      } else if (name == "--warmup") {
        o.warmup = parse_count("--warmup", take_value(), 0, 1000000);
      } else if (name == "--threads") {
        o.threads = parse_count("--threads", take_value(), 1, 4096);
      } else if (name == "--json") {
        no_value();
        o.json = true;
      } else {
        user_error("unknown option " + quoted(name) + " (see lowbit-run --help)");
      }
    } else {
      if (have_model) user_error("only one model can be given, not " + quoted(o.model) + " and " + quoted(arg));
      o.model = arg;
      have_model = true;
    }
  }
  if (!have_model) user_error("no model given (usage: lowbit-run MODEL.onnx [options], see --help)");
  if (have_ops && o.no_ops) user_error("options --ops and --no-ops exclude each other");
  return o;
}

// The folder this executable is in (via /proc/self/exe, so it works whatever the current folder).
std::string executable_dir() {
  std::vector<char> buf(4096);
  ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (n <= 0) return "";
  std::string path(buf.data(), static_cast<size_t>(n));
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

// ---------------------------------------------------------------------------------------------
// element types: onnxruntime's, numpy's descr, size in bytes

struct ElementType {
  ONNXTensorElementDataType onnx;
  const char* name;   // numpy's name, used in messages and the JSON
  const char* descr;  // the .npy descr (little-endian), or nullptr when numpy has none
  size_t size;
};

const ElementType kTypes[] = {
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32", "<f4", 4},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, "float16", "<f2", 2},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE, "float64", "<f8", 8},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, "int64", "<i8", 8},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, "int32", "<i4", 4},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16, "int16", "<i2", 2},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, "int8", "|i1", 1},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64, "uint64", "<u8", 8},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32, "uint32", "<u4", 4},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, "uint16", "<u2", 2},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8", "|u1", 1},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, "bool", "|b1", 1},
    {ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, "bfloat16", nullptr, 2},
};

const ElementType* element_type(ONNXTensorElementDataType t) {
  for (const ElementType& e : kTypes)
    if (e.onnx == t) return &e;
  return nullptr;
}

std::string type_name(ONNXTensorElementDataType t) {
  const ElementType* e = element_type(t);
  return e ? e->name : "onnx element type " + std::to_string(static_cast<int>(t));
}

// A .npy descr in canonical form ('=' and, for 1-byte types, '<'/'>' become what numpy writes).
const ElementType* element_type_of_descr(const std::string& descr) {
  if (descr.size() < 3) return nullptr;
  std::string body = descr.substr(1);
  char order = descr[0];
  for (const ElementType& e : kTypes) {
    if (e.descr == nullptr || body != e.descr + 1) continue;
    if (e.size == 1 ? (order == '|' || order == '<' || order == '>' || order == '=')
                    : (order == '<' || order == '=')) {
      return &e;
    }
  }
  return nullptr;
}

std::string shape_text(const std::vector<int64_t>& shape, const std::vector<std::string>* names = nullptr) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    if (shape[i] >= 0) s += std::to_string(shape[i]);
    else if (names && i < names->size() && !(*names)[i].empty()) s += (*names)[i];
    else s += "?";
  }
  return s + "]";
}

uint64_t element_count(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

// ---------------------------------------------------------------------------------------------
// inputs

struct ModelInput {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<int64_t> dims;         // -1 where dynamic
  std::vector<std::string> symbols;  // the names of dynamic dims, "" when unnamed
  bool is_tensor;
};

uint64_t file_size(std::FILE* f) {
  if (std::fseek(f, 0, SEEK_END) != 0) return UINT64_MAX;
  long size = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  return size < 0 ? UINT64_MAX : static_cast<uint64_t>(size);
}

// Reads `file` into a new tensor for model input `in`: .npy with its own shape, or raw bytes.
Ort::Value load_input(const ModelInput& in, const std::string& file, OrtAllocator* allocator) {
  const std::string what = "input file " + file + " (for input " + quoted(in.name) + ")";
  const ElementType* want = element_type(in.type);
  if (!in.is_tensor || want == nullptr)
    user_error("model input " + quoted(in.name) + " is not a numeric tensor (" +
               (in.is_tensor ? type_name(in.type) : std::string("not a tensor")) + "), which lowbit-run cannot feed");
  std::FILE* f = std::fopen(file.c_str(), "rb");
  if (f == nullptr) user_error(what + " cannot be opened: " + std::strerror(errno));
  struct Closer {
    std::FILE* f;
    ~Closer() { std::fclose(f); }
  } closer{f};
  uint64_t size = file_size(f);
  if (size == UINT64_MAX) user_error(what + " cannot be read (seek failed)");

  std::vector<int64_t> shape;
  uint64_t offset = 0;
  if (ends_with(file, ".npy")) {
    std::string prefix(static_cast<size_t>(std::min<uint64_t>(size, 4096)), '\0');
    if (!prefix.empty() && std::fread(&prefix[0], 1, prefix.size(), f) != prefix.size())
      user_error(what + " cannot be read");
    npy::Header header;
    std::string why;
    size_t needed = 0;
    bool ok = npy::parse_header(prefix, size, header, why, needed);
    if (!ok && needed > prefix.size()) {  // a very long header: read all of it
      size_t have = prefix.size();
      prefix.resize(needed);
      if (std::fread(&prefix[have], 1, needed - have, f) != needed - have) user_error(what + " cannot be read");
      ok = npy::parse_header(prefix, size, header, why, needed);
    }
    if (!ok) user_error(what + " is not a valid .npy file: " + why);
    const ElementType* got = element_type_of_descr(header.descr);
    if (header.descr.size() > 1 && header.descr[0] == '>' && got == nullptr &&
        element_type_of_descr("<" + header.descr.substr(1)) != nullptr)
      user_error(what + " is big-endian (" + quoted(header.descr) + "); save it little-endian, e.g. x.astype('<" +
                 header.descr.substr(1) + "')");
    if (got == nullptr)
      user_error(what + " holds dtype " + quoted(header.descr) + ", which lowbit-run does not read; model input " +
                 quoted(in.name) + " is " + want->name);
    if (got != want)
      user_error(what + " holds " + got->name + " but model input " + quoted(in.name) + " is " + want->name);
    bool fits = header.shape.size() == in.dims.size();
    for (size_t i = 0; fits && i < in.dims.size(); ++i) fits = in.dims[i] < 0 || in.dims[i] == header.shape[i];
    if (!fits)
      user_error(what + " has shape " + shape_text(header.shape) + " but model input " + quoted(in.name) +
                 " is " + shape_text(in.dims, &in.symbols));
    bool more_than_one = false;
    for (int64_t d : header.shape) more_than_one = more_than_one || d > 1;
    if (header.fortran_order && header.shape.size() > 1 && more_than_one)
      user_error(what + " is stored in Fortran order; save a C-ordered array (numpy.ascontiguousarray)");
    uint64_t data = size - header.data_offset, expect = element_count(header.shape) * want->size;
    if (data != expect)
      user_error(what + " holds " + std::to_string(data) + " bytes of data, but its header's shape " +
                 shape_text(header.shape) + " of " + want->name + " needs " + std::to_string(expect));
    shape = header.shape;
    offset = header.data_offset;
  } else {
    for (int64_t d : in.dims)
      if (d < 0)
        user_error("model input " + quoted(in.name) + " has dynamic shape " + shape_text(in.dims, &in.symbols) +
                   ", so raw file " + file + " cannot be shaped; give it as .npy");
    uint64_t expect = element_count(in.dims) * want->size;
    if (size != expect)
      user_error(what + " has " + std::to_string(size) + " bytes but model input " + quoted(in.name) + " (" +
                 shape_text(in.dims) + " " + want->name + ") needs " + std::to_string(expect) +
                 " bytes of raw little-endian data");
    shape = in.dims;
  }

  Ort::Value value = Ort::Value::CreateTensor(allocator, shape.data(), shape.size(), in.type);
  uint64_t bytes = element_count(shape) * want->size;
  if (bytes > 0) {
    if (std::fseek(f, static_cast<long>(offset), SEEK_SET) != 0 ||
        std::fread(value.GetTensorMutableRawData(), 1, static_cast<size_t>(bytes), f) != bytes)
      user_error(what + " cannot be read (short read)");
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// outputs

std::string file_name_for(const std::string& output) {
  std::string s = output;
  for (char& c : s) {
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
              c == '-';
    if (!ok) c = '_';
  }
  if (s.empty() || s == "." || s == "..") s = std::string(s.size(), '_') + "_";
  return s + ".npy";
}

void make_dirs(const std::string& dir) {
  std::string path;
  size_t start = 0;
  while (start <= dir.size()) {
    size_t slash = dir.find('/', start);
    if (slash == std::string::npos) slash = dir.size();
    path = dir.substr(0, slash);
    if (!path.empty() && ::mkdir(path.c_str(), 0777) != 0 && errno != EEXIST)
      user_error("--output-dir " + dir + " cannot be created: " + std::strerror(errno));
    start = slash + 1;
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) user_error("--output-dir " + dir + " is not a folder");
}

struct PendingFile {
  std::string temp, final_path;
};

// Writes every output to a temporary file in `dir`, then renames them all into place; on a
// failure the temporary files are removed and nothing is left.
void write_outputs(const std::string& dir, const std::vector<std::string>& names, std::vector<Ort::Value>& values,
                   std::vector<std::string>& files_out) {
  make_dirs(dir);
  std::vector<PendingFile> pending;
  auto discard = [&]() {
    for (const PendingFile& p : pending) std::remove(p.temp.c_str());
  };
  try {
    for (size_t i = 0; i < values.size(); ++i) {
      auto info = values[i].GetTensorTypeAndShapeInfo();
      const ElementType* e = element_type(info.GetElementType());
      if (e == nullptr || e->descr == nullptr)
        runtime_error("output " + quoted(names[i]) + " is " + type_name(info.GetElementType()) +
                      ", which lowbit-run cannot write as .npy");
      std::vector<int64_t> shape = info.GetShape();
      std::string final_path = dir + "/" + file_name_for(names[i]);
      std::string temp = dir + "/." + file_name_for(names[i]) + ".tmp" + std::to_string(::getpid());
      pending.push_back({temp, final_path});
      std::FILE* f = std::fopen(temp.c_str(), "wb");
      if (f == nullptr) user_error("cannot write " + temp + " in --output-dir: " + std::strerror(errno));
      std::string header = npy::make_header(e->descr, shape);
      size_t bytes = static_cast<size_t>(element_count(shape) * e->size);
      bool ok = std::fwrite(header.data(), 1, header.size(), f) == header.size();
      if (ok && bytes > 0) ok = std::fwrite(values[i].GetTensorRawData(), 1, bytes, f) == bytes;
      ok = (std::fclose(f) == 0) && ok;
      if (!ok) user_error("cannot write " + final_path + " (disk full?)");
    }
    for (const PendingFile& p : pending) {
      if (std::rename(p.temp.c_str(), p.final_path.c_str()) != 0)
        user_error("cannot rename " + p.temp + " to " + p.final_path + ": " + std::strerror(errno));
      files_out.push_back(p.final_path);
    }
  } catch (...) {
    discard();
    for (const std::string& done : files_out) std::remove(done.c_str());
    files_out.clear();
    throw;
  }
}

// ---------------------------------------------------------------------------------------------
// JSON and text reports

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"') out += "\\\"";
    else if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6f", v);
  return buf;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// When session creation failed because a node's op is unknown in lowbit's domain, its op type.
// onnxruntime 1.21 says "Load model from m.onnx failed:Fatal error: lowbit:ConvLowBit(-1) is not a
// registered function/op" (the domain, a colon, the op type).
std::string unknown_lowbit_op(const std::string& message) {
  const std::string key = std::string(kDomain) + ":";
  for (size_t at = message.find(key); at != std::string::npos; at = message.find(key, at + 1)) {
    bool word_start = at == 0 || !(std::isalnum(static_cast<unsigned char>(message[at - 1])) || message[at - 1] == '.');
    size_t end = at + key.size();
    while (end < message.size() && (std::isalnum(static_cast<unsigned char>(message[end])) || message[end] == '_')) ++end;
    if (word_start && end > at + key.size() && message.find("not a registered", end) != std::string::npos)
      return message.substr(at + key.size(), end - at - key.size());
  }
  return "";
}

int run(int argc, char** argv) {
  Options opt = parse_args(argc, argv);

  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    runtime_error(std::string("the onnxruntime library loaded (") + OrtGetApiBase()->GetVersionString() +
                  ") is older than 1.21, which lowbit-run is built for (C API " + std::to_string(ORT_API_VERSION) +
                  "); put onnxruntime 1.21's libonnxruntime.so.1 beside lowbit-run");
  Ort::InitApi(api);

  // everything that can be checked without onnxruntime, before the (slow) session is created
  if (!exists(opt.model)) user_error("model file " + opt.model + " does not exist");
  if (!is_file(opt.model)) user_error("model " + opt.model + " is not a file");
  std::string library;
  if (!opt.ops.empty()) {
    if (!exists(opt.ops)) user_error("op library " + opt.ops + " (--ops) does not exist");
    if (!is_file(opt.ops)) user_error("op library " + opt.ops + " (--ops) is not a file");
    library = opt.ops;
  } else if (!opt.no_ops) {
    std::string dir = executable_dir();
    std::string beside = (dir.empty() ? std::string(".") : dir) + "/" + kLibraryName;
    if (is_file(beside)) library = beside;
  }
  for (const InputArg& in : opt.inputs) {
    if (!exists(in.file)) user_error("input file " + in.file + " (for input " + quoted(in.name) + ") does not exist");
    if (!is_file(in.file)) user_error("input file " + in.file + " (for input " + quoted(in.name) + ") is not a file");
  }
  if (!opt.output_dir.empty()) {
    struct stat st;
    if (::stat(opt.output_dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode))
      user_error("--output-dir " + opt.output_dir + " exists and is not a folder");
  }

  Ort::Env env(ORT_LOGGING_LEVEL_FATAL, "lowbit-run");  // errors come back as exceptions, reported once
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(static_cast<int>(opt.threads));
  options.SetInterOpNumThreads(1);
  options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  options.SetLogSeverityLevel(ORT_LOGGING_LEVEL_FATAL);
  // as lowbit.runtime.session: QDQ MatMuls that onnxruntime fuses into MatMulNBits take int8
  // activations (accuracy level 4), so a QDQ model computes the same here as in Python
  options.AddConfigEntry("session.qdq_matmulnbits_accuracy_level", "4");
  if (!library.empty()) {
    try {
      // a bare file name would make dlopen search the library path instead of the current folder
      std::string path = library.find('/') == std::string::npos ? "./" + library : library;
      options.RegisterCustomOpsLibrary(path.c_str());
    } catch (const Ort::Exception& e) {
      user_error("op library " + library + " cannot be registered: " + e.what());
    }
  }

  Ort::Session session{nullptr};
  try {
    session = Ort::Session(env, opt.model.c_str(), options);
  } catch (const Ort::Exception& e) {
    std::string message = e.what();
    std::string op = unknown_lowbit_op(message);
    if (!op.empty() && library.empty())
      user_error("model " + opt.model + " uses lowbit's op " + op + " but no op library is registered (put " +
                 kLibraryName + " beside lowbit-run or pass --ops PATH)");
    if (!op.empty())
      user_error("model " + opt.model + " uses lowbit's op " + op + ", which op library " + library +
                 " does not provide (is it lowbit's " + kLibraryName + "?)");
    OrtErrorCode code = e.GetOrtErrorCode();
    if (code == ORT_INVALID_PROTOBUF || code == ORT_NO_MODEL || code == ORT_NO_SUCHFILE)
      user_error("model file " + opt.model + " cannot be loaded: " + message);
    runtime_error("onnxruntime cannot open model " + opt.model + ": " + message);
  }

  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<ModelInput> model_inputs;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    ModelInput in;
    in.name = session.GetInputNameAllocated(i, allocator).get();
    Ort::TypeInfo info = session.GetInputTypeInfo(i);
    in.is_tensor = info.GetONNXType() == ONNX_TYPE_TENSOR;
    in.type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    if (in.is_tensor) {
      auto tensor = info.GetTensorTypeAndShapeInfo();
      in.type = tensor.GetElementType();
      in.dims = tensor.GetShape();
      std::vector<const char*> symbols(in.dims.size(), nullptr);
      if (!symbols.empty()) tensor.GetSymbolicDimensions(symbols.data(), symbols.size());
      for (const char* s : symbols) in.symbols.push_back(s ? s : "");
    }
    model_inputs.push_back(in);
  }
  std::vector<std::string> output_names;
  for (size_t i = 0; i < session.GetOutputCount(); ++i)
    output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());

  std::string input_list;
  for (const ModelInput& in : model_inputs) input_list += (input_list.empty() ? "" : ", ") + quoted(in.name);
  if (input_list.empty()) input_list = "none";
  std::map<std::string, std::string> given;
  for (const InputArg& in : opt.inputs) {
    bool known = false;
    for (const ModelInput& m : model_inputs) known = known || m.name == in.name;
    if (!known)
      user_error("model " + opt.model + " has no input named " + quoted(in.name) + " (its inputs: " + input_list + ")");
    given[in.name] = in.file;
  }
  std::vector<std::string> missing;
  for (const ModelInput& m : model_inputs)
    if (!given.count(m.name)) missing.push_back(m.name);
  if (!missing.empty()) {
    std::string list;
    for (const std::string& m : missing) list += (list.empty() ? "" : ", ") + quoted(m);
    user_error(std::string(missing.size() == 1 ? "input " : "inputs ") + list + " of model " + opt.model +
               (missing.size() == 1 ? " is" : " are") + " not given (pass --input NAME=FILE for every input: " +
               input_list + ")");
  }
  if (!opt.output_dir.empty()) {  // two outputs must not land in the same file
    std::map<std::string, std::string> files;
    for (const std::string& name : output_names) {
      auto [it, fresh] = files.emplace(file_name_for(name), name);
      if (!fresh)
        runtime_error("outputs " + quoted(it->second) + " and " + quoted(name) + " of model " + opt.model +
                      " would both be written to " + it->first);
    }
  }

  std::vector<Ort::Value> input_values;
  std::vector<const char*> input_names, out_names;
  for (const ModelInput& m : model_inputs) {
    input_values.push_back(load_input(m, given[m.name], allocator));
    input_names.push_back(m.name.c_str());
  }
  for (const std::string& name : output_names) out_names.push_back(name.c_str());

  Ort::RunOptions run_options;
  std::vector<Ort::Value> outputs;
  std::vector<double> times_ms;
  try {
    for (long i = 0; i < opt.warmup; ++i)
      outputs = session.Run(run_options, input_names.data(), input_values.data(), input_values.size(),
                            out_names.data(), out_names.size());
    for (long i = 0; i < opt.runs; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      outputs = session.Run(run_options, input_names.data(), input_values.data(), input_values.size(),
                            out_names.data(), out_names.size());
      auto t1 = std::chrono::steady_clock::now();
      times_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  } catch (const Ort::Exception& e) {
    runtime_error("running model " + opt.model + " failed: " + e.what());
  }

  std::vector<std::vector<int64_t>> shapes;
  std::vector<std::string> dtypes;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].IsTensor()) runtime_error("output " + quoted(output_names[i]) + " is not a tensor, which lowbit-run cannot report");
    auto info = outputs[i].GetTensorTypeAndShapeInfo();
    shapes.push_back(info.GetShape());
    dtypes.push_back(type_name(info.GetElementType()));
  }
  std::vector<std::string> files;
  if (!opt.output_dir.empty()) write_outputs(opt.output_dir, output_names, outputs, files);

  double med = median(times_ms);
  double lo = *std::min_element(times_ms.begin(), times_ms.end());
  double hi = *std::max_element(times_ms.begin(), times_ms.end());
  std::string version = Ort::GetVersionString();
  std::string out;
  if (opt.json) {
    out = "{\"model\": " + json_string(opt.model) +
          ", \"ops_library\": " + (library.empty() ? std::string("null") : json_string(library)) +
          ", \"onnxruntime\": " + json_string(version) + ", \"threads\": " + std::to_string(opt.threads) +
          ", \"runs\": " + std::to_string(opt.runs) + ", \"latency_ms\": {\"median\": " + number(med) +
          ", \"min\": " + number(lo) + ", \"max\": " + number(hi) + "}, \"outputs\": {";
    for (size_t i = 0; i < output_names.size(); ++i) {
      std::string dims;
      for (size_t d = 0; d < shapes[i].size(); ++d) dims += (d ? ", " : "") + std::to_string(shapes[i][d]);
      out += (i ? ", " : "") + json_string(output_names[i]) + ": {\"shape\": [" + dims + "], \"dtype\": " +
             json_string(dtypes[i]) + ", \"file\": " + (files.empty() ? std::string("null") : json_string(files[i])) + "}";
    }
    out += "}}\n";
  } else {
    out = "model:       " + opt.model + "\n";
    out += "op library:  " + (library.empty() ? std::string("none") : library) + "\n";
    out += "onnxruntime: " + version + ", " + std::to_string(opt.threads) + " intra-op thread" +
           (opt.threads == 1 ? "" : "s") + "\n";
    for (size_t i = 0; i < output_names.size(); ++i)
      out += "output:      " + output_names[i] + " " + shape_text(shapes[i]) + " " + dtypes[i] +
             (files.empty() ? std::string() : " -> " + files[i]) + "\n";
    char buf[160];
    std::snprintf(buf, sizeof buf, "latency:     %.3f ms median of %ld runs (min %.3f, max %.3f)\n", med, opt.runs, lo,
                  hi);
    out += buf;
  }
  std::fputs(out.c_str(), stdout);
  if (std::fflush(stdout) != 0) runtime_error(std::string("cannot write to stdout: ") + std::strerror(errno));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Failure& f) {
    std::fprintf(stderr, "lowbit-run: error: %s\n", one_line(f.message).c_str());
    return f.code;
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "lowbit-run: error: onnxruntime: %s\n", one_line(e.what()).c_str());
    return kRuntimeError;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lowbit-run: error: %s\n", one_line(e.what()).c_str());
    return kRuntimeError;
  }
}
