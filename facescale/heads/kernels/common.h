// Helpers shared by the fused CPU kernels (center_sgd.cpp, logit_passes.cpp): bf16 <-> fp32 with torch's
// rounding, a fork-join split of a range over a few std::threads, and waves of splits on one fork.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace facescale {

// floats in one vector register of the target (AVX-512, AVX/AVX2, else 128-bit SSE/NEON)
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The float that f rounded to bf16 stands for (round to nearest even; NaN stays NaN, made quiet), computed on the
// float's bits: no narrowing to 16 bits and back, and a float compare for NaN (one instruction, where an unsigned
// integer compare costs three on AVX2): the bf16 replay and update round three values per element and step.
inline float round_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;  // no carry out: NaN is not taken
  const uint32_t bits = f != f ? (u | 0x00400000u) & 0xffff0000u : rounded;  // branch-free: vectorises
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline uint16_t bf16_bits(float exact) {  // the bf16 that holds `exact`, a float that already is a bf16 value
  uint32_t u;
  std::memcpy(&u, &exact, 4);
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t f32_to_bf16(float f) { return bf16_bits(round_to_bf16(f)); }  // torch's rounding to bf16

#if defined(__AVX512BF16__)
// 16 lanes at a time on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids): VCVTNEPS2BF16 rounds to nearest even and
// quiets NaN exactly as f32_to_bf16 does, in one instruction instead of ~6, but flushes subnormal inputs to zero;
// a vector holding one (|x| < 1.2e-38, rare in training) takes f32_to_bf16 lane by lane, so results are the same.
inline __m256i f32x16_to_bf16(__m512 v) {
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) != 0, 0)) {  // 0x20: subnormal lanes
    alignas(64) float f[16];
    alignas(32) uint16_t h[16];
    _mm512_store_ps(f, v);
    for (int i = 0; i < 16; ++i) h[i] = f32_to_bf16(f[i]);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(h));
  }
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}

inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 load_bf16x16(const uint16_t* p) {
  return bf16x16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline void store_bf16x16(uint16_t* p, __m256i h) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h); }

inline __m512 round_to_bf16(__m512 v) { return bf16x16_to_f32(f32x16_to_bf16(v)); }  // the floats they stand for
#endif

// dst[0, bytes) = src[0, bytes) for a destination read only later (the forward's gathered rows): x86's
// non-temporal stores skip fetching dst's lines into the cache before overwriting them (write-allocate): gathering
// 10k of 100k 2 KB rows 3.8 -> 2.9 ms on 2 AVX2 cores, 30k with the copy read after 13.3 -> 10.0 ms; memcpy
// elsewhere or when unaligned. A thread that streamed calls streaming_done() before handing its writes over.
// `ahead` (optional): a row of `bytes` to be copied later, requested a line per line copied (all of a 2 KB row's
// lines at once stall the copy: gathering 10k of 100k fp32 rows on 2 AVX-512 cores 2.5-2.9 -> 2.1-2.4 ms).
inline void copy_row_streaming(char* dst, const char* src, int64_t bytes, const char* ahead = nullptr) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(bytes)) % 16 == 0) {
    for (int64_t line = 0; line < bytes; line += 64) {
      if (ahead) __builtin_prefetch(ahead + line);
      for (int64_t j = line; j < std::min<int64_t>(bytes, line + 64); j += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + j), v);
      }
    }
    return;
  }
#endif
  if (ahead) {
    for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(ahead + line);
  }
  std::memcpy(dst, src, bytes);
}

inline void streaming_done() {  // non-temporal stores are weakly ordered: fence them
#if defined(__SSE2__)
  _mm_sfence();
#endif
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

// body(i0, i1) over consecutive waves [bounds[k], bounds[k+1]), each finished by every thread before the next
// starts, each cut like split_range (at most `threads` parts of at least `min_part`). One fork for all the
// waves, with the threads meeting at a spinning barrier between them: an in-place pass runs ~5 waves of
// ~0.1 ms, and a fork per wave cost more than the wave (a 128 x 10k pass took 1.0-2.0 ms forking per wave on 2
// threads and 0.7 ms on one, 2-vCPU VM). A thread that waits long yields its core, in case there are fewer
// cores than threads.
template <class Body>
void split_waves(const std::vector<int64_t>& bounds, int32_t threads, int64_t min_part, const Body& body) {
  const int64_t waves = static_cast<int64_t>(bounds.size()) - 1;
  auto parts_of = [&](int64_t k) {
    const int64_t n = bounds[k + 1] - bounds[k];
    return std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(min_part, 1)));
  };
  int64_t team = 1;
  for (int64_t k = 0; k < waves; ++k) team = std::max(team, parts_of(k));
  std::atomic<int64_t> arrived{0};
  auto run = [&](int64_t member) {
    for (int64_t k = 0; k < waves; ++k) {
      const int64_t parts = parts_of(k), a = bounds[k], n = bounds[k + 1] - a;
      if (member < parts) body(a + n * member / parts, a + n * (member + 1) / parts);
      if (team == 1) continue;
      // barrier k: every member's writes of wave k (release) are seen by every member after it (acquire)
      const int64_t target = team * (k + 1);
      arrived.fetch_add(1, std::memory_order_acq_rel);
      for (int spins = 0; arrived.load(std::memory_order_acquire) < target; ++spins) {
        if (spins > 4096) std::this_thread::yield();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int64_t member = 1; member < team; ++member) pool.emplace_back(run, member);
  run(0);
  for (auto& t : pool) t.join();
}

}  // namespace facescale
