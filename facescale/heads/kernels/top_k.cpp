// The ids of the k largest of n scores, in ascending id order: Partial FC's draw of negatives (uniform scores,
// positives scored above them all; heads/sampling.py). torch.topk plus a sort of the ids costs ~13 ms at
// n = 1M, k = 300k on 2 cores; a radix select on the scores' bits and one ordered scan ~4 ms, on one core.
// Ties at the k-th value are taken lowest id first (torch.topk leaves them to its implementation).
// facescale_draw_top_k also draws the scores (the stream torch.rand(n) takes from a CPU generator) and never writes
// them as floats: ~1/3 of the time of uniform_, index_fill_ and the select at n = 100k-1M.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline uint32_t key_of(float score) {  // non-negative floats order like their bit patterns
  uint32_t bits;
  std::memcpy(&bits, &score, 4);
  return bits;
}

// out[0..k) = the ids of the k largest of n keys, ascending, ties lowest id first, for 0 < k < n. A key's high
// part is key >> kLowBits; counts[h] holds how many keys have high part h (at least 2^kLowBits bins, as many as
// high parts; clobbered). key(i) returns the i-th key.
template <int kLowBits, typename Key>
void select_top_k(int64_t n, int64_t k, Key key, std::vector<int64_t>& counts, int64_t* out) {
  constexpr uint32_t kLowMask = (1u << kLowBits) - 1;
  // The bucket (high part) that holds the k-th largest key: every id above it is taken, some in it.
  int64_t above = 0;  // keys strictly above the current bucket
  uint32_t high = static_cast<uint32_t>(counts.size() - 1);
  while (above + counts[high] < k) above += counts[high--];
  // One pass over all ids, in order and without branches (~1 in 10 is kept, in no pattern a predictor could
  // follow), keeps the ids at or above the bucket; then the bucket's members alone are counted by their low part
  // for the k-th key and its ties, and the kept ids filtered.
  std::vector<int64_t> kept(above + counts[high] + 1);
  const uint32_t floor = high << kLowBits;
  int64_t size = 0;
  for (int64_t i = 0; i < n; ++i) {
    kept[size] = i;
    size += key(i) >= floor;
  }
  std::fill(counts.begin(), counts.begin() + kLowMask + 1, 0);
  for (int64_t j = 0; j < size; ++j) {
    const uint32_t value = key(kept[j]);
    if (value >> kLowBits == high) ++counts[value & kLowMask];
  }
  uint32_t low = kLowMask;
  while (above + counts[low] < k) above += counts[low--];
  const uint32_t threshold = floor | low;
  int64_t ties = k - above;  // how many ids with key == threshold to take, lowest first
  int64_t taken = 0;
  for (int64_t j = 0; j < size; ++j) {
    const uint32_t value = key(kept[j]);
    if (value > threshold || (value == threshold && ties-- > 0)) out[taken++] = kept[j];
  }
}

// The 32-bit Mersenne Twister (MT19937): the same outputs as std::mt19937 and as torch's CPU generator, which
// seeds it with the low 32 bits of manual_seed's value and draws one output per fp32 uniform. The state refill
// is three loops whose reads lie 1 and 227 words from their writes, so they vectorise (std::mt19937 refills a
// word per output).
class MersenneTwister {
 public:
  static constexpr int kN = 624, kM = 397;

  explicit MersenneTwister(uint32_t seed) {
    state_[0] = seed;
    for (int i = 1; i < kN; ++i) state_[i] = 1812433253u * (state_[i - 1] ^ (state_[i - 1] >> 30)) + i;
  }

  // out[0, kN) = the next kN outputs
  void next_block(uint32_t* out) {
    for (int i = 0; i < kN - kM; ++i) state_[i] = twist(state_[i], state_[i + 1], state_[i + kM]);  // simd
    for (int i = kN - kM; i < kN - 1; ++i) state_[i] = twist(state_[i], state_[i + 1], state_[i + kM - kN]);  // simd
    state_[kN - 1] = twist(state_[kN - 1], state_[0], state_[kM - 1]);
    for (int i = 0; i < kN; ++i) {  // simd
      uint32_t y = state_[i];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      out[i] = y ^ (y >> 18);
    }
  }

 private:
  static uint32_t twist(uint32_t word, uint32_t next, uint32_t far) {
    const uint32_t y = (word & 0x80000000u) | (next & 0x7fffffffu);
    return far ^ (y >> 1) ^ ((0u - (y & 1u)) & 0x9908b0dfu);
  }

  uint32_t state_[kN];
};

constexpr uint32_t kScoreBits = 24;                // torch.rand's fp32 uniform: (output & (2^24 - 1)) / 2^24
constexpr uint32_t kPositiveKey = 1u << kScoreBits;  // above every drawn score, as sampling.py's 2.0
constexpr int kDrawLowBits = 12;  // the draw's select splits its 25-bit keys into 13 high bits and 12 low

}  // namespace

extern "C" {

// out[0..k) = the ids; returns 1 for a score that is negative or NaN (their bits would not sort), else 0.
int facescale_top_k_sorted(const float* scores, int64_t n, int64_t k, int64_t* out) {
  if (k <= 0) return 0;
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = i;
    return 0;
  }
  std::vector<int64_t> counts(1 << 16);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = key_of(scores[i]);
    if (key >> 31 || key > 0x7f800000u) return 1;
    ++counts[key >> 16];
  }
  select_top_k<16>(n, k, [scores](int64_t i) { return key_of(scores[i]); }, counts, out);
  return 0;
}

// Partial FC's draw in one call: out[0..min(k, n)) = the ids of the k highest of the scores torch.rand(n) draws
// from a CPU generator seeded with `seed`, after the scores of ids positives[0..m) are raised above every
// drawn one (an id equal to n is a spare slot and ignored), ascending, ties lowest id first; the same ids as
// uniform_, index_fill_(positives, 2.0) and facescale_top_k_sorted. Returns 1 for an id outside [0, n].
int facescale_draw_top_k(uint64_t seed, int64_t n, const int64_t* positives, int64_t m, int64_t k,
                         int64_t* out) {
  for (int64_t j = 0; j < m; ++j) {
    if (positives[j] < 0 || positives[j] > n) return 1;
  }
  if (k <= 0) return 0;
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = i;
    return 0;
  }
  std::vector<uint32_t> keys(n);
  std::vector<int64_t> counts((kPositiveKey >> kDrawLowBits) + 1);  // high parts; the last: the positives
  MersenneTwister twister(static_cast<uint32_t>(seed));
  uint32_t block[MersenneTwister::kN];
  for (int64_t lo = 0; lo < n; lo += MersenneTwister::kN) {
    twister.next_block(block);
    const int64_t size = std::min<int64_t>(MersenneTwister::kN, n - lo);
    for (int64_t j = 0; j < size; ++j) {
      const uint32_t key = block[j] & (kPositiveKey - 1);
      keys[lo + j] = key;
      ++counts[key >> kDrawLowBits];
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    const int64_t id = positives[j];
    if (id == n || keys[id] == kPositiveKey) continue;
    --counts[keys[id] >> kDrawLowBits];
    ++counts[kPositiveKey >> kDrawLowBits];
    keys[id] = kPositiveKey;
  }
  select_top_k<kDrawLowBits>(n, k, [&keys](int64_t i) { return keys[i]; }, counts, out);
  return 0;
}

}  // extern "C"
