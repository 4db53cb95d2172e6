// Schemas of every op in plr_kernels._C, and the Python module init.
//
// The ops are reached through torch.ops.plr_kernels.<op>; kernels register
// per dispatch key in their own files (TORCH_LIBRARY_IMPL(plr_kernels, CPU /
// CUDA, m)). Python code that adds ops to this namespace must use
// torch.library.custom_op / Library("plr_kernels", "FRAGMENT"): a second "DEF"
// library for the namespace is an error once this extension is loaded.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

// The fake (meta) kernels and the autograd of these ops live in Python,
// beside each op's functional API; this tells torch which module to import
// when it needs a fake (torch.compile, FakeTensorMode) for the ops def'ed after it.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
#define PLR_FAKES_IN(m, module) (m).set_python_module(module)
#else
#define PLR_FAKES_IN(m, module) (m).impl_abstract_pystub(module)
#endif

TORCH_LIBRARY(plr_kernels, m) {
  PLR_FAKES_IN(m, "plr_kernels.target_rank");
  // exclude_index = -1: none. pessimistic=False counts ">" (ties favour the
  // target), True counts ">=". Returns int64 [B], 1 = best.
  m.def(
      "target_rank(Tensor z, Tensor item_emb, Tensor target, int exclude_index, "
      "Tensor? exclude_items, bool pessimistic) -> Tensor");

  PLR_FAKES_IN(m, "plr_kernels.topk");
  // Top-k items by score z.e_v (plr_kernels/topk.py): (values [B,k], ids [B,k] int64),
  // best first, equal scores by smaller id; rows with fewer than k candidates
  // end in (-inf, -1). Same exclusion rules as target_rank.
  m.def(
      "topk(Tensor z, Tensor item_emb, int k, int exclude_index, Tensor? exclude_items) "
      "-> (Tensor, Tensor)");

  PLR_FAKES_IN(m, "plr_kernels.stream_attention");
  // Stream-isolated attention over a shared prefix KV cache (PLR Eq. 4-5,
  // plr_kernels/stream_attention.py). q [B,H,M,D]; k_prefix/v_prefix [B,H,N,D]; k_stream/v_stream
  // [B,H,M,S,D]; prefix_mask [B,N] bool (True = valid key). Returns
  // (o [B,H,M,D], lse [B,H,M] in fp32, fp64 for fp64 inputs). seed: int64 [1]
  // of the dropout RNG (None when dropout_p == 0).
  m.def(
      "stream_attention_fwd(Tensor q, Tensor k_prefix, Tensor v_prefix, Tensor k_stream, "
      "Tensor v_stream, Tensor? prefix_mask, float scale, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor)");
  // -> (dq, dk_prefix, dv_prefix, dk_stream, dv_stream).
  m.def(
      "stream_attention_bwd(Tensor grad_o, Tensor q, Tensor k_prefix, Tensor v_prefix, "
      "Tensor k_stream, Tensor v_stream, Tensor? prefix_mask, Tensor o, Tensor lse, float scale, "
      "float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  PLR_FAKES_IN(m, "plr_kernels.causal_stream_attention");
  // The causal-prefix form (plr_kernels/causal_stream_attention.py): the M
  // streams of every prefix end n attend to the prefix keys j <= n and to
  // their own tokens. q [B,H,N,M,D]; k_prefix/v_prefix [B,H,N,D]; k_stream/
  // v_stream [B,H,N,M,S,D]; prefix_mask [B,N] bool. Returns (o [B,H,N,M,D],
  // lse [B,H,N,M]); the backward's arguments and results as above.
  m.def(
      "causal_stream_attention_fwd(Tensor q, Tensor k_prefix, Tensor v_prefix, Tensor k_stream, "
      "Tensor v_stream, Tensor? prefix_mask, float scale, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor)");
  m.def(
      "causal_stream_attention_bwd(Tensor grad_o, Tensor q, Tensor k_prefix, Tensor v_prefix, "
      "Tensor k_stream, Tensor v_stream, Tensor? prefix_mask, Tensor o, Tensor lse, float scale, "
      "float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  PLR_FAKES_IN(m, "plr_kernels.reasoning_steps");
  // The T reasoning steps of M streams through all L layers, inference only
  // (plr_kernels/reasoning_steps.py, csrc/reasoning_steps.cpp): h_start
  // [B,M,d] (h_{0,m}), step_emb [T,d] (r_t), the step input's LayerNorm,
  // layer_weights 16 per layer (TransformerBlock.step_weights), the prefix
  // cache k_prefix / v_prefix [B,H,N,Dh] per layer. Returns h_{t,m} [B,T,M,d].
  m.def(
      "reasoning_steps(Tensor h_start, Tensor step_emb, Tensor step_norm_weight, Tensor step_norm_bias, "
      "Tensor[] layer_weights, Tensor[] k_prefix, Tensor[] v_prefix, Tensor? prefix_mask, int num_heads, "
      "float eps) -> Tensor");

  PLR_FAKES_IN(m, "plr_kernels.vocab_pass");
  // The vocabulary pass (plr_kernels/vocab_pass.py), streamed over tiles of
  // the item table: x [R,d], item_emb [V,d], target [R] int64 (-1 = none) ->
  // (lse [R], mu [R,d], t [R]) with l_r(v) = x_r.e_v / temperature,
  // lse_r = logsumexp_v l_r(v), mu_r = sum_v p_r(v) e_v, t_r = l_r(target_r)
  // (0 where target_r = -1); fp32 statistics (fp64 for fp64 inputs).
  // mu_direct is read by the autograd only (its backward passes it on to
  // vocab_backward): the forward does not depend on it.
  m.def(
      "vocab_forward(Tensor x, Tensor item_emb, Tensor? target, float temperature, "
      "int exclude_index, bool mu_direct=True) -> (Tensor, Tensor, Tensor)");
  // Gradients (dx [R,d], dE [V,d]) for upstream gradients of (lse, mu, t);
  // c_r = g_mu_r . mu_r. mu_direct=False drops the explicit dependence of mu on
  // E (the stop-gradient KL of PLR Eq. 7, see plr_kernels/vocab_pass.py).
  // need_dx=False skips dx (returned as [0, d]) and its pass over E.
  m.def(
      "vocab_backward(Tensor x, Tensor item_emb, Tensor? target, Tensor lse, Tensor? g_lse, "
      "Tensor? g_mu, Tensor? c, Tensor? g_t, float temperature, int exclude_index, "
      "bool mu_direct, bool need_dx=True) -> (Tensor, Tensor)");
}

// `import plr_kernels._C` only has to load the shared library (which runs the
// registrations above); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "plr_kernels compiled kernels (see torch.ops.plr_kernels)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
