// What the kernels' standalone self-tests (selftest_*.cc) share: random packed weights, the code
// of one weight as runtime/ops.py reads it, a 2-thread ParallelFor, and a median timer. Test code
// only: never part of the library.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "kernels.h"

namespace lowbit {
namespace selftest {

inline std::vector<float> randn(std::mt19937& rng, std::size_t n, float sigma = 1.f) {
  std::normal_distribution<float> nd(0.f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// A random packed weight W[N, K] and its view (random bytes, so padding codes are random too).
struct Weight {
  std::vector<uint8_t> packed, zp;
  std::vector<float> scales, levels;
  LowBitWeight view;
  std::size_t bytes() const {
    return packed.size() + zp.size() + (scales.size() + levels.size()) * sizeof(float);
  }
};

inline Weight random_weight(std::mt19937& rng, int64_t N, int64_t K, int bits, int64_t bs, Format fmt,
                            bool with_zp) {
  Weight w;
  const int64_t nb = (K + bs - 1) / bs, values = 1 << bits;
  std::uniform_int_distribution<int> byte(0, 255), code(0, values - 1);
  w.packed.resize(N * nb * bs * bits / 8);
  for (auto& b : w.packed) b = static_cast<uint8_t>(byte(rng));
  w.scales = randn(rng, N * nb);
  for (auto& s : w.scales) s = 0.01f + 0.05f * std::fabs(s);
  if (fmt == Format::Codebook) {
    w.levels = randn(rng, N * nb * values);
  } else if (with_zp) {
    w.zp.resize(N * nb);
    for (auto& z : w.zp) z = static_cast<uint8_t>(code(rng));
  }
  LowBitWeight& v = w.view;
  v.packed = w.packed.data();
  v.scales = w.scales.data();
  v.zero_points = w.zp.empty() ? nullptr : w.zp.data();
  v.levels = w.levels.empty() ? nullptr : w.levels.data();
  v.N = N, v.K = K, v.bits = bits, v.block_size = bs, v.format = fmt;
  return w;
}

// The code of column k of row n (ops.py: packed little-end first within a byte).
// ops.py's rounding of an int8 codebook's block scale to float16 (nearest, ties to even, inside
// [2^-14, 65504] only), computed in double apart from the kernels' bit trick (round_to_half).
inline float half_round(float x) {
  const double m = std::fabs(static_cast<double>(x));
  if (!(m >= std::ldexp(1.0, -14) && m <= 65504.0)) return x;
  int e = 0;
  std::frexp(m, &e);                           // m = f·2^e, f in [0.5, 1): 11 significant bits
  const double ulp = std::ldexp(1.0, e - 11);
  return static_cast<float>(std::copysign(std::nearbyint(m / ulp) * ulp, static_cast<double>(x)));
}

inline int code(const LowBitWeight& w, int64_t n, int64_t k) {
  const int64_t b = k / w.block_size, j = k % w.block_size;
  const uint8_t byte = w.packed[(n * w.blocks() + b) * (w.block_size * w.bits / 8) + j * w.bits / 8];
  return (byte >> (j * w.bits % 8)) & ((1 << w.bits) - 1);
}

// A ParallelFor on `threads` threads: the caller and workers take indices from one counter.
// Workers spin briefly for the next call, then sleep, so an idle pool leaves the cores alone.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  ParallelFor parallel() {
    return [this](std::size_t n, const std::function<void(std::size_t)>& fn) { run(n, fn); };
  }

 private:
  void run(std::size_t n, const std::function<void(std::size_t)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_ = n;
      next_ = 0;
      left_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    take();
    while (left_.load() > 0) std::this_thread::yield();
  }
  void take() {
    for (std::size_t i; (i = next_.fetch_add(1)) < n_;) (*fn_)(i);
  }
  void work() {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; spin < 20000 && generation_.load() == seen; ++spin) std::this_thread::yield();
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        if (stop_) return;
      }
      take();
      --left_;
    }
  }
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<std::size_t> next_{0};
  std::atomic<int> left_{0};
  std::size_t n_ = 0;
  const std::function<void(std::size_t)>* fn_ = nullptr;
  bool stop_ = false;
};

// Median milliseconds of `reps` calls of f, after 3 untimed ones.
template <class F>
double median_ms(F&& f, int reps) {
  for (int i = 0; i < 3; ++i) f();
  std::vector<double> t(reps);
  for (auto& x : t) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    x = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  std::nth_element(t.begin(), t.begin() + reps / 2, t.end());
  return t[reps / 2];
}

}  // namespace selftest
}  // namespace lowbit
