// The .npy file format, as much of it as lowbit-run needs: read the header of an input file,
// write the header of an output file. No onnxruntime here, no third-party code.
//
// Layout (numpy's NEP 1 / numpy.lib.format): the 6 magic bytes "\x93NUMPY", a major and a minor
// version byte, the header length (uint16 little-endian in version 1, uint32 in versions 2 and 3),
// then the header: a Python dict literal such as
//     {'descr': '<f4', 'fortran_order': False, 'shape': (128, 1, 8, 8), }
// padded with spaces and ended by '\n' so that the data starts at a multiple of 64 bytes (older
// numpy aligned to 16). The data follows: the array's elements in C order (Fortran order when
// 'fortran_order' is True), product(shape) × itemsize bytes. Version 3 only allows utf-8 in the
// header, which changes nothing for the plain-ASCII dicts parsed here.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace npy {

struct Header {
  int major = 0;                // format version 1, 2 or 3
  std::string descr;            // numpy's dtype string, e.g. "<f4", "|u1", "|b1"
  bool fortran_order = false;
  std::vector<int64_t> shape;   // () is a 0-d array: one element
  uint64_t data_offset = 0;     // where the elements start in the file
};

// A tiny reader for the header's Python literal: strings, True/False, and tuples of integers.
class Literal {
 public:
  explicit Literal(const std::string& text) : s_(text) {}

  // Parses the whole dict into `out`; false with `error` set on anything unexpected.
  bool parse(Header& out, std::string& error) {
    bool have_descr = false, have_order = false, have_shape = false;
    skip();
    if (!eat('{')) return fail(error, "it does not start with '{'");
    for (;;) {
      skip();
      if (eat('}')) break;
      std::string key;
      if (!string(key)) return fail(error, "a key is not a quoted string");
      skip();
      if (!eat(':')) return fail(error, "no ':' after '" + key + "'");
      skip();
      if (key == "descr") {
        if (!string(out.descr)) return fail(error, "'descr' is not a plain dtype string (structured dtypes are not read)");
        have_descr = true;
      } else if (key == "fortran_order") {
        if (word("True")) out.fortran_order = true;
        else if (word("False")) out.fortran_order = false;
        else return fail(error, "'fortran_order' is neither True nor False");
        have_order = true;
      } else if (key == "shape") {
        if (!tuple(out.shape)) return fail(error, "'shape' is not a tuple of non-negative integers");
        have_shape = true;
      } else {
        return fail(error, "unexpected key '" + key + "'");
      }
      skip();
      if (eat(',')) continue;
      skip();
      if (eat('}')) break;
      return fail(error, "expected ',' or '}' after '" + key + "'");
    }
    if (!have_descr || !have_order || !have_shape)
      return fail(error, "it lacks one of 'descr', 'fortran_order', 'shape'");
    return true;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  static bool fail(std::string& error, const std::string& why) {
    error = why;
    return false;
  }
  void skip() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  bool eat(char c) {
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  bool word(const char* w) {
    size_t n = std::strlen(w);
    if (s_.compare(i_, n, w) != 0) return false;
    i_ += n;
    return true;
  }
  bool string(std::string& out) {
    if (i_ >= s_.size() || (s_[i_] != '\'' && s_[i_] != '"')) return false;
    char quote = s_[i_++];
    out.clear();
    while (i_ < s_.size() && s_[i_] != quote) {
      if (s_[i_] == '\\') return false;  // dtype strings and the three keys never need escapes
      out += s_[i_++];
    }
    return eat(quote);
  }
  bool tuple(std::vector<int64_t>& out) {
    out.clear();
    if (!eat('(')) return false;
    for (;;) {
      skip();
      if (eat(')')) return true;
      if (i_ >= s_.size() || s_[i_] < '0' || s_[i_] > '9') return false;
      int64_t v = 0;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') {
        if (v > (INT64_MAX - 9) / 10) return false;
        v = v * 10 + (s_[i_++] - '0');
      }
      while (i_ < s_.size() && (s_[i_] == 'L')) ++i_;  // Python 2's long suffix, in very old files
      out.push_back(v);
      skip();
      if (eat(',')) continue;
      skip();
      if (eat(')')) return true;
      return false;
    }
  }
};

// Reads the header from the first bytes of a file (`prefix`, at least the first 10 bytes and as
// much more as the caller has; `file_size` is the whole file's size). On success fills `out`;
// otherwise returns false and says why in `error`. If `needed` is set greater than prefix.size()
// the caller must read that many bytes and call again.
inline bool parse_header(const std::string& prefix, uint64_t file_size, Header& out, std::string& error,
                         size_t& needed) {
  needed = 0;
  static const char kMagic[] = "\x93NUMPY";
  if (prefix.size() < 10 || std::memcmp(prefix.data(), kMagic, 6) != 0) {
    error = "it does not start with the .npy magic bytes";
    return false;
  }
  out.major = static_cast<unsigned char>(prefix[6]);
  size_t length_bytes = out.major == 1 ? 2 : (out.major == 2 || out.major == 3) ? 4 : 0;
  if (length_bytes == 0) {
    error = "its .npy format version " + std::to_string(out.major) + " is not 1, 2 or 3";
    return false;
  }
  if (prefix.size() < 8 + length_bytes) {
    needed = 8 + length_bytes;
    return false;
  }
  uint64_t header_len = 0;
  for (size_t b = 0; b < length_bytes; ++b)
    header_len |= static_cast<uint64_t>(static_cast<unsigned char>(prefix[8 + b])) << (8 * b);
  out.data_offset = 8 + length_bytes + header_len;
  if (out.data_offset > file_size) {
    error = "its header is longer than the file";
    return false;
  }
  if (prefix.size() < out.data_offset) {
    needed = static_cast<size_t>(out.data_offset);
    return false;
  }
  std::string text = prefix.substr(8 + length_bytes, static_cast<size_t>(header_len));
  Literal literal(text);
  std::string why;
  if (!literal.parse(out, why)) {
    error = "its .npy header cannot be read: " + why;
    return false;
  }
  return true;
}

// The bytes before the data of a version 1.0 .npy file holding `descr` in C order with `shape`;
// the whole prefix is a multiple of 64 bytes long, as numpy writes it.
inline std::string make_header(const std::string& descr, const std::vector<int64_t>& shape) {
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) {
    dict += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) dict += ",";
    if (i + 1 < shape.size()) dict += " ";
  }
  dict += "), }";
  size_t unpadded = 10 + dict.size() + 1;  // magic, version, uint16 length, dict, '\n'
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(dict.size() & 0xff);
  out += static_cast<char>((dict.size() >> 8) & 0xff);
  out += dict;
  return out;
}

}  // namespace npy
