// Helpers shared by the fused CPU kernels (center_sgd.cpp, logit_passes.cpp): bf16 <-> fp32 with torch's
// rounding, a fork-join split of a range over a team of threads kept across calls, and waves of splits on one
// fork.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__AVX512F__)
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

// round_to_bf16 by VCVTNEPS2BF16 alone, for loops that cannot take f32x16_to_bf16's branch at every rounding (the
// bf16 replay rounds three values per step): lanes it got wrong (subnormal inputs, flushed) are added to
// `subnormal`, and a caller that finds any redoes its work with round_to_bf16.
inline __m512 round_to_bf16_noting(__m512 v, __mmask16& subnormal) {
  subnormal |= _mm512_fpclass_ps_mask(v, 0x20);
  return bf16x16_to_f32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
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
#if defined(__AVX512F__)
  // a whole line per store where dst is line-aligned: gathering 10k or 30k of 100k rows 0.87-0.88x the time of
  // 16-byte stores, fp32 and bf16, 2 AVX-512 threads (benchmarks/results/head_kernels_ab.md, 2026-12-04)
  if ((reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(bytes)) % 64 == 0) {
    for (int64_t line = 0; line < bytes; line += 64) {
      if (ahead) __builtin_prefetch(ahead + line);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + line), _mm512_loadu_si512(src + line));
    }
    return;
  }
#endif
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

// Threads kept across kernel calls. A step makes ~6-8 calls, and creating and joining a std::thread per call cost
// 70-330 us on the 2-vCPU VM (a [128, 200] pass: 15 us on one thread, 335 us median on two), more than the
// work of a call at B = 128. A worker spins ~20 us for the next job (the step's calls come tens of us apart),
// then sleeps on a condition variable. One job at a time: a caller that finds the team busy (another thread, or
// a kernel called from inside a job) forks std::threads as before. After fork() the child starts a fresh team
// (the parent's threads do not exist there); the old one is left allocated, never destroyed (no destructor
// runs at exit while workers wait).
class WorkerTeam {
 public:
  static WorkerTeam* get() {
    static std::once_flag registered;
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { current().store(nullptr); }); });
    WorkerTeam* team = current().load(std::memory_order_acquire);
    if (team != nullptr) return team;
    WorkerTeam* fresh = new WorkerTeam();  // no thread yet: the first job starts them
    if (current().compare_exchange_strong(team, fresh, std::memory_order_acq_rel)) return fresh;
    delete fresh;  // another thread's came first
    return team;
  }

  // job(member) for member in [0, members): member 0 on the calling thread, the others on workers. False if
  // the team is busy (nothing ran; the caller forks its own threads).
  template <class Job>
  bool run(int64_t members, const Job& job) {
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    grow(members - 1);
    job_ = &job;
    call_ = [](const void* j, int64_t member) { (*static_cast<const Job*>(j))(member); };
    remaining_.store(members - 1, std::memory_order_relaxed);
    const uint64_t word = ((state_.load(std::memory_order_relaxed) >> 32) + 1) << 32 | uint64_t(members);
    state_.store(word, std::memory_order_seq_cst);  // publishes job_ and call_ (release)
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(mutex_); }
      wake_.notify_all();
    }
    job(0);
    for (int spins = 0; remaining_.load(std::memory_order_acquire) > 0; ++spins) {
      if (spins > 4096) std::this_thread::yield();
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  // a worker's wait for the next job before it sleeps (0 and 20 us measured alike: -2 to -4% a B = 128 step
  // either way); longer would hold a core that the GEMMs' OpenMP threads want
  static constexpr int kSpinMicros = 20;

  void grow(int64_t workers) {  // only the caller holding busy_ grows the team
    while (static_cast<int64_t>(started_) < workers) {
      const int64_t member = ++started_;
      std::thread(&WorkerTeam::serve, this, member, state_.load(std::memory_order_relaxed)).detach();
    }
  }

  void serve(int64_t member, uint64_t seen) {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "facescale-team");  // in top, perf and /proc/<pid>/task/*/comm
#endif
    for (;;) {
      uint64_t word = state_.load(std::memory_order_acquire);
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      for (int spins = 1; word == seen; ++spins) {
        pause();
        word = state_.load(std::memory_order_acquire);
        if (spins % 32 == 0 && std::chrono::steady_clock::now() > spin_until) break;
      }
      if (word == seen) {
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        std::unique_lock<std::mutex> lock(mutex_);
        while ((word = state_.load(std::memory_order_seq_cst)) == seen) wake_.wait(lock);
        lock.unlock();
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
      }
      seen = word;
      // a job needs every one of its members to finish before the next is published, so job_ is this word's
      if (member < static_cast<int64_t>(word & 0xffffffffu)) {
        call_(job_, member);
        remaining_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  static std::atomic<WorkerTeam*>& current() {
    static std::atomic<WorkerTeam*> team{nullptr};
    return team;
  }

  static void pause() {
#if defined(__SSE2__)
    _mm_pause();
#endif
  }

  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> state_{0};  // (job number << 32) | members of that job
  std::atomic<int64_t> remaining_{0};  // workers of the current job still running it
  std::atomic<int> sleepers_{0};
  const void* job_ = nullptr;
  void (*call_)(const void*, int64_t) = nullptr;
  int64_t started_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
};

// run(member) for member in [0, members), concurrently (the members may wait for each other), on the worker team
// when it is free, else on std::threads made for this call.
template <class Run>
void run_members(int64_t members, const Run& run) {
  if (members <= 1) {
    run(0);
    return;
  }
  if (WorkerTeam::get()->run(members, run)) return;
  std::vector<std::thread> pool;
  for (int64_t member = 1; member < members; ++member) pool.emplace_back([&run, member] { run(member); });
  run(0);
  for (auto& t : pool) t.join();
}

// body(i0, i1) over [begin, end) cut into at most `threads` parts of at least `min_part` items; the last part
// runs on the calling thread.
template <class Body>
void split_range(int64_t begin, int64_t end, int32_t threads, int64_t min_part, const Body& body) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(min_part, 1)));
  run_members(parts, [&](int64_t member) {
    const int64_t p = parts - 1 - member;  // member 0 (the caller) takes the last part
    body(begin + n * p / parts, begin + n * (p + 1) / parts);
  });
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
  run_members(team, run);
}

}  // namespace facescale
