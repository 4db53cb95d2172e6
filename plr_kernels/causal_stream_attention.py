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
setup/backward: ``torch`` (the reference).

Dropout: the keep-mask ``[B,H,N,M,N+S]`` (prefix keys first) is that of
the non-causal op with its M stream rows replaced by the N*M rows (n, m):
``keep = Philox(seed, row*(N+S) + j) >= p`` with
``row = ((b*H + h)*N + n)*M + m``.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _dispatch, reference


def _reference(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    return reference.stream_attention(
        q, k_prefix, v_prefix, k_stream, v_stream,
        prefix_mask=prefix_mask, scale=scale, dropout_p=dropout_p, seed=seed, causal_prefix=True,
    )


IMPLS = {"torch": _reference}


def check_causal_stream_attention_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale,
                                       dropout_p, seed):
    _checks.check_tensor("q", q, ndim=5, dtypes=_checks.FLOAT_DTYPES)
    b, h, n, m, d = q.shape
    for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        _checks.check_tensor(name, t, ndim=4, shape=(b, h, n, d), device=q.device)
    s = k_stream.shape[4] if isinstance(k_stream, torch.Tensor) and k_stream.dim() == 6 else None
    for name, t in (("k_stream", k_stream), ("v_stream", v_stream)):
        _checks.check_tensor(name, t, ndim=6, shape=(b, h, n, m, s, d), device=q.device)
    if s == 0:
        raise ValueError("k_stream: expected S >= 1 (the current reasoning token is its own key), got S=0")
    _checks.check_same_dtype(
        ("q", "k_prefix", "v_prefix", "k_stream", "v_stream"), (q, k_prefix, v_prefix, k_stream, v_stream)
    )
    if prefix_mask is not None:
        _checks.check_tensor("prefix_mask", prefix_mask, dtypes=(torch.bool,), shape=(b, n), device=q.device)
    _checks.check_attention_scalars(scale, dropout_p, seed)


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
    check_causal_stream_attention_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale,
                                       dropout_p, seed)
    impl = IMPLS[_backend_name(backend, q.device.type, q.device.index)]
    return impl(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, float(dropout_p), seed)
