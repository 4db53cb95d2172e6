"""Pure-PyTorch reference of every ``plr_kernels`` op.

These functions are the truth the fused kernels are tested against and the
``backend="torch"`` implementation. They favour clarity over speed: they
materialise the ``[rows x items]`` logits and the dense attention weights that
the kernels avoid. Signatures match the public API (plr_kernels/__init__.py); the
public wrappers in ``plr_kernels`` validate arguments before calling in here.

Notation (PLR paper): ``h_k`` a reasoning state, ``E`` the item table,
``l_k(v) = h_k . e_v / tau`` the logits, ``p_k = softmax(l_k)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "stream_attention",
    "multi_pair_kl",
    "linear_cross_entropy",
    "target_rank",
    "topk",
    "dropout_keep_mask",
]


def _upcast_half(x: torch.Tensor) -> torch.Tensor:
    """Softmax statistics are kept in fp32 for 16-bit inputs (as the kernels, plr_kernels/_checks.py)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --------------------------------------------------------------------------
# 4.1 Stream-isolated causal attention over a shared prefix KV cache
# --------------------------------------------------------------------------


def dropout_keep_mask(shape, p: float, seed: Optional[int], device) -> torch.Tensor:
    """Bernoulli(1 - p) keep-mask of ``shape``; seeded when ``seed`` is given."""
    if seed is None:
        return torch.rand(shape, device=device) >= p
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


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
    dropout_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    causal_prefix: bool = False,
    return_probs: bool = False,
):
    """One reasoning step of one layer (PLR Eq. 4-5), all M streams at once.

    Shapes: ``q [B,H,M,D]``; ``k_prefix, v_prefix [B,H,N,D]`` (shared by all
    streams); ``k_stream, v_stream [B,H,M,S,D]`` (stream m's own reasoning
    tokens 1..S, the current one included); ``prefix_mask [B,N]`` bool, True =
    valid key. Returns ``o [B,H,M,D]`` (and the ``lse [B,H,M]`` of the
    pre-dropout softmax when ``return_lse``: fp32, fp64 for fp64 inputs, as the kernels).

    The query of stream m sees every valid prefix key and keys 1..S of its own
    stream, never another stream's. Attention dropout drops probabilities with
    ``dropout_p`` and rescales by ``1/(1-p)``; the keep-mask ``[B,H,M,N+S]``
    (prefix keys first) is drawn from ``seed`` or taken from ``dropout_mask``.
    A fully padded prefix is fine: the stream's own keys are always valid.

    ``causal_prefix=True``: the same step for every prefix end n = 0..N-1 of
    one encoder pass (see :func:`causal_prefix_stream_attention`).

    ``return_probs=True`` (a debug output, for attention maps): also return the
    attention probabilities before dropout, ``[B,H,M,N+S]`` (prefix keys first,
    masked keys 0), as ``(o, probs)``; not with ``return_lse`` or ``causal_prefix``.
    """
    if return_probs and (return_lse or causal_prefix):
        raise ValueError("return_probs: not available together with return_lse or causal_prefix")
    if causal_prefix:
        return causal_prefix_stream_attention(
            q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask=prefix_mask, scale=scale,
            dropout_p=dropout_p, seed=seed, dropout_mask=dropout_mask, return_lse=return_lse)
    b, h, m, d = q.shape
    n, s = k_prefix.shape[2], k_stream.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # The keys of the step: the shared prefix, then every stream's tokens
    # [B,H,N + M*S,D]; the explicit mask lets query m see the valid prefix keys
    # and the S tokens of its own stream only (PLR Eq. 4-5).
    keys = torch.cat([k_prefix, k_stream.reshape(b, h, m * s, d)], dim=2)
    values = torch.cat([v_prefix, v_stream.reshape(b, h, m * s, d)], dim=2)
    allowed = _stream_isolated_mask(prefix_mask, b, m, n, s, q.device)  # [B,M,N+M*S]
    scores = torch.einsum("bhmd,bhkd->bhmk", q, keys) * scale
    scores = _upcast_half(scores.masked_fill(~allowed[:, None], float("-inf")))
    lse = torch.logsumexp(scores, dim=-1)
    probs = attention_probs = torch.exp(scores - lse[..., None])
    if dropout_mask is not None or dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = dropout_keep_mask((b, h, m, n + s), dropout_p, seed, probs.device)
        probs = probs * _own_stream_layout(dropout_mask, n) / (1.0 - dropout_p)
    o = torch.einsum("bhmk,bhkd->bhmd", probs.to(q.dtype), values)
    if return_lse:
        return o, (lse if q.dtype == torch.float64 else lse.float())
    if return_probs:  # [B,H,M,N+M*S] -> the prefix keys and the query's own stream, [B,H,M,N+S]
        own = torch.diagonal(attention_probs[..., n:].reshape(b, h, m, m, s), dim1=2, dim2=3)  # [B,H,S,M]
        return o, torch.cat([attention_probs[..., :n], own.transpose(-1, -2)], dim=-1)
    return o


def _stream_isolated_mask(prefix_mask, b: int, m: int, n: int, s: int, device) -> torch.Tensor:
    """``allowed [B,M,N+M*S]``: query m may attend to prefix key j when
    ``prefix_mask[b,j]`` and to token (m', i) of the streams when m' = m."""
    prefix = torch.ones(b, m, n, dtype=torch.bool, device=device)
    if prefix_mask is not None:
        prefix = prefix & prefix_mask[:, None, :]
    own = torch.eye(m, dtype=torch.bool, device=device)[:, :, None].expand(m, m, s).reshape(m, m * s)
    return torch.cat([prefix, own.expand(b, m, m * s)], dim=-1)


def _own_stream_layout(keep: torch.Tensor, n: int) -> torch.Tensor:
    """A keep-mask ``[B,H,M,N+S]`` (prefix keys, then the query's own stream)
    spread over the keys ``[prefix | all M*S stream tokens]`` of
    :func:`stream_attention`; the other streams' entries (masked keys) are 0."""
    b, h, m, width = keep.shape
    s = width - n
    own = torch.eye(m, dtype=torch.bool, device=keep.device)[:, :, None]  # [M, M', 1]
    stream = keep[..., n:][:, :, :, None, :] & own  # [B,H,M,M',S]
    return torch.cat([keep[..., :n], stream.reshape(b, h, m, m * s)], dim=-1)


def causal_prefix_stream_attention(
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
    dropout_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """PLR Eq. 4-5 for every prefix of a sequence at once (the causal-prefix form).

    Under causal attention with start-anchored positions, the encoder output
    at position n is h_0 of the prefix 1..n and its KV cache is the sequence's
    cache cut at n. Shapes: ``q [B,H,N,M,D]`` (the M stream queries of every
    prefix end n); ``k_prefix, v_prefix [B,H,N,D]`` (the sequence's cache,
    shared by all n and m); ``k_stream, v_stream [B,H,N,M,S,D]`` (stream m of
    position n: its own tokens 1..S, the current one included);
    ``prefix_mask [B,N]`` bool, True = valid key. Returns ``o [B,H,N,M,D]``
    (and ``lse [B,H,N,M]`` when ``return_lse``, fp32; fp64 for fp64 inputs).

    Query (b,h,n,m) attends to the prefix keys j <= n with ``prefix_mask[b,j]``
    and to ``k_stream[b,h,n,m,:]``, never to another stream or another
    position's stream tokens. Written with the explicit boolean mask over
    ``[prefix keys | stream keys]``: scores, mask, softmax, dropout on the
    probabilities (keep-mask ``[B,H,N,M,N+S]``, prefix keys first, drawn from
    ``seed`` or taken from ``dropout_mask``), matmul with the values.
    """
    b, h, n, m, d = q.shape
    s = k_stream.shape[4]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.cat([
        torch.einsum("bhnmd,bhjd->bhnmj", q, k_prefix),   # [B,H,N,M,N] every prefix key
        torch.einsum("bhnmd,bhnmsd->bhnms", q, k_stream),  # [B,H,N,M,S] own stream only
    ], dim=-1) * scale
    # allowed[b, n, j]: prefix key j is valid and j <= n (the cache cut at n);
    # the S own-stream keys are always allowed.
    pos = torch.arange(n, device=q.device)
    allowed = (pos[None, :] <= pos[:, None]).expand(b, n, n)
    if prefix_mask is not None:
        allowed = allowed & prefix_mask[:, None, :]
    allowed = torch.cat([allowed, allowed.new_ones(b, n, s)], dim=-1)  # [B,N,N+S]
    scores = _upcast_half(scores.masked_fill(~allowed[:, None, :, None, :], float("-inf")))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if dropout_mask is not None or dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = dropout_keep_mask(probs.shape, dropout_p, seed, probs.device)
        probs = probs * dropout_mask / (1.0 - dropout_p)
    probs = probs.to(q.dtype)
    o = torch.einsum("bhnmj,bhjd->bhnmd", probs[..., :n], v_prefix) + torch.einsum(
        "bhnms,bhnmsd->bhnmd", probs[..., n:], v_stream
    )
    if return_lse:
        return o, (lse if q.dtype == torch.float64 else lse.float())
    return o


# --------------------------------------------------------------------------
# 4.2 The vocabulary pass: multi-pair KL and next-item cross-entropy
# --------------------------------------------------------------------------


def _item_log_probs(h, item_emb, temperature, exclude_index):
    """log p(v) = log softmax_v(h . e_v / tau), the excluded item at -inf."""
    logits = torch.matmul(h, item_emb.transpose(0, 1)) / temperature
    if exclude_index is not None:
        logits = logits.clone()
        logits[..., exclude_index] = float("-inf")
    return torch.log_softmax(_upcast_half(logits), dim=-1)


def multi_pair_kl(
    h: torch.Tensor,
    item_emb: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_index: Optional[int] = None,
    detach_target: bool = False,
) -> torch.Tensor:
    """Mean KL over the K(K-1) ordered pairs of a user's K states (PLR Eq. 7).

    ``h [B,K,d]``, ``item_emb [V,d]`` -> ``[B]``:

        L_KL = 1/(K(K-1)) * sum_{i != j} KL(p_i || p_j),
        KL(p_i || p_j) = sum_v p_i(v) (log p_i(v) - log p_j(v)),

    with ``p_k = softmax(h_k E^T / tau)`` over the items other than
    ``exclude_index``. ``detach_target`` stops the gradient through
    ``log p_j`` (the target side, E included), as ReaRec-ERL does. Written
    literally: every pair's KL is formed (``[B,K,K]``) and the off-diagonal
    ones averaged. The fused kernels compute the same value in the rearranged
    mu-form of plr_kernels/vocab_pass.py.
    """
    k = h.shape[1]
    log_p = _item_log_probs_without(h, item_emb, temperature, exclude_index)  # [B,K,V']
    p = log_p.exp()
    log_p_target = log_p.detach() if detach_target else log_p
    # kl[b, i, j] = sum_v p_i(v) log p_i(v) - sum_v p_i(v) log p_j(v)
    kl = (p * log_p).sum(-1)[:, :, None] - torch.einsum("biv,bjv->bij", p, log_p_target)
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=h.device)
    return (kl * off_diagonal).sum(dim=(1, 2)).div(k * (k - 1)).to(h.dtype)


def _item_log_probs_without(h, item_emb, temperature, exclude_index):
    """log p(v) = log softmax_v(h . e_v / tau) over the items other than
    ``exclude_index`` (its column removed: p = 0 there, and 0 * log 0 is no term)."""
    if exclude_index is not None:
        keep = torch.arange(item_emb.shape[0], device=item_emb.device) != exclude_index
        item_emb = item_emb[keep]
    logits = torch.matmul(h, item_emb.transpose(0, 1)) / temperature
    return torch.log_softmax(_upcast_half(logits), dim=-1)


def linear_cross_entropy(
    z: torch.Tensor,
    item_emb: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_index: Optional[int] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Full-softmax next-item cross-entropy ``lse(z E^T / tau) - z.e_y / tau``.

    ``z [B,d]``, ``item_emb [V,d]``, ``target [B]`` int64 -> scalar (``mean``,
    ``sum``) or ``[B]`` (``none``). ``exclude_index`` (the padding item) is
    left out of the softmax. This is L_NIP of PLR Eq. 11.
    """
    logp = _item_log_probs(z, item_emb, temperature, exclude_index)
    loss = -logp.gather(-1, target[:, None]).squeeze(-1)
    if reduction == "none":
        return loss.to(z.dtype)
    if reduction == "sum":
        return loss.sum().to(z.dtype)
    return loss.mean().to(z.dtype)


# --------------------------------------------------------------------------
# 4.3 Full-ranking evaluation and top-K
# --------------------------------------------------------------------------


def _scores_with_exclusions(z, item_emb, exclude_index, exclude_items):
    """``s = z E^T`` (fp32 for 16-bit inputs, as the kernels accumulate) and
    the bool mask ``[B,V]`` of excluded items."""
    scores = torch.matmul(_upcast_half(z), _upcast_half(item_emb).transpose(0, 1))
    excluded = torch.zeros_like(scores, dtype=torch.bool)
    if exclude_index is not None:
        excluded[:, exclude_index] = True
    if exclude_items is not None:
        # Count hits rather than scatter flags: a negative (ignored) entry is
        # clamped to id 0 and must not overwrite a real exclusion of item 0.
        hits = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        hits.scatter_add_(1, exclude_items.clamp(min=0), (exclude_items >= 0).to(torch.int32))
        excluded |= hits > 0
    return scores, excluded


@torch.no_grad()
def target_rank(
    z: torch.Tensor,
    item_emb: torch.Tensor,
    target: torch.Tensor,
    *,
    exclude_index: Optional[int] = None,
    exclude_items: Optional[torch.Tensor] = None,
    ties: str = "optimistic",
) -> torch.Tensor:
    """Exact 1-based rank of each target among all candidate items.

    ``z [B,d]``, ``item_emb [V,d]``, ``target [B]`` int64 -> int64 ``[B]``.
    Scores ``s = z E^T``; candidates are the items other than the target,
    ``exclude_index`` and the non-negative ids in ``exclude_items [B,L]``
    (the target itself is never excluded). ``ties="optimistic"`` counts
    candidates with ``s > s_target``; ``"pessimistic"`` counts ``s >= s_target``.
    NaN scores: a NaN candidate beats nothing, a NaN target is beaten by every
    candidate (it ranks last), so a diverged model never scores well.
    """
    scores, excluded = _scores_with_exclusions(z, item_emb, exclude_index, exclude_items)
    rows = torch.arange(z.shape[0], device=z.device)
    excluded[rows, target] = True  # the target is not its own competitor
    s_target = scores[rows, target][:, None]
    beats = scores >= s_target if ties == "pessimistic" else scores > s_target
    beats = beats | torch.isnan(s_target)
    return 1 + (beats & ~excluded).sum(dim=1).to(torch.int64)


@torch.no_grad()
def topk(
    z: torch.Tensor,
    item_emb: torch.Tensor,
    k: int,
    *,
    exclude_index: Optional[int] = None,
    exclude_items: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best-scoring items per row: ``(values [B,k], indices [B,k])``.

    ``s = z E^T`` without temperature; excluded items (``exclude_index`` and
    the non-negative ids of ``exclude_items [B,L]``) never appear. Ties are
    broken towards the smaller item id, so the result is deterministic. Items
    scoring NaN are no candidates either. A row with fewer than ``k``
    candidates ends in entries ``(-inf, -1)``, after every candidate (those
    scoring ``-inf`` included).
    """
    scores, excluded = _scores_with_exclusions(z, item_emb, exclude_index, exclude_items)
    excluded |= torch.isnan(scores)
    scores = scores.masked_fill(excluded, float("-inf"))
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    # Non-candidates after every candidate (a stable sort keeps the score order).
    last = torch.sort(excluded.gather(1, indices).to(torch.int8), dim=1, stable=True).indices
    values, indices = values.gather(1, last)[:, :k], indices.gather(1, last)[:, :k]
    indices = indices.masked_fill(excluded.gather(1, indices), -1)
    return values.contiguous(), indices.contiguous()


def reasoning_steps(
    h_start: torch.Tensor,
    step_emb: torch.Tensor,
    step_norm_weight: torch.Tensor,
    step_norm_bias: torch.Tensor,
    layer_weights,
    k_prefix,
    v_prefix,
    *,
    prefix_mask: Optional[torch.Tensor] = None,
    num_heads: int,
    eps: float,
) -> torch.Tensor:
    """The T latent steps of M streams through L post-LN layers (PLR Eq. 4-5), no dropout.

    ``h_start [B,M,d]`` (h_{0,m}), ``step_emb [T,d]`` (r_t), the step input's
    LayerNorm, ``layer_weights``: 16 tensors per layer (W_q, b_q, W_k, b_k,
    W_v, b_v, W_O, b_O, LN_1 weight, bias, W_1, b_1, W_2, b_2, LN_2 weight,
    bias), ``k_prefix / v_prefix``: per layer ``[B,H,N,Dh]``. Per step t:
    ``x^0 = LN_r(h_{t-1} + r_t)``; per layer ``q, k, v`` of x, the new k, v
    appended to the stream's own, ``a = stream_attention(...)``,
    ``y = LN_1(x + a W_O^T + b_O)``, ``x = LN_2(y + W_2 GELU(W_1 y + b_1) + b_2)``;
    ``h_t = x^L``. Returns ``[B,T,M,d]``.
    """
    b, m, d = h_start.shape
    dh = d // num_heads
    per_layer = 16
    layers = [layer_weights[i:i + per_layer] for i in range(0, len(layer_weights), per_layer)]

    def split(t):  # [B,M,d] -> [B,H,M,Dh]
        return t.view(b, m, num_heads, dh).transpose(1, 2)

    own_k = [None] * len(layers)
    own_v = [None] * len(layers)
    h, states = h_start, []
    for t in range(step_emb.shape[0]):
        x = F.layer_norm(h + step_emb[t], (d,), step_norm_weight, step_norm_bias, eps)
        for i, (wq, bq, wk, bk, wv, bv, wo, bo, n1w, n1b, w1, b1, w2, b2, n2w, n2b) in enumerate(layers):
            q = split(F.linear(x, wq, bq))
            k_new, v_new = split(F.linear(x, wk, bk))[..., None, :], split(F.linear(x, wv, bv))[..., None, :]
            own_k[i] = k_new if own_k[i] is None else torch.cat([own_k[i], k_new], dim=3)
            own_v[i] = v_new if own_v[i] is None else torch.cat([own_v[i], v_new], dim=3)
            a = stream_attention(q, k_prefix[i], v_prefix[i], own_k[i], own_v[i], prefix_mask=prefix_mask)
            a = a.transpose(1, 2).reshape(b, m, d)
            y = F.layer_norm(x + F.linear(a, wo, bo), (d,), n1w, n1b, eps)
            x = F.layer_norm(y + F.linear(F.gelu(F.linear(y, w1, b1)), w2, b2), (d,), n2w, n2b, eps)
        h = x
        states.append(h)
    return torch.stack(states, dim=1)
