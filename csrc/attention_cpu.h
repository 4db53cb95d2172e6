// Helpers shared by the CPU attention kernels (csrc/stream_attention.cpp,
// csrc/causal_stream_attention.cpp): the dropout RNG -- triton's tl.rand, so
// that the CPU and Triton backends draw the same mask for the same seed -- and
// the D-long vector loops (fixed summation order: deterministic results; the
// dot product and the accumulation type are those of csrc/common.h).
#pragma once

#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <optional>
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

// The dropout of one call from the op's arguments (seed: int64 [1], read only
// when dropout_p > 0); row_len = N + S keys per row of the keep-mask.
inline Dropout make_dropout(int64_t row_len, double dropout_p, const std::optional<at::Tensor>& seed) {
  Dropout drop;
  if (dropout_p > 0.0) {
    drop.on = true;
    drop.seed = static_cast<uint64_t>(seed->item<int64_t>());  // two's complement, as triton
    drop.p = static_cast<float>(dropout_p);  // triton receives p as a float32 argument
    drop.keep_scale = 1.0 / (1.0 - dropout_p);
    drop.row_len = row_len;
  }
  return drop;
}

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


// ---------------------------------------------------------------- backward

// One (query row, key) term of the attention backward, for the query q of
// keep-mask row `row` (its dO, lse and Delta = dO . o) and key j (k, v):
// p = exp(scale q.k - lse), dp = dO.v; with dropout, pd = keep p / (1 - p_drop)
// (so dv += pd dO) and dp -> keep dp / (1 - p_drop); ds = p (dp - Delta)
// (so dq += scale ds k, dk += scale ds q).
template <typename acc_t>
struct BackwardTerm {
  acc_t pd, ds;
};

template <typename acc_t>
inline BackwardTerm<acc_t> backward_term(const acc_t* q, const acc_t* dout, acc_t lse, acc_t delta,
                                         const acc_t* k, const acc_t* v, int64_t D, acc_t scale,
                                         const Dropout& drop, acc_t keep_scale, int64_t row, int64_t j) {
  const acc_t p = std::exp(scale * dot(q, k, D) - lse);
  acc_t dp = dot(dout, v, D), pd = p;
  if (drop.on) {
    const bool kept = drop.keep(row, j);
    pd = kept ? p * keep_scale : acc_t(0);
    dp = kept ? dp * keep_scale : acc_t(0);
  }
  return {pd, p * (dp - delta)};
}

}  // namespace attention_cpu
}  // namespace plr_kernels
