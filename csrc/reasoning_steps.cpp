// plr_kernels::reasoning_steps, CPU: the T latent reasoning steps of M
// parallel streams through all L post-LN layers in one call (PLR Eq. 4-5),
// for inference (no autograd, no dropout). plr_kernels/reasoning_steps.py has
// the functional API, the fake and the checks' Python twin; the reference is
// plr_kernels.reference.reasoning_steps.
//
// Per step t (0-based) of every stream m, from h_{t-1,m} (h_start for t = 0):
//
//   x^0      = LN_r(h_{t-1,m} + r_t)                               (the step's input token)
//   q, k, v  = x^{l-1} W_{q,k,v}^T + b_{q,k,v}      per head, the new k, v appended to stream m's own
//   a        = softmax(q [K_P ; K_{1..t,m}]^T / sqrt(Dh)) [V_P ; V_{1..t,m}]   (stream_attention)
//   y        = LN_1(x^{l-1} + a W_O^T + b_O)
//   x^l      = LN_2(y + W_2 GELU(W_1 y + b_1) + b_2)
//   h_{t,m}  = x^L
//
// Nothing here is new math: each line is one ATen call (GEMMs, LayerNorm and
// exact GELU are ATen's CPU kernels) or the compiled stream attention, called
// through the dispatcher. What it removes is the Python between them -- about
// 40 module calls, views and checks per step, which at batch 1 cost more than
// the step's GEMVs (benchmarks/bench_serving.py; benchmarks/RESULTS.md, issue 15).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace plr_kernels {
namespace {

// The 16 parameters of one layer, in the order of the schema's layer_weights
// (plr/transformer.py: TransformerBlock.step_weights).
enum LayerWeight {
  kWq, kBq, kWk, kBk, kWv, kBv, kWo, kBo, kNorm1W, kNorm1B, kW1, kB1, kW2, kB2, kNorm2W, kNorm2B,
  kWeightsPerLayer
};

const char* const kWeightNames[kWeightsPerLayer] = {
    "query.weight", "query.bias", "key.weight", "key.bias", "value.weight", "value.bias",
    "dense.weight", "dense.bias", "attention norm.weight", "attention norm.bias",
    "dense_in.weight", "dense_in.bias", "dense_out.weight", "dense_out.bias",
    "feed-forward norm.weight", "feed-forward norm.bias"};

void check_param(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape, int64_t layer,
                 int which) {
  TORCH_CHECK(t.sizes() == shape, "reasoning_steps: layer_weights[", layer * kWeightsPerLayer + which,
              "] (layer ", layer, " ", kWeightNames[which], ") must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(),
              "reasoning_steps: layer_weights[", layer * kWeightsPerLayer + which, "] (layer ", layer, " ",
              kWeightNames[which], ") must be ", like.scalar_type(), " on ", like.device(),
              " as h_start, got ", t.scalar_type(), " on ", t.device());
}

// Shapes: h_start [B,M,d]; step_emb [T,d]; norms [d]; per layer the 16
// weights above (inner size F from dense_in); k_prefix / v_prefix [B,H,N,Dh]
// with H = num_heads, H*Dh = d; prefix_mask [B,N] (checked by stream_attention).
int64_t check_inputs(const at::Tensor& h_start, const at::Tensor& step_emb, const at::Tensor& norm_w,
                     const at::Tensor& norm_b, at::TensorList w, at::TensorList k_prefix,
                     at::TensorList v_prefix, int64_t num_heads, double eps) {
  const auto st = h_start.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16,
              "reasoning_steps: h_start must be float32, float64 or bfloat16, got ", st);
  TORCH_CHECK(h_start.dim() == 3, "reasoning_steps: h_start must be 3-D [B, M, d], got shape ",
              h_start.sizes());
  const int64_t B = h_start.size(0), d = h_start.size(2);
  TORCH_CHECK(step_emb.dim() == 2 && step_emb.size(0) >= 1 && step_emb.size(1) == d,
              "reasoning_steps: step_emb must have shape [T, d] = [T >= 1, ", d, "], got ", step_emb.sizes());
  TORCH_CHECK(num_heads >= 1 && d % num_heads == 0, "reasoning_steps: num_heads must be >= 1 and divide d=",
              d, ", got ", num_heads);
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0, "reasoning_steps: eps must be a finite number > 0, got ", eps);
  const char* names[] = {"step_emb", "step_norm_weight", "step_norm_bias"};
  const at::Tensor* ts[] = {&step_emb, &norm_w, &norm_b};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(ts[i]->scalar_type() == st && ts[i]->device() == h_start.device(), "reasoning_steps: ",
                names[i], " must be ", st, " on ", h_start.device(), " as h_start, got ",
                ts[i]->scalar_type(), " on ", ts[i]->device());
  TORCH_CHECK(norm_w.sizes() == at::IntArrayRef{d} && norm_b.sizes() == at::IntArrayRef{d},
              "reasoning_steps: step_norm_weight and step_norm_bias must have shape [", d, "], got ",
              norm_w.sizes(), " and ", norm_b.sizes());
  const int64_t L = static_cast<int64_t>(k_prefix.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(v_prefix.size()) == L,
              "reasoning_steps: k_prefix and v_prefix must hold one tensor per layer (L >= 1), got ",
              k_prefix.size(), " and ", v_prefix.size());
  TORCH_CHECK(static_cast<int64_t>(w.size()) == L * kWeightsPerLayer, "reasoning_steps: layer_weights must hold ",
              kWeightsPerLayer, " tensors per layer (", L * kWeightsPerLayer, " for L=", L, "), got ", w.size());
  const int64_t F = w[kW1].dim() == 2 ? w[kW1].size(0) : -1;
  TORCH_CHECK(F >= 1, "reasoning_steps: layer_weights[", static_cast<int>(kW1),
              "] (layer 0 dense_in.weight) must have shape [F, d], got ", w[kW1].sizes());
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* p = w.data() + l * kWeightsPerLayer;
    for (int i : {kWq, kWk, kWv, kWo}) check_param(p[i], h_start, {d, d}, l, i);
    for (int i : {kBq, kBk, kBv, kBo, kNorm1W, kNorm1B, kB2, kNorm2W, kNorm2B})
      check_param(p[i], h_start, {d}, l, i);
    check_param(p[kW1], h_start, {F, d}, l, kW1);
    check_param(p[kB1], h_start, {F}, l, kB1);
    check_param(p[kW2], h_start, {d, F}, l, kW2);
    const int64_t Dh = d / num_heads;
    for (const auto* kv : {&k_prefix[l], &v_prefix[l]})
      TORCH_CHECK(kv->dim() == 4 && kv->size(0) == B && kv->size(1) == num_heads && kv->size(3) == Dh,
                  "reasoning_steps: k_prefix[", l, "] and v_prefix[", l, "] must have shape [B, H, N, Dh] = [",
                  B, ", ", num_heads, ", N, ", Dh, "], got ", kv->sizes());
  }
  return L;
}

// [B*M, d] rows -> [B, H, M, 1, Dh] (the layout stream_attention reads).
at::Tensor heads(const at::Tensor& rows, int64_t B, int64_t M, int64_t H, int64_t Dh) {
  return rows.view({B, M, H, Dh}).permute({0, 2, 1, 3}).unsqueeze(3);
}

at::Tensor reasoning_steps_cpu(const at::Tensor& h_start, const at::Tensor& step_emb,
                               const at::Tensor& step_norm_weight, const at::Tensor& step_norm_bias,
                               at::TensorList w, at::TensorList k_prefix, at::TensorList v_prefix,
                               const std::optional<at::Tensor>& prefix_mask, int64_t num_heads, double eps) {
  const int64_t L = check_inputs(h_start, step_emb, step_norm_weight, step_norm_bias, w, k_prefix, v_prefix,
                                 num_heads, eps);
  static auto attention = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("plr_kernels::stream_attention_fwd", "")
                              .typed<std::tuple<at::Tensor, at::Tensor>(
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const std::optional<at::Tensor>&, double, double,
                                  const std::optional<at::Tensor>&)>();
  at::NoGradGuard no_grad;
  const int64_t B = h_start.size(0), M = h_start.size(1), d = h_start.size(2), T = step_emb.size(0);
  const int64_t H = num_heads, Dh = d / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
  auto states = at::empty({B, T, M, d}, h_start.options());
  if (B * M == 0) return states;
  // Each stream's own keys / values, per layer: [B, H, M, S, Dh], S = steps so far.
  std::vector<at::Tensor> k_stream(L), v_stream(L);
  at::Tensor h = h_start.reshape({B * M, d});
  for (int64_t t = 0; t < T; ++t) {
    at::Tensor x = at::layer_norm(h + step_emb[t], {d}, step_norm_weight, step_norm_bias, eps);
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* p = w.data() + l * kWeightsPerLayer;
      const auto q = heads(at::addmm(p[kBq], x, p[kWq].t()), B, M, H, Dh).squeeze(3);
      const auto k_new = heads(at::addmm(p[kBk], x, p[kWk].t()), B, M, H, Dh);
      const auto v_new = heads(at::addmm(p[kBv], x, p[kWv].t()), B, M, H, Dh);
      k_stream[l] = t == 0 ? k_new.contiguous() : at::cat({k_stream[l], k_new}, 3);
      v_stream[l] = t == 0 ? v_new.contiguous() : at::cat({v_stream[l], v_new}, 3);
      const auto ctx = std::get<0>(attention.call(q, k_prefix[l], v_prefix[l], k_stream[l], v_stream[l],
                                                  prefix_mask, scale, 0.0, std::nullopt));
      // [B, H, M, Dh] -> [B*M, d]
      const auto merged = ctx.permute({0, 2, 1, 3}).reshape({B * M, d});
      const auto y = at::layer_norm(at::addmm(p[kBo], merged, p[kWo].t()).add_(x), {d}, p[kNorm1W],
                                    p[kNorm1B], eps);
      const auto inner = at::gelu(at::addmm(p[kB1], y, p[kW1].t()));
      x = at::layer_norm(at::addmm(p[kB2], inner, p[kW2].t()).add_(y), {d}, p[kNorm2W], p[kNorm2B], eps);
    }
    h = x;
    states.select(1, t).copy_(x.view({B, M, d}));
  }
  return states;
}

}  // namespace

TORCH_LIBRARY_IMPL(plr_kernels, CPU, m) { m.impl("reasoning_steps", &reasoning_steps_cpu); }

}  // namespace plr_kernels
