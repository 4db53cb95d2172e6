// CPU kernels of plr_kernels::causal_stream_attention_fwd / _bwd: the
// causal-prefix form of stream-isolated attention (PLR Eq. 4-5 for every
// prefix of a sequence at once; plr_kernels/causal_stream_attention.py).
//
// Per (user b, head h) -- the unit of OpenMP parallelism -- the R = N*M query
// rows r = n*M + m (stream m of prefix end n, in position order) with
//
//   s_{r,j} = scale * q_r . k_j     for prefix keys j <= n valid under prefix_mask,
//   s_{r,N+i} = scale * q_r . ks_{r,i}   (i = 1..S, the row's own stream only),
//   lse_r = log sum exp s_r,  P = exp(s - lse),  o_r = sum P~_{r,.} v.
//
// Forward: the prefix is streamed in tiles of kTile keys, each key/value row
// widened once per (b, h) and used by every row that sees it (the causal cut
// j <= n is a mask on (row, key): the rows of positions n < j0 skip the tile
// starting at j0); online softmax over the tiles, then the S own-stream keys
// merged into the same running (max, sum): lse = m + log l.
//
// Backward (FlashAttention style, P recomputed from lse), per key j of the
// prefix: dk_j = scale * sum_{r: n >= j} dS_{r,j} q_r, dv_j = sum_r P~_{r,j} dO_r,
// dq_r += dS_{r,j} k_j, with dS = P * (dP - Delta), Delta_r = dO_r . O_r. Each
// (b, h) is one sequential iteration summing in a fixed order: no atomics,
// bit-identical runs whatever the thread count.
//
// Dropout: keep_{r,j} = U(seed, row*(N+S) + j) >= p, row = (b*H + h)*R + r,
// U = triton's tl.rand (attention_cpu.h); the keep-mask [B,H,N,M,N+S] is that
// of the non-causal kernel with M' = N*M rows, so the Triton and CPU backends
// draw the same mask for the same seed.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_cpu.h"
#include "stream_attention.h"

namespace plr_kernels {
namespace {

using namespace attention_cpu;

constexpr int64_t kTile = 64;  // prefix keys per online-softmax step of the forward

struct CausalInputs {
  int64_t B, H, N, M, S, D;
  const bool* mask;  // [B, N] or nullptr
  double scale;
  Dropout drop;
};

// ------------------------------------------------------------------- forward

template <typename scalar_t>
void forward_kernel(const CausalInputs& in, const scalar_t* Q, const scalar_t* KP, const scalar_t* VP,
                    const scalar_t* KS, const scalar_t* VS, scalar_t* O, acc_type<scalar_t>* LSE) {
  using acc_t = acc_type<scalar_t>;
  const int64_t H = in.H, N = in.N, M = in.M, S = in.S, D = in.D, R = N * M;
  const acc_t scale = static_cast<acc_t>(in.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t keep_scale = static_cast<acc_t>(in.drop.keep_scale);

  at::parallel_for(0, in.B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(R * D), acc(R * D), m_i(R), l_i(R), p(R * kTile), sc(S);
    std::vector<acc_t> kbuf(kTile * D), vbuf(D), sbuf(S * D);
    std::vector<char> valid(kTile);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const acc_t* qa = as_acc(Q + bh * R * D, R * D, q.data());
      if (qa != q.data()) std::copy(qa, qa + R * D, q.begin());
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m_i.begin(), m_i.end(), neg_inf);
      std::fill(l_i.begin(), l_i.end(), acc_t(0));

      for (int64_t j0 = 0; j0 < N; j0 += kTile) {
        const int64_t nt = std::min(kTile, N - j0);
        int64_t n_valid = 0;
        for (int64_t t = 0; t < nt; ++t) {
          valid[t] = in.mask == nullptr || in.mask[b * N + j0 + t];
          n_valid += valid[t];
        }
        if (n_valid == 0) continue;  // a padded tile adds exp(-inf) = 0 to every sum
        const acc_t* k = as_acc(KP + (bh * N + j0) * D, nt * D, kbuf.data());
        // Rows of positions n >= j0 see (part of) the tile: key j0 + t iff t <= n - j0.
        for (int64_t r = j0 * M; r < R; ++r) {
          const int64_t t_end = std::min(nt, r / M - j0 + 1);
          acc_t* pr = p.data() + r * kTile;
          acc_t tile_max = neg_inf;
          for (int64_t t = 0; t < t_end; ++t) {
            pr[t] = valid[t] ? scale * dot(q.data() + r * D, k + t * D, D) : neg_inf;
            tile_max = std::max(tile_max, pr[t]);
          }
          if (tile_max == neg_inf) {  // nothing visible here: (m, l, acc) unchanged
            std::fill(pr, pr + nt, acc_t(0));
            continue;
          }
          online_softmax_tile(pr, valid.data(), t_end, tile_max, in.drop, bh * R + r, j0, m_i[r], l_i[r],
                              acc.data() + r * D, D);
          std::fill(pr + t_end, pr + nt, acc_t(0));
        }
        // Each value row once, added to every row at or after its position.
        for (int64_t t = 0; t < nt; ++t) {
          if (!valid[t]) continue;
          const acc_t* v = as_acc(VP + (bh * N + j0 + t) * D, D, vbuf.data());
          for (int64_t r = (j0 + t) * M; r < R; ++r) {
            const acc_t pv = p[r * kTile + t];
            if (pv != acc_t(0)) axpy(acc.data() + r * D, pv, v, D);
          }
        }
      }

      // Each row's own stream keys 1..S (always valid), merged into the same (m, l).
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = bh * R + r;
        finish_row_with_own_stream(row, q.data() + r * D, KS + row * S * D, VS + row * S * D, N, S, D, scale,
                                   in.drop, keep_scale, m_i[r], l_i[r], acc.data() + r * D, sc.data(),
                                   sbuf.data(), O, LSE);
      }
    }
  });
}

// ------------------------------------------------------------------ backward

// The backward is attention_backward of attention_cpu.h: prefix key j is seen by
// the rows (n, m) of the positions n >= j.

// ------------------------------------------------------------------ op entry

CausalInputs make_inputs(const StreamAttentionShape& shape, const at::Tensor& mask, double scale,
                         double dropout_p, const std::optional<at::Tensor>& seed) {
  return {shape.B, shape.H, shape.N, shape.M, shape.S, shape.D,
          mask.defined() ? mask.const_data_ptr<bool>() : nullptr, scale,
          make_dropout(shape.N + shape.S, dropout_p, seed)};
}

std::tuple<at::Tensor, at::Tensor> causal_stream_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_prefix, const at::Tensor& v_prefix,
    const at::Tensor& k_stream, const at::Tensor& v_stream,
    const std::optional<at::Tensor>& prefix_mask, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const auto shape = check_causal_stream_attention_inputs("causal_stream_attention_fwd", q, k_prefix,
                                                          v_prefix, k_stream, v_stream, prefix_mask,
                                                          scale, dropout_p, seed);
  const auto lse_type = acc_scalar_type(q.scalar_type());
  auto o = at::empty(q.sizes(), q.options());
  auto lse = at::empty({shape.B, shape.H, shape.N, shape.M}, q.options().dtype(lse_type));
  if (shape.B * shape.H * shape.N * shape.M == 0) return {o, lse};
  const auto qc = q.contiguous(), kpc = k_prefix.contiguous(), vpc = v_prefix.contiguous();
  const auto ksc = k_stream.contiguous(), vsc = v_stream.contiguous();
  const at::Tensor mask = prefix_mask.has_value() ? prefix_mask->contiguous() : at::Tensor();
  const CausalInputs in = make_inputs(shape, mask, scale, dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_stream_attention_fwd_cpu",
                                  [&] {
    forward_kernel<scalar_t>(in, qc.const_data_ptr<scalar_t>(), kpc.const_data_ptr<scalar_t>(),
                             vpc.const_data_ptr<scalar_t>(), ksc.const_data_ptr<scalar_t>(),
                             vsc.const_data_ptr<scalar_t>(), o.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<acc_type<scalar_t>>());
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_stream_attention_bwd_cpu(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k_prefix,
    const at::Tensor& v_prefix, const at::Tensor& k_stream, const at::Tensor& v_stream,
    const std::optional<at::Tensor>& prefix_mask, const at::Tensor& o, const at::Tensor& lse,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto shape = check_causal_stream_attention_inputs("causal_stream_attention_bwd", q, k_prefix,
                                                          v_prefix, k_stream, v_stream, prefix_mask,
                                                          scale, dropout_p, seed);
  check_attention_bwd_inputs("causal_stream_attention_bwd", grad_o, q, o, lse);
  auto dq = at::empty(q.sizes(), q.options());
  auto dkp = at::empty(k_prefix.sizes(), q.options());
  auto dvp = at::empty(k_prefix.sizes(), q.options());
  auto dks = at::empty(k_stream.sizes(), q.options());
  auto dvs = at::empty(k_stream.sizes(), q.options());
  if (shape.B * shape.H * shape.N == 0) return {dq, dkp, dvp, dks, dvs};
  if (shape.M == 0) return {dq, dkp.zero_(), dvp.zero_(), dks, dvs};  // no query: zero gradients
  const auto qc = q.contiguous(), kpc = k_prefix.contiguous(), vpc = v_prefix.contiguous();
  const auto ksc = k_stream.contiguous(), vsc = v_stream.contiguous();
  const auto doc = grad_o.contiguous(), oc = o.contiguous(), lsec = lse.contiguous();
  const at::Tensor mask = prefix_mask.has_value() ? prefix_mask->contiguous() : at::Tensor();
  const CausalInputs in = make_inputs(shape, mask, scale, dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "causal_stream_attention_bwd_cpu",
                                  [&] {
    // Prefix key j is seen by the rows (n, m) of the positions n >= j.
    const int64_t M = in.M;
    attention_backward(in.B, in.H, in.N * M, in.N, in.S, in.D, in.mask, in.scale, in.drop,
                       [M](int64_t j) { return j * M; }, doc.const_data_ptr<scalar_t>(), qc.const_data_ptr<scalar_t>(),
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
  m.impl("causal_stream_attention_fwd", &causal_stream_attention_fwd_cpu);
  m.impl("causal_stream_attention_bwd", &causal_stream_attention_bwd_cpu);
}

}  // namespace plr_kernels
