// Attention-probability dropout of latent_attention: a counter-based keep mask, so the backward regenerates
// the forward's mask from (seed, element) instead of storing it. Element (b, h, t, j) = (sequence, query
// head, query row of the call, cache row of the key) has the counter
//   offset = ((b * Hq + h) * Sq + t) * Tmax + j
// and is kept when the first word of Philox-4x32-10(counter = (offset_lo, offset_hi, 0, 0), key = (seed_lo,
// seed_hi)), shifted right by 8 bits, is >= floor(p * 2^24): the word Triton's tl.randint(seed, offset) gives,
// so the Triton kernels, these CPU kernels and coconut_kernels.reference.attention_dropout_keep (the tests'
// oracle) draw the same mask. Kept probabilities are scaled by 1 / (1 - p).
#pragma once
#include <cmath>
#include <cstdint>

#include "common.h"

namespace coconut {

inline uint32_t philox_first_word(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = uint64_t{0xD2511F53u} * c0, pb = uint64_t{0xCD9E8D57u} * c2;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// The dropout of one call: no dropout when p == 0.
struct Dropout {
  double p = 0.0;
  uint64_t seed = 0;
  uint32_t threshold = 0;  // drop when the 24-bit draw is below it
  double keep_scale = 1.0;
  Dropout(double p_, int64_t seed_) : p(p_), seed(static_cast<uint64_t>(seed_)) {
    COCONUT_CHECK(std::isfinite(p_) && p_ >= 0.0 && p_ < 1.0, "dropout_p must be in [0, 1), got ", p_);
    COCONUT_CHECK(seed_ >= 0, "dropout_seed must be >= 0, got ", seed_);
    threshold = static_cast<uint32_t>(std::floor(p_ * 16777216.0));
    keep_scale = 1.0 / (1.0 - p_);
  }
  bool on() const { return p > 0.0; }
  // f[j] = keep ? 1 / (1 - p) : 0 for the keys of counters offset0 + j, j < n.
  template <typename acc_t>
  void factors(acc_t* f, int64_t n, uint64_t offset0) const {
    const acc_t scale = static_cast<acc_t>(keep_scale);
    for (int64_t j = 0; j < n; ++j)
      f[j] = (philox_first_word(seed, offset0 + j) >> 8) >= threshold ? scale : acc_t(0);
  }
};

}  // namespace coconut
