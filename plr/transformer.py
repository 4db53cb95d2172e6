"""The transformer pieces every backbone and model of plr is built from.

* ``TransformerBackbone``: what the backbones of ``plr/backbones/`` share --
  learned positions, the input LayerNorm and dropout, L post-LN blocks run
  under an arbitrary mask -- and ``PrefixEncoding``, what ``encode`` returns
  (``H_enc`` and the per-layer prefix KV cache); ``causal_mask`` the SASRec mask.
* ``TransformerBlock``: post-LayerNorm blocks of SASRec (RecBole / ReaRec layout).

Each block serves two callers:

* ``forward_full`` runs a whole sequence under an arbitrary boolean mask and
  returns the keys/values it computed -- for the prefix these are the
  **shared prefix KV cache** of PLR;
* ``forward_step`` runs the M new reasoning tokens of one step (one per
  stream) against that cache and the streams' own cached keys/values, through
  ``plr_kernels.stream_attention`` (stream-isolated causal attention, PLR Eq. 4-5);
* ``forward_step_rows`` runs that step for many prefix ends of one encoder
  pass at once (sequence training: every position n of a sequence is the end
  of a prefix), through ``stream_attention(..., causal_prefix=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import plr_kernels

StreamCache = Optional[Tuple[torch.Tensor, torch.Tensor]]  # k, v [B,H,M,S,Dh] ([R,H,M,S,Dh] for rows)
Rows = Tuple[torch.Tensor, torch.Tensor]  # (sequence index [R], position index [R]) of the prefix ends


class MultiHeadAttention(nn.Module):
    """Self-attention + dropout + residual + LayerNorm (post-LN)."""

    def __init__(self, hidden_size: int, num_heads: int, attn_dropout: float, hidden_dropout: float, eps: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size: expected a multiple of num_heads={num_heads}, got {hidden_size}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = attn_dropout
        self.out_dropout = nn.Dropout(hidden_dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., L, H*Dh] -> [..., H, L, Dh]"""
        *lead, length, _ = x.shape
        return x.view(*lead, length, self.num_heads, self.head_dim).transpose(-2, -3)

    def _merge(self, ctx: torch.Tensor) -> torch.Tensor:
        """[..., H, L, Dh] -> [..., L, H*Dh]"""
        ctx = ctx.transpose(-2, -3)
        return ctx.reshape(*ctx.shape[:-2], self.num_heads * self.head_dim)

    def _output(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.out_dropout(self.dense(self._merge(ctx))))

    def _step_qkv(self, x: torch.Tensor):
        """q, k, v ``[B,H,M,Dh]`` of the new reasoning tokens ``x [B,M,d]``.

        Without autograd (inference): the three projections in one batched GEMM
        call (``baddbmm`` over the stacked weights, each product the same GEMM
        as its Linear) and one copy into the head-major layout the attention
        kernels read, instead of three calls and three copies. With autograd:
        the three Linears, so training is unchanged."""
        if torch.is_grad_enabled():
            return self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        weight, bias = self._stacked_qkv()  # [3,d,d], [3,1,d]
        *lead, m, d = x.shape
        rows = x.reshape(-1, d)
        qkv = torch.baddbmm(bias, rows.expand(3, *rows.shape), weight.transpose(1, 2))
        # [3, B*M, d] -> [3, B, H, M, Dh], contiguous
        qkv = qkv.view(3, *lead, m, self.num_heads, self.head_dim).transpose(-2, -3).contiguous()
        return qkv.unbind(0)

    def _stacked_qkv(self):
        """``stack(W_q, W_k, W_v)`` ``[3,d,d]`` and ``stack(b_q, b_k, b_v)``
        ``[3,1,d]``, rebuilt when a weight changed (an optimizer step or
        load_state_dict bumps ``_version``; ``.to()`` gives new storage). The
        cache holds aliases of the weights it was built from, so their storage
        cannot be reused by other tensors meanwhile; it is no parameter and not
        in the state_dict."""
        params = (self.query.weight, self.key.weight, self.value.weight,
                  self.query.bias, self.key.bias, self.value.bias)
        cache = self.__dict__.get("_qkv_cache")
        if cache is None or any(p.data_ptr() != a.data_ptr() or p._version != v or p.dtype != a.dtype
                                for p, (a, v) in zip(params, cache[0])):
            with torch.no_grad():
                stacked = (torch.stack(params[:3]), torch.stack(params[3:])[:, None, :])
            cache = ([(p.detach(), p._version) for p in params], stacked)
            self.__dict__["_qkv_cache"] = cache
        return cache[1]

    def forward_full(self, x: torch.Tensor, mask: torch.Tensor):
        """``x [B,L,d]``, ``mask [B,L,L]`` bool (True = may attend) -> ``(y, k, v)``."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self._output(x, ctx), k, v

    def forward_step(self, x, k_prefix, v_prefix, prefix_mask, cache: StreamCache, backend: str,
                     probs_out: Optional[list] = None):
        """``x [B,M,d]``: one new token per stream -> ``(y [B,M,d], new cache)``.

        ``probs_out`` (a list; attention maps): the step runs the reference op
        (``backend`` must be ``"torch"``) and appends its attention
        probabilities ``[B,H,M,N+S]`` (``plr_kernels.reference.stream_attention``)."""
        # [B,M,d] -> q [B,H,M,Dh], k/v [B,H,M,1,Dh]: each stream's new token is its latest key.
        q, k_new, v_new = self._step_qkv(x)
        k_new, v_new = k_new[..., None, :], v_new[..., None, :]
        if cache is None:
            k_stream, v_stream = k_new, v_new
        else:
            k_stream = torch.cat([cache[0], k_new], dim=3)
            v_stream = torch.cat([cache[1], v_new], dim=3)
        if probs_out is not None:
            if backend != "torch":
                raise ValueError(f"backend: recording attention probabilities runs the reference op, "
                                 f"expected 'torch', got {backend!r}")
            ctx, probs = plr_kernels.reference.stream_attention(
                q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask=prefix_mask,
                dropout_p=self.attn_dropout if self.training else 0.0, return_probs=True)
            probs_out.append(probs)
            return self._output(x, ctx), (k_stream, v_stream)
        ctx = plr_kernels.stream_attention(
            q, k_prefix, v_prefix, k_stream, v_stream,
            prefix_mask=prefix_mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            backend=backend,
        )
        return self._output(x, ctx), (k_stream, v_stream)

    def forward_step_rows(self, x, rows: Rows, k_prefix, v_prefix, prefix_mask, cache: StreamCache, backend: str):
        """One reasoning step for R prefix ends of one encoder pass.

        ``x [R,M,d]``: the new token of every stream of row r, whose prefix is
        positions ``0..n_r`` of sequence ``b_r`` (``rows = (b [R], n [R])``);
        ``k_prefix, v_prefix [B,H,N,Dh]`` the keys/values of the whole
        sequences, ``prefix_mask [B,N]``. The projections and the output run
        on the R rows only; the attention scatters them into the
        ``[B,H,N,M,...]`` layout of ``stream_attention(causal_prefix=True)``
        (rows not in ``rows`` get zero queries and keys, and their outputs
        are dropped, so they contribute no gradient). -> ``(y [R,M,d], cache)``.
        """
        b_idx, n_idx = rows
        batch, heads, length, _ = k_prefix.shape
        q = self._heads(self.query(x))  # [R,H,M,Dh]
        k_new = self._heads(self.key(x))[..., None, :]  # [R,H,M,1,Dh]
        v_new = self._heads(self.value(x))[..., None, :]
        if cache is None:
            k_stream, v_stream = k_new, v_new
        else:
            k_stream = torch.cat([cache[0], k_new], dim=3)
            v_stream = torch.cat([cache[1], v_new], dim=3)

        def dense(t: torch.Tensor) -> torch.Tensor:  # [R,H,...] -> [B,H,N,...], zero off the rows
            return scatter_rows(t.new_zeros(batch, heads, length, *t.shape[2:]), b_idx, n_idx, t)

        ctx = plr_kernels.stream_attention(
            dense(q), k_prefix, v_prefix, dense(k_stream), dense(v_stream),
            prefix_mask=prefix_mask, dropout_p=self.attn_dropout if self.training else 0.0,
            causal_prefix=True, backend=backend,
        )
        return self._output(x, ctx[b_idx, :, n_idx]), (k_stream, v_stream)


def scatter_rows(out: torch.Tensor, b_idx: torch.Tensor, n_idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``out[b_idx[r], :, n_idx[r]] = t[r]`` in place on ``out``, a fresh buffer
    (``aten.index_put_`` with ``None`` = the whole head dimension), returned;
    differentiable in ``t``. In place because the out-of-place ``index_put``
    copied the whole zero buffer first (the [B,H,N,M,S,Dh] stream keys and
    values): PLR's steps at M=4, T=5 on Beauty are 1.06x faster without it
    (``benchmarks/ab_builds.py``), and bit-identical."""
    return torch.ops.aten.index_put_(out, [b_idx, None, n_idx], t)


class FeedForward(nn.Module):
    """dense -> GELU -> dense -> dropout -> residual + LayerNorm."""

    def __init__(self, hidden_size: int, inner_size: int, hidden_dropout: float, eps: float):
        super().__init__()
        self.dense_in = nn.Linear(hidden_size, inner_size)
        self.dense_out = nn.Linear(inner_size, hidden_size)
        self.dropout = nn.Dropout(hidden_dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.dense_out(F.gelu(self.dense_in(x)))))


class TransformerBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, inner_size, hidden_dropout, attn_dropout, eps):
        super().__init__()
        self.attention = MultiHeadAttention(hidden_size, num_heads, attn_dropout, hidden_dropout, eps)
        self.feed_forward = FeedForward(hidden_size, inner_size, hidden_dropout, eps)

    def forward_full(self, x, mask):
        y, k, v = self.attention.forward_full(x, mask)
        return self.feed_forward(y), k, v

    def forward_step(self, x, k_prefix, v_prefix, prefix_mask, cache: StreamCache, backend: str,
                     probs_out: Optional[list] = None):
        y, cache = self.attention.forward_step(x, k_prefix, v_prefix, prefix_mask, cache, backend, probs_out)
        return self.feed_forward(y), cache

    def forward_step_rows(self, x, rows: Rows, k_prefix, v_prefix, prefix_mask, cache: StreamCache, backend: str):
        y, cache = self.attention.forward_step_rows(x, rows, k_prefix, v_prefix, prefix_mask, cache, backend)
        return self.feed_forward(y), cache

    def step_weights(self) -> List[torch.Tensor]:
        """The block's 16 parameters in the order ``plr_kernels.reasoning_steps`` reads them.

        Read from the modules' ``_modules`` / ``_parameters`` dicts: this runs
        on every inference call, and the 64 ``Module.__getattr__`` lookups of
        the plain spelling cost ~30 us, a tenth of a batch-1 reasoning pass."""
        a, f = self._modules["attention"]._modules, self._modules["feed_forward"]._modules
        return [p for mod in (a["query"], a["key"], a["value"], a["dense"], a["norm"], f["dense_in"], f["dense_out"],
                              f["norm"]) for p in (mod._parameters["weight"], mod._parameters["bias"])]


@dataclass
class PrefixEncoding:
    """What a backbone's ``encode`` returns: ``hidden[:, -1]`` is h_0, and the
    per-layer keys/values are the shared prefix KV cache of PLR."""

    hidden: torch.Tensor  # H_enc [B,N,d]
    keys: List[torch.Tensor]  # per layer [B,H,N,Dh]
    values: List[torch.Tensor]  # per layer [B,H,N,Dh]
    key_mask: torch.Tensor  # [B,N] bool, True = a real item


def causal_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """``[B,N]`` valid keys -> ``[B,N,N]``: causal over valid keys.

    The diagonal is always open so a padding query attends to itself and
    stays finite; no real position ever attends to a padding one.
    """
    n = key_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=key_mask.device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=key_mask.device)
    return (causal & key_mask[:, None, :]) | eye


class TransformerBackbone(nn.Module):
    """What the backbones share: learned positions, the input LayerNorm and
    dropout, and L post-LN blocks run under an arbitrary mask. Subclasses own
    the item representations (``item_embedding`` when they have one)."""

    def __init__(self, num_items, max_len, num_positions, hidden_size, num_layers, num_heads, inner_size,
                 dropout, attn_dropout, layer_norm_eps):
        super().__init__()
        # True when one causal pass over a sequence gives h_0 of every prefix
        # (start-anchored positions, causal attention): plr's sequence training mode.
        self.causal_sequences = False
        self.num_items = num_items
        self.max_len = max_len
        self.num_heads = num_heads
        self.position_embedding = nn.Embedding(num_positions, hidden_size)
        self.input_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, inner_size, dropout, attn_dropout, layer_norm_eps)
            for _ in range(num_layers)
        )

    def reset_padding(self) -> None:
        """Zero the padding row of the item embedding after initialisation."""
        table = getattr(self, "item_embedding", None)
        if table is not None:
            with torch.no_grad():
                table.weight[0].zero_()

    def embed(self, item_vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """X_0 = dropout(LN(v + P[positions])) for ``item_vectors [B,L,d]``;
        ``positions`` is ``[L]`` (shared by all rows) or ``[B,L]``."""
        pos = self.position_embedding(positions)
        return self.input_dropout(self.input_norm(item_vectors + (pos[None] if positions.dim() == 1 else pos)))

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor):
        """All L blocks over ``x [B,L,d]`` under ``mask [B,L,L]`` -> (out, keys, values)."""
        keys, values = [], []
        for layer in self.layers:
            x, k, v = layer.forward_full(x, mask)
            keys.append(k)
            values.append(v)
        return x, keys, values
