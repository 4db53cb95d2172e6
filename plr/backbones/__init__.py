"""Sequence encoders that every model of plr (PLR included) can sit on.

A backbone is an ``nn.Module`` built as
``Backbone(num_items, max_len, hidden_size, num_layers, num_heads, inner_size,
dropout, attn_dropout, layer_norm_eps, **backbone_args)`` with:

* ``encode(item_seq [B,N]) -> PrefixEncoding``: the encoder output ``hidden``
  whose last position is ``h_0`` (the vector a next-item prediction scores
  with), and per layer the keys/values of every position -- the shared prefix
  KV cache PLR's reasoning streams attend to -- with ``key_mask [B,N']``;
* ``layers``: the ``TransformerBlock`` list that reasoning tokens run through
  (``forward_step``, stream-isolated attention over the cache, PLR Eq. 4-5);
* ``item_table() -> [num_items + 1, d]``: the item representations used as
  input embeddings and, tied, as the output layer (row 0 = padding);
* ``reset_padding()``: called after weight initialisation.

Backbones are looked up by name in ``plr.registry.BACKBONES`` (imported lazily);
what they share (``TransformerBackbone``, ``PrefixEncoding``, ``causal_mask``,
the blocks) is in ``plr/transformer.py``.
"""

from __future__ import annotations

from ..registry import BACKBONES, backbone_class
from ..transformer import PrefixEncoding, TransformerBackbone, causal_mask
from .sasrec import SASRecBackbone

__all__ = ["BACKBONES", "PrefixEncoding", "SASRecBackbone", "TransformerBackbone", "backbone_class", "causal_mask"]
