"""UniSRec backbone (Hou et al., KDD 2022): items represented by their text.

Each item's title is embedded once by a frozen sentence encoder (plr.text,
all-MiniLM-L6-v2, 384-d) into the buffer ``text_emb`` ``x_i``. A mixture of
parametric-whitening experts adapts it to the recommendation space
(UniSRec Eq. 1-3; equation numbers are UniSRec's):

* Eq. 1  expert k:   x~_i^(k) = (x_i - b_k) W_k          (b_k [D_t], W_k [D_t, d])
* Eq. 2  gate:       g_i = softmax(x_i W_g + noise)     (noise only in training:
                     N(0,1) * (softplus(x_i W_n) + 1e-2), UniSRec's noisy gating)
* Eq. 3  item:       v_i = sum_k g_i,k x~_i^(k)

with dropout (UniSRec's ``adaptor_dropout_prob`` = 0.2) on x_i before each
expert. The sequence encoder is SASRec's (UniSRec Sec. 2.3): learned absolute
positions, LayerNorm + dropout, causal post-LN TransformerBlocks; ``encode``
returns H_enc and the per-layer prefix KV cache exactly like SASRecBackbone,
so PLR's reasoning streams run on it unchanged.

Settings:

* ``use_id=True`` (default): UniSRec's *transductive* fine-tuning, v_i + e_i
  with a learned ID embedding e_i -- the better setting in UniSRec's Table 3
  when, as here, the items of the test are the items of training and there is
  no cross-domain pre-training (out of scope here). ``use_id=False`` is the
  *inductive* setting: items are their text only (new items can be scored).
* ``normalize_items=True`` (default): ``item_table()`` -- the output layer --
  returns unit-norm rows, UniSRec's cosine scoring; the models here score
  ``h . e_v / tau`` (tau = model.temperature, 0.07 as in UniSRec), and
  UniSRecModel L2-normalises h_0, so its score is UniSRec's cos(h, v)/tau.
  The *input* embeddings are the un-normalised v_i (+ e_i), as in UniSRec.

``item_table()`` costs a pass of the adapter over all items; in eval mode
without autograd it is cached, and the cache is dropped when the module
switches to training or any parameter/buffer changes (tensor versions).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validation import check_positive_int, check_probability
from ..transformer import PrefixEncoding, TransformerBackbone, causal_mask

GATE_NOISE_EPS = 1e-2  # UniSRec's noise_epsilon


class MoEAdapter(nn.Module):
    """Mixture of K parametric-whitening experts (UniSRec Eq. 1-3): ``[..., D_t] -> [..., d]``."""

    def __init__(self, text_dim: int, hidden_size: int, num_experts: int = 8, dropout: float = 0.2,
                 gate_noise: bool = True):
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.gate_noise = bool(gate_noise)
        # UniSRec Eq. 1: b_k (the whitening mean) and W_k (the whitening projection), stacked over k.
        self.whitening_bias = nn.Parameter(torch.zeros(num_experts, text_dim))
        self.whitening_proj = nn.Parameter(torch.empty(num_experts, text_dim, hidden_size))
        nn.init.normal_(self.whitening_proj, mean=0.0, std=0.02)
        # UniSRec Eq. 2: W_g (zero init: uniform gate at start, as UniSRec) and W_n (noise scale).
        self.gate_weight = nn.Parameter(torch.zeros(text_dim, num_experts))
        self.noise_weight = nn.Parameter(torch.zeros(text_dim, num_experts))
        self.dropout = nn.Dropout(check_probability("adaptor_dropout", dropout))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """UniSRec Eq. 2: ``x [..., D_t] -> g [..., K]`` (rows sum to 1)."""
        logits = x @ self.gate_weight
        if self.gate_noise and self.training:
            std = F.softplus(x @ self.noise_weight) + GATE_NOISE_EPS
            logits = logits + torch.randn_like(logits) * std
        return torch.softmax(logits, dim=-1)

    def experts(self, x: torch.Tensor) -> torch.Tensor:
        """UniSRec Eq. 1 for every expert: ``x [..., D_t] -> [..., K, d]``, an independent
        dropout mask on x for each expert (UniSRec's PWLayer)."""
        xk = x.unsqueeze(-2).expand(*x.shape[:-1], self.num_experts, x.shape[-1])
        xk = self.dropout(xk) - self.whitening_bias  # (x - b_k)
        return torch.einsum("...ki,kio->...ko", xk, self.whitening_proj)  # (x - b_k) W_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """UniSRec Eq. 3: ``v = sum_k g_k (x - b_k) W_k``."""
        return (self.gate(x).unsqueeze(-1) * self.experts(x)).sum(dim=-2)


class UniSRecBackbone(TransformerBackbone):
    def __init__(self, num_items, max_len, hidden_size, num_layers, num_heads, inner_size, dropout,
                 attn_dropout, layer_norm_eps, text_dim: int = 384, num_experts: int = 8,
                 adaptor_dropout: float = 0.2, gate_noise: bool = True, use_id: bool = True,
                 normalize_items: bool = True, text_cache_dir: Optional[str] = None):
        super().__init__(num_items, max_len, max_len, hidden_size, num_layers, num_heads, inner_size, dropout,
                         attn_dropout, layer_norm_eps)
        self.text_dim = check_positive_int("text_dim", text_dim)
        self.use_id = bool(use_id)
        self.normalize_items = bool(normalize_items)
        self.text_cache_dir = text_cache_dir
        # Frozen sentence embeddings x_i (row 0 = padding); filled by attach_dataset,
        # persistent so that checkpoints carry the item text.
        self.register_buffer("text_emb", torch.zeros(num_items + 1, text_dim))
        self.adapter = MoEAdapter(text_dim, hidden_size, num_experts, adaptor_dropout, gate_noise)
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0) if self.use_id else None
        self._cache = None  # (versions key, raw table, output table), eval mode only

    # -- item text ---------------------------------------------------------------------

    def attach_dataset(self, dataset) -> None:
        """Fill ``text_emb`` from ``dataset.item_titles`` (plr.text, cached on disk)."""
        from ..text import item_text_embeddings

        titles = list(getattr(dataset, "item_titles", None) or [])
        name = getattr(dataset, "name", "dataset")
        if len(titles) != self.num_items + 1:
            raise ValueError(f"dataset.item_titles: expected {self.num_items + 1} entries (row 0 = padding), "
                             f"got {len(titles)}")
        known = sum(1 for t in titles[1:] if isinstance(t, str) and t.strip())
        if known == 0:
            raise ValueError(f"dataset {name!r}: the unisrec backbone needs item titles, but the dataset has none "
                             f"(give a dataset with item text: items.tsv, a RecBole .item file with a title column, "
                             f"or MovieLens movies)")
        emb = item_text_embeddings(titles, cache_dir=self.text_cache_dir, dataset_name=name)
        self.set_text_embeddings(emb)

    def set_text_embeddings(self, emb: torch.Tensor) -> None:
        """Copy ``emb [num_items + 1, text_dim]`` into ``text_emb`` (row 0 forced to zero)."""
        expected = (self.num_items + 1, self.text_dim)
        if not isinstance(emb, torch.Tensor) or tuple(emb.shape) != expected:
            got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"text embeddings: expected shape {expected}, got {got}")
        with torch.no_grad():
            self.text_emb.copy_(emb.to(self.text_emb))
            self.text_emb[0].zero_()
        self._cache = None

    # -- item representations ----------------------------------------------------------

    def reset_padding(self) -> None:
        """Zero the padding row of the ID embedding after initialisation."""
        super().reset_padding()
        self._cache = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _versions(self):
        return tuple((t.data_ptr(), t._version, t.dtype, t.device)
                     for t in list(self.adapter.parameters()) + [self.text_emb]
                     + ([self.item_embedding.weight] if self.item_embedding is not None else []))

    def _represent(self, text: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """v = MoE(x) (+ e_id): ``text [..., D_t]``, ``ids [...]`` -> ``[..., d]``, padding rows zero."""
        v = self.adapter(text)
        if self.item_embedding is not None:
            v = v + self.item_embedding(ids)
        return v * (ids != 0).unsqueeze(-1).to(v.dtype)  # the padding item has no representation

    def _tables(self):
        """(raw table [V+1,d] -- input embeddings, output table -- normalised if asked)."""
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable and self._cache is not None and self._cache[0] == self._versions():
            return self._cache[1], self._cache[2]
        ids = torch.arange(self.num_items + 1, device=self.text_emb.device)
        raw = self._represent(self.text_emb, ids)
        out = F.normalize(raw, dim=-1) if self.normalize_items else raw  # row 0 stays 0
        self._cache = (self._versions(), raw, out) if cacheable else None
        return raw, out

    def item_table(self) -> torch.Tensor:
        """``[num_items + 1, d]``: the output layer (row 0 = zeros), unit rows with normalize_items."""
        return self._tables()[1]

    # -- sequence encoder (SASRec's) ----------------------------------------------------

    def input_embedding(self, item_seq: torch.Tensor) -> torch.Tensor:
        """X_0 = dropout(LN(v[items] + P)), v from the adapter on the gathered text rows
        (an independent adapter dropout per position, as UniSRec); from the cached
        table in eval mode."""
        cached = not self.training and not torch.is_grad_enabled()
        v = self._tables()[0][item_seq] if cached else self._represent(self.text_emb[item_seq], item_seq)
        return self.embed(v, torch.arange(item_seq.shape[1], device=item_seq.device))

    def encode(self, item_seq: torch.Tensor) -> PrefixEncoding:
        """``item_seq [B,N]`` left-padded ids -> H_enc and the prefix KV cache."""
        key_mask = item_seq != 0
        hidden, keys, values = self.run_layers(self.input_embedding(item_seq), causal_mask(key_mask))
        return PrefixEncoding(hidden, keys, values, key_mask)
