"""Latent reasoning over a shared prefix KV cache, shared by PLR and ReaRec.

Step t = 1..T feeds one new token per stream through **all** L layers of the
backbone; at every layer the token attends to the valid prefix keys and to
its own stream's tokens 1..t (``plr_kernels.stream_attention``), never to
another stream (PLR Eq. 4-5). With one stream this is exactly ReaRec's
append-and-re-encode reasoning, computed from the cache instead of
re-encoding the extended sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, List, Optional

import torch

# Set by record_attention(): where stream_reasoning appends the attention maps.
_ATTENTION_RECORD: ContextVar[Optional[list]] = ContextVar("plr_attention_record", default=None)


@contextmanager
def record_attention() -> Iterator[List[List[torch.Tensor]]]:
    """Record the attention probabilities of every reasoning step (attention maps).

    Inside the block, :func:`stream_reasoning` runs the reference attention op
    (the model must use ``kernels="torch"``) and appends, per step t, the list
    over layers of its probabilities ``[B,H,M,N+S]`` (prefix keys first, then
    the stream's own tokens 1..t; ``plr_kernels.reference.stream_attention``
    with ``return_probs=True``). Yields that list of steps."""
    steps: List[List[torch.Tensor]] = []
    token = _ATTENTION_RECORD.set(steps)
    try:
        yield steps
    finally:
        _ATTENTION_RECORD.reset(token)


def stream_reasoning(layers, prefix, h_start: torch.Tensor, num_steps: int,
                     step_input: Callable[[torch.Tensor, int], torch.Tensor], kernels: str) -> torch.Tensor:
    """Run ``num_steps`` reasoning steps of every stream.

    Args:
        layers: the backbone's ``TransformerBlock`` list.
        prefix: its ``PrefixEncoding`` (the per-layer prefix KV cache).
        h_start: ``[B, M, d]`` the state each stream starts from (``h_{0,m}``).
        step_input: ``(h_prev [B,M,d], step) -> [B,M,d]``, the input token of
            step ``step`` (0-based) from the previous state.
        kernels: ``plr_kernels`` backend of the attention.

    Returns:
        ``[B, T, M, d]``: the final-layer outputs ``h_{t,m}`` (Eq. 5).
    """
    caches = [None] * len(layers)
    record = _ATTENTION_RECORD.get()
    keys, values = prefix.keys, prefix.values
    if num_steps > 1 and kernels != "torch" and prefix.key_mask.is_cuda and not torch.is_grad_enabled():
        # Inference on a GPU: the CUDA forward reads the prefix cache contiguous;
        # lay it out so once per layer instead of once per step. (The CPU kernel
        # and Triton read the head-split layout in place; the reference reads any
        # layout, and its einsum rounds layout-dependently, so it is left as is.)
        keys, values = [k.contiguous() for k in keys], [v.contiguous() for v in values]
    h_prev, states = h_start, []
    for step in range(num_steps):
        x = step_input(h_prev, step)
        probs = None if record is None else []
        for i, layer in enumerate(layers):
            x, caches[i] = layer.forward_step(x, keys[i], values[i], prefix.key_mask, caches[i], kernels, probs)
        if record is not None:
            record.append(probs)
        h_prev = x
        states.append(x)
    return torch.stack(states, dim=1)


def stream_reasoning_rows(layers, prefix, rows, h_start: torch.Tensor, num_steps: int,
                          step_input: Callable[[torch.Tensor, int], torch.Tensor], kernels: str) -> torch.Tensor:
    """:func:`stream_reasoning` for R prefix ends of one encoder pass.

    ``prefix`` encodes whole sequences ``[B,N]`` (causal, start-anchored
    positions); row r = ``(b_r, n_r)`` of ``rows`` is the prefix made of
    positions ``0..n_r`` of sequence ``b_r``, whose prefix KV cache is the
    sequence's cache cut at ``n_r`` (``stream_attention(causal_prefix=True)``).
    ``h_start [R,M,d]``; returns ``[R,T,M,d]``, row r equal to what
    :func:`stream_reasoning` gives for that prefix encoded on its own.
    """
    caches = [None] * len(layers)
    h_prev, states = h_start, []
    for step in range(num_steps):
        x = step_input(h_prev, step)
        for i, layer in enumerate(layers):
            x, caches[i] = layer.forward_step_rows(x, rows, prefix.keys[i], prefix.values[i], prefix.key_mask,
                                                   caches[i], kernels)
        h_prev = x
        states.append(x)
    return torch.stack(states, dim=1)
