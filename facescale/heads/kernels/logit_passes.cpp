// Element-wise passes over the head's [rows, cols] fp32 logits buffer, where cosines become logits, then
// probabilities, then the gradient (heads/norm_linear.py, heads/dist_cross_entropy.py). Each kernel is one
// pass over memory on all threads where torch would run two to four (scale, clamp, max; shift, exp, sum). At
// B = 512 x C' = 30k (61 MB, beyond the caches) the softmax passes take ~7 ms instead of ~17 and the bf16
// cosines ~25 ms instead of ~53 (GEMM included; benchmarks/results/head_parts_cpu.md, 2 threads).
//
// The bf16 GEMM's in-place widening and narrowing change the element size inside one buffer: an element's
// write may land on bytes that hold another element's input. A single ascending pass is safe; in parallel,
// the range is cut into waves such that every write of a wave lands only on inputs of finished waves and no
// wave reads bytes it writes (proofs beside each kernel), and each wave is split over the threads.
#include <cmath>
#include <limits>

#include "common.h"

namespace {

using facescale::bf16_to_f32;
using facescale::f32_to_bf16;
using facescale::kLanes;
using facescale::split_range;
using facescale::split_waves;

// One vector register of floats (GCC/Clang vector extension) at the width the target has: a wider type would
// be split, and GCC lowers its compare-selects to scalar code (6x slower on an AVX2-only CPU).
typedef float f32v __attribute__((vector_size(4 * kLanes)));
typedef int32_t i32v __attribute__((vector_size(4 * kLanes)));

inline f32v splat(float x) { return f32v{} + x; }

constexpr int64_t kMinWave = 1 << 14;  // smaller waves run on the calling thread
constexpr int64_t kBlock = 64;  // elements converted through a local block (read whole before it is written)

// block(i, c, len) over elements [i0, i1) of a [rows, cols] buffer, in ascending blocks of at most kBlock that
// never cross a row (c: the column of element i), so each block reads its whole input before writing.
// dst[0, len) = src[0, len) for len <= kBlock: a whole block's copy has a constant size, which the compiler
// inlines as vector moves (a call to libc's memmove per 64 elements was ~8% of a bf16 B = 512 step's time)
template <class T>
inline void copy_block(T* dst, const T* src, int64_t len) {
  if (len == kBlock) {
    std::memcpy(dst, src, kBlock * sizeof(T));
  } else {
    std::memcpy(dst, src, len * sizeof(T));
  }
}

template <class Block>
inline void for_row_blocks(int64_t i0, int64_t i1, int64_t cols, const Block& block) {
  for (int64_t i = i0; i < i1;) {
    const int64_t c = i % cols, len = std::min({kBlock, i1 - i, cols - c});
    block(i, c, len);
    i += len;
  }
}

// exp(x) in fp32 within ~1 ulp for x <= 88 (the softmax passes x - max <= 0), as plain arithmetic the compiler
// vectorises (no libm call in the loop): x = n ln2 + r, |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial
// (truncation < 1e-8 relative), times 2^n built in the exponent bits. Results below the smallest normal float
// (x < -87.3365) are 0, x > 88 gives +inf; NaN stays NaN.
inline float exp_f32(float x) {
  const float clamped = std::min(std::max(x, -87.3365f), 88.0f);  // NaN passes through both comparisons
  const float n = std::fma(clamped, 1.44269504088896341f, 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = std::fma(-n, 1.428606765330187e-06f, std::fma(-n, 0.693145751953125f, clamped));  // ln2 split
  float p = std::fma(1.0f / 5040.0f, r, 1.0f / 720.0f);  // Horner, one rounding per term
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, 4);
  const float value = p * two_n;
  return x < -87.3365f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : value);
}

}  // namespace

extern "C" {

// dst[r, c] = clamp(src[r, c] * scale[c], -1, 1) for a [rows, cols] block with row strides in elements (src
// may be dst): the fp32 GEMM's cosines, scaled in place, or on their way from a fresh product into a block
// of columns of the logits buffer (one pass instead of a copy and then a pass; NaN stays NaN).
int facescale_scale_clamp(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows,
                          int64_t cols, const float* scale, int32_t threads) {
  split_range(0, rows, threads, 8, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* in = src + r * src_stride;
      float* row = dst + r * dst_stride;
      for (int64_t c = 0; c < cols; ++c) {  // simd
        const float v = in[c] * scale[c];
        row[c] = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
      }
    }
  });
  return 0;
}

// out[i] = clamp(float(raw[i]) * scale[i % cols], -1, 1) for the n = rows * cols elements, where raw (bf16)
// is the upper half of out's bytes: raw[j] sits at out byte 2n + 2j. Writing out[i] (bytes 4i..4i+3)
// overwrites raw[2i - n] and raw[2i - n + 1] only (indices below i). Waves [a, b) with b = (a + n) / 2 from
// a = 0: a wave's writes reach raw below 2b - n = a (inputs of finished waves); its reads raw[a, b) sit at out
// indices [n/2 + a/2, n/2 + b/2) = [b, ...), written only by later waves.
int facescale_bf16_cosines_to_f32(const uint16_t* raw, const float* scale, int64_t rows, int64_t cols,
                                  float* out, int32_t threads) {
  const int64_t n = rows * cols;
  auto body = [=](int64_t i0, int64_t i1) {
    for_row_blocks(i0, i1, cols, [=](int64_t i, int64_t c, int64_t len) {
      float block[kBlock];
      for (int64_t j = 0; j < len; ++j) {  // simd
        const float v = bf16_to_f32(raw[i + j]) * scale[c + j];
        block[j] = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
      }
      copy_block(out + i, block, len);
    });
  };
  std::vector<int64_t> bounds{0};
  while (n - bounds.back() >= 2 * kMinWave) bounds.push_back((bounds.back() + n) / 2);
  bounds.push_back(n);  // the tail, below 2 kMinWave: one part, in one ascending pass
  split_waves(bounds, threads, kMinWave, body);
  return 0;
}

// out[i] = bf16(in[i] * scale[i % cols]) for n = rows * cols elements, out (bf16) over the lower half of in's
// bytes: writing out[i] (bytes 2i, 2i+1) overwrites in[i / 2] only. Waves [a, 2a) after a first ascending
// [0, kMinWave): a wave's writes reach in below a (finished), and it reads in[a, 2a), which no write of it
// reaches.
int facescale_f32_scaled_to_bf16(const float* in, const float* scale, int64_t rows, int64_t cols,
                                 uint16_t* out, int32_t threads) {
  const int64_t n = rows * cols;
  auto body = [=](int64_t i0, int64_t i1) {
    for_row_blocks(i0, i1, cols, [=](int64_t i, int64_t c, int64_t len) {
      float block[kBlock];
      uint16_t half[kBlock];
      copy_block(block, in + i, len);
      for (int64_t j = 0; j < len; ++j) half[j] = f32_to_bf16(block[j] * scale[c + j]);  // simd
      copy_block(out + i, half, len);
    });
  };
  std::vector<int64_t> bounds{0, std::min<int64_t>(n, kMinWave)};  // the first: one part, ascending
  while (bounds.back() < n) bounds.push_back(std::min<int64_t>(n, 2 * bounds.back()));
  split_waves(bounds, threads, kMinWave, body);
  return 0;
}

// x[r, :] *= scale; row_max[r] = max over columns c != skip[r] (skip < 0: all), -inf for none, NaN if any
// NaN: the margin softmax's logits before the target column is replaced by its margin logit.
int facescale_scale_row_max(float* x, int64_t rows, int64_t cols, float scale, const int64_t* skip,
                            float* row_max, int32_t threads) {
  split_range(0, rows, threads, 8, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = x + r * cols;
      const int64_t s = skip ? skip[r] : -1;
      const bool skipping = s >= 0 && s < cols;
      const float skipped = skipping ? row[s] : 0.0f;
      if (skipping) row[s] = -std::numeric_limits<float>::infinity();  // out of the max, restored below
      f32v best = splat(-std::numeric_limits<float>::infinity());
      i32v nan = {};  // lanes that saw a NaN (the max itself would skip it)
      int64_t c = 0;
      for (; c + kLanes <= cols; c += kLanes) {
        f32v v;
        std::memcpy(&v, row + c, sizeof v);
        v *= scale;
        std::memcpy(row + c, &v, sizeof v);
        best = v > best ? v : best;
        nan |= v != v;
      }
      float top = -std::numeric_limits<float>::infinity();
      bool any_nan = skipped != skipped;
      for (int l = 0; l < kLanes; ++l) {
        top = best[l] > top ? best[l] : top;
        any_nan |= nan[l] != 0;
      }
      for (; c < cols; ++c) {
        const float v = row[c] * scale;
        row[c] = v;
        top = v > top ? v : top;
        any_nan |= v != v;
      }
      if (skipping) row[s] = skipped * scale;
      row_max[r] = any_nan ? std::numeric_limits<float>::quiet_NaN() : top;
    }
  });
  return 0;
}

// x[r, c] = exp(x[r, c] - shift[r]); sums[r] = sum over the row (fp32 lanes per 1024 columns, then double).
int facescale_exp_row_sums(float* x, int64_t rows, int64_t cols, const float* shift, float* sums,
                           int32_t threads) {
  split_range(0, rows, threads, 8, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = x + r * cols;
      const float m = shift[r];
      double total = 0.0;
      for (int64_t c0 = 0; c0 < cols; c0 += 1024) {
        const int64_t c1 = std::min(cols, c0 + 1024);
        float lanes[16] = {0.f};
        int64_t c = c0;
        for (; c + 16 <= c1; c += 16) {
          for (int l = 0; l < 16; ++l) {  // simd
            const float e = exp_f32(row[c + l] - m);
            row[c + l] = e;
            lanes[l] += e;
          }
        }
        for (; c < c1; ++c) {
          const float e = exp_f32(row[c] - m);
          row[c] = e;
          lanes[0] += e;
        }
        for (const float lane : lanes) total += lane;
      }
      sums[r] = static_cast<float>(total);
    }
  });
  return 0;
}

}  // extern "C"
