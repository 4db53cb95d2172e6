"""Sequence encoders that every model of plr (PLR included) can sit on.

A backbone is an ``nn.Module`` built as
``Backbone(num_items, max_len, hidden_size, num_layers, num_heads, inner_size,
dropout, attn_dropout, layer_norm_eps, **backbone_args)`` with:

* ``encode(item_seq [B,N]) -> PrefixEncoding``: the encoder output ``hidden``
  whose last position is ``h_0`` (the vector a next-item prediction scores
  with), and per layer the keys/values of every position -- the shared prefix
  KV cache PLR's reasoning streams attend to -- with ``key_mask [B,N']``;
* ``layers``: the ``TransformerBlock`` list that reasoning tokens run through
  (``forward_step``, stream-isolated attention over the cache, Eq. 4-5);
* ``item_table() -> [num_items + 1, d]``: the item representations used as
  input embeddings and, tied, as the output layer (row 0 = padding);
* ``reset_padding()``: called after weight initialisation.

Backbones are looked up by name in :data:`BACKBONES` (imported lazily).
"""

from __future__ import annotations

import importlib

from .sasrec import PrefixEncoding, SASRecBackbone, causal_mask

# name -> (module, class)
BACKBONES = {
    "sasrec": ("plr.backbones.sasrec", "SASRecBackbone"),
    "bert4rec": ("plr.backbones.bert4rec", "BERT4RecBackbone"),
    "unisrec": ("plr.backbones.unisrec", "UniSRecBackbone"),
}


def lazy_class(table: dict, name: str, argument: str) -> type:
    """The class registered as ``name`` in ``table`` (name -> (module, class)),
    imported on first use; an unknown name is an error naming ``argument``."""
    if name not in table:
        raise ValueError(f"{argument}: expected one of {sorted(table)}, got {name!r}")
    module, cls = table[name]
    return getattr(importlib.import_module(module), cls)


def backbone_class(name: str) -> type:
    return lazy_class(BACKBONES, name, "backbone")


__all__ = ["BACKBONES", "PrefixEncoding", "SASRecBackbone", "backbone_class", "causal_mask", "lazy_class"]
