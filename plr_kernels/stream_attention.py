"""Stream-isolated causal attention over a shared prefix KV cache (PLR Eq. 4-5).

One reasoning step of one layer of PLR (Eq. 4-5): the query of stream m at
step t attends to every valid prefix key and to its own stream's keys 1..t,
never to another stream. The fused kernels read the prefix once for all M
streams; the reference expands nothing either but materialises the weights.

Backends: ``triton`` (CUDA; CPU under TRITON_INTERPRET=1), ``cpu`` (the C++
kernel of csrc/stream_attention.cpp, forward and backward), ``cuda`` (the
compiled CUDA forward, inference only) and ``torch`` (the reference). The
compiled ops ``torch.ops.plr_kernels.stream_attention_fwd/_bwd`` get their
autograd here; every backend draws the same dropout mask for the same seed.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _attention, _checks, _dispatch, _extension, reference
from .causal_stream_attention import causal_stream_attention


def _reference(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    return reference.stream_attention(
        q, k_prefix, v_prefix, k_stream, v_stream,
        prefix_mask=prefix_mask, scale=scale, dropout_p=dropout_p, seed=seed,
    )


IMPLS = {"torch": _reference}


# -- Triton: kernels in plr_kernels/triton/stream_attention.py, wrapped as the
# custom ops plr_kernels::stream_attention_triton_fwd / _bwd (plr_kernels/_attention.py).


def _kernels():
    from .triton import stream_attention as kernels

    return kernels


def triton_dropout_mask(b: int, h: int, m: int, n: int, s: int, dropout_p: float, seed: int,
                        device="cpu") -> torch.Tensor:
    """Debug path: the bool keep-mask ``[B,H,M,N+S]`` (prefix keys first) that
    ``stream_attention(..., dropout_p=p, seed=seed, backend="triton")`` uses,
    for ``reference.stream_attention(..., dropout_mask=...)``."""
    return _kernels().dropout_mask(b, h, m, n, s, dropout_p,
                                   _attention.seed_tensor(seed, 1.0, torch.device(device)))


if _dispatch.triton_importable():
    IMPLS["triton"] = _attention.define_triton_ops("stream_attention", _kernels)


# -- Compiled kernels of plr_kernels._C: torch.ops.plr_kernels.stream_attention_fwd
# / _bwd (schemas in csrc/ops.cpp, which names this module as the home of their
# fakes; CPU kernels in csrc/stream_attention.cpp, the CUDA forward in
# csrc/cuda/stream_attention.cu). Fakes and autograd are registered here, only
# when the loaded build has the ops.

_COMPILED_FWD, _COMPILED_BWD = "plr_kernels::stream_attention_fwd", "plr_kernels::stream_attention_bwd"


# The CPU kernel's dropout mask (debug path, read off the compiled forward).
cpu_dropout_mask = _attention.cpu_dropout_mask


if _extension.compiled_op_exists(_COMPILED_FWD):
    torch.library.register_fake(_COMPILED_FWD, _attention.forward_fake)
    torch.library.register_fake(_COMPILED_BWD, _attention.backward_fake)
    torch.library.register_autograd(
        _COMPILED_FWD, _attention.backward_through(torch.ops.plr_kernels.stream_attention_bwd),
        setup_context=_attention.setup_context)

# Listed even without a build: _dispatch checks that the loaded _C has the
# kernel for the device, and its error then says why it is missing.
IMPLS["cpu"] = _attention.compiled_forward("stream_attention_fwd")
IMPLS["cuda"] = _attention.inference_only(IMPLS["cpu"], "stream_attention")


@torch.compiler.assume_constant_result
def _backend_name(backend: str, device_type: str, device_index: Optional[int], inference: bool) -> str:
    """The IMPLS entry that runs for ``backend`` on the device. A trace-time
    constant under torch.compile: which kernels _C holds cannot change while
    the process runs, and the lookup (torch._C dispatcher queries) is not
    traceable by dynamo."""
    return _resolve_backend_name(backend, device_type, device_index, inference, _dispatch.triton_interpreting())


# ``auto`` on a GPU for inference (no gradient, no dropout): the compiled CUDA
# forward first. Measured on an H100 (benchmarks/RESULTS.md, issue 6; bf16,
# H=2, D=128, N=50): 0.042 / 0.048 ms against Triton's 0.235 / 0.191 ms at
# B=64, M=1 / 8, and 0.110 / 0.192 against 0.202 / 0.185 at B=1024.
_CUDA_INFERENCE_ORDER = ("cuda", "triton")


@functools.lru_cache(maxsize=None)
def _resolve_backend_name(backend: str, device_type: str, device_index: Optional[int], inference: bool,
                          interpreting: bool) -> str:
    """``_backend_name``, resolved once per (backend, device, inference, TRITON_INTERPRET):
    the dispatcher queries cost more than a small reasoning step's kernel."""
    impl = _dispatch.resolve("stream_attention", backend, torch.device(device_type, device_index), IMPLS,
                             kernel="stream_attention_fwd",
                             cuda_order=_CUDA_INFERENCE_ORDER if inference else None)
    return next(name for name, fn in IMPLS.items() if fn is impl)


def stream_attention(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_stream: torch.Tensor,
    v_stream: torch.Tensor,
    *,
    prefix_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    causal_prefix: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of M stream queries over a shared prefix and their own streams.

    Args:
        q: ``[B, H, M, D]`` queries of the current step, one per stream.
        k_prefix, v_prefix: ``[B, H, N, D]`` the prefix KV cache, shared by all streams.
        k_stream, v_stream: ``[B, H, M, S, D]`` each stream's own reasoning
            tokens so far, the current one included (S >= 1).
        prefix_mask: ``[B, N]`` bool, True = valid key (None: all valid).
        scale: softmax scale, default ``1/sqrt(D)``.
        dropout_p: attention dropout on the probabilities (training).
        seed: seed of the dropout mask (None: the global generator).
        causal_prefix: the same step for every prefix end of one encoder
            pass (training on all prefixes of a sequence): ``q [B,H,N,M,D]``,
            ``k_stream, v_stream [B,H,N,M,S,D]``, ``k_prefix, v_prefix
            [B,H,N,D]`` read once per (b, h); query (b,h,n,m) attends to the
            valid prefix keys j <= n and to ``k_stream[b,h,n,m]``; returns
            ``o [B,H,N,M,D]``. See
            :func:`plr_kernels.causal_stream_attention.causal_stream_attention`.
        backend: ``auto | triton | cuda | cpu | torch``. ``triton``: CUDA
            tensors (or CPU tensors under ``TRITON_INTERPRET=1``), forward and
            backward; ``cpu``: the compiled C++ kernel for CPU tensors, forward
            and backward; ``cuda``: the compiled CUDA kernel, inference only
            (raises when a gradient is needed or ``dropout_p > 0``: train with
            ``triton``); ``torch``: the reference. ``auto`` picks, for CUDA
            tensors, ``cuda`` when no gradient is needed and ``dropout_p`` is 0
            (it measured fastest), else ``triton``; ``cpu`` for CPU tensors
            when ``plr_kernels._C`` is built; else ``torch``. The same ``seed`` gives the same dropout
            mask on ``triton`` and ``cpu``.

    Returns:
        ``o [B, H, M, D]`` (``[B, H, N, M, D]`` with ``causal_prefix``).
    """
    if not isinstance(causal_prefix, bool):
        raise TypeError(f"causal_prefix: expected a bool, got {type(causal_prefix).__name__}")
    if causal_prefix:
        return causal_stream_attention(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask=prefix_mask,
                                       scale=scale, dropout_p=dropout_p, seed=seed, backend=backend)
    _checks.check_stream_attention_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p,
                                        seed)
    inference = dropout_p == 0.0 and not (torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k_prefix, v_prefix, k_stream, v_stream)))
    impl = IMPLS[_backend_name(backend, q.device.type, q.device.index, inference)]
    return impl(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, float(dropout_p), seed)

