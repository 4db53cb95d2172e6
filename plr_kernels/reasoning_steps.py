"""The whole latent reasoning of PLR at inference in one call (PLR Eq. 4-5).

``reasoning_steps`` runs the T steps of M parallel streams through all L
post-LN layers: per step the input token ``LN_r(h_{t-1,m} + r_t)``, then per
layer the q/k/v projections, the stream-isolated attention over the shared
prefix cache and the stream's own tokens (``stream_attention``), the output
projection and the feed-forward block, each followed by its residual
LayerNorm. It is the loop of ``plr.models.reasoning.reasoning_step`` without
dropout and without autograd: for serving and evaluation.

Backends: ``cpu``, the compiled ``plr_kernels::reasoning_steps``
(csrc/reasoning_steps.cpp: the same ATen GEMMs, LayerNorms and GELU, and the
compiled stream attention, with no Python between them -- at batch 1 that
Python cost more than the steps' GEMVs), run with all intra-op threads or
one, whichever measures faster per shape class; ``torch``, the reference
(``plr_kernels.reference.reasoning_steps``). There is no GPU kernel: on a GPU
the per-step path (Triton / CUDA stream attention) runs, and ``auto`` picks
``torch`` for CUDA tensors.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _autotune, _checks, _dispatch, _extension, reference

Tensor = torch.Tensor

WEIGHTS_PER_LAYER = 16  # the order of plr.transformer.TransformerBlock.step_weights


def _reference(h_start, step_emb, norm_w, norm_b, layer_weights, k_prefix, v_prefix, prefix_mask, num_heads, eps):
    return reference.reasoning_steps(h_start, step_emb, norm_w, norm_b, layer_weights, k_prefix, v_prefix,
                                     prefix_mask=prefix_mask, num_heads=num_heads, eps=eps)


def _compiled(h_start, step_emb, norm_w, norm_b, layer_weights, k_prefix, v_prefix, prefix_mask, num_heads, eps):
    return torch.ops.plr_kernels.reasoning_steps(h_start, step_emb, norm_w, norm_b, list(layer_weights),
                                                 list(k_prefix), list(v_prefix), prefix_mask, num_heads, eps)


def _fake(h_start, step_emb, norm_w, norm_b, layer_weights, k_prefix, v_prefix, prefix_mask, num_heads, eps):
    b, m, d = h_start.shape
    return h_start.new_empty((b, step_emb.shape[0], m, d))


# csrc/ops.cpp names this module as the home of the compiled op's fake.
if _extension.compiled_op_exists("plr_kernels::reasoning_steps"):
    torch.library.register_fake("plr_kernels::reasoning_steps", _fake)

def _one_thread(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compiled(*args)
    finally:
        torch.set_num_threads(threads)


def _compiled_at_fastest_threads(*args):
    """The compiled op with all of torch's intra-op threads or with one,
    whichever measures faster for the shape class (plr_kernels/_autotune.py).
    A small pass is not worth splitting: at batch 1 (M=2, T=2, d=256) two
    threads measured 528 us against one thread's 386 us on the project's
    2-core CPU, at batch 64 4.4 ms against 7.6 ms (benchmarks/RESULTS.md, issue 15).
    The one-thread choice sets ``torch.set_num_threads(1)`` for the call, which
    is process-wide: a torch op another thread starts meanwhile also runs on
    one thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        return _compiled(*args)
    h_start, step_emb, layers = args[0], args[1], len(args[5])
    b, m, d = h_start.shape
    key = ("reasoning_steps", h_start.dtype, _autotune.size_bucket(b * m), step_emb.shape[0], d, layers, threads)
    name = _autotune.fastest(key, {"all threads": lambda: _compiled(*args), "one thread": lambda: _one_thread(args)},
                             h_start.device)
    return _compiled(*args) if name == "all threads" else _one_thread(args)


IMPLS = {"torch": _reference, "cpu": _compiled_at_fastest_threads}


def _check_args(h_start, step_emb, layer_weights, k_prefix, v_prefix, num_heads) -> None:
    _checks.check_tensor("h_start", h_start, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    d = h_start.shape[2]
    _checks.check_tensor("step_emb", step_emb, ndim=2, device=h_start.device)
    if step_emb.shape[0] < 1 or step_emb.shape[1] != d:
        raise ValueError(f"step_emb: expected shape [T >= 1, d={d}], got {list(step_emb.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or d % num_heads:
        raise ValueError(f"num_heads: expected an int >= 1 dividing d={d}, got {num_heads!r}")
    if len(k_prefix) < 1 or len(v_prefix) != len(k_prefix):
        raise ValueError(f"k_prefix, v_prefix: expected one tensor per layer (L >= 1) each, got "
                         f"{len(k_prefix)} and {len(v_prefix)}")
    if len(layer_weights) != WEIGHTS_PER_LAYER * len(k_prefix):
        raise ValueError(f"layer_weights: expected {WEIGHTS_PER_LAYER} tensors per layer "
                         f"({WEIGHTS_PER_LAYER * len(k_prefix)} for L={len(k_prefix)}), got {len(layer_weights)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (h_start, step_emb, *layer_weights,
                                                                   *k_prefix, *v_prefix)):
        raise RuntimeError("reasoning_steps: inference only (no autograd); call it under torch.no_grad() "
                           "or train through plr.models.reasoning.reasoning_step")


def reasoning_steps(
    h_start: Tensor,
    step_emb: Tensor,
    step_norm_weight: Tensor,
    step_norm_bias: Tensor,
    layer_weights: Sequence[Tensor],
    k_prefix: Sequence[Tensor],
    v_prefix: Sequence[Tensor],
    *,
    prefix_mask: Optional[Tensor] = None,
    num_heads: int,
    eps: float,
    backend: str = "auto",
) -> Tensor:
    """The states ``h_{t,m}`` of T reasoning steps of M streams, inference only.

    Args:
        h_start: ``[B, M, d]`` the state each stream starts from (PLR Eq. 3:
            ``h_{0,m} = h_0 + tau_m``).
        step_emb: ``[T, d]`` the step embeddings r_t (T >= 1).
        step_norm_weight, step_norm_bias: ``[d]`` the LayerNorm of the step input.
        layer_weights: 16 tensors per layer, in the order of
            ``plr.transformer.TransformerBlock.step_weights``: W_q, b_q, W_k,
            b_k, W_v, b_v ``[d,d]``/``[d]``, W_O, b_O, the attention LayerNorm's
            weight and bias, W_1 ``[F,d]``, b_1 ``[F]``, W_2 ``[d,F]``, b_2,
            the feed-forward LayerNorm's weight and bias.
        k_prefix, v_prefix: per layer ``[B, H, N, Dh]`` the shared prefix KV
            cache (``H = num_heads``, ``H * Dh = d``).
        prefix_mask: ``[B, N]`` bool, True = valid prefix key (None: all valid).
        num_heads: attention heads H.
        eps: the LayerNorms' epsilon.
        backend: ``auto | cpu | torch``; ``auto`` = ``cpu`` for CPU tensors
            when ``plr_kernels._C`` is built, else ``torch``.

    Returns:
        ``[B, T, M, d]``: ``h_{t,m}``, the last layer's output of step t of stream m.
    """
    _check_args(h_start, step_emb, layer_weights, k_prefix, v_prefix, num_heads)
    impl = _dispatch.resolve("reasoning_steps", backend, h_start.device, IMPLS)
    return impl(h_start, step_emb, step_norm_weight, step_norm_bias, layer_weights, k_prefix, v_prefix,
                prefix_mask, num_heads, float(eps))
