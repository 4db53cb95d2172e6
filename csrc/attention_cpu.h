// What the CPU attention kernels (csrc/stream_attention.cpp,
// csrc/causal_stream_attention.cpp) share: the dropout RNG -- triton's tl.rand, so
// that the CPU and Triton backends draw the same mask for the same seed -- and
// the D-long vector loops (fixed summation order: deterministic results; the
// dot product and the accumulation type are those of csrc/common.h), and the
// whole backward, which both forms run with their own rows per key.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

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


// ----------------------------------------------------------------- forward

// The last step of the forward of one query row (keep-mask row `row`): its S
// own-stream keys 1..S (always valid) merged into the running max m and sum l
// of the online softmax over the prefix, then o = acc / l (times 1/(1-p)
// under dropout) and lse = m + log l. q: the row's query (acc_t); KS / VS the
// row's S keys and values; acc: its running sum_j p_j v_j; sc, sbuf: scratch
// of S and S*D values.
template <typename acc_t, typename scalar_t>
inline void finish_row_with_own_stream(int64_t row, const acc_t* q, const scalar_t* KS, const scalar_t* VS,
                                       int64_t N, int64_t S, int64_t D, acc_t scale, const Dropout& drop,
                                       acc_t keep_scale, acc_t& m_i, acc_t& l_i, acc_t* acc, acc_t* sc,
                                       acc_t* sbuf, scalar_t* O, acc_t* LSE) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t* ks = as_acc(KS, S * D, sbuf);
  acc_t s_max = neg_inf;
  for (int64_t j = 0; j < S; ++j) {
    sc[j] = scale * dot(q, ks + j * D, D);
    s_max = std::max(s_max, sc[j]);
  }
  const acc_t m_new = std::max(m_i, s_max);
  const acc_t alpha = m_i == neg_inf ? acc_t(0) : std::exp(m_i - m_new);
  if (alpha != acc_t(1)) scale_row(acc, alpha, D);
  const acc_t* vs = as_acc(VS, S * D, sbuf);
  acc_t sum = 0;
  for (int64_t j = 0; j < S; ++j) {
    const acc_t e = std::exp(sc[j] - m_new);
    sum += e;
    if (drop.on && !drop.keep(row, N + j)) continue;
    axpy(acc, e, vs + j * D, D);
  }
  l_i = l_i * alpha + sum;
  m_i = m_new;
  const acc_t inv = (drop.on ? keep_scale : acc_t(1)) / l_i;
  store(O + row * D, acc, D, inv);
  LSE[row] = m_i + std::log(l_i);
}

// One online-softmax step of a row over a prefix tile (PLR Eq. 4): on entry
// pr[0, t_end) holds the row's scores (-inf where !valid[t]) and tile_max their
// maximum (finite); on exit pr holds exp(s - m_new), 0 where dropped or
// invalid, (m_i, l_i) the running max and sum (before dropout: lse is
// dropout-free) and acc the row's running sum rescaled to m_new. Keys j0 + t of
// keep-mask row `row`.
template <typename acc_t>
inline void online_softmax_tile(acc_t* __restrict__ pr, const char* valid, int64_t t_end, acc_t tile_max,
                                const Dropout& drop, int64_t row, int64_t j0, acc_t& m_i, acc_t& l_i,
                                acc_t* acc, int64_t D) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  // m_new >= a finite valid score, so exp never sees inf - inf.
  const acc_t m_new = std::max(m_i, tile_max);
  const acc_t alpha = m_i == neg_inf ? acc_t(0) : std::exp(m_i - m_new);
  acc_t sum = 0;
  for (int64_t t = 0; t < t_end; ++t) {
    const acc_t e = valid[t] ? std::exp(pr[t] - m_new) : acc_t(0);
    sum += e;
    pr[t] = (drop.on && !drop.keep(row, j0 + t)) ? acc_t(0) : e;
  }
  l_i = l_i * alpha + sum;
  m_i = m_new;
  if (alpha != acc_t(1)) scale_row(acc, alpha, D);
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

// The backward of both attention forms, per (b, h) of B*H: R query rows (the
// M streams of csrc/stream_attention.cpp, or the N*M (position, stream) rows
// of csrc/causal_stream_attention.cpp), each with its S own-stream keys, and N
// prefix keys, of which key j is seen by the rows [first_row(j), R) (when
// mask[b, j], if given). With P = exp(s - lse) recomputed, Delta_r = dO_r.O_r
// and ds = P (dP - Delta): dq_r = scale sum ds k, dk_j = scale sum_r ds q_r,
// dv_j = sum_r P~ dO_r (P~ the dropped, rescaled probabilities). A prefix
// key's dk/dv are summed over its rows inside the task: no atomics, and every
// output's summation order is fixed (deterministic for any thread count).
template <typename scalar_t, typename FirstRow>
void attention_backward(int64_t B, int64_t H, int64_t R, int64_t N, int64_t S, int64_t D, const bool* mask,
                        double scale_in, const Dropout& drop, FirstRow first_row, const scalar_t* DO,
                        const scalar_t* Q, const scalar_t* KP, const scalar_t* VP, const scalar_t* KS,
                        const scalar_t* VS, const scalar_t* O, const acc_type<scalar_t>* LSE, scalar_t* DQ,
                        scalar_t* DKP, scalar_t* DVP, scalar_t* DKS, scalar_t* DVS) {
  using acc_t = acc_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(scale_in);
  const acc_t keep_scale = static_cast<acc_t>(drop.keep_scale);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(R * D), dout(R * D), dq(R * D), delta(R), obuf(D);
    std::vector<acc_t> kbuf(D), vbuf(D), dk(D), dv(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const acc_t* qa = as_acc(Q + bh * R * D, R * D, q.data());
      if (qa != q.data()) std::copy(qa, qa + R * D, q.begin());
      const acc_t* da = as_acc(DO + bh * R * D, R * D, dout.data());
      if (da != dout.data()) std::copy(da, da + R * D, dout.begin());
      std::fill(dq.begin(), dq.end(), acc_t(0));
      for (int64_t r = 0; r < R; ++r) {  // Delta_r = dO_r . O_r (O as stored, dropout included)
        const acc_t* o = as_acc(O + (bh * R + r) * D, D, obuf.data());
        delta[r] = dot(dout.data() + r * D, o, D);
      }
      const acc_t* lse = LSE + bh * R;

      // Prefix key j: its dk/dv sum over the rows that see it, here.
      for (int64_t j = 0; j < N; ++j) {
        scalar_t* dk_out = DKP + (bh * N + j) * D;
        scalar_t* dv_out = DVP + (bh * N + j) * D;
        if (mask != nullptr && !mask[b * N + j]) {  // P = 0: no gradient
          std::fill(dk_out, dk_out + D, scalar_t(0));
          std::fill(dv_out, dv_out + D, scalar_t(0));
          continue;
        }
        const acc_t* k = as_acc(KP + (bh * N + j) * D, D, kbuf.data());
        const acc_t* v = as_acc(VP + (bh * N + j) * D, D, vbuf.data());
        std::fill(dk.begin(), dk.end(), acc_t(0));
        std::fill(dv.begin(), dv.end(), acc_t(0));
        for (int64_t r = first_row(j); r < R; ++r) {
          const acc_t* qr = q.data() + r * D;
          const acc_t* dor = dout.data() + r * D;
          const auto t = backward_term(qr, dor, lse[r], delta[r], k, v, D, scale, drop, keep_scale,
                                       bh * R + r, j);
          if (t.pd != acc_t(0)) axpy(dv.data(), t.pd, dor, D);
          if (t.ds != acc_t(0)) {
            axpy(dk.data(), t.ds, qr, D);
            axpy(dq.data() + r * D, t.ds, k, D);
          }
        }
        store(dk_out, dk.data(), D, scale);
        store(dv_out, dv.data(), D, acc_t(1));
      }

      // Own-stream keys: each belongs to one row, so no sum over rows.
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = bh * R + r;
        const acc_t* qr = q.data() + r * D;
        const acc_t* dor = dout.data() + r * D;
        for (int64_t i = 0; i < S; ++i) {
          const acc_t* k = as_acc(KS + (row * S + i) * D, D, kbuf.data());
          const acc_t* v = as_acc(VS + (row * S + i) * D, D, vbuf.data());
          const auto t = backward_term(qr, dor, lse[r], delta[r], k, v, D, scale, drop, keep_scale, row,
                                       N + i);
          store(DKS + (row * S + i) * D, qr, D, scale * t.ds);
          store(DVS + (row * S + i) * D, dor, D, t.pd);
          if (t.ds != acc_t(0)) axpy(dq.data() + r * D, t.ds, k, D);
        }
        store(DQ + row * D, dq.data() + r * D, D, scale);
      }
    }
  });
}

}  // namespace attention_cpu
}  // namespace plr_kernels
