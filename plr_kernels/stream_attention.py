"""Stream-isolated causal attention over a shared prefix KV cache (DESIGN 4.1).

One reasoning step of one layer of PLR (Eq. 4-5): the query of stream m at
step t attends to every valid prefix key and to its own stream's keys 1..t,
never to another stream. The fused kernels read the prefix once for all M
streams; the reference expands nothing either but materialises the weights.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _dispatch, reference


def _reference(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    return reference.stream_attention(
        q, k_prefix, v_prefix, k_stream, v_stream,
        prefix_mask=prefix_mask, scale=scale, dropout_p=dropout_p, seed=seed,
    )


IMPLS = {"torch": _reference}


def check_stream_attention_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    _checks.check_tensor("q", q, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    b, h, m, d = q.shape
    n = k_prefix.shape[2] if isinstance(k_prefix, torch.Tensor) and k_prefix.dim() == 4 else None
    for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        _checks.check_tensor(name, t, ndim=4, shape=(b, h, n, d), device=q.device)
    s = k_stream.shape[3] if isinstance(k_stream, torch.Tensor) and k_stream.dim() == 5 else None
    for name, t in (("k_stream", k_stream), ("v_stream", v_stream)):
        _checks.check_tensor(name, t, ndim=5, shape=(b, h, m, s, d), device=q.device)
    if s == 0:
        raise ValueError("k_stream: expected S >= 1 (the current reasoning token is its own key), got S=0")
    _checks.check_same_dtype(
        ("q", "k_prefix", "v_prefix", "k_stream", "v_stream"), (q, k_prefix, v_prefix, k_stream, v_stream)
    )
    if prefix_mask is not None:
        _checks.check_tensor("prefix_mask", prefix_mask, dtypes=(torch.bool,), shape=(b, n), device=q.device)
    if scale is not None:
        _checks.check_positive("scale", scale)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected None or an int, got {type(seed).__name__}")


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
        backend: ``auto | torch`` for now.

    Returns:
        ``o [B, H, M, D]``.
    """
    check_stream_attention_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed)
    impl = _dispatch.resolve("stream_attention", backend, q.device, IMPLS)
    return impl(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, float(dropout_p), seed)
