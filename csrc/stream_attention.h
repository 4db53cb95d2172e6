// Input checks of plr_kernels::stream_attention_fwd / _bwd (PLR Eq. 4-5),
// shared by the CPU kernel (stream_attention.cpp) and any other backend that
// includes this header, so that every backend rejects the same inputs with the
// same messages. Each message names the argument, what was expected and what
// was received.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace plr_kernels {

// Shapes of one call: q [B,H,M,D], prefix [B,H,N,D], stream [B,H,M,S,D].
struct StreamAttentionShape {
  int64_t B, H, M, N, S, D;
};

// Dtypes, devices, prefix_mask [B, N], scale, dropout_p and seed: the checks
// both forms of the op (stream_attention_*, causal_stream_attention_*) share.
inline void check_attention_common(const char* op, const at::Tensor& q, const at::Tensor& k_prefix,
                                   const at::Tensor& v_prefix, const at::Tensor& k_stream,
                                   const at::Tensor& v_stream,
                                   const std::optional<at::Tensor>& prefix_mask, int64_t B, int64_t N,
                                   double scale, double dropout_p,
                                   const std::optional<at::Tensor>& seed) {
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": q must be float32, float64, bfloat16 or float16, got ", st);
  const char* names[] = {"k_prefix", "v_prefix", "k_stream", "v_stream"};
  const at::Tensor* others[] = {&k_prefix, &v_prefix, &k_stream, &v_stream};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(others[i]->scalar_type() == st, op, ": ", names[i], " must have the dtype of q (",
                st, "), got ", others[i]->scalar_type());
    TORCH_CHECK(others[i]->device() == q.device(), op, ": ", names[i], " must be on ", q.device(),
                " (as q), got ", others[i]->device());
  }
  if (prefix_mask.has_value()) {
    const auto& pm = *prefix_mask;
    TORCH_CHECK(pm.scalar_type() == at::kBool, op, ": prefix_mask must be bool, got ",
                pm.scalar_type());
    TORCH_CHECK(pm.dim() == 2 && pm.size(0) == B && pm.size(1) == N, op,
                ": prefix_mask must have shape [B, N] = [", B, ", ", N, "], got ", pm.sizes());
    TORCH_CHECK(pm.device() == q.device(), op, ": prefix_mask must be on ", q.device(), ", got ",
                pm.device());
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, op, ": scale must be a finite number > 0, got ",
              scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must lie in [0, 1), got ",
              dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value(), op, ": seed must be an int64 tensor of 1 element when dropout_p > 0 (",
                dropout_p, "), got None");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, op,
                ": seed must be an int64 tensor of 1 element, got ", seed->scalar_type(),
                " of shape ", seed->sizes());
  }
}

inline StreamAttentionShape check_stream_attention_inputs(
    const char* op, const at::Tensor& q, const at::Tensor& k_prefix, const at::Tensor& v_prefix,
    const at::Tensor& k_stream, const at::Tensor& v_stream,
    const std::optional<at::Tensor>& prefix_mask, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, H, M, D], got shape ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3);
  TORCH_CHECK(k_prefix.dim() == 4 && k_prefix.size(0) == B && k_prefix.size(1) == H &&
                  k_prefix.size(3) == D,
              op, ": k_prefix must have shape [B, H, N, D] = [", B, ", ", H, ", N, ", D,
              "], got ", k_prefix.sizes());
  const int64_t N = k_prefix.size(2);
  TORCH_CHECK(v_prefix.sizes() == k_prefix.sizes(), op, ": v_prefix must have the shape of k_prefix ",
              k_prefix.sizes(), ", got ", v_prefix.sizes());
  TORCH_CHECK(k_stream.dim() == 5 && k_stream.size(0) == B && k_stream.size(1) == H &&
                  k_stream.size(2) == M && k_stream.size(4) == D,
              op, ": k_stream must have shape [B, H, M, S, D] = [", B, ", ", H, ", ", M, ", S, ", D,
              "], got ", k_stream.sizes());
  const int64_t S = k_stream.size(3);
  TORCH_CHECK(S >= 1, op, ": k_stream must hold S >= 1 keys per stream (the current reasoning "
              "token is its own key), got S = ", S);
  TORCH_CHECK(v_stream.sizes() == k_stream.sizes(), op, ": v_stream must have the shape of k_stream ",
              k_stream.sizes(), ", got ", v_stream.sizes());

  check_attention_common(op, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, B, N, scale,
                         dropout_p, seed);
  return {B, H, M, N, S, D};
}

// The extra arguments of the backward of either form: grad_o and o of q's
// shape and dtype; lse = q's shape without D ([B,H,M], causal [B,H,N,M]) in
// the accumulation dtype (float32; float64 for float64 inputs).
inline void check_attention_bwd_inputs(const char* op, const at::Tensor& grad_o, const at::Tensor& q,
                                       const at::Tensor& o, const at::Tensor& lse) {
  TORCH_CHECK(grad_o.sizes() == q.sizes(), op, ": grad_o must have the shape of q ", q.sizes(),
              ", got ", grad_o.sizes());
  TORCH_CHECK(o.sizes() == q.sizes(), op, ": o must have the shape of q ", q.sizes(), ", got ",
              o.sizes());
  TORCH_CHECK(grad_o.scalar_type() == q.scalar_type() && o.scalar_type() == q.scalar_type(), op,
              ": grad_o and o must have the dtype of q (", q.scalar_type(), "), got ",
              grad_o.scalar_type(), " and ", o.scalar_type());
  const auto lse_type = acc_scalar_type(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == lse_type, op, ": lse must be ", lse_type, " for ",
              q.scalar_type(), " inputs, got ", lse.scalar_type());
  const auto lse_shape = q.sizes().slice(0, q.dim() - 1);
  TORCH_CHECK(lse.sizes() == lse_shape, op, ": lse must have shape ",
              q.dim() == 5 ? "[B, H, N, M] = " : "[B, H, M] = ", lse_shape, ", got ", lse.sizes());
  TORCH_CHECK(grad_o.device() == q.device() && o.device() == q.device() && lse.device() == q.device(),
              op, ": grad_o, o and lse must be on ", q.device(), " (as q), got ", grad_o.device(),
              ", ", o.device(), " and ", lse.device());
}

// Shapes of the causal-prefix form: q [B,H,N,M,D], prefix [B,H,N,D], stream
// [B,H,N,M,S,D] (the M streams of every prefix end n; see
// csrc/causal_stream_attention.cpp).
inline StreamAttentionShape check_causal_stream_attention_inputs(
    const char* op, const at::Tensor& q, const at::Tensor& k_prefix, const at::Tensor& v_prefix,
    const at::Tensor& k_stream, const at::Tensor& v_stream,
    const std::optional<at::Tensor>& prefix_mask, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(q.dim() == 5, op, ": q must be 5-D [B, H, N, M, D], got shape ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), M = q.size(3), D = q.size(4);
  TORCH_CHECK(k_prefix.dim() == 4 && k_prefix.size(0) == B && k_prefix.size(1) == H &&
                  k_prefix.size(2) == N && k_prefix.size(3) == D,
              op, ": k_prefix must have shape [B, H, N, D] = [", B, ", ", H, ", ", N, ", ", D,
              "], got ", k_prefix.sizes());
  TORCH_CHECK(v_prefix.sizes() == k_prefix.sizes(), op, ": v_prefix must have the shape of k_prefix ",
              k_prefix.sizes(), ", got ", v_prefix.sizes());
  TORCH_CHECK(k_stream.dim() == 6 && k_stream.size(0) == B && k_stream.size(1) == H &&
                  k_stream.size(2) == N && k_stream.size(3) == M && k_stream.size(5) == D,
              op, ": k_stream must have shape [B, H, N, M, S, D] = [", B, ", ", H, ", ", N, ", ", M,
              ", S, ", D, "], got ", k_stream.sizes());
  const int64_t S = k_stream.size(4);
  TORCH_CHECK(S >= 1, op, ": k_stream must hold S >= 1 keys per stream (the current reasoning "
              "token is its own key), got S = ", S);
  TORCH_CHECK(v_stream.sizes() == k_stream.sizes(), op, ": v_stream must have the shape of k_stream ",
              k_stream.sizes(), ", got ", v_stream.sizes());
  check_attention_common(op, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, B, N, scale,
                         dropout_p, seed);
  return {B, H, M, N, S, D};
}

}  // namespace plr_kernels
