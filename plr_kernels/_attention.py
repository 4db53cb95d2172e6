"""What the two forms of stream-isolated attention share: the autograd wiring,
the dropout seed, the fake (meta) kernels and the per-backend op registration.

Both ``plr_kernels/stream_attention.py`` (one reasoning step, ``q [B,H,M,D]``)
and ``plr_kernels/causal_stream_attention.py`` (every prefix end at once,
``q [B,H,N,M,D]``) have, per backend, a forward op

    (q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed)
        -> (o of q's shape, lse = q.shape[:-1] in the statistics dtype)

and a backward op ``(grad_o, those tensors, o, lse, scale, dropout_p, seed)``
-> the five input gradients. The Triton ops are Python custom ops defined by
:func:`define_triton_ops`; the compiled ops are C++ (csrc/ops.cpp) and get
their fakes and autograd from the op's module, which csrc/ops.cpp names as
their Python module.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from . import _checks, _dispatch, _extension

Tensor = torch.Tensor


# -- autograd shared by every backend's forward op ------------------------------


def setup_context(ctx, inputs, output):
    q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed = inputs
    ctx.save_for_backward(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, *output, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def backward_through(backward_op: Callable) -> Callable:
    """The autograd backward of a forward op whose backward op is ``backward_op``."""

    def backward(ctx, do, _dlse):
        # lse is an auxiliary output (the softmax statistics); it carries no gradient.
        q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, seed = ctx.saved_tensors
        grads = backward_op(do, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, ctx.scale,
                            ctx.dropout_p, seed)
        return (*grads, None, None, None, None)

    return backward


# -- fakes (torch.compile, FakeTensorMode), one pair for both forms ------------


def forward_fake(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=_checks.stats_dtype(q.dtype))


def backward_fake(do, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, scale, dropout_p, seed):
    return tuple(t.new_empty(t.shape) for t in (q, k_prefix, v_prefix, k_stream, v_stream))


# -- the dropout seed -----------------------------------------------------------


def seed_tensor(seed: Optional[int], dropout_p: float, device) -> Optional[torch.Tensor]:
    """The dropout seed as a 1-element int64 tensor (a tensor, so that a new
    seed per call neither recompiles under torch.compile nor syncs the GPU).
    ``None`` draws it from torch's global generator (torch.manual_seed)."""
    if dropout_p == 0.0:
        return None
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    seed = int(seed) & (2**64 - 1)  # Philox keys on 64 bits; keep them, two's complement
    return torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64, device=device)


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def forward_impl(forward_op: Callable) -> Callable:
    """The IMPLS entry calling ``forward_op`` (a torch.ops callable) and returning ``o``."""

    def impl(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
        o, _ = forward_op(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, _default_scale(q, scale),
                          dropout_p, seed_tensor(seed, dropout_p, q.device))
        return o

    return impl


# -- Triton: a forward and a backward custom op per form ------------------------


def define_triton_ops(name: str, kernels: Callable) -> Callable:
    """Defines ``plr_kernels::<name>_triton_fwd`` / ``_bwd`` (custom ops with
    their fakes and the shared autograd) on the ``forward`` / ``backward`` of
    the Triton module returned by ``kernels()`` (imported on first use, not
    with plr_kernels), and returns the IMPLS entry that calls the forward."""

    def fwd(q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_stream: Tensor, v_stream: Tensor,
            prefix_mask: Optional[Tensor], scale: float, dropout_p: float,
            seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return kernels().forward(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed)

    def bwd(do: Tensor, q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_stream: Tensor, v_stream: Tensor,
            prefix_mask: Optional[Tensor], o: Tensor, lse: Tensor, scale: float, dropout_p: float,
            seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return kernels().backward(do, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, scale,
                                  dropout_p, seed)

    fwd_op = torch.library.custom_op(f"plr_kernels::{name}_triton_fwd", fwd, mutates_args=())
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op(f"plr_kernels::{name}_triton_bwd", bwd, mutates_args=())
    bwd_op.register_fake(backward_fake)
    fwd_op.register_autograd(backward_through(bwd_op), setup_context=setup_context)
    return forward_impl(getattr(torch.ops.plr_kernels, f"{name}_triton_fwd"))


# -- the compiled ops of plr_kernels._C -----------------------------------------


def compiled_forward(op_name: str) -> Callable:
    """The IMPLS entry of the compiled forward ``torch.ops.plr_kernels.<op_name>``
    (looked up per call: the op exists only where _C is built)."""

    def impl(*args):
        return forward_impl(getattr(torch.ops.plr_kernels, op_name))(*args)

    return impl


def cpu_dropout_mask(b: int, h: int, m: int, n: int, s: int, dropout_p: float, seed: int) -> torch.Tensor:
    """Debug path: the bool keep-mask ``[B,H,M,N+S]`` (prefix keys first) that
    ``stream_attention(..., dropout_p=p, seed=seed, backend="cpu")`` uses, for
    ``reference.stream_attention(..., dropout_mask=...)``.

    Read off the compiled forward itself: with q = 0 every probability is
    1/(N+S), and with value rows the unit vectors e_j, o[..., j] =
    keep_j / ((N+S)(1-p)), which is > 0 exactly where key j is kept. Builds
    B*H*N*(N+S) values: meant for tests on small shapes.
    """
    if not _extension.has_kernel("stream_attention_fwd", "cpu"):
        raise _dispatch.BackendUnavailableError(
            f"cpu_dropout_mask needs the compiled CPU kernel: {_extension.extension_error() or 'not built'}")
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in (0, 1), got {dropout_p!r}")
    width = n + s
    eye = torch.eye(width, dtype=torch.float32)
    o, _ = torch.ops.plr_kernels.stream_attention_fwd(
        torch.zeros(b, h, m, width), torch.zeros(b, h, n, width), eye[:n].expand(b, h, n, width),
        torch.zeros(b, h, m, s, width), eye[n:].expand(b, h, m, s, width), None, 1.0, float(dropout_p),
        seed_tensor(seed, dropout_p, torch.device("cpu")))
    return o > 0


def inference_only(forward: Callable, what: str) -> Callable:
    """The ``cuda`` IMPLS entry: the compiled CUDA kernels are a forward for
    inference (csrc/cuda/), with no backward and no dropout (which only
    matters in training); refused, naming ``what``, when either is needed."""

    def impl(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k_prefix, v_prefix, k_stream, v_stream))
        if needs_grad or dropout_p > 0.0:
            why = "a gradient is required" if needs_grad else f"dropout_p={dropout_p} > 0"
            raise _dispatch.BackendUnavailableError(
                f"backend='cuda' cannot run {what} here: {why}, but the CUDA kernel is "
                "inference-only (no backward, no dropout); use backend='triton' (or 'auto') for "
                "training, or call it under torch.no_grad() with dropout_p=0")
        return forward(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed)

    return impl
