// Helpers shared by the CPU attention kernels (csrc/stream_attention.cpp,
// csrc/causal_stream_attention.cpp): the dropout RNG -- triton's tl.rand, so
// that the CPU and Triton backends draw the same mask for the same seed -- and
// the D-long vector loops (fixed summation order: deterministic results; the
// dot product and the accumulation type are those of csrc/common.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"

namespace plr_kernels {
namespace attention_cpu {

// ---------------------------------------------------------------- dropout RNG

inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// tl.rand(seed, offset) of triton/language/random.py for an int64 offset:
// Philox4x32 with 10 rounds, counter (offset_lo, offset_hi, 0, 0), key
// (seed_lo, seed_hi); the first word x, read as int32, folded to x >= 0
// (x < 0 -> ~x) and scaled by 4.6566127342e-10 in float32.
inline float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// The keep-mask of one (b, h, m) row: one Philox draw per key, compared with
// p in float32 as the Triton kernel does.
struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  float p = 0.f;        // compared with the uniforms in float32, as triton does
  double keep_scale = 1.0;  // 1 / (1 - p) of the exact (double) dropout_p
  int64_t row_len = 0;  // N + S
  inline bool keep(int64_t row, int64_t j) const {
    return philox_uniform(seed, static_cast<uint64_t>(row * row_len + j)) >= p;
  }
};

// ------------------------------------------------------------- vector helpers

// y += a * x over D.
template <typename acc_t>
inline void axpy(acc_t* __restrict__ y, acc_t a, const acc_t* __restrict__ x, int64_t D) {
  for (int64_t k = 0; k < D; ++k) y[k] += a * x[k];
}

template <typename acc_t>
inline void scale_row(acc_t* __restrict__ y, acc_t a, int64_t D) {
  for (int64_t k = 0; k < D; ++k) y[k] *= a;
}

// `count` rows of D values as acc_t: the input itself when it already is
// acc_t, else widened into `scratch`.
template <typename acc_t, typename scalar_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t count, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < count; ++i) scratch[i] = static_cast<acc_t>(src[i]);
    return scratch;
  }
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* dst, const acc_t* src, int64_t count, acc_t factor) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<scalar_t>(src[i] * factor);
}


}  // namespace attention_cpu
}  // namespace plr_kernels
