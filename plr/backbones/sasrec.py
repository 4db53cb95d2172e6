"""SASRec backbone: item + position embeddings, L causal post-LN blocks.

``encode`` returns the encoder output ``H_enc`` and, per layer, the keys and
values of the prefix -- the shared prefix KV cache that every reasoning
stream of PLR attends to.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..transformer import PrefixEncoding, TransformerBackbone, causal_mask


POSITION_ANCHORS = ("start", "end")


def start_positions(key_mask: torch.Tensor) -> torch.Tensor:
    """``[B,N]`` valid items of left-padded rows -> ``[B,N]`` position ids
    counted from each row's first real item (ReaRec); padding gets 0 (it is
    masked out of every attention over real items)."""
    return (key_mask.long().cumsum(dim=1) - 1).clamp_min(0)


class SASRecBackbone(TransformerBackbone):
    """SASRec encoder. ``positions="start"`` (default, ReaRec) counts positions
    from the first real item, so the encoding of a prefix does not depend on
    the padding before it, and under causal attention the output at position
    t of one pass over a sequence *is* ``h_0`` of its prefix 1..t
    (``causal_sequences``: the sequence training mode relies on it).
    ``"end"`` counts them over the left-padded array (last slot = max_len - 1):
    the layout of checkpoints written before plr-checkpoint-v2."""

    def __init__(self, num_items, max_len, hidden_size, num_layers, num_heads, inner_size,
                 dropout, attn_dropout, layer_norm_eps, positions: str = "start"):
        super().__init__(num_items, max_len, max_len, hidden_size, num_layers, num_heads, inner_size, dropout,
                         attn_dropout, layer_norm_eps)
        if positions not in POSITION_ANCHORS:
            raise ValueError(f"positions: expected one of {list(POSITION_ANCHORS)}, got {positions!r}")
        self.positions = positions
        self.causal_sequences = positions == "start"
        # Row 0 is the padding item; the table is tied with the output layer.
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)

    def item_table(self) -> torch.Tensor:
        """``E [num_items + 1, d]``: input embedding and (tied) output layer."""
        return self.item_embedding.weight

    def input_embedding(self, item_seq: torch.Tensor) -> torch.Tensor:
        """X_0 = dropout(LN(E[items] + P)) for left-padded ``item_seq [B,N]``."""
        if self.positions == "start":
            positions = start_positions(item_seq != 0)
        else:
            positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        return self.embed(self.item_embedding(item_seq), positions)

    def encode(self, item_seq: torch.Tensor) -> PrefixEncoding:
        """``item_seq [B,N]`` left-padded ids -> H_enc and the prefix KV cache."""
        key_mask = item_seq != 0
        hidden, keys, values = self.run_layers(self.input_embedding(item_seq), causal_mask(key_mask))
        return PrefixEncoding(hidden, keys, values, key_mask)
