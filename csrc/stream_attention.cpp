// CPU kernels of plr_kernels::stream_attention_fwd / stream_attention_bwd
// (PLR Eq. 4-5): stream-isolated causal attention over a shared
// prefix KV cache, one reasoning step of one layer.
//
// Per (user b, head h) -- the unit of OpenMP parallelism -- with the M stream
// queries q_m, prefix keys/values k_n, v_n (n valid under prefix_mask) and the
// stream's own keys/values ks_{m,j}, vs_{m,j} (j = 1..S):
//
//   s_{m,n} = scale * q_m . k_n          (prefix, shared by all streams)
//   s_{m,N+j} = scale * q_m . ks_{m,j}   (own stream only, Eq. 4-5)
//   lse_m = log sum_j exp(s_{m,j}),  P_{m,j} = exp(s_{m,j} - lse_m)
//   o_m = sum_j P~_{m,j} v_j,        P~ = P * keep / (1 - p)  (dropout)
//
// Forward: all M queries are held while the prefix is streamed in tiles of
// kTile keys, so each prefix key/value is read once for all M streams; online
// softmax (running max m, running sum l, rescale by exp(m_old - m_new)) over
// the tiles, then the S own-stream keys merged into the same (m, l): the
// log-sum-exp merge lse = m + log l.
//
// Backward (FlashAttention style, recomputing P from lse):
//   Delta_m = dO_m . O_m,  dP_{m,j} = dO_m . v_j (times keep / (1-p)),
//   dS = P * (dP - Delta),  dq_m = scale * sum_j dS_{m,j} k_j,
//   dk_j = scale * sum_m dS_{m,j} q_m,  dv_j = sum_m P~_{m,j} dO_m.
// dk/dv of a prefix key sum over the M streams of its own (b, h) iteration:
// no atomics, a fixed summation order, bit-identical runs.
//
// Dropout: keep_{m,j} = U(seed, offset) >= p with offset
// ((b*H + h)*M + m)*(N+S) + j and U = triton's tl.rand (Philox4x32-10, first
// output word, mapped to [0,1) in float32), so the CPU and Triton backends
// draw the same mask for the same seed; the backward regenerates it.
//
// Accumulation in float (double for float64 inputs); inputs are widened once
// per row. Inner loops run over D contiguous elements (vectorised at -O3).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_cpu.h"
#include "stream_attention.h"

namespace plr_kernels {
namespace {

constexpr int64_t kTile = 64;  // prefix keys per online-softmax step of the forward

using namespace attention_cpu;  // philox_uniform, Dropout, dot, axpy, ... (attention_cpu.h)

// The two float32 inner loops of the forward, also compiled for AVX2 and
// picked at run time when the CPU has it (the build itself targets the
// baseline ISA). Same arithmetic in the same order as dot() / axpy() -- eight
// lanes combined as dot() combines them, mul then add (no FMA contraction,
// -ffp-contract=off) -- so both versions give the same bits; AVX2 only
// processes eight floats per instruction instead of four. Plain functions on
// raw pointers (no inline library code is instantiated for AVX2).
#if defined(__x86_64__) || defined(__i386__)
#define PLR_AVX2 __attribute__((target("avx2")))
#else  // no AVX2 elsewhere: the same loops for the baseline ISA, never chosen
#define PLR_AVX2
#endif

PLR_AVX2 void prefix_scores_avx2(const float* __restrict__ q,
                                                        const float* __restrict__ k, int64_t stride,
                                                        int64_t nt, int64_t D, float* __restrict__ out) {
  for (int64_t t = 0; t < nt; ++t) {
    const float* __restrict__ b = k + t * stride;
    float lane[8] = {};
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
      for (int j = 0; j < 8; ++j) lane[j] += q[i + j] * b[i + j];
    }
    for (int j = 0; i < D; ++i, ++j) lane[j] += q[i] * b[i];
    out[t] = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
  }
}

// acc_m += P_mt v_t for t ascending (valid keys, P != 0), m = 0..M-1.
PLR_AVX2 void prefix_values_avx2(float* __restrict__ acc, const float* __restrict__ p,
                                                        int64_t p_stride, int64_t M, const float* __restrict__ v,
                                                        int64_t stride, const char* valid, int64_t nt,
                                                        int64_t D) {
  for (int64_t t = 0; t < nt; ++t) {
    if (!valid[t]) continue;
    const float* __restrict__ x = v + t * stride;
    for (int64_t m = 0; m < M; ++m) {
      const float a = p[m * p_stride + t];
      if (a == 0.f) continue;
      float* __restrict__ y = acc + m * D;
      for (int64_t i = 0; i < D; ++i) y[i] += a * x[i];
    }
  }
}

inline bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}


struct Inputs {
  int64_t B, H, M, N, S, D;
  const bool* mask;  // [B, N] or nullptr
  double scale;
  Dropout drop;
};

// Element strides of a prefix cache [B, H, N, D] whose rows (D) are
// contiguous: the forward reads k_prefix / v_prefix in place in any such
// layout -- e.g. the head-split view [B, N, H, D] -> [B, H, N, D] that the
// encoder's projections give -- instead of copying them contiguous first.
struct RowLayout {
  int64_t b, h, n;
  template <typename T>
  inline const T* row(const T* base, int64_t bi, int64_t hi, int64_t ni) const {
    return base + bi * b + hi * h + ni * n;
  }
};

inline RowLayout row_layout(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// `count` rows of D values, `stride` apart, as acc_t rows: the input itself
// (same stride) when it already is acc_t, else widened into `scratch`
// (stride D). Returns the row pointer and sets `out_stride`.
template <typename acc_t, typename scalar_t>
inline const acc_t* rows_as_acc(const scalar_t* src, int64_t stride, int64_t count, int64_t D, acc_t* scratch,
                                int64_t& out_stride) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    out_stride = stride;
    return src;
  } else {
    for (int64_t r = 0; r < count; ++r)
      for (int64_t i = 0; i < D; ++i) scratch[r * D + i] = static_cast<acc_t>(src[r * stride + i]);
    out_stride = D;
    return scratch;
  }
}

// ------------------------------------------------------------------- forward

template <typename scalar_t>
void forward_kernel(const Inputs& in, const scalar_t* Q, const scalar_t* KP, RowLayout kl, const scalar_t* VP,
                    RowLayout vl, const scalar_t* KS, const scalar_t* VS, scalar_t* O,
                    std::conditional_t<std::is_same_v<scalar_t, double>, double, float>* LSE) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = in.H, M = in.M, N = in.N, S = in.S, D = in.D;
  const acc_t scale = static_cast<acc_t>(in.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t keep_scale = static_cast<acc_t>(in.drop.keep_scale);
  const bool avx2 = std::is_same_v<acc_t, float> && cpu_has_avx2();

  at::parallel_for(0, in.B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(M * D), acc(M * D), m_i(M), l_i(M), p(M * kTile), sc(std::max(S, int64_t{1}));
    std::vector<acc_t> kbuf(kTile * D), vbuf(kTile * D), sbuf(S * D);
    std::vector<char> valid(kTile);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const acc_t* qa = as_acc(Q + bh * M * D, M * D, q.data());
      if (qa != q.data()) std::copy(qa, qa + M * D, q.begin());
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m_i.begin(), m_i.end(), neg_inf);
      std::fill(l_i.begin(), l_i.end(), acc_t(0));

      // Shared prefix, tile by tile: each key/value row is read once for all M streams.
      for (int64_t n0 = 0; n0 < N; n0 += kTile) {
        const int64_t nt = std::min(kTile, N - n0);
        int64_t n_valid = 0;
        for (int64_t t = 0; t < nt; ++t) {
          valid[t] = in.mask == nullptr || in.mask[b * N + n0 + t];
          n_valid += valid[t];
        }
        if (n_valid == 0) continue;  // a padded tile adds exp(-inf) = 0 to every sum
        int64_t ks = 0, vs = 0;  // row strides of the tile as read
        const acc_t* k = rows_as_acc(kl.row(KP, b, h, n0), kl.n, nt, D, kbuf.data(), ks);
        const acc_t* v = rows_as_acc(vl.row(VP, b, h, n0), vl.n, nt, D, vbuf.data(), vs);
        for (int64_t m = 0; m < M; ++m) {
          acc_t* pm = p.data() + m * kTile;
          acc_t tile_max = neg_inf;
          if constexpr (std::is_same_v<acc_t, float>) {
            if (avx2) {  // every key of the tile scored, then masked: the same values
              prefix_scores_avx2(q.data() + m * D, k, ks, nt, D, pm);
              for (int64_t t = 0; t < nt; ++t) pm[t] = valid[t] ? scale * pm[t] : neg_inf;
            }
          }
          for (int64_t t = 0; t < nt; ++t) {
            if (!avx2) pm[t] = valid[t] ? scale * dot(q.data() + m * D, k + t * ks, D) : neg_inf;
            tile_max = std::max(tile_max, pm[t]);
          }
          // tile_max is finite: the tile has a valid key (n_valid > 0), seen by every stream.
          online_softmax_tile(pm, valid.data(), nt, tile_max, in.drop, bh * M + m, n0, m_i[m], l_i[m],
                              acc.data() + m * D, D);
        }
        if constexpr (std::is_same_v<acc_t, float>) {
          if (avx2) prefix_values_avx2(acc.data(), p.data(), kTile, M, v, vs, valid.data(), nt, D);
        }
        for (int64_t t = 0; t < nt && !avx2; ++t) {
          if (!valid[t]) continue;
          for (int64_t m = 0; m < M; ++m) {
            const acc_t pv = p[m * kTile + t];
            if (pv != acc_t(0)) axpy(acc.data() + m * D, pv, v + t * vs, D);
          }
        }
      }

      // Each stream's own keys 1..S (always valid), merged into the same (m, l).
      for (int64_t m = 0; m < M; ++m) {
        const int64_t row = bh * M + m;
        finish_row_with_own_stream(row, q.data() + m * D, KS + row * S * D, VS + row * S * D, N, S, D, scale,
                                   in.drop, keep_scale, m_i[m], l_i[m], acc.data() + m * D, sc.data(),
                                   sbuf.data(), O, LSE);
      }
    }
  });
}

// ------------------------------------------------------------------ backward

// The backward is attention_backward of attention_cpu.h: every stream sees every prefix key.

// ------------------------------------------------------------------ op entry

Inputs make_inputs(const StreamAttentionShape& shape, const at::Tensor& mask, double scale,
                   double dropout_p, const std::optional<at::Tensor>& seed) {
  return {shape.B, shape.H, shape.M, shape.N, shape.S, shape.D,
          mask.defined() ? mask.const_data_ptr<bool>() : nullptr, scale,
          make_dropout(shape.N + shape.S, dropout_p, seed)};
}

std::tuple<at::Tensor, at::Tensor> stream_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_prefix, const at::Tensor& v_prefix,
    const at::Tensor& k_stream, const at::Tensor& v_stream,
    const std::optional<at::Tensor>& prefix_mask, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto shape = check_stream_attention_inputs("stream_attention_fwd", q, k_prefix, v_prefix,
                                                   k_stream, v_stream, prefix_mask, scale,
                                                   dropout_p, seed);
  const auto lse_type = acc_scalar_type(q.scalar_type());
  auto o = at::empty(q.sizes(), q.options());
  auto lse = at::empty({shape.B, shape.H, shape.M}, q.options().dtype(lse_type));
  if (shape.B * shape.H * shape.M == 0) return {o, lse};
  const auto qc = q.contiguous();
  // The prefix cache is read in place when its rows are contiguous (any B/H/N strides).
  const auto kpc = k_prefix.stride(3) == 1 ? k_prefix : k_prefix.contiguous();
  const auto vpc = v_prefix.stride(3) == 1 ? v_prefix : v_prefix.contiguous();
  const auto ksc = k_stream.contiguous(), vsc = v_stream.contiguous();
  const at::Tensor mask = prefix_mask.has_value() ? prefix_mask->contiguous() : at::Tensor();
  const Inputs in = make_inputs(shape, mask, scale, dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "stream_attention_fwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    forward_kernel<scalar_t>(in, qc.const_data_ptr<scalar_t>(), kpc.const_data_ptr<scalar_t>(), row_layout(kpc),
                             vpc.const_data_ptr<scalar_t>(), row_layout(vpc), ksc.const_data_ptr<scalar_t>(),
                             vsc.const_data_ptr<scalar_t>(), o.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<acc_t>());
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> stream_attention_bwd_cpu(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k_prefix,
    const at::Tensor& v_prefix, const at::Tensor& k_stream, const at::Tensor& v_stream,
    const std::optional<at::Tensor>& prefix_mask, const at::Tensor& o, const at::Tensor& lse,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto shape = check_stream_attention_inputs("stream_attention_bwd", q, k_prefix, v_prefix,
                                                   k_stream, v_stream, prefix_mask, scale,
                                                   dropout_p, seed);
  check_attention_bwd_inputs("stream_attention_bwd", grad_o, q, o, lse);
  auto dq = at::empty(q.sizes(), q.options());
  auto dkp = at::empty(k_prefix.sizes(), q.options());
  auto dvp = at::empty(k_prefix.sizes(), q.options());
  auto dks = at::empty(k_stream.sizes(), q.options());
  auto dvs = at::empty(k_stream.sizes(), q.options());
  if (shape.B * shape.H == 0) return {dq, dkp, dvp, dks, dvs};
  if (shape.M == 0) {  // no query: nothing attends, every gradient is zero
    return {dq, dkp.zero_(), dvp.zero_(), dks, dvs};
  }
  const auto qc = q.contiguous(), kpc = k_prefix.contiguous(), vpc = v_prefix.contiguous();
  const auto ksc = k_stream.contiguous(), vsc = v_stream.contiguous();
  const auto doc = grad_o.contiguous(), oc = o.contiguous(), lsec = lse.contiguous();
  const at::Tensor mask = prefix_mask.has_value() ? prefix_mask->contiguous() : at::Tensor();
  const Inputs in = make_inputs(shape, mask, scale, dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "stream_attention_bwd_cpu", [&] {
    attention_backward(in.B, in.H, in.M, in.N, in.S, in.D, in.mask, in.scale, in.drop,
                       [](int64_t) { return int64_t(0); }, doc.const_data_ptr<scalar_t>(), qc.const_data_ptr<scalar_t>(),
                       kpc.const_data_ptr<scalar_t>(), vpc.const_data_ptr<scalar_t>(),
                       ksc.const_data_ptr<scalar_t>(), vsc.const_data_ptr<scalar_t>(),
                       oc.const_data_ptr<scalar_t>(), lsec.const_data_ptr<acc_type<scalar_t>>(),
                       dq.mutable_data_ptr<scalar_t>(), dkp.mutable_data_ptr<scalar_t>(),
                       dvp.mutable_data_ptr<scalar_t>(), dks.mutable_data_ptr<scalar_t>(),
                       dvs.mutable_data_ptr<scalar_t>());
  });
  return {dq, dkp, dvp, dks, dvs};
}

}  // namespace

TORCH_LIBRARY_IMPL(plr_kernels, CPU, m) {
  m.impl("stream_attention_fwd", &stream_attention_fwd_cpu);
  m.impl("stream_attention_bwd", &stream_attention_bwd_cpu);
}

}  // namespace plr_kernels
