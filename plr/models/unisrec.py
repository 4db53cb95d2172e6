"""UniSRec (Hou et al., KDD 2022), fine-tuning stage, on the text backbone.

The model is SASRec's training on plr.backbones.unisrec.UniSRecBackbone: item
representations come from item text through the MoE whitening adapter
(UniSRec Eq. 1-3), the sequence encoder is SASRec's, and the next item is
predicted by full-softmax cross-entropy over all items (padding excluded) of

    s(v) = cos(h_0, v) / tau  =  (h_0/|h_0|) . (v/|v|) / tau,     tau = 0.07,

UniSRec's fine-tuning loss: h_0 is L2-normalised here, the item table by the
backbone (``normalize_items``). UniSRec's multi-domain *pre-training*
(sequence-item and sequence-sequence contrastive tasks over several source
domains) is out of scope: the adapter and encoder are trained from scratch on
the target dataset (with ``use_id``: UniSRec's transductive setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ModelOutput
from .sasrec import SASRecModel


class UniSRecModel(SASRecModel):
    """SASRec training on the ``unisrec`` backbone, cosine scores / temperature.

    Args: those of SASRecModel (``max_len, hidden_size, num_layers, num_heads,
    inner_size, dropout, attn_dropout, layer_norm_eps, temperature, backend``),
    ``backbone_args`` for UniSRecBackbone (``text_dim, num_experts,
    adaptor_dropout, gate_noise, use_id, normalize_items, text_cache_dir``) and
    ``normalize_sequence`` (L2-normalise h_0 before scoring; UniSRec: True).
    """

    def __init__(self, num_items: int, backbone: str = "unisrec", normalize_sequence: bool = True, **kwargs):
        if backbone != "unisrec":
            raise ValueError(f"backbone: UniSRecModel runs on the 'unisrec' backbone, got {backbone!r}")
        if not isinstance(normalize_sequence, bool):
            raise TypeError(f"normalize_sequence: expected a bool, got {normalize_sequence!r}")
        super().__init__(num_items, backbone=backbone, **kwargs)
        self._config["normalize_sequence"] = normalize_sequence
        self.normalize_sequence = normalize_sequence

    def forward_prepared(self, item_seq: torch.Tensor) -> ModelOutput:
        h0 = self.backbone.encode(item_seq).hidden[:, -1]
        if self.normalize_sequence:
            h0 = F.normalize(h0, dim=-1)
        return ModelOutput(h0=h0, z_final=h0)
