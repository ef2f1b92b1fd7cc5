// Fused SGD(-momentum) update of class-center rows: one pass per row, in place, no temporaries.
//
// Per updated row w (fp32 math, storage fp32 or bf16 with an optional bf16 residual "lo" so that
// hi + lo carries ~16 significant bits and updates below a bf16 ulp are not lost):
//   g  = P                       (plain gradient row), or
//   g  = P - r^2 (w . P) w       (the tangent projection of norm_linear; r = 1/||w|| of the forward)
//   m  = mu m + wd w + g ;  w -= lr m      (torch.optim.SGD; mu = 0: w = w - lr (g + wd w))
//   inv_norm[row] = 1 / max(||stored w||, eps)
// Dense calls also stream every other row of [row_begin, row_end) with g = 0 (ghost momentum/decay).
// Deferred dense updates (facescale_center_catch_up): a row that was not sampled need not be streamed every
// step; it records how many steps it has seen, and before it is next read its missed zero-gradient steps are
// replayed with those steps' learning rates by the same replay_row the every-step pass runs for one step, so the
// result is bit for bit what the every-step dense pass would have produced (see replay_row).
// Built and loaded by facescale/heads/native.py (plain C ABI, no torch headers, -ffp-contract=off).
#include <cmath>

#include "common.h"

namespace {

using facescale::bf16_bits;
using facescale::bf16_to_f32;
#if defined(__AVX512BF16__)
using facescale::bf16x16_to_f32;
using facescale::f32x16_to_bf16;
using facescale::load_bf16x16;
using facescale::store_bf16x16;
#endif
using facescale::f32_to_bf16;
using facescale::round_to_bf16;
using facescale::split_range;
using facescale::copy_row_streaming;
using facescale::streaming_done;

struct Args {
  int64_t dim;
  int64_t n_grad;         // gradient rows
  const int64_t* rows;    // shard row of each gradient row (sorted); null = row_base + k
  int64_t row_base;
  const void* grad;       // [n_grad, dim], fp32 (grad_bf16 = 0) or bf16
  int32_t grad_bf16;
  const float* proj_inv;  // [n_grad] r of each gradient row, or null (no projection)
  int64_t row_begin, row_end;  // dense: stream these rows too (zero gradient where not in rows)
  void* centers;          // [rows, dim] fp32 or bf16 (centers_bf16)
  int32_t centers_bf16;
  uint16_t* residual;     // bf16 [rows, dim] or null
  void* momentum;         // [rows, dim] fp32 or bf16 (momentum_bf16), or null when mu == 0
  int32_t momentum_bf16;
  float* inv_norms;       // [rows] or null
  float lr, mu, wd, eps;
};

// The sum of 16 lane sums (overwritten) in a fixed tree: dot() and the norms a row update sums as it goes.
inline float lane_tree(float* acc) {
  for (int half = 8; half > 0; half /= 2) {
    for (int l = 0; l < half; ++l) acc[l] += acc[l + half];
  }
  return acc[0];
}

// a . b with 16 lane sums and a fixed tree: vectorisable, and the same order for every caller and thread
// count, so norms from the update and from facescale_inv_norms agree bit for bit (cached vs recomputed).
inline float dot(const float* a, const float* b, int64_t d) {
  float acc[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {  // simd
    for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * b[j + l];  // (an explicit fma here: 25% slower update)
  }
  float tail = 0.f;
  for (; j < d; ++j) tail += a[j] * b[j];
  return lane_tree(acc) + tail;
}

inline float inv_norm(const float* w, int64_t d, float eps) { return 1.f / std::max(std::sqrt(dot(w, w, d)), eps); }

// inv_norm of a row of whole 16-lane vectors from its 16 lane sums of squares (dot()'s order; its tail is 0)
inline float inv_norm_of_lanes(float* squares, float eps) {
  return 1.f / std::max(std::sqrt(lane_tree(squares) + 0.f), eps);
}

// The row a sparse update or a catch-up will reach a few rows later (its centers, momentum and residual rows; null:
// none), fetched a line at a time from inside this row's loop: issuing all 32-64 lines of a row at once (prefetch_row)
// fills the core's miss buffers and stalls, spread over the loop they arrive in time (10k of 100k rows on AVX2:
// fp32 11.1 -> 9.0 ms on 2 threads, 18.2 -> 14.5 on 1; bf16 14.1 -> 13.4). prefetch_ahead(ahead, j) asks for
// what matches this row's elements [j, j+16).
struct Ahead {
  const char* rows[3] = {nullptr, nullptr, nullptr};
  int64_t element_bytes[3] = {0, 0, 0};
};
constexpr int64_t kLineFloats = 16;  // fp32 elements per 64-byte cache line

__attribute__((always_inline)) inline void prefetch_ahead(const Ahead& ahead, int64_t j) {
  for (int i = 0; i < 3; ++i) {
    if (ahead.rows[i]) __builtin_prefetch(ahead.rows[i] + j * ahead.element_bytes[i], 1);
  }
}

// Zero-gradient steps ("ghost" momentum and decay) of a row a dense step did not sample: the every-step dense
// pass runs one such step, the deferred catch-up all the steps a row missed, both through replay_row below. The
// library is built with -ffp-contract=off (native.py) and every fused multiply-add is written out, so each
// element sees the same IEEE operations in the same order however the compiler inlines or vectorises, and the
// two paths agree bit for bit. A replay keeps a chunk of the row and its momentum in registers across its steps.
struct LrSteps {  // step s of a replay uses lr[(first + s) % history]
  const float* lr;
  int64_t history, first, count;
  float at(int64_t s) const { return lr[(first + s) % history]; }
};

// kLen floats of a row and of its momentum through n zero-gradient steps, held in registers across the steps
// (one load and one store per element instead of one per step); per element, the same operations in order.
template <int64_t kLen>
inline void replay_chunk_f32(float* __restrict w, float* __restrict m, const float* lrs, int64_t n, float mu,
                             float wd) {
  float wr[kLen], mr[kLen];
  for (int64_t j = 0; j < kLen; ++j) wr[j] = w[j], mr[j] = m[j];
  for (int64_t s = 0; s < n; ++s) {
    const float lr = lrs[s];
    for (int64_t j = 0; j < kLen; ++j) {  // simd
      const float mj = std::fma(mu, mr[j], wd * wr[j]);
      mr[j] = mj;
      wr[j] = std::fma(-lr, mj, wr[j]);
    }
  }
  for (int64_t j = 0; j < kLen; ++j) w[j] = wr[j], m[j] = mr[j];
}

// floats per array kept in registers: 8 registers each for the row and its momentum, i.e. 8 independent chains of
// dependent multiply-adds per step (64: 6.6 -> 4.5 ms to replay ~33 steps of 3k rows on AVX2; 32: 6.0, 128: 6.0)
constexpr int64_t kReplayChunk = 8 * facescale::kLanes;
constexpr int64_t kLrBatch = 256;  // learning rates looked up once per row, this many steps at a time

// body(lrs, n) for the replay's steps in order, kLrBatch at a time, with their learning rates in lrs[0, n).
template <class Body>
inline void for_lr_batches(const LrSteps& steps, const Body& body) {
  float lrs[kLrBatch];
  for (int64_t s0 = 0; s0 < steps.count; s0 += kLrBatch) {
    const int64_t n = std::min(kLrBatch, steps.count - s0);
    for (int64_t s = 0; s < n; ++s) lrs[s] = steps.at(s0 + s);
    body(lrs, n);
  }
}

void replay_row_f32(const Args& a, int64_t row, const LrSteps& steps, const Ahead& ahead) {
  const int64_t d = a.dim;
  const float mu = a.mu, wd = a.wd;
  float* __restrict w = static_cast<float*>(a.centers) + row * d;
  float* __restrict m = a.momentum ? static_cast<float*>(a.momentum) + row * d : nullptr;
  for_lr_batches(steps, [&](const float* lrs, int64_t n) {
    if (!m) {
      for (int64_t s = 0; s < n; ++s) {
        const float decay = std::fma(-lrs[s], wd, 1.f);
        for (int64_t j = 0; j < d; ++j) w[j] *= decay;  // simd
      }
      return;
    }
    int64_t j0 = 0;
    for (; j0 + kReplayChunk <= d; j0 += kReplayChunk) {
      for (int64_t j = j0; j < j0 + kReplayChunk; j += kLineFloats) prefetch_ahead(ahead, j);
      replay_chunk_f32<kReplayChunk>(w + j0, m + j0, lrs, n, mu, wd);
    }
    for (; j0 < d; ++j0) replay_chunk_f32<1>(w + j0, m + j0, lrs, n, mu, wd);  // the tail, element by element
  });
}

// bf16 storage: the value is hi (+ lo with a residual); each step rounds the momentum, hi and lo to bf16, exactly
// as a sampled row's update stores them. A chunk of kLen elements stays in registers as the floats those bf16
// values stand for (a round trip through bf16 is exact for them), stored back as bf16 after the last step.
template <bool kResidual, bool kMomentum, int64_t kLen>
inline void replay_chunk_bf16(uint16_t* __restrict ch, uint16_t* __restrict lo, uint16_t* __restrict m,
                              const float* lrs, int64_t n, float mu, float wd) {
  float hr[kLen], lr_[kLen], mr[kLen];
  for (int64_t j = 0; j < kLen; ++j) {
    hr[j] = bf16_to_f32(ch[j]);
    lr_[j] = kResidual ? bf16_to_f32(lo[j]) : 0.f;
    mr[j] = kMomentum ? bf16_to_f32(m[j]) : 0.f;
  }
  for (int64_t s = 0; s < n; ++s) {
    const float lr = lrs[s], decay = std::fma(-lr, wd, 1.f);
    for (int64_t j = 0; j < kLen; ++j) {  // simd without AVX512-BF16 (there, only tails of kLen 1 run here)
      float value = kResidual ? hr[j] + lr_[j] : hr[j];
      if (kMomentum) {
        const float mj = std::fma(mu, mr[j], wd * value);
        mr[j] = round_to_bf16(mj);
        value = std::fma(-lr, mj, value);
      } else {
        value *= decay;
      }
      hr[j] = round_to_bf16(value);
      if (kResidual) lr_[j] = round_to_bf16(value - hr[j]);
    }
  }
  for (int64_t j = 0; j < kLen; ++j) {
    ch[j] = bf16_bits(hr[j]);
    if (kResidual) lo[j] = bf16_bits(lr_[j]);
    if (kMomentum) m[j] = bf16_bits(mr[j]);
  }
}

#if defined(__AVX512BF16__)
// replay_chunk_bf16 for kVectors x 16 elements with the CPU's bf16 conversion: the same operations in the same order.
// kChecked = false rounds with the bare instruction, which flushes subnormal inputs, and stores nothing and returns
// false if it met one (|x| < 1.2e-38, rare in training); the caller then replays the chunk again with kChecked,
// whose rounding takes those lanes one by one. The per-rounding check and branch cost ~1/4 of the replay's time.
template <bool kResidual, bool kMomentum, int kVectors, bool kChecked>
inline bool replay_chunk_bf16_x16(uint16_t* __restrict ch, uint16_t* __restrict lo, uint16_t* __restrict m,
                                  const float* lrs, int64_t n, float mu, float wd) {
  __m512 hr[kVectors], lr_[kVectors], mr[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    hr[v] = load_bf16x16(ch + 16 * v);
    lr_[v] = kResidual ? load_bf16x16(lo + 16 * v) : _mm512_setzero_ps();
    mr[v] = kMomentum ? load_bf16x16(m + 16 * v) : _mm512_setzero_ps();
  }
  __mmask16 subnormal = 0;
  const auto round = [&subnormal](__m512 x) {
    return kChecked ? round_to_bf16(x) : facescale::round_to_bf16_noting(x, subnormal);
  };
  const __m512 mu_v = _mm512_set1_ps(mu), wd_v = _mm512_set1_ps(wd);
  for (int64_t s = 0; s < n; ++s) {
    const __m512 neg_lr = _mm512_set1_ps(-lrs[s]), decay = _mm512_set1_ps(std::fma(-lrs[s], wd, 1.f));
    for (int v = 0; v < kVectors; ++v) {
      __m512 value = kResidual ? _mm512_add_ps(hr[v], lr_[v]) : hr[v];
      if (kMomentum) {
        const __m512 mj = _mm512_fmadd_ps(mu_v, mr[v], _mm512_mul_ps(wd_v, value));
        mr[v] = round(mj);
        value = _mm512_fmadd_ps(neg_lr, mj, value);
      } else {
        value = _mm512_mul_ps(value, decay);
      }
      hr[v] = round(value);
      if (kResidual) lr_[v] = round(_mm512_sub_ps(value, hr[v]));
    }
  }
  if (subnormal) return false;
  for (int v = 0; v < kVectors; ++v) {  // the registers hold bf16 values: these conversions are exact
    store_bf16x16(ch + 16 * v, f32x16_to_bf16(hr[v]));
    if (kResidual) store_bf16x16(lo + 16 * v, f32x16_to_bf16(lr_[v]));
    if (kMomentum) store_bf16x16(m + 16 * v, f32x16_to_bf16(mr[v]));
  }
  return true;
}
#endif

#if defined(__AVX512BF16__)
// three arrays of 8 vectors: 24 of the 32 registers; a step's chain (add, multiply-adds, three roundings) is long,
// and 8 chunks in flight rather than 4 keep the vector units busy
constexpr int64_t kReplayChunkBf16 = 8 * facescale::kLanes;
#else
constexpr int64_t kReplayChunkBf16 = 4 * facescale::kLanes;  // three arrays: 12 registers
#endif

template <bool kResidual, bool kMomentum>
void replay_row_bf16(const Args& a, int64_t row, const LrSteps& steps, const Ahead& ahead) {
  const int64_t d = a.dim, off = row * d;
  const float mu = a.mu, wd = a.wd;
  uint16_t* __restrict ch = static_cast<uint16_t*>(a.centers) + off;
  uint16_t* __restrict lo = kResidual ? a.residual + off : nullptr;
  uint16_t* __restrict m = kMomentum ? static_cast<uint16_t*>(a.momentum) + off : nullptr;
  for_lr_batches(steps, [&](const float* lrs, int64_t n) {
    int64_t j = 0;
    for (; j + kReplayChunkBf16 <= d; j += kReplayChunkBf16) {
      for (int64_t i = j; i < j + kReplayChunkBf16; i += 2 * kLineFloats) prefetch_ahead(ahead, i);
#if defined(__AVX512BF16__)
      constexpr int kVectors = kReplayChunkBf16 / 16;
      uint16_t* const chunk_lo = kResidual ? lo + j : nullptr;
      uint16_t* const chunk_m = kMomentum ? m + j : nullptr;
      if (!replay_chunk_bf16_x16<kResidual, kMomentum, kVectors, false>(ch + j, chunk_lo, chunk_m, lrs, n, mu, wd)) {
        replay_chunk_bf16_x16<kResidual, kMomentum, kVectors, true>(ch + j, chunk_lo, chunk_m, lrs, n, mu, wd);
      }
#else
      replay_chunk_bf16<kResidual, kMomentum, kReplayChunkBf16>(ch + j, kResidual ? lo + j : nullptr,
                                                                  kMomentum ? m + j : nullptr, lrs, n, mu, wd);
#endif
    }
    for (; j < d; ++j) {  // the tail, element by element
      replay_chunk_bf16<kResidual, kMomentum, 1>(ch + j, kResidual ? lo + j : nullptr, kMomentum ? m + j : nullptr,
                                                 lrs, n, mu, wd);
    }
  });
}

// `ahead`: a row a catch-up will replay next, fetched a line at a time as this row's chunks are replayed.
void replay_row(const Args& a, int64_t row, const LrSteps& steps, const Ahead& ahead = Ahead{}) {
  if (!a.centers_bf16) {
    replay_row_f32(a, row, steps, ahead);
  } else if (a.residual) {
    if (a.momentum) replay_row_bf16<true, true>(a, row, steps, ahead);
    else replay_row_bf16<true, false>(a, row, steps, ahead);
  } else {
    if (a.momentum) replay_row_bf16<false, true>(a, row, steps, ahead);
    else replay_row_bf16<false, false>(a, row, steps, ahead);
  }
}

// 1 / max(||row||, eps) of a stored fp32 or bf16 row (bf16 widened into `scratch`, dim floats).
inline float stored_inv_norm(const void* rows, bool bf16, int64_t row, int64_t dim, float* scratch, float eps) {
  if (!bf16) return inv_norm(static_cast<const float*>(rows) + row * dim, dim, eps);
  const uint16_t* h = static_cast<const uint16_t*>(rows) + row * dim;
  for (int64_t j = 0; j < dim; ++j) scratch[j] = bf16_to_f32(h[j]);
  return inv_norm(scratch, dim, eps);
}

// fp32 storage, no residual: a sampled row and its momentum are updated where they lie (one read, one write).
void update_row_f32(const Args& a, int64_t row, int64_t k, float* __restrict g, const Ahead& ahead) {
  const int64_t d = a.dim, off = row * d;
  const float lr = a.lr, mu = a.mu, wd = a.wd, decay = std::fma(-a.lr, a.wd, 1.f);
  float* __restrict w = static_cast<float*>(a.centers) + off;
  const float* p = static_cast<const float*>(a.grad) + k * d;
  if (a.grad_bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(a.grad) + k * d;
    for (int64_t j = 0; j < d; ++j) g[j] = bf16_to_f32(src[j]);  // simd
    p = g;
  }
  const float coef = a.proj_inv ? dot(w, p, d) * a.proj_inv[k] * a.proj_inv[k] : 0.f;
  if (a.momentum) {
    float* __restrict m = static_cast<float*>(a.momentum) + off;
    for (int64_t j0 = 0; j0 < d; j0 += kLineFloats) {
      prefetch_ahead(ahead, j0);
      for (int64_t j = j0; j < std::min(d, j0 + kLineFloats); ++j) {  // simd
        const float mj = std::fma(mu, m[j], std::fma(wd, w[j], std::fma(-coef, w[j], p[j])));
        m[j] = mj;
        w[j] = std::fma(-lr, mj, w[j]);
      }
    }
  } else {
    for (int64_t j0 = 0; j0 < d; j0 += kLineFloats) {
      prefetch_ahead(ahead, j0);
      for (int64_t j = j0; j < std::min(d, j0 + kLineFloats); ++j) {  // simd
        w[j] = std::fma(w[j], decay, -lr * std::fma(-coef, w[j], p[j]));
      }
    }
  }
  if (a.inv_norms) a.inv_norms[row] = inv_norm(w, d, a.eps);
}

#if defined(__AVX512BF16__)
// One 16-element step of a bf16 row update (both AVX512-BF16 loops below): from the row's hi values and the
// gradient, writes the momentum, hi and lo at m, ch and lo, and returns the stored hi as floats.
struct Bf16Step {
  __m512 neg_coef, mu, wd, neg_lr, decay;
  Bf16Step(const Args& a, float coef)
      : neg_coef(_mm512_set1_ps(-coef)), mu(_mm512_set1_ps(a.mu)), wd(_mm512_set1_ps(a.wd)),
        neg_lr(_mm512_set1_ps(-a.lr)), decay(_mm512_set1_ps(std::fma(-a.lr, a.wd, 1.f))) {}

  template <bool kResidual, bool kMomentum>
  __m512 update(__m512 hi, __m512 gradient, uint16_t* ch, uint16_t* lo, uint16_t* m) const {
    __m512 value = kResidual ? _mm512_add_ps(hi, load_bf16x16(lo)) : hi;
    const __m512 grad = _mm512_fmadd_ps(neg_coef, hi, gradient);
    if (kMomentum) {
      const __m512 mj = _mm512_fmadd_ps(mu, load_bf16x16(m), _mm512_fmadd_ps(wd, value, grad));
      store_bf16x16(m, f32x16_to_bf16(mj));
      value = _mm512_fmadd_ps(neg_lr, mj, value);
    } else {
      value = _mm512_fmadd_ps(value, decay, _mm512_mul_ps(neg_lr, grad));
    }
    const __m256i stored_bits = f32x16_to_bf16(value);
    const __m512 stored = bf16x16_to_f32(stored_bits);
    store_bf16x16(ch, stored_bits);
    if (kResidual) store_bf16x16(lo, f32x16_to_bf16(_mm512_sub_ps(value, stored)));
    return stored;
  }
};
#endif

// Half-precision storage: hi (and the momentum) are bf16; the value is hi + lo when a residual is kept. The
// gradient is projected with hi (the row the forward used); the update, rounding and residual run in one loop.
template <bool kResidual, bool kMomentum>
void update_row_bf16(const Args& a, int64_t row, int64_t k, float* __restrict w, float* __restrict g,
                     const Ahead& ahead) {
  const int64_t d = a.dim, off = row * d;
  const float lr = a.lr, mu = a.mu, wd = a.wd, decay = std::fma(-a.lr, a.wd, 1.f);
  uint16_t* __restrict ch = static_cast<uint16_t*>(a.centers) + off;
  uint16_t* __restrict lo = kResidual ? a.residual + off : nullptr;
  uint16_t* __restrict m = kMomentum ? static_cast<uint16_t*>(a.momentum) + off : nullptr;
  for (int64_t j = 0; j < d; ++j) w[j] = bf16_to_f32(ch[j]);  // simd
  if (a.grad_bf16) {
    const uint16_t* __restrict p = static_cast<const uint16_t*>(a.grad) + k * d;
    for (int64_t j = 0; j < d; ++j) g[j] = bf16_to_f32(p[j]);  // simd
  } else {
    std::memcpy(g, static_cast<const float*>(a.grad) + k * d, d * sizeof(float));
  }
  const float coef = a.proj_inv ? dot(w, g, d) * a.proj_inv[k] * a.proj_inv[k] : 0.f;
  int64_t done = 0;  // elements updated 16 at a time with the CPU's bf16 conversion (the same operations)
#if defined(__AVX512BF16__)
  const Bf16Step step(a, coef);
  for (; done + kLineFloats <= d; done += kLineFloats) {
    const int64_t j = done;
    prefetch_ahead(ahead, j);
    const __m512 stored = step.update<kResidual, kMomentum>(_mm512_loadu_ps(w + j), _mm512_loadu_ps(g + j), ch + j,
                                                            kResidual ? lo + j : nullptr, kMomentum ? m + j : nullptr);
    _mm512_storeu_ps(w + j, stored);
  }
#endif
  for (int64_t j0 = done; j0 < d; j0 += kLineFloats) {
    prefetch_ahead(ahead, j0);
    for (int64_t j = j0; j < std::min(d, j0 + kLineFloats); ++j) {  // simd
      const float hi = w[j];
      float value = kResidual ? hi + bf16_to_f32(lo[j]) : hi;
      const float grad = std::fma(-coef, hi, g[j]);
      if (kMomentum) {
        const float mj = std::fma(mu, bf16_to_f32(m[j]), std::fma(wd, value, grad));
        m[j] = f32_to_bf16(mj);
        value = std::fma(-lr, mj, value);
      } else {
        value = std::fma(value, decay, -lr * grad);
      }
      const float stored = round_to_bf16(value);
      ch[j] = bf16_bits(stored);
      if (kResidual) lo[j] = f32_to_bf16(value - stored);
      w[j] = stored;
    }
  }
  if (a.inv_norms) a.inv_norms[row] = inv_norm(w, d, a.eps);
}

#if defined(__AVX512BF16__)
inline float inv_norm_of_lanes(__m512 squares, float eps) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, squares);
  return inv_norm_of_lanes(lanes, eps);
}

inline float dot_of_lanes(__m512 products) {  // dot() of a row of whole vectors from its lane sums
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, products);
  return lane_tree(lanes) + 0.f;
}

// update_row_bf16 for a row of whole 16-lane vectors: the same operations in the same order (so the same bits),
// in two passes over the row instead of five: no fp32 copies of the row and its gradient, and the new row's norm
// summed inside the update's loop.
template <bool kResidual, bool kMomentum>
void update_row_bf16_x16(const Args& a, int64_t row, int64_t k, const Ahead& ahead) {
  const int64_t d = a.dim, off = row * d;
  uint16_t* __restrict ch = static_cast<uint16_t*>(a.centers) + off;
  uint16_t* __restrict lo = kResidual ? a.residual + off : nullptr;
  uint16_t* __restrict m = kMomentum ? static_cast<uint16_t*>(a.momentum) + off : nullptr;
  const uint16_t* grad_half = a.grad_bf16 ? static_cast<const uint16_t*>(a.grad) + k * d : nullptr;
  const float* grad_full = a.grad_bf16 ? nullptr : static_cast<const float*>(a.grad) + k * d;
  auto grad_at = [&](int64_t j) { return grad_half ? load_bf16x16(grad_half + j) : _mm512_loadu_ps(grad_full + j); };
  float coef = 0.f;
  if (a.proj_inv) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j += 16) acc = _mm512_add_ps(acc, _mm512_mul_ps(load_bf16x16(ch + j), grad_at(j)));
    coef = dot_of_lanes(acc) * a.proj_inv[k] * a.proj_inv[k];
  }
  const Bf16Step step(a, coef);
  __m512 squares = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += kLineFloats) {
    prefetch_ahead(ahead, j);
    const __m512 stored = step.update<kResidual, kMomentum>(load_bf16x16(ch + j), grad_at(j), ch + j,
                                                            kResidual ? lo + j : nullptr, kMomentum ? m + j : nullptr);
    squares = _mm512_add_ps(squares, _mm512_mul_ps(stored, stored));
  }
  if (a.inv_norms) a.inv_norms[row] = inv_norm_of_lanes(squares, a.eps);
}
#endif

// Row `row` of a step: with its gradient row k (k >= 0), or a zero-gradient step (k < 0, a dense pass's
// unsampled row), after which its cached inverse norm is refreshed like a sampled row's.
void update_row(const Args& a, int64_t row, int64_t k, float* w, float* g, const Ahead& ahead = Ahead{}) {
  if (k < 0) {
    replay_row(a, row, LrSteps{&a.lr, 1, 0, 1});
    if (a.inv_norms) a.inv_norms[row] = stored_inv_norm(a.centers, a.centers_bf16, row, a.dim, w, a.eps);
  } else if (!a.centers_bf16) {
    update_row_f32(a, row, k, g, ahead);  // the wrapper accepts only fp32 state and no residual with fp32 centers
#if defined(__AVX512BF16__)
  } else if (a.dim % 16 == 0) {
    if (a.residual && a.momentum) update_row_bf16_x16<true, true>(a, row, k, ahead);
    else if (a.residual) update_row_bf16_x16<true, false>(a, row, k, ahead);
    else if (a.momentum) update_row_bf16_x16<false, true>(a, row, k, ahead);
    else update_row_bf16_x16<false, false>(a, row, k, ahead);
#endif
  } else if (a.residual) {
    if (a.momentum) update_row_bf16<true, true>(a, row, k, w, g, ahead);
    else update_row_bf16<true, false>(a, row, k, w, g, ahead);
  } else {
    if (a.momentum) update_row_bf16<false, true>(a, row, k, w, g, ahead);
    else update_row_bf16<false, false>(a, row, k, w, g, ahead);
  }
}

constexpr int64_t kAheadRows = 2;  // how far ahead the update, the catch-up and the gather fetch (1-4: within noise)

Ahead ahead_of(const Args& a, int64_t row) {
  const int64_t center_bytes = a.centers_bf16 ? 2 : 4;
  Ahead ahead;
  ahead.rows[0] = static_cast<const char*>(a.centers) + row * a.dim * center_bytes;
  ahead.element_bytes[0] = center_bytes;
  if (a.momentum) {
    ahead.rows[1] = static_cast<const char*>(a.momentum) + row * a.dim * center_bytes;
    ahead.element_bytes[1] = center_bytes;
  }
  if (a.residual) {
    ahead.rows[2] = reinterpret_cast<const char*>(a.residual + row * a.dim);
    ahead.element_bytes[2] = 2;
  }
  return ahead;
}

inline int64_t grad_row(const Args& a, int64_t k) { return a.rows ? a.rows[k] : a.row_base + k; }

// Sampled rows are scattered: fetch the next row's centers, residual and momentum while this one computes
// (the hardware prefetcher only catches up a few lines into each 1-2 KB row). Always inlined: GCC judges a
// separate function made only of prefetches free of effects and deletes its calls (it did here until
// 2026-12: the sampled-row update ran 1.4-1.7x slower; tests/test_center_kernels.py now checks the binary).
__attribute__((always_inline)) inline void prefetch_row(const Args& a, int64_t row) {
  const Ahead ahead = ahead_of(a, row);  // a row's arrays share one element size: one line of each per step
  for (int64_t j = 0; j < a.dim; j += 64 / ahead.element_bytes[0]) prefetch_ahead(ahead, j);
}

// Gradient rows [k0, k1) and, for dense calls, shard rows [r0, r1).
void run_range(const Args& a, int64_t k0, int64_t k1, int64_t r0, int64_t r1) {
  std::vector<float> w(a.dim), g(a.dim);
  if (r1 <= r0) {
    for (int64_t k = k0; k < k1; ++k) {
      const Ahead ahead = k + kAheadRows < k1 ? ahead_of(a, grad_row(a, k + kAheadRows)) : Ahead{};
      update_row(a, grad_row(a, k), k, w.data(), g.data(), ahead);
    }
    return;
  }
  int64_t k = k0;
  for (int64_t row = r0; row < r1; ++row) {
    const bool has = k < k1 && grad_row(a, k) == row;
    update_row(a, row, has ? k : -1, w.data(), g.data());
    if (has) ++k;
  }
}

int64_t first_grad_at_or_after(const Args& a, int64_t row) {  // binary search in the sorted rows
  int64_t lo = 0, hi = a.n_grad;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (grad_row(a, mid) < row) lo = mid + 1; else hi = mid;
  }
  return lo;
}

}  // namespace

extern "C" {

int facescale_center_sgd(
    int64_t dim, int64_t n_grad, const int64_t* rows, int64_t row_base, const void* grad, int32_t grad_bf16,
    const float* proj_inv, int64_t row_begin, int64_t row_end, void* centers, int32_t centers_bf16,
    uint16_t* residual, void* momentum, int32_t momentum_bf16, float* inv_norms, float lr, float mu, float wd,
    float eps, int32_t threads) {
  if (dim <= 0 || dim > 65536) return 1;
  if (momentum && momentum_bf16 != centers_bf16) return 2;  // state is stored like the centers
  if (residual && !centers_bf16) return 2;
  const Args a{dim, n_grad, rows, row_base, grad, grad_bf16, proj_inv, row_begin, row_end, centers,
               centers_bf16, residual, momentum, momentum_bf16, inv_norms, lr, mu, wd, eps};
  const bool dense = row_end > row_begin;
  const int64_t work = dense ? row_end - row_begin : n_grad;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, work / 64));
  facescale::run_members(parts, [&](int64_t member) {
    const int64_t p = parts - 1 - member;  // the caller takes the last part
    int64_t k0, k1, r0 = 0, r1 = 0;
    if (dense) {
      r0 = row_begin + work * p / parts;
      r1 = row_begin + work * (p + 1) / parts;
      k0 = first_grad_at_or_after(a, r0);
      k1 = first_grad_at_or_after(a, r1);
    } else {
      k0 = work * p / parts;
      k1 = work * (p + 1) / parts;
    }
    run_range(a, k0, k1, r0, r1);
  });
  return 0;
}

// Bring rows up to `applied` steps: row r has seen row_steps[r] steps; step n (1-based) used lr_history[n % history].
// rows: n shard rows (any order, unique) or null = all of [0, n). out (optional): each row's storage copied to
// out[k] afterwards (the forward's gathered weight). inv_norms[row] is refreshed for every row brought forward.
int facescale_center_catch_up(
    int64_t dim, int64_t n, const int64_t* rows, int64_t* row_steps, int64_t applied, const float* lr_history,
    int64_t history, void* centers, int32_t centers_bf16, uint16_t* residual, void* momentum, float* inv_norms,
    float mu, float wd, float eps, void* out, int32_t threads) {
  if (dim <= 0 || dim > 65536 || history <= 0) return 1;
  if (residual && !centers_bf16) return 2;
  const int64_t row_bytes = dim * (centers_bf16 ? 2 : 4);
  auto body = [=](int64_t k0, int64_t k1) {
    std::vector<float> w(dim);
    Args a{dim, 0, nullptr, 0, nullptr, 0, nullptr, 0, 0, centers, centers_bf16, residual, momentum,
           centers_bf16, nullptr, 0.f, mu, wd, eps};
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t row = rows ? rows[k] : k;
      // the row after next, if it will be read (a second call for rows already current only checks their
      // counts): fetched a line at a time during this row's replay, or at once when this row has none
      const bool fetch = k + kAheadRows < k1 && rows && (out || row_steps[rows[k + kAheadRows]] < applied);
      const Ahead ahead = fetch ? ahead_of(a, rows[k + kAheadRows]) : Ahead{};
      const int64_t missed = applied - row_steps[row];
      if (missed <= 0 && fetch) prefetch_row(a, rows[k + kAheadRows]);
      if (missed > 0) {
        replay_row(a, row, LrSteps{lr_history, history, row_steps[row] + 1, missed}, ahead);
        row_steps[row] = applied;
        if (inv_norms) inv_norms[row] = stored_inv_norm(centers, centers_bf16, row, dim, w.data(), eps);
      }
      if (out) {
        copy_row_streaming(static_cast<char*>(out) + k * row_bytes,
                           static_cast<const char*>(centers) + row * row_bytes, row_bytes);
      }
    }
    streaming_done();
  };
  split_range(0, n, threads, 256, body);
  return 0;
}

// out[i] = 1 / max(||row i||, eps) for n rows of fp32 or bf16, with the update kernel's summation order.
int facescale_inv_norms(const void* rows, int32_t bf16, int64_t n, int64_t dim, float* out, float eps,
                        int32_t threads) {
  auto body = [=](int64_t i0, int64_t i1) {
    std::vector<float> w(dim);
    for (int64_t i = i0; i < i1; ++i) out[i] = stored_inv_norm(rows, bf16, i, dim, w.data(), eps);
  };
  split_range(0, n, threads, 1024, body);
  return 0;
}

// dst[k] = src[index[k]] for rows of `row_bytes` bytes (the forward's gather of sampled centers).
int facescale_gather_rows(const char* src, const int64_t* index, int64_t n, int64_t row_bytes, char* dst,
                          int32_t threads) {
  auto body = [=](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      // scattered rows: the row after next is requested a line at a time while this one is copied
      const char* ahead = k + kAheadRows < k1 ? src + index[k + kAheadRows] * row_bytes : nullptr;
      copy_row_streaming(dst + k * row_bytes, src + index[k] * row_bytes, row_bytes, ahead);
    }
    streaming_done();
  };
  split_range(0, n, threads, 256, body);
  return 0;
}

}  // extern "C"
