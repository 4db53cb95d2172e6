"""Latent reasoning over a shared prefix KV cache (PLR Eq. 4-5), shared by PLR and ReaRec.

Step t = 1..T feeds one new token per stream through **all** L layers of the
backbone; at every layer the token attends to the valid prefix keys and to
its own stream's tokens 1..t (``plr_kernels.stream_attention``), never to
another stream. ``reasoning_step`` is one step (the equations are in its
docstring); PLR's ``PLRModel.reason`` (plr/models/plr.py) runs the T steps
with it directly, ``stream_reasoning`` runs them for ReaRec. With one stream
this is exactly ReaRec's append-and-re-encode reasoning, computed from the
cache instead of re-encoding the extended sequence.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, List, Optional, Tuple

import torch

import plr_kernels
from plr_kernels import _extension

from ..transformer import PrefixEncoding, Rows, StreamCache

# Set by record_attention(): where reasoning_step appends the attention maps.
_ATTENTION_RECORD: ContextVar[Optional[list]] = ContextVar("plr_attention_record", default=None)


@contextmanager
def record_attention() -> Iterator[List[List[torch.Tensor]]]:
    """Record the attention probabilities of every reasoning step (attention maps).

    Inside the block, every :func:`reasoning_step` (PLR's and ReaRec's) runs the reference attention op
    (the model must use ``backend="torch"``) and appends, per step t, the list
    over layers of its probabilities ``[B,H,M,N+S]`` (prefix keys first, then
    the stream's own tokens 1..t; ``plr_kernels.reference.stream_attention``
    with ``return_probs=True``). Yields that list of steps."""
    steps: List[List[torch.Tensor]] = []
    token = _ATTENTION_RECORD.set(steps)
    try:
        yield steps
    finally:
        _ATTENTION_RECORD.reset(token)


def reasoning_step(layers, x: torch.Tensor, keys: List[torch.Tensor], values: List[torch.Tensor],
                   key_mask: torch.Tensor, caches: List[StreamCache], backend: str,
                   rows: Optional[Rows] = None) -> torch.Tensor:
    """One latent reasoning step of all M streams, through all L layers (PLR Eq. 4-5).

    With ``x_{t,m}`` the step's input token of stream m (``x [B,M,d]``) and, at
    layer l, ``K^l_P, V^l_P`` the shared prefix cache (``keys[l], values[l]
    [B,H,N,Dh]``, valid where ``key_mask [B,N]``) and ``K^l_{1..t,m}, V^l_{1..t,m}``
    the keys/values of stream m's own tokens so far (``caches[l]``, this step's
    appended):

        a^l_{t,m} = softmax(q^l_{t,m} [K^l_P ; K^l_{1..t,m}]^T / sqrt(Dh)) [V^l_P ; V^l_{1..t,m}]
        y^l_{t,m} = LN(x^{l-1}_{t,m} + W_O a^l_{t,m}),   x^l_{t,m} = LN(y^l_{t,m} + FFN(y^l_{t,m}))
        h_{t,m}   = x^L_{t,m},   x^0_{t,m} = x_{t,m}                                   (PLR Eq. 4-5)

    per head (q, K, V the layer's projections of its input; padding prefix keys
    masked out), in the post-LN blocks of the backbone (plr/transformer.py,
    ``TransformerBlock.forward_step``; dropout omitted above): stream m never
    sees a stream m' != m, and all M streams read the prefix cache once
    (``plr_kernels.stream_attention``).

    ``caches`` (one entry per layer, ``None`` before the first step) is updated
    in place. ``rows = (b [R], n [R])`` runs the step for R prefix ends of one
    encoder pass over whole sequences (sequence training: row r's prefix cache is
    sequence b_r's cut at n_r, ``TransformerBlock.forward_step_rows``); then
    ``x`` is ``[R,M,d]``. Returns ``h_{t,m}`` shaped like ``x``. Inside
    ``record_attention`` (and without ``rows``) the step's attention
    probabilities, one tensor per layer, are appended to the record.
    """
    record = _ATTENTION_RECORD.get() if rows is None else None
    probs = None if record is None else []
    for i, layer in enumerate(layers):
        if rows is None:
            x, caches[i] = layer.forward_step(x, keys[i], values[i], key_mask, caches[i], backend, probs)
        else:
            x, caches[i] = layer.forward_step_rows(x, rows, keys[i], values[i], key_mask, caches[i], backend)
    if record is not None:
        record.append(probs)
    return x


_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _fused_kernel_built() -> bool:
    return _extension.has_kernel("reasoning_steps", "cpu")


def fused_reasoning(model, prefix: PrefixEncoding, h_start: torch.Tensor, step_emb: torch.Tensor,
                    step_norm: torch.nn.LayerNorm) -> Optional[torch.Tensor]:
    """All T steps of :func:`reasoning_step` in one ``plr_kernels.reasoning_steps``
    call, when that computes exactly what the per-step loop does with the step
    input ``LN(h_{t-1,m} + r_t)``: inference (no autograd; ``model`` in eval
    mode, so no dropout), CPU tensors in float32, float64 or bfloat16 (the
    kernel's dtypes), ``model.backend`` ``auto`` or ``cpu`` with the compiled
    kernel built, no :func:`record_attention` block. Returns
    the states ``[B,T,M,d]``, or None where the per-step loop must run.

    The per-step loop issues about 40 small ops per step from Python; at batch
    1 that overhead is most of PLR's extra latency over SASRec, and the fused
    call removes it (benchmarks/bench_serving.py)."""
    if (torch.is_grad_enabled() or model.training or h_start.device.type != "cpu"
            or h_start.dtype not in _FUSED_DTYPES or model.backend not in ("auto", "cpu")
            or _ATTENTION_RECORD.get() is not None or not _fused_kernel_built()):
        return None
    layers = model.backbone.layers
    eps = step_norm.eps
    if any(layer.attention.norm.eps != eps or layer.feed_forward.norm.eps != eps for layer in layers):
        return None  # one epsilon for every LayerNorm is what the kernel takes
    weights = [w for layer in layers for w in layer.step_weights()]
    return plr_kernels.reasoning_steps(h_start, step_emb, step_norm.weight, step_norm.bias, weights, prefix.keys,
                                       prefix.values, prefix_mask=prefix.key_mask,
                                       num_heads=layers[0].attention.num_heads, eps=eps, backend="cpu")


def step_prefix_cache(prefix: PrefixEncoding, num_steps: int, backend: str
                      ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The per-layer prefix keys and values the steps of ``reasoning_step`` read.

    Inference on a GPU: the CUDA forward reads the prefix cache contiguous; lay
    it out so once per layer instead of once per step. (The CPU kernel and
    Triton read the head-split layout in place; the reference reads any
    layout, and its einsum rounds layout-dependently, so it is left as is.)"""
    if num_steps > 1 and backend != "torch" and prefix.key_mask.is_cuda and not torch.is_grad_enabled():
        return [k.contiguous() for k in prefix.keys], [v.contiguous() for v in prefix.values]
    return prefix.keys, prefix.values


# Devices where the reasoning of R prefix ends (sequence training) runs on the
# rows as a batch of their own (rows_as_batch) instead of the causal
# [B,H,N,...] layout of stream_attention(causal_prefix=True). That layout
# computes all B*N prefix ends, of which only the R rows are real (Beauty,
# batch 256 x 20: ~1,381 of 5,120), and zero-fills buffers of that size, but
# reads each prefix once per (b, h), where the rows gather a copy per row. On
# the CPU the rows measured 1.22x faster per PLR step at M=4, T=5 and 1.05x at
# M=5, T=1, level at M=2 (0.97-0.99x) and slower at M=1 (0.87x for PLR, 0.97x
# for ERL; benchmarks/RESULTS.md, training cost). They are used from M=3
# streams. On CUDA the causal kernels are the ones measured, so they stay.
PACKED_ROWS_DEVICES = ("cpu",)
PACKED_ROWS_MIN_STREAMS = 3


def rows_as_batch(prefix: PrefixEncoding, rows: Rows, num_streams: int
                  ) -> Optional[Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]]:
    """The prefix caches of the R rows ``(b [R], n [R])`` as a batch of R:
    per layer row r's keys and values are sequence b_r's (gathered once for
    all the steps), and its key mask cuts them at n_r. Then the plain
    ``reasoning_step`` (no ``rows``) computes what the causal layout does for
    those rows (the same attention; another dropout mask). -> ``(keys [R,H,N,Dh]
    per layer, values, key_mask [R,N])``, or None where the causal layout is
    used (see ``PACKED_ROWS_DEVICES``)."""
    device = prefix.key_mask.device
    if device.type not in PACKED_ROWS_DEVICES or num_streams < PACKED_ROWS_MIN_STREAMS:
        return None
    b_idx, n_idx = rows
    cut = torch.arange(prefix.key_mask.shape[1], device=device) <= n_idx[:, None]
    return [k[b_idx] for k in prefix.keys], [v[b_idx] for v in prefix.values], prefix.key_mask[b_idx] & cut


def stream_reasoning(layers, prefix: PrefixEncoding, h_start: torch.Tensor, num_steps: int,
                     step_input: Callable[[torch.Tensor, int], torch.Tensor], backend: str) -> torch.Tensor:
    """Run ``num_steps`` reasoning steps (``reasoning_step``) of every stream.

    Args:
        layers: the backbone's ``TransformerBlock`` list.
        prefix: its ``PrefixEncoding`` (the per-layer prefix KV cache).
        h_start: ``[B, M, d]`` the state each stream starts from (``h_{0,m}``).
        step_input: ``(h_prev [B,M,d], step) -> [B,M,d]``, the input token of
            step ``step`` (0-based) from the previous state.
        backend: ``plr_kernels`` backend of the attention.

    Returns:
        ``[B, T, M, d]``: the final-layer outputs ``h_{t,m}`` (PLR Eq. 5).
    """
    keys, values = step_prefix_cache(prefix, num_steps, backend)
    caches: List[StreamCache] = [None] * len(layers)
    h, states = h_start, []
    for step in range(num_steps):
        h = reasoning_step(layers, step_input(h, step), keys, values, prefix.key_mask, caches, backend)
        states.append(h)
    return torch.stack(states, dim=1)


def stream_reasoning_rows(layers, prefix: PrefixEncoding, rows: Rows, h_start: torch.Tensor, num_steps: int,
                          step_input: Callable[[torch.Tensor, int], torch.Tensor], backend: str) -> torch.Tensor:
    """:func:`stream_reasoning` for R prefix ends of one encoder pass.

    ``prefix`` encodes whole sequences ``[B,N]`` (causal, start-anchored
    positions); row r = ``(b_r, n_r)`` of ``rows`` is the prefix made of
    positions ``0..n_r`` of sequence ``b_r``, whose prefix KV cache is the
    sequence's cache cut at ``n_r`` (``rows_as_batch``, or
    ``stream_attention(causal_prefix=True)``).
    ``h_start [R,M,d]``; returns ``[R,T,M,d]``, row r equal to what
    :func:`stream_reasoning` gives for that prefix encoded on its own.
    """
    keys, values, key_mask = prefix.keys, prefix.values, prefix.key_mask
    packed = rows_as_batch(prefix, rows, h_start.shape[1])
    if packed is not None:
        (keys, values, key_mask), rows = packed, None
    caches: List[StreamCache] = [None] * len(layers)
    h, states = h_start, []
    for step in range(num_steps):
        h = reasoning_step(layers, step_input(h, step), keys, values, key_mask, caches, backend, rows)
        states.append(h)
    return torch.stack(states, dim=1)
