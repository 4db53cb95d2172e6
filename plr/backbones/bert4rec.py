"""BERT4Rec backbone (Sun et al. 2019; the RecBole layout): item + position
embeddings, L post-LN blocks with **bidirectional** attention over the items.

Token ids: ``0`` = padding, ``1..num_items`` = items, ``num_items + 1`` = the
``[MASK]`` token. The embedding table has ``num_items + 2`` rows; the
``[MASK]`` row is an input embedding only -- :meth:`item_table` (the tied
output layer, ``[num_items + 1, d]``, row 0 = padding) never contains it, so
no softmax or ranking can ever return it.

Next-item prediction (BERT4Rec's inference): ``encode(item_seq [B,N])``
appends one ``[MASK]`` after the last item and runs the blocks over the
``N + 1`` tokens, every valid token attending to every valid token::

    X_0 = dropout(LN(E[tokens] + P))        tokens = [s_1 .. s_N, MASK]
    H_enc = Block_L(... Block_1(X_0; A))    A[i, j] = valid(j)  (or i == j)
    h_0 = H_enc[:, -1]                      the [MASK]'s output scores the next item

The per-layer keys/values of the ``N + 1`` tokens (the [MASK] included) are
the shared prefix KV cache: under PLR the reasoning tokens attend to all of
them and causally to their own stream (``TransformerBlock.forward_step``), so
the items are bidirectional and the reasoning tokens causal (PLR Eq. 4-5).

Positions are **right-aligned** on a grid of ``max_len + 1`` slots: the last
token of any sequence takes position ``max_len`` (the slot of the appended
[MASK]). With histories left-padded to ``max_len`` this is simply
``0..max_len``; a Cloze training sequence of ``max_len`` tokens whose last
token is the (masked) next item puts that item at the same position the
[MASK] takes at inference.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..transformer import PrefixEncoding, TransformerBackbone


def bidirectional_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """``[B,N]`` valid keys -> ``[B,N,N]``: every query attends to every valid key.

    The diagonal is always open so a padding query attends to itself and
    stays finite; no real position ever attends to a padding one.
    """
    n = key_mask.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=key_mask.device)
    return key_mask[:, None, :].expand(-1, n, -1) | eye


class BERT4RecBackbone(TransformerBackbone):
    def __init__(self, num_items, max_len, hidden_size, num_layers, num_heads, inner_size,
                 dropout, attn_dropout, layer_norm_eps):
        # max_len items + the appended [MASK].
        super().__init__(num_items, max_len, max_len + 1, hidden_size, num_layers, num_heads, inner_size, dropout,
                         attn_dropout, layer_norm_eps)
        self.mask_token = num_items + 1
        # Rows 0 (padding), 1..num_items (items, tied with the output layer), num_items + 1 ([MASK]).
        self.item_embedding = nn.Embedding(num_items + 2, hidden_size, padding_idx=0)

    def item_table(self) -> torch.Tensor:
        """``E [num_items + 1, d]`` (row 0 = padding; the [MASK] row left out):
        the input embedding of the items and the (tied) output layer."""
        return self.item_embedding.weight[: self.num_items + 1]

    def input_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """X_0 = dropout(LN(E[tokens] + P)), positions right-aligned on ``0..max_len``."""
        if tokens.dim() != 2 or tokens.shape[1] > self.max_len + 1:
            raise ValueError(f"tokens: expected shape [batch, length <= max_len + 1 = {self.max_len + 1}], "
                             f"got {list(tokens.shape)}")
        length = tokens.shape[1]
        positions = torch.arange(self.max_len + 1 - length, self.max_len + 1, device=tokens.device)
        return self.embed(self.item_embedding(tokens), positions)

    def encode_tokens(self, tokens: torch.Tensor) -> PrefixEncoding:
        """Bidirectional encoding of an arbitrary left-padded token sequence.

        ``tokens [B,L]`` (L <= max_len + 1) holds item ids, ``0`` for padding
        and :attr:`mask_token` wherever an item is hidden (the Cloze input).
        Returns ``H_enc [B,L,d]``, the per-layer keys/values and
        ``key_mask = tokens != 0``.
        """
        key_mask = tokens != 0
        hidden, keys, values = self.run_layers(self.input_embedding(tokens), bidirectional_mask(key_mask))
        return PrefixEncoding(hidden, keys, values, key_mask)

    def append_mask(self, item_seq: torch.Tensor) -> torch.Tensor:
        """``[B,N]`` -> ``[B,N+1]``: one [MASK] after the last item of each history."""
        mask_column = torch.full_like(item_seq[:, :1], self.mask_token)
        return torch.cat([item_seq, mask_column], dim=1)

    def encode(self, item_seq: torch.Tensor) -> PrefixEncoding:
        """``item_seq [B,N]`` left-padded ids (N <= max_len) -> the encoding of
        ``[items, MASK]`` (``N + 1`` positions): ``hidden[:, -1]`` is ``h_0``,
        the [MASK]'s output; keys/values and ``key_mask [B,N+1]`` cover the
        items and the [MASK] (the prefix KV cache of PLR)."""
        if item_seq.dim() != 2 or item_seq.shape[1] > self.max_len:
            raise ValueError(f"item_seq: expected shape [batch, length <= max_len = {self.max_len}], "
                             f"got {list(item_seq.shape)}")
        return self.encode_tokens(self.append_mask(item_seq))
