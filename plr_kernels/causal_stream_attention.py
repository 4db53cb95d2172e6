"""Stream-isolated attention in the causal-prefix form (PLR Eq. 4-5 for every prefix at once).

Training on every prefix of a sequence (S_1..n -> v_n+1, as ReaRec) needs one
encoder pass per sequence: under causal attention with start-anchored
positions, the encoder output at position n is h_0 of the prefix 1..n and its
KV cache is the sequence's cache cut at n. The M x T reasoning tokens of every
position n then attend to that shared cache cut at n plus their own stream's
tokens. This module is that attention: ``q [B,H,N,M,D]``, one shared
``k/v_prefix [B,H,N,D]`` read once per (b, h) -- never copied per position --
and ``k/v_stream [B,H,N,M,S,D]``.

Backends as :mod:`plr_kernels.stream_attention`, with their own
``torch.library`` custom ops (fakes beside them) and the same autograd
setup/backward: ``triton`` (plr_kernels/triton/causal_stream_attention.py,
forward and backward; CPU tensors under TRITON_INTERPRET=1), ``cpu``
(csrc/causal_stream_attention.cpp, forward and backward), ``cuda``
(csrc/cuda/causal_stream_attention.cu, inference only) and ``torch`` (the
reference). ``auto`` as for the non-causal op: Triton for CUDA tensors, the
C++ kernel for CPU tensors when ``plr_kernels._C`` is built, else the reference.

Dropout: the keep-mask ``[B,H,N,M,N+S]`` (prefix keys first) is that of
the non-causal op with its M stream rows replaced by the N*M rows (n, m):
``keep = Philox(seed, row*(N+S) + j) >= p`` with
``row = ((b*H + h)*N + n)*M + m``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _attention, _checks, _dispatch, _extension, reference


def _reference(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    return reference.stream_attention(
        q, k_prefix, v_prefix, k_stream, v_stream,
        prefix_mask=prefix_mask, scale=scale, dropout_p=dropout_p, seed=seed, causal_prefix=True,
    )


IMPLS = {"torch": _reference}


# -- Triton: kernels in plr_kernels/triton/causal_stream_attention.py, wrapped
# as the custom ops plr_kernels::causal_stream_attention_triton_fwd / _bwd
# (plr_kernels/_attention.py).


def _kernels():
    from .triton import causal_stream_attention as kernels

    return kernels


def causal_triton_dropout_mask(b: int, h: int, n: int, m: int, s: int, dropout_p: float, seed: int,
                               device="cpu") -> torch.Tensor:
    """Debug path: the bool keep-mask ``[B,H,N,M,N+S]`` (prefix keys first) that
    ``stream_attention(..., causal_prefix=True, dropout_p=p, seed=seed, backend="triton")``
    uses, for ``reference.stream_attention(..., causal_prefix=True, dropout_mask=...)``."""
    return _kernels().dropout_mask(b, h, n, m, s, dropout_p,
                                   _attention.seed_tensor(seed, 1.0, torch.device(device)))


if _dispatch.triton_importable():
    IMPLS["triton"] = _attention.define_triton_ops("causal_stream_attention", _kernels)


# -- Compiled kernels of plr_kernels._C: torch.ops.plr_kernels.causal_stream_attention_fwd
# / _bwd (schemas in csrc/ops.cpp, which names this module as the home of their
# fakes; CPU kernels in csrc/causal_stream_attention.cpp, the CUDA forward in
# csrc/cuda/causal_stream_attention.cu), with the autograd of plr_kernels/_attention.py.

_COMPILED_FWD = "plr_kernels::causal_stream_attention_fwd"
_COMPILED_BWD = "plr_kernels::causal_stream_attention_bwd"


def causal_cpu_dropout_mask(b: int, h: int, n: int, m: int, s: int, dropout_p: float, seed: int) -> torch.Tensor:
    """Debug path: the bool keep-mask ``[B,H,N,M,N+S]`` (prefix keys first) that
    ``stream_attention(..., causal_prefix=True, dropout_p=p, seed=seed, backend="cpu")``
    uses, for ``reference.stream_attention(..., causal_prefix=True, dropout_mask=...)``.

    The causal kernel draws keep[(b,h,n,m), j] from the offset of row
    ``((b*H + h)*N + n)*M + m`` of the non-causal layout, so this is the mask
    of the non-causal compiled kernel with N*M rows, read off that kernel
    (entries j > n exist in the layout but no query uses them)."""
    return _attention.cpu_dropout_mask(b, h, n * m, n, s, dropout_p, seed).view(b, h, n, m, n + s)


if _extension.compiled_op_exists(_COMPILED_FWD):
    torch.library.register_fake(_COMPILED_FWD, _attention.forward_fake)
    torch.library.register_fake(_COMPILED_BWD, _attention.backward_fake)
    torch.library.register_autograd(
        _COMPILED_FWD, _attention.backward_through(torch.ops.plr_kernels.causal_stream_attention_bwd),
        setup_context=_attention.setup_context)

# Listed even without a build: _dispatch checks that the loaded _C has the
# kernel for the device, and its error then says why it is missing.
IMPLS["cpu"] = _attention.compiled_forward("causal_stream_attention_fwd")
IMPLS["cuda"] = _attention.inference_only(IMPLS["cpu"], "stream_attention(causal_prefix=True)")


@torch.compiler.assume_constant_result
def _backend_name(backend: str, device_type: str, device_index: Optional[int]) -> str:
    """The IMPLS entry that runs for ``backend`` on the device (a trace-time
    constant under torch.compile, as in plr_kernels/stream_attention.py)."""
    impl = _dispatch.resolve("causal_stream_attention", backend, torch.device(device_type, device_index), IMPLS,
                             kernel="causal_stream_attention_fwd")
    return next(name for name, fn in IMPLS.items() if fn is impl)


def causal_stream_attention(
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
    backend: str = "auto",
) -> torch.Tensor:
    """Stream-isolated attention of every prefix end n over the cache cut at n.

    ``stream_attention(..., causal_prefix=True)`` calls this.

    Args:
        q: ``[B, H, N, M, D]`` the M stream queries of every prefix end n.
        k_prefix, v_prefix: ``[B, H, N, D]`` the sequence's KV cache, shared by
            every position and stream.
        k_stream, v_stream: ``[B, H, N, M, S, D]`` stream m of position n: its
            own reasoning tokens 1..S, the current one included (S >= 1).
        prefix_mask: ``[B, N]`` bool, True = valid key (None: all valid).
        scale, dropout_p, seed, backend: as
            :func:`plr_kernels.stream_attention`.

    Query (b,h,n,m) attends to the prefix keys j <= n with
    ``prefix_mask[b,j]`` and to ``k_stream[b,h,n,m,:]``; positions with no
    valid prefix key <= n (left padding) still see their own stream.

    Returns:
        ``o [B, H, N, M, D]``.
    """
    _checks.check_stream_attention_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale,
                                        dropout_p, seed, causal_prefix=True)
    impl = IMPLS[_backend_name(backend, q.device.type, q.device.index)]
    return impl(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, float(dropout_p), seed)
