// The ids of the k largest of n non-negative fp32 scores, in ascending id order: Partial FC's draw of negatives
// (uniform scores, positives scored 2.0; heads/sampling.py). torch.topk plus a sort of the ids costs ~13 ms at
// n = 1M, k = 300k on 2 cores; a radix select on the scores' bits and one ordered scan ~4 ms, on one core.
// Ties at the k-th value are taken lowest id first (torch.topk leaves them to its implementation).
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline uint32_t key_of(float score) {  // non-negative floats order like their bit patterns
  uint32_t bits;
  std::memcpy(&bits, &score, 4);
  return bits;
}

}  // namespace

extern "C" {

// out[0..k) = the ids; returns 1 for a score that is negative or NaN (their bits would not sort), else 0.
int facescale_top_k_sorted(const float* scores, int64_t n, int64_t k, int64_t* out) {
  if (k <= 0) return 0;
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = i;
    return 0;
  }
  // The k-th largest key, 16 bits at a time: count the candidates' keys by their high half, find the bucket
  // that holds the k-th from the top, then count that bucket's members by their low half.
  std::vector<int64_t> counts(1 << 16);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = key_of(scores[i]);
    if (key >> 31 || key > 0x7f800000u) return 1;
    ++counts[key >> 16];
  }
  int64_t above = 0;  // keys strictly above the current bucket
  uint32_t high = 0xffff;
  while (above + counts[high] < k) above += counts[high--];
  std::fill(counts.begin(), counts.end(), 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = key_of(scores[i]);
    if (key >> 16 == high) ++counts[key & 0xffff];
  }
  uint32_t low = 0xffff;
  while (above + counts[low] < k) above += counts[low--];
  const uint32_t threshold = high << 16 | low;
  int64_t ties = k - above;  // how many ids with key == threshold to take, lowest first
  int64_t taken = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = key_of(scores[i]);
    if (key > threshold || (key == threshold && ties-- > 0)) out[taken++] = i;
  }
  return 0;
}

}  // extern "C"
