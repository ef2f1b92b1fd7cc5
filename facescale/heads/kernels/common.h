// Helpers shared by the fused CPU kernels (center_sgd.cpp, logit_passes.cpp): bf16 <-> fp32 with torch's
// rounding, and a fork-join split of a range over a few std::threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace facescale {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN (branch-free: vectorises)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

// body(i0, i1) over [begin, end) cut into at most `threads` parts of at least `min_part` items; the last part
// runs on the calling thread.
template <class Body>
void split_range(int64_t begin, int64_t end, int32_t threads, int64_t min_part, const Body& body) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(min_part, 1)));
  std::vector<std::thread> pool;
  for (int64_t p = 0; p + 1 < parts; ++p) pool.emplace_back(body, begin + n * p / parts, begin + n * (p + 1) / parts);
  body(begin + n * (parts - 1) / parts, end);
  for (auto& t : pool) t.join();
}

}  // namespace facescale
